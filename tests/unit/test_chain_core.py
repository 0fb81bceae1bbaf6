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
)

G = GroupId(3)
CHAIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "raftblock" / "replication" / "chain"
_SM = struct.Struct("<QI")


def n(i: int) -> NodeId:
    return NodeId(i)


class Member:
    """A core plus what its runtime keeps: durable records, a digest state machine, answers."""

    def __init__(self, nid: NodeId) -> None:
        self.id = nid
        self.durable: dict[int, bytes] = {}
        self.sm_seq = 0
        self.sm_digest = 0
        self.client_acks: list[int] = []
        self.reads: list[tuple[int, int]] = []
        self.core = ChainCore(nid, G, self.image, retry_interval=5)

    def image(self) -> ChainSnapshot:
        return ChainSnapshot(self.sm_seq, _SM.pack(self.sm_seq, self.sm_digest))


class Chain:
    """Members plus a FIFO network; `down` nodes neither send nor receive; `hold` keeps messages back."""

    def __init__(self, k: int) -> None:
        self.members = {n(i): Member(n(i)) for i in range(1, k + 1)}
        self.net: list[ChainMessage] = []
        self.down: set[NodeId] = set()
        self.now = 0
        self.persist = True  # False: the runtime has not finished writing (no advance yet)
        self.pending: dict[NodeId, ChainReady] = {}
        self.configure(ChainConfig(1, tuple(self.members)))
        self.settle()

    def add(self, i: int) -> Member:
        m = Member(n(i))
        self.members[m.id] = m
        return m

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
                if not self.persist:
                    self.pending[m.id] = rd
                    break
                self.finish(m, rd)

    def finish(self, m: Member, rd: ChainReady) -> None:
        if rd.snapshot is not None:
            m.durable = {}
            m.sm_seq, m.sm_digest = _SM.unpack(rd.snapshot.image)
        for r in rd.records:
            m.durable[r.seq] = r.data
        self.net.extend(rd.messages)
        for r in rd.applies:
            assert r.seq == m.sm_seq + 1
            m.sm_seq, m.sm_digest = r.seq, zlib.crc32(r.data, m.sm_digest)
        m.client_acks.extend(rd.client_acks)
        m.reads.extend(rd.reads)
        m.core.advance(rd)

    def release(self) -> None:
        self.persist = True
        for nid, rd in list(self.pending.items()):
            del self.pending[nid]
            self.finish(self.members[nid], rd)
        self.drain()

    def run(self, max_msgs: int = 10_000) -> list[ChainMessage]:
        delivered = []
        while self.net and max_msgs:
            max_msgs -= 1
            msg = self.net.pop(0)
            if msg.src in self.down or msg.dst in self.down or msg.dst not in self.members:
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
    """chain.md persist before ack: forwarding is pipelined, but no ACK and no client ack until durable."""
    c = Chain(3)
    c.persist = False
    c.members[n(1)].core.propose(b"a")
    c.drain()
    delivered = c.run()
    assert [m.type for m in delivered] == [MessageType.WRITE, MessageType.WRITE]  # forwarded before persist
    assert not c.net and c.members[n(1)].client_acks == []
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
