"""Compactor: log compaction behind an engine fdatasync, and the engine's trickle sync.

Vocabulary: *compaction* is a replica's log (its WAL records) being cut at a point the engine holds
durably; *cleaning* is the engine's own segment space being reclaimed (storage/cleaner.py).

Rules:
1. Engine writes are not fsynced on the write path: the WAL is the durable record. A replica's WAL
   records are compacted only behind an engine fdatasync: a cycle notes every replica's compaction point
   (its applied index or seq, with its session table exactly there) in one loop turn, fdatasyncs the
   engine on its own thread (covering everything applied before the call; the loop keeps applying), then
   every replica compacts at its noted point. Replay from a compaction point rebuilds everything the
   engine may have lost; re-applying entries is harmless (replication/apply.py rule 1).
2. A cycle starts when the WAL grew by `wal_compact_bytes` since the last one (what recovery found counts
   as grown, so a node restarted on a large WAL compacts at once), and not before the fences are known
   (until the first map read, recovered replicas are not hosted and would be skipped).
   A node whose WAL has stopped growing (IDLE_SECONDS without an append) compacts once more, so what the
   last cycle could not cut yet (entries applied after it noted its points) does not stay until the
   next burst of writes (write-once: nor do the WAL segments it holds).
4. Compacted entries were the largest thing in memory; their memory goes back to the OS (malloc_trim) once
   the node is idle (IDLE_SECONDS without an append), not after every cycle: under load the next entries
   reuse it, where a trim after each cycle made every received payload land on fresh pages (280 page
   faults and ~650 us of kernel time per 1 MiB write on each follower, measured with bench/profile.py).
3. Trickle writeback: every `engine_sync_bytes` applied, the engine is fdatasynced on its thread (off the
   write path), so no compaction, checkpoint or page-cache limit later meets gigabytes of dirty engine
   data, which would stall the WAL's fdatasyncs on the same disk.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from raftblock.replication.replica import Replica
from raftblock.replication.wal import Wal
from raftblock.storage.engine import Engine

log = structlog.get_logger(__name__)

IDLE_SECONDS = 3


class CompactSettings(Protocol):
    engine_sync_bytes: int
    wal_compact_bytes: int


class CompactHost(Protocol):
    """What the compactor needs of its node (node/host.py NodeHost)."""

    wal: Wal
    engine: Engine
    counters: Counter[str]
    engine_executor: ThreadPoolExecutor
    fences_known: bool

    @property
    def cfg(self) -> CompactSettings: ...

    @property
    def replicas(self) -> Mapping[int, Replica]: ...

    @property
    def stopping(self) -> bool: ...

    def fail(self, e: BaseException) -> None: ...

    def kick(self) -> None: ...

    def trim_heap_soon(self) -> None: ...


class Compactor:
    def __init__(self, host: CompactHost) -> None:
        self.host = host
        self.running = False
        self._grown_from = -host.wal.total_bytes()  # rule 2: recovered bytes count as grown
        self._applied = 0
        self._engine_syncing = False
        self._seen_pos = -1  # the WAL's appended position at the last idle check
        self._idle = 0  # seconds it has not moved
        self._trim_due = False  # rule 4: a cycle compacted since the last trim

    # == rule 3 ==================================================================================================
    def applied(self, nbytes: int) -> None:
        self._applied += nbytes
        h = self.host
        if self._applied >= h.cfg.engine_sync_bytes and not self._engine_syncing and not h.stopping:
            self._engine_syncing = True
            self._applied = 0
            fut = asyncio.get_running_loop().run_in_executor(h.engine_executor, h.engine.sync)
            fut.add_done_callback(self._engine_synced)

    def _engine_synced(self, fut: asyncio.Future[int]) -> None:
        self._engine_syncing = False
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            self.host.fail(exc)  # an engine that cannot fdatasync cannot back a compaction either

    # == rules 1, 2 ==============================================================================================
    def maybe_start(self) -> None:
        h = self.host
        if self.running or h.stopping or not h.fences_known:
            return
        if h.wal.appended_pos - self._grown_from < h.cfg.wal_compact_bytes:
            return
        self.running = True
        asyncio.get_running_loop().create_task(self._cycle())

    def every_second(self) -> None:
        """Rule 2's idle cycle."""
        h = self.host
        pos = h.wal.appended_pos
        if pos != self._seen_pos:
            self._seen_pos = pos
            self._idle = 0
            return
        self._idle += 1
        if self._idle < IDLE_SECONDS or self.running or h.stopping:
            return
        # Something may be left to cut: more than the active segment (the last cycle may have noted its
        # points before the last entries were applied, so "appended since" is not the test).
        if self._idle == IDLE_SECONDS and h.wal.segment_count() > 1 and h.fences_known:
            self.running = True
            asyncio.get_running_loop().create_task(self._cycle())
        elif self._trim_due:
            self._trim_due = False
            h.trim_heap_soon()  # rule 4

    async def _cycle(self) -> None:
        h = self.host
        loop = asyncio.get_running_loop()
        try:
            self._grown_from = h.wal.appended_pos
            points = {gid: p for gid, r in h.replicas.items() if (p := r.compaction_point()) is not None}
            await loop.run_in_executor(h.engine_executor, h.engine.sync)
            done: dict[str, int] = {"raft": 0, "chain": 0}
            for gid, (point, sess, app) in points.items():
                r = h.replicas.get(gid)
                if r is not None and r.compact(point, sess, app):
                    done[r.kind] += 1
            h.counters["compactions"] += 1
            h.kick()  # the Raft replicas' COMPACT records go out with their next Ready (sync_idle syncs them)
            log.info("raft.compacted", groups=done["raft"], chain_groups=done["chain"],
                     wal_bytes=h.wal.total_bytes())
            self._trim_due = True  # rule 4: trimmed by the next idle second
        except Exception as e:
            h.fail(e)
        finally:
            self.running = False
