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
from pathlib import Path

import pytest

from raftblock.testing.journal import CHECK, RECORD, Journal, judge
from raftblock.testing.journal import count_acks as _count_acks

from .helpers import BLOCK, CLIENTS, ServeFactory, kill_group, nbd_read, require_libnbd

NBLOCKS = 512
QD = 16
MAX_OPS = 1_000_000  # the kill ends the writer, not this
ACKS_BEFORE_KILL = (150, 400, 250)  # per crash cycle: different amounts of history before each cut


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
