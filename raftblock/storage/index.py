# The in-memory index: (extent_id, block) -> the record holding the block's current version, plus
# bad-block marks, per-segment bookkeeping (live blocks, min write LSN per extent, tombstones) and the
# pinned-version history. Also the checkpoint codec (docs/format/segment.md, "Checkpoint file").
#
# Rule 1: an index value is a Rec (one object per on-disk record, shared by all its blocks); the
#         block's place inside the record is `block - rec.block`. No per-block objects.
# Rule 2: every change of a block's version goes through Index.set_blocks / Index.trim_blocks, which
#         keep the live counters of segments and records exact (cleaning trusts them).
# Rule 3: this module does no I/O; the engine reads and writes files.
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c

from raftblock.storage.segment import (
    BLOCK_SIZE,
    FORMAT_VERSION,
    FORMAT_VERSIONS_READ,
    MAX_WRITE_BLOCKS,
    REC_LINK,
    REC_TRIM,
    REC_WRITE,
    record_length,
)


class CorruptBlockError(Exception):
    """A block failed its CRC (or is marked bad): the caller must answer EIO, never return data."""

    def __init__(self, extent_id: int, block: int, reason: str) -> None:
        super().__init__(f"corrupt block extent={extent_id} block={block}: {reason}")
        self.extent_id = extent_id
        self.block = block
        self.reason = reason


class Rec:
    """One record on disk (WRITE, LINK or TRIM) that the engine still cares about. A LINK's payload is in a
    WAL segment: `tgt` = (wal_seq, wal_offset of its first payload byte); None for the others."""

    __slots__ = ("seg", "off", "rtype", "flags", "extent_id", "block", "count", "lsn", "live", "hist", "tgt")

    def __init__(
        self, seg: int, off: int, rtype: int, flags: int, extent_id: int, block: int, count: int, lsn: int
    ) -> None:
        self.seg = seg
        self.off = off
        self.rtype = rtype
        self.flags = flags
        self.extent_id = extent_id
        self.block = block
        self.count = count
        self.lsn = lsn
        self.live = 0  # blocks whose current version is this record
        self.hist = 0  # pinned old versions held in this record
        self.tgt: tuple[int, int] | None = None


GLOBAL = -1  # Index.pins key of a pin on every extent (Engine.pin)


class Mark:
    """A PIN or UNPIN record on disk (segment.md, "Snapshot pins"): cleaning keeps it while it matters."""

    __slots__ = ("seg", "off", "rtype", "group", "snap_id", "lsn", "pinned_lsn")

    def __init__(self, seg: int, off: int, rtype: int, group: int, snap_id: int, lsn: int, pinned_lsn: int) -> None:
        self.seg = seg
        self.off = off
        self.rtype = rtype
        self.group = group
        self.snap_id = snap_id
        self.lsn = lsn
        self.pinned_lsn = pinned_lsn


@dataclass
class SegState:
    """Bookkeeping for one segment file."""

    seg_id: int
    end: int  # append position / end of valid data
    live_blocks: int = 0
    records: dict[int, Rec] = field(default_factory=dict)  # offset -> live/history WRITE records
    tombstones: dict[int, Rec] = field(default_factory=dict)  # offset -> TRIM records kept
    min_write_lsn: dict[int, int] = field(default_factory=dict)  # extent -> min non-HISTORY WRITE lsn
    has_bad: bool = False
    # LINK records: their blocks count in live_blocks (and link_blocks), but what they occupy here is
    # link_bytes (their records' lengths), not 4 KiB a block: cleaning judges a segment by live bytes.
    link_blocks: int = 0
    link_bytes: int = 0
    marks: dict[int, Mark] = field(default_factory=dict)  # offset -> PIN/UNPIN records kept
    # Old versions kept for snapshot pins (not LINKs: theirs is link_bytes): they occupy the segment as much
    # as live blocks, so cleaning must not take a segment of them for garbage (it would copy them forever).
    hist_blocks: int = 0

    def add_rec(self, rec: Rec) -> None:
        if rec.rtype == REC_LINK and rec.off not in self.records:
            self.link_bytes += record_length(REC_LINK, rec.count)
        self.records[rec.off] = rec

    def pop_rec(self, rec: Rec) -> None:
        if self.records.pop(rec.off, None) is not None and rec.rtype == REC_LINK:
            self.link_bytes -= record_length(REC_LINK, rec.count)

    def live_bytes(self) -> int:
        """Bytes of this segment that live or pinned records occupy."""
        return (self.live_blocks - self.link_blocks + self.hist_blocks) * BLOCK_SIZE + self.link_bytes

    def note_write(self, extent_id: int, lsn: int) -> None:
        cur = self.min_write_lsn.get(extent_id)
        if cur is None or lsn < cur:
            self.min_write_lsn[extent_id] = lsn


