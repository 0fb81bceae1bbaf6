"""Targeted tests of the storage engine (docs/format/segment.md is the spec they cite)."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest

from raftblock.storage.disk import Disk, DiskFile, OsDisk, VolatileDisk
from raftblock.storage.engine import (
    BLOCK_SIZE,
    CorruptBlockError,
    Engine,
    EngineConfig,
    NoSpaceError,
)
from raftblock.storage.segment import payload_offset, segment_name

CLUSTER = b"raftblock-test-1"
SMALL = EngineConfig(segment_size_bytes=256 << 10)


def blocks(tag: int, n: int = 1) -> tuple[bytes, list[int]]:
    data = b"".join(struct.pack("<QQ", tag, i) * (BLOCK_SIZE // 16) for i in range(n))
    return data, [crc32c.crc32c(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) for i in range(n)]


def expect(tag: int, i: int = 0) -> bytes:
    return struct.pack("<QQ", tag, i) * (BLOCK_SIZE // 16)


@pytest.fixture
def d(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def eng(d: str) -> Iterator[Engine]:
    e = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    yield e
    e.close()


def rec_location(e: Engine, extent: int, blk: int) -> tuple[str, int, int]:
    """(segment path, record offset, payload offset of this block) of a block's current version."""
    rec = e.index.extents[extent][blk]
    path = os.path.join(e.directory, segment_name(rec.seg))
    return path, rec.off, rec.off + payload_offset(rec.count) + (blk - rec.block) * BLOCK_SIZE


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


# --- basics -----------------------------------------------------------------------------------


def test_write_read_holes_and_block_status(eng: Engine) -> None:
    data, crcs = blocks(1, 3)
    lsn = eng.write(7, 10, data, crcs)
    assert lsn == 1 == eng.last_lsn
    out, got_crcs = eng.read(7, 8, 6)
    assert out[: 2 * BLOCK_SIZE] == bytes(2 * BLOCK_SIZE)  # thin provisioning: holes read as zeros
    assert out[2 * BLOCK_SIZE : 5 * BLOCK_SIZE] == data
    assert got_crcs[2:5] == crcs and got_crcs[0] == crc32c.crc32c(bytes(BLOCK_SIZE))
    assert eng.block_status(7, 8, 6) == [(2, False), (3, True), (1, False)]
    assert eng.block_status(99, 0, 5) == [(5, False)]
    assert eng.stats()["blocks_allocated"] == 3
    assert eng.synced_lsn == 0
    assert eng.sync() == 1 == eng.synced_lsn


def test_trim_makes_holes_and_drop_extent(eng: Engine) -> None:
    eng.write(1, 0, *blocks(1, 4))
    eng.write(2, 0, *blocks(2, 2))
    eng.trim(1, 1, 2)
    out, _ = eng.read(1, 0, 4)
    assert out[:BLOCK_SIZE] == expect(1, 0)
    assert out[BLOCK_SIZE : 3 * BLOCK_SIZE] == bytes(2 * BLOCK_SIZE)
    assert eng.block_status(1, 0, 4) == [(1, True), (2, False), (1, True)]
    eng.drop_extent(1)
    assert eng.block_status(1, 0, 4) == [(4, False)]
    assert eng.stats()["blocks_allocated"] == 2
    assert eng.read(2, 0, 2)[0] == blocks(2, 2)[0]


def test_bad_crc_before_write_raises_and_writes_nothing(eng: Engine) -> None:
    """TigerBeetle pair check: verify right before writing."""
    data, crcs = blocks(1, 3)
    crcs[1] ^= 1
    with pytest.raises(CorruptBlockError) as ei:
        eng.write(1, 5, data, crcs)
    assert (ei.value.extent_id, ei.value.block) == (1, 6)
    assert eng.last_lsn == 0 and eng.stats()["blocks_allocated"] == 0


def test_argument_checks(eng: Engine) -> None:
    data, crcs = blocks(1, 1)
    with pytest.raises(ValueError):
        eng.write(1, 0, data + b"x", crcs)
    big = bytes(257 * BLOCK_SIZE)
    with pytest.raises(ValueError):
        eng.write(1, 0, big, [0] * 257)
    with pytest.raises(ValueError):
        eng.trim(1, 0, 0)


def test_max_write_larger_than_segment(d: str) -> None:
    e = Engine.open(OsDisk(), d, CLUSTER, EngineConfig(segment_size_bytes=64 << 10))
    data, crcs = blocks(3, 256)
    e.write(1, 0, data, crcs)
    e.close()
    e = Engine.open(OsDisk(), d, CLUSTER, EngineConfig(segment_size_bytes=64 << 10))
    assert e.read(1, 0, 256)[0] == data
    e.close()


