"""Write-once (docs/format/write-once.md): a large write is stored once per node, in the WAL, and the
engine links to it. Engine + WAL + apply together, on real files, with the power-cut disk."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import crc32c
import pytest

from raftblock.replication.apply import apply_batch
from raftblock.replication.raft.types import ConfState, Entry, EntryType, NodeId, SnapshotMeta
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import Wal
from raftblock.storage.disk import Disk, OsDisk, VolatileDisk
from raftblock.storage.engine import CorruptBlockError, Engine, EngineConfig
from raftblock.wire.ops import OP_TRIM, OP_WRITE, BlockOp, encode_batch

B = 4096
MIN = 64 << 10
CID = b"w" * 16
GROUP = 5
CONF = ConfState(frozenset({NodeId(1), NodeId(2), NodeId(3)}))


def _write(extent: int, block: int, data: bytes) -> BlockOp:
    crcs = [crc32c.crc32c(data[i : i + B]) for i in range(0, len(data), B)]
    return BlockOp(OP_WRITE, extent, block, len(crcs), crcs, data)


def _pattern(seed: int, blocks: int) -> bytes:
    return random.Random(seed).randbytes(blocks * B)


class Node:
    """One node's WAL and engine, opened as raftnode does (WAL first), applying entries as a replica."""

    def __init__(self, root: Path, disk: Disk, min_bytes: int = MIN, **engine_kw: int) -> None:
        self.root = root
        self.disk = disk
        self.wal, self.recovered = Wal.open(disk, str(root / "wal"), segment_bytes_max=1 << 20)
        cfg = EngineConfig(segment_size_bytes=1 << 20, preallocate=False, **engine_kw)  # type: ignore[arg-type]
        self.engine = Engine.open(disk, str(root / "engine"), CID, cfg, wal=self.wal)
        self.wal.link_holder = self.engine.wal_refs
        self.wal.write_once_min_bytes = min_bytes
        self.sessions = Sessions()
        self.counters: Counter[str] = Counter()
        self.index = max([0, *(e.index for s in self.recovered.values() for e in s.entries),
                          *(s.snap.index for s in self.recovered.values() if s.snap is not None)])

    def append(self, ops: list[BlockOp], term: int = 1) -> Entry:
        self.index += 1
        e = Entry(term, self.index, EntryType.NORMAL, encode_batch(ops))
        self.wal.append_entries(GROUP, [e])
        return e

    def sync(self) -> None:
        self.wal.flush()
        self.wal.sync()

    def apply(self, e: Entry) -> None:
        link = self.wal.take_link(GROUP, e.index, e.term)
        apply_batch(self.engine, self.sessions, GROUP, e.index, e.data, self.counters, link)

    def write(self, ops: list[BlockOp]) -> Entry:
        e = self.append(ops)
        self.sync()
        self.apply(e)
        return e

    def compact_to(self, index: int) -> None:
        """As node/compactor.py: the engine durable first, then the WAL's compaction point."""
        self.engine.sync()
        self.wal.compact(GROUP, SnapshotMeta(index, 1, CONF))
        self.sync()
        self.wal.gc()
        self.wal.reap()

    def read(self, extent: int, block: int, blocks: int) -> bytes:
        return bytes(self.engine.read(extent, block, blocks)[0])

    def close(self) -> None:
        self.engine.close()
        self.wal.close()


def _fill(n: Node) -> None:
    """Past a WAL segment (1 MiB here) with writes too small to be linked."""
    for k in range(30):
        n.write([_write(9, 12 * k, _pattern(50 + k, 12))])


def _engine_segment_bytes(root: Path) -> int:
    d = root / "engine"
    return sum(os.path.getsize(d / n) for n in os.listdir(d) if n.startswith("seg-"))


