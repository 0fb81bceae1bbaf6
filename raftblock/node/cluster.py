"""A local cluster on one machine: `raftblock cluster up|down|status` and `raftblock volume ...`.

Owns the cluster directory and the processes in it (detached: they outlive the command):

    DIR/cluster.json          the layout (clustermap.py): storage nodes, racks, addresses, metadata ports
    DIR/meta/                 the metadata group: meta-I.toml, meta-I/ (its data), cluster.secret
    DIR/nodes/nI.toml         node configs (`raftblock node --config`), DIR/nodes/gateway.toml
    DIR/nI/                   node I's data: engine/ segments and wal/

The cluster map (volumes, groups, node states) is in the metadata group: 3 metadata processes (m1..m3,
one beside each of the first 3 storage nodes) or 1 with fewer nodes.
    DIR/run/                  pid files, READY files, the gateway's admin socket
    DIR/logs/                 one JSON log per process

Rules:
1. `up` on an existing DIR only starts what is not running (a killed node comes back on its data);
   it never rewrites the layout or any data. It returns when every storage node is registered and up
   in the metadata group and every extent group has a leader.
2. Processes are found by the lock each holds on its data directory (node/dirlock.py; the gateway: on
   its admin socket), so any spelling of DIR (relative, absolute, through a symlink) finds them and `up`
   never starts a second process on a directory in use; a pid file is only the fallback for a directory
   this process cannot see, checked against the process's command line by inode. Never by name.
3. `down` sends SIGTERM (processes drain and sync), waits with a deadline, then SIGKILL.
4. Errors are one line on stderr and a non-zero exit (the CLI prints ClusterError).
The directory layout, the configs and the process handling (rules 2, 3) are node/layout.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from raftblock.control.status import ERROR_COUNTERS, collect_status  # noqa: F401  (ERROR_COUNTERS: campaign.py)
from raftblock.meta.rpc import MetaClient, MetaClientError
from raftblock.meta.state import MetaState, VolumeRecord
from raftblock.node.clustermap import ClusterMap, NodeEntry, extent_id, registered_nodes
from raftblock.node.layout import (
    ClusterError,
    Layout,
    create_layout,
    free_port,
    local_layout,
    make_lab_certs,
    open_layout,
    running_pid,
    set_cli_identity,
    spawn,
    stop_process,
    wait_ready,
    write_cluster_file,
    write_configs,
    write_node_configs,
)
from raftblock.qos import UNSET, QosSpec
from raftblock.replication.raft.types import NodeId
from raftblock.units import format_size
from raftblock.wire.auth import KeyRing

HEALTHY_TIMEOUT_S = 60.0
ISCSI_PORT_DEFAULT = 3260
POLL_S = 0.05
DROP_IN_FLIGHT_MAX = 32  # trims in flight while `volume delete` empties a volume
T = TypeVar("T")


def _secret(layout: Layout) -> bytes:
    return layout.secret_file.read_bytes().strip()


def meta_client(layout: Layout, cmap: ClusterMap, deadline_s: float = 20.0) -> MetaClient:
    secret = _secret(layout)
    return MetaClient({NodeId(int(k)): v for k, v in cmap.meta_admin.items()}, secret, deadline_s=deadline_s)


def _meta(layout: Layout, cmap: ClusterMap, call: Callable[[MetaClient], Awaitable[T]],
          deadline_s: float = 20.0) -> T:
    """One call to the metadata group; unreachable is a ClusterError (one line), never a traceback."""
    async def go() -> T:
        return await call(meta_client(layout, cmap, deadline_s))

    try:
        return asyncio.run(go())
    except MetaClientError as e:
        raise ClusterError(f"metadata group unreachable: {e}") from e


def _done(res: Any) -> dict[str, Any]:
    """A proposal's result: its value, or its refusal as a ClusterError."""
    if not res.ok:
        raise ClusterError(res.message or res.error)
    return dict(res.value or {})


def read_map(layout: Layout, cmap: ClusterMap) -> MetaState:
    return _meta(layout, cmap, lambda c: c.state(barrier=True))


# --- commands ------------------------------------------------------------------------------------
def cluster_up(root: Path, nodes: int | None = None, racks: int | None = None, nbd_port: int | None = None,
               port_base: int | None = None, disk: str | None = None, bind: str = "127.0.0.1",
               replication: str | None = None, notes: list[str] | None = None, gateway: str | None = None,
               iscsi_port: int | None = None, tls: bool = False) -> str:
    """`replication`: the default mode of `volume create` ("raft" | "chain"), fixed when the cluster is
    first made (the layout file is written once); asking for another one later is an error.
    `nbd_port`: the gateway's NBD port (0: a free one); None keeps the configured one (10809 for a new
    cluster), and so does 0 on an existing cluster while the configured port is free. A new port for an existing cluster is written to the gateway's config when the gateway is
    not running (said in `notes`), refused while it runs. Nothing is started when the NBD port is taken;
    when a process fails to start, what this call started is stopped again.
    `iscsi_port`: the gateway's iSCSI port: None = 3260, or a free one when 3260 is taken (said in `notes`);
    0 = a free one; N = that one or an error. A cluster made before iSCSI gets one at its next `cluster up`."""
    layout = local_layout(root, "cluster up")
    if replication is not None and replication not in ("raft", "chain"):
        raise ClusterError(f"--replication must be raft or chain, not {replication!r}")
    if gateway is not None and gateway not in ("embedded", "separate"):
        raise ClusterError(f"--gateway must be embedded or separate, not {gateway!r}")
    notes = notes if notes is not None else []
    if layout.map_path.exists():
        cmap = ClusterMap.load(layout.map_path)
        if not (root / "cluster.toml").exists():  # a cluster made before the file existed
            write_cluster_file(layout, cmap)
        if replication is not None and replication != cmap.replication:
            raise ClusterError(f"the cluster in {root} was made with --replication {cmap.replication}; "
                               f"it is kept (create volumes with --replication {replication} instead)")
        # The layout is written once: say what an option for a new cluster does not change here.
        if nodes is not None and nodes != len(cmap.nodes):
            notes.append(f"--nodes {nodes} ignored: the cluster in {root} has {len(cmap.nodes)} storage nodes "
                         f"(raftblock node add adds one)")
        racks_now = len({n.rack for n in cmap.nodes})
        if racks is not None and racks != racks_now:
            notes.append(f"--racks {racks} ignored: the cluster in {root} has {racks_now} racks")
        if port_base is not None:
            notes.append(f"--port-base {port_base} ignored: the cluster in {root} keeps its ports")
        if disk is not None:
            notes.append(f"--disk {disk} ignored: the disk mode is in the node configs of {root}")
        if gateway is not None and gateway != cmap.gateway:
            notes.append(f"--gateway {gateway} ignored: the cluster in {root} was made with --gateway {cmap.gateway}")
        if not _gateway_running(layout, cmap):
            have = _nbd_port(layout, cmap)
            new = have
            if nbd_port in (None, 0, have):
                try:
                    _check_nbd_port(bind, have, root)
                except ClusterError:
                    if nbd_port != 0:
                        raise
                    new = free_port(bind)  # 0: any free port; the configured one is taken now
            else:
                new = _check_nbd_port(bind, nbd_port, root)
            if new != have:
                where = _set_nbd_port(layout, cmap, new)
                notes.append(f"gateway NBD port changed from {have} to {new} (in {where})")
        elif nbd_port not in (None, 0, _nbd_port(layout, cmap)):
            raise ClusterError(f"the gateway of {root} runs on port {_nbd_port(layout, cmap)}; stop the cluster "
                               f"(raftblock cluster down --dir {root}) to move it to {nbd_port}")
        have_iscsi = _iscsi_port(cmap)
        if iscsi_port not in (None, 0, have_iscsi) or not have_iscsi:
            if _gateway_running(layout, cmap):
                if have_iscsi:
                    raise ClusterError(f"the gateway of {root} serves iSCSI on port {have_iscsi}; stop the cluster "
                                       f"(raftblock cluster down --dir {root}) to move it to {iscsi_port}")
            else:
                new_iscsi = _pick_iscsi_port(bind, iscsi_port, root, notes)
                where = _set_iscsi_port(layout, cmap, new_iscsi, bind)
                notes.append(f"gateway iSCSI port {'changed from ' + str(have_iscsi) + ' ' if have_iscsi else ''}"
                             f"set to {new_iscsi} (in {where})")
    else:
        nbd_port = _check_nbd_port(bind, 10809 if nbd_port is None else nbd_port, root)
        iscsi_port = _pick_iscsi_port(bind, iscsi_port, root, notes)
        root.mkdir(parents=True, exist_ok=True)
        cmap = create_layout(layout, 3 if nodes is None else nodes, 3 if racks is None else racks, port_base, bind,
                             gateway=gateway or "embedded", nbd_port=nbd_port, iscsi_port=iscsi_port)
        cmap.replication = replication or "raft"
        if tls:
            cmap.tls = True
            make_lab_certs(layout, cmap)
        write_configs(layout, cmap, disk or "os", bind, nbd_port)
        set_cli_identity(layout)  # the cluster file just written: this command's own links are TLS too
        cmap.save(layout.map_path)
    started: list[str] = []
    try:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for mid in sorted(int(k) for k in cmap.meta_admin):
            cfg = layout.meta_config(mid)
            if running_pid(layout, f"m{mid}", cfg) is None:
                procs[f"m{mid}"] = spawn(layout, f"m{mid}", [sys.executable, "-m", "raftblock.cli", "meta",
                                                              "--config", str(cfg), "--log-format", "json"])
        for n in cmap.nodes:
            cfg = layout.node_config(n.node_id)
            name = f"n{n.node_id}"
            if running_pid(layout, name, cfg) is None:
                procs[name] = spawn(layout, name, [sys.executable, "-m", "raftblock.cli", "node", "--config",
                                                    str(cfg), "--log-format", "json"])
        started += procs
        for name, proc in procs.items():
            wait_ready(layout, name, proc)
        if cmap.gateway == "embedded":
            first = f"n{cmap.nodes[0].node_id}"
            uri = _ready_uri(layout, first, 2) or f"nbd{'s' if cmap.tls else ''}://{bind}:{_nbd_port(layout, cmap)}"
        elif running_pid(layout, "gateway", layout.gateway_config) is None:
            gw = spawn(layout, "gateway", [sys.executable, "-m", "raftblock.cli", "gateway", "--config",
                                            str(layout.gateway_config), "--log-format", "json"])
            started.append("gateway")
            uri = wait_ready(layout, "gateway", gw)
        else:
            uri = _ready_uri(layout, "gateway") or f"nbd{'s' if cmap.tls else ''}://{bind}:{_gateway_port(layout)}"
    except (ClusterError, OSError) as e:
        for name in reversed(started):
            stop_process(layout, name, _config_of(layout, name))
        what = f"; stopped what it had started ({', '.join(started)})" if started else ""
        raise ClusterError(f"{e}{what}") from e
    separate = 1 if cmap.gateway == "separate" else 0
    if started and len(started) < len(cmap.meta_admin) + len(cmap.nodes) + separate:  # not every process
        notes.append(f"started {', '.join(started)} (the others were running)")
    # Every process runs: a cluster that is slow to become healthy is left running (it may yet).
    wait_healthy(layout, cmap)
    return uri


