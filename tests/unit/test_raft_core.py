# Unit tests of specific Raft behaviours of raftblock.replication.raft.RaftCore, each citing the section
# of the Raft paper (Ongaro & Ousterhout 2014, "§5.x") or of Ongaro's thesis ("thesis §x") it enforces.
# A tiny lossless, hand-driven network (Cluster) stands in for the runtime; the randomized fault
# testing is in test_sim.py.
from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable

import pytest

from raftblock.replication.raft import (
    ConfChangeType,
    Entry,
    EntryType,
    GroupId,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    NodeId,
    RaftConfig,
    RaftCore,
    Ready,
    Role,
    bootstrap_snapshot,
)

G = GroupId(1)
ET = 10  # election timeout, ticks
RAFT_DIR = pathlib.Path(__file__).resolve().parents[2] / "raftblock" / "replication" / "raft"


def n(i: int) -> NodeId:
    return NodeId(i)


class Cluster:
    """Cores plus a FIFO network; `cut` holds (src, dst) pairs whose messages are dropped."""

    def __init__(self, size: int, **cfg: object) -> None:
        self.cfg = cfg
        voters = frozenset(n(i) for i in range(1, size + 1))
        self.storage = {n(i): MemoryStorage(bootstrap_snapshot(voters)) for i in range(1, size + 1)}
        self.cores: dict[NodeId, RaftCore] = {}
        self.applied: dict[NodeId, list[Entry]] = {}
        self.reads: dict[NodeId, list[tuple[int, int]]] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.delivered: list[Message] = []
        for i in self.storage:
            self.start(i)

    def start(self, i: NodeId, mutations: frozenset[str] = frozenset()) -> RaftCore:
        spread = 3 * int(i)  # distinct, deterministic election timeouts per node: no endless split votes
        core = RaftCore(
            RaftConfig(i, G, election_timeout_ticks=ET, **self.cfg),  # type: ignore[arg-type]
            self.storage[i],
            lambda k: spread % k,
            mutations,
        )
        self.cores[i] = core
        self.applied.setdefault(i, [])
        self.reads.setdefault(i, [])
        return core

    def add(self, i: NodeId) -> RaftCore:
        self.storage[i] = MemoryStorage()
        return self.start(i)

    def isolate(self, i: int) -> None:
        for j in self.storage:
            if j != i:
                self.cut |= {(i, j), (j, i)}

    def handle(self, i: NodeId) -> None:
        core = self.cores[i]
        st = self.storage[i]
        while core.has_ready():
            rd = core.ready()
            self.queue.extend(rd.messages_now)
            if rd.snapshot is not None:
                st.install_snapshot(rd.snapshot)
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            if rd.compaction is not None:
                st.compact(rd.compaction)
            self.queue.extend(rd.messages)
            self.applied[i].extend(rd.committed_entries)
            self.reads[i].extend((r.ctx, r.index) for r in rd.read_states)
            core.advance(rd)

    def deliver(self, limit: int = 100_000) -> int:
        for i in self.cores:
            self.handle(i)
        count = 0
        while self.queue and count < limit:
            m = self.queue.pop(0)
            count += 1
            if (m.src, m.dst) in self.cut or m.dst not in self.cores:
                continue
            self.delivered.append(m)
            self.cores[m.dst].step(m)
            self.handle(m.dst)
        return count

    def tick(self, i: int, times: int = 1) -> None:
        for _ in range(times):
            self.cores[n(i)].tick()
            self.handle(n(i))

    def tick_all(self, times: int = 1) -> None:
        for _ in range(times):
            for i in self.cores:
                self.tick(i)
            self.deliver()

    def elect(self, i: int) -> RaftCore:
        # Everyone passes the restart vote hold (one election timeout) first.
        for c in self.cores.values():
            c.now_ticks = max(c.now_ticks, ET)
        self.tick(i, 2 * ET)
        self.deliver()
        core = self.cores[n(i)]
        assert core.role == Role.LEADER
        return core

    def leaders(self) -> list[NodeId]:
        return [i for i, c in self.cores.items() if c.role == Role.LEADER]


def msgs_of(rd: Ready, t: MessageType) -> Iterable[Message]:
    return [m for m in rd.messages_now + rd.messages if m.type == t]


# -- module hygiene ----------------------------------------------------------------------------------------
def test_core_modules_import_no_io() -> None:
    """DESIGN principle 1/8: the core imports no asyncio, socket, time, random or os."""
    banned = {"asyncio", "socket", "time", "random", "os", "threading", "select"}
    # The I/O-free core; the runtime, transport and WAL modules next to it are its I/O adapters.
    core_modules = ("__init__.py", "core.py", "log.py", "progress.py", "storage.py", "types.py")
    files = [RAFT_DIR / name for name in core_modules]
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]] if node.level == 0 else []
            else:
                continue
            assert not banned & set(names), f"{f.name} imports {banned & set(names)}"


