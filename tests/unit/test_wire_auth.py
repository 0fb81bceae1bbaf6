"""raftblock/wire/auth.py: signed frames (replay, forgery, wrong volume, key versions) and the key wrap; and
node/transport.py refusing what fails, on real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from typing import Any

import pytest

from raftblock.client.router import NodeClient
from raftblock.node.transport import Connection, Transport
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.auth import (
    FRAME_AUTH,
    AuthError,
    DataKeys,
    KeyRing,
    Session,
    head24_of,
    new_data_key,
    session_id,
    unwrap_key,
    wrap_key,
)
from raftblock.wire.client import OP_C_NODE_STATUS, OP_C_READ, ST_OK
from raftblock.wire.framing import ROLE_CLIENT, WIRE_VERSION, Frame, FrameDecoder, FrameType, encode_frame

SECRET = b"a cluster secret of enough bytes"


def _ring(*versions: int, active: int | None = None) -> KeyRing:
    return KeyRing({v: bytes([v]) * 32 for v in versions}, active if active is not None else max(versions))


def _pair(ring_a: KeyRing, ring_b: KeyRing | None = None) -> tuple[Session, Session]:
    sid = session_id(b"d" * 16, b"a" * 16)
    return Session(ring_a, sid, dialer=True), Session(ring_b or ring_a, sid, dialer=False)


def _frames(parts: list[Any]) -> list[Frame]:
    dec = FrameDecoder()
    for p in parts:
        dec.feed(p)
    out = []
    while (ev := dec.next_event()) is not None:
        assert isinstance(ev, Frame), ev
        out.append(ev)
    return out


def test_a_sealed_frame_opens_once_in_order_and_never_again() -> None:
    a, b = _pair(_ring(1))
    wire = a.seal(encode_frame(FrameType.RAFT, 7, b"msg", [b"x" * 5000]) + encode_frame(FrameType.RAFT, 8, b"m2"))
    f1, f2 = _frames(wire)
    raw1 = bytes(f1.payload)
    assert b.open(f1, head24_of(f1), allow_volume=False) == 0 and bytes(f1.payload) == b"x" * 5000
    assert b.open(f2, head24_of(f2), allow_volume=False) == 0 and bytes(f2.payload) == b""
    # the first frame again (a replay): its sequence number has passed
    replay = Frame(f1.type, f1.flags, f1.group, f1.message, raw1)
    with pytest.raises(AuthError) as e:
        b.open(replay, head24_of(replay), allow_volume=False)
    assert e.value.reason == "bad_tag"


def test_reordered_forged_unsigned_and_reflected_frames_fail() -> None:
    a, b = _pair(_ring(1))
    f1, f2 = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"one") + encode_frame(FrameType.RAFT, 1, b"two")))
    with pytest.raises(AuthError, match="bad_tag"):
        b.open(f2, head24_of(f2), allow_volume=False)  # second before first
    a, b = _pair(_ring(1))
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"one", [b"data"])))
    forged = Frame(f.type, f.flags, f.group, b"ONE", f.payload)  # the message changed, trailer kept
    with pytest.raises(AuthError, match="bad_tag"):
        b.open(forged, head24_of(forged), allow_volume=False)
    a, b = _pair(_ring(1))
    (f,) = _frames(encode_frame(FrameType.RAFT, 1, b"one"))  # no trailer at all
    with pytest.raises(AuthError, match="no_trailer"):
        b.open(f, head24_of(f), allow_volume=False)
    a, b = _pair(_ring(1))
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"one")))
    with pytest.raises(AuthError, match="bad_tag"):  # sent back to its sender: the direction differs
        a.open(f, head24_of(f), allow_volume=False)
    a, b = _pair(_ring(1), KeyRing({1: b"z" * 32}, 1))  # another key, same version
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"one")))
    with pytest.raises(AuthError, match="bad_tag"):
        b.open(f, head24_of(f), allow_volume=False)


def test_key_versions_during_a_rotation() -> None:
    old, both_old_active, both_new_active = _ring(1), _ring(1, 2, active=1), _ring(1, 2, active=2)
    # a node that has the new key accepts the old one from a node that does not have it yet, and the reverse
    # never happens: a key is active only once every node has it
    a, b = _pair(old, both_old_active)
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"x")))
    assert b.open(f, head24_of(f), allow_volume=False) == 0
    a, b = _pair(both_new_active, both_old_active)
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"x")))
    assert b.open(f, head24_of(f), allow_volume=False) == 0
    # retired: unknown
    a, b = _pair(old, _ring(2))
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 1, b"x")))
    with pytest.raises(AuthError, match="unknown_key"):
        b.open(f, head24_of(f), allow_volume=False)


def test_volume_keys_are_per_volume_and_only_on_client_requests() -> None:
    ring = _ring(3)
    assert ring.key(3, 1, 5) != ring.key(3, 1, 6) != ring.key(3, 0, 0)
    a, b = _pair(ring)
    (f,) = _frames(a.seal(encode_frame(FrameType.CLIENT_REQ, 9, b"req"), vid=5))
    assert b.open(f, head24_of(f), allow_volume=True) == 5  # the caller compares it with the group's volume
    a, b = _pair(ring)
    (f,) = _frames(a.seal(encode_frame(FrameType.RAFT, 9, b"raft"), vid=5))
    with pytest.raises(AuthError, match="bad_scope"):
        b.open(f, head24_of(f), allow_volume=False)


def test_wrapped_keys_need_the_cluster_secret_and_their_version() -> None:
    k = new_data_key()
    w = wrap_key(SECRET, 4, k)
    assert unwrap_key(SECRET, 4, w) == k
    with pytest.raises(ValueError, match="does not unwrap"):
        unwrap_key(b"another secret of enough bytes", 4, w)
    with pytest.raises(ValueError, match="does not unwrap"):
        unwrap_key(SECRET, 5, w)  # moved to another version
    ring = KeyRing.from_map(SECRET, DataKeys({4: w}, 4))
    assert ring is not None and ring.keys == {4: k}
    assert KeyRing.from_map(SECRET, DataKeys({}, 0)) is None


# -- a node's transport on real sockets ------------------------------------------------------------------------
class Handler:
    def __init__(self) -> None:
        self.client_frames: list[Frame] = []
        self.peer_frames: list[tuple[int, Frame]] = []
        self.up: list[int] = []

    def on_peer_frame(self, peer_id: int, frame: Frame) -> None:
        self.peer_frames.append((peer_id, frame))

    def on_client_frame(self, conn: Connection, frame: Frame) -> None:
        self.client_frames.append(frame)
        req = pb.ClientRequest.FromString(frame.message)
        conn.reply(frame.group, pb.ClientResponse(request_id=req.request_id, status=ST_OK), ())

    def on_peer_up(self, peer_id: int) -> None:
        self.up.append(peer_id)

    def on_peer_down(self, peer_id: int) -> None:
        pass


async def _until(cond: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _node(ring: KeyRing | None, node_id: int = 1, peers: dict[int, tuple[str, int]] | None = None,
                port: int = 0) -> tuple[Transport, Handler, int]:
    h = Handler()
    t = Transport(node_id, peers or {}, h, Counter())
    t.set_auth("on" if ring is not None else "off", ring)
    t.volume_of = lambda gid: gid // 100  # group 501 belongs to volume 5
    return t, h, await t.start("127.0.0.1", port)


def test_peers_authenticate_and_exchange_signed_frames() -> None:
    async def go() -> None:
        ring = _ring(1)
        p1, p2 = _free_port(), _free_port()
        peers = {1: ("127.0.0.1", p1), 2: ("127.0.0.1", p2)}
        t1, h1, _ = await _node(ring, 1, peers, p1)
        t2, h2, _ = await _node(ring, 2, peers, p2)
        try:
            await _until(lambda: h1.up == [2] and h2.up == [1], "the peers to authenticate")
            t1.send(2, encode_frame(FrameType.RAFT, 3, b"hello", [b"payload"]))
            t1.flush()
            await _until(lambda: h2.peer_frames, "the frame")
            pid, f = h2.peer_frames[0]
            assert pid == 1 and f.message == b"hello" and bytes(f.payload) == b"payload"
        finally:
            await t1.stop()
            await t2.stop()
    asyncio.run(go())


def test_a_node_refuses_unsigned_forged_replayed_and_wrong_volume_frames() -> None:
    async def go() -> None:
        ring = _ring(1)
        t, h, port = await _node(ring)
        try:
            # a client with the keys: a signed request to volume 5's group 501 is served
            client = NodeClient({1: ("127.0.0.1", port)}, ring=ring, volume_of=lambda g: g // 100)
            resp, _ = await client.call_node(1, 501, pb.ClientRequest(op=OP_C_READ, count=1))
            assert resp.status == ST_OK and len(h.client_frames) == 1
            await client.close()
            # an unsigned client (no keys): refused after HELLO, nothing handed on
            bad = NodeClient({1: ("127.0.0.1", port)}, attempt_timeout_s=1.0)
            with pytest.raises((ConnectionError, TimeoutError)):
                await bad.call_node(1, 0, pb.ClientRequest(op=OP_C_NODE_STATUS))
            await bad.close()
            await _until(lambda: t.counters["auth_refused_unsigned"] == 1, "the unsigned refusal")
            # a client with another key
            other = NodeClient({1: ("127.0.0.1", port)}, ring=KeyRing({1: b"q" * 32}, 1), attempt_timeout_s=1.0)
            with pytest.raises((ConnectionError, TimeoutError)):
                await other.call_node(1, 0, pb.ClientRequest(op=OP_C_NODE_STATUS))
            await other.close()
            await _until(lambda: t.counters["auth_refused_bad_tag"] == 1, "the forged AUTH")
            # volume 6's key on volume 5's group
            wrong = NodeClient({1: ("127.0.0.1", port)}, ring=ring, volume_of=lambda g: 6, attempt_timeout_s=1.0)
            with pytest.raises((ConnectionError, TimeoutError)):
                await wrong.call_node(1, 501, pb.ClientRequest(op=OP_C_READ, count=1))
            await wrong.close()
            await _until(lambda: t.counters["auth_refused_wrong_volume"] == 1, "the wrong-volume refusal")
            # a raw replay: a signed request captured and sent twice on one connection
            n_before = len(h.client_frames)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            nonce = os.urandom(16)
            hello = pb.Hello(node_id=0, role=ROLE_CLIENT, version=WIRE_VERSION, nonce=nonce, auth=1)
            w.writelines(encode_frame(FrameType.HELLO, 0, hello.SerializeToString()))
            dec = FrameDecoder()
            while (ev := dec.next_event()) is None:
                dec.feed(await r.read(65536))
            assert isinstance(ev, Frame)
            node_hello = pb.Hello.FromString(ev.message)
            s = Session(ring, session_id(nonce, node_hello.nonce), dialer=True)
            w.writelines(s.seal(encode_frame(FRAME_AUTH, 0, b"")))
            req = s.seal(encode_frame(FrameType.CLIENT_REQ, 501, pb.ClientRequest(request_id=1, op=OP_C_READ,
                                                                                 count=1).SerializeToString()), 5)
            w.writelines(req)
            w.writelines(req)  # the replay
            await w.drain()
            await _until(lambda: t.counters["auth_refused_bad_tag"] == 2, "the replay refused")
            assert len(h.client_frames) == n_before + 1  # the first copy only
            await asyncio.wait_for(r.read(), 5)  # read() returns at EOF: the node closed the connection
            w.close()
        finally:
            await t.stop()
    asyncio.run(go())


def test_a_node_without_its_keys_yet_refuses_every_connection() -> None:
    async def go() -> None:
        h = Handler()
        t = Transport(1, {}, h, Counter())
        t.set_auth("unknown", None)
        port = await t.start("127.0.0.1", 0)
        try:
            c = NodeClient({1: ("127.0.0.1", port)}, attempt_timeout_s=1.0)
            with pytest.raises((ConnectionError, TimeoutError)):
                await c.call_node(1, 0, pb.ClientRequest(op=OP_C_NODE_STATUS))
            await c.close()
            assert t.counters["auth_not_ready"] == 1 and not h.client_frames
        finally:
            await t.stop()
    asyncio.run(go())
