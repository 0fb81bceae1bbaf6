# Frame codec (docs/format/wire.md): fixed 28-byte header, protobuf message, raw payload, one CRC32C.
#
# Rules:
# 1. Sans-I/O: `encode_frame` returns the parts for one `writelines`; `FrameDecoder.feed(bytes)` then
#    `next_event()` returns Frame / BadFrame / None and raises FatalFrameError when the stream can no
#    longer be trusted (bad magic or version, lengths over the limits): the caller closes.
# 2. Payload bytes are never copied into the protobuf message; the CRC is chained over the parts.
# 3. Limits are explicit: MESSAGE_LEN_MAX, PAYLOAD_LEN_MAX.
from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum

import crc32c

MAGIC = b"RB"
VERSION = 1
HEADER = struct.Struct("<2sBBHHQIII")
HEADER_SIZE = HEADER.size  # 28
_CRC_OFF = 24
MESSAGE_LEN_MAX = 1 << 20
PAYLOAD_LEN_MAX = 64 << 20

Buf = bytes | bytearray | memoryview

# The HELLO frame's roles and the wire version it carries (node/transport.py rule 1).
ROLE_PEER = 1
ROLE_CLIENT = 2
WIRE_VERSION = 1


class FrameType(IntEnum):
    HELLO = 1
    RAFT = 2
    HEARTBEATS = 3
    CLIENT_REQ = 4
    CLIENT_RESP = 5
    CHAIN = 6


class FatalFrameError(Exception):
    """The byte stream lost its framing; close the connection. `counter` names what to count."""

    def __init__(self, counter: str, detail: str) -> None:
        super().__init__(detail)
        self.counter = counter


class Frame:
    __slots__ = ("type", "flags", "group", "message", "payload")

    def __init__(self, type: int, flags: int, group: int, message: bytes, payload: bytes | memoryview) -> None:
        self.type = type  # an int: unknown types are the caller's to refuse (counted as malformed)
        self.flags = flags
        self.group = group
        self.message = message
        self.payload = payload

    def __repr__(self) -> str:
        return f"Frame(type={self.type}, group={self.group}, msg={len(self.message)}B, payload={len(self.payload)}B)"


class BadFrame:
    """A frame that was skipped (CRC mismatch); the stream continues after it."""

    __slots__ = ("counter", "group")

    def __init__(self, counter: str, group: int) -> None:
        self.counter = counter
        self.group = group


def encode_frame(ftype: int, group: int, message: bytes, payload: Sequence[Buf] = (), flags: int = 0) -> list[Buf]:
    """The parts of one frame, header first; write them with one `writelines`."""
    plen = 0
    for p in payload:
        plen += len(p)
    if len(message) > MESSAGE_LEN_MAX or plen > PAYLOAD_LEN_MAX:
        raise ValueError(f"frame too large: message {len(message)}B, payload {plen}B")
    head = bytearray(HEADER.pack(MAGIC, VERSION, ftype, flags, 0, group, len(message), plen, 0))
    crc = crc32c.crc32c(memoryview(head)[:_CRC_OFF], 0)
    crc = crc32c.crc32c(message, crc)
    for p in payload:
        crc = crc32c.crc32c(p, crc)
    struct.pack_into("<I", head, _CRC_OFF, crc)
    parts: list[Buf] = [bytes(head), message]
    parts.extend(payload)
    return parts


def encode_frame_bytes(ftype: int, group: int, message: bytes, payload: Sequence[Buf] = ()) -> bytes:
    return b"".join(bytes(p) for p in encode_frame(ftype, group, message, payload))


BIG_FRAME_BYTES = 32 << 10  # frames at least this long are read straight into a buffer of their own
# ... up to this long: the buffer is allocated when the header arrives, so a forged header must not make
# a connection allocate more than this before any of the bytes it announces have arrived (longer frames,
# within PAYLOAD_LEN_MAX, accumulate as they come).
BIG_FRAME_BYTES_MAX = 4 << 20
_RX_BYTES = 256 << 10


