# Snapshot images of an extent group, read from the engine one chunk at a time (Raft and chain).
#
# An image is: a first section with the client session table (replication/sessions.py), then the group's
# blocks as (u32 length, ops batch)* (docs/format/wire.md, the batch encoding), runs of up to 256 blocks.
#
# Rules:
# 1. Never whole in memory on the sender: the layout (which runs, at which offsets) is fixed when the image
#    is first used, from the engine's index (no data read); the data of a batch is read when a chunk that
#    covers it is asked for, at most `BATCH_BYTES` at a time (one loop turn reads about one chunk).
# 2. Fuzzy, as before: a block's data is read when its chunk is sent, so it may be newer than the image's
#    log position; a block trimmed meanwhile reads as zeros. Replaying the log suffix over the image
#    converges either way (every write and trim after that position is replayed). The sizes do not
#    depend on the data, so the layout holds.
# 3. Installing a received image (`install_image`, both kinds) overwrites blocks, never drops them first,
#    then trims what the image does not hold: a crash part-way leaves each block either as it was or as
#    in the image (newer), and the log replayed from the WAL's older point converges it. It yields the
#    loop every INSTALL_SLICE_BYTES or INSTALL_SLICE_S, and fdatasyncs the engine before it returns (the
#    WAL's snapshot record may only follow a durable image).
# 4. A received image is never held whole in memory (`SpillImage`): its chunks go to a file beside the
#    node's engine as they arrive and are read back a slice at a time by the install; the file is removed
#    once the Ready that carries the image is done (or the stream is dropped), and every file left there
#    by a process that is gone is removed when the node starts.
# 5. Snapshots (docs/snapshots.md section 1) travel in the image: one section per snapshot of the group, in
#    pin order, then the current section. A snapshot's section holds the blocks whose version in it differs
#    from the one in the previous snapshot (the first: every block it has) as WRITEs of that version, the
#    blocks that became holes as TRIMs, and ends with a SNAP op; the current section is the same against
#    the last snapshot, read as late as before (rule 2). Each pinned version is exact: the image holds an
#    in-memory pin on every snapshot's LSN from its layout until it is dropped, so an UNSNAP applied
#    meanwhile cannot free a version the stream still has to send. The install makes the engine's image
#    equal to each snapshot's (writes, trims, and a trim of every block the image does not hold so far)
#    before it pins it, and at the end unpins the group's snapshots the image does not name (deleted
#    before the image's point). Without snapshots the image is what it was: every block, current.
# 6. A chunk sent again (a resend after a gap) whose batch has left the sender's cache is read again, newer
#    (rule 2): the receiver may hold one read's CRCs and another read's data for a block. In the current
#    section such a block is left out (trimmed, counted, logged): the reads differ because a write or trim
#    after the image's point was applied between them, so the log replayed after the install rewrites it. In
#    a snapshot's section every read is of a pinned version and cannot differ: a mismatch there is corruption
#    and fails the install, as any block whose CRC is wrong did before.
from __future__ import annotations

import asyncio
import bisect
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import crc32c
import structlog

from raftblock.ids import group_of_extent
from raftblock.replication.sessions import IMAGE_SESSIONS_MARK, Sessions, image_prefix
from raftblock.storage.disk import Disk, DiskFile
from raftblock.storage.index import CorruptBlockError
from raftblock.storage.segment import MAX_WRITE_BLOCKS
from raftblock.wire.ops import BLOCK_SIZE, OP_SNAP, OP_TRIM, OP_WRITE, BlockOp, decode_batch, encode_batch

log = structlog.get_logger(__name__)

BATCH_BYTES = 4 << 20  # block data per batch (and per engine read burst)
BATCH_OPS = 256
_LEN = struct.Struct("<I")
_OP_BYTES = 24  # an unnamed op's header in the batch encoding (wire/ops.py _OP)
INSTALL_SLICE_BYTES = 8 << 20  # image bytes written per loop turn by an install, at most...
INSTALL_SLICE_S = 0.01  # ...and loop time per turn: a pwrite into a page cache being flushed can take 50 ms


