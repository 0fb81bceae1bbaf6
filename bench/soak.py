"""Space amplification soak (`make bench-soak`): does segment cleaning keep a node's disk use bounded while a
volume is overwritten again and again, and what does a host see meanwhile?

Owns: one cluster as `make demo` starts it (3 nodes, 3 racks, Raft, NBD served by the nodes, disk=os) in a
temp directory, one volume, and a fio load of mixed random write sizes (4 KiB 40 %, 64 KiB 30 %, 256 KiB
20 %, 1 MiB 10 %, QD16) that overwrites the whole volume `--passes` times (5 by default), in slices of a
tenth of the volume.

Rules:
1. After each slice: every node's bytes on disk (its engine segments and checkpoint, its WAL segments, from
   st_blocks, so preallocated space counts and holes do not), the engine's live and garbage bytes and the
   bytes the cleaner moved (from the node's status), and the slice's fio IOPS, p50 and p99 (completion
   latency as the host sees it).
2. Space amplification = a node's bytes on disk / the volume's bytes (the volume is fully written after the
   first pass, so that is what a node must hold). Reported per slice (the largest node), with its maximum
   over the soak and its value at the end.
3. "Cleaning" = a slice during which some node's cleaner moved bytes; the p99 of those slices is reported
   beside the p99 of the others, so the cost of cleaning to the foreground shows.
4. Nothing here asserts; it measures and prints a table, and writes bench/results/soak-<time>.json.

Usage: python bench/soak.py [--quick] [--size 512M] [--passes 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
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
sys.path.insert(0, str(REPO))

BSSPLIT = "4k/40:64k/30:256k/20:1m/10"
SLICES_PER_PASS = 10


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


def dir_bytes(path: Path) -> int:
    """Bytes a directory's files take on disk (st_blocks: preallocated space counts, holes do not)."""
    total = 0
    for f in path.rglob("*"):
        try:
            st = f.lstat()
        except OSError:
            continue
        if f.is_file():
            total += st.st_blocks * 512
    return total


def node_status(root: Path) -> dict[int, dict[str, int]]:
    from raftblock.node.cluster import cluster_status

    out = {}
    for n in cluster_status(root)["nodes"]:
        c = n.get("counters", {})
        out[int(n["id"])] = {k: int(v) for k, v in c.items() if k.startswith("engine_")}
    return out


