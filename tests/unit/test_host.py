"""The storage node's host (node/host.py) on its own: fake replicas (the Replica interface, no Raft, no
chain) over a real WAL and a real engine on an in-memory disk (storage/disk.py MemDisk), with client
frames handed to it directly. No socket is opened: what is checked is the host's own contract, the turn
(rule 1), group commit (node/group_commit.py rules 1-3), the data plane's edge (node/dataplane.py rules
1-2), failure (rule 3) and dropping a replica (rule 4)."""

from __future__ import annotations

import asyncio
import errno
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

import pytest

from raftblock._fast import blockcrc
from raftblock.node.config import HostConfig
from raftblock.node.host import NodeHost
from raftblock.replication.raft.types import ConfState, Entry, EntryType, HardState, SnapshotMeta
from raftblock.replication.replica import NodeContext, ReplicaBase, ScrubView
from raftblock.replication.requests import NotLeaderError, Reply
from raftblock.replication.sessions import Sessions, image_prefix
from raftblock.replication.wal import Wal, WalStorage
from raftblock.storage.disk import MemDisk
from raftblock.storage.engine import Engine, EngineConfig
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import (
    OP_C_READ,
    OP_C_WRITE,
    ST_CORRUPT,
    ST_NO_SPACE,
    ST_NOT_LEADER,
    ST_OK,
    ST_STALE_EPOCH,
    ST_UNAVAILABLE,
    ST_UNKNOWN_GROUP,
)
from raftblock.wire.framing import Frame, FrameDecoder, FrameType, encode_frame
from raftblock.wire.ops import OP_TRIM, OP_WRITE, BlockOp, encode_batch

BLOCK = 4096


class FakeReady:
    def __init__(self, name: str, index: int, data: list[bytes], image: bytes = b"") -> None:
        self.name = name
        self.index = index
        self.data = data
        self.image = image
        self.messages = ["ack"]


class FakeReplica(ReplicaBase):
    """A replica that persists what it is told and applies it after the sync: every host call is logged
    (shared `events`) so the tests can check the host's ordering."""

    kind: ClassVar[str] = "fake"

    def __init__(self, ctx: NodeContext, gid: int, events: list[tuple[str, int, str]]) -> None:
        storage = WalStorage(ctx.wal, gid, None, SnapshotMeta(0, 0, ConfState(frozenset())), lambda _m: b"")
        super().__init__(ctx, gid, storage, Sessions())
        self.events = events
        self.queue: list[FakeReady] = []
        self.last = 0
        self.writable = True
        self.leader_hint = 0
        self.proposals: dict[int, list[Reply]] = {}  # type: ignore[assignment]
        self.proposed: list[int] = []  # writes per proposal
        self.hold = False  # keep the outstanding Ready (tests of discard)

    def enqueue(self, name: str, data: list[bytes], image: bytes = b"") -> None:
        self.last += 1
        self.queue.append(FakeReady(name, self.last, data, image))
        self.ctx.dirty.add(self.id)
        self.ctx.kick()

    def has_ready(self) -> bool:
        return bool(self.queue)

    def handle_ready(self) -> None:
        rd = self.rd = self.queue.pop(0)
        self.events.append(("ready", self.id, rd.name))
        if rd.image:
            self.start_install(rd, rd.image)
            self.configure_now()  # a chain configuration arriving while the image installs
            return
        self.persist(rd, False)

    def configure_now(self) -> None:
        self.storage.set_hard_state(HardState(7, 0, 0))
        self.wait_sync()

    def installed(self, rd: FakeReady, app: bytes) -> None:
        self.events.append(("installed", self.id, rd.name))

    def persist(self, rd: FakeReady, must_sync: bool) -> None:
        if rd.data:
            self.storage.append([Entry(1, rd.index, EntryType.NORMAL, d) for d in rd.data[:1]])
        self.persisted(must_sync or bool(rd.data))

    def send(self, m: object) -> None:
        self.events.append(("acks", self.id, self.rd.name if self.rd is not None else "-"))

    def synced(self) -> None:
        if self.rd is not None and not self.hold and not self.installing:
            self.finish()

    def finish(self) -> None:
        rd = self.rd
        assert rd is not None
        for d in rd.data:
            self.apply_data(rd.index, d, 1)
        for reply in self.proposals.pop(rd.index, []):
            reply.set_result(rd.index)
        self.events.append(("finish", self.id, rd.name))
        self.rd = None
        self.ctx.dirty.add(self.id)
        self.ctx.kick()

    def propose(self, replies: list[Reply], data: bytes) -> None:
        self.proposed.append(len(replies))
        self.enqueue(f"p{len(self.proposed)}", [data])
        self.proposals[self.last] = replies

    def check_writable(self) -> None:
        if not self.writable:
            raise NotLeaderError(self.leader_hint)

    def tick(self, n: int, now: int) -> None:
        pass

    def configure(self, members: list[int], epoch: int) -> None:
        pass

    def can_drop(self, deleted: bool) -> bool:
        return self.rd is None and not self.waiting

    def read_now(self) -> bool:
        return True

    async def read_barrier(self) -> int:
        return self.last

    def applied(self) -> int:
        return self.last

    def read_sources(self) -> list[int]:
        return []

    def scrub_view(self) -> ScrubView:
        return ScrubView(self.applied, [], False, False)

    def repair_refusal(self, source: int) -> str | None:
        return "fake"

    def compaction_point(self) -> tuple[int, Sessions, bytes] | None:
        return None

    def compact(self, point: int, sess: Sessions, app: bytes) -> bool:
        return False

    def info(self, allocated_bytes: int) -> pb.GroupInfo:
        return pb.GroupInfo(group=self.id, mode="fake", allocated_bytes=allocated_bytes)

    def counters(self) -> dict[str, int]:
        return {}

    def pump(self) -> bool:
        return False


