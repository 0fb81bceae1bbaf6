# Unit tests of specific behaviours of raftblock.replication.chain.ChainCore (docs/chain.md), each naming
# the rule it enforces ("chain.md: persist before ack", ...). A tiny hand-driven network (Chain) stands in
# for the runtime and the metadata group; the randomized fault testing is in test_chain_sim.py.
from __future__ import annotations

import ast
import pathlib
import struct
import zlib

from raftblock.replication.chain import (
    ChainConfig,
    ChainCore,
    ChainMessage,
    ChainReady,
    ChainSnapshot,
    GroupId,
    MessageType,
    NodeId,
    Record,
)

G = GroupId(3)
CHAIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "raftblock" / "replication" / "chain"
_SM = struct.Struct("<QI")


def n(i: int) -> NodeId:
    return NodeId(i)


class Member:
    """A core plus what its runtime keeps: durable records (with their epochs), the durable snapshot, the
    last adopted epoch, a digest state machine, answers."""

    def __init__(self, nid: NodeId, **core_kw: int) -> None:
        self.id = nid
        self.durable: dict[int, bytes] = {}
        self.records: dict[int, Record] = {}
        self.snap = ChainSnapshot(0, _SM.pack(0, 0), 0)
        self.sm_seq = 0
        self.sm_digest = 0
        self.applied: list[tuple[int, bytes]] = []  # every apply, in order (re-applies after a snapshot too)
        self.client_acks: list[int] = []
        self.reads: list[tuple[int, int]] = []
        self.core_kw = {"retry_interval": 5, **core_kw}
        self.core = ChainCore(nid, G, self.image, **self.core_kw)

    def image(self) -> ChainSnapshot:
        return ChainSnapshot(self.sm_seq, _SM.pack(self.sm_seq, self.sm_digest))

    def restart(self, epoch: int) -> None:
        """A crash and a restart from the durable log: the state machine from the durable snapshot, the
        records after it, `epoch` the last one adopted (ChainCore.restore)."""
        self.sm_seq, self.sm_digest = _SM.unpack(self.snap.image)
        recs = [self.records[s] for s in sorted(self.records)]
        self.core = ChainCore(self.id, G, self.image, **self.core_kw)
        self.core.restore(self.snap.seq, self.snap.epoch, recs, epoch)


class Chain:
    """Members plus a FIFO network; `down` nodes neither send nor receive; `slow` members (all while
    `persist` is False) keep their Ready pending: the disk write has not finished, nothing after
    messages_now happens until release()."""

    def __init__(self, k: int, **core_kw: int) -> None:
        self.core_kw = core_kw
        self.members = {n(i): Member(n(i), **core_kw) for i in range(1, k + 1)}
        self.net: list[ChainMessage] = []
        self.down: set[NodeId] = set()
        self.slow: set[NodeId] = set()
        self.now = 0
        self.persist = True  # False: the runtime has not finished writing (no advance yet)
        self.pending: dict[NodeId, ChainReady] = {}
        self.configure(ChainConfig(1, tuple(self.members)))
        self.settle()

    def add(self, i: int) -> Member:
        m = Member(n(i), **self.core_kw)
        self.members[m.id] = m
        return m

    def crash(self, i: int) -> Member:
        """The node loses everything volatile, including a pending (unfinished) disk write."""
        self.pending.pop(n(i), None)
        self.down.add(n(i))
        return self.members[n(i)]

    def configure(self, cfg: ChainConfig) -> None:
        for m in self.members.values():
            if m.id not in self.down:
                m.core.set_config(cfg)
                m.core.grant_lease(cfg.epoch, self.now + 50)
        self.drain()

    def settle(self) -> None:
        self.drain()
        self.run()

    def drain(self) -> None:
        for m in self.members.values():
            if m.id in self.down or m.id in self.pending:
                continue
            while m.core.has_ready():
                rd = m.core.ready()
                self.net.extend(rd.messages_now)
                if not self.persist or m.id in self.slow:
                    self.pending[m.id] = rd
                    break
                self.finish(m, rd)

    def finish(self, m: Member, rd: ChainReady) -> None:
        if rd.snapshot is not None:
            m.durable = {}
            m.records = {}
            m.snap = rd.snapshot
            m.sm_seq, m.sm_digest = _SM.unpack(rd.snapshot.image)
        for r in rd.records:
            m.durable[r.seq] = r.data
            m.records[r.seq] = r
        self.net.extend(rd.messages)
        for r in rd.applies:
            assert r.seq == m.sm_seq + 1
            m.sm_seq, m.sm_digest = r.seq, zlib.crc32(r.data, m.sm_digest)
            m.applied.append((r.seq, r.data))
        m.client_acks.extend(rd.client_acks)
        m.reads.extend(rd.reads)
        m.core.advance(rd)

    def release(self) -> None:
        self.persist = True
        self.slow.clear()
        for nid, rd in list(self.pending.items()):
            del self.pending[nid]
            self.finish(self.members[nid], rd)
        self.drain()

    def run(self, max_msgs: int = 10_000, lose: MessageType | None = None) -> list[ChainMessage]:
        """Deliver in order; `lose`: the first message of that type is lost."""
        delivered = []
        while self.net and max_msgs:
            max_msgs -= 1
            msg = self.net.pop(0)
            if msg.src in self.down or msg.dst in self.down or msg.dst not in self.members:
                continue
            if msg.type == lose:
                lose = None
                continue
            delivered.append(msg)
            self.members[msg.dst].core.step(msg)
            self.drain()
        return delivered

    def tick(self, k: int = 1) -> None:
        for _ in range(k):
            self.now += 1
            for m in self.members.values():
                if m.id not in self.down:
                    m.core.tick(self.now)
            self.drain()
            self.run()

    def write(self, head: int, data: bytes) -> int:
        seq = self.members[n(head)].core.propose(data)
        self.drain()
        self.run()
        return seq