def test_foreign_cluster_refused(d: str) -> None:
    Engine.open(OsDisk(), d, CLUSTER, SMALL).close()
    with pytest.raises(ValueError):
        Engine.open(OsDisk(), d, b"another-cluster!", SMALL)
    os.remove(os.path.join(d, "checkpoint"))  # segment headers carry the cluster id too
    with pytest.raises(ValueError):
        Engine.open(OsDisk(), d, b"another-cluster!", SMALL)


def test_reopen_with_checkpoint_replays_only_the_tail(d: str) -> None:
    e = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    for i in range(40):
        e.write(1, i, *blocks(i))
    e.checkpoint()
    for i in range(3):
        e.write(1, 100 + i, *blocks(100 + i))
    e.sync()
    e._close_files()  # crash: no clean close, so no new checkpoint
    e2 = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    r = e2.report
    assert r.used_checkpoint and r.checkpoint_lsn == 40
    assert r.records_replayed == 3 and r.segments_scanned == 1 and r.records_verified >= 1
    assert e2.last_lsn == 43
    for i in (0, 39, 100, 102):
        assert e2.read(1, i, 1)[0] == expect(i)
    e2.close()


# --- power cuts -----------------------------------------------------------------------------


def test_torn_tail_is_truncated_and_reported(d: str) -> None:
    disk = VolatileDisk(tear=True, rng=random.Random(3))
    e = Engine.open(disk, d, CLUSTER, SMALL)
    for i in range(5):
        e.write(1, i, *blocks(i))
    e.sync()
    for i in range(5, 12):
        e.write(1, i, *blocks(i, 2))  # unsynced: torn by the crash
    disk.crash()
    e2 = Engine.open(VolatileDisk(), d, CLUSTER, SMALL)
    r = e2.report
    assert r.corrupt == []
    assert r.torn_tail_bytes > 0
    for i in range(5):
        assert e2.read(1, i, 1)[0] == expect(i)
    # Every later block is whole or absent (all-or-nothing per record in fact).
    out, _ = e2.read(1, 5, 8)
    for i in range(8):
        chunk = bytes(out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        assert chunk == bytes(BLOCK_SIZE) or chunk in (expect(5 + i, 0), expect(4 + i, 1))
    # The cut is durable: appending and reopening again reports nothing.
    e2.write(1, 50, *blocks(50))
    e2.close()
    e3 = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    assert e3.report.torn_tail_bytes == 0 and e3.report.corrupt == []
    assert e3.read(1, 50, 1)[0] == expect(50)
    e3.close()


def _three_synced_records(d: str, disk: Disk) -> Engine:
    """A at blocks 0-1, B (newer version of 10-11, over an older one), C at 20-21; each synced, so
    every later record's sync_mark proves the earlier ones durable."""
    e = Engine.open(disk, d, CLUSTER, SMALL)
    e.write(1, 10, *blocks(900, 2))  # older version of B's blocks
    e.sync()
    e.write(1, 0, *blocks(1, 2))
    e.sync()
    e.write(1, 10, *blocks(2, 2))
    e.sync()
    e.write(1, 20, *blocks(3, 2))
    e.sync()
    e.write(1, 30, *blocks(4, 1))
    e.sync()
    return e


def test_flipped_length_byte_mid_file_is_corruption_not_torn_tail(d: str) -> None:
    """segment.md: a bad record before the durable mark is corruption; reported with its block range;
    its blocks fail reads instead of returning the older version; later records survive."""
    e = _three_synced_records(d, OsDisk())
    path, off, _ = rec_location(e, 1, 10)
    e._close_files()  # crash: no checkpoint, so recovery scans the whole log
    flip(path, off + 16)  # the length field
    e2 = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    r = e2.report
    assert r.torn_tail_bytes == 0
    assert len(r.corrupt) == 1
    c = r.corrupt[0]
    assert (c.segment, c.offset) == (os.path.basename(path), off)
    assert (c.extent_id, c.block_start, c.block_count) == (1, 10, 2)
    with pytest.raises(CorruptBlockError) as ei:
        e2.read(1, 9, 3)
    assert ei.value.block == 10
    assert e2.read(1, 0, 2)[0] == blocks(1, 2)[0]
    assert e2.read(1, 20, 2)[0] == blocks(3, 2)[0]
    assert e2.read(1, 30, 1)[0] == blocks(4, 1)[0]
    e2.write(1, 10, *blocks(5, 2))  # a later write clears the bad mark
    assert e2.read(1, 10, 2)[0] == blocks(5, 2)[0]
    e2.close()


@pytest.mark.parametrize("clean_close", [True, False], ids=["checkpoint+verify", "full-scan"])
def test_flipped_payload_byte_fails_only_that_block(d: str, clean_close: bool) -> None:
    e = _three_synced_records(d, OsDisk())
    path, off, pay = rec_location(e, 1, 11)
    if clean_close:
        e.close()
    else:
        e._close_files()
    flip(path, pay + 100)
    e2 = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    r = e2.report
    assert r.used_checkpoint is clean_close
    assert r.torn_tail_bytes == 0
    assert [(c.extent_id, c.block_start, c.block_count) for c in r.corrupt] == [(1, 11, 1)]
    assert e2.read(1, 10, 1)[0] == expect(2, 0)
    with pytest.raises(CorruptBlockError) as ei:
        e2.read(1, 10, 2)
    assert (ei.value.extent_id, ei.value.block) == (1, 11)
    assert e2.block_status(1, 10, 2) == [(2, True)]
    e2.trim(1, 11, 1)  # a trim clears the mark too
    assert e2.read(1, 10, 2)[0][BLOCK_SIZE:] == bytes(BLOCK_SIZE)
    e2.close()


def test_corruption_while_running_is_caught_on_read(eng: Engine) -> None:
    eng.write(1, 0, *blocks(1, 4))
    eng.sync()
    path, _, pay = rec_location(eng, 1, 2)
    flip(path, pay + 7)
    with pytest.raises(CorruptBlockError) as ei:
        eng.read(1, 0, 4)
    assert ei.value.block == 2
    assert eng.read(1, 0, 2)[0] == blocks(1, 2)[0]
    assert eng.read(1, 3, 1)[0] == expect(1, 3)
    with pytest.raises(CorruptBlockError):
        eng.read(1, 2, 1)  # stays marked bad
    eng.write(1, 2, *blocks(9))
    assert eng.read(1, 2, 1)[0] == expect(9)


def test_bad_checkpoint_falls_back_to_full_scan(d: str) -> None:
    e = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    for i in range(20):
        e.write(2, i, *blocks(i))
    e.trim(2, 3, 2)
    e.close()
    flip(os.path.join(d, "checkpoint"), 90)
    e2 = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    r = e2.report
    assert not r.used_checkpoint
    assert r.checkpoint_error == "checkpoint checksum mismatch"
    assert r.corrupt == [] and r.records_replayed == 21
    out, _ = e2.read(2, 0, 20)
    for i in range(20):
        want = bytes(BLOCK_SIZE) if i in (3, 4) else expect(i)
        assert out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] == want
    e2.close()


