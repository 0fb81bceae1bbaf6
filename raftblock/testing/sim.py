# Deterministic simulation of one Raft group (raftblock.replication.raft.RaftCore) on virtual time.
#
# Owns: the only PRNG (random.Random(seed)); a network that drops, duplicates, delays, reorders and
# partitions; crashes that lose everything not persisted (tearing the last write: a prefix of the
# Ready's snapshot/entries/hard state survives); restarts; a client that writes and reads (lease and
# read-index); membership changes, leadership transfers and compaction during the run.
#
# Rules:
# 1. One thread, no clocks, no I/O: a seed and a step count determine the run bit for bit, so a
#    failing seed replays with `python -m raftblock.testing.sim --seed N --nodes 3|5 --steps S`.
# 2. The simulator drives the very RaftCore the node runtime uses and honours the Ready contract the
#    way a runtime must: messages_now, then persist, then messages, then apply, then advance.
# 3. Checkers run on every event, incrementally (no rescans per step): one leader per term; leader
#    completeness; committed entries never change; every state machine applies the same sequence in
#    order; no ack/vote leaves before it is durable; reads are linearizable.
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

from raftblock.replication.raft.core import RaftConfig, RaftCore, Ready
from raftblock.replication.raft.storage import MemoryStorage, bootstrap_snapshot
from raftblock.replication.raft.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    GroupId,
    Message,
    MessageType,
    NodeId,
    Role,
    Snapshot,
)

GROUP = GroupId(7)
_SM = struct.Struct("<QIQ")  # state machine image: applied index, digest, writes
_MT = MessageType


class SimFailure(AssertionError):
    def __init__(
        self, seed: int, nodes: int, steps: int, step: int, reason: str, mutations: frozenset[str]
    ) -> None:
        self.seed = seed
        self.nodes = nodes
        self.step = step
        self.reason = reason
        mut = "".join(f" --mutation {m}" for m in sorted(mutations))
        super().__init__(
            f"simulation failed: seed={seed} nodes={nodes} step={step}: {reason}\n"
            f"  replay: python -m raftblock.testing.sim --seed {seed} --nodes {nodes} --steps {steps}{mut}"
        )


class SimStats:
    __slots__ = (
        "steps",
        "leaders",
        "committed",
        "crashes",
        "torn_writes",
        "restarts",
        "snapshots_installed",
        "compactions",
        "reads_served",
        "transfers",
        "conf_changes",
        "messages",
    )

    def __init__(self) -> None:
        self.steps = 0
        self.leaders = 0
        self.committed = 0
        self.crashes = 0
        self.torn_writes = 0
        self.restarts = 0
        self.snapshots_installed = 0
        self.compactions = 0
        self.reads_served = 0
        self.transfers = 0
        self.conf_changes = 0
        self.messages = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class SimNode:
    __slots__ = (
        "id",
        "storage",
        "core",
        "alive",
        "removed",
        "restart_at",
        "stop_at",
        "sm_index",
        "sm_digest",
        "sm_writes",
        "waiting_reads",
    )

    def __init__(self, node_id: NodeId, storage: MemoryStorage) -> None:
        self.id = node_id
        self.storage = storage
        self.core: RaftCore | None = None
        self.alive = False
        self.removed = False
        self.restart_at = -1
        self.stop_at = -1
        self.sm_index = 0
        self.sm_digest = 0
        self.sm_writes = 0
        self.waiting_reads: list[tuple[int, int]] = []  # (read index, ctx)

    def sm_image(self) -> bytes:
        # Padding makes images of different sizes so snapshots stream in several chunks.
        return _SM.pack(self.sm_index, self.sm_digest, self.sm_writes) + b"\xab" * (self.sm_writes % 61)

    def sm_restore(self, data: bytes) -> None:
        if data:
            self.sm_index, self.sm_digest, self.sm_writes = _SM.unpack(data[: _SM.size])  # bytes or ChunkedBytes
        else:
            self.sm_index = self.sm_digest = self.sm_writes = 0


