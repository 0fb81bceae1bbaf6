# Segment file format: headers, record framing, and the reader that walks a segment.
# The grammar and the reader's cases are specified in docs/format/segment.md; keep them in step.
#
# Rule 1: every byte written is framed and CRC32C-checked (crc32c package, never a hand-written CRC).
# Rule 2: the scanner never decides "torn or corrupt" by itself: it reports valid records and bad
#         regions; recovery judges the regions with the durable mark (sync_mark) of the whole log.
# Rule 3: no per-block Python work beyond one crc32c call per 4 KiB block.
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import crc32c

from raftblock._fast import segwriter
from raftblock.storage.disk import DiskFile

BLOCK_SIZE = 4096
FORMAT_VERSION = 3  # 3: PIN/UNPIN records and the checkpoint's pins (snapshots); 2: LINK records; all read
FORMAT_VERSIONS_READ = (1, 2, 3)

SEG_MAGIC = b"RBSEGMNT"
SEG_HEADER_SIZE = 64
_SEG_HEADER = struct.Struct("<8sII16sQQ12s")  # up to the crc at 60
assert _SEG_HEADER.size == 60

REC_MAGIC = b"RBRC"
REC_HEADER_SIZE = 48
# header_crc, magic, type, flags, reserved, count, length, block, extent_id, lsn, sync_mark
_REC_HEADER = struct.Struct("<I4sBBHIIIQQQ")
assert _REC_HEADER.size == REC_HEADER_SIZE

REC_WRITE = 1
REC_TRIM = 2
REC_LINK = 3  # a write whose payload lives in a WAL segment (docs/format/write-once.md)
REC_PIN = 4  # a snapshot's pin (segment.md "Snapshot pins"): block = group, extent_id = snap_id, body = pinned_lsn
REC_UNPIN = 5  # the pin of snap_id goes
MARK_TYPES = (REC_PIN, REC_UNPIN)
MARK_BODY = struct.Struct("<QQ")  # pinned_lsn, reserved
FLAG_RELOCATED = 0x01
FLAG_HISTORY = 0x02
FLAG_LINK = 0x04  # set on every LINK record (and on checkpoint runs that name one)
LINK_TARGET = struct.Struct("<QQ")  # wal_seq, wal_offset of the first payload byte

MAX_WRITE_BLOCKS = 256
MAX_BLOCK = (1 << 32) - 1  # block + count must stay <= MAX_BLOCK
MAX_GROUP = (1 << 32) - 1  # a PIN record names its extent group in the block field (ids.py: group < 2^32)
# Records are framed by _fast.segwriter (Cython or its twin), which cannot import this module.
assert (segwriter.BLOCK_SIZE, segwriter.REC_MAGIC, segwriter.REC_HEADER_SIZE, segwriter.REC_WRITE,
        segwriter.REC_TRIM, segwriter.MAX_WRITE_BLOCKS, segwriter.MAX_BLOCK) == (
    BLOCK_SIZE, REC_MAGIC, REC_HEADER_SIZE, REC_WRITE, REC_TRIM, MAX_WRITE_BLOCKS, MAX_BLOCK)
SCAN_CHUNK_BYTES = 1 << 20


def segment_name(segment_id: int) -> str:
    return f"seg-{segment_id:016x}.log"


def parse_segment_name(name: str) -> int | None:
    if len(name) == 24 and name.startswith("seg-") and name.endswith(".log"):
        try:
            return int(name[4:20], 16)
        except ValueError:
            return None
    return None


def align8(n: int) -> int:
    return (n + 7) & ~7


def crc_array_size(count: int) -> int:
    return align8(4 * count)


def record_length(rtype: int, count: int) -> int:
    if rtype == REC_WRITE:
        return REC_HEADER_SIZE + crc_array_size(count) + BLOCK_SIZE * count
    if rtype == REC_LINK:
        return REC_HEADER_SIZE + crc_array_size(count) + LINK_TARGET.size
    if rtype in MARK_TYPES:
        return REC_HEADER_SIZE + MARK_BODY.size
    return REC_HEADER_SIZE


def position(segment_id: int, offset: int) -> int:
    """Log position as stored in sync_mark / compared by recovery."""
    return (segment_id << 32) | offset


def segment_seed(cluster_id: bytes, segment_id: int) -> int:
    return crc32c.crc32c(cluster_id + struct.pack("<Q", segment_id), 0)


# --- segment header ---------------------------------------------------------------------------


def encode_segment_header(cluster_id: bytes, segment_id: int, created_lsn: int) -> bytes:
    body = _SEG_HEADER.pack(
        SEG_MAGIC, FORMAT_VERSION, SEG_HEADER_SIZE, cluster_id, segment_id, created_lsn, bytes(12)
    )
    return body + struct.pack("<I", crc32c.crc32c(body, 0))