# -- elections ---------------------------------------------------------------------------------------------
def test_election_one_leader_and_followers_learn_it() -> None:
    """Raft paper §5.2 leader election: a candidate with a majority of votes becomes leader."""
    c = Cluster(3)
    leader = c.elect(1)
    assert c.leaders() == [n(1)]
    assert leader.term == 1
    c.tick_all(2)
    for i in (2, 3):
        assert c.cores[n(i)].lead == n(1) and c.cores[n(i)].term == 1


def test_randomized_election_timeout_is_in_et_to_2et() -> None:
    """Raft paper §5.2: election timeouts are chosen randomly from [ET, 2*ET), from the passed-in rand."""
    draws: list[int] = []

    def rand(k: int) -> int:
        draws.append(k)
        return k - 1

    st = MemoryStorage(bootstrap_snapshot(frozenset({n(1), n(2), n(3)})))
    core = RaftCore(RaftConfig(n(1), G, election_timeout_ticks=ET), st, rand)
    assert draws and all(k == ET for k in draws)
    for _ in range(2 * ET - 2):
        core.tick()
    assert core.role == Role.FOLLOWER
    core.tick()
    assert core.role == Role.PRE_CANDIDATE


def test_vote_once_per_term_and_vote_survives_restart() -> None:
    """Raft paper §5.2: each server votes for at most one candidate in a term; the vote is durable (Fig. 2)."""
    c = Cluster(3)
    f = c.cores[n(3)]
    f.now_ticks = ET
    f.step(Message(MessageType.VOTE, G, n(1), n(3), 5, log_term=0, index=0))
    rd = f.ready()
    (grant,) = msgs_of(rd, MessageType.VOTE_RESP)
    assert not grant.reject and grant in rd.messages  # persist first: not in messages_now
    assert rd.hard_state == HardState(5, n(1), 0)
    c.storage[n(3)].set_hard_state(rd.hard_state)
    f.advance(rd)
    f.step(Message(MessageType.VOTE, G, n(2), n(3), 5, log_term=0, index=0))
    (resp,) = msgs_of(f.ready(), MessageType.VOTE_RESP)
    assert resp.reject
    # After a restart from storage the vote is still there.
    f2 = RaftCore(RaftConfig(n(3), G, election_timeout_ticks=ET), c.storage[n(3)], lambda k: 0)
    f2.now_ticks = ET
    f2.step(Message(MessageType.VOTE, G, n(2), n(3), 5, log_term=0, index=0))
    (resp,) = msgs_of(f2.ready(), MessageType.VOTE_RESP)
    assert resp.reject


def test_election_restriction_rejects_stale_log() -> None:
    """Raft paper §5.4.1 election restriction: no vote for a candidate whose log is less up-to-date."""
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    for k in range(3):
        c.cores[n(1)].propose(b"x%d" % k)
    c.deliver()
    c.cut.clear()
    voter = c.cores[n(2)]
    voter.lead = n(0)
    voter._election_elapsed = ET  # out of the leader's lease
    last = c.cores[n(3)].last_index()
    voter.step(Message(MessageType.VOTE, G, n(3), n(2), 9, log_term=1, index=last))
    (resp,) = msgs_of(voter.ready(), MessageType.VOTE_RESP)
    assert resp.reject
    assert voter.vote == n(0)


def test_prevote_keeps_partitioned_node_from_raising_terms() -> None:
    """Thesis §9.6 pre-vote: a node that cannot win does not bump its term and cannot depose the leader."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolate(3)
    for _ in range(6 * ET):
        c.tick_all()
    assert c.cores[n(3)].term == leader.term
    assert c.cores[n(3)].role == Role.PRE_CANDIDATE
    c.cut.clear()
    c.tick_all(3)
    assert c.leaders() == [n(1)] and leader.term == 1


def test_check_quorum_leader_steps_down_without_acks() -> None:
    """Thesis §6.2 check-quorum: a leader that hears from no quorum for an election timeout steps down."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolate(1)
    for _ in range(2 * ET):
        c.tick(1)
        c.deliver()
    assert leader.role == Role.FOLLOWER


