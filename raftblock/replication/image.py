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
from __future__ import annotations

import asyncio
import bisect
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from raftblock.ids import group_of_extent
from raftblock.replication.sessions import IMAGE_SESSIONS_MARK, Sessions, image_prefix
from raftblock.storage.disk import Disk, DiskFile
from raftblock.storage.segment import MAX_WRITE_BLOCKS
from raftblock.wire.ops import BLOCK_SIZE, OP_WRITE, BlockOp, decode_batch, encode_batch

BATCH_BYTES = 4 << 20  # block data per batch (and per engine read burst)
BATCH_OPS = 256
_LEN = struct.Struct("<I")
_OP_BYTES = 24  # an unnamed op's header in the batch encoding (wire/ops.py _OP)
INSTALL_SLICE_BYTES = 8 << 20  # image bytes written per loop turn by an install, at most...
INSTALL_SLICE_S = 0.01  # ...and loop time per turn: a pwrite into a page cache being flushed can take 50 ms


class ChunkedImage:
    """Behaves like the image's bytes for len() and slicing; the core and the chain stream only do that."""

    __slots__ = ("_engine", "_extents", "_prefix", "_batches", "_starts", "_total", "_cache", "_made")

    def __init__(self, engine: object, extents: Callable[[], list[int]], app: bytes,
                 made: Callable[[], None] | None = None) -> None:
        self._engine = engine
        self._made = made  # called once, when the layout is fixed (a counter of images made)
        self._extents = extents
        self._prefix = image_prefix(app)
        self._batches: list[list[tuple[int, int, int]]] | None = None
        self._starts: list[int] = []
        self._total = 0
        self._cache: dict[int, bytes] = {}

    def _plan(self) -> None:
        if self._batches is not None:
            return
        index = self._engine.index  # type: ignore[attr-defined]
        batches: list[list[tuple[int, int, int]]] = []
        cur: list[tuple[int, int, int]] = []
        cur_bytes = 0
        for ext in self._extents():
            blocks = sorted(index.extents.get(ext, {}))
            i = 0
            while i < len(blocks):
                j = i + 1
                while j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and j - i < MAX_WRITE_BLOCKS:
                    j += 1
                cur.append((ext, blocks[i], j - i))
                cur_bytes += (j - i) * BLOCK_SIZE
                if len(cur) >= BATCH_OPS or cur_bytes >= BATCH_BYTES:
                    batches.append(cur)
                    cur, cur_bytes = [], 0
                i = j
        if cur:
            batches.append(cur)
        pos = len(self._prefix)
        starts = []
        for b in batches:
            starts.append(pos)
            pos += _LEN.size + 2 + sum(_OP_BYTES + 4 * n + n * BLOCK_SIZE for _, _, n in b)
        self._batches, self._starts, self._total = batches, starts, pos
        if self._made is not None:
            self._made()

    def _batch(self, k: int) -> bytes:
        got = self._cache.get(k)
        if got is not None:
            return got
        assert self._batches is not None
        ops = []
        for ext, block, n in self._batches[k]:
            data, crcs = self._engine.read(ext, block, n)  # type: ignore[attr-defined]
            ops.append(BlockOp(OP_WRITE, ext, block, n, crcs, bytes(data)))
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
    done = 0
    t_slice = time.monotonic()
    while off < total:
        (blen,) = _LEN.unpack(bytes(view[off : off + _LEN.size]))
        off += _LEN.size
        for op in decode_batch(view[off : off + blen]):
            if group_of_extent(op.extent_id) != gid:
                raise ValueError("snapshot image holds an extent of another group")
            engine.write(op.extent_id, op.block, op.data, op.crcs)
            held.setdefault(op.extent_id, set()).update(range(op.block, op.block + op.count))
            done += op.count * BLOCK_SIZE
            if done >= INSTALL_SLICE_BYTES or time.monotonic() - t_slice >= INSTALL_SLICE_S:
                done = 0
                await asyncio.sleep(0)
                if abandoned():
                    return None
                t_slice = time.monotonic()
        off += blen
    for ext in group_extents(engine, gid):
        keep = held.get(ext)
        if not keep:
            engine.drop_extent(ext)
            continue
        extra = sorted(set(engine.index.extents.get(ext, {})) - keep)
        for first, n in runs(extra):
            engine.trim(ext, first, n)
    await engine_sync()
    return app, sessions