# --- space ------------------------------------------------------------------------------------


def test_ten_overwrites_do_not_take_ten_times_the_space(d: str) -> None:
    cfg = EngineConfig(segment_size_bytes=256 << 10, checkpoint_interval_bytes=1 << 20)
    e = Engine.open(OsDisk(), d, CLUSTER, cfg)
    n = 256  # 1 MiB live
    for rnd in range(10):
        for b in range(0, n, 8):
            e.write(1, b, *blocks(rnd * 1000 + b, 8))
        e.sync()
        while e.clean(512 << 10):  # bounded budget per call
            pass
    live = e.stats()["live_bytes"]
    assert live == n * BLOCK_SIZE
    assert e.stats()["bytes_on_disk"] < 2.5 * live, e.stats()
    e.close()
    assert sum(p.stat().st_size for p in Path(d).iterdir()) < 2.5 * live
    e2 = Engine.open(OsDisk(), d, CLUSTER, cfg)
    for b in range(0, n, 8):
        assert e2.read(1, b, 8)[0] == blocks(9000 + b, 8)[0]
    e2.close()


def test_cleaning_keeps_pace_with_overwrites_and_trickles_below_the_target(d: str) -> None:
    """node/raftnode.py cleaning_budget: the full rate while dead bytes exceed max(target x live, two
    segments), nothing extra below (the trickle); run at that pace against a stream of overwrites (what bench/soak.py
    measures on a cluster), the engine's dead bytes stay near the target instead of growing with every pass."""
    from raftblock.node.raftnode import cleaning_budget

    cfg = EngineConfig(segment_size_bytes=128 << 10, cleaning_garbage_target=0.25, cleaning_bytes_per_s=4 << 20)
    seg = cfg.segment_size_bytes
    assert cleaning_budget(1 << 20, 2 * seg, cfg, 1.0) == 0  # not behind
    assert cleaning_budget(1 << 20, 2 * seg + 1, cfg, 0.5) == 2 << 20
    assert cleaning_budget(8 << 20, (2 << 20) + 1, cfg, 1.0) == 4 << 20
    assert cleaning_budget(8 << 20, 2 << 20, cfg, 1.0) == 0

    e = Engine.open(OsDisk(), d, CLUSTER, cfg)
    n = 512  # 2 MiB live
    rng = random.Random(5)
    worst = 0
    for rnd in range(20):  # 20 x 1 MiB of random 32 KiB overwrites, one pacing interval each
        for _ in range(32):
            b = rng.randrange(0, n, 8)
            e.write(1, b, *blocks(rnd * 10000 + b, 8))
        e.sync()
        assert e.space() == (e.stats()["live_bytes"], e.stats()["garbage_bytes"])
        budget = cleaning_budget(*e.space(), cfg, 0.25) or 64 << 10  # 1 MiB per interval when behind, else a trickle
        while budget > 0 and (w := e.clean(min(budget, 256 << 10))):
            budget -= w
        worst = max(worst, e.stats()["garbage_bytes"])
    st = e.stats()
    assert st["cleaned_bytes"] > 0
    assert worst <= 2 * seg + st["live_bytes"], (worst, st)  # near the target, not 20 MiB written
    assert st["bytes_on_disk"] < st["live_bytes"] + 4 * seg + (1 << 20), st
    e.close()


