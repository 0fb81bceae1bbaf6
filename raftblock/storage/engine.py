# The storage engine: append-only, CRC32C-framed segments + an in-memory index, checkpoints,
# recovery, segment cleaning. Formats: docs/format/segment.md.
#
# Rule 1 (threads): write/trim/read/block_status/clean/checkpoint/drop_extent/pin/close run on ONE
#         owner thread (the event loop). sync() may run on any thread, concurrently with them.
#         `_lock` guards only the append state (active segment, its end, last_lsn, what is dirty); it
#         is never held during a pwrite or an fdatasync. `_sync_lock` serialises syncs (a second
#         sync must not report durability while the first is still inside fdatasync) and file
#         removal (no fd closes under a running fdatasync).
# Rule 2 (durability): a write is durable only once sync() has returned an LSN >= its LSN. sync()
#         fdatasyncs every segment with unsynced appends (rolled ones too) and the directory if files
#         were created.
# Rule 3 (pair check): CRCs are checked right before a block is written and right after every read;
#         a mismatch raises CorruptBlockError and never returns data. A write's CRCs are computed from
#         its payload where it lies and the payload is written from there (pwritev, no copy): callers
#         hand over buffers nobody changes (bytes, views of a received frame).
# Rule 4 (failures): an error during an append leaves the engine as before the call (no index
#         change, append position unchanged); ENOSPC becomes NoSpaceError.
# The engine never imports asyncio.
from __future__ import annotations

import bisect
import errno
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
import structlog

from raftblock._fast import bitmap, blockcrc, segwriter
from raftblock.storage.cleaner import Cleaner, evacuate
from raftblock.storage.disk import Disk, DiskFile, write_parts
from raftblock.storage.index import (
    GLOBAL,
    Checkpoint,
    CorruptBlockError,
    Index,
    Mark,
    Rec,
    SegState,
    encode_checkpoint,
)
from raftblock.storage.recovery import (
    CHECKPOINT_NAME,
    CHECKPOINT_TMP_NAME,
    CorruptRange,
    RecoveryReport,
    recover,
)
from raftblock.storage.segment import (
    BLOCK_SIZE,
    FLAG_LINK,
    MAX_BLOCK,
    MAX_GROUP,
    MAX_WRITE_BLOCKS,
    REC_HEADER_SIZE,
    REC_LINK,
    REC_PIN,
    REC_TRIM,
    REC_UNPIN,
    REC_WRITE,
    SEG_HEADER_SIZE,
    RecordHeader,
    build_link_record,
    build_mark_record,
    build_trim_record,
    encode_segment_header,
    payload_offset,
    position,
    read_record,
    record_length,
    segment_name,
    segment_seed,
)

__all__ = [
    "BLOCK_SIZE",
    "CorruptBlockError",
    "CorruptRange",
    "Engine",
    "EngineConfig",
    "NoSpaceError",
    "RecoveryReport",
]

log = structlog.get_logger(__name__)

ZERO_BLOCK_CRC = crc32c.crc32c(bytes(BLOCK_SIZE), 0)
MAX_EXTENT_ID = (1 << 64) - 1


class NoSpaceError(OSError):
    """The disk is full (errno.ENOSPC). Nothing stored was harmed; retry when space returns."""

    def __init__(self, msg: str = "no space left on device") -> None:
        super().__init__(errno.ENOSPC, msg)


class EngineClosedError(RuntimeError):
    pass


@dataclass
class EngineConfig:
    segment_size_bytes: int = 64 << 20
    checkpoint_interval_bytes: int = 256 << 20
    cleaning_garbage_ratio: float = 0.5  # a sealed segment with at least this much dead space is cleaned
    # The node's cleaning pace (node/raftnode.py EngineCleaning): while the engine holds more dead bytes than
    # this fraction of its live bytes (and more than two segments), the cleaner rewrites up to
    # cleaning_bytes_per_s; below it, a trickle.
    cleaning_garbage_target: float = 0.25
    cleaning_bytes_per_s: int = 32 << 20
    verify_on_open: bool = True
    preallocate: bool = True  # posix_fallocate each new segment to segment_size_bytes
    # Write-once (docs/format/write-once.md): WAL segments that LINK records point into are held (not
    # recycled) until their linked blocks are overwritten or evacuated. A held segment is evacuated when
    # its live part falls to 1 - cleaning_garbage_ratio (as an engine segment is cleaned), or, oldest
    # first, while the held segments together exceed this many bytes.
    wal_held_bytes_max: int = 8 << 30


class WalFiles(Protocol):
    """What the engine needs of the node's WAL for write-once (replication/wal.py Wal implements it)."""

    def wal_file(self, seq: int) -> DiskFile | None: ...

    def recovered_file(self, seq: int) -> DiskFile | None: ...

    def held_segments(self) -> list[tuple[int, int]]: ...


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno == errno.ENOSPC