_W, _T, _S = 0, 1, 2  # planned op kinds: write (of a version, or current), trim, snapshot mark
Planned = tuple[int, int, int, int, int]  # kind, extent (snap id for _S), block, count, lsn (0: current)


class ChunkedImage:
    """Behaves like the image's bytes for len() and slicing; the core and the chain stream only do that."""

    __slots__ = ("_engine", "_extents", "_prefix", "_batches", "_starts", "_total", "_cache", "_made", "_group",
                 "__weakref__")

    def __init__(self, engine: object, extents: Callable[[], list[int]], app: bytes,
                 made: Callable[[], None] | None = None, group: int | None = None) -> None:
        self._engine = engine
        self._made = made  # called once, when the layout is fixed (a counter of images made)
        self._extents = extents
        self._group = group  # its snapshots travel too (rule 5); None: blocks only
        self._prefix = image_prefix(app)
        self._batches: list[list[Planned]] | None = None
        self._starts: list[int] = []
        self._total = 0
        self._cache: dict[int, bytes] = {}

    def _sections(self) -> list[Planned]:
        """Rule 5: the ops of the image, in order, from the engine's index (no data read)."""
        index = self._engine.index  # type: ignore[attr-defined]
        gid = self._group
        snaps = sorted((lsn, sid) for (g, sid), lsn in index.snaps.items() if g == gid) if gid is not None else []
        extents = self._extents()
        if not snaps:
            out: list[Planned] = []
            for ext in extents:
                for first, n in runs(sorted(index.extents.get(ext, {}))):
                    out.append((_W, ext, first, n, 0))
            return out
        assert gid is not None
        for lsn, _sid in snaps:  # held until this image is dropped (rule 5)
            index.pin(lsn, gid)
        weakref.finalize(self, _release, index, gid, [lsn for lsn, _ in snaps])
        with_history: dict[int, set[int]] = {}
        for eid, blk in index.history:
            if eid >> 32 == gid:
                with_history.setdefault(eid, set()).add(blk)
        exts = sorted(set(extents) | set(with_history))
        out = []
        prev = 0
        for lsn, sid in [*snaps, (0, 0)]:
            for ext in exts:
                emap = index.extents.get(ext, {})
                cand = sorted(set(emap) | with_history.get(ext, set()))
                cur: list[tuple[int, int]] = []  # (block, kind) to run-length
                for blk in cand:
                    new = emap.get(blk) if lsn == 0 else index.version_at(ext, blk, lsn)
                    old = index.version_at(ext, blk, prev) if prev else None
                    if new is not None and (old is None or old.lsn != new.lsn):
                        cur.append((blk, _W))
                    elif new is None and old is not None:
                        cur.append((blk, _T))
                for kind in (_W, _T):
                    for first, n in runs([b for b, k in cur if k == kind]):
                        out.append((kind, ext, first, n, lsn))
            if lsn:
                out.append((_S, sid, 0, 0, lsn))
            prev = lsn
        return out

    def _plan(self) -> None:
        if self._batches is not None:
            return
        batches: list[list[Planned]] = []
        cur: list[Planned] = []
        cur_bytes = 0
        for op in self._sections():
            cur.append(op)
            if op[0] == _W:
                cur_bytes += op[3] * BLOCK_SIZE
            if len(cur) >= BATCH_OPS or cur_bytes >= BATCH_BYTES:
                batches.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            batches.append(cur)
        pos = len(self._prefix)
        starts = []
        for b in batches:
            starts.append(pos)
            pos += _LEN.size + 2 + sum(_OP_BYTES + ((4 + BLOCK_SIZE) * n if kind == _W else 0)
                                       for kind, _, _, n, _ in b)
        self._batches, self._starts, self._total = batches, starts, pos
        if self._made is not None:
            self._made()

    def _batch(self, k: int) -> bytes:
        got = self._cache.get(k)
        if got is not None:
            return got
        assert self._batches is not None
        ops = []
        eng: Any = self._engine
        for kind, ext, block, n, lsn in self._batches[k]:
            if kind == _W:
                data, crcs = eng.read_at(ext, block, n, lsn) if lsn else eng.read(ext, block, n)
                ops.append(BlockOp(OP_WRITE, ext, block, n, crcs, bytes(data)))
            elif kind == _T:
                ops.append(BlockOp(OP_TRIM, ext, block, n))
            else:
                ops.append(BlockOp(OP_SNAP, ext, 0, 0))
        body = encode_batch(ops)
        out = _LEN.pack(len(body)) + body
        end = self._starts[k + 1] if k + 1 < len(self._starts) else self._total
        assert len(out) == end - self._starts[k], "image batch size differs from its layout"
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[k] = out
        return out

    def __len__(self) -> int:
        self._plan()
        return self._total

    def __getitem__(self, k: slice) -> bytes:
        self._plan()
        a, b, step = k.indices(self._total)
        assert step == 1
        if a >= b:
            return b""
        parts: list[bytes] = []
        plen = len(self._prefix)
        if a < plen:
            parts.append(self._prefix[a : min(b, plen)])
        if b > plen:
            i = max(0, bisect.bisect_right(self._starts, max(a, plen)) - 1)
            while i < len(self._starts) and self._starts[i] < b:
                start = self._starts[i]
                data = self._batch(i)
                lo, hi = max(a, start) - start, min(b, start + len(data)) - start
                if lo < hi:
                    parts.append(data[lo:hi])
                i += 1
        return b"".join(parts)

    def make(self) -> ChunkedImage:
        return self


