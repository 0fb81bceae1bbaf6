# Segment cleaning: copy the live records of the emptiest sealed segments to the active segment, then
# delete the segment, so overwritten and trimmed blocks give their space back. ("Cleaning" is the engine's
# own space; "compaction" is a replica's log cut behind the engine, node/compactor.py.)
#
# The cleaner sees the engine only through `SegmentStore` (its public cleaning seam), and keeps its own
# cursor; it never reads the engine's private state.
#
# Rules (docs/format/segment.md, "Cleaning"):
# Rule 1: a copy keeps the original LSN; a pinned old version is copied with flag HISTORY.
# Rule 2: at most ~budget_bytes are rewritten per call (always at least one record, so it progresses);
#         a cursor remembers a half-cleaned segment across calls.
# Rule 3 (tombstones): a TRIM record (lsn T, extent E) is dropped only if the durable checkpoint
#         covers it (T <= checkpoint_lsn: the checkpoint's index no longer names older versions) AND
#         no other segment holds a non-HISTORY WRITE of E with LSN < T (so a full scan after losing the
#         checkpoint finds nothing older either); otherwise it is copied. So no older write can
#         reappear, after a restart from a checkpoint or from a full scan.
# Rule 4: the segment file is removed only after sync() has made the copies durable.
# Rule 5: a segment holding a live block that is bad (or turns out bad while copying) is not cleaned.
# Rule 6 (write-once, docs/format/write-once.md): a LINK record is copied as a LINK (its payload stays in
#         the WAL segment it names); `evacuate` copies linked blocks out of a WAL segment as WRITE records.
# Rule 7 (snapshot pins, segment.md "Snapshot pins"): PIN and UNPIN records are copied while they matter
#         (`_copy_marks`); a HISTORY copy notes its extent's write LSN like any copy (the tombstone rule).
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from raftblock.storage.index import Index, Mark, Rec, SegState
from raftblock.storage.segment import (
    BLOCK_SIZE,
    FLAG_HISTORY,
    FLAG_LINK,
    FLAG_RELOCATED,
    REC_HEADER_SIZE,
    REC_LINK,
    REC_PIN,
    REC_TRIM,
    REC_WRITE,
    SEG_HEADER_SIZE,
    RecordHeader,
    build_link_record,
    build_mark_record,
    build_trim_record,
    build_write_record,
    payload_offset,
    record_length,
    segment_name,
)

log = structlog.get_logger(__name__)


class CleanSettings(Protocol):
    cleaning_garbage_ratio: float
    segment_size_bytes: int


class SegmentStore(Protocol):
    """What the cleaner needs of the engine (storage/engine.py Engine implements it)."""

    index: Index
    checkpoint_lsn: int

    @property
    def config(self) -> CleanSettings: ...

    def active_segment_id(self) -> int | None: ...

    def cleanable(self, sid: int) -> bool: ...

    def read_stored(self, rec: Rec, payload: bool = True) -> tuple[RecordHeader, bytes, list[int]] | str: ...

    def note_link(self, rec: Rec) -> None: ...

    def append_built(self, length: int, build: Callable[[int, int], bytearray | bytes]) -> tuple[SegState, int, int]: ...

    def sync(self) -> int: ...

    def remove_segment(self, sid: int) -> None: ...


@dataclass
class CleanCursor:
    seg_id: int
    offsets: list[int]
    pos: int = 0


class _SkipSegment(Exception):
    pass


def _live_fraction(seg: SegState) -> float:
    used = seg.end - SEG_HEADER_SIZE
    if used <= 0:
        return 0.0
    return min(1.0, seg.live_bytes() / used)


def _has_bad_live(eng: SegmentStore, seg: SegState) -> bool:
    idx = eng.index
    for rec in seg.records.values():
        bad = idx.bad.get(rec.extent_id)
        if bad and any(b in bad for b in range(rec.block, rec.block + rec.count)):
            return True
    return False


def pick_victim(eng: SegmentStore) -> SegState | None:
    active = eng.active_segment_id()
    best: SegState | None = None
    best_frac = 2.0
    limit = 1.0 - eng.config.cleaning_garbage_ratio
    # Segments sealed early (each open starts a new segment) are merged even when mostly live, so
    # restarts do not leave an ever-growing number of small files.
    small = eng.config.segment_size_bytes // 8
    for sid, seg in eng.index.segs.items():
        if sid == active or not eng.cleanable(sid):
            continue
        if seg.has_bad:
            if _has_bad_live(eng, seg):
                continue
            seg.has_bad = False
        frac = _live_fraction(seg)
        if (frac <= limit or seg.end < small) and frac < best_frac:
            best, best_frac = seg, frac
    return best