def _config_of(layout: Layout, name: str) -> Path:
    if name == "gateway":
        return layout.gateway_config
    if name.startswith("m"):
        return layout.meta_config(int(name[1:]))
    return layout.node_config(int(name[1:]))


def _gateway_port(layout: Layout) -> int:
    import tomllib

    with open(layout.gateway_config, "rb") as f:
        return int(tomllib.load(f).get("port", 10809))


def _nbd_port(layout: Layout, cmap: ClusterMap) -> int:
    """The cluster's NBD port: node 1's gateway (embedded), or the separate gateway's."""
    return cmap.nodes[0].nbd_port if cmap.gateway == "embedded" else _gateway_port(layout)


def _iscsi_port(cmap: ClusterMap) -> int:
    """The cluster's iSCSI port: node 1's gateway (embedded), or the separate gateway's; 0 = none."""
    return cmap.nodes[0].iscsi_port if cmap.gateway == "embedded" else cmap.gateway_iscsi


def _pick_iscsi_port(bind: str, port: int | None, root: Path, notes: list[str]) -> int:
    if port is None:
        try:
            return _check_nbd_port(bind, ISCSI_PORT_DEFAULT, root, "iSCSI")
        except ClusterError:
            free = free_port(bind)
            notes.append(f"iSCSI port {ISCSI_PORT_DEFAULT} is taken; the gateway serves iSCSI on {free}")
            return free
    return _check_nbd_port(bind, port, root, "iSCSI")


def _set_iscsi_port(layout: Layout, cmap: ClusterMap, port: int, bind: str) -> Path:
    """Give the cluster's gateway(s) an iSCSI port (their processes stopped); returns the config that has it."""
    if cmap.gateway == "embedded":
        cmap.nodes[0].iscsi_port = port
        for n in cmap.nodes[1:]:
            if n.nbd_port and not n.iscsi_port:
                n.iscsi_port = free_port(n.host)
        write_node_configs(layout, cmap, _disk_of(layout, cmap))
        cmap.save(layout.map_path)
        return layout.node_config(cmap.nodes[0].node_id)
    cmap.gateway_iscsi = port
    cmap.save(layout.map_path)
    lines = [line for line in layout.gateway_config.read_text().splitlines() if not line.startswith("iscsi =")]
    at = next((i for i, line in enumerate(lines) if line.startswith("port =")), 0) + 1
    lines.insert(at, f'iscsi = "{bind}:{port}"')
    layout.gateway_config.write_text("\n".join(lines) + "\n")
    return layout.gateway_config


def _gateway_running(layout: Layout, cmap: ClusterMap) -> bool:
    if cmap.gateway == "embedded":
        n = cmap.nodes[0].node_id
        return running_pid(layout, f"n{n}", layout.node_config(n)) is not None
    return running_pid(layout, "gateway", layout.gateway_config) is not None


def _set_nbd_port(layout: Layout, cmap: ClusterMap, port: int) -> Path:
    """Move the cluster's NBD port (its gateway stopped); returns the config that has it now."""
    if cmap.gateway == "embedded":
        cmap.nodes[0].nbd_port = port
        write_node_configs(layout, cmap, _disk_of(layout, cmap))
        cmap.save(layout.map_path)
        return layout.node_config(cmap.nodes[0].node_id)
    _set_gateway_port(layout, port)
    return layout.gateway_config


def _disk_of(layout: Layout, cmap: ClusterMap) -> str:
    first = layout.node_config(cmap.nodes[0].node_id).read_text()
    return next((line.split("=", 1)[1].strip().strip('"') for line in first.splitlines()
                 if line.startswith("disk =")), "os")


def _set_gateway_port(layout: Layout, port: int) -> None:
    lines = layout.gateway_config.read_text().splitlines()
    lines = [f"port = {port}" if line.startswith("port =") else line for line in lines]
    layout.gateway_config.write_text("\n".join(lines) + "\n")


def _check_nbd_port(bind: str, port: int, root: Path, what: str = "NBD") -> int:
    """The NBD (or iSCSI) port if it can be bound (0: a free one, chosen now), else a ClusterError saying what
    to do, before anything is started."""
    if port == 0:
        return free_port(bind)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as e:
            if what != "NBD":
                raise ClusterError(
                    f"{what} port {bind}:{port} is not free ({e.strerror}): pick another one (--iscsi-port "
                    f"{port + 1}; --iscsi-port 0 picks a free one). Nothing was started.") from None
            raise ClusterError(
                f"NBD port {bind}:{port} is not free ({e.strerror}): another cluster or NBD server uses it; "
                f"pick another one (make demo NBD_PORT={port + 1}, or cluster up --dir {root} --nbd-port "
                f"{port + 1}; --nbd-port 0 picks a free one). Nothing was started.") from None
    return port