def test_a_large_write_is_stored_once_and_reads_back_after_a_restart(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk())
    big = _pattern(1, 64)  # 256 KiB: linked
    small = _pattern(2, 2)  # 8 KiB: written as before
    n.write([_write(7, 0, big), _write(7, 100, small), BlockOp(OP_TRIM, 7, 40, 4)])
    assert n.counters["writes_linked"] == 1
    assert n.engine.stats()["linked_blocks"] == 60  # the trim took 4 of the 64
    want = big[: 40 * B] + bytes(4 * B) + big[44 * B :]
    assert n.read(7, 0, 64) == want
    assert n.read(7, 100, 2) == small
    # The engine holds the small write and a LINK record, not the 256 KiB payload.
    assert _engine_segment_bytes(tmp_path) < 64 << 10
    # The payload sits on a 4 KiB boundary of the WAL file.
    rec = n.engine.index.extents[7][0]
    assert rec.tgt is not None and rec.tgt[1] % B == 0
    n.close()
    n = Node(tmp_path, OsDisk())  # from the checkpoint close() wrote
    assert n.read(7, 0, 64) == want and n.read(7, 100, 2) == small
    n.close()
    os.remove(tmp_path / "engine" / "checkpoint")  # and from a full scan of the engine's segments
    n = Node(tmp_path, OsDisk())
    assert not n.engine.report.corrupt
    assert n.read(7, 0, 64) == want and n.read(7, 100, 2) == small
    n.close()


def test_a_write_not_yet_durable_in_the_wal_is_written_not_linked(tmp_path: Path) -> None:
    """Rule 1: a LINK only ever points at WAL bytes an fdatasync has covered."""
    n = Node(tmp_path, OsDisk())
    e = n.append([_write(1, 0, _pattern(3, 32))])
    n.wal.flush()  # written, not synced
    n.apply(e)
    assert n.counters["writes_linked"] == 0
    assert n.engine.stats()["linked_blocks"] == 0
    assert n.read(1, 0, 32) == _pattern(3, 32)
    # An entry appended again at the same index (a new leader's) is not linked to the old bytes.
    e1 = n.append([_write(1, 0, _pattern(4, 32))], term=1)
    n.sync()
    n.index -= 1
    e2 = n.append([_write(1, 0, _pattern(5, 2))], term=2)
    n.sync()
    assert e1.index == e2.index
    assert n.wal.take_link(GROUP, e1.index, 1) is None
    n.close()