def _copy_write(eng: SegmentStore, rec: Rec, as_link: bool = False) -> int:
    """Copy the live and pinned blocks of one WRITE or LINK record (a LINK as a LINK when `as_link`, else
    as a WRITE with its payload read from the WAL); returns bytes written."""
    idx = eng.index
    got = eng.read_stored(rec, payload=not as_link)
    emap = idx.extents.get(rec.extent_id, {})
    blocks = range(rec.block, rec.block + rec.count)
    current = [b for b in blocks if emap.get(b) is rec]
    pinned = [b for b in blocks if idx.is_history_of(rec.extent_id, b, rec)]
    if isinstance(got, str):
        for b in current:
            idx.mark_bad(rec.extent_id, b, 1)
        log.error("engine.corruption", segment=segment_name(rec.seg), offset=rec.off, extent_id=rec.extent_id,
                  block_start=rec.block, block_count=rec.count, reason=got + " (found by cleaning)")
        raise _SkipSegment
    hdr, body, bad = got
    if bad:
        badset = {rec.block + i for i in bad}
        hit = [b for b in current if b in badset]
        for b in hit:
            idx.mark_bad(rec.extent_id, b, 1)
        if hit or any(b in badset for b in pinned):
            log.error("engine.corruption", segment=segment_name(rec.seg), offset=rec.off,
                      extent_id=rec.extent_id, block_start=rec.block + bad[0], block_count=len(bad),
                      reason="payload block checksum mismatch (found by cleaning)")
            raise _SkipSegment
    bad_marks = idx.bad.get(rec.extent_id)
    if bad_marks and any(b in bad_marks for b in current):
        raise _SkipSegment
    pay = payload_offset(hdr.count)
    crc_all = struct.unpack_from(f"<{hdr.count}I", body, REC_HEADER_SIZE)
    written = 0
    for group, flags in ((current, FLAG_RELOCATED), (pinned, FLAG_RELOCATED | FLAG_HISTORY)):
        for start, n in _runs(group):
            i0 = start - rec.block
            crcs = list(crc_all[i0 : i0 + n])
            if as_link:
                assert rec.tgt is not None
                tgt = (rec.tgt[0], rec.tgt[1] + i0 * BLOCK_SIZE)

                def build(seed: int, mark: int, start: int = start, crcs: list[int] = crcs, flags: int = flags,
                          tgt: tuple[int, int] = tgt) -> bytearray | bytes:
                    return build_link_record(seed, rec.extent_id, start, rec.lsn, mark, crcs, tgt[0], tgt[1], flags)

                seg, off, size = eng.append_built(record_length(REC_LINK, n), build)
                new = Rec(seg.seg_id, off, REC_LINK, flags | FLAG_LINK, rec.extent_id, start, n, rec.lsn)
                new.tgt = tgt
                eng.note_link(new)
            else:
                payload = memoryview(body)[pay + i0 * BLOCK_SIZE : pay + (i0 + n) * BLOCK_SIZE]

                def build(seed: int, mark: int, start: int = start, payload: memoryview = payload,  # type: ignore[misc]
                          crcs: list[int] = crcs, flags: int = flags) -> bytearray | bytes:
                    buf, badi = build_write_record(seed, rec.extent_id, start, rec.lsn, mark, payload, crcs, flags)
                    assert badi is None, "cleaning copy failed its pair check"
                    return buf

                seg, off, size = eng.append_built(record_length(REC_WRITE, n), build)
                new = Rec(seg.seg_id, off, REC_WRITE, flags, rec.extent_id, start, n, rec.lsn)
            # A HISTORY copy counts for the tombstone rule too: a full scan replays it while pins exist.
            seg.note_write(rec.extent_id, rec.lsn)
            if flags & FLAG_HISTORY:
                for b in range(start, start + n):
                    idx.relocate_history(rec.extent_id, b, rec, new)
            else:
                idx.replace_location(rec, new, start, n)
            written += size
    return written


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def _tombstone_droppable(eng: SegmentStore, t: Rec, victim: int) -> bool:
    if t.lsn > eng.checkpoint_lsn:
        return False  # the durable checkpoint may still name older versions of these blocks
    for sid, seg in eng.index.segs.items():
        if sid == victim:
            continue
        m = seg.min_write_lsn.get(t.extent_id)
        if m is not None and m < t.lsn:
            return False
    return True


