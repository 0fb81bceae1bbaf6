# Power cut: kill -9 `raftblock serve --disk volatile-tear` under write load, restart, judge what survived.
#
# Enforces: NBD proto.md NBD_CMD_FLUSH / NBD_CMD_FLAG_FUA and the serve contract "every acknowledged NBD
# write is durable (fsynced) before the reply" -- so after a crash every block holds its newest
# acknowledged write, or a later write that was still in flight (NBD gives no order between concurrent
# requests, and an unacknowledged write may or may not have landed); and DESIGN "recovery tells a torn
# tail from corruption": nothing is half-written inside a 4 KiB block, and every block reads without error.
from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import BLOCK, CLIENTS, ServeFactory, kill_group, nbd_read, require_libnbd

NBLOCKS = 512
QD = 16
MAX_OPS = 1_000_000  # the kill ends the writer, not this
ACKS_BEFORE_KILL = (150, 400, 250)  # per crash cycle: different amounts of history before each cut
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


def _count_acks(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("A "))
    except FileNotFoundError:
        return 0


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
            rec = blk[:RECORD]
            magic, seq, block, check = (rec[:8], int.from_bytes(rec[8:16], "big"),
                                        int.from_bytes(rec[16:24], "big"), int.from_bytes(rec[24:32], "big"))
            if blk != rec * (BLOCK // RECORD):
                problems.append(f"block {b}: torn (more than one record or partial zeroes inside the block)")
                continue
            if magic != b"PWRCUT01" or check != seq ^ block ^ CHECK or block != b:
                problems.append(f"block {b}: garbage record {rec.hex()}")
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


def test_judge_catches_what_it_should() -> None:
    """The judge itself: lost, torn and foreign blocks are reported; legitimate outcomes are not."""
    def blk(seq: int, b: int) -> bytes:
        return (b"PWRCUT01" + seq.to_bytes(8, "big") + b.to_bytes(8, "big")
                + (seq ^ b ^ CHECK).to_bytes(8, "big")) * (BLOCK // RECORD)

    j = Journal(writes={1: (0, 2, False), 2: (0, 1, True), 3: (1, 1, False)}, acked={1, 2})
    ok = blk(2, 0) + blk(3, 1) + bytes(BLOCK)  # block 1 holds in-flight write 3, newer than acked 1
    assert judge(ok, j, 3) == []
    assert judge(blk(2, 0) + blk(1, 1) + bytes(BLOCK), j, 3) == []
    assert "lost" in judge(blk(1, 0) + blk(1, 1) + bytes(BLOCK), j, 3)[0]
    assert "lost" in judge(bytes(BLOCK) + blk(1, 1) + bytes(BLOCK), j, 3)[0]
    assert "torn" in judge(blk(2, 0)[:2048] + blk(1, 0)[2048:] + blk(1, 1) + bytes(BLOCK), j, 3)[0]
    assert "never targeted" in judge(blk(2, 0) + blk(1, 1) + blk(1, 2), j, 3)[0]


@pytest.mark.timeout(240)
def test_kill_9_under_load_keeps_every_acknowledged_write(serve_factory: ServeFactory, tmp_path: Path) -> None:
    py = require_libnbd()
    srv = serve_factory(["vol:64M"], disk="volatile-tear")
    journal = tmp_path / "journal.txt"
    first_seq = 1
    for cycle, acks_wanted in enumerate(ACKS_BEFORE_KILL):
        acks_before = _count_acks(journal)
        writer = subprocess.Popen(
            [py, str(CLIENTS / "nbd_tagged_writer.py"), srv.uri("vol"), str(journal), str(NBLOCKS),
             str(100 + cycle), str(first_seq), str(QD), str(MAX_OPS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while _count_acks(journal) < acks_before + acks_wanted:
                if writer.poll() is not None:
                    out, err = writer.communicate()
                    raise AssertionError(f"writer ended before the kill: {out.decode()} {err.decode()[-2000:]}")
                assert time.monotonic() < deadline, (
                    f"cycle {cycle}: only {_count_acks(journal) - acks_before} writes acknowledged in 90s")
                time.sleep(0.02)  # polling interval
            srv.kill()  # the power cut, mid-load: QD requests are in flight
            out, err = writer.communicate(timeout=60)
        finally:
            kill_group(writer)
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["end"] != "max_ops", result

        srv.restart()
        j = Journal.load(journal)
        got = nbd_read(srv.uri("vol"), 0, NBLOCKS * BLOCK, tmp_path)
        assert got["ok"], f"cycle {cycle}: reading the volume after the crash failed: {got}"
        problems = judge(got["data"], j, NBLOCKS)
        assert not problems, (f"cycle {cycle}: {len(problems)} bad blocks after kill -9 "
                              f"({len(j.acked)} acked, {len(j.writes)} writes): {problems[:10]}")
        first_seq = j.max_seq() + 1