@dataclass
class SegmentHeader:
    cluster_id: bytes
    segment_id: int
    created_lsn: int
    format_version: int


def decode_segment_header(raw: bytes) -> SegmentHeader | str:
    """Returns the header, or a reason string if it is not a valid header."""
    if len(raw) < SEG_HEADER_SIZE:
        return "segment header truncated"
    if raw[:SEG_HEADER_SIZE] == bytes(SEG_HEADER_SIZE):
        return "segment header all zero"
    (crc,) = struct.unpack_from("<I", raw, 60)
    if crc32c.crc32c(raw[:60], 0) != crc:
        return "segment header checksum mismatch"
    magic, version, hsize, cluster_id, segment_id, created_lsn, _ = _SEG_HEADER.unpack_from(raw, 0)
    if magic != SEG_MAGIC or hsize != SEG_HEADER_SIZE:
        return "bad segment magic"
    return SegmentHeader(cluster_id, segment_id, created_lsn, version)


# --- records ----------------------------------------------------------------------------------


def build_write_record(
    seed: int,
    extent_id: int,
    block: int,
    lsn: int,
    sync_mark: int,
    payload: bytes | bytearray | memoryview,
    crcs: list[int] | tuple[int, ...],
    flags: int = 0,
) -> tuple[bytearray, int | None]:
    """Frame one WRITE record into a fresh buffer (one pwrite later).

    Pair check (TigerBeetle): the CRC of every block is recomputed from the bytes *in the buffer
    about to be written* and compared with the caller's. Returns (buffer, index of first mismatching
    block or None). The framing is one call into `_fast.segwriter` (in place, no concatenation);
    callers holding a larger buffer can frame several records back to back with it directly.
    """
    buf = bytearray(record_length(REC_WRITE, len(crcs)))
    try:
        segwriter.frame_write(buf, 0, seed, extent_id, block, lsn, sync_mark, payload, crcs, flags)
    except segwriter.BlockCrcMismatch as e:
        return buf, e.index
    return buf, None


def build_trim_record(
    seed: int, extent_id: int, block: int, count: int, lsn: int, sync_mark: int, flags: int = 0
) -> bytearray:
    buf = bytearray(REC_HEADER_SIZE)
    segwriter.frame_trim(buf, 0, seed, extent_id, block, count, lsn, sync_mark, flags)
    return buf


@dataclass
class RecordHeader:
    rtype: int
    flags: int
    count: int
    length: int
    block: int
    extent_id: int
    lsn: int
    sync_mark: int
    header_crc: int


def parse_header_fields(raw: bytes | bytearray | memoryview, off: int = 0) -> RecordHeader | str:
    """Unverified structural parse: magic, type, count/length sanity. CRC is not checked here."""
    if len(raw) - off < REC_HEADER_SIZE:
        return "record header truncated"
    hcrc, magic, rtype, flags, _res, count, length, block, extent_id, lsn, mark = _REC_HEADER.unpack_from(
        raw, off
    )
    if magic != REC_MAGIC:
        if bytes(raw[off : off + REC_HEADER_SIZE]) == bytes(REC_HEADER_SIZE):
            return "zero"
        return "bad record magic"
    if rtype in (REC_WRITE, REC_LINK):
        if not 1 <= count <= MAX_WRITE_BLOCKS:
            return f"bad block count {count}"
    elif rtype == REC_TRIM:
        if count < 1:
            return f"bad block count {count}"
    elif rtype in MARK_TYPES:
        if count != 0:
            return "pin record with blocks"
    else:
        return f"unknown record type {rtype}"
    if block + count > MAX_BLOCK:
        return "block range out of bounds"
    if length != record_length(rtype, count):
        return f"record length {length} does not match type/count"
    return RecordHeader(rtype, flags, count, length, block, extent_id, lsn, mark, hcrc)


def header_crc_ok(seed: int, hdr: RecordHeader, header_and_crcs: bytes | bytearray | memoryview) -> bool:
    """`header_and_crcs` starts at the record and holds at least header + crc array."""
    end = REC_HEADER_SIZE + (crc_array_size(hdr.count) if hdr.rtype == REC_WRITE else 0)
    if hdr.rtype == REC_LINK or hdr.rtype in MARK_TYPES:
        end = hdr.length  # a LINK's header CRC covers its CRC array and its target; a PIN's, its body
    return crc32c.crc32c(memoryview(header_and_crcs)[4:end], seed) == hdr.header_crc