class Conn:
    """A client connection: the frames the data plane sends back, decoded."""

    def __init__(self) -> None:
        self.replies: list[pb.ClientResponse] = []
        self.payloads: list[bytes] = []

    def reply(self, gid: int, resp: pb.ClientResponse, data: Sequence[bytes | bytearray | memoryview]) -> None:
        # Through the wire encoding, as a socket client gets it.
        dec = FrameDecoder()
        dec.feed(b"".join(bytes(p) for p in encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), data)))
        f = dec.next_event()
        assert isinstance(f, Frame) and f.type == FrameType.CLIENT_RESP
        self.replies.append(pb.ClientResponse.FromString(f.message))
        self.payloads.append(bytes(f.payload))


def make_host(disk: MemDisk, **cfg: int | float | str) -> NodeHost:
    disk.makedirs("/n1/engine")
    hcfg = HostConfig(1, tick_ms=20, **cfg)  # type: ignore[arg-type]
    wal, rec = Wal.open(disk, "/n1/wal", hcfg.wal_segment_bytes_max)
    engine = Engine.open(disk, "/n1/engine", b"c" * 16, EngineConfig(segment_size_bytes=1 << 20), wal=wal)
    return NodeHost(hcfg, engine, wal, rec, {}, {1: ("127.0.0.1", 1), 2: ("10.0.0.2", 7002)}, seed=1)


def add_fake(h: NodeHost, gid: int, events: list[tuple[str, int, str]]) -> FakeReplica:
    r = FakeReplica(h, gid, events)
    h.replicas[gid] = r
    return r


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def write_frame(gid: int, block: int, fill: int, epoch: int = 0, corrupt: bool = False) -> Frame:
    data = bytes([fill]) * BLOCK
    crcs = blockcrc.block_crcs(data)
    if corrupt:
        crcs = [crcs[0] ^ 1]
    req = pb.ClientRequest(op=OP_C_WRITE, extent_id=gid << 32, block=block, count=1, epoch=epoch,
                           request_id=1000 + block)
    req.crcs.extend(crcs)
    return Frame(FrameType.CLIENT_REQ, 0, gid, req.SerializeToString(), data)


def trim(gid: int) -> bytes:
    """An entry that needs a sync and applies harmlessly: trim block 100 of the group's first extent."""
    return encode_batch([BlockOp(OP_TRIM, gid << 32, 100, 1, (), b"", 0, 0, 0)])


def run(body: Callable[[NodeHost, MemDisk], Awaitable[None]], **cfg: int | float | str) -> None:
    async def main() -> None:
        disk = MemDisk()
        h = make_host(disk, **cfg)
        h.begin()
        try:
            await body(h, disk)
        finally:
            await h.stop()

    asyncio.run(main())