def test_compact_respects_budget(d: str) -> None:
    e = Engine.open(OsDisk(), d, CLUSTER, EngineConfig(segment_size_bytes=128 << 10))
    for rnd in range(2):
        for b in range(64):
            e.write(1, b, *blocks(rnd * 100 + b))
    for b in range(0, 64, 2):
        e.trim(1, b, 1)
    e.sync()
    total = 0
    calls = 0
    while (w := e.clean(20 << 10)) > 0:
        assert w <= 20 << 10
        total += w
        calls += 1
    assert calls > 1 and total > 0
    e.close()


@pytest.mark.parametrize("lose_checkpoint", [False, True])
def test_trimmed_blocks_stay_trimmed_after_compaction_and_restart(d: str, lose_checkpoint: bool) -> None:
    """segment.md tombstone rule: compaction never lets an older write reappear."""
    cfg = EngineConfig(segment_size_bytes=64 << 10, cleaning_garbage_ratio=0.2)
    e = Engine.open(OsDisk(), d, CLUSTER, cfg)
    for b in range(8):
        e.write(1, b, *blocks(b))  # old versions in the first segments
    e.checkpoint()  # a checkpoint that still names them
    e.trim(1, 0, 4)
    for rnd in range(6):  # churn so the trim's segment and others become garbage
        for b in range(4, 8):
            e.write(1, b, *blocks(100 * rnd + b))
        e.write(2, 0, *blocks(5, 8))
    e.sync()
    for _ in range(20):
        e.clean(1 << 20)
    path = os.path.join(d, "checkpoint")
    e._close_files()  # crash without a fresh checkpoint
    if lose_checkpoint:
        os.remove(path)
    e2 = Engine.open(OsDisk(), d, CLUSTER, cfg)
    assert e2.report.used_checkpoint is not lose_checkpoint
    assert e2.report.corrupt == []
    out, _ = e2.read(1, 0, 8)
    assert out[: 4 * BLOCK_SIZE] == bytes(4 * BLOCK_SIZE)
    for b in range(4, 8):
        assert out[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] == expect(500 + b)
    e2.close()


def test_pin_keeps_old_versions_through_compaction(d: str) -> None:
    cfg = EngineConfig(segment_size_bytes=64 << 10, cleaning_garbage_ratio=0.2)
    e = Engine.open(OsDisk(), d, CLUSTER, cfg)
    for b in range(8):
        e.write(1, b, *blocks(b))
    e.trim(1, 7, 1)
    snap = e.last_lsn
    e.pin(snap)
    for rnd in range(1, 6):
        for b in range(8):
            e.write(1, b, *blocks(100 * rnd + b))
    e.sync()
    while e.clean(1 << 20):
        pass
    old, _ = e.read_at(1, 0, 8, snap)
    for b in range(7):
        assert old[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] == expect(b)
    assert old[7 * BLOCK_SIZE :] == bytes(BLOCK_SIZE)
    assert e.read(1, 0, 1)[0] == expect(500)
    assert segment_name(1) not in os.listdir(d)  # the pinned versions were copied, not just left
    e.unpin(snap)
    assert not e.index.history and e.stats()["pins"] == 0
    while e.clean(1 << 20):
        pass
    e.close()
    e2 = Engine.open(OsDisk(), d, CLUSTER, cfg)
    assert e2.report.corrupt == []
    assert e2.read(1, 0, 1)[0] == expect(500)
    e2.close()


