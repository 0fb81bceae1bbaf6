"""The status page the metadata leader serves (`http = "HOST:PORT"` in a metadata node's config): racks ->
nodes (state, disk use, groups), degraded groups and running repairs with progress and ETA, volumes with
their attachments. `/` is HTML that refreshes itself, `/status.json` the same view for scripts.

Rules:
1. Read-only, and cheap for the cluster: the map is this node's applied copy (no proposal), the nodes'
   views (groups, repairs, disk use) are asked at most once per VIEW_TTL_S however many browsers look, each
   node with a short deadline (a dead node costs the page NODE_TIMEOUT_S, not a hang).
2. A follower redirects to the leader's page when it knows the leader's `http` address (307), else it
   shows its own, possibly stale, view under a banner saying so.
3. No JavaScript: the page is HTML and CSS, refreshed by `<meta http-equiv="refresh">`; every row carries
   data-* attributes (node, state, group) so tests and scripts can read it without scraping text.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from typing import TYPE_CHECKING, Any

from raftblock.obs.http import Request, Response

if TYPE_CHECKING:
    from raftblock.meta.group import MetaNode

VIEW_TTL_S = 2.0
NODE_TIMEOUT_S = 1.0
REFRESH_S = 5


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StatusPage:
    def __init__(self, node: MetaNode, members_http: dict[int, str]) -> None:
        self.node = node
        self.members_http = members_http
        self._view: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    # --- the view ----------------------------------------------------------------------------------
    async def view(self) -> dict[str, Any]:
        async with self._lock:
            if self._view is None or time.monotonic() - self._at > VIEW_TTL_S:
                self._view = await self._collect()
                self._at = time.monotonic()
            return self._view

    async def _collect(self) -> dict[str, Any]:
        from raftblock.control.raftrepair import repair_needed
        from raftblock.control.status import collect_status
        from raftblock.node.clustermap import ClusterMap, registered_nodes

        node = self.node
        st = node.state()
        leader = node.leader_id()
        cmap = ClusterMap(st.cluster_id, registered_nodes(st))
        status = await collect_status(cmap, st, attempt_timeout_s=NODE_TIMEOUT_S, secret=node.config.secret)
        det = node.detector
        used_hb = {lv.node_id: lv.used_bytes for lv in det.view(0, list(st.nodes))} if det is not None else {}
        hosted: dict[int, int] = {}
        for g in st.groups.values():
            for m in g.members:
                hosted[int(m)] = hosted.get(int(m), 0) + 1
        by_id = {n["id"]: n for n in status["nodes"]}
        racks: dict[str, list[dict[str, Any]]] = {}
        for n in sorted(st.nodes.values(), key=lambda n: n.node_id):
            s = by_id.get(int(n.node_id), {})
            used = s.get("used_bytes", used_hb.get(n.node_id))
            racks.setdefault(n.rack, []).append({
                "id": int(n.node_id), "rack": n.rack, "address": n.address, "state": n.state,
                "draining": n.draining, "reachable": s.get("state") == "up",
                "capacity_bytes": n.capacity_bytes, "used_bytes": used,
                "groups": hosted.get(int(n.node_id), 0), "leading": s.get("leading"),
                "errors": s.get("errors", {})})
        volume_of = {int(g): v.name for v in st.volumes.values() for g in v.extent_groups}
        needed = repair_needed(st)
        repairs = [{**r, "volume": volume_of.get(r["group"], "")} for r in status["repairs"]]
        attached = {name: {"gateway": a.gateway_id, "epoch": a.attach_epoch} for name, a in st.attachments.items()}
        snaps: dict[int, int] = {}
        for r in st.snapshots.values():
            snaps[r.volume_id] = snaps.get(r.volume_id, 0) + 1
        volumes = [{"name": v.name, "size_bytes": v.size_bytes, "replication": v.mode, "state": v.state,
                    "groups": len(set(v.extent_groups)), "snapshots": snaps.get(v.volume_id, 0),
                    "attached": attached.get(v.name)}
                   for v in sorted(st.volumes.values(), key=lambda v: v.name)]
        return {
            "cluster_id": st.cluster_id, "generated_ms": int(time.time() * 1000), "map_version": st.applied,
            "this_node": int(node.config.node_id), "leader": int(leader) if leader is not None else None,
            "is_leader": node.is_leader(),
            "racks": {r: ns for r, ns in sorted(racks.items())},
            # short of live copies, or a member still being rebuilt
            "groups": {"total": len(st.groups), "degraded": len(set(needed) | {r["group"] for r in repairs})},
            "repairs": repairs, "volumes": volumes,
            "gateways": sorted(st.gateways),
        }

    # --- routes ------------------------------------------------------------------------------------
    def _redirect(self, path: str) -> Response | None:
        node = self.node
        if node.is_leader():
            return None
        leader = node.leader_id()
        url = self.members_http.get(int(leader)) if leader is not None else None
        if not url:
            return None
        host = url if url.startswith("http") else f"http://{url}"
        return Response(307, f"the metadata leader is {leader}: {host}{path}\n".encode(),
                        headers={"Location": f"{host}{path}"})

    async def json_page(self, req: Request) -> Response:
        redirect = self._redirect(req.path)
        if redirect is not None:
            return redirect
        return Response(200, json.dumps(await self.view(), indent=1).encode(), "application/json")

    async def html_page(self, req: Request) -> Response:
        redirect = self._redirect(req.path)
        if redirect is not None:
            return redirect
        return Response(200, render(await self.view()).encode(), "text/html; charset=utf-8")


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .5em}
.sub{color:#5a6270;margin-bottom:1em} .banner{background:#fff3cd;border:1px solid #e0c060;padding:.5em;margin:.5em 0}
.cards{display:flex;gap:1em;flex-wrap:wrap} .card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:.6em .9em}
.card b{font-size:1.3em;display:block}
.racks{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
.rack{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:.5em .8em;min-width:20em}
table{border-collapse:collapse;background:#fff} td,th{padding:.25em .6em;border-bottom:1px solid #e5e8ee;text-align:left}
th{font-weight:600;color:#3b4250} .state-up{color:#16803c;font-weight:600} .state-suspect{color:#b7791f;font-weight:600}
.state-down{color:#c53030;font-weight:700} .bad{color:#c53030} .muted{color:#7a8290}
.bar{display:inline-block;width:8em;height:.7em;background:#e5e8ee;border-radius:3px;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b82f6;border-radius:3px} .bar.full span{background:#c53030}
"""