def fio_slice(uri: str, size: int, io_bytes: int, seed: int) -> dict[str, float]:
    cmd = ["fio", "--name=soak", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", f"--bssplit={BSSPLIT}",
           "--iodepth=16", f"--size={size}", f"--io_size={io_bytes}", f"--randseed={seed}", "--norandommap",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0 or "{" not in out.stdout:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr[-2000:]}")
    w = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "mb_s": w["bw"] * 1024 / 1e6, "p50_us": pct.get("50.000000", 0) / 1e3,
            "p99_us": pct.get("99.000000", 0) / 1e3, "bytes": w["io_bytes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB volume, 3 passes (about 2 minutes)")
    ap.add_argument("--size", help="volume size (default 512M; quick 128M)")
    ap.add_argument("--passes", type=int, help="times the volume is overwritten (default 5; quick 3)")
    ap.add_argument("--workdir", help="where the cluster keeps its data (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        ap.error("fio not found (make sysdeps)")
    size = parse_size(args.size or ("128M" if args.quick else "512M"))
    passes = args.passes or (3 if args.quick else 5)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raftblock-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "cluster"

    from raftblock.node.cluster import cluster_down, cluster_up, volume_create
    from raftblock.node.clustermap import ClusterMap

    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        uri = cluster_up(root, nbd_port=0, disk="os") + "/soak"
        volume_create(root, "soak", size)
        nodes = [n.node_id for n in ClusterMap.load(root / "cluster.json").nodes]
        slice_bytes = size // SLICES_PER_PASS
        print(f"soak: {size >> 20} MiB volume overwritten {passes}x in slices of {slice_bytes >> 20} MiB, "
              f"bssplit {BSSPLIT}, QD16; cluster in {root}", flush=True)
        print(f"{'slice':>5} {'written':>8} {'IOPS':>6} {'MB/s':>6} {'p50 us':>7} {'p99 us':>8} "
              f"{'disk/vol (max node)':>19} {'engine/vol':>10} {'live MiB':>9} {'garbage MiB':>11} "
              f"{'cleaned MiB':>11}", flush=True)
        before = node_status(root)
        for i in range(passes * SLICES_PER_PASS):
            f = fio_slice(uri, size, slice_bytes, 1000 + i)
            after = node_status(root)
            eng = {n: dir_bytes(root / f"n{n}" / "engine") for n in nodes}
            wal = {n: dir_bytes(root / f"n{n}" / "wal") for n in nodes}
            disk = {n: eng[n] + wal[n] for n in nodes}
            cleaned = {n: after[n].get("engine_cleaned_bytes", 0) - before[n].get("engine_cleaned_bytes", 0)
                       for n in nodes}
            live = max(after[n].get("engine_live_bytes", 0) for n in nodes)
            garbage = max(after[n].get("engine_garbage_bytes", 0) for n in nodes)
            amp = max(disk.values()) / size
            amp_engine = max(eng.values()) / size
            row = {"slice": i, "written_x": (i + 1) / SLICES_PER_PASS, **f, "disk_bytes": disk, "amp": amp,
                   "engine_bytes": eng, "wal_bytes": wal, "amp_engine": amp_engine,
                   "live_bytes_max": live, "garbage_bytes_max": garbage, "cleaned_bytes": cleaned,
                   "cleaning": any(v > 0 for v in cleaned.values())}
            rows.append(row)
            before = after
            print(f"{i:>5} {row['written_x']:>7.1f}x {f['iops']:>6.0f} {f['mb_s']:>6.1f} {f['p50_us']:>7.0f} "
                  f"{f['p99_us']:>8.0f} {amp:>19.2f} {amp_engine:>10.2f} {live >> 20:>9} {garbage >> 20:>11} "
                  f"{max(cleaned.values()) >> 20:>11}", flush=True)
    finally:
        try:
            cluster_down(root)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)

    settled = [r for r in rows if r["written_x"] > 1.0]  # after the first pass: the volume is fully written
    amps = [r["amp"] for r in settled] or [r["amp"] for r in rows]
    amps_engine = [r["amp_engine"] for r in settled] or [r["amp_engine"] for r in rows]
    cl = [r["p99_us"] for r in rows if r["cleaning"]]
    quiet = [r["p99_us"] for r in rows if not r["cleaning"]]
    summary = {
        "volume_bytes": size, "passes": passes, "bssplit": BSSPLIT,
        "space_amplification_max": max(amps), "space_amplification_end": rows[-1]["amp"],
        "engine_amplification_max": max(amps_engine), "engine_amplification_end": rows[-1]["amp_engine"],
        "p99_us_cleaning_median": statistics.median(cl) if cl else None,
        "p99_us_not_cleaning_median": statistics.median(quiet) if quiet else None,
        "slices_cleaning": len(cl), "slices": len(rows), "seconds": time.monotonic() - t_start,
    }
    print()
    print(f"space amplification (largest node's engine + WAL bytes on disk / volume bytes), after the first pass: "
          f"max {summary['space_amplification_max']:.2f}, at the end {summary['space_amplification_end']:.2f}; "
          f"the engine's alone (what cleaning bounds): max {summary['engine_amplification_max']:.2f}, at the end "
          f"{summary['engine_amplification_end']:.2f} (the WAL holds up to wal_compact_bytes, 256 MiB, before a "
          f"compaction cuts it)")

    def fmt(v: float | None) -> str:
        return f"{v:.0f} us" if v is not None else "n/a"

    print(f"foreground p99 (median over slices): while the cleaner moved data {fmt(summary['p99_us_cleaning_median'])} "
          f"({len(cl)} slices), otherwise {fmt(summary['p99_us_not_cleaning_median'])} ({len(quiet)} slices)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
