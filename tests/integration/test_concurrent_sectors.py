# Concurrent 512-byte writers sharing 4 KiB blocks: the gateway's per-block read-modify-write must not
# lose updates.
#
# Enforces: NBD proto.md "Block size constraints" (minimum block size 512: a client may write any
# 512-byte-aligned range) together with NBD_FLAG_CAN_MULTI_CONN (writes on several connections to one
# export are all applied); the serve contract "Unaligned (512-byte) I/O works via read-modify-write".
# A missing per-block lock shows up as a sector holding an older round (lost update) or another sector's
# record (a stale block image written back over a neighbour's write).
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from raftblock.testing.serve import ServeProcess

from .helpers import BLOCK, SECTOR, nbd_client, nbd_read

NCONN = 4
NBLOCKS = 128
ROUNDS = 8
QD = 32


def _describe(raw: bytes) -> str:
    magic, rnd, block, sector = struct.unpack(">4sIII", raw[:16])
    if raw == bytes(SECTOR):
        return "zeroes"
    if magic != b"SECT" or raw != raw[:16] * (SECTOR // 16):
        return f"garbage {raw[:16].hex()}"
    return f"round {rnd} of block {block} sector {sector}"


@pytest.mark.timeout(240)
def test_concurrent_sector_writers_keep_every_sector(server: ServeProcess, tmp_path: Path) -> None:
    uri = server.uri("vol")
    r = nbd_client("nbd_sector_writers.py", uri, NCONN, NBLOCKS, ROUNDS, 1, QD, timeout_s=200)
    assert r["ok"], f"writers saw errors: {r['errors']}"
    assert r["writes"] == NBLOCKS * 8 * ROUNDS

    got = nbd_read(uri, 0, NBLOCKS * BLOCK, tmp_path)
    assert got["ok"], got
    data: bytes = got["data"]
    bad = []
    for b in range(NBLOCKS):
        for s in range(BLOCK // SECTOR):
            want = struct.pack(">4sIII", b"SECT", ROUNDS - 1, b, s) * (SECTOR // 16)
            off = b * BLOCK + s * SECTOR
            if data[off:off + SECTOR] != want:
                bad.append(f"block {b} sector {s}: {_describe(data[off:off + SECTOR])}")
    assert not bad, f"{len(bad)} sectors lost their last write, e.g. {bad[:10]}"
