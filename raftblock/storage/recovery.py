# Recovery: rebuild the index from the checkpoint plus the log after it, cut a torn tail, report
# corruption (docs/format/segment.md, "Reading a segment" and "Checkpoint file").
#
# Rule 1: a bad region is torn only if it starts at/after the durable mark D (max of the checkpoint's
#         replay position and every valid record's sync_mark). Everything before D was synced, so
#         damage there is corruption: reported, left on disk, its blocks marked bad. Never skipped
#         silently.
# Rule 2: the log is cut at the FIRST torn region; later records and segments are dropped (they
#         were not synced either).
# Rule 3: records are applied in (lsn, segment, offset) order, never in file order (cleaning
#         copies keep their original LSN).
# Rule 4: a checkpoint that fails any check is ignored, and the scan starts from the first segment.
# Rule 5 (snapshot pins, segment.md "Snapshot pins"): the pin set as of the end of the log is worked out
#         first (the checkpoint's pins, then PIN/UNPIN records newer than it in LSN order); the checkpoint's
#         kept old versions that a pin still needs are loaded, a HISTORY copy of one relocates it, and only
#         then are the writes replayed, so a version superseded across a pinned LSN is kept as at run time.
#         Without a checkpoint, HISTORY copies are replayed as the versions they are.
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from raftblock.storage.disk import Disk, DiskFile
from raftblock.storage.index import Checkpoint, Index, Mark, Rec, SegState, decode_checkpoint
from raftblock.storage.segment import (
    FLAG_HISTORY,
    FLAG_LINK,
    FORMAT_VERSIONS_READ,
    LINK_TARGET,
    MARK_TYPES,
    REC_LINK,
    REC_PIN,
    REC_TRIM,
    REC_WRITE,
    SEG_HEADER_SIZE,
    ScannedRecord,
    ScanResult,
    decode_segment_header,
    parse_segment_name,
    position,
    read_record,
    record_length,
    scan_segment,
    segment_name,
    segment_seed,
)

log = structlog.get_logger(__name__)

CHECKPOINT_NAME = "checkpoint"
CHECKPOINT_TMP_NAME = "checkpoint.tmp"


@dataclass
class CorruptRange:
    segment: str
    offset: int
    length: int
    extent_id: int | None
    block_start: int | None
    block_count: int | None
    reason: str


@dataclass
class RecoveryReport:
    checkpoint_lsn: int
    segments_scanned: int
    records_replayed: int
    torn_tail_bytes: int
    corrupt: list[CorruptRange]
    duration_ms: float
    used_checkpoint: bool
    checkpoint_error: str | None = None  # why the checkpoint was not used (None: used, or absent)
    records_verified: int = 0


@dataclass
class Recovered:
    index: Index
    files: dict[int, DiskFile]
    seeds: dict[int, int]
    last_lsn: int
    next_segment_id: int
    report: RecoveryReport
    checkpoint_lsn: int = 0
    missing_segments: set[int] = field(default_factory=set)


def _nonzero_end(f: DiskFile, start: int, stop: int) -> int:
    """Offset just past the last non-zero byte in [start, stop) (start if all zero)."""
    chunk = 1 << 20
    hi = stop
    while hi > start:
        lo = max(start, hi - chunk)
        data = f.pread(hi - lo, lo).rstrip(b"\0")
        if data:
            return lo + len(data)
        hi = lo
    return start


def _report(corrupt: list[CorruptRange], cr: CorruptRange) -> None:
    corrupt.append(cr)
    log.error(
        "engine.corruption",
        segment=cr.segment,
        offset=cr.offset,
        length=cr.length,
        extent_id=cr.extent_id,
        block_start=cr.block_start,
        block_count=cr.block_count,
        reason=cr.reason,
    )