def bad_payload_blocks(hdr: RecordHeader, rec: bytes | bytearray | memoryview) -> list[int]:
    """Indexes (within the record) of payload blocks whose CRC does not match the crc array."""
    view = memoryview(rec)
    crcs = struct.unpack_from(f"<{hdr.count}I", view, REC_HEADER_SIZE)
    pay = REC_HEADER_SIZE + crc_array_size(hdr.count)
    bad = []
    for i in range(hdr.count):
        s = pay + i * BLOCK_SIZE
        if crc32c.crc32c(view[s : s + BLOCK_SIZE], 0) != crcs[i]:
            bad.append(i)
    return bad


def payload_offset(count: int) -> int:
    return REC_HEADER_SIZE + crc_array_size(count)


def _checked_length(hdr: RecordHeader) -> int:
    """Bytes of a record its header CRC covers (a WRITE's payload has its own per-block CRCs)."""
    if hdr.rtype == REC_WRITE:
        return payload_offset(hdr.count)
    return hdr.length


def build_link_record(
    seed: int,
    extent_id: int,
    block: int,
    lsn: int,
    sync_mark: int,
    crcs: Sequence[int],
    wal_seq: int,
    wal_offset: int,
    flags: int = 0,
) -> bytearray:
    """Frame one LINK record: header, CRC array, target; the header CRC covers all of it."""
    n = len(crcs)
    length = record_length(REC_LINK, n)
    buf = bytearray(length)
    _REC_HEADER.pack_into(buf, 0, 0, REC_MAGIC, REC_LINK, flags | FLAG_LINK, 0, n, length, block, extent_id,
                          lsn, sync_mark)
    struct.pack_into(f"<{n}I", buf, REC_HEADER_SIZE, *crcs)
    LINK_TARGET.pack_into(buf, length - LINK_TARGET.size, wal_seq, wal_offset)
    struct.pack_into("<I", buf, 0, crc32c.crc32c(memoryview(buf)[4:], seed))
    return buf


def build_mark_record(seed: int, rtype: int, group: int, snap_id: int, lsn: int, sync_mark: int, pinned_lsn: int,
                      flags: int = 0) -> bytearray:
    """Frame one PIN or UNPIN record (segment.md, "Snapshot pins"): the group in the block field."""
    assert rtype in MARK_TYPES
    length = REC_HEADER_SIZE + MARK_BODY.size
    buf = bytearray(length)
    _REC_HEADER.pack_into(buf, 0, 0, REC_MAGIC, rtype, flags, 0, 0, length, group, snap_id, lsn, sync_mark)
    MARK_BODY.pack_into(buf, REC_HEADER_SIZE, pinned_lsn, 0)
    struct.pack_into("<I", buf, 0, crc32c.crc32c(memoryview(buf)[4:], seed))
    return buf


def link_target(body: bytes | bytearray | memoryview, hdr: RecordHeader) -> tuple[int, int]:
    """(wal_seq, wal_offset) of a LINK record whose bytes start at body[0]."""
    seq, off = LINK_TARGET.unpack_from(body, hdr.length - LINK_TARGET.size)
    return seq, off


# --- scanning ---------------------------------------------------------------------------------


@dataclass
class ScannedRecord:
    offset: int
    hdr: RecordHeader
    bad_blocks: list[int]  # payload blocks failing their CRC (header was valid)
    pinned_lsn: int = 0  # PIN/UNPIN records: the body's pinned_lsn


@dataclass
class BadRegion:
    offset: int
    length: int
    reason: str
    hint: RecordHeader | None  # unverified header fields, if they looked sane


@dataclass
class ScanResult:
    records: list[ScannedRecord] = field(default_factory=list)
    bad: list[BadRegion] = field(default_factory=list)
    end: int = SEG_HEADER_SIZE  # offset just past the last valid record (or start)
    file_size: int = 0


class _Reader:
    """Chunked reader over one file, so the scan issues large sequential preads."""

    def __init__(self, f: DiskFile, size: int) -> None:
        self.f = f
        self.size = size
        self.base = 0
        self.buf = b""

    def get(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self.size - off))
        if off >= self.base and off + n <= self.base + len(self.buf):
            return self.buf[off - self.base : off - self.base + n]
        if n > SCAN_CHUNK_BYTES:
            return self.f.pread(n, off)
        self.base = off
        self.buf = self.f.pread(min(SCAN_CHUNK_BYTES, self.size - off), off)
        return self.buf[:n]


