"""What each kind of process exports on /metrics (obs/metrics.py): the storage node, the gateway, the
metadata node. The names are the contract of ansible/files/prometheus/alerts.yml, the Grafana dashboard
and docs/operations.md ("Metrics"); tests/integration/test_metrics.py checks them with promtool.
"""

from __future__ import annotations

import os
from typing import Any

from raftblock.obs.metrics import Families

# The processes' objects are typed Any here: obs/ sits below node/, meta/ and gateway/ (no import cycle).

# node counters -> the `reason` of raftblock_node_frames_refused_total: input refused on the data port
REFUSED = {"frames_bad_crc": "bad_crc", "frames_bad_magic": "bad_magic", "frames_malformed": "malformed",
           "frames_bad_hello": "bad_hello", "raft_unknown_group": "unknown_group",
           "client_unknown_group": "unknown_group", "chain_unknown_group": "unknown_group",
           "raft_wrong_destination": "wrong_destination", "chain_wrong_destination": "wrong_destination",
           "stale_epoch_refused": "stale_epoch"}
# wire client op -> the `op` of raftblock_node_client_ops_total
CLIENT_OPS = {1: "write", 2: "read", 3: "trim", 4: "status", 5: "node_status", 6: "replica_read", 7: "block_status",
              8: "scrub_crcs", 9: "scrub_repair", 10: "snap", 11: "unsnap"}
SCRUB_ERRORS = ("scrub_errors_found", "scrub_mismatches")
GATEWAY_COUNTERS = {"raftblock_gateway_io_operations": "Requests from hosts, by volume and op.",
                    "raftblock_gateway_io_bytes": "Bytes read, written, trimmed or zeroed by hosts.",
                    "raftblock_gateway_io_errors": "Requests answered with an error."}
GATEWAY_CONNECTIONS = "Host connections, by volume."
GROUP_TERM = "Raft term (chain: epoch) of each group this node hosts."
GROUP_LAG = "Entries committed but not applied yet on this replica."
NODE_STATES = ("up", "suspect", "down")
AUTH_REASONS = ("unsigned", "no_trailer", "bad_tag", "unknown_key", "bad_scope", "wrong_volume", "bad_identity")
AUTH_REFUSED = ("Connections closed on the data port for a frame that failed authentication (raftblock/wire/auth.py), "
                "by reason.")


