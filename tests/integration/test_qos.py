"""Per-volume QoS on a real cluster, driven by a real host (fio's nbd engine) through the NBD gateway.

The cluster's nodes run with `qos_slots_ops = 16` (node/admission.py): a node whose admission is where requests
wait, as on a node saturated by more hosts than this two-core machine can run. The default (64) trades some
isolation for throughput; `make bench-qos` measures both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import metric as _metric
from .helpers import require_tools
from .test_cluster import Cluster, _cleanup, _wait

SLOTS = 16
LIMIT = 100  # the noisy volume's IOPS limit


class Fio:
    """One fio job (4 KiB random writes) on a volume, in its own process group."""

    def __init__(self, uri: str, name: str, qd: int, seconds: int, out: Path, iops_log: bool = False,
                 ramp_s: int = 0) -> None:
        self.out = out / f"{name}.json"
        self.log = out / name
        argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                f"--iodepth={qd}", "--time_based", f"--runtime={seconds}", "--size=256M", "--output-format=json",
                f"--output={self.out}"]
        if ramp_s:  # not in the figures: the attach moving the groups' leadership to node 1 (leader affinity)
            argv.append(f"--ramp_time={ramp_s}")
        if iops_log:
            argv += [f"--write_iops_log={self.log}", "--log_avg_msec=1000"]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def result(self, timeout_s: float) -> dict[str, Any]:
        try:
            _, err = self.proc.communicate(timeout=timeout_s)
        finally:
            self.kill()
        assert self.proc.returncode == 0, f"fio failed ({self.proc.returncode}): {err.decode()[-2000:]}"
        text = self.out.read_text()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        w = job["write"]
        assert job["error"] == 0, job["error"]
        return {"iops": w["iops"], "ios": w["total_ios"],
                "p99_ms": w["clat_ns"]["percentile"]["99.000000"] / 1e6,
                "p50_ms": w["clat_ns"]["percentile"]["50.000000"] / 1e6}

    def per_second(self) -> list[tuple[float, float]]:
        """(seconds since the job started, IOPS in that second)."""
        log = Path(f"{self.log}_iops.1.log")
        return [(int(r[0]) / 1000, float(r[1])) for r in (line.split(",") for line in log.read_text().splitlines())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class QosCluster(Cluster):
    def nbd(self, volume: str) -> str:
        return f"{self.uri}/{volume}"

    def gateway_metrics(self) -> str:
        st = self.status()
        return str(next(n for n in st["nodes"] if n["id"] == 1)["metrics_url"])


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QosCluster]:
    require_tools("fio")
    c = QosCluster(tmp_path_factory.mktemp("qos") / "cluster")
    try:
        c.set_raft(qos_slots_ops=SLOTS)
        c.up()
        yield c
    finally:
        _cleanup(c)


def _started(url: str, volume: str) -> None:
    """Wait until the gateway has served the volume's first writes (fio connected and running)."""
    _wait(lambda: _metric(url, "raftblock_gateway_io_operations_total", volume=volume, op="write") > 0, 30,
          f"fio's first writes to {volume}")


def test_a_limited_noisy_volume_leaves_a_quiet_one_its_latency_and_the_limit_holds(qc: QosCluster,
                                                                                    tmp_path: Path) -> None:
    """Issue 20: two volumes on the same nodes (both attached through node 1's gateway: node 1 leads their
    groups); the quiet one at QD1, alone, then beside the noisy one at QD64 with a 100 IOPS limit: its p99 stays
    within 2x of the solo p99, and the noisy volume gets 100 IOPS within 5 % over 30 s (make bench-qos measures
    other limits: on this two-core machine the nodes, the gateway and both fio share the CPUs)."""
    qc.cli("volume", "create", "quiet1", "--size", "1G")
    qc.cli("volume", "create", "noisy1", "--size", "1G", "--iops", str(LIMIT))
    gw = qc.gateway_metrics()
    solo = Fio(qc.nbd("quiet1"), "solo", 1, 10, tmp_path, ramp_s=2).result(60)
    noisy = Fio(qc.nbd("noisy1"), "noisy", 64, 30, tmp_path)
    try:
        _started(gw, "noisy1")
        beside = Fio(qc.nbd("quiet1"), "beside", 1, 15, tmp_path, ramp_s=2).result(60)
        n = noisy.result(60)
    finally:
        noisy.kill()
    print(f"\nquiet QD1 alone: {solo}\nquiet QD1 beside noisy (QD64, {LIMIT} IOPS limit): {beside}\nnoisy: {n}")
    assert beside["p99_ms"] <= 2 * solo["p99_ms"], (solo, beside)
    # 30 s at the limit plus the one-second burst the bucket starts with: 3.3 % over at most
    assert abs(n["iops"] - LIMIT) <= 0.05 * LIMIT, n
    # the host waited in the gateway, not on the nodes
    assert _metric(gw, "raftblock_gateway_qos_throttled_total", volume="noisy1") > 0.9 * (n["ios"] - LIMIT)
    led = sum(_metric(nd["metrics_url"], "raftblock_node_qos_waited_total", **{"class": "noisy1"})
              for nd in qc.status()["nodes"])
    assert led < 0.05 * n["ios"], f"{led} of the noisy volume's {n['ios']} writes queued on a node"