def _ready_iscsi(layout: Layout, name: str, word: int) -> str | None:
    """The iSCSI portal a gateway announced after its NBD URI (READY ... nbd://H:P iscsi://H:P)."""
    uri = _ready_uri(layout, name, word)
    return uri if uri is not None and uri.startswith("iscsi://") else None


def _ready_uri(layout: Layout, name: str, word: int = 1) -> str | None:
    """The address process `name` announced (READY URI...): word 1, or 2 for a node's gateway."""
    try:
        words = layout.readyfile(name).read_text().split()
    except OSError:
        return None
    return words[word] if len(words) > word and words[0] == "READY" else None


def wait_healthy(layout: Layout, cmap: ClusterMap, groups: set[int] | None = None,
                 timeout_s: float = HEALTHY_TIMEOUT_S) -> None:
    """Every storage node registered and up in the map and answering on its data port, every group (or those
    given) with a leader."""
    deadline = time.monotonic() + timeout_s
    problem = ""
    while time.monotonic() < deadline:
        try:
            st = read_map(layout, cmap)
        except ClusterError as e:
            problem = str(e)
            time.sleep(0.2)
            continue
        missing = [n.node_id for n in cmap.nodes
                   if NodeId(n.node_id) not in st.nodes or st.nodes[NodeId(n.node_id)].state != "up"] \
            if groups is None else []  # a volume's groups need their own majority, not every node
        if not st.cluster_id:  # the metadata leader names the cluster on its first tick: volumes need it
            problem = "the metadata group has not recorded the cluster's id yet"
        elif missing:
            problem = f"storage nodes not up in the map: {missing}"
        else:
            status = asyncio.run(collect_status(cmap, st, secret=_secret(layout)))
            leaderless = [g["group"] for g in status["groups"] if not g["leader"]
                          and (groups is None or g["group"] in groups)]
            # up in the map is the node's own word; its data port answering (keys read, TLS served) is ours
            silent = [n["id"] for n in status["nodes"] if n["state"] != "up"] if groups is None else []
            if not leaderless and not silent:
                return
            problem = (f"groups without a leader: {leaderless[:10]}" if leaderless
                       else f"storage nodes not answering on their data port: {silent}")
        time.sleep(0.2)
    raise ClusterError(f"not healthy after {timeout_s:.0f} s: {problem}")


def _gateway_call(layout: Layout, op: str) -> dict[str, Any] | None:
    """`op` (reload | status) to every running gateway of the cluster: the separate one and those inside the
    nodes (a deployed cluster: every gateway of the map with a TCP admin port). Their status replies merged:
    connections per volume summed, retries summed."""
    from raftblock.gateway.admin import AdminAuthError, connect

    secret = None

    async def call(sock: Path | str) -> dict[str, Any]:
        r, w = await connect(sock, secret)
        w.write(json.dumps({"op": op}).encode() + b"\n")
        await w.drain()
        line = await r.readline()
        w.close()
        return dict(json.loads(line))

    socks: list[Path | str] = []
    if layout.remote:
        cmap = _load(layout)
        secret = layout.secret_file.read_bytes().strip()
        socks += [g.admin for g in read_map(layout, cmap).gateways.values() if g.admin]
    elif running_pid(layout, "gateway", layout.gateway_config) is not None:
        socks.append(layout.admin_socket)
    if layout.map_path.exists() and not layout.remote:
        for n in ClusterMap.load(layout.map_path).nodes:
            if n.nbd_port and running_pid(layout, f"n{n.node_id}", layout.node_config(n.node_id)) is not None:
                socks.append(layout.node_admin_socket(n.node_id))
    merged: dict[str, Any] | None = None
    for sock in socks:
        try:
            res = asyncio.run(asyncio.wait_for(call(sock), 10))
        except (OSError, TimeoutError, ValueError, AdminAuthError):
            continue
        if merged is None:
            merged = {"ok": True, "volumes": {}, "retries": 0}
        merged["ok"] = merged["ok"] and bool(res.get("ok"))
        merged["retries"] += int(res.get("retries", 0))
        for name, v in res.get("volumes", {}).items():
            cur = merged["volumes"].setdefault(name, {"size_bytes": v.get("size_bytes", 0), "attached": 0})
            cur["attached"] += int(v.get("attached", 0))
    return merged


def cluster_status(root: Path) -> dict[str, Any]:
    layout = open_layout(root)
    cmap = _load(layout)
    mst = read_map(layout, cmap)
    st = asyncio.run(collect_status(cmap, mst, secret=_secret(layout)))
    for n in st["nodes"]:
        n["pid"] = running_pid(layout, f"n{n['id']}", layout.node_config(n["id"]))
        if n["pid"] is None and not layout.remote:
            n["state"] = "stopped"
    gw = _gateway_call(layout, "status")
    connections = {k: v["attached"] for k, v in (gw or {}).get("volumes", {}).items()}
    gateways = []
    gw_pid = running_pid(layout, "gateway", layout.gateway_config)
    if cmap.gateway == "separate" or gw_pid is not None:
        gateways.append({"id": "gw1", "node": None, "pid": gw_pid,
                         "uri": _ready_uri(layout, "gateway") if gw_pid is not None else None,
                         "iscsi": _ready_iscsi(layout, "gateway", 2) if gw_pid is not None else None})
    for n in cmap.nodes if cmap.gateway == "embedded" else []:
        pid = next((x["pid"] for x in st["nodes"] if x["id"] == n.node_id), None)
        gateways.append({"id": f"n{n.node_id}", "node": n.node_id, "pid": pid,
                         "uri": _ready_uri(layout, f"n{n.node_id}", 2) if pid is not None else None,
                         "iscsi": _ready_iscsi(layout, f"n{n.node_id}", 3) if pid is not None else None})
    st["gateways"] = gateways
    # The cluster's NBD address (and iSCSI portal): node 1's gateway (embedded) or the separate one.
    none = {"pid": None, "uri": None, "iscsi": None}
    st["gateway"] = {k: gateways[0][k] for k in ("pid", "uri", "iscsi")} if gateways else none
    if layout.remote:  # the gateways as they registered (a gateway machine, or inside a node)
        gateways = [{"id": gid, "node": g.node_id or None, "pid": None, "uri": f"nbd://{g.address}", "iscsi": None}
                    for gid, g in sorted(mst.gateways.items())]
        st["gateways"] = gateways
        st["gateway"] = {k: gateways[0][k] for k in ("pid", "uri", "iscsi")} if gateways else none
    # Where Prometheus scrapes each process (obs/metrics.py), and the status page (control/statuspage.py:
    # any metadata member's address; a follower redirects to the leader's)
    node_http = {int(n.node_id): n.http for n in mst.nodes.values() if n.http}
    node_http.update({n.node_id: f"{n.host}:{n.http_port}" for n in cmap.nodes if n.http_port})
    for n in st["nodes"]:
        n["metrics_url"] = f"http://{node_http[n['id']]}/metrics" if n["id"] in node_http else None
    for g in st["gateways"]:
        rec = mst.gateways.get(g["id"])
        http = rec.http if rec is not None and rec.http else (
            f"{cmap.nodes[0].host}:{cmap.gateway_http}" if g["id"] == "gw1" and cmap.gateway_http and not layout.remote
            else None)
        g["metrics_url"] = f"http://{http}/metrics" if http else None
    st["metadata"] = [{"id": int(k), "admin": v, "pid": running_pid(layout, f"m{k}", layout.meta_config(int(k))),
                       "metrics_url": f"http://{cmap.meta_http[k]}/metrics" if k in cmap.meta_http else None}
                      for k, v in sorted(cmap.meta_admin.items())]
    st["status_url"] = f"http://{cmap.meta_http[min(cmap.meta_http, key=int)]}/" if cmap.meta_http else None
    st["volumes"] = [{"name": v.name, "size_bytes": v.size_bytes, "replication": v.mode,
                      "extents": len(v.extent_groups), "groups": sorted({int(g) for g in v.extent_groups}),
                      "extent_groups": [int(g) for g in v.extent_groups],
                      "allocated_bytes": sum(g["allocated_bytes"] or 0 for g in st["groups"]
                                             if g["group"] in {int(x) for x in v.extent_groups}), "attached": connections.get(v.name, 0),
                      "attached_by": mst.attachments[v.name].gateway_id if v.name in mst.attachments else None}
                     for v in sorted(mst.volumes.values(), key=lambda v: v.name)]
    st["cluster_id"] = cmap.cluster_id
    st["problems"] = health_problems(st, mst)
    st["healthy"] = not st["problems"]
    return st