class FullDisk:
    """OsDisk whose pwrite/fallocate raise ENOSPC once `budget` bytes have been written/allocated."""

    def __init__(self, budget: int) -> None:
        self.inner = OsDisk()
        self.budget = budget

    def _spend(self, n: int) -> None:
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        self.budget -= n

    def open_file(self, path: str, create: bool) -> DiskFile:
        return _FullFile(self, self.inner.open_file(path, create))

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


class _FullFile:
    def __init__(self, disk: FullDisk, f: DiskFile) -> None:
        self.disk = disk
        self.f = f

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if len(data) > self.disk.budget:  # partial write, then ENOSPC, like a full file system
            self.f.pwrite(memoryview(data)[: self.disk.budget // 2], offset)
        self.disk._spend(len(data))
        self.f.pwrite(data, offset)

    def fallocate(self, offset: int, length: int) -> None:
        self.disk._spend(length)
        self.f.fallocate(offset, length)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.f, name)


@pytest.mark.parametrize("preallocate", [True, False], ids=["fallocate-enospc", "pwrite-enospc"])
def test_enospc_raises_nospace_then_recovers(d: str, preallocate: bool) -> None:
    """ENOSPC -> NoSpaceError; the failed record is not indexed, nothing stored is harmed, and writes
    work again when space returns (also across a crash and reopen)."""
    disk = FullDisk(budget=600 << 10)
    cfg = EngineConfig(segment_size_bytes=128 << 10, preallocate=preallocate)
    e = Engine.open(disk, d, CLUSTER, cfg)  # type: ignore[arg-type]
    n_ok = 0
    with pytest.raises(NoSpaceError) as ei:
        for b in range(1000):
            e.write(1, 2 * b, *blocks(b, 2))
            n_ok += 1
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    assert n_ok > 10
    assert e.last_lsn == n_ok and e.stats()["blocks_allocated"] == 2 * n_ok
    with pytest.raises(NoSpaceError):
        e.write(1, 2 * n_ok, *blocks(n_ok, 2))  # still full
    assert e.sync() == n_ok
    for b in range(n_ok):
        assert e.read(1, 2 * b, 2)[0] == blocks(b, 2)[0]
    assert e.read(1, 2 * n_ok, 2)[0] == bytes(2 * BLOCK_SIZE)
    disk.budget = 10 << 20  # space returns
    e.write(1, 2 * n_ok, *blocks(n_ok, 2))
    e.write(1, 2 * n_ok + 2, *blocks(n_ok + 1, 1))
    e.sync()
    e._close_files()  # crash
    e2 = Engine.open(OsDisk(), d, CLUSTER, cfg)
    assert e2.report.corrupt == []
    for b in range(n_ok + 1):
        assert e2.read(1, 2 * b, 2)[0] == blocks(b, 2)[0]
    assert e2.read(1, 2 * n_ok + 2, 1)[0] == blocks(n_ok + 1, 1)[0]
    e2.close()


# --- threads ----------------------------------------------------------------------------------


def test_sync_on_worker_thread_while_writing(d: str) -> None:
    disk = VolatileDisk()
    e = Engine.open(disk, d, CLUSTER, SMALL)
    stop = threading.Event()
    synced: list[int] = []

    def worker() -> None:
        while not stop.is_set():
            synced.append(e.sync())

    t = threading.Thread(target=worker)
    t.start()
    try:
        for i in range(300):
            e.write(1, i % 64, *blocks(i))
    finally:
        stop.set()
        t.join()
    durable = max(synced)
    assert synced == sorted(synced)
    disk.crash()
    e2 = Engine.open(VolatileDisk(), d, CLUSTER, SMALL)
    assert e2.report.corrupt == []
    assert e2.last_lsn >= durable
    # Every write covered by a sync that returned is there.
    latest: dict[int, int] = {}
    for i in range(durable):
        latest[i % 64] = i
    out, _ = e2.read(1, 0, 64)
    for blk, i in latest.items():
        got = struct.unpack_from("<Q", out, blk * BLOCK_SIZE)[0]
        assert got >= i
    e2.close()


def test_open_on_a_full_disk_serves_reads_and_writes_once_space_returns(d: str) -> None:
    """A node must come back after a crash on a full disk: open does not need a new segment up front."""
    e = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    data, crcs = blocks(5, 2)
    e.write(1, 0, data, crcs)
    e.close()
    full = FullDisk(budget=0)
    e = Engine.open(full, d, CLUSTER, SMALL)  # type: ignore[arg-type]
    try:
        assert e.read(1, 0, 2)[0] == data
        more, more_crcs = blocks(6, 1)
        with pytest.raises(NoSpaceError):
            e.write(1, 2, more, more_crcs)
        assert e.read(1, 0, 2)[0] == data
        full.budget = 64 << 20  # space returns
        e.write(1, 2, more, more_crcs)
        e.sync()
        assert e.read(1, 0, 3)[0] == data + more
    finally:
        e.close()
    e = Engine.open(OsDisk(), d, CLUSTER, SMALL)
    try:
        assert e.read(1, 0, 3)[0] == data + more
    finally:
        e.close()


def test_write_many_equals_writes_one_by_one(tmp_path: Path) -> None:
    """The batched apply path: same LSNs, same reads, same state after a reopen as single writes; a batch
    that does not fit in the active segment falls back to one write at a time."""
    rng = random.Random(7)
    batches = []
    for b in range(40):
        batch = []
        for _ in range(rng.randrange(1, 12)):
            n = rng.choice((1, 1, 2, 4))
            data, crcs = blocks(b * 1000 + len(batch), n)
            batch.append((rng.randrange(1, 4), rng.randrange(0, 64), data, crcs))
        batches.append(batch)
    one = Engine.open(OsDisk(), str(tmp_path / "one"), CLUSTER, SMALL)
    many = Engine.open(OsDisk(), str(tmp_path / "many"), CLUSTER, SMALL)
    try:
        for batch in batches:
            lsn_one = 0
            for extent, blk, data, crcs in batch:
                lsn_one = one.write(extent, blk, data, crcs)
            assert many.write_many(batch) == lsn_one
        assert len(many.index.segs) > 1  # some batches crossed a segment boundary
        for extent in (1, 2, 3):
            assert many.read(extent, 0, 80) == one.read(extent, 0, 80)
    finally:
        one.close()
        many.close()
    again = Engine.open(OsDisk(), str(tmp_path / "many"), CLUSTER, SMALL)
    ref = Engine.open(OsDisk(), str(tmp_path / "one"), CLUSTER, SMALL)
    try:
        for extent in (1, 2, 3):
            assert again.read(extent, 0, 80) == ref.read(extent, 0, 80)
    finally:
        again.close()
        ref.close()


def test_write_many_bad_crc_writes_nothing(eng: Engine) -> None:
    eng.write(1, 0, *blocks(1))
    good, good_crcs = blocks(2)
    bad, bad_crcs = blocks(3)
    before = eng.last_lsn
    with pytest.raises(CorruptBlockError):
        eng.write_many([(1, 0, good, good_crcs), (1, 1, bad, [bad_crcs[0] ^ 1])])
    with pytest.raises(ValueError):
        eng.write_many([(1, 0, good, good_crcs), (1, 1, bad[:100], bad_crcs)])
    assert eng.last_lsn == before
    data, _ = eng.read(1, 0, 2)
    assert data[:BLOCK_SIZE] == expect(1) and data[BLOCK_SIZE:] == bytes(BLOCK_SIZE)


def test_block_status_matches_a_model_sparse_and_dense(eng: Engine) -> None:
    rng = random.Random(11)
    alloc: set[int] = set()
    for _ in range(300):
        blk = rng.randrange(0, 200)
        if rng.random() < 0.75:
            eng.write(5, blk, *blocks(blk))
            alloc.add(blk)
        else:
            eng.trim(5, blk, 1)
            alloc.discard(blk)
    for start, count in [(0, 200), (0, 1), (17, 3), (150, 4000), (199, 1), (300, 10), (0, 65536)]:
        want: list[tuple[int, bool]] = []
        for b in range(start, start + count):
            a = b in alloc
            if want and want[-1][1] == a:
                want[-1] = (want[-1][0] + 1, a)
            else:
                want.append((1, a))
        assert eng.block_status(5, start, count) == want, (start, count)
