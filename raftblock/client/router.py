# The data-plane client: how a gateway (or a tool, or a node repairing a block) reaches the extent groups
# on the storage nodes (client side; wire/client.py is its protocol).
#
# Owns: NodeClient (one connection per node, pipelined requests matched by request_id, the requests
# of one loop turn written with one send, a cached leader/head and tail per group) and GroupClient (the
# ReplicationGroup interface over it, for Raft and chain groups alike).
#
# Rules:
# 1. Success is reported only when the member that orders writes answers OK: for Raft after the write is
#    committed (majority of WALs fsynced) and applied on the leader, for a chain once it is durable on
#    every member; a read only from a Raft leader under lease/read-index, or from a chain's synced tail.
# 2. NOT_LEADER (with a hint), UNAVAILABLE, a lost connection or an attempt timeout are retried, on the
#    hinted leader or the next node, until `deadline_s`; then Unavailable.
# 3. Bounded: `attempt_timeout_s` per try, `deadline_s` per operation, backoff up to `backoff_s_max`.
# 5. Authentication (raftblock/wire/auth.py): with a key ring (`NodeClient.ring`, from the map) a connection
#    waits for the node's HELLO, sends AUTH, then signs every request (a block request to a volume's group
#    with that volume's key: `volume_of`), and checks every frame the node sends; a frame that fails closes
#    the connection (the request is retried on a new one). A node that signs while this client has no ring, or
#    the reverse, is a closed connection too.
# 4. Exactly-once writes: every write and trim is named (client_id = this client's random incarnation,
#    write_id = a counter) and keeps its name across retries; each attempt carries the lowest write id
#    still outstanding (low_water). A retry whose first attempt committed too is skipped where it
#    applies (replication/sessions.py), and so is a late attempt of a write this client gave up on.
from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import structlog