class Engine:
    report: RecoveryReport

    def __init__(self, disk: Disk, directory: str, cluster_id: bytes, config: EngineConfig) -> None:
        # Use Engine.open(); this only sets fields.
        self.disk = disk
        self.directory = directory
        self.cluster_id = cluster_id
        self.config = config
        self.index = Index()
        self._files: dict[int, DiskFile] = {}
        self._seeds: dict[int, int] = {}
        self._missing: set[int] = set()
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._active: SegState | None = None
        self._dirty: set[int] = set()
        self._dir_dirty = False
        self._next_segment_id = 1
        self._durable_mark = 0
        self.last_lsn = 0
        self.synced_lsn = 0
        self.checkpoint_lsn = 0
        self._bytes_since_checkpoint = 0
        self._closed = False
        self._cleaner = Cleaner(self)
        self.cleaned_bytes = 0  # bytes the cleaner rewrote since the engine opened (stats)
        self.evacuated_bytes = 0  # linked blocks copied out of held WAL segments (stats)
        self._wal: WalFiles | None = None
        self._wal_links: dict[int, set[Rec]] = {}  # WAL seq -> LINK records pointing into it (some dead)
        self._unref: dict[int, int] = {}  # WAL seq -> append count when its last link was seen gone
        self._appends = 0  # records appended (any kind), under _lock
        self._synced_appends = 0  # appends that the last finished sync covered

    # --- open ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, disk: Disk, directory: str, cluster_id: bytes, config: EngineConfig | None = None,
        wal: WalFiles | None = None,
    ) -> Engine:
        """`wal`: the node's WAL, opened first, when LINK records may exist (write-once); without it a
        LINK found by recovery is a block whose data is missing (marked bad)."""
        if len(cluster_id) != 16:
            raise ValueError("cluster_id must be 16 bytes")
        cfg = config or EngineConfig()
        if not (64 << 10 <= cfg.segment_size_bytes <= (1 << 32) - (4 << 20)):
            raise ValueError("segment_size_bytes must be in [64 KiB, 4 GiB - 4 MiB]")
        eng = cls(disk, directory, cluster_id, cfg)
        eng._wal = wal
        rec = recover(disk, directory, cluster_id, cfg.verify_on_open, wal.recovered_file if wal is not None else None)
        eng.index = rec.index
        eng._files = rec.files
        eng._seeds = rec.seeds
        eng._missing = rec.missing_segments
        eng.last_lsn = eng.synced_lsn = rec.last_lsn
        eng.checkpoint_lsn = rec.checkpoint_lsn
        eng._next_segment_id = rec.next_segment_id
        eng.report = rec.report
        for sstate in eng.index.segs.values():
            for linked in sstate.records.values():
                if linked.tgt is not None:
                    eng._note_link(linked)
        try:
            try:
                eng._roll()
            except NoSpaceError:
                # A full disk must not keep a node from starting: serve reads now, and open the first
                # segment lazily when a write finds space again.
                log.warning("engine.open_without_active_segment", reason="no space")
            eng.sync()
        except BaseException:
            eng._close_files()
            raise
        r = rec.report
        log.info(
            "engine.recovered",
            directory=directory,
            checkpoint_lsn=r.checkpoint_lsn,
            used_checkpoint=r.used_checkpoint,
            segments_scanned=r.segments_scanned,
            records_replayed=r.records_replayed,
            torn_tail_bytes=r.torn_tail_bytes,
            corrupt=len(r.corrupt),
            last_lsn=eng.last_lsn,
            duration_ms=round(r.duration_ms, 3),
        )
        return eng

    # --- append path -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("engine is closed")

    def _roll(self, min_bytes: int = 0) -> None:
        """Start a new active segment (header written, space preallocated).

        A record larger than segment_size_bytes gets a segment of its own size (never split).
        """
        sid = self._next_segment_id
        path = os.path.join(self.directory, segment_name(sid))
        f = self.disk.open_file(path, create=True)
        try:
            f.pwrite(encode_segment_header(self.cluster_id, sid, self.last_lsn), 0)
            if self.config.preallocate:
                f.fallocate(0, max(self.config.segment_size_bytes, min_bytes))
        except BaseException as e:
            f.close()
            try:
                self.disk.remove(path)
            except OSError:
                pass
            if _is_enospc(e):
                log.warning("engine.no_space", op="new segment", segment=segment_name(sid))
                raise NoSpaceError(f"no space for a new segment: {e}") from e
            raise
        seg = SegState(sid, end=SEG_HEADER_SIZE)
        with self._lock:
            self._files[sid] = f
            self._seeds[sid] = segment_seed(self.cluster_id, sid)
            self.index.segs[sid] = seg
            self._active = seg
            self._next_segment_id = sid + 1
            self._dirty.add(sid)
            self._dir_dirty = True

    def _room(self, length: int) -> SegState:
        seg = self._active
        if seg is None:
            self._roll(SEG_HEADER_SIZE + length)
            seg = self._active
            assert seg is not None
            return seg
        if seg.end + length > max(self.config.segment_size_bytes, SEG_HEADER_SIZE + length):
            self._roll(SEG_HEADER_SIZE + length)
            seg = self._active
            assert seg is not None
        return seg

    def _append(self, seg: SegState, buf: bytearray | bytes | list[bytes | bytearray | memoryview]) -> int:
        """Write framed records at the end of `seg` (one buffer: pwrite; parts: pwritev, `write_parts`);
        returns their offset."""
        off = seg.end
        size = sum(len(p) for p in buf) if isinstance(buf, list) else len(buf)
        try:
            f = self._files[seg.seg_id]
            if isinstance(buf, list):
                write_parts(f, buf, off)
            else:
                f.pwrite(buf, off)
        except OSError as e:
            if _is_enospc(e):
                log.warning("engine.no_space", op="append", segment=segment_name(seg.seg_id), offset=off)
                raise NoSpaceError(f"no space to append a record: {e}") from e
            raise
        with self._lock:
            seg.end = off + size
            self._dirty.add(seg.seg_id)
            self._appends += 1
        self._bytes_since_checkpoint += size
        return off

    @staticmethod
    def _check_write(extent_id: int, block: int, data: bytes | bytearray | memoryview, crcs: Sequence[int]) -> int:
        """Argument checks of one write; returns its block count."""
        n = len(crcs)
        if not 1 <= n <= MAX_WRITE_BLOCKS:
            raise ValueError(f"a write covers 1..{MAX_WRITE_BLOCKS} blocks, got {n}")
        if len(data) != n * BLOCK_SIZE:
            raise ValueError(f"data is {len(data)} bytes, expected {n} x {BLOCK_SIZE}")
        if not (0 <= extent_id <= MAX_EXTENT_ID and 0 <= block and block + n <= MAX_BLOCK):
            raise ValueError("extent_id/block out of range")
        return n

    def write(self, extent_id: int, block: int, data: bytes | bytearray | memoryview, crcs: Sequence[int]) -> int:
        self._check_open()
        n = self._check_write(extent_id, block, data, crcs)
        lsn = self.last_lsn + 1
        seg = self._room(record_length(REC_WRITE, n))
        head = bytearray(record_length(REC_WRITE, n) - n * BLOCK_SIZE)
        try:  # header and CRC array only: the payload is written where it lies (_fast segwriter rule 5)
            segwriter.frame_write_head(head, 0, self._seeds[seg.seg_id], extent_id, block, lsn,
                                       self._durable_mark, data, crcs)
        except segwriter.BlockCrcMismatch as e:
            raise CorruptBlockError(extent_id, block + e.index, "checksum mismatch before write") from e
        off = self._append(seg, [head, data])
        with self._lock:
            self.last_lsn = lsn
        rec = Rec(seg.seg_id, off, REC_WRITE, 0, extent_id, block, n, lsn)
        seg.note_write(extent_id, lsn)
        self.index.set_blocks(rec, block, n)
        return lsn

    def write_many(
        self, writes: Sequence[tuple[int, int, bytes | bytearray | memoryview, Sequence[int]]]
    ) -> int:
        """Apply several writes (extent_id, block, data, crcs) in order, as `write` would one by one,
        but written back to back with one pwritev (the apply of a Raft entry holding a batch of client
        writes; the payloads are not copied, so the caller must not change them until this returns). Every write is checked before any byte is written; a batch
        that does not fit in the active segment goes one write at a time. Returns the last LSN."""
        self._check_open()
        lengths = []
        for extent_id, block, data, crcs in writes:
            lengths.append(record_length(REC_WRITE, self._check_write(extent_id, block, data, crcs)))
        total = sum(lengths)
        seg = self._active
        if len(writes) < 2 or seg is None or seg.end + total > self.config.segment_size_bytes:
            lsn = self.last_lsn
            for extent_id, block, data, crcs in writes:
                lsn = self.write(extent_id, block, data, crcs)
            return lsn
        # The headers and CRC arrays framed into one small buffer; the payloads written where they lie
        # (pwritev of head, payload, head, payload, ...: no copy of the data, no fresh buffer of its size).
        heads = bytearray(total - sum(len(w[2]) for w in writes))
        hview = memoryview(heads)
        parts: list[bytes | bytearray | memoryview] = []
        seed = self._seeds[seg.seg_id]
        mark = self._durable_mark
        lsn = self.last_lsn
        pos = 0
        for extent_id, block, data, crcs in writes:
            lsn += 1
            try:
                end = segwriter.frame_write_head(heads, pos, seed, extent_id, block, lsn, mark, data, crcs)
            except segwriter.BlockCrcMismatch as e:
                raise CorruptBlockError(extent_id, block + e.index, "checksum mismatch before write") from e
            parts.append(hview[pos:end])
            parts.append(data)
            pos = end
        off = self._append(seg, parts)
        with self._lock:
            self.last_lsn = lsn
        lsn = self.last_lsn - len(writes)
        set_blocks = self.index.set_blocks
        for (extent_id, block, _data, crcs), length in zip(writes, lengths, strict=True):
            lsn += 1
            n = len(crcs)
            rec = Rec(seg.seg_id, off, REC_WRITE, 0, extent_id, block, n, lsn)
            seg.note_write(extent_id, lsn)
            set_blocks(rec, block, n)
            off += length
        return lsn

    def link_many(
        self, links: Sequence[tuple[int, int, bytes | bytearray | memoryview, Sequence[int], int, int]]
    ) -> int:
        """Apply writes whose payload is already durable in a WAL segment (write-once): for each
        (extent_id, block, data, crcs, wal_seq, wal_offset of the first payload byte) one LINK record, the
        records appended back to back with one pwrite; the index points at the WAL bytes. The caller
        guarantees the WAL bytes are durable (docs/format/write-once.md rule 1) and were written from
        `data`; the pair check (rule 3) runs on `data`, the bytes the WAL wrote, before the LINK is.
        Returns the last LSN."""
        self._check_open()
        if self._wal is None:
            raise ValueError("link_many needs the engine opened with its WAL")
        lengths = []
        for extent_id, block, data, crcs, _seq, _off in links:
            n = self._check_write(extent_id, block, data, crcs)
            bad = blockcrc.first_mismatch(data, crcs)
            if bad >= 0:
                raise CorruptBlockError(extent_id, block + bad, "checksum mismatch before link")
            lengths.append(record_length(REC_LINK, n))
        seg = self._room(sum(lengths))
        seed = self._seeds[seg.seg_id]
        mark = self._durable_mark
        lsn = self.last_lsn
        bufs = []
        for extent_id, block, _data, crcs, wseq, woff in links:
            lsn += 1
            bufs.append(build_link_record(seed, extent_id, block, lsn, mark, crcs, wseq, woff))
        off = self._append(seg, b"".join(bufs) if len(bufs) > 1 else bufs[0])
        with self._lock:
            self.last_lsn = lsn
        lsn -= len(links)
        for (extent_id, block, _data, crcs, wseq, woff), length in zip(links, lengths, strict=True):
            lsn += 1
            n = len(crcs)
            rec = Rec(seg.seg_id, off, REC_LINK, FLAG_LINK, extent_id, block, n, lsn)
            rec.tgt = (wseq, woff)
            seg.note_write(extent_id, lsn)
            self.index.set_blocks(rec, block, n)
            self._note_link(rec)
            off += length
        return lsn

    def attach_wal(self, wal: WalFiles) -> None:
        """The WAL this engine links into (Engine.open(wal=...) already did it, for recovery)."""
        if self._wal is not None and self._wal is not wal:
            raise ValueError("the engine is attached to another WAL")
        self._wal = wal

    def _note_link(self, rec: Rec) -> None:
        assert rec.tgt is not None
        links = self._wal_links.get(rec.tgt[0])
        if links is None:
            links = self._wal_links[rec.tgt[0]] = set()
        links.add(rec)

    def wal_refs(self, seq: int) -> bool:
        """Whether WAL segment `seq` must be kept for this engine: a live or pinned block is linked into
        it, or the records that stopped pointing there are not durable yet (write-once rule 2)."""
        links = self._wal_links.get(seq)
        if links:
            dead = [r for r in links if r.live == 0 and r.hist == 0]
            links.difference_update(dead)
            if links:
                return True
            with self._lock:
                self._unref[seq] = self._appends
        if links is not None:
            del self._wal_links[seq]
        need = self._unref.get(seq)
        if need is None:
            return False
        with self._lock:
            if self._synced_appends < need:
                return True
        del self._unref[seq]
        return False

    def linked_live_bytes(self, seq: int) -> int:
        """Bytes of live or pinned blocks linked into WAL segment `seq`."""
        return sum((r.live + r.hist) * BLOCK_SIZE for r in self._wal_links.get(seq, ()))

    def trim(self, extent_id: int, block: int, count: int) -> int:
        self._check_open()
        if count < 1 or not (0 <= extent_id <= MAX_EXTENT_ID and 0 <= block and block + count <= MAX_BLOCK):
            raise ValueError("extent_id/block/count out of range")
        lsn = self.last_lsn + 1
        seg = self._room(REC_HEADER_SIZE)
        buf = build_trim_record(self._seeds[seg.seg_id], extent_id, block, count, lsn, self._durable_mark)
        off = self._append(seg, buf)
        with self._lock:
            self.last_lsn = lsn
        seg.tombstones[off] = Rec(seg.seg_id, off, REC_TRIM, 0, extent_id, block, count, lsn)
        self.index.trim_blocks(extent_id, block, count, lsn)
        return lsn

    def drop_extent(self, extent_id: int) -> int:
        return self.trim(extent_id, 0, MAX_BLOCK)

    # --- read path -------------------------------------------------------------------------

    def _read_run(self, rec: Rec, first: int, k: int, out: bytearray, out_off: int, crcs: list[int],
                  crc_off: int, current: bool = True) -> None:
        """Read blocks [first, first+k) of rec into out; verify each block's CRC (pair check). A failure
        marks the blocks bad only when `rec` holds their current version (not a snapshot's old one)."""
        f = self._files.get(rec.seg)
        if f is None:
            self._read_failed(rec.extent_id, first, "segment file missing", rec, current)
        idx0 = first - rec.block
        expect = f.pread(4 * k, rec.off + REC_HEADER_SIZE + 4 * idx0)  # type: ignore[union-attr]
        if rec.tgt is not None:  # a LINK: the CRCs are here, the payload in a WAL segment
            wf = self._wal.wal_file(rec.tgt[0]) if self._wal is not None else None
            if wf is None:
                self._read_failed(rec.extent_id, first, f"linked WAL segment {rec.tgt[0]} missing", rec, current)
            payload = wf.pread(k * BLOCK_SIZE, rec.tgt[1] + idx0 * BLOCK_SIZE)  # type: ignore[union-attr]
        else:
            payload = f.pread(k * BLOCK_SIZE, rec.off + payload_offset(rec.count) + idx0 * BLOCK_SIZE)  # type: ignore[union-attr]
        if len(expect) < 4 * k or len(payload) < k * BLOCK_SIZE:
            self._read_failed(rec.extent_id, first, "short read", rec, current)
        want = struct.unpack(f"<{k}I", expect)
        out[out_off : out_off + k * BLOCK_SIZE] = payload
        view = memoryview(out)
        for i in range(k):
            s = out_off + i * BLOCK_SIZE
            c = crc32c.crc32c(view[s : s + BLOCK_SIZE], 0)
            if c != want[i]:
                self._read_failed(rec.extent_id, first + i, "block checksum mismatch after read", rec, current)
            crcs[crc_off + i] = c

    def _read_failed(self, extent_id: int, blk: int, reason: str, rec: Rec | None, mark: bool = True) -> None:
        if mark:
            self.index.mark_bad(extent_id, blk, 1)
        log.error(
            "engine.corruption",
            segment=segment_name(rec.seg) if rec else None,
            offset=rec.off if rec else None,
            extent_id=extent_id,
            block_start=blk,
            block_count=1,
            reason=reason,
        )
        raise CorruptBlockError(extent_id, blk, reason)

    def read(self, extent_id: int, block: int, count: int) -> tuple[bytearray, list[int]]:
        self._check_open()
        if count < 1 or block < 0:
            raise ValueError("bad block range")
        out = bytearray(count * BLOCK_SIZE)
        crcs = [ZERO_BLOCK_CRC] * count
        emap = self.index.extents.get(extent_id)
        bad = self.index.bad.get(extent_id)
        if not emap and not bad:
            return out, crcs
        emap = emap or {}
        i = 0
        while i < count:
            blk = block + i
            if bad and blk in bad:
                raise CorruptBlockError(extent_id, blk, "block marked bad")
            rec = emap.get(blk)
            if rec is None:
                i += 1
                continue
            j = i + 1
            while j < count and emap.get(block + j) is rec and not (bad and block + j in bad):
                j += 1
            self._read_run(rec, blk, j - i, out, i * BLOCK_SIZE, crcs, i)
            i = j
        return out, crcs

    def read_at(self, extent_id: int, block: int, count: int, lsn: int) -> tuple[bytearray, list[int]]:
        """Read the image as of `lsn` (versions kept by pin(lsn)); the snapshot read path."""
        self._check_open()
        out = bytearray(count * BLOCK_SIZE)
        crcs = [ZERO_BLOCK_CRC] * count
        cur = self.index.extents.get(extent_id, {})
        version_at = self.index.version_at
        i = 0
        while i < count:  # one read per run of blocks kept in one record (one pread, not one per block)
            rec = version_at(extent_id, block + i, lsn)
            if rec is None:
                i += 1
                continue
            current = cur.get(block + i) is rec
            j = i + 1
            while j < count and block + j < rec.block + rec.count and version_at(extent_id, block + j, lsn) is rec \
                    and (cur.get(block + j) is rec) == current:
                j += 1
            self._read_run(rec, block + i, j - i, out, i * BLOCK_SIZE, crcs, i, current=current)
            i = j
        return out, crcs

    def block_status(self, extent_id: int, block: int, count: int) -> list[tuple[int, bool]]:
        """Runs of (length, allocated) covering [block, block+count); a bad block counts as allocated.
        Built in a `_fast.bitmap` from the extent's map (its keys when the map is smaller than the range,
        so a mostly empty extent costs its few blocks, not the range)."""
        emap = self.index.extents.get(extent_id) or {}
        bad = self.index.bad.get(extent_id) or set()
        if not emap and not bad:
            return [(count, False)]
        end = block + count
        bm = bitmap.Bitmap(count)
        for keys in (emap, bad):
            if len(keys) <= count:
                for blk in keys:
                    if block <= blk < end:
                        bm.set_range(blk - block, 1)
            else:
                for blk in range(block, end):
                    if blk in keys:
                        bm.set_range(blk - block, 1)
        return _runs(bm, count)

    # --- durability ------------------------------------------------------------------------

    def sync(self) -> int:
        with self._sync_lock:
            with self._lock:
                if self._closed and not self._files:
                    return self.synced_lsn
                lsn = self.last_lsn
                appends = self._appends
                active = self._active
                mark = position(active.seg_id, active.end) if active else self._durable_mark
                dirty = self._dirty
                self._dirty = set()
                need_dir = self._dir_dirty
                self._dir_dirty = False
                files = [self._files[s] for s in sorted(dirty) if s in self._files]
            try:
                for f in files:
                    f.fdatasync()
                if need_dir:
                    self.disk.fsync_dir(self.directory)
            except BaseException:
                with self._lock:
                    self._dirty |= dirty
                    self._dir_dirty |= need_dir
                raise
            with self._lock:
                if lsn > self.synced_lsn:
                    self.synced_lsn = lsn
                if appends > self._synced_appends:
                    self._synced_appends = appends
                if mark > self._durable_mark:
                    self._durable_mark = mark
                return self.synced_lsn

    def checkpoint_due(self) -> bool:
        return self._bytes_since_checkpoint >= self.config.checkpoint_interval_bytes

    def maybe_checkpoint(self) -> bool:
        if self.checkpoint_due():
            self.checkpoint()
            return True
        return False

    def checkpoint(self) -> None:
        """Write the index atomically (tmp, fdatasync, rename, fsync dir); see segment.md."""
        self._check_open()
        self.sync()
        active = self._active
        if active is None:
            return  # opened on a full disk and nothing written since: the previous checkpoint stands
        idx = self.index
        ck = Checkpoint(
            cluster_id=self.cluster_id,
            checkpoint_lsn=self.last_lsn,
            replay_segment=active.seg_id,
            replay_offset=active.end,
            next_segment_id=self._next_segment_id,
            runs=[(e, b, n, r.seg, r.off, r.block, r.count, r.lsn, r.flags) for e, b, n, r in idx.runs()],
            tombs=[
                (t.seg, t.off, t.block, t.count, t.extent_id, t.lsn)
                for sid in sorted(idx.segs)
                for t in idx.segs[sid].tombstones.values()
            ],
            segmin=[
                (sid, e, lsn) for sid in sorted(idx.segs) for e, lsn in idx.segs[sid].min_write_lsn.items()
            ],
            bad=idx.bad_runs(),
            pins=sorted((g, sid, lsn) for (g, sid), lsn in idx.snaps.items()),
            hist=[(e, b, n, r.seg, r.off, r.block, r.count, r.lsn, until, r.flags)
                  for e, b, n, r, until in idx.hist_runs()],
            marks=[(m.seg, m.off, m.rtype, m.group, m.snap_id, m.lsn, m.pinned_lsn)
                   for sid in sorted(idx.segs) for m in idx.segs[sid].marks.values()],
        )
        raw = encode_checkpoint(ck)
        tmp = os.path.join(self.directory, CHECKPOINT_TMP_NAME)
        f = self.disk.open_file(tmp, create=True)
        try:
            f.truncate(0)
            f.pwrite(raw, 0)
            f.fdatasync()
        except BaseException as e:
            f.close()
            try:
                self.disk.remove(tmp)
            except OSError:
                pass
            if _is_enospc(e):
                log.warning("engine.no_space", op="checkpoint")
                raise NoSpaceError(f"no space for a checkpoint: {e}") from e
            raise
        f.close()
        self.disk.rename(tmp, os.path.join(self.directory, CHECKPOINT_NAME))
        self.disk.fsync_dir(self.directory)
        self.checkpoint_lsn = ck.checkpoint_lsn
        self._bytes_since_checkpoint = 0
        log.info("engine.checkpoint", lsn=ck.checkpoint_lsn, bytes=len(raw), runs=len(ck.runs))

    # --- space -----------------------------------------------------------------------------

    def clean(self, budget_bytes: int) -> int:
        """Clean the emptiest segments, rewriting at most ~budget_bytes (at least one record)."""
        self._check_open()
        self.maybe_checkpoint()
        n = self._evacuate(budget_bytes)
        if n < budget_bytes:
            n += self._cleaner.clean(budget_bytes - n)
        self.cleaned_bytes += n
        return n

    def _evacuate(self, budget_bytes: int) -> int:
        """Copy linked blocks out of held WAL segments that are due (EngineConfig.wal_held_bytes_max), as
        WRITE records; the WAL releases a segment once wal_refs() says nothing needs it."""
        written = 0
        for seq, _size, live, due in self._held():
            if live and due:
                recs = sorted(self._wal_links.get(seq, ()), key=lambda r: r.tgt or (0, 0))
                n = evacuate(self, recs, budget_bytes - written)
                written += n
                self.evacuated_bytes += n
                if self.linked_live_bytes(seq) == 0:
                    log.info("engine.wal_segment_evacuated", wal_seq=seq)
                if written >= budget_bytes:
                    break
        return written

    def _held(self) -> list[tuple[int, int, int, bool]]:
        """(seq, bytes, linked live bytes, due) of every held WAL segment, oldest first. Due: evacuation
        acts on it (its live part is at most 1 - cleaning_garbage_ratio, or the held segments from it on
        exceed wal_held_bytes_max)."""
        if self._wal is None:
            return []
        held = sorted(self._wal.held_segments())
        total = sum(size for _seq, size in held)
        limit = 1.0 - self.config.cleaning_garbage_ratio
        out = []
        for seq, size in held:
            live = self.linked_live_bytes(seq)
            out.append((seq, size, live, total > self.config.wal_held_bytes_max or live <= limit * size))
            total -= size
        return out

    # --- the cleaning seam (storage/cleaner.py SegmentStore) --------------------------------

    def active_segment_id(self) -> int | None:
        return self._active.seg_id if self._active is not None else None

    def cleanable(self, sid: int) -> bool:
        """A segment the cleaner may copy from: open, and nothing in it waits for a sync."""
        return sid in self._files and sid not in self._dirty

    def read_stored(self, rec: Rec, payload: bool = True) -> tuple[RecordHeader, bytes, list[int]] | str:
        """Read and check the record `rec` points at (segment.read_record). A LINK comes back in a WRITE's
        layout (header, CRC array, payload read from its WAL segment and checked) unless `payload` is
        false (then: the LINK record itself)."""
        got = read_record(self._files[rec.seg], self._seeds[rec.seg], rec.off)
        if isinstance(got, str) or rec.tgt is None or not payload:
            return got
        hdr, body, _ = got
        wf = self._wal.wal_file(rec.tgt[0]) if self._wal is not None else None
        if wf is None:
            return f"linked WAL segment {rec.tgt[0]} missing"
        data = wf.pread(hdr.count * BLOCK_SIZE, rec.tgt[1])
        if len(data) < hdr.count * BLOCK_SIZE:
            return f"linked WAL segment {rec.tgt[0]} too short"
        pay = payload_offset(hdr.count)
        crcs = struct.unpack_from(f"<{hdr.count}I", body, REC_HEADER_SIZE)
        view = memoryview(data)
        bad = [i for i in range(hdr.count)
               if crc32c.crc32c(view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], 0) != crcs[i]]
        return hdr, bytes(body[:pay]) + data, bad

    def note_link(self, rec: Rec) -> None:
        """A LINK record the cleaner copied (storage/cleaner.py)."""
        self._note_link(rec)

    def append_built(self, length: int, build: Callable[[int, int], bytearray | bytes]) -> tuple[SegState, int, int]:
        """Append a record of `length` bytes that `build(segment seed, durable mark)` frames; returns
        (segment, offset, bytes written)."""
        seg = self._room(length)
        buf = build(self._seeds[seg.seg_id], self._durable_mark)
        return seg, self._append(seg, buf), len(buf)

    def remove_segment(self, sid: int) -> None:
        with self._sync_lock:
            with self._lock:
                f = self._files.pop(sid, None)
                self._seeds.pop(sid, None)
                self._dirty.discard(sid)
                self.index.segs.pop(sid, None)
            if f is not None:
                f.close()
            self.disk.remove(os.path.join(self.directory, segment_name(sid)))
            self.disk.fsync_dir(self.directory)

    # --- snapshot pins (segment.md, "Snapshot pins") -----------------------------------------

    def pin_snapshot(self, group: int, snap_id: int) -> int:
        """Keep the image of extent group `group`'s extents as it is now for snapshot `snap_id`, durably (a
        PIN record: durable with the next sync). Idempotent: an existing pin stays (a replayed SNAP op).
        Returns the pinned LSN."""
        self._check_open()
        if not 0 <= group <= MAX_GROUP:
            raise ValueError(f"group {group} out of range")
        got = self.index.snaps.get((group, snap_id))
        if got is not None:
            return got
        pinned = self.last_lsn
        self._append_mark(REC_PIN, group, snap_id, pinned)
        self.index.snaps[(group, snap_id)] = pinned
        self.index.pin(pinned, group)
        return pinned

    def unpin_snapshot(self, group: int, snap_id: int) -> bool:
        """Drop the pin of snapshot `snap_id` on `group` (an UNPIN record); what only it kept becomes garbage
        for the cleaner. False when it was not pinned (idempotent)."""
        self._check_open()
        pinned = self.index.snaps.get((group, snap_id))
        if pinned is None:
            return False
        self._append_mark(REC_UNPIN, group, snap_id, pinned)
        del self.index.snaps[(group, snap_id)]
        self.index.unpin(pinned, group)
        return True

    def snapshots(self) -> dict[tuple[int, int], int]:
        """(group, snap_id) -> pinned LSN."""
        return dict(self.index.snaps)

    def read_snapshot(self, snap_id: int, extent_id: int, block: int, count: int) -> tuple[bytearray, list[int]]:
        """Blocks of `extent_id` as snapshot `snap_id` of its group keeps them."""
        pinned = self.index.snaps.get((extent_id >> 32, snap_id))
        if pinned is None:
            raise KeyError(f"snapshot {snap_id} is not pinned on group {extent_id >> 32} here")
        return self.read_at(extent_id, block, count, pinned)

    def snapshot_runs(self, snap_id: int, extent_id: int, block: int, count: int,
                      since_snap_id: int = 0) -> list[tuple[int, bool]]:
        """Runs of (length, flag) over [block, block+count) of `extent_id`: with `since_snap_id` 0, whether the
        block is allocated in snapshot `snap_id`; else whether its version there differs from its version in
        snapshot `since_snap_id` (a hole counts as a version: a block trimmed since is changed). From the index
        only: no data is read. KeyError: a snapshot not pinned here."""
        g = extent_id >> 32
        lsn = self.index.snaps.get((g, snap_id))
        if lsn is None:
            raise KeyError(f"snapshot {snap_id} is not pinned on group {g} here")
        old = 0
        if since_snap_id:
            o = self.index.snaps.get((g, since_snap_id))
            if o is None:
                raise KeyError(f"snapshot {since_snap_id} is not pinned on group {g} here")
            old = o
        index = self.index
        emap = index.extents.get(extent_id) or {}
        hist = index.history
        bm = bitmap.Bitmap(count)
        for i in range(count):
            blk = block + i
            if blk not in emap and (extent_id, blk) not in hist:
                continue
            new_rec = index.version_at(extent_id, blk, lsn)
            if since_snap_id:
                old_rec = index.version_at(extent_id, blk, old)
                flag = (new_rec is None) != (old_rec is None) or (
                    new_rec is not None and old_rec is not None and new_rec.lsn != old_rec.lsn)
            else:
                flag = new_rec is not None
            if flag:
                bm.set_range(i, 1)
        return _runs(bm, count)

    def snapshot_stats(self, group: int) -> dict[int, int]:
        """snap_id -> blocks of `group` only that snapshot keeps (the old versions deleting it frees)."""
        index = self.index
        by_lsn: dict[int, list[int]] = {}
        for (g, sid), lsn in index.snaps.items():
            if g == group:
                by_lsn.setdefault(lsn, []).append(sid)
        out = {sid: 0 for sids in by_lsn.values() for sid in sids}
        counts: dict[int, int] = {}
        for g in (group, GLOBAL):
            for lsn, n in index.pins.get(g, {}).items():
                counts[lsn] = counts.get(lsn, 0) + n
        lsns = sorted(counts)
        for (eid, _blk), entries in index.history.items():
            if eid >> 32 != group:
                continue
            for rec, until in entries:
                i = bisect.bisect_left(lsns, rec.lsn)
                if i + 1 < len(lsns) and lsns[i + 1] < until:
                    continue  # kept by two pins or more
                if i < len(lsns) and lsns[i] < until and counts[lsns[i]] == 1 and len(by_lsn.get(lsns[i], ())) == 1:
                    out[by_lsn[lsns[i]][0]] += 1
        return out

    def _append_mark(self, rtype: int, group: int, snap_id: int, pinned: int) -> None:
        length = record_length(rtype, 0)
        seg = self._room(length)
        lsn = self.last_lsn + 1
        buf = build_mark_record(self._seeds[seg.seg_id], rtype, group, snap_id, lsn, self._durable_mark, pinned)
        off = self._append(seg, buf)
        with self._lock:
            self.last_lsn = lsn
        seg.marks[off] = Mark(seg.seg_id, off, rtype, group, snap_id, lsn, pinned)

    def pin(self, lsn: int) -> None:
        """Keep, for cleaning, the newest version <= lsn of every block that is current now.

        Versions already superseded before the call are not protected: pin last_lsn (snapshots do).
        """
        if lsn > self.last_lsn:
            raise ValueError("cannot pin a future LSN")
        self.index.pin(lsn)

    def unpin(self, lsn: int) -> None:
        self.index.unpin(lsn)

    def space(self) -> tuple[int, int]:
        """(live bytes, dead bytes) of the segments, from the index alone (no file system call)."""
        segs = [s for s in self.index.segs.values() if s.seg_id in self._files]
        used = sum(s.end for s in segs)
        live = sum(s.live_bytes() for s in segs)
        # A held WAL segment's dead bytes count only once evacuation would act on it: a mostly live one is
        # no more garbage than a mostly live engine segment, and counting it would keep the cleaning pace
        # "behind" for nothing.
        for _seq, size, linked, due in self._held():
            used += size
            live += linked if due else size
        return live, max(0, used - live)

    def stats(self) -> dict[str, int]:
        on_disk = 0
        for f in list(self._files.values()):
            try:
                on_disk += f.size()
            except OSError:
                pass
        ck = os.path.join(self.directory, CHECKPOINT_NAME)
        if self.disk.exists(ck):
            try:
                cf = self.disk.open_file(ck, create=False)
                on_disk += cf.size()
                cf.close()
            except OSError:
                pass
        used = sum(s.end for s in self.index.segs.values() if s.seg_id in self._files)
        held = sum(size for _seq, size in self._wal.held_segments()) if self._wal is not None else 0
        on_disk += held
        return {
            "bytes_on_disk": on_disk,  # the held WAL segments included (write-once)
            "bytes_used": used,
            "live_bytes": self.index.live_bytes(),
            "garbage_bytes": max(0, used - self.index.live_bytes()),
            "segments": len(self._files),
            "blocks_allocated": self.index.blocks_allocated,
            "pinned_bytes": self.index.hist_blocks * BLOCK_SIZE,  # old versions kept for snapshots
            "bad_blocks": sum(len(b) for b in self.index.bad.values()),
            "last_lsn": self.last_lsn,
            "synced_lsn": self.synced_lsn,
            "checkpoint_lsn": self.checkpoint_lsn,
            "pins": sum(n for ps in self.index.pins.values() for n in ps.values()),
            "cleaned_bytes": self.cleaned_bytes,  # rewritten by the cleaner since the engine opened
            "evacuated_bytes": self.evacuated_bytes,  # of which copied out of held WAL segments
            "linked_blocks": sum(s.link_blocks for s in self.index.segs.values()),
        }

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.checkpoint()  # syncs first
            active = self._active
            if active is not None and self.config.preallocate:
                f = self._files[active.seg_id]
                f.truncate(active.end)  # give back the preallocated tail
                f.fdatasync()
        finally:
            self._closed = True
            self._close_files()

    def _close_files(self) -> None:
        with self._sync_lock:
            with self._lock:
                files = list(self._files.values())
                self._files = {}
            for f in files:
                try:
                    f.close()
                except OSError:
                    pass
        self._closed = True


def _runs(bm: Any, count: int) -> list[tuple[int, bool]]:
    """(length, set) runs covering the `count` bits of `bm`."""
    runs: list[tuple[int, bool]] = []
    pos = 0
    for start, n in bm.runs(True):
        if start > pos:
            runs.append((start - pos, False))
        runs.append((n, True))
        pos = start + n
    if pos < count:
        runs.append((count - pos, False))
    return runs
