# Deterministic simulation of one chain-replicated group (raftblock.replication.chain.ChainCore).
#
# Owns: the only PRNG (random.Random(seed)); virtual time; a network that drops, duplicates, delays,
# reorders and partitions, and sometimes holds a message back for a long time (a "ghost" from an old
# epoch); slow disks (a Ready's write ends steps later while the core goes on); crashes that lose
# everything not persisted (tearing the write in progress), after which the node restarts either from
# its durable log (ChainCore.restore: snapshot, records with their epochs, the last adopted config
# epoch) or blank (silent until removed); the metadata group as production runs it: a MetaState, the
# FailureDetector (suspect after a grace longer than the lease) and control/chainrepair's
# plan_chain_changes over the reports ChainReplica.report would send, every change applied to the map and
# installed from it; what the planner does not decide (wiping a node before it is re-added, registering a
# fresh one when no spare is up); a client that writes at the head and reads at the tail of the
# configuration it believes current (sometimes a stale one).
#
# Rules:
# 1. One thread, no clocks, no I/O: a seed and a step count determine the run bit for bit, so a failing
#    seed replays with `python -m raftblock.testing.chainsim --seed N --steps S`.
# 2. The simulator drives the very ChainCore a runtime would and honours the Ready contract the way a
#    runtime must: messages_now, then persist, then messages and client acks, then apply, reads, advance
#    (one Ready outstanding at a time; step/tick/propose/read go on while its write is in progress).
# 3. Checkers run on every event, incrementally (docs/chain.md lists them): no acknowledged write lost
#    (the head of every new configuration holds them all); every applied sequence is a prefix of one
#    history (a snapshot, even below what was applied, restarts the state machine at its seq and
#    digest); reads not stale; no ACK before persist; a client ack only from the head of its epoch with
#    the write durable on every member of that epoch; one (epoch, seq) names one record (the premise of
#    log matching); no member removed before its lease expired; liveness once the faults stop.
# 4. The planner's rules are checked, not restated: the simulator never overrides a change it makes.
from __future__ import annotations

import argparse
import heapq
import random
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Sequence
from typing import cast

from raftblock.control.chainrepair import plan_chain_changes
from raftblock.control.health import FailureDetector, HealthConfig
from raftblock.meta.state import (
    CreateVolume,
    InitCluster,
    MetaState,
    RegisterNode,
    SetGroupMembers,
    SetNodeStates,
    StateChange,
)
from raftblock.replication.chain.core import MUTATIONS, ChainCore
from raftblock.replication.chain.replica import ChainReplica
from raftblock.replication.chain.types import (
    ChainConfig,
    ChainMessage,
    ChainReady,
    ChainSnapshot,
    GroupId,
    MessageType,
    NodeId,
    Record,
)

GROUP = GroupId(9)
# Planted bugs outside the core (the core's are core.MUTATIONS): a runtime that reports a member caught up
# as soon as it has adopted the epoch (the planner may then make a member that lacks acknowledged
# writes head).
SIM_MUTATIONS = frozenset({"report_caught_up_early"})
_SM = struct.Struct("<QI")  # state-machine image: applied seq, digest
_MT = MessageType


class SimFailure(AssertionError):
    def __init__(self, seed: int, steps: int, step: int, reason: str, mutations: frozenset[str]) -> None:
        self.seed = seed
        self.step = step
        self.reason = reason
        mut = "".join(f" --mutation {m}" for m in sorted(mutations))
        super().__init__(
            f"chain simulation failed: seed={seed} step={step}: {reason}\n"
            f"  replay: python -m raftblock.testing.chainsim --seed {seed} --steps {steps}{mut}"
        )


class SimStats:
    __slots__ = (
        "steps",
        "proposed",
        "writes_acked",
        "acks_old_epoch",
        "reconfigs",
        "joins",
        "snapshots_installed",
        "reads_served",
        "reads_refused",
        "crashes",
        "restarts_with_log",
        "restarts_blank",
        "checkpoints",
        "epoch_bumps",
        "bumps_unsettled",
        "removals",
        "removals_unsettled",
        "fresh_nodes",
        "rejoins_with_log",
        "sync_mismatch",
        "sync_ahead",
        "snapshots_below_applied",
        "torn_writes",
        "slow_writes",
        "isolations",
        "faults_catching_up",
        "oracle_cuts",
        "ghosts",
        "stale_refused",
        "stale_client_ops",
        "messages",
    )

    def __init__(self) -> None:
        self.steps = 0
        self.proposed = 0
        self.writes_acked = 0
        self.acks_old_epoch = 0
        self.reconfigs = 0
        self.joins = 0
        self.snapshots_installed = 0
        self.reads_served = 0
        self.reads_refused = 0
        self.crashes = 0
        self.restarts_with_log = 0  # crashed nodes restarted from their durable log (ChainCore.restore)
        self.restarts_blank = 0  # crashed nodes restarted with a blank core (fenced until removed)
        self.checkpoints = 0  # durable state-machine images taken before a crash (log compacted to them)
        self.epoch_bumps = 0  # planner: same members, epoch + 1, for a member restarted from its log
        self.bumps_unsettled = 0  # ... while another member had not settled (adopted and caught up)
        self.removals = 0  # planner: a member not up removed
        self.removals_unsettled = 0  # ... while a survivor after the next head was still catching up
        self.fresh_nodes = 0  # nodes registered because no node was up outside the short chain
        self.rejoins_with_log = 0  # removed nodes re-added at the tail with their log (not wiped)
        self.sync_mismatch = 0  # SYNCs answered with a snapshot: (seq, epoch) not in the predecessor's log
        self.sync_ahead = 0  # SYNCs answered with a snapshot: the successor's log was longer
        self.snapshots_below_applied = 0  # snapshot installs that replaced a state machine further on
        self.torn_writes = 0
        self.slow_writes = 0  # Readies whose disk write completed steps later (the core went on meanwhile)
        self.isolations = 0
        self.faults_catching_up = 0  # the predecessor of a member catching up failed (its disk kept)
        self.oracle_cuts = 0
        self.ghosts = 0
        self.stale_refused = 0
        self.stale_client_ops = 0
        self.messages = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

    def add(self, other: SimStats) -> None:
        for k in self.__slots__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


