# The node's one write-ahead log, shared by all its extent groups (format: docs/format/wal.md).
#
# Owns: the WAL segment files of one node directory, the per-group durable Raft state they encode
# (hard state, snapshot/compaction point, log entries), and their recovery.
#
# Rules:
# 1. All file access goes through the Disk port (raftblock.storage.disk), so VolatileDisk's power cut
#    (kill -9 loses unsynced data, optionally tearing it) applies to the WAL too.
# 2. Appends (loop thread) only buffer records; `flush()` writes the buffer with one pwrite; `sync()`
#    (one worker thread, one at a time) fdatasyncs every segment written since the last sync, so one
#    fdatasync covers the records of every group appended before it started (group commit).
# 3. A record is durable once `synced_pos` >= the position `flush()` returned for it.
# 4. Recovery: a bad or short record in the newest segment is a torn tail (cut there); in an older
#    segment it is corruption (WalCorruptError: the node must be repaired from its peers, not guess).
# 5. Every segment starts with the state of every group at roll time (COMPACT + HARD_STATE records),
#    so an old segment can be deleted once every entry it holds is behind its group's durable
#    compaction point. Deletion (`reap()`, or the next `sync()`) touches only segments gc() dropped,
#    which are neither active nor dirty, so no fdatasync is running on them; the runtime reaps on a
#    thread of its own so a slow unlink never delays a group commit.
# 6. Write-once (docs/format/write-once.md), when `write_once_min_bytes` > 0: the payload of every WRITE op
#    of at least that size is cut out of its entry and placed after the record's entries (an
#    ENTRIES_PAYLOADS record; the payloads together on a 4 KiB boundary when 64 KiB or more), and
#    `take_link` tells apply where it is once it is durable, so the engine links to it instead of writing
#    it again. A segment gc() drops while the engine still links into it (`link_holder`) is renamed
#    *.held and kept, out of replay, until the engine no longer needs it; then it is released as usual.
# 7. A roll lays the new segment out at once (records appended from then on get positions and write-once
#    offsets in it) but creates nothing on disk until a sync that started after the roll has returned: the
#    segment left behind is then durable to its last byte (its size too: a recycled file is cut first), so
#    a power cut never leaves a torn tail in a segment that is no longer the newest (recovery would call it
#    corruption), and no fdatasync ever runs on the loop for a roll. Meanwhile flush() keeps the new
#    segment's records buffered; what waits on them waits one group commit more, once per segment.
from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import crc32c
import structlog

from raftblock.obs.histogram import FSYNC_BUCKETS, Histogram
from raftblock.replication.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    NodeId,
    Snapshot,
    SnapshotMeta,
)
from raftblock.storage.disk import Disk, DiskFile, write_parts
from raftblock.wire.ops import write_spans

log = structlog.get_logger(__name__)

SEG_MAGIC = b"RBWAL003"  # version 3: ENTRIES_SPLIT records may appear
SEG_MAGIC_V2 = b"RBWAL002"  # still read: records' CRCs seeded with the segment's seq, as in version 3
SEG_MAGIC_V1 = b"RBWAL001"  # still read: CRC seed 0
SEG_HEADER = struct.Struct("<8sQ")  # magic, segment sequence number
FREE_SEGMENTS_MAX = 2  # released segment files kept (renamed *.free) for the next rolls to overwrite
REC_HEADER = struct.Struct("<IIBQ")  # crc32c, body_len, type, group
_ENTRY = struct.Struct("<QQBI")  # term, index, type, data_len
_HS = struct.Struct("<QQQ")  # term, vote, commit
_META = struct.Struct("<QQQH")  # index, term, epoch, voter count
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

REC_ENTRIES = 1
REC_HARD_STATE = 2
REC_SNAPSHOT = 3  # a snapshot installed from the leader: entries before it are gone
REC_COMPACT = 4  # a local compaction point (or a segment's base state): entries <= index are obsolete
REC_ENTRIES_SPLIT = 6  # ENTRIES with each large write payload block-aligned in place (read, no longer written)
REC_ENTRIES_PAYLOADS = 7  # ENTRIES with their write payloads cut out and placed together after them (write-once)
ALIGN_MIN_BYTES = 64 << 10  # payload areas this large start on a 4 KiB boundary of the file
RECORD_BODY_BYTES_MAX = 256 << 20
_PIECE = struct.Struct("<BI")  # kind (0 inline, 1 aligned), length
_PAD = struct.Struct("<H")  # an aligned piece's pad length
_PIECES = struct.Struct("<H")
ALIGN = 4096
_ZEROS = bytes(ALIGN)


class Link:
    """Where the large payloads of one appended entry lie in the WAL (write-once)."""

    __slots__ = ("term", "seq", "end_pos", "min_bytes", "spans")

    def __init__(self, term: int, seq: int, end_pos: int, min_bytes: int, spans: list[tuple[int, int, int]]) -> None:
        self.term = term
        self.seq = seq  # WAL segment
        self.end_pos = end_pos  # durable once synced_pos >= this
        self.min_bytes = min_bytes
        self.spans = spans  # (offset in the entry's data, length, offset in the segment file), op order


