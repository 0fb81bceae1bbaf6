# NodeRuntime: drives every extent group's RaftCore of one node on one asyncio loop.
#
# Owns: the groups' cores, the shared WAL (wal.py), the node's storage Engine (the state machine all
# groups apply to), the transport (transport.py), client requests, ticks.
#
# Rules (the core's Ready contract, docs/raft.md, for many groups at once):
# 1. Per group at most one Ready is outstanding. Its `messages_now` leave at once; its snapshot,
#    entries, hard state and compaction are appended to the WAL buffer; if it must be durable (entries,
#    a snapshot, a term/vote change) it waits for the next WAL fdatasync, which covers every group
#    (one fdatasync in flight; while it runs the next batch accumulates). Then its `messages` leave,
#    committed entries are applied to the engine, reads are served, and the core advances.
# 2. A client write is answered OK only when its entry is committed and applied on this node (the
#    leader) and the entry at that index still has the term it was proposed in.
# 3. Reads are served by a leader only through the core's read_index (lease, else a heartbeat round).
#    Before starting one, ticks are caught up with the monotonic clock, so a leader that was stopped
#    (SIGSTOP) sees its lease as expired.
# 4. Engine writes are not fsynced on the write path: the WAL is the durable record. The WAL is
#    compacted only behind an engine fdatasync (compact cycle), so replay from a group's compaction
#    point rebuilds everything the engine may have lost. Re-applying entries is harmless: an entry is
#    whole-block writes and trims, so replaying a suffix in order converges to the same state.
#    Off the write path, the engine is fdatasynced on its own thread every `engine_sync_bytes` applied
#    (trickle writeback: no compaction, checkpoint or page-cache limit later meets gigabytes of dirty
#    engine data, which would stall the WAL's fdatasyncs on the same disk).
# 5. An extent belongs to the group in its upper 32 bits (extent_id >> 32 == group id) until the
#    metadata group maps extents to groups (next issue); a write outside the group is refused.
# 6. Limits: batch_bytes_max / batch_writes_max per entry, pending_writes_max per group,
#    peer send buffers (transport), apply_entries_max per Ready (core).
from __future__ import annotations

import asyncio
import errno
import functools
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import structlog

from raftblock._fast import blockcrc
from raftblock.ids import group_of_extent
from raftblock.replication.chain.runtime import ChainGroup, ChainHost
from raftblock.replication.image import ChunkedImage, runs
from raftblock.replication.raft.core import RaftConfig, RaftCore, Ready
from raftblock.replication.raft.storage import bootstrap_snapshot
from raftblock.replication.raft.transport import Connection, Transport
from raftblock.replication.raft.types import (
    NO_NODE,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    GroupId,
    HardState,
    Message,
    MessageType,
    NodeId,
    Role,
    Snapshot,
    SnapshotMeta,
)
from raftblock.replication.requests import (
    NotLeaderError,
    Pending,
    Reply,
    RetryError,
    fail_requests,
    live_batches,
)
from raftblock.replication.sessions import IMAGE_SESSIONS_MARK, Sessions
from raftblock.replication.wal import GroupDurable, Wal, WalStorage
from raftblock.storage.engine import ZERO_BLOCK_CRC, CorruptBlockError, Engine, NoSpaceError
from raftblock.storage.segment import MAX_BLOCK, MAX_WRITE_BLOCKS
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import (  # the client protocol's codes (served here, defined with the wire)
    BLOCK_STATUS_BLOCKS_MAX,
    OP_C_BLOCK_STATUS,
    OP_C_NODE_STATUS,
    OP_C_READ,
    OP_C_REPLICA_READ,
    OP_C_SCRUB_CRCS,
    OP_C_SCRUB_REPAIR,
    OP_C_STATUS,
    OP_C_TRIM,
    OP_C_WRITE,
    ST_BAD_REQUEST,
    ST_CORRUPT,
    ST_NO_SPACE,
    ST_NOT_LEADER,
    ST_OK,
    ST_STALE_EPOCH,
    ST_UNAVAILABLE,
    ST_UNKNOWN_GROUP,
)
from raftblock.wire.framing import Frame, FrameType, encode_frame
from raftblock.wire.ops import BLOCK_SIZE, OP_TRIM, OP_WRITE, BlockOp, decode_batch, encode_batch
from raftblock.wire.raftcodec import (
    HEARTBEAT_TYPES,
    decode_heartbeats,
    decode_raft,
    encode_heartbeats,
    encode_raft,
)

log = structlog.get_logger(__name__)

_MT = MessageType

REPLICA_READ_WAIT_S = 2.0
INSTALL_SLICE_BYTES = 8 << 20  # image bytes written per loop turn by an async snapshot install, at most...
INSTALL_SLICE_S = 0.01  # ...and loop time per turn: a pwrite into a page cache being flushed can take 50 ms
APPLY_RETRY_S = 1.0  # a group whose apply found the disk full tries again this much later
CAUGHT_UP_ENTRIES = 64  # a follower this close to the commit index counts as caught up (raft_report)
BALANCE_EVERY_TICKS = 10  # look for groups to hand to their preferred leader every second (100 ms ticks)
TRANSFER_INTERVAL_TICKS = 50  # per group: one transfer attempt per 5 s at most  # how long a replica waits to reach `min_applied` before answering UNAVAILABLE
_IMG_LEN = struct.Struct("<I")


def check_range(gid: int, req: pb.ClientRequest, limit: int) -> int:
    """A read-side request's extent is in group `gid` and its range is 1..`limit` blocks inside the
    extent; returns the block count, else ValueError (a precise BAD_REQUEST)."""
    if group_of_extent(req.extent_id) != gid:
        raise ValueError(f"extent {req.extent_id:#x} does not belong to group {gid}")
    n = req.count
    if n < 1 or n > limit or req.block + n > MAX_BLOCK:
        raise ValueError("bad block range")
    return int(n)


class RuntimeConfig:
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
        scrub_bytes_per_s: int = 8 << 20,
        scrub_pass_interval_s: float = 3600.0,
        space_reserve_bytes: int = 64 << 20,
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
        # An inline fdatasync blocks the loop: heartbeats and reads of every group wait for it. One slower
        # than wal_sync_inline_max_ms moves the node to the thread for wal_sync_thread_s (then it tries
        # inline again), so a disk with fsync stalls cannot starve heartbeats into elections.
        self.wal_sync_inline_max_ms = wal_sync_inline_max_ms
        self.wal_sync_thread_s = wal_sync_thread_s
        # Snapshot bytes this node sends per second to replicas that are being rebuilt (re-replication,
        # a node that fell behind the log): foreground I/O keeps the rest of the disk and the network.
        # 0 = unbounded.
        self.repair_bytes_per_s = repair_bytes_per_s
        # Background scrub (control/scrub.py): bytes re-read per second (0 = off) and the pause between
        # two passes over every replica this node holds.
        self.scrub_bytes_per_s = scrub_bytes_per_s
        self.scrub_pass_interval_s = scrub_pass_interval_s
        # A leader or head refuses new writes (ENOSPC) while its data disk has less than this free.
        self.space_reserve_bytes = space_reserve_bytes


# Client ops on a volume's blocks: checked at the edge by _io_refusal (group, fences, attach epoch).
_FENCED_OPS = (OP_C_WRITE, OP_C_TRIM, OP_C_READ, OP_C_BLOCK_STATUS)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Group:
    __slots__ = (
        "id",
        "core",
        "storage",
        "rd",
        "wait_pos",
        "hs",
        "pending",
        "pending_bytes",
        "proposals",
        "reads",
        "read_waits",
        "last_role",
        "last_term",
        "preferred",
        "transfer_at_tick",
        "target",
        "repairs",
    )

    def __init__(self, gid: int, core: RaftCore, storage: WalStorage, hs: HardState) -> None:
        self.id = gid
        self.core = core
        self.storage = storage
        self.rd: Ready | None = None
        self.wait_pos = 0
        self.hs = hs
        self.pending: list[Pending] = []
        self.pending_bytes = 0
        self.proposals: dict[int, tuple[int, list[Reply]]] = {}
        self.reads: dict[int, asyncio.Future[int]] = {}  # ctx -> waiting for its ReadState
        self.read_waits: list[tuple[int, asyncio.Future[int]]] = []  # (index, fut): waiting for apply
        self.last_role = Role.FOLLOWER
        self.last_term = 0
        self.preferred = NO_NODE  # the preferred leader (members[0] in the map), 0 = none
        self.transfer_at_tick = 0  # earliest tick for the next transfer attempt
        # The map's membership and epoch for this group; its leader carries a difference out as
        # single-server configuration changes (_reconfigure).
        self.target: tuple[frozenset[NodeId], int] | None = None
        self.repairs: dict[int, float] = {}  # follower -> monotonic time its snapshot stream was first seen


