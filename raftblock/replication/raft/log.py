# RaftLog: the core's in-memory view of one group's log (entries after the last snapshot).
#
# Rules:
# 1. Indexes are contiguous: entry k of `_ents` has index `snap_index + 1 + k`. `term(snap_index)` is the
#    snapshot's term; anything below is compacted and answers None.
# 2. `unstable_from` is the first index not yet known durable. Every entry at or after it goes into the
#    next Ready; truncating the log moves it back so the storage rewrites the new suffix.
# 3. `committed` never decreases; `applied <= committed`; compaction only drops durable, applied entries.
# 4. No I/O: the durable copy lives behind the Storage interface, written by the runtime from Ready.
from __future__ import annotations

from .types import Entry, SnapshotMeta


class RaftLog:
    __slots__ = ("snap_index", "snap_term", "_ents", "committed", "applied", "unstable_from")

    def __init__(
        self, snap_index: int, snap_term: int, entries: list[Entry], committed: int, applied: int
    ) -> None:
        self.snap_index = snap_index
        self.snap_term = snap_term
        self._ents: list[Entry] = list(entries)
        for k, e in enumerate(self._ents):
            assert e.index == snap_index + 1 + k, f"entries not contiguous at {e.index}"
        self.committed = max(committed, snap_index)
        assert self.committed <= self.last_index(), "commit index beyond the durable log"
        self.applied = max(applied, snap_index)
        assert self.applied <= self.committed
        self.unstable_from = self.last_index() + 1  # what we loaded is durable

    # -- queries -----------------------------------------------------------------------------------------
    def first_index(self) -> int:
        return self.snap_index + 1

    def last_index(self) -> int:
        return self.snap_index + len(self._ents)

    def last_term(self) -> int:
        return self._ents[-1].term if self._ents else self.snap_term

    def term(self, index: int) -> int | None:
        off = index - self.snap_index
        if off == 0:
            return self.snap_term
        if off < 0 or off > len(self._ents):
            return None
        return self._ents[off - 1].term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        return self._ents[index - self.snap_index - 1]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries [lo, hi); lo must not be compacted."""
        base = self.snap_index + 1
        assert lo >= base, f"slice({lo}) below first index {base}"
        return self._ents[lo - base : hi - base]

    def slice_bounded(self, lo: int, bytes_max: int, count_max: int) -> list[Entry]:
        """Entries from lo, at most count_max and bytes_max (but at least one if any exist)."""
        base = self.snap_index + 1
        out = self._ents[lo - base : lo - base + count_max]
        total = 0
        for k, e in enumerate(out):
            total += e.size_bytes()
            if total > bytes_max and k > 0:
                return out[:k]
        return out

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1 election restriction: the candidate's log is at least as up-to-date as ours."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    def unstable_entries(self) -> list[Entry]:
        if self.unstable_from > self.last_index():
            return []
        return self._ents[self.unstable_from - self.snap_index - 1 :]

    def stable_last(self) -> int:
        return self.unstable_from - 1

    def has_unapplied(self) -> bool:
        return self.applied < self.committed

    # -- mutations ---------------------------------------------------------------------------------------
    def append(self, entries: list[Entry]) -> None:
        """Leader append: indexes continue the log."""
        if entries:
            assert entries[0].index == self.last_index() + 1
            self._ents.extend(entries)

    def find_conflict(self, entries: list[Entry]) -> int:
        """First index where `entries` disagree with the log (or run past its end); 0 if none."""
        for e in entries:
            t = self.term(e.index)
            if t is None:
                if e.index <= self.snap_index:
                    continue  # compacted, hence committed, hence matching (log matching, §5.3)
                return e.index
            if t != e.term:
                return e.index
        return 0

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: list[Entry], check: bool
    ) -> int:
        """Follower side of AppendEntries. Returns the last index known to match, or -1 on mismatch.

        `check=False` is only for the planted "skip log matching" bug of the mutation test.
        """
        if prev_index > self.last_index():
            return -1
        if check and prev_index >= self.snap_index and not self.match_term(prev_index, prev_term):
            return -1
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, f"conflict at {conflict} <= committed {self.committed}"
            self.truncate_and_append(entries[conflict - prev_index - 1 :])
        self.commit_to(min(commit, last_new))
        return last_new

    def truncate_and_append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        assert first > self.snap_index
        del self._ents[first - self.snap_index - 1 :]
        self._ents.extend(entries)
        if first < self.unstable_from:
            self.unstable_from = first

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), f"commit {index} beyond last {self.last_index()}"
            self.committed = index

    def stable_to(self, index: int, term: int) -> None:
        """The entries up to `index` (with the given term at `index`) are durable now."""
        if index >= self.unstable_from and self.term(index) == term:
            self.unstable_from = index + 1

    def restore(self, meta: SnapshotMeta) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.snap_index = meta.index
        self.snap_term = meta.term
        self._ents = []
        self.committed = meta.index
        self.unstable_from = meta.index + 1

    def compact(self, index: int) -> None:
        """Drop entries up to `index` (applied and durable) behind a local snapshot."""
        assert self.snap_index < index <= self.applied and index < self.unstable_from
        t = self.term(index)
        assert t is not None
        del self._ents[: index - self.snap_index]
        self.snap_index = index
        self.snap_term = t
