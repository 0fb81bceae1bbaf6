# Progress: the leader's view of one follower (etcd-io/raft's tracker.Progress, trimmed).
#
# Rules:
# 1. PROBE: one AppendEntries in flight until an answer (or a heartbeat answer) arrives; used after a
#    rejection or when the follower's position is unknown.
#    REPLICATE: optimistic pipelining; `next` runs ahead of `match`; at most `inflight_max` appends
#    in flight (the `inflight` deque holds the last index of each).
#    SNAPSHOT: the follower needs a snapshot; chunks stream with at most `inflight_max` unacknowledged.
# 2. `match` only grows from durable acknowledgements; `next > match` always.
# 3. Lease and read-index bookkeeping (`lease_ack_tick`, `read_ack_seq`) are volatile leader state.
from __future__ import annotations

from collections import deque
from enum import IntEnum

from .types import Snapshot


class ProgressState(IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


NEVER = -(1 << 62)


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflight",
        "recent_active",
        "pending_snapshot",
        "snap",
        "snap_sent",
        "snap_acked",
        "snap_stall_ticks",
        "lease_ack_tick",
        "read_ack_seq",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()
        self.recent_active = False
        self.pending_snapshot = 0
        self.snap: Snapshot | None = None
        self.snap_sent = 0  # next chunk to send
        self.snap_acked = 0  # chunks the follower holds (in memory)
        self.snap_stall_ticks = 0
        self.lease_ack_tick = NEVER
        self.read_ack_seq = 0

    def is_paused(self, inflight_max: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return len(self.inflight) >= inflight_max
        return True

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self._reset(ProgressState.PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(ProgressState.REPLICATE)

    def become_snapshot(self, snap: Snapshot) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.pending_snapshot = snap.meta.index
        self.snap = snap

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0
        self.snap = None
        self.snap_sent = 0
        self.snap_acked = 0
        self.snap_stall_ticks = 0

    def maybe_update(self, index: int) -> bool:
        """A durable ack up to `index`; True if `match` grew."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        if self.next < index + 1:
            self.next = index + 1
        return updated

    def free_inflight_to(self, index: int) -> None:
        q = self.inflight
        while q and q[0] <= index:
            q.popleft()

    def maybe_decr_to(self, rejected: int, hint: int) -> bool:
        """The follower refused an append whose previous index was `rejected`; `hint` is its guess."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale answer
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # answer to an older probe
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.probe_sent = False
        return True