def test_power_cut_with_applies_racing_the_wal_sync_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Kill -9 on a tearing disk between WAL append and sync, with applies in flight: what was synced
    reads back whole (linked or not), and no LINK lies over a torn WAL tail."""
    linked = 0
    for seed in range(6):
        root = tmp_path / f"s{seed}"
        rng = random.Random(seed)
        disk = VolatileDisk(tear=True, rng=random.Random(seed))
        n = Node(root, disk)
        acked: dict[int, bytes] = {}
        for k in range(12):
            data = _pattern(100 * seed + k, rng.choice([1, 16, 32]))
            e = n.append([_write(3, 64 * k, data)])
            if rng.random() < 0.7:
                n.sync()
                acked[k] = data
            else:
                n.wal.flush()
            n.apply(e)  # followers may apply before their own sync: then it is written, not linked
            if rng.random() < 0.5:
                n.engine.sync()
        n.wal.flush()
        linked += n.counters["writes_linked"]
        disk.crash()
        n = Node(root, VolatileDisk())
        assert not n.engine.report.corrupt
        # The replica replays its durable log into the engine (as a restarted node does).
        for st in n.recovered.values():
            for e in st.entries:
                n.apply(e)
        for k, data in acked.items():
            assert n.read(3, 64 * k, len(data) // B) == data, (seed, k)
        n.close()
    assert linked >= 10  # the seeds did exercise the linked path


def test_a_held_wal_segment_is_kept_until_its_linked_blocks_are_overwritten(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk())
    big = _pattern(6, 64)
    first = n.write([_write(2, 0, big)]).index
    seq = n.engine.index.extents[2][0].tgt[0]  # type: ignore[index]
    _fill(n)
    n.compact_to(n.index)
    assert n.wal.stats()["wal_held_segments"] == 1
    assert [s for s, _ in n.wal.held_segments()] == [seq]
    assert os.path.exists(tmp_path / "wal" / f"wal-{seq:016x}.held")
    assert n.read(2, 0, 64) == big
    # A restart keeps it held (out of the WAL's replay) and the engine still reads through it.
    n.close()
    n = Node(tmp_path, OsDisk())
    assert n.read(2, 0, 64) == big
    assert [s for s, _ in n.wal.held_segments()] == [seq]
    # Overwritten: released once the overwrite is durable in the engine.
    n.write([_write(2, 0, _pattern(7, 16))] + [_write(2, 16 + 2 * j, _pattern(8 + j, 2)) for j in range(24)])
    assert n.counters["writes_linked"] == 1  # the 64 KiB op links into the active WAL segment
    n.wal.gc()
    assert n.wal.stats()["wal_held_segments"] == 1  # the overwrite is not durable in the engine yet
    n.engine.sync()
    n.wal.gc()
    n.wal.reap()
    assert n.wal.stats()["wal_held_segments"] == 0
    assert not os.path.exists(tmp_path / "wal" / f"wal-{seq:016x}.held")
    assert n.read(2, 0, 16) == _pattern(7, 16)
    assert first < n.index
    n.close()


def test_evacuation_moves_linked_blocks_out_and_a_restart_reads_them_from_the_engine(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk(), wal_held_bytes_max=0)
    datas = {k: _pattern(20 + k, 32) for k in range(6)}
    for k, d in datas.items():
        n.write([_write(4, 32 * k, d)])
    _fill(n)
    n.compact_to(n.index)
    assert n.wal.stats()["wal_held_segments"] >= 1
    moved = 0
    for _ in range(20):
        n.engine.sync()
        moved += n.engine.clean(1 << 20)
        n.engine.sync()
        n.wal.gc()
        n.wal.reap()
        if not n.wal.stats()["wal_held_segments"]:
            break
    assert n.wal.stats()["wal_held_segments"] == 0
    assert moved >= 6 * 32 * B and n.engine.stats()["evacuated_bytes"] >= 6 * 32 * B
    assert n.engine.stats()["linked_blocks"] == 0
    for k, d in datas.items():
        assert n.read(4, 32 * k, 32) == d
    n.close()
    n = Node(tmp_path, OsDisk())
    assert not n.engine.report.corrupt
    for k, d in datas.items():
        assert n.read(4, 32 * k, 32) == d
    n.close()


@pytest.mark.parametrize("how", ["missing", "damaged"])
def test_a_linked_wal_segment_lost_or_damaged_is_corruption_of_those_blocks(tmp_path: Path, how: str) -> None:
    n = Node(tmp_path, OsDisk())
    big = _pattern(9, 32)
    n.write([_write(6, 0, big)])
    n.write([_write(6, 100, _pattern(10, 1))])
    seq, off = n.engine.index.extents[6][0].tgt  # type: ignore[misc]
    _fill(n)
    n.compact_to(n.index)  # the segment is held now: only the engine needs it
    n.close()
    path = tmp_path / "wal" / f"wal-{seq:016x}.held"
    if how == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.seek(off + 5 * B + 10)
            f.write(b"\xff" * 8)
    n = Node(tmp_path, OsDisk())
    if how == "missing":
        assert any("linked WAL segment" in c.reason for c in n.engine.report.corrupt)
    with pytest.raises(CorruptBlockError):
        n.read(6, 0, 32)
    assert n.read(6, 100, 1) == _pattern(10, 1)  # the rest stays readable
    if how == "damaged":
        assert n.read(6, 0, 5) == big[: 5 * B]
    n.close()


def test_cleaning_an_engine_segment_copies_links_as_links(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk())
    big = _pattern(11, 64)
    n.write([_write(8, 0, big)])
    for k in range(40):  # garbage: the same small blocks overwritten, past one engine segment
        n.write([_write(8, 1000, _pattern(200 + k, 8))])
    n.engine.sync()
    sid = n.engine.index.extents[8][0].seg
    assert sid != n.engine.active_segment_id()
    wal_before = n.wal.stats()["wal_bytes"]
    for _ in range(10):
        n.engine.clean(8 << 20)
        if sid not in n.engine.index.segs:
            break
    assert sid not in n.engine.index.segs  # the segment with the LINK was cleaned
    rec = n.engine.index.extents[8][0]
    assert rec.tgt is not None and rec.seg != sid  # still a LINK, now in another segment
    assert n.engine.stats()["evacuated_bytes"] == 0
    assert n.read(8, 0, 64) == big
    assert n.wal.stats()["wal_bytes"] == wal_before
    n.close()
    n = Node(tmp_path, OsDisk())
    assert n.read(8, 0, 64) == big and n.read(8, 1000, 8) == _pattern(239, 8)
    n.close()


@pytest.mark.parametrize("synced", [False, True])
def test_an_evacuation_killed_halfway_loses_nothing(tmp_path: Path, synced: bool) -> None:
    """Power cut during evacuation: copies not yet durable are lost and the LINKs (and the held segment)
    still serve; copies that are durable replace them, and the segment is released after the restart."""
    disk = VolatileDisk(tear=True, rng=random.Random(7))
    n = Node(tmp_path, disk, wal_held_bytes_max=0)
    datas = {k: _pattern(70 + k, 32) for k in range(4)}
    for k, d in datas.items():
        n.write([_write(4, 32 * k, d)])
    _fill(n)
    n.compact_to(n.index)
    held = [s for s, _ in n.wal.held_segments()]
    assert held
    n.engine.sync()
    moved = n.engine.clean(2 * 32 * B)  # about half of the linked blocks
    assert 0 < moved < 4 * 32 * B + (64 << 10)
    if synced:
        n.engine.sync()
    disk.crash()
    n = Node(tmp_path, VolatileDisk())
    assert not n.engine.report.corrupt
    for k, d in datas.items():
        assert n.read(4, 32 * k, 32) == d
    assert [s for s, _ in n.wal.held_segments()] == held  # still needed by the links not moved
    for _ in range(10):
        n.engine.clean(1 << 20)
        n.engine.sync()
        n.wal.gc()
        n.wal.reap()
    assert not n.wal.held_segments()
    for k, d in datas.items():
        assert n.read(4, 32 * k, 32) == d
    n.close()


def test_engine_files_of_format_version_1_still_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raftblock.storage import index, segment

    monkeypatch.setattr(segment, "FORMAT_VERSION", 1)
    monkeypatch.setattr(index, "FORMAT_VERSION", 1)
    e = Engine.open(OsDisk(), str(tmp_path), CID, EngineConfig(segment_size_bytes=1 << 20))
    e.write(1, 0, _pattern(1, 2), [crc32c.crc32c(_pattern(1, 2)[i : i + B]) for i in (0, B)])
    e.close()  # a version 1 segment and checkpoint
    monkeypatch.undo()
    with open(tmp_path / "checkpoint", "rb") as f:
        assert int.from_bytes(f.read(12)[8:12], "little") == 1
    e = Engine.open(OsDisk(), str(tmp_path), CID, EngineConfig(segment_size_bytes=1 << 20))
    assert e.report.used_checkpoint and not e.report.corrupt
    assert bytes(e.read(1, 0, 2)[0]) == _pattern(1, 2)
    e.close()


def test_small_writes_are_linked_unaligned_and_a_batch_keeps_its_order(tmp_path: Path) -> None:
    """With the threshold at one block, every write is linked: a record's payloads smaller than 64 KiB
    together are not padded to a block boundary; writes, links and trims of one batch apply in order."""
    n = Node(tmp_path, OsDisk(), min_bytes=B)
    a, b, c = _pattern(30, 1), _pattern(31, 3), _pattern(32, 2)
    n.write([_write(1, 0, a), BlockOp(OP_TRIM, 1, 0, 1), _write(1, 0, b), _write(1, 10, c)])
    assert n.counters["writes_linked"] == 3
    assert n.read(1, 0, 3) == b and n.read(1, 10, 2) == c
    wal_seg = tmp_path / "wal" / "wal-0000000000000001.log"
    assert os.path.getsize(wal_seg) < 12 * B  # 6 blocks of payload, headers, no pad
    assert n.wal.stats()["wal_links_made"] == 1
    n.close()
    n = Node(tmp_path, OsDisk(), min_bytes=B)
    assert n.read(1, 0, 3) == b and n.read(1, 10, 2) == c
    n.close()


def test_the_first_write_once_record_layout_is_still_read() -> None:
    """ENTRIES_SPLIT (type 6: a pad before each large payload) is read back to the entry's data."""
    import struct

    from raftblock.replication import wal as walmod

    data = b"head" + bytes(range(256)) * 16 + b"tail"
    pad = 100
    body = (struct.pack("<I", 1) + walmod._ENTRY.pack(3, 9, int(EntryType.NORMAL), len(data))
            + walmod._PIECES.pack(3) + walmod._PIECE.pack(0, 4) + b"head"
            + walmod._PIECE.pack(1, 4096) + walmod._PAD.pack(pad) + bytes(pad) + data[4:4100]
            + walmod._PIECE.pack(0, 4) + b"tail")
    (e,) = walmod._decode_entries(memoryview(body), split=True)
    assert (e.term, e.index, e.data) == (3, 9, data)


