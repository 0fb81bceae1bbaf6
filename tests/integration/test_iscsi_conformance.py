# libiscsi's conformance suite (`iscsi-test-cu`, Debian's libiscsi-bin 1.19) against the iSCSI target of a
# `raftblock demo` cluster (3 nodes in 3 racks, the 1 GiB volume `demo`), destructive tests allowed (-d).
#
# Enforces (issue 19): every test of the ALL family passes, or is skipped by libiscsi for a reason listed
# in SKIPS (an optional command we do not implement, a removable-medium test on a fixed disk), or fails for
# a reason listed in TEST_BUGS (a bug of the test itself, with the line that has it); anything else fails
# this test. The MultipathIO suite runs again with a second session (libiscsi's "multipath URL"), so it is
# measured rather than skipped. For reference: tgt 1.0.85 passes 160 of 230 on this machine and fails 8.
# The table per suite is printed; RAFTBLOCK_ISCSI_CU_REPORT=FILE also writes it as JSON.
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import require_tools
from .test_cluster import Cluster, _cleanup

RAFTBLOCK = [sys.executable, "-m", "raftblock.cli"]

# Skipped by libiscsi: what the test needs and why we do not offer it.
SKIPS = {
    "ExtendedCopy.*": "EXTENDED COPY (XCOPY) is not implemented: INVALID COMMAND OPERATION CODE",
    "ReceiveCopyResults.*": "RECEIVE COPY RESULTS belongs to XCOPY, not implemented",
    "OrWrite.*": "ORWRITE (SBC-4 bitwise OR) is not implemented",
    "WriteAtomic16.*": "WRITE ATOMIC(16) is not implemented (no atomic write boundary is advertised)",
    "PreventAllow.*": "PREVENT ALLOW MEDIUM REMOVAL tests need a removable medium; a volume is a fixed disk (RMB=0)",
    "StartStopUnit.*": "START STOP UNIT tests need a removable medium (RMB=0)",
    "ReadDefectData10.*": "READ DEFECT DATA is not implemented: a volume has no media defects",
    "ReadDefectData12.*": "READ DEFECT DATA is not implemented: a volume has no media defects",
    "ReadOnly.*": "needs a read-only LUN: volumes are served read-write",
    "Sanitize.*": "SANITIZE needs iscsi-test-cu -S; not implemented (UNMAP / WRITE SAME with UNMAP erase blocks)",
    "Reserve6.TargetColdReset": "TARGET COLD RESET is answered FUNCTION NOT SUPPORTED (warm reset and LUN reset work)",
    "WriteSame10.ZeroBlocks": "WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is refused (WSNZ=1 in the Block Limits VPD)",
    "WriteSame16.ZeroBlocks": "WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is refused (WSNZ=1 in the Block Limits VPD)",
    "MultipathIO.*": "needs a second path; measured in the second run (with a multipath URL)",
}

# Failures that are the test's own bug: the test, the line, and why a conforming target cannot pass it.
TEST_BUGS = {
    "GetLBAStatus.UnmapSingle": (
        "test_get_lba_status_unmap_single.c:135 (libiscsi 1.19 and master): it asks GET LBA STATUS for LBA i+1 "
        "and expects the first descriptor at LBA i+LBPPB; SBC-4 5.7 says the first descriptor starts at the "
        "requested LBA. It passes only when a physical block is one logical block; volumes are 512e (512-byte "
        "logical, 4 KiB physical blocks, LBPPB 8)."),
}

REFERENCE_TGT = {"passed": 160, "failed": 8, "total": 230}


def parse(log: str) -> list[tuple[str, str, str]]:
    """(suite, test, passed|skipped|failed) from iscsi-test-cu's verbose (CUnit basic) output: "  Test: NAME ..."
    then the test's log lines, then a line starting with "passed" or "FAILED" (its own "[FAILED] ..." log
    lines are messages, not the result). A test CUnit counts as passed that logged [SKIPPED] is a skip."""
    out = []
    suite = test = ""
    seen = ""
    for line in log.splitlines():
        if line.startswith("Suite: "):
            suite = line[len("Suite: "):].strip()
            continue
        m = re.match(r"^  Test: (\S+) \.\.\.(.*)$", line)
        if m:
            test, line = m.group(1), m.group(2)
            seen = ""
        if not test:
            continue
        if line.startswith(("passed", "FAILED")):
            result = "failed" if line.startswith("FAILED") else "skipped" if "[SKIPPED]" in seen else "passed"
            out.append((suite, test, result))
            test = ""
        else:
            seen += line + "\n"
    return out


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))


