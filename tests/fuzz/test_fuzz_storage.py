"""Fuzz properties of the on-disk readers: the segment scanner and record reader (storage/segment.py),
recovery's torn-tail-or-corruption judgement (storage/recovery.py), the checkpoint codec (storage/index.py)
and the WAL's recovery (replication/wal.py). Any corruption is classified (cut or reported), never an uncaught
exception, and no length field makes a reader allocate more than the file holds."""

from __future__ import annotations

import struct
import tracemalloc

import crc32c
import pytest
from fuzz_strategies import fuzz, mutated
from fuzz_targets import (
    CLUSTER,
    SEG_DIR,
    WAL_DIR,
    Input,
    _build_records,
    corpus,
    target_checkpoint,
    target_recovery,
    target_segment,
    target_wal,
)
from hypothesis import given
from hypothesis import strategies as st

from raftblock.replication.raft.types import ConfState, Entry, EntryType, HardState, NodeId, SnapshotMeta
from raftblock.replication.wal import REC_HEADER, RECORD_BODY_BYTES_MAX, SEG_HEADER, Wal, WalCorruptError
from raftblock.storage import index as sindex
from raftblock.storage import recovery as srecovery
from raftblock.storage import segment as sseg
from raftblock.storage.disk import MemDisk

BLK = 4096


# --- segments ----------------------------------------------------------------------------------------
@fuzz(100)
@given(st.integers(0, 10), st.binary(max_size=400), st.booleans())
def test_records_written_by_the_encoders_scan_back(n: int, spec: bytes, verify: bool) -> None:
    buf, _ = _build_records(Input(spec), 1, 0, n)
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    disk.files[f"{SEG_DIR}/{sseg.segment_name(1)}"] = buf
    f = disk.open_file(f"{SEG_DIR}/{sseg.segment_name(1)}", create=False)
    res = sseg.scan_segment(f, sseg.segment_seed(CLUSTER, 1), sseg.SEG_HEADER_SIZE, verify)
    assert len(res.records) == n and not res.bad and res.end == len(buf)
    assert all(not r.bad_blocks for r in res.records)


@fuzz(400)
@given(st.binary(max_size=4096))
def test_segment_scanner_takes_arbitrary_bytes(data: bytes) -> None:
    target_segment(data)


@fuzz(600)
@given(mutated(corpus("segment")))
def test_segment_scanner_takes_mutated_segments(data: bytes) -> None:
    target_segment(data)


def _synced_segment(payloads: list[bytes]) -> tuple[bytearray, list[int]]:
    """WRITE records of one block each, each one's sync mark at its own position (all before it durable):
    what the engine writes when every record waited for the previous one's fdatasync."""
    seed = sseg.segment_seed(CLUSTER, 1)
    buf = bytearray(sseg.encode_segment_header(CLUSTER, 1, 0))
    offs = []
    for k, p in enumerate(payloads):
        offs.append(len(buf))
        block = (p * BLK)[:BLK]
        rec, _ = sseg.build_write_record(seed, 7, k, k + 1, sseg.position(1, len(buf)), block, [crc32c.crc32c(block)])
        buf += rec
    return buf, offs


def _recover(buf: bytearray) -> srecovery.Recovered:
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    disk.files[f"{SEG_DIR}/{sseg.segment_name(1)}"] = buf
    return srecovery.recover(disk, SEG_DIR, CLUSTER, verify_on_open=True)


@fuzz(150)
@given(st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=6), st.data())
def test_a_cut_after_the_durable_mark_is_a_torn_tail(payloads: list[bytes], data: st.DataObject) -> None:
    """Recovery rule 1: a segment cut inside its last record (never synced) loses that record only, as a
    torn tail, and reports no corruption."""
    buf, offs = _synced_segment(payloads)
    cut = data.draw(st.integers(offs[-1] + 1, len(buf) - 1))
    rec = _recover(buf[:cut])
    # torn bytes that are all zero (a cut inside the header CRC's zero low byte) are preallocated space to it
    assert rec.report.corrupt == [] and (rec.report.torn_tail_bytes > 0 or not any(buf[offs[-1] : cut]))
    assert sorted(rec.index.extents.get(7, {})) == list(range(len(payloads) - 1))