class Index:
    def __init__(self) -> None:
        self.extents: dict[int, dict[int, Rec]] = {}
        self.bad: dict[int, set[int]] = {}  # extent -> bad blocks
        self.segs: dict[int, SegState] = {}
        # Pins are per extent group (a snapshot keeps its own groups' old versions, not every volume's on
        # the node): group -> {lsn: refcount}; group GLOBAL pins every extent (Engine.pin).
        self.pins: dict[int, dict[int, int]] = {}
        self.snaps: dict[tuple[int, int], int] = {}  # (group, snap_id) -> pinned lsn (PIN records)
        # (extent, block) -> [(rec, superseded_at_lsn)] old versions kept for pins
        self.history: dict[tuple[int, int], list[tuple[Rec, int]]] = {}
        self.blocks_allocated = 0
        self.hist_blocks = 0  # block versions kept for pins (Index.history entries)

    # --- version changes -------------------------------------------------------------------

    def _drop_ref(self, old: Rec, extent_id: int, blk: int, new_lsn: int) -> None:
        old.live -= 1
        seg = self.segs.get(old.seg)
        if seg is not None:
            seg.live_blocks -= 1
            if old.rtype == REC_LINK:
                seg.link_blocks -= 1
        if self.pins and self._pinned_between(old.lsn, new_lsn, extent_id >> 32):
            self.history.setdefault((extent_id, blk), []).append((old, new_lsn))
            self.hist_ref(old, 1)
        if old.live == 0 and old.hist == 0 and seg is not None:
            seg.pop_rec(old)

    def _pinned_between(self, lo: int, hi: int, group: int) -> bool:
        """A pin of `group` (or a global one) at an LSN in [lo, hi)."""
        for g in (group, GLOBAL):
            ps = self.pins.get(g)
            if ps and any(lo <= p < hi for p in ps):
                return True
        return False

    def set_blocks(self, rec: Rec, start: int, count: int) -> None:
        """Make `rec` the current version of blocks [start, start+count) of rec.extent_id."""
        emap = self.extents.get(rec.extent_id)
        if emap is None:
            emap = self.extents[rec.extent_id] = {}
        seg = self.segs[rec.seg]
        bad = self.bad.get(rec.extent_id)
        added = 0
        for blk in range(start, start + count):
            old = emap.get(blk)
            if old is not None:
                self._drop_ref(old, rec.extent_id, blk, rec.lsn)
            else:
                added += 1
            emap[blk] = rec
        if bad:
            bad.difference_update(range(start, start + count))
        rec.live += count
        seg.live_blocks += count
        if rec.rtype == REC_LINK:
            seg.link_blocks += count
        seg.add_rec(rec)
        self.blocks_allocated += added

    def trim_blocks(self, extent_id: int, start: int, count: int, lsn: int) -> int:
        """Make blocks holes; returns how many were allocated.

        Only versions older than `lsn` are removed: during replay a cleaning copy of an old trim
        may meet a newer version loaded from the checkpoint, which must win.
        """
        emap = self.extents.get(extent_id)
        removed = 0
        if emap:
            if count > 4 * len(emap):
                keys = [b for b in emap if start <= b < start + count and emap[b].lsn < lsn]
            else:
                keys = [b for b in range(start, start + count) if b in emap and emap[b].lsn < lsn]
            for blk in keys:
                old = emap.pop(blk)
                self._drop_ref(old, extent_id, blk, lsn)
                removed += 1
            if not emap:
                del self.extents[extent_id]
        bad = self.bad.get(extent_id)
        if bad:
            if count > 4 * len(bad):
                bad.difference_update([b for b in bad if start <= b < start + count])
            else:
                bad.difference_update(range(start, start + count))
            if not bad:
                del self.bad[extent_id]
        self.blocks_allocated -= removed
        return removed

    def replace_location(self, old: Rec, new: Rec, start: int, count: int) -> None:
        """Cleaning moved blocks [start, start+count) of `old` (current versions) to `new`."""
        emap = self.extents[old.extent_id]
        oseg = self.segs.get(old.seg)
        nseg = self.segs[new.seg]
        for blk in range(start, start + count):
            assert emap.get(blk) is old
            emap[blk] = new
        old.live -= count
        new.live += count
        if oseg is not None:
            oseg.live_blocks -= count
            if old.rtype == REC_LINK:
                oseg.link_blocks -= count
            if old.live == 0 and old.hist == 0:
                oseg.pop_rec(old)
        nseg.live_blocks += count
        if new.rtype == REC_LINK:
            nseg.link_blocks += count
        nseg.add_rec(new)

    def mark_bad(self, extent_id: int, start: int, count: int) -> None:
        self.bad.setdefault(extent_id, set()).update(range(start, start + count))
        emap = self.extents.get(extent_id)
        if emap:
            for blk in range(start, start + count):
                rec = emap.get(blk)
                if rec is not None:
                    seg = self.segs.get(rec.seg)
                    if seg is not None:
                        seg.has_bad = True

    def is_bad(self, extent_id: int, blk: int) -> bool:
        bad = self.bad.get(extent_id)
        return bool(bad) and blk in bad  # type: ignore[operator]

    # --- pins ------------------------------------------------------------------------------

    def pin(self, lsn: int, group: int = GLOBAL) -> None:
        ps = self.pins.setdefault(group, {})
        ps[lsn] = ps.get(lsn, 0) + 1

    def unpin(self, lsn: int, group: int = GLOBAL) -> None:
        ps = self.pins.get(group, {})
        n = ps.get(lsn, 0)
        if n <= 0:
            raise ValueError(f"lsn {lsn} is not pinned")
        if n == 1:
            del ps[lsn]
            if not ps:
                del self.pins[group]
        else:
            ps[lsn] = n - 1
        self.prune_history(None if group == GLOBAL else group)

    def prune_history(self, group: int | None = None) -> None:
        """Drop the kept old versions (of `group`'s extents, or all) that no pin needs any more."""
        for key in list(self.history):
            if group is not None and key[0] >> 32 != group:
                continue
            kept = []
            for rec, until in self.history[key]:
                if self._pinned_between(rec.lsn, until, key[0] >> 32):
                    kept.append((rec, until))
                else:
                    self.hist_ref(rec, -1)
                    if rec.live == 0 and rec.hist == 0:
                        seg = self.segs.get(rec.seg)
                        if seg is not None:
                            seg.pop_rec(rec)
            if kept:
                self.history[key] = kept
            else:
                del self.history[key]

    def hist_ref(self, rec: Rec, delta: int) -> None:
        """One more (or fewer) block of `rec` kept as an old version for a pin."""
        rec.hist += delta
        self.hist_blocks += delta
        if rec.rtype != REC_LINK:
            seg = self.segs.get(rec.seg)
            if seg is not None:
                seg.hist_blocks += delta

    def version_at(self, extent_id: int, blk: int, lsn: int) -> Rec | None:
        """The newest version of a block with LSN <= lsn that is still kept (None: hole)."""
        cur = self.extents.get(extent_id, {}).get(blk)
        if cur is not None and cur.lsn <= lsn:
            return cur
        for rec, until in reversed(self.history.get((extent_id, blk), [])):
            if rec.lsn <= lsn < until:
                return rec
        return None

    def relocate_history(self, extent_id: int, blk: int, old: Rec, new: Rec) -> None:
        for i, (rec, until) in enumerate(self.history.get((extent_id, blk), [])):
            if rec is old:
                self.history[(extent_id, blk)][i] = (new, until)
                self.hist_ref(old, -1)
                self.hist_ref(new, 1)
                nseg = self.segs[new.seg]
                nseg.add_rec(new)
                if old.live == 0 and old.hist == 0:
                    oseg = self.segs.get(old.seg)
                    if oseg is not None:
                        oseg.pop_rec(old)
                return

    def is_history_of(self, extent_id: int, blk: int, rec: Rec) -> bool:
        return any(r is rec for r, _ in self.history.get((extent_id, blk), []))

    def hist_runs(self) -> list[tuple[int, int, int, Rec, int]]:
        """(extent_id, block, run_blocks, rec, until_lsn) for every maximal run of blocks sharing one kept
        old version (the checkpoint's HIST section)."""
        out: list[tuple[int, int, int, Rec, int]] = []
        by_ext: dict[int, list[int]] = {}
        for eid, blk in self.history:
            by_ext.setdefault(eid, []).append(blk)
        for eid in sorted(by_ext):
            open_runs: dict[tuple[int, int], tuple[int, int]] = {}  # (id(rec), until) -> (start, prev)
            recs: dict[tuple[int, int], Rec] = {}
            for blk in sorted(by_ext[eid]):
                for rec, until in self.history[(eid, blk)]:
                    key = (id(rec), until)
                    recs[key] = rec
                    run = open_runs.get(key)
                    if run is not None and run[1] == blk - 1:
                        open_runs[key] = (run[0], blk)
                        continue
                    if run is not None:
                        out.append((eid, run[0], run[1] - run[0] + 1, rec, until))
                    open_runs[key] = (blk, blk)
            for key, (start, prev) in open_runs.items():
                out.append((eid, start, prev - start + 1, recs[key], key[1]))
        return out

    # --- runs ------------------------------------------------------------------------------

    def runs(self) -> list[tuple[int, int, int, Rec]]:
        """(extent_id, block, run_blocks, rec) for every maximal run of blocks sharing a record."""
        out: list[tuple[int, int, int, Rec]] = []
        for eid in sorted(self.extents):
            emap = self.extents[eid]
            run_start = -1
            run_rec: Rec | None = None
            prev = -2
            for blk in sorted(emap):
                rec = emap[blk]
                if rec is run_rec and blk == prev + 1:
                    prev = blk
                    continue
                if run_rec is not None:
                    out.append((eid, run_start, prev - run_start + 1, run_rec))
                run_start, run_rec, prev = blk, rec, blk
            if run_rec is not None:
                out.append((eid, run_start, prev - run_start + 1, run_rec))
        return out

    def bad_runs(self) -> list[tuple[int, int, int]]:
        out = []
        for eid in sorted(self.bad):
            start = prev = -2
            for blk in sorted(self.bad[eid]):
                if blk == prev + 1:
                    prev = blk
                    continue
                if start >= 0:
                    out.append((eid, start, prev - start + 1))
                start = prev = blk
            if start >= 0:
                out.append((eid, start, prev - start + 1))
        return out

    def live_bytes(self) -> int:
        """Current blocks and the old versions pins keep."""
        return (self.blocks_allocated + self.hist_blocks) * BLOCK_SIZE


