"""NBD server: the asyncio adapter binding the sans-I/O codec (nbd.py) to sockets and volumes.

Owns connections, concurrency and shutdown. Requests on one connection run concurrently (replies go
out in completion order, matched by cookie), up to `inflight_max` per connection; past that the
connection stops reading until one completes.

Rules:
1. Every request passes `validate.validate_request` first; a rejected request gets its NBD error and the
   connection stays open. Only unframeable input (bad magic, broken handshake) closes a connection.
2. A backend error maps to one NBD error (GroupError.errno); anything unexpected is EIO and logged with
   its traceback — the process stays up.
3. Shutdown (SIGTERM) stops accepting, refuses new options with ERR_SHUTDOWN, lets in-flight requests
   finish (bounded by `drain_timeout_s`), then closes every connection.
4. TLS (`GatewayConfig.tls`, the gateway's `[tls]`, raftblock/tls.py rule 2): every connection must STARTTLS
   before anything else (the codec answers other options ERR_TLS_REQD); the handshake needs a client
   certificate of the cluster CA; a failed handshake closes the connection and is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from raftblock.client.volume import Volume
from raftblock.gateway import nbd
from raftblock.gateway.nbd import Cmd
from raftblock.gateway.validate import validate_request
from raftblock.obs.histogram import IO_BUCKETS, Histogram
from raftblock.replication.group import GroupError

log = structlog.get_logger(__name__)

TRANSMISSION_FLAGS = (
    nbd.TF_HAS_FLAGS
    | nbd.TF_SEND_FLUSH
    | nbd.TF_SEND_FUA
    | nbd.TF_SEND_TRIM
    | nbd.TF_SEND_WRITE_ZEROES
    | nbd.TF_SEND_DF
    | nbd.TF_SEND_CACHE
    | nbd.TF_SEND_FAST_ZERO
    # Every completed write is already durable (no volatile cache), so a FLUSH on any connection
    # covers writes completed on every connection: multi-conn is honest.
    | nbd.TF_CAN_MULTI_CONN
)

BLOCK_STATUS_DESCRIPTORS_MAX = 1024
BLOCK_STATUS_SCAN_BYTES_MAX = 1 << 30


@dataclass
class GatewayConfig:
    bind: str = "127.0.0.1"
    port: int = 10809
    inflight_max: int = 128
    handshake_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    max_block_bytes: int = 32 << 20
    tls: ssl.SSLContext | None = None  # rule 4: STARTTLS required, client certificates of the cluster CA


KEEPALIVE_IDLE_S = 30  # a host that vanished without a FIN (power loss, cut cable) is found in ~60 s
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3


def set_keepalive(transport: asyncio.BaseTransport) -> None:
    """TCP keepalive on a host connection: a dead host's connection ends, so its exclusive attach is given
    back (node/gateway.py rule 3) instead of pinning the volume to this gateway forever."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (OSError, AttributeError):  # not TCP (a unix socket), or a platform without these options
        pass


def attach_done(task: asyncio.Task[None]) -> bool:
    """The exclusive attach's acquire succeeded."""
    return task.done() and not task.cancelled() and task.exception() is None


def release_attach(attacher: Attacher, name: str, task: asyncio.Task[None]) -> None:
    """A host connection ended: give its attach back now if the acquire succeeded, or when it does if it is
    still running (a refused or cancelled acquire holds nothing)."""
    if attach_done(task):
        attacher.release(name)
    elif not task.done():
        task.add_done_callback(lambda t: attacher.release(name) if attach_done(t) else None)


class Attacher(Protocol):
    """Exclusive attach (the cluster's gateway): `acquire` before a connection's first request,
    `release` when it closes. A refusal raises; the connection's requests then get EPERM."""

    async def acquire(self, volume: str) -> None: ...

    def release(self, volume: str) -> None: ...


# NBD command -> the `op` label of raftblock_gateway_io_* (obs/exporters.py)
OP_NAMES: dict[int, str] = {Cmd.READ: "read", Cmd.WRITE: "write", Cmd.FLUSH: "flush", Cmd.TRIM: "trim", Cmd.WRITE_ZEROES: "zero",
            Cmd.BLOCK_STATUS: "block_status", Cmd.CACHE: "cache"}


class OpStats:
    """One volume's requests of one kind as hosts saw them: count, bytes, errors, latency."""

    __slots__ = ("ops", "bytes", "errors", "latency")

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.errors = 0
        self.latency = Histogram(IO_BUCKETS)


class VolumeCatalog:
    """Name -> Volume; what the gateway exports."""

    def __init__(self) -> None:
        self._volumes: dict[str, Volume] = {}
        self.attached: dict[str, int] = {}
        # volume name -> op name -> OpStats, for as long as the process runs (kept across map reloads)
        self.io: dict[str, dict[str, OpStats]] = {}

    def io_of(self, name: str) -> dict[str, OpStats]:
        st = self.io.get(name)
        if st is None:
            st = self.io[name] = {op: OpStats() for op in (*OP_NAMES.values(), "other")}
        return st

    def add(self, volume: Volume) -> None:
        self._volumes[volume.info.name] = volume

    def replace_all(self, volumes: list[Volume]) -> None:
        """Swap in a new set of volumes (after a map change); attach counts are kept."""
        self._volumes = {v.info.name: v for v in volumes}

    def get(self, name: str) -> Volume | None:
        return self._volumes.get(name)

    def names(self) -> Sequence[str]:
        return sorted(self._volumes)