def test_followers_ignore_votes_inside_leader_lease() -> None:
    """Thesis §4.2.3 disruptive servers: a follower that heard from a leader within the election timeout ignores vote requests."""
    c = Cluster(3)
    c.elect(1)
    f = c.cores[n(2)]
    f.step(Message(MessageType.VOTE, G, n(3), n(2), 7, log_term=5, index=100))
    assert not f.has_ready() and f.term == 1


# -- log replication ---------------------------------------------------------------------------------------
def test_replication_commits_and_applies_in_order() -> None:
    """Raft paper §5.3: entries replicated to a majority are committed and applied in log order everywhere."""
    c = Cluster(3)
    leader = c.elect(1)
    idx = [leader.propose(b"v%d" % k) for k in range(5)]
    assert idx == [2, 3, 4, 5, 6]  # index 1 is the leader's no-op
    c.deliver()
    c.tick_all(2)
    for i in (1, 2, 3):
        got = [e.data for e in c.applied[n(i)] if e.type == EntryType.NORMAL]
        assert got == [b"v%d" % k for k in range(5)]
        assert [e.index for e in c.applied[n(i)]] == list(range(1, 7))


def test_log_matching_rejects_mismatched_prev_and_truncates_conflicts() -> None:
    """Raft paper §5.3 log matching: reject when prev (index, term) differs; replace a conflicting suffix."""
    st = MemoryStorage(bootstrap_snapshot(frozenset({n(1), n(2), n(3)})))
    st.append([Entry(1, 1), Entry(1, 2), Entry(2, 3)])
    st.set_hard_state(HardState(2, n(0), 1))
    f = RaftCore(RaftConfig(n(2), G, election_timeout_ticks=ET), st, lambda k: 0)
    f.step(Message(MessageType.APP, G, n(1), n(2), 3, log_term=3, index=3, entries=[Entry(3, 4)], commit=1))
    rd = f.ready()
    (resp,) = msgs_of(rd, MessageType.APP_RESP)
    assert resp.reject and resp.index == 3 and resp.reject_hint <= 3
    f.advance(rd)
    f.step(
        Message(
            MessageType.APP,
            G,
            n(1),
            n(2),
            3,
            log_term=1,
            index=2,
            entries=[Entry(3, 3), Entry(3, 4)],
            commit=1,
        )
    )
    rd = f.ready()
    assert [(e.term, e.index) for e in rd.entries] == [(3, 3), (3, 4)]
    (resp,) = msgs_of(rd, MessageType.APP_RESP)
    assert not resp.reject and resp.index == 4 and resp in rd.messages
    st.append(rd.entries)
    assert [(e.term, e.index) for e in st.entries] == [(1, 1), (1, 2), (3, 3), (3, 4)]


def test_leader_commits_old_term_entries_only_via_current_term_entry() -> None:
    """Raft paper §5.4.2 (Figure 8): never commit an entry of an earlier term by counting replicas."""
    voters = frozenset({n(1), n(2), n(3)})
    st = MemoryStorage(bootstrap_snapshot(voters))
    st.append([Entry(1, 1), Entry(1, 2)])
    st.set_hard_state(HardState(2, n(0), 0))
    for mutations, expect_commit in ((frozenset(), 0), (frozenset({"commit_old_term"}), 2)):
        leader = RaftCore(RaftConfig(n(1), G, election_timeout_ticks=ET), st, lambda k: 0, mutations)
        leader.now_ticks = ET
        for _ in range(2 * ET):
            leader.tick()
        leader.step(Message(MessageType.PRE_VOTE_RESP, G, n(2), n(1), 3))
        leader.step(Message(MessageType.VOTE_RESP, G, n(2), n(1), 3))
        assert leader.role == Role.LEADER and leader.term == 3
        rd = leader.ready()  # the no-op at index 3, term 3
        leader.advance(rd)
        leader.step(Message(MessageType.APP_RESP, G, n(2), n(1), 3, index=2))
        assert leader.commit_index == expect_commit
        leader.step(Message(MessageType.APP_RESP, G, n(2), n(1), 3, index=3))
        assert leader.commit_index == 3


def test_pipelining_is_bounded_by_inflight_max() -> None:
    """Bounded in-flight window: at most inflight_max appends outstanding per follower."""
    c = Cluster(3, inflight_max=2, append_entries_max=1)
    leader = c.elect(1)
    c.tick_all(1)
    c.isolate(1)  # nothing gets answered
    sent_before = len([m for m in c.queue if m.type == MessageType.APP and m.dst == 2])
    for k in range(10):
        leader.propose(b"p%d" % k)
    rd = leader.ready()
    apps = [m for m in rd.messages_now if m.type == MessageType.APP and m.dst == 2 and m.entries]
    assert sent_before == 0 and len(apps) == 2
    assert all(len(m.entries) == 1 for m in apps)