def node_fill(h: Any, rack: str) -> Any:
    """The storage node `h` (node/host.py): its WAL, disk, groups and counters."""
    node = {"node": str(h.node_id), "rack": rack}

    def fill(f: Families) -> None:
        c = h.counters
        f.histogram("raftblock_node_wal_fdatasync_seconds", "WAL fdatasync latency (one group commit).",
                    h.wal.sync_seconds, node)
        try:
            st = os.statvfs(h.engine.directory)
            f.gauge("raftblock_node_disk_free_bytes", "Free bytes on the node's data disk (for unprivileged users).",
                    st.f_bavail * st.f_frsize, node)
            f.gauge("raftblock_node_disk_size_bytes", "Size of the node's data disk.", st.f_blocks * st.f_frsize, node)
        except OSError:
            pass
        stats = h.engine.stats()
        f.gauge("raftblock_node_engine_live_bytes", "Bytes of live blocks in the segment store.",
                stats.get("live_bytes", 0), node)
        f.gauge("raftblock_node_engine_disk_bytes", "Bytes the segment store takes on disk.",
                stats.get("bytes_on_disk", 0), node)
        f.gauge("raftblock_node_wal_disk_bytes", "Bytes the WAL takes on disk.", h.wal.bytes_on_disk(), node)
        led = 0
        remaining = 0
        rate = 0.0
        f.declare_gauge("raftblock_group_term", GROUP_TERM, ["node", "rack", "group", "replication"])
        f.declare_gauge("raftblock_group_commit_apply_lag_entries", GROUP_LAG, ["node", "rack", "group"])
        for r in list(h.replicas.values()):
            info = r.info(0)
            g = {**node, "group": str(r.id)}
            f.gauge("raftblock_group_term", GROUP_TERM, info.term, {**g, "replication": info.mode or r.kind})
            f.gauge("raftblock_group_commit_apply_lag_entries", GROUP_LAG, max(0, info.commit - info.applied), g)
            if info.leader == h.node_id:
                led += 1
            if info.repair_bytes_total:
                left = max(0, info.repair_bytes_total - info.repair_bytes_done)
                remaining += left
                if info.repair_elapsed_ms:
                    rate += info.repair_bytes_done * 1000 / info.repair_elapsed_ms
        f.gauge("raftblock_node_groups_hosted", "Extent groups with a replica on this node.", len(h.replicas), node)
        f.gauge("raftblock_node_groups_led", "Extent groups this node leads (chain: heads).", led, node)
        f.counter("raftblock_node_repair_bytes", "Image bytes this node sent to replicas being rebuilt.",
                  c.get("repair_bytes_sent", 0), node)
        f.counter("raftblock_node_snapshot_bytes_sent", "Snapshot and image bytes sent to other nodes (repair, "
                  "catch-up).", c.get("repair_bytes_sent", 0), node)
        f.gauge("raftblock_node_repair_remaining_bytes", "Image bytes still to send to replicas being rebuilt.",
                remaining, node)
        f.gauge("raftblock_node_repair_eta_seconds", "Time left for the rebuilds this node streams, at their "
                "rate so far (0: none running).", remaining / rate if rate > 0 else 0.0, node)
        f.counter("raftblock_node_scrub_bytes", "Bytes re-read and checked by the background scrub.",
                  c.get("scrub_blocks", 0) * 4096, node)
        f.counter("raftblock_node_scrub_errors", "Bad blocks or replica mismatches the scrub found.",
                  sum(c.get(k, 0) for k in SCRUB_ERRORS), node)
        f.counter("raftblock_node_scrub_passes", "Completed scrub passes over every replica here.",
                  c.get("scrub_passes", 0), node)
        f.counter("raftblock_node_corrupt_reads", "Reads that found a bad checksum (then repaired from a replica).",
                  c.get("corrupt_reads", 0), node)
        refused: dict[str, int] = dict.fromkeys(sorted(set(REFUSED.values())), 0)
        for k, reason in REFUSED.items():
            refused[reason] += c.get(k, 0)
        for reason, n in refused.items():
            f.counter("raftblock_node_frames_refused", "Frames or requests refused on the data port, by reason.",
                      n, {**node, "reason": reason})
        f.declare_counter("raftblock_node_auth_refused", AUTH_REFUSED, ["node", "rack", "reason"])
        for reason in AUTH_REASONS:
            f.counter("raftblock_node_auth_refused", AUTH_REFUSED, c.get(f"auth_refused_{reason}", 0),
                      {**node, "reason": reason})
        f.gauge("raftblock_node_data_key_active", "The data key version this node signs with (0: the data port "
                "is not authenticated).", c.get("auth_key_active", 0), node)
        for op, n in sorted(h.client_ops.items()):
            f.counter("raftblock_node_client_ops", "Client requests received, by op.", n,
                      {**node, "op": CLIENT_OPS.get(op, str(op))})
        adm = h.data.admission  # QoS (node/admission.py): per class, a volume or the node's repair/scrub
        names = adm.names
        for c in list(adm.sched):
            cls = str(c.key) if isinstance(c.key, str) else names.get(c.key, "" if c.key else "unknown")
            if not cls or not c.admitted:
                continue
            lab = {**node, "class": cls}
            f.counter("raftblock_node_qos_admitted", "Requests the node's QoS scheduler let go, by class (a "
                      "volume, or repair, scrub).", c.admitted, lab)
            f.counter("raftblock_node_qos_waited", "... of which waited in its queue.", c.waited, lab)
            f.counter("raftblock_node_qos_wait_seconds", "Time requests waited in the node's QoS queue.",
                      c.wait_s, lab)
            f.counter("raftblock_node_qos_reservation", "Requests let go because their class's reservation "
                      "was due.", c.by_reservation, lab)
            f.counter("raftblock_node_qos_starved", "Requests let go by the starvation guard (waited qos_wait_max_ms "
                      "behind heavier classes).", c.by_age, lab)
            f.gauge("raftblock_node_qos_queued", "Requests waiting in the node's QoS queue.", len(c.queue), lab)
        a = adm.stats()
        f.gauge("raftblock_node_qos_slots_used", "In-flight slots of the node's QoS scheduler in use.",
                a["slots_used"], node)
        f.gauge("raftblock_node_qos_slots", "In-flight slots of the node's QoS scheduler (qos_slots_ops).",
                a["slots"], node)
        f.counter("raftblock_node_qos_refused", "Requests refused UNAVAILABLE: the QoS queue was full.",
                  a["refused"], node)
        f.counter("raftblock_node_commits", "Raft commits and chain acknowledgements.", h.commits, node)
        f.counter("raftblock_node_wal_syncs", "WAL fdatasyncs (group commits).", h.wal.syncs, node)
        f.gauge("raftblock_node_peers_connected", "Peer links up.", len(h.links.conns), node)
        f.gauge("raftblock_node_failed", "1 when the node stopped serving after a disk error.",
                1.0 if h.failed is not None else 0.0, node)

    return fill