class NodeRuntime:
    def __init__(
        self,
        cfg: RuntimeConfig,
        engine: Engine,
        wal: Wal,
        recovered: dict[int, GroupDurable],
        groups: dict[int, list[int]],
        peers: dict[int, tuple[str, int]],
        seed: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = NodeId(cfg.node_id)
        self.engine = engine
        self.wal = wal
        self.peers = peers
        self.counters: Counter[str] = Counter()
        self.transport = Transport(
            cfg.node_id, peers, self, self.counters, send_buffer_bytes_max=cfg.peer_send_buffer_bytes_max
        )
        self._rng = random.Random(seed if seed is not None else cfg.node_id * 7919 + int(time.time_ns()))
        self.groups: dict[int, _Group] = {}
        # Per group (Raft and chain): the client session table, replicated state (replication/sessions.py).
        self.sessions: dict[int, Sessions] = {}
        self._recovered = recovered  # WAL state of groups the map has not named yet (host_group uses it)
        for gid, members in sorted(groups.items()):
            self._add_group(gid, members, recovered.get(gid))
        self._dirty: set[int] = set()
        self._propose_dirty: set[int] = set()
        # Chain-replicated groups (replication/chain/runtime.py): same loop, WAL, transport and engine.
        self.chains = ChainHost(self)
        self._dirty_chain: set[int] = set()
        self._chain_propose_dirty: set[int] = set()
        self._kicked = False
        self._sync_waiters: list[_Group | ChainGroup] = []
        self._syncing = False
        self._sync_thread_until = 0.0  # monotonic time until which WAL syncs run on the thread (slow disk)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-sync")
        # The engine's fdatasync of a compact cycle (hundreds of MB under streaming writes) runs on its
        # own thread so WAL group commits never queue behind it.
        self._engine_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-sync")
        self._hb_out: dict[int, tuple[list[Message], list[Message]]] = {}
        # Repair bandwidth (cfg.repair_bytes_per_s): a token bucket shared by Raft snapshot chunks and
        # chain image chunks; Raft chunks over budget wait in _snap_held (the core waits for their acks).
        self._repair_burst = max(2 * cfg.snapshot_chunk_bytes, cfg.repair_bytes_per_s // 10)
        self._repair_tokens = float(self._repair_burst)
        self._repair_t = time.monotonic()
        # Keyed by (group, follower, snapshot index, chunk): a chunk the core sends again (a stalled
        # stream restarts from the last acknowledged chunk) while it still waits here is not queued twice.
        self._snap_held: dict[tuple[int, int, int, int], Message] = {}
        self._installing = 0  # snapshot images being installed (async)
        self._blocked: set[int] = set()  # groups whose apply hit a full disk: retried every APPLY_RETRY_S
        self._wal_full = False  # the last WAL flush found the disk full (retried every APPLY_RETRY_S)
        self._space_checked_at = 0.0
        self._space_free = 1 << 62
        self._snap_drain: asyncio.TimerHandle | None = None
        self._ticks_done = 0
        self._t0 = 0.0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._read_ctx = 0
        self._compacting = False
        self._idle_syncing = False  # a WAL sync of compaction points on the executor (_sync_idle)
        # WAL bytes appended since the last compaction cycle started; what recovery found counts as
        # appended, so a node restarted on a large WAL compacts (and frees it) at once.
        self._wal_appended_at_compact = -wal.total_bytes()
        self._applied_bytes = 0  # entry bytes applied to the engine since its last trickle sync
        self._engine_syncing = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None
        self._peer_client: Any = None  # RaftClient to the peers, made on the first read repair
        self.fence_epochs: dict[int, int] = {}  # group -> highest attach epoch seen (see _fence_ok)
        # False until the fences are known (a node under a metadata group: after its first map read), so a
        # restarted node cannot take a write from a gateway that was fenced while it was down.
        self.fences_known = True
        self.port = 0
        self.commits = 0

    def _image_factory(self, gid: int) -> Callable[[SnapshotMeta], ChunkedImage]:
        def make(meta: SnapshotMeta) -> ChunkedImage:
            return self.image_of(gid, meta.app)

        return make

    def image_of(self, gid: int, app: bytes) -> ChunkedImage:
        """Group `gid`'s snapshot image with the session table `app` (replication/image.py): laid out when
        first used, its data read a chunk at a time."""
        return ChunkedImage(self.engine, functools.partial(self._group_extents, gid), app, self._image_made)

    def _image_made(self) -> None:
        self.counters["snapshot_images_made"] += 1

    def recovered_sessions(self, gid: int, rec: GroupDurable | None) -> None:
        """A group's session table as of its durable snapshot point; the replayed log rebuilds the rest."""
        app = rec.snap.app if rec is not None and rec.snap is not None else b""
        self.sessions[gid] = Sessions.decode(app)

    def _add_group(self, gid: int, members: list[int], rec: GroupDurable | None, epoch: int = 1) -> None:
        """Host group `gid`. Without durable state: a founder (the map's first epoch) starts from the
        founding voters, recorded durably in the WAL with the group's first records; a replica added later
        (a joiner) starts with no configuration: it cannot campaign, and learns the configuration and the
        data from the leader (snapshot, then the log)."""
        self.recovered_sessions(gid, rec)
        founding = epoch <= 1
        voters = frozenset(NodeId(m) for m in members) if founding else frozenset()
        boot = bootstrap_snapshot(voters).meta
        storage = WalStorage(self.wal, gid, rec, boot, self._image_factory(gid))
        if rec is None and founding:
            self.wal.compact(gid, boot)
        rc = RaftConfig(
            self.node_id,
            GroupId(gid),
            election_timeout_ticks=self.cfg.election_timeout_ticks,
            heartbeat_interval_ticks=self.cfg.heartbeat_interval_ticks,
            lease_margin_ticks=self.cfg.lease_margin_ticks,
            snapshot_chunk_bytes=self.cfg.snapshot_chunk_bytes,
            # About 2 s without a chunk acknowledged before a stream restarts (rate-limited senders, busy
            # receivers); at most 8 chunks in flight per stream.
            snapshot_stall_heartbeats=max(2, 2000 // (self.cfg.tick_ms * self.cfg.heartbeat_interval_ticks)),
        )
        rng = random.Random(self._rng.getrandbits(64))
        core = RaftCore(rc, storage, rng.randrange)
        hs = rec.hard_state if rec is not None else HardState()
        self.groups[gid] = _Group(gid, core, storage, hs)

    def host_group(self, gid: int, members: list[int], epoch: int = 1) -> bool:
        """Host a replica of group `gid` (the metadata map named this node a member at `epoch`); its
        durable state comes from the WAL if it had any. members[0] is the preferred leader; a leader
        carries the map's membership out (_reconfigure). Returns False when it is hosted already."""
        g = self.groups.get(gid)
        if g is None:
            self._add_group(gid, members, self._recovered.pop(gid, None), epoch)
            g = self.groups[gid]
            log.info("raft.group_hosted", group=gid, members=members, epoch=epoch,
                     joiner=not g.core.conf.voters)
            if self._loop is not None:
                self._dirty.add(gid)
                self._kick()
            new = True
        else:
            new = False
        g.preferred = NodeId(members[0]) if members else NO_NODE
        self.retarget(gid, members, epoch)
        return new

    def retarget(self, gid: int, members: list[int], epoch: int) -> None:
        """The map's membership of a hosted group (also one that no longer names this node: its leader
        must still carry the change out, handing leadership on first)."""
        g = self.groups.get(gid)
        if g is None:
            return
        if g.target is None or epoch >= g.target[1]:
            g.target = (frozenset(NodeId(m) for m in members), epoch)
        self._reconfigure(g)

    def _reconfigure(self, g: _Group) -> None:
        """At the leader: one single-server configuration change (thesis 4.1) toward the map's
        membership, removals first (control/raftrepair.py rule 2). A leader the map removed hands its
        leadership to a member that stays, then that member removes it."""
        core = g.core
        if g.target is None or core.role != Role.LEADER or self.failed is not None:
            return
        members, epoch = g.target
        voters = core.conf.voters
        if voters == members or epoch < core.conf.epoch:
            return
        removes = sorted(voters - members)
        adds = sorted(members - voters)
        if removes:
            node = removes[0]
            if node == self.node_id:
                if self._ticks_done >= g.transfer_at_tick:
                    g.transfer_at_tick = self._ticks_done + TRANSFER_INTERVAL_TICKS
                    to = next((m for m in sorted(members) if m in voters and m in self.transport.conns), None)
                    if to is not None and core.transfer_leadership(to):
                        self.counters["leader_transfers"] += 1
                        self._dirty.add(g.id)
                return
            kind = ConfChangeType.REMOVE_VOTER
        else:
            node, kind = adds[0], ConfChangeType.ADD_VOTER
        if core.propose_conf_change(kind, node, epoch):
            self.counters["conf_changes_proposed"] += 1
            log.info("raft.conf_change", group=g.id, change=kind.name, node=int(node), epoch=epoch,
                     voters=sorted(int(v) for v in voters))
            self._dirty.add(g.id)
            self._kick()

    def add_peer(self, pid: int, host: str, port: int) -> None:
        """A storage node that registered after this one started (rebalancing moves replicas to it)."""
        if pid == self.node_id or pid in self.peers:
            return
        self.peers[pid] = (host, port)
        self.transport.add_peer(pid, host, port)
        if self._peer_client is not None:
            self._peer_client.nodes[pid] = (host, port)

    def raft_report(self) -> dict[int, list[int]]:
        """For the metadata leader's Raft repair (control/raftrepair.py): the groups this node leads,
        [configuration epoch, caught-up mask, voters...]: bit i of the mask says voters[i] (sorted) holds
        the log up to the commit index, give or take CAUGHT_UP_ENTRIES (the leader itself always)."""
        out: dict[int, list[int]] = {}
        for gid, g in self.groups.items():
            core = g.core
            if core.role != Role.LEADER:
                continue
            voters = sorted(int(v) for v in core.conf.voters)
            mask = 0
            for i, v in enumerate(voters):
                pr = core.prs.get(NodeId(v))
                if v == self.node_id or (pr is not None and pr.snap is None
                                         and pr.match + CAUGHT_UP_ENTRIES >= core.commit_index):
                    mask |= 1 << i
            out[gid] = [core.conf.epoch, mask, *voters]
        return out

    def discard_group(self, gid: int, deleted: bool = False) -> bool:
        """This node was replaced in Raft group `gid` (the map has it whole without this node): drop its
        stale replica, hosted or only recovered from the WAL. The WAL first records the group as empty
        (synced), then the engine drops its extents. Returns False when a Ready is still outstanding.
        `deleted`: the group is gone from the map (its volume was deleted): a leader drops its copy too
        (nobody is left to hand over to), and the WAL stops carrying the group (Wal.forget)."""
        g = self.groups.get(gid)
        if g is None and gid not in self._recovered:
            return False
        if (g is not None and (g.rd is not None or (g.core.role == Role.LEADER and not deleted))) \
                or self._syncing or g in self._sync_waiters:
            return False  # a leader hands leadership on first (_reconfigure), then drops its copy
        if g is not None:
            self._fail_group_requests(g, NotLeaderError(NO_NODE))
            del self.groups[gid]
        self._recovered.pop(gid, None)
        self._drop_replica(gid, deleted)
        self._dirty.discard(gid)
        self._propose_dirty.discard(gid)
        self.counters["groups_deleted" if deleted else "replicas_discarded"] += 1
        log.info("raft.group_deleted" if deleted else "raft.replica_discarded", group=gid)
        return True

    def _drop_replica(self, gid: int, deleted: bool) -> None:
        """The WAL records group `gid` empty (synced; forgotten when `deleted`), then the engine drops its
        extents; its WAL segments are released once nothing else pins them."""
        if deleted:
            self.wal.forget(gid)
        else:
            self.wal.install_snapshot(gid, bootstrap_snapshot(frozenset()).meta)
        self.wal.flush()
        self.wal.sync(remove=False)  # rare: once per dropped replica
        for ext in self._group_extents(gid):
            self.engine.drop_extent(ext)
        self.sessions.pop(gid, None)
        self._collect_wal()

    def delete_group(self, gid: int) -> bool:
        """Group `gid` is gone from the map (its volume was deleted): drop this node's replica, Raft or
        chain, hosted or only recovered from the WAL, so it holds neither engine space nor WAL segments.
        Returns False when it must be tried again (a Ready outstanding, a WAL sync running)."""
        if gid in self.groups:
            return self.discard_group(gid, deleted=True)
        if gid in self.chains.groups:
            return self.chains.discard(gid, deleted=True)
        if gid not in self._recovered or self._syncing:
            return False
        del self._recovered[gid]
        self._drop_replica(gid, deleted=True)
        self.counters["groups_deleted"] += 1
        log.info("raft.group_deleted", group=gid, hosted=False)
        return True

    def host_chain_group(self, gid: int, members: list[int], epoch: int) -> bool:
        """Host chain group `gid` and hand it the map's configuration (members head first, epoch)."""
        if gid in self.groups:
            log.error("chain.group_is_raft", group=gid)
            return False
        return self.chains.host(gid, members, epoch)

    def discard_chain_group(self, gid: int) -> bool:
        """Drop this node's stale replica of chain group `gid` (it was replaced there)."""
        return self.chains.discard(gid)

    def grant_chain_lease(self, until_monotonic: float, epochs: dict[int, int]) -> None:
        """The node's chain lease from the metadata leader (chain/runtime.py rule 5), in ticks, for the
        groups' epochs it named."""
        tick = int((until_monotonic - self._t0) * 1000.0 / self.cfg.tick_ms)
        self.chains.grant_lease(tick, epochs)
        self._kick()

    def _fence_ok(self, gid: int, epoch: int) -> bool:
        """Zombie fencing by generation: a request carries the attach epoch of the gateway that sent it;
        the highest epoch seen for a group (from requests or from the metadata map) wins, and anything
        older is refused, so a gateway that lost its attachment can never write again."""
        cur = self.fence_epochs.get(gid, 0)
        if epoch < cur:
            return False
        if epoch > cur:
            self.fence_epochs[gid] = epoch
        return True

    def raise_fence(self, gid: int, epoch: int) -> None:
        if epoch > self.fence_epochs.get(gid, 0):
            self.fence_epochs[gid] = epoch

    def _balance_leaders(self) -> None:
        """Hand leadership to each group's preferred leader when it is connected, at most once per
        `transfer_interval_ticks` per group (no ping-pong while it is down or slow)."""
        for g in self.groups.values():
            core = g.core
            if (core.role != Role.LEADER or not g.preferred or g.preferred == self.node_id
                    or self._ticks_done < g.transfer_at_tick or g.preferred not in self.transport.conns):
                continue
            g.transfer_at_tick = self._ticks_done + TRANSFER_INTERVAL_TICKS
            if core.transfer_leadership(g.preferred):
                self.counters["leader_transfers"] += 1
                self._dirty.add(g.id)

    # == lifecycle ===========================================================================================
    async def start(self, host: str, port: int) -> int:
        self._loop = asyncio.get_running_loop()
        self._t0 = time.monotonic()
        self.port = await self.transport.start(host, port)
        self._dirty.update(self.groups)
        self._kick()
        self._schedule_tick()
        log.info("raft.runtime_started", node=self.node_id, port=self.port, groups=len(self.groups))
        return self.port

    async def stop(self) -> None:
        self._stopping = True  # no new work for the engine-sync thread
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._snap_drain is not None:
            self._snap_drain.cancel()
        await self.transport.stop()
        if self._peer_client is not None:
            await self._peer_client.close()
        for g in self.groups.values():
            self._fail_group_requests(g, NotLeaderError(NO_NODE))
        for cg in self.chains.groups.values():
            self.chains.fail_requests(cg, NotLeaderError(NO_NODE))
        while self._syncing:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        while self._compacting or self._installing:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, self._engine_executor.shutdown)  # pending WAL reaps finish first
        await loop.run_in_executor(self._executor, self._close_storage)
        self._executor.shutdown(wait=True)

    def _close_storage(self) -> None:
        self.wal.close()
        self.engine.close()

    # == scheduling ==========================================================================================
    def _kick(self) -> None:
        if not self._kicked and self._loop is not None:
            self._kicked = True
            self._loop.call_soon(self._process)

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self.cfg.tick_ms / 1000.0, self._on_tick)

    def _on_tick(self) -> None:
        self._catch_up_ticks()
        if self._ticks_done % BALANCE_EVERY_TICKS == 0:
            self._balance_leaders()
            for g in self.groups.values():
                self._reconfigure(g)
            self._maybe_start_compaction()  # also on an idle node (a restart on a large WAL)
            self._sync_idle()
        self._schedule_tick()

    def _sync_idle(self) -> None:
        """Compaction points no Ready waits for (a compaction-only Ready is not synced) are made durable
        within a second on a node with no sync of its own coming, so gc releases the segments they cover
        (an idle node would otherwise keep them until its next write)."""
        wal = self.wal
        if self._syncing or self._sync_waiters or self._idle_syncing or self._stopping \
                or not wal.compactions_pending():
            return
        try:
            wal.flush()
        except OSError:
            return  # a full disk: the loop's own flush retries it (_wal_full)
        self._idle_syncing = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._executor, functools.partial(wal.sync, remove=False))

        def done(f: asyncio.Future[int]) -> None:
            self._idle_syncing = False
            exc = f.exception() if not f.cancelled() else None
            if exc is not None:
                self._fail(exc)  # fsync errors cannot be retried honestly
                return
            self._collect_wal()

        fut.add_done_callback(done)

    def _catch_up_ticks(self) -> None:
        due = int((time.monotonic() - self._t0) * 1000.0 / self.cfg.tick_ms)
        n = min(due - self._ticks_done, self.cfg.catch_up_ticks_max)
        if n <= 0:
            return
        self._ticks_done = due
        for g in self.groups.values():
            core = g.core
            for _ in range(n):
                core.tick()
        self._dirty.update(self.groups)
        if self.chains.groups:
            self.chains.tick(due)
        self._kick()

    def _process(self) -> None:
        self._kicked = False
        if self.failed is not None:
            return
        try:
            for gid in self._propose_dirty:
                self._flush_proposals(self.groups[gid])
            self._propose_dirty.clear()
            if self._chain_propose_dirty:
                for gid in self._chain_propose_dirty:
                    self.chains.flush_proposals(self.chains.groups[gid])
                self._chain_propose_dirty.clear()
            while self._dirty or self._dirty_chain:
                dirty, self._dirty = self._dirty, set()
                for gid in dirty:
                    g = self.groups[gid]
                    if g.rd is None and gid not in self._blocked and g.core.has_ready():
                        self._handle_ready(g)
                if self._dirty_chain:
                    cdirty, self._dirty_chain = self._dirty_chain, set()
                    for gid in cdirty:
                        self.chains.process(gid)
            self._flush_heartbeats()
            if self.chains.pump():
                assert self._loop is not None
                self._loop.call_later(0.002, self._kick)  # more snapshot chunks once the socket drains
            self.transport.flush()
            self._flush_wal()
        except Exception as e:
            self._fail(e)
            return
        if self._sync_waiters and self._sync_inline_now() and not self._syncing:
            self._sync_inline()
            return
        if self._sync_waiters and not self._syncing:
            self._syncing = True
            assert self._loop is not None
            self._loop.create_task(self._sync_loop())

    def _start_engine_sync(self) -> None:
        assert self._loop is not None
        self._engine_syncing = True
        self._applied_bytes = 0
        fut = self._loop.run_in_executor(self._engine_executor, self.engine.sync)
        fut.add_done_callback(self._engine_sync_done)

    def _engine_sync_done(self, fut: asyncio.Future[int]) -> None:
        self._engine_syncing = False
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            self._fail(exc)  # an engine that cannot fdatasync cannot back a compaction either

    def _reap_wal(self) -> None:
        """Remove the WAL segments gc() released, off the loop and off the WAL sync thread (unlinks of
        large files, with online discard, take tens of ms)."""
        try:
            self.wal.reap()
        except OSError as e:
            log.warning("wal.reap_failed", error=repr(e))  # queued again: the next sync retries

    def _fail(self, e: BaseException) -> None:
        log.error("raft.runtime_failed", error=repr(e), exc_info=e)
        self.failed = e
        for g in self.groups.values():
            self._fail_group_requests(g, RetryError(f"node failed: {e!r}"))
        for cg in self.chains.groups.values():
            self.chains.fail_requests(cg, RetryError(f"node failed: {e!r}"))

    def _sync_inline_now(self) -> bool:
        if self.cfg.wal_sync != "inline":
            return False
        return self._sync_thread_until == 0.0 or time.monotonic() >= self._sync_thread_until

    def _sync_inline(self) -> None:
        """One group commit on the loop thread: fdatasync what this turn wrote, then complete the Readies
        it covers. Their messages (a follower's acknowledgements) and applies run in the next turn, with
        whatever arrived meanwhile (that is the batching)."""
        t0 = time.monotonic()
        try:
            synced = self.wal.sync(remove=False)  # unlinks stay on the reaper thread
        except OSError as e:
            self._fail(e)  # fsync errors cannot be retried honestly
            return
        took_ms = (time.monotonic() - t0) * 1000.0
        if took_ms > self.cfg.wal_sync_inline_max_ms:
            self.counters["wal_sync_slow"] += 1
            self._sync_thread_until = time.monotonic() + self.cfg.wal_sync_thread_s
            log.warning("wal.sync_slow", took_ms=round(took_ms, 1), limit_ms=self.cfg.wal_sync_inline_max_ms,
                        thread_for_s=self.cfg.wal_sync_thread_s)
        self._sync_done(synced)

    def _sync_done(self, synced: int) -> None:
        still: list[_Group | ChainGroup] = []
        done: list[_Group | ChainGroup] = []
        for g in self._sync_waiters:
            (done if g.wait_pos <= synced else still).append(g)
        self._sync_waiters = still
        # Acknowledgements first: the messages these Readies held back until persisted leave now, before
        # their committed entries are applied (a follower's ack is on the write's critical path, its
        # apply is not).
        sent = False
        for g in done:
            if isinstance(g, ChainGroup):
                sent = self.chains.synced_messages(g) or sent
                continue
            rd = g.rd
            if rd is not None and rd.messages:
                for m in rd.messages:
                    self._send(m)
                rd.messages = []
                sent = True
        if sent:
            self._flush_heartbeats()
            self.transport.flush()
        for g in done:
            if isinstance(g, ChainGroup):
                self.chains.synced(g)
            else:
                self._finish_ready(g)
        self._collect_wal()
        self._maybe_start_compaction()

    def _collect_wal(self) -> None:
        """Release the WAL segments nothing needs any more (Wal.gc); their files go on the reaper thread."""
        if self.wal.gc() and not self._stopping and self._loop is not None:
            self._loop.run_in_executor(self._engine_executor, self._reap_wal)

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._sync_waiters and self.failed is None:
                self.wal.flush()
                try:
                    synced = await loop.run_in_executor(self._executor, self.wal.sync)
                except OSError as e:
                    self._fail(e)  # fsync errors cannot be retried honestly
                    return
                self._sync_done(synced)
                self._process()
        finally:
            self._syncing = False
        if self._sync_waiters and self.failed is None:
            self._kick()

    # == Ready handling ======================================================================================
    def _handle_ready(self, g: _Group) -> None:
        core = g.core
        rd = core.ready()
        g.rd = rd
        for m in rd.messages_now:
            self._send(m)
        if rd.snapshot is not None:
            self._installing += 1
            assert self._loop is not None
            self._loop.create_task(self._install_then_persist(g, rd))
            return
        self._persist_ready(g, rd, False)

    async def _install_then_persist(self, g: _Group, rd: Ready) -> None:
        """A Ready with a snapshot: install the image (async, the group's Ready stays outstanding, so
        nothing else of this group moves meanwhile), then persist the rest of the Ready as usual."""
        snap = rd.snapshot
        assert snap is not None
        t0 = time.monotonic()
        size = len(snap.data)
        log.info("raft.snapshot_install_started", group=g.id, bytes=size, index=snap.meta.index, leader=int(g.core.lead))
        app = await self.install_image(g.id, snap.data)
        if app is None:
            return
        log.info("raft.snapshot_installed", group=g.id, bytes=size, index=snap.meta.index,
                 took_s=round(time.monotonic() - t0, 2))
        meta = snap.meta
        g.storage.install_snapshot(Snapshot(SnapshotMeta(meta.index, meta.term, meta.conf, app), snap.data))
        self.counters["snapshots_installed"] += 1
        self._persist_ready(g, rd, True)
        self._kick()

    def _persist_ready(self, g: _Group, rd: Ready, must_sync: bool) -> None:
        st = g.storage
        if rd.entries:
            st.append(rd.entries)
            must_sync = True
        hs = rd.hard_state
        if hs is not None:
            st.set_hard_state(hs)
            if hs.term != g.hs.term or hs.vote != g.hs.vote:
                must_sync = True  # etcd's MustSync: a commit index alone may be lost and relearned
            g.hs = hs
        if rd.compaction is not None:
            st.compact(rd.compaction)
        if must_sync:
            g.wait_pos = st.last_pos
            self._sync_waiters.append(g)
        else:
            self._finish_ready(g)

    def _finish_ready(self, g: _Group) -> None:
        rd = g.rd
        assert rd is not None
        core = g.core
        for m in rd.messages:
            self._send(m)
        done = 0
        try:
            for e in rd.committed_entries:
                self._apply(g, e)
                done += 1
        except NoSpaceError as ex:
            # Apply what fitted; the rest comes again in a later Ready, once space returns (the group
            # stays out of _process until APPLY_RETRY_S passed: its log keeps them, durable).
            rd.committed_entries = rd.committed_entries[:done]
            self._block_group(g.id, ex)
        for rs in rd.read_states:
            fut = g.reads.pop(rs.ctx, None)
            if fut is not None:
                g.read_waits.append((rs.index, fut))
        for ctx in rd.reads_aborted:
            fut = g.reads.pop(ctx, None)
            if fut is not None and not fut.done():
                fut.set_exception(NotLeaderError(core.lead))
        core.advance(rd)
        g.rd = None
        if core.role != g.last_role or core.term != g.last_term:
            if g.last_role == Role.LEADER and core.role != Role.LEADER:
                self._fail_group_requests(g, NotLeaderError(core.lead))
            if core.role == Role.LEADER and g.last_role != Role.LEADER:
                log.info("raft.leader", group=g.id, term=core.term)
            g.last_role = core.role
            g.last_term = core.term
        if g.read_waits:
            applied = core.applied_index
            keep: list[tuple[int, asyncio.Future[int]]] = []
            for idx, fut in g.read_waits:
                if idx <= applied:
                    if not fut.done():
                        fut.set_result(idx)
                else:
                    keep.append((idx, fut))
            g.read_waits = keep
        self._dirty.add(g.id)
        self._kick()

    def _apply_data(self, gid: int, index: int, data: bytes) -> None:
        """Apply one committed entry (Raft) or record (chain): a batch of whole-block writes and trims.
        A named op that its session table has seen (a retry whose first attempt committed too) or that
        its gateway has given up on is skipped, the same way on every replica (sessions.py)."""
        sessions = self.sessions[gid]
        admitted: list[tuple[int, int]] = []
        try:
            writes: list[tuple[int, int, bytes | bytearray | memoryview, Sequence[int]]] = []
            for op in decode_batch(data):
                if op.client:
                    if not sessions.admit(op.client, op.wid, op.low, index):
                        self.counters["writes_deduplicated"] += 1
                        continue
                    admitted.append((op.client, op.wid))
                if op.kind == OP_WRITE:
                    writes.append((op.extent_id, op.block, op.data, op.crcs))
                    continue
                if writes:
                    self.engine.write_many(writes)  # one pwrite for the run of writes
                    writes = []
                self.engine.trim(op.extent_id, op.block, op.count)
            if writes:
                self.engine.write_many(writes)
        except NoSpaceError:
            # The disk is full: this entry is applied again once space returns (its ops are whole-block
            # writes; the ids it admitted are forgotten so they are admitted again then).
            for client, wid in admitted:
                sessions.forget(client, wid)
            raise
        except (CorruptBlockError, ValueError) as ex:
            # A replica that cannot apply a committed entry must not pretend it did: the node stops
            # serving (runtime failed) and is repaired from its peers.
            self.counters["apply_errors"] += 1
            log.error("raft.apply_failed", group=gid, index=index, error=repr(ex))
            raise
        self.commits += 1
        self._applied_bytes += len(data)
        if self._applied_bytes >= self.cfg.engine_sync_bytes and not self._engine_syncing and not self._stopping:
            self._start_engine_sync()

    def _apply(self, g: _Group, e: Entry) -> None:
        if e.type == EntryType.NORMAL and e.data:
            self._apply_data(g.id, e.index, e.data)
        p = g.proposals.pop(e.index, None)
        if p is not None:
            term, futs = p
            for fut in futs:
                if fut.done():
                    continue
                if term == e.term:
                    fut.set_result(e.index)
                else:
                    fut.set_exception(NotLeaderError(g.core.lead))

    def _fail_group_requests(self, g: _Group, exc: Exception) -> None:
        fail_requests([replies for _, replies in g.proposals.values()], g.pending, g.reads.values(), exc)
        g.proposals.clear()
        g.pending = []
        g.pending_bytes = 0
        g.reads.clear()
        for _, fut in g.read_waits:
            if not fut.done():
                fut.set_exception(exc)
        g.read_waits = []

    # == messages ============================================================================================
    def repair_allow(self, nbytes: int) -> bool:
        """Take `nbytes` of repair bandwidth; False when the budget is spent (send later)."""
        rate = self.cfg.repair_bytes_per_s
        if rate > 0:
            now = time.monotonic()
            self._repair_tokens = min(self._repair_burst, self._repair_tokens + (now - self._repair_t) * rate)
            self._repair_t = now
            if self._repair_tokens < 0:
                return False
            self._repair_tokens -= nbytes
        self.counters["repair_bytes_sent"] += nbytes
        return True

    def _drain_snap_held(self) -> None:
        self._snap_drain = None
        held = self._snap_held
        while held:
            key = next(iter(held))
            m = held[key]
            if self._snap_chunk_stale(m):
                del held[key]
                self.counters["repair_chunks_dropped_stale"] += 1
                continue
            if not self.repair_allow(len(m.data)):
                break
            del held[key]
            self.transport.send(m.dst, encode_raft(m))
        if held and self._loop is not None and not self._stopping:
            self._snap_drain = self._loop.call_later(0.02, self._drain_snap_held)

    def _snap_chunk_stale(self, m: Message) -> bool:
        """The follower already holds this chunk, or the leader no longer streams this snapshot to it."""
        g = self.groups.get(int(m.group))
        pr = g.core.prs.get(m.dst) if g is not None and g.core.role == Role.LEADER else None
        if pr is None or pr.snap is None or m.snap_meta is None or pr.snap.meta.index != m.snap_meta.index:
            return True
        return m.chunk_index < pr.snap_acked

    def _send(self, m: Message) -> None:
        if m.type == _MT.SNAP:
            g = self.groups.get(int(m.group))
            if g is not None and int(m.dst) not in g.repairs:
                g.repairs[int(m.dst)] = time.monotonic()
                # The audit trail of a rebuild: its start here, its end and size where it is installed.
                log.info("raft.snapshot_send_started", group=int(m.group), to=int(m.dst), chunks=m.chunk_total,
                         index=m.snap_meta.index if m.snap_meta is not None else 0)
            if self._snap_held or not self.repair_allow(len(m.data)):
                meta = m.snap_meta
                key = (int(m.group), int(m.dst), meta.index if meta is not None else 0, m.chunk_index)
                if key in self._snap_held:
                    self.counters["repair_chunks_resend_merged"] += 1
                self._snap_held[key] = m
                if self._snap_drain is None and self._loop is not None:
                    self._snap_drain = self._loop.call_later(0.02, self._drain_snap_held)
                return
        if m.type in HEARTBEAT_TYPES:
            pair = self._hb_out.get(m.dst)
            if pair is None:
                pair = self._hb_out[m.dst] = ([], [])
            pair[1 if m.type == _MT.HEARTBEAT_RESP else 0].append(m)
            return
        self.transport.send(m.dst, encode_raft(m))

    def _flush_heartbeats(self) -> None:
        if not self._hb_out:
            return
        for dst, (hbs, resps) in self._hb_out.items():
            if hbs:
                self.transport.send(dst, encode_heartbeats(self.node_id, NodeId(dst), hbs, False))
            if resps:
                self.transport.send(dst, encode_heartbeats(self.node_id, NodeId(dst), resps, True))
        self._hb_out = {}

    def on_peer_up(self, peer_id: int) -> None:
        pass

    def on_peer_frame(self, peer_id: int, frame: Frame) -> None:
        if frame.type == FrameType.RAFT:
            self._step(decode_raft(frame.group, frame.message, frame.payload))
        elif frame.type == FrameType.HEARTBEATS:
            for m in decode_heartbeats(frame.message):
                self._step(m)
        elif frame.type == FrameType.CHAIN:
            self.chains.on_frame(frame.group, frame.message, frame.payload)
        elif frame.type in (FrameType.CLIENT_REQ,):
            self.counters["frames_malformed"] += 1
        else:
            self.counters["frames_malformed"] += 1
            return
        self._kick()

    def _step(self, m: Message) -> None:
        g = self.groups.get(m.group)
        if g is None:
            self.counters["raft_unknown_group"] += 1
            return
        if m.dst != self.node_id:
            self.counters["raft_wrong_destination"] += 1
            return
        if m.term < g.core.term:
            self.counters["raft_stale_term"] += 1
        g.core.step(m)
        self._dirty.add(g.id)

    # == client requests ======================================================================================
    def on_client_frame(self, conn: Connection, frame: Frame) -> None:
        if frame.type != FrameType.CLIENT_REQ:
            self.counters["frames_malformed"] += 1
            return
        req = pb.ClientRequest.FromString(frame.message)
        gid = frame.group
        if req.op in _FENCED_OPS:
            refused = self._io_refusal(gid, req)
            if refused is not None:
                self._answer(conn, gid, req.request_id, refused)
                return
            if gid in self.chains.groups:
                self._chain_client(conn, gid, req, frame.payload)
                return
            if req.op in (OP_C_WRITE, OP_C_TRIM):
                self._write_fast(conn, gid, req, frame.payload)
                return
            if req.op == OP_C_READ and self._read_fast(conn, gid, req):
                return
        assert self._loop is not None
        self._loop.create_task(self._serve_client(conn, gid, req, frame.payload))

    def _io_refusal(self, gid: int, req: pb.ClientRequest) -> _Refused | None:
        """The edge checks of a client's block I/O (write, trim, read, block status), in one place: the
        group is hosted here, the node knows the fences, the request's attach epoch is current."""
        if gid not in self.groups and gid not in self.chains.groups:
            self.counters["client_unknown_group"] += 1
            return _Refused(ST_UNKNOWN_GROUP, f"group {gid} is not hosted here")
        if not self.fences_known:
            return _Refused(ST_UNAVAILABLE, "node starting: waiting for the metadata map")
        if not self._fence_ok(gid, req.epoch):
            self.counters["stale_epoch_refused"] += 1
            return _Refused(ST_STALE_EPOCH, f"attach epoch {req.epoch} is older than "
                            f"{self.fence_epochs.get(gid, 0)}: another gateway attached this volume")
        return None

    def _answer(self, conn: Connection, gid: int, request_id: int, exc: BaseException | None) -> None:
        """A reply without data: OK, or the status `exc` maps to."""
        resp = pb.ClientResponse(request_id=request_id, node_id=self.node_id)
        if exc is not None:
            self._error_response(resp, exc)
        conn.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString()))

    def _chain_client(self, conn: Connection, gid: int, req: pb.ClientRequest, payload: bytes | memoryview) -> None:
        """Block I/O on a chain group (the edge checks have passed): writes and trims at the head, reads and
        block status at the tail (docs/chain.md); a member that is not the one asked for answers
        NOT_LEADER with the right node as hint."""
        ch = self.chains
        g = ch.groups[gid]
        if req.op in (OP_C_WRITE, OP_C_TRIM):
            reply = Reply(self, conn, gid, req.request_id)
            try:
                op = self._validate_write(gid, req, payload)
                ch.check_head(g)
                self.check_space()
                self._add_pending(g, op, reply, self._chain_propose_dirty)
            except Exception as e:  # every refusal becomes a precise status (_error_response)
                reply.set_exception(e)
            return
        if req.op == OP_C_READ and self._read_now(conn, gid, req, g.core.read_now, "chain_reads_fast"):
            return
        assert self._loop is not None
        self._loop.create_task(self._chain_serve(conn, gid, req))

    async def _chain_serve(self, conn: Connection, gid: int, req: pb.ClientRequest) -> None:
        resp = pb.ClientResponse(request_id=req.request_id, node_id=self.node_id)
        out_payload: list[bytes | bytearray | memoryview] = []
        ch = self.chains
        try:
            g = ch.groups[gid]
            if self.failed is not None:
                raise RetryError(f"node failed: {self.failed!r}")
            n = check_range(gid, req, BLOCK_STATUS_BLOCKS_MAX if req.op == OP_C_BLOCK_STATUS else MAX_WRITE_BLOCKS)
            await ch.read_barrier(g)
            if req.op == OP_C_READ:
                try:
                    data, crcs = self.engine.read(req.extent_id, req.block, n)
                except CorruptBlockError as e:
                    self.counters["corrupt_reads"] += 1
                    log.error("chain.corrupt_read", group=gid, extent_id=req.extent_id, block=e.block, reason=e.reason)
                    others = [m for m in reversed(g.members) if m != self.node_id]  # nearest predecessor first
                    data, crcs = await self._read_repair(gid, others, req.extent_id, req.block, n, g.core.applied_seq)
                resp.crcs.extend(crcs)
                out_payload.append(data)
            else:
                for count, allocated in self.engine.block_status(req.extent_id, req.block, n):
                    resp.runs.extend((count, int(allocated)))
        except (NotLeaderError, RetryError, CorruptBlockError, NoSpaceError, ValueError) as e:
            self._error_response(resp, e)
        conn.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), out_payload))

    def _read_fast(self, conn: Connection, gid: int, req: pb.ClientRequest) -> bool:
        """A read served at once under the leader's lease when everything up to the commit index is
        applied: no task, no future, no Ready. Anything else (no lease, apply behind, a bad range, a bad
        block) returns False and takes the general path, which answers it precisely. The edge checks
        (_io_refusal) have passed."""
        core = self.groups[gid].core

        def readable() -> bool:
            idx = core.lease_read_now()
            return idx >= 0 and core.applied_index >= idx

        return self._read_now(conn, gid, req, readable, "reads_lease_fast")

    def _read_now(self, conn: Connection, gid: int, req: pb.ClientRequest, readable: Callable[[], bool],
                  counter: str) -> bool:
        """Answer a read from the engine in this callback if `readable()` (checked after the ticks caught
        up: a member that was stopped sees its lease expire first) and the range and block are good;
        False sends it down the general path, which answers it precisely."""
        if self.failed is not None:
            return False
        n = req.count
        if group_of_extent(req.extent_id) != gid or n < 1 or n > MAX_WRITE_BLOCKS or req.block + n > MAX_BLOCK:
            return False
        self._catch_up_ticks()
        if not readable():
            return False
        try:
            data, crcs = self.engine.read(req.extent_id, req.block, n)
        except CorruptBlockError:
            return False  # the general path reads again, logs, and repairs from a replica
        resp = pb.ClientResponse(request_id=req.request_id, node_id=self.node_id)
        resp.crcs.extend(crcs)
        conn.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), [data]))
        self.counters[counter] += 1
        return True

    def _write_fast(self, conn: Connection, gid: int, req: pb.ClientRequest, payload: bytes | memoryview) -> None:
        """A write or trim without a task (the edge checks, _io_refusal, have passed); the reply leaves
        from Reply when the entry applies."""
        reply = Reply(self, conn, gid, req.request_id)
        try:
            grp = self.groups[gid]
            self._enqueue(grp, self._validate_write(gid, req, payload), reply)
        except Exception as e:  # every refusal becomes a precise status (_error_response)
            reply.set_exception(e)

    async def _serve_client(self, conn: Connection, gid: int, req: pb.ClientRequest, payload: bytes | memoryview) -> None:
        resp = pb.ClientResponse(request_id=req.request_id, node_id=self.node_id)
        out_payload: list[bytes | bytearray | memoryview] = []
        try:
            if req.op == OP_C_NODE_STATUS:
                self._catch_up_ticks()
                by_group = self._allocated_bytes_by_group()  # one pass over the index, not one per group
                for g in self.groups.values():
                    resp.groups.append(self._group_info(g, by_group.get(g.id, 0)))
                for cg in self.chains.groups.values():
                    resp.groups.append(self._chain_info(cg, by_group.get(cg.id, 0)))
                for k, v in self.counters.items():
                    resp.counters[k] = v
                for k, v in self.wal.stats().items():
                    resp.counters[k] = v
                resp.counters["commits"] = self.commits
                for k, v in self.chains.counters().items():
                    resp.counters[k] = v
                for k, v in self.engine.stats().items():
                    resp.counters[f"engine_{k}"] = int(v)
                resp.counters["peers_connected"] = len(self.transport.conns)
            elif gid in self.chains.groups and req.op == OP_C_STATUS:
                cg = self.chains.groups[gid]
                resp.groups.append(self._chain_info(cg, self._allocated_bytes_by_group().get(gid, 0)))
            elif req.op in (OP_C_SCRUB_CRCS, OP_C_SCRUB_REPAIR) and (view := self.scrub_view(gid)) is not None:
                applied_fn = view[0]
                if req.op == OP_C_SCRUB_CRCS:
                    n = check_range(gid, req, MAX_WRITE_BLOCKS)
                    await self._wait_applied(applied_fn, req.min_applied)
                    _, crcs = self.engine.read(req.extent_id, req.block, n)
                    resp.crcs.extend(crcs)
                    resp.applied = applied_fn()
                else:
                    n = check_range(gid, req, MAX_WRITE_BLOCKS)
                    why = self._repair_refusal(gid, int(req.source_node))
                    if why is not None:
                        self.counters["scrub_repairs_refused"] += 1
                        raise RetryError(f"scrub repair refused: {why}")
                    fixed = await self.repair_from(gid, int(req.source_node), req.extent_id, req.block, n, applied_fn)
                    resp.runs.append(fixed)
            elif gid in self.chains.groups and req.op == OP_C_REPLICA_READ:
                cg = self.chains.groups[gid]
                data, crcs = await self._replica_read(gid, lambda: cg.core.applied_seq, req)
                resp.crcs.extend(crcs)
                out_payload.append(data)
            else:
                grp = self.groups.get(gid)
                if grp is None:
                    self.counters["client_unknown_group"] += 1
                    resp.status = ST_UNKNOWN_GROUP
                    resp.error = f"group {gid} is not hosted here"
                elif req.op == OP_C_STATUS:
                    resp.groups.append(self._group_info(grp, self._allocated_bytes_by_group().get(gid, 0)))
                elif req.op == OP_C_READ:
                    data, crcs = await self._read(grp, req)
                    resp.crcs.extend(crcs)
                    out_payload.append(data)
                elif req.op == OP_C_BLOCK_STATUS:
                    for count, allocated in await self._block_status(grp, req):
                        resp.runs.extend((count, int(allocated)))
                elif req.op == OP_C_REPLICA_READ:
                    core = grp.core
                    data, crcs = await self._replica_read(gid, lambda: core.applied_index, req)
                    resp.crcs.extend(crcs)
                    out_payload.append(data)
                else:
                    resp.status = ST_BAD_REQUEST
                    resp.error = f"unknown op {req.op}"
        except (NotLeaderError, RetryError, CorruptBlockError, NoSpaceError, ValueError) as e:
            self._error_response(resp, e)
        conn.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), out_payload))

    def _error_response(self, resp: pb.ClientResponse, e: BaseException) -> None:
        """The status a client sees for a refused or failed request."""
        if isinstance(e, _Refused):
            resp.status = e.status
            resp.error = e.message
        elif isinstance(e, NotLeaderError):
            resp.status = ST_NOT_LEADER
            lead = e.leader
            resp.leader_hint = lead
            if lead in self.peers:
                h, p = self.peers[lead]
                resp.leader_address = f"{h}:{p}"
        elif isinstance(e, RetryError):
            resp.status = ST_UNAVAILABLE
            resp.error = str(e)
        elif isinstance(e, CorruptBlockError):
            resp.status = ST_CORRUPT
            resp.error = str(e)
        elif isinstance(e, NoSpaceError):
            resp.status = ST_NO_SPACE
            resp.error = str(e)
        elif isinstance(e, ValueError):
            resp.status = ST_BAD_REQUEST
            resp.error = str(e)
        else:
            resp.status = ST_UNAVAILABLE
            resp.error = f"internal error: {e!r}"
            log.error("raft.client_request_failed", error=repr(e), exc_info=e)

    def _allocated_bytes_by_group(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e, blocks in self.engine.index.extents.items():
            gid = group_of_extent(e)
            out[gid] = out.get(gid, 0) + len(blocks) * BLOCK_SIZE
        return out

    def _chain_info(self, g: ChainGroup, allocated_bytes: int) -> pb.GroupInfo:
        i = self.chains.info(g)
        info = pb.GroupInfo(group=g.id, mode="chain", allocated_bytes=allocated_bytes, **i)  # type: ignore[arg-type]
        for k, v in self.chains.repair_info(g.id).items():
            setattr(info, k, v)
        return info

    def _repair_info(self, g: _Group) -> dict[str, int]:
        """The first follower this leader is sending a snapshot to: GroupInfo.repair_* fields."""
        c = g.core
        if c.role != Role.LEADER:
            g.repairs.clear()
            return {}
        streams = {v: pr for v, pr in c.prs.items() if pr.snap is not None and v != self.node_id}
        for v in list(g.repairs):
            if v not in streams:
                del g.repairs[v]
        for v, pr in sorted(streams.items()):
            snap = pr.snap
            assert snap is not None
            if pr.snap_sent == 0:
                continue  # not started: the image is built at the first chunk
            total = len(snap.data)
            started = g.repairs.get(int(v), time.monotonic())
            return {"repair_node": int(v),
                    "repair_bytes_done": min(total, pr.snap_acked * self.cfg.snapshot_chunk_bytes),
                    "repair_bytes_total": total,
                    "repair_elapsed_ms": int((time.monotonic() - started) * 1000)}
        return {}

    def _group_info(self, g: _Group, allocated_bytes: int) -> pb.GroupInfo:
        c = g.core
        return pb.GroupInfo(
            **self._repair_info(g),  # type: ignore[arg-type]
            group=g.id,
            mode="raft",
            role=int(c.role),
            term=c.term,
            leader=c.lead,
            commit=c.commit_index,
            applied=c.applied_index,
            last_index=c.last_index(),
            snap_index=c.log.snap_index,
            lease=c.lease_valid(),
            allocated_bytes=allocated_bytes,
        )

    def _validate_write(self, gid: int, req: pb.ClientRequest, payload: bytes | memoryview) -> BlockOp:
        """The node's edge check (the gateway checks again at its own edge)."""
        if group_of_extent(req.extent_id) != gid:
            raise ValueError(f"extent {req.extent_id:#x} does not belong to group {gid}")
        n = req.count
        if n < 1 or req.block + n > MAX_BLOCK:
            raise ValueError("block range out of bounds")
        if req.client_id and req.low_water > req.write_id:
            raise ValueError("low_water above the write's own id")
        if req.op == OP_C_TRIM:
            if payload:
                raise ValueError("trim carries no payload")
            return BlockOp(OP_TRIM, req.extent_id, req.block, n, (), b"", req.client_id, req.write_id, req.low_water)
        if n > MAX_WRITE_BLOCKS:
            raise ValueError(f"a write covers at most {MAX_WRITE_BLOCKS} blocks")
        if len(payload) != n * BLOCK_SIZE or len(req.crcs) != n:
            raise ValueError("payload / crcs do not match count")
        crcs = list(req.crcs)
        bad = blockcrc.first_mismatch(payload, crcs)
        if bad >= 0:
            raise CorruptBlockError(req.extent_id, req.block + bad, "checksum mismatch on arrival")
        return BlockOp(OP_WRITE, req.extent_id, req.block, n, crcs, payload, req.client_id, req.write_id, req.low_water)

    def _flush_wal(self) -> None:
        """wal.flush, except that a full disk is not a failure: the records stay buffered (nothing that
        depends on them leaves the node: acknowledgements wait for their sync), and the flush is tried
        again every APPLY_RETRY_S until space returns (counter wal_no_space)."""
        try:
            self.wal.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self.counters["wal_no_space"] += 1
            if not self._wal_full:
                self._wal_full = True
                log.warning("wal.no_space", error=str(e), retry_s=APPLY_RETRY_S)
                assert self._loop is not None
                self._loop.call_later(APPLY_RETRY_S, self._retry_wal)
            return
        if self._wal_full:
            self._wal_full = False
            log.info("wal.space_back")

    def _retry_wal(self) -> None:
        if self._wal_full and not self._stopping:
            self._wal_full = False  # _process flushes again; a new failure sets it and schedules the next try
            self._kick()

    def _block_group(self, gid: int, ex: BaseException) -> None:
        if gid not in self._blocked:
            self._blocked.add(gid)
            self.counters["apply_blocked_no_space"] += 1
            log.warning("raft.apply_blocked", group=gid, error=str(ex), retry_s=APPLY_RETRY_S)
            assert self._loop is not None
            self._loop.call_later(APPLY_RETRY_S, self._unblock_group, gid)

    def _unblock_group(self, gid: int) -> None:
        self._blocked.discard(gid)
        if gid in self.groups:
            self._dirty.add(gid)
        elif gid in self.chains.groups:
            self._dirty_chain.add(gid)
        self._kick()

    def check_space(self) -> None:
        """Admission at the leader or head: NoSpaceError (ENOSPC at the NBD level) while the data disk
        has less than `space_reserve_bytes` free, so a full disk refuses new writes instead of failing
        them after they were committed (statvfs, looked at most every 0.2 s)."""
        now = time.monotonic()
        if now - self._space_checked_at > 0.2:
            self._space_checked_at = now
            try:
                st = os.statvfs(self.engine.directory)
                self._space_free = st.f_bavail * st.f_frsize
            except OSError:
                self._space_free = 1 << 62
        if self._space_free < self.cfg.space_reserve_bytes:
            self.counters["writes_refused_no_space"] += 1
            raise NoSpaceError(f"node {self.node_id}: {self._space_free} bytes free on its data disk, "
                               f"below the reserve of {self.cfg.space_reserve_bytes}")

    def _check_leader(self, g: _Group) -> None:
        if self.failed is not None:
            raise RetryError(f"node failed: {self.failed!r}")
        if g.core.role != Role.LEADER:
            raise NotLeaderError(g.core.lead)

    def _enqueue(self, g: _Group, op: BlockOp, fut: Reply) -> None:
        self._check_leader(g)
        self.check_space()
        self._add_pending(g, op, fut, self._propose_dirty)

    def _add_pending(self, g: _Group | ChainGroup, op: BlockOp, fut: Reply, dirty: set[int]) -> None:
        """Queue a write for this loop turn's batch (flushed by _process); RetryError when the group has
        `pending_writes_max` in flight."""
        if len(g.pending) + len(g.proposals) >= self.cfg.pending_writes_max:
            self.counters["client_overloaded"] += 1
            raise RetryError("too many writes in flight for this group")
        g.pending.append(Pending(op, fut))
        g.pending_bytes += op.encoded_size()
        dirty.add(g.id)
        self._kick()

    def _flush_proposals(self, g: _Group) -> None:
        """Leader batching: the writes that arrived in this loop turn become as few entries as the
        bounds allow (batch_bytes_max, batch_writes_max)."""
        pending, g.pending = g.pending, []
        g.pending_bytes = 0
        core = g.core
        for live in live_batches(pending, self.cfg.batch_writes_max, self.cfg.batch_bytes_max):
            index = core.propose(encode_batch([p.op for p in live]))
            if index == 0:
                exc: Exception = (
                    NotLeaderError(core.lead) if core.role != Role.LEADER else RetryError("proposal refused")
                )
                for p in live:
                    p.fut.set_exception(exc)
                continue
            g.proposals[index] = (core.term, [p.fut for p in live])
            self.counters["entries_proposed"] += 1
        self._dirty.add(g.id)

    async def _read(self, g: _Group, req: pb.ClientRequest) -> tuple[bytearray, list[int]]:
        n = check_range(g.id, req, MAX_WRITE_BLOCKS)
        applied = await self._read_barrier(g)
        try:
            return self.engine.read(req.extent_id, req.block, n)
        except CorruptBlockError as e:
            self.counters["corrupt_reads"] += 1
            log.error("raft.corrupt_read", group=g.id, extent_id=req.extent_id, block=e.block, reason=e.reason)
            others = sorted(int(p) for p in self.group_conf(g.id).voters if p != self.node_id)
            return await self._read_repair(g.id, others, req.extent_id, req.block, n, applied)

    async def _block_status(self, g: _Group, req: pb.ClientRequest) -> list[tuple[int, bool]]:
        """Which blocks are allocated, as of a linearizable point (same barrier as a read)."""
        n = check_range(g.id, req, BLOCK_STATUS_BLOCKS_MAX)
        await self._read_barrier(g)
        return self.engine.block_status(req.extent_id, req.block, n)

    async def _read_barrier(self, g: _Group) -> int:
        """Wait until this leader may serve a linearizable read (lease, else read-index) and has applied
        up to the read index; returns the applied index."""
        self._catch_up_ticks()  # a leader that was stopped must see its lease expire first
        self._check_leader(g)
        self._read_ctx += 1
        ctx = self._read_ctx
        if not g.core.read_index(ctx, lease=True):
            if g.core.role != Role.LEADER:
                raise NotLeaderError(g.core.lead)
            raise RetryError("leader has not committed an entry of its term yet")
        assert self._loop is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        g.reads[ctx] = fut
        self._dirty.add(g.id)
        self._kick()
        await fut
        return g.core.applied_index

    async def _replica_read(self, gid: int, applied: Callable[[], int], req: pb.ClientRequest) -> tuple[bytearray, list[int]]:
        """A peer asks for blocks it found corrupt: served by any member once it has applied at least
        `min_applied` (so the answer is no older than what the asking member would have returned; a chain
        predecessor applies a record when the tail's acknowledgement comes back, so it may wait briefly).
        `applied`: the group's applied index (Raft) or seq (chain)."""
        n = check_range(gid, req, MAX_WRITE_BLOCKS)
        await self._wait_applied(applied, req.min_applied)
        self.counters["replica_reads_served"] += 1
        return self.engine.read(req.extent_id, req.block, n)

    async def _wait_applied(self, applied: Callable[[], int], min_applied: int) -> None:
        deadline = time.monotonic() + REPLICA_READ_WAIT_S
        while applied() < min_applied:
            if time.monotonic() > deadline:
                raise RetryError(f"replica applied {applied()} < {min_applied}")
            await asyncio.sleep(self.cfg.tick_ms / 1000)

    def scrub_view(self, gid: int) -> tuple[Callable[[], int], list[int], bool] | None:
        """For the scrub: (the group's applied index/seq, the other members, whether this member compares
        the replicas: a Raft leader holding its lease, so not a deposed one, or the chain's head);
        None when the group is not hosted here."""
        g = self.groups.get(gid)
        if g is not None:
            core = g.core
            others = sorted(int(v) for v in core.conf.voters if v != self.node_id)
            return (lambda: core.applied_index), others, core.role == Role.LEADER and core.lease_valid()
        cg = self.chains.groups.get(gid)
        if cg is not None:
            cc = cg.core
            others = [m for m in cg.members if m != self.node_id]
            return (lambda: cc.applied_seq), others, cc.is_head
        return None

    def _repair_refusal(self, gid: int, source: int) -> str | None:
        """Why this replica must not copy a range from `source` now (SCRUB_REPAIR), or None. Only a Raft
        follower of that very leader does: its copy may then hold data newer than its applied index,
        which it re-applies (each block goes back to older values on the way) before it can serve a read
        (a new leader applies up to its commit first). A member that serves reads (a leader, a chain's
        tail) must never go back in time, and a deposed leader's word is no order."""
        g = self.groups.get(gid)
        if g is None:
            return "chain groups: replica comparison does not repair (docs/replication.md, Scrub)"
        if g.core.role != Role.FOLLOWER or int(g.core.lead) != source:
            return f"not a follower of node {source} (role {g.core.role.name}, leader {int(g.core.lead)})"
        return None

    def _peer(self) -> Any:
        from raftblock.replication.raft.group import RaftClient  # the node is a client of its peers here

        if self._peer_client is None:
            self._peer_client = RaftClient(self.peers, attempt_timeout_s=REPLICA_READ_WAIT_S + 1)
        return self._peer_client

    async def repair_from(self, gid: int, source: int, extent_id: int, block: int, n: int,
                          applied: Callable[[], int]) -> int:
        """The scrub found this replica's range different from `source`'s (its leader): copy the blocks that
        differ (or are corrupt here) from it, as of a point at least as new as what this replica has
        applied. Newer data than that is safe on a follower only (_repair_refusal): its log applies the
        same writes again before it can serve a read. Returns the number of blocks rewritten."""
        req = pb.ClientRequest(op=OP_C_REPLICA_READ, extent_id=extent_id, block=block, count=n, min_applied=applied())
        resp, data = await self._peer().call_node(source, gid, req)
        crcs = list(resp.crcs)
        if resp.status != ST_OK or len(data) != n * BLOCK_SIZE or blockcrc.first_mismatch(data, crcs) >= 0:
            raise RetryError(f"node {source}: status {resp.status} {resp.error}")
        fixed = 0
        for i in range(n):
            try:
                _, mine = self.engine.read(extent_id, block + i, 1)
                if mine[0] == crcs[i]:
                    continue
            except CorruptBlockError:
                pass
            if crcs[i] == ZERO_BLOCK_CRC:
                self.engine.trim(extent_id, block + i, 1)  # zeros there (trimmed, or never written)
            else:
                self.engine.write(extent_id, block + i, memoryview(data)[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE],
                                  [crcs[i]])
            fixed += 1
        self.counters["scrub_blocks_rewritten"] += fixed
        log.warning("scrub.replica_repaired", group=gid, extent_id=extent_id, block=block, count=n,
                    blocks_rewritten=fixed, source=source)
        return fixed

    async def _read_repair(self, gid: int, others: list[int], extent_id: int, block: int, n: int,
                           applied: int) -> tuple[bytearray, list[int]]:
        """Serve a read whose local copy failed its CRC from another member (`others`, in the order to ask),
        then rewrite the bad blocks locally (only those still bad: a block overwritten meanwhile keeps its
        newer value). A member answers once it has applied `applied` (Raft index, chain seq)."""
        req = pb.ClientRequest(op=OP_C_REPLICA_READ, extent_id=extent_id, block=block, count=n, min_applied=applied)
        last = "no other member"
        for peer in others:
            try:
                resp, data = await self._peer().call_node(peer, gid, req)
            except (OSError, ConnectionError, TimeoutError) as e:
                last = f"node {peer}: {e!r}"
                continue
            crcs = list(resp.crcs)
            if resp.status != ST_OK or len(data) != n * BLOCK_SIZE or blockcrc.first_mismatch(data, crcs) >= 0:
                last = f"node {peer}: status {resp.status} {resp.error}"
                continue
            repaired = 0
            for i in range(n):
                try:
                    self.engine.read(extent_id, block + i, 1)
                except CorruptBlockError:
                    chunk = memoryview(data)[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
                    self.engine.write(extent_id, block + i, chunk, [crcs[i]])
                    repaired += 1
            self.counters["read_repairs"] += 1
            self.counters["blocks_repaired"] += repaired
            log.warning("raft.read_repaired", group=gid, extent_id=extent_id, block=block, count=n,
                        blocks_repaired=repaired, source=peer)
            return bytearray(data), crcs
        self.counters["read_repair_failed"] += 1
        raise CorruptBlockError(extent_id, block, f"local copy corrupt and no healthy replica answered ({last})")

    # == snapshots and compaction =============================================================================
    def _group_extents(self, gid: int) -> list[int]:
        return sorted(e for e in self.engine.index.extents if group_of_extent(e) == gid)

    async def install_image(self, gid: int, data: Any) -> bytes | None:
        """Install a received snapshot image (Raft and chain) for a Ready that stays outstanding meanwhile,
        so nothing else of the group moves: at most 8 MiB (INSTALL_SLICE_BYTES) and 10 ms (INSTALL_SLICE_S)
        per loop turn, then fdatasync the engine on its thread before the WAL records the snapshot. A 512 MiB
        image does not stall the node's other groups (heartbeats, elections) while it installs. The image
        (bytes, a received ChunkedBytes, an engine-backed ChunkedImage) is read one batch at a time, never
        copied whole on the loop.

        Blocks are overwritten, never dropped first, then what the image does not hold is trimmed: a crash
        part-way leaves each block either as it was or as in the image (newer), and the log replayed from
        the WAL's older point converges it (replication/image.py rule 2). Returns the image's session
        table (encoded) for the WAL's snapshot record; None when the node stops or failed (then _fail was
        called). The caller counted the install in `_installing`."""
        try:
            # Slicing a memoryview of bytes copies nothing; slicing the others copies that range only.
            view = memoryview(data) if isinstance(data, bytes | bytearray) else data
            total = len(view)
            app = b""
            off = 0
            head = bytes(view[0 : 2 * _IMG_LEN.size])
            if len(head) == 2 * _IMG_LEN.size and _IMG_LEN.unpack_from(head, 0)[0] == IMAGE_SESSIONS_MARK:
                (alen,) = _IMG_LEN.unpack_from(head, _IMG_LEN.size)
                off = 2 * _IMG_LEN.size + alen
                app = bytes(view[2 * _IMG_LEN.size : off])
            sessions = Sessions.decode(app)  # ValueError before anything is written
            held: dict[int, set[int]] = {}
            done = 0
            t_slice = time.monotonic()
            while off < total:
                (blen,) = _IMG_LEN.unpack(bytes(view[off : off + _IMG_LEN.size]))
                off += _IMG_LEN.size
                for op in decode_batch(view[off : off + blen]):
                    if group_of_extent(op.extent_id) != gid:
                        raise ValueError("snapshot image holds an extent of another group")
                    self.engine.write(op.extent_id, op.block, op.data, op.crcs)
                    held.setdefault(op.extent_id, set()).update(range(op.block, op.block + op.count))
                    done += op.count * BLOCK_SIZE
                    if done >= INSTALL_SLICE_BYTES or time.monotonic() - t_slice >= INSTALL_SLICE_S:
                        done = 0
                        await asyncio.sleep(0)
                        if self._stopping or self.failed is not None:
                            return None  # abandoned: the WAL still has the older point
                        t_slice = time.monotonic()
                off += blen
            for ext in self._group_extents(gid):
                keep = held.get(ext)
                if not keep:
                    self.engine.drop_extent(ext)
                    continue
                extra = sorted(set(self.engine.index.extents.get(ext, {})) - keep)
                for first, n in runs(extra):
                    self.engine.trim(ext, first, n)
            await asyncio.get_running_loop().run_in_executor(self._engine_executor, self.engine.sync)
        except Exception as e:
            self._fail(e)
            return None
        finally:
            self._installing -= 1
        self.sessions[gid] = sessions
        return app

    def _maybe_start_compaction(self) -> None:
        # Not before the map was read: until then the groups recovered from the WAL are not hosted, and a
        # cycle would compact none of them and count their bytes as done.
        if self._compacting or self._stopping or not self.fences_known:
            return
        grown = self.wal.appended_pos - self._wal_appended_at_compact
        if grown < self.cfg.wal_compact_bytes:
            return
        self._compacting = True
        assert self._loop is not None
        self._loop.create_task(self._compact_cycle())

    async def _compact_cycle(self) -> None:
        """Note every group's applied index, fdatasync the engine on its own thread (covering everything
        applied before the call; the loop keeps applying meanwhile), then every group compacts its log
        at the noted index; the WAL drops segments after that. No fdatasync runs on the loop."""
        loop = asyncio.get_running_loop()
        try:
            # Each group's applied index and its session table at that very index (one loop turn).
            self._wal_appended_at_compact = self.wal.appended_pos
            applied = {gid: (g.core.applied_index, self.sessions[gid]) for gid, g in self.groups.items()}
            apps = {gid: sess.encode() for gid, (_, sess) in applied.items()}
            chain_points = self.chains.compaction_points()
            await loop.run_in_executor(self._engine_executor, self.engine.sync)
            n_chain = self.chains.compact(chain_points)
            if n_chain:
                self._dirty_chain.update(chain_points)
            n = 0
            for gid, (idx, sess) in applied.items():
                g = self.groups.get(gid)
                if g is None or self.sessions.get(gid) is not sess:  # an image was installed meanwhile
                    continue
                c = g.core
                app = apps[gid]
                image = self.image_of(gid, app)
                if idx > c.log.snap_index and idx <= c.applied_index and c.compact(idx, cast(bytes, image), app):
                    n += 1
                    self._dirty.add(g.id)
            self.counters["compactions"] += 1
            self._kick()  # the Raft groups' COMPACT records go out with their next Ready (_sync_idle syncs them)
            log.info("raft.compacted", groups=n, chain_groups=n_chain, wal_bytes=self.wal.total_bytes())
        except Exception as e:
            self._fail(e)
        finally:
            self._compacting = False

    # == introspection ========================================================================================
    def leader_count(self) -> int:
        return sum(1 for g in self.groups.values() if g.core.role == Role.LEADER)

    def group_conf(self, gid: int) -> ConfState:
        return self.groups[gid].core.conf

    def snapshot_meta(self, gid: int) -> SnapshotMeta:
        return self.groups[gid].storage.snapshot().meta
