"""raftblock bench-compare: Raft against chain replication on the same cluster, code, disk and workload.

Owns: one 3-node, 3-rack cluster with two volumes, `braft` (Raft) and `bchain` (chain), and qemu-nbd on a raw
file of the same filesystem as the single-copy baseline; the same fio jobs on all three, interleaved in every
round; then the failure cases under a steady QD8 tagged-write load: kill -9 of the Raft leader, of the chain's
head, and of the chain's tail, each measured for its I/O pause and checked by the lost-write verifier.

Rules:
1. Same job file as bench/run.py (bench/jobs/block.fio); only the URI differs. Reads read pre-filled data.
2. Targets alternate inside each round (order reversed every other round); ratios are per round against the
   baseline's run of that round, reported as median [min-max] over rounds.
3. Kill cases: the writer (tests/integration/clients/nbd_tagged_writer.py, libnbd, QD8) journals every request
   and acknowledgement and logs completion times on CLOCK_MONOTONIC; the pause is the longest gap between
   completions that spans the kill, and "first completion" is the time from the kill to the next completion.
   Afterwards the volume region is read back and judged (raftblock/testing/journal.py): an acknowledged
   write that is not there is a lost write. Before each case the cluster is made whole again (`cluster up`,
   every group at full membership with every member caught up).
4. Nothing here asserts performance; it measures and reports: a markdown table, JSON and PNG plots (IOPS bars,
   latency CDFs, a timeline of completions around each kill) under bench/results/.

Usage: python bench/compare.py [--quick] [--rounds N] [--runtime S] [--size 256M] [--jobs a,b] [--no-kill]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from run import (
    REPO,
    RESULTS,
    VOLUME_BYTES,
    Bench,
    LoadProbe,
    Machine,
    QemuNbdTarget,
    Run,
    Target,
    cpu_between,
    med,
    parse_size,
    spread,
    versions,
)

JOBS = [
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randread-4k-qd1",
    "randread-4k-qd32",
    "write-1m-qd4",
    "read-1m-qd4",
    "randrw-4k-qd16",
]
TARGETS = ["raft", "chain", "qemu-nbd"]
BASELINE = "qemu-nbd"
CLIENTS = REPO / "tests" / "integration" / "clients"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd belongs to it
KILL_BLOCKS = 4096  # 16 MiB of the volume's first extent: one extent group
KILL_QD = 8
KILL_CASES = [("raft", "leader"), ("chain", "head"), ("chain", "tail")]

sys.path.insert(0, str(REPO))


# -- targets --------------------------------------------------------------------------------------------------

class SharedCluster:
    """One `raftblock cluster up` (free ports) shared by the raft and the chain volume."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.uri = ""

    def up(self, work: Path) -> str:
        from raftblock.node.cluster import cluster_up

        if self.root is None:
            self.root = work / "cluster"
        # A separate gateway: the kill cases kill a leader or head under load, and the host must outlive it
        # (with the nodes serving NBD, a host attached through the victim loses its connection).
        self.uri = cluster_up(self.root, nbd_port=0, disk="os", gateway="separate")
        return self.uri

    def pids(self) -> dict[str, int]:
        from raftblock.node.clustermap import ClusterMap
        from raftblock.node.layout import Layout, running_pid

        assert self.root is not None
        layout = Layout(self.root)
        cmap = ClusterMap.load(layout.map_path)
        configs = {f"m{k}": layout.meta_config(int(k)) for k in sorted(cmap.meta_admin)}
        configs.update({f"n{n.node_id}": layout.node_config(n.node_id) for n in cmap.nodes})
        configs["gateway"] = layout.gateway_config
        pids = {name: running_pid(layout, name, cfg) for name, cfg in configs.items()}
        return {k: v for k, v in pids.items() if v is not None}

    def status(self) -> dict[str, Any]:
        from raftblock.node.cluster import cluster_status

        assert self.root is not None
        return cluster_status(self.root)

    def down(self) -> None:
        from raftblock.node.cluster import cluster_down

        if self.root is not None:
            cluster_down(self.root)