from raftblock import tls
from raftblock.replication.group import CorruptData, GroupError, GroupStatus, NoSpace, Unavailable
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.auth import FRAME_AUTH, NONCE_BYTES, AuthError, KeyRing, Session, head24_of, session_id
from raftblock.wire.client import (
    OP_C_BLOCK_STATUS,
    OP_C_NODE_STATUS,
    OP_C_READ,
    OP_C_SNAP,
    OP_C_STATUS,
    OP_C_TRIM,
    OP_C_UNSNAP,
    OP_C_WRITE,
    ST_BAD_REQUEST,
    ST_CORRUPT,
    ST_NO_SPACE,
    ST_NOT_LEADER,
    ST_OK,
    ST_STALE_EPOCH,
    ST_UNAVAILABLE,
    ST_UNKNOWN_GROUP,
)
from raftblock.wire.framing import (
    ROLE_CLIENT,
    WIRE_VERSION,
    BadFrame,
    Buf,
    FatalFrameError,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from raftblock.wire.ops import AUX_BYTES, BLOCK_SIZE

log = structlog.get_logger(__name__)


class Fenced(GroupError):
    """This gateway's attachment was taken over (a newer attach epoch exists): it must not write."""

    errno = errno.EPERM

Reply = tuple[pb.ClientResponse, bytes | bytearray | memoryview]


def _expire(fut: asyncio.Future[Reply]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no reply within the attempt timeout"))


class Waiters:
    """The requests of one connection waiting for their replies, by request id (this socket client's, and
    node/inproc.py's connections of a gateway inside a node)."""

    def __init__(self) -> None:
        self.futs: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)

    def add(self, req: pb.ClientRequest) -> asyncio.Future[Reply]:
        """Name `req` with the next request id and return the future its reply completes."""
        rid = next(self._ids)
        req.request_id = rid
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.futs[rid] = fut
        return fut

    def answer(self, resp: pb.ClientResponse, data: bytes | bytearray | memoryview) -> None:
        fut = self.futs.pop(resp.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result((resp, data))

    def fail(self, exc: Exception) -> None:
        futs, self.futs = self.futs, {}
        for fut in futs.values():
            if not fut.done():
                fut.set_exception(exc)

    async def wait(self, req: pb.ClientRequest, fut: asyncio.Future[Reply], timeout_s: float) -> Reply:
        """The reply, or TimeoutError after `timeout_s` (a timer on the future rather than
        asyncio.wait_for, which wraps every request in one more Task)."""
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self.futs.pop(req.request_id, None)


class _ClientConn(asyncio.BufferedProtocol):
    def __init__(self, owner: NodeClient | None = None) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self._dec = FrameDecoder()
        self._waiters = Waiters()
        self.lost = False
        self._out: list[tuple[list[Buf], int]] = []  # requests of this loop turn (and their volume), by _flush
        self.nonce = os.urandom(NONCE_BYTES)
        self._hello_seen = False  # the node's HELLO: requests wait for it (rule 5)
        self.session: Session | None = None
        self._authed = False

    def _ring(self) -> KeyRing | None:
        return self.owner.ring if self.owner is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        hello = pb.Hello(node_id=0, role=ROLE_CLIENT, version=WIRE_VERSION, nonce=self.nonce,
                         auth=1 if self._ring() is not None else 0)
        self.transport.writelines(encode_frame(FrameType.HELLO, 0, hello.SerializeToString()))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._dec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._dec.buffer_updated(nbytes)
        self._drain()

    def data_received(self, data: bytes) -> None:
        self._dec.feed(data)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                ev = self._dec.next_event()
            except FatalFrameError:
                self.close()
                return
            if ev is None:
                return
            if isinstance(ev, BadFrame):
                if self.session is not None:
                    self.close()  # the sequence is lost
                    return
                continue
            if not self._hello_seen:
                if not self._on_hello(ev):
                    self.close()
                    return
                continue
            if self.session is not None:
                try:
                    self.session.open(ev, head24_of(ev), allow_volume=True)
                except AuthError as e:
                    log.warning("client.auth_refused", reason=e.reason, detail=str(e))
                    self.close()
                    return
                if not self._authed:
                    if ev.type != FRAME_AUTH:
                        self.close()
                        return
                    self._authed = True
                    continue
            if ev.type != FrameType.CLIENT_RESP:
                continue
            self._waiters.answer(pb.ClientResponse.FromString(ev.message), ev.payload)

    def _on_hello(self, ev: Frame) -> bool:
        if ev.type != FrameType.HELLO:
            return False
        try:
            h = pb.Hello.FromString(ev.message)
        except Exception:  # noqa: BLE001 — a HELLO that does not parse: the connection is useless
            return False
        ring = self._ring()
        if (h.auth == 1) != (ring is not None):
            log.warning("client.auth_mismatch", node_signs=bool(h.auth), have_keys=ring is not None)
            return False
        if ring is not None:
            if len(h.nonce) != NONCE_BYTES:
                return False
            self.session = Session(ring, session_id(self.nonce, h.nonce), dialer=True)
            assert self.transport is not None
            self.transport.writelines(self.session.seal(encode_frame(FRAME_AUTH, 0, b"")))
        self._hello_seen = True
        self._flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._waiters.fail(ConnectionError("connection to node lost"))

    async def request(self, group: int, req: pb.ClientRequest, payload: Sequence[Buf], timeout_s: float) -> Reply:
        """Send one request and wait for its reply; TimeoutError after `timeout_s`."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection closed")
        fut = self._waiters.add(req)
        if not self._out and self._hello_seen:
            asyncio.get_running_loop().call_soon(self._flush)
        vid = self.owner.volume_of(group) if self.owner is not None and self.owner.volume_of is not None else 0
        self._out.append((encode_frame(FrameType.CLIENT_REQ, group, req.SerializeToString(), payload), vid))
        return await self._waiters.wait(req, fut, timeout_s)

    def _flush(self) -> None:
        if not self._hello_seen:
            return  # _on_hello flushes
        out, self._out = self._out, []
        if not out or self.transport is None or self.transport.is_closing():
            return
        parts: list[Buf] = []
        session = self.session
        for frame, vid in out:
            parts.extend(session.seal(frame, vid) if session is not None else frame)
        self.transport.writelines(parts)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RequestConn(Protocol):
    """A connection to one node: a socket (_ClientConn) or, for a gateway inside a storage node, that node's
    data plane and its peer connections (node/inproc.py)."""

    @property
    def lost(self) -> bool: ...

    async def request(self, group: int, req: pb.ClientRequest, payload: Sequence[Buf],
                      timeout_s: float) -> Reply: ...

    def close(self) -> None: ...


ROUTE_LEADER = 0  # writes (and Raft reads): the Raft leader, or a chain's head
ROUTE_TAIL = 1  # chain reads: the tail


class NodeClient:
    """Connections to the nodes of a cluster (by node id) and the leader cache."""

    def __init__(
        self,
        nodes: dict[int, tuple[str, int]],
        *,
        attempt_timeout_s: float = 1.0,
        deadline_s: float = 10.0,
        backoff_s_max: float = 0.2,
        links: Callable[[int], RequestConn | None] | None = None,
        ring: KeyRing | None = None,
        volume_of: Callable[[int], int] | None = None,
    ) -> None:
        self.nodes = dict(nodes)
        self.ring = ring  # rule 5: the cluster's data keys (None: a cluster without them)
        self.volume_of = volume_of  # a group's volume id: its block requests are signed with that volume's key
        # A gateway inside a storage node: its connection to node N, or None for a socket (node/inproc.py).
        self.links = links
        self.attempt_timeout_s = attempt_timeout_s
        self.deadline_s = deadline_s
        self.backoff_s_max = backoff_s_max
        self._conns: dict[int, _ClientConn] = {}
        self._connecting: dict[int, asyncio.Future[_ClientConn]] = {}
        self.leaders: dict[int, int] = {}
        self._rr = itertools.count()
        self.retries = 0
        self.client_id = secrets.randbits(63) | 1  # this incarnation's name (rule 4); never 0
        self._next_wid = 1
        self._outstanding: list[int] = []  # heap of write ids in flight
        self._finished: set[int] = set()  # finished ids still inside the heap (lazy deletion)

    def begin_write(self) -> int:
        """A new write id, outstanding until end_write."""
        wid = self._next_wid
        self._next_wid += 1
        heapq.heappush(self._outstanding, wid)
        return wid

    def end_write(self, wid: int) -> None:
        """The write answered or was given up on: no attempt of it may apply from now on."""
        self._finished.add(wid)
        out = self._outstanding
        while out and out[0] in self._finished:
            self._finished.discard(heapq.heappop(out))

    def low_water(self) -> int:
        """The lowest write id still outstanding (every lower one is finished)."""
        return self._outstanding[0] if self._outstanding else self._next_wid

    async def _conn(self, nid: int) -> RequestConn:
        if self.links is not None:
            link = self.links(nid)
            if link is not None:
                return link
        c = self._conns.get(nid)
        if c is not None and not c.lost:
            return c
        host, port = self.nodes[nid]
        loop = asyncio.get_running_loop()
        ctx = tls.client_ctx()  # raftblock/tls.py: the process's identity, mutual TLS, the node's name checked
        _t, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _ClientConn(self), host, port, ssl=ctx,
                                   server_hostname=tls.node_name(nid) if ctx else None),
            timeout=self.attempt_timeout_s,
        )
        self._conns[nid] = conn
        return conn

    async def call_node(self, nid: int, group: int, req: pb.ClientRequest, payload: Sequence[Buf] = (),
                        patience_s: float = 0.0) -> Reply:
        """`patience_s`: how long a `patient` connection (this process's own node: busy, never unreachable) may
        take, when more than the attempt timeout: a write queued behind others there is waited for, not sent
        again every attempt timeout (each copy would queue behind the first: a retry storm under load)."""
        conn = await self._conn(nid)
        timeout = max(self.attempt_timeout_s, patience_s) if getattr(conn, "patient", False) else self.attempt_timeout_s
        return await conn.request(group, req, payload, timeout)

    async def node_status(self, nid: int) -> pb.ClientResponse:
        resp, _ = await self.call_node(nid, 0, pb.ClientRequest(op=OP_C_NODE_STATUS))
        return resp

    async def call(
        self,
        group: int,
        req: pb.ClientRequest,
        payload: Sequence[Buf] = (),
        deadline_s: float | None = None,
        route: int = ROUTE_LEADER,
    ) -> Reply:
        """`route`: which member serves it, each with its own cached node: ROUTE_LEADER (a Raft leader, a
        chain's head) or ROUTE_TAIL (a chain's tail, for reads). A member that is not the one asked for
        answers NOT_LEADER with a hint, which is followed."""
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        key = group if route == ROUTE_LEADER else -group
        ids = sorted(self.nodes)
        backoff_s = 0.01
        unknown: set[int] = set()
        last_err = "no attempt"
        while True:
            nid = self.leaders.get(key)
            if nid is None or nid not in self.nodes:
                nid = ids[next(self._rr) % len(ids)]
            if req.client_id == self.client_id:  # named by this client (rule 4): the mark as of now
                req.low_water = self.low_water()
            try:
                resp, data = await self.call_node(nid, group, req, payload, deadline - time.monotonic())
            except (OSError, ConnectionError, TimeoutError) as e:
                last_err = f"node {nid}: {e!r}"
                self.leaders.pop(key, None)
                self._drop(nid)
                resp = None
            if resp is not None:
                st = resp.status
                if st == ST_OK:
                    self.leaders[key] = nid
                    return resp, data
                if st == ST_NOT_LEADER:
                    last_err = f"node {nid}: not leader (hint {resp.leader_hint})"
                    if resp.leader_hint and resp.leader_hint != nid and resp.leader_hint in self.nodes:
                        self.leaders[key] = int(resp.leader_hint)
                        self.retries += 1
                        if time.monotonic() < deadline:
                            continue
                    else:
                        self.leaders.pop(key, None)
                elif st == ST_UNAVAILABLE:
                    last_err = f"node {nid}: unavailable: {resp.error}"
                    self.leaders.pop(key, None)
                elif st == ST_UNKNOWN_GROUP:
                    unknown.add(nid)
                    self.leaders.pop(key, None)
                    if unknown >= set(ids):
                        raise GroupError(f"group {group} is not hosted by any node")
                elif st == ST_CORRUPT:
                    raise CorruptData(req.extent_id, req.block, resp.error)
                elif st == ST_NO_SPACE:
                    raise NoSpace(resp.error)
                elif st == ST_STALE_EPOCH:
                    raise Fenced(resp.error)
                elif st == ST_BAD_REQUEST:
                    raise GroupError(f"bad request: {resp.error}")
                else:
                    raise GroupError(f"unknown status {st}: {resp.error}")
            self.retries += 1
            now = time.monotonic()
            if now >= deadline:
                raise Unavailable(f"group {group}: no answer within the deadline ({last_err})")
            await asyncio.sleep(min(backoff_s, max(0.0, deadline - now)))
            backoff_s = min(self.backoff_s_max, backoff_s * 2)

    def set_ring(self, ring: KeyRing | None) -> None:
        """Rule 5: the map's keys changed. Live sessions take the new ring at once (a rotated key); a change
        between signing and not closes the connections, to be made again in the new mode."""
        flip = (ring is None) != (self.ring is None)
        self.ring = ring
        for nid, c in list(self._conns.items()):
            if flip:
                self._drop(nid)
            elif c.session is not None and ring is not None:
                c.session.ring = ring

    def _drop(self, nid: int) -> None:
        c = self._conns.pop(nid, None)
        if c is not None:
            c.close()

    async def close(self) -> None:
        for nid in list(self._conns):
            self._drop(nid)
        await asyncio.sleep(0)


class GroupClient:
    """The ReplicationGroup of one extent group served by remote nodes, in either mode: "raft" (writes,
    reads and block status at the leader) or "chain" (docs/chain.md: writes and trims at the head, reads
    and block status at the tail; an acknowledged write is durable on every member). A member that is not
    the one asked for answers NOT_LEADER with the right one as hint."""

    def __init__(self, client: NodeClient, group_id: int, deadline_s: float | None = None, epoch: int = 0,
                 mode: str = "raft") -> None:
        if mode not in ("raft", "chain"):
            raise ValueError(f"mode must be 'raft' or 'chain', not {mode!r}")
        self.client = client
        self.group_id = group_id
        self.deadline_s = deadline_s
        self.epoch = epoch  # the attach epoch of the volume this group serves (fencing), 0 = not attached
        self.mode = mode
        self.read_route = ROUTE_TAIL if mode == "chain" else ROUTE_LEADER

    async def write(self, extent_id: int, block: int, data: memoryview | bytes, crcs: Sequence[int],
                    fill: bool = False) -> None:
        """`fill`: only the blocks not allocated when the group applies it (wire/ops.py FILL)."""
        req = pb.ClientRequest(op=OP_C_WRITE, extent_id=extent_id, block=block, count=len(crcs), epoch=self.epoch,
                               fill=fill)
        req.crcs.extend(crcs)
        await self._named(req, [data])

    async def _named(self, req: pb.ClientRequest, payload: Sequence[Buf]) -> None:
        """A write or trim under its name (rule 4)."""
        client = self.client
        wid = client.begin_write()
        req.client_id = client.client_id
        req.write_id = wid
        try:
            await client.call(self.group_id, req, payload, self.deadline_s)
        finally:
            client.end_write(wid)

    async def snapshot(self, snap_id: int, drop: bool = False) -> None:
        """Pin (`drop`: unpin) snapshot `snap_id` in this group, through its log (docs/snapshots.md)."""
        req = pb.ClientRequest(op=OP_C_UNSNAP if drop else OP_C_SNAP, snap_id=snap_id, epoch=self.epoch)
        await self._named(req, ())

    async def read(self, extent_id: int, block: int, count: int, snap_id: int = 0) -> tuple[bytearray, list[int]]:
        """`snap_id`: the blocks as that snapshot of the group keeps them (0: as they are now)."""
        req = pb.ClientRequest(op=OP_C_READ, extent_id=extent_id, block=block, count=count, epoch=self.epoch,
                               snap_id=snap_id)
        resp, data = await self.client.call(self.group_id, req, (), self.deadline_s, self.read_route)
        # A node in this process hands over its own buffer (node/inproc.py); a socket's is a view of a frame.
        return data if isinstance(data, bytearray) else bytearray(data), list(resp.crcs)

    async def trim(self, extent_id: int, block: int, count: int) -> None:
        req = pb.ClientRequest(op=OP_C_TRIM, extent_id=extent_id, block=block, count=count, epoch=self.epoch)
        await self._named(req, ())

    # -- an encrypted volume's blocks (docs/encryption.md): each with its 32-byte entry, in one op ----------------
    async def write_sealed(self, extent_id: int, block: int, data: memoryview | bytes | bytearray,
                           crcs: Sequence[int], seal_at: int, entries: bytes, fill: bool = False) -> None:
        req = pb.ClientRequest(op=OP_C_WRITE, extent_id=extent_id, block=block, count=len(crcs), epoch=self.epoch,
                               fill=fill, seal_at=seal_at)
        req.crcs.extend(crcs)
        await self._named(req, [data, entries])

    async def read_sealed(self, extent_id: int, block: int, count: int, seal_at: int,
                          snap_id: int = 0) -> tuple[bytearray, list[int], bytes]:
        """The blocks, their CRCs and their entries (zeros: never written, or trimmed)."""
        req = pb.ClientRequest(op=OP_C_READ, extent_id=extent_id, block=block, count=count, epoch=self.epoch,
                               snap_id=snap_id, seal_at=seal_at)
        resp, data = await self.client.call(self.group_id, req, (), self.deadline_s, self.read_route)
        size = count * BLOCK_SIZE
        if len(data) != size + count * AUX_BYTES or len(resp.crcs) != count:
            raise GroupError(f"group {self.group_id}: a sealed read of {count} blocks answered {len(data)} bytes")
        view = memoryview(data)
        return bytearray(view[:size]), list(resp.crcs), bytes(view[size:])

    async def trim_sealed(self, extent_id: int, block: int, count: int, seal_at: int) -> None:
        req = pb.ClientRequest(op=OP_C_TRIM, extent_id=extent_id, block=block, count=count, epoch=self.epoch,
                               seal_at=seal_at)
        await self._named(req, ())

    async def zero(self, extent_id: int, block: int, count: int) -> None:
        await self.trim(extent_id, block, count)  # thin store: a zeroed block is a dropped block

    async def flush(self) -> None:
        # Every acknowledged write is already durable (a majority of fsynced WALs, or the whole chain's).
        return None

    async def block_status(self, extent_id: int, block: int, count: int, snap_id: int = 0,
                           since_snap_id: int = 0) -> list[tuple[int, bool]]:
        """Runs of (length, allocated); with `snap_id`: allocated in that snapshot, or with `since_snap_id` too:
        changed between the two snapshots (Engine.snapshot_runs)."""
        req = pb.ClientRequest(op=OP_C_BLOCK_STATUS, extent_id=extent_id, block=block, count=count, epoch=self.epoch,
                               snap_id=snap_id, since_snap_id=since_snap_id)
        resp, _ = await self.client.call(self.group_id, req, (), self.deadline_s, self.read_route)
        runs = list(resp.runs)
        out = [(runs[i], bool(runs[i + 1])) for i in range(0, len(runs) - 1, 2)]
        if sum(n for n, _ in out) != count:  # an answer that does not cover the range is not trusted
            raise GroupError(f"block status of group {self.group_id} covers {sum(n for n, _ in out)} of {count} blocks")
        return out

    async def group_info(self) -> pb.GroupInfo:
        resp, _ = await self.client.call(self.group_id, pb.ClientRequest(op=OP_C_STATUS), (), self.deadline_s)
        return resp.groups[0]

    async def snapshot_stats(self) -> dict[int, int]:
        """snap_id -> blocks only that snapshot keeps in this group (Engine.snapshot_stats, at the leader)."""
        resp, _ = await self.client.call(self.group_id, pb.ClientRequest(op=OP_C_STATUS, snap_stats=True), (),
                                         self.deadline_s)
        g = resp.groups[0]
        return dict(zip(g.snap_ids, g.snap_unique_blocks, strict=True))

    def status(self) -> GroupStatus:
        lead = self.client.leaders.get(self.group_id)
        detail: dict[str, int | str] = {}
        if self.mode == "chain":
            tail = self.client.leaders.get(-self.group_id)
            detail["tail"] = str(tail) if tail is not None else "-"
        return GroupStatus(
            group_id=self.group_id,
            mode=self.mode,
            members=[str(n) for n in sorted(self.client.nodes)],
            leader=str(lead) if lead is not None else None,
            healthy=lead is not None,
            detail=detail,
        )