def test_normal_write_path_three_members_acks_in_order() -> None:
    """chain.md: head assigns consecutive seqs; WRITE goes head->tail, cumulative ACK comes back."""
    c = Chain(3)
    seqs = [c.write(1, b"w%d" % i) for i in range(1, 6)]
    assert seqs == [1, 2, 3, 4, 5]
    assert c.members[n(1)].client_acks == [1, 2, 3, 4, 5]
    for m in c.members.values():
        assert m.durable == {i: b"w%d" % i for i in range(1, 6)}
        assert m.sm_seq == 5
        assert m.core.applied_seq == 5
    assert c.members[n(2)].core.propose(b"x") == 0  # only the head accepts proposals


def test_no_ack_before_own_record_durable() -> None:
    """chain.md persist before ack: the middle forwards before its own write is done (pipelining), but
    sends no ACK, even with its successor's ACK in hand, and the head no client ack, until durable."""
    c = Chain(3)
    c.slow.add(n(2))
    c.members[n(1)].core.propose(b"a")
    c.drain()
    delivered = c.run()
    hops = [(m.type, m.src, m.dst) for m in delivered]
    assert hops == [
        (MessageType.WRITE, n(1), n(2)),
        (MessageType.WRITE, n(2), n(3)),  # forwarded before the middle's write finished
        (MessageType.ACK, n(3), n(2)),
    ]
    assert not c.net and c.members[n(1)].client_acks == [] and c.members[n(2)].durable == {}
    c.release()
    c.run()
    assert c.members[n(1)].client_acks == [1]


def test_single_member_chain_acks_when_durable() -> None:
    c = Chain(1)
    assert c.write(1, b"solo") == 1
    assert c.members[n(1)].client_acks == [1]
    assert c.members[n(1)].core.read(7)
    c.drain()
    assert c.members[n(1)].reads == [(7, 1)]


def test_stale_and_future_epoch_refused_and_counted() -> None:
    """chain.md epochs: a message of another epoch is refused (older: zombie; newer: map not learned)."""
    c = Chain(3)
    c.write(1, b"a")
    core2 = c.members[n(2)].core
    core2.step(ChainMessage(MessageType.ACK, G, n(3), n(2), epoch=0, seq=1))
    core2.step(ChainMessage(MessageType.ACK, G, n(3), n(2), epoch=2, seq=1))
    assert core2.counters["stale_epoch"] == 1 and core2.counters["future_epoch"] == 1
    core2.step(ChainMessage(MessageType.WRITE, G, n(3), n(2), epoch=1, seq=1))
    assert core2.counters["not_neighbour"] == 1  # right epoch, wrong sender


