# The metadata group's durable storage, behind pysyncobj's seams: its Raft journal (`createJournal`), its
# term/vote, and the renames of its snapshot file (`atomicReplace`).
#
# Rules:
# 1. Nothing returns to pysyncobj before it is on disk: every append, truncation and rewrite of the log
#    is fdatasync'ed (and the directory fsync'ed after a create or rename) before the method returns, so
#    pysyncobj's acknowledgement (next_node_idx) and the leader's own count toward commit follow the sync.
#    pysyncobj's FileJournal writes through mmap and never syncs.
# 2. currentTerm and votedFor are written (tmp + fsync + rename + dir fsync) before `setCurrentTerm`
#    returns, i.e. before pysyncobj sends the vote or acts on the term. The commit index is only a hint
#    (saved at most once a second): a stale one is safe, it only delays applying after a restart.
# 3. Every record is framed and checksummed: u32 length | u32 crc32c(body) | body = u64 idx | u64 term |
#    command. On open, a bad or short record at the tail is a torn write and is cut off; a bad record
#    followed by more data is corruption and the journal refuses to open (JournalCorrupt).
# 4. pysyncobj's commands are its own pickles; we store them as opaque bytes and never unpickle them.
# 5. The state file is JSON (no pickle), with a crc32c over its body.
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import structlog
from pysyncobj.journal import Journal

log = structlog.get_logger(__name__)

MAGIC = b"RBMETA1\n"
_HEAD = struct.Struct("<II")  # body length, crc32c(body)
_IDX_TERM = struct.Struct("<QQ")
RECORD_BYTES_MAX = 64 << 20  # pysyncobj splits nothing below this; a bigger length is garbage


class JournalCorrupt(Exception):
    """A record in the middle of the journal fails its checksum: repair from a peer, do not guess."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str, dst: str) -> None:
    """rename(src, dst) that survives a power cut: the file's data first, then the directory entry.

    Installed as pysyncobj.serializer.atomicReplace (used for fullDumpFile and received snapshots)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def write_file_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _record(command: bytes, idx: int, term: int) -> bytes:
    body = _IDX_TERM.pack(idx, term) + command
    return _HEAD.pack(len(body), crc32c.crc32c(body)) + body


class JournalPath(str):
    """Marks a `journalFile` setting as ours: pysyncobj.syncobj.createJournal builds a DurableJournal."""


class DurableJournal(Journal):  # type: ignore[misc]
    """pysyncobj's Journal interface over an fsync'ed, checksummed file (`PATH`) and state file (`PATH.state`)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state")
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._state: dict[str, Any] = self._read_state()
        self._state_dirty = False
        self.fsyncs = 0  # syncs issued (a test hook and a cheap metric)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if created or os.fstat(self._fd).st_size == 0:
            os.write(self._fd, MAGIC)
            self._sync()
            fsync_dir(self.path.parent)
        self._end = self._load()

    # -- loading --------------------------------------------------------------------------------------

    def _load(self) -> int:
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        if data[: len(MAGIC)] != MAGIC:
            raise JournalCorrupt(f"{self.path}: not a raftblock metadata journal (bad magic)")
        off = len(MAGIC)
        for rec_off, body in self._records(data, off):
            idx, term = _IDX_TERM.unpack_from(body)
            if self._entries and idx != self._entries[-1][1] + 1:
                raise JournalCorrupt(f"{self.path}: index {idx} after {self._entries[-1][1]} at offset {rec_off}")
            self._entries.append((bytes(body[_IDX_TERM.size:]), idx, term))
            self._offsets.append(rec_off)
            off = rec_off + _HEAD.size + len(body)
        if off < len(data):
            log.warning("meta_journal_torn_tail", path=str(self.path), offset=off, bytes_cut=len(data) - off)
            os.ftruncate(self._fd, off)
            self._sync()
        return off

    def _records(self, data: bytes, off: int) -> Iterator[tuple[int, bytes]]:
        while off + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, off)
            end = off + _HEAD.size + length
            if length < _IDX_TERM.size or length > RECORD_BYTES_MAX or end > len(data):
                return  # short or garbage header at the tail: torn
            body = data[off + _HEAD.size:end]
            if crc32c.crc32c(body) != crc:
                if end < len(data) and any(data[end:]):
                    raise JournalCorrupt(f"{self.path}: checksum mismatch in the record at offset {off}, "
                                         f"{len(data) - end} bytes follow it")
                return  # the last record, torn
            yield off, body
            off = end

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {"term": 0, "voted_for": None, "commit_index": 1}
        doc = json.loads(raw)
        body = json.dumps(doc["body"], sort_keys=True, separators=(",", ":")).encode()
        if crc32c.crc32c(body) != doc["crc32c"]:
            raise JournalCorrupt(f"{self.state_path}: checksum mismatch")
        return dict(doc["body"])

    # -- durability -----------------------------------------------------------------------------------

    def _sync(self) -> None:
        os.fdatasync(self._fd)
        self.fsyncs += 1

    def _write_state(self) -> None:
        body = json.dumps(self._state, sort_keys=True, separators=(",", ":")).encode()
        doc = {"body": self._state, "crc32c": crc32c.crc32c(body)}
        write_file_durably(self.state_path, json.dumps(doc, sort_keys=True).encode())
        self.fsyncs += 1
        self._state_dirty = False

    # -- pysyncobj's Journal interface -----------------------------------------------------------------

    def add(self, command: bytes | str, idx: int, term: int) -> None:
        cmd = command if isinstance(command, bytes) else command.encode()
        if self._entries:
            assert idx == self._entries[-1][1] + 1, (idx, self._entries[-1][1])
        rec = _record(cmd, idx, term)
        os.pwrite(self._fd, rec, self._end)
        self._sync()
        self._entries.append((cmd, idx, term))
        self._offsets.append(self._end)
        self._end += len(rec)

    def clear(self) -> None:
        self._truncate_to(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        self._truncate_to(entryFrom)

    def _truncate_to(self, count: int) -> None:
        if count >= len(self._entries):
            return
        end = self._offsets[count] if count > 0 else len(MAGIC)
        os.ftruncate(self._fd, end)
        self._sync()
        del self._entries[count:]
        del self._offsets[count:]
        self._end = end

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drop the first `entryTo` entries (after a snapshot): rewrite to a new file and rename it in."""
        keep = self._entries[entryTo:]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        offsets = []
        buf = bytearray(MAGIC)
        for cmd, idx, term in keep:
            offsets.append(len(buf))
            buf += _record(cmd, idx, term)
        os.write(fd, bytes(buf))
        os.fdatasync(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.path.parent)
        self.fsyncs += 2
        os.close(self._fd)
        self._fd = fd
        self._entries = list(keep)
        self._offsets = offsets
        self._end = len(buf)

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        if self._state_dirty:
            self._write_state()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        if raftCommitIndex != self._state["commit_index"]:
            self._state["commit_index"] = raftCommitIndex
            self._state_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return int(self._state.get("commit_index", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802, N803
        if self._state["term"] == term and self._state["voted_for"] == votedForNodeId:
            return
        self._state["term"] = term
        self._state["voted_for"] = votedForNodeId
        self._write_state()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return int(self._state["term"])

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        v = self._state["voted_for"]
        return None if v is None else str(v)

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._state_dirty:
            self._write_state()