def health_problems(st: dict[str, Any], mst: MetaState) -> list[str]:
    """What keeps a cluster from being healthy, for `cluster status` and `cluster wait-healthy` (a rolling
    upgrade goes on to the next node only when this is empty): every registered node up in the map and
    answering, every group with one leader and every member up, nothing being rebuilt."""
    out = []
    for n in st["nodes"]:
        if n["map_state"] != "up" or n["state"] != "up":
            out.append(f"node {n['id']} (rack {n['rack']}) is {n['state'] if n['state'] != 'up' else n['map_state']}")
    for g in st["groups"]:
        if g["leader"] is None:
            out.append(f"group {g['group']} has no leader")
    for r in st["repairs"]:
        out.append(f"group {r['group']}: {r['state']}" + (f" ({r['why']})" if r.get("why") else ""))
    if not mst.cluster_id:
        out.append("the metadata group has not recorded the cluster's id yet")
    return out


def cluster_wait_healthy(root: Path, timeout_s: float) -> dict[str, Any]:
    """`cluster wait-healthy`: poll `cluster status` until it has no problem; ClusterError with what is left."""
    deadline = time.monotonic() + timeout_s
    last: list[str] = []
    while True:
        try:
            st = cluster_status(root)
            if st["healthy"]:
                return st
            last = st["problems"]
        except ClusterError as e:
            last = [str(e)]
        if time.monotonic() > deadline:
            raise ClusterError(f"not healthy after {timeout_s:.0f} s: {'; '.join(last[:5])}"
                               + (f" (and {len(last) - 5} more)" if len(last) > 5 else ""))
        time.sleep(1.0)


def node_remove(root: Path, node_id: int) -> dict[str, Any]:
    """`node remove ID`: a drained node that holds no replica leaves the map (decommission)."""
    layout = open_layout(root)
    cmap = _load(layout)
    return _done(_meta(layout, cmap, lambda c: c.remove_node(node_id)))


def node_add(root: Path, rack: str | None = None) -> dict[str, Any]:
    """`raftblock node add [--rack R]`: one more storage node in a running local cluster (unless named: in
    the rack of a draining node, else in the rack with the fewest nodes). Every node's config gets the new peer (for restarts); running nodes
    and the gateway learn its address from the map when it registers, and the metadata leader's
    rebalancing moves replicas to it, one group at a time (control/raftrepair.py)."""
    layout = local_layout(root, "node add")
    cmap = _load(layout)
    disk = _disk_of(layout, cmap)
    if rack is None:
        # Where it can help: the rack of a draining node first (its replicas can only move to a node of a
        # rack their group does not use: usually the draining node's own), else the rack with fewest nodes.
        per: dict[str, int] = {}
        for n in cmap.nodes:
            per[n.rack] = per.get(n.rack, 0) + 1
        st = read_map(layout, cmap)
        draining = {n.rack for n in st.nodes.values() if n.draining}
        rack = min(per, key=lambda r: (r not in draining, per[r], r))
    if rack not in {n.rack for n in cmap.nodes}:
        notes = f"rack {rack} is new (the racks so far: {', '.join(sorted({n.rack for n in cmap.nodes}))})"
    else:
        notes = ""
    host = cmap.nodes[0].host
    nid = max(n.node_id for n in cmap.nodes) + 1
    entry = NodeEntry(nid, rack, host, free_port(host), free_port(host) if cmap.gateway == "embedded" else 0)
    cmap.nodes.append(entry)
    write_node_configs(layout, cmap, disk)
    cmap.save(layout.map_path)
    name = f"n{nid}"
    proc = spawn(layout, name, [sys.executable, "-m", "raftblock.cli", "node", "--config",
                                 str(layout.node_config(nid)), "--log-format", "json"])
    wait_ready(layout, name, proc)
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while True:
        st = read_map(layout, cmap)
        rec = st.nodes.get(NodeId(nid))
        if rec is not None and rec.state == "up":
            break
        if time.monotonic() > deadline:
            raise ClusterError(f"node {nid} did not register within {HEALTHY_TIMEOUT_S:.0f}s")
        time.sleep(POLL_S)
    return {"node_id": nid, "rack": rack, "address": f"{host}:{entry.port}", "note": notes}


def node_stop_check(root: Path, node_id: int) -> list[tuple[int, str]]:
    """The groups that stopping node `node_id` now would leave without a majority (or a chain stalled)."""
    from raftblock.control.raftrepair import stop_check

    layout = open_layout(root)
    cmap = _load(layout)
    if node_id not in {n.node_id for n in cmap.nodes}:
        raise ClusterError(f"no node {node_id} in {root}")
    return stop_check(read_map(layout, cmap), node_id)


def _unsafe(node_id: int, risks: list[tuple[int, str]]) -> str:
    return (f"stopping node {node_id} now would leave {len(risks)} group(s) short of live copies: "
            + "; ".join(f"group {g}: {why}" for g, why in risks[:5]) + " (--force to do it anyway)")


def node_drain(root: Path, node_id: int, draining: bool = True, force: bool = False) -> dict[str, Any]:
    """`node drain ID`: the metadata leader moves every replica of the node elsewhere (new member added and
    caught up before the old one leaves, one group at a time) and places nothing new on it; refused while
    the node is needed for a majority somewhere (a move needs the others whole), or while some replica
    has nowhere to go (a drain that would never end). `undrain` ends it."""
    from raftblock.control.raftrepair import drain_blockers
    from raftblock.meta.state import SetNodeDrain

    layout = open_layout(root)
    cmap = _load(layout)
    if node_id not in {n.node_id for n in cmap.nodes}:
        raise ClusterError(f"no node {node_id} in {root}")
    if draining and not force:
        risks = node_stop_check(root, node_id)
        if risks:
            raise ClusterError(_unsafe(node_id, risks))
        blocked = drain_blockers(read_map(layout, cmap), node_id)
        if blocked:
            raise ClusterError(f"node {node_id} cannot be drained now: {len(blocked)} group(s) have no node to move "
                               f"to: " + "; ".join(f"group {g}: {why}" for g, why in blocked[:3])
                               + " (--force to mark it draining anyway)")
    return _done(_meta(layout, cmap, lambda c: c.propose(SetNodeDrain(node_id, draining))))


def cluster_down(root: Path, node: int | None = None, force: bool = False) -> list[str]:
    """Stop every process; with `node`, only that storage node, refused (unless `force`) when stopping it
    would leave a group without a majority (node_stop_check)."""
    layout = local_layout(root, "cluster down")
    cmap = _load(layout, running=False)
    if node is not None:
        if node not in {n.node_id for n in cmap.nodes}:
            raise ClusterError(f"no node {node} in {root}")
        if not force:
            risks = node_stop_check(root, node)
            if risks:
                raise ClusterError(_unsafe(node, risks))
        return [f"n{node}"] if stop_process(layout, f"n{node}", layout.node_config(node)) else []
    stopped = []
    if stop_process(layout, "gateway", layout.gateway_config):
        stopped.append("gateway")
    for n in cmap.nodes:
        if stop_process(layout, f"n{n.node_id}", layout.node_config(n.node_id)):
            stopped.append(f"n{n.node_id}")
    for k in sorted(cmap.meta_admin):
        if stop_process(layout, f"m{k}", layout.meta_config(int(k))):
            stopped.append(f"m{k}")
    return stopped


