"""Lazy restore (docs/snapshots.md section 5): a volume served at once while its backup streams in.

Owns: which chunks of a lazily restored volume this process has made present, and fetching one on demand.

Rules:
1. Before a read (or the read of a read-modify-write) touches a chunk this process has not filled yet, the
   chunk is fetched from the backup store and verified (backup/transfer.py `fetch_chunk`: CRC32C and hash), then
   written into the volume with FILL writes (wire/ops.py rule 6): a block the host wrote meanwhile is kept,
   on every replica alike; then the read goes on as usual. A chunk is fetched once per process however many
   reads want it at once (they wait on the same fill), and replicated by its group like any write, not
   fetched once per replica.
2. All-zero blocks of a chunk are not written (a hole reads as zeros already).
3. The store is synchronous (boto3 or files): fetches run in a worker thread, never on the event loop.
4. Which chunks are filled is memory only: after a restart a chunk may be fetched again; FILL makes that
   harmless. The background fill (the `snapshot restore --lazy` command) marks the volume done in the map
   when every chunk is in; from then on no read fetches.
5. A chunk that cannot be fetched or verified fails the read with its name (EIO to the host); nothing is
   written for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from raftblock.backup.chunk import CHUNK_BYTES
from raftblock.replication.group import GroupError

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)


class LazyFillError(GroupError):
    """A chunk that could not be fetched or verified: the read fails (EIO), nothing is written for it."""


def split_source(source: str) -> tuple[str, str, str]:
    """"URL#VOLUME@SNAPSHOT" -> (url, volume, snapshot)."""
    url, sep, ref = source.rpartition("#")
    vol, _, snap = ref.partition("@")
    if not sep or not url or not vol or not snap:
        raise ValueError(f"bad lazy restore source {source!r}")
    return url, vol, snap


class LazyFill:
    def __init__(self, source: str, fill: Callable[[int, memoryview], Awaitable[None]]) -> None:
        self.source = source
        self._fill = fill  # fill(offset, data): FILL writes of whole blocks at `offset`
        self._man: Any = None
        self._store: Any = None
        self._filled: set[int] = set()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.fetched = 0  # chunks this process fetched (a counter for tests and status)

    async def _open(self) -> None:
        if self._man is not None:
            return

        def load() -> tuple[Any, Any]:
            from raftblock.backup.store import open_store
            from raftblock.backup.transfer import load_manifest

            url, vol, snap = split_source(self.source)
            store = open_store(url)
            return store, load_manifest(store, vol, snap)

        self._store, self._man = await asyncio.to_thread(load)

    async def ensure(self, first_block: int, end_block: int) -> None:
        """Rule 1: every chunk holding a block of [first_block, end_block) is present."""
        if first_block >= end_block:
            return
        per = CHUNK_BYTES // BLOCK
        ks = [k for k in range(first_block // per, (end_block - 1) // per + 1) if k not in self._filled]
        if ks:
            await asyncio.gather(*(self._one(k) for k in ks))

    async def _one(self, k: int) -> None:
        fut = self._pending.get(k)
        if fut is not None:
            await asyncio.shield(fut)
            return
        fut = self._pending[k] = asyncio.get_running_loop().create_future()
        try:
            await self._open()
            if k < self._man.chunk_count():
                from raftblock.backup.transfer import fetch_chunk

                data = await asyncio.to_thread(fetch_chunk, self._store, self._man, k)
                self.fetched += 1
                if data is not None:
                    await self._write(k * self._man.chunk_bytes, data)
            self._filled.add(k)
            fut.set_result(None)
        except Exception as e:
            err = LazyFillError(f"lazy restore of chunk {k} from {self.source}: {e}")
            fut.set_exception(err)
            fut.exception()  # retrieved: waiters re-raise it
            raise err from e
        finally:
            del self._pending[k]

    async def _write(self, offset: int, data: bytes) -> None:
        """Rule 2: the runs of non-zero blocks, as FILL writes."""
        view = memoryview(data)
        n = len(data) // BLOCK
        i = 0
        while i < n:
            if view[i * BLOCK : (i + 1) * BLOCK] == ZERO_BLOCK:
                i += 1
                continue
            j = i + 1
            while j < n and view[j * BLOCK : (j + 1) * BLOCK] != ZERO_BLOCK:
                j += 1
            await self._fill(offset + i * BLOCK, view[i * BLOCK : j * BLOCK])
            i = j
