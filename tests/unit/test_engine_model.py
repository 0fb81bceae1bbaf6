"""Differential test: the storage engine against a dict, over write/trim/read/sync/crash/reopen/
compact/checkpoint sequences (STYLE.md "Differential tests"; LevelDB fault-injection Env).

Property after a simulated power cut (VolatileDisk.crash, optionally tearing unsynced pwrites):
every write covered by a completed sync() reads back exactly; a block touched by unsynced writes holds
its durable value or the value of one of those writes, whole (never torn inside a 4 KiB block);
trims are honoured; recovery reports no corruption (a torn tail is not corruption).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile

import crc32c
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from raftblock.storage.disk import VolatileDisk
from raftblock.storage.engine import BLOCK_SIZE, Engine, EngineConfig

CLUSTER = bytes(range(16))
EXTENTS = (1, 2)
BLOCKS = 16
CFG = EngineConfig(segment_size_bytes=64 << 10, checkpoint_interval_bytes=96 << 10, cleaning_garbage_ratio=0.3)

Key = tuple[int, int]


def block_bytes(tag: int, extent: int, blk: int) -> bytes:
    return struct.pack("<QQQ", tag, extent, blk) * (BLOCK_SIZE // 24) + bytes(BLOCK_SIZE % 24)


def decode(extent: int, blk: int, data: bytes) -> int | None:
    """Tag of a block, None for zeros; asserts the block is whole (not torn)."""
    if data == bytes(BLOCK_SIZE):
        return None
    tag = struct.unpack_from("<Q", data)[0]
    assert data == block_bytes(tag, extent, blk), f"torn or foreign block {extent}/{blk}"
    return tag


class EngineVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="rb-model-")
        self.tag = 0
        self.current: dict[Key, int | None] = {}
        self.durable: dict[Key, int | None] = {}
        self.unsynced: list[tuple[int, dict[Key, int | None]]] = []  # (lsn, changes)
        self.tear = False
        self.disk = VolatileDisk()
        self.eng: Engine | None = None

    @initialize(tear=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def start(self, tear: bool, seed: int) -> None:
        self.tear = tear
        self.disk = VolatileDisk(tear=tear, rng=random.Random(seed))
        self.eng = Engine.open(self.disk, self.dir, CLUSTER, CFG)

    def teardown(self) -> None:
        try:
            self.disk.crash()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def e(self) -> Engine:
        assert self.eng is not None
        return self.eng

    def _absorb_sync(self) -> None:
        synced = self.e.synced_lsn
        keep = []
        for lsn, changes in self.unsynced:
            if lsn <= synced:
                self.durable.update(changes)
            else:
                keep.append((lsn, changes))
        self.unsynced = keep

    @rule(extent=st.sampled_from(EXTENTS), blk=st.integers(0, BLOCKS - 1), n=st.integers(1, 4))
    def write(self, extent: int, blk: int, n: int) -> None:
        n = min(n, BLOCKS - blk)
        parts: list[bytes] = []
        crcs: list[int] = []
        changes: dict[Key, int | None] = {}
        for i in range(n):
            self.tag += 1
            b = block_bytes(self.tag, extent, blk + i)
            parts.append(b)
            crcs.append(crc32c.crc32c(b))
            changes[(extent, blk + i)] = self.tag
        lsn = self.e.write(extent, blk, b"".join(parts), crcs)
        self.current.update(changes)
        self.unsynced.append((lsn, changes))

    @rule(extent=st.sampled_from(EXTENTS), seed=st.integers(0, 2**32 - 1))
    def write_burst(self, extent: int, seed: int) -> None:
        r = random.Random(seed)
        for _ in range(8):
            self.write(extent, r.randrange(BLOCKS), r.randint(1, 4))

    @rule(extent=st.sampled_from(EXTENTS), blk=st.integers(0, BLOCKS - 1), n=st.integers(1, 6))
    def trim(self, extent: int, blk: int, n: int) -> None:
        n = min(n, BLOCKS - blk)
        lsn = self.e.trim(extent, blk, n)
        changes: dict[Key, int | None] = {(extent, blk + i): None for i in range(n)}
        self.current.update(changes)
        self.unsynced.append((lsn, changes))

    @rule(extent=st.sampled_from(EXTENTS))
    def drop_extent(self, extent: int) -> None:
        lsn = self.e.drop_extent(extent)
        changes: dict[Key, int | None] = {(extent, b): None for b in range(BLOCKS)}
        self.current.update(changes)
        self.unsynced.append((lsn, changes))

    @rule(extent=st.sampled_from(EXTENTS), blk=st.integers(0, BLOCKS - 1), n=st.integers(1, 8))
    def read(self, extent: int, blk: int, n: int) -> None:
        n = min(n, BLOCKS - blk)
        data, crcs = self.e.read(extent, blk, n)
        for i in range(n):
            chunk = bytes(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            assert decode(extent, blk + i, chunk) == self.current.get((extent, blk + i))
            assert crcs[i] == crc32c.crc32c(chunk)

    @rule()
    def sync(self) -> None:
        self.e.sync()
        self._absorb_sync()

    @rule(budget=st.sampled_from([4096, 64 << 10, 1 << 20]))
    def compact(self, budget: int) -> None:
        if self.e.clean(budget):
            event("compaction rewrote bytes")
        self._absorb_sync()

    @rule()
    def checkpoint(self) -> None:
        self.e.checkpoint()
        self._absorb_sync()

    @rule(at=st.integers(0, 10_000))
    def damage_checkpoint(self, at: int) -> None:
        """Bit rot in the checkpoint: the next open must fall back to a full scan and still be right."""
        path = os.path.join(self.dir, "checkpoint")
        if not os.path.exists(path):
            return
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(at % size)
            b = f.read(1)
            f.seek(at % size)
            f.write(bytes([b[0] ^ 0x40]))
        event("checkpoint damaged")

    @rule()
    def reopen(self) -> None:
        self.e.close()
        self._absorb_sync()
        assert not self.unsynced
        self.eng = Engine.open(self.disk, self.dir, CLUSTER, CFG)
        assert self.e.report.corrupt == []
        assert self.e.report.torn_tail_bytes == 0
        self.check_all_exact()

    @rule(seed=st.integers(0, 2**32 - 1))
    def crash(self, seed: int) -> None:
        self.disk.crash()
        self.disk = VolatileDisk(tear=self.tear, rng=random.Random(seed))
        self.eng = Engine.open(self.disk, self.dir, CLUSTER, CFG)
        assert self.e.report.corrupt == [], self.e.report.corrupt
        event(f"crash: tear={self.tear} torn_tail={'yes' if self.e.report.torn_tail_bytes else 'no'}"
              f" checkpoint={self.e.report.used_checkpoint} unsynced_ops={'yes' if self.unsynced else 'no'}")
        allowed: dict[Key, set[int | None]] = {}
        for _lsn, changes in self.unsynced:
            for k, v in changes.items():
                allowed.setdefault(k, set()).add(v)
        seen: dict[Key, int | None] = {}
        for extent in EXTENTS:
            data, _ = self.e.read(extent, 0, BLOCKS)
            for b in range(BLOCKS):
                got = decode(extent, b, bytes(data[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]))
                ok = {self.durable.get((extent, b))} | allowed.get((extent, b), set())
                assert got in ok, f"block {extent}/{b}: got {got}, durable/allowed {ok}"
                seen[(extent, b)] = got
        self.current = dict(seen)
        self.durable = dict(seen)
        self.unsynced = []

    def check_all_exact(self) -> None:
        for extent in EXTENTS:
            data, _ = self.e.read(extent, 0, BLOCKS)
            for b in range(BLOCKS):
                got = decode(extent, b, bytes(data[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]))
                assert got == self.current.get((extent, b)), f"block {extent}/{b}"

    @precondition(lambda self: self.eng is not None)
    @invariant()
    def allocated_matches(self) -> None:
        want = sum(1 for v in self.current.values() if v is not None)
        assert self.e.stats()["blocks_allocated"] == want
        assert self.e.synced_lsn <= self.e.last_lsn


EngineVsDict.TestCase.settings = settings(
    max_examples=int(os.environ.get("RB_MODEL_EXAMPLES", "80")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_vs_dict = pytest.mark.filterwarnings("ignore")(EngineVsDict.TestCase)
