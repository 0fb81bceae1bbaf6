"""NBD protocol codec, without I/O (h11 style): bytes in, events and bytes out.

Owns the wire format of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md): the fixed-newstyle
handshake (options, replies, meta contexts) and the transmission-phase framing (requests, simple and
structured replies). It never touches a socket, a clock or a volume.

Rules:
1. The handshake is answered inside the codec, from the `ExportCatalog` it is given; the adapter only
   sees `ExportSelected` when transmission begins (or `Closed` when the client leaves).
2. In transmission the codec frames requests and hands them out as `Request` events. It does not judge
   them (range, flags, size): that is `validate.py`'s single job. It only refuses what it cannot frame
   (bad magic) by raising `ProtocolError`, after which the adapter closes the connection.
3. A WRITE payload longer than `max_payload_bytes` is never buffered: the codec reads and discards it and
   hands out the request with `payload=None, oversized=True`, so the adapter can answer an error and
   keep the connection (proto.md: the server SHOULD NOT disconnect for an oversize request).
4. Every buffer is bounded: option data by `max_option_bytes`, payloads by `max_payload_bytes`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

# --- constants (proto.md) ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# NBD error values (proto.md "Error values"; they are the Linux errno values)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

_REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length  (28 bytes)
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie  (16 bytes)
_STRUCT = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length  (20 bytes)
_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REP = struct.Struct(">QIII")  # magic, option, reply type, length


class ProtocolError(Exception):
    """The peer sent something that cannot be framed; the connection must be closed."""


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size_bytes: int
    transmission_flags: int
    description: str = ""
    min_block_bytes: int = 512
    preferred_block_bytes: int = 4096
    max_block_bytes: int = 32 << 20


class ExportCatalog:
    """What the handshake needs to know about exports: a lookup and a listing (pure callbacks)."""

    def __init__(self, lookup: Callable[[str], ExportInfo | None], names: Callable[[], Sequence[str]]):
        self.lookup = lookup
        self.names = names


# --- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSelected:
    export: ExportInfo
    structured_replies: bool
    meta_context_ids: tuple[int, ...]  # ids of selected meta contexts (only base:allocation exists)


@dataclass
class Request:
    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    payload: memoryview | None = None  # WRITE payload (exactly `length` bytes) unless oversized
    oversized: bool = False


@dataclass(frozen=True)
class Closed:
    """The client ended the handshake (ABORT, or EOF) — not an error."""

    reason: str


class NeedData:
    pass


@dataclass(frozen=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: the adapter runs the TLS handshake on the connection, then calls
    `tls_started()`; the option haggling goes on inside TLS (proto.md "TLS support")."""


NEED_DATA = NeedData()
Event = ExportSelected | Request | Closed | NeedData | StartTls


class _Phase(IntEnum):
    CLIENT_FLAGS = 0
    OPTIONS = 1
    TRANSMISSION = 2
    DISCARD = 3  # discarding an oversized WRITE payload
    CLOSED = 4


