"""Where a replicated write's time goes: one fio job against a fresh 3-node cluster, with the CPU of every
process split into user and system time per I/O, context switches per I/O, the group-commit counters of
every node (entries, WAL fdatasyncs), and, with --py-spy, the hottest Python frames of each process
(sampled while it holds the GIL, so a frame's share is CPU spent there, not waiting).

    .venv/bin/python bench/profile.py [--job randwrite-4k-qd32] [--seconds 8] [--py-spy]

The closing notes of issue 5 quote its output as the profile behind each goal not reached. py-spy is in the
`bench` extra (`make bench` installs it); without it only the /proc figures are printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from raftblock.node.cluster import cluster_down, cluster_status, cluster_up, volume_create  # noqa: E402

JOB_FILE = HERE / "jobs" / "block.fio"
COUNTERS = ("entries_proposed", "wal_syncs", "commits", "reads_lease_fast", "wal_recycled_rolls")


def _procs(root: Path) -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) in cmd and "python" in cmd:
            name = Path(cmd.split("--config", 1)[1].split()[0]).stem if "--config" in cmd else cmd[-30:]
            out[int(d.name)] = name
    return out


def _cpu(pid: int) -> tuple[int, int, int, int, int]:
    """utime, stime (ticks), voluntary context switches of every thread, minor page faults, bytes
    written through write/pwrite/send calls (wchar)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    vcsw = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        for line in (t / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vcsw += int(line.split()[1])
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(f[11]), int(f[12]), vcsw, int(f[7]), int(io["wchar"])


def _counters(root: Path) -> dict[int, dict[str, int]]:
    return {n["id"]: {k: int(n.get("counters", {}).get(k, 0)) for k in COUNTERS} for n in cluster_status(root)["nodes"]}


def _top(raw: Path, n: int) -> list[tuple[int, str]]:
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(total, "all samples")] + [(c, f) for f, c in own.most_common(n)]


def _inclusive(raw: Path, n: int) -> list[tuple[int, str]]:
    """Samples with each function anywhere on the stack (line numbers dropped, counted once per stack)."""
    inc: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        funcs = {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")}
        for f in funcs:
            inc[f] += int(count)
    return [(c, f) for f, c in inc.most_common(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="randwrite-4k-qd32")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size", type=int, default=64 << 20, help="bytes of the volume the job touches")
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--encrypt", action="store_true", help="the volume encrypted at rest (docs/encryption.md)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--keep", help="copy py-spy's raw stacks (one file per process) into this directory")
    ap.add_argument("--gateway", choices=["embedded", "separate"], default="embedded",
                    help="where NBD is served: the nodes (default) or a separate gateway process")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.py_spy and not Path(spy).exists():
        print("py-spy not installed (pip install py-spy)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="raftblock-profile-"))
    root = work / "cluster"
    uri = cluster_up(root, nbd_port=0, disk="os", gateway=args.gateway) + "/vol"
    try:
        volume_create(root, "vol", 1 << 30, encrypt=args.encrypt)
        env = dict(os.environ, NBD_URI=uri, SIZE=str(args.size), RUNTIME=str(args.seconds), RAMP="1")
        fio = ["fio", str(JOB_FILE), "--output-format=json"]
        subprocess.run([*fio, "--section=prefill"], env=env, capture_output=True, check=True)
        procs = _procs(root)
        c0 = _counters(root)
        t0 = {p: _cpu(p) for p in procs}
        spies = []
        if args.py_spy:
            for p in procs:
                spies.append(subprocess.Popen(
                    [spy, "record", "-p", str(p), "-d", str(args.seconds), "-r", "100", "-f", "raw", "--gil",
                     "--nonblocking", "-o", str(work / f"spy-{p}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        w0 = time.monotonic()
        out = subprocess.run([*fio, f"--section={args.job}"], env=env, capture_output=True, check=True).stdout
        wall = time.monotonic() - w0
        for s in spies:
            s.wait()
        t1 = {p: _cpu(p) for p in procs}
        c1 = _counters(root)
        job = json.loads(out[out.index(b"{"):])["jobs"][0]
        io = job["write"] if job["write"]["io_bytes"] else job["read"]
        ops = max(1, io["total_ios"])
        pct = io["clat_ns"]["percentile"]
        print(f"{args.job}: {io['iops']:.0f} IOPS, p50 {pct['50.000000'] / 1e3:.0f} us, "
              f"p99 {pct['99.000000'] / 1e3:.0f} us ({ops} I/Os in {wall:.1f} s incl. 1 s ramp)")
        hz = os.sysconf("SC_CLK_TCK")
        print(f"{'process':<10} {'CPU %':>6} {'usr us/IO':>10} {'sys us/IO':>10} {'vcsw/IO':>8} {'faults/IO':>9} {'KiB out/IO':>10}")
        tot = 0.0
        for p, name in sorted(procs.items(), key=lambda kv: kv[1]):
            du, ds = (t1[p][0] - t0[p][0]) / hz, (t1[p][1] - t0[p][1]) / hz
            tot += du + ds
            print(f"{name:<10} {100 * (du + ds) / wall:>6.1f} {du * 1e6 / ops:>10.0f} {ds * 1e6 / ops:>10.0f} "
                  f"{(t1[p][2] - t0[p][2]) / ops:>8.2f} {(t1[p][3] - t0[p][3]) / ops:>9.1f} "
                  f"{(t1[p][4] - t0[p][4]) / ops / 1024:>10.1f}")
        print(f"{'all':<10} {100 * tot / wall:>6.1f} {'':>10} {'':>10}   -> {tot * 1e6 / ops:.0f} us CPU per I/O")
        for nid in sorted(c1):
            d = {k: c1[nid][k] - c0.get(nid, {}).get(k, 0) for k in COUNTERS}
            print(f"node {nid}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                  + f" (WAL segments recycled since start: {c1[nid]['wal_recycled_rolls']})")
        for p, name in sorted(procs.items(), key=lambda kv: kv[1]):
            raw = work / f"spy-{p}.txt"
            if raw.exists():
                print(f"\npy-spy --gil, {name}: own samples of the hottest frames")
                for c, f in _top(raw, args.top):
                    print(f"  {c:>5}  {f[:110]}")
                print(f"py-spy --gil, {name}: samples with the function anywhere on the stack")
                for c, f in _inclusive(raw, args.top):
                    print(f"  {c:>5}  {f[:110]}")
                if args.keep:
                    shutil.copy(raw, Path(args.keep) / f"spy-{name}.txt")
    finally:
        cluster_down(root)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
