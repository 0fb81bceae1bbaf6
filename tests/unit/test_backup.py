"""Backup chunks, manifests and transfers on a directory store (raftblock/backup; docs/format/backup.md).
The same transfers against a real S3 HTTP endpoint: tests/integration/test_backup_s3.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from raftblock.backup import chunk
from raftblock.backup.manifest import Manifest, ManifestError, manifest_key
from raftblock.backup.store import DirStore, StoreError, open_store
from raftblock.backup.transfer import (
    collect,
    delete_backup,
    export_image,
    list_manifests,
    load_manifest,
    restore_bytes,
    verify,
)

MiB = 1 << 20
CH = chunk.CHUNK_BYTES


def _image(seed: int, size: int, zero_chunks: tuple[int, ...] = ()) -> bytearray:
    img = bytearray(random.Random(seed).randbytes(size))
    for k in zero_chunks:
        img[k * CH : (k + 1) * CH] = bytes(min(CH, size - k * CH))
    return img


def _reader(img: bytearray, reads: list[int] | None = None):  # type: ignore[no-untyped-def]
    def read(off: int, n: int) -> bytes:
        if reads is not None:
            reads.append(off // CH)
        return bytes(img[off : off + n])
    return read


# == chunk objects ===========================================================================================
def test_a_chunk_decodes_to_its_plaintext_and_any_damage_names_the_object() -> None:
    plain = random.Random(1).randbytes(100_000) + bytes(50_000)
    name, obj = chunk.encode(plain)
    assert name == chunk.chunk_name(plain) and chunk.decode(name, obj) == plain
    assert len(obj) < len(plain)  # the zeros compress
    bad = bytearray(obj)
    bad[len(bad) // 2] ^= 0x40
    cases = {
        "flipped byte": bytes(bad),
        "truncated": obj[: len(obj) - 10],
        "short": obj[:5],
        "other magic": b"XXCHUNK1" + obj[8:],
    }
    for what, damaged in cases.items():
        with pytest.raises(chunk.ChunkError) as ei:
            chunk.decode(name, damaged)
        assert ei.value.name == name and name in str(ei.value), what
    other_name, other = chunk.encode(b"something else")
    with pytest.raises(chunk.ChunkError, match="does not hash to the object's name"):
        chunk.decode(name, other)  # a valid chunk stored under the wrong name
    with pytest.raises(chunk.ChunkError, match="kind"):
        chunk.decode(other_name, other, kind=chunk.KIND_DELTA)


def test_a_delta_rebuilds_its_chunk_from_its_base_and_only_from_it() -> None:
    base = random.Random(2).randbytes(CH)
    new = bytearray(base)
    for k in (0, 7, 1023):
        new[k * 4096 : k * 4096 + 10] = b"x" * 10
    blocks = chunk.changed_blocks(base, new)
    assert blocks == [0, 7, 1023]
    base_name = chunk.chunk_name(base)
    plain = chunk.delta_plain(base_name, new, blocks)
    assert len(plain) < 4 * 4096 + 200
    dname, dobj = chunk.encode(plain, kind=chunk.KIND_DELTA)
    got = chunk.decode(dname, dobj, kind=chunk.KIND_DELTA)
    assert chunk.apply_delta(dname, got, base_name, base) == bytes(new)
    other = random.Random(3).randbytes(CH)
    with pytest.raises(chunk.ChunkError, match="delta of"):
        chunk.apply_delta(dname, got, chunk.chunk_name(other), other)
    with pytest.raises(chunk.ChunkError, match="after its blocks"):
        chunk.apply_delta(dname, got + b"!", base_name, base)


# == manifests ================================================================================================
def test_a_manifest_of_another_format_version_or_shape_is_a_one_line_error() -> None:
    m = Manifest("vol", "s1", 2 * CH + 4096, [("zero",), ("full", "a" * 64), ("delta", "b" * 64, "c" * 64)])
    assert Manifest.from_json(m.to_json()) == m
    good = json.loads(m.to_json())
    cases = [
        ({**good, "version": 3}, "manifest version 3"), ({**good, "version": 2}, "version 2 is an encrypted"),
        ({**good, "format": "other"}, "not a raftblock backup manifest"),
        ({**good, "chunks": good["chunks"][:2]}, "2 chunk entries for 3 chunks"),
        ({**good, "chunks": [["zero"], ["full", "xyz"], ["zero"]]}, "chunk entry 1 is malformed"),
        ({**good, "size_bytes": "big"}, "field 'size_bytes'"),
        ({**good, "chunk_bytes": 1000}, "do not fit together"),
    ]
    for d, msg in cases:
        with pytest.raises(ManifestError, match=msg) as ei:
            Manifest.from_json(json.dumps(d), "m.json")
        assert "\n" not in str(ei.value)
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json(b"\xff{", "m.json")


# == transfers on a directory store ===========================================================================
def test_export_then_restore_gives_the_image_back_and_zero_chunks_are_not_stored(tmp_path: Path) -> None:
    size = 5 * CH + 3 * 4096  # a short last chunk
    img = _image(10, size, zero_chunks=(1, 3))
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, DirStore)
    seen: list[tuple[int, int]] = []
    r = export_image(store, "vol", "s1", size, _reader(img), progress=lambda d, t, b: seen.append((d, t)))
    assert [e[0] for e in r.manifest.chunks] == ["full", "zero", "full", "zero", "full", "full"]
    assert r.uploaded_objects == 4 and r.reused_objects == 0
    assert seen[-1] == (6, 6)
    assert not store.exists("uploads/vol/s1.json")  # progress removed once the manifest is in
    assert list(list_manifests(store)) == [("vol", "s1")]
    man = load_manifest(store, "vol", "s1")
    assert restore_bytes(store, man) == img
    assert verify(store, man) == []


def test_the_same_data_is_never_uploaded_twice_across_volumes_and_snapshots(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "store"))
    img = _image(11, 4 * CH)
    export_image(store, "a", "s1", len(img), _reader(img))
    r = export_image(store, "b", "s1", len(img), _reader(img))  # a clone of the same image
    assert r.uploaded_objects == 0 and r.reused_objects == 4


def test_an_incremental_export_sends_deltas_for_small_changes_and_reads_only_changed_chunks(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "store"))
    size = 8 * CH
    img = _image(12, size, zero_chunks=(6,))
    base = export_image(store, "vol", "s1", size, _reader(img)).manifest
    # 1 % of the volume changes: a few 4 KiB blocks in chunk 2, most of chunk 5, a block in the zero chunk
    changed_bytes = 0
    for blk in (3, 100, 900):
        img[2 * CH + blk * 4096 : 2 * CH + (blk + 1) * 4096] = random.Random(blk).randbytes(4096)
        changed_bytes += 4096
    img[5 * CH : 5 * CH + 3 * MiB] = random.Random(5).randbytes(3 * MiB)
    changed_bytes += 3 * MiB
    img[6 * CH : 6 * CH + 4096] = b"\x01" * 4096
    changed_bytes += 4096
    reads: list[int] = []
    r = export_image(store, "vol", "s2", size, _reader(img, reads), since=base, changed=lambda k: k in (2, 5, 6))
    assert sorted(reads) == [2, 5, 6]
    m = r.manifest
    assert m.parent == "s1"
    assert m.chunks[2][0] == "delta" and m.chunks[2][2] == base.chunks[2][1]
    assert m.chunks[5][0] == "full"  # 3 of 4 MiB changed: a delta would carry more than half
    assert m.chunks[6][0] == "full"  # was zero: no base to take a delta against
    assert m.chunks[0] == base.chunks[0]
    assert r.uploaded_bytes < 2 * changed_bytes + 2 * CH  # the full chunks 5 and 6 plus a 3-block delta
    assert restore_bytes(store, m) == img
    assert restore_bytes(store, base) != img  # the older backup still restores the older image
    assert verify(store, base) == [] and verify(store, m) == []


def test_an_export_killed_halfway_resumes_and_sends_only_what_is_missing(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "store"))
    size = 40 * CH
    img = _image(13, size)
    calls = {"n": 0}

    def dying_read(off: int, n: int) -> bytes:
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt  # the CLI killed (the progress is saved on the way out)
        return bytes(img[off : off + n])

    with pytest.raises(KeyboardInterrupt):
        export_image(store, "vol", "s1", size, dying_read, parallel=2)
    assert not store.exists(manifest_key("vol", "s1"))  # no manifest: the backup does not exist
    assert store.exists("uploads/vol/s1.json")
    sent_before = sum(1 for _ in store.list("chunks/"))
    assert 20 <= sent_before <= 25
    r = export_image(store, "vol", "s1", size, _reader(img), parallel=2)
    assert r.resumed_chunks >= 16  # what the progress object had recorded
    assert r.uploaded_objects == 40 - sent_before  # the rest found by HEAD
    assert restore_bytes(store, r.manifest) == img


def test_a_tampered_or_missing_chunk_fails_the_restore_with_its_name_and_verify_lists_it(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "store"))
    img = _image(14, 3 * CH)
    man = export_image(store, "vol", "s1", len(img), _reader(img)).manifest
    victim = man.chunks[1][1]
    path = tmp_path / "store" / "chunks" / victim
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(chunk.ChunkError, match=victim):
        restore_bytes(store, man)
    assert [p for p in verify(store, man) if victim in p]
    path.unlink()
    with pytest.raises(chunk.ChunkError, match=f"{victim}: missing"):
        restore_bytes(store, man)


def test_deleting_a_backup_and_collecting_frees_only_what_no_manifest_names(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "store"))
    img = _image(15, 3 * CH)
    export_image(store, "vol", "s1", len(img), _reader(img))
    img[:4096] = bytes(4096)
    img[CH * 2 :] = random.Random(1).randbytes(CH)
    s2 = export_image(store, "vol", "s2", len(img), _reader(img)).manifest
    assert collect(store, min_age_s=0) == (0, 0)
    delete_backup(store, "vol", "s1")
    with pytest.raises(ManifestError, match="no backup of vol@s1"):
        load_manifest(store, "vol", "s1")
    removed, freed = collect(store, min_age_s=3600)  # too young: kept (an export may be running)
    assert removed == 0
    removed, freed = collect(store, min_age_s=0)
    assert removed == 2 and freed > 0  # s1's chunks 0 and 2; chunk 1 is s2's too
    assert verify(store, s2) == [] and restore_bytes(store, s2) == img


def test_bad_store_urls_and_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unknown scheme"):
        open_store("ftp://x/y")
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///prefix")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot use"):
        open_store(str(blocker / "sub"))
    store = DirStore(str(tmp_path / "s"))
    with pytest.raises(ManifestError, match="snapshot name"):
        export_image(store, "vol", "../etc", CH, _reader(bytearray(CH)))
    with pytest.raises(ValueError, match="bad object key"):
        store.get("../x")


def test_a_lazy_fill_fetches_each_chunk_once_verifies_it_and_skips_zero_blocks(tmp_path: Path) -> None:
    """client/lazy.py: reads that want the same chunks at once cause one fetch per chunk; only non-zero block
    runs are written (as FILL writes); a tampered chunk fails the read with its name and writes nothing."""
    import asyncio

    from raftblock.client.lazy import LazyFill, LazyFillError

    img = _image(4, 3 * CH, zero_chunks=(1,))
    img[100 * 4096 : 102 * 4096] = bytes(2 * 4096)  # two zero blocks inside chunk 0
    store = DirStore(str(tmp_path / "s"))
    export_image(store, "v", "s", len(img), _reader(img))
    written: dict[int, bytes] = {}

    async def fill(off: int, data: memoryview) -> None:
        await asyncio.sleep(0)
        for i in range(len(data) // 4096):
            assert off + i * 4096 not in written
            written[off + i * 4096] = bytes(data[i * 4096 : (i + 1) * 4096])

    async def go() -> LazyFill:
        lz = LazyFill(f"{store.url}#v@s", fill)
        per = CH // 4096
        await asyncio.gather(*(lz.ensure(0, 3 * per) for _ in range(5)), lz.ensure(per - 1, per + 1))
        await lz.ensure(0, 3 * per)  # all present: nothing fetched again
        return lz

    lz = asyncio.run(go())
    assert lz.fetched == 3
    assert sorted(written) == [o for o in range(0, 3 * CH, 4096) if img[o : o + 4096] != bytes(4096)]
    assert all(written[o] == img[o : o + 4096] for o in written)
    man = load_manifest(store, "v", "s")
    name = man.chunks[2][1]
    (tmp_path / "s" / "chunks" / name).write_bytes(b"not a chunk")
    written.clear()

    async def bad() -> None:
        await LazyFill(f"{store.url}#v@s", fill).ensure(2 * (CH // 4096), 2 * (CH // 4096) + 1)

    with pytest.raises(LazyFillError, match=name):
        asyncio.run(bad())
    assert written == {}