@fuzz(150)
@given(st.lists(st.binary(min_size=1, max_size=4), min_size=2, max_size=6), st.data())
def test_damage_before_the_durable_mark_is_corruption(payloads: list[bytes], data: st.DataObject) -> None:
    """Recovery rule 1: a byte changed in a record that a later record says was synced is corruption:
    reported, its block marked bad, nothing cut."""
    buf, offs = _synced_segment(payloads)
    k = data.draw(st.integers(0, len(payloads) - 2))
    end = offs[k + 1]
    at = data.draw(st.integers(offs[k], end - 1))
    buf[at] ^= 1 << data.draw(st.integers(0, 7))
    rec = _recover(buf)
    assert rec.report.corrupt and rec.report.torn_tail_bytes == 0
    assert rec.index.is_bad(7, k) or k not in rec.index.extents.get(7, {})


def test_a_record_header_claiming_the_most_blocks_allocates_only_what_the_file_holds(traced: None) -> None:
    seed = sseg.segment_seed(CLUSTER, 1)
    buf = bytearray(sseg.encode_segment_header(CLUSTER, 1, 0))
    for count in (sseg.MAX_WRITE_BLOCKS, sseg.MAX_WRITE_BLOCKS + 1, 0xFFFFFFFF):
        head = bytearray(sseg.REC_HEADER_SIZE)
        sseg._REC_HEADER.pack_into(head, 0, 0, sseg.REC_MAGIC, sseg.REC_WRITE, 0, 0, count,
                                   sseg.record_length(sseg.REC_WRITE, count) & 0xFFFFFFFF, 0, 1, 1, 0)
        struct.pack_into("<I", head, 0, crc32c.crc32c(bytes(head[4:]), seed))
        buf += head + bytes(64)
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    disk.files[f"{SEG_DIR}/{sseg.segment_name(1)}"] = buf
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    res = sseg.scan_segment(disk.open_file(f"{SEG_DIR}/{sseg.segment_name(1)}", create=False), seed, 64)
    assert not res.records and res.bad
    assert tracemalloc.get_traced_memory()[1] - base < 4 * len(buf) + (2 << 20)


# --- checkpoints -------------------------------------------------------------------------------------
U32 = st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def runs(draw: st.DrawFn, hist: bool = False) -> tuple[int, ...]:
    rc = draw(st.integers(1, sseg.MAX_WRITE_BLOCKS))
    rb = draw(st.integers(0, (1 << 32) - 1 - rc))
    blk = draw(st.integers(rb, rb + rc - 1))
    n = draw(st.integers(1, rb + rc - blk))
    head = (draw(U64), blk, n, draw(U64), draw(U32), rb, rc, draw(U64))
    return (*head, draw(U64), draw(U32)) if hist else (*head, draw(U32))


CHECKPOINTS = st.builds(
    sindex.Checkpoint, st.binary(min_size=16, max_size=16), U64, U64, U32, U64,
    runs=st.lists(runs(), max_size=5), tombs=st.lists(st.tuples(U64, U32, U32, U32, U64, U64), max_size=3),
    segmin=st.lists(st.tuples(U64, U64, U64), max_size=3), bad=st.lists(st.tuples(U64, U32, U32), max_size=3),
    pins=st.lists(st.tuples(U64, U64, U64), max_size=3), hist=st.lists(runs(hist=True), max_size=3),
    marks=st.lists(st.tuples(U64, U32, U32, U64, U64, U64, U64), max_size=2))


@fuzz(200)
@given(CHECKPOINTS)
def test_checkpoints_round_trip(ck: sindex.Checkpoint) -> None:
    assert sindex.decode_checkpoint(sindex.encode_checkpoint(ck)) == ck


@fuzz(300)
@given(st.binary(max_size=2048))
def test_checkpoint_decoder_takes_arbitrary_bytes(traced: None, data: bytes) -> None:
    target_checkpoint(data)


@fuzz(400)
@given(mutated(corpus("checkpoint")))
def test_checkpoint_decoder_takes_mutated_checkpoints(traced: None, data: bytes) -> None:
    target_checkpoint(data)


