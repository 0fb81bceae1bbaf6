"""The shared write-ahead log (raftblock/replication/raft/wal.py, docs/format/wal.md)."""

from __future__ import annotations

import os
from pathlib import Path

from raftblock.replication.raft.types import ConfState, Entry, EntryType, HardState, NodeId, SnapshotMeta
from raftblock.replication.raft.wal import Wal, segment_name
from raftblock.storage.disk import OsDisk, VolatileDisk

CONF = ConfState(frozenset({NodeId(1), NodeId(2), NodeId(3)}))


def _ents(first: int, n: int, term: int = 1, size: int = 100) -> list[Entry]:
    return [Entry(term, i, EntryType.NORMAL, bytes([i % 251]) * size) for i in range(first, first + n)]


def test_one_sync_covers_every_group(tmp_path: Path) -> None:
    wal, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec == {}
    syncs0 = wal.syncs
    pos = 0
    for g in range(1, 101):
        wal.append_entries(g, _ents(1, 3))
        pos = wal.set_hard_state(g, HardState(2, NodeId(1), 1))
    wal.flush()
    assert wal.sync() >= pos
    assert wal.syncs == syncs0 + 1  # one fdatasync for 100 groups' records
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert len(rec) == 100
    for g in range(1, 101):
        assert rec[g].entries == _ents(1, 3)
        assert rec[g].hard_state == HardState(2, NodeId(1), 1)


def test_power_cut_loses_only_unsynced(tmp_path: Path) -> None:
    disk = VolatileDisk()
    wal, _ = Wal.open(disk, str(tmp_path))
    wal.append_entries(1, _ents(1, 5))
    wal.set_hard_state(1, HardState(1, NodeId(2), 5))
    wal.flush()
    wal.sync()
    wal.append_entries(1, _ents(6, 5))  # written (flushed) but never synced
    wal.set_hard_state(1, HardState(2, NodeId(3), 10))
    wal.flush()
    disk.crash()
    _, rec = Wal.open(VolatileDisk(), str(tmp_path))
    assert rec[1].entries == _ents(1, 5)
    assert rec[1].hard_state == HardState(1, NodeId(2), 5)


def test_torn_tail_is_cut_and_stays_cut(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path))
    wal.append_entries(7, _ents(1, 4))
    wal.flush()
    wal.sync()
    wal.close()
    seg = tmp_path / segment_name(1)
    with open(seg, "ab") as f:
        f.write(b"\x13\x37" * 50)  # half a record
    size_torn = os.path.getsize(seg)
    wal2, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[7].entries == _ents(1, 4)
    assert os.path.getsize(seg) < size_torn
    wal2.append_entries(7, _ents(5, 1))
    wal2.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[7].entries == _ents(1, 5)


def test_torn_tail_with_tearing_disk(tmp_path: Path) -> None:
    import random

    for seed in range(10):
        d = tmp_path / str(seed)
        disk = VolatileDisk(tear=True, rng=random.Random(seed))
        wal, _ = Wal.open(disk, str(d))
        wal.append_entries(1, _ents(1, 3, size=3000))
        wal.flush()
        wal.sync()
        wal.append_entries(1, _ents(4, 3, size=3000))
        wal.flush()
        disk.crash()
        _, rec = Wal.open(OsDisk(), str(d))
        got = rec[1].entries
        assert got[:3] == _ents(1, 3, size=3000)
        assert got == _ents(1, len(got), size=3000)  # a prefix of what was written, never garbage


def test_truncation_and_term_change_rebuild_log(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path))
    wal.append_entries(1, _ents(1, 10, term=1))
    wal.append_entries(1, _ents(6, 2, term=2))  # a new leader overwrote 6..10 with 6..7
    wal.set_hard_state(1, HardState(2, NodeId(3), 7))
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[1].entries == _ents(1, 5, term=1) + _ents(6, 2, term=2)
    assert rec[1].hard_state == HardState(2, NodeId(3), 7)


def test_compaction_removes_old_segments_and_recovery_keeps_the_rest(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    for i in range(1, 201):
        for g in (1, 2):
            wal.append_entries(g, _ents(i, 1, size=1000))
        wal.flush()
    wal.sync()
    assert wal.segment_count() > 3
    wal.compact(1, SnapshotMeta(150, 1, CONF))
    wal.compact(2, SnapshotMeta(180, 1, CONF))
    wal.set_hard_state(1, HardState(1, NodeId(1), 200))
    wal.flush()
    wal.sync()
    removed = wal.gc()
    assert removed >= 1
    wal.sync()
    assert wal.segments_removed == removed
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[1].snap is not None and rec[1].snap.index == 150
    assert rec[1].entries == _ents(151, 50, size=1000)
    assert rec[2].snap is not None and rec[2].snap.index == 180
    assert rec[2].entries == _ents(181, 20, size=1000)
    assert rec[1].hard_state.commit == 200


def test_snapshot_install_drops_the_log(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path))
    wal.append_entries(3, _ents(1, 5))
    wal.install_snapshot(3, SnapshotMeta(90, 4, CONF))
    wal.append_entries(3, _ents(91, 2, term=4))
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[3].snap is not None and (rec[3].snap.index, rec[3].snap.term) == (90, 4)
    assert rec[3].entries == _ents(91, 2, term=4)