def test_removed_member_cannot_produce_a_client_ack() -> None:
    """chain.md zombies: a removed tail's ACK carries the old epoch and the head refuses it; a member
    outside its configuration never acks."""
    c = Chain(3)
    c.write(1, b"a")
    c.down.add(n(3))
    c.configure(ChainConfig(2, (n(1), n(2))))
    c.run()
    zombie = c.members[n(3)].core
    assert zombie.epoch == 1  # it never learned epoch 2
    # The zombie tail gets a write through a stale path and acks it with epoch 1: refused upstream.
    c.down.discard(n(3))
    head = c.members[n(1)].core
    head.propose(b"b")  # seq 2, forwarded to 2 in epoch 2 ...
    c.drain()
    c.members[n(2)].core.step(ChainMessage(MessageType.ACK, G, n(3), n(2), epoch=1, seq=2))
    assert c.members[n(2)].core.counters["stale_epoch"] == 1
    head.step(ChainMessage(MessageType.ACK, G, n(3), n(1), epoch=1, seq=2))
    assert head.counters["stale_epoch"] == 1
    c.down.add(n(3))
    c.run()
    assert c.members[n(1)].client_acks == [1, 2]  # acked by the real tail (2) of epoch 2
    # A member that learns it was removed never acks and never serves reads.
    c.down.discard(n(3))
    zombie.set_config(ChainConfig(2, (n(1), n(2))))
    assert not zombie.is_member
    zombie.step(ChainMessage(MessageType.WRITE, G, n(2), n(3), epoch=2, seq=3))
    assert zombie.counters["not_member"] == 1
    assert not zombie.has_ready() or not zombie.ready().messages
    assert not zombie.read(1) and zombie.propose(b"x") == 0


def test_middle_failure_predecessor_resends_suffix_after_sync() -> None:
    """chain.md reconfiguration: the new successor SYNCs its durable seq; the predecessor resends the rest."""
    c = Chain(3)
    c.write(1, b"a")
    c.down.add(n(3))  # the tail is cut off: seqs 2..3 reach only the middle
    c.write(1, b"b")
    c.write(1, b"c")
    assert c.members[n(1)].client_acks == [1]
    c.down = {n(2)}  # the middle fails; the tail never got 2..3
    c.configure(ChainConfig(2, (n(1), n(3))))
    delivered = c.run()
    sync = [m for m in delivered if m.type == MessageType.SYNC]
    assert sync and sync[0].seq == 1 and sync[0].src == n(3)
    assert c.members[n(3)].durable == {1: b"a", 2: b"b", 3: b"c"}
    assert c.members[n(1)].client_acks == [1, 2, 3]


def test_tail_failure_new_tail_acks_everything_it_holds() -> None:
    """chain.md: once it is tail, the old middle's durable records are committed; it acks them."""
    c = Chain(3)
    c.write(1, b"a")
    c.down.add(n(3))
    c.write(1, b"b")
    assert c.members[n(1)].client_acks == [1]
    assert c.members[n(2)].durable.get(2) == b"b"
    c.configure(ChainConfig(2, (n(1), n(2))))
    c.run()
    assert c.members[n(1)].client_acks == [1, 2]
    assert c.members[n(2)].sm_seq == 2


def test_join_at_tail_with_snapshot() -> None:
    """chain.md join: the old tail sends SNAPSHOT at its applied seq, then the records after it."""
    c = Chain(2)
    for i in range(4):
        c.write(1, b"w%d" % i)
    new = c.add(3)
    c.configure(ChainConfig(2, (n(1), n(2), n(3))))
    delivered = c.run()
    snaps = [m for m in delivered if m.type == MessageType.SNAPSHOT]
    assert len(snaps) == 1 and snaps[0].seq == 4 and snaps[0].src == n(2)
    assert new.sm_seq == 4 and new.sm_digest == c.members[n(2)].sm_digest
    assert new.core.synced
    c.write(1, b"after")
    assert new.durable == {5: b"after"} and new.sm_seq == 5
    assert c.members[n(1)].client_acks == [1, 2, 3, 4, 5]
    # The new tail reads once synced and leased.
    assert new.core.read(1)


def test_tail_read_needs_a_lease_of_its_epoch() -> None:
    """chain.md reads: the tail serves only while its lease (from the metadata group) is unexpired."""
    c = Chain(3)
    c.write(1, b"a")
    tail = c.members[n(3)].core
    assert not c.members[n(2)].core.read(1)  # not the tail
    assert tail.read(2)
    c.drain()
    assert c.members[n(3)].reads == [(2, 1)]
    c.tick(50)  # lease granted until 50 expires
    assert not tail.read(3)
    tail.grant_lease(0, c.now + 10)  # a lease of another epoch does not count
    assert not tail.read(4) and tail.counters["leases_refused"] == 1
    tail.grant_lease(1, c.now + 10)
    assert tail.read(5)


