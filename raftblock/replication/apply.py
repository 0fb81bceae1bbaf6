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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import structlog

from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import Link
from raftblock.storage.engine import CorruptBlockError, Engine, NoSpaceError
from raftblock.wire.ops import OP_FILL, OP_SNAP, OP_TRIM, OP_UNSNAP, OP_WRITE, decode_batch

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

    def flush() -> None:
        if writes:
            engine.write_many(writes)
            writes.clear()
        if links:
            engine.link_many(links)
            links.clear()

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
        flush()
    except NoSpaceError:
        for client, wid in admitted:  # rule 3
            sessions.forget(client, wid)
        raise
    except (CorruptBlockError, ValueError) as ex:  # rule 4
        counters["apply_errors"] += 1
        log.error("replica.apply_failed", group=gid, index=index, error=repr(ex))
        raise