def test_one_fdatasync_covers_every_waiting_replica_and_acknowledgements_leave_before_applies() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        events: list[tuple[str, int, str]] = []
        rs = [add_fake(h, g, events) for g in (1, 2, 3)]
        syncs0 = h.wal.syncs
        for r in rs:  # one loop callback: all three Readies are handed over in the same turn
            r.enqueue("a", [trim(r.id)])
        await until(lambda: sum(1 for e in events if e[0] == "finish") == 3)
        assert h.wal.syncs - syncs0 == 1, "one group commit for the three replicas"
        kinds = [e[0] for e in events]
        assert kinds == ["ready"] * 3 + ["acks"] * 3 + ["finish"] * 3, events
        # A Ready that needs no sync finishes in its turn, without a group commit.
        rs[0].enqueue("nosync", [])
        await until(lambda: ("finish", 1, "nosync") in events)
        assert h.wal.syncs - syncs0 == 1

    run(body)


def test_a_turns_writes_become_one_proposal_and_each_is_answered_when_it_applies() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        r = add_fake(h, 1, [])
        conn = Conn()
        for b in range(10):
            h.on_client_frame(conn, write_frame(1, b, b + 1))
        assert conn.replies == [], "a write is not answered before it applies"
        await until(lambda: len(conn.replies) == 10)
        assert r.proposed == [10], "the ten writes of one turn are one proposal"
        assert all(x.status == ST_OK for x in conn.replies)
        assert sorted(x.request_id for x in conn.replies) == list(range(1000, 1010))
        data, _ = h.engine.read(1 << 32, 0, 10)
        assert bytes(data) == b"".join(bytes([b + 1]) * BLOCK for b in range(10))
        assert h.commits == 1
        # A read served in the frame's callback: the replica says it may (read_now).
        req = pb.ClientRequest(op=OP_C_READ, extent_id=1 << 32, block=3, count=2, request_id=7)
        h.on_client_frame(conn, Frame(FrameType.CLIENT_REQ, 0, 1, req.SerializeToString(), b""))
        assert conn.replies[-1].request_id == 7 and conn.payloads[-1] == bytes([4]) * BLOCK + bytes([5]) * BLOCK

    run(body)


def test_the_edge_refuses_with_one_precise_status_each() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        r = add_fake(h, 1, [])
        conn = Conn()

        def status(frame: Frame) -> pb.ClientResponse:
            n = len(conn.replies)
            h.on_client_frame(conn, frame)
            assert len(conn.replies) == n + 1, "refused at once, in the frame's callback"
            return conn.replies[-1]

        assert status(write_frame(9, 0, 1)).status == ST_UNKNOWN_GROUP
        assert status(write_frame(1, 0, 1, corrupt=True)).status == ST_CORRUPT
        h.on_client_frame(conn, write_frame(1, 0, 1, epoch=5))  # taken: raises the fence to 5
        await until(lambda: conn.replies[-1].status == ST_OK)
        assert status(write_frame(1, 0, 1, epoch=4)).status == ST_STALE_EPOCH
        r.writable, r.leader_hint = False, 2
        resp = status(write_frame(1, 0, 1, epoch=5))
        assert resp.status == ST_NOT_LEADER and resp.leader_hint == 2 and resp.leader_address == "10.0.0.2:7002"
        h.cfg.space_reserve_bytes = 1 << 63  # no disk has that much free
        assert status(write_frame(1, 0, 1, epoch=5)).status == ST_NOT_LEADER, "a full follower still redirects"
        r.writable = True
        assert status(write_frame(1, 0, 1, epoch=5)).status == ST_NO_SPACE
        h.fences_known = False
        assert status(write_frame(1, 0, 1, epoch=5)).status == ST_UNAVAILABLE
        assert h.counters["stale_epoch_refused"] == 1 and h.counters["writes_refused_no_space"] == 1

    run(body)


