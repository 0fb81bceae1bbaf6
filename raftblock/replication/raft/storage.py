# Storage: the durable side of one group's Raft state, written by the runtime from each Ready.
#
# Rules:
# 1. The core reads storage once, at construction (`load`), and asks it for the latest snapshot image
#    when a follower needs one; everything else it keeps in memory (RaftLog).
# 2. The runtime writes, in this order, from one Ready: the received snapshot (`install_snapshot`), the
#    entries (`append`: replaces any suffix from the first new index), the hard state
#    (`set_hard_state`), the local compaction (`compact`). A crash may keep a prefix of that sequence
#    (a torn write); it must never keep a later item without the earlier ones.
# 3. MemoryStorage is the simulator's durable disk; the node runtime backs the same interface by the
#    shared write-ahead log.
from __future__ import annotations

from typing import Protocol

from .types import ConfState, Entry, HardState, NodeId, Snapshot, SnapshotMeta


class Storage(Protocol):
    def load(self) -> tuple[HardState, Snapshot, list[Entry]]: ...

    def snapshot(self) -> Snapshot: ...

    def install_snapshot(self, snap: Snapshot) -> None: ...

    def append(self, entries: list[Entry]) -> None: ...

    def set_hard_state(self, hs: HardState) -> None: ...

    def compact(self, snap: Snapshot) -> None: ...


def bootstrap_snapshot(voters: frozenset[NodeId], epoch: int = 0) -> Snapshot:
    """The initial image of a new group: index 0, term 0, the founding voters."""
    return Snapshot(SnapshotMeta(0, 0, ConfState(voters, epoch)), b"")


class MemoryStorage:
    """In-memory durable state (the simulator's disk; it survives a simulated crash)."""

    __slots__ = ("hard_state", "snap", "entries")

    def __init__(self, snap: Snapshot | None = None) -> None:
        self.hard_state = HardState()
        self.snap = snap if snap is not None else bootstrap_snapshot(frozenset())
        self.entries: list[Entry] = []

    def load(self) -> tuple[HardState, Snapshot, list[Entry]]:
        hs = self.hard_state
        return HardState(hs.term, hs.vote, hs.commit), self.snap, list(self.entries)

    def snapshot(self) -> Snapshot:
        return self.snap

    def last_index(self) -> int:
        return self.snap.meta.index + len(self.entries)

    def term(self, index: int) -> int | None:
        off = index - self.snap.meta.index
        if off == 0:
            return self.snap.meta.term
        if off < 0 or off > len(self.entries):
            return None
        return self.entries[off - 1].term

    def install_snapshot(self, snap: Snapshot) -> None:
        self.snap = snap
        self.entries = []

    def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        first = entries[0].index
        base = self.snap.meta.index + 1
        assert base <= first <= self.last_index() + 1, f"append at {first} leaves a gap (log {base}..)"
        del self.entries[first - base :]
        self.entries.extend(entries)

    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def compact(self, snap: Snapshot) -> None:
        idx = snap.meta.index
        if idx <= self.snap.meta.index:
            return
        assert idx <= self.last_index()
        del self.entries[: idx - self.snap.meta.index]
        self.snap = snap
