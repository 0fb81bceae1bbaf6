# raftblock.storage: the local storage engine of a node (append-only CRC32C-framed segments, an
# in-memory index with checkpoints, recovery, segment cleaning) and its Disk port.
# Formats: docs/format/segment.md. Rule: only disk.py touches files; everything else goes through it.
from raftblock.storage.disk import Disk, DiskFile, OsDisk, VolatileDisk, make_disk
from raftblock.storage.engine import (
    BLOCK_SIZE,
    CorruptBlockError,
    CorruptRange,
    Engine,
    EngineConfig,
    NoSpaceError,
    RecoveryReport,
)

__all__ = [
    "BLOCK_SIZE",
    "CorruptBlockError",
    "CorruptRange",
    "Disk",
    "DiskFile",
    "Engine",
    "EngineConfig",
    "NoSpaceError",
    "OsDisk",
    "RecoveryReport",
    "VolatileDisk",
    "make_disk",
]
