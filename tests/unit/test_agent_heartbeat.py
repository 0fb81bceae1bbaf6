# MetaAgent's heartbeats travel on their own thread (node/agent.py rule 2; issue 13, item 4).
#
# Enforces: heartbeats go on while the node's event loop is busy (bulk work in long turns), stop while the
# loop is wedged beyond `loop_stall_max_s`, and resume when it turns again; the loop publishes the report
# (used bytes, chain and Raft reports) and a report is sent once; a chain lease from the reply reaches the
# runtime on the loop. Timing margins are wide (a loaded 2-core machine).
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

from raftblock.meta.rpc import MetaClient
from raftblock.node.agent import MetaAgent
from raftblock.node.host import NodeHost

INTERVAL_S = 0.1
STALL_MAX_S = 0.4


class _Engine:
    def stats(self) -> dict[str, int]:
        return {"live_bytes": 7 << 20}


class _Runtime:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.engine = _Engine()
        self.leases: list[tuple[float, dict[int, int], str]] = []

    def report(self) -> tuple[dict[int, list[int]] | None, dict[int, list[int]]]:
        return None, {5: [1, 7, 1, 2, 3]}

    def grant_chain_lease(self, until: float, epochs: dict[int, int]) -> None:
        self.leases.append((until, epochs, threading.current_thread().name))


class _BeatClient:
    """Records every heartbeat: (monotonic time, used bytes, raft report, thread name)."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, int | None, Any, str]] = []

    async def heartbeat(self, node_id: int, used: int | None, chains: Any, raft: Any) -> tuple[int, dict[int, int]]:
        self.beats.append((time.monotonic(), used, raft, threading.current_thread().name))
        return 1000, {9: 2}


def _agent() -> tuple[MetaAgent, _Runtime, _BeatClient]:
    rt, bc = _Runtime(), _BeatClient()
    agent = MetaAgent(cast(MetaClient, object()), cast(NodeHost, rt), 3, "r0", "127.0.0.1:1", Path("."),
                      interval_s=INTERVAL_S, loop_stall_max_s=STALL_MAX_S, beat_client=cast(MetaClient, bc))
    agent.registered = True
    return agent, rt, bc


def _between(bc: _BeatClient, a: float, b: float) -> int:
    return sum(1 for t, *_ in bc.beats if a <= t <= b)


def test_heartbeats_go_on_while_the_loop_is_busy_and_stop_while_it_is_wedged() -> None:
    agent, rt, bc = _agent()

    async def scenario() -> dict[str, Any]:
        agent.start_beating()
        try:
            await asyncio.sleep(0.6)  # idle loop: beats every interval
            out: dict[str, Any] = {"idle": len(bc.beats)}
            # Busy: turns of 0.15 s (bulk work in long slices) for 1.5 s: the loop pulses between them.
            t0 = time.monotonic()
            while time.monotonic() < t0 + 1.5:
                time.sleep(0.15)  # the loop thread is held, as by a long slice of work
                await asyncio.sleep(0)
            out["busy"] = (t0, time.monotonic())
            await asyncio.sleep(0.3)
            # Wedged: one turn of 2 s. Heartbeats stop once the last pulse is older than STALL_MAX_S.
            t1 = time.monotonic()
            time.sleep(2.0)
            out["wedged"] = (t1, time.monotonic())
            await asyncio.sleep(0.6)  # turning again: heartbeats resume
            out["end"] = time.monotonic()
            return out
        finally:
            await agent.stop_beating()

    out = asyncio.run(scenario())
    assert out["idle"] >= 3, bc.beats
    a, b = out["busy"]
    assert _between(bc, a, b) >= 0.5 * (b - a) / INTERVAL_S, f"busy loop: {_between(bc, a, b)} beats in {b - a:.1f} s"
    a, b = out["wedged"]
    # After the bound (plus one interval and slack for a late thread), nothing until the loop turns again.
    assert _between(bc, a + STALL_MAX_S + INTERVAL_S + 0.3, b) == 0, [t - a for t, *_ in bc.beats if t >= a]
    assert agent.beats_withheld >= 5
    assert _between(bc, b + 0.2, out["end"]) >= 1, "heartbeats resume when the loop turns again"
    assert rt.counters["loop_stalls"] >= 1 and rt.counters["loop_stall_max_ms"] >= 1500, rt.counters
    # Every heartbeat left from the thread; the loop's report went with some, each report once at most.
    assert {name for *_, name in bc.beats} == {"heartbeat-n3"}
    with_report = [b for b in bc.beats if b[1] is not None]
    assert with_report and all(b[1] == 7 << 20 and b[2] == {5: [1, 7, 1, 2, 3]} for b in with_report)
    assert len(with_report) <= len(bc.beats)
    # The lease of each reply was granted on the loop's thread, from the time before the heartbeat left.
    assert rt.leases and {name for *_, name in rt.leases} == {threading.main_thread().name}
    assert all(epochs == {9: 2} for _, epochs, _ in rt.leases)


def test_no_heartbeat_before_registration() -> None:
    agent, _rt, bc = _agent()
    agent.registered = False

    async def scenario() -> None:
        agent.start_beating()
        try:
            await asyncio.sleep(0.5)
            assert not bc.beats
            agent.registered = True
            await asyncio.sleep(0.5)
        finally:
            await agent.stop_beating()

    asyncio.run(scenario())
    assert bc.beats