def test_a_link_whose_payload_fails_its_crcs_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """The pair check runs on the bytes the WAL wrote before a LINK points at them."""
    n = Node(tmp_path, OsDisk())
    e = n.append([_write(5, 0, _pattern(40, 16))])
    n.sync()
    link = n.wal.take_link(GROUP, e.index, e.term)
    assert link is not None
    (_off, _len, at), = link.spans
    crcs = [crc32c.crc32c(_pattern(40, 16)[i : i + B]) for i in range(0, 16 * B, B)]
    crcs[3] ^= 1
    lsn = n.engine.last_lsn
    with pytest.raises(CorruptBlockError):
        n.engine.link_many([(5, 0, _pattern(40, 16), crcs, link.seq, at)])
    assert n.engine.last_lsn == lsn and not n.engine.index.extents
    n.close()


def test_links_into_a_wal_directory_that_was_emptied_are_corruption_not_new_data(tmp_path: Path) -> None:
    """An emptied WAL directory reuses segment numbers: a LINK must not read a new segment of the same
    number as its data."""
    n = Node(tmp_path, OsDisk())
    n.write([_write(6, 0, _pattern(12, 32))])
    n.close()
    for name in os.listdir(tmp_path / "wal"):
        os.remove(tmp_path / "wal" / name)
    n = Node(tmp_path, OsDisk())
    assert any("linked WAL segment" in c.reason for c in n.engine.report.corrupt)
    with pytest.raises(CorruptBlockError):
        n.read(6, 0, 1)
    n.close()


