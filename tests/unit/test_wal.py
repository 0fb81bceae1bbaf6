"""The shared write-ahead log (raftblock/replication/wal.py, docs/format/wal.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import crc32c
import pytest

from raftblock.replication.raft.types import ConfState, Entry, EntryType, HardState, NodeId, SnapshotMeta
from raftblock.replication.wal import Wal, segment_name
from raftblock.storage.disk import DiskFile, OsDisk, VolatileDisk
from raftblock.wire.ops import OP_WRITE, BlockOp, encode_batch

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
    _fill(wal, (1, 2), 1, 200)
    assert wal.segment_count() > 3
    wal.compact(1, SnapshotMeta(150, 1, CONF, app=b"sessions at 150"))
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
    assert rec[1].snap.app == b"sessions at 150"  # the app state survives, also in a rolled segment's base
    assert rec[1].entries == _ents(151, 50, size=1000)
    assert rec[2].snap is not None and rec[2].snap.index == 180 and rec[2].snap.app == b""
    assert rec[2].entries == _ents(181, 20, size=1000)
    assert rec[1].hard_state.commit == 200


def test_snapshot_install_drops_the_log(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path))
    wal.append_entries(3, _ents(1, 5))
    wal.install_snapshot(3, SnapshotMeta(90, 4, CONF, app=b"\x00" * 3000))
    wal.append_entries(3, _ents(91, 2, term=4))
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[3].snap is not None and (rec[3].snap.index, rec[3].snap.term) == (90, 4)
    assert rec[3].snap.app == b"\x00" * 3000 and rec[3].snap.conf == CONF
    assert rec[3].entries == _ents(91, 2, term=4)


@pytest.mark.parametrize("disk_kind", ["os", "volatile"])
def test_released_segments_are_recycled_and_their_old_records_never_replay(tmp_path: Path, disk_kind: str) -> None:
    """docs/format/wal.md "Recycling": dropped segments are kept (*.free) and overwritten by later rolls.
    The records of a file's earlier life fail the seq-seeded CRC, so recovery stops at the new tail of the
    newest segment; an older recycled segment was cut at its roll, so no stale bytes follow its records.
    With the volatile disk, a power cut in a recycled segment loses only what was not synced."""
    disk: OsDisk | VolatileDisk = OsDisk() if disk_kind == "os" else VolatileDisk()
    wal, _ = Wal.open(disk, str(tmp_path), segment_bytes_max=64 << 10)
    _fill(wal, (1,), 1, 300)
    wal.compact(1, SnapshotMeta(289, 1, CONF))
    wal.flush()
    wal.sync()
    assert wal.gc() >= 2
    wal.reap()
    assert len(list(tmp_path.glob("*.free"))) == 2  # kept for reuse, not unlinked
    want = _ents(290, 11, size=1000)
    i = 301
    # Smaller records than the files held before: a full recycled segment ends before the old bytes do,
    # and the second recycled file, left active, has old records after its last one.
    while wal.recycled_rolls < 2:
        e = _ents(i, 1, size=100)
        wal.append_entries(1, e)
        wal.flush()
        wal.sync()
        want += e
        i += 1
    synced = _ents(i, 10, size=100)
    wal.append_entries(1, synced)
    wal.flush()
    wal.sync()
    want += synced
    lost = _ents(i + 10, 5, size=100)
    wal.append_entries(1, lost)  # flushed, never synced
    wal.flush()
    if isinstance(disk, VolatileDisk):
        disk.crash()
        disk = VolatileDisk()
    else:
        wal.sync()
        wal.close()
        want += lost
    _, rec = Wal.open(disk, str(tmp_path), segment_bytes_max=64 << 10)
    assert rec[1].snap is not None and rec[1].snap.index == 289
    assert rec[1].entries == want
    assert not list(tmp_path.glob("*.free"))  # a new process starts without kept files


def test_version_1_segments_are_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import raftblock.replication.wal as walmod

    monkeypatch.setattr(walmod, "SEG_MAGIC", walmod.SEG_MAGIC_V1)
    monkeypatch.setattr(walmod, "_seed", lambda seq: 0)  # version 1: unseeded record CRCs
    wal, _ = Wal.open(OsDisk(), str(tmp_path))
    wal.append_entries(3, _ents(1, 4))
    wal.flush()
    wal.sync()
    wal.close()
    monkeypatch.undo()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[3].entries == _ents(1, 4)


def test_old_records_right_after_the_tail_of_a_recycled_segment_fail_their_crc(tmp_path: Path) -> None:
    """The case alignment cannot catch: a recycled file whose earlier records start exactly where the new
    ones end. Only the seq-seeded CRC tells them apart (docs/format/wal.md "Recycling")."""
    import raftblock.replication.wal as walmod

    def records(seq: int, first: int, n: int) -> bytes:
        w = Wal(OsDisk(), str(tmp_path), 1 << 20)
        w._segments.append(walmod._Segment(seq, "unused", cast(DiskFile, None), 0))
        w._seed = walmod._seed(seq)
        w.append_entries(4, _ents(first, n))
        return b"".join(bytes(b) for b in w._buf)

    new = records(2, 1, 2)
    old = records(1, 3, 3)  # same sizes: they line up after the new records
    raw = walmod.SEG_HEADER.pack(walmod.SEG_MAGIC, 2) + new + old
    (tmp_path / segment_name(2)).write_bytes(raw)
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[4].entries == _ents(1, 2)


def _fill(wal: Wal, groups: tuple[int, ...], first: int, n: int) -> None:
    """As a node appends: every flush followed by its group commit (a roll waits for one: rule 7)."""
    for i in range(first, first + n):
        for g in groups:
            wal.append_entries(g, _ents(i, 1, size=1000))
        wal.flush()
        wal.sync()


@pytest.mark.parametrize("how", ["discarded", "deleted"])
def test_a_dropped_groups_entries_never_pin_a_segment(tmp_path: Path, how: str) -> None:
    """Issue 13: a discarded replica's snapshot is empty (index 0), below the entries it had in old
    segments; before the fix those entries pinned every segment from the first one on, forever."""
    wal, _ = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    _fill(wal, (1, 2), 1, 200)
    assert wal.segment_count() > 3
    wal.compact(1, SnapshotMeta(200, 1, CONF))  # group 1: all applied and in the engine
    if how == "discarded":
        wal.install_snapshot(2, SnapshotMeta(0, 0, ConfState(frozenset())))
    else:
        wal.forget(2)
    wal.flush()
    assert wal.gc() == 0  # nothing is released before the records that allow it are durable
    wal.sync()
    wal.gc()
    wal.sync()
    assert wal.segment_count() == 1  # only the active one is left
    # more of group 1 (rolls), compacted: the segment that recorded group 2 empty goes too
    _fill(wal, (1,), 201, 100)
    wal.compact(1, SnapshotMeta(300, 1, CONF))
    wal.flush()
    wal.sync()
    wal.gc()
    wal.sync()
    assert wal.segment_count() == 1
    wal.close()
    wal, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[1].entries == [] and rec[1].snap is not None and rec[1].snap.index == 300
    if how == "discarded":  # carried forward empty: a replaced replica is known to be empty
        assert rec[2].snap is not None and rec[2].snap.index == 0 and rec[2].entries == []
    else:  # forgotten: absent once the segment that recorded it empty is gone too
        assert 2 not in rec
    wal.close()


def test_recovery_knows_a_snapshot_record_unpins_older_segments(tmp_path: Path) -> None:
    """A restart between the discard and the release: the recovered segments' entries of the group are
    behind its SNAPSHOT record, so the first gc after recovery releases them."""
    wal, _ = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    _fill(wal, (1, 2), 1, 200)
    wal.compact(1, SnapshotMeta(200, 1, CONF))
    wal.forget(2)
    wal.flush()
    wal.sync()
    n_before = wal.segment_count()
    wal.close()  # no gc ran: every segment is still there
    wal, rec = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    assert wal.segment_count() == n_before + 1 and rec[2].entries == []
    wal.gc()
    wal.sync()
    assert wal.segment_count() == 1
    wal.close()


def test_a_group_dropped_and_then_hosted_again_pins_only_its_new_entries(tmp_path: Path) -> None:
    wal, _ = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    _fill(wal, (1,), 1, 100)
    wal.install_snapshot(1, SnapshotMeta(0, 0, ConfState(frozenset())))  # discarded
    wal.install_snapshot(1, SnapshotMeta(50, 3, CONF))  # a joiner again: a snapshot at 50 from the leader
    _fill(wal, (1,), 51, 100)  # its new log, 51..150 in the same and later segments
    wal.gc()
    wal.sync()
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[1].snap is not None and rec[1].snap.index == 50
    assert rec[1].entries == _ents(51, 100, size=1000)  # nothing needed was released


def test_a_power_cut_right_after_a_roll_leaves_no_torn_tail_in_an_older_segment(tmp_path: Path) -> None:
    """flush() rolls to a new segment before the group commit's fdatasync: nothing of the new segment
    reaches the disk until that sync has made the one it leaves durable (rule 7), so a power cut then never
    leaves a torn tail in what is no longer the newest segment (which recovery would call corruption)."""
    import random

    for seed in range(20):
        d = tmp_path / f"w{seed}"
        disk = VolatileDisk(tear=True, rng=random.Random(seed))
        wal, _ = Wal.open(disk, str(d), segment_bytes_max=64 << 10)
        wal.append_entries(1, _ents(1, 1, size=1000))
        wal.flush()
        wal.sync()
        wal.append_entries(1, _ents(2, 1, size=100 << 10))
        wal.flush()  # fills segment 1 (the one Wal.open made) and rolls to the next
        wal.append_entries(1, _ents(3, 1, size=1000))
        wal.flush()  # laid out in segment 2, held back
        assert not (d / segment_name(2)).exists()
        disk.crash()  # before the group commit's fdatasync
        _, rec = Wal.open(VolatileDisk(), str(d), segment_bytes_max=64 << 10)
        assert [e.index for e in rec[1].entries][:1] == [1]


def test_a_roll_writes_the_new_segment_only_after_a_sync_that_started_after_it(tmp_path: Path) -> None:
    """Rule 7, step by step: a sync that was already running when the roll happened does not release the
    new segment (it may not cover the old one's last bytes); the next one does. What was appended meanwhile
    is then written where it was laid out (write-once offsets included) and reads back after a restart."""
    import threading

    wal, _ = Wal.open(OsDisk(), str(tmp_path), segment_bytes_max=64 << 10)
    wal.write_once_min_bytes = 4096
    wal.append_entries(1, _ents(1, 1, size=60 << 10))
    wal.flush()
    # A sync that starts before the roll and returns after it, as the group commit's thread does.
    started, release = threading.Event(), threading.Event()
    real = wal.disk.fsync_dir

    def slow_fsync_dir(path: str) -> None:
        started.set()
        release.wait(10)
        real(path)

    wal._dir_dirty = True  # this sync will call fsync_dir: the hook holds it there
    wal.disk.fsync_dir = slow_fsync_dir  # type: ignore[method-assign]
    t = threading.Thread(target=wal.sync)
    t.start()
    assert started.wait(10)
    wal.append_entries(1, _ents(2, 1, size=8 << 10))
    wal.flush()  # segment 1 is full: rolls to 2
    release.set()
    t.join(10)
    wal.disk.fsync_dir = real  # type: ignore[method-assign]
    assert wal.segment_count() == 2
    data = os.urandom(8 << 10)
    op = BlockOp(OP_WRITE, 7, 0, 2, [crc32c.crc32c(data[:4096]), crc32c.crc32c(data[4096:])], data)
    e3 = Entry(1, 3, EntryType.NORMAL, encode_batch([op]))
    wal.append_entries(1, [e3])
    assert wal.flush() < wal.appended_pos  # held back: the sync that returned started before the roll
    assert not (tmp_path / segment_name(2)).exists()
    wal.sync()  # started after the roll: segment 1 is durable to its last byte
    assert wal.flush() == wal.appended_pos
    assert (tmp_path / segment_name(2)).exists()
    wal.sync()
    link = wal.take_link(1, 3, 1)
    assert link is not None and link.seq == 2
    f = wal.wal_file(2)
    assert f is not None
    ((_start, length, off),) = link.spans
    assert f.pread(length, off) == data
    wal.close()
    _, rec = Wal.open(OsDisk(), str(tmp_path))
    assert rec[1].entries == [*_ents(1, 1, size=60 << 10), *_ents(2, 1, size=8 << 10), e3]


@pytest.mark.parametrize("seed", range(12))
def test_power_cuts_at_random_points_of_appends_flushes_and_syncs_lose_nothing_synced(tmp_path: Path, seed: int) -> None:
    """A tearing disk, small segments (a roll every few steps, recycled files once compaction runs), random
    steps, a power cut at a random one: the WAL opens (no corruption) and holds every entry a sync covered."""
    import random

    rng = random.Random(seed)
    disk = VolatileDisk(tear=True, rng=random.Random(seed + 1000))
    wal, _ = Wal.open(disk, str(tmp_path), segment_bytes_max=32 << 10)
    wal.write_once_min_bytes = 4096 if seed % 2 else 0
    pos: dict[int, int] = {}  # index -> position
    durable = 0
    nxt = 1
    for _step in range(rng.randint(20, 200)):
        k = rng.random()
        if k < 0.5:
            e = _ents(nxt, 1, size=rng.choice([100, 3000, 9000]))
            pos[nxt] = wal.append_entries(1, e)
            nxt += 1
        elif k < 0.75:
            wal.flush()
        elif k < 0.9:
            synced = wal.sync()
            durable = max([i for i, p in pos.items() if p <= synced], default=durable)
        else:
            keep = max(0, durable - 3)
            if keep:
                wal.compact(1, SnapshotMeta(keep, 1, CONF))
            wal.gc()
            wal.reap()
    disk.crash()
    _, rec = Wal.open(VolatileDisk(), str(tmp_path), segment_bytes_max=32 << 10)
    got = [e.index for e in rec[1].entries] if 1 in rec else []
    base = rec[1].snap.index if 1 in rec and rec[1].snap is not None else 0
    assert got == list(range(base + 1, base + 1 + len(got)))
    assert base + len(got) >= durable