def test_a_run_longer_than_any_record_makes_the_checkpoint_invalid() -> None:
    """Rule 4 of recovery: such a checkpoint is ignored (full scan); it used to make recovery loop over
    billions of blocks (regression: corpus/regressions/recovery/checkpoint-run-of-billions)."""
    ck = sindex.Checkpoint(CLUSTER, 1, 1, 64, 2, runs=[(1, 0, 0xFFFFFFFF, 1, 64, 0, 0xFFFFFFFF, 1, 0)], tombs=[],
                           segmin=[], bad=[])
    assert sindex.decode_checkpoint(sindex.encode_checkpoint(ck)) == "checkpoint run outside its record"
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    disk.files[f"{SEG_DIR}/checkpoint"] = bytearray(sindex.encode_checkpoint(ck))
    rec = srecovery.recover(disk, SEG_DIR, CLUSTER, verify_on_open=False)
    assert not rec.report.used_checkpoint and rec.report.checkpoint_error == "checkpoint run outside its record"


# --- recovery ----------------------------------------------------------------------------------------
@fuzz(200)
@given(st.binary(max_size=2048))
def test_recovery_takes_arbitrary_directories(data: bytes) -> None:
    target_recovery(data)


@fuzz(500)
@given(mutated(corpus("recovery")))
def test_recovery_takes_mutated_directories(data: bytes) -> None:
    target_recovery(data)


# --- WAL ---------------------------------------------------------------------------------------------
@st.composite
def wal_histories(draw: st.DrawFn) -> list[tuple[int, int, object]]:
    out: list[tuple[int, int, object]] = []
    nxt = {1: 1, 2: 1}
    for _ in range(draw(st.integers(1, 12))):
        g = draw(st.integers(1, 2))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            ents = [Entry(draw(st.integers(1, 3)), nxt[g] + k, EntryType.NORMAL, draw(st.binary(max_size=300)))
                    for k in range(draw(st.integers(1, 3)))]
            nxt[g] += len(ents)
            out.append((g, 0, ents))
        elif kind == 1:
            out.append((g, 1, HardState(draw(st.integers(1, 5)), NodeId(draw(st.integers(0, 3))), 0)))
        else:
            out.append((g, 2, None))  # a sync
    return out


def _write_wal(history: list[tuple[int, int, object]], segment_bytes: int) -> tuple[MemDisk, dict[int, list[Entry]]]:
    disk = MemDisk()
    wal, _ = Wal.open(disk, WAL_DIR, segment_bytes_max=segment_bytes)
    want: dict[int, list[Entry]] = {}
    for g, kind, x in history:
        if kind == 0:
            assert isinstance(x, list)
            wal.append_entries(g, x)
            want.setdefault(g, []).extend(x)
        elif kind == 1:
            assert isinstance(x, HardState)
            wal.set_hard_state(g, x)
        else:
            wal.flush()
            wal.sync()
    wal.flush()
    wal.sync()
    wal.close()
    return disk, want


@fuzz(100)
@given(wal_histories(), st.sampled_from([1024, 4096, 1 << 20]))
def test_wal_entries_round_trip(history: list[tuple[int, int, object]], segment_bytes: int) -> None:
    disk, want = _write_wal(history, segment_bytes)
    wal, groups = Wal.open(disk, WAL_DIR)
    wal.close()
    assert {g: st.entries for g, st in groups.items() if st.entries} == {g: e for g, e in want.items() if e}


@fuzz(100)
@given(wal_histories(), st.data())
def test_a_cut_newest_wal_segment_is_a_torn_tail_and_stays_cut(history: list[tuple[int, int, object]],
                                                               data: st.DataObject) -> None:
    """Rule 4: the newest segment cut anywhere (its header included) opens, with each group's entries a
    prefix of what was written; and opens again (regression: corpus/regressions/wal/torn-header-reopen)."""
    disk, want = _write_wal(history, 1 << 20)
    newest = max(p for p in disk.files if p.endswith(".log"))
    del disk.files[newest][data.draw(st.integers(0, len(disk.files[newest]))) :]
    for _ in range(2):
        wal, groups = Wal.open(disk, WAL_DIR)
        wal.close()
        for g, st_ in groups.items():
            assert st_.entries == want.get(g, [])[: len(st_.entries)]