def test_an_engine_holding_links_refuses_to_open_without_its_wal(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk(), min_bytes=B)
    n.write([_write(6, 0, _pattern(13, 2))])
    n.close()
    with pytest.raises(ValueError, match="open the engine with its WAL"):
        Engine.open(OsDisk(), str(tmp_path / "engine"), CID, EngineConfig(segment_size_bytes=1 << 20))
    n = Node(tmp_path, OsDisk(), min_bytes=B)
    assert n.read(6, 0, 2) == _pattern(13, 2)
    n.close()


@pytest.mark.parametrize("min_bytes", [B, 0], ids=["link", "write"])
def test_a_damaged_record_holding_the_only_version_of_blocks_marks_them_bad(tmp_path: Path, min_bytes: int) -> None:
    """Bit rot in a LINK record (before the durable mark, no checkpoint) is corruption of its blocks, as
    for a WRITE: never a hole that reads as zeros."""
    from raftblock.storage.segment import REC_HEADER_SIZE, segment_name

    n = Node(tmp_path, OsDisk(), min_bytes=min_bytes)
    n.write([_write(6, 0, _pattern(1, 4))])  # the only version of blocks 0..3
    rec = n.engine.index.extents[6][0]
    assert (rec.tgt is not None) == bool(min_bytes)
    for k in range(2):  # later records carry a sync mark past it
        n.engine.sync()
        n.write([_write(7, k, _pattern(2 + k, 1))])
    n.engine.sync()
    path = os.path.join(n.engine.directory, segment_name(rec.seg))
    with open(path, "r+b") as f:  # no close (no checkpoint): flip a byte of the record's CRC array
        f.seek(rec.off + REC_HEADER_SIZE)
        b = f.read(1)
        f.seek(rec.off + REC_HEADER_SIZE)
        f.write(bytes([b[0] ^ 0xFF]))
    n = Node(tmp_path, OsDisk(), min_bytes=min_bytes)
    assert n.engine.report.corrupt
    with pytest.raises(CorruptBlockError):
        n.read(6, 0, 4)
    n.close()


def test_mostly_live_held_segments_are_not_garbage_for_the_cleaning_pace(tmp_path: Path) -> None:
    n = Node(tmp_path, OsDisk(), min_bytes=B)
    for k in range(8):
        n.write([_write(4, 32 * k, _pattern(90 + k, 32))])
    _fill(n)
    n.compact_to(n.index)
    held = n.wal.held_segments()
    assert held
    live, garbage = n.engine.space()
    # what is dead in the held segments (headers, the small writes' records) is not counted while they
    # are more than half live
    assert garbage < sum(size for _s, size in held) // 2, (live, garbage, held)
    n.close()