def test_lost_messages_are_resent_on_tick() -> None:
    c = Chain(3)
    c.members[n(1)].core.propose(b"a")
    c.drain()
    c.net.clear()  # the WRITE is lost
    c.tick(6)
    assert c.members[n(1)].client_acks == [1]


def test_core_modules_import_no_io() -> None:
    """DESIGN principle 1/8: the chain core imports no asyncio, socket, time, random or os."""
    banned = {"asyncio", "socket", "time", "random", "os", "threading", "select"}
    for name in ("__init__.py", "core.py", "types.py"):
        tree = ast.parse((CHAIN_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]] if node.level == 0 else []
            else:
                continue
            assert not banned & set(names), f"{name} imports {banned & set(names)}"


# == restart from the durable log (ChainCore.restore) ==========================================================
def test_restore_waits_for_a_newer_epoch_then_syncs_its_log_end() -> None:
    """chain.md restart: a restored core ignores configurations up to the epoch it had adopted; in a newer
    one it SYNCs the end of its log: (last seq, the epoch of that record)."""
    c = Chain(3)
    for i in range(1, 4):
        c.write(1, b"w%d" % i)
    m2 = c.crash(2)
    m2.restart(epoch=1)
    core = m2.core
    assert (core.last_seq, core.durable_seq, core.applied_seq, core.epoch) == (3, 3, 0, 1)
    assert core.epoch_at(3) == 1 and core.epoch_at(0) == 0 and core.epoch_at(4) == -1
    core.step(ChainMessage(MessageType.WRITE, G, n(1), n(2), epoch=1, seq=3))
    assert core.counters["no_config"] == 1  # its place in epoch 1 is lost: it takes nothing
    core.set_config(ChainConfig(1, (n(1), n(2), n(3))))
    assert core.counters["configs_ignored"] == 1 and core.config is None
    core.set_config(ChainConfig(2, (n(1), n(2), n(3))))
    sync = [(m.type, m.seq, m.log_epoch) for m in core.ready().messages_now]
    assert sync == [(MessageType.SYNC, 3, 1)]


def test_restart_in_place_with_a_matching_log_needs_no_snapshot() -> None:
    """chain.md restart: the metadata group gives the restarted member a newer epoch, same members; its log
    matches its predecessor's at its end, so only what follows is sent; it re-applies its records."""
    c = Chain(3)
    for i in range(1, 4):
        c.write(1, b"w%d" % i)
    c.crash(2).restart(epoch=1)
    c.down.clear()
    c.configure(ChainConfig(2, (n(1), n(2), n(3))))
    c.settle()
    c.write(1, b"w4")
    head, m2 = c.members[n(1)], c.members[n(2)]
    assert head.client_acks == [1, 2, 3, 4]
    for m in c.members.values():
        assert m.core.counters["snapshots_sent"] == 0 and m.core.counters["sync_mismatch"] == 0
        assert m.durable == {i: b"w%d" % i for i in range(1, 5)} and m.sm_digest == head.sm_digest
    assert [s for s, _ in m2.applied] == [1, 2, 3, 1, 2, 3, 4]  # the restart re-applied 1..3


def test_successor_ahead_of_a_restarted_member_gets_a_snapshot_below_its_applied_seq() -> None:
    """chain.md restart: the middle forwarded records before its own write finished and crashed; its
    successor's log is longer (sync_ahead): a snapshot replaces the successor's log and state machine,
    below what it had applied, and the same records are applied again."""
    c = Chain(3, batch_max=1)
    for i in range(1, 4):
        c.write(1, b"w%d" % i)
    c.slow.add(n(2))  # the middle's disk write does not finish before its crash
    for i in (4, 5):
        c.members[n(1)].core.propose(b"w%d" % i)
    c.drain()
    c.drain()
    # Both WRITEs reach the middle before its runtime takes a Ready: it forwards both, then crashes.
    middle = c.members[n(2)]
    for msg in [m for m in c.net if m.dst == n(2)]:
        middle.core.step(msg)
    c.net = [m for m in c.net if m.dst != n(2)]
    c.drain()
    c.run()
    tail = c.members[n(3)]
    assert tail.sm_seq == 5 and c.members[n(1)].client_acks == [1, 2, 3]
    c.crash(2).restart(epoch=1)
    c.down.clear()
    c.slow.clear()
    c.configure(ChainConfig(2, (n(1), n(2), n(3))))
    c.settle()
    c.tick(30)
    assert c.members[n(2)].core.counters["sync_ahead"] == 1
    assert c.members[n(1)].client_acks == [1, 2, 3, 4, 5]
    assert [s for s, _ in tail.applied][:5] == [1, 2, 3, 4, 5] and tail.applied[5:] == tail.applied[:5]
    assert tail.sm_digest == c.members[n(1)].sm_digest and tail.core.read(1)


