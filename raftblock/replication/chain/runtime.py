# ChainHost: drives the chain-replicated groups of one node inside the node's NodeRuntime (raft/runtime.py).
#
# Owns: the chain groups' cores, their client requests (writes at the head, reads at the tail), their
# configurations and leases as the metadata group hands them out. Shares with the Raft groups of the node:
# the event loop, the transport (CHAIN frames on the same peer connections), the WAL (one group commit
# covers both), the engine (the state machine every group applies to), ticks, snapshots and compaction.
#
# Rules (the core's Ready contract, docs/chain.md, over the shared WAL):
# 1. A chain group's durable state is kept in the WAL with Raft's records: a record is an entry
#    (term = the record's epoch, index = its seq), the snapshot/compaction point is (index = seq,
#    term = epoch of that record), and the hard state's term is the last configuration epoch adopted.
# 2. A configuration with a newer epoch is adopted only once that epoch is durable in the WAL, so a
#    restarted member never acts again in an epoch it may already have acted in (it waits for the
#    metadata group to bump the epoch: MetaAgent reports it, the metadata leader bumps).
# 3. Per group at most one Ready is outstanding: `messages_now` (WRITE/SYNC/SNAPSHOT) leave at once, the
#    snapshot and records go to the WAL, and the rest (ACKs, applies, client acks, reads) waits for the
#    WAL fdatasync that covers them. ACKs leave before applies (as Raft's acknowledgements do).
# 4. A client write is answered OK only when its seq is in `client_acks` of the head: durable on every
#    member of the configuration and applied on the head. A read is answered only by the tail, synced,
#    under a lease (rule 5), after what it must see is applied.
# 5. Leases: the node's MetaAgent grants one after each heartbeat the metadata leader accepted, until
#    `sent + lease_ms` (the metadata leader removes a member only after a longer silence, HealthConfig).
# 6. A SNAPSHOT's image (the group's extent data, made when first sent) travels in chunks of
#    SNAPSHOT_CHUNK_BYTES, paced by the peer connection's queue (STREAM_QUEUE_BYTES); the messages the core
#    sends the same successor behind it wait for the last chunk (up to HELD_BYTES_MAX, later ones are
#    dropped: the core resends). One stream per (group, successor): a resent SNAPSHOT of the same epoch
#    while one is on its way is dropped. The receiver reassembles in order and steps the core with the
#    whole image; a chunk out of order ends that stream (the core resends).
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import structlog

