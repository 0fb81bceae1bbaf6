"""The metadata journal (raftblock/meta/journal.py): what pysyncobj appends is on disk (fdatasync) before
`add` returns, which pysyncobj's own FileJournal never does; term/vote are fsync'ed before
`setCurrentTerm` returns; the file is framed and checksummed, a torn tail is cut, corruption refuses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from raftblock.meta.journal import MAGIC, DurableJournal, JournalCorrupt


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every fsync/fdatasync issued by this process while the test runs, by kind."""
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield calls


def test_every_append_is_synced_before_add_returns_stock_is_not(tmp_path: Path, syncs: list[str]) -> None:
    j = DurableJournal(str(tmp_path / "raft.log"))
    syncs.clear()
    for i in range(1, 6):
        before = len(syncs)
        j.add(b"cmd%d" % i, i, 1)
        assert len(syncs) == before + 1  # the sync happened inside add, before pysyncobj continues
    j.deleteEntriesFrom(3)
    j.deleteEntriesTo(1)
    j.clear()
    assert len(syncs) >= 5 + 3
    before = len(syncs)
    j.setCurrentTerm(4, "127.0.0.1:1")
    assert len(syncs) >= before + 2  # the state file and its directory
    j._destroy()

    # pysyncobj 0.3.17's FileJournal: mmap writes and a meta file, not one sync
    syncs.clear()
    stock = FileJournal(str(tmp_path / "stock.log"))
    for i in range(1, 6):
        stock.add(b"cmd%d" % i, i, 1)
    stock.setCurrentTerm(4, "127.0.0.1:1")
    stock.deleteEntriesFrom(2)
    stock._destroy()
    assert syncs == []


def test_reopen_restores_entries_term_and_vote(tmp_path: Path) -> None:
    p = str(tmp_path / "raft.log")
    j = DurableJournal(p)
    for i in range(1, 11):
        j.add(b"x" * i, i, 1 + i // 5)
    j.deleteEntriesFrom(8)  # keeps entries 1..8
    j.deleteEntriesTo(2)  # drops entries 1..2 (after a snapshot)
    j.setCurrentTerm(7, "127.0.0.1:2")
    j.setRaftCommitIndex(6)
    j._destroy()
    k = DurableJournal(p)
    assert [e[1] for e in k] == list(range(3, 9))
    assert k[0] == (b"xxx", 3, 1)
    assert (k.getCurrentTerm(), k.getVotedForNodeId(), k.getRaftCommitIndex()) == (7, "127.0.0.1:2", 6)
    k._destroy()


def test_torn_tail_is_cut_corruption_in_the_middle_refuses(tmp_path: Path) -> None:
    p = tmp_path / "raft.log"
    j = DurableJournal(str(p))
    for i in range(1, 5):
        j.add(b"entry-%d" % i, i, 1)
    j._destroy()
    good = p.read_bytes()
    # a torn append: half a record at the end
    p.write_bytes(good + good[len(MAGIC):len(MAGIC) + 20])
    k = DurableJournal(str(p))
    assert len(k) == 4 and p.read_bytes() == good
    k.add(b"entry-5", 5, 1)  # and it appends after the cut
    k._destroy()
    # a flipped byte inside the second record, with records after it: corruption, not a torn tail
    data = bytearray(p.read_bytes())
    rec = len(MAGIC) + 8 + 16 + len(b"entry-1")
    data[rec + 8 + 16] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="checksum"):
        DurableJournal(str(p))