def _valid_header_at(r: _Reader, seed: int, off: int) -> RecordHeader | None:
    raw = r.get(off, REC_HEADER_SIZE)
    hdr = parse_header_fields(raw)
    if isinstance(hdr, str):
        return None
    if off + hdr.length > r.size:
        return None
    hc = r.get(off, _checked_length(hdr))
    return hdr if header_crc_ok(seed, hdr, hc) else None


def _resync(r: _Reader, seed: int, start: int) -> int | None:
    """Next 8-aligned offset > start holding a valid record header (magic found with bytes.find)."""
    pos = align8(start + 1)
    while pos + REC_HEADER_SIZE <= r.size:
        chunk_len = min(SCAN_CHUNK_BYTES, r.size - pos)
        chunk = r.f.pread(chunk_len, pos)
        i = chunk.find(REC_MAGIC, 4)
        while i != -1:
            cand = pos + i - 4
            if cand % 8 == 0 and _valid_header_at(r, seed, cand) is not None:
                return cand
            i = chunk.find(REC_MAGIC, i + 1)
        if chunk_len < SCAN_CHUNK_BYTES:
            break
        pos += chunk_len - 8  # overlap so a magic across the boundary is seen
        pos = align8(pos)
    return None


def scan_segment(f: DiskFile, seed: int, start: int, verify_payload: bool = True) -> ScanResult:
    """Walk records from `start` to the end of the file (docs/format/segment.md, "Reading a segment")."""
    size = f.size()
    res = ScanResult(end=start, file_size=size)
    r = _Reader(f, size)
    off = start
    while off < size:
        raw = r.get(off, REC_HEADER_SIZE)
        hdr = parse_header_fields(raw)
        reason: str | None = None
        if isinstance(hdr, str):
            reason = hdr
        elif off + hdr.length > size:
            reason = "record runs past end of file"
        else:
            need = hdr.length if (verify_payload and hdr.rtype == REC_WRITE) else _checked_length(hdr)
            body = r.get(off, need)
            if not header_crc_ok(seed, hdr, body):
                reason = "record header checksum mismatch"
            else:
                bad = bad_payload_blocks(hdr, body) if (verify_payload and hdr.rtype == REC_WRITE) else []
                sr = ScannedRecord(off, hdr, bad)
                if hdr.rtype in MARK_TYPES:
                    sr.pinned_lsn = MARK_BODY.unpack_from(body, REC_HEADER_SIZE)[0]
                res.records.append(sr)
                off += hdr.length
                res.end = off
                continue
        # bad record at `off`: resync
        nxt = _resync(r, seed, off)
        if reason == "zero" and nxt is None:
            break  # clean end: preallocated zeros
        hint = None
        if not isinstance(hdr, str):
            hint = hdr
        else:
            # A header with a flipped byte may still name its blocks; keep the guess if it fits.
            loose = _loose_header(raw)
            if loose is not None:
                hint = loose
        stop = nxt if nxt is not None else size
        if hint is not None and hint.length > stop - off:
            hint = None
        res.bad.append(BadRegion(off, stop - off, "zeroed region" if reason == "zero" else reason, hint))
        if nxt is None:
            break
        off = nxt
    return res


def _loose_header(raw: bytes) -> RecordHeader | None:
    """Fields of a header that failed structural checks, if magic/type/count still look sane."""
    if len(raw) < REC_HEADER_SIZE:
        return None
    hcrc, magic, rtype, flags, _res, count, length, block, extent_id, lsn, mark = _REC_HEADER.unpack_from(raw)
    if magic != REC_MAGIC or rtype not in (REC_WRITE, REC_TRIM, REC_LINK) or count < 1:
        return None
    if rtype != REC_TRIM and count > MAX_WRITE_BLOCKS:
        return None
    if block + count > MAX_BLOCK:
        return None
    return RecordHeader(rtype, flags, count, record_length(rtype, count), block, extent_id, lsn, mark, hcrc)


def read_record(
    f: DiskFile, seed: int, offset: int, verify_payload: bool = True
) -> tuple[RecordHeader, bytes, list[int]] | str:
    """Read and check one record at a known offset (cleaning, verify-on-open).

    Returns (header, raw record bytes, bad payload block indexes) or a reason string.
    """
    raw = f.pread(REC_HEADER_SIZE, offset)
    hdr = parse_header_fields(raw)
    if isinstance(hdr, str):
        return "record header: " + ("all zero" if hdr == "zero" else hdr)
    body = f.pread(hdr.length, offset)
    if len(body) < hdr.length:
        return "record runs past end of file"
    if not header_crc_ok(seed, hdr, body):
        return "record header checksum mismatch"
    bad = bad_payload_blocks(hdr, body) if (verify_payload and hdr.rtype == REC_WRITE) else []
    return hdr, body, bad
