# ChainReplica: one node's member of a chain-replicated extent group, driven by the node's host through
# the Replica interface (replication/replica.py). Shares with the node's Raft replicas the event loop, the
# links (CHAIN frames on the same peer connections), the WAL (one group commit covers both), the engine,
# ticks, images and compaction.
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
#    The lease is node-wide (ChainLease); each member takes it for the epoch the metadata leader named.
# 6. Images travel in chunks (chain/streams.py).
from __future__ import annotations

from typing import ClassVar, cast

import structlog

from raftblock.replication.chain.core import ChainCore
from raftblock.replication.chain.streams import InStreams, OutStreams
from raftblock.replication.chain.types import ChainConfig, ChainReady, ChainSnapshot, Record
from raftblock.replication.image import close_image
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
from raftblock.replication.replica import NodeContext, ReplicaBase, ScrubView
from raftblock.replication.requests import NotLeaderError, Reply, RetryError
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import GroupDurable, WalStorage
from raftblock.storage.engine import NoSpaceError
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.chaincodec import decode_chain_frame

log = structlog.get_logger(__name__)

INFLIGHT_MAX = 128  # records forwarded and not yet acknowledged by the successor
BATCH_MAX = 32  # records per WRITE
UNCOMMITTED_MAX = 1024  # head: records proposed and not acknowledged by the whole chain
RETRY_TICKS = 10  # resend / re-SYNC after this many ticks without progress


class ChainLease:
    """The node's chain lease (rule 5), in host ticks, and the epoch each group's lease is for."""

    __slots__ = ("until_tick", "epochs")

    def __init__(self) -> None:
        self.until_tick = -1
        self.epochs: dict[int, int] = {}


def _durable_of(rec: GroupDurable | None) -> tuple[int, int, list[Record], int]:
    """(base seq, base epoch, records, last adopted epoch) from what the WAL recovered (rule 1)."""
    if rec is None:
        return 0, 0, [], 0
    base = rec.snap.index if rec.snap is not None else 0
    base_epoch = rec.snap.term if rec.snap is not None else 0
    records = [Record(e.index, e.data, e.term) for e in rec.entries]
    return base, base_epoch, records, rec.hard_state.term