@fuzz(300)
@given(st.binary(max_size=2048))
def test_wal_recovery_takes_arbitrary_segments(traced: None, data: bytes) -> None:
    target_wal(data)


@fuzz(400)
@given(mutated(corpus("wal")))
def test_wal_recovery_takes_mutated_segments(traced: None, data: bytes) -> None:
    target_wal(data)


@pytest.mark.parametrize("rtype", [2, 3, 4, 1, 6, 7])
def test_a_short_wal_record_body_is_torn_or_corrupt_never_a_struct_error(rtype: int) -> None:
    """Rule 4 for every record type: a record whose CRC holds but whose body is short is cut in the newest
    segment and WalCorruptError in an older one (regression: corpus/regressions/wal/snapshot-meta-short)."""
    for body in (b"", b"\x01", bytes(20)):
        for older in (False, True):
            disk = MemDisk()
            disk.makedirs(WAL_DIR)
            for seq in (1, 2) if older else (1,):
                raw = bytearray(SEG_HEADER.pack(b"RBWAL003", seq))
                if seq == 1:
                    head = bytearray(REC_HEADER.pack(0, len(body), rtype, 1))
                    seed = crc32c.crc32c(struct.pack("<Q", seq))
                    struct.pack_into("<I", head, 0, crc32c.crc32c(bytes(head[4:]) + body, seed))
                    raw += head + body
                disk.files[f"{WAL_DIR}/wal-{seq:016x}.log"] = raw
            if older:
                with pytest.raises(WalCorruptError):
                    Wal.open(disk, WAL_DIR)
            else:
                Wal.open(disk, WAL_DIR)[0].close()


def test_an_entry_longer_than_its_record_is_refused() -> None:
    """An ENTRIES record whose entry claims more data than the record holds was read silently short."""
    body = struct.pack("<I", 1) + struct.pack("<QQBI", 1, 1, 0, 1000) + b"short"
    disk = MemDisk()
    disk.makedirs(WAL_DIR)
    head = bytearray(REC_HEADER.pack(0, len(body), 1, 1))
    struct.pack_into("<I", head, 0, crc32c.crc32c(bytes(head[4:]) + body, crc32c.crc32c(struct.pack("<Q", 1))))
    disk.files[f"{WAL_DIR}/wal-{1:016x}.log"] = bytearray(SEG_HEADER.pack(b"RBWAL003", 1)) + head + body
    wal, groups = Wal.open(disk, WAL_DIR)
    wal.close()
    assert all(not st_.entries for st_ in groups.values())


def test_a_wal_record_announcing_the_largest_body_allocates_only_the_file(traced: None) -> None:
    disk = MemDisk()
    disk.makedirs(WAL_DIR)
    disk.files[f"{WAL_DIR}/wal-{1:016x}.log"] = bytearray(
        SEG_HEADER.pack(b"RBWAL003", 1) + REC_HEADER.pack(0, RECORD_BODY_BYTES_MAX, 1, 1) + bytes(100))
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    Wal.open(disk, WAL_DIR)[0].close()
    assert tracemalloc.get_traced_memory()[1] - base < 4 << 20


def test_compaction_and_snapshot_records_round_trip() -> None:
    disk = MemDisk()
    wal, _ = Wal.open(disk, WAL_DIR)
    wal.append_entries(1, [Entry(1, i, EntryType.NORMAL, b"x") for i in range(1, 6)])
    wal.compact(1, SnapshotMeta(3, 1, ConfState(frozenset({NodeId(1), NodeId(2)}), 4), b"app"))
    wal.install_snapshot(2, SnapshotMeta(9, 2, ConfState(frozenset({NodeId(3)}), 1)))
    wal.flush()
    wal.sync()
    wal.close()
    _, groups = Wal.open(disk, WAL_DIR)
    g1, g2 = groups[1], groups[2]
    assert g1.snap is not None and (g1.snap.index, g1.snap.app) == (3, b"app")
    assert [e.index for e in g1.entries] == [4, 5]
    assert g2.snap is not None and g2.snap.index == 9 and g2.entries == []