class SimNode:
    """One server: a core (None while down), its durable store and its state machine.

    The durable store is what a restart can load: a snapshot (seq, the epoch of its record, the image's
    digest), the records after it with their epochs (consecutive up to `durable_last`), and the last
    config epoch the node adopted (the runtime persists it before adopting the config)."""

    __slots__ = (
        "id",
        "core",
        "alive",
        "incarnation",
        "restart_at",
        "keep_log",
        "from_log",
        "pending",
        "pending_at",
        "ready_epoch",
        "pending_epochs",
        "pending_current",
        "loaded",
        "isolated_until",
        "cut_until",
        "snap_seq",
        "snap_epoch",
        "snap_digest",
        "recs",
        "durable_last",
        "durable_epoch",
        "sm_seq",
        "sm_digest",
    )

    def __init__(self, node_id: NodeId) -> None:
        self.id = node_id
        self.core: ChainCore | None = None
        self.alive = False
        self.incarnation = 0
        self.restart_at = -1
        self.keep_log = False  # while down: the next restart loads the durable log (else blank)
        self.from_log = False  # this incarnation restored its core from the durable log
        self.loaded = True  # the core reflects the durable store (False: a blank core over a kept disk)
        self.pending: ChainReady | None = None  # a Ready whose disk write is still in progress
        self.pending_at = -1  # ... until this step
        self.ready_epoch = 0  # the core's epoch at its last ready()
        self.pending_epochs = (0, 0)  # the core's epochs at the ready() before the last one and at the last
        self.pending_current = False  # the last Ready's records came to a member of the current epoch
        self.isolated_until = -1  # cut from peers and from the oracle
        self.cut_until = -1  # cut from the oracle only (peers still reachable)
        self.wipe()

    def wipe(self) -> None:
        self.snap_seq = 0
        self.snap_epoch = 0
        self.snap_digest = 0
        self.recs: dict[int, Record] = {}
        self.durable_last = 0
        self.durable_epoch = 0
        self.sm_seq = 0
        self.sm_digest = 0

    def image(self) -> ChainSnapshot:
        return ChainSnapshot(self.sm_seq, _SM.pack(self.sm_seq, self.sm_digest))

    def durable_records(self) -> list[Record]:
        return [self.recs[s] for s in range(self.snap_seq + 1, self.durable_last + 1)]

    def holds(self, seq: int, data: bytes) -> bool:
        """Durably holds write `seq` with `data` (a snapshot covering it counts; its digest was checked)."""
        if seq <= self.snap_seq:
            return True
        if seq > self.durable_last:
            return False
        rec = self.recs.get(seq)
        return rec is not None and rec.data == data


class _ReplicaView:
    """What ChainReplica.report reads of a member: its `core` (the SimNode has one)."""

    __slots__ = ("sn",)

    def __init__(self, sn: SimNode) -> None:
        self.sn = sn

    @property
    def core(self) -> ChainCore | None:
        return self.sn.core