class WalCorruptError(Exception):
    pass


def segment_name(seq: int) -> str:
    return f"wal-{seq:016x}.log"


def _seed(seq: int) -> int:
    return crc32c.crc32c(_U64.pack(seq), 0)


def _encode_meta(meta: SnapshotMeta) -> bytes:
    """index, term, epoch, voter count, voters, then (when there is any) u32 length + SnapshotMeta.app."""
    voters = sorted(meta.conf.voters)
    head = _META.pack(meta.index, meta.term, meta.conf.epoch, len(voters)) + b"".join(_U64.pack(v) for v in voters)
    if meta.app:
        return head + _U32.pack(len(meta.app)) + meta.app
    return head


def _decode_meta(body: memoryview) -> SnapshotMeta:
    index, term, epoch, n = _META.unpack_from(body, 0)
    voters = frozenset(NodeId(_U64.unpack_from(body, _META.size + 8 * k)[0]) for k in range(n))
    off = _META.size + 8 * n
    app = b""
    if len(body) > off:
        (alen,) = _U32.unpack_from(body, off)
        if off + _U32.size + alen != len(body):
            raise WalCorruptError("snapshot meta: app length does not match the record")
        app = bytes(body[off + _U32.size :])
    return SnapshotMeta(index, term, ConfState(voters, epoch), app)


class GroupDurable:
    """One group's state as recovered from the WAL."""

    __slots__ = ("hard_state", "snap", "entries")

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snap: SnapshotMeta | None = None
        self.entries: list[Entry] = []

    def _append(self, ents: list[Entry]) -> None:
        if not ents:
            return
        first = ents[0].index
        cur = self.entries
        if cur and cur[0].index <= first <= cur[-1].index + 1:
            del cur[first - cur[0].index :]
            cur.extend(ents)
        else:
            # Empty, or a gap: what came before is behind a compaction point recorded later (checked
            # at the end of recovery).
            self.entries = list(ents)

    def _compact(self, meta: SnapshotMeta) -> None:
        if self.snap is None or meta.index >= self.snap.index:
            self.snap = meta
        idx = self.snap.index
        self.entries = [e for e in self.entries if e.index > idx]

    def _install(self, meta: SnapshotMeta) -> None:
        self.snap = meta
        self.entries = []

    def _finish(self, group: int) -> None:
        base = self.snap.index if self.snap is not None else 0
        self.entries = [e for e in self.entries if e.index > base]
        if self.entries and self.entries[0].index != base + 1:
            raise WalCorruptError(
                f"group {group}: log starts at {self.entries[0].index}, snapshot at {base} (entries missing)"
            )
        last = self.entries[-1].index if self.entries else base
        if self.hard_state.commit > last:
            # A commit index beyond the durable log cannot be trusted; Raft relearns it.
            self.hard_state = HardState(self.hard_state.term, self.hard_state.vote, last)


class _Segment:
    __slots__ = ("seq", "path", "file", "size", "max_index", "head_pos", "phys")

    def __init__(self, seq: int, path: str, file: DiskFile | None, size: int) -> None:
        self.head_pos = 0  # WAL position after this segment's base records
        self.seq = seq
        self.path = path
        self.file = file  # None while the roll that laid it out waits (rule 7)
        self.size = size
        self.phys = size  # bytes in the file (more than `size` in a recycled file until the roll cuts it)
        self.max_index: dict[int, int] = {}  # group -> highest entry index in this segment


