"""raftblock bench: fio (nbd engine) against `raftblock serve` and `qemu-nbd`, same jobs, same disk, same run.

Owns: starting both targets, pre-filling them, running every job on both in interleaved A/B order for
several rounds, recording the machine's load and steal time per run, and reporting medians.

Rules:
1. One job file (bench/jobs/block.fio) for every target; only the URI differs.
2. Targets alternate inside every round (A,B then B,A in the next), so drift in a shared machine's
   load hits both; load average and steal are recorded for each run, so a noisy run can be spotted.
3. Read jobs only read data that was written first (`prefill`), on both targets.
4. Nothing here asserts performance; it measures and reports (bench/results/*.json, optional PNG).

Usage: python bench/run.py [--quick] [--rounds N] [--runtime S] [--size 256M] [--jobs a,b] [--targets raftblock,qemu-nbd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB_FILE = HERE / "jobs" / "block.fio"
RESULTS = HERE / "results"
EXPORT = "bench"
VOLUME_BYTES = 1 << 30

JOBS = [
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randread-4k-qd1",
    "randread-4k-qd32",
    "write-1m-qd4",
    "read-1m-qd4",
    "randwrite-4k-qd1-fsync",
    "randwrite-4k-qd32-fsync",
    "write-1m-qd4-fsync",
]
TARGETS = ["raftblock", "cluster", "qemu-nbd"]  # the last one is the baseline of every ratio

sys.path.insert(0, str(REPO))  # `python bench/run.py` from a checkout without the package installed


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


# -- machine load ------------------------------------------------------------------------------------------

def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@dataclass
class Machine:
    load_before: float
    load_after: float
    steal_pct: float
    busy_pct: float


class LoadProbe:
    def __enter__(self) -> LoadProbe:
        self.load0 = loadavg()
        self.cpu0 = cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu1 = cpu_times()
        delta = [b - a for a, b in zip(self.cpu0, cpu1, strict=False)]
        total = sum(delta[:8]) or 1  # user nice system idle iowait irq softirq steal (guest is inside user)
        idle = delta[3] + delta[4]
        self.machine = Machine(self.load0, loadavg(), 100.0 * delta[7] / total, 100.0 * (total - idle) / total)


# -- targets -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port} after {timeout_s}s") from None
            time.sleep(0.05)  # polling interval


class Target:
    name = ""

    def start(self, work: Path) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class RaftblockTarget(Target):
    name = "raftblock"

    def start(self, work: Path) -> str:
        from raftblock.testing.serve import ServeProcess

        self.sp = ServeProcess(work / "raftblock", [f"{EXPORT}:{VOLUME_BYTES}"], disk="os",
                               log_path=work / "raftblock.log")
        self.sp.start(timeout_s=60)
        return self.sp.uri(EXPORT)

    def stop(self) -> None:
        rc = self.sp.stop()
        if rc != 0:
            print(f"warning: raftblock serve exited {rc}; log tail:\n{self.sp.log_tail()}", file=sys.stderr)

    def describe(self) -> str:
        return "raftblock serve --disk os (one copy)"


class ClusterTarget(Target):
    """The 3-node, 3-rack Raft cluster as `make demo` starts it (free ports), one volume."""

    name = "cluster"

    def start(self, work: Path) -> str:
        from raftblock.node.cluster import cluster_up, volume_create

        self.root = work / "cluster"
        uri = cluster_up(self.root, nbd_port=0, disk="os")
        volume_create(self.root, EXPORT, VOLUME_BYTES)
        return f"{uri}/{EXPORT}"

    def stop(self) -> None:
        from raftblock.node.cluster import cluster_down

        cluster_down(self.root)

    def describe(self) -> str:
        return "raftblock cluster: 3 nodes in 3 racks, Raft, 3 replicas, gateway (loopback)"


class QemuNbdTarget(Target):
    name = "qemu-nbd"
    argv_tail = ["-f", "raw", "--cache=none", "--aio=native", "-t", "-e", "4"]

    def start(self, work: Path) -> str:
        image = work / "qemu-nbd.raw"
        with open(image, "wb") as f:
            f.truncate(VOLUME_BYTES)
        port = free_port()
        self.log = open(work / "qemu-nbd.log", "wb")
        self.proc = subprocess.Popen(
            ["qemu-nbd", *self.argv_tail, "-x", EXPORT, "-b", "127.0.0.1", "-p", str(port), str(image)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(port, self.proc)
        return f"nbd://127.0.0.1:{port}/{EXPORT}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def describe(self) -> str:
        return "qemu-nbd " + " ".join(self.argv_tail) + " (raw file, same filesystem)"


# -- fio ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    job: str
    target: str
    round: int
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    machine: Machine
    extra: dict[str, Any] = field(default_factory=dict)


def run_fio(section: str, uri: str, size: int, runtime_s: int, ramp_s: int, out: Path) -> dict[str, Any]:
    env = dict(os.environ, NBD_URI=uri, SIZE=str(size), RUNTIME=str(runtime_s), RAMP=str(ramp_s))
    cmd = ["fio", f"--section={section}", "--output-format=json", f"--output={out}", str(JOB_FILE)]
    cp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=runtime_s + ramp_s + 300)
    text = out.read_text() if out.exists() else ""
    if cp.returncode != 0 or "{" not in text:
        raise RuntimeError(f"fio {section} on {uri} failed ({cp.returncode}):\n{cp.stderr[-2000:]}\n{text[-2000:]}")
    result: dict[str, Any] = json.loads(text[text.index("{"):])  # the nbd engine prints a line before the JSON
    return result


def summarize(job: str, target: str, rnd: int, fio: dict[str, Any], machine: Machine) -> Run:
    j = fio["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job} on {target}: error {j['error']}")
    ddir = "read" if j["read"]["io_bytes"] else "write"
    d = j[ddir]
    lat = d.get("lat_ns", {}).get("percentile") or d["clat_ns"].get("percentile", {})
    extra = {"ddir": ddir, "io_bytes": d["io_bytes"], "runtime_ms": j["job_runtime"]}
    if j.get("sync", {}).get("total_ios"):
        extra["flushes"] = j["sync"]["total_ios"]
        extra["flush_p50_us"] = j["sync"]["lat_ns"].get("percentile", {}).get("50.000000", 0) / 1000
    return Run(job, target, rnd, d["iops"], d["bw"] * 1024 / 1e6,
               lat.get("50.000000", 0) / 1000, lat.get("99.000000", 0) / 1000, machine, extra)


# -- report ------------------------------------------------------------------------------------------------

def med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs) if runs else float("nan")


def table(runs: list[Run], jobs: list[str], targets: list[str]) -> str:
    """One block per target, each against the baseline (the last target)."""
    if len(targets) < 2:
        return _table(runs, jobs, targets[0], "")
    return "\n\n".join(_table(runs, jobs, a, targets[-1]) for a in targets[:-1])


def _table(runs: list[Run], jobs: list[str], a: str, b: str) -> str:
    by: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        by[(r.job, r.target)].append(r)
    head = (f"{'job':<24} {a + ' IOPS med [min-max]':>30} {b + ' IOPS':>14} {'ratio':>6} "
            f"{'MB/s ' + a[:4] + '/' + b[:4]:>16} {'p50 us ' + a[:4] + '/' + b[:4]:>18} {'p99 us ' + a[:4] + '/' + b[:4]:>20}")
    lines = [head, "-" * len(head)]
    for job in jobs:
        ra, rb = by.get((job, a), []), by.get((job, b), [])
        if not ra and not rb:
            continue
        rng = f"[{min(r.iops for r in ra):.0f}-{max(r.iops for r in ra):.0f}]" if ra else ""
        ratio = med(ra, "iops") / med(rb, "iops") if ra and rb and med(rb, "iops") else float("nan")
        lines.append(
            f"{job:<24} {med(ra, 'iops'):>14.0f} {rng:>15} {med(rb, 'iops'):>14.0f} {ratio:>6.2f} "
            f"{med(ra, 'mb_s'):>8.1f}/{med(rb, 'mb_s'):<7.1f} {med(ra, 'p50_us'):>9.0f}/{med(rb, 'p50_us'):<8.0f} "
            f"{med(ra, 'p99_us'):>10.0f}/{med(rb, 'p99_us'):<9.0f}")
    return "\n".join(lines)


def plot(runs: list[Run], jobs: list[str], targets: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    jobs = [j for j in jobs if any(r.job == j for r in runs)]
    fig, ax = plt.subplots(figsize=(max(8, len(jobs) * 1.2), 5))
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        vals = [med([r for r in runs if r.job == j and r.target == t], "iops") for j in jobs]
        ax.bar([k + i * width for k in range(len(jobs))], vals, width, label=t)
    ax.set_xticks([k + width * (len(targets) - 1) / 2 for k in range(len(jobs))])
    ax.set_xticklabels(jobs, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("IOPS (median over rounds, log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {"fio": out(["fio", "--version"]), "qemu-nbd": out(["qemu-nbd", "--version"]),
            "git": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "python": platform.python_version(), "kernel": platform.release(), "cpus": str(os.cpu_count())}


# -- main --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, short runs, 64 MiB region (about 2 minutes)")
    p.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    p.add_argument("--runtime", type=int, help="measured seconds per run (default 7; quick 3)")
    p.add_argument("--ramp", type=int, help="unmeasured warm-up seconds per run (default 1)")
    p.add_argument("--size", help="region the jobs touch, e.g. 256M (default 256M; quick 64M)")
    p.add_argument("--jobs", help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, first is A")
    p.add_argument("--workdir", help="where both targets keep their data (default: a temp dir, removed after)")
    p.add_argument("--out", help="result JSON path (default bench/results/bench-<time>.json)")
    args = p.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 3)
    runtime_s = args.runtime or (3 if args.quick else 7)
    ramp_s = args.ramp if args.ramp is not None else 1
    size = parse_size(args.size or ("64M" if args.quick else "256M"))
    jobs = args.jobs.split(",") if args.jobs else JOBS
    unknown = set(jobs) - set(JOBS)
    if unknown:
        p.error(f"unknown jobs {sorted(unknown)}")
    registry: dict[str, type[Target]] = {"raftblock": RaftblockTarget, "cluster": ClusterTarget, "qemu-nbd": QemuNbdTarget}
    names = args.targets.split(",")
    for tool in ["fio"] + (["qemu-nbd"] if "qemu-nbd" in names else []):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (make sysdeps)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = Path(args.out) if args.out else RESULTS / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raftblock-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fio_out = work / "fio.json"

    targets = [registry[n]() for n in names]
    uris: dict[str, str] = {}
    runs: list[Run] = []
    t0 = time.monotonic()
    print(f"bench: {len(jobs)} jobs x {len(targets)} targets x {rounds} rounds, {runtime_s}s (+{ramp_s}s ramp) each, "
          f"region {size >> 20} MiB, work dir {work}", flush=True)
    try:
        for t in targets:
            uris[t.name] = t.start(work)
            pre = time.monotonic()
            run_fio("prefill", uris[t.name], size, runtime_s, 0, fio_out)
            print(f"  {t.name}: {uris[t.name]} pre-filled {size >> 20} MiB in {time.monotonic() - pre:.1f}s", flush=True)
        for rnd in range(rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for job in jobs:
                for t in order:
                    with LoadProbe() as probe:
                        fio = run_fio(job, uris[t.name], size, runtime_s, ramp_s, fio_out)
                    r = summarize(job, t.name, rnd, fio, probe.machine)
                    runs.append(r)
                    print(f"  round {rnd} {job:<24} {t.name:<10} {r.iops:>9.0f} IOPS {r.mb_s:>8.1f} MB/s "
                          f"p50 {r.p50_us:>7.0f}us p99 {r.p99_us:>8.0f}us  load {r.machine.load_before:.2f} "
                          f"steal {r.machine.steal_pct:.1f}%", flush=True)
    finally:
        for t in targets:
            if t.name in uris:
                try:
                    t.stop()
                except Exception as e:  # noqa: BLE001 -- keep stopping the others
                    print(f"warning: stopping {t.name}: {e}", file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report = table(runs, jobs, names)
    print()
    print(report)
    steals = [r.machine.steal_pct for r in runs]
    loads = [r.machine.load_before for r in runs]
    print(f"\nmachine: load average {min(loads):.2f}-{max(loads):.2f}, steal {min(steals):.1f}-{max(steals):.1f}% "
          f"per run; {time.monotonic() - t0:.0f}s total")
    doc = {
        "when": stamp,
        "settings": {"rounds": rounds, "runtime_s": runtime_s, "ramp_s": ramp_s, "region_bytes": size,
                     "volume_bytes": VOLUME_BYTES, "job_file": str(JOB_FILE.relative_to(REPO)), "quick": args.quick},
        "targets": {t.name: t.describe() for t in targets},
        "versions": versions(),
        "runs": [asdict(r) for r in runs],
        "table": report,
    }
    out_json.write_text(json.dumps(doc, indent=1))
    print(f"results: {out_json}")
    png = out_json.with_suffix(".png")
    if plot(runs, jobs, names, png):
        print(f"chart:   {png}")
    else:
        print("chart:   skipped (matplotlib not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