def volume_create(root: Path, name: str, size_bytes: int, replication: str | None = None,
                  timeout_s: float = 30.0, state: str = "ready", parent: str = "", origin: str = "",
                  lazy_source: str = "", qos: QosSpec = UNSET, encrypt: bool = False,
                  seal_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """`replication`: "raft" | "chain"; None: the cluster's default (`cluster up --replication`). `encrypt`:
    AES-256-GCM at rest under a new data key (raftblock/sealing.py; a clone gets its parent's). Returns
    once every group of the volume has a leader (a stopped node does not matter while each group keeps a
    majority); if they do not within `timeout_s`, the error says that the volume exists."""
    from raftblock.meta.state import VOLUME_SIZE_BYTES_MAX

    layout = open_layout(root)
    if size_bytes <= 0 or size_bytes % 4096 or size_bytes > VOLUME_SIZE_BYTES_MAX:
        raise ClusterError(f"size {format_size(size_bytes)} ({size_bytes} bytes): a volume is a positive multiple of 4KiB, "
                           f"at most {format_size(VOLUME_SIZE_BYTES_MAX)}")
    cmap = _load(layout)
    mode = replication or cmap.replication
    problem = qos.problem()
    if problem:
        raise ClusterError(f"QoS: {problem}")
    if encrypt and parent:
        raise ClusterError("a clone is encrypted with its parent's key when the parent is: --encrypt is not for clones")
    _done(_meta(layout, cmap, lambda c: c.create_volume(name, size_bytes, mode, state, parent, origin, lazy_source,
                                                        qos, encrypt=encrypt, seal_from=seal_from)))
    _gateway_call(layout, "reload")
    vol = read_map(layout, cmap).volumes[name]
    groups = {int(g) for g in vol.extent_groups}
    try:
        wait_healthy(layout, cmap, groups, timeout_s)
    except ClusterError as e:
        raise ClusterError(f"volume {name} was created, but is not serving yet: {e} "
                           f"(it serves once they have; raftblock cluster status --dir {root})") from e
    return {"name": vol.name, "size_bytes": vol.size_bytes, "extents": len(vol.extent_groups),
            "groups": sorted(groups), "replication": vol.mode, "parent": parent or None,
            "qos": vol.qos().describe(), "encrypted": bool(vol.enc_key_id)}


def volume_set_qos(root: Path, name: str, changes: dict[str, int], clear: bool = False) -> dict[str, Any]:
    """`volume set-qos NAME`: the fields of `changes` replace the volume's (QosSpec names; 0 = none), the rest
    stay (`clear`: start from none). Takes effect while attached: the gateways at their next map refresh
    (the `reload` makes that now for a local cluster's), the nodes at their next map poll (0.5 s)."""
    layout, cmap, _st, v = _volume_of(root, name)
    spec = dataclasses.replace(UNSET if clear else v.qos(), **changes)
    problem = spec.problem()
    if problem:
        raise ClusterError(f"QoS: {problem}")
    _done(_meta(layout, cmap, lambda c: c.set_qos(name, spec)))
    _gateway_call(layout, "reload")
    return {"name": name, "qos": spec.describe()}


def _volume_of(root: Path, name: str) -> tuple[Layout, ClusterMap, MetaState, Any]:
    """The cluster of `root`, its map, and volume `name` in it (ClusterError: no such volume)."""
    layout = open_layout(root)
    cmap = _load(layout)
    st = read_map(layout, cmap)
    v = st.volumes.get(name)
    if v is None:
        raise ClusterError(f"no volume {name}")
    return layout, cmap, st, v


def volume_clone(root: Path, source: str, name: str, replication: str | None = None) -> dict[str, Any]:
    """`volume clone VOL@SNAP NEW`: a writable volume at once, reading what it never wrote from the snapshot
    (client/volume.py rule 5); its size is the snapshot's."""
    layout = open_layout(root)
    cmap = _load(layout)
    st = read_map(layout, cmap)
    vol, _, snap = source.partition("@")
    if vol not in st.volumes:
        raise ClusterError(f"no volume {vol}")
    rec = st.snapshot_of(vol, snap)
    if rec is None or rec.state != "ready":
        raise ClusterError(f"volume {vol} has no snapshot {snap}" if rec is None
                           else f"snapshot {source} is {rec.state}, not ready")
    return volume_create(root, name, rec.size_bytes or st.volumes[vol].size_bytes,
                         replication or st.volumes[vol].mode, parent=source)


def volume_flatten(root: Path, name: str, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`volume flatten CLONE`: copy the parent snapshot's blocks the clone lacks (FILL writes, safe next to a
    host writing the clone), then cut the link. Re-runnable: what is already there is not copied again."""
    from raftblock.control.snapshots import ClusterIO

    layout, cmap, st, v = _volume_of(root, name)
    if not v.parent_volume_id:
        return {"name": name, "copied_bytes": 0, "parent": None}
    parent = st.volume_by_id(v.parent_volume_id)
    snap = st.snapshots.get(v.parent_snap_id)
    source = f"{parent.name if parent else '?'}@{snap.name if snap else '?'}"

    async def go() -> int:
        meta = meta_client(layout, cmap)  # an encrypted clone's blocks are sealed here: nonce epochs from it
        io = ClusterIO(st, cmap.peers(), secret=_secret(layout), new_epoch=meta.next_seal_epoch)
        try:
            return await io.volume(name).flatten(progress)
        finally:
            await io.close()

    from raftblock.replication.group import GroupError

    try:
        copied = asyncio.run(go())
    except GroupError as e:
        raise ClusterError(f"flatten of {name} stopped: {e} (run it again: what is copied stays)") from e
    _done(_meta(layout, cmap, lambda c: c.set_volume_state(name, detach_parent=True)))
    _gateway_call(layout, "reload")
    return {"name": name, "copied_bytes": copied, "parent": source}


def _connections(layout: Layout, name: str) -> int:
    gw = _gateway_call(layout, "status")
    return int((gw or {}).get("volumes", {}).get(name, {}).get("attached", 0))


def volume_delete(root: Path, name: str) -> None:
    layout = open_layout(root)
    cmap = _load(layout)
    if _connections(layout, name):
        raise ClusterError(f"volume {name} is in use: a host is connected to it through the gateway; "
                           f"disconnect it first")
    st = read_map(layout, cmap)
    vol = st.volumes.get(name)
    if vol is None:
        raise ClusterError(f"no volume {name}")
    if name in st.attachments:
        raise ClusterError(f"volume {name} is attached by gateway {st.attachments[name].gateway_id} "
                           f"(raftblock volume detach {name})")
    ids = [extent_id(int(g), i) for i, g in enumerate(vol.extent_groups)]
    asyncio.run(_drop_extents(cmap, ids, vol.extent_size_bytes, st.attach_epochs.get(name, 0),
                              KeyRing.from_map(_secret(layout), st.data_key_set())))
    _done(_meta(layout, cmap, lambda c: c.delete_volume(name)))
    _gateway_call(layout, "reload")


def volume_info(root: Path, name: str) -> dict[str, Any]:
    """`volume info NAME`: size, replication, its extent groups (members, leader, term, epoch), allocated
    bytes, attachment and connections."""
    layout = open_layout(root)
    cmap = _load(layout)
    st = read_map(layout, cmap)
    vol = st.volumes.get(name)
    if vol is None:
        raise ClusterError(f"no volume {name}")
    gids = sorted({int(g) for g in vol.extent_groups})
    status = asyncio.run(collect_status(cmap, st, secret=_secret(layout)))
    groups = [g for g in status["groups"] if g["group"] in gids]
    att = st.attachments.get(name)
    return {"name": vol.name, "id": vol.volume_id, "size_bytes": vol.size_bytes, "replication": vol.mode,
            "created_ms": vol.created_ms, "extent_size_bytes": vol.extent_size_bytes,
            "extents": len(vol.extent_groups), "extent_groups": [int(g) for g in vol.extent_groups],
            "groups": [{k: g[k] for k in ("group", "members", "leader", "term", "epoch")} for g in groups],
            "allocated_bytes": sum(g["allocated_bytes"] or 0 for g in groups),
            "attached_by": att.gateway_id if att is not None else None,
            "attach_epoch": st.attach_epochs.get(name, 0), "connections": _connections(layout, name),
            "state": vol.state, "parent": _parent_of(st, vol), "origin": vol.origin or None,
            "qos": vol.qos().describe(), "encryption": _encryption_of(vol),
            "repairs": [r for r in status["repairs"] if r["group"] in gids]}


def _encryption_of(vol: VolumeRecord) -> dict[str, Any] | None:
    if not vol.enc_key_id:
        return None
    return {"cipher": "AES-256-GCM", "key_id": f"{vol.enc_key_id:016x}", "master_key": vol.enc_master}


def rotate_master_key(root: Path) -> dict[str, Any]:
    """`cluster rotate-master-key` (raftblock/sealing.py rule 5): a new master key; every encrypted volume's data
    key is rewrapped by it in the same map change. No data is rewritten; gateways follow at their next map read."""
    layout = open_layout(root)
    cmap = _load(layout)
    res = _done(_meta(layout, cmap, lambda c: c.rotate_master_key()))
    _gateway_call(layout, "reload")
    return {"master_key": res["version"], "volumes_rewrapped": res["volumes"]}


def volume_detach(root: Path, name: str, force: bool = False) -> dict[str, Any]:
    """`volume detach NAME`: end the volume's attachment in the map (so another gateway may attach it
    without --force); refused while a host is connected through the gateway, unless forced."""
    layout = open_layout(root)
    cmap = _load(layout)
    st = read_map(layout, cmap)
    if name not in st.volumes:
        raise ClusterError(f"no volume {name}")
    att = st.attachments.get(name)
    if att is None:
        return {"name": name, "detached": False, "attached_by": None}
    if _connections(layout, name) and not force:
        raise ClusterError(f"volume {name} is in use: a host is connected to it through gateway {att.gateway_id} "
                           f"(disconnect it, or --force)")
    _done(_meta(layout, cmap, lambda c: c.detach(name, att.gateway_id, att.attach_epoch)))
    return {"name": name, "detached": True, "attached_by": att.gateway_id}


def volume_rename(root: Path, name: str, new_name: str) -> dict[str, Any]:
    layout = open_layout(root)
    cmap = _load(layout)
    if _connections(layout, name):
        raise ClusterError(f"volume {name} is in use: a host is connected to it; disconnect it first")
    res = _done(_meta(layout, cmap, lambda c: c.rename_volume(name, new_name)))
    _gateway_call(layout, "reload")
    return {"name": new_name, "old_name": name, "id": res.get("volume_id")}


def volume_set_chap(root: Path, name: str, user: str, secret: str, target_user: str = "",
                    target_secret: str = "") -> dict[str, Any]:
    """CHAP for the iSCSI target of volume `name` ("" = discovery sessions); an empty `user` removes it.
    Gateways read it from the map at their next refresh; the `reload` makes that now."""
    layout = open_layout(root)
    cmap = _load(layout)
    _done(_meta(layout, cmap, lambda c: c.set_iscsi_auth(name, user, secret, target_user, target_secret)))
    _gateway_call(layout, "reload")
    return {"volume": name, "chap": bool(user), "mutual": bool(target_user)}


ROTATE_GATEWAY_GRACE_S = 3.0  # gateways follow the map every second (refresh_s): they sign with a new key by then


def rotate_key(root: Path, timeout_s: float = 60.0, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """`cluster rotate-key` (raftblock/wire/auth.py rule 3), without downtime: add a new data key (every node
    accepts it once it has read the map), make it active once every node reports having it (then everyone signs
    with it), and retire the old one once every node signs with the new one and the gateways have had time to
    follow. A cluster without keys gets its first (its data port is authenticated from then on)."""
    from raftblock.wire.auth import new_data_key, wrap_key

    layout = open_layout(root)
    cmap = _load(layout)
    secret = _secret(layout)
    st = read_map(layout, cmap)
    old = st.data_key_active
    version = max(st.data_keys, default=0) + 1
    _done(_meta(layout, cmap, lambda c: c.set_data_key("add", version, wrap_key(secret, version, new_data_key()))))
    say(f"data key {version} added; waiting for every node to have it")
    _wait_nodes(layout, cmap, "auth_key_max", version, timeout_s)
    if old:
        _done(_meta(layout, cmap, lambda c: c.set_data_key("activate", version)))
        say(f"data key {version} active; waiting for every node to sign with it")
        _wait_nodes(layout, cmap, "auth_key_active", version, timeout_s)
        _gateway_call(layout, "reload")
        time.sleep(ROTATE_GATEWAY_GRACE_S)
        _done(_meta(layout, cmap, lambda c: c.set_data_key("retire", old)))
        say(f"data key {old} retired")
    else:
        _gateway_call(layout, "reload")
    st = read_map(layout, cmap)
    return {"active": st.data_key_active, "versions": sorted(st.data_keys), "retired": old or None}


def _wait_nodes(layout: Layout, cmap: ClusterMap, counter: str, version: int, timeout_s: float) -> None:
    """Until every storage node of the map that is up reports `counter` >= `version` (its NODE_STATUS)."""
    deadline = time.monotonic() + timeout_s
    behind: list[int] = []
    while time.monotonic() < deadline:
        st = read_map(layout, cmap)
        status = asyncio.run(collect_status(ClusterMap(st.cluster_id, registered_nodes(st)), st,
                                            secret=_secret(layout)))
        up = {int(n.node_id) for n in st.nodes.values() if n.state == "up"}
        behind = [n["id"] for n in status["nodes"]
                  if n["id"] in up and n.get("counters", {}).get(counter, 0) < version]
        if not behind:
            return
        time.sleep(0.3)
    raise ClusterError(f"nodes {behind} did not report {counter} {version} within {timeout_s:.0f} s: the key stays "
                       f"as it is now (run rotate-key again once they are back)")


def iscsi_portals(layout: Layout, cmap: ClusterMap) -> list[str]:
    """host:port of every iSCSI portal of a local cluster (node 1's first: the cluster's)."""
    if cmap.gateway == "embedded":
        return [f"{n.host}:{n.iscsi_port}" for n in cmap.nodes if n.iscsi_port]
    return [f"{cmap.nodes[0].host}:{cmap.gateway_iscsi}"] if cmap.gateway_iscsi else []


async def _drop_extents(cmap: ClusterMap, extent_ids: list[int], extent_size_bytes: int, epoch: int,
                        ring: KeyRing | None) -> None:
    """Trim every block of the volume's extents, so its space comes back (committed through Raft)."""
    from raftblock.client.router import GroupClient, NodeClient
    from raftblock.replication.group import GroupError

    client = NodeClient(cmap.peers(), ring=ring)
    gate = asyncio.Semaphore(DROP_IN_FLIGHT_MAX)  # a 4 TiB volume has 65,536 extents: not all at once

    async def trim(e: int) -> None:
        async with gate:
            await GroupClient(client, e >> 32, epoch=epoch).trim(e, 0, blocks)

    try:
        blocks = extent_size_bytes // 4096
        await asyncio.gather(*(trim(e) for e in extent_ids))
    except GroupError as e:
        raise ClusterError(f"could not trim the volume's data, nothing was deleted: {e}") from e
    finally:
        await client.close()