def gateway_fill(gw: Any) -> Any:
    """A gateway (node/gateway.py; a separate process or inside a storage node): per-volume I/O as hosts see it."""
    gid = {"gateway": gw.gateway_id}

    def fill(f: Families) -> None:
        cat = gw.catalog
        for name, doc in GATEWAY_COUNTERS.items():
            f.declare_counter(name, doc, ["gateway", "volume", "op"])
        f.declare_gauge("raftblock_gateway_connections", GATEWAY_CONNECTIONS, ["gateway", "volume"])
        for vol, ops in sorted(cat.io.items()):
            for op, st in ops.items():
                if not st.ops:
                    continue
                lab = {**gid, "volume": vol, "op": op}
                f.counter("raftblock_gateway_io_operations", "", st.ops, lab)
                f.counter("raftblock_gateway_io_bytes", "", st.bytes, lab)
                f.counter("raftblock_gateway_io_errors", "", st.errors, lab)
                f.histogram("raftblock_gateway_io_latency_seconds", "Request latency as the gateway served it.",
                            st.latency, lab)
        for vol, n in sorted(cat.attached.items()):
            f.gauge("raftblock_gateway_connections", "", n, {**gid, "volume": vol})
        for name in cat.names():
            v = cat.get(name)
            if v is None or not v.qos_waits:
                continue
            lab = {**gid, "volume": name}
            f.counter("raftblock_gateway_qos_throttled", "Host requests that waited for their volume's QoS "
                      "limits at the gateway.", v.qos_waits, lab)
            f.counter("raftblock_gateway_qos_wait_seconds", "Time host requests waited for their volume's QoS "
                      "limits at the gateway.", v.qos_wait_s, lab)
        f.gauge("raftblock_gateway_volumes", "Volumes this gateway exports.", len(cat.names()), gid)
        keys = getattr(gw, "keys", None)
        if keys is not None:  # encryption at rest (raftblock/sealing.py)
            sealed, opened = keys.stats()
            f.counter("raftblock_gateway_blocks_sealed", "Blocks of encrypted volumes encrypted (AES-256-GCM) "
                      "before they left for the nodes.", sealed, gid)
            f.counter("raftblock_gateway_blocks_opened", "Blocks of encrypted volumes read and decrypted (tag "
                      "checked).", opened, gid)
        isc = getattr(gw, "iscsi", None)
        if isc is not None:
            kinds = {"Normal": 0, "Discovery": 0}
            for c in isc.connections:
                if c.session_type in kinds:
                    kinds[c.session_type] += 1
            for kind, n in kinds.items():
                f.gauge("raftblock_gateway_iscsi_sessions", "iSCSI sessions logged in, by session type.", n,
                        {**gid, "type": kind.lower()})
            for result, n in isc.logins.items():
                f.counter("raftblock_gateway_iscsi_logins", "iSCSI logins, by result (refused: unknown target, "
                          "CHAP failure, bad login request).", n, {**gid, "result": result})
            f.counter("raftblock_gateway_iscsi_protocol_errors", "iSCSI connections closed for input that could "
                      "not be framed (bad opcode, digest error, oversized segment).", isc.protocol_errors, gid)
            f.counter("raftblock_gateway_iscsi_data_out_refused", "iSCSI writes ended with ABORTED COMMAND for a "
                      "broken Data-Out sequence (DataSN, offset, transfer tag).", isc.data_out_refused, gid)

    return fill


def meta_fill(node: Any) -> Any:
    """A metadata node: the leader flag on every member; the map's view (nodes, groups) from the leader."""
    def fill(f: Families) -> None:
        try:
            leader = node.is_leader()
            st = node.state()
        except Exception:  # noqa: BLE001 — not started or closing: only the process metrics
            return
        f.gauge("raftblock_meta_leader", "1 on the metadata leader.", 1.0 if leader else 0.0)
        f.gauge("raftblock_meta_map_version", "Commands applied to the cluster map (a change counter).", st.applied)
        f.counter("raftblock_meta_proposals", "Commands proposed through this metadata node.", node.proposals)
        from raftblock.meta import group as meta_group  # (obs/ sits below meta/: imported at scrape time)

        f.counter("raftblock_meta_peers_refused", "Connections to the metadata Raft port closed before "
                  "authentication for an oversized message.", meta_group.refused_oversize)
        f.gauge("raftblock_meta_volumes", "Volumes in the map.", len(st.volumes))
        counts = dict.fromkeys((*NODE_STATES, "draining"), 0)
        for n in st.nodes.values():
            counts[n.state] = counts.get(n.state, 0) + 1
            if n.draining:
                counts["draining"] += 1
        for s, k in counts.items():
            f.gauge("raftblock_meta_nodes", "Storage nodes by state.", k, {"state": s})
        if not leader:
            return  # rule: per-node and per-group series come from one place, the leader
        for n in sorted(st.nodes.values(), key=lambda n: n.node_id):
            f.gauge("raftblock_meta_node_up", "1 when the metadata group sees the storage node up.",
                    1.0 if n.state == "up" else 0.0, {"node": str(n.node_id), "rack": n.rack})
        volume_of = {int(g): v.name for v in st.volumes.values() for g in v.extent_groups}
        states = dict.fromkeys(("healthy", "degraded", "no_quorum"), 0)
        target = min(st.replicas, len(st.nodes))
        for gid, g in sorted(st.groups.items()):
            want = max(target, len(g.members))
            up = sum(1 for m in g.members if (rec := st.nodes.get(m)) is not None and rec.state == "up")
            lab = {"group": str(gid), "volume": volume_of.get(int(gid), "")}
            f.gauge("raftblock_meta_group_replicas", "Replicas a group should have.", want, lab)
            f.gauge("raftblock_meta_group_replicas_up", "Replicas of a group on nodes that are up.", up, lab)
            states["healthy" if up >= want else "no_quorum" if 2 * up <= want else "degraded"] += 1
        for s, k in states.items():
            f.gauge("raftblock_meta_groups", "Extent groups by health.", k, {"state": s})

    return fill