def test_a_snapshot_pin_keeps_a_linked_old_version_and_its_held_wal_segment_across_restarts(tmp_path: Path) -> None:
    """docs/format/segment.md "Snapshot pins" with write-once: an old version pinned by a snapshot may be a
    LINK into a WAL segment; that segment stays held while the pin needs it (and across a restart from the
    checkpoint and from a full scan), the snapshot reads through it, and the unpin releases it."""
    n = Node(tmp_path, OsDisk())
    old = _pattern(60, 64)
    n.write([_write(2, 0, old)])
    seq = n.engine.index.extents[2][0].tgt[0]  # type: ignore[index]
    n.engine.pin_snapshot(0, 5)  # extent 2 is in group 0
    _fill(n)  # past the WAL segment holding `old`
    new = _pattern(61, 64)
    n.write([_write(2, 0, new)])  # the old LINK is now only the snapshot's
    assert n.engine.index.extents[2][0].tgt[0] != seq  # type: ignore[index]
    n.compact_to(n.index)
    assert seq in [s for s, _ in n.wal.held_segments()]
    assert bytes(n.engine.read_snapshot(5, 2, 0, 64)[0]) == old and n.read(2, 0, 64) == new
    for how in ("checkpoint", "full scan"):
        n.close()
        if how == "full scan":
            os.remove(tmp_path / "engine" / "checkpoint")
        n = Node(tmp_path, OsDisk())
        assert n.engine.report.used_checkpoint == (how == "checkpoint")
        assert seq in [s for s, _ in n.wal.held_segments()], how
        assert bytes(n.engine.read_snapshot(5, 2, 0, 64)[0]) == old, how
        assert n.read(2, 0, 64) == new, how
    assert n.engine.unpin_snapshot(0, 5)
    n.wal.gc()
    assert seq in [s for s, _ in n.wal.held_segments()]  # until the engine has synced past the unpin
    n.engine.sync()
    n.wal.gc()
    n.wal.reap()
    assert seq not in [s for s, _ in n.wal.held_segments()]
    assert n.read(2, 0, 64) == new
    n.close()


def test_a_snap_op_in_the_log_pins_the_group_between_the_ops_around_it_and_a_replay_keeps_it(tmp_path: Path) -> None:
    """wire/ops.py rule 5, apply.py rule 6: a SNAP op applied on a replica pins exactly the writes before it;
    a restart replays the log from the compaction point (the SNAP op again included) and the snapshot still
    holds what it held; UNSNAP drops it, and a replay of the UNSNAP leaves it dropped."""
    from raftblock.wire.ops import OP_SNAP, OP_UNSNAP

    E = GROUP << 32 | 2  # an extent of the group the harness applies as (ids.py)
    n = Node(tmp_path, OsDisk())
    a, b, c = _pattern(70, 4), _pattern(71, 4), _pattern(72, 4)
    n.write([_write(E, 0, a)])
    n.write([_write(E, 4, b), BlockOp(OP_SNAP, 9, 0, 0), _write(E, 0, c)])  # SNAP inside one batch
    assert bytes(n.engine.read_snapshot(9, E, 0, 8)[0]) == a + b
    assert n.read(E, 0, 8) == c + b
    n.close()  # nothing compacted: the restart re-applies every entry, the SNAP op included
    n = Node(tmp_path, OsDisk())
    for e in sorted((e for s in n.recovered.values() for e in s.entries), key=lambda e: e.index):
        n.apply(e)
    assert bytes(n.engine.read_snapshot(9, E, 0, 8)[0]) == a + b
    assert n.read(E, 0, 8) == c + b
    n.write([BlockOp(OP_UNSNAP, 9, 0, 0)])
    n.close()
    n = Node(tmp_path, OsDisk())
    for e in sorted((e for s in n.recovered.values() for e in s.entries), key=lambda e: e.index):
        n.apply(e)  # SNAP then UNSNAP again: unpinned at the end
    assert n.engine.snapshots() == {}
    n.close()
    with pytest.raises(ValueError, match="covers no blocks"):
        encode_batch([BlockOp(OP_SNAP, 9, 1, 0)])