def volume_attach(root: Path, name: str, gateway_id: str, force: bool) -> int:
    """Attach a volume to a gateway in the map (force: take it over from another gateway, which is
    then fenced: the nodes refuse its older attach epoch). Returns the new attach epoch."""
    layout = open_layout(root)
    cmap = _load(layout)
    known = sorted(read_map(layout, cmap).gateways)  # every gateway registers itself when it starts
    if gateway_id not in known:
        raise ClusterError(f"no gateway {gateway_id!r} in the cluster of {root} (its gateways: "
                           f"{', '.join(known) or 'none has started yet'})")
    return int(_done(_meta(layout, cmap, lambda c: c.attach(name, gateway_id, force=force)))["attach_epoch"])


def volume_list(root: Path) -> list[dict[str, Any]]:
    layout = open_layout(root)
    st = read_map(layout, _load(layout))
    return [{"name": v.name, "size_bytes": v.size_bytes, "replication": v.mode, "extents": len(v.extent_groups),
             "attached_by": st.attachments[v.name].gateway_id if v.name in st.attachments else None,
             "state": v.state, "parent": _parent_of(st, v)}
            for v in sorted(st.volumes.values(), key=lambda v: v.name)]


def _parent_of(st: MetaState, v: Any) -> str | None:
    """A clone's parent as VOLUME@SNAPSHOT (None: not a clone)."""
    if not v.parent_volume_id:
        return None
    p = st.volume_by_id(v.parent_volume_id)
    s = st.snapshots.get(v.parent_snap_id)
    return f"{p.name if p else v.parent_volume_id}@{s.name if s else v.parent_snap_id}"


