"""Failure detection (raftblock/control/health.py) on a fake clock: suspect after 3 missed heartbeat
intervals, down after the grace period, up again on one heartbeat; heartbeats are never proposed, only
transitions, batched, one proposal in flight, rate-limited."""

from __future__ import annotations

import pytest

from raftblock.control.health import FailureDetector, HealthConfig, Transition
from raftblock.meta.state import MetaState, RegisterNode, SetNodeStates, StateChange
from raftblock.replication.raft.types import NodeId

CFG = HealthConfig(heartbeat_interval_ms=100, suspect_after_missed=3, down_grace_ms=1000,
                   proposal_interval_ms_min=50)
A, B = NodeId(1), NodeId(2)


class Harness:
    """The leader's loop in miniature: the detector proposes, a MetaState commits."""

    def __init__(self, cfg: HealthConfig = CFG) -> None:
        self.state = MetaState()
        for n in (A, B):
            self.state.apply(RegisterNode(int(n), f"r{n}", f"h:{n}", 1, 0))
        self.det = FailureDetector(cfg, now_ms=0)
        self.proposals: list[list[Transition]] = []

    def committed(self) -> dict[NodeId, str]:
        return {n: r.state for n, r in self.state.nodes.items()}

    def tick(self, now: int) -> list[Transition]:
        changes = self.det.tick(now, self.committed())
        if changes:
            self.proposals.append(changes)
            self.state.apply(SetNodeStates(tuple(StateChange(c.node_id, c.state, c.last_heartbeat_ms)
                                                 for c in changes), now))
            self.det.done()
        return changes

    def run(self, start: int, end: int, step: int = 10, beating: tuple[NodeId, ...] = (A, B)) -> None:
        for t in range(start, end, step):
            for n in beating:
                if t % CFG.heartbeat_interval_ms == 0:
                    self.det.heartbeat(n, t)
            self.tick(t)


def test_suspect_after_three_missed_then_down_then_back_up() -> None:
    h = Harness()
    h.run(0, 1000)
    assert h.proposals == []  # steady heartbeats: no writes at all
    h.run(1000, 1200, beating=(B,))  # A's last heartbeat was at 900
    assert h.state.nodes[A].state == "up"
    h.run(1200, 1210, beating=(B,))
    assert h.state.nodes[A].state == "suspect"  # 900 + 3 x 100 = 1200
    h.run(1210, 1890, beating=(B,))
    assert h.state.nodes[A].state == "suspect"
    h.run(1890, 1920, beating=(B,))
    assert h.state.nodes[A].state == "down"  # 900 + 1000 = 1900
    assert h.state.nodes[B].state == "up"
    h.det.heartbeat(A, 2000)
    h.tick(2000)
    assert h.state.nodes[A].state == "up" and h.state.nodes[A].returns == 1
    assert h.state.nodes[A].last_heartbeat_ms == 2000
    assert [[(c.node_id, c.state) for c in p] for p in h.proposals] == [[(A, "suspect")], [(A, "down")], [(A, "up")]]


def test_new_leader_gives_everyone_the_grace_from_its_start() -> None:
    det = FailureDetector(CFG, now_ms=50_000)
    committed = {A: "up", B: "up"}
    assert det.tick(50_250, committed) == []
    det.heartbeat(A, 50_290)
    assert [(c.node_id, c.state) for c in det.tick(50_310, committed)] == [(B, "suspect")]


def test_one_proposal_in_flight_and_rate_limited() -> None:
    det = FailureDetector(CFG, now_ms=0)
    committed = {A: "up", B: "up"}
    first = det.tick(400, committed)
    assert [(c.node_id, c.state) for c in first] == [(A, "suspect"), (B, "suspect")]  # batched
    assert det.tick(420, committed) == []  # still in flight
    det.done()  # it failed: nothing committed
    assert det.tick(440, committed) == []  # at most one proposal per 50 ms
    assert [c.state for c in det.tick(450, committed)] == ["suspect", "suspect"]  # found again
    det.done()
    assert [c.state for c in det.tick(1000, committed)] == ["down", "down"]


def test_batches_are_bounded() -> None:
    cfg = HealthConfig(heartbeat_interval_ms=100, down_grace_ms=1000, transitions_per_proposal_max=2)
    det = FailureDetector(cfg, now_ms=0)
    committed = {NodeId(i): "up" for i in range(1, 6)}
    assert len(det.tick(500, committed)) == 2


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="down_grace_ms"):
        HealthConfig(heartbeat_interval_ms=1000, suspect_after_missed=3, down_grace_ms=2000)


def test_view_reports_liveness() -> None:
    det = FailureDetector(CFG, now_ms=0)
    det.heartbeat(A, 10, used_bytes=123)
    v = det.view(20, [A, B])
    assert (v[0].node_id, v[0].heartbeats, v[0].used_bytes, v[0].target) == (A, 1, 123, "up")


def test_a_node_registered_later_gets_its_grace_from_when_the_detector_first_sees_it() -> None:
    """Issue 14 re-read: `node add` showed the new node `down` for half a second (its clock had started
    with the leader's, long before it registered)."""
    h = Harness()
    h.run(0, 5000)  # the leader has run for 5 s, A and B beating
    h.state.apply(RegisterNode(3, "r3", "h:3", 1, 5000))
    h.run(5000, 5200)  # node 3 registered, no heartbeat yet: within its grace
    assert h.state.nodes[NodeId(3)].state == "up", h.proposals
    h.run(5200, 5310)  # still silent past 3 intervals from when it was first seen: suspect, never down first
    assert h.state.nodes[NodeId(3)].state == "suspect"
    assert all(c.state != "down" for p in h.proposals for c in p if c.node_id == NodeId(3))
