# The tagged-write journal and its judge: what a crash or a failover may and may not do to a volume.
#
# The writer (tests/integration/clients/nbd_tagged_writer.py, run with the system python3 that has libnbd)
# writes tagged 4 KiB blocks and journals every request it sends (S), acknowledgement (A) and failure (X).
# `judge` reads the volume image afterwards: every block must hold its newest acknowledged write or a later
# one that was in flight, never a torn block, garbage, or a write that never targeted it. Used by the
# power-cut and failover tests and by `make bench-compare` (lost-write verifier after each kill).
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 4096
CHECK = 0x5A5A5A5A5A5A5A5A
RECORD = 32


@dataclass
class Journal:
    writes: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # seq -> (first block, nblocks, fua)
    flushes: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    ends: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Journal:
        j = cls()
        for line in path.read_text().splitlines():
            f = line.split()
            if not f:
                continue
            if f[0] == "S" and f[1] == "W":
                j.writes[int(f[2])] = (int(f[3]), int(f[4]), f[5] == "1")
            elif f[0] == "S" and f[1] == "F":
                j.flushes.add(int(f[2]))
            elif f[0] == "A":
                j.acked.add(int(f[1]))
            elif f[0] == "X":
                j.failed.add(int(f[1]))
            elif f[0] == "END":
                j.ends.append(line[4:])
        return j

    def max_seq(self) -> int:
        return max([0, *self.writes, *self.flushes])


def count_acks(path: Path) -> int:
    """Acknowledged requests in a journal so far (the writer appends as it goes)."""
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("A "))
    except FileNotFoundError:
        return 0


def _tag(blk: bytes, b: int) -> tuple[int, str]:
    """(the write's sequence number, "") for a well-formed tagged block `b`; else (0, the problem)."""
    rec = blk[:RECORD]
    magic, seq, block, check = (rec[:8], int.from_bytes(rec[8:16], "big"),
                                int.from_bytes(rec[16:24], "big"), int.from_bytes(rec[24:32], "big"))
    if blk != rec * (BLOCK // RECORD):
        return 0, f"block {b}: torn (more than one record or partial zeroes inside the block)"
    if magic != b"PWRCUT01" or check != seq ^ block ^ CHECK or block != b:
        return 0, f"block {b}: garbage record {rec.hex()}"
    return seq, ""


def judge(data: bytes, j: Journal, nblocks: int) -> list[str]:
    """Problems with the volume image `data` given the journal; empty means the crash was survived."""
    submitted: dict[int, set[int]] = defaultdict(set)
    newest_acked: dict[int, int] = {}
    for seq, (first, n, _) in j.writes.items():
        for b in range(first, first + n):
            submitted[b].add(seq)
            if seq in j.acked and seq > newest_acked.get(b, -1):
                newest_acked[b] = seq
    problems = []
    for b in range(nblocks):
        blk = data[b * BLOCK:(b + 1) * BLOCK]
        holds: int | None = None
        if blk != bytes(BLOCK):
            seq, bad = _tag(blk, b)
            if bad:
                problems.append(bad)
                continue
            if seq not in submitted[b]:
                problems.append(f"block {b}: holds write {seq}, which never targeted this block")
                continue
            holds = seq
        want = newest_acked.get(b)
        if want is not None:
            if holds is None:
                problems.append(f"block {b}: acknowledged write {want} lost (block reads as zeroes)")
            elif holds < want:
                problems.append(f"block {b}: acknowledged write {want} lost (holds older write {holds})")
    return problems


def judge_cut(data: bytes, journal_text: str, started_at: int, returned_at: int, nblocks: int) -> list[str]:
    """Problems with snapshot image `data` of a volume the tagged writer was writing while the snapshot was
    taken. `started_at`/`returned_at`: the journal's length (bytes) when the snapshot command started and when
    it returned. The cut is right iff every block holds a write the host issued before the command returned
    (its `S W` line lies before `returned_at`: the writer logs it before sending), and no older write than
    the newest one acknowledged before the command started (its `A` line lies before `started_at`)."""
    def lines(upto: int) -> list[list[str]]:
        text = journal_text[:upto]
        return [ln.split() for ln in text[: text.rfind("\n") + 1].splitlines()]

    issued: dict[int, set[int]] = defaultdict(set)
    writes: dict[int, tuple[int, int]] = {}
    for f in lines(returned_at):
        if len(f) >= 5 and f[0] == "S" and f[1] == "W":
            seq, first, n = int(f[2]), int(f[3]), int(f[4])
            writes[seq] = (first, n)
            for b in range(first, first + n):
                issued[b].add(seq)
    newest_acked: dict[int, int] = {}
    for f in lines(started_at):
        if len(f) == 2 and f[0] == "A" and int(f[1]) in writes:
            first, n = writes[int(f[1])]
            for b in range(first, first + n):
                newest_acked[b] = max(newest_acked.get(b, -1), int(f[1]))
    problems = []
    for b in range(nblocks):
        blk = data[b * BLOCK:(b + 1) * BLOCK]
        holds: int | None = None
        if blk != bytes(BLOCK):
            seq, bad = _tag(blk, b)
            if bad:
                problems.append(bad)
                continue
            if seq not in issued[b]:
                problems.append(f"block {b}: holds write {seq}, issued after the snapshot command returned")
                continue
            holds = seq
        want = newest_acked.get(b)
        if want is not None and (holds is None or holds < want):
            problems.append(f"block {b}: holds {holds}, older than write {want} acknowledged before the command")
    return problems