class ChainReplica(ReplicaBase):
    kind: ClassVar[str] = "chain"

    def __init__(self, ctx: NodeContext, lease: ChainLease, gid: int, rec: GroupDurable | None) -> None:
        app = rec.snap.app if rec is not None and rec.snap is not None else b""
        storage = WalStorage(ctx.wal, gid, rec, SnapshotMeta(0, 0, ConfState(frozenset())), lambda _m: b"")
        super().__init__(ctx, gid, storage, Sessions.decode(app))
        self.lease = lease
        self.core = ChainCore(NodeId(ctx.node_id), GroupId(gid), self._make_snapshot, inflight_max=INFLIGHT_MAX,
                              batch_max=BATCH_MAX, uncommitted_max=UNCOMMITTED_MAX, retry_interval=RETRY_TICKS)
        self.has_ready = self.core.has_ready  # asked of every replica every turn
        base, base_epoch, records, last_epoch = _durable_of(rec)
        if rec is not None:
            self.core.restore(base, base_epoch, records, last_epoch)
            log.info("chain.restored", group=gid, base=base, records=len(records), epoch=last_epoch)
        self.core.tick(ctx.ticks)
        self.proposals: dict[int, list[Reply]] = {}  # seq -> the writes it carries
        self.pending_cfg: ChainConfig | None = None  # adopted once its epoch is durable (rule 2)
        self.members: tuple[int, ...] = ()
        self.was_head = False
        self.out = OutStreams(ctx, gid)
        self.send = self.out.send  # type: ignore[method-assign]
        self.inb = InStreams(ctx.counters, ctx.image_sink)

    def _make_snapshot(self) -> ChainSnapshot:
        app = self.sessions.encode()  # the table at applied_seq; the data may be newer
        return ChainSnapshot(self.core.applied_seq, cast(bytes, self.ctx.image_of(self.id, app)))

    # == configuration and lease (rules 2, 5) ====================================================================
    def configure(self, members: list[int], epoch: int) -> None:
        """The map's configuration (members head first, epoch): durable first, adopted after the sync."""
        core = self.core
        pend = self.pending_cfg
        if epoch <= core.epoch or (pend is not None and epoch <= pend.epoch) or not members:
            return
        self.pending_cfg = ChainConfig(epoch, tuple(NodeId(m) for m in members))
        self.storage.set_hard_state(HardState(epoch, NO_NODE, 0))
        self.wait_sync()
        self.ctx.kick()

    def _adopt(self) -> None:
        cfg = self.pending_cfg
        if cfg is None:
            return
        self.pending_cfg = None
        core = self.core
        core.set_config(cfg)
        self.members = tuple(int(m) for m in cfg.members)
        if core.is_member and core.epoch >= self.lease.epochs.get(self.id, core.epoch + 1):
            core.grant_lease(core.epoch, self.lease.until_tick)  # a newer epoch that has me: see take_lease
        log.info("chain.config", group=self.id, epoch=cfg.epoch, members=list(self.members), head=core.is_head,
                 tail=core.is_tail, member=core.is_member)
        if self.was_head and not core.is_head:
            self.fail_requests(self._not_head())
        self.was_head = core.is_head
        self.ctx.dirty.add(self.id)

    def take_lease(self, epoch: int) -> None:
        """The node's lease for this group at `epoch`: a member still in an older epoch (removed while it
        was cut off, maybe) gets none until it has adopted that epoch or a later one that has it."""
        core = self.core
        if core.is_member and core.epoch >= epoch:
            core.grant_lease(core.epoch, self.lease.until_tick)

    def can_drop(self, deleted: bool) -> bool:
        return (self.rd is None and not self.waiting and self.pending_cfg is None
                and (not self.core.is_member or deleted))

    def report(self) -> list[int]:
        """[epoch adopted, configured (0/1), caught up (0/1)]: a restarted member reports configured = 0
        with the epoch it persisted, and the metadata leader bumps the epoch for it."""
        c = self.core
        return [c.epoch, int(c.config is not None), int(c.caught_up)]

    # == ticks, messages =========================================================================================
    def tick(self, n: int, now: int) -> None:
        self.core.tick(now)

    def on_frame(self, message: bytes, payload: bytes | memoryview) -> None:
        ctx = self.ctx
        try:
            m, offset, total = decode_chain_frame(self.id, message, payload)
        except ValueError:
            ctx.counters["frames_malformed"] += 1
            return
        if m.dst != ctx.node_id:
            ctx.counters["chain_wrong_destination"] += 1
            return
        if total:
            whole = self.inb.receive(m, offset, total)
            if whole is None:
                return
            m = whole
        self.core.step(m)
        ctx.dirty.add(self.id)

    # == Ready (rule 3) ==========================================================================================
    def handle_ready(self) -> None:
        rd = self.core.ready()
        self.rd = rd
        for m in rd.messages_now:
            self.out.send(m)
        if rd.snapshot is not None:
            self.start_install(rd, rd.snapshot.image)
            return
        self.persist(rd, False)

    def installed(self, rd: ChainReady, app: bytes) -> None:
        snap = rd.snapshot
        assert snap is not None
        self.storage.install_snapshot(Snapshot(SnapshotMeta(snap.seq, snap.epoch, ConfState(frozenset()), app), b""))
        self.ctx.counters["chain_snapshots_installed"] += 1

    def persist(self, rd: ChainReady, must_sync: bool) -> None:
        if rd.records:
            self.storage.append([Entry(r.epoch, r.seq, EntryType.NORMAL, r.data) for r in rd.records])
            must_sync = True
        self.persisted(must_sync)

    def synced(self) -> None:
        if self.pending_cfg is not None:
            self._adopt()
        if self.rd is not None and not self.installing:
            self.finish()
        self.ctx.dirty.add(self.id)

    def finish(self) -> None:
        rd = self.rd
        assert rd is not None
        ctx = self.ctx
        for m in rd.messages:
            self.out.send(m)
        for r in rd.applies:
            try:
                self.apply_data(r.seq, r.data, r.epoch)
            except NoSpaceError as ex:
                # The records stay in the log (durable); the core emits them again once unblocked (reads
                # at this tail wait meanwhile).
                self.core.requeue_applies(r.seq)
                ctx.counters["chain_apply_no_space"] += 1
                ctx.block_apply(self.id, ex)
                break
        for seq in rd.client_acks:
            for reply in self.proposals.pop(seq, ()):
                if not reply.done():
                    reply.set_result(seq)
        for c, _seq in rd.reads:
            fut = self.reads.pop(c, None)
            if fut is not None and not fut.done():
                fut.set_result(self.core.applied_seq)
        self.core.advance(rd)
        self.rd = None
        if rd.snapshot is not None:
            close_image(rd.snapshot.image)  # installed and recorded: its staging file goes
        ctx.dirty.add(self.id)
        ctx.kick()

    # == client ops (rule 4) =====================================================================================
    def _not_head(self) -> Exception:
        cfg = self.core.config
        if cfg is None:
            return RetryError(f"chain group {self.id}: no configuration yet")
        return NotLeaderError(int(cfg.head))

    def _not_tail(self) -> Exception:
        cfg = self.core.config
        if cfg is None or not self.core.is_member:
            return RetryError(f"chain group {self.id}: not a member of a configuration here")
        if self.core.is_tail:
            return RetryError(f"chain group {self.id}: tail not readable yet (syncing, applying or no lease)")
        return NotLeaderError(int(cfg.tail))

    def check_writable(self) -> None:
        """This member takes writes now (the head, its configuration adopted, the node not failed)."""
        failed = self.ctx.failed
        if failed is not None:
            raise RetryError(f"node failed: {failed!r}")
        if not self.core.is_head or self.pending_cfg is not None:
            raise self._not_head()

    def propose(self, replies: list[Reply], data: bytes) -> None:
        core = self.core
        seq = core.propose(data)
        if seq == 0:
            exc = self._not_head() if not core.is_head else RetryError("chain: too many writes in flight")
            for r in replies:
                r.set_exception(exc)
            return
        self.proposals[seq] = replies
        self.ctx.counters["chain_records_proposed"] += 1

    def read_now(self) -> bool:
        return self.core.read_now()

    async def read_barrier(self) -> int:
        """Wait until this tail may serve a read that sees every acknowledged write."""
        self.ctx.catch_up_ticks()
        core = self.core
        if core.read_now():
            return core.applied_seq
        c = self.ctx.next_read_ctx()
        if not core.read(c):
            raise self._not_tail()
        return await self.wait_read(c)

    def applied(self) -> int:
        return self.core.applied_seq

    def read_sources(self) -> list[int]:
        """The other members, nearest predecessor first."""
        return [m for m in reversed(self.members) if m != self.ctx.node_id]

    def scrub_view(self) -> ScrubView:
        """The other members; the head compares, and a difference is reported, not repaired."""
        cc = self.core
        return ScrubView(lambda: cc.applied_seq, [m for m in self.members if m != self.ctx.node_id], cc.is_head, False)

    def repair_refusal(self, source: int) -> str | None:
        return "chain groups: replica comparison does not repair (docs/replication.md, Scrub)"

    # == compaction ==============================================================================================
    def compaction_point(self) -> tuple[int, Sessions, bytes] | None:
        """The applied seq, when it is durable here too, with the session table exactly there."""
        seq = self.core.applied_seq
        if 0 < seq <= self.core.durable_seq:
            return seq, self.sessions, self.sessions.encode()
        return None

    def compact(self, point: int, sess: Sessions, app: bytes) -> bool:
        """After an engine fdatasync that covers everything applied up to `point`: drop WAL records at or
        below it (the engine holds their effect; the compaction record holds the session table)."""
        if self.sessions is not sess:  # an image was installed meanwhile
            return False
        ep = self.core.epoch_at(point)
        if ep < 0 or point <= self.storage.snapshot().meta.index:
            return False
        self.storage.compact(Snapshot(SnapshotMeta(point, ep, ConfState(frozenset()), app), b""))
        self.ctx.dirty.add(self.id)
        return True

    # == status ==================================================================================================
    def info(self, allocated_bytes: int) -> pb.GroupInfo:
        c = self.core
        cfg = c.config
        info = pb.GroupInfo(group=self.id, mode="chain", allocated_bytes=allocated_bytes,
                            term=c.epoch, leader=int(cfg.head) if cfg is not None else 0,
                            tail=int(cfg.tail) if cfg is not None else 0, commit=c.ack_point,
                            applied=c.applied_seq, last_index=c.last_seq, lease=c.lease_valid(),
                            synced=c.synced, role=2 if c.is_head else (1 if c.is_member else 0))
        for k, v in self.out.repair_info().items():
            setattr(info, k, v)
        return info

    def pump(self) -> bool:
        return self.out.pump()

    def counters(self) -> dict[str, int]:
        return {f"chain_{k}": v for k, v in self.core.counters.items() if v}
