# Node transport: the TCP listener, one connection per peer node, client connections (docs/format/wire.md).
#
# Owns: sockets and framing only. What a frame means is the handler's (node/host.py, node/dataplane.py) business.
#
# Rules:
# 1. One connection per node pair: the smaller node id dials, the larger accepts; a new HELLO from a
#    peer replaces its old connection. The dialer retries with bounded backoff (`redial_s_max`).
# 2. Outgoing frames to a peer are queued during a loop turn and written with one `writelines` when the
#    host calls `flush()` (client replies: `send_soon`, flushed by the loop's next turn); above `send_buffer_bytes_max` of unsent bytes, Raft frames are dropped
#    (Raft retransmits) and counted.
# 3. A stream whose framing is lost (bad magic/version, oversize) is closed; a frame with a bad CRC is
#    dropped and counted, and the connection goes on (an authenticated one is closed: its sequence is lost).
# 4. Authentication (raftblock/wire/auth.py): with `auth = "on"` every connection exchanges HELLO (nonces),
#    then AUTH, and every frame after HELLO carries an HMAC trailer, checked before the frame goes anywhere; a
#    peer is attached only after its AUTH verified. A frame that fails (forged, replayed, unsigned, a volume
#    key on another volume's group, an unknown key version) is counted (`auth_refused_<reason>`), logged once
#    per peer address per minute, and its connection closed. `auth = "unknown"` (a node of a cluster whose
#    keys it has not read yet) refuses every connection after HELLO; "off": a cluster without data keys.
from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import structlog

from raftblock import tls
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.auth import FRAME_AUTH, NONCE_BYTES, AuthError, KeyRing, Session, head24_of, session_id
from raftblock.wire.framing import (
    ROLE_CLIENT,
    ROLE_PEER,
    WIRE_VERSION,
    BadFrame,
    Buf,
    FatalFrameError,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)

log = structlog.get_logger(__name__)