def test_append_bytes_max_bounds_a_message() -> None:
    """Bounded batches: an AppendEntries carries at most append_bytes_max (but at least one entry)."""
    c = Cluster(3, append_bytes_max=300)
    leader = c.elect(1)
    c.isolate(3)
    for _ in range(10):
        leader.propose(bytes(100))  # 124 bytes each with the entry header
    c.deliver()
    c.delivered.clear()
    c.cut.clear()
    c.tick_all(6)
    apps = [m for m in c.delivered if m.type == MessageType.APP and m.dst == 3 and m.entries]
    assert apps and max(sum(e.size_bytes() for e in m.entries) for m in apps) <= 300
    assert c.cores[n(3)].last_index() == leader.last_index()


# -- leadership transfer, membership, snapshots --------------------------------------------------------------
def test_leadership_transfer_with_timeout_now() -> None:
    """Thesis §3.10 leadership transfer: catch the target up, send TimeoutNow; it wins the next term."""
    c = Cluster(3)
    leader = c.elect(1)
    leader.propose(b"a")
    c.deliver()
    assert leader.transfer_leadership(n(2))
    assert leader.propose(b"refused during transfer") == 0
    c.deliver()
    assert c.leaders() == [n(2)] and c.cores[n(2)].term == 2


def test_single_server_membership_change_one_at_a_time() -> None:
    """Thesis §4.1 single-server change: add one voter; a second change waits until the first is applied."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(1)
    c.add(n(4))
    idx = leader.propose_conf_change(ConfChangeType.ADD_VOTER, n(4), epoch=7)
    assert idx > 0
    assert leader.propose_conf_change(ConfChangeType.REMOVE_VOTER, n(3), epoch=8) == 0
    c.deliver()
    c.tick_all(3)
    assert leader.conf.voters == {n(1), n(2), n(3), n(4)} and leader.conf.epoch == 7
    assert c.cores[n(4)].conf.voters == leader.conf.voters
    assert leader.propose_conf_change(ConfChangeType.REMOVE_VOTER, n(3), epoch=8) > 0
    c.deliver()
    c.tick_all(2)
    assert leader.conf.voters == {n(1), n(2), n(4)}
    leader.propose(b"after")
    c.tick_all(2)
    assert any(e.data == b"after" for e in c.applied[n(4)])


def test_removed_leader_steps_down() -> None:
    """Thesis §4.2.2: a leader removed from the configuration stops leading once the change is applied."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(1)
    assert leader.propose_conf_change(ConfChangeType.REMOVE_VOTER, n(1), epoch=1) > 0
    c.deliver()
    c.tick_all(1)
    assert leader.role == Role.FOLLOWER
    c.isolate(1)
    for _ in range(4 * ET):
        c.tick_all()
    assert len(c.leaders()) == 1 and c.leaders()[0] in (n(2), n(3))


def test_snapshot_install_in_chunks_for_lagging_follower() -> None:
    """Raft paper §7 log compaction / InstallSnapshot: a follower behind the compacted log gets the snapshot in chunks."""
    c = Cluster(3, snapshot_chunk_bytes=4)
    leader = c.elect(1)
    c.isolate(3)
    for k in range(6):
        leader.propose(b"e%d" % k)
    c.deliver()
    c.tick_all(2)
    image = b"state-machine-image-at-applied"
    assert leader.compact(leader.applied_index, image)
    c.handle(n(1))
    assert c.storage[n(1)].snap.meta.index == leader.applied_index
    c.cut.clear()
    c.delivered.clear()
    c.tick_all(6)
    seen = [m for m in c.delivered if m.type == MessageType.SNAP]
    assert len({m.chunk_index for m in seen}) == len(image) // 4 + 1
    f = c.cores[n(3)]
    assert c.storage[n(3)].snap.data == image
    assert f.log.snap_index == c.storage[n(1)].snap.meta.index
    leader.propose(b"after-snap")
    c.tick_all(2)
    assert c.applied[n(3)][-1].data == b"after-snap"


