# A deliberately small NBD client on raw sockets, for sending what real clients never send.
#
# Owns: byte-level handshake, options and simple-reply transmission, nothing more. Rules:
#   1. Constants are spelled as in NBD proto.md (doc/proto.md of NetworkBlockDevice/nbd), so a test can
#      cite the clause it enforces by name.
#   2. Structured replies are never negotiated here: every reply is a simple reply, so framing stays
#      trivial and a desynchronised server shows up as a bad reply magic.
#   3. Every socket has a timeout; a server that hangs fails the test instead of wedging it.
from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import dataclass

# handshake (proto.md "Fixed newstyle negotiation")
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# transmission
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1

# errors (proto.md "Error values")
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length

TIMEOUT_S = 10.0


class Closed(Exception):
    """The server closed (or reset) the connection."""


class ProtocolViolation(AssertionError):
    """The server sent bytes proto.md does not allow here."""


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes


@dataclass
class Export:
    size: int
    flags: int
    block_sizes: tuple[int, int, int] | None


@dataclass
class Reply:
    error: int
    cookie: int
    data: bytes = b""


class RawConn:
    def __init__(self, host: str, port: int, timeout_s: float = TIMEOUT_S) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handshake_flags: int | None = None

    # -- bytes --------------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            try:
                chunk = self.sock.recv(min(n, 1 << 20))
            except ConnectionResetError as e:
                raise Closed("connection reset") from e
            if not chunk:
                raise Closed(f"closed with {n} bytes still expected")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def wait_closed(self, timeout_s: float = TIMEOUT_S) -> bytes:
        """Read until the server closes; return what it sent meanwhile. Raises TimeoutError if it doesn't."""
        self.sock.settimeout(timeout_s)
        got: list[bytes] = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return b"".join(got)
            except TimeoutError:
                raise TimeoutError(f"server kept the connection open for {timeout_s}s") from None
            if not chunk:
                return b"".join(got)
            got.append(chunk)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handshake ----------------------------------------------------------------------------------------

    def read_greeting(self) -> int:
        magic, ihaveopt, flags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise ProtocolViolation(f"bad greeting {magic:#x} {ihaveopt:#x}")
        self.handshake_flags = flags
        return flags

    def handshake(self) -> int:
        flags = self.read_greeting()
        client = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if flags & NBD_FLAG_NO_ZEROES else 0)
        self.send(struct.pack(">I", client))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def read_opt_reply(self) -> OptReply:
        magic, option, rtype, length = OPT_REPLY.unpack(self.recv_exact(OPT_REPLY.size))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolViolation(f"bad option reply magic {magic:#x}")
        return OptReply(option, rtype, self.recv_exact(length))

    def opt_go(self, name: str, option: int = NBD_OPT_GO) -> Export | OptReply:
        """NBD_OPT_GO (or INFO); the export on success, the error reply otherwise."""
        raw = name.encode()
        self.send_option(option, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE))
        size = flags = None
        block_sizes = None
        while True:
            rep = self.read_opt_reply()
            if rep.option != option:
                raise ProtocolViolation(f"reply for option {rep.option}, expected {option}")
            if rep.type & NBD_REP_FLAG_ERROR:
                return rep
            if rep.type == NBD_REP_INFO:
                (info,) = struct.unpack(">H", rep.data[:2])
                if info == NBD_INFO_EXPORT:
                    size, flags = struct.unpack(">QH", rep.data[2:12])
                elif info == NBD_INFO_BLOCK_SIZE:
                    block_sizes = struct.unpack(">III", rep.data[2:14])
            elif rep.type == NBD_REP_ACK:
                if size is None or flags is None:
                    raise ProtocolViolation("NBD_REP_ACK without NBD_INFO_EXPORT")
                return Export(size, flags, block_sizes)
            else:
                raise ProtocolViolation(f"unexpected option reply type {rep.type}")

    def connect_export(self, name: str) -> Export:
        self.handshake()
        exp = self.opt_go(name)
        if isinstance(exp, OptReply):
            raise AssertionError(f"NBD_OPT_GO {name!r} refused: type {exp.type:#x} {exp.data!r}")
        return exp

    # -- transmission -------------------------------------------------------------------------------------

    @staticmethod
    def request_bytes(cmd: int, cookie: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
        return REQUEST_HEADER.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data

    def request(self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> None:
        self.send(self.request_bytes(cmd, cookie, offset, length, flags, data))

    def read_reply(self, read_lengths: dict[int, int] | None = None) -> Reply:
        """One simple reply; read_lengths maps the cookies of READs to their lengths (payload on success)."""
        magic, error, cookie = SIMPLE_REPLY.unpack(self.recv_exact(SIMPLE_REPLY.size))
        if magic != NBD_SIMPLE_REPLY_MAGIC:
            raise ProtocolViolation(f"bad reply magic {magic:#x} (structured replies were not negotiated)")
        data = b""
        if error == 0 and read_lengths and cookie in read_lengths:
            data = self.recv_exact(read_lengths[cookie])
        return Reply(error, cookie, data)

    def call(self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"", cookie: int = 1) -> Reply:
        self.request(cmd, cookie, offset, length, flags, data)
        rep = self.read_reply({cookie: length} if cmd == NBD_CMD_READ else None)
        if rep.cookie != cookie:
            raise ProtocolViolation(f"reply cookie {rep.cookie} for request {cookie}")
        return rep

    def read(self, offset: int, length: int) -> bytes:
        rep = self.call(NBD_CMD_READ, offset, length)
        if rep.error:
            raise AssertionError(f"READ {offset}+{length} failed with error {rep.error}")
        return rep.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        rep = self.call(NBD_CMD_WRITE, offset, len(data), flags, data)
        if rep.error:
            raise AssertionError(f"WRITE {offset}+{len(data)} failed with error {rep.error}")

    def disconnect(self) -> None:
        try:
            self.request(NBD_CMD_DISC, 0, 0, 0)
        except OSError:
            pass
        self.close()


def volume_sha256(host: str, port: int, name: str, chunk_bytes: int = 4 << 20) -> str:
    """Checksum of a whole export, read through a fresh connection."""
    h = hashlib.sha256()
    with RawConn(host, port) as c:
        exp = c.connect_export(name)
        for off in range(0, exp.size, chunk_bytes):
            h.update(c.read(off, min(chunk_bytes, exp.size - off)))
        c.disconnect()
    return h.hexdigest()
