#!/usr/bin/env python3
"""`make bench-qos`: per-volume QoS on a 3-node cluster (issue 20), every figure measured in one run.

For each node setting of `qos_slots_ops` (the requests a node lets into replication at once; `--slots`,
default 64 = the default and 16), one `raftblock cluster up` (embedded gateways; every volume attached
through node 1, which leads their groups) and fio's nbd engine as the hosts:

1. isolation: a quiet volume at QD1 (4 KiB random writes) alone, then beside a noisy volume at QD64 without a
   limit, then with each limit of `--limits`: p50/p99 and the ratio of p99 to the solo p99 (goal: <= 2x once
   the noisy volume has a limit), medians over `--rounds`;
2. a limit over `--limit-seconds` (30): the noisy volume at QD64 under `--hold-limit` IOPS: achieved / limit
   (goal: within 5 %);
3. a reservation while the node is saturated: a volume of weight 100 at QD128 beside one of weight 1 at QD32,
   without and with a reservation of `--reservation` IOPS: achieved / reserved (goal: >= 0.95).

The reference row is qemu-nbd (--cache=none) serving a raw file on the same disk, the quiet job alone.
Results: a table on stdout and bench/results/qos-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
RAFTBLOCK = [sys.executable, "-m", "raftblock.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fio(uri: str, name: str, qd: int, seconds: int, out: Path, ramp_s: int = 0) -> subprocess.Popen[bytes]:
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            f"--iodepth={qd}", "--time_based", f"--runtime={seconds}", "--size=256M", "--output-format=json",
            f"--output={out / (name + '.json')}"]
    if ramp_s:
        argv.append(f"--ramp_time={ramp_s}")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def result(p: subprocess.Popen[bytes], out: Path, name: str) -> dict[str, float]:
    _, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"fio {name} failed: {err.decode()[-1000:]}")
    text = (out / (name + ".json")).read_text()
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"]["percentile"]
    return {"iops": w["iops"], "p50_ms": pct["50.000000"] / 1e6, "p99_ms": pct["99.000000"] / 1e6}


def run_job(uri: str, name: str, qd: int, seconds: int, out: Path, ramp_s: int = 0) -> dict[str, float]:
    return result(fio(uri, name, qd, seconds, out, ramp_s), out, name)


class Cluster:
    def __init__(self, root: Path, slots: int) -> None:
        self.root = root
        self.slots = slots
        self.uri = ""

    def cli(self, *args: str) -> str:
        r = subprocess.run([*RAFTBLOCK, *args, "--dir", str(self.root)], capture_output=True, text=True,
                           timeout=180, cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"raftblock {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def up(self) -> None:
        self.cli("cluster", "up", "--nbd-port", "0", "--iscsi-port", "0")
        self.cli("cluster", "down")
        for cfg in sorted((self.root / "nodes").glob("n*.toml")):
            cfg.write_text(cfg.read_text() + f"\n[raft]\nqos_slots_ops = {self.slots}\n")
        self.uri = self.cli("cluster", "up", "--nbd-port", "0", "--iscsi-port", "0").strip().splitlines()[-1]

    def down(self) -> None:
        subprocess.run([*RAFTBLOCK, "cluster", "down", "--dir", str(self.root)], capture_output=True, timeout=120,
                       cwd=REPO)

    def nbd(self, volume: str) -> str:
        return f"{self.uri}/{volume}"


def qemu_nbd_solo(work: Path, seconds: int) -> dict[str, float]:
    img = work / "qemu.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    port = free_port()
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native", "-t", "-e", "4", "-p", str(port),
                          "-b", "127.0.0.1", "-x", "q", str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise SystemExit("qemu-nbd did not start") from None
                time.sleep(0.05)
        return run_job(f"nbd://127.0.0.1:{port}/q", "qemu-nbd-qd1", 1, seconds, work, ramp_s=1)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
        img.unlink()


def one_setting(slots: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    c = Cluster(work / f"cluster-{slots}", slots)
    out = work / f"fio-{slots}"
    out.mkdir()
    c.up()
    try:
        c.cli("volume", "create", "quiet", "--size", "1G")
        c.cli("volume", "create", "noisy", "--size", "1G")
        s, ramp = args.seconds, 2
        rows: dict[str, list[dict[str, float]]] = {"solo": [], "unlimited": []}
        for lim in args.limits:
            rows[f"limit {lim}"] = []
        for rnd in range(args.rounds):
            print(f"  slots {slots}, round {rnd + 1}/{args.rounds}", file=sys.stderr)
            rows["solo"].append(run_job(c.nbd("quiet"), f"solo-{rnd}", 1, s, out, ramp))
            for lim in [0, *args.limits]:
                c.cli("volume", "set-qos", "noisy", "--clear", *(["--iops", str(lim)] if lim else []))
                noisy = fio(c.nbd("noisy"), f"noisy-{lim}-{rnd}", 64, s + ramp + 2, out)
                time.sleep(1)  # fio connecting: the quiet job's ramp covers the rest
                q = run_job(c.nbd("quiet"), f"quiet-{lim}-{rnd}", 1, s, out, ramp)
                result(noisy, out, f"noisy-{lim}-{rnd}")
                rows[f"limit {lim}" if lim else "unlimited"].append(q)
        iso = {k: {m: statistics.median(r[m] for r in v) for m in ("iops", "p50_ms", "p99_ms")}
               for k, v in rows.items()}
        # a limit over --limit-seconds
        c.cli("volume", "set-qos", "noisy", "--clear", "--iops", str(args.hold_limit))
        hold = run_job(c.nbd("noisy"), "hold", 64, args.limit_seconds, out)
        # a reservation while the node is saturated
        c.cli("volume", "create", "heavy", "--size", "1G", "--weight", "100")
        c.cli("volume", "create", "reserved", "--size", "1G")
        heavy = fio(c.nbd("heavy"), "heavy", 128, 2 * (s + ramp) + 20, out)  # outlasts both runs beside it
        time.sleep(2)
        without = run_job(c.nbd("reserved"), "weight-only", 32, s, out, ramp)
        c.cli("volume", "set-qos", "reserved", "--min-iops", str(args.reservation))
        with_res = run_job(c.nbd("reserved"), "reserved", 32, s, out, ramp)
        heavy_r = result(heavy, out, "heavy")
        return {"slots": slots, "isolation": iso, "rounds": rows, "hold": hold, "hold_limit": args.hold_limit,
                "reservation": args.reservation, "weight_only": without, "with_reservation": with_res,
                "heavy": heavy_r}
    finally:
        c.down()


def table(ref: dict[str, float], settings: list[dict[str, Any]]) -> str:
    lines = ["| qos_slots_ops | quiet QD1 beside the noisy volume | IOPS | p50 ms | p99 ms | p99 / solo p99 |",
             "|---|---|---|---|---|---|",
             f"| (qemu-nbd, one copy) | alone | {ref['iops']:.0f} | {ref['p50_ms']:.2f} | {ref['p99_ms']:.2f} | |"]
    for st in settings:
        solo = st["isolation"]["solo"]["p99_ms"]
        for k, v in st["isolation"].items():
            what = {"solo": "alone", "unlimited": "noisy QD64, no limit"}.get(k, f"noisy QD64, {k} IOPS")
            lines.append(f"| {st['slots']} | {what} | {v['iops']:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                         f"{v['p99_ms'] / solo:.2f} |")
    lines += ["", "| qos_slots_ops | check | achieved IOPS | target | ratio |", "|---|---|---|---|---|"]
    for st in settings:
        lines.append(f"| {st['slots']} | limit held over the run (noisy QD64) | {st['hold']['iops']:.0f} | "
                     f"{st['hold_limit']} | {st['hold']['iops'] / st['hold_limit']:.3f} |")
        lines.append(f"| {st['slots']} | weight 1 beside weight 100 at QD128, no reservation (QD32) | "
                     f"{st['weight_only']['iops']:.0f} | {st['reservation']} | "
                     f"{st['weight_only']['iops'] / st['reservation']:.3f} |")
        lines.append(f"| {st['slots']} | ... with the reservation | {st['with_reservation']['iops']:.0f} | "
                     f"{st['reservation']} | {st['with_reservation']['iops'] / st['reservation']:.3f} |")
        lines.append(f"| {st['slots']} | (the weight-100 volume meanwhile) | {st['heavy']['iops']:.0f} | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", default="64,16", help="qos_slots_ops settings to run (default 64,16)")
    ap.add_argument("--limits", default="200,500,1000", help="noisy volume IOPS limits (default 200,500,1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the isolation runs (median; default 3)")
    ap.add_argument("--seconds", type=int, default=10, help="measured seconds per isolation run (default 10)")
    ap.add_argument("--limit-seconds", type=int, default=30, help="length of the limit run (default 30)")
    ap.add_argument("--hold-limit", type=int, default=500, help="IOPS limit of the limit run (default 500)")
    ap.add_argument("--reservation", type=int, default=250, help="reserved IOPS (default 250)")
    ap.add_argument("--quick", action="store_true", help="one round, 5 s runs, a 10 s limit run")
    ap.add_argument("--workdir", default=None, help="where clusters and files go (default: a temp dir)")
    args = ap.parse_args()
    args.slots = [int(x) for x in args.slots.split(",")]
    args.limits = [int(x) for x in args.limits.split(",")]
    if args.quick:
        args.rounds, args.seconds, args.limit_seconds = 1, 5, 10
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"bench/qos.py: {tool} is missing (make sysdeps installs it)", file=sys.stderr)
            return 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raftblock-qos-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        ref = qemu_nbd_solo(work, args.seconds)
        settings = [one_setting(s, args, work) for s in args.slots]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = table(ref, settings)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"qos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"started": t0, "args": vars(args), "qemu_nbd": ref, "settings": settings,
                                "table": text}, indent=1))
    print(f"\n{path.relative_to(REPO)} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