class Wal:
    def __init__(self, disk: Disk, directory: str, segment_bytes_max: int) -> None:
        # Use Wal.open().
        self.disk = disk
        self.directory = directory
        self.segment_bytes_max = segment_bytes_max
        self._segments: list[_Segment] = []
        self._buf: list[bytes | memoryview] = []
        self._buf_bytes = 0
        self._lock = threading.Lock()  # guards _dirty, _dir_dirty, _to_remove, flushed_pos
        self._sync_lock = threading.Lock()  # one sync at a time; file removal only under it
        self._dirty: set[int] = set()  # segment seqs written since the last sync
        self._dir_dirty = False
        self._to_remove: list[_Segment] = []
        self.appended_pos = 0  # total bytes appended (buffered included); positions are in this space
        self.flushed_pos = 0
        self.synced_pos = 0
        self.syncs = 0
        self.sync_seconds = Histogram(FSYNC_BUCKETS)  # raftblock_node_wal_fdatasync_seconds
        self._hs: dict[int, HardState] = {}  # last hard state written, per group
        self._snap: dict[int, SnapshotMeta] = {}  # last snapshot/compaction meta written, per group
        # (position, group, index, seq of the segment of a SNAPSHOT record, else 0) not yet durable
        self._pending_snap: list[tuple[int, int, int, int]] = []
        self.durable_snap: dict[int, int] = {}  # group -> compaction index known durable
        self.segments_removed = 0
        self._seed = 0  # CRC seed of the active segment's records
        # Released segment files, renamed <name>.free and kept open, overwritten by the next rolls:
        # appending into blocks already allocated and written makes each fdatasync a data-only flush (no
        # journal commit, no block allocation), about half the latency on ext4 here.
        self._free: list[tuple[str, DiskFile, int]] = []
        self.recycled_rolls = 0
        # Write-once (rule 6).
        self.write_once_min_bytes = 0
        self.link_holder: Callable[[int], bool] | None = None
        self._links: dict[int, dict[int, Link]] = {}  # group -> entry index -> where its payloads are
        self._held: dict[int, _Segment] = {}  # seq -> segment dropped by gc() but linked into
        self.links_made = 0
        self.first_new_seq = 1  # the first segment this process created (Wal.open sets it)
        # Rule 7: syncs are numbered as they start; the laid-out segment is written once sync number
        # `_roll_gate` has returned.
        self._syncs_started = 0
        self._syncs_done = 0
        self._roll_gate = 0
        self._unwritten: _Segment | None = None

    # --- open / recovery --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, disk: Disk, directory: str, segment_bytes_max: int = 64 << 20
    ) -> tuple[Wal, dict[int, GroupDurable]]:
        disk.makedirs(directory)
        wal = cls(disk, directory, segment_bytes_max)
        for n in disk.listdir(directory):
            if n.startswith("wal-") and n.endswith(".free"):
                disk.remove(os.path.join(directory, n))  # kept for reuse by a process that is gone
        for n in disk.listdir(directory):
            if n.startswith("wal-") and n.endswith(".held"):
                seq = int(n[4:-5], 16)
                path = os.path.join(directory, n)
                f = disk.open_file(path, create=False)
                wal._held[seq] = _Segment(seq, path, f, f.size())
        names = [n for n in disk.listdir(directory) if n.startswith("wal-") and n.endswith(".log")]
        seqs = sorted(int(n[4:-4], 16) for n in names)
        groups: dict[int, GroupDurable] = {}
        torn_bytes = 0
        for k, seq in enumerate(seqs):
            last = k == len(seqs) - 1
            path = os.path.join(directory, segment_name(seq))
            f = disk.open_file(path, create=False)
            seg = _Segment(seq, path, f, f.size())
            end = wal._replay(seg, groups, last)
            if end < SEG_HEADER.size:
                # Torn at its creation (only the newest can be: rule 4), so nothing in it was durable. Cut to
                # nothing and kept, it would be an older segment without a header at the next open
                # (WalCorruptError): it goes instead.
                torn_bytes += seg.size
                f.close()
                disk.remove(path)
                disk.fsync_dir(directory)
                continue
            if end < seg.size:
                torn_bytes += seg.size - end
                f.truncate(end)
                f.fdatasync()
                seg.size = seg.phys = end
            wal._segments.append(seg)
        for g, st in groups.items():
            st._finish(g)
            if st.snap is not None:
                wal._snap[g] = st.snap
                wal.durable_snap[g] = st.snap.index
            wal._hs[g] = st.hard_state
        # Never append to a segment that was active when the process died: start a new one.
        wal.first_new_seq = max([*seqs, *wal._held, 0]) + 1
        wal._roll(wal.first_new_seq)
        wal.settle()
        log.info(
            "wal.recovered",
            directory=directory,
            segments=len(seqs),
            groups=len(groups),
            entries=sum(len(s.entries) for s in groups.values()),
            torn_tail_bytes=torn_bytes,
        )
        return wal, groups

    def _replay(self, seg: _Segment, groups: dict[int, GroupDurable], last: bool) -> int:
        """Apply the records of one segment; returns the offset where valid records end."""
        assert seg.file is not None
        raw = seg.file.pread(seg.size, 0)
        view = memoryview(raw)

        def bad(off: int, why: str) -> int:
            if last:
                log.warning("wal.torn_tail", segment=seg.path, offset=off, reason=why, cut_bytes=len(raw) - off)
                return off
            raise WalCorruptError(f"{seg.path} at offset {off}: {why}")

        if len(raw) < SEG_HEADER.size:
            return bad(0, "short segment header")
        magic, seq = SEG_HEADER.unpack_from(view, 0)
        if magic not in (SEG_MAGIC, SEG_MAGIC_V2, SEG_MAGIC_V1) or seq != seg.seq:
            return bad(0, "bad segment header")
        seed = 0 if magic == SEG_MAGIC_V1 else _seed(seq)
        off = SEG_HEADER.size
        while off < len(raw):
            if off + REC_HEADER.size > len(raw):
                return bad(off, "short record header")
            crc, blen, rtype, group = REC_HEADER.unpack_from(view, off)
            end = off + REC_HEADER.size + blen
            if blen > RECORD_BODY_BYTES_MAX or end > len(raw):
                return bad(off, "record runs past the end")
            if crc32c.crc32c(view[off + 4 : end], seed) != crc:
                return bad(off, "record checksum mismatch")
            body = view[off + REC_HEADER.size : end]
            st = groups.get(group)
            if st is None:
                st = groups[group] = GroupDurable()
            if rtype in (REC_ENTRIES, REC_ENTRIES_SPLIT, REC_ENTRIES_PAYLOADS):
                try:
                    if rtype == REC_ENTRIES_PAYLOADS:
                        ents = _decode_payloads(body)
                    else:
                        ents = _decode_entries(body, split=rtype == REC_ENTRIES_SPLIT)
                except (struct.error, ValueError) as e:
                    return bad(off, f"malformed entries record: {e}")
                if any(ents[k].index != ents[k - 1].index + 1 for k in range(1, len(ents))):
                    # append_entries writes consecutive entries; Raft's log has no gaps
                    return bad(off, "malformed entries record: indexes not consecutive")
                st._append(ents)
                if ents:
                    prev = seg.max_index.get(group, 0)
                    seg.max_index[group] = max(prev, ents[-1].index)
            elif rtype == REC_HARD_STATE:
                if len(body) < _HS.size:
                    return bad(off, "malformed hard state record")
                t, v, c = _HS.unpack_from(body, 0)
                st.hard_state = HardState(t, NodeId(v), c)
            elif rtype in (REC_SNAPSHOT, REC_COMPACT):
                try:
                    meta = _decode_meta(body)
                except (struct.error, WalCorruptError) as e:
                    return bad(off, f"malformed snapshot meta record: {e}")
                if rtype == REC_SNAPSHOT:
                    st._install(meta)
                    # The group's earlier entries, here and in older segments, no longer pin anything.
                    seg.max_index.pop(group, None)
                    for older in self._segments:
                        older.max_index.pop(group, None)
                else:
                    st._compact(meta)
            else:
                return bad(off, f"unknown record type {rtype}")
            off = end
        return off

    # --- append side (event-loop thread) ----------------------------------------------------------------
    def _record(self, rtype: int, group: int, body: list[bytes | memoryview]) -> int:
        blen = sum(len(b) for b in body)
        head = bytearray(REC_HEADER.pack(0, blen, rtype, group))
        crc = crc32c.crc32c(memoryview(head)[4:], self._seed)
        for b in body:
            crc = crc32c.crc32c(b, crc)
        struct.pack_into("<I", head, 0, crc)
        self._buf.append(bytes(head))
        self._buf.extend(body)
        n = len(head) + blen
        self._buf_bytes += n
        self.appended_pos += n
        return self.appended_pos

    def append_entries(self, group: int, entries: list[Entry]) -> int:
        if not entries:
            return self.appended_pos
        links = self._links.get(group)
        if links:
            for e in entries:
                links.pop(e.index, None)  # an entry appended again (a new leader's) is another entry
        if self.write_once_min_bytes:
            pos = self._append_split(group, entries)
            if pos:
                return pos
        body: list[bytes | memoryview] = [struct.pack("<I", len(entries))]
        for e in entries:
            body.append(_ENTRY.pack(e.term, e.index, int(e.type), len(e.data)))
            if e.data:
                body.append(e.data)
        seg = self._segments[-1]
        prev = seg.max_index.get(group, 0)
        seg.max_index[group] = max(prev, entries[-1].index)
        return self._record(REC_ENTRIES, group, body)

    def _append_split(self, group: int, entries: list[Entry]) -> int:
        """An ENTRIES_PAYLOADS record when some entry holds a write payload of at least write_once_min_bytes
        (returns its position), else 0 (the caller writes a plain ENTRIES record): the entries with those
        payloads cut out, then the payloads back to back, on a 4 KiB boundary of the file when they add
        up to ALIGN_MIN_BYTES or more (a pad of zeros before them)."""
        min_b = self.write_once_min_bytes
        found = [write_spans(e.data, min_b) if e.type == EntryType.NORMAL and len(e.data) >= min_b else []
                 for e in entries]
        if not any(found):
            return 0
        seg = self._segments[-1]
        body: list[bytes | memoryview] = [struct.pack("<I", len(entries))]
        payloads: list[memoryview] = []
        head = 4
        for e, spans in zip(entries, found, strict=True):
            data = memoryview(e.data)
            pieces: list[bytes | memoryview] = []
            cur = 0
            for start, length in spans:
                if start > cur:
                    pieces.append(_PIECE.pack(0, start - cur))
                    pieces.append(data[cur:start])
                    head += _PIECE.size + start - cur
                pieces.append(_PIECE.pack(1, length))
                head += _PIECE.size
                payloads.append(data[start : start + length])
                cur = start + length
            if cur < len(data):
                pieces.append(_PIECE.pack(0, len(data) - cur))
                pieces.append(data[cur:])
                head += _PIECE.size + len(data) - cur
            npieces = len(pieces) - sum(1 for p in pieces if isinstance(p, memoryview))
            body.append(_ENTRY.pack(e.term, e.index, int(e.type), len(data)) + _PIECES.pack(npieces))
            head += _ENTRY.size + _PIECES.size
            body.extend(pieces)
        area = sum(len(p) for p in payloads)
        pos = seg.size + self._buf_bytes + REC_HEADER.size + head + _PAD.size  # where a pad would start
        pad = -pos % ALIGN if area >= ALIGN_MIN_BYTES else 0
        body.append(_PAD.pack(pad))
        if pad:
            body.append(_ZEROS[:pad])
        pos += pad
        body.extend(payloads)
        end = self._record(REC_ENTRIES_PAYLOADS, group, body)
        prev = seg.max_index.get(group, 0)
        seg.max_index[group] = max(prev, entries[-1].index)
        links = self._links.get(group)
        if links is None:
            links = self._links[group] = {}
        for e, spans in zip(entries, found, strict=True):
            if spans:
                placed = []
                for start, length in spans:
                    placed.append((start, length, pos))
                    pos += length
                links[e.index] = Link(e.term, seg.seq, end, min_b, placed)
        return end

    def take_link(self, group: int, index: int, term: int) -> Link | None:
        """Where entry `index` (of `term`) of `group` has its large payloads, if they are durable now
        (write-once rule 1); forgotten after this call either way (apply asks once)."""
        links = self._links.get(group)
        if not links:
            return None
        link = links.pop(index, None)
        if link is None or link.term != term or self.synced_pos < link.end_pos:
            return None
        self.links_made += 1
        return link

    def wal_file(self, seq: int) -> DiskFile | None:
        """The open file of segment `seq` (live or held), for the engine's reads of linked blocks."""
        held = self._held.get(seq)
        if held is not None:
            return held.file
        for seg in self._segments:
            if seg.seq == seq:
                return seg.file
        return None

    def recovered_file(self, seq: int) -> DiskFile | None:
        """As wal_file, for the engine's recovery: a segment this process created cannot hold what a LINK
        written before it points at (a WAL directory emptied under an engine would reuse seqs)."""
        return None if seq >= self.first_new_seq else self.wal_file(seq)

    def held_segments(self) -> list[tuple[int, int]]:
        """(seq, bytes) of the segments kept only because the engine links into them."""
        return [(seq, seg.size) for seq, seg in list(self._held.items())]

    def set_hard_state(self, group: int, hs: HardState) -> int:
        self._hs[group] = hs
        return self._record(REC_HARD_STATE, group, [_HS.pack(hs.term, hs.vote, hs.commit)])

    def install_snapshot(self, group: int, meta: SnapshotMeta) -> int:
        """The group's log is dropped (a snapshot installed, or the replica discarded: an empty one).
        Its entries in this segment stop pinning it now (the segment goes only once all of it, this
        record included, is durable); in older segments, once this record is durable (gc)."""
        self._snap[group] = meta
        self._links.pop(group, None)
        seg = self._segments[-1]
        seg.max_index.pop(group, None)
        pos = self._record(REC_SNAPSHOT, group, [_encode_meta(meta)])
        self._pending_snap.append((pos, group, meta.index, seg.seq))
        return pos

    def compact(self, group: int, meta: SnapshotMeta) -> int:
        self._snap[group] = meta
        links = self._links.get(group)
        if links:
            for idx in [i for i in links if i <= meta.index]:
                del links[idx]
        pos = self._record(REC_COMPACT, group, [_encode_meta(meta)])
        self._pending_snap.append((pos, group, meta.index, 0))
        return pos

    def forget(self, group: int) -> int:
        """A deleted group (its volume is gone from the map): record it empty, then stop carrying its state
        into new segments. Once the older segments are gone it is absent from the WAL; until then
        recovery finds it empty. Returns the record's position (durable once synced)."""
        pos = self.install_snapshot(group, SnapshotMeta(0, 0, ConfState(frozenset(), 0)))
        self._snap.pop(group, None)
        self._hs.pop(group, None)
        return pos

    def flush(self) -> int:
        """Write the buffered records (one pwritev, not joined first); roll to a new segment when the
        active one is full. While a roll waits (rule 7) the records stay buffered."""
        if self._unwritten is not None:
            if self._syncs_done < self._roll_gate:
                return self.flushed_pos
            self._create(self._unwritten)
        if self._buf:
            seg = self._segments[-1]
            assert seg.file is not None
            size = self._buf_bytes
            # The buffer is dropped only once it is written: a write that fails (ENOSPC: the disk is
            # full) is retried later at the same offset, over whatever part of it reached the file.
            write_parts(seg.file, self._buf, seg.size)
            self._buf = []
            self._buf_bytes = 0
            seg.size += size
            if seg.size > seg.phys:
                seg.phys = seg.size
            with self._lock:
                self._dirty.add(seg.seq)
                self.flushed_pos = self.appended_pos
            if seg.size >= self.segment_bytes_max:
                self._roll(seg.seq + 1)
                self.flush()
        return self.flushed_pos

    def _roll(self, seq: int) -> None:
        """Rule 7: lay the next segment out; _create() puts it on disk once the one left is durable."""
        if self._segments:
            prev = self._segments[-1]
            if prev.phys > prev.size:
                # A recycled file ends where its records end before the next segment exists: recovery
                # reads an older segment to its end and calls anything unreadable corruption.
                assert prev.file is not None
                prev.file.truncate(prev.size)
                prev.phys = prev.size
        path = os.path.join(self.directory, segment_name(seq))
        seg = _Segment(seq, path, None, SEG_HEADER.size)
        self._seed = _seed(seq)
        with self._lock:
            if self._segments:
                self._dirty.add(self._segments[-1].seq)  # the sync the roll waits for covers its size too
            self._segments.append(seg)
            self._roll_gate = self._syncs_started + 1
        self._unwritten = seg
        # The base state of every group, so older segments can go once their entries are compacted.
        for g, meta in self._snap.items():
            self._record(REC_COMPACT, g, [_encode_meta(meta)])
        for g, hs in self._hs.items():
            self._record(REC_HARD_STATE, g, [_HS.pack(hs.term, hs.vote, hs.commit)])
        seg.head_pos = self.appended_pos
        log.info("wal.roll", segment=segment_name(seq), groups=len(self._hs))

    def _create(self, seg: _Segment) -> None:
        """The laid-out segment's file (a released one reused when there is one), with its header."""
        if seg.file is None:
            with self._lock:
                free = self._free.pop() if self._free else None
            if free is not None:
                free_path, f, phys = free
                self.disk.rename(free_path, seg.path)  # made durable by the next sync's fsync_dir
                self.recycled_rolls += 1
            else:
                f = self.disk.open_file(seg.path, create=True)
                f.truncate(0)
                phys = 0
            seg.file = f
            seg.phys = max(phys, SEG_HEADER.size)
            with self._lock:
                self._dir_dirty = True
        seg.file.pwrite(SEG_HEADER.pack(SEG_MAGIC, seg.seq), 0)
        with self._lock:
            self._dirty.add(seg.seq)
        self._unwritten = None

    def settle(self, remove: bool = True) -> int:
        """Flush and sync until everything appended is durable (a roll's wait included: rule 7)."""
        while True:
            self.flush()
            synced = self.sync(remove)
            if self._unwritten is None and not self._buf and synced >= self.appended_pos:
                return synced

    # --- durability (worker thread) ------------------------------------------------------------------------
    def sync(self, remove: bool = True) -> int:
        """fdatasync everything flushed before the call; remove segments queued by gc() (unless
        `remove` is false: then reap() does). Any thread."""
        with self._sync_lock:
            with self._lock:
                self._syncs_started += 1
                number = self._syncs_started
                target = self.flushed_pos
                dirty = self._dirty
                self._dirty = set()
                need_dir = self._dir_dirty
                self._dir_dirty = False
                if remove:
                    to_remove, self._to_remove = self._to_remove, []
                else:
                    to_remove = []
                files = [s.file for s in self._segments if s.seq in dirty and s.file is not None]
            try:
                t0 = time.perf_counter()
                for f in files:
                    f.fdatasync()
                if need_dir:
                    self.disk.fsync_dir(self.directory)
                if files or need_dir:
                    self.sync_seconds.observe(time.perf_counter() - t0)
            except BaseException:
                with self._lock:
                    self._dirty |= dirty
                    self._dir_dirty |= need_dir
                    self._to_remove = to_remove + self._to_remove
                raise
            for seg in to_remove:
                self._release(seg)
            if to_remove:
                self.disk.fsync_dir(self.directory)
            with self._lock:
                if target > self.synced_pos:
                    self.synced_pos = target
                self._syncs_done = number
                self.syncs += 1
                self.segments_removed += len(to_remove)
                return self.synced_pos

    def _release(self, seg: _Segment) -> None:
        """A segment gc() dropped: kept for reuse (renamed *.free, still open) while fewer than
        FREE_SEGMENTS_MAX are kept, else closed and removed."""
        assert seg.file is not None  # gc() never drops the newest segment (rule 7's is always the newest)
        with self._lock:
            keep = len(self._free) < FREE_SEGMENTS_MAX
        if keep:
            free_path = os.path.join(self.directory, f"wal-{seg.seq:016x}.free")
            self.disk.rename(seg.path, free_path)
            with self._lock:
                self._free.append((free_path, seg.file, seg.phys))
            return
        seg.file.close()
        self.disk.remove(seg.path)

    def reap(self) -> int:
        """Close and remove the segments gc() queued, now (any thread but the sync's own: it may run
        alongside a sync). Returns how many were removed."""
        with self._lock:
            remove = self._to_remove
            self._to_remove = []
        done = 0
        try:
            for seg in remove:
                self._release(seg)
                done += 1
            if remove:
                self.disk.fsync_dir(self.directory)
        except BaseException:
            with self._lock:
                self._to_remove = remove[done:] + self._to_remove  # the next sync() retries them
                self.segments_removed += done
            raise
        with self._lock:
            self.segments_removed += done
        return done

    # --- garbage collection (event-loop thread) ---------------------------------------------------------------
    def gc(self, held: bool = True) -> int:
        """Queue for removal (by the next sync) old segments whose entries are all behind durable
        compaction points; with `held`, also the held segments the engine no longer links into (that check
        reads every link record of every held segment: the node does it once a second, not after every
        sync). Returns how many were queued."""
        synced = self.synced_pos
        keep: list[tuple[int, int, int, int]] = []
        for pos, g, idx, reset_seq in self._pending_snap:
            if pos > synced:
                keep.append((pos, g, idx, reset_seq))
            elif reset_seq:
                # A durable SNAPSHOT record: every entry of the group before it is obsolete, whatever its
                # index (a discarded replica's snapshot is empty, index 0).
                self.durable_snap[g] = idx
                for seg in self._segments:
                    if seg.seq < reset_seq:
                        seg.max_index.pop(g, None)
            elif idx > self.durable_snap.get(g, 0):
                self.durable_snap[g] = idx
        self._pending_snap = keep
        with self._lock:
            dirty = set(self._dirty)
        drop: list[_Segment] = []
        # Only a prefix of the sequence, never the active segment, and only once the next segment's
        # base records (which carry every group's state forward) are durable.
        segs = self._segments
        for k in range(len(segs) - 1):
            seg, nxt = segs[k], segs[k + 1]
            if seg.seq in dirty or nxt.head_pos > synced:
                break
            if any(idx > self.durable_snap.get(g, 0) for g, idx in seg.max_index.items()):
                break
            drop.append(seg)
        release: list[_Segment] = []
        holder = self.link_holder
        done = 0
        for seg in drop:
            if holder is not None and holder(seg.seq):
                try:
                    self._hold(seg)
                except OSError as e:
                    # Left in place (still a live segment, still readable); the next gc tries again.
                    log.warning("wal.hold_failed", segment=segment_name(seg.seq), error=repr(e))
                    break
            else:
                release.append(seg)
            done += 1
        if done:
            with self._lock:
                self._segments = self._segments[done:]
        if holder is not None and held:
            for seq in [q for q in self._held if not holder(q)]:
                release.append(self._held.pop(seq))
                log.info("wal.held_released", segment=segment_name(seq))
        if release:
            with self._lock:
                self._to_remove.extend(release)
        return len(release)

    def _hold(self, seg: _Segment) -> None:
        """Rule 6: out of replay (renamed *.held), kept open for the engine's reads."""
        path = os.path.join(self.directory, f"wal-{seg.seq:016x}.held")
        self.disk.rename(seg.path, path)
        seg.path = path
        self._held[seg.seq] = seg
        with self._lock:
            self._dir_dirty = True
        log.info("wal.segment_held", segment=segment_name(seg.seq), bytes=seg.size)

    def compactions_pending(self) -> bool:
        """A snapshot or compaction record is written but not yet known durable (gc waits for it)."""
        return bool(self._pending_snap)

    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def held_bytes(self) -> int:
        return sum(s.size for s in list(self._held.values()))

    def bytes_on_disk(self) -> int:
        """Segment files as allocated, the released ones kept for reuse included; not the held ones
        (write-once: they hold the engine's data, and the engine counts them)."""
        with self._lock:
            free = sum(phys for _p, _f, phys in self._free)
        return sum(max(s.size, s.phys) for s in self._segments) + free

    def segment_count(self) -> int:
        return len(self._segments)

    def stats(self) -> dict[str, int]:
        return {
            "wal_segments": len(self._segments),
            "wal_bytes": self.total_bytes(),
            "wal_bytes_on_disk": self.bytes_on_disk(),
            "wal_syncs": self.syncs,
            "wal_segments_removed": self.segments_removed,
            "wal_synced_pos": self.synced_pos,
            "wal_recycled_rolls": self.recycled_rolls,
            "wal_held_segments": len(self._held),
            "wal_held_bytes": self.held_bytes(),
            "wal_links_made": self.links_made,
        }

    def close(self) -> None:
        self.settle()
        for s in [*self._segments, *self._held.values()]:
            if s.file is not None:
                s.file.close()
        self._held = {}
        with self._lock:
            free, self._free = self._free, []
        for _path, f, _phys in free:
            f.close()  # removed by the next open
        self._segments = []


