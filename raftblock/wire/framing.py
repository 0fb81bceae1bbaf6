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


class FrameType(IntEnum):
    HELLO = 1
    RAFT = 2
    HEARTBEATS = 3
    CLIENT_REQ = 4
    CLIENT_RESP = 5


class FatalFrameError(Exception):
    """The byte stream lost its framing; close the connection. `counter` names what to count."""

    def __init__(self, counter: str, detail: str) -> None:
        super().__init__(detail)
        self.counter = counter


class Frame:
    __slots__ = ("type", "flags", "group", "message", "payload")

    def __init__(self, type: int, flags: int, group: int, message: bytes, payload: bytes) -> None:
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


class FrameDecoder:
    """Incremental reader of one connection's byte stream."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: Buf) -> None:
        self._buf += data

    def buffered_bytes(self) -> int:
        return len(self._buf)

    def next_event(self) -> Frame | BadFrame | None:
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
