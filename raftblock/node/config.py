"""HostConfig: a storage node's settings (the [raft] table of its TOML file, docs/operations.md): timing,
batching, WAL, snapshots, repair and scrub pacing, space admission. One object, read by the host's
modules and, through replication/replica.py Settings, by the replicas."""

from __future__ import annotations


class HostConfig:
    def __init__(
        self,
        node_id: int,
        *,
        tick_ms: int = 100,
        election_timeout_ticks: int = 6,
        heartbeat_interval_ticks: int = 2,
        lease_margin_ticks: int = 2,
        batch_bytes_max: int = 1 << 20,
        batch_writes_max: int = 64,
        pending_writes_max: int = 1024,
        wal_segment_bytes_max: int = 64 << 20,
        wal_compact_bytes: int = 256 << 20,
        snapshot_chunk_bytes: int = 1 << 20,
        peer_send_buffer_bytes_max: int = 64 << 20,
        catch_up_ticks_max: int = 64,
        engine_sync_bytes: int = 32 << 20,
        wal_sync: str = "inline",
        wal_sync_inline_max_ms: float = 50.0,
        wal_sync_thread_s: float = 60.0,
        repair_bytes_per_s: int = 64 << 20,
        repair_min_bytes_per_s: int = 8 << 20,
        qos_slots_ops: int = 64,
        qos_slots_bytes: int = 32 << 20,
        qos_wait_max_ms: int = 500,
        scrub_bytes_per_s: int = 8 << 20,
        scrub_pass_interval_s: float = 3600.0,
        space_reserve_bytes: int = 64 << 20,
        write_once_min_bytes: int = 4096,
    ) -> None:
        if wal_sync not in ("inline", "thread"):
            raise ValueError(f"wal_sync must be 'inline' or 'thread', not {wal_sync!r}")
        self.node_id = node_id
        self.tick_ms = tick_ms
        self.election_timeout_ticks = election_timeout_ticks
        self.heartbeat_interval_ticks = heartbeat_interval_ticks
        self.lease_margin_ticks = lease_margin_ticks
        self.batch_bytes_max = batch_bytes_max
        self.batch_writes_max = batch_writes_max
        self.pending_writes_max = pending_writes_max
        self.wal_segment_bytes_max = wal_segment_bytes_max
        self.wal_compact_bytes = wal_compact_bytes
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        self.peer_send_buffer_bytes_max = peer_send_buffer_bytes_max
        self.catch_up_ticks_max = catch_up_ticks_max
        self.engine_sync_bytes = engine_sync_bytes
        # "inline": the event loop itself calls fdatasync once per loop turn, after every message of the
        # turn is on the wire (followers and the leader sync in parallel, in their own processes);
        # "thread": a worker thread syncs while the loop goes on. On a small machine every hand-off to
        # a thread costs context switches and GIL transfers that cost more than the loop's wait.
        self.wal_sync = wal_sync
        # Write-once (docs/format/write-once.md): a write op of at least this many bytes is stored once per
        # node, in the WAL, and the engine links to it (4096: every write); 0 turns it off (every byte
        # written twice). Measured at 4 KiB and 64 KiB (the page's "Choosing the threshold").
        if write_once_min_bytes and (write_once_min_bytes < 4096 or write_once_min_bytes % 4096):
            raise ValueError("write_once_min_bytes must be 0 or a multiple of 4096")
        self.write_once_min_bytes = write_once_min_bytes
        # An inline fdatasync blocks the loop: heartbeats and reads of every group wait for it. One slower
        # than wal_sync_inline_max_ms moves the node to the thread for wal_sync_thread_s (then it tries
        # inline again), so a disk with fsync stalls cannot starve heartbeats into elections.
        self.wal_sync_inline_max_ms = wal_sync_inline_max_ms
        self.wal_sync_thread_s = wal_sync_thread_s
        # Snapshot bytes this node sends per second to replicas that are being rebuilt (re-replication,
        # a node that fell behind the log): foreground I/O keeps the rest of the disk and the network.
        # 0 = unbounded.
        self.repair_bytes_per_s = repair_bytes_per_s
        # ... and at least this many while client I/O saturates the node (a reservation in its QoS scheduler,
        # node/admission.py rule 3), so a rebuild always progresses. 0 = none.
        self.repair_min_bytes_per_s = repair_min_bytes_per_s
        # QoS (node/admission.py, raftblock/qos.py): the client requests (and bytes) this node lets into
        # replication at once; more wait in its scheduler, which picks the next by reservation, weight and limit.
        if qos_slots_ops < 1 or qos_slots_bytes < (1 << 20):
            raise ValueError("qos_slots_ops must be >= 1 and qos_slots_bytes >= 1 MiB")
        self.qos_slots_ops = qos_slots_ops
        self.qos_slots_bytes = qos_slots_bytes
        # ... and none waits longer than this there once its limits let it go (the starvation guard; below the
        # gateway's 1 s attempt timeout, so a waiting request is not sent again)
        self.qos_wait_max_ms = qos_wait_max_ms
        # Background scrub (control/scrub.py): bytes re-read per second (0 = off) and the pause between
        # two passes over every replica this node holds.
        self.scrub_bytes_per_s = scrub_bytes_per_s
        self.scrub_pass_interval_s = scrub_pass_interval_s
        # A leader or head refuses new writes (ENOSPC) while its data disk has less than this free.
        self.space_reserve_bytes = space_reserve_bytes