def _read_pieces(body: memoryview, off: int, dlen: int) -> tuple[bytes, int]:
    """An ENTRIES_SPLIT entry's data: its pieces joined, pads left out; returns (data, offset after)."""
    (npieces,) = _PIECES.unpack_from(body, off)
    off += _PIECES.size
    parts: list[memoryview] = []
    for _p in range(npieces):
        kind, length = _PIECE.unpack_from(body, off)
        off += _PIECE.size
        if kind == 1:
            (pad,) = _PAD.unpack_from(body, off)
            off += _PAD.size + pad
        elif kind != 0:
            raise ValueError(f"unknown piece kind {kind}")
        if off + length > len(body):
            raise ValueError("piece runs past the record")
        parts.append(body[off : off + length])
        off += length
    data = b"".join(parts)
    if len(data) != dlen:
        raise ValueError("pieces do not add up to the entry's length")
    return data, off


def _decode_payloads(body: memoryview) -> list[Entry]:
    """An ENTRIES_PAYLOADS body: the entries with their kind-1 pieces taken, in order, from the payload
    area after the pad."""
    (n,) = struct.unpack_from("<I", body, 0)
    off = 4
    heads: list[tuple[int, int, int, int, list[memoryview | int]]] = []
    for _ in range(n):
        term, index, etype, dlen = _ENTRY.unpack_from(body, off)
        off += _ENTRY.size
        (npieces,) = _PIECES.unpack_from(body, off)
        off += _PIECES.size
        pieces: list[memoryview | int] = []
        for _p in range(npieces):
            kind, length = _PIECE.unpack_from(body, off)
            off += _PIECE.size
            if kind == 0:
                if off + length > len(body):
                    raise ValueError("piece runs past the record")
                pieces.append(body[off : off + length])
                off += length
            elif kind == 1:
                pieces.append(length)
            else:
                raise ValueError(f"unknown piece kind {kind}")
        heads.append((term, index, etype, dlen, pieces))
    (pad,) = _PAD.unpack_from(body, off)
    off += _PAD.size + pad
    out: list[Entry] = []
    for term, index, etype, dlen, pieces in heads:
        parts: list[memoryview] = []
        for p in pieces:
            if isinstance(p, int):
                if off + p > len(body):
                    raise ValueError("payload runs past the record")
                parts.append(body[off : off + p])
                off += p
            else:
                parts.append(p)
        data = b"".join(parts)
        if len(data) != dlen:
            raise ValueError("pieces do not add up to the entry's length")
        out.append(Entry(term, index, EntryType(etype), data))
    if off != len(body):
        raise ValueError("trailing bytes after the payloads")
    return out


