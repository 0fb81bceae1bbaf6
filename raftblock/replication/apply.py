"""Applying a committed Raft entry or an acknowledged chain record to the node's engine: the one state
machine both replica kinds share.

Rules:
1. An entry is a batch of whole-block writes and trims (wire/ops.py); a run of writes goes to the engine
   as one call (one pwrite). Replaying a suffix of the log in order converges to the same state, so an
   entry applied twice (recovery from an older compaction point) is harmless.
2. A named op (client id, write id) that the group's session table has seen, or that its gateway gave up
   on, is skipped, the same way on every replica (sessions.py): a retried write applies once.
3. A full disk (NoSpaceError) applies nothing durable of this entry that counts: the ids it admitted are
   forgotten, so the entry is applied again, whole, once space returns.
4. A replica that cannot apply a committed entry (a corrupt block, a malformed batch) must not pretend it
   did: the error goes up, and the node stops serving (it is repaired from its peers).
5. Write-once (docs/format/write-once.md): a WRITE whose payload the WAL holds durably and block-aligned
   (`link`, from Wal.take_link) is applied as a LINK to those bytes, not written again; anything else
   (no link: the entry came in a snapshot, was re-applied after a restart, or was not durable yet) is
   written as before. Runs of writes and of links keep the batch's order.
6. SNAP / UNSNAP (wire/ops.py rule 5) pin / unpin the group's image here, between the ops before and after
   them; applying one twice (a replay) changes nothing (Engine.pin_snapshot keeps an existing pin).
7. FILL (wire/ops.py rule 6) writes only the blocks not allocated at this point of the log: the same blocks
   on every replica, since each applies the same ops before it.
8. A SEALED op (wire/ops.py rule 7, docs/encryption.md) also patches its blocks' entries into the extent's
   metadata blocks (zeros for a TRIM, only the filled blocks' for a FILL): each metadata block is read once
   per entry (after the writes before it reached the engine), patched in memory by every sealed op of the
   entry, and written (or dropped, when every entry in it is zero) at the end of the entry, with the rest.
   A skipped op (rule 2) patches nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog

from raftblock._fast import blockcrc
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import Link
from raftblock.storage.engine import CorruptBlockError, Engine, NoSpaceError
from raftblock.wire.ops import (
    AUX_BYTES,
    AUX_PER_BLOCK,
    OP_FILL,
    OP_SNAP,
    OP_TRIM,
    OP_UNSNAP,
    OP_WRITE,
    decode_batch,
)

_ZERO_META = bytes(4096)


def _pending(key: tuple[int, int], queued: Sequence[tuple[Any, ...]]) -> bool:
    """A write or link queued in this batch (extent, block, data, crcs, ...) covers block `key` (rule 8)."""
    e, b = key
    return any(q[0] == e and q[1] <= b < q[1] + len(q[3]) for q in queued)

log = structlog.get_logger(__name__)


def apply_batch(engine: Engine, sessions: Sessions, gid: int, index: int, data: bytes,
                counters: Counter[str], link: Link | None = None) -> None:
    admitted: list[tuple[int, int]] = []
    spans = link.spans if link is not None else []
    min_b = link.min_bytes if link is not None else 0
    k = 0
    # One run at a time, of writes or of links (never both: a change of kind ends the run), each run one
    # engine call (one pwrite).
    writes: list[tuple[int, int, bytes | bytearray | memoryview, Sequence[int]]] = []
    links: list[tuple[int, int, bytes | bytearray | memoryview, Sequence[int], int, int]] = []

    metas: dict[tuple[int, int], bytearray] = {}  # rule 8: (extent, metadata block) -> its new content
    was_zero: set[tuple[int, int]] = set()  # ... of those, the ones that held no entry before this batch

    def flush() -> None:
        if writes:
            engine.write_many(writes)
            writes.clear()
        if links:
            engine.link_many(links)
            links.clear()

    def seal(extent_id: int, block: int, count: int, seal_at: int, aux: bytes | bytearray | memoryview | None) -> None:
        """Rule 8: the entries of blocks [block, block+count) become `aux` (None: zeros)."""
        b = block
        while b < block + count:
            key = (extent_id, seal_at + b // AUX_PER_BLOCK)
            meta = metas.get(key)
            if meta is None:
                if _pending(key, writes) or _pending(key, links):
                    flush()  # a plain write into the metadata region before this op: on the engine first
                meta = metas[key] = engine.read(extent_id, key[1], 1)[0]
                if meta == _ZERO_META:
                    was_zero.add(key)
            n = min(block + count - b, AUX_PER_BLOCK - b % AUX_PER_BLOCK)
            at = (b % AUX_PER_BLOCK) * AUX_BYTES
            src = (b - block) * AUX_BYTES
            meta[at : at + n * AUX_BYTES] = aux[src : src + n * AUX_BYTES] if aux is not None else bytes(n * AUX_BYTES)
            b += n

    try:
        for op in decode_batch(data):
            at = -1
            if k < len(spans) and op.kind == OP_WRITE and len(op.data) >= min_b:
                _off, length, at = spans[k]  # the k-th large write is the k-th span (wire/ops.py write_spans)
                k += 1
                if length != len(op.data):
                    at = -1
            if op.client:
                if not sessions.admit(op.client, op.wid, op.low, index):
                    counters["writes_deduplicated"] += 1
                    continue
                admitted.append((op.client, op.wid))
            seal_at = op.seal_at
            if seal_at and op.kind != OP_FILL:
                seal(op.extent_id, op.block, op.count, seal_at, op.aux if op.kind == OP_WRITE else None)
            if op.kind == OP_TRIM:
                flush()
                engine.trim(op.extent_id, op.block, op.count)
            elif op.kind == OP_SNAP or op.kind == OP_UNSNAP:  # rule 6
                flush()
                if op.kind == OP_SNAP:
                    engine.pin_snapshot(gid, op.extent_id)
                else:
                    engine.unpin_snapshot(gid, op.extent_id)
            elif op.kind == OP_FILL:  # rule 7
                flush()
                pos = 0
                for n, allocated in engine.block_status(op.extent_id, op.block, op.count):
                    if not allocated:
                        engine.write(op.extent_id, op.block + pos, op.data[pos * 4096 : (pos + n) * 4096],
                                     op.crcs[pos : pos + n])
                        if seal_at:
                            seal(op.extent_id, op.block + pos, n, seal_at,
                                 op.aux[pos * AUX_BYTES : (pos + n) * AUX_BYTES])
                    pos += n
            elif at >= 0:
                if writes:
                    flush()
                assert link is not None
                links.append((op.extent_id, op.block, op.data, op.crcs, link.seq, at))
                counters["writes_linked"] += 1
            else:
                if links:
                    flush()
                writes.append((op.extent_id, op.block, op.data, op.crcs))
        for (extent_id, mblock), meta in metas.items():
            if meta == _ZERO_META:
                if (extent_id, mblock) in was_zero:
                    continue
                flush()
                engine.trim(extent_id, mblock, 1)  # no entry left: the block reads as zeros, and takes no space
            else:
                writes.append((extent_id, mblock, meta, blockcrc.block_crcs(meta)))
        flush()
    except NoSpaceError:
        for client, wid in admitted:  # rule 3
            sessions.forget(client, wid)
        raise
    except (CorruptBlockError, ValueError) as ex:  # rule 4
        counters["apply_errors"] += 1
        log.error("replica.apply_failed", group=gid, index=index, error=repr(ex))
        raise