def test_a_failed_fdatasync_fails_the_node_and_answers_every_waiting_write() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        events: list[tuple[str, int, str]] = []
        r = add_fake(h, 1, events)
        conn = Conn()
        disk.sync_error = OSError(errno.EIO, "injected")
        for b in range(3):
            h.on_client_frame(conn, write_frame(1, b, 1))
        await until(lambda: len(conn.replies) == 3)
        assert h.failed is not None
        assert all(x.status == ST_UNAVAILABLE and "node failed" in x.error for x in conn.replies)
        assert not any(e[0] == "finish" for e in events), "nothing applied after a failed sync"
        h.on_client_frame(conn, write_frame(1, 5, 1))  # and nothing new is taken
        assert conn.replies[-1].status == ST_UNAVAILABLE
        r.enqueue("late", [])
        await asyncio.sleep(0.05)
        assert ("ready", 1, "late") not in events, "a failed node stops turning"
        disk.sync_error = None  # the process exits; closing it is not what is tested here

    run(body)


def test_a_replica_is_dropped_only_without_an_outstanding_ready_and_its_data_goes_with_it() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        events: list[tuple[str, int, str]] = []
        r = add_fake(h, 4, events)
        conn = Conn()
        h.on_client_frame(conn, write_frame(4, 0, 9))
        await until(lambda: len(conn.replies) == 1)
        assert (4 << 32) in h.engine.index.extents
        h.engine.pin_snapshot(4, 77)  # a snapshot of the group: it goes with the replica
        h.engine.pin_snapshot(5, 77)  # another group's stays
        r.hold = True
        r.enqueue("held", [trim(r.id)])
        await until(lambda: ("acks", 4, "held") in events)
        assert r.rd is not None
        assert not h.discard(4), "a Ready is outstanding"
        r.hold = False
        r.finish()
        assert h.discard(4)
        assert 4 not in h.replicas and (4 << 32) not in h.engine.index.extents
        assert list(h.engine.snapshots()) == [(5, 77)] and not h.engine.index.history
        assert h.counters["replicas_discarded"] + h.counters["chain_replicas_discarded"] == 1
        assert not h.discard(4), "nothing left to drop"

    run(body)


def test_the_ticker_follows_the_monotonic_clock() -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        ticks: list[tuple[int, int]] = []
        r = add_fake(h, 1, [])
        r.tick = lambda n, now: ticks.append((n, now))  # type: ignore[method-assign]
        t0 = h.ticks
        time.sleep(0.2)  # the loop is held: ten ticks of 20 ms are due at once
        h.catch_up_ticks()
        assert ticks and ticks[-1][0] >= 9 and ticks[-1][1] == h.ticks >= t0 + 9
        assert 1 in h.dirty

    run(body)


@pytest.mark.parametrize("deleted", [False, True])
def test_a_recovered_replica_the_map_no_longer_names_is_dropped_from_the_wal(deleted: bool) -> None:
    async def body(h: NodeHost, disk: MemDisk) -> None:
        add_fake(h, 6, [])
        conn = Conn()
        h.on_client_frame(conn, write_frame(6, 0, 3))
        await until(lambda: len(conn.replies) == 1)
        await h.stop()
        h2 = make_host(disk)  # restart on the same disk: group 6 is only recovered, not hosted
        assert 6 in h2.recovered and 6 not in h2.replicas
        h2.begin()
        try:
            assert h2.discard(6, deleted=deleted)
            assert 6 not in h2.recovered and (6 << 32) not in h2.engine.index.extents
        finally:
            await h2.stop()
        h3 = make_host(disk)
        try:
            rec = h3.recovered.get(6)
            # Recorded empty (a deleted group vanishes once the segments before its record are reaped).
            assert rec is None or (not rec.entries and (rec.snap is None or rec.snap.index == 0))
            assert deleted or rec is not None
        finally:
            h3.wal.close()
            h3.engine.close()

    async def main() -> None:
        disk = MemDisk()
        h = make_host(disk)
        h.begin()
        await body(h, disk)

    asyncio.run(main())


def test_an_image_installs_before_its_ready_acknowledges_or_finishes_even_when_a_sync_comes_first() -> None:
    """A group commit the replica joined for another reason (a chain configuration) completes while the
    image of its outstanding Ready is still being installed: neither the Ready's acknowledgements nor its
    finish may run before the install (replication/replica.py rule 2)."""

    async def body(h: NodeHost, disk: MemDisk) -> None:
        events: list[tuple[str, int, str]] = []
        r = add_fake(h, 2, events)
        data = bytes([7]) * (64 * BLOCK)
        batch = encode_batch([BlockOp(OP_WRITE, 2 << 32, 0, 64, blockcrc.block_crcs(data), data, 0, 0, 0)])
        r.enqueue("img", [], image_prefix(b"") + struct.pack("<I", len(batch)) + batch)
        await until(lambda: ("finish", 2, "img") in events)
        mine = [e[0] for e in events if e[2] == "img"]
        assert mine == ["ready", "installed", "acks", "finish"], mine
        got, _ = h.engine.read(2 << 32, 0, 64)
        assert bytes(got) == data

    run(body)


