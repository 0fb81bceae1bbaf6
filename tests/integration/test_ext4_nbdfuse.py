# A real file system on a raftblock volume: nbdfuse + loop mount + ext4, across a server restart.
#
# Enforces: the block-device contract as a file system sees it (mkfs issues TRIM and large writes, the
# kernel issues 4 KiB and larger I/O, umount flushes), fsck.ext4 -fn finds no error, and every file reads
# back byte for byte after SIGTERM + restart of `raftblock serve` (acknowledged writes are durable).
# Every mount happens inside `unshare -m --propagation private`, so nothing leaks into the host.
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from .helpers import SCRIPTS, ServeFactory, _skip_or_fail, require_tools, run

SIZES = [0, 1, 511, 512, 4095, 4096, 4097, 65536 + 7, 300_000, 1 << 20, (1 << 20) + 3]


def _make_tree(root: Path, seed: int = 7) -> dict[str, str]:
    """A few MB of files of awkward sizes in nested directories; returns {./path: sha256}."""
    rng = random.Random(seed)
    sums = {}
    for d in range(4):
        sub = root / f"dir{d}" / ("nested" if d % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(SIZES if d < 2 else SIZES[:7]):
            data = rng.randbytes(size) if i % 3 else bytes([d * 16 + i]) * size  # incompressible and runs
            p = sub / f"f{i}.bin"
            p.write_bytes(data)
            sums["./" + str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return sums


def _read_sums(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name] = digest
    return out


def _phase(phase: str, uri: str, work: Path, src: Path | None = None) -> None:
    argv = ["unshare", "-m", "--propagation", "private", "bash", str(SCRIPTS / "ext4_nbdfuse.sh"), phase, uri, str(work)]
    if src is not None:
        argv.append(str(src))
    run(argv, timeout_s=150)


@pytest.mark.timeout(300)
def test_ext4_on_nbdfuse_survives_restart(serve_factory: ServeFactory, tmp_path: Path) -> None:
    require_tools("nbdfuse", "fusermount3", "mkfs.ext4", "fsck.ext4", "unshare", "mount", "umount", "mountpoint")
    if os.geteuid() != 0:
        _skip_or_fail("mount -o loop needs root")
    if not Path("/dev/fuse").exists():
        _skip_or_fail("no /dev/fuse")

    src = tmp_path / "src"
    expected = _make_tree(src)
    assert sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) > 4 << 20

    srv = serve_factory(["fs:128M"])
    work = tmp_path / "work"
    work.mkdir()

    _phase("write", srv.uri("fs"), work, src)
    assert _read_sums(work / "sums.write") == expected, "files differ right after the copy"

    assert srv.stop() == 0
    srv.restart()

    _phase("verify", srv.uri("fs"), work)
    got = _read_sums(work / "sums.verify")
    missing = sorted(set(expected) - set(got))
    changed = sorted(k for k in expected if k in got and got[k] != expected[k])
    assert not missing and not changed and set(got) == set(expected), (
        f"after restart: missing {missing}, changed {changed}, extra {sorted(set(got) - set(expected))}")