def _decode_entries(body: memoryview, split: bool = False) -> list[Entry]:
    """An ENTRIES body, or an ENTRIES_SPLIT one (`split`)."""
    (n,) = struct.unpack_from("<I", body, 0)
    off = 4
    out: list[Entry] = []
    for _ in range(n):
        term, index, etype, dlen = _ENTRY.unpack_from(body, off)
        off += _ENTRY.size
        if split:
            data, off = _read_pieces(body, off, dlen)
        else:
            if off + dlen > len(body):
                raise ValueError("entry data runs past the record")
            data = bytes(body[off : off + dlen])
            off += dlen
        out.append(Entry(term, index, EntryType(etype), data))
    if off != len(body):
        raise ValueError("trailing bytes after the entries")
    return out


class WalStorage:
    """The core's Storage interface for one group, backed by the shared WAL.

    The snapshot image is not in the WAL: it is the group's extent data in the node's engine, produced
    on demand by `image(meta)` (an object the core can take len() of and slice, see runtime.LazyImage).
    """

    def __init__(
        self,
        wal: Wal,
        group: int,
        recovered: GroupDurable | None,
        bootstrap: SnapshotMeta,
        image: Callable[[SnapshotMeta], Any],
    ) -> None:
        self.wal = wal
        self.group = group
        self._recovered = recovered
        self._image = image
        meta = recovered.snap if recovered is not None and recovered.snap is not None else bootstrap
        self._snap = Snapshot(meta, image(meta))
        self.last_pos = 0  # WAL position of this group's last record

    def load(self) -> tuple[HardState, Snapshot, list[Entry]]:
        rec = self._recovered
        self._recovered = None  # entries live in the core from now on
        if rec is None:
            return HardState(), self._snap, []
        return rec.hard_state, self._snap, rec.entries

    def snapshot(self) -> Snapshot:
        return self._snap

    def install_snapshot(self, snap: Snapshot) -> None:
        self._snap = Snapshot(snap.meta, self._image(snap.meta))
        self.last_pos = self.wal.install_snapshot(self.group, snap.meta)

    def append(self, entries: list[Entry]) -> None:
        if entries:
            self.last_pos = self.wal.append_entries(self.group, entries)

    def set_hard_state(self, hs: HardState) -> None:
        self.last_pos = self.wal.set_hard_state(self.group, hs)

    def compact(self, snap: Snapshot) -> None:
        self._snap = snap
        self.last_pos = self.wal.compact(self.group, snap.meta)