def test_a_limit_changes_while_the_volume_is_attached(qc: QosCluster, tmp_path: Path) -> None:
    qc.cli("volume", "create", "live", "--size", "1G")
    gw = qc.gateway_metrics()
    job = Fio(qc.nbd("live"), "live", 8, 10, tmp_path, iops_log=True)
    try:
        _started(gw, "live")
        _wait(lambda: _metric(gw, "raftblock_gateway_io_operations_total", volume="live", op="write") > 1000, 30,
              "1000 writes before the change")
        changed_at = time.monotonic() - job.t0
        out = json.loads(qc.cli("volume", "set-qos", "live", "--iops", "100", "--burst-iops", "10", "--json").stdout)
        assert out["qos"]["iops"] == 100
        job.result(60)
    finally:
        job.kill()
    secs = job.per_second()
    # fio's one-second windows end at t: the one in which the change came is mostly before it (the gateway
    # applies it at its reload, a few tens of ms later); the windows from 2 s after it are all under it
    before = [iops for t, iops in secs if t <= changed_at + 0.5]
    after = [iops for t, iops in secs if t >= changed_at + 2.0]
    print(f"\nper-second IOPS before the change: {before}\nafter: {after}")
    assert before and max(before) > 200, secs  # unlimited before
    assert len(after) >= 3, secs
    assert all(80 <= iops <= 110 for iops in after), secs


def test_a_reservation_is_met_while_the_node_is_saturated(qc: QosCluster, tmp_path: Path) -> None:
    """A volume of weight 100 at QD128 saturates node 1's admission; beside it a volume of weight 1 at QD32 gets
    a few IOPS from its weight, and its reservation (250 IOPS) once it has one."""
    qc.cli("volume", "create", "heavy", "--size", "1G", "--weight", "100")
    qc.cli("volume", "create", "reserved", "--size", "1G")
    gw = qc.gateway_metrics()
    noisy = Fio(qc.nbd("heavy"), "heavy", 128, 30, tmp_path)
    try:
        _started(gw, "heavy")
        weight_only = Fio(qc.nbd("reserved"), "weight_only", 32, 8, tmp_path).result(60)
        qc.cli("volume", "set-qos", "reserved", "--min-iops", "250")
        reserved = Fio(qc.nbd("reserved"), "reserved", 32, 10, tmp_path).result(60)
        heavy = noisy.result(60)
    finally:
        noisy.kill()
    print(f"\nweight 1 beside weight 100: {weight_only}\nwith a 250 IOPS reservation: {reserved}\nheavy: {heavy}")
    # the scheduler arbitrates: the weights alone leave it little (what it gets is mostly the starvation guard's,
    # 32 requests per qos_wait_max_ms), the reservation gets it its 250
    assert weight_only["iops"] < 0.75 * 250, weight_only
    assert reserved["iops"] >= 0.95 * 250, reserved
    assert heavy["iops"] > 500, heavy  # the node stayed busy with the heavy volume meanwhile
    st = qc.status()
    by_res = sum(_metric(nd["metrics_url"], "raftblock_node_qos_reservation_total", **{"class": "reserved"})
                 for nd in st["nodes"])
    assert by_res > 0.5 * reserved["ios"], by_res