def _bar(frac: float, cls: str = "") -> str:
    pct = max(0.0, min(1.0, frac)) * 100
    return f'<span class="bar {cls}"><span style="width:{pct:.0f}%"></span></span> {pct:.0f}%'


def render(v: dict[str, Any]) -> str:
    e = html.escape
    nodes = [n for ns in v["racks"].values() for n in ns]
    up = sum(1 for n in nodes if n["state"] == "up")
    copying = [r for r in v["repairs"] if r.get("state") == "copying"]
    out = [f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">'
           f"<title>raftblock {e(v['cluster_id'][:12])}</title><style>{CSS}</style></head><body>",
           f"<h1>raftblock cluster <code>{e(v['cluster_id'])}</code></h1>",
           f'<div class="sub">metadata leader: <b id="leader">m{v["leader"]}</b> · this page from m{v["this_node"]} · '
           f'map version {v["map_version"]} · {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["generated_ms"] / 1000))}'
           f" · refreshes every {REFRESH_S} s</div>"]
    if not v["is_leader"]:
        out.append('<div class="banner">This metadata node is not the leader and does not know where the leader '
                   "serves its page: what follows is its own copy of the map and may be behind.</div>")
    deg = v["groups"]["degraded"]
    out.append('<div class="cards">'
               f'<div class="card" id="nodes-up"><b>{up} / {len(nodes)}</b>storage nodes up</div>'
               f'<div class="card" id="groups-degraded"><b class="{"bad" if deg else ""}">{deg}</b>'
               f'of {v["groups"]["total"]} groups degraded</div>'
               f'<div class="card" id="repairs-running"><b>{len(copying)}</b>replicas being rebuilt</div>'
               f'<div class="card"><b>{len(v["volumes"])}</b>volumes</div></div>')
    out.append("<h2>Racks and nodes</h2><div class=\"racks\">")
    for rack, ns in v["racks"].items():
        out.append(f'<div class="rack" data-rack="{e(rack)}"><b>rack {e(rack)}</b><table>'
                   "<tr><th>node</th><th>state</th><th>disk used</th><th>groups</th><th>leads</th></tr>")
        for n in ns:
            state = n["state"] + (" (draining)" if n["draining"] else "") + \
                ("" if n["reachable"] or n["state"] != "up" else " (unreachable)")
            cap, used = n["capacity_bytes"], n["used_bytes"]
            disk = (f"{_size(used)} of {_size(cap)} " + _bar(used / cap, "full" if used / cap > 0.9 else "")) \
                if cap and used is not None else _size(used)
            errs = ", ".join(f"{k} {c}" for k, c in sorted(n["errors"].items()))
            out.append(f'<tr data-node="{n["id"]}" data-state="{e(n["state"])}"><td>n{n["id"]} '
                       f'<span class="muted">{e(n["address"])}</span></td>'
                       f'<td class="state-{e(n["state"])}">{e(state)}</td><td>{disk}</td><td>{n["groups"]}</td>'
                       f'<td>{n["leading"] if n["leading"] is not None else "–"}</td></tr>'
                       + (f'<tr><td colspan="5" class="bad">{e(errs)}</td></tr>' if errs else ""))
        out.append("</table></div>")
    out.append("</div><h2>Degraded groups and repairs</h2>")
    if not v["repairs"]:
        out.append('<p id="no-repairs">Every group has all its replicas.</p>')
    else:
        out.append('<table id="repairs"><tr><th>group</th><th>volume</th><th>state</th><th>from → to</th>'
                   "<th>progress</th><th>rate</th><th>ETA</th><th>why</th></tr>")
        for r in v["repairs"]:
            if r.get("state") == "copying":
                prog = _bar(r["bytes_done"] / max(1, r["bytes_total"])) + \
                    f' <span class="muted">{_size(r["bytes_done"])} / {_size(r["bytes_total"])}</span>'
                cells = (f'n{r["from"]} → n{r["to"]}', prog, f'{_size(r["rate_bytes_per_s"])}/s', _eta(r.get("eta_s")), "")
            else:
                cells = ("", "", "", "", e(str(r.get("why", ""))))
            out.append(f'<tr data-group="{r["group"]}" data-state="{e(r["state"])}"><td>{r["group"]}</td>'
                       f'<td>{e(r["volume"])}</td><td>{e(r["state"])}</td>' + "".join(f"<td>{c}</td>" for c in cells)
                       + "</tr>")
        out.append("</table>")
    out.append('<h2>Volumes</h2><table id="volumes"><tr><th>volume</th><th>size</th><th>replication</th>'
               "<th>state</th><th>groups</th><th>snapshots</th><th>attached by</th></tr>")
    for vol in v["volumes"]:
        att = vol["attached"]
        out.append(f'<tr data-volume="{e(vol["name"])}"><td>{e(vol["name"])}</td><td>{_size(vol["size_bytes"])}</td>'
                   f'<td>{e(vol["replication"])}</td><td>{e(vol["state"])}</td><td>{vol["groups"]}</td>'
                   f'<td>{vol["snapshots"]}</td><td>'
                   + (f'{e(att["gateway"])} <span class="muted">epoch {att["epoch"]}</span>' if att else
                      '<span class="muted">–</span>') + "</td></tr>")
    out.append('</table><p class="muted">JSON: <a href="/status.json">/status.json</a> · '
               'Prometheus: <a href="/metrics">/metrics</a></p></body></html>')
    return "".join(out)