# -- reads ---------------------------------------------------------------------------------------------------
def test_read_index_waits_for_quorum_heartbeat() -> None:
    """Thesis §6.4 read-index: confirm leadership with a heartbeat round, then serve at the commit index."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(1)
    assert leader.read_index(ctx=42)
    rd = leader.ready()
    assert rd.read_states == []
    c.queue.extend(rd.messages_now)
    leader.advance(rd)
    c.deliver()
    assert c.reads[n(1)] == [(42, leader.commit_index)]


def test_read_index_refused_until_leader_commits_in_its_term() -> None:
    """Thesis §6.4 step 1: a new leader first commits an entry of its term (its no-op), then serves reads."""
    st = MemoryStorage(bootstrap_snapshot(frozenset({n(1), n(2), n(3)})))
    leader = RaftCore(RaftConfig(n(1), G, election_timeout_ticks=ET), st, lambda k: 0)
    for _ in range(2 * ET):
        leader.tick()
    leader.step(Message(MessageType.PRE_VOTE_RESP, G, n(2), n(1), 1))
    leader.step(Message(MessageType.VOTE_RESP, G, n(2), n(1), 1))
    assert leader.role == Role.LEADER
    rd = leader.ready()
    st.append(rd.entries)
    leader.advance(rd)
    assert not leader.read_index(ctx=1)
    leader.step(Message(MessageType.APP_RESP, G, n(2), n(1), 1, index=1))
    assert leader.commit_index == 1
    assert leader.read_index(ctx=2)


def test_lease_read_valid_then_expires() -> None:
    """Thesis §6.4.1 lease: valid for election_timeout - margin ticks after a quorum acked a heartbeat."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(2)
    assert leader.lease_valid()
    assert leader.read_index(ctx=5, lease=True)
    assert [r.ctx for r in leader.ready().read_states] == [5]
    leader.advance(leader._outstanding)  # type: ignore[arg-type]
    c.isolate(1)
    for _ in range(ET - 2):
        c.tick(1)
        c.deliver()
    assert not leader.lease_valid()
    assert leader.role == Role.LEADER


def test_lease_revoked_by_leadership_transfer() -> None:
    """Thesis §6.4.1 + §3.10: after TimeoutNow the target may win inside the lease, so the lease ends."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(2)
    assert leader.lease_valid()
    leader.transfer_leadership(n(2))
    assert not leader.lease_valid()


# -- persistence contract ------------------------------------------------------------------------------------
def test_ready_contract_acks_after_persist_leader_appends_before() -> None:
    """Thesis §10.2.1: the leader may send appends before its own write; acks and votes wait for persistence."""
    c = Cluster(3)
    leader = c.elect(1)
    c.tick_all(1)
    leader.propose(b"x")
    rd = leader.ready()
    assert any(m.type == MessageType.APP for m in rd.messages_now)
    assert not any(m.type == MessageType.APP for m in rd.messages)
    c.queue.extend(rd.messages_now)
    c.storage[n(1)].append(rd.entries)
    leader.advance(rd)
    app = next(m for m in c.queue if m.type == MessageType.APP and m.dst == 2)
    f = c.cores[n(2)]
    f.step(app)
    frd = f.ready()
    assert frd.entries and all(m.type != MessageType.APP_RESP for m in frd.messages_now)
    assert any(m.type == MessageType.APP_RESP for m in frd.messages)
    # The planted bug moves the ack before persistence.
    c.start(n(3), frozenset({"ack_before_persist"}))
    app3 = next(m for m in c.queue if m.type == MessageType.APP and m.dst == 3)
    c.cores[n(3)].step(app3)
    assert any(m.type == MessageType.APP_RESP for m in c.cores[n(3)].ready().messages_now)


def test_leader_counts_itself_only_once_durable() -> None:
    """§5.4.2 + thesis §10.2.1: the leader's own replica counts toward commit only after advance()."""
    c = Cluster(1)
    leader = c.elect(1)
    idx = leader.propose(b"solo")
    rd = leader.ready()
    assert rd.entries and rd.entries[-1].index == idx
    assert leader.commit_index < idx
    c.storage[n(1)].append(rd.entries)
    leader.advance(rd)
    assert leader.commit_index == idx


def test_restart_recovers_log_and_reapplies_committed() -> None:
    """Raft paper Figure 2 persistent state: term, vote and log survive a crash; committed entries re-apply."""
    c = Cluster(3)
    leader = c.elect(1)
    for k in range(3):
        leader.propose(b"r%d" % k)
    c.deliver()
    c.tick_all(2)
    before = [e.data for e in c.applied[n(2)]]
    c.applied[n(2)] = []
    f = c.start(n(2))
    assert f.term == leader.term
    c.tick_all(2)
    assert [e.data for e in c.applied[n(2)]][: len(before)] == before


@pytest.mark.parametrize("mutation", ["nope"])
def test_unknown_mutation_rejected(mutation: str) -> None:
    st = MemoryStorage(bootstrap_snapshot(frozenset({n(1)})))
    with pytest.raises(AssertionError):
        RaftCore(RaftConfig(n(1), G), st, lambda k: 0, frozenset({mutation}))
