"""The compactor's heap trim (node/compactor.py rule 4): memory of compacted entries goes back to the OS
once the node is idle, never after a cycle under load (that made every received payload land on fresh,
zeroed pages)."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raftblock.node.compactor import IDLE_SECONDS, Compactor
from raftblock.replication.raft.types import Entry, EntryType
from raftblock.replication.replica import Replica
from raftblock.replication.wal import Wal
from raftblock.storage.disk import OsDisk
from raftblock.storage.engine import Engine


class _Cfg:
    engine_sync_bytes = 1 << 30
    wal_compact_bytes = 64 << 10


class _Host:
    """A node as the compactor sees it: a real WAL and engine, no replicas, trims counted."""

    def __init__(self, root: Path) -> None:
        self.wal, _ = Wal.open(OsDisk(), str(root / "wal"))
        self.engine = Engine.open(OsDisk(), str(root / "engine"), b"c" * 16, wal=self.wal)
        self.counters: Counter[str] = Counter()
        self.engine_executor = ThreadPoolExecutor(max_workers=1)
        self.fences_known = True
        self.trims = 0
        self.failures: list[BaseException] = []
        self._index = 0

    @property
    def cfg(self) -> _Cfg:
        return _Cfg()

    @property
    def replicas(self) -> dict[int, Replica]:
        return {}

    @property
    def stopping(self) -> bool:
        return False

    def fail(self, e: BaseException) -> None:
        self.failures.append(e)

    def kick(self) -> None:
        pass

    def trim_heap_soon(self) -> None:
        self.trims += 1

    def append(self, n: int) -> None:
        self._index += 1
        self.wal.append_entries(1, [Entry(1, self._index, EntryType.NORMAL, bytes(n))])
        self.wal.flush()


async def _settle(c: Compactor) -> None:
    for _ in range(500):
        if not c.running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("compaction cycle did not finish")


def test_the_heap_is_trimmed_once_the_node_is_idle_not_after_each_cycle(tmp_path: Path) -> None:
    async def run() -> None:
        h = _Host(tmp_path)
        c = Compactor(h)
        for _ in range(3):  # load: the WAL grows past wal_compact_bytes, a cycle each time, appends go on
            h.append(80 << 10)
            c.maybe_start()
            assert c.running
            await _settle(c)
            c.every_second()
        assert h.counters["compactions"] == 3
        assert h.trims == 0
        for _ in range(IDLE_SECONDS + 1):  # then nothing is appended
            c.every_second()
            await _settle(c)
        assert h.trims == 1
        for _ in range(5):
            c.every_second()
        assert h.trims == 1  # once per idle period
        assert not h.failures
        h.engine.close()
        h.wal.close()
        h.engine_executor.shutdown()

    asyncio.run(run())
