"""Snapshot pins in the engine (docs/format/segment.md, "Snapshot pins"; docs/snapshots.md section 1): a pin
keeps the image as of its moment through overwrites, trims, cleaning and restarts (from the checkpoint, from
a full scan, after a power cut), and goes with its UNPIN for good."""

from __future__ import annotations

import os
import random
from pathlib import Path

import crc32c
import pytest

from raftblock.storage.disk import OsDisk, VolatileDisk
from raftblock.storage.engine import Engine, EngineConfig
from raftblock.storage.recovery import CHECKPOINT_NAME
from raftblock.storage.segment import REC_LINK

CID = b"s" * 16
B = 4096
G = 3  # the extent group of the first test's extent
EXT = G << 32 | 7


def _cfg() -> EngineConfig:
    return EngineConfig(segment_size_bytes=256 << 10, checkpoint_interval_bytes=1 << 30, preallocate=False)


def _blk(tag: int, blk: int) -> bytes:
    return (tag.to_bytes(4, "little") + blk.to_bytes(4, "little")) * (B // 8)


def _write(eng: Engine, blk: int, n: int, tag: int, ext: int = EXT) -> None:
    data = b"".join(_blk(tag, b) for b in range(blk, blk + n))
    eng.write(ext, blk, data, [crc32c.crc32c(data[i * B : (i + 1) * B]) for i in range(n)])


def _image(eng: Engine, nblocks: int, snap: int | None = None, ext: int = EXT) -> list[bytes]:
    if snap is None:
        data, _ = eng.read(ext, 0, nblocks)
    else:
        data, _ = eng.read_snapshot(snap, ext, 0, nblocks)
    return [bytes(data[i * B : (i + 1) * B]) for i in range(nblocks)]


def test_a_pin_keeps_its_image_through_overwrites_trims_and_restarts(tmp_path: Path) -> None:
    d = str(tmp_path / "e")
    eng = Engine.open(OsDisk(), d, CID, _cfg())
    _write(eng, 0, 8, tag=1)
    other = (G + 1) << 32 | 7  # another group's extent: the pin is not its business
    _write(eng, 0, 2, tag=1, ext=other)
    assert eng.pin_snapshot(G, 41) == eng.last_lsn - 1  # the PIN record has the next LSN
    assert eng.pin_snapshot(G, 41) == eng.snapshots()[(G, 41)]  # idempotent: a replayed SNAP op
    _write(eng, 0, 2, tag=9, ext=other)
    assert not [k for k in eng.index.history if k[0] == other]  # its overwritten blocks are garbage
    with pytest.raises(KeyError):
        eng.read_snapshot(41, other, 0, 1)
    _write(eng, 2, 3, tag=2)
    eng.trim(EXT, 6, 2)
    want_now = [_blk(1, 0), _blk(1, 1), _blk(2, 2), _blk(2, 3), _blk(2, 4), _blk(1, 5), bytes(B), bytes(B)]
    want_snap = [_blk(1, b) for b in range(8)]
    assert _image(eng, 8) == want_now and _image(eng, 8, 41) == want_snap
    eng.close()
    for how in ("checkpoint", "full scan"):
        if how == "full scan":
            os.remove(os.path.join(d, CHECKPOINT_NAME))
        eng = Engine.open(OsDisk(), d, CID, _cfg())
        assert eng.report.used_checkpoint == (how == "checkpoint")
        assert list(eng.snapshots()) == [(G, 41)]
        assert _image(eng, 8) == want_now, how
        assert _image(eng, 8, 41) == want_snap, how
        eng.close()
    eng = Engine.open(OsDisk(), d, CID, _cfg())
    assert eng.unpin_snapshot(G, 41) and not eng.unpin_snapshot(G, 41)
    with pytest.raises(KeyError):
        eng.read_snapshot(41, EXT, 0, 1)
    eng.close()
    os.remove(os.path.join(d, CHECKPOINT_NAME))
    eng = Engine.open(OsDisk(), d, CID, _cfg())
    assert eng.snapshots() == {}  # the UNPIN is found by a full scan too
    assert _image(eng, 8) == want_now
    eng.close()


@pytest.mark.parametrize("seed", range(int(os.environ.get("PIN_SEEDS", "8"))))
def test_pins_against_a_model_through_cleaning_checkpoints_scans_and_power_cuts(tmp_path: Path, seed: int) -> None:
    """Random writes, trims, pins and unpins; cleaning with small budgets, checkpoints, and restarts of
    three kinds (clean close, close then lose the checkpoint, power cut after a sync); after each, every
    block of the current image and of every pinned snapshot reads as the model says."""
    rng = random.Random(seed)
    d = str(tmp_path / "e")
    nblocks = 96
    groups = (1, 2)
    exts = {g: g << 32 | 5 for g in groups}
    disk = VolatileDisk()
    eng = Engine.open(disk, d, CID, _cfg())
    model: dict[int, list[bytes]] = {g: [bytes(B)] * nblocks for g in groups}
    snaps: dict[tuple[int, int], list[bytes]] = {}
    durable: tuple[dict[int, list[bytes]], dict[tuple[int, int], list[bytes]]] = ({}, {})
    tag = 0
    next_snap = 1

    def copy() -> tuple[dict[int, list[bytes]], dict[tuple[int, int], list[bytes]]]:
        return {g: list(i) for g, i in model.items()}, {k: list(i) for k, i in snaps.items()}

    durable = copy()

    def check(where: str) -> None:
        for g in groups:
            assert _image(eng, nblocks, ext=exts[g]) == model[g], f"{where}: group {g}"
        assert set(eng.snapshots()) == set(snaps), where
        for (g, sid), img in snaps.items():
            assert _image(eng, nblocks, sid, ext=exts[g]) == img, f"{where}: snapshot {sid} of group {g}"
        # the space kept versions occupy is counted where cleaning looks (else it copies them forever)
        idx = eng.index
        entries = [rec for lst in idx.history.values() for rec, _ in lst]
        assert idx.hist_blocks == len(entries) == sum(r.hist for r in {id(r): r for r in entries}.values()), where
        for seg in idx.segs.values():
            assert seg.hist_blocks == sum(1 for r in entries if r.seg == seg.seg_id and r.rtype != REC_LINK), where

    for step in range(400):
        k = rng.random()
        g = rng.choice(groups)
        if k < 0.45:
            blk = rng.randrange(nblocks - 8)
            n = rng.randint(1, 8)
            tag += 1
            _write(eng, blk, n, tag, ext=exts[g])
            for b in range(blk, blk + n):
                model[g][b] = _blk(tag, b)
        elif k < 0.52:
            blk = rng.randrange(nblocks - 4)
            n = rng.randint(1, 4)
            eng.trim(exts[g], blk, n)
            for b in range(blk, blk + n):
                model[g][b] = bytes(B)
        elif k < 0.58 and len(snaps) < 5:
            eng.pin_snapshot(g, next_snap)
            snaps[(g, next_snap)] = list(model[g])
            if rng.random() < 0.5:  # the same snapshot on the other group too (a volume spans groups)
                o = 3 - g
                eng.pin_snapshot(o, next_snap)
                snaps[(o, next_snap)] = list(model[o])
            next_snap += 1
        elif k < 0.63 and snaps:
            key = rng.choice(sorted(snaps))
            assert eng.unpin_snapshot(*key)
            del snaps[key]
        elif k < 0.80:
            eng.clean(rng.choice([8 << 10, 64 << 10, 1 << 20]))
        elif k < 0.85:
            eng.checkpoint()
            durable = copy()
        elif k < 0.90:
            eng.sync()
            durable = copy()
        else:
            how = rng.choice(["close", "lose checkpoint", "power cut"])
            if how == "power cut":
                eng.sync()
                durable = copy()
                disk.crash()
                disk = VolatileDisk()
                model, snaps = {g2: list(i) for g2, i in durable[0].items()}, {k2: list(i) for k2, i in durable[1].items()}
            else:
                eng.close()
                if how == "lose checkpoint" and os.path.exists(os.path.join(d, CHECKPOINT_NAME)):
                    os.remove(os.path.join(d, CHECKPOINT_NAME))
            eng = Engine.open(disk, d, CID, _cfg())
            assert not eng.report.corrupt, eng.report.corrupt
            check(f"step {step}, after restart ({how})")
        if step % 25 == 0:
            check(f"step {step}")
    check("end")
    # Every pin dropped and everything cleaned: the space of old versions comes back.
    for key in list(snaps):
        eng.unpin_snapshot(*key)
    snaps.clear()
    for _ in range(50):
        eng.clean(1 << 20)
    check("all unpinned")
    assert not eng.index.history
    eng.close()


def _flags(runs: list[tuple[int, bool]]) -> list[bool]:
    return [f for n, f in runs for _ in range(n)]


def test_snapshot_runs_and_unique_blocks_from_the_index(tmp_path: Path) -> None:
    """What an incremental backup sends (blocks whose version differs between two snapshots, a trim included)
    and what `snapshot list` shows (blocks only one snapshot keeps), checked against the images themselves,
    also after a restart (recovered from the checkpoint)."""
    eng = Engine.open(OsDisk(), str(tmp_path / "e"), CID, _cfg())
    _write(eng, 0, 6, tag=1)
    eng.pin_snapshot(G, 1)
    _write(eng, 1, 2, tag=2)  # blocks 1-2 change
    eng.trim(EXT, 5, 1)  # block 5 becomes a hole
    _write(eng, 8, 1, tag=2)  # block 8 is new
    eng.pin_snapshot(G, 2)
    _write(eng, 2, 1, tag=3)  # block 2 changes again: its tag-2 version is kept by snapshot 2 alone
    eng.pin_snapshot(G, 3)
    _write(eng, 0, 1, tag=4)  # block 0's tag-1 version is kept by snapshots 1, 2 and 3
    for _ in range(2):
        imgs = {s: _image(eng, 10, s) for s in (1, 2, 3)}
        assert _flags(eng.snapshot_runs(2, EXT, 0, 10, since_snap_id=1)) == \
            [imgs[2][b] != imgs[1][b] for b in range(10)] == [False, True, True, False, False, True, False, False,
                                                               True, False]
        assert _flags(eng.snapshot_runs(3, EXT, 0, 10, since_snap_id=2)) == [b == 2 for b in range(10)]
        assert _flags(eng.snapshot_runs(1, EXT, 0, 10)) == [b < 6 for b in range(10)]  # allocated in snapshot 1
        assert _flags(eng.snapshot_runs(2, EXT, 4, 3)) == [True, False, False]
        # snapshot 1 alone keeps blocks 1, 2 (tag 1) and 5; snapshot 2 alone keeps block 2 (tag 2); 3 none
        assert eng.snapshot_stats(G) == {1: 3, 2: 1, 3: 0}
        with pytest.raises(KeyError):
            eng.snapshot_runs(9, EXT, 0, 10)
        eng.sync()
        eng.close()
        eng = Engine.open(OsDisk(), str(tmp_path / "e"), CID, _cfg())
    eng.unpin_snapshot(G, 2)
    # block 2's tag-2 version is garbage now; block 0's tag-1 version is still kept by snapshots 1 and 3
    assert eng.snapshot_stats(G) == {1: 3, 3: 0}
    assert len(eng.index.history[(EXT, 2)]) == 1
    eng.close()


def test_cleaning_does_not_copy_pinned_versions_again_and_again(tmp_path: Path) -> None:
    """Old versions a pin keeps count as occupied space: once the cleaner has compacted the garbage around
    them, it leaves their segments alone (before, it took a segment of kept versions for all garbage and
    copied it on every pass). Deleting the snapshot makes them garbage the cleaner then takes."""
    eng = Engine.open(OsDisk(), str(tmp_path / "e"), CID, _cfg())
    for b in range(0, 512, 64):
        _write(eng, b, 64, tag=1)
    eng.pin_snapshot(G, 1)
    for tag in (2, 3):
        for b in range(0, 512, 64):
            _write(eng, b, 64, tag=tag)
    eng.sync()
    for _ in range(20):  # clean until there is nothing worth cleaning
        eng.clean(1 << 30)
    settled = eng.cleaned_bytes
    for _ in range(5):
        eng.clean(1 << 30)
    assert eng.cleaned_bytes == settled, "the cleaner keeps copying the snapshot's versions"
    assert eng.stats()["pinned_bytes"] == 512 * B
    assert _image(eng, 512, 1) == [_blk(1, b) for b in range(512)]
    used = eng.stats()["bytes_used"]
    eng.unpin_snapshot(G, 1)
    assert eng.stats()["pinned_bytes"] == 0
    for _ in range(20):
        eng.clean(1 << 30)
    assert eng.stats()["bytes_used"] <= used - 400 * B, (used, eng.stats()["bytes_used"])
    eng.close()