class VolumeTarget(Target):
    """A volume of the shared cluster, replicated by `mode` (the name of the target)."""

    def __init__(self, mode: str, cluster: SharedCluster) -> None:
        self.name = mode
        self.mode = mode
        self.cluster = cluster
        self.volume = f"b{mode}"

    def start(self, work: Path) -> str:
        from raftblock.node.cluster import volume_create

        base = self.cluster.uri or self.cluster.up(work)
        assert self.cluster.root is not None
        volume_create(self.cluster.root, self.volume, VOLUME_BYTES, self.mode)
        return f"{base}/{self.volume}"

    def stop(self) -> None:
        pass  # the cluster goes down once, after both volumes

    def pids(self) -> dict[str, int]:
        return self.cluster.pids()

    def describe(self) -> str:
        what = ("Raft: leader appends, 2 followers append+fsync in parallel, ack at a majority" if self.mode == "raft"
                else "chain: head -> middle -> tail, each appends+fsyncs, the tail acks back; reads at the tail")
        return f"raftblock volume {self.volume} on 3 nodes in 3 racks ({what}), through the gateway"


# -- one run (fio, mixed jobs too) ----------------------------------------------------------------------------

def summarize(job: str, target: str, rnd: int, fio: dict[str, Any], machine: Machine) -> Run:
    """IOPS of all directions together; p50/p99 of the writes if any were made, else of the reads; the full
    percentile curves of both directions in `extra` (the CDF plot)."""
    j = fio["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job} on {target}: error {j['error']}")
    dirs = {d: j[d] for d in ("read", "write") if j[d]["io_bytes"]}
    extra: dict[str, Any] = {"ddir": "+".join(dirs), "runtime_ms": j["job_runtime"]}
    iops = mb_s = 0.0
    for name, d in dirs.items():
        pct = d.get("lat_ns", {}).get("percentile") or d["clat_ns"].get("percentile", {})
        extra[f"{name}_percentiles_us"] = {k: v / 1000 for k, v in pct.items()}
        extra[f"{name}_iops"] = d["iops"]
        iops += d["iops"]
        mb_s += d["bw"] * 1024 / 1e6
    main = "write" if "write" in dirs else "read"
    pm = extra.get(f"{main}_percentiles_us", {})
    return Run(job, target, rnd, iops, mb_s, pm.get("50.000000", 0.0), pm.get("99.000000", 0.0), machine, extra=extra)


def measure(bench: Bench, job: str, t: Target, rnd: int) -> Run:
    with LoadProbe() as probe:
        fio, samples = bench.fio(job, bench.uris[t.name], bench.ramp_s, sample=True)
    r = summarize(job, t.name, rnd, fio, probe.machine)
    if len(samples) == 2:
        r.cpu = cpu_between(samples[0], samples[1], t.name, r.iops)
    return r


# -- kill cases ------------------------------------------------------------------------------------------------

def first_group(cl: SharedCluster, volume: str) -> int:
    st = cl.status()
    return int(next(v for v in st["volumes"] if v["name"] == volume)["extent_groups"][0])