class Simulation:
    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        steps: int = 2000,
        mutations: frozenset[str] = frozenset(),
    ) -> None:
        assert nodes >= 1
        self.seed = seed
        self.n = nodes
        self.steps = steps
        self.mutations = mutations
        self.rng = random.Random(seed)
        r = self.rng
        self.election_timeout_ticks = 10
        # Per-seed shape: small windows and batches make pipelining, probing and chunking interesting.
        self.append_entries_max = r.choice((1, 1, 2, 4, 64))
        self.inflight_max = r.choice((1, 2, 4, 64))
        self.snapshot_chunk_bytes = r.choice((8, 16, 64))
        self.compact_every = r.choice((4, 8, 16, 40, 100))
        self.p_drop = r.choice((0.0, 0.02, 0.08))
        self.p_dup = r.choice((0.0, 0.02))
        self.p_crash = r.choice((0.001, 0.004))
        self.p_crash_in_ready = r.choice((0.0003, 0.001))
        self.p_partition = r.choice((0.002, 0.008))
        self.p_propose = r.choice((0.2, 0.6))
        self.p_read = 0.15
        self.p_conf = 0.004
        self.p_transfer = 0.003
        self.delay_max = r.choice((1, 3, 6))
        self.p_new_leader_crash = r.choice((0.0, 0.15, 0.4))
        self.p_isolate_on_commit = r.choice((0.0, 0.01, 0.05))
        self.p_isolate_first_commit = r.choice((0.0, 0.2, 0.5))
        self.first_commit_terms: set[int] = set()

        self.now = 0
        self.step_no = 0
        self.stats = SimStats()
        self.net: list[tuple[int, int, Message]] = []
        self.msg_seq = 0
        self.side: dict[NodeId, int] = {}
        self.heal_at = -1
        self.nodes: dict[NodeId, SimNode] = {}
        self.next_node_id = nodes + 1
        self.epoch = 0
        # Checker state.
        self.leader_of_term: dict[int, NodeId] = {}
        self.committed: list[tuple[int, bytes, int]] = [(0, b"", 0)]  # index -> (term, data, digest after)
        self.reads: dict[int, tuple[NodeId, int]] = {}  # ctx -> (node, committed length required)
        self.read_ctx = 0
        self.write_id = 0

        voters = frozenset(NodeId(i) for i in range(1, nodes + 1))
        for i in range(1, nodes + 1):
            nid = NodeId(i)
            sn = SimNode(nid, MemoryStorage(bootstrap_snapshot(voters)))
            self.nodes[nid] = sn
            self._start(sn)

    # == run =================================================================================================
    def run(self) -> SimStats:
        try:
            for step in range(self.steps):
                self.step_no = step
                self._step()
            self._check_liveness()
        except SimFailure:
            raise
        except Exception as e:  # an assertion inside the core is a failure of this seed too
            raise self._fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from e
        self.stats.steps = self.steps
        self.stats.committed = len(self.committed) - 1
        return self.stats

    def _fail(self, reason: str) -> SimFailure:
        return SimFailure(self.seed, self.n, self.steps, self.step_no, reason, self.mutations)

    def _step(self) -> None:
        self.now += 1
        r = self.rng
        nodes = self.nodes
        # -- faults and operator actions ---------------------------------------------------------------
        for sn in list(nodes.values()):
            if not sn.alive and not sn.removed and sn.restart_at == self.now:
                self._start(sn)
                self.stats.restarts += 1
            if sn.alive and sn.stop_at == self.now:
                sn.removed = True
                self._crash(sn, None)
        if r.random() < self.p_crash:
            live = [sn for sn in nodes.values() if sn.alive]
            if live:
                # Leaders are the interesting victims: bias toward them.
                leaders = [sn for sn in live if sn.core is not None and sn.core.role == Role.LEADER]
                victim = r.choice(leaders) if leaders and r.random() < 0.5 else r.choice(live)
                self._crash(victim, None)
        if self.heal_at == self.now:
            self.side = {}
        elif not self.side and r.random() < self.p_partition:
            self._partition()
        if r.random() < self.p_propose:
            self._client_write()
        if r.random() < self.p_read:
            self._client_read()
        if r.random() < self.p_conf:
            self._conf_change()
        if r.random() < self.p_transfer:
            self._transfer()
        # -- network -------------------------------------------------------------------------------------
        net = self.net
        budget = 5000
        while net and net[0][0] <= self.now and budget:
            budget -= 1
            _, _, m = heapq.heappop(net)
            dst = nodes.get(m.dst)
            if dst is None or dst.core is None:
                continue
            if self.side and self.side.get(m.src, 0) != self.side.get(m.dst, 0):
                continue
            dst.core.step(m)
            self._drain(dst)
        # -- time ------------------------------------------------------------------------------------------
        for sn in list(nodes.values()):
            core = sn.core
            if core is not None:
                core.tick()
                self._drain(sn)
                if sn.core is not None and sn.sm_index - sn.core.log.snap_index >= self.compact_every:
                    if sn.core.compact(sn.sm_index, sn.sm_image()):
                        self.stats.compactions += 1
                        self._drain(sn)

    # == node lifecycle =======================================================================================
    def _config(self, nid: NodeId) -> RaftConfig:
        return RaftConfig(
            nid,
            GROUP,
            election_timeout_ticks=self.election_timeout_ticks,
            heartbeat_interval_ticks=1,
            lease_margin_ticks=2,
            inflight_max=self.inflight_max,
            append_entries_max=self.append_entries_max,
            append_bytes_max=512,
            snapshot_chunk_bytes=self.snapshot_chunk_bytes,
            uncommitted_entries_max=256,
        )

    def _start(self, sn: SimNode) -> None:
        sn.core = RaftCore(self._config(sn.id), sn.storage, self.rng.randrange, self.mutations)
        sn.alive = True
        sn.restart_at = -1
        snap = sn.storage.snap
        sn.sm_restore(snap.data)
        sn.waiting_reads = []
        self._check_snapshot(sn, snap)
        self._check_log(sn)
        self._drain(sn)

    def _crash(self, sn: SimNode, torn: Ready | None) -> None:
        """Lose everything volatile; with `torn`, keep only a prefix of that Ready's writes."""
        if torn is not None:
            self.stats.torn_writes += 1
            r = self.rng
            st = sn.storage
            complete = True
            if torn.snapshot is not None:
                if r.random() < 0.5:
                    st.install_snapshot(torn.snapshot)
                else:
                    complete = False
            if complete and torn.entries:
                k = r.randint(0, len(torn.entries))
                if k:
                    st.append(torn.entries[:k])
                complete = k == len(torn.entries)
            if complete and torn.hard_state is not None and r.random() < 0.5:
                st.set_hard_state(torn.hard_state)
                if torn.compaction is not None and r.random() < 0.5:
                    st.compact(torn.compaction)
        sn.core = None
        sn.alive = False
        sn.waiting_reads = []
        self.stats.crashes += 1
        if not sn.removed:
            sn.restart_at = self.now + self.rng.randint(1, 4 * self.election_timeout_ticks)

    # == the Ready loop (what a runtime does) =================================================================
    def _drain(self, sn: SimNode) -> None:
        r = self.rng
        while True:
            core = sn.core
            if core is None or not core.has_ready():
                return
            rd = core.ready()
            if rd.role == Role.LEADER:
                if self._check_leader(sn, core, rd.term) and r.random() < self.p_new_leader_crash:
                    # A leader that dies before its first append leaves: its entries stay local and
                    # conflict with the next leader's (the raw material of Raft paper Figure 8).
                    self._crash(sn, rd)
                    return
                if rd.committed_entries:
                    # Cut a leader off right after it commits -- above all its first commit of a term,
                    # which is where entries of earlier terms get committed -- so that what it sends
                    # next (its own term's entries) never arrives. This replaces any partition in
                    # place, so a minority that was cut off (an old leader's uncommitted entries)
                    # comes back at the same moment.
                    first = rd.term not in self.first_commit_terms
                    self.first_commit_terms.add(rd.term)
                    if r.random() < (self.p_isolate_first_commit if first else self.p_isolate_on_commit):
                        self.side = {sn.id: 1}
                        self.heal_at = self.now + r.randint(5, 80)
            crash_at = r.random()
            if crash_at < self.p_crash_in_ready:
                self._crash(sn, rd)  # before anything leaves or is written
                return
            for m in rd.messages_now:
                self._check_durable(sn, core, m)
                self._send(m)
            if crash_at < 2 * self.p_crash_in_ready:
                self._crash(sn, rd)  # after the early sends, before (part of) the write
                return
            st = sn.storage
            if rd.snapshot is not None:
                st.install_snapshot(rd.snapshot)
            if rd.entries:
                st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            if rd.compaction is not None:
                st.compact(rd.compaction)
            if crash_at < 3 * self.p_crash_in_ready:
                self._crash(sn, None)  # durable, but the acks never left
                return
            for m in rd.messages:
                self._check_durable(sn, core, m)
                self._send(m)
            if rd.snapshot is not None:
                self._check_snapshot(sn, rd.snapshot)
                sn.sm_restore(rd.snapshot.data)
                self.stats.snapshots_installed += 1
            if rd.committed_entries:
                self._apply(sn, rd.committed_entries)
            for rs in rd.read_states:
                sn.waiting_reads.append((rs.index, rs.ctx))
            for ctx in rd.reads_aborted:
                self.reads.pop(ctx, None)
            if sn.waiting_reads:
                self._serve_reads(sn)
            core.advance(rd)

    def _apply(self, sn: SimNode, entries: list[Entry]) -> None:
        committed = self.committed
        for e in entries:
            if e.index != sn.sm_index + 1:
                raise self._fail(f"node {sn.id} applies index {e.index} after {sn.sm_index} (out of order)")
            digest = zlib.crc32(e.data, (sn.sm_digest * 31 + int(e.type)) & 0xFFFFFFFF)
            if e.index < len(committed):
                term, data, want = committed[e.index]
                if term != e.term or data != e.data or want != digest:
                    raise self._fail(
                        f"node {sn.id} applies {e} but index {e.index} was committed with term {term}"
                        f" ({'same' if data == e.data else 'other'} data, digest {want:#x} vs {digest:#x})"
                    )
            else:
                assert e.index == len(committed)
                committed.append((e.term, e.data, digest))
            sn.sm_index = e.index
            sn.sm_digest = digest
            if e.type == EntryType.NORMAL:
                sn.sm_writes += 1
            elif e.type == EntryType.CONFIG:
                cc = ConfChange.decode(e.data)
                if cc.type == ConfChangeType.REMOVE_VOTER:
                    gone = self.nodes.get(cc.node_id)
                    if gone is not None and gone.stop_at < 0:
                        gone.stop_at = self.now + self.rng.randint(1, 60)

    def _check_liveness(self) -> None:
        """After the faults stop (network healed, everyone restarted), the group elects a leader that
        commits in its term and every voter catches up -- lost appends, stalled snapshots and pre-vote
        deadlocks show up here, not in the safety checkers."""
        for name in (
            "p_drop",
            "p_dup",
            "p_crash",
            "p_crash_in_ready",
            "p_partition",
            "p_propose",
            "p_read",
            "p_conf",
            "p_transfer",
            "p_new_leader_crash",
            "p_isolate_on_commit",
            "p_isolate_first_commit",
        ):
            setattr(self, name, 0.0)
        self.side = {}
        self.heal_at = -1
        for sn in self.nodes.values():
            if sn.stop_at >= 0 and not sn.removed:
                sn.removed = True
                if sn.alive:
                    self._crash(sn, None)
            elif not sn.alive and not sn.removed:
                self._start(sn)
        quiet_steps = 40 * self.election_timeout_ticks
        for k in range(quiet_steps):
            self.step_no = self.steps + k
            self._step()
            for sn in self.nodes.values():
                c = sn.core
                if c is None or c.role != Role.LEADER or c.commit_index < c._term_start_index:
                    continue
                behind = [
                    v
                    for v in c.conf.voters
                    if (m := self.nodes.get(v)) is None or m.core is None or m.sm_index < c.commit_index
                ]
                if not behind:
                    return
        state = ", ".join(
            f"{sn.id}:{'down' if sn.core is None else sn.core.role.name}"
            f"(t={sn.core.term if sn.core else '-'}, applied={sn.sm_index})"
            for sn in self.nodes.values()
        )
        raise self._fail(f"no progress in {quiet_steps} quiet steps after the faults stopped: {state}")

    # == checkers ==============================================================================================
    def _check_leader(self, sn: SimNode, core: RaftCore, term: int) -> bool:
        """True the first time this term's leader is seen."""
        prev = self.leader_of_term.get(term)
        if prev is None:
            self.leader_of_term[term] = sn.id
            self.stats.leaders += 1
            # Leader completeness (§5.4): every entry applied anywhere is in the new leader's log.
            lg = core.log
            for i in range(lg.snap_index + 1, len(self.committed)):
                t = lg.term(i)
                if t != self.committed[i][0]:
                    raise self._fail(
                        f"leader {sn.id} of term {term} has term {t} at index {i}, committed {self.committed[i][0]}"
                    )
            if lg.snap_index < len(self.committed) and lg.snap_term != self.committed[lg.snap_index][0]:
                raise self._fail(f"leader {sn.id} snapshot term differs at {lg.snap_index}")
            return True
        if prev != sn.id:
            raise self._fail(f"two leaders in term {term}: {prev} and {sn.id}")
        return False

    def _check_durable(self, sn: SimNode, core: RaftCore, m: Message) -> None:
        """Ready contract: an ack or vote grant leaves only once what it promises is durable."""
        self.stats.messages += 1
        if m.reject:
            return
        st = sn.storage
        if m.type == _MT.APP_RESP and m.index > 0:
            i = m.index
            snap_i = st.snap.meta.index
            if i <= snap_i:
                return
            if i > st.last_index() or st.term(i) != core.log.term(i):
                raise self._fail(
                    f"node {sn.id} acks index {i} (term {core.log.term(i)}) but durable has up to"
                    f" {st.last_index()} (term {st.term(i)} there): ack before persist"
                )
        elif m.type == _MT.VOTE_RESP:
            hs = st.hard_state
            if hs.term != m.term or hs.vote != m.dst:
                raise self._fail(
                    f"node {sn.id} grants its vote to {m.dst} in term {m.term} but durable hard state is {hs}"
                )

    def _check_snapshot(self, sn: SimNode, snap: Snapshot) -> None:
        i = snap.meta.index
        if i == 0:
            return
        if i >= len(self.committed):
            raise self._fail(f"node {sn.id} holds a snapshot at {i} beyond anything applied")
        term, _, digest = self.committed[i]
        got = _SM.unpack(snap.data[: _SM.size])
        if term != snap.meta.term or got[0] != i or got[1] != digest:
            raise self._fail(f"node {sn.id} snapshot at {i} disagrees with the committed history")

    def _check_log(self, sn: SimNode) -> None:
        """After a restart: the durable committed prefix agrees with what was committed."""
        st = sn.storage
        upto = min(st.hard_state.commit, len(self.committed) - 1)
        base = st.snap.meta.index
        for i in range(base + 1, upto + 1):
            if st.term(i) != self.committed[i][0]:
                raise self._fail(f"node {sn.id} restarted with term {st.term(i)} at committed index {i}")

    def _serve_reads(self, sn: SimNode) -> None:
        keep: list[tuple[int, int]] = []
        for index, ctx in sn.waiting_reads:
            if sn.sm_index < index:
                keep.append((index, ctx))
                continue
            req = self.reads.pop(ctx, None)
            if req is None:
                continue
            node, required = req
            if sn.sm_index < required:
                raise self._fail(
                    f"stale read ctx={ctx} on node {sn.id}: state at index {sn.sm_index}, but index {required}"
                    " was acknowledged before the read began"
                )
            self.stats.reads_served += 1
        sn.waiting_reads = keep

    # == network ==============================================================================================
    def _send(self, m: Message) -> None:
        r = self.rng
        if r.random() < self.p_drop:
            return
        self._enqueue(m)
        if r.random() < self.p_dup:
            self._enqueue(m)

    def _enqueue(self, m: Message) -> None:
        r = self.rng.random()
        if r < 0.6:
            delay = 0
        elif r < 0.85:
            delay = 1
        else:
            delay = self.rng.randint(1, self.delay_max)
        self.msg_seq += 1
        heapq.heappush(self.net, (self.now + delay, self.msg_seq, m))

    def _partition(self) -> None:
        r = self.rng
        ids = [nid for nid, sn in self.nodes.items() if sn.alive]
        if len(ids) < 2:
            return
        leaders = [nid for nid in ids if (c := self.nodes[nid].core) is not None and c.role == Role.LEADER]
        if leaders and r.random() < 0.5:
            # Isolate a leader, alone or with one follower: it keeps its term while a new one is elected.
            lone = {r.choice(leaders)}
            if r.random() < 0.3:
                lone.add(r.choice(ids))
        else:
            lone = {nid for nid in ids if r.random() < 0.5}
        self.side = {nid: 1 for nid in lone}
        self.heal_at = self.now + r.randint(5, 80)

    # == client and operator ===================================================================================
    def _leader(self) -> SimNode | None:
        leaders = [sn for sn in self.nodes.values() if sn.core is not None and sn.core.role == Role.LEADER]
        return self.rng.choice(leaders) if leaders else None

    def _client_write(self) -> None:
        sn = self._leader()
        if sn is None or sn.core is None:
            return
        self.write_id += 1
        data = struct.pack("<Q", self.write_id) + b"w" * self.rng.randint(0, 100)
        if sn.core.propose(data):
            self._drain(sn)

    def _client_read(self) -> None:
        sn = self._leader()
        if sn is None or sn.core is None:
            return
        self.read_ctx += 1
        ctx = self.read_ctx
        # Everything applied anywhere so far was acknowledged to some client before this read began.
        self.reads[ctx] = (sn.id, len(self.committed) - 1)
        if sn.core.read_index(ctx, lease=self.rng.random() < 0.5):
            self._drain(sn)
        else:
            del self.reads[ctx]

    def _conf_change(self) -> None:
        sn = self._leader()
        if sn is None or sn.core is None:
            return
        core = sn.core
        voters = core.conf.voters
        r = self.rng
        n = self.n
        add = len(voters) < n if len(voters) != n else r.random() < 0.5
        if len(voters) <= 2:
            add = True
        if len(voters) >= n + 1:
            add = False
        self.epoch += 1
        if add:
            if self.next_node_id > 3 * n + 10:
                return
            nid = NodeId(self.next_node_id)
            if core.propose_conf_change(ConfChangeType.ADD_VOTER, nid, self.epoch):
                self.next_node_id += 1
                # A joining node starts empty and knows no configuration; it learns it from the leader.
                new = SimNode(nid, MemoryStorage())
                self.nodes[nid] = new
                self._start(new)
                self.stats.conf_changes += 1
                self._drain(sn)
        else:
            victim = r.choice(sorted(voters))
            if core.propose_conf_change(ConfChangeType.REMOVE_VOTER, victim, self.epoch):
                self.stats.conf_changes += 1
                self._drain(sn)

    def _transfer(self) -> None:
        sn = self._leader()
        if sn is None or sn.core is None:
            return
        others = sorted(v for v in sn.core.conf.voters if v != sn.id)
        if others and sn.core.transfer_leadership(self.rng.choice(others)):
            self.stats.transfers += 1
            self._drain(sn)


def run_seed(
    seed: int, nodes: int = 3, steps: int = 2000, mutations: frozenset[str] = frozenset()
) -> SimStats:
    return Simulation(seed, nodes, steps, mutations).run()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftblock.testing.sim", description=__doc__)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds")
    ap.add_argument(
        "--nodes", type=int, choices=(1, 3, 5), default=None, help="group size (default: 3 and 5)"
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--mutation", action="append", default=[], help="plant a bug (mutation test)")
    args = ap.parse_args(argv)
    sizes = [args.nodes] if args.nodes else [3, 5]
    t0 = time.perf_counter()
    total = SimStats()
    for seed in range(args.seed, args.seed + args.seeds):
        for n in sizes:
            try:
                st = run_seed(seed, n, args.steps, frozenset(args.mutation))
            except SimFailure as e:
                print(e, file=sys.stderr)
                return 1
            for k in st.__slots__:
                setattr(total, k, getattr(total, k) + getattr(st, k))
    dt = time.perf_counter() - t0
    print(
        f"ok: seeds {args.seed}..{args.seed + args.seeds - 1} x nodes {sizes} x {args.steps} steps in {dt:.1f}s"
    )
    print("  " + " ".join(f"{k}={v}" for k, v in total.as_dict().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