def test_tail_truncated_by_a_snapshot_reads_no_older_state_than_it_had() -> None:
    """chain.md reads: as above, one member further: the middle's successor, replaced by a snapshot
    below what it had applied, answers the tail's SYNC while its own log is short again; the tail (also
    replaced) must not serve reads below what it had applied (seq 3 was acknowledged). Core bug before
    the fix: the tail's read floor was its predecessor's last seq (1), reads saw seqs 1 and 2."""
    c = Chain(4, batch_max=1)
    for i in range(1, 4):
        c.write(1, b"w%d" % i)
    c.slow.add(n(2))
    for i in (4, 5):
        c.members[n(1)].core.propose(b"w%d" % i)
    c.drain()
    c.drain()
    middle = c.members[n(2)]
    for msg in [m for m in c.net if m.dst == n(2)]:
        middle.core.step(msg)
    c.net = [m for m in c.net if m.dst != n(2)]
    c.drain()
    c.run()
    tail = c.members[n(4)]
    assert tail.sm_seq == 5 and c.members[n(1)].client_acks == [1, 2, 3]
    c.crash(2).restart(epoch=1)
    c.down.clear()
    c.slow.clear()
    c.configure(ChainConfig(2, (n(1), n(2), n(3), n(4))))
    ctx = 0
    while c.net:
        c.run(max_msgs=1)
        ctx += 1
        if tail.core.read(ctx):
            c.drain()
    assert c.members[n(3)].core.counters["sync_ahead"] == 1  # the tail was replaced by a snapshot too
    assert tail.reads and min(seq for _, seq in tail.reads) >= 5, tail.reads


def divergent_rejoin(lose: MessageType | None) -> Chain:
    """Node 3 rejoins at the tail with a log whose seq 3 is another epoch's (a zombie head's, never acked);
    its SYNC does not match (sync_mismatch) and the answer is SNAPSHOT then WRITE; `lose` one of them."""
    c = Chain(2)
    c.write(1, b"a1")
    c.write(1, b"a2")
    c.configure(ChainConfig(2, (n(1), n(2))))
    c.settle()
    c.write(1, b"a3")  # seq 3 of epoch 2
    m3 = c.add(3)
    m3.core.restore(0, 0, [Record(1, b"a1", 1), Record(2, b"a2", 1), Record(3, b"zombie", 1)], 1)
    c.configure(ChainConfig(3, (n(1), n(2), n(3))))
    c.run(lose=lose)
    c.tick(20)
    return c


def test_rejoin_with_a_divergent_log_is_replaced_by_a_snapshot() -> None:
    c = divergent_rejoin(lose=None)
    m2, m3 = c.members[n(2)], c.members[n(3)]
    assert m2.core.counters["sync_mismatch"] == 1
    assert m3.durable == {} and m3.sm_seq == 3 and m3.sm_digest == m2.sm_digest
    c.write(1, b"a4")
    assert c.members[n(1)].client_acks[-1] == 4 and m3.durable == {4: b"a4"}


def test_rejoin_with_a_divergent_log_syncs_only_on_a_write_that_continues_it() -> None:
    """The SNAPSHOT answering the SYNC is lost (or overtaken by the WRITE after it): that WRITE does not
    continue the member's log, so it must not make the member synced (it would ack and apply its own
    record 3). Core bug before the fix: the member applied b"zombie" at seq 3 and ignored later snapshots."""
    c = divergent_rejoin(lose=MessageType.SNAPSHOT)
    m2, m3 = c.members[n(2)], c.members[n(3)]
    assert (3, b"zombie") not in m3.applied
    assert m3.sm_seq == 3 and m3.sm_digest == m2.sm_digest


