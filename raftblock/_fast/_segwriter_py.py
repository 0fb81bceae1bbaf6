"""Segment record framing into a caller's buffer — the pure-Python twin and specification of
_segwriter_c.pyx. The byte layout is docs/format/segment.md ("Record"); storage/segment.py owns it.

Rule 1: a record is written in place at `buf[offset:]` (no intermediate bytes objects); the functions
        return the offset just past it, so records can be framed back to back into one buffer.
Rule 2: pair check (TigerBeetle): the payload is copied into the buffer first and every block's CRC32C
        is computed from the bytes *in the buffer*; when the caller passes CRCs, the first mismatch
        raises BlockCrcMismatch(index) and neither the CRC array nor the header is written (the payload
        bytes may have been). Without CRCs the computed ones are written.
Rule 3: every check runs before the first byte is written: field ranges (OverflowError, as the C
        conversions do), a record the reader would refuse (ValueError: payload not 1..256 whole blocks,
        block + count > 2^32 - 1, wrong number of CRCs, trim count 0), the buffer (TypeError if
        read-only, ValueError if the record does not fit at `offset`), CRC values that are not
        integers (TypeError). A CRC value outside 0..2^32-1 is a mismatch, not an error.
Rule 4: checksums come from the crc32c package (never hand-written); the header CRC is
        crc32c(header[4:48] ++ crc_array, seed).
Rule 5: `frame_write_head` frames the same record without its payload (header and CRC array only, for a
        pwritev of [head, payload]): the CRCs are computed from the payload where it lies, so the caller
        must not change the payload before it is written (the engine's payloads are immutable: bytes, or
        views of a received frame nothing writes to). Same checks, same result bytes as frame_write.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from operator import index

from crc32c import crc32c

from raftblock._fast._segformat import (
    BLOCK_SIZE,
    MAX_BLOCK,
    MAX_WRITE_BLOCKS,
    REC_HEADER_SIZE,
    REC_MAGIC,
    REC_TRIM,
    REC_WRITE,
    BlockCrcMismatch,
)

__all__ = ["BlockCrcMismatch", "IMPLEMENTATION", "frame_trim", "frame_write", "frame_write_head"]

IMPLEMENTATION = "python"

# header_crc, magic, type, flags, reserved, count, length, block, extent_id, lsn, sync_mark
_HEADER = struct.Struct("<I4sBBHIIIQQQ")
assert _HEADER.size == REC_HEADER_SIZE

Buffer = bytes | bytearray | memoryview


def _unsigned(value: int, bits: int, name: str) -> int:
    value = index(value)
    if not 0 <= value < 1 << bits:
        raise OverflowError(f"{name}={value} does not fit in an unsigned {bits}-bit field")
    return value


def _out_view(buf: Buffer, offset: int, length: int) -> memoryview:
    out = memoryview(buf).cast("B")
    if out.readonly:
        raise TypeError("the record buffer is read-only")
    if offset < 0 or offset > len(out) - length:
        raise ValueError(f"a {length}-byte record does not fit at offset {offset} of a {len(out)}-byte buffer")
    return out


def _write_args(
    seed: int, extent_id: int, block: int, lsn: int, sync_mark: int, payload: Buffer, crcs: Sequence[int] | None,
    flags: int,
) -> tuple[int, int, int, int, int, int, memoryview, int, list[int] | None]:
    """Rule 3 for a WRITE: the fields, the payload view, its block count and the wanted CRCs."""
    seed = _unsigned(seed, 32, "seed")
    extent_id = _unsigned(extent_id, 64, "extent_id")
    block = _unsigned(block, 32, "block")
    lsn = _unsigned(lsn, 64, "lsn")
    sync_mark = _unsigned(sync_mark, 64, "sync_mark")
    flags = _unsigned(flags, 8, "flags")
    pay = memoryview(payload).cast("B")
    n = len(pay)
    if n == 0 or n % BLOCK_SIZE or n > MAX_WRITE_BLOCKS * BLOCK_SIZE:
        raise ValueError(f"a WRITE payload is 1..{MAX_WRITE_BLOCKS} whole {BLOCK_SIZE}-byte blocks, got {n} bytes")
    count = n // BLOCK_SIZE
    if block + count > MAX_BLOCK:
        raise ValueError(f"blocks {block}..{block + count} run past block {MAX_BLOCK}")
    want = None
    if crcs is not None:
        if len(crcs) != count:
            raise ValueError(f"{len(crcs)} CRCs for {count} payload blocks")
        want = [index(c) for c in crcs]
    return seed, extent_id, block, lsn, sync_mark, flags, pay, count, want


def _head(out: memoryview, offset: int, got: list[int], want: list[int] | None, seed: int, extent_id: int,
          block: int, lsn: int, sync_mark: int, flags: int) -> int:
    """Rule 2 (the pair check), then the CRC array and the header at out[offset:]; returns the payload's
    offset in the record."""
    count = len(got)
    if want is not None:
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g != w:
                raise BlockCrcMismatch(i)
    carr = (4 * count + 7) & ~7
    pay_off = REC_HEADER_SIZE + carr
    struct.pack_into(f"<{count}I", out, offset + REC_HEADER_SIZE, *got)
    out[offset + REC_HEADER_SIZE + 4 * count : offset + pay_off] = bytes(carr - 4 * count)
    _HEADER.pack_into(
        out, offset, 0, REC_MAGIC, REC_WRITE, flags, 0, count, pay_off + count * BLOCK_SIZE, block, extent_id,
        lsn, sync_mark
    )
    struct.pack_into("<I", out, offset, crc32c(out[offset + 4 : offset + pay_off], seed))
    return pay_off


def frame_write(
    buf: Buffer,
    offset: int,
    seed: int,
    extent_id: int,
    block: int,
    lsn: int,
    sync_mark: int,
    payload: Buffer,
    crcs: Sequence[int] | None = None,
    flags: int = 0,
) -> int:
    """Frame one WRITE record (header, CRC array, payload) at buf[offset:]; returns offset + its length."""
    offset = index(offset)
    seed, extent_id, block, lsn, sync_mark, flags, pay, count, want = _write_args(
        seed, extent_id, block, lsn, sync_mark, payload, crcs, flags)
    n = count * BLOCK_SIZE
    pay_off = REC_HEADER_SIZE + ((4 * count + 7) & ~7)
    out = _out_view(buf, offset, pay_off + n)
    start = offset + pay_off
    out[start : start + n] = pay
    got = [crc32c(out[s : s + BLOCK_SIZE]) for s in range(start, start + n, BLOCK_SIZE)]
    _head(out, offset, got, want, seed, extent_id, block, lsn, sync_mark, flags)
    return start + n


def frame_write_head(
    buf: Buffer,
    offset: int,
    seed: int,
    extent_id: int,
    block: int,
    lsn: int,
    sync_mark: int,
    payload: Buffer,
    crcs: Sequence[int] | None = None,
    flags: int = 0,
) -> int:
    """Rule 5: the header and CRC array of the WRITE record of `payload` at buf[offset:], not the payload;
    returns offset + their length (the record's payload offset)."""
    offset = index(offset)
    seed, extent_id, block, lsn, sync_mark, flags, pay, count, want = _write_args(
        seed, extent_id, block, lsn, sync_mark, payload, crcs, flags)
    pay_off = REC_HEADER_SIZE + ((4 * count + 7) & ~7)
    out = _out_view(buf, offset, pay_off)
    got = [crc32c(pay[s : s + BLOCK_SIZE]) for s in range(0, count * BLOCK_SIZE, BLOCK_SIZE)]
    return offset + _head(out, offset, got, want, seed, extent_id, block, lsn, sync_mark, flags)


def frame_trim(
    buf: Buffer,
    offset: int,
    seed: int,
    extent_id: int,
    block: int,
    count: int,
    lsn: int,
    sync_mark: int,
    flags: int = 0,
) -> int:
    """Frame one TRIM record (a header only) at buf[offset:]; returns offset + 48."""
    offset = index(offset)
    seed = _unsigned(seed, 32, "seed")
    extent_id = _unsigned(extent_id, 64, "extent_id")
    block = _unsigned(block, 32, "block")
    count = _unsigned(count, 32, "count")
    lsn = _unsigned(lsn, 64, "lsn")
    sync_mark = _unsigned(sync_mark, 64, "sync_mark")
    flags = _unsigned(flags, 8, "flags")
    if count < 1:
        raise ValueError("a TRIM covers at least one block")
    if block + count > MAX_BLOCK:
        raise ValueError(f"blocks {block}..{block + count} run past block {MAX_BLOCK}")
    out = _out_view(buf, offset, REC_HEADER_SIZE)
    _HEADER.pack_into(
        out, offset, 0, REC_MAGIC, REC_TRIM, flags, 0, count, REC_HEADER_SIZE, block, extent_id, lsn, sync_mark
    )
    struct.pack_into("<I", out, offset, crc32c(out[offset + 4 : offset + REC_HEADER_SIZE], seed))
    return offset + REC_HEADER_SIZE
