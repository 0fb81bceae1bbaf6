"""Ticker: the node's logical clock for its replicas, one tick per `tick_ms` of monotonic time.

Rules:
1. Ticks follow the monotonic clock, not the timer: a turn that ran late, or a process that was stopped
   (SIGSTOP), catches up all due ticks at once (at most `catch_up_ticks_max`), so a leader that was
   stopped sees its lease expire before it serves a read (`catch_up` runs before every read barrier).
2. Every BALANCE_EVERY_TICKS (a second at 100 ms): Raft leaders hand leadership to their preferred leader
   and carry the map's membership out, a compaction cycle starts if the WAL grew enough (also on an idle
   node: a restart on a large WAL), and pending compaction points are synced (GroupCommit.sync_idle).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

from raftblock.replication.replica import Replica

BALANCE_EVERY_TICKS = 10


class TickSettings(Protocol):
    tick_ms: int
    catch_up_ticks_max: int


class TickHost(Protocol):
    """What the ticker needs of its node (node/host.py NodeHost)."""

    dirty: set[int]

    @property
    def cfg(self) -> TickSettings: ...

    @property
    def replicas(self) -> Mapping[int, Replica]: ...

    def kick(self) -> None: ...

    def every_second(self) -> None: ...


class Ticker:
    def __init__(self, host: TickHost) -> None:
        self.host = host
        self.done = 0  # ticks handed to the replicas so far
        self.t0 = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def tick_at(self, monotonic: float) -> int:
        return int((monotonic - self.t0) * 1000.0 / self.host.cfg.tick_ms)

    def _schedule(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.host.cfg.tick_ms / 1000.0, self._on_tick)

    def _on_tick(self) -> None:
        self.catch_up()
        if self.done % BALANCE_EVERY_TICKS == 0:
            self.host.every_second()
        self._schedule()

    def catch_up(self) -> None:
        """Rule 1."""
        h = self.host
        due = self.tick_at(time.monotonic())
        n = min(due - self.done, h.cfg.catch_up_ticks_max)
        if n <= 0:
            return
        self.done = due
        for r in h.replicas.values():
            r.tick(n, due)
        h.dirty.update(h.replicas)
        h.kick()
