# Entry data of an extent group: a batch of block operations (docs/format/wire.md, "RAFT payload").
#
# Rules:
# 1. One Raft entry carries one batch; the leader packs the writes of one loop turn into it, bounded by
#    BATCH_OPS_MAX here and by the runtime's batch_bytes_max / batch_writes_max.
# 2. Block data is referenced, never re-encoded, when a batch is decoded (memoryview slices).
# 3. Every WRITE carries one CRC32C per 4 KiB block; the engine checks them before it writes.
# 4. An op may carry its client's name for exactly-once apply (replication/sessions.py): flag
#    FLAG_NAMED in the op's first reserved byte, then (client id, write id, low-water mark) as 3 x u64.
#    An op without the flag is applied unconditionally (the batch format before names existed).
# 5. SNAP and UNSNAP (docs/snapshots.md section 1) carry a snapshot id in the extent id field and no blocks:
#    applying one pins (or unpins) the group's image at that point of its log on every replica.
# 6. FILL is encoded as a WRITE and applied only to the blocks that are not allocated when it is applied
#    (a clone's flatten: a block the host wrote meanwhile is kept, on every replica alike).
# 7. An op of an encrypted volume (docs/encryption.md) is SEALED: flag FLAG_SEALED, then (after the name)
#    u32 `seal_at`, the first block of the extent's metadata region; a WRITE/FILL's data is followed by one
#    32-byte entry (nonce, tag, key version) per block. Applying it also patches those entries into the
#    metadata blocks (entry k of data block b: block seal_at + b // 128, bytes 32 * (b % 128)); a sealed TRIM
#    zeroes them. Data and entries change in one op of one entry: atomic on a crash, deduplicated together.
from __future__ import annotations

import struct
from collections.abc import Sequence

BLOCK_SIZE = 4096
BATCH_OPS_MAX = 0xFFFF
OP_WRITE = 1
OP_TRIM = 2
OP_SNAP = 3
OP_UNSNAP = 4
OP_FILL = 5
_MARK_OPS = (OP_SNAP, OP_UNSNAP)
_DATA_OPS = (OP_WRITE, OP_FILL)
_COUNT = struct.Struct("<H")
_OP = struct.Struct("<BBHIQII")  # kind, flags, reserved, count, extent_id, block, reserved
_NAME = struct.Struct("<QQQ")  # client id, write id, low-water mark (FLAG_NAMED)
_SEAL = struct.Struct("<I")  # seal_at (FLAG_SEALED, rule 7)
FLAG_NAMED = 1
FLAG_SEALED = 2
AUX_BYTES = 32  # a block's entry in the metadata region of a sealed extent (rule 7)
AUX_PER_BLOCK = BLOCK_SIZE // AUX_BYTES


def seal_blocks(block: int, count: int, seal_at: int) -> tuple[int, int]:
    """The metadata blocks [first, end) holding the entries of data blocks [block, block+count) (rule 7);
    ValueError when the data would reach into the metadata region."""
    if seal_at <= 0 or block + count > seal_at:
        raise ValueError(f"sealed blocks [{block}, {block + count}) reach the metadata region at {seal_at}")
    return seal_at + block // AUX_PER_BLOCK, seal_at + (block + count - 1) // AUX_PER_BLOCK + 1


def entries_of(meta: bytes | bytearray | memoryview, block: int, count: int) -> bytes:
    """The entries of blocks [block, block+count) in the metadata blocks `seal_blocks` named, read in a row."""
    at = (block % AUX_PER_BLOCK) * AUX_BYTES
    return bytes(meta[at : at + count * AUX_BYTES])


class BlockOp:
    __slots__ = ("kind", "extent_id", "block", "count", "crcs", "data", "client", "wid", "low", "seal_at", "aux")

    def __init__(
        self,
        kind: int,
        extent_id: int,
        block: int,
        count: int,
        crcs: Sequence[int] = (),
        data: bytes | bytearray | memoryview = b"",
        client: int = 0,
        wid: int = 0,
        low: int = 0,
        seal_at: int = 0,
        aux: bytes | bytearray | memoryview = b"",
    ) -> None:
        self.kind = kind
        self.extent_id = extent_id
        self.block = block
        self.count = count
        self.crcs = crcs
        self.data = data
        self.client = client  # 0: unnamed (always applied)
        self.wid = wid
        self.low = low
        self.seal_at = seal_at  # 0: not sealed (rule 7)
        self.aux = aux

    def encoded_size(self) -> int:
        n = _OP.size + (_NAME.size if self.client else 0) + (_SEAL.size if self.seal_at else 0)
        if self.kind in _DATA_OPS:
            return n + 4 * self.count + self.count * BLOCK_SIZE + (AUX_BYTES * self.count if self.seal_at else 0)
        return n

    def __repr__(self) -> str:
        if self.kind in _MARK_OPS:
            return f"BlockOp({'SNAP' if self.kind == OP_SNAP else 'UNSNAP'} snap={self.extent_id})"
        kind = {OP_WRITE: "W", OP_FILL: "F"}.get(self.kind, "T")
        return f"BlockOp({kind} ext={self.extent_id:#x} blk={self.block} n={self.count})"


