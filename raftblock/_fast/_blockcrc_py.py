"""Per-4-KiB-block CRC32C over a multi-block buffer (pure-Python twin; wraps the crc32c package)."""

from __future__ import annotations

from collections.abc import Sequence

from crc32c import crc32c

BLOCK_SIZE = 4096
IMPLEMENTATION = "python"


def block_crcs(data: bytes | bytearray | memoryview) -> list[int]:
    """CRC32C of each 4 KiB block of `data` (len(data) must be a multiple of 4096)."""
    mv = memoryview(data)
    n = len(mv)
    if n % BLOCK_SIZE:
        raise ValueError(f"buffer of {n} bytes is not a whole number of 4 KiB blocks")
    return [crc32c(mv[i : i + BLOCK_SIZE]) for i in range(0, n, BLOCK_SIZE)]


def first_mismatch(data: bytes | bytearray | memoryview, crcs: Sequence[int]) -> int:
    """Index of the first block whose CRC32C differs from crcs[i], or -1 if all match."""
    mv = memoryview(data)
    if len(mv) != len(crcs) * BLOCK_SIZE:
        raise ValueError(f"{len(mv)} bytes do not match {len(crcs)} block CRCs")
    for i, want in enumerate(crcs):
        if crc32c(mv[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) != want:
            return i
    return -1
