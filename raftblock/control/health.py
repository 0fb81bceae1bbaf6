# Failure detection: turns node heartbeats (kept in the metadata leader's memory) into up/suspect/down
# transitions (proposed to the metadata group). A core without I/O: time is passed in.
#
# Rules:
# 1. Heartbeats are never log entries. Only a change of a node's state is proposed, batched (at most
#    `transitions_per_proposal_max` per command), one proposal in flight at a time and at most one per
#    `proposal_interval_ms_min`: the metadata write rate stays bounded however many nodes flap.
# 2. A node is `suspect` once `suspect_after_missed` heartbeat intervals pass without a heartbeat, and
#    `down` once `down_grace_ms` pass; one heartbeat brings it back `up` (the state machine counts the return).
# 3. A new leader knows no heartbeat times: it starts every node's clock at its own start, so a leader
#    change never marks a live node down (the node has `down_grace_ms` to reach the new leader).
# 4. The target of a transition is computed against the committed state passed to `tick`, so a lost
#    proposal is simply found again on a later tick.
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from raftblock.replication.raft.types import NodeId


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_interval_ms: int = 500  # nodes send at this interval too (node config [meta] heartbeat_interval_ms)
    suspect_after_missed: int = 3
    down_grace_ms: int = 15_000
    proposal_interval_ms_min: int = 500
    transitions_per_proposal_max: int = 256

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms <= 0 or self.suspect_after_missed <= 0:
            raise ValueError("heartbeat_interval_ms and suspect_after_missed must be > 0")
        if self.down_grace_ms <= self.suspect_after_ms:
            raise ValueError(f"down_grace_ms ({self.down_grace_ms}) must exceed the suspect time "
                             f"({self.suspect_after_ms} ms = {self.suspect_after_missed} x heartbeat_interval_ms)")
        if self.transitions_per_proposal_max <= 0 or self.proposal_interval_ms_min < 0:
            raise ValueError("transitions_per_proposal_max > 0, proposal_interval_ms_min >= 0")

    @property
    def suspect_after_ms(self) -> int:
        return self.heartbeat_interval_ms * self.suspect_after_missed


@dataclass(frozen=True)
class Transition:
    node_id: NodeId
    state: str  # "up" | "suspect" | "down"
    last_heartbeat_ms: int


@dataclass(frozen=True)
class Liveness:
    """The leader's live view of one node (not replicated)."""

    node_id: NodeId
    last_heartbeat_ms: int
    heartbeats: int
    used_bytes: int | None
    target: str


class FailureDetector:
    """Lives on the metadata leader only; thrown away when it loses leadership."""

    def __init__(self, config: HealthConfig, now_ms: int) -> None:
        self.config = config
        self.started_ms = now_ms
        self._last: dict[NodeId, int] = {}
        self._seen: dict[NodeId, int] = {}  # when a node without heartbeats was first in the map (`tick`)
        self._ticked = False
        self._count: dict[NodeId, int] = {}
        self._used: dict[NodeId, int] = {}
        self._in_flight = False
        self._last_proposal_ms: int | None = None

    def heartbeat(self, node_id: NodeId, now_ms: int, used_bytes: int | None = None) -> None:
        self._last[node_id] = max(now_ms, self._last.get(node_id, now_ms))
        self._count[node_id] = self._count.get(node_id, 0) + 1
        if used_bytes is not None:
            self._used[node_id] = used_bytes

    def target(self, node_id: NodeId, now_ms: int) -> str:
        # A node never heard from: its clock starts when this detector started (rule 3), or, for a node
        # that registered later, when the detector first saw it in the map (`tick`): a node registered a
        # moment ago is not `down` before its first heartbeat could arrive.
        last = self._last.get(node_id)
        if last is None:
            last = self._seen.get(node_id, self.started_ms)
        silent_ms = now_ms - last
        if silent_ms >= self.config.down_grace_ms:
            return "down"
        if silent_ms >= self.config.suspect_after_ms:
            return "suspect"
        return "up"

    def tick(self, now_ms: int, committed: Mapping[NodeId, str]) -> list[Transition]:
        """The transitions to propose now (possibly none). Call `done()` when that proposal ends."""
        if self._in_flight:
            return []
        if (self._last_proposal_ms is not None
                and now_ms - self._last_proposal_ms < self.config.proposal_interval_ms_min):
            return []
        for nid in committed:
            if nid not in self._last and nid not in self._seen:
                self._seen[nid] = now_ms if self._ticked else self.started_ms
        self._ticked = True
        out: list[Transition] = []
        for nid in sorted(committed):
            want = self.target(nid, now_ms)
            if want != committed[nid]:
                out.append(Transition(nid, want, self._last.get(nid, 0)))
                if len(out) >= self.config.transitions_per_proposal_max:
                    break
        if out:
            self._in_flight = True
            self._last_proposal_ms = now_ms
        return out

    def done(self) -> None:
        """The proposal returned by the last `tick` committed or failed; failed ones are found again."""
        self._in_flight = False

    def view(self, now_ms: int, nodes: list[NodeId]) -> list[Liveness]:
        return [Liveness(n, self._last.get(n, 0), self._count.get(n, 0), self._used.get(n), self.target(n, now_ms))
                for n in sorted(nodes)]