# --- checkpoint codec ----------------------------------------------------------------------------

CKPT_MAGIC = b"RBCHKPT1"
CKPT_HEADER_SIZE = 80
_CKPT_HEADER = struct.Struct("<8sII16sQQIIQQQ")
assert _CKPT_HEADER.size == CKPT_HEADER_SIZE
_SECTION = struct.Struct("<II")
_RUN = struct.Struct("<QIIQIIIQI")
_TOMB = struct.Struct("<QIIIIQQ")
_SEGMIN = struct.Struct("<QQQ")
_BAD = struct.Struct("<QII")
_PIN = struct.Struct("<QQQ")
_HIST = struct.Struct("<QIIQIIIQQI")
_MARK = struct.Struct("<QIIQQQQ")
TAG_RUN, TAG_TOMB, TAG_SEGMIN, TAG_BAD, TAG_PIN, TAG_HIST, TAG_MARK = 1, 2, 3, 4, 5, 6, 7
# Sections whose entries are their struct's fields as they are: tag -> (struct, Checkpoint attribute).
_PLAIN_SECTIONS = {TAG_RUN: (_RUN, "runs"), TAG_SEGMIN: (_SEGMIN, "segmin"), TAG_BAD: (_BAD, "bad"),
                   TAG_PIN: (_PIN, "pins"), TAG_HIST: (_HIST, "hist"), TAG_MARK: (_MARK, "marks")}