def _load(layout: Layout, running: bool = True) -> ClusterMap:
    """The cluster of `layout`; with `running`, fail at once unless a majority of its metadata processes
    runs (found by their locks): a command on a stopped cluster says so instead of waiting for a timeout."""
    root = layout.root
    if layout.remote:
        return _remote_map(layout)
    if not layout.map_path.exists():
        raise ClusterError(f"no cluster in {root} (start one: raftblock cluster up --dir {root})")
    cmap = ClusterMap.load(layout.map_path)
    if running:
        metas = sorted(int(k) for k in cmap.meta_admin)
        up = [k for k in metas if running_pid(layout, f"m{k}", layout.meta_config(k)) is not None]
        if not up:
            raise ClusterError(f"the cluster in {root} is not running (start it: raftblock cluster up --dir {root})")
        if 2 * len(up) <= len(metas):
            raise ClusterError(f"only {len(up)} of {len(metas)} metadata processes of {root} run, no majority "
                               f"(start the others: raftblock cluster up --dir {root})")
    return cmap


def _remote_map(layout: Layout) -> ClusterMap:
    """A deployed cluster's map from its cluster file: the metadata addresses from the file, the storage nodes
    (address, rack) as they registered with the metadata group."""
    doc = layout.cluster_doc()
    meta = doc["meta"]
    cmap = ClusterMap(str(doc.get("cluster_id", "")), [], {str(k): str(v) for k, v in meta["admin"].items()},
                      replication=str(doc.get("replication", "raft")), gateway="separate",
                      meta_http={str(k): str(v) for k, v in dict(meta.get("http", {})).items()})
    st = read_map(layout, cmap)
    if cmap.cluster_id and st.cluster_id and cmap.cluster_id != st.cluster_id:
        raise ClusterError(f"{layout.cluster_file} names cluster {cmap.cluster_id}, but its metadata group is "
                           f"cluster {st.cluster_id}")
    cmap.nodes = registered_nodes(st)
    return cmap


# --- snapshots (control/snapshots.py) -----------------------------------------------------------------

def _gateway_socket(layout: Layout, cmap: ClusterMap, gateway_id: str, st: MetaState | None = None) -> Path | str | None:
    """The admin socket of gateway `gateway_id` of this local cluster, if it runs: `gw1` the separate one,
    `nI` the one inside node I; else (a deployed cluster) its TCP admin address as it registered it."""
    rec = st.gateways.get(gateway_id) if st is not None else None
    if layout.remote:
        return rec.admin if rec is not None and rec.admin else None
    if gateway_id == "gw1":
        return layout.admin_socket if running_pid(layout, "gateway", layout.gateway_config) is not None else None
    if gateway_id.startswith("n") and gateway_id[1:].isdigit():
        nid = int(gateway_id[1:])
        if any(n.node_id == nid for n in cmap.nodes) and \
                running_pid(layout, f"n{nid}", layout.node_config(nid)) is not None:
            return layout.node_admin_socket(nid)
    return rec.admin if rec is not None and rec.admin else None


def _snap_call(layout: Layout, cmap: ClusterMap, call: Callable[[MetaClient], Awaitable[T]]) -> T:
    from raftblock.control.snapshots import SnapshotError

    try:
        return _meta(layout, cmap, call, deadline_s=30.0)
    except SnapshotError as e:
        raise ClusterError(str(e)) from e


def snapshot_create(root: Path, volumes: list[str], name: str) -> list[dict[str, Any]]:
    """`snapshot create VOL NAME` (and `--group VOL1,VOL2 NAME`): one crash-consistent cut, while I/O goes on."""
    from raftblock.control import snapshots

    layout = open_layout(root)
    cmap = _load(layout)
    st = read_map(layout, cmap)
    made = _snap_call(layout, cmap, lambda c: snapshots.create(
        c, cmap.peers(), volumes, name, lambda gw: _gateway_socket(layout, cmap, gw, st)))
    return [{"volume": m.volume, "name": m.name, "snap_id": m.snap_id, "created_ms": m.created_ms,
             "groups": m.groups, "barrier_ms": round(m.barrier_ms, 3)} for m in made]


def snapshot_delete(root: Path, volume: str, name: str) -> dict[str, Any]:
    from raftblock.control import snapshots

    layout = open_layout(root)
    cmap = _load(layout)

    async def go(c: MetaClient) -> Any:
        return await snapshots.delete(c, None, volume, name, await c.state(barrier=True), cmap.peers())

    r = _snap_call(layout, cmap, go)
    return {"volume": volume, "name": name, "snap_id": r.snap_id}


def snapshot_list(root: Path, volume: str) -> list[dict[str, Any]]:
    """Name, time, state, size and the blocks only each snapshot keeps (from the groups' leaders)."""
    from raftblock.control import snapshots
    from raftblock.replication.group import GroupError

    layout = open_layout(root)
    cmap = _load(layout)

    async def go(c: MetaClient) -> list[dict[str, Any]]:
        st = await c.state(barrier=True)
        v = st.volumes.get(volume)
        if v is None:
            raise snapshots.SnapshotError(f"no volume {volume}")
        recs = sorted((r for r in st.snapshots.values() if r.volume_id == v.volume_id), key=lambda r: r.snap_id)
        io = snapshots.ClusterIO(st, cmap.peers(), deadline_s=10.0, secret=_secret(layout))
        try:
            unique = await snapshots.stats(io, volume) if recs else {}
        except GroupError:
            unique = {}
        finally:
            await io.close()
        return [{"name": r.name, "snap_id": r.snap_id, "created_ms": r.created_ms, "state": r.state,
                 "size_bytes": r.size_bytes or v.size_bytes,
                 "unique_bytes": unique[r.snap_id] * 4096 if r.snap_id in unique else None} for r in recs]

    return _snap_call(layout, cmap, go)


# --- backups (control/backups.py) --------------------------------------------------------------------

def _backup_call(fn: Callable[[], T]) -> T:
    from raftblock.backup.chunk import ChunkError
    from raftblock.backup.manifest import ManifestError
    from raftblock.backup.store import StoreError
    from raftblock.control.backups import BackupError

    try:
        return fn()
    except (BackupError, StoreError, ManifestError, ChunkError) as e:
        raise ClusterError(str(e)) from e


