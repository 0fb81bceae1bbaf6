"""Volume: byte-addressed read/write/flush/trim/zero/block-status on a volume, over replication groups.

Owns the mapping from a volume's byte range to (extent, block) ranges, the CRC32C of every 4 KiB block
(computed here, once, and checked again on every read before the data goes back to the host), and the
read-modify-write of partial blocks.

Rules:
1. Requests arrive validated (gateway/validate.py): in range, sizes bounded. Inner code asserts.
2. A partial block is written by read-modify-write under that block's lock; a full-block write that
   overlaps a block under read-modify-write waits for it, so no write is lost between the read and the
   write of an RMW. Locks are taken in ascending block order (no deadlock).
3. Requests are split at extent edges; each piece goes to the group that holds that extent. Pieces of
   one request run concurrently.
4. A snapshot (docs/snapshots.md section 2) raises an acknowledgement barrier: writes, trims and zeroes that
   complete while the SNAP ops of every group of the volume are in flight do not return (the host sees no
   completion) until all of them committed; I/O itself goes on. So a write the host saw completed before
   the snapshot is in it, one issued after it returned is not, and no write depending on a held one exists.
5. A clone (info.parent) reads a block its own groups do not have allocated from its parent volume's
   snapshot (recursively: the parent may be a clone). Block status reports the merge, so a tool that copies
   only allocated ranges (qemu-img convert) gets the parent's data too. WRITE_ZEROES writes zero blocks
   (a hole would read through to the parent) and TRIM is ignored (advisory: the block keeps its data).
   `flatten` copies what the clone lacks with FILL writes (wire/ops.py rule 6), so a block the host writes
   meanwhile is never overwritten with the parent's.
6. A lazy restore still filling (info.lazy_source): a read first makes the chunks it touches present
   (client/lazy.py); TRIM and WRITE_ZEROES keep blocks as on a clone (a hole would be filled from the backup
   later); block status says "data" everywhere until the fill is complete.
7. QoS: a host's READ, WRITE, TRIM, WRITE_ZEROES and COMPARE AND WRITE first wait here for the volume's
   limits (info.qos, from the map: raftblock/qos.py `Limits.reserve`, one operation and its bytes per host
   request, in arrival order), so a host over its limits waits in its gateway instead of flooding the nodes;
   a changed spec applies from the next request. Each node schedules what reaches it again (node/admission.py).
8. Encryption at rest (info.seal, raftblock/sealing.py, docs/encryption.md): an extent holds `sealing.data_blocks`
   volume blocks, their entries after them; every block is sealed here before it leaves for its group
   (`write_sealed`: blocks and entries in one op) and opened here after its CRC check (`read_sealed`). The
   key comes from `keys` (the process's VolumeKeys); nothing in plaintext goes below this class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from raftblock._fast import blockcrc
from raftblock.client.lazy import LazyFill
from raftblock.qos import UNSET, Limits, QosSpec
from raftblock.replication.group import CorruptData, GroupError, ReplicationGroup
from raftblock.sealing import ENTRY_BYTES, Sealer, SealError, SealRef, VolumeKeys, data_blocks

BLOCK_SIZE = 4096
ZERO_BLOCK = bytes(BLOCK_SIZE)
RECORD_BLOCKS_MAX = 256  # one engine record carries at most 1 MiB


class SealedGroup(Protocol):
    """A group that takes an encrypted volume's blocks with their entries (client/router.py GroupClient)."""

    async def write_sealed(self, extent_id: int, block: int, data: memoryview | bytes | bytearray,
                           crcs: Sequence[int], seal_at: int, entries: bytes, fill: bool = False) -> None: ...

    async def read_sealed(self, extent_id: int, block: int, count: int, seal_at: int,
                          snap_id: int = 0) -> tuple[bytearray, list[int], bytes]: ...

    async def trim_sealed(self, extent_id: int, block: int, count: int, seal_at: int) -> None: ...


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as the data path sees it. `extent_ids[i]` names the extent holding bytes
    [i*extent_size, (i+1)*extent_size); when the map does not list them (one-copy mode) they are
    derived from the volume id."""

    name: str
    volume_id: int
    size_bytes: int
    extent_size_bytes: int = 64 << 20
    extent_ids: tuple[int, ...] = ()
    parent: VolumeInfo | None = None  # a clone: blocks it never wrote read from this volume's snapshot
    parent_snap_id: int = 0
    parent_size_bytes: int = 0  # that snapshot's size (the parent may have grown since): zeros past it
    lazy_source: str = ""  # a lazy restore still filling: "URL#VOLUME@SNAPSHOT" (rule 6)
    qos: QosSpec = UNSET  # its limits hold here, before anything reaches a node (rule 7)
    seal: SealRef | None = None  # encrypted: its key (rule 8)

    def extent_id(self, extent_index: int) -> int:
        if self.extent_ids:
            return self.extent_ids[extent_index]
        return (self.volume_id << 24) | extent_index


class _BlockLocks:
    """Per-block asyncio locks, created on demand and dropped when free (bounded by what is in flight)."""

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._locks)

    async def acquire(self, blocks: Sequence[int]) -> None:
        for b in sorted(set(blocks)):
            lock = self._locks.get(b)
            if lock is None:
                lock = self._locks[b] = asyncio.Lock()
            self._users[b] = self._users.get(b, 0) + 1
            await lock.acquire()

    def release(self, blocks: Sequence[int]) -> None:
        for b in sorted(set(blocks)):
            self._locks[b].release()
            self._users[b] -= 1
            if self._users[b] == 0:
                del self._users[b]
                del self._locks[b]

    async def wait_free(self, first: int, end: int) -> None:
        """Wait until no block in [first, end) is locked (full-block writes use this)."""
        while True:
            busy = [b for b in self._locks if first <= b < end]
            if not busy:
                return
            lock = self._locks[busy[0]]
            async with lock:
                pass


class NoKeys(GroupError):
    """An encrypted volume opened without the keys to it (rule 8)."""


class Volume:
    def __init__(self, info: VolumeInfo, group_for: Callable[[int], ReplicationGroup],
                 keys: VolumeKeys | None = None) -> None:
        self.info = info
        self._group_for = group_for
        self._keys = keys
        self._locks = _BlockLocks()
        self._blocks_per_extent = info.extent_size_bytes // BLOCK_SIZE
        self._seal_at = 0  # rule 8: where an extent's entries begin (0: not encrypted)
        if info.seal is not None:
            self._seal_at = self._blocks_per_extent = data_blocks(info.extent_size_bytes // BLOCK_SIZE)
        self._touched: dict[int, ReplicationGroup] = {}  # groups written through this volume (for FLUSH)
        self._barrier: asyncio.Future[None] | None = None  # rule 4
        self._holds = 0
        self._parent: Volume | None = None  # rule 5, built from info.parent when first needed
        self._lazy: LazyFill | None = None  # rule 6
        self._qos_seen: QosSpec | None = None  # rule 7: the spec `_limits` was made from
        self._limits: Limits | None = None
        self.qos_waits = 0  # host requests that waited for the volume's limits
        self.qos_wait_s = 0.0  # ... and how long in all

    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes

    # --- addressing -------------------------------------------------------------------------------
    def _pieces(self, first_block: int, end_block: int) -> list[tuple[int, int, int, int]]:
        """Split [first_block, end_block) at extent edges -> (extent_id, block_in_extent, count, vol_block)."""
        out = []
        b = first_block
        bpe = self._blocks_per_extent
        while b < end_block:
            idx, inner = divmod(b, bpe)
            n = min(end_block - b, bpe - inner)
            out.append((self.info.extent_id(idx), inner, n, b))
            b += n
        return out

    # --- read -------------------------------------------------------------------------------------
    async def _read_blocks(self, first: int, end: int, snap_id: int = 0) -> bytearray:
        """`snap_id`: as that snapshot keeps the blocks (0: as they are now)."""
        if self.info.lazy_source and not snap_id:  # rule 6
            await self.lazy().ensure(first, end)
        pieces = self._pieces(first, end)
        parent = self.parent()
        results: list[bytearray]
        if parent is not None:  # rule 5
            results = await asyncio.gather(*(self._read_through(parent, eid, blk, n, vb, snap_id)
                                             for eid, blk, n, vb in pieces))
        elif len(pieces) == 1:  # the common case: no gather, no Task per piece
            eid, blk, n, vb = pieces[0]
            return await self._read_piece(eid, blk, n, snap_id, vb)
        else:
            results = await asyncio.gather(*(self._read_piece(eid, blk, n, snap_id, vb) for eid, blk, n, vb in pieces))
        if len(results) == 1:
            return results[0]
        out = bytearray()
        for r in results:
            out += r
        return out

    async def _read_piece(self, extent_id: int, block: int, count: int, snap_id: int, vb: int) -> bytearray:
        """`vb`: the volume block of `block` (an encrypted block's associated data, rule 8)."""
        group = self._group_for(extent_id)
        out = bytearray()
        done = 0
        while done < count:
            n = min(count - done, RECORD_BLOCKS_MAX)
            if self._seal_at:
                data, crcs, entries = await self._sealed(group).read_sealed(extent_id, block + done, n,
                                                                            self._seal_at, snap_id)
            else:
                data, crcs = await (group.read(extent_id, block + done, n, snap_id=snap_id) if snap_id
                                    else group.read(extent_id, block + done, n))
            # Pair check: verify again right before the data leaves for the host.
            bad = blockcrc.first_mismatch(data, crcs)
            if bad >= 0:
                raise CorruptData(extent_id, block + done + bad, "CRC mismatch before reply")
            if self._seal_at:
                try:
                    self._sealer().open(vb + done, data, entries)
                except SealError as e:
                    raise CorruptData(extent_id, block + done + e.block - vb - done, e.reason) from None
            if n == count:
                return data  # one piece: no copy
            out += data
            done += n
        return out

    # --- lazy restore (rule 6) ----------------------------------------------------------------------
    def lazy(self) -> LazyFill:
        if self._lazy is None or self._lazy.source != self.info.lazy_source:
            self._lazy = LazyFill(self.info.lazy_source, self.fill)
        return self._lazy

    def _keeps_blocks(self) -> bool:
        """A hole would read something else than zeros (a clone's parent, a lazy restore's backup)."""
        return self.info.parent is not None or bool(self.info.lazy_source)

    async def fill(self, offset: int, data: memoryview | bytes) -> None:
        """FILL writes of whole blocks at `offset` (wire/ops.py rule 6): only where the volume has a hole."""
        first = offset // BLOCK_SIZE
        view = memoryview(data)
        coros = []
        for eid, blk, n, vb in self._pieces(first, first + len(view) // BLOCK_SIZE):
            k = 0
            while k < n:
                m = min(n - k, RECORD_BLOCKS_MAX)
                piece = view[(vb - first + k) * BLOCK_SIZE : (vb - first + k + m) * BLOCK_SIZE]
                coros.append(self._put(eid, blk + k, piece, vb + k, fill=True))
                k += m
        await asyncio.gather(*coros)

    # --- clones (rule 5) ----------------------------------------------------------------------------
    def parent(self) -> Volume | None:
        p = self.info.parent
        if p is None:
            return None
        if self._parent is None or self._parent.info is not p:
            self._parent = Volume(p, self._group_for, self._keys)
        return self._parent

    async def _read_through(self, parent: Volume, extent_id: int, block: int, count: int, vb: int,
                            snap_id: int) -> bytearray:
        runs = await self._group_for(extent_id).block_status(extent_id, block, count, snap_id=snap_id)
        if len(runs) == 1 and runs[0][1]:
            return await self._read_piece(extent_id, block, count, snap_id, vb)
        out = bytearray()
        pos = 0
        for n, allocated in runs:
            if allocated:
                out += await self._read_piece(extent_id, block + pos, n, snap_id, vb + pos)
            else:
                out += await parent._read_parent(vb + pos, n, self.info.parent_snap_id, self._parent_size())
            pos += n
        return out

    async def _read_parent(self, first: int, count: int, snap_id: int, size_bytes: int) -> bytearray:
        """Blocks [first, first+count) of snapshot `snap_id` of this volume (`size_bytes` then), zeros past
        its end."""
        own = max(0, min(count, min(size_bytes, self.info.size_bytes) // BLOCK_SIZE - first))
        data = await self._read_blocks(first, first + own, snap_id) if own else bytearray()
        if own < count:
            data += bytes((count - own) * BLOCK_SIZE)
        return data

    async def _alloc(self, extent_id: int, block: int, count: int, vb: int, snap_id: int) -> list[tuple[int, bool]]:
        """(blocks, allocated) runs of one piece, a clone's merged with its parent's snapshot (rule 5)."""
        group = self._group_for(extent_id)
        runs = await (group.block_status(extent_id, block, count, snap_id=snap_id) if snap_id
                      else group.block_status(extent_id, block, count))
        parent = self.parent()
        if parent is None:
            return runs
        out: list[tuple[int, bool]] = []
        pos = 0
        for n, allocated in runs:
            if allocated:
                out.append((n, True))
            else:
                out.extend(await parent._alloc_range(vb + pos, n, self.info.parent_snap_id, self._parent_size()))
            pos += n
        return out

    def _parent_size(self) -> int:
        p = self.info.parent
        return self.info.parent_size_bytes or (p.size_bytes if p is not None else 0)

    async def _alloc_range(self, first: int, count: int, snap_id: int, size_bytes: int) -> list[tuple[int, bool]]:
        own = max(0, min(count, min(size_bytes, self.info.size_bytes) // BLOCK_SIZE - first))
        out: list[tuple[int, bool]] = []
        for eid, blk, n, vb in self._pieces(first, first + own):
            out.extend(await self._alloc(eid, blk, n, vb, snap_id))
        if own < count:
            out.append((count - own, False))
        return out

    async def flatten(self, progress: Callable[[int, int], None] | None = None, parallel: int = 4) -> int:
        """Copy into this clone every block of its parent snapshot it does not have (FILL writes: a block
        written meanwhile is kept). Returns the bytes copied; `progress(blocks done, blocks total)`."""
        parent = self.parent()
        if parent is None:
            return 0
        total = self.info.size_bytes // BLOCK_SIZE
        done = copied = 0
        gate = asyncio.Semaphore(parallel)
        snap = self.info.parent_snap_id

        async def copy(eid: int, blk: int, n: int, vb: int) -> int:
            async with gate:
                data = await parent._read_parent(vb, n, snap, self._parent_size())
                if data == bytes(len(data)):
                    return 0
                await self._put(eid, blk, memoryview(data), vb, fill=True)
                return len(data)

        for eid, blk, n, vb in self._pieces(0, total):
            jobs = []
            pos = 0
            for cnt, allocated in await self._group_for(eid).block_status(eid, blk, n):
                k = 0
                while not allocated and k < cnt:
                    m = min(cnt - k, RECORD_BLOCKS_MAX)
                    jobs.append(copy(eid, blk + pos + k, m, vb + pos + k))
                    k += m
                pos += cnt
            copied += sum(await asyncio.gather(*jobs))
            done += n
            if progress is not None:
                progress(done, total)
        return copied

    # --- QoS (rule 7) ------------------------------------------------------------------------------
    async def _admit(self, nbytes: int) -> None:
        qos = self.info.qos
        if qos is not self._qos_seen:
            if qos != self._qos_seen:  # a new spec (not merely a new map): new buckets
                self._limits = Limits(qos, time.monotonic()) if qos.iops or qos.bytes_per_s else None
            self._qos_seen = qos
        if self._limits is None:
            return
        wait = self._limits.reserve(time.monotonic(), nbytes)
        if wait > 0:
            self.qos_waits += 1
            self.qos_wait_s += wait
            await asyncio.sleep(wait)  # the host's request waits for its turn under the volume's limits

    async def read(self, offset: int, length: int) -> bytearray | memoryview:
        if self._limits is not None or self.info.qos is not self._qos_seen:
            await self._admit(length)
        first = offset // BLOCK_SIZE
        end = (offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE
        data = await self._read_blocks(first, end)
        skip = offset - first * BLOCK_SIZE
        if skip == 0 and len(data) == length:
            return data
        return memoryview(data)[skip : skip + length]

    # --- snapshots (rule 4) -------------------------------------------------------------------------
    def _groups(self) -> list[ReplicationGroup]:
        """The distinct groups of every extent of the volume."""
        out: dict[int, ReplicationGroup] = {}
        per_extent = self._blocks_per_extent * BLOCK_SIZE
        n = (self.info.size_bytes + per_extent - 1) // per_extent
        for i in range(n):
            eid = self.info.extent_id(i)
            out.setdefault(eid >> 32, self._group_for(eid))
        return list(out.values())

    async def snapshot(self, snap_id: int) -> None:
        """Pin snapshot `snap_id` in every group of the volume, a crash-consistent cut (rule 4)."""
        self.hold()
        try:
            await self.pin(snap_id)
        finally:
            self.release()

    async def pin(self, snap_id: int) -> None:
        """The SNAP op in every group of the volume (no barrier: the caller holds one, rule 4)."""
        await asyncio.gather(*(g.snapshot(snap_id) for g in self._groups()))

    def hold(self) -> None:
        """Raise the acknowledgement barrier (rule 4); holds nest: the barrier falls with the last release."""
        self._holds += 1
        if self._barrier is None:
            self._barrier = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._barrier is not None:
            fut, self._barrier = self._barrier, None
            fut.set_result(None)

    async def drop_snapshot(self, snap_id: int) -> None:
        await asyncio.gather(*(g.snapshot(snap_id, drop=True) for g in self._groups()))

    async def _held(self) -> None:
        while self._barrier is not None:
            await asyncio.shield(self._barrier)

    async def read_snapshot(self, snap_id: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) as snapshot `snap_id` keeps them."""
        first = offset // BLOCK_SIZE
        data = await self._read_blocks(first, (offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE, snap_id)
        skip = offset - first * BLOCK_SIZE
        return bytes(memoryview(data)[skip : skip + length])

    # --- write ------------------------------------------------------------------------------------
    async def write(self, offset: int, data: memoryview | bytes) -> None:
        if self._limits is not None or self.info.qos is not self._qos_seen:
            await self._admit(len(data))
        await self._write_held(offset, data)

    async def _write_held(self, offset: int, data: memoryview | bytes) -> None:
        await self._write(offset, data)
        if self._barrier is not None:
            await self._held()

    async def _write(self, offset: int, data: memoryview | bytes) -> None:
        length = len(data)
        end_off = offset + length
        first = offset // BLOCK_SIZE
        end = (end_off + BLOCK_SIZE - 1) // BLOCK_SIZE
        head_partial = offset % BLOCK_SIZE != 0 or (first == end - 1 and length < BLOCK_SIZE)
        tail_partial = end_off % BLOCK_SIZE != 0
        rmw: list[int] = []
        if head_partial:
            rmw.append(first)
        if tail_partial and (end - 1) not in rmw:
            rmw.append(end - 1)
        if not rmw:
            if self._locks:
                await self._locks.wait_free(first, end)
            await self._write_blocks(first, memoryview(data))
            return
        await self._locks.acquire(rmw)
        try:
            if self._locks:
                # Other blocks of this request might be under someone else's RMW.
                inner_first = first + (1 if head_partial else 0)
                inner_end = end - (1 if tail_partial else 0)
                if inner_first < inner_end:
                    await self._locks.wait_free(inner_first, inner_end)
            buf = bytearray(await self._read_blocks(first, first + 1)) if head_partial else None
            if len(rmw) == 2 or (tail_partial and not head_partial):
                tail_old = await self._read_blocks(end - 1, end)
            else:
                tail_old = None
            merged = bytearray((end - first) * BLOCK_SIZE)
            if buf is not None:
                merged[0:BLOCK_SIZE] = buf
            if tail_old is not None:
                merged[(end - first - 1) * BLOCK_SIZE :] = tail_old
            start = offset - first * BLOCK_SIZE
            merged[start : start + length] = data
            await self._write_blocks(first, memoryview(merged))
        finally:
            self._locks.release(rmw)

    async def _write_blocks(self, first: int, data: memoryview) -> None:
        assert len(data) % BLOCK_SIZE == 0
        end = first + len(data) // BLOCK_SIZE
        coros = []
        for eid, blk, n, vb in self._pieces(first, end):
            base = (vb - first) * BLOCK_SIZE
            done = 0
            while done < n:
                k = min(n - done, RECORD_BLOCKS_MAX)
                chunk = data[base + done * BLOCK_SIZE : base + (done + k) * BLOCK_SIZE]
                coros.append(self._put(eid, blk + done, chunk, vb + done))
                done += k
        if len(coros) == 1:
            await coros[0]
        else:
            await asyncio.gather(*coros)

    async def _put(self, eid: int, blk: int, chunk: memoryview, vb: int, fill: bool = False) -> None:
        """One write of at most RECORD_BLOCKS_MAX blocks to one extent; sealed first if encrypted (rule 8)."""
        group = self._group(eid)
        if not self._seal_at:
            await group.write(eid, blk, chunk, blockcrc.block_crcs(chunk), fill=fill)
            return
        sealed, entries = await self._sealer().seal(vb, chunk)
        await self._sealed(group).write_sealed(eid, blk, sealed, blockcrc.block_crcs(sealed), self._seal_at, entries,
                                               fill=fill)

    # -- an encrypted volume's blocks as stored: its backups (backup/manifest.py rule 3) --------------------------
    async def read_stored(self, snap_id: int, offset: int, length: int) -> bytes:
        """Blocks [offset, offset+length) of snapshot `snap_id` as the nodes store them: ciphertext, then the
        blocks' entries, zero-padded to a block. Nothing is decrypted (rule 8)."""
        if not self._seal_at:
            raise ValueError(f"volume {self.info.name} is not encrypted")
        if self.info.parent is not None:
            raise NoKeys(f"volume {self.info.name} is an encrypted clone: flatten it before backing it up")
        first = offset // BLOCK_SIZE
        n_total = length // BLOCK_SIZE

        async def piece(eid: int, blk: int, n: int) -> tuple[bytearray, bytes]:
            group = self._sealed(self._group_for(eid))
            data, entries = bytearray(), bytearray()
            done = 0
            while done < n:
                k = min(n - done, RECORD_BLOCKS_MAX)
                d, crcs, e = await group.read_sealed(eid, blk + done, k, self._seal_at, snap_id)
                bad = blockcrc.first_mismatch(d, crcs)
                if bad >= 0:
                    raise CorruptData(eid, blk + done + bad, "CRC mismatch reading a stored block")
                data += d
                entries += e
                done += k
            return data, bytes(entries)

        parts = await asyncio.gather(*(piece(e, b, n) for e, b, n, _ in self._pieces(first, first + n_total)))
        entries = b"".join(e for _, e in parts)
        pad = -(-len(entries) // BLOCK_SIZE) * BLOCK_SIZE - len(entries)
        return b"".join(d for d, _ in parts) + entries + bytes(pad)

    async def write_stored(self, offset: int, length: int, stored: bytes | bytearray | memoryview) -> None:
        """Write back blocks [offset, offset+length) in the form `read_stored` gave them (a restore): the same
        ciphertext and entries at the same volume blocks, under the same key; nothing is encrypted again."""
        if not self._seal_at:
            raise ValueError(f"volume {self.info.name} is not encrypted")
        first = offset // BLOCK_SIZE
        n_total = length // BLOCK_SIZE
        view = memoryview(stored)
        coros = []
        for eid, blk, n, vb in self._pieces(first, first + n_total):
            group = self._sealed(self._group(eid))
            done = 0
            while done < n:
                k = min(n - done, RECORD_BLOCKS_MAX)
                at = vb - first + done
                data = view[at * BLOCK_SIZE : (at + k) * BLOCK_SIZE]
                entries = bytes(view[length + at * ENTRY_BYTES : length + (at + k) * ENTRY_BYTES])
                coros.append(group.write_sealed(eid, blk + done, data, blockcrc.block_crcs(data), self._seal_at,
                                                entries))
                done += k
        await asyncio.gather(*coros)

    def _sealer(self) -> Sealer:
        ref = self.info.seal
        assert ref is not None
        if self._keys is None:
            raise NoKeys(f"volume {self.info.name} is encrypted and this process has no keys to it")
        return self._keys.sealer(ref)

    def _sealed(self, group: ReplicationGroup) -> SealedGroup:
        # hasattr, not isinstance: a runtime-checkable Protocol's check costs more than the write (py-spy)
        if not hasattr(group, "write_sealed"):
            raise NoKeys(f"volume {self.info.name} is encrypted: it needs a replicated cluster's groups")
        return group  # type: ignore[return-value]

    async def compare_and_write(self, offset: int, verify: memoryview | bytes,
                                data: memoryview | bytes) -> int | None:
        """SCSI COMPARE AND WRITE (SBC-3 5.2; VMware's ATS): if [offset, offset+len) holds `verify`, write
        `data` there and return None; else write nothing and return the offset of the first differing byte.
        Atomic against every other compare-and-write and read-modify-write of the volume (rule 2: the
        blocks are locked from the read to the acknowledged write; exclusive attach makes this process the
        volume's only writer). One replicated write per extent group, so atomic per extent group on a crash."""
        length = len(data)
        assert len(verify) == length and length > 0
        if self._limits is not None or self.info.qos is not self._qos_seen:
            await self._admit(length)
        first = offset // BLOCK_SIZE
        end = (offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE
        blocks = list(range(first, end))
        await self._locks.acquire(blocks)
        try:
            cur = bytearray(await self._read_blocks(first, end))
            skip = offset - first * BLOCK_SIZE
            have = memoryview(cur)[skip : skip + length]
            if have != memoryview(verify):
                want = bytes(verify)
                return next(i for i in range(length) if have[i] != want[i])
            cur[skip : skip + length] = data
            await self._write_blocks(first, memoryview(cur))
        finally:
            self._locks.release(blocks)
        if self._barrier is not None:
            await self._held()
        return None

    # --- trim / zero ------------------------------------------------------------------------------
    async def trim(self, offset: int, length: int) -> None:
        """Advisory (proto.md): only whole blocks inside the range are dropped; partial ones are left."""
        if self._limits is not None or self.info.qos is not self._qos_seen:
            await self._admit(0)
        first = (offset + BLOCK_SIZE - 1) // BLOCK_SIZE
        end = (offset + length) // BLOCK_SIZE
        if first >= end or self._keeps_blocks():  # a clone keeps the block (rules 5, 6)
            return
        if self._locks:
            await self._locks.wait_free(first, end)
        await asyncio.gather(*(self._trim(e, b, n) for e, b, n, _ in self._pieces(first, end)))
        if self._barrier is not None:
            await self._held()

    async def _trim(self, eid: int, blk: int, n: int, zero: bool = False) -> None:
        group = self._group(eid)
        if self._seal_at:  # the blocks' entries go with them (rule 8)
            await self._sealed(group).trim_sealed(eid, blk, n, self._seal_at)
        elif zero:
            await group.zero(eid, blk, n)
        else:
            await group.trim(eid, blk, n)

    async def zero(self, offset: int, length: int, no_hole: bool) -> None:
        """WRITE_ZEROES: partial edge blocks get zeros by RMW; whole blocks are dropped (they read as
        zeros), or, with NO_HOLE, written as allocated zero blocks."""
        if self._limits is not None or self.info.qos is not self._qos_seen:
            await self._admit(length if no_hole else 0)
        end_off = offset + length
        first_full = (offset + BLOCK_SIZE - 1) // BLOCK_SIZE
        end_full = end_off // BLOCK_SIZE
        if first_full >= end_full:
            await self._write_held(offset, bytes(length))
            return
        if offset % BLOCK_SIZE:
            head_len = first_full * BLOCK_SIZE - offset
            await self._write_held(offset, bytes(head_len))
        if end_off % BLOCK_SIZE:
            await self._write_held(end_full * BLOCK_SIZE, bytes(end_off - end_full * BLOCK_SIZE))
        if self._locks:
            await self._locks.wait_free(first_full, end_full)
        if no_hole or self._keeps_blocks():  # a clone's hole would read its parent (rules 5, 6)
            b = first_full
            while b < end_full:
                n = min(end_full - b, RECORD_BLOCKS_MAX)
                await self._write_blocks(b, memoryview(bytes(n * BLOCK_SIZE)))
                b += n
            if self._barrier is not None:
                await self._held()
            return
        await asyncio.gather(*(self._trim(e, b, n, zero=True) for e, b, n, _ in self._pieces(first_full, end_full)))
        if self._barrier is not None:
            await self._held()

    async def flush(self) -> None:
        """Every acknowledged write is already durable (ReplicationGroup rule 2); FLUSH also waits for
        whatever the groups this volume has written to still have in flight."""
        groups = list(self._touched.values())
        if groups:
            await asyncio.gather(*(g.flush() for g in groups))

    def _group(self, extent_id: int) -> ReplicationGroup:
        g = self._group_for(extent_id)
        self._touched.setdefault(id(g), g)
        return g

    # --- block status -----------------------------------------------------------------------------
    async def block_status(self, offset: int, length: int, max_descriptors: int) -> list[tuple[int, bool]]:
        """Runs (length_bytes, allocated) from `offset`, covering at most `length` bytes (maybe less)."""
        if self.info.lazy_source:  # rule 6
            return [(length, True)]
        first = offset // BLOCK_SIZE
        end = (offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE
        runs: list[list[int]] = []  # [bytes, allocated]
        pos = offset
        stop = offset + length
        for eid, blk, n, vb in self._pieces(first, end):
            vb_cur = vb
            for count, allocated in await self._alloc(eid, blk, n, vb, 0):
                run_end = min(stop, (vb_cur + count) * BLOCK_SIZE)
                vb_cur += count
                nbytes = run_end - pos
                if nbytes <= 0:
                    continue
                if runs and bool(runs[-1][1]) == allocated:
                    runs[-1][0] += nbytes
                else:
                    if len(runs) >= max_descriptors:
                        return [(r[0], bool(r[1])) for r in runs]
                    runs.append([nbytes, int(allocated)])
                pos = run_end
        return [(r[0], bool(r[1])) for r in runs]