@dataclass
class Checkpoint:
    cluster_id: bytes
    checkpoint_lsn: int
    replay_segment: int
    replay_offset: int
    next_segment_id: int
    runs: list[tuple[int, int, int, int, int, int, int, int, int]]  # extent, block, n, seg, off, rb, rc, lsn, fl
    tombs: list[tuple[int, int, int, int, int, int]]  # seg, off, block, count, extent, lsn
    segmin: list[tuple[int, int, int]]  # seg, extent, min_lsn
    bad: list[tuple[int, int, int]]  # extent, block, count
    pins: list[tuple[int, int, int]] = field(default_factory=list)  # group, snap_id, pinned_lsn
    # extent, block, n, seg, off, record_block, record_count, lsn, until_lsn, flags: old versions kept for pins
    hist: list[tuple[int, int, int, int, int, int, int, int, int, int]] = field(default_factory=list)
    # seg, off, type, group, snap_id, lsn, pinned_lsn
    marks: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)


def encode_checkpoint(ck: Checkpoint) -> bytes:
    parts: list[bytes] = []
    parts.append(_SECTION.pack(TAG_RUN, len(ck.runs)))
    parts.extend(_RUN.pack(*r) for r in ck.runs)
    parts.append(_SECTION.pack(TAG_TOMB, len(ck.tombs)))
    parts.extend(_TOMB.pack(seg, off, blk, cnt, 0, eid, lsn) for seg, off, blk, cnt, eid, lsn in ck.tombs)
    parts.append(_SECTION.pack(TAG_SEGMIN, len(ck.segmin)))
    parts.extend(_SEGMIN.pack(*s) for s in ck.segmin)
    parts.append(_SECTION.pack(TAG_BAD, len(ck.bad)))
    parts.extend(_BAD.pack(*b) for b in ck.bad)
    if ck.pins or ck.hist or ck.marks:  # format version 3; a checkpoint without them reads as version 2
        parts.append(_SECTION.pack(TAG_PIN, len(ck.pins)))
        parts.extend(_PIN.pack(*p) for p in ck.pins)
        parts.append(_SECTION.pack(TAG_HIST, len(ck.hist)))
        parts.extend(_HIST.pack(*h) for h in ck.hist)
        parts.append(_SECTION.pack(TAG_MARK, len(ck.marks)))
        parts.extend(_MARK.pack(*m) for m in ck.marks)
    body = b"".join(parts)
    header = _CKPT_HEADER.pack(
        CKPT_MAGIC,
        FORMAT_VERSION,
        CKPT_HEADER_SIZE,
        ck.cluster_id,
        ck.checkpoint_lsn,
        ck.replay_segment,
        ck.replay_offset,
        0,
        ck.next_segment_id,
        len(body),
        0,
    )
    crc = crc32c.crc32c(body, crc32c.crc32c(header, 0))
    return header + body + struct.pack("<I", crc)