def snapshot_export(root: Path, volume: str, snapshot: str, store: Any, since: str | None = None,
                    parallel: int = 4, progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    from raftblock.control import backups

    layout = open_layout(root)
    cmap = _load(layout)
    ex = _backup_call(lambda: backups.export(lambda: meta_client(layout, cmap), cmap.peers(), store, volume, snapshot,
                                             since, parallel, progress))
    r = ex.result
    return {"volume": volume, "snapshot": snapshot, "url": ex.url, "since": since, "size_bytes": r.manifest.size_bytes,
            "chunks": r.manifest.chunk_count(), "changed_chunks": ex.changed_chunks, "changed_bytes": r.changed_bytes,
            "uploaded_objects": r.uploaded_objects, "uploaded_bytes": r.uploaded_bytes,
            "reused_objects": r.reused_objects, "resumed_chunks": r.resumed_chunks}


def snapshot_restore(root: Path, store: Any, name: str, snapshot: str | None = None, from_volume: str | None = None,
                     replication: str | None = None, parallel: int = 4,
                     progress: Callable[[int, int, int], None] | None = None, lazy: bool = False,
                     on_served: Callable[[], None] | None = None) -> dict[str, Any]:
    from raftblock.control import backups

    layout = open_layout(root)
    cmap = _load(layout)
    man = _backup_call(lambda: backups.pick_manifest(store, from_volume, snapshot))

    def create(vol: str, size: int, mode: str, origin: str, lazy: bool) -> None:
        if lazy:
            volume_create(root, vol, size, mode, origin=origin, lazy_source=origin)
            if on_served is not None:
                on_served()
        else:  # an encrypted volume's backup: the restored volume under its key (docs/encryption.md)
            volume_create(root, vol, size, mode, state="restoring", origin=origin, seal_from=man.sealed)

    res = _backup_call(lambda: backups.restore(lambda: meta_client(layout, cmap), cmap.peers(), store, man, name,
                                               replication or cmap.replication, create, parallel, progress, lazy))
    _gateway_call(layout, "reload")
    return {"volume": res.volume, "source": res.source, "url": store.url, "size_bytes": res.size_bytes,
            "written_bytes": res.written_bytes, "resumed": res.resumed}


# --- resize and rollback --------------------------------------------------------------------------------

async def _trim_range(io: Any, volume: str, first_block: int, end_block: int) -> None:
    """Drop blocks [first_block, end_block) of `volume` in its own groups (a clone's too: not read-through)."""
    vol = io.volume(volume)
    gate = asyncio.Semaphore(DROP_IN_FLIGHT_MAX)

    async def trim(eid: int, blk: int, n: int) -> None:
        async with gate:
            await vol._trim(eid, blk, n)  # an encrypted volume's entries with its blocks

    if first_block < end_block:
        await asyncio.gather(*(trim(e, b, n) for e, b, n, _ in vol._pieces(first_block, end_block)))


def volume_resize(root: Path, name: str, size_bytes: int, allow_shrink: bool = False) -> dict[str, Any]:
    """`volume resize NAME SIZE`: grow online (new extents in new groups; NBD clients see the new size on
    their next connection); shrink only with `allow_shrink`, detached, without snapshots or clones: the bytes
    past the new size are trimmed first, so growing again later reads zeros there."""
    from raftblock.control.snapshots import ClusterIO
    from raftblock.replication.group import GroupError

    layout, cmap, st, v = _volume_of(root, name)
    old = v.size_bytes
    if size_bytes < old:
        if not allow_shrink:
            raise ClusterError(f"volume {name} is {format_size(old)}: shrinking it to {format_size(size_bytes)} "
                               f"loses the data past that (--allow-shrink)")
        if name in st.attachments or _connections(layout, name):
            raise ClusterError(f"volume {name} is attached: shrink it detached (raftblock volume detach {name})")
        if any(r.volume_id == v.volume_id for r in st.snapshots.values()) or st.clones_of(v.volume_id):
            raise ClusterError(f"volume {name} has snapshots or clones: they keep its size (delete them first)")

        async def trim() -> None:
            io = ClusterIO(st, cmap.peers(), secret=_secret(layout))
            try:
                await _trim_range(io, name, size_bytes // 4096, old // 4096)
            finally:
                await io.close()

        try:
            asyncio.run(trim())
        except GroupError as e:
            raise ClusterError(f"could not trim {name} past {format_size(size_bytes)}; its size is unchanged: {e}") from e
    res = _done(_meta(layout, cmap, lambda c: c.resize_volume(name, size_bytes, allow_shrink)))
    if res.get("groups"):
        wait_healthy(layout, cmap, {int(g) for g in res["groups"]})
    _gateway_call(layout, "reload")
    return {"name": name, "old_size_bytes": old, "size_bytes": size_bytes, "new_groups": res.get("groups", []),
            "removed_groups": res.get("removed_groups", [])}


def volume_rollback(root: Path, name: str, snapshot: str, progress: Callable[[int, int], None] | None = None,
                    ) -> dict[str, Any]:
    """`volume rollback NAME SNAP` (refused while attached): the volume becomes the snapshot again. The blocks
    that differ are found from the groups' indexes against a snapshot of now (no data read to find them) and
    only they are copied back from the snapshot (or trimmed: a hole then); blocks past the snapshot's size
    are trimmed. Meanwhile the volume is `restoring` (not served); an interrupted rollback run again
    finishes it."""
    from raftblock.control import snapshots
    from raftblock.replication.group import GroupError

    layout, cmap, st, v = _volume_of(root, name)
    rec = st.snapshot_of(name, snapshot)
    if rec is None or rec.state != "ready":
        raise ClusterError(f"volume {name} has no snapshot {snapshot}" if rec is None
                           else f"snapshot {name}@{snapshot} is {rec.state}, not ready")
    if name in st.attachments or _connections(layout, name):
        raise ClusterError(f"volume {name} is attached by gateway "
                           f"{st.attachments[name].gateway_id if name in st.attachments else '?'}: detach it first "
                           f"(a host must not see its disk change under it)")
    if v.state != "restoring":
        _done(_meta(layout, cmap, lambda c: c.set_volume_state(name, "restoring", expected="ready")))
    now = f"rollback-{rec.snap_id}"

    async def go(c: MetaClient) -> int:
        cur = await c.state(barrier=True)
        if cur.snapshot_of(name, now) is not None:  # left by an interrupted rollback
            await snapshots.delete(c, None, name, now, cur, cmap.peers())
        made = (await snapshots.create(c, cmap.peers(), [name], now, lambda gw: None))[0]
        st2 = await c.state(barrier=True)
        io = snapshots.ClusterIO(st2, cmap.peers(), secret=_secret(layout))
        copied = 0
        try:
            vol = io.volume(name)
            bpe = vol.info.extent_size_bytes // 4096
            snap_blocks = (rec.size_bytes or vol.info.size_bytes) // 4096
            await _trim_range(io, name, snap_blocks, vol.info.size_bytes // 4096)
            pieces = vol._pieces(0, snap_blocks)
            for k, (eid, blk, n, _vb) in enumerate(pieces):
                g = vol._group_for(eid)
                pos = 0
                for run, changed in await g.block_status(eid, blk, n, snap_id=made.snap_id, since_snap_id=rec.snap_id):
                    if changed:
                        copied += await _copy_back(g, eid, blk + pos, run, rec.snap_id, vol._seal_at)
                    pos += run
                if progress is not None:
                    progress((k + 1) * bpe, len(pieces) * bpe)
        finally:
            await io.close()
        await snapshots.delete(c, None, name, now, st2, cmap.peers())
        return copied

    try:
        copied = _snap_call(layout, cmap, go)
    except GroupError as e:
        raise ClusterError(f"rollback of {name} to {snapshot} stopped: {e}; the volume stays `restoring` (not "
                           f"served): run the rollback again") from e
    _done(_meta(layout, cmap, lambda c: c.set_volume_state(name, "ready", expected="restoring")))
    _gateway_call(layout, "reload")
    return {"name": name, "snapshot": snapshot, "copied_bytes": copied}


async def _copy_back(g: Any, eid: int, block: int, count: int, snap_id: int, seal_at: int = 0) -> int:
    """Blocks [block, block+count) of extent `eid` as snapshot `snap_id` has them: written back, or trimmed
    where it has a hole. Returns the bytes written. `seal_at`: an encrypted volume's blocks go back as they are
    stored, ciphertext and entries (the same place: they decrypt there; nothing is encrypted again)."""
    from raftblock._fast import blockcrc

    written = 0
    pos = 0
    for run, allocated in await g.block_status(eid, block, count, snap_id=snap_id):
        if not allocated:
            await (g.trim_sealed(eid, block + pos, run, seal_at) if seal_at else g.trim(eid, block + pos, run))
        else:
            k = 0
            while k < run:
                m = min(run - k, 256)
                at = block + pos + k
                if seal_at:
                    data, crcs, entries = await g.read_sealed(eid, at, m, seal_at, snap_id=snap_id)
                else:
                    data, crcs = await g.read(eid, at, m, snap_id=snap_id)
                if blockcrc.first_mismatch(data, crcs) >= 0:  # end to end: the node checks them again on arrival
                    raise ClusterError(f"extent {eid:#x} block {at}: the snapshot's data fails its CRC")
                if seal_at:
                    await g.write_sealed(eid, at, memoryview(data), crcs, seal_at, entries)
                else:
                    await g.write(eid, at, memoryview(data), crcs)
                written += len(data)
                k += m
        pos += run
    return written
