"""What both segment writers (_segwriter_c.pyx and its twin _segwriter_py.py) share: the record layout
constants of docs/format/segment.md and the pair-check error, one class for both implementations.

raftblock/storage/segment.py owns the format; it asserts at import that these constants equal its own
(_fast cannot import the storage package: storage imports _fast).
"""

from __future__ import annotations

BLOCK_SIZE = 4096
REC_MAGIC = b"RBRC"
REC_HEADER_SIZE = 48
REC_WRITE = 1
REC_TRIM = 2
MAX_WRITE_BLOCKS = 256
MAX_BLOCK = (1 << 32) - 1  # block + count must stay <= MAX_BLOCK


class BlockCrcMismatch(ValueError):
    """A payload block in the buffer about to be written does not match the caller's CRC (TigerBeetle's
    pair check). `index` is the first such block within the record."""

    def __init__(self, index: int) -> None:
        super().__init__(f"payload block {index} does not match its CRC32C")
        self.index = index

    def __reduce__(self) -> tuple[type[BlockCrcMismatch], tuple[int]]:
        return type(self), (self.index,)