def _bad_runs(idxs: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (start, count) of sorted record-relative block indexes."""
    out: list[tuple[int, int]] = []
    for i in idxs:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _apply_write(index: Index, rec: Rec) -> None:
    """Apply a WRITE during replay: blocks whose current version is newer are left alone."""
    emap = index.extents.get(rec.extent_id, {})
    start = rec.block
    end = rec.block + rec.count
    run = start
    for blk in range(start, end):
        cur = emap.get(blk)
        if cur is not None and cur.lsn > rec.lsn:
            if blk > run:
                index.set_blocks(rec, run, blk - run)
            run = blk + 1
    if end > run:
        index.set_blocks(rec, run, end - run)
    if rec.live == 0:
        index.segs[rec.seg].pop_rec(rec)


def _load_target(f: DiskFile | None, rec: Rec) -> None:
    """A LINK's WAL target, read from its record (validated when the record is read or scanned)."""
    if f is None:
        return
    raw = f.pread(LINK_TARGET.size, rec.off + record_length(REC_LINK, rec.count) - LINK_TARGET.size)
    if len(raw) == LINK_TARGET.size:
        rec.tgt = LINK_TARGET.unpack(raw)


def _ck_rec(index: Index, recs: dict[tuple[int, int], Rec], missing: set[int], files: dict[int, DiskFile],
            seg: int, off: int, fl: int, eid: int, rb: int, rc: int, lsn: int, loaded: list[Rec] | None) -> Rec:
    """The one Rec of the record a checkpoint entry names (current or kept for a pin), made once."""
    if seg not in index.segs:
        missing.add(seg)
        index.segs[seg] = SegState(seg, end=0)
    rec = recs.get((seg, off))
    if rec is None:
        rec = recs[(seg, off)] = Rec(seg, off, REC_LINK if fl & FLAG_LINK else REC_WRITE, fl, eid, rb, rc, lsn)
        if fl & FLAG_LINK:
            _load_target(files.get(seg), rec)
        if loaded is not None:
            loaded.append(rec)
    return rec


def recover(disk: Disk, directory: str, cluster_id: bytes, verify_on_open: bool,
            wal_file: Callable[[int], DiskFile | None] | None = None) -> Recovered:
    """`wal_file(seq)`: the node's WAL segment files, for LINK records (write-once)."""
    t0 = time.monotonic()
    disk.makedirs(directory)
    names = disk.listdir(directory)
    if CHECKPOINT_TMP_NAME in names:
        disk.remove(os.path.join(directory, CHECKPOINT_TMP_NAME))
    corrupt: list[CorruptRange] = []

    # --- checkpoint ------------------------------------------------------------------------
    ck: Checkpoint | None = None
    ck_error: str | None = None
    if CHECKPOINT_NAME in names:
        cf = disk.open_file(os.path.join(directory, CHECKPOINT_NAME), create=False)
        try:
            raw = cf.pread(cf.size(), 0)
        finally:
            cf.close()
        decoded = decode_checkpoint(raw)
        if isinstance(decoded, str):
            ck_error = decoded
            log.warning("engine.checkpoint_invalid", reason=decoded, action="full scan")
        elif decoded.cluster_id != cluster_id:
            raise ValueError(
                f"{directory} belongs to cluster {decoded.cluster_id.hex()}, not {cluster_id.hex()}"
            )
        else:
            ck = decoded

    # --- segment headers -------------------------------------------------------------------
    seg_ids = sorted(i for i in (parse_segment_name(n) for n in names) if i is not None)
    files: dict[int, DiskFile] = {}
    seeds: dict[int, int] = {}
    torn_bytes = 0
    bad_header: set[int] = set()
    try:
        for sid in seg_ids:
            f = disk.open_file(os.path.join(directory, segment_name(sid)), create=False)
            files[sid] = f
            seeds[sid] = segment_seed(cluster_id, sid)
            hdr = decode_segment_header(f.pread(SEG_HEADER_SIZE, 0))
            if isinstance(hdr, str):
                bad_header.add(sid)
                continue
            if hdr.cluster_id != cluster_id:
                raise ValueError(
                    f"{directory}/{segment_name(sid)} belongs to cluster {hdr.cluster_id.hex()},"
                    f" not {cluster_id.hex()}"
                )
            if hdr.format_version not in FORMAT_VERSIONS_READ:
                raise ValueError(f"{segment_name(sid)}: unknown segment format version {hdr.format_version}")
            if hdr.segment_id != sid:
                bad_header.add(sid)
    except BaseException:
        for f in files.values():
            f.close()
        raise

    # --- scan the log after the checkpoint -------------------------------------------------
    replay_pos = position(ck.replay_segment, ck.replay_offset) if ck else 0
    scans: dict[int, ScanResult] = {}
    for sid in seg_ids:
        if ck is not None and sid < ck.replay_segment:
            continue
        start = ck.replay_offset if (ck is not None and sid == ck.replay_segment) else SEG_HEADER_SIZE
        scans[sid] = scan_segment(files[sid], seeds[sid], start)

    durable = replay_pos
    for res in scans.values():
        for sr in res.records:
            if sr.hdr.sync_mark > durable:
                durable = sr.hdr.sync_mark

    # Candidates for the cut: bad segment headers, bad regions and records with bad payload blocks,
    # in log order. A bad header is judged like a bad region at offset 0.
    cut: tuple[int, int] | None = None
    for sid in sorted(scans):
        res = scans[sid]
        firsts = [b.offset for b in res.bad] + [sr.offset for sr in res.records if sr.bad_blocks]
        if sid in bad_header:
            firsts.append(0)
        for off in sorted(firsts):
            if position(sid, off) >= durable:
                cut = (sid, off)
                break
        if cut is not None:
            break

    # --- cut the torn tail ------------------------------------------------------------------
    if cut is not None:
        csid, coff = cut
        f = files[csid]
        if coff == 0:  # torn creation: the segment header itself was never synced
            bad_header.discard(csid)
            first_gone = csid
        else:
            torn_bytes += _nonzero_end(f, coff, f.size()) - coff
            f.truncate(coff)
            f.fdatasync()
            res = scans[csid]
            res.records = [sr for sr in res.records if sr.offset < coff]
            res.bad = [b for b in res.bad if b.offset < coff]
            res.end = coff
            first_gone = csid + 1
        for sid in [s for s in seg_ids if s >= first_gone]:
            bad_header.discard(sid)
            lf = files.pop(sid)
            torn_bytes += _nonzero_end(lf, 0, lf.size())
            lf.close()
            disk.remove(os.path.join(directory, segment_name(sid)))
            scans.pop(sid, None)
            seg_ids.remove(sid)
        disk.fsync_dir(directory)
    if torn_bytes:
        log.warning("engine.torn_tail", bytes=torn_bytes, segment=segment_name(cut[0]) if cut else None,
                    offset=cut[1] if cut else None)

    for sid in sorted(bad_header):
        _report(corrupt, CorruptRange(segment_name(sid), 0, SEG_HEADER_SIZE, None, None, None,
                                      "segment header invalid"))

    # --- rebuild the index ------------------------------------------------------------------
    index = Index()
    for sid in seg_ids:
        scanned = scans.get(sid)
        index.segs[sid] = SegState(sid, end=scanned.end if scanned is not None else files[sid].size())
    missing: set[int] = set()
    last_lsn = 0
    loaded: list[Rec] = []
    recs: dict[tuple[int, int], Rec] = {}
    if ck is not None:
        last_lsn = ck.checkpoint_lsn
        for eid, blk, n, seg, off, rb, rc, lsn, fl in ck.runs:
            rec = _ck_rec(index, recs, missing, files, seg, off, fl, eid, rb, rc, lsn, loaded)
            index.set_blocks(rec, blk, n)
        for seg, off, blk, cnt, eid, lsn in ck.tombs:
            if seg in index.segs and seg not in missing:
                index.segs[seg].tombstones[off] = Rec(seg, off, REC_TRIM, 0, eid, blk, cnt, lsn)
        for seg, eid, lsn in ck.segmin:
            if seg in index.segs and seg not in missing:
                index.segs[seg].note_write(eid, lsn)
        for eid, blk, cnt in ck.bad:
            index.mark_bad(eid, blk, cnt)
        for seg, off, rtype, grp, snap, mlsn, pinned in ck.marks:
            if seg in index.segs and seg not in missing:
                index.segs[seg].marks[off] = Mark(seg, off, rtype, grp, snap, mlsn, pinned)
    ck_lsn = ck.checkpoint_lsn if ck is not None else 0

    # --- rule 5: pins, then the old versions they keep ----------------------------------------
    pins: dict[tuple[int, int], int] = {(g, sid): lsn for g, sid, lsn in ck.pins} if ck is not None else {}
    events: list[tuple[int, int, int, int, tuple[int, int]]] = []  # lsn, segment, offset, type, (group, snap)
    pinned_of: dict[tuple[int, int], int] = {}
    hist_copies: list[tuple[int, ScannedRecord]] = []
    for sid, res in scans.items():
        for sr in res.records:
            h = sr.hdr
            if h.rtype in MARK_TYPES:
                index.segs[sid].marks[sr.offset] = Mark(sid, sr.offset, h.rtype, h.block, h.extent_id, h.lsn,
                                                        sr.pinned_lsn)
                if h.lsn > ck_lsn:
                    events.append((h.lsn, sid, sr.offset, h.rtype, (h.block, h.extent_id)))
                    pinned_of[(sid, sr.offset)] = sr.pinned_lsn
            elif h.flags & FLAG_HISTORY and ck is not None and h.lsn <= ck_lsn and h.rtype != REC_TRIM:
                hist_copies.append((sid, sr))  # a cleaning copy of a kept version (a TRIM is never one)
    for _lsn, msid, moff, rtype, key in sorted(events):
        if rtype == REC_PIN:
            pins[key] = pinned_of[(msid, moff)]
        else:
            pins.pop(key, None)
    index.snaps = pins
    for (grp, _snap), plsn in pins.items():
        index.pin(plsn, grp)
    if ck is not None:
        for eid, blk, n, seg, off, rb, rc, lsn, until, fl in ck.hist:
            if not index._pinned_between(lsn, until, eid >> 32):
                continue  # its pin went after the checkpoint
            rec = _ck_rec(index, recs, missing, files, seg, off, fl, eid, rb, rc, lsn, None)
            index.segs[seg].add_rec(rec)
            for bk in range(blk, blk + n):
                index.history.setdefault((eid, bk), []).append((rec, until))
                index.hist_ref(rec, 1)
        for sid, sr in hist_copies:
            h = sr.hdr
            new = Rec(sid, sr.offset, h.rtype, h.flags, h.extent_id, h.block, h.count, h.lsn)
            if h.rtype == REC_LINK:
                _load_target(files.get(sid), new)
            emap = index.extents.get(h.extent_id, {})
            for bk in range(h.block, h.block + h.count):
                cur = emap.get(bk)
                if cur is not None and cur.lsn == h.lsn:
                    # Current at the checkpoint, superseded (and copied as history) after it: this copy is
                    # where that version lives now; the replay below supersedes it again.
                    if cur is not new:
                        index.set_blocks(new, bk, 1)
                    continue
                for old, _until in list(index.history.get((h.extent_id, bk), [])):
                    if old.lsn == h.lsn and old is not new:
                        index.relocate_history(h.extent_id, bk, old, new)
                        break

    replay: list[tuple[int, int, int, ScannedRecord]] = []
    for sid, res in scans.items():
        seg_state = index.segs[sid]
        for sr in res.records:
            h = sr.hdr
            last_lsn = max(last_lsn, h.lsn)
            if h.rtype in MARK_TYPES:
                continue  # rule 5, above
            if h.flags & FLAG_HISTORY and (ck is not None and h.lsn <= ck_lsn or not index.pins):
                continue  # relocated above, or no pin keeps old versions: garbage
            if h.rtype == REC_TRIM:
                seg_state.tombstones[sr.offset] = Rec(sid, sr.offset, REC_TRIM, h.flags, h.extent_id,
                                                      h.block, h.count, h.lsn)
            else:
                seg_state.note_write(h.extent_id, h.lsn)
            replay.append((h.lsn, sid, sr.offset, sr))
    replay.sort(key=lambda t: (t[0], t[1], t[2]))
    for lsn, sid, off, sr in replay:
        h = sr.hdr
        if h.rtype in (REC_WRITE, REC_LINK):
            rec = Rec(sid, off, h.rtype, h.flags, h.extent_id, h.block, h.count, lsn)
            if h.rtype == REC_LINK:
                _load_target(files.get(sid), rec)
            _apply_write(index, rec)
        else:
            index.trim_blocks(h.extent_id, h.block, h.count, lsn)

    # --- corruption before the cut ----------------------------------------------------------
    for sid in sorted(scans):
        res = scans[sid]
        name = segment_name(sid)
        for sr in res.records:
            if not sr.bad_blocks:
                continue
            h = sr.hdr
            emap = index.extents.get(h.extent_id, {})
            for s, n in _bad_runs(sr.bad_blocks):
                _report(corrupt, CorruptRange(name, sr.offset, h.length, h.extent_id, h.block + s, n,
                                              "payload block checksum mismatch"))
                for blk in range(h.block + s, h.block + s + n):
                    cur = emap.get(blk)
                    if cur is not None and cur.seg == sid and cur.off == sr.offset:
                        index.mark_bad(h.extent_id, blk, 1)
        for b in res.bad:
            hint = b.hint
            if hint is None:
                _report(corrupt, CorruptRange(name, b.offset, b.length, None, None, None, b.reason))
                continue
            _report(corrupt, CorruptRange(name, b.offset, b.length, hint.extent_id, hint.block, hint.count,
                                          b.reason + " (block range from unverified header)"))
            emap = index.extents.get(hint.extent_id, {})
            lo, hi = hint.block, hint.block + hint.count
            blks: range | list[int] = range(lo, hi)  # a WRITE or LINK: at most MAX_WRITE_BLOCKS
            if hint.rtype == REC_TRIM:  # up to 2^32 blocks named: only those with a version can be affected
                blks = sorted(b for b in emap if lo <= b < hi) if hint.count > len(emap) else [
                    b for b in blks if b in emap]
            for blk in blks:
                cur = emap.get(blk)
                # A lost WRITE hides a newer version; a lost TRIM leaves an older one visible.
                if (cur is None and hint.rtype in (REC_WRITE, REC_LINK)) or (cur is not None and cur.lsn < hint.lsn):
                    index.mark_bad(hint.extent_id, blk, 1)

    # Index entries naming a segment that is gone and that replay did not replace.
    if missing:
        for eid, blk, n, rec in index.runs():
            if rec.seg in missing:
                _report(corrupt, CorruptRange(segment_name(rec.seg), rec.off, 0, eid, blk, n,
                                              "segment file missing"))
                index.mark_bad(eid, blk, n)

    # Linked blocks whose WAL segment is gone (write-once rule 4: corruption, never a torn tail).
    if wal_file is None and any(r.rtype == REC_LINK for s in index.segs.values() for r in s.records.values()):
        for f in files.values():
            f.close()
        raise ValueError(f"{directory} holds LINK records (write-once): open the engine with its WAL")
    for eid, blk, n, rec in index.runs():
        if rec.rtype != REC_LINK or rec.seg in missing:
            continue
        if rec.tgt is None or wal_file is None or wal_file(rec.tgt[0]) is None:
            seq = rec.tgt[0] if rec.tgt is not None else None
            _report(corrupt, CorruptRange(segment_name(rec.seg), rec.off, 0, eid, blk, n,
                                          f"linked WAL segment {seq} missing"))
            index.mark_bad(eid, blk, n)

    # --- verify live records that were not scanned -------------------------------------------
    verified = 0
    if verify_on_open and loaded:
        for rec in sorted(loaded, key=lambda r: (r.seg, r.off)):
            if rec.live == 0 or rec.seg in missing:
                continue
            verified += 1
            got = read_record(files[rec.seg], seeds[rec.seg], rec.off)
            emap = index.extents.get(rec.extent_id, {})
            mine = [blk for blk in range(rec.block, rec.block + rec.count) if emap.get(blk) is rec]
            bad_blks: list[int]
            if isinstance(got, str):
                reason = got
                bad_blks = mine
            else:
                rh, _body, bad = got
                if (rh.rtype, rh.extent_id, rh.block, rh.count, rh.lsn) != (
                    rec.rtype, rec.extent_id, rec.block, rec.count, rec.lsn
                ):
                    reason, bad_blks = "record does not match checkpoint", mine
                else:
                    reason = "payload block checksum mismatch"
                    badset = {rec.block + i for i in bad}
                    bad_blks = [blk for blk in mine if blk in badset]
            for s, n in _bad_runs(bad_blks):
                _report(corrupt, CorruptRange(segment_name(rec.seg), rec.off, 0, rec.extent_id, s, n, reason))
                index.mark_bad(rec.extent_id, s, n)

    for sid in scans:
        if sid in files:
            files[sid].fdatasync()  # what we replayed may only have been in the page cache

    next_id = max([*seg_ids, ck.next_segment_id - 1 if ck else 0, *missing]) + 1
    report = RecoveryReport(
        checkpoint_lsn=ck.checkpoint_lsn if ck else 0,
        segments_scanned=len(scans),
        records_replayed=len(replay),
        torn_tail_bytes=torn_bytes,
        corrupt=corrupt,
        duration_ms=(time.monotonic() - t0) * 1000.0,
        used_checkpoint=ck is not None,
        checkpoint_error=ck_error,
        records_verified=verified,
    )
    return Recovered(index, files, seeds, last_lsn, next_id, report, report.checkpoint_lsn, missing)