def decode_checkpoint(raw: bytes) -> Checkpoint | str:
    """The checkpoint, or the reason it is invalid (docs/format/segment.md reader's cases)."""
    if len(raw) < CKPT_HEADER_SIZE + 4:
        return "checkpoint truncated"
    (magic, version, hsize, cluster_id, lsn, rseg, roff, _r, next_seg, body_len, _r2) = _CKPT_HEADER.unpack_from(
        raw, 0
    )
    if magic != CKPT_MAGIC or hsize != CKPT_HEADER_SIZE:
        return "bad checkpoint magic"
    if len(raw) != CKPT_HEADER_SIZE + body_len + 4:
        return "checkpoint length mismatch"
    (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
    if crc32c.crc32c(memoryview(raw)[: len(raw) - 4], 0) != crc:
        return "checkpoint checksum mismatch"
    if version not in FORMAT_VERSIONS_READ:
        return f"unknown checkpoint format version {version}"
    ck = Checkpoint(cluster_id, lsn, rseg, roff, next_seg, [], [], [], [])
    pos = CKPT_HEADER_SIZE
    end = len(raw) - 4
    try:
        while pos < end:
            tag, n = _SECTION.unpack_from(raw, pos)
            pos += _SECTION.size
            if tag == TAG_TOMB:
                ck.tombs = []
                for i in range(n):
                    seg, off, blk, cnt, _z, eid, tl = _TOMB.unpack_from(raw, pos + i * _TOMB.size)
                    ck.tombs.append((seg, off, blk, cnt, eid, tl))
                pos += n * _TOMB.size
            elif tag in _PLAIN_SECTIONS:
                fmt, attr = _PLAIN_SECTIONS[tag]
                setattr(ck, attr, [fmt.unpack_from(raw, pos + i * fmt.size) for i in range(n)])
                pos += n * fmt.size
            else:
                return f"unknown checkpoint section {tag}"
    except struct.error:
        return "checkpoint section overruns body"
    if pos != end:
        return "checkpoint section overruns body"
    # A run (current or kept for a pin) lies inside its record, a WRITE or LINK of at most MAX_WRITE_BLOCKS
    # blocks: recovery loops over a run's blocks, so a count no record can have is refused here.
    for r in ck.runs:
        if not _run_in_record(r[1], r[2], r[5], r[6]):
            return "checkpoint run outside its record"
    for h in ck.hist:
        if not _run_in_record(h[1], h[2], h[5], h[6]):
            return "checkpoint history run outside its record"
    return ck


def _run_in_record(block: int, n: int, rec_block: int, rec_count: int) -> bool:
    return 1 <= rec_count <= MAX_WRITE_BLOCKS and n >= 1 and rec_block <= block and block + n <= rec_block + rec_count


__all__ = [
    "REC_TRIM",
    "REC_WRITE",
    "Checkpoint",
    "CorruptBlockError",
    "Index",
    "Rec",
    "SegState",
    "decode_checkpoint",
    "encode_checkpoint",
]
