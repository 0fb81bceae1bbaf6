"""RaftReplica: one node's replica of a Raft extent group, driven by the node's host through the Replica
interface (replication/replica.py), over the node's WAL, engine and links.

Rules (the core's Ready contract, docs/raft.md):
1. A Ready's `messages_now` leave at once; its snapshot, entries, hard state and compaction are appended
   to the WAL buffer; if it must be durable (entries, a snapshot, a term or vote change: etcd's
   MustSync) it waits for the group commit, then its `messages` leave, committed entries are applied,
   reads are served and the core advances.
2. A client write is answered OK only when its entry is committed and applied on this node (the leader)
   and the entry at that index still has the term it was proposed in.
3. Reads are served by a leader only through the core's read_index (lease, else a heartbeat round);
   ticks are caught up with the monotonic clock first, so a leader that was stopped sees its lease
   expire. The fast path (`read_now`) serves under the lease without a task when all is applied.
4. The map's membership (`configure`) is carried out by the leader as single-server configuration
   changes, removals first (control/raftrepair.py rule 2); a leader the map removed hands leadership to
   a member that stays first. Leadership goes to the preferred leader (members[0]) when connected,
   once per TRANSFER_INTERVAL_TICKS at most (`balance`).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import ClassVar, cast

import structlog

from raftblock.replication.image import close_image
from raftblock.replication.raft.core import RaftConfig, RaftCore, Ready
from raftblock.replication.raft.outbox import RaftOutbox
from raftblock.replication.raft.storage import bootstrap_snapshot
from raftblock.replication.raft.types import (
    NO_NODE,
    ConfChangeType,
    Entry,
    EntryType,
    GroupId,
    HardState,
    Message,
    NodeId,
    Role,
    Snapshot,
    SnapshotMeta,
)
from raftblock.replication.replica import NodeContext, ReplicaBase, ScrubView
from raftblock.replication.requests import NotLeaderError, Reply, RetryError
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import GroupDurable, WalStorage
from raftblock.storage.engine import NoSpaceError
from raftblock.wire import raftblock_pb2 as pb

log = structlog.get_logger(__name__)

CAUGHT_UP_ENTRIES = 64  # a follower this close to the commit index counts as caught up (report)
TRANSFER_INTERVAL_TICKS = 50  # per group: one leadership transfer attempt per 5 s at most


class RaftReplica(ReplicaBase):
    kind: ClassVar[str] = "raft"

    def __init__(self, ctx: NodeContext, out: RaftOutbox, gid: int, members: list[int], rec: GroupDurable | None,
                 epoch: int, rng: random.Random) -> None:
        """Without durable state: a founder (the map's first epoch) starts from the founding voters,
        recorded durably in the WAL with the group's first records; a replica added later (a joiner)
        starts with no configuration: it cannot campaign, and learns the configuration and the data from
        the leader (snapshot, then the log)."""
        app = rec.snap.app if rec is not None and rec.snap is not None else b""
        founding = epoch <= 1
        voters = frozenset(NodeId(m) for m in members) if founding else frozenset()
        boot = bootstrap_snapshot(voters).meta

        def image(meta: SnapshotMeta) -> object:
            return ctx.image_of(gid, meta.app)

        storage = WalStorage(ctx.wal, gid, rec, boot, image)  # type: ignore[arg-type]
        super().__init__(ctx, gid, storage, Sessions.decode(app))
        if rec is None and founding:
            ctx.wal.compact(gid, boot)
        cfg = ctx.cfg
        rc = RaftConfig(
            NodeId(ctx.node_id),
            GroupId(gid),
            election_timeout_ticks=cfg.election_timeout_ticks,
            heartbeat_interval_ticks=cfg.heartbeat_interval_ticks,
            lease_margin_ticks=cfg.lease_margin_ticks,
            snapshot_chunk_bytes=cfg.snapshot_chunk_bytes,
            # About 2 s without a chunk acknowledged before a stream restarts (rate-limited senders, busy
            # receivers); at most 8 chunks in flight per stream.
            snapshot_stall_heartbeats=max(2, 2000 // (cfg.tick_ms * cfg.heartbeat_interval_ticks)),
            image_sink=ctx.image_sink,  # received images go to a file, never whole in memory
        )
        self.out = out
        self.send = out.send  # type: ignore[method-assign]
        self.core = RaftCore(rc, storage, rng.randrange)
        self.has_ready = self.core.has_ready  # asked of every replica every turn
        self.hs = rec.hard_state if rec is not None else HardState()
        self.proposals: dict[int, tuple[int, list[Reply]]] = {}  # type: ignore[assignment]
        self.read_waits: list[tuple[int, asyncio.Future[int]]] = []  # (index, future): waiting for apply
        self.last_role = Role.FOLLOWER
        self.last_term = 0
        self.preferred = NO_NODE  # the preferred leader (members[0] in the map), 0 = none
        self.transfer_at_tick = 0  # earliest tick for the next transfer attempt
        # The map's membership and epoch for this group; its leader carries a difference out (rule 4).
        self.target: tuple[frozenset[NodeId], int] | None = None
        self.repairs: dict[int, float] = {}  # follower -> monotonic time its snapshot stream was first seen

    # == configuration (rule 4) ==================================================================================
    def configure(self, members: list[int], epoch: int) -> None:
        """The map's membership (also one that no longer names this node: its leader must still carry the
        change out, handing leadership on first). members[0] is the preferred leader."""
        if self.ctx.node_id in members:  # a member: members[0] leads; a departing one keeps its own hint
            self.preferred = NodeId(members[0])
        if self.target is None or epoch >= self.target[1]:
            self.target = (frozenset(NodeId(m) for m in members), epoch)
        self.reconfigure()

    def reconfigure(self) -> None:
        core = self.core
        ctx = self.ctx
        if self.target is None or core.role != Role.LEADER or ctx.failed is not None:
            return
        members, epoch = self.target
        voters = core.conf.voters
        if voters == members or epoch < core.conf.epoch:
            return
        removes = sorted(voters - members)
        adds = sorted(members - voters)
        if removes:
            node = removes[0]
            if node == ctx.node_id:
                if ctx.ticks >= self.transfer_at_tick:
                    self.transfer_at_tick = ctx.ticks + TRANSFER_INTERVAL_TICKS
                    to = next((m for m in sorted(members) if m in voters and m in ctx.links.conns), None)
                    if to is not None and core.transfer_leadership(to):
                        ctx.counters["leader_transfers"] += 1
                        ctx.dirty.add(self.id)
                return
            kind = ConfChangeType.REMOVE_VOTER
        else:
            node, kind = adds[0], ConfChangeType.ADD_VOTER
        if core.propose_conf_change(kind, node, epoch):
            ctx.counters["conf_changes_proposed"] += 1
            log.info("raft.conf_change", group=self.id, change=kind.name, node=int(node), epoch=epoch,
                     voters=sorted(int(v) for v in voters))
            ctx.dirty.add(self.id)
            ctx.kick()

    def balance(self) -> None:
        core = self.core
        ctx = self.ctx
        if (core.role != Role.LEADER or not self.preferred or self.preferred == ctx.node_id
                or ctx.ticks < self.transfer_at_tick or self.preferred not in ctx.links.conns):
            return
        self.transfer_at_tick = ctx.ticks + TRANSFER_INTERVAL_TICKS
        if core.transfer_leadership(self.preferred):
            ctx.counters["leader_transfers"] += 1
            ctx.dirty.add(self.id)

    def can_drop(self, deleted: bool) -> bool:
        """A leader hands leadership on first (reconfigure), then drops its copy; a deleted group's leader
        drops at once (nobody is left to hand over to)."""
        return self.rd is None and not self.waiting and (self.core.role != Role.LEADER or deleted)

    def report(self) -> list[int] | None:
        """For the metadata leader's Raft repair (control/raftrepair.py), at a leader: [configuration epoch,
        caught-up mask, voters...]: bit i says voters[i] (sorted) holds the log up to the commit index,
        give or take CAUGHT_UP_ENTRIES (the leader itself always)."""
        core = self.core
        if core.role != Role.LEADER:
            return None
        voters = sorted(int(v) for v in core.conf.voters)
        mask = 0
        for i, v in enumerate(voters):
            pr = core.prs.get(NodeId(v))
            if v == self.ctx.node_id or (pr is not None and pr.snap is None
                                         and pr.match + CAUGHT_UP_ENTRIES >= core.commit_index):
                mask |= 1 << i
        return [core.conf.epoch, mask, *voters]

    # == ticks and messages ======================================================================================
    def tick(self, n: int, now: int) -> None:
        core = self.core
        for _ in range(n):
            core.tick()

    def step(self, m: Message) -> None:
        ctx = self.ctx
        if m.dst != ctx.node_id:
            ctx.counters["raft_wrong_destination"] += 1
            return
        if m.term < self.core.term:
            ctx.counters["raft_stale_term"] += 1
        self.core.step(m)
        ctx.dirty.add(self.id)

    # == Ready (rule 1) ==========================================================================================
    def handle_ready(self) -> None:
        rd = self.core.ready()
        self.rd = rd
        send = self.out.send
        for m in rd.messages_now:
            send(m)
        if rd.snapshot is not None:
            snap = rd.snapshot
            log.info("raft.snapshot_install_started", group=self.id, bytes=len(snap.data), index=snap.meta.index,
                     leader=int(self.core.lead))
            self.start_install(rd, snap.data)
            return
        self.persist(rd, False)

    def installed(self, rd: Ready, app: bytes) -> None:
        snap = rd.snapshot
        assert snap is not None
        meta = snap.meta
        log.info("raft.snapshot_installed", group=self.id, bytes=len(snap.data), index=meta.index)
        self.storage.install_snapshot(Snapshot(SnapshotMeta(meta.index, meta.term, meta.conf, app), snap.data))
        self.ctx.counters["snapshots_installed"] += 1

    def persist(self, rd: Ready, must_sync: bool) -> None:
        st = self.storage
        if rd.entries:
            st.append(rd.entries)
            must_sync = True
        hs = rd.hard_state
        if hs is not None:
            st.set_hard_state(hs)
            if hs.term != self.hs.term or hs.vote != self.hs.vote:
                must_sync = True  # a commit index alone may be lost and relearned
            self.hs = hs
        if rd.compaction is not None:
            st.compact(rd.compaction)
        self.persisted(must_sync)

    def synced(self) -> None:
        if self.rd is not None and not self.installing:
            self.finish()

    def finish(self) -> None:
        rd = self.rd
        assert rd is not None
        core = self.core
        ctx = self.ctx
        send = self.out.send
        for m in rd.messages:
            send(m)
        done = 0
        try:
            for e in rd.committed_entries:
                self._apply(e)
                done += 1
        except NoSpaceError as ex:
            # Apply what fitted; the rest comes again in a later Ready, once space returns (the replica
            # stays out of the turn until the host unblocks it: its log keeps them, durable).
            rd.committed_entries = rd.committed_entries[:done]
            ctx.block_apply(self.id, ex)
        for rs in rd.read_states:
            fut = self.reads.pop(rs.ctx, None)
            if fut is not None:
                self.read_waits.append((rs.index, fut))
        for c in rd.reads_aborted:
            fut = self.reads.pop(c, None)
            if fut is not None and not fut.done():
                fut.set_exception(NotLeaderError(core.lead))
        core.advance(rd)
        self.rd = None
        if rd.snapshot is not None:
            close_image(rd.snapshot.data)  # installed and recorded: its staging file goes
        if core.role != self.last_role or core.term != self.last_term:
            if self.last_role == Role.LEADER and core.role != Role.LEADER:
                self.fail_requests(NotLeaderError(core.lead))
            if core.role == Role.LEADER and self.last_role != Role.LEADER:
                log.info("raft.leader", group=self.id, term=core.term)
            self.last_role = core.role
            self.last_term = core.term
        if self.read_waits:
            applied = core.applied_index
            keep: list[tuple[int, asyncio.Future[int]]] = []
            for idx, fut in self.read_waits:
                if idx <= applied:
                    if not fut.done():
                        fut.set_result(idx)
                else:
                    keep.append((idx, fut))
            self.read_waits = keep
        ctx.dirty.add(self.id)
        ctx.kick()

    def _apply(self, e: Entry) -> None:
        if e.type == EntryType.NORMAL and e.data:
            self.apply_data(e.index, e.data, e.term)
        p = self.proposals.pop(e.index, None)
        if p is not None:
            term, futs = p
            for fut in futs:
                if fut.done():
                    continue
                if term == e.term:
                    fut.set_result(e.index)
                else:
                    fut.set_exception(NotLeaderError(self.core.lead))

    def fail_requests(self, exc: Exception) -> None:
        super().fail_requests(exc)
        for _, fut in self.read_waits:
            if not fut.done():
                fut.set_exception(exc)
        self.read_waits = []

    def counters(self) -> dict[str, int]:
        return {}

    def pump(self) -> bool:
        return False

    def proposal_replies(self) -> list[list[Reply]]:
        return [replies for _, replies in self.proposals.values()]

    # == client ops (rules 2, 3) =================================================================================
    def check_writable(self) -> None:
        """This replica takes writes now (the leader of a node that has not failed), else the error."""
        failed = self.ctx.failed
        if failed is not None:
            raise RetryError(f"node failed: {failed!r}")
        if self.core.role != Role.LEADER:
            raise NotLeaderError(self.core.lead)

    def propose(self, replies: list[Reply], data: bytes) -> None:
        core = self.core
        index = core.propose(data)
        if index == 0:
            exc: Exception = NotLeaderError(core.lead) if core.role != Role.LEADER else RetryError("proposal refused")
            for r in replies:
                r.set_exception(exc)
            return
        self.proposals[index] = (core.term, replies)
        self.ctx.counters["entries_proposed"] += 1

    def read_now(self) -> bool:
        core = self.core
        idx = core.lease_read_now()
        return idx >= 0 and core.applied_index >= idx

    async def read_barrier(self) -> int:
        """Wait until this leader may serve a linearizable read (lease, else read-index) and has applied
        up to the read index; returns the applied index."""
        self.ctx.catch_up_ticks()  # a leader that was stopped must see its lease expire first
        self.check_writable()
        c = self.ctx.next_read_ctx()
        if not self.core.read_index(c, lease=True):
            if self.core.role != Role.LEADER:
                raise NotLeaderError(self.core.lead)
            raise RetryError("leader has not committed an entry of its term yet")
        await self.wait_read(c)
        return self.core.applied_index

    def applied(self) -> int:
        return self.core.applied_index

    def read_sources(self) -> list[int]:
        """The other voters, the order to ask them for a block this replica holds corrupt."""
        return sorted(int(p) for p in self.core.conf.voters if p != self.ctx.node_id)

    def scrub_view(self) -> ScrubView:
        """The other voters; this replica compares while it leads under its lease (not a deposed leader)."""
        core = self.core
        return ScrubView(lambda: core.applied_index, self.read_sources(),
                         core.role == Role.LEADER and core.lease_valid(), True)

    def repair_refusal(self, source: int) -> str | None:
        """Why this replica must not copy a range from `source` now (SCRUB_REPAIR), or None. Only a
        follower of that very leader does: its copy may then hold data newer than its applied index,
        which it re-applies before it can serve a read. A leader must never go back in time, and a
        deposed leader's word is no order."""
        core = self.core
        if core.role != Role.FOLLOWER or int(core.lead) != source:
            return f"not a follower of node {source} (role {core.role.name}, leader {int(core.lead)})"
        return None

    # == compaction ==============================================================================================
    def compaction_point(self) -> tuple[int, Sessions, bytes] | None:
        return self.core.applied_index, self.sessions, self.sessions.encode()

    def compact(self, point: int, sess: Sessions, app: bytes) -> bool:
        """After an engine fdatasync that covers everything applied up to `point`: the core compacts its
        log there (the COMPACT record goes out with its next Ready)."""
        c = self.core
        if self.sessions is not sess or not (c.log.snap_index < point <= c.applied_index):
            return False  # an image was installed meanwhile, or nothing to compact
        if not c.compact(point, cast(bytes, self.ctx.image_of(self.id, app)), app):
            return False
        self.ctx.dirty.add(self.id)
        return True

    # == status ==================================================================================================
    def chunk_stale(self, m: Message) -> bool:
        """The follower already holds this snapshot chunk, or this leader no longer streams it that
        snapshot (RaftOutbox drops such held chunks)."""
        core = self.core
        pr = core.prs.get(m.dst) if core.role == Role.LEADER else None
        if pr is None or pr.snap is None or m.snap_meta is None or pr.snap.meta.index != m.snap_meta.index:
            return True
        return m.chunk_index < pr.snap_acked

    def repair_info(self) -> dict[str, int]:
        """The first follower this leader is sending a snapshot to: GroupInfo.repair_* fields."""
        c = self.core
        if c.role != Role.LEADER:
            self.repairs.clear()
            return {}
        streams = {v: pr for v, pr in c.prs.items() if pr.snap is not None and v != self.ctx.node_id}
        for v in list(self.repairs):
            if v not in streams:
                del self.repairs[v]
        for v, pr in sorted(streams.items()):
            snap = pr.snap
            assert snap is not None
            if pr.snap_sent == 0:
                continue  # not started: the image is built at the first chunk
            total = len(snap.data)
            started = self.repairs.get(int(v), time.monotonic())
            return {"repair_node": int(v),
                    "repair_bytes_done": min(total, pr.snap_acked * self.ctx.cfg.snapshot_chunk_bytes),
                    "repair_bytes_total": total,
                    "repair_elapsed_ms": int((time.monotonic() - started) * 1000)}
        return {}

    def info(self, allocated_bytes: int) -> pb.GroupInfo:
        c = self.core
        return pb.GroupInfo(
            **self.repair_info(),  # type: ignore[arg-type]
            group=self.id,
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
