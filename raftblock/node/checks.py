"""The storage node's edge checks of a client request (the gateway checks again at its own edge): a
range inside one extent of the group the request names, a write whose payload matches its count and whose
every block matches its CRC32C on arrival. Each failure is a ValueError or CorruptBlockError the data
plane answers with one precise status (BAD_REQUEST, CORRUPT)."""

from __future__ import annotations

from raftblock._fast import blockcrc
from raftblock.ids import group_of_extent
from raftblock.storage.engine import CorruptBlockError
from raftblock.storage.segment import MAX_BLOCK, MAX_WRITE_BLOCKS
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import OP_C_SNAP, OP_C_TRIM, OP_C_UNSNAP
from raftblock.wire.ops import (
    AUX_BYTES,
    BLOCK_SIZE,
    OP_FILL,
    OP_SNAP,
    OP_TRIM,
    OP_UNSNAP,
    OP_WRITE,
    BlockOp,
    seal_blocks,
)


def check_range(gid: int, req: pb.ClientRequest, limit: int) -> int:
    """A read-side request's extent is in group `gid` and its range is 1..`limit` blocks inside the
    extent; returns the block count, else ValueError (a precise BAD_REQUEST)."""
    if group_of_extent(req.extent_id) != gid:
        raise ValueError(f"extent {req.extent_id:#x} does not belong to group {gid}")
    n = req.count
    if n < 1 or n > limit or req.block + n > MAX_BLOCK:
        raise ValueError("bad block range")
    if req.seal_at:
        check_seal(req.block, n, req.seal_at)
    return int(n)


def check_seal(block: int, n: int, seal_at: int) -> tuple[int, int]:
    """A sealed request's data stays below its extent's metadata region, which fits in the extent; returns the
    metadata blocks [first, end) that hold the request's entries."""
    first, end = seal_blocks(block, n, seal_at)
    if end > MAX_BLOCK:
        raise ValueError(f"metadata region at {seal_at} reaches past the extent")
    return first, end


def validate_write(gid: int, req: pb.ClientRequest, payload: bytes | bytearray | memoryview) -> BlockOp:
    """The node's edge check of a write, trim, snap or unsnap (the gateway checks again at its own edge)."""
    if req.op == OP_C_SNAP or req.op == OP_C_UNSNAP:
        if req.snap_id < 1 or payload or req.count or req.crcs:
            raise ValueError("a snapshot op names a snapshot id >= 1 and carries no blocks")
        if req.client_id and req.low_water > req.write_id:
            raise ValueError("low_water above the write's own id")
        return BlockOp(OP_SNAP if req.op == OP_C_SNAP else OP_UNSNAP, req.snap_id, 0, 0, (), b"", req.client_id,
                       req.write_id, req.low_water)
    if group_of_extent(req.extent_id) != gid:
        raise ValueError(f"extent {req.extent_id:#x} does not belong to group {gid}")
    n = req.count
    if n < 1 or req.block + n > MAX_BLOCK:
        raise ValueError("block range out of bounds")
    if req.client_id and req.low_water > req.write_id:
        raise ValueError("low_water above the write's own id")
    seal_at = req.seal_at
    if seal_at:
        check_seal(req.block, n, seal_at)
    if req.op == OP_C_TRIM:
        if payload:
            raise ValueError("trim carries no payload")
        return BlockOp(OP_TRIM, req.extent_id, req.block, n, (), b"", req.client_id, req.write_id, req.low_water,
                       seal_at)
    if n > MAX_WRITE_BLOCKS:
        raise ValueError(f"a write covers at most {MAX_WRITE_BLOCKS} blocks")
    size = n * BLOCK_SIZE
    if len(payload) != size + (n * AUX_BYTES if seal_at else 0) or len(req.crcs) != n:
        raise ValueError("payload / crcs do not match count")
    view = memoryview(payload)
    data, aux = (view[:size], view[size:]) if seal_at else (payload, b"")
    crcs = list(req.crcs)
    bad = blockcrc.first_mismatch(data, crcs)
    if bad >= 0:
        raise CorruptBlockError(req.extent_id, req.block + bad, "checksum mismatch on arrival")
    return BlockOp(OP_FILL if req.fill else OP_WRITE, req.extent_id, req.block, n, crcs, data, req.client_id,
                   req.write_id, req.low_water, seal_at, aux)
