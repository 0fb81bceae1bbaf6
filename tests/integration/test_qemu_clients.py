# qemu-img / qemu-io / libnbd against `raftblock serve`: sizes, patterns, unaligned sectors, restart.
#
# Enforces: NBD proto.md "NBD_OPT_GO" / NBD_INFO_EXPORT (export size), NBD_CMD_READ/NBD_CMD_WRITE
# round trips byte for byte, including 512-byte sectors inside and across 4 KiB blocks (the gateway's
# read-modify-write; proto.md "Block size constraints": minimum 512), and the serve contract that a
# restart on the same --dir serves the same data.
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from raftblock.testing.serve import ServeProcess

from .helpers import BLOCK, SECTOR, MiB, ServeFactory, nbd_read, nbd_write, require_libnbd, require_tools, run

MODEL_BYTES = 2 * MiB

# (pattern byte, offset, length), applied in order; later writes overlap earlier ones on purpose.
QEMU_WRITES = [
    (0xAB, 0, 64 * 1024),          # aligned 64 KiB
    (0xCD, 1000, 3000),            # unaligned offset and length (qemu aligns to 512 and read-modify-writes)
    (0x11, 3584, 1024),            # two sectors straddling the 4 KiB boundary at 4096
    (0x22, 8192 - 512, 1536),      # straddling 8192, three sectors
    (0x33, 12288 + 512, 512),      # one sector in the middle of a block
    (0x44, 64 * 1024 - 512, 1024),  # across the end of the first write into unwritten space
    (0x55, MiB + 100, 5000),       # unaligned, inside a hole
]


def _apply(model: bytearray, offset: int, data: bytes) -> None:
    model[offset:offset + len(data)] = data


def _runs(model: bytes) -> list[tuple[int, int, int]]:
    """(byte value, offset, length) runs, for qemu-io `read -P` commands."""
    runs = []
    start = 0
    for i in range(1, len(model) + 1):
        if i == len(model) or model[i] != model[start]:
            runs.append((model[start], start, i - start))
            start = i
    return runs


def _qemu_io(uri: str, cmds: list[str]) -> str:
    argv = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        argv += ["-c", c]
    cp = run(argv, timeout_s=60, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0 and "verification failed" not in out and "error" not in out.lower(), (
        f"qemu-io failed ({cp.returncode}):\n{out[-4000:]}")
    return out


def test_qemu_img_info_shows_virtual_size(serve_factory: ServeFactory) -> None:
    """NBD proto.md NBD_INFO_EXPORT: the export size is the --volume SIZE (suffix and plain bytes)."""
    require_tools("qemu-img")
    srv = serve_factory(["vol:64M", "small:1048576"])
    for name, size in (("vol", 64 * MiB), ("small", MiB)):
        cp = run(["qemu-img", "info", "--output=json", "-f", "raw", srv.uri(name)], timeout_s=30)
        info = json.loads(cp.stdout)
        assert info["virtual-size"] == size, info


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_qemu_io_and_libnbd_patterns_round_trip(serve_factory: ServeFactory, tmp_path: Path, impl: str) -> None:
    """NBD_CMD_WRITE then NBD_CMD_READ return the same bytes, for aligned, 512-byte and unaligned requests,
    through two independent clients (qemu-io and libnbd), and again after a SIGTERM + restart.
    Runs on the Cython hot loops and on their pure-Python twins (RAFTBLOCK_NO_EXTENSIONS=1)."""
    require_tools("qemu-io")
    require_libnbd()
    if impl == "cython" and importlib.util.find_spec("raftblock._fast._blockcrc_c") is None:
        # built with RAFTBLOCK_NO_EXTENSIONS=1 (or without a compiler): there is no Cython case to run
        pytest.skip("the Cython extensions are not built in this install")
    env = dict(os.environ)
    env.pop("RAFTBLOCK_NO_EXTENSIONS", None)
    if impl == "python":
        env["RAFTBLOCK_NO_EXTENSIONS"] = "1"
    server: ServeProcess = serve_factory(env=env)
    started = [e for e in server.log_events() if e.get("event") == "serve.starting"]
    assert started and started[-1]["fast"] == impl, started
    uri = server.uri("vol")
    model = bytearray(MODEL_BYTES)

    cmds = []
    for pattern, offset, length in QEMU_WRITES:
        cmds.append(f"write -P {pattern:#x} {offset} {length}")
        _apply(model, offset, bytes([pattern]) * length)
    out = _qemu_io(uri, cmds)
    assert out.count("wrote ") == len(QEMU_WRITES), out

    # libnbd writes 512-byte sectors the gateway must merge into 4 KiB blocks without disturbing neighbours.
    block_base = 300 * BLOCK
    sector_writes = [
        (block_base + 1 * SECTOR, bytes([0x61]) * SECTOR),
        (block_base + 3 * SECTOR, bytes([0x62]) * SECTOR),
        (block_base + 6 * SECTOR, bytes(range(256)) * 2),
        (block_base + BLOCK - SECTOR, bytes([0x63]) * (3 * SECTOR)),  # crosses into the next block
        (block_base + 7 * BLOCK, bytes(range(255, -1, -1)) * 8 * 3),   # 3 aligned blocks, non-uniform bytes
    ]
    for offset, data in sector_writes:
        nbd_write(uri, offset, data, tmp_path)
        _apply(model, offset, data)

    # Read back with qemu-io (new connection), run by run; zero runs included, so stray writes show up.
    reads = [f"read -P {value:#x} {offset} {length}" for value, offset, length in _runs(bytes(model))]
    _qemu_io(uri, reads)

    def check_exact(when: str) -> None:
        r = nbd_read(uri, 0, MODEL_BYTES, tmp_path)
        assert r["ok"], f"libnbd read failed {when}: {r}"
        got: bytes = r["data"]
        if got != bytes(model):
            first = next(i for i in range(MODEL_BYTES) if got[i] != model[i])
            raise AssertionError(
                f"{when}: first differing byte at {first}: got {got[first]:#x}, expected {model[first]:#x}")

    check_exact("before restart")
    assert server.stop() == 0, "SIGTERM must end serve with status 0"
    server.restart()
    check_exact("after SIGTERM and restart on the same --dir")