def wait_whole(cl: SharedCluster, gid: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """The group has 3 members, every node up and every member applied the same index."""
    deadline = time.monotonic() + timeout_s
    g: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = cl.status()
        g = next(x for x in st["groups"] if x["group"] == gid)
        applied = g.get("applied", {})
        if (len(g["members"]) == 3 and g["leader"] and all(n["state"] == "up" for n in st["nodes"])
                and len(applied) == 3 and len(set(applied.values())) == 1
                and g["leader"] == g["members"][0]):  # raft: the preferred leader has taken over
            return g
        time.sleep(0.2)
    raise RuntimeError(f"group {gid} not whole after {timeout_s}s: {g}")


def kill_case(cl: SharedCluster, work: Path, mode: str, victim_role: str, before_s: float,
              after_s: float, seed: int) -> dict[str, Any]:
    """One failure case on a fresh 64 MiB volume of `mode` (fio never wrote it: the judge knows every block)."""
    from raftblock.node.cluster import cluster_up, volume_create
    from raftblock.testing.journal import Journal, count_acks, judge

    assert cl.root is not None
    cluster_up(cl.root, nbd_port=0)  # the node killed by the previous case comes back
    volume = f"k{mode}-{victim_role}"
    volume_create(cl.root, volume, 64 << 20, mode)
    uri = f"{cl.uri}/{volume}"
    gid = first_group(cl, volume)
    g = wait_whole(cl, gid)
    victim = int(g["leader"] if victim_role in ("leader", "head") else g["members"][-1])
    case = work / f"kill-{mode}-{victim_role}"
    case.mkdir(exist_ok=True)
    journal, times = case / "journal.txt", case / "times.txt"
    for f in (journal, times):
        f.unlink(missing_ok=True)
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, str(CLIENTS / "nbd_tagged_writer.py"), uri, str(journal), str(KILL_BLOCKS), str(seed), "1",
         str(KILL_QD), "100000000", str(times), str(before_s + after_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        t_start = time.monotonic()
        while time.monotonic() - t_start < before_s:  # steady load before the kill
            if writer.poll() is not None:
                raise RuntimeError(f"writer ended early: {writer.communicate()}")
            time.sleep(0.05)
        acks_before = count_acks(journal)
        pid = cl.pids()[f"n{victim}"]
        t_kill_ns = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        out, err = writer.communicate(timeout=after_s + 120)
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    marks = [(int(a), int(b)) for a, b in (line.split() for line in times.read_text().splitlines() if line.strip())]
    comp_t = [t for t, _ in marks]
    # The pause: the longest gap between completions from just before the kill on (writes in flight
    # when the victim died may still complete right after it; the stall comes after them).
    window = [t for t in comp_t if t >= t_kill_ns - 100_000_000]
    gaps = [(b - a, a, b) for a, b in zip(window, window[1:], strict=False)]
    gap_ns, gap_a, gap_b = max(gaps, default=(0, t_kill_ns, t_kill_ns))
    gap_s = gap_ns / 1e9 if gaps else float("nan")
    resumed_s = (gap_b - t_kill_ns) / 1e9 if gaps else float("nan")  # the kill to the end of that gap
    before = [t for t in comp_t if t < t_kill_ns]
    longest_before_s = max(((b - a) / 1e9 for a, b in zip(before, before[1:], strict=False)), default=float("nan"))
    # read back the region and judge it against the journal
    img = case / "region.bin"
    rd = subprocess.run([SYSTEM_PYTHON, str(CLIENTS / "nbd_tool.py"), "read", uri, "0", str(KILL_BLOCKS * 4096),
                         str(img)], capture_output=True, text=True, timeout=300)
    rj = json.loads(rd.stdout.strip().splitlines()[-1])
    j = Journal.load(journal)
    problems = judge(img.read_bytes(), j, KILL_BLOCKS) if rj.get("ok") else [f"read failed: {rj}"]
    lost = sum(1 for p in problems if "lost" in p)
    img.unlink(missing_ok=True)
    st = cl.status()
    g2 = next(x for x in st["groups"] if x["group"] == gid)
    timeline = [((t - t_kill_ns) / 1e9, n) for t, n in marks]
    return {
        "mode": mode, "killed": victim_role, "node": victim, "group": gid, "writer": result,
        "acked": len(j.acked), "acked_before_kill": acks_before, "failed": len(j.failed),
        "pause_s": gap_s, "resumed_after_kill_s": resumed_s, "longest_gap_before_kill_s": longest_before_s,
        "volume": volume,
        "problems": problems[:20], "problem_count": len(problems), "lost_writes": lost,
        "members_after": g2["members"], "epoch_after": g2["epoch"], "timeline": timeline,
    }


# -- report -----------------------------------------------------------------------------------------------------

def _f(v: float, nd: int = 0) -> str:
    return "-" if v != v else f"{v:,.{nd}f}"


def markdown(runs: list[Run], jobs: list[str], names: list[str], kills: list[dict[str, Any]], settings: str) -> str:
    by: dict[tuple[str, str], list[Run]] = {}
    at: dict[tuple[str, str, int], Run] = {}
    for r in runs:
        by.setdefault((r.job, r.target), []).append(r)
        at[(r.job, r.target, r.round)] = r

    def ratios(job: str, a: str, b: str, metric: str) -> dict[str, float]:
        out = []
        for r in by.get((job, a), []):
            o = at.get((job, b, r.round))
            if o is not None and getattr(o, metric):
                out.append(getattr(r, metric) / getattr(o, metric))
        return spread(out)

    def rs(s: dict[str, float], nd: int = 2) -> str:
        return "-" if s["n"] == 0 else f"{_f(s['median'], nd)} [{_f(s['min'], nd)}-{_f(s['max'], nd)}]"

    lines = [f"## raftblock bench-compare: Raft vs chain ({settings})", "",
             "| job | target | IOPS median [min-max] | MB/s | p50 us | p99 us | CPU us/IO | x qemu-nbd IOPS | chain / raft IOPS | chain / raft p99 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        for t in names:
            rr = by.get((job, t), [])
            if not rr:
                continue
            io = spread([r.iops for r in rr])
            cpus = [r.cpu.target_us_per_io + r.cpu.loadgen_us_per_io for r in rr if r.cpu is not None]
            base = rs(ratios(job, t, BASELINE, "iops")) if t != BASELINE else "(baseline)"
            cvr = rs(ratios(job, "chain", "raft", "iops")) if t == "chain" else ""
            cvr99 = rs(ratios(job, "chain", "raft", "p99_us")) if t == "chain" else ""
            ddir = rr[0].extra.get("ddir", "")
            lat_note = " (writes)" if ddir == "read+write" else ""
            lines.append(f"| {job} | {t} | {_f(io['median'])} [{_f(io['min'])}-{_f(io['max'])}] | "
                         f"{_f(med([r.mb_s for r in rr]), 1)} | {_f(med([r.p50_us for r in rr]))}{lat_note} | "
                         f"{_f(med([r.p99_us for r in rr]))} | {_f(med(cpus)) if cpus else '-'} | {base} | {cvr} | {cvr99} |")
    lines += ["", "IOPS: all directions together; p50/p99: fio completion latency of the writes (of the reads for read "
              "jobs; randrw: writes). Ratios per round, median [min-max] over rounds. CPU us/IO: every process of the "
              "target (the whole cluster: 3 nodes, 3 metadata, gateway) + fio."]
    if kills:
        lines += ["", "### kill -9 under a steady QD8 tagged-write load (4 KiB-32 KiB writes, some FUA, flushes)", "",
                  "| volume | killed | I/O pause s (longest gap after the kill) | kill to resumed s | "
                  "longest gap before the kill s | acked writes | failed requests | lost acked writes | members after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in kills:
            lines.append(f"| {k['mode']} | {k['killed']} (n{k['node']}) | {_f(k['pause_s'], 2)} | "
                         f"{_f(k['resumed_after_kill_s'], 2)} | {_f(k['longest_gap_before_kill_s'], 2)} | {k['acked']} | "
                         f"{k['failed']} | {k['lost_writes']} ({k['problem_count']} problems) | "
                         f"{k['members_after']} e{k['epoch_after']} |")
    return "\n".join(lines)


def plots(runs: list[Run], jobs: list[str], names: list[str], kills: list[dict[str, Any]], stem: Path,
          title: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from run import Results, plot

    out = []
    bars = stem.with_name(stem.name + "-bars.png")
    if plot(Results(runs), jobs, names, bars, title):
        out.append(bars)
    # latency CDFs: the median round's percentile curve of each target, one panel per job
    lat_jobs = [j for j in jobs if any(r.job == j for r in runs)]
    if lat_jobs:
        cols = 4
        rows = (len(lat_jobs) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, job in zip(axes.flat, lat_jobs, strict=False):
            for ti, t in enumerate(names):
                rr = sorted((r for r in runs if r.job == job and r.target == t), key=lambda r: r.iops)
                if not rr:
                    continue
                r = rr[len(rr) // 2]
                for d, style in (("write", "-"), ("read", "--")):
                    pct = r.extra.get(f"{d}_percentiles_us")
                    if not pct:
                        continue
                    pts = sorted((v, float(k) / 100) for k, v in pct.items())
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[ti % len(colors)],
                            label=f"{t} {d}")
            ax.set_xscale("log")
            ax.set_title(job, fontsize=9)
            ax.set_xlabel("latency us")
            ax.set_ylabel("fraction <=")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(lat_jobs):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        p = stem.with_name(stem.name + "-cdf.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        out.append(p)
    if kills:
        fig, axes = plt.subplots(len(kills), 1, figsize=(10, 2.6 * len(kills)), squeeze=False, sharex=True)
        for ax, k in zip(axes.flat, kills, strict=False):
            bins: dict[int, int] = {}
            for t, n in k["timeline"]:
                b = int(t * 10) if t >= 0 else int(t * 10) - 1
                bins[b] = bins.get(b, 0) + n
            if bins:
                xs = list(range(min(bins), max(bins) + 1))
                ax.bar([x / 10 for x in xs], [bins.get(x, 0) * 10 for x in xs], width=0.1, align="edge")
            ax.axvline(0, color="red", lw=1)
            ax.set_ylabel("completions/s")
            ax.set_title(f"{k['mode']}: kill -9 of the {k['killed']} (n{k['node']}) at t=0; pause "
                         f"{_f(k['pause_s'], 2)} s, lost acked writes {k['lost_writes']}", fontsize=9)
            ax.grid(alpha=0.3)
        axes.flat[-1].set_xlabel("seconds from the kill (100 ms bins)")
        fig.tight_layout()
        p = stem.with_name(stem.name + "-kills.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        out.append(p)
    return out


# -- main -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 64 MiB region, short kill cases")
    p.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    p.add_argument("--runtime", type=int, help="measured seconds per run (default 7; quick 3)")
    p.add_argument("--ramp", type=int, help="unmeasured warm-up seconds per run (default 1)")
    p.add_argument("--size", help="region the jobs touch (default 256M; quick 64M)")
    p.add_argument("--jobs", help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--no-kill", action="store_true", help="skip the kill -9 cases")
    p.add_argument("--workdir", help="where the targets keep their data (default: a temp dir, removed after)")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    runtime_s = args.runtime or (3 if args.quick else 7)
    ramp_s = args.ramp if args.ramp is not None else 1
    size = parse_size(args.size or ("64M" if args.quick else "256M"))
    jobs = args.jobs.split(",") if args.jobs else JOBS
    if set(jobs) - set(JOBS):
        p.error(f"unknown jobs {sorted(set(jobs) - set(JOBS))}")
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (make sysdeps)")
    before_s, after_s = (3.0, 8.0) if args.quick else (5.0, 15.0)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = RESULTS / f"compare-{stamp}{'-quick' if args.quick else ''}"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raftblock-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    cl = SharedCluster()
    targets: list[Target] = [VolumeTarget("raft", cl), VolumeTarget("chain", cl), QemuNbdTarget()]
    names = [t.name for t in targets]
    bench = Bench(targets, work, size, runtime_s, ramp_s)
    runs: list[Run] = []
    kills: list[dict[str, Any]] = []
    t0 = time.monotonic()
    print(f"bench-compare: {len(jobs) * len(targets) * rounds} runs ({len(jobs)} jobs x {', '.join(names)}; "
          f"{rounds} rounds), {runtime_s}s (+{ramp_s}s ramp) each, region {size >> 20} MiB; then "
          f"{0 if args.no_kill else len(KILL_CASES)} kill cases; work dir {work}", flush=True)
    try:
        for t in targets:
            s0 = time.monotonic()
            bench.uris[t.name] = t.start(work)
            print(f"  {t.name}: {bench.uris[t.name]} up in {time.monotonic() - s0:.1f}s, pre-filled "
                  f"{size >> 20} MiB in {bench.prefill(t):.1f}s", flush=True)
        for rnd in range(rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for job in jobs:
                for t in order:
                    r = measure(bench, job, t, rnd)
                    runs.append(r)
                    print(f"  round {rnd} {job:<18} {t.name:<9} {r.iops:>9.0f} IOPS {r.mb_s:>7.1f} MB/s "
                          f"p50 {r.p50_us:>7.0f}us p99 {r.p99_us:>8.0f}us  load {r.machine.load_before:.2f}",
                          flush=True)
        if not args.no_kill:
            for i, (mode, role) in enumerate(KILL_CASES):
                k = kill_case(cl, work, mode, role, before_s, after_s, seed=100 + i)
                kills.append(k)
                print(f"  kill {mode} {role} (n{k['node']}): pause {k['pause_s']:.2f}s, resumed "
                      f"{k['resumed_after_kill_s']:.2f}s after the kill, acked {k['acked']}, failed {k['failed']}, "
                      f"lost {k['lost_writes']} ({k['problem_count']} problems: {k['problems'][:2]})", flush=True)
    finally:
        bench.stop_all()
        cl.down()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    loads = [r.machine.load_before for r in runs] or [float("nan")]
    settings = (f"{stamp}, {rounds} round(s) x {runtime_s}s, region {size >> 20} MiB, load "
                f"{min(loads):.1f}-{max(loads):.1f}, {os.cpu_count()} CPUs, {time.monotonic() - t0:.0f}s")
    md = markdown(runs, jobs, names, kills, settings)
    print()
    print(md)
    stem.with_suffix(".md").write_text(md + "\n")
    doc = {"when": stamp, "settings": {"rounds": rounds, "runtime_s": runtime_s, "ramp_s": ramp_s, "region_bytes": size,
                                       "jobs": jobs, "targets": names, "baseline": BASELINE, "kill_qd": KILL_QD,
                                       "kill_blocks": KILL_BLOCKS, "kill_before_s": before_s, "kill_after_s": after_s},
           "targets": {t.name: t.describe() for t in targets}, "versions": versions(),
           "runs": [asdict(r) for r in runs], "kills": kills, "markdown": md}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    print(f"results: {stem.with_suffix('.md')} {stem.with_suffix('.json')}")
    for png in plots(runs, jobs, names, kills, stem, f"raftblock bench-compare {settings}"):
        print(f"chart:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
