"""GroupCommit: one WAL fdatasync covers every replica's Ready that waits for durability (both kinds).

Rules:
1. One fdatasync in flight; while it runs the next batch accumulates. A replica waits at most once
   (`Replica.waiting`) for the sync covering its `wait_pos`.
2. "inline" (HostConfig.wal_sync): the loop itself calls fdatasync once per turn, after every message of
   the turn is on the wire (followers and the leader sync in parallel, in their own processes). One slower
   than `wal_sync_inline_max_ms` moves the node to the thread for `wal_sync_thread_s`, so a disk with
   fsync stalls cannot starve heartbeats into elections. "thread": a worker thread syncs while the loop
   goes on.
3. When a sync is done, the acknowledgements its Readies held back leave first (a follower's ack is on
   the write's critical path, its apply is not), then the Readies finish (apply, answer, advance).
4. A full disk on the WAL's write is not a failure: the records stay buffered (nothing that depends on them
   leaves the node: acknowledgements wait for their sync), and the write is tried again every
   APPLY_RETRY_S (counter wal_no_space). An fdatasync error fails the node (fsync errors cannot be
   retried honestly).
5. Compaction points no Ready waits for (a compaction-only Ready is not synced) are made durable within a
   second on an idle node (`sync_idle`, from the ticker), so the WAL's gc releases the segments they cover.
6. Segments the WAL's gc released are unlinked on the engine thread (`collect`), off the loop and off the
   WAL sync thread (unlinks of large files, with online discard, take tens of ms).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from raftblock.replication.replica import Replica
from raftblock.replication.wal import Wal

log = structlog.get_logger(__name__)

APPLY_RETRY_S = 1.0  # the WAL's write is tried again this much later after ENOSPC (rule 4)


class CommitSettings(Protocol):
    wal_sync: str
    wal_sync_inline_max_ms: float
    wal_sync_thread_s: float


class CommitHost(Protocol):
    """What group commit needs of its node (node/host.py NodeHost)."""

    wal: Wal
    counters: Counter[str]
    engine_executor: ThreadPoolExecutor

    @property
    def cfg(self) -> CommitSettings: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def failed(self) -> BaseException | None: ...

    def fail(self, e: BaseException) -> None: ...

    def kick(self) -> None: ...

    def turn(self) -> None: ...

    def send_acks(self) -> None: ...

    def after_sync(self) -> None: ...


class GroupCommit:
    def __init__(self, host: CommitHost) -> None:
        self.host = host
        self.waiters: list[Replica] = []
        self.syncing = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-sync")
        self._thread_until = 0.0  # monotonic time until which WAL syncs run on the thread (rule 2)
        self._idle_syncing = False
        self._wal_full = False

    # == the turn's end =========================================================================================
    def flush_wal(self) -> None:
        """Rule 4."""
        h = self.host
        try:
            h.wal.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            h.counters["wal_no_space"] += 1
            if not self._wal_full:
                self._wal_full = True
                log.warning("wal.no_space", error=str(e), retry_s=APPLY_RETRY_S)
                asyncio.get_running_loop().call_later(APPLY_RETRY_S, self._retry_wal)
            return
        if self._wal_full:
            self._wal_full = False
            log.info("wal.space_back")

    def _retry_wal(self) -> None:
        if self._wal_full and not self.host.stopping:
            self._wal_full = False  # the turn writes again; a new failure sets it and schedules the next try
            self.host.kick()

    def after_turn(self) -> None:
        if not self.waiters or self.syncing:
            return
        if self.inline_now():
            self._sync_inline()
            return
        self.syncing = True
        asyncio.get_running_loop().create_task(self._sync_loop())

    def inline_now(self) -> bool:
        if self.host.cfg.wal_sync != "inline":
            return False
        return self._thread_until == 0.0 or time.monotonic() >= self._thread_until

    # == rule 2 ==================================================================================================
    def _sync_inline(self) -> None:
        """One group commit on the loop thread: fdatasync what this turn wrote, then complete the Readies
        it covers. Their messages and applies run now, the next turn batches whatever arrived meanwhile."""
        h = self.host
        t0 = time.monotonic()
        try:
            synced = h.wal.sync(remove=False)  # unlinks stay on the reaper thread
        except OSError as e:
            h.fail(e)
            return
        took_ms = (time.monotonic() - t0) * 1000.0
        cfg = h.cfg
        if took_ms > cfg.wal_sync_inline_max_ms:
            h.counters["wal_sync_slow"] += 1
            self._thread_until = time.monotonic() + cfg.wal_sync_thread_s
            log.warning("wal.sync_slow", took_ms=round(took_ms, 1), limit_ms=cfg.wal_sync_inline_max_ms,
                        thread_for_s=cfg.wal_sync_thread_s)
        self._done(synced)
        if self.waiters:
            h.kick()  # records a WAL roll held back (wal.py rule 7) are written by the next turn

    async def _sync_loop(self) -> None:
        h = self.host
        loop = asyncio.get_running_loop()
        try:
            while self.waiters and h.failed is None:
                h.wal.flush()
                try:
                    synced = await loop.run_in_executor(self.executor, h.wal.sync)
                except OSError as e:
                    h.fail(e)
                    return
                self._done(synced)
                h.turn()
        finally:
            self.syncing = False
        if self.waiters and h.failed is None:
            h.kick()

    def _done(self, synced: int) -> None:
        """Rule 3. An apply that fails here (a corrupt block, a malformed entry) fails the node."""
        try:
            self._complete(synced)
        except Exception as e:
            self.host.fail(e)

    def _complete(self, synced: int) -> None:
        h = self.host
        still: list[Replica] = []
        done: list[Replica] = []
        for r in self.waiters:
            (done if r.wait_pos <= synced else still).append(r)
        self.waiters = still
        sent = False
        for r in done:
            sent = r.synced_messages() or sent
        if sent:
            h.send_acks()
        for r in done:
            r.synced()
        self.collect()
        h.after_sync()

    # == rules 5, 6 ==============================================================================================
    def sync_idle(self) -> None:
        h = self.host
        wal = h.wal
        if self.syncing or self.waiters or self._idle_syncing or h.stopping or not wal.compactions_pending():
            return
        try:
            wal.flush()
        except OSError:
            return  # a full disk: the turn's own write retries it (rule 4)
        self._idle_syncing = True
        fut = asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(wal.sync, remove=False))

        def done(f: asyncio.Future[int]) -> None:
            self._idle_syncing = False
            exc = f.exception() if not f.cancelled() else None
            if exc is not None:
                h.fail(exc)
                return
            self.collect()

        fut.add_done_callback(done)

    def collect(self, held: bool = False) -> None:
        """WAL segments to remove; `held`: the held ones the engine let go of too (once a second: the host)."""
        h = self.host
        if h.wal.gc(held) and not h.stopping:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.run_in_executor(h.engine_executor, self._reap)

    def _reap(self) -> None:
        try:
            self.host.wal.reap()
        except OSError as e:
            log.warning("wal.reap_failed", error=repr(e))  # queued again: the next sync retries