class FrameDecoder:
    """Incremental reader of one connection's byte stream.

    Two ways in: `feed(bytes)` (asyncio.Protocol.data_received), or `get_buffer()` + `buffer_updated(n)`
    (asyncio.BufferedProtocol: the kernel copies straight into our memory). Small frames are cut out of
    an accumulation buffer. A big frame (BIG_FRAME_BYTES or more) gets a bytearray of its own as soon as
    its header is known, and get_buffer() hands out the unfilled rest of it, so its bytes are copied once
    (socket -> that buffer) and its payload is a memoryview of it, never copied again here.
    """

    __slots__ = ("_buf", "_big", "_big_have", "_big_head", "_rx")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None  # body (message + payload) of the big frame being read
        self._big_have = 0
        self._big_head = b""  # its header
        self._rx: bytearray | None = None

    # -- input ---------------------------------------------------------------------------------------------
    def feed(self, data: Buf) -> None:
        big = self._big
        if big is not None:
            take = min(len(data), len(big) - self._big_have)
            if take:
                big[self._big_have : self._big_have + take] = memoryview(data)[:take]
                self._big_have += take
                data = memoryview(data)[take:]
            if not len(data):
                return
        self._buf += data

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        big = self._big
        if big is not None and self._big_have < len(big):
            return memoryview(big)[self._big_have :]
        if self._rx is None:
            self._rx = bytearray(_RX_BYTES)
        return memoryview(self._rx)

    def buffer_updated(self, nbytes: int) -> None:
        big = self._big
        if big is not None and self._big_have < len(big):
            self._big_have += nbytes
        else:
            assert self._rx is not None
            self.feed(memoryview(self._rx)[:nbytes])

    def buffered_bytes(self) -> int:
        return len(self._buf) + self._big_have

    # -- output --------------------------------------------------------------------------------------------
    def next_event(self) -> Frame | BadFrame | None:
        if self._big is not None:
            return self._next_big()
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        magic, version, ftype, flags, _res, group, mlen, plen, crc = HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION:
            raise FatalFrameError("frames_bad_magic", f"bad magic/version {bytes(magic)!r}/{version}")
        if mlen > MESSAGE_LEN_MAX or plen > PAYLOAD_LEN_MAX:
            raise FatalFrameError("frames_too_large", f"frame too large: message {mlen}B payload {plen}B")
        end = HEADER_SIZE + mlen + plen
        if len(buf) < end:
            if BIG_FRAME_BYTES <= end <= BIG_FRAME_BYTES_MAX:
                # Give the frame a buffer of its own; what is already here moves there once.
                body = bytearray(mlen + plen)
                have = len(buf) - HEADER_SIZE
                body[:have] = memoryview(buf)[HEADER_SIZE:]
                self._big, self._big_have, self._big_head = body, have, bytes(buf[:HEADER_SIZE])
                buf.clear()
            return None
        view = memoryview(buf)
        try:
            got = crc32c.crc32c(view[:_CRC_OFF], 0)
            got = crc32c.crc32c(view[HEADER_SIZE:end], got)
            if got != crc:
                bad: Frame | BadFrame = BadFrame("frames_bad_crc", group)
            else:
                message = bytes(view[HEADER_SIZE : HEADER_SIZE + mlen])
                payload = bytes(view[HEADER_SIZE + mlen : end])
                bad = Frame(ftype, flags, group, message, payload)
        finally:
            view.release()
        del buf[:end]
        return bad

    def _next_big(self) -> Frame | BadFrame | None:
        body = self._big
        assert body is not None
        if self._big_have < len(body):
            return None
        head = self._big_head
        self._big, self._big_have, self._big_head = None, 0, b""
        _magic, _version, ftype, flags, _res, group, mlen, _plen, crc = HEADER.unpack_from(head, 0)
        got = crc32c.crc32c(body, crc32c.crc32c(head[:_CRC_OFF], 0))
        if got != crc:
            return BadFrame("frames_bad_crc", group)
        return Frame(ftype, flags, group, bytes(body[:mlen]), memoryview(body)[mlen:])