class PeerLink:
    """A peer connection as node/inproc.py PeerConn sees it: the frames it was asked to send, decoded."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def send_soon(self, parts: list[bytes | bytearray | memoryview]) -> None:
        dec = FrameDecoder()
        dec.feed(b"".join(bytes(p) for p in parts))
        f = dec.next_event()
        assert isinstance(f, Frame)
        self.frames.append(f)

    def reply(self, gid: int, resp: pb.ClientResponse, data: Sequence[bytes | bytearray | memoryview]) -> None:
        self.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), data))


def test_a_gateway_in_the_node_reaches_its_own_data_plane_and_forwards_the_rest_on_the_peer_link() -> None:
    """node/inproc.py: a request for this node goes to the data plane without a frame and is answered with the
    response object and the engine's own buffer; one for a peer leaves as CLIENT_REQ on the peer link and is
    answered by the CLIENT_RESP that comes back on it; a peer link that goes down fails what waits on it at once;
    no link: ConnectionError without waiting."""
    from raftblock.node.inproc import LocalConn, PeerConn

    async def body(h: NodeHost, disk: MemDisk) -> None:
        add_fake(h, 1, [])
        local = h.client_links(1)
        assert isinstance(local, LocalConn) and h.client_links(9) is None  # 9: no such node
        data = bytes([7]) * BLOCK
        req = pb.ClientRequest(op=OP_C_WRITE, extent_id=1 << 32, block=4, count=1)
        req.crcs.extend(blockcrc.block_crcs(data))
        resp, _ = await local.request(1, req, [data], 5.0)
        assert resp.status == ST_OK
        req = pb.ClientRequest(op=OP_C_READ, extent_id=1 << 32, block=4, count=1)
        resp, got = await local.request(1, req, [], 5.0)
        assert resp.status == ST_OK and isinstance(got, bytearray) and bytes(got) == data
        resp, _ = await local.request(5, pb.ClientRequest(op=OP_C_READ, extent_id=5 << 32, count=1), [], 5.0)
        assert resp.status == ST_UNKNOWN_GROUP

        peer = h.client_links(2)
        assert isinstance(peer, PeerConn) and peer.lost
        with pytest.raises(ConnectionError):
            await peer.request(1, pb.ClientRequest(op=OP_C_READ), [], 5.0)
        link = PeerLink()
        h.links.conns[2] = link  # type: ignore[assignment]
        task = asyncio.ensure_future(peer.request(3, pb.ClientRequest(op=OP_C_WRITE, count=1), [data], 5.0))
        await until(lambda: len(link.frames) == 1)
        sent = link.frames[0]
        assert sent.type == FrameType.CLIENT_REQ and sent.group == 3 and bytes(sent.payload) == data
        rid = pb.ClientRequest.FromString(sent.message).request_id
        answer = pb.ClientResponse(request_id=rid, node_id=2)
        h.on_peer_frame(2, Frame(FrameType.CLIENT_RESP, 0, 3, answer.SerializeToString(), b""))
        resp, _ = await task
        assert resp.node_id == 2 and h.counters["client_requests_forwarded"] == 1
        task = asyncio.ensure_future(peer.request(3, pb.ClientRequest(op=OP_C_READ), [], 5.0))
        await until(lambda: len(link.frames) == 2)
        # The other side of forwarding: a CLIENT_REQ arriving on the peer link is served and answered on it.
        h.on_peer_frame(2, write_frame(1, 6, 9))
        await until(lambda: link.frames[-1].type == FrameType.CLIENT_RESP)
        assert pb.ClientResponse.FromString(link.frames[-1].message).status == ST_OK
        assert bytes(h.engine.read(1 << 32, 6, 1)[0]) == bytes([9]) * BLOCK
        del h.links.conns[2]
        h.on_peer_down(2)
        with pytest.raises(ConnectionError):
            await task

    run(body)