class ServerConnection:
    """One NBD connection, server side. Feed `receive_data`, drain `next_event`, send `data_to_send`."""

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        max_option_bytes: int = 64 << 10,
        max_payload_bytes: int = 32 << 20,
        shutting_down: Callable[[], bool] = lambda: False,
        tls_required: bool = False,
    ) -> None:
        self._catalog = catalog
        # proto.md "FORCEDTLS": with TLS configured, nothing but STARTTLS and ABORT before the handshake
        self.tls_required = tls_required
        self.tls = False
        self._max_option_bytes = max_option_bytes
        self._max_payload_bytes = max_payload_bytes
        self._shutting_down = shutting_down
        self._buf = bytearray()
        self._pos = 0
        self._out: list[bytes] = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]
        self._phase = _Phase.CLIENT_FLAGS
        self._no_zeroes = False
        self.structured_replies = False
        self._meta_ids: tuple[int, ...] = ()
        self._discard_left = 0
        self._pending_oversized: Request | None = None
        self.export: ExportInfo | None = None

    # --- input ----------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > (1 << 20):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> memoryview:
        mv = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        return mv

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_transmission(self) -> bool:
        return self._phase in (_Phase.TRANSMISSION, _Phase.DISCARD)

    def next_event(self) -> Event:
        """Return the next event, or NEED_DATA. Raises ProtocolError on unframeable input."""
        while True:
            phase = self._phase
            if phase == _Phase.TRANSMISSION:
                return self._next_request()
            if phase == _Phase.DISCARD:
                n = min(self._discard_left, self._available())
                self._pos += n
                self._discard_left -= n
                if self._discard_left:
                    return NEED_DATA
                self._phase = _Phase.TRANSMISSION
                req, self._pending_oversized = self._pending_oversized, None
                assert req is not None
                return req
            if phase == _Phase.CLOSED:
                return NEED_DATA
            if phase == _Phase.CLIENT_FLAGS:
                if self._available() < 4:
                    return NEED_DATA
                (flags,) = struct.unpack(">I", self._take(4))
                if not flags & CLIENT_FLAG_FIXED_NEWSTYLE:
                    # Plain newstyle clients cannot receive option errors; we only speak fixed newstyle.
                    raise ProtocolError("client does not support fixed newstyle")
                if flags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES):
                    raise ProtocolError(f"unknown client flags 0x{flags:x}")
                self._no_zeroes = bool(flags & CLIENT_FLAG_NO_ZEROES)
                self._phase = _Phase.OPTIONS
                continue
            # OPTIONS
            if self._available() < _OPT_HDR.size:
                return NEED_DATA
            magic, opt, length = _OPT_HDR.unpack_from(self._buf, self._pos)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic 0x{magic:x}")
            if length > self._max_option_bytes:
                raise ProtocolError(f"option {opt} data too long ({length} bytes)")
            if self._available() < _OPT_HDR.size + length:
                return NEED_DATA
            self._pos += _OPT_HDR.size
            data = bytes(self._take(length))
            ev = self._handle_option(opt, data)
            if ev is not None:
                return ev

    # --- handshake ------------------------------------------------------------------------------
    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REP.pack(REPLY_MAGIC_OPT, opt, rtype, len(data)))
        if data:
            self._out.append(data)

    def _opt_error(self, opt: int, rtype: int, message: str) -> None:
        self._opt_reply(opt, rtype, message.encode())

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS completed: the options go on."""
        self.tls = True

    def _handle_option(self, opt: int, data: bytes) -> Event | None:
        if self._shutting_down() and opt not in (Opt.ABORT,):
            self._opt_error(opt, REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        if opt == Opt.STARTTLS:
            if not self.tls_required:
                self._opt_error(opt, REP_ERR_POLICY, "TLS is not offered by this gateway")
            elif self.tls:
                self._opt_error(opt, REP_ERR_INVALID, "TLS is already on")
            elif data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            else:
                if self._available():  # the client must wait for the ACK before its handshake
                    raise ProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
                self._opt_reply(opt, REP_ACK)
                return StartTls()
            return None
        if self.tls_required and not self.tls and opt != Opt.ABORT:
            if opt == Opt.EXPORT_NAME:  # no error reply exists for it: the server closes (proto.md)
                self._phase = _Phase.CLOSED
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a gateway that requires TLS")
            self._opt_error(opt, REP_ERR_TLS_REQD, "this gateway requires TLS (NBD_OPT_STARTTLS; nbds://)")
            return None
        if opt == Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            export = self._catalog.lookup(name)
            if export is None:
                # EXPORT_NAME has no error reply: proto.md says the server closes the connection.
                self._phase = _Phase.CLOSED
                raise ProtocolError(f"unknown export {name!r} (NBD_OPT_EXPORT_NAME)")
            reply = struct.pack(">QH", export.size_bytes, export.transmission_flags)
            self._out.append(reply if self._no_zeroes else reply + bytes(124))
            return self._select(export)
        if opt == Opt.ABORT:
            if data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_ABORT takes no data")
            else:
                self._opt_reply(opt, REP_ACK)
            self._phase = _Phase.CLOSED
            return Closed("client sent NBD_OPT_ABORT")
        if opt == Opt.LIST:
            if data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name in self._catalog.names():
                raw = name.encode()
                self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            self._opt_reply(opt, REP_ACK)
            return None
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured_replies = True
            self._opt_reply(opt, REP_ACK)
            return None
        if opt in (Opt.INFO, Opt.GO):
            return self._info_or_go(opt, data)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
            return None
        self._opt_error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    def _info_or_go(self, opt: int, data: bytes) -> Event | None:
        try:
            (nlen,) = struct.unpack_from(">I", data, 0)
            if 4 + nlen + 2 > len(data):
                raise struct.error("short")
            name = data[4 : 4 + nlen].decode("utf-8")
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise struct.error("length mismatch")
            requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        except (struct.error, UnicodeDecodeError):
            self._opt_error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return None
        export = self._catalog.lookup(name)
        if export is None:
            self._opt_error(opt, REP_ERR_UNKNOWN, f"unknown export {name!r}")
            return None
        if INFO_NAME in requests:
            raw = export.name.encode()
            self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + raw)
        if INFO_DESCRIPTION in requests and export.description:
            self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        # Block sizes are always sent (proto.md allows it unrequested); clients that did not ask may
        # still send unaligned requests, which the gateway serves by read-modify-write.
        self._opt_reply(
            opt,
            REP_INFO,
            struct.pack(
                ">HIII",
                INFO_BLOCK_SIZE,
                export.min_block_bytes,
                export.preferred_block_bytes,
                export.max_block_bytes,
            ),
        )
        self._opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size_bytes, export.transmission_flags))
        self._opt_reply(opt, REP_ACK)
        if opt == Opt.GO:
            return self._select(export)
        return None

    def _parse_meta_query(self, opt: int, data: bytes) -> tuple[str, list[str]] | None:
        try:
            (nlen,) = struct.unpack_from(">I", data, 0)
            name = data[4 : 4 + nlen].decode("utf-8")
            if len(name.encode()) != nlen:
                raise struct.error("short name")
            pos = 4 + nlen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                q = data[pos : pos + qlen]
                if len(q) != qlen:
                    raise struct.error("short query")
                queries.append(q.decode("utf-8"))
                pos += qlen
            if pos != len(data):
                raise struct.error("trailing bytes")
        except (struct.error, UnicodeDecodeError):
            self._opt_error(opt, REP_ERR_INVALID, "malformed meta context request")
            return None
        return name, queries

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured_replies:
            self._opt_error(opt, REP_ERR_INVALID, "meta contexts need NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = self._parse_meta_query(opt, data)
        if parsed is None:
            return
        name, queries = parsed
        if self._catalog.lookup(name) is None:
            self._opt_error(opt, REP_ERR_UNKNOWN, f"unknown export {name!r}")
            return
        matched = False
        if opt == Opt.LIST_META_CONTEXT and not queries:
            matched = True
        for q in queries:
            if q in (BASE_ALLOCATION, "base:"):
                matched = True
        if matched:
            ctx_id = BASE_ALLOCATION_ID if opt == Opt.SET_META_CONTEXT else 0
            self._opt_reply(opt, REP_META_CONTEXT, struct.pack(">I", ctx_id) + BASE_ALLOCATION.encode())
        if opt == Opt.SET_META_CONTEXT:
            self._meta_ids = (BASE_ALLOCATION_ID,) if matched else ()
        self._opt_reply(opt, REP_ACK)

    def _select(self, export: ExportInfo) -> ExportSelected:
        self.export = export
        self._phase = _Phase.TRANSMISSION
        return ExportSelected(export, self.structured_replies, self._meta_ids)

    # --- transmission ---------------------------------------------------------------------------
    def _next_request(self) -> Event:
        if self._available() < _REQ.size:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            self._phase = _Phase.CLOSED
            raise ProtocolError(f"bad request magic 0x{magic:x}")
        if cmd == Cmd.WRITE:
            if length > self._max_payload_bytes:
                self._pos += _REQ.size
                self._pending_oversized = Request(cookie, cmd, flags, offset, length, None, True)
                self._discard_left = length
                self._phase = _Phase.DISCARD
                return self.next_event()
            if self._available() < _REQ.size + length:
                return NEED_DATA
            self._pos += _REQ.size
            # Copy the payload out so the receive buffer can be reused while the write is in flight.
            payload = memoryview(bytes(self._take(length)))
            return Request(cookie, cmd, flags, offset, length, payload)
        self._pos += _REQ.size
        return Request(cookie, cmd, flags, offset, length)

    # --- replies (return bytes; the adapter writes them) -----------------------------------------
    @staticmethod
    def simple_reply(cookie: int, error: int = 0) -> bytes:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def reply_ok(self, cookie: int) -> bytes:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        if self.structured_replies:
            msg = message.encode()[:4096]
            payload = struct.pack(">IH", error, len(msg)) + msg
            return _STRUCT.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)) + payload
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def reply_read(self, cookie: int, offset: int, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Header(s) + data, as a list for writelines (no concatenation of the payload)."""
        if self.structured_replies:
            hdr = _STRUCT.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data)
            ) + struct.pack(">Q", offset)
            return [hdr, memoryview(data)]
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), memoryview(data)]

    def reply_block_status(self, cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]]) -> bytes:
        assert self.structured_replies and descriptors
        body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in descriptors)
        return _STRUCT.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body
