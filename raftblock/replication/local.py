"""LocalGroup: a replication group of one member — the storage engine on this node's disk.

It is the one-copy mode (`raftblock serve`, the bench's single-copy figure) and the state machine that
Raft and chain members apply to. It owns group commit: writes append to the engine at once (on the
event loop, so appends are ordered as they arrive) and wait for an fdatasync that covers them; one
fdatasync runs at a time in a worker thread and covers every write appended before it started.

Rules:
1. A write is acknowledged only after an fdatasync that started after its append has completed.
2. If an fdatasync fails, the group is failed for good (fsync errors cannot be retried honestly: the
   kernel may have dropped the dirty pages); every waiting and later request gets EIO.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from raftblock.replication.group import CorruptData, GroupStatus, NoSpace, Unavailable
from raftblock.storage.engine import CorruptBlockError, Engine, NoSpaceError

log = structlog.get_logger(__name__)

ZERO_CHUNK_BLOCKS_MAX = 256  # NO_HOLE zero writes go to the engine in records of at most this many blocks


class GroupCommitter:
    """Coalesces durability waits into as few fdatasyncs as possible (one in flight at a time)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._running = False
        self.failed: BaseException | None = None
        self.syncs = 0

    async def wait_durable(self, lsn: int) -> None:
        if self.failed is not None:
            raise Unavailable(f"disk failed: {self.failed}")
        if self._engine.synced_lsn >= lsn:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._sync_loop())
        await fut

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                try:
                    synced = await loop.run_in_executor(self._executor, self._engine.sync)
                except OSError as e:
                    self.failed = e
                    log.error("engine.fsync_failed", error=str(e))
                    waiters, self._waiters = self._waiters, []
                    for _, fut in waiters:
                        if not fut.done():
                            fut.set_exception(Unavailable(f"fdatasync failed: {e}"))
                    return
                self.syncs += 1
                still: list[tuple[int, asyncio.Future[None]]] = []
                for lsn, fut in self._waiters:
                    if lsn <= synced:
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        still.append((lsn, fut))
                self._waiters = still
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class LocalGroup:
    """One-member ReplicationGroup over a local Engine."""

    def __init__(self, engine: Engine, group_id: int = 0, member: str = "local") -> None:
        self.engine = engine
        self.group_id = group_id
        self.member = member
        self.committer = GroupCommitter(engine)

    def _check(self) -> None:
        if self.committer.failed is not None:
            raise Unavailable(f"disk failed: {self.committer.failed}")

    async def write(self, extent_id: int, block: int, data: memoryview | bytes, crcs: Sequence[int],
                    fill: bool = False) -> None:
        if fill:
            raise Unavailable("clones need replicated groups (raftblock cluster up)")
        self._check()
        try:
            lsn = self.engine.write(extent_id, block, data, crcs)
        except NoSpaceError as e:
            raise NoSpace(str(e)) from e
        except CorruptBlockError as e:
            raise CorruptData(e.extent_id, e.block, e.reason) from e
        await self.committer.wait_durable(lsn)

    async def read(self, extent_id: int, block: int, count: int, snap_id: int = 0) -> tuple[bytearray, list[int]]:
        self._check()
        if snap_id:
            raise Unavailable("snapshots need replicated groups (raftblock cluster up)")
        try:
            return self.engine.read(extent_id, block, count)
        except CorruptBlockError as e:
            raise CorruptData(e.extent_id, e.block, e.reason) from e

    async def snapshot(self, snap_id: int, drop: bool = False) -> None:
        raise Unavailable("snapshots need replicated groups (raftblock cluster up)")

    async def trim(self, extent_id: int, block: int, count: int) -> None:
        self._check()
        try:
            lsn = self.engine.trim(extent_id, block, count)
        except NoSpaceError as e:
            raise NoSpace(str(e)) from e
        await self.committer.wait_durable(lsn)

    async def zero(self, extent_id: int, block: int, count: int) -> None:
        # Thin store: a zeroed block is a dropped block (reads as zeros, reported as a hole).
        await self.trim(extent_id, block, count)

    async def flush(self) -> None:
        self._check()
        # Every acknowledged write is already durable; wait for anything appended but not yet synced
        # (writes still in flight), so FLUSH also covers writes whose replies are about to go out.
        await self.committer.wait_durable(self.engine.last_lsn)

    async def block_status(self, extent_id: int, block: int, count: int, snap_id: int = 0,
                           since_snap_id: int = 0) -> list[tuple[int, bool]]:
        if snap_id:
            raise Unavailable("snapshots need replicated groups (raftblock cluster up)")
        return self.engine.block_status(extent_id, block, count)

    def status(self) -> GroupStatus:
        stats = self.engine.stats()
        return GroupStatus(
            group_id=self.group_id,
            mode="local",
            members=[self.member],
            leader=self.member,
            healthy=self.committer.failed is None,
            detail={k: int(v) for k, v in stats.items()},
        )

    def close(self) -> None:
        self.committer.close()
        self.engine.close()