def _copy_marks(eng: SegmentStore, victim: SegState) -> int:
    """Rule 7: a PIN record is copied while its pin exists; an UNPIN record while the durable checkpoint
    predates it or a PIN record of the same snapshot is still on disk (else a restart would find the pin and
    not its end)."""
    idx = eng.index
    written = 0
    order = sorted(victim.marks.values(), key=lambda m: (m.rtype != REC_PIN, m.lsn))
    victim.marks = {}
    for m in order:
        if m.rtype == REC_PIN:
            keep = idx.snaps.get((m.group, m.snap_id)) == m.pinned_lsn
        else:
            # The durable checkpoint may predate it (and list the pin), or a full scan would find the PIN.
            keep = m.lsn > eng.checkpoint_lsn or any(
                o.rtype == REC_PIN and (o.group, o.snap_id) == (m.group, m.snap_id)
                for sid, s in idx.segs.items() if sid != victim.seg_id for o in s.marks.values())
        if not keep:
            continue

        def build(seed: int, mark: int, m: Mark = m) -> bytearray | bytes:
            return build_mark_record(seed, m.rtype, m.group, m.snap_id, m.lsn, mark, m.pinned_lsn, FLAG_RELOCATED)

        seg, noff, size = eng.append_built(record_length(m.rtype, 0), build)
        seg.marks[noff] = Mark(seg.seg_id, noff, m.rtype, m.group, m.snap_id, m.lsn, m.pinned_lsn)
        written += size
    return written


def _finish(eng: SegmentStore, victim: SegState) -> int:
    written = 0
    for off in sorted(victim.tombstones):
        t = victim.tombstones[off]
        if _tombstone_droppable(eng, t, victim.seg_id):
            continue
        def build(seed: int, mark: int, t: Rec = t) -> bytearray | bytes:
            return build_trim_record(seed, t.extent_id, t.block, t.count, t.lsn, mark, FLAG_RELOCATED)

        seg, noff, size = eng.append_built(REC_HEADER_SIZE, build)
        seg.tombstones[noff] = Rec(seg.seg_id, noff, REC_TRIM, FLAG_RELOCATED, t.extent_id, t.block,
                                   t.count, t.lsn)
        written += size
    victim.tombstones.clear()  # copied or dropped; a retry after an error re-decides nothing twice
    written += _copy_marks(eng, victim)
    eng.sync()
    assert victim.live_blocks == 0 and not victim.records, "cleaned segment still referenced"
    eng.remove_segment(victim.seg_id)
    log.info("engine.segment_cleaned", segment=segment_name(victim.seg_id))
    return written


class Cleaner:
    """Rule 2: cleans at most about `budget_bytes` per call, its cursor kept across calls."""

    def __init__(self, store: SegmentStore) -> None:
        self.store = store
        self.cursor: CleanCursor | None = None

    def clean(self, budget_bytes: int) -> int:
        eng = self.store
        written = 0
        while written < budget_bytes:
            cur = self.cursor
            if cur is None:
                victim = pick_victim(eng)
                if victim is None:
                    break
                cur = self.cursor = CleanCursor(victim.seg_id, sorted(victim.records))
            seg = eng.index.segs.get(cur.seg_id)
            if seg is None:
                self.cursor = None
                continue
            try:
                while cur.pos < len(cur.offsets):
                    rec = seg.records.get(cur.offsets[cur.pos])
                    if rec is None:
                        cur.pos += 1
                        continue
                    cost = (record_length(REC_LINK, rec.count) if rec.rtype == REC_LINK
                            else (rec.live + rec.hist) * BLOCK_SIZE)
                    if written and written + cost > budget_bytes:
                        return written
                    written += _copy_write(eng, rec, as_link=rec.rtype == REC_LINK)
                    cur.pos += 1
            except _SkipSegment:
                seg.has_bad = True
                self.cursor = None
                continue
            if seg.records:
                # Every record was visited, yet some are still referenced: the live counters disagree
                # with the index. Never delete such a segment.
                log.error("engine.cleaning_stuck", segment=segment_name(seg.seg_id), records=len(seg.records))
                seg.has_bad = True
                self.cursor = None
                continue
            written += _finish(eng, seg)
            self.cursor = None
        return written


def evacuate(eng: SegmentStore, recs: list[Rec], budget_bytes: int) -> int:
    """Copy the live and pinned blocks of LINK records `recs` (all pointing into one WAL segment) into
    the engine as WRITE records (rule 6), at most ~budget_bytes (at least one record). A record that
    fails its checks is left where it is (its blocks are marked bad; the WAL segment stays held until
    they are repaired or overwritten). Returns bytes written; the caller syncs before the WAL may
    release the segment (engine.wal_refs)."""
    written = 0
    for rec in recs:
        if rec.live == 0 and rec.hist == 0:
            continue
        cost = (rec.live + rec.hist) * BLOCK_SIZE
        if written and written + cost > budget_bytes:
            break
        try:
            written += _copy_write(eng, rec)
        except _SkipSegment:
            continue
    return written