def encode_batch(ops: Sequence[BlockOp]) -> bytes:
    if not 1 <= len(ops) <= BATCH_OPS_MAX:
        raise ValueError(f"a batch holds 1..{BATCH_OPS_MAX} ops, got {len(ops)}")
    parts: list[bytes | bytearray | memoryview] = [_COUNT.pack(len(ops))]
    for op in ops:
        flags = (FLAG_NAMED if op.client else 0) | (FLAG_SEALED if op.seal_at else 0)
        parts.append(_OP.pack(op.kind, flags, 0, op.count, op.extent_id, op.block, 0))
        if op.client:
            parts.append(_NAME.pack(op.client, op.wid, op.low))
        if op.seal_at:
            if op.kind in _MARK_OPS:
                raise ValueError("a snapshot op is not sealed")
            seal_blocks(op.block, op.count, op.seal_at)
            parts.append(_SEAL.pack(op.seal_at))
        if op.kind in _DATA_OPS:
            if len(op.crcs) != op.count or len(op.data) != op.count * BLOCK_SIZE:
                raise ValueError("write op: crcs/data do not match count")
            parts.append(struct.pack(f"<{op.count}I", *op.crcs))
            parts.append(op.data)
            if op.seal_at:
                if len(op.aux) != AUX_BYTES * op.count:
                    raise ValueError("sealed write op: one 32-byte entry per block")
                parts.append(op.aux)
        elif op.kind in _MARK_OPS:
            if op.count or op.block:
                raise ValueError("a snapshot op covers no blocks")
        elif op.kind != OP_TRIM:
            raise ValueError(f"unknown op kind {op.kind}")
    return b"".join(parts)


def write_spans(data: bytes | bytearray | memoryview, min_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) in `data` of the payload of every WRITE op of at least `min_bytes`, in op order
    (the write-once path: replication/wal.py lays these out block-aligned, apply.py links them). A batch
    that does not parse has none."""
    view = memoryview(data)
    out: list[tuple[int, int]] = []
    try:
        (n,) = _COUNT.unpack_from(view, 0)
        off = _COUNT.size
        for _ in range(n):
            kind, flags, _r2, count, _e, _b, _r3 = _OP.unpack_from(view, off)
            off += _OP.size + (_NAME.size if flags & FLAG_NAMED else 0) + (_SEAL.size if flags & FLAG_SEALED else 0)
            if kind in _DATA_OPS:
                off += 4 * count
                length = count * BLOCK_SIZE
                if off + length > len(view):
                    return []
                if length >= min_bytes and kind == OP_WRITE:
                    out.append((off, length))
                off += length + (AUX_BYTES * count if flags & FLAG_SEALED else 0)
    except struct.error:
        return []
    return out


def decode_batch(data: bytes | memoryview) -> list[BlockOp]:
    """Raises ValueError on a malformed batch."""
    try:
        return _decode_batch(memoryview(data))
    except struct.error as e:
        raise ValueError(f"malformed batch: {e}") from e


def _decode_batch(view: memoryview) -> list[BlockOp]:
    (n,) = _COUNT.unpack_from(view, 0)
    off = _COUNT.size
    ops: list[BlockOp] = []
    for _ in range(n):
        kind, flags, _r2, count, extent_id, block, _r3 = _OP.unpack_from(view, off)
        off += _OP.size
        client = wid = low = seal_at = 0
        if flags & ~(FLAG_NAMED | FLAG_SEALED):
            raise ValueError(f"unknown op flags {flags:#x}")
        if flags & FLAG_NAMED:
            client, wid, low = _NAME.unpack_from(view, off)
            off += _NAME.size
        if flags & FLAG_SEALED:
            (seal_at,) = _SEAL.unpack_from(view, off)
            off += _SEAL.size
            if kind in _MARK_OPS:
                raise ValueError("a snapshot op is not sealed")
            seal_blocks(block, count, seal_at)
        if kind in _DATA_OPS:
            crcs = list(struct.unpack_from(f"<{count}I", view, off))
            off += 4 * count
            end = off + count * BLOCK_SIZE
            aux_end = end + (AUX_BYTES * count if seal_at else 0)
            if aux_end > len(view):
                raise ValueError("batch truncated")
            ops.append(BlockOp(kind, extent_id, block, count, crcs, view[off:end], client, wid, low, seal_at,
                               view[end:aux_end]))
            off = aux_end
        elif kind == OP_TRIM or (kind in _MARK_OPS and count == 0 and block == 0):
            ops.append(BlockOp(kind, extent_id, block, count, (), b"", client, wid, low, seal_at))
        else:
            raise ValueError(f"unknown op kind {kind}" if kind not in _MARK_OPS else "a snapshot op covers no blocks")
    if off != len(view):
        raise ValueError("trailing bytes after batch")
    return ops