from raftblock.replication.chain.core import ChainCore
from raftblock.replication.chain.types import (
    ChainConfig,
    ChainMessage,
    ChainReady,
    ChainSnapshot,
    MessageType,
    Record,
)
from raftblock.replication.image import ChunkedImage
from raftblock.replication.raft.types import (
    NO_NODE,
    ConfState,
    Entry,
    EntryType,
    GroupId,
    HardState,
    NodeId,
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
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import GroupDurable, WalStorage
from raftblock.storage.engine import NoSpaceError
from raftblock.wire.chaincodec import decode_chain_frame, encode_chain, encode_snapshot_chunk

if TYPE_CHECKING:
    from raftblock.replication.raft.runtime import NodeRuntime

log = structlog.get_logger(__name__)

INFLIGHT_MAX = 128  # records forwarded and not yet acknowledged by the successor
BATCH_MAX = 32  # records per WRITE
UNCOMMITTED_MAX = 1024  # head: records proposed and not acknowledged by the whole chain
RETRY_TICKS = 10  # resend / re-SYNC after this many ticks without progress
SNAPSHOT_CHUNK_BYTES = 1 << 20
STREAM_QUEUE_BYTES = 4 << 20  # a snapshot stream sends while the connection holds less than this unsent
HELD_BYTES_MAX = 16 << 20  # messages waiting behind a snapshot stream
IMAGE_BYTES_MAX = 1 << 30  # a received image larger than this is refused (a group holds at most 512 MiB)


class _OutStream:
    __slots__ = ("msg", "image", "offset", "conn", "held", "held_bytes", "started")

    def __init__(self, msg: ChainMessage, image: bytes | ChunkedImage) -> None:
        self.msg = msg
        self.image = image
        self.started = time.monotonic()
        self.offset = 0
        self.conn: object = None
        self.held: list[ChainMessage] = []
        self.held_bytes = 0


class _InStream:
    __slots__ = ("epoch", "seq", "buf", "offset")

    def __init__(self, epoch: int, seq: int, total: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.buf = bytearray(total)
        self.offset = 0


class ChainGroup:
    __slots__ = (
        "id",
        "core",
        "storage",
        "rd",
        "wait_pos",
        "waiting",
        "pending_cfg",
        "pending",
        "pending_bytes",
        "proposals",
        "reads",
        "members",
        "was_head",
    )

    def __init__(self, gid: int, core: ChainCore, storage: WalStorage) -> None:
        self.id = gid
        self.core = core
        self.storage = storage
        self.rd: ChainReady | None = None
        self.wait_pos = 0
        self.waiting = False  # in the runtime's sync waiters
        self.pending_cfg: ChainConfig | None = None  # adopted once its epoch is durable (rule 2)
        self.pending: list[Pending] = []
        self.pending_bytes = 0
        self.proposals: dict[int, list[Reply]] = {}  # seq -> the writes it carries
        self.reads: dict[int, asyncio.Future[int]] = {}  # ctx -> waiting for the tail's Ready
        self.members: tuple[int, ...] = ()
        self.was_head = False


def _durable_of(rec: GroupDurable | None) -> tuple[int, int, list[Record], int]:
    """(base seq, base epoch, records, last adopted epoch) from what the WAL recovered (rule 1)."""
    if rec is None:
        return 0, 0, [], 0
    base = rec.snap.index if rec.snap is not None else 0
    base_epoch = rec.snap.term if rec.snap is not None else 0
    records = [Record(e.index, e.data, e.term) for e in rec.entries]
    return base, base_epoch, records, rec.hard_state.term


class ChainHost:
    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.groups: dict[int, ChainGroup] = {}
        self.lease_until_tick = -1  # the node's lease, in runtime ticks (rule 5)
        self.lease_epochs: dict[int, int] = {}  # the epoch each group's lease is for
        self._out: dict[tuple[int, int], _OutStream] = {}  # (group, successor) -> snapshot stream (rule 6)
        self._in: dict[tuple[int, int], _InStream] = {}  # (group, predecessor) -> image being received

    # == hosting and configuration (from the MetaAgent) =======================================================
    def host(self, gid: int, members: Sequence[int], epoch: int) -> bool:
        """Host chain group `gid` (the map names this node a member) and hand it the map's configuration
        (members head first, epoch). Returns True when it was not hosted before."""
        rt = self.rt
        g = self.groups.get(gid)
        new = g is None
        if g is None:
            rec = rt._recovered.pop(gid, None)
            rt.recovered_sessions(gid, rec)
            storage = WalStorage(rt.wal, gid, rec, SnapshotMeta(0, 0, ConfState(frozenset())), lambda _m: b"")
            core = ChainCore(
                rt.node_id,
                GroupId(gid),
                self._snapshot_fn(gid),
                inflight_max=INFLIGHT_MAX,
                batch_max=BATCH_MAX,
                uncommitted_max=UNCOMMITTED_MAX,
                retry_interval=RETRY_TICKS,
            )
            base, base_epoch, records, last_epoch = _durable_of(rec)
            if rec is not None:
                core.restore(base, base_epoch, records, last_epoch)
                log.info("chain.restored", group=gid, base=base, records=len(records), epoch=last_epoch)
            core.tick(rt._ticks_done)
            g = self.groups[gid] = ChainGroup(gid, core, storage)
            log.info("chain.group_hosted", group=gid, members=list(members), epoch=epoch)
        self.configure(g, members, epoch)
        return new

    def discard(self, gid: int, deleted: bool = False) -> bool:
        """This node was replaced in chain `gid` (the map has it full without this node): drop its stale
        replica. The WAL first records the group as empty (synced), then the engine drops its extents, so
        a crash between the two leaves an empty group whose leftover blocks a later join's snapshot
        replaces. Returns False when there is nothing to discard or a Ready is still outstanding.
        `deleted`: the group is gone from the map (volume deleted): a member drops its copy too."""
        g = self.groups.get(gid)
        rt = self.rt
        if (g is None or g.rd is not None or g.waiting or g.pending_cfg is not None
                or (g.core.is_member and not deleted)
                or rt._syncing):  # a WAL sync on the thread: the next map poll tries again
            return False
        self.fail_requests(g, NotLeaderError(NO_NODE))
        del self.groups[gid]
        rt._drop_replica(gid, deleted)
        self._out = {k: v for k, v in self._out.items() if k[0] != gid}
        self._in = {k: v for k, v in self._in.items() if k[0] != gid}
        rt.counters["groups_deleted" if deleted else "chain_replicas_discarded"] += 1
        log.info("chain.group_deleted" if deleted else "chain.replica_discarded", group=gid)
        return True

    def configure(self, g: ChainGroup, members: Sequence[int], epoch: int) -> None:
        core = g.core
        pend = g.pending_cfg
        if epoch <= core.epoch or (pend is not None and epoch <= pend.epoch) or not members:
            return
        cfg = ChainConfig(epoch, tuple(NodeId(m) for m in members))
        g.pending_cfg = cfg
        g.storage.set_hard_state(HardState(epoch, NO_NODE, 0))  # rule 2: durable before adopted
        self._wait_sync(g)
        self.rt._kick()

    def _adopt(self, g: ChainGroup) -> None:
        cfg = g.pending_cfg
        if cfg is None:
            return
        g.pending_cfg = None
        core = g.core
        core.set_config(cfg)
        g.members = tuple(int(m) for m in cfg.members)
        if core.is_member and core.epoch >= self.lease_epochs.get(g.id, core.epoch + 1):
            core.grant_lease(core.epoch, self.lease_until_tick)  # a newer epoch that has me: see grant_lease
        log.info("chain.config", group=g.id, epoch=cfg.epoch, members=list(g.members), head=core.is_head,
                 tail=core.is_tail, member=core.is_member)
        if g.was_head and not core.is_head:
            self.fail_requests(g, self._not_head(g))
        g.was_head = core.is_head
        self.rt._dirty_chain.add(g.id)

    def grant_lease(self, until_tick: int, epochs: dict[int, int]) -> None:
        """The node's lease from the metadata group (rule 5), for the chains the metadata leader named
        this node a member of, at their epochs then. A member still in an older epoch (removed while it
        was cut off, maybe) gets none until it has adopted that epoch or a later one that has it: once
        the node was `up` and a member at the heartbeat, no configuration without it can be made before
        the lease ends (that takes a longer silence)."""
        self.lease_until_tick = max(self.lease_until_tick, until_tick)
        self.lease_epochs = dict(epochs)
        for gid, epoch in epochs.items():
            g = self.groups.get(gid)
            if g is not None and g.core.is_member and g.core.epoch >= epoch:
                g.core.grant_lease(g.core.epoch, until_tick)

    def counters(self) -> dict[str, int]:
        """The cores' counters (refusals such as stale_epoch, resends, snapshots) summed, prefixed chain_."""
        out: dict[str, int] = {}
        for g in self.groups.values():
            for k, v in g.core.counters.items():
                if v:
                    out[f"chain_{k}"] = out.get(f"chain_{k}", 0) + v
        return out

    def report(self) -> dict[int, list[int]]:
        """What the metadata leader needs for its one-change-at-a-time rule: per group [epoch adopted,
        configured (0/1), caught up (0/1): ChainCore.caught_up]. A restarted member reports configured
        = 0 with the epoch it persisted: the leader bumps the epoch for it."""
        out: dict[int, list[int]] = {}
        for gid, g in self.groups.items():
            c = g.core
            out[gid] = [c.epoch, int(c.config is not None), int(c.caught_up)]
        return out

    def _snapshot_fn(self, gid: int) -> Callable[[], ChainSnapshot]:
        def make() -> ChainSnapshot:
            g = self.groups[gid]
            app = self.rt.sessions[gid].encode()  # the table at applied_seq; the data may be newer
            return ChainSnapshot(g.core.applied_seq, cast(bytes, self.rt.image_of(gid, app)))

        return make

    # == ticks, messages =======================================================================================
    def tick(self, now: int) -> None:
        for g in self.groups.values():
            g.core.tick(now)
        self.rt._dirty_chain.update(self.groups)

    def on_frame(self, group: int, message: bytes, payload: bytes | memoryview) -> None:
        rt = self.rt
        try:
            m, offset, total = decode_chain_frame(group, message, payload)
        except ValueError:
            rt.counters["frames_malformed"] += 1
            return
        g = self.groups.get(m.group)
        if g is None:
            rt.counters["chain_unknown_group"] += 1
            return
        if m.dst != rt.node_id:
            rt.counters["chain_wrong_destination"] += 1
            return
        if total:
            whole = self._receive_chunk(m, offset, total)
            if whole is None:
                return
            m = whole
        g.core.step(m)
        rt._dirty_chain.add(g.id)

    def _receive_chunk(self, m: ChainMessage, offset: int, total: int) -> ChainMessage | None:
        """Reassemble a SNAPSHOT's image (rule 6); the whole message once its last chunk is in."""
        key = (int(m.group), int(m.src))
        if total > IMAGE_BYTES_MAX:
            self.rt.counters["frames_malformed"] += 1
            return None
        ins = self._in.get(key)
        if offset == 0:
            ins = self._in[key] = _InStream(m.epoch, m.seq, total)
        elif ins is None or (ins.epoch, ins.seq, ins.offset, len(ins.buf)) != (m.epoch, m.seq, offset, total):
            self._in.pop(key, None)
            self.rt.counters["chain_image_chunk_out_of_order"] += 1
            return None
        n = len(m.data)
        ins.buf[offset : offset + n] = m.data
        ins.offset += n
        if ins.offset < total:
            return None
        del self._in[key]
        self.rt.counters["chain_images_received"] += 1
        # The buffer itself, not bytes() of it: a copy of the whole image would hold the loop (install_image
        # reads a bytearray in place; nothing else holds this one once the stream is dropped above).
        return ChainMessage(m.type, m.group, m.src, m.dst, m.epoch, m.seq, (), cast(bytes, ins.buf), m.log_epoch)

    def send(self, m: ChainMessage) -> None:
        key = (int(m.group), int(m.dst))
        st = self._out.get(key)
        if m.type == MessageType.SNAPSHOT:
            if st is not None and st.msg.epoch == m.epoch:
                self.rt.counters["chain_snapshot_resend_skipped"] += 1  # one is on its way (rule 6)
                return
            data = cast(object, m.data)
            image = data if isinstance(data, ChunkedImage) else bytes(m.data)
            self.rt.counters["chain_images_sent"] += 1
            self._out[key] = _OutStream(m, image)
            self.pump()
            return
        if st is not None:
            size = sum(len(r.data) for r in m.records) + 64
            if st.held_bytes + size <= HELD_BYTES_MAX:
                st.held.append(m)
                st.held_bytes += size
            else:
                self.rt.counters["chain_dropped_behind_snapshot"] += 1
            return
        self.rt.transport.send(m.dst, encode_chain(m))

    def pump(self) -> bool:
        """Send the next chunks of every snapshot stream the peer connections have room for; True while
        some stream is not finished (the runtime calls again soon)."""
        if not self._out:
            return False
        tr = self.rt.transport
        for key in list(self._out):
            st = self._out[key]
            dst = key[1]
            conn = tr.conns.get(dst)
            if conn is None:
                continue  # not connected: wait (the core resends after a while anyway)
            if st.conn is not conn:
                st.conn, st.offset = conn, 0  # a new connection: the receiver starts over
            total = len(st.image)
            while st.offset < total and conn.write_buffer_bytes() < STREAM_QUEUE_BYTES:
                chunk = st.image[st.offset : st.offset + SNAPSHOT_CHUNK_BYTES]
                if not self.rt.repair_allow(len(chunk)):
                    break  # the repair bandwidth is spent: the runtime pumps again soon
                if not tr.send(dst, encode_snapshot_chunk(st.msg, st.offset, total, chunk)):
                    break
                st.offset += len(chunk)
            if total == 0 and st.offset == 0:
                tr.send(dst, encode_chain(ChainMessage(st.msg.type, st.msg.group, st.msg.src, st.msg.dst,
                                                       st.msg.epoch, st.msg.seq, (), b"", st.msg.log_epoch)))
                st.offset = -1
            if st.offset >= total or st.offset < 0:
                del self._out[key]
                for m in st.held:
                    tr.send(m.dst, encode_chain(m))
        return bool(self._out)

    # == Ready handling (rule 3) ===============================================================================
    def process(self, gid: int) -> None:
        g = self.groups.get(gid)
        if g is None or g.rd is not None or gid in self.rt._blocked or not g.core.has_ready():
            return
        core = g.core
        rd = core.ready()
        g.rd = rd
        for m in rd.messages_now:
            self.send(m)
        if rd.snapshot is not None:
            rt = self.rt
            rt._installing += 1
            assert rt._loop is not None
            rt._loop.create_task(self._install_then_persist(g, rd))
            return
        self._persist(g, rd, False)

    async def _install_then_persist(self, g: ChainGroup, rd: ChainReady) -> None:
        """An image to install (NodeRuntime.install_image, async); the group's Ready stays outstanding
        meanwhile, then the rest of it is persisted as usual."""
        rt = self.rt
        snap = rd.snapshot
        assert snap is not None
        app = await rt.install_image(g.id, snap.image)
        if app is None or self.groups.get(g.id) is not g:
            return
        g.storage.install_snapshot(Snapshot(SnapshotMeta(snap.seq, snap.epoch, ConfState(frozenset()), app), b""))
        rt.counters["chain_snapshots_installed"] += 1
        self._persist(g, rd, True)
        rt._dirty_chain.add(g.id)
        rt._kick()

    def _persist(self, g: ChainGroup, rd: ChainReady, must_sync: bool) -> None:
        st = g.storage
        if rd.records:
            st.append([Entry(r.epoch, r.seq, EntryType.NORMAL, r.data) for r in rd.records])
            must_sync = True
        if must_sync:
            self._wait_sync(g)
        else:
            self.finish(g)

    def _wait_sync(self, g: ChainGroup) -> None:
        g.wait_pos = max(g.wait_pos, g.storage.last_pos)
        if not g.waiting:
            g.waiting = True
            self.rt._sync_waiters.append(g)

    def synced_messages(self, g: ChainGroup) -> bool:
        """The WAL sync covering this group's Ready is done: its ACKs leave first (rule 3)."""
        g.waiting = False
        rd = g.rd
        if rd is None or not rd.messages:
            return False
        for m in rd.messages:
            self.send(m)
        rd.messages = []
        return True

    def synced(self, g: ChainGroup) -> None:
        if g.pending_cfg is not None:
            self._adopt(g)
        if g.rd is not None:
            self.finish(g)
        self.rt._dirty_chain.add(g.id)

    def finish(self, g: ChainGroup) -> None:
        rd = g.rd
        assert rd is not None
        rt = self.rt
        for m in rd.messages:
            self.send(m)
        for r in rd.applies:
            try:
                rt._apply_data(g.id, r.seq, r.data)
            except NoSpaceError as ex:
                # The disk is full: the records stay in the log (durable); the core emits them again and
                # the group waits APPLY_RETRY_S between tries (reads at this tail wait meanwhile).
                g.core.requeue_applies(r.seq)
                rt.counters["chain_apply_no_space"] += 1
                rt._block_group(g.id, ex)
                break
        for seq in rd.client_acks:
            for reply in g.proposals.pop(seq, ()):
                if not reply.done():
                    reply.set_result(seq)
        for ctx, _seq in rd.reads:
            fut = g.reads.pop(ctx, None)
            if fut is not None and not fut.done():
                fut.set_result(g.core.applied_seq)
        g.core.advance(rd)
        g.rd = None
        rt._dirty_chain.add(g.id)
        rt._kick()

    # == client requests =======================================================================================
    def _not_head(self, g: ChainGroup) -> Exception:
        cfg = g.core.config
        if cfg is None:
            return RetryError(f"chain group {g.id}: no configuration yet")
        return NotLeaderError(int(cfg.head))

    def check_head(self, g: ChainGroup) -> None:
        if self.rt.failed is not None:
            raise RetryError(f"node failed: {self.rt.failed!r}")
        if not g.core.is_head or g.pending_cfg is not None:
            raise self._not_head(g)

    def not_tail(self, g: ChainGroup) -> Exception:
        cfg = g.core.config
        if cfg is None or not g.core.is_member:
            return RetryError(f"chain group {g.id}: not a member of a configuration here")
        if g.core.is_tail:
            return RetryError(f"chain group {g.id}: tail not readable yet (syncing, applying or no lease)")
        return NotLeaderError(int(cfg.tail))

    def flush_proposals(self, g: ChainGroup) -> None:
        """Head batching: the writes of one loop turn become as few records as the bounds allow."""
        from raftblock.wire.ops import encode_batch

        cfg = self.rt.cfg
        pending, g.pending = g.pending, []
        g.pending_bytes = 0
        core = g.core
        for live in live_batches(pending, cfg.batch_writes_max, cfg.batch_bytes_max):
            seq = core.propose(encode_batch([p.op for p in live]))
            if seq == 0:
                exc = self._not_head(g) if not core.is_head else RetryError("chain: too many writes in flight")
                for p in live:
                    p.fut.set_exception(exc)
                continue
            g.proposals[seq] = [p.fut for p in live]
            self.rt.counters["chain_records_proposed"] += 1
        self.rt._dirty_chain.add(g.id)

    async def read_barrier(self, g: ChainGroup) -> None:
        """Wait until this tail may serve a read that sees every acknowledged write."""
        rt = self.rt
        rt._catch_up_ticks()
        core = g.core
        if core.read_now():
            return
        rt._read_ctx += 1
        ctx = rt._read_ctx
        if not core.read(ctx):
            raise self.not_tail(g)
        assert rt._loop is not None
        fut: asyncio.Future[int] = rt._loop.create_future()
        g.reads[ctx] = fut
        rt._dirty_chain.add(g.id)
        rt._kick()
        await fut

    def fail_requests(self, g: ChainGroup, exc: Exception) -> None:
        fail_requests(g.proposals.values(), g.pending, g.reads.values(), exc)
        g.proposals.clear()
        g.pending = []
        g.pending_bytes = 0
        g.reads.clear()

    # == compaction ===========================================================================================
    def compaction_points(self) -> dict[int, tuple[int, Sessions, bytes]]:
        """Per group: the applied seq, when it is durable here too, with the session table exactly there."""
        out: dict[int, tuple[int, Sessions, bytes]] = {}
        for gid, g in self.groups.items():
            seq = g.core.applied_seq
            if 0 < seq <= g.core.durable_seq:
                sess = self.rt.sessions[gid]
                out[gid] = (seq, sess, sess.encode())
        return out

    def compact(self, points: dict[int, tuple[int, Sessions, bytes]]) -> int:
        """After an engine fdatasync that covers everything applied up to `points`: drop WAL records at or
        below them (the engine holds their effect; the compaction record holds the session table)."""
        n = 0
        for gid, (seq, sess, app) in points.items():
            g = self.groups.get(gid)
            if g is None or self.rt.sessions.get(gid) is not sess:  # gone, or an image installed meanwhile
                continue
            ep = g.core.epoch_at(seq)
            if ep < 0 or seq <= g.storage.snapshot().meta.index:
                continue
            g.storage.compact(Snapshot(SnapshotMeta(seq, ep, ConfState(frozenset()), app), b""))
            n += 1
        return n

    # == introspection ========================================================================================
    def repair_info(self, gid: int) -> dict[str, int]:
        """The image stream this member is sending its successor, if any: GroupInfo.repair_* fields."""
        for (g, dst), st in self._out.items():
            if g == gid:
                return {"repair_node": dst, "repair_bytes_done": max(0, st.offset),
                        "repair_bytes_total": len(st.image),
                        "repair_elapsed_ms": int((time.monotonic() - st.started) * 1000)}
        return {}

    def info(self, g: ChainGroup) -> dict[str, int | bool]:
        c = g.core
        cfg = c.config
        return {
            "term": c.epoch,
            "leader": int(cfg.head) if cfg is not None else 0,
            "tail": int(cfg.tail) if cfg is not None else 0,
            "commit": c.ack_point,
            "applied": c.applied_seq,
            "last_index": c.last_seq,
            "lease": c.lease_valid(),
            "synced": c.synced,
            "role": 2 if c.is_head else (1 if c.is_member else 0),
        }

