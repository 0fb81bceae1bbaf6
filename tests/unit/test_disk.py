"""The Disk port (LevelDB `Env` style): OsDisk does real I/O; VolatileDisk keeps unsynced writes in
process memory so a simulated power cut (crash(), or kill -9 of the process) loses them, and with
tear=True leaves a random prefix of each unsynced pwrite on disk."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from raftblock.storage.disk import OsDisk, VolatileDisk, make_disk


def test_osdisk_file_and_directory_ops(tmp_path: Path) -> None:
    d = OsDisk()
    sub = str(tmp_path / "a" / "b")
    d.makedirs(sub)
    d.makedirs(sub)  # idempotent
    p = os.path.join(sub, "f")
    f = d.open_file(p, create=True)
    f.pwrite(b"hello", 10)
    assert f.size() == 15
    assert f.pread(5, 10) == b"hello"
    assert f.pread(100, 10) == b"hello"  # short at EOF
    f.fallocate(0, 4096)
    assert f.size() == 4096
    f.truncate(12)
    assert f.pread(100, 10) == b"he"
    f.fdatasync()
    f.close()
    d.fsync_dir(sub)
    assert d.listdir(sub) == ["f"]
    d.rename(p, p + "2")
    assert d.exists(p + "2") and not d.exists(p)
    d.remove(p + "2")
    assert d.listdir(sub) == []
    with pytest.raises(FileNotFoundError):
        d.open_file(p, create=False)


def test_volatile_unsynced_writes_are_visible_then_lost_on_crash(tmp_path: Path) -> None:
    d = VolatileDisk()
    p = str(tmp_path / "f")
    f = d.open_file(p, create=True)
    f.pwrite(b"durable", 0)
    f.fdatasync()
    f.pwrite(b"XY", 2)  # overlays the synced data for our own reads
    f.pwrite(b"tail", 100)
    assert f.pread(7, 0) == b"duXYble"
    assert f.size() == 104
    assert f.pread(4, 100) == b"tail"
    assert Path(p).read_bytes() == b"durable"  # nothing unsynced reached the file
    f.close()  # like the page cache, pending data outlives close()...
    g = d.open_file(p, create=False)
    assert g.pread(7, 0) == b"duXYble"
    d.crash()  # ...but not a power cut
    with pytest.raises(OSError):
        g.pread(1, 0)
    d2 = VolatileDisk()
    h = d2.open_file(p, create=False)
    assert h.pread(100, 0) == b"durable"
    h.close()


def test_volatile_fdatasync_persists_and_truncate_drops_pending(tmp_path: Path) -> None:
    d = VolatileDisk()
    p = str(tmp_path / "f")
    f = d.open_file(p, create=True)
    f.pwrite(b"a" * 10, 0)
    f.truncate(4)
    assert f.size() == 4 and f.pread(10, 0) == b"aaaa"
    f.fdatasync()
    assert Path(p).read_bytes() == b"aaaa"
    d.rename(p, p + ".new")
    f.pwrite(b"b", 4)  # pending data follows the renamed file
    assert f.pread(10, 0) == b"aaaab"
    f.fdatasync()
    assert Path(p + ".new").read_bytes() == b"aaaab"
    f.close()


def test_volatile_tear_leaves_a_prefix_on_disk(tmp_path: Path) -> None:
    d = VolatileDisk(tear=True, rng=random.Random(7))
    p = str(tmp_path / "f")
    f = d.open_file(p, create=True)
    data = bytes(range(256)) * 64
    lens = []
    for i in range(8):
        f.pwrite(data, i * len(data))
        on_disk = Path(p).read_bytes()[i * len(data) : (i + 1) * len(data)].rstrip(b"\0")
        assert data.startswith(on_disk)
        lens.append(len(on_disk))
    assert f.pread(len(data), 0) == data  # our own reads see the whole write
    assert len(set(lens)) > 1  # random prefixes
    d.crash()
    assert Path(p).stat().st_size <= 8 * len(data)


def test_volatile_is_thread_safe_sync_during_writes(tmp_path: Path) -> None:
    d = VolatileDisk()
    p = str(tmp_path / "f")
    f = d.open_file(p, create=True)
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            f.fdatasync()

    t = threading.Thread(target=syncer)
    t.start()
    try:
        for i in range(300):
            f.pwrite(i.to_bytes(4, "little"), 4 * i)
    finally:
        stop.set()
        t.join()
    f.fdatasync()
    raw = Path(p).read_bytes()
    assert [int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(300)] == list(range(300))
    f.close()


def test_make_disk_modes() -> None:
    assert isinstance(make_disk("os"), OsDisk)
    v = make_disk("volatile")
    assert isinstance(v, VolatileDisk) and not v.tear
    t = make_disk("volatile-tear")
    assert isinstance(t, VolatileDisk) and t.tear
    with pytest.raises(ValueError):
        make_disk("nope")


def test_write_parts_writes_every_part_in_order_with_pwritev_and_falls_back_to_one_pwrite(tmp_path: Path) -> None:
    from raftblock.storage.disk import MemDisk, OsDisk, write_parts

    parts: list[bytes | bytearray | memoryview] = [bytes([i % 251]) * (1 + i % 7) for i in range(2500)]  # > IOV_MAX
    parts[10] = memoryview(bytearray(b"view-of-a-bytearray"))[5:]
    parts[11] = b""
    want = b"".join(parts)
    f = OsDisk().open_file(str(tmp_path / "parts"), create=True)
    f.pwrite(b"x" * 10, 0)
    write_parts(f, parts, 10)
    assert f.size() == 10 + len(want) and f.pread(len(want), 10) == want
    f.close()
    mem = MemDisk()
    mem.makedirs("/d")
    g = mem.open_file("/d/parts", create=True)
    write_parts(g, parts, 0)
    assert g.pread(len(want), 0) == want


def test_pwritev_of_few_parts_counts_bytes_whatever_the_item_size(tmp_path: Path) -> None:
    """The one-call path compares what pwritev wrote with len() of the parts; a part whose items are not
    bytes (a memoryview of an array of u32) makes that comparison fail although all was written: nothing
    may then be written twice or at a wrong offset."""
    import array

    from raftblock.storage.disk import OsDisk

    words = array.array("I", range(1000, 1100))
    parts: list[bytes | bytearray | memoryview] = [b"head", memoryview(words), bytearray(b"tail"), b""]
    want = b"head" + words.tobytes() + b"tail"
    f = OsDisk().open_file(str(tmp_path / "few"), create=True)
    f.pwrite(b"-" * 3, 0)
    f.pwritev(parts, 3)  # type: ignore[attr-defined]
    assert f.size() == 3 + len(want) and f.pread(len(want), 3) == want
    f.pwritev([], 0)  # type: ignore[attr-defined]
    assert f.size() == 3 + len(want)
    f.close()