class FrameHandler(Protocol):
    def on_peer_frame(self, peer_id: int, frame: Frame) -> None: ...

    def on_client_frame(self, conn: Connection, frame: Frame) -> None: ...

    def on_peer_up(self, peer_id: int) -> None: ...

    def on_peer_down(self, peer_id: int) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One TCP connection (peer or client), after HELLO."""

    def __init__(self, transport_owner: Transport, dial_peer: int | None = None) -> None:
        self.owner = transport_owner
        self.dial_peer = dial_peer
        self.peer_id: int | None = None
        self.role = 0
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._out: list[Buf] = []
        self._out_bytes = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.nonce = os.urandom(NONCE_BYTES)
        self.session: Session | None = None  # rule 4
        self._authed = False  # the other side's AUTH verified
        self._hello_peer: int | None = None  # a peer's id, attached once its AUTH verified

    # -- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        hello = pb.Hello(node_id=self.owner.node_id, role=ROLE_PEER, version=WIRE_VERSION, nonce=self.nonce,
                         auth=1 if self.owner.auth == "on" else 0)
        self.transport.writelines(encode_frame(FrameType.HELLO, 0, hello.SerializeToString()))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)  # a big frame is received straight into its own buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)
        self._drain()

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._drain()

    def _drain(self) -> None:
        dec = self._decoder
        counters = self.owner.counters
        while True:
            try:
                ev = dec.next_event()
            except FatalFrameError as e:
                counters[e.counter] += 1
                log.warning("wire.close", reason=str(e), peer=self.peer_id)
                self.close()
                return
            if ev is None:
                return
            if isinstance(ev, BadFrame):
                counters[ev.counter] += 1
                if self.session is not None:
                    self._refuse(AuthError("bad_tag", "a frame with a bad CRC broke the sequence"))
                    return
                continue
            if self.role == 0:
                if not self._hello(ev):
                    return
                continue
            if self.session is not None:
                try:
                    self._open(ev)
                except AuthError as e:
                    self._refuse(e)
                    return
                if ev.type == FRAME_AUTH:
                    continue
            try:
                if self.role == ROLE_PEER:
                    assert self.peer_id is not None
                    self.owner.handler.on_peer_frame(self.peer_id, ev)
                else:
                    self.owner.handler.on_client_frame(self, ev)
            except Exception as e:  # a malformed frame must not kill the connection
                counters["frames_malformed"] += 1
                log.warning("wire.frame_error", error=repr(e), type=ev.type, group=ev.group)

    def _hello(self, f: Frame) -> bool:
        try:
            if f.type != FrameType.HELLO:
                raise ValueError("first frame is not HELLO")
            h = pb.Hello.FromString(f.message)
            if h.version != WIRE_VERSION:
                raise ValueError(f"wire version {h.version}")
        except Exception as e:
            self.owner.counters["frames_bad_hello"] += 1
            log.warning("wire.bad_hello", error=str(e))
            self.close()
            return False
        if h.role == ROLE_PEER and self.transport is not None and tls.identity() is not None \
                and tls.node_name(int(h.node_id)) not in tls.peer_names(self.transport.get_extra_info("ssl_object")):
            self._refuse(AuthError("bad_identity", f"a HELLO as node {h.node_id} with another certificate"))
            return False
        if h.role == ROLE_PEER and h.node_id not in self.owner.peers:
            # A node this one does not know yet (it joined after this process started, and the map poll
            # has not told its address): refused, not demoted to a client, whose role would last as long as
            # the connection and drop every Raft frame on it. The peer dials again; by then it is known.
            self.owner.counters["peer_hello_unknown"] += 1
            log.info("wire.peer_unknown_yet", peer=int(h.node_id))
            self.close()
            return False
        auth = self.owner.auth
        if auth == "unknown":  # rule 4: this node has not read the cluster's keys yet
            self.owner.counters["auth_not_ready"] += 1
            self.close()
            return False
        if auth == "on":
            if h.auth != 1 or len(h.nonce) != NONCE_BYTES:
                self._refuse(AuthError("unsigned", f"a HELLO without authentication from role {h.role}"))
                return False
            ring = self.owner.ring
            assert ring is not None
            dialer = self.dial_peer is not None
            sid = session_id(self.nonce, h.nonce) if dialer else session_id(h.nonce, self.nonce)
            self.session = Session(ring, sid, dialer)
            assert self.transport is not None
            self.transport.writelines(self.session.seal(encode_frame(FRAME_AUTH, 0, b"")))
        if h.role == ROLE_PEER:
            self.role = ROLE_PEER
            if self.session is None:
                self.peer_id = int(h.node_id)
                self.owner._attach(self.peer_id, self)
            else:
                self._hello_peer = int(h.node_id)  # attached once its AUTH verified
        else:
            self.role = ROLE_CLIENT
        return True

    def _open(self, f: Frame) -> None:
        """Rule 4: verify and strip a frame's trailer; the first frame must be the other side's AUTH."""
        session = self.session
        assert session is not None
        client_req = self.role == ROLE_CLIENT and f.type == FrameType.CLIENT_REQ
        vid = session.open(f, head24_of(f), allow_volume=client_req)
        if not self._authed:
            if f.type != FRAME_AUTH:
                raise AuthError("unsigned", f"frame type {f.type} before AUTH")
            self._authed = True
            if self._hello_peer is not None:
                self.peer_id = self._hello_peer
                self.owner._attach(self.peer_id, self)
            return
        if f.type == FRAME_AUTH:
            raise AuthError("bad_scope", "a second AUTH")
        if vid and vid != self.owner.volume_of(f.group):
            raise AuthError("wrong_volume", f"signed for volume {vid}, sent to group {f.group}")

    def _refuse(self, e: AuthError) -> None:
        self.owner.auth_refused(e, self)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer_id is not None:
            self.owner._detach(self.peer_id, self)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- sending -------------------------------------------------------------------------------------------
    def queue(self, parts: list[Buf]) -> None:
        if self.session is not None:
            parts = self.session.seal(parts)  # in queue order: the order they are written in
        self._out.extend(parts)
        for p in parts:
            self._out_bytes += len(p)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self._out)
        self._out = []
        self._out_bytes = 0

    def send_now(self, parts: list[Buf]) -> None:
        self.queue(parts)
        self.flush()

    def send_soon(self, parts: list[Buf]) -> None:
        """Queue and write at the end of this loop turn: the replies of one commit leave in one send."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.queue(parts)

    def reply(self, gid: int, resp: pb.ClientResponse, data: Sequence[Buf]) -> None:
        """A client request's reply (node/dataplane.py ClientLink): one CLIENT_RESP frame, sent this turn."""
        self.send_soon(encode_frame(FrameType.CLIENT_RESP, gid, resp.SerializeToString(), data))

    def write_buffer_bytes(self) -> int:
        t = self.transport
        return (t.get_write_buffer_size() if t is not None else 0) + self._out_bytes

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Transport:
    def __init__(
        self,
        node_id: int,
        peers: dict[int, tuple[str, int]],
        handler: FrameHandler,
        counters: Counter[str],
        *,
        send_buffer_bytes_max: int = 64 << 20,
        redial_s_max: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.peers = {p: a for p, a in peers.items() if p != node_id}
        self.handler = handler
        self.counters = counters
        self.send_buffer_bytes_max = send_buffer_bytes_max
        self.redial_s_max = redial_s_max
        self.conns: dict[int, Connection] = {}
        # rule 4: "off", "unknown" or "on" (then `ring` holds the keys); set by the node (its agent)
        self.auth = "off"
        self.ring: KeyRing | None = None
        self.volume_of: Callable[[int], int] = lambda gid: 0  # a group's volume id (the map's)
        self._auth_logged: dict[str, float] = {}
        self._dirty: set[int] = set()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._client_conns: set[Connection] = set()
        self._stopping = False

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        # TLS (raftblock/tls.py) when the process has an identity: mutual; a peer's certificate must name the
        # node its HELLO claims to be (rule 4)
        self._server = await loop.create_server(lambda: self._accepted(), host, port, reuse_address=True,
                                                ssl=tls.server_ctx())
        sock = self._server.sockets[0]
        bound = int(sock.getsockname()[1])
        for pid in sorted(self.peers):
            if pid > self.node_id:
                self._tasks.append(loop.create_task(self._dial_loop(pid)))
        return bound

    def add_peer(self, pid: int, host: str, port: int) -> bool:
        """A node that joined the cluster after this one started (its address from the map): dial it if
        its id is higher (the usual rule: the higher id accepts). Returns True if it was new."""
        if pid == self.node_id or pid in self.peers:
            return False
        self.peers[pid] = (host, port)
        if self._server is not None and pid > self.node_id and not self._stopping:
            self._tasks.append(asyncio.get_running_loop().create_task(self._dial_loop(pid)))
        log.info("peer.added", peer=pid, address=f"{host}:{port}")
        return True

    def set_auth(self, auth: str, ring: KeyRing | None) -> None:
        """Rule 4. A new ring reaches the live sessions at once (a rotated key is accepted as soon as the map
        that carries it is read); a connection made before authentication went on is closed."""
        if auth == "on" and ring is None:
            raise ValueError("authentication needs a key ring")
        self.auth, self.ring = auth, ring
        for c in [*self.conns.values(), *self._client_conns]:
            if c.session is not None and ring is not None:
                c.session.ring = ring
            elif c.session is None and auth == "on" and c.role:
                c.close()

    def auth_refused(self, e: AuthError, conn: Connection) -> None:
        self.counters[f"auth_refused_{e.reason}"] += 1
        peer = "?"
        if conn.transport is not None:
            addr = conn.transport.get_extra_info("peername")
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        if now - self._auth_logged.get(host, -1e9) >= 60.0:
            self._auth_logged[host] = now
            log.warning("wire.auth_refused", reason=e.reason, detail=str(e), peer=peer, node=conn._hello_peer)

    def _accepted(self) -> Connection:
        c = Connection(self)
        self._client_conns.add(c)
        c.closed.add_done_callback(lambda _f: self._client_conns.discard(c))
        return c

    async def _dial_loop(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.peers[pid]
        backoff_s = 0.05
        while not self._stopping:
            ctx = tls.client_ctx()
            try:
                _t, conn = await loop.create_connection(lambda: Connection(self, pid), host, port, ssl=ctx,
                                                        server_hostname=tls.node_name(pid) if ctx else None)
            except OSError:
                await asyncio.sleep(backoff_s)
                backoff_s = min(self.redial_s_max, backoff_s * 2)
                continue
            opened = time.monotonic()
            await conn.closed
            if time.monotonic() - opened < 1.0:  # refused after HELLO (keys not read yet, a bad key): back off
                await asyncio.sleep(backoff_s)
                backoff_s = min(self.redial_s_max, backoff_s * 2)
            else:
                backoff_s = 0.05

    def _attach(self, pid: int, conn: Connection) -> None:
        old = self.conns.get(pid)
        self.conns[pid] = conn
        if old is not None and old is not conn:
            old.close()
        log.info("peer.up", peer=pid)
        self.handler.on_peer_up(pid)

    def _detach(self, pid: int, conn: Connection) -> None:
        if self.conns.get(pid) is conn:
            del self.conns[pid]
            log.info("peer.down", peer=pid)
            self.handler.on_peer_down(pid)

    def send(self, pid: int, parts: list[Buf]) -> bool:
        conn = self.conns.get(pid)
        if conn is None:
            self.counters["raft_dropped_no_connection"] += 1
            return False
        if conn.write_buffer_bytes() > self.send_buffer_bytes_max:
            self.counters["raft_dropped_backpressure"] += 1
            return False
        conn.queue(parts)
        self._dirty.add(pid)
        return True

    def flush(self) -> None:
        for pid in self._dirty:
            conn = self.conns.get(pid)
            if conn is not None:
                conn.flush()
        self._dirty.clear()

    def connected_peers(self) -> list[int]:
        return sorted(self.conns)

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self._server is not None:
            self._server.close()
        for c in list(self.conns.values()) + list(self._client_conns):
            c.close()