def test_head_restarted_in_place_cannot_take_back_what_the_tail_applied() -> None:
    """chain.md restart: the head crashed after its WRITE left but before its own write finished; it
    restarts from its log without that record and, as head again, assigns its seq to another write. The
    tail must not have applied the lost record (applied histories are prefixes of one history). Core bug
    before the fix: the head forwarded before persisting, the tail applied b"lost", then b"new" at 2."""
    c = Chain(2)
    c.write(1, b"a1")
    c.slow.add(n(1))
    c.members[n(1)].core.propose(b"lost")
    c.drain()
    c.run()
    c.crash(1).restart(epoch=1)
    c.down.clear()
    c.slow.clear()
    c.configure(ChainConfig(2, (n(1), n(2))))
    c.settle()
    c.write(1, b"new")
    c.tick(20)
    head, tail = c.members[n(1)], c.members[n(2)]
    assert head.client_acks[-1] == 2 and head.durable == {1: b"a1", 2: b"new"}
    history: dict[int, bytes] = {}
    for seq, data in tail.applied:
        assert history.setdefault(seq, data) == data, f"tail applied {seq} twice, differently: {tail.applied}"
    assert tail.sm_digest == head.sm_digest


def test_late_sync_answered_with_a_snapshot_does_not_stall_the_stream() -> None:
    """A late duplicate of the successor's first SYNC of the epoch arrives once the predecessor's log no
    longer reaches its seq: it is answered with a snapshot (ignored by the synced successor). Core bug
    before the fix: _succ_have went back to 0 and the ACKs that followed acknowledged nothing new, so
    the in-flight window stayed at 0 + inflight_max and nothing more was forwarded."""
    c = Chain(2, inflight_max=2)
    for i in range(1, 6):
        c.write(1, b"w%d" % i)
    head = c.members[n(1)]
    head.core.step(ChainMessage(MessageType.SYNC, G, n(2), n(1), epoch=1, seq=1, log_epoch=1))
    c.settle()
    for i in range(6, 9):
        c.write(1, b"w%d" % i)
    c.tick(30)
    assert head.client_acks == list(range(1, 9))


def test_log_dropped_after_answering_a_sync_is_sent_as_a_snapshot() -> None:
    """A Ready applying records is outstanding (slow disk) when the joiner's SYNC is answered from the
    log; once it is advanced the log no longer holds what the joiner needs next. Core bug before the fix:
    _flush indexed the log below its base (IndexError, or a wrong record for a negative index in range)."""
    c = Chain(1, inflight_max=1)
    m1 = c.members[n(1)]
    c.slow.add(n(1))
    for i in range(1, 4):
        m1.core.propose(b"w%d" % i)
    c.drain()
    c.finish(m1, c.pending.pop(n(1)))  # the records are durable: applying them is the next Ready ...
    c.drain()  # ... still being written when the joiner arrives
    new = c.add(2)
    c.configure(ChainConfig(2, (n(1), n(2))))
    c.run()
    c.release()
    c.settle()
    c.tick(20)
    assert new.sm_seq == 3 and new.sm_digest == m1.sm_digest
    c.write(1, b"w4")
    assert m1.client_acks == [1, 2, 3, 4] and new.durable == {4: b"w4"}


def test_caught_up_behind_the_head_holds_into_the_next_epoch_before_syncing() -> None:
    """chain.md, what the metadata group must guarantee: the head's successor, caught up, still reports
    caught up in the next epoch (a join at the tail) before it has synced there, so the metadata group can
    replace a head that failed as the join was made; a joiner, or a member caught up behind a middle, does
    not; an epoch skipped (removed and re-added meanwhile) loses it."""
    c = Chain(3)
    for i in range(3):
        c.write(1, b"w%d" % i)
    assert all(m.core.caught_up for m in c.members.values())
    new = c.add(4)
    c.down.add(n(1))  # the head fails as the join is made: nobody hears from it again
    c.configure(ChainConfig(2, (n(1), n(2), n(3), n(4))))
    c.run()
    second, third = c.members[n(2)].core, c.members[n(3)].core
    assert not second.synced and second.caught_up
    assert not third.synced and not third.caught_up  # it caught up behind a middle: not known
    assert not new.core.caught_up
    # The metadata group removes the failed head: the successor heads, the others sync from it.
    c.configure(ChainConfig(3, (n(2), n(3), n(4))))
    c.run()
    assert all(c.members[n(i)].core.caught_up for i in (2, 3, 4))
    c.write(2, b"after")
    assert c.members[n(2)].client_acks[-1] == 4
    # An epoch skipped: not known any more until it syncs again.
    third.set_config(ChainConfig(5, (n(2), n(3))))
    assert not third.caught_up