def _run_cu(args: list[str], cwd: Path) -> str:
    cp = subprocess.run(["iscsi-test-cu", "-d", *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    log = cp.stdout + cp.stderr
    assert "Run Summary" in log, f"iscsi-test-cu did not finish (rc {cp.returncode}):\n{log[-3000:]}"
    return log


@pytest.mark.timeout(1200)
@pytest.mark.slow  # 2 min: `make test-iscsi` and `make test-slow` run it (the iSCSI tests of make test stay)
def test_libiscsi_conformance_suite_on_a_demo_cluster(tmp_path: Path) -> None:
    require_tools("iscsi-test-cu")
    root = tmp_path / "demo"
    c = Cluster(root)
    try:
        cp = subprocess.run([*RAFTBLOCK, "demo", "--dir", str(root), "--nbd-port", "0", "--iscsi-port", "0",
                             "--json"], capture_output=True, text=True, timeout=300)
        assert cp.returncode == 0, cp.stderr
        url = json.loads(cp.stdout)["iscsi"]
        assert url and url.startswith("iscsi://"), cp.stdout
        results = {f"{s}.{t}": r for s, t, r in parse(_run_cu(["-t", "ALL", url], tmp_path))}
        # MultipathIO again, with a second session (same portal): libiscsi's multipath URL
        multi = {f"{s}.{t}": r for s, t, r in parse(_run_cu(["-t", "ALL.MultipathIO", url, url], tmp_path))}
    finally:
        _cleanup(c)
    assert len(results) == 230, f"expected the 230 tests of ALL, parsed {len(results)}"
    assert set(multi) == {k for k in results if k.startswith("MultipathIO.")}, multi
    results.update(multi)

    by_suite: dict[str, dict[str, int]] = {}
    for name, r in results.items():
        by_suite.setdefault(name.split(".")[0], {"passed": 0, "skipped": 0, "failed": 0})[r] += 1
    total = {k: sum(s[k] for s in by_suite.values()) for k in ("passed", "skipped", "failed")}
    lines = [f"{'suite':<28} passed skipped failed"]
    lines += [f"{s:<28} {v['passed']:>6} {v['skipped']:>7} {v['failed']:>6}" for s, v in sorted(by_suite.items())]
    lines.append(f"{'ALL (230 tests)':<28} {total['passed']:>6} {total['skipped']:>7} {total['failed']:>6}"
                 f"   (tgt 1.0.85: {REFERENCE_TGT['passed']} passed, {REFERENCE_TGT['failed']} failed)")
    print("\n" + "\n".join(lines))
    report = os.environ.get("RAFTBLOCK_ISCSI_CU_REPORT")
    if report:
        Path(report).write_text(json.dumps({"suites": by_suite, "total": total, "tests": results,
                                            "test_bugs": TEST_BUGS, "skips": SKIPS}, indent=1, sort_keys=True))

    failed = sorted(n for n, r in results.items() if r == "failed")
    unexplained = [n for n in failed if n not in TEST_BUGS]
    assert not unexplained, f"iscsi-test-cu failures: {unexplained}"
    skipped = sorted(n for n, r in results.items() if r == "skipped")
    unexplained_skips = [n for n in skipped if not any(_matches(p, n) for p in SKIPS)]
    assert not unexplained_skips, f"skips without a reason in SKIPS: {unexplained_skips}"
    assert total["passed"] > REFERENCE_TGT["passed"], total


def test_the_parser_tells_passes_skips_and_failures_apart() -> None:
    log = ("Suite: Read10\n  Test: Simple ...passed\n  Test: BeyondEol ...    [FAILED] READ10 successful but "
           "should have failed\nFAILED\n    1. test_read10_beyond_eol.c:70  - CU_FAIL\n"
           "  Test: DpoFua ...    [SKIPPED] READ10 is not implemented.\npassed\n"
           "Suite: iSCSIdatasn\n  Test: iSCSIDataSnInvalid ...    [FAILED] WRITE10 command failed with status 1\n"
           "passed\n")
    assert parse(log) == [("Read10", "Simple", "passed"), ("Read10", "BeyondEol", "failed"),
                          ("Read10", "DpoFua", "skipped"), ("iSCSIdatasn", "iSCSIDataSnInvalid", "passed")]
