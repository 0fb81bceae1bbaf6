"""Client requests waiting in a node's replicas, for both kinds (Raft and chain): the write completion that
answers the client itself, the queue entry of a write not yet proposed, how a turn's writes are cut into
batches, how a group that cannot serve answers everything it holds, and the two errors that mean "ask
elsewhere" and "ask again".

Rules:
1. A write costs no task and no future on the leader or head: `Reply` answers the client through its
   node (`Answerer.answer`) when the entry applies or fails, and is used like a future by the proposal
   bookkeeping (done, set_result, set_exception).
2. A batch is at most `writes_max` writes and `bytes_max` encoded bytes (one Raft entry or chain record);
   writes already answered (timed out, refused) are left out.
3. `fail_requests` answers every waiting write and read of a group once, with the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from raftblock.wire.ops import BlockOp


class Answerer(Protocol):
    """Who sends a client its reply (node/dataplane.py DataPlane.answer); `conn` is the client's connection."""

    def answer(self, conn: object, gid: int, request_id: int, exc: BaseException | None) -> None: ...


class Reply:
    """Rule 1."""

    __slots__ = ("rt", "conn", "gid", "request_id", "_done")

    def __init__(self, rt: Answerer, conn: object, gid: int, request_id: int) -> None:
        self.rt = rt
        self.conn = conn
        self.gid = gid
        self.request_id = request_id
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _index: int) -> None:
        self._done = True
        self.rt.answer(self.conn, self.gid, self.request_id, None)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self.rt.answer(self.conn, self.gid, self.request_id, exc)


class Pending:
    """A write of this turn not yet proposed: its op and its completion."""

    __slots__ = ("op", "fut")

    def __init__(self, op: BlockOp, fut: Reply) -> None:
        self.op = op
        self.fut = fut


def live_batches(pending: list[Pending], writes_max: int, bytes_max: int) -> Iterator[list[Pending]]:
    """Rule 2: the writes of one loop turn cut into batches, without those already answered."""
    i = 0
    while i < len(pending):
        batch: list[Pending] = []
        size = 0
        while i < len(pending) and len(batch) < writes_max:
            s = pending[i].op.encoded_size()
            if batch and size + s > bytes_max:
                break
            batch.append(pending[i])
            size += s
            i += 1
        live = [p for p in batch if not p.fut.done()]
        if live:
            yield live


def fail_requests(proposals: Iterable[list[Reply]], pending: Iterable[Pending],
                  reads: Iterable[asyncio.Future[int]], exc: Exception) -> None:
    """Rule 3: answer every waiting write and read of a group with `exc` (the group lost its role, the
    node failed or stops); the caller clears its collections."""
    for replies in proposals:
        for reply in replies:
            if not reply.done():
                reply.set_exception(exc)
    for p in pending:
        if not p.fut.done():
            p.fut.set_exception(exc)
    for fut in reads:
        if not fut.done():
            fut.set_exception(exc)


class NotLeaderError(Exception):
    """Not the Raft leader or the chain head/tail this request needs: `leader` says who is (0: unknown)."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not leader (leader hint {leader})")
        self.leader = leader


class RetryError(Exception):
    """The group cannot serve now (no leader of this term yet, overloaded); the client retries."""
