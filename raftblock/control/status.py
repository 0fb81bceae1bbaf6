"""What `cluster status` and the status page (control/statuspage.py) show of the storage nodes: each node's
view of its groups and counters, asked over the data plane, and the repairs under way with their progress.
Below node/cluster.py (the CLI's commands) and the metadata node (its status page): it imports neither."""

from __future__ import annotations

from typing import Any

from raftblock.meta.state import MetaState
from raftblock.node.clustermap import ClusterMap
from raftblock.replication.raft.types import NodeId

CATCHING_UP_ENTRIES = 64  # a member this far behind the group's most advanced one is still being rebuilt
# Node counters shown as errors in `cluster status` (data found bad, what was done about it, refused input)
ERROR_COUNTERS = ("corrupt_reads", "read_repairs", "blocks_repaired", "read_repair_failed", "engine_bad_blocks",
                  "frames_bad_crc", "frames_bad_magic", "frames_malformed", "raft_unknown_group",
                  "client_unknown_group", "stale_epoch_refused", "apply_errors", "wal_sync_slow",
                  "scrub_errors_found", "scrub_mismatches", "scrub_repair_failed")


async def collect_status(cmap: ClusterMap, st: MetaState, attempt_timeout_s: float = 2.0,
                         secret: bytes | None = None) -> dict[str, Any]:
    """`secret`: the cluster secret, to unwrap the data port's keys (raftblock/wire/auth.py)."""
    from raftblock.client.router import NodeClient
    from raftblock.wire.auth import KeyRing

    ring = KeyRing.from_map(secret, st.data_key_set()) if secret is not None else None
    client = NodeClient(cmap.peers(), attempt_timeout_s=attempt_timeout_s, ring=ring)
    nodes: list[dict[str, Any]] = []
    infos: dict[int, dict[int, Any]] = {}
    try:
        for n in cmap.nodes:
            rec = st.nodes.get(NodeId(n.node_id))
            entry: dict[str, Any] = {"id": n.node_id, "rack": n.rack, "address": f"{n.host}:{n.port}",
                                     "map_state": rec.state if rec is not None else "unregistered",
                                     "capacity_bytes": rec.capacity_bytes if rec is not None else 0}
            try:
                resp = await client.node_status(n.node_id)
                c = dict(resp.counters)
                entry.update(state="up", groups=len(resp.groups),
                             leading=sum(1 for g in resp.groups if g.leader == n.node_id),
                             # what the node's files take on its disk: engine segments and checkpoint, and
                             # the WAL (its released segments kept for reuse included)
                             used_bytes=c.get("engine_bytes_on_disk", 0) + c.get("wal_bytes_on_disk", 0),
                             live_bytes=c.get("engine_live_bytes", 0), on_disk_bytes=c.get("engine_bytes_on_disk", 0),
                             wal_bytes=c.get("wal_bytes_on_disk", 0),
                             errors={k: c.get(k, 0) for k in ERROR_COUNTERS if c.get(k, 0)}, counters=c)
                for g in resp.groups:
                    infos.setdefault(g.group, {})[n.node_id] = g
            except (OSError, TimeoutError, ConnectionError):
                entry.update(state="unreachable")
            nodes.append(entry)
    finally:
        await client.close()
    groups = []
    for gid, g in sorted(st.groups.items()):
        views = infos.get(int(gid), {})
        leaders = {v.leader for v in views.values() if v.leader}
        terms = [v.term for v in views.values()]
        leader = next(iter(leaders)) if len(leaders) == 1 and list(leaders)[0] in views else None
        groups.append({"group": int(gid), "replication": g.mode, "members": [int(m) for m in g.members],
                       "leader": leader, "term": max(terms, default=0), "epoch": g.epoch,
                       "applied": {str(k): v.applied for k, v in views.items()},
                       "allocated_bytes": views[leader].allocated_bytes if leader in views else None})
    return {"nodes": nodes, "groups": groups, "repairs": repairs_of(infos, st)}


def repairs_of(infos: dict[int, dict[int, Any]], st: MetaState) -> list[dict[str, Any]]:
    """The replicas being rebuilt (a Raft leader's snapshot stream, a chain member's image stream to its
    successor), with bytes done, rate and ETA; and the groups short of live copies with nothing streaming
    yet (waiting: for the detector to call a member down, for a spare node in an unused rack, for a
    leader)."""
    from raftblock.control.raftrepair import repair_needed

    out: list[dict[str, Any]] = []
    streaming: set[int] = set()
    for gid, views in sorted(infos.items()):
        for src, v in sorted(views.items()):
            if not v.repair_bytes_total:
                continue
            done, total, ms = v.repair_bytes_done, v.repair_bytes_total, max(1, v.repair_elapsed_ms)
            rate = done * 1000 / ms
            out.append({"group": gid, "from": src, "to": int(v.repair_node), "bytes_done": done, "bytes_total": total,
                        "elapsed_s": round(ms / 1000, 1), "rate_bytes_per_s": int(rate),
                        "eta_s": round((total - done) / rate, 1) if rate > 0 else None, "state": "copying"})
            streaming.add(gid)
    needed = repair_needed(st)
    for gid, g in sorted(st.groups.items()):
        if int(gid) in streaming:
            continue
        if int(gid) in needed:
            out.append({"group": int(gid), "state": "degraded", "why": needed[int(gid)]})
            continue
        # Every member live, nothing streaming: a member that does not host the group yet, or is far
        # behind the others (a copy about to start, or the log tail after one), is still being rebuilt.
        views = infos.get(int(gid), {})
        top = max((v.applied for v in views.values()), default=0)
        lagging = [f"n{m} {'no report (not hosting it yet, or unreachable)' if m not in views else f'applied {views[m].applied} of {top}'}"
                   for m in (int(x) for x in g.members)
                   if m not in views or views[m].applied + CATCHING_UP_ENTRIES < top]
        if lagging and views:
            out.append({"group": int(gid), "state": "catching up", "why": ", ".join(lagging)})
    return out