class NbdConnection(asyncio.Protocol):
    _ids = itertools.count(1)

    io: dict[str, OpStats]

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.id = next(self._ids)
        self.transport: asyncio.Transport | None = None
        self.codec = nbd.ServerConnection(
            nbd.ExportCatalog(server.export_info, server.catalog.names),
            max_payload_bytes=server.config.max_block_bytes,
            shutting_down=lambda: server.shutting_down,
            tls_required=server.config.tls is not None,
        )
        self.volume: Volume | None = None
        self.export: nbd.ExportInfo | None = None
        self.meta_ids: tuple[int, ...] = ()
        self.tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes | memoryview] = []  # replies queued in this loop turn (see _send)
        self.reading_paused = False
        self.closing = False
        self.disc_requested = False
        self.attach_task: asyncio.Task[None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.log = log.bind(conn=self.id)

    # --- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        set_keepalive(transport)
        peer = self.transport.get_extra_info("peername")
        self.log = self.log.bind(peer=str(peer))
        self.server.connections.add(self)
        self.transport.write(self.codec.data_to_send())
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.server.config.handshake_timeout_s, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if not self.codec.in_transmission:
            self.log.warning("nbd.handshake_timeout")
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.codec.receive_data(data)
        try:
            while not self.closing:
                ev = self.codec.next_event()
                out = self.codec.data_to_send()
                if out and self.transport is not None:
                    self.transport.write(out)
                if ev is nbd.NEED_DATA:
                    break
                if isinstance(ev, nbd.Request):
                    self._on_request(ev)
                elif isinstance(ev, nbd.ExportSelected):
                    self._on_export(ev)
                elif isinstance(ev, nbd.Closed):
                    self.log.info("nbd.client_closed", reason=ev.reason)
                    self.close()
                elif isinstance(ev, nbd.StartTls):
                    self._start_tls()
                    break
        except nbd.ProtocolError as e:
            out = self.codec.data_to_send()
            if out and self.transport is not None:
                self.transport.write(out)
            self.log.warning("nbd.protocol_error", error=str(e))
            self.close()

    def _start_tls(self) -> None:
        """Rule 4: the handshake on this connection, then the options go on inside it."""
        assert self.transport is not None and self.server.config.tls is not None
        self.transport.pause_reading()
        ctx = self.server.config.tls
        loop = asyncio.get_running_loop()

        async def handshake() -> None:
            assert self.transport is not None
            try:
                tr = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                          ssl_handshake_timeout=self.server.config.handshake_timeout_s)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
                self.server.tls_failures += 1
                self.log.warning("nbd.tls_failed", error=str(e))
                self.close()
                return
            if tr is None:
                self.close()
                return
            self.transport = cast(asyncio.Transport, tr)
            from raftblock.tls import peer_names

            self.codec.tls_started()
            self.log = self.log.bind(host=",".join(sorted(peer_names(tr.get_extra_info("ssl_object")))))
            self.log.info("nbd.tls")

        t = loop.create_task(handshake())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.export is not None:
            self.server.catalog.attached[self.export.name] -= 1
            self.log.info("nbd.detached", volume=self.export.name)
            if self.attach_task is not None and self.server.attacher is not None:
                release_attach(self.server.attacher, self.export.name, self.attach_task)

    # --- handling ---------------------------------------------------------------------------------
    def _on_export(self, ev: nbd.ExportSelected) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.export = ev.export
        self.meta_ids = ev.meta_context_ids
        self.volume = self.server.catalog.get(ev.export.name)
        cat = self.server.catalog
        self.io = cat.io_of(ev.export.name)
        cat.attached[ev.export.name] = cat.attached.get(ev.export.name, 0) + 1
        if self.server.attacher is not None:
            self.attach_task = asyncio.get_running_loop().create_task(self.server.attacher.acquire(ev.export.name))
        self.log.info(
            "nbd.attached", volume=ev.export.name, structured=ev.structured_replies, meta=list(ev.meta_context_ids)
        )

    def _on_request(self, req: nbd.Request) -> None:
        assert self.export is not None and self.volume is not None
        if req.cmd == Cmd.DISC and not req.flags:
            # proto.md: the server finishes outstanding requests, then closes.
            self.disc_requested = True
            self.log.info("nbd.disconnect_requested")
            self._maybe_finish_disc()
            return
        rej = validate_request(
            req, self.export, structured_replies=self.codec.structured_replies, meta_context_ids=self.meta_ids
        )
        if rej is not None:
            st = self.io[OP_NAMES.get(req.cmd, "other")]
            st.ops += 1
            st.errors += 1
            self.log.info("nbd.request_rejected", cmd=req.cmd, offset=req.offset, length=req.length, error=rej.error, reason=rej.message)
            self._send([self.codec.reply_error(req.cookie, rej.error, rej.message)])
            return
        task = asyncio.get_running_loop().create_task(self._run(req, self.volume))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        self.server.inflight += 1
        if len(self.tasks) >= self.server.config.inflight_max and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.server.inflight -= 1
        self.server.request_done()
        if self.reading_paused and len(self.tasks) < self.server.config.inflight_max // 2 and self.transport:
            self.reading_paused = False
            if not self.closing:
                self.transport.resume_reading()
        self._maybe_finish_disc()

    def _maybe_finish_disc(self) -> None:
        if self.disc_requested and not self.tasks:
            self.close()

    def _send(self, parts: list[bytes] | list[bytes | memoryview]) -> None:
        # Replies completed in one loop turn leave in one send (one syscall, not one per request).
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.extend(parts)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    async def _run(self, req: nbd.Request, vol: Volume) -> None:
        codec = self.codec
        at = self.attach_task
        if at is not None and not attach_done(at):
            try:
                await asyncio.shield(at)
            except Exception as e:  # noqa: BLE001 — refused attach: no I/O on this connection
                self.log.warning("nbd.attach_refused", error=str(e))
                self._send([codec.reply_error(req.cookie, nbd.EPERM, f"attach refused: {e}")])
                self.close()
                return
        st = self.io[OP_NAMES.get(req.cmd, "other")]
        t0 = time.monotonic()
        ok = False
        try:
            cmd = req.cmd
            if cmd == Cmd.READ:
                data = await vol.read(req.offset, req.length)
                self._send(codec.reply_read(req.cookie, req.offset, data))
                ok = True
                return
            if cmd == Cmd.WRITE:
                assert req.payload is not None
                await vol.write(req.offset, req.payload)
            elif cmd == Cmd.FLUSH:
                await vol.flush()
            elif cmd == Cmd.TRIM:
                await vol.trim(req.offset, req.length)
            elif cmd == Cmd.WRITE_ZEROES:
                await vol.zero(req.offset, req.length, no_hole=bool(req.flags & nbd.CMD_FLAG_NO_HOLE))
            elif cmd == Cmd.CACHE:
                pass  # advisory; reads are served from the engine's index and the page cache
            elif cmd == Cmd.BLOCK_STATUS:
                length = min(req.length, BLOCK_STATUS_SCAN_BYTES_MAX)
                maxd = 1 if req.flags & nbd.CMD_FLAG_REQ_ONE else BLOCK_STATUS_DESCRIPTORS_MAX
                runs = await vol.block_status(req.offset, length, maxd)
                descs = [(n, 0 if allocated else nbd.STATE_HOLE | nbd.STATE_ZERO) for n, allocated in runs]
                self._send([codec.reply_block_status(req.cookie, nbd.BASE_ALLOCATION_ID, descs)])
                ok = True
                return
            # Writes are durable before they return (no volatile cache), so FUA needs nothing more.
            self._send([codec.reply_ok(req.cookie)])
            ok = True
        except GroupError as e:
            self.log.warning("nbd.request_failed", cmd=req.cmd, offset=req.offset, length=req.length, error=str(e), errno=e.errno)
            self._send([codec.reply_error(req.cookie, e.errno, str(e))])
        except Exception as e:  # noqa: BLE001 — the process stays up; the host gets EIO
            self.log.exception("nbd.request_crashed", cmd=req.cmd, offset=req.offset, length=req.length)
            self._send([codec.reply_error(req.cookie, nbd.EIO, f"internal error: {type(e).__name__}")])
        finally:
            st.ops += 1
            st.latency.observe(time.monotonic() - t0)
            if ok:
                if req.cmd in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
                    st.bytes += req.length
            else:
                st.errors += 1

    def close(self) -> None:
        if not self.closing:
            self.closing = True
        self._flush()  # replies queued in this turn go out before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class NbdServer:
    def __init__(self, catalog: VolumeCatalog, config: GatewayConfig, attacher: Attacher | None = None) -> None:
        self.catalog = catalog
        self.attacher = attacher
        self.config = config
        self.connections: set[NbdConnection] = set()
        self.shutting_down = False
        self.inflight = 0
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None
        self.tls_failures = 0  # rule 4: handshakes that failed (no or a wrong client certificate, ...)

    def export_info(self, name: str) -> nbd.ExportInfo | None:
        vol = self.catalog.get(name)
        if vol is None:
            return None
        return nbd.ExportInfo(
            name=name,
            size_bytes=vol.size_bytes,
            transmission_flags=TRANSMISSION_FLAGS,
            description=f"raftblock volume {name}",
            max_block_bytes=self.config.max_block_bytes,
        )

    def request_done(self) -> None:
        if self._idle is not None and self.inflight == 0:
            self._idle.set()

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: NbdConnection(self), self.config.bind, self.config.port, reuse_address=True, backlog=128
        )
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        log.info("nbd.listening", bind=host, port=port)
        return host, port

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight requests (bounded), close all connections."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.pause_reading()
        if self.inflight:
            log.info("nbd.draining", inflight=self.inflight)
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
            except TimeoutError:
                log.warning("nbd.drain_timeout", inflight=self.inflight)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("nbd.stopped")

