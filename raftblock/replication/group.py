"""The ReplicationGroup interface: the one seam between the data path above (client, gateway) and
how an extent group keeps its copies (one local member, Raft, or a chain).

Rules:
1. Addresses are (extent_id, block) in 4 KiB blocks; callers split at extent edges and align to blocks.
2. `write`, `trim` and `zero` return only when the change is durable where the mode says (fsynced on the
   one member; on a majority for Raft; on every member for a chain). There is no volatile cache, so
   `flush` only has to wait for operations already acknowledged to be durable — which they are.
3. Every write carries one CRC32C per 4 KiB block, computed once at the gateway; every member checks it
   before writing, and every read returns the CRCs of what it read, checked after the disk read.
4. Errors are typed (`GroupError` subclasses) so the gateway can map them to one NBD errno each.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class GroupError(Exception):
    """Base of the errors a ReplicationGroup raises; `errno` is what the host is told."""

    errno = errno.EIO


class CorruptData(GroupError):
    """A block failed its CRC check and no healthy copy could serve it."""

    errno = errno.EIO

    def __init__(self, extent_id: int, block: int, reason: str) -> None:
        super().__init__(f"extent {extent_id:#x} block {block}: {reason}")
        self.extent_id = extent_id
        self.block = block
        self.reason = reason


class NoSpace(GroupError):
    errno = errno.ENOSPC


class Unavailable(GroupError):
    """The group cannot serve now (no quorum, failed disk, shutting down)."""

    errno = errno.EIO


@dataclass
class GroupStatus:
    group_id: int
    mode: str  # "local" | "raft" | "chain"
    members: list[str]
    leader: str | None
    healthy: bool
    detail: dict[str, int | str] = field(default_factory=dict)


class ReplicationGroup(Protocol):
    async def write(self, extent_id: int, block: int, data: memoryview | bytes, crcs: Sequence[int],
                    fill: bool = False) -> None: ...

    async def read(self, extent_id: int, block: int, count: int, snap_id: int = 0) -> tuple[bytearray, list[int]]: ...

    async def snapshot(self, snap_id: int, drop: bool = False) -> None: ...

    async def trim(self, extent_id: int, block: int, count: int) -> None: ...

    async def zero(self, extent_id: int, block: int, count: int) -> None: ...

    async def flush(self) -> None: ...

    async def block_status(self, extent_id: int, block: int, count: int, snap_id: int = 0,
                           since_snap_id: int = 0) -> list[tuple[int, bool]]: ...

    def status(self) -> GroupStatus: ...