class Simulation:
    def __init__(self, seed: int, steps: int = 2000, mutations: frozenset[str] = frozenset()) -> None:
        self.seed = seed
        self.steps = steps
        assert mutations <= MUTATIONS | SIM_MUTATIONS, mutations - MUTATIONS - SIM_MUTATIONS
        self.mutations = mutations
        self.rng = random.Random(seed)
        r = self.rng
        # Per-seed shape.
        self.chain_len = r.choice((1, 2, 3, 3, 3, 4))
        self.inflight_max = r.choice((2, 8, 64))
        self.batch_max = r.choice((1, 4, 16))
        self.retry_interval = r.choice((3, 6))
        self.lease = 20
        self.grace = self.lease + r.choice((5, 15))  # the oracle removes only after the lease expired
        self.p_drop = r.choice((0.0, 0.02, 0.08))
        self.p_dup = r.choice((0.0, 0.02))
        self.p_ghost = r.choice((0.0, 0.005, 0.02))
        self.delay_max = r.choice((1, 3, 6))
        self.p_crash = r.choice((0.002, 0.006))
        self.p_crash_in_ready = r.choice((0.0005, 0.002))
        self.p_isolate = r.choice((0.002, 0.006))
        self.p_cut = r.choice((0.002, 0.006))
        self.p_propose = r.choice((0.3, 0.7))
        self.p_read = 0.3
        self.p_stale_client = r.choice((0.05, 0.2))
        self.p_keep_log = 0.5  # a restart loads the durable log (else: blank core, fenced until removed)
        self.p_checkpoint = 0.5  # before a crash, the runtime had checkpointed its state machine
        self.p_rejoin_log = 0.5  # a removed node with a loaded core is re-added with its log (else wiped)
        self.p_slow_disk = r.choice((0.0, 0.05, 0.2))  # a Ready's disk write completes only later
        self.slow_disk_max = r.choice((2, 6))
        # per step while a member catches up: its predecessor fails (_fault_catching_up)
        self.p_fault_catching_up = r.choice((0.0, 0.01, 0.03))

        self.now = 0
        self.step_no = 0
        self.stats = SimStats()
        self.net: list[tuple[int, int, ChainMessage]] = []
        self.msg_no = 0
        self.nodes: dict[NodeId, SimNode] = {}
        self.next_id = 1
        # Oracle (metadata group) state: the real map (MetaState: nodes with one rack each, one chain group
        # whose members and epoch are the configuration installed here), the real failure detector, the
        # members' latest reports (as the metadata leader keeps them from heartbeats), and the real
        # planner (control/chainrepair.plan_chain_changes) deciding every configuration change.
        self.meta = MetaState()
        self.meta.apply(InitCluster("chainsim", replicas=self.chain_len))
        # suspect once silent for more than the grace (longer than the lease), down after three graces
        self.detector = FailureDetector(
            HealthConfig(
                heartbeat_interval_ms=1,
                suspect_after_missed=self.grace + 1,
                down_grace_ms=3 * self.grace,
                proposal_interval_ms_min=0,
            ),
            0,
        )
        self.reports: dict[NodeId, dict[int, list[int]]] = {}
        self.host_views: dict[NodeId, _ReplicaView] = {}
        self.plan_inputs_changed = True  # the map or a report changed since the planner last ran
        self.configs: dict[int, ChainConfig] = {}
        self.lease_until: dict[NodeId, int] = {}
        self.member_inc: dict[NodeId, int] = {}  # incarnation that holds the member's place
        # Joiners, members restarted in place and the members after them -> seq they must hold durably
        # before the checkers count them as caught up (bookkeeping of checker 1, not a rule of the planner).
        self.catching_up: dict[NodeId, int] = {}
        # Checker state.
        # seq -> (data, digest after, epoch of the record), from the first apply anywhere
        self.hist: dict[int, tuple[bytes, int, int]] = {}
        self.names: dict[tuple[int, int], bytes] = {}  # (epoch, seq) -> data of every record persisted
        self.acked: dict[int, bytes] = {}
        self.max_acked = 0
        self.reads: dict[int, tuple[NodeId, int]] = {}  # ctx -> (node, max acked when invoked)
        self.read_ctx = 0
        self.write_id = 0

        for _ in range(self.chain_len):
            self._new_node()
        res = self.meta.apply(CreateVolume("v", self.meta.extent_size_bytes, 0, "chain"))
        assert res.ok, res
        (gid,) = res.value["groups"]
        self.meta_gid = int(gid)
        self._install(self._map_config())  # the placement's order (head first)
        self.catching_up.clear()  # founders start together, empty

    # == run ===================================================================================================
    def run(self) -> SimStats:
        try:
            for step in range(self.steps):
                self.step_no = step
                self._step(faults=True)
            self._check_liveness()
        except SimFailure:
            raise
        except Exception as e:  # an assertion inside the core fails this seed too
            raise self._fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from e
        self.stats.steps = self.steps
        return self.stats

    def _fail(self, reason: str) -> SimFailure:
        return SimFailure(self.seed, self.steps, self.step_no, reason, self.mutations)

    @property
    def cur(self) -> ChainConfig:
        """The current configuration (the newest installed)."""
        return self._cur

    def _step(self, faults: bool) -> None:
        self.now += 1
        r = self.rng
        for sn in list(self.nodes.values()):
            if not sn.alive and sn.restart_at == self.now:
                self._restart(sn, "log" if sn.keep_log else "blank")
        self._disk_done()
        if faults:
            if r.random() < self.p_crash:
                self._crash_someone()
            if r.random() < self.p_isolate:
                self._fault_someone(isolate=True)
            if r.random() < self.p_cut:
                self._fault_someone(isolate=False)
            if self.catching_up and r.random() < self.p_fault_catching_up:
                self._fault_catching_up()
        if r.random() < self.p_propose:
            self._client_write()
        if r.random() < self.p_read:
            self._client_read()
        # -- network ---------------------------------------------------------------------------------------
        budget = 5000
        net = self.net
        while net and net[0][0] <= self.now and budget:
            budget -= 1
            _, _, m = heapq.heappop(net)
            dst = self.nodes.get(m.dst)
            src = self.nodes.get(m.src)
            if (
                dst is None
                or dst.core is None
                or self._isolated(dst)
                or (src is not None and self._isolated(src))
            ):
                continue
            c = dst.core.counters
            before = (c["stale_epoch"], c["sync_mismatch"], c["sync_ahead"])
            dst.core.step(m)
            self.stats.stale_refused += c["stale_epoch"] - before[0]
            self.stats.sync_mismatch += c["sync_mismatch"] - before[1]
            self.stats.sync_ahead += c["sync_ahead"] - before[2]
            self._drain(dst)
        # -- time and the oracle -----------------------------------------------------------------------------
        for sn in list(self.nodes.values()):
            if sn.core is not None:
                sn.core.tick(self.now)
                self._drain(sn)
        self._oracle(faults)

    # == nodes ===================================================================================================
    def _new_node(self) -> SimNode:
        """A fresh node, registered in the map in a rack of its own (members must use distinct racks)."""
        sn = SimNode(NodeId(self.next_id))
        self.next_id += 1
        self.nodes[sn.id] = sn
        res = self.meta.apply(RegisterNode(int(sn.id), f"rack{int(sn.id)}", f"sim:{int(sn.id)}", 1 << 40, self.now))
        assert res.ok, res
        self.plan_inputs_changed = True
        self.detector.heartbeat(sn.id, self.now)
        self._restart(sn, "wipe")
        return sn

    def _restart(self, sn: SimNode, mode: str) -> None:
        """Start a new incarnation. "log": the core restores what the node left durable (snapshot,
        records with their epochs, the last adopted epoch) and waits for a newer configuration (the oracle
        bumps the epoch, or re-adds it at the tail with its log). "blank": a blank core; the disk keeps
        what was durable (the checkers still look at it) but the core does not load it, so the oracle
        fences it out until it is removed, then re-adds it wiped. "wipe": the disk is wiped too (a fresh
        or wiped joiner)."""
        assert mode in ("log", "blank", "wipe"), mode
        if mode == "wipe":
            sn.wipe()
        sn.pending = None  # a running node wiped to rejoin: its write in progress is void
        sn.incarnation += 1
        sn.core = ChainCore(
            sn.id,
            GROUP,
            sn.image,
            inflight_max=self.inflight_max,
            batch_max=self.batch_max,
            uncommitted_max=256,
            retry_interval=self.retry_interval,
            mutations=self.mutations & MUTATIONS,
        )
        sn.from_log = mode == "log"
        sn.loaded = mode != "blank"
        if mode == "log":
            # The runtime reloads the state machine from the durable image and replays nothing below it;
            # the records after it are re-applied once the chain has matched them (ChainCore.restore).
            self._check_image(sn, sn.snap_seq, sn.snap_digest, sn.snap_epoch, "restores")
            sn.sm_seq, sn.sm_digest = sn.snap_seq, sn.snap_digest
            sn.core.restore(sn.snap_seq, sn.snap_epoch, sn.durable_records(), sn.durable_epoch)
            self.stats.restarts_with_log += 1
        elif mode == "blank":
            self.stats.restarts_blank += 1
        sn.ready_epoch = sn.core.epoch
        sn.core.tick(self.now)
        sn.alive = True
        sn.restart_at = -1

    def _crash(self, sn: SimNode, torn: ChainReady | None, keep_log: bool = False) -> None:
        """Lose everything volatile; with `torn`, keep only a prefix of that Ready's writes. Before that,
        maybe the runtime had checkpointed its state machine (the durable log then starts at its image).
        Whether the restart loads the durable log is chosen now; the only member of a chain always does
        (it holds the only copy), and so does a node crashing while a member catches up (`keep_log`) or
        while a member does not report itself caught up yet: losing the disk then is a second failure
        before the chain has re-synced after a change (the planner may have to wait for this node)."""
        if self.rng.random() < self.p_checkpoint:
            self._checkpoint(sn)
        sole = self.cur.members == (sn.id,)
        resynced = all(self._reports_caught_up(self.nodes[nid]) for nid in self.cur.members)
        sn.keep_log = sole or keep_log or not resynced or self.rng.random() < self.p_keep_log
        if torn is None and sn.pending is not None:
            torn = sn.pending  # the slow disk was still writing it
        sn.pending = None
        if torn is not None:
            self.stats.torn_writes += 1
            complete = True
            if torn.snapshot is not None:
                complete = self.rng.random() < 0.5
                if complete:
                    self._persist_snapshot(sn, torn.snapshot)
            if complete:
                self._persist_records(
                    sn, torn.records[: self.rng.randint(0, len(torn.records))], sn.pending_current
                )
        sn.core = None
        sn.alive = False
        self.stats.crashes += 1
        sn.restart_at = self.now + self.rng.randint(1, 3 * self.grace)

    def _isolated(self, sn: SimNode) -> bool:
        return sn.isolated_until > self.now

    def _reachable(self, sn: SimNode) -> bool:
        """Can the oracle (metadata group) talk to this node?"""
        return sn.alive and sn.isolated_until <= self.now and sn.cut_until <= self.now

    def _healthy_count_ok(self) -> bool:
        """Faults are injected one at a time: only while the current configuration is established (but
        see _fault_catching_up)."""
        return self._established() and all(
            self._reachable(sn) for sn in self.nodes.values() if sn.id in self.cur.members
        )

    def _may_crash(self, sn: SimNode) -> bool:
        # The sole member of a chain may crash too: it always restarts from its durable log (_crash).
        return self._healthy_count_ok()

    def _crash_someone(self) -> None:
        live = [sn for sn in self.nodes.values() if sn.alive]
        if live and self._may_crash(victim := self.rng.choice(live)):
            self._crash(victim, None)

    def _fault_catching_up(self) -> None:
        """The one fault injected while the configuration is not established: a member is still catching
        up (a joiner, a member restarted in place or one after it), every member is heard from, and the
        member it syncs from crashes (its disk kept: the one that catches up may lack acknowledged writes,
        so this is not a second failure) or is isolated. The planner must not make the member that
        catches up head before it holds every acknowledged write; the chain may wait for the other."""
        cur = self.cur
        behind = [i for i, nid in enumerate(cur.members) if i and nid in self.catching_up]
        if not behind or not all(self._heartbeats(self.nodes[nid]) for nid in cur.members):
            return
        victim = self.nodes[cur.members[self.rng.choice(behind) - 1]]
        self.stats.faults_catching_up += 1
        if self.rng.random() < 0.5:
            self._crash(victim, None, keep_log=True)
        else:
            victim.isolated_until = self.now + self.rng.randint(3, 3 * self.grace)
            self.stats.isolations += 1

    def _fault_someone(self, isolate: bool) -> None:
        live = [sn for sn in self.nodes.values() if sn.alive]
        if not live or not self._healthy_count_ok():
            return
        sn = self.rng.choice(live)
        until = self.now + self.rng.randint(3, 3 * self.grace)
        if isolate:
            sn.isolated_until = until
            self.stats.isolations += 1
        else:
            sn.cut_until = until
            self.stats.oracle_cuts += 1

    # == the Ready loop (what a runtime does) ===================================================================
    def _drain(self, sn: SimNode) -> None:
        r = self.rng
        while True:
            core = sn.core
            if core is None or sn.pending is not None or not core.has_ready():
                return
            rd = core.ready()
            # When the Ready's contents were made: since the previous ready(), in epochs from that one's to
            # this one's (the core may have adopted configurations meanwhile, and the disk write may end
            # after it moved on). Client acks belong to one of these epochs; records are checked against
            # the acknowledged ones only if they were all received as a member of the current epoch.
            sn.pending_epochs = (sn.ready_epoch, core.epoch)
            sn.ready_epoch = core.epoch
            sn.pending_current = (
                sn.pending_epochs == (self.cur.epoch, self.cur.epoch) and sn.id in self.cur.members
            )
            crash_at = r.random()
            if crash_at < self.p_crash_in_ready and self._may_crash(sn):
                self._crash(sn, None)
                return
            for m in rd.messages_now:
                self._check_durable(sn, m)
                self._send(m)
            if crash_at < 2 * self.p_crash_in_ready and self._may_crash(sn):
                self._crash(sn, rd)  # after the early sends, during the write
                return
            if r.random() < self.p_slow_disk:
                # A slow disk: the write (and what follows it) completes in a later step; meanwhile the core
                # steps, ticks and forwards (pipelining), and a crash tears this write.
                sn.pending = rd
                sn.pending_at = self.now + r.randint(1, self.slow_disk_max)
                self.stats.slow_writes += 1
                return
            self._finish(sn, core, rd)

    def _finish(self, sn: SimNode, core: ChainCore, rd: ChainReady) -> None:
        """The rest of the Ready contract once the disk write is done: persist, ACKs and client acks,
        install and apply, reads, advance."""
        if rd.snapshot is not None:
            self._persist_snapshot(sn, rd.snapshot)
        self._persist_records(sn, rd.records, sn.pending_current)
        for m in rd.messages:
            self._check_durable(sn, m)
            self._send(m)
        if rd.snapshot is not None:
            self._install_snapshot(sn, rd.snapshot)
        for rec in rd.applies:
            self._apply(sn, rec)
        for seq in rd.client_acks:
            self._client_ack(sn, sn.pending_epochs, seq)
        for ctx, seq in rd.reads:
            self._serve_read(sn, ctx, seq)
        core.advance(rd)

    def _disk_done(self) -> None:
        for sn in list(self.nodes.values()):
            rd = sn.pending
            if rd is not None and sn.pending_at <= self.now and sn.core is not None:
                sn.pending = None
                self._finish(sn, sn.core, rd)
                self._drain(sn)

    def _persist_snapshot(self, sn: SimNode, snap: ChainSnapshot) -> None:
        seq, digest = _SM.unpack(snap.image)
        sn.snap_seq = snap.seq
        sn.snap_epoch = snap.epoch
        sn.snap_digest = digest
        sn.recs = {}
        sn.durable_last = snap.seq

    def _persist_records(self, sn: SimNode, records: Sequence[Record], current: bool) -> None:
        """`current`: the records came to a member of the current epoch (when the Ready was made); the
        check below holds if it still is one now that they are written."""
        core = sn.core
        current = current and core is not None and core.epoch == self.cur.epoch and sn.id in self.cur.members
        for rec in records:
            seq, data = rec.seq, rec.data
            if seq != sn.durable_last + 1:
                raise self._fail(f"node {sn.id} persists seq {seq} after {sn.durable_last} (not consecutive)")
            want = self.acked.get(seq)
            # A zombie head (an old epoch's head, out of the current configuration) may persist its own
            # records under seqs the current chain used: harmless, when it rejoins its SYNC does not match
            # (another epoch at that seq) and a snapshot replaces its log, or it is wiped.
            if want is not None and want != data and current:
                raise self._fail(f"node {sn.id} persists other data at acknowledged seq {seq}")
            name = (rec.epoch, seq)
            prev = self.names.setdefault(name, data)
            if prev != data:
                raise self._fail(
                    f"node {sn.id} persists record {seq} of epoch {rec.epoch} with other data than another"
                    " record of that name: (epoch, seq) no longer names one record (log matching broken)"
                )
            if rec.epoch > sn.durable_epoch:
                raise self._fail(
                    f"node {sn.id} persists record {seq} of epoch {rec.epoch}, newer than any epoch it adopted"
                    f" ({sn.durable_epoch})"
                )
            sn.recs[seq] = rec
            sn.durable_last = seq

    def _checkpoint(self, sn: SimNode) -> None:
        """The runtime makes its state machine's image durable and compacts the log to it."""
        seq = sn.sm_seq
        if seq <= sn.snap_seq:
            return
        rec = sn.recs.get(seq)
        if rec is None or seq > sn.durable_last:
            raise self._fail(f"node {sn.id} applied {seq} but holds durably only up to {sn.durable_last}")
        sn.snap_seq, sn.snap_epoch, sn.snap_digest = seq, rec.epoch, sn.sm_digest
        for s in [s for s in sn.recs if s <= seq]:
            del sn.recs[s]
        self.stats.checkpoints += 1

    def _check_image(self, sn: SimNode, seq: int, digest: int, epoch: int, what: str) -> None:
        """A snapshot agrees with the history: its digest, and the epoch of its record (log matching
        after it compares that epoch)."""
        h = self.hist.get(seq)
        if seq and (h is None or h[1] != digest):
            raise self._fail(f"node {sn.id} {what} a snapshot at {seq} that disagrees with the history")
        if seq and h is not None and h[2] != epoch:
            raise self._fail(
                f"node {sn.id} {what} a snapshot at {seq} labelled epoch {epoch}, but that record's epoch is"
                f" {h[2]}"
            )

    def _install_snapshot(self, sn: SimNode, snap: ChainSnapshot) -> None:
        """The image replaces the state machine, even one that had applied further (a member whose log
        did not match its predecessor's): applying restarts at the image's seq and digest."""
        seq, digest = _SM.unpack(snap.image)
        if seq != snap.seq:
            raise self._fail(f"node {sn.id} snapshot image at {seq} labelled {snap.seq}")
        self._check_image(sn, seq, digest, snap.epoch, "installs")
        if seq < sn.sm_seq:
            self.stats.snapshots_below_applied += 1
        sn.sm_seq, sn.sm_digest = seq, digest
        self.stats.snapshots_installed += 1

    def _apply(self, sn: SimNode, rec: Record) -> None:
        """Checker 2: every member's applied sequence is a prefix of one history (after a snapshot install
        or a restart from the log, the state machine restarts at the image's seq and digest)."""
        seq, data = rec.seq, rec.data
        if seq != sn.sm_seq + 1:
            raise self._fail(f"node {sn.id} applies seq {seq} after {sn.sm_seq} (out of order)")
        if not sn.holds(seq, data):
            raise self._fail(f"node {sn.id} applies seq {seq} that is not durable here")
        digest = zlib.crc32(data, sn.sm_digest)
        h = self.hist.get(seq)
        if h is None:
            self.hist[seq] = (data, digest, rec.epoch)
        elif h[1] != digest:
            raise self._fail(
                f"node {sn.id} applies seq {seq} with {'same' if h[0] == data else 'other'} data but a"
                " different history: applied sequences are not prefixes of one another"
            )
        elif h[2] != rec.epoch:
            raise self._fail(f"node {sn.id} applies seq {seq} of epoch {rec.epoch}, the history's is {h[2]}")
        sn.sm_seq, sn.sm_digest = seq, digest

    # == checkers ===============================================================================================
    def _check_durable(self, sn: SimNode, m: ChainMessage) -> None:
        """Checker 4: an ACK leaves only once its seq is durable on the sender."""
        self.stats.messages += 1
        if m.type == _MT.ACK and m.seq > sn.durable_last:
            raise self._fail(
                f"node {sn.id} sends ACK({m.seq}) in epoch {m.epoch} but has only {sn.durable_last} durable:"
                " ack before persist"
            )

    def _client_ack(self, sn: SimNode, epochs: tuple[int, int], seq: int) -> None:
        """Checkers 4 and 5: a client ack comes from the head of its epoch, with the write durable on every
        member of that epoch; a removed member or a zombie of an older epoch cannot produce one. The ack
        was made in one of `epochs` (lo, hi): the core's epochs at the previous ready() and at the one
        that handed it out."""
        h = self.hist.get(seq)
        if h is None or sn.sm_seq < seq:
            raise self._fail(f"node {sn.id} acks seq {seq} to a client before applying it")
        data = h[0]
        epoch, why = -1, f"is not head of epoch {epochs[1]}"
        for e in range(epochs[1], epochs[0] - 1, -1):
            cfg = self.configs.get(e)
            if cfg is None or cfg.head != sn.id:
                continue
            lacking = [m for m in (self.nodes[nid] for nid in cfg.members) if not m.holds(seq, data)]
            if not lacking:
                epoch = e
                break
            m = lacking[0]
            why = (
                f"in epoch {e} member {m.id} does not hold it durably (durable up to {m.durable_last},"
                f" snapshot {m.snap_seq})"
            )
        if epoch < 0:
            raise self._fail(f"head {sn.id} acks seq {seq} to a client but {why}")
        prev = self.acked.get(seq)
        if prev is not None and prev != data:
            raise self._fail(f"seq {seq} acknowledged twice with different data")
        if prev is None:
            self.acked[seq] = data
            self.stats.writes_acked += 1
            if epoch < self.cur.epoch:
                self.stats.acks_old_epoch += 1
        self.max_acked = max(self.max_acked, seq)

    def _serve_read(self, sn: SimNode, ctx: int, seq: int) -> None:
        """Checker 3: a read reflects every write acknowledged before it was invoked."""
        req = self.reads.pop(ctx, None)
        if req is None:
            return
        _, required = req
        if sn.sm_seq < seq:
            raise self._fail(f"node {sn.id} serves read {ctx} at {seq} but has applied only {sn.sm_seq}")
        if seq < required:
            raise self._fail(
                f"stale read ctx={ctx} on node {sn.id} (epoch {sn.core.epoch if sn.core else '-'}): state at"
                f" seq {seq}, but seq {required} was acknowledged before the read began"
            )
        h = self.hist.get(seq)
        if seq and (h is None or h[1] != sn.sm_digest and seq == sn.sm_seq):
            raise self._fail(f"read on node {sn.id} at {seq} sees a state off the history")
        self.stats.reads_served += 1

    def _check_reconfig(self, old: ChainConfig, new: ChainConfig) -> None:
        """Checker 1: every member carried over from the old configuration holds every acked write (a
        member restarted from its log, given a newer epoch in place, too: it held them when it crashed).
        The head of the new configuration holds them even if it was counted as catching up: the planner
        promotes only a member that reports itself caught up (everyone after it syncs from it)."""
        self._check_holds_acked(self.nodes[new.head], self.max_acked, f"head of {new}")
        for nid in new.members:
            if nid not in old.members or nid in self.catching_up:
                continue
            self._check_holds_acked(self.nodes[nid], self.max_acked, f"after reconfiguration to {new}")

    def _check_holds_acked(self, sn: SimNode, hi: int, when: str) -> None:
        """`sn` durably holds every acknowledged write up to `hi` (the last 64 of them: incremental)."""
        for seq in range(max(sn.snap_seq, hi - 64) + 1, hi + 1):
            data = self.acked.get(seq)
            if data is not None and not sn.holds(seq, data):
                rec = sn.recs.get(seq) if seq <= sn.durable_last else None
                raise self._fail(
                    f"{when}, member {sn.id} lacks acknowledged seq {seq} (durable up to {sn.durable_last},"
                    f" snapshot {sn.snap_seq}; {'holds other data' if rec else 'missing'})"
                )

    # == oracle (the metadata group) ============================================================================
    def _map_config(self) -> ChainConfig:
        g = self.meta.groups[GroupId(self.meta_gid)]
        return ChainConfig(g.epoch, tuple(NodeId(int(m)) for m in g.members))

    def _silent(self, sn: SimNode) -> bool:
        """A blank core (its disk was not loaded) while the map lists it as a member: the node stays away
        from the metadata group until it is removed (it cannot take its place back empty; the planner could
        not tell it from a member that holds its data), then is re-added wiped."""
        return not sn.loaded and sn.id in self.cur.members

    def _heartbeats(self, sn: SimNode) -> bool:
        """The metadata group hears from this node (heartbeats, reports) and reaches it (map, leases)."""
        return sn.core is not None and self._reachable(sn) and not self._silent(sn)

    def _need(self, cfg: ChainConfig) -> int:
        """What a member catching up in `cfg` must hold before it counts: every acked write, and every one
        the previous configuration's head may still ack in its epoch (client acks in a Ready still being
        written): up to its ack point there."""
        need = self.max_acked
        prev = self.configs.get(cfg.epoch - 1)
        head = self.nodes[prev.head].core if prev is not None else None
        if prev is not None and head is not None and head.epoch == prev.epoch:
            need = max(need, head.ack_point)
        return need

    def _catch_up_from(self, cfg: ChainConfig, nid: NodeId) -> None:
        """`nid` takes its place in `cfg` with a new incarnation, with its log: its log may be shorter than
        its successors' (records it forwarded before they were durable here): their SYNCs are then
        answered with a snapshot, which may take them below acknowledged writes until the records after
        it arrive. It and every member after it count again only once caught up."""
        self.member_inc[nid] = self.nodes[nid].incarnation
        need = self._need(cfg)
        for m in cfg.members[cfg.members.index(nid) :]:
            self.catching_up[m] = max(need, self.catching_up.get(m, 0))

    def _install(self, cfg: ChainConfig) -> None:
        """Install the map's next configuration. Joiners count once synced and caught up; so does a member
        restarted from its log since it took its place (the planner's bump), and every member after it."""
        prev = self.configs.get(cfg.epoch - 1)
        if prev is not None and cfg.epoch != prev.epoch + 1:
            raise self._fail(f"the map's configuration {cfg} does not follow {prev}")
        self.configs[cfg.epoch] = cfg
        self._cur = cfg
        if prev is not None:
            self._check_reconfig(prev, cfg)
        need = self._need(cfg)
        for nid in cfg.members:
            sn = self.nodes[nid]
            if prev is None or nid not in prev.members:
                self.member_inc[nid] = sn.incarnation
                self.catching_up[nid] = need
            elif self.member_inc.get(nid) != sn.incarnation and sn.core is not None and sn.loaded:
                self._catch_up_from(cfg, nid)
        self._push_configs()

    def _push_configs(self) -> None:
        """Every node the metadata group reaches learns the map's configuration (MetaAgent.reconcile);
        the core ignores one not newer than the epoch it adopted. A member restarted from its log whose
        last adopted epoch is older takes its place in this one with its log (NodeHost.host_replica); one whose
        epoch is not older waits for the planner's bump."""
        cur = self.cur
        for sn in self.nodes.values():
            core = sn.core
            if core is None or core.epoch >= cur.epoch or not self._heartbeats(sn):
                continue
            if sn.id in cur.members and self.member_inc.get(sn.id) != sn.incarnation:
                self._catch_up_from(cur, sn.id)
            sn.durable_epoch = cur.epoch  # the runtime persists the epoch before adopting the config
            core.set_config(cur)
            self._drain(sn)

    def _member_ok(self, nid: NodeId) -> bool:
        sn = self.nodes[nid]
        core = sn.core
        return (
            core is not None
            and self._heartbeats(sn)
            and self.member_inc.get(nid) == sn.incarnation
            and core.config is not None
            and core.epoch == self.cur.epoch
        )

    def _established(self) -> bool:
        """Every member learned the current epoch, is synced and (joiners) holds what was acked before."""
        for nid in self.cur.members:
            if not self._member_ok(nid):
                return False
            core = self.nodes[nid].core
            assert core is not None
            if not core.synced or nid in self.catching_up:
                return False
        return True

    def _report(self, sn: SimNode) -> list[int]:
        """What the node's heartbeat carries for this group: ChainReplica.report itself, run over the node's
        core ([epoch adopted, configured 0/1, caught up 0/1])."""
        core = sn.core
        assert core is not None
        if "report_caught_up_early" in self.mutations:
            return [core.epoch, int(core.config is not None), int(core.config is not None)]
        view = self.host_views.get(sn.id)
        if view is None:
            view = self.host_views[sn.id] = _ReplicaView(sn)
        return ChainReplica.report(cast(ChainReplica, view))

    def _reports_caught_up(self, sn: SimNode) -> bool:
        """What its report would say now: adopted the current epoch, configured, caught up."""
        return sn.core is not None and self._report(sn) == [self.cur.epoch, 1, 1]

    def _settled(self, nid: NodeId) -> bool:
        r = self.reports.get(nid, {}).get(self.meta_gid)
        return r is not None and r == [self.cur.epoch, 1, 1]

    def _restarted_report(self, nid: NodeId) -> bool:
        r = self.reports.get(nid, {}).get(self.meta_gid)
        return r is not None and r[1] == 0 and r[0] >= self.cur.epoch

    def _oracle(self, faults: bool) -> None:
        cur = self.cur
        st = self.meta
        self._push_configs()
        # Heartbeats: each node the metadata group reaches reports its groups and gets a lease (every
        # configured group, at the epoch it has adopted: ChainReplica.take_lease).
        for sn in self.nodes.values():
            if not self._heartbeats(sn):
                continue
            core = sn.core
            assert core is not None
            self.detector.heartbeat(sn.id, self.now)
            report = {self.meta_gid: self._report(sn)}
            if self.reports.get(sn.id) != report:
                self.reports[sn.id] = report
                self.plan_inputs_changed = True
            if core.config is not None:
                self.lease_until[sn.id] = self.now + self.lease
                core.grant_lease(core.epoch, self.now + self.lease)
        # Checker bookkeeping: a member catching up counts again once synced with its disk writes done and
        # durably holding what it must.
        for nid in cur.members:
            need = self.catching_up.get(nid)
            sn = self.nodes[nid]
            if need is None or not self._member_ok(nid):
                continue
            core = sn.core
            assert core is not None
            if core.synced and sn.pending is None and sn.durable_last >= max(need, self.max_acked):
                self._check_holds_acked(sn, min(sn.durable_last, self.max_acked), "caught up")
                del self.catching_up[nid]
        # Failure detection: the leader proposes the state transitions of nodes silent for longer than
        # the grace (suspect) or three graces (down), and those heard from again (up).
        changes = self.detector.tick(self.now, {nid: n.state for nid, n in st.nodes.items()})
        if changes:
            res = st.apply(
                SetNodeStates(
                    tuple(StateChange(int(c.node_id), c.state, c.last_heartbeat_ms) for c in changes), self.now
                )
            )
            self.detector.done()
            if not res.ok:
                raise self._fail(f"the map refuses the failure detector's transitions: {res}")
            self.plan_inputs_changed = True
        # Configuration changes: the planner's, applied to the map (a compare-and-set on the epoch). The
        # planner is a pure function of the map and the reports: unchanged, it would plan nothing again.
        if not self.plan_inputs_changed:
            return
        self.plan_inputs_changed = False
        plan = plan_chain_changes(st, self.reports)
        if not plan and self._wants_fresh_node():
            # The planner would add a node at the tail but no node is up outside the chain: a fresh one
            # registers (in a rack of its own).
            self._new_node()
            self.stats.fresh_nodes += 1
            plan = plan_chain_changes(st, self.reports)
        for cmd, reason in plan:
            if cmd.group_id != self.meta_gid:
                raise self._fail(f"the planner changes group {cmd.group_id}, not {self.meta_gid}: {reason}")
            self._reconfigure(cmd, reason)

    def _wants_fresh_node(self) -> bool:
        cur = self.cur
        st = self.meta
        if len(cur.members) >= self.chain_len or len(self.nodes) >= 4 * self.chain_len + 8:
            return False
        if not all(st.nodes[nid].state == "up" and self._settled(nid) for nid in cur.members):
            return False
        return not any(n.state == "up" and NodeId(int(n.node_id)) not in cur.members for n in st.nodes.values())

    def _reconfigure(self, cmd: SetGroupMembers, reason: str) -> None:
        """Apply the planner's command to the map and install the configuration it makes. A node joining
        with a disk holds its log (it SYNCs with it: matched, or replaced by a snapshot) or is wiped first
        (always, if its core is blank over a kept disk); a removed member's lease must have expired."""
        cur = self.cur
        members = tuple(NodeId(m) for m in cmd.members)
        # The planner's looser cases, counted: a bump while another member is not settled; a removal while
        # a survivor other than the next head has not caught up.
        unsettled = [nid for nid in cur.members if nid in members and not self._settled(nid)]
        restarted = [nid for nid in unsettled if self._restarted_report(nid)]
        settled = not [nid for nid in unsettled if nid not in restarted]
        for nid in cur.members:
            if nid not in members and self.lease_until.get(nid, -1) >= self.now:
                raise self._fail(f"oracle removes {nid} before its lease expired ({reason})")
        res = self.meta.apply(cmd)
        self.plan_inputs_changed = True
        if not res.ok:
            raise self._fail(f"the map refuses the planner's {cmd} ({reason}): {res}")
        cfg = self._map_config()
        if cfg.members != members:
            raise self._fail(f"the map installed {cfg}, the planner asked for {members}")
        self.stats.reconfigs += 1
        if cfg.members == cur.members:
            self.stats.epoch_bumps += 1
            if not settled:
                self.stats.bumps_unsettled += 1
        elif len(cfg.members) < len(cur.members):
            self.stats.removals += 1
            if not settled:
                self.stats.removals_unsettled += 1
        for nid in cfg.members:
            if nid in cur.members:
                continue
            self.stats.joins += 1
            sn = self.nodes[nid]
            if sn.core is None:
                continue  # down (still within the grace): it restarts as it was going to
            known = any(nid in c.members for c in self.configs.values())  # else its disk is empty
            if not sn.loaded:
                self._restart(sn, "wipe")
            elif known and self.rng.random() < self.p_rejoin_log:
                self.stats.rejoins_with_log += 1  # it SYNCs with its log: matched, or a snapshot
            elif known:
                self._restart(sn, "wipe")
        self._install(cfg)

    # == network =================================================================================================
    def _send(self, m: ChainMessage) -> None:
        r = self.rng
        if r.random() < self.p_drop:
            return
        self._enqueue(m)
        if r.random() < self.p_dup:
            self._enqueue(m)

    def _enqueue(self, m: ChainMessage) -> None:
        r = self.rng
        x = r.random()
        if x < self.p_ghost:
            delay = r.randint(2 * self.grace, 8 * self.grace)  # a message from an older epoch, much later
            self.stats.ghosts += 1
        elif x < 0.6:
            delay = 0
        elif x < 0.85:
            delay = 1
        else:
            delay = r.randint(1, self.delay_max)
        self.msg_no += 1
        heapq.heappush(self.net, (self.now + delay, self.msg_no, m))

    # == client ==================================================================================================
    def _pick(self, head: bool) -> SimNode | None:
        cfg = self.cur
        if len(self.configs) > 1 and self.rng.random() < self.p_stale_client:
            cfg = self.configs[self.rng.choice(sorted(self.configs))]  # a client with a stale map
            self.stats.stale_client_ops += 1
        sn = self.nodes[cfg.head if head else cfg.tail]
        return sn if sn.core is not None else None

    def _client_write(self) -> None:
        sn = self._pick(head=True)
        if sn is None or sn.core is None:
            return
        self.write_id += 1
        data = struct.pack("<Q", self.write_id) + b"w" * self.rng.randint(0, 40)
        if sn.core.propose(data):
            self.stats.proposed += 1
            self._drain(sn)

    def _client_read(self) -> None:
        sn = self._pick(head=False)
        if sn is None or sn.core is None:
            return
        self.read_ctx += 1
        ctx = self.read_ctx
        self.reads[ctx] = (sn.id, self.max_acked)
        if sn.core.read(ctx):
            self._drain(sn)
        else:
            del self.reads[ctx]
            self.stats.reads_refused += 1

    # == liveness ================================================================================================
    def _check_liveness(self) -> None:
        """Once faults stop, the chain re-forms, acks new writes, and every member applies every acked one."""
        for sn in self.nodes.values():
            sn.isolated_until = sn.cut_until = -1
            if not sn.alive:
                self._restart(sn, "log" if sn.keep_log else "blank")
        self.p_drop = self.p_dup = self.p_ghost = 0.0
        self.p_stale_client = 0.0
        self.p_crash_in_ready = 0.0  # no crash inside a Ready either
        acked_before = self.stats.writes_acked
        quiet = 30 * self.grace
        for k in range(quiet):
            self.step_no = self.steps + k
            self._step(faults=False)
            if k < 10 * self.grace or self.stats.writes_acked == acked_before or not self._established():
                continue
            members = [self.nodes[nid] for nid in self.cur.members]
            if len(members) == self.chain_len and all(m.sm_seq >= self.max_acked for m in members):
                return
        state = ", ".join(
            f"{sn.id}:{'down' if sn.core is None else f'e{sn.core.epoch}'}"
            f"(last={sn.core.last_seq if sn.core else '-'}, durable={sn.durable_last}, applied={sn.sm_seq},"
            f" synced={sn.core.synced if sn.core else '-'})"
            for sn in self.nodes.values()
            if sn.id in self.cur.members
        )
        raise self._fail(
            f"no progress in {quiet} quiet steps after the faults stopped: {self.cur}, max acked"
            f" {self.max_acked}, acked in quiet {self.stats.writes_acked - acked_before}: {state}"
        )


def run_seed(seed: int, steps: int = 2000, mutations: frozenset[str] = frozenset()) -> SimStats:
    return Simulation(seed, steps, mutations).run()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftblock.testing.chainsim", description=__doc__)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--mutation", action="append", default=[], help="plant a bug (mutation test)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    total = SimStats()
    for seed in range(args.seed, args.seed + args.seeds):
        try:
            total.add(run_seed(seed, args.steps, frozenset(args.mutation)))
        except SimFailure as e:
            print(e, file=sys.stderr)
            return 1
    dt = time.perf_counter() - t0
    print(f"ok: seeds {args.seed}..{args.seed + args.seeds - 1} x {args.steps} steps in {dt:.1f}s")
    print("  " + " ".join(f"{k}={v}" for k, v in total.as_dict().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