def _release(index: Any, gid: int, lsns: list[int]) -> None:
    for lsn in lsns:
        index.unpin(lsn, gid)


def runs(blocks: list[int], limit: int = MAX_WRITE_BLOCKS) -> list[tuple[int, int]]:
    """Sorted block numbers -> (first, count) runs of consecutive blocks, at most `limit` long."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < limit:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class SpillImage:
    """Rule 4: a received image in a file, appended to chunk by chunk; len() and slicing (a pread of that
    range) are all the install does with it. Not synced: it is a staging copy (the install fdatasyncs the
    engine before the WAL records the snapshot), so a crash only costs the stream."""

    __slots__ = ("_disk", "path", "_file", "_size", "failed")

    def __init__(self, disk: Disk, path: str) -> None:
        self._disk = disk
        self.path = path
        self._file: DiskFile | None = disk.open_file(path, create=True)
        self._file.truncate(0)
        self._size = 0
        self.failed: OSError | None = None

    def append(self, chunk: bytes | bytearray | memoryview) -> bool:
        """False when the chunk could not be written (a full disk): the sender resends it later."""
        f = self._file
        if f is None:
            return False
        try:
            f.pwrite(chunk, self._size)
        except OSError as e:
            self.failed = e
            return False
        self._size += len(chunk)
        return True

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, k: slice) -> bytes:
        a, b, step = k.indices(self._size)
        assert step == 1 and self._file is not None, "a closed image is not read"
        return self._file.pread(b - a, a) if a < b else b""

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
            try:
                self._disk.remove(self.path)
            except OSError:
                pass  # removed with the directory's other leftovers at the next start


def close_image(data: object) -> None:
    """Release a received image once its Ready is done (a SpillImage's file; nothing for bytes)."""
    close = getattr(data, "close", None)
    if close is not None:
        close()


def group_extents(engine: Any, gid: int) -> list[int]:
    """The extents of group `gid` the engine holds, sorted."""
    return sorted(e for e in engine.index.extents if group_of_extent(e) == gid)


async def install_image(engine: Any, gid: int, data: Any, engine_sync: Callable[[], Awaitable[object]],
                        abandoned: Callable[[], bool]) -> tuple[bytes, Sessions] | None:
    """Rule 3. `data`: bytes, a received ChunkedBytes or an engine-backed ChunkedImage, read one batch at a
    time, never copied whole on the loop. Returns the image's session table (encoded, for the WAL's
    snapshot record, and decoded); None when `abandoned()` turned true between two slices (the WAL still
    has the older point). Malformed images raise ValueError before the first block is written."""
    view = memoryview(data) if isinstance(data, bytes | bytearray) else data  # a view of bytes copies nothing
    total = len(view)
    app = b""
    off = 0
    head = bytes(view[0 : 2 * _LEN.size])
    if len(head) == 2 * _LEN.size and _LEN.unpack_from(head, 0)[0] == IMAGE_SESSIONS_MARK:
        (alen,) = _LEN.unpack_from(head, _LEN.size)
        off = 2 * _LEN.size + alen
        app = bytes(view[2 * _LEN.size : off])
    sessions = Sessions.decode(app)
    held: dict[int, set[int]] = {}
    mixed: list[tuple[int, int]] = []  # rule 6: blocks whose data and CRC come from two reads, left out
    pinned: set[int] = set()
    done = 0
    t_slice = time.monotonic()
    while off < total:
        (blen,) = _LEN.unpack(bytes(view[off : off + _LEN.size]))
        off += _LEN.size
        for op in decode_batch(view[off : off + blen]):
            if op.kind == OP_SNAP:  # rule 5: the engine's image is the snapshot's now
                if mixed:  # rule 6: in a snapshot's section every read is exact: this is corruption
                    ext, blk = mixed[0]
                    raise CorruptBlockError(ext, blk, "checksum mismatch in a snapshot's section of an image")
                _trim_unheld(engine, gid, held)
                engine.pin_snapshot(gid, op.extent_id)
                pinned.add(op.extent_id)
                continue
            if group_of_extent(op.extent_id) != gid:
                raise ValueError("snapshot image holds an extent of another group")
            if op.kind == OP_TRIM:
                engine.trim(op.extent_id, op.block, op.count)
                held.setdefault(op.extent_id, set()).difference_update(range(op.block, op.block + op.count))
                continue
            try:
                engine.write(op.extent_id, op.block, op.data, op.crcs)
                held.setdefault(op.extent_id, set()).update(range(op.block, op.block + op.count))
            except CorruptBlockError:
                _write_matching(engine, op, held, mixed)  # rule 6
            done += op.count * BLOCK_SIZE
            if done >= INSTALL_SLICE_BYTES or time.monotonic() - t_slice >= INSTALL_SLICE_S:
                done = 0
                await asyncio.sleep(0)
                if abandoned():
                    return None
                t_slice = time.monotonic()
        off += blen
    if mixed:
        log.warning("image.mixed_blocks_left_out", group=gid, blocks=len(mixed), first=list(mixed[0]))
    _trim_unheld(engine, gid, held)
    for g, sid in list(engine.snapshots()):
        if g == gid and sid not in pinned:  # deleted before the image's point (rule 5)
            engine.unpin_snapshot(gid, sid)
    await engine_sync()
    return app, sessions


def _write_matching(engine: Any, op: BlockOp, held: dict[int, set[int]], mixed: list[tuple[int, int]]) -> None:
    """Rule 6: the blocks of a write op whose data matches its CRC, in runs; the others noted in `mixed`."""
    data = memoryview(op.data)
    good = [crc32c.crc32c(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) == op.crcs[i] for i in range(op.count)]
    keep = held.setdefault(op.extent_id, set())
    i = 0
    while i < op.count:
        j = i
        while j < op.count and good[j] == good[i]:
            j += 1
        if good[i]:
            engine.write(op.extent_id, op.block + i, data[i * BLOCK_SIZE : j * BLOCK_SIZE], op.crcs[i:j])
            keep.update(range(op.block + i, op.block + j))
        else:
            mixed.extend((op.extent_id, op.block + k) for k in range(i, j))
            keep.difference_update(range(op.block + i, op.block + j))  # trimmed at the end: no stale block
        i = j


def _trim_unheld(engine: Any, gid: int, held: dict[int, set[int]]) -> None:
    """Trim every block of the group's extents that the image does not hold (so far)."""
    for ext in group_extents(engine, gid):
        keep = held.get(ext)
        if not keep:
            engine.drop_extent(ext)
            continue
        extra = sorted(set(engine.index.extents.get(ext, {})) - keep)
        for first, n in runs(extra):
            engine.trim(ext, first, n)
