"""Snapshots and backups (`make bench-snapshot`): what a snapshot costs the host writing the volume, and how fast
backups go out and come back.

Owns: one cluster as `make demo` starts it (3 nodes, 3 racks, Raft, NBD served by the nodes, disk=os) in a temp
directory, a 1 GiB volume filled with half-compressible data (fio buffer_compress_percentage=50), and:

1. Snapshot create under load: fio 4k randwrite QD32 (bench/jobs/block.fio's job, on the first 256 MiB) for
   --seconds, once without snapshots and once while `snapshot create` runs in a loop (one a second), the two
   interleaved in every round. Reported: create latency p50/p99 (the command's whole path: metadata records,
   the gateway's barrier, the SNAP op in both groups, ready), the foreground p99 with and without, and their
   ratio; the snapshots are deleted afterwards (delete latency too).
2. Export of the whole 1 GiB snapshot to a directory store (fresh each round: no dedup help): MB/s of volume
   bytes, next to this machine's single-core zstd level 1 throughput on the same data (compress only, and the
   exporter's whole per-chunk work: SHA-256 + CRC32C + zstd), measured in the same run.
3. Incremental: 1 % of the volume rewritten (4k random writes, 10 MiB), a second snapshot, `--since` the
   first: bytes uploaded / bytes changed.
4. Restore of the full backup into a new volume: MB/s.
5. Dedup: two clones of one snapshot, each with its own contiguous 1 % rewritten, both exported to one fresh
   store: the plaintext bytes of both backups' data chunks / the bytes the store holds (compression and
   dedup together), and the share of the second export's objects already in the store (dedup alone).
Nothing asserts; medians [min-max] over --rounds go to a table with the goals of issue 17, and JSON to
bench/results/snapshot-<time>[-quick].json.

Usage: python bench/snapshot.py [--quick] [--rounds 3] [--seconds 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))

GiB = 1 << 30
MiB = 1 << 20
FG_BYTES = 256 * MiB


def fio(uri: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0 or "{" not in out.stdout:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr[-2000:]}")
    w = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3}


def randwrite(uri: str, seconds: float) -> dict[str, Any]:
    return fio(uri, "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={FG_BYTES}", "--time_based",
               f"--runtime={seconds}", "--norandommap", "--randrepeat=0")


def pct(vals: list[float], p: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


def zstd_limit(sample: bytes) -> dict[str, float]:
    """Single-core MB/s of zstd level 1 alone, and of the exporter's whole per-chunk work, on 4 MiB chunks."""
    import crc32c
    import zstandard

    from raftblock.backup import chunk

    cctx = zstandard.ZstdCompressor(level=1)
    chunks = [sample[i : i + chunk.CHUNK_BYTES] for i in range(0, len(sample), chunk.CHUNK_BYTES)]
    t0 = time.process_time()
    for c in chunks:
        cctx.compress(c)
    zt = time.process_time() - t0
    t0 = time.process_time()
    for c in chunks:
        hashlib.sha256(c).digest()
        crc32c.crc32c(c)
        chunk.encode(c)
    et = time.process_time() - t0
    return {"zstd1_mb_s": len(sample) / zt / 1e6, "chunk_work_mb_s": len(sample) / et / 1e6}


def store_bytes(path: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in (path / prefix).rglob("*") if p.is_file()) if (path / prefix).exists() else 0


def snapshot_loop(create: Any, stop: threading.Event, lat: list[float], made: list[str], prefix: str) -> None:
    """`create(name)` once a second until `stop`; each call's latency (ms) into `lat`, its name into `made`."""
    k = 0
    while not stop.is_set():
        k += 1
        name = f"{prefix}{k}"
        t0 = time.monotonic()
        create(name)
        lat.append((time.monotonic() - t0) * 1000)
        made.append(name)
        stop.wait(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB volume, 1 round, 4 s phases")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="each foreground phase (default 10; quick 4)")
    ap.add_argument("--workdir", help="where the cluster and the stores live (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        ap.error("fio not found (make sysdeps)")
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    size = 256 * MiB if args.quick else GiB
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raftblock-bench-snap-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "cluster"

    from raftblock.backup.store import DirStore
    from raftblock.obs.log import configure

    configure("console", "warning")
    from raftblock.node.cluster import (
        cluster_down,
        cluster_up,
        snapshot_create,
        snapshot_delete,
        snapshot_export,
        snapshot_restore,
        volume_clone,
        volume_create,
        volume_delete,
    )

    res: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        res.setdefault(k, []).append(v)

    t_start = time.monotonic()
    try:
        base = cluster_up(root, nbd_port=0, disk="os")
        volume_create(root, "vol", size)
        uri = f"{base}/vol"
        print(f"bench-snapshot: cluster in {root}; filling {size >> 20} MiB (half-compressible data)", flush=True)
        fio(uri, "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}", "--buffer_compress_percentage=50",
            "--refill_buffers")
        r = subprocess.run(["/usr/bin/python3", "-c", "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
                            "[sys.stdout.buffer.write(h.pread(4<<20, k<<22)) for k in range(16)]", uri],
                           capture_output=True, timeout=120)
        if r.returncode != 0 or len(r.stdout) != 64 * MiB:
            raise RuntimeError(f"reading a sample of the volume failed: {r.stderr[-500:]!r}")
        lim = zstd_limit(r.stdout)
        print(f"  zstd level 1, one core: {lim['zstd1_mb_s']:.0f} MB/s; SHA-256 + CRC32C + zstd per chunk: "
              f"{lim['chunk_work_mb_s']:.0f} MB/s", flush=True)
        add("zstd1_mb_s", lim["zstd1_mb_s"])
        add("chunk_work_mb_s", lim["chunk_work_mb_s"])
        for rnd in range(rounds):
            # 1. create under load, interleaved with the same load without snapshots
            order = ["without", "with"] if rnd % 2 == 0 else ["with", "without"]
            made: list[str] = []
            for phase in order:
                if phase == "without":
                    f = randwrite(uri, seconds)
                    add("fg_p99_without_us", f["p99_us"])
                    add("fg_iops_without", f["iops"])
                    continue
                lat: list[float] = []
                stop = threading.Event()
                th = threading.Thread(target=snapshot_loop,
                                      args=(lambda nm: snapshot_create(root, ["vol"], nm), stop, lat, made, f"r{rnd}-"))
                th.start()
                try:
                    f = randwrite(uri, seconds)
                finally:
                    stop.set()
                    th.join()
                add("fg_p99_with_us", f["p99_us"])
                add("fg_iops_with", f["iops"])
                res.setdefault("create_ms", []).extend(lat)
            for name in made:
                t0 = time.monotonic()
                snapshot_delete(root, "vol", name)
                res.setdefault("delete_ms", []).append((time.monotonic() - t0) * 1000)
            print(f"  round {rnd + 1}: fg p99 without {res['fg_p99_without_us'][-1]:.0f} us, with "
                  f"{res['fg_p99_with_us'][-1]:.0f} us; create p99 so far {pct(res['create_ms'], 99):.1f} ms",
                  flush=True)

            # 2. full export to a fresh directory store
            snapshot_create(root, ["vol"], f"full{rnd}")
            store_dir = work / f"store{rnd}"
            t0 = time.monotonic()
            ex = snapshot_export(root, "vol", f"full{rnd}", DirStore(str(store_dir)))
            add("export_mb_s", size / (time.monotonic() - t0) / 1e6)
            # 3. incremental: 1 % rewritten
            fio(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", f"--io_size={size // 100}",
                "--norandommap", f"--randseed={rnd + 7}", "--buffer_compress_percentage=50", "--refill_buffers")
            snapshot_create(root, ["vol"], f"inc{rnd}")
            inc = snapshot_export(root, "vol", f"inc{rnd}", DirStore(str(store_dir)), since=f"full{rnd}")
            add("incremental_upload_per_changed", inc["uploaded_bytes"] / (size // 100))
            add("incremental_changed_chunks", inc["changed_chunks"] or 0)
            # 4. restore of the full backup
            t0 = time.monotonic()
            snapshot_restore(root, DirStore(str(store_dir)), f"back{rnd}", snapshot=f"full{rnd}", from_volume="vol")
            add("restore_mb_s", size / (time.monotonic() - t0) / 1e6)
            volume_delete(root, f"back{rnd}")
            # 5. dedup of two clones of one snapshot, each 1 % rewritten
            dd = work / f"dedup{rnd}"
            logical = 0
            for k, c in enumerate(("ca", "cb")):  # each rewrites its own contiguous 1 % (a guest's update)
                volume_clone(root, f"vol@full{rnd}", c)
                fio(f"{base}/{c}", "--rw=write", "--bs=1m", "--iodepth=8", f"--offset={(k + 1) * size // 4}",
                    f"--size={size // 100}", "--refill_buffers")
                snapshot_create(root, [c], "s")
                e = snapshot_export(root, c, "s", DirStore(str(dd)))
                logical += e["changed_bytes"]  # plaintext bytes of the chunks it read (holes are not data)
            add("dedup_ratio", logical / max(1, store_bytes(dd, "chunks")))
            add("dedup_second_reused", e["reused_objects"] / max(1, e["reused_objects"] + e["uploaded_objects"]))
            for c in ("ca", "cb"):
                snapshot_delete(root, c, "s")
                volume_delete(root, c)
            for nm in (f"inc{rnd}", f"full{rnd}"):
                snapshot_delete(root, "vol", nm)
            shutil.rmtree(store_dir, ignore_errors=True)
            shutil.rmtree(dd, ignore_errors=True)
            print(f"  round {rnd + 1}: export {res['export_mb_s'][-1]:.0f} MB/s ({ex['uploaded_bytes'] >> 20} MiB "
                  f"stored), incremental {res['incremental_upload_per_changed'][-1]:.2f}x changed, restore "
                  f"{res['restore_mb_s'][-1]:.0f} MB/s, dedup {res['dedup_ratio'][-1]:.2f}x", flush=True)
    finally:
        try:
            cluster_down(root)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(res[k])

    def span(k: str) -> str:
        return f"{med(k):.1f} [{min(res[k]):.1f}-{max(res[k]):.1f}]"

    ratio = med("fg_p99_with_us") / med("fg_p99_without_us")
    rows = [
        ("snapshot create p50 (ms), under 4k QD32 writes", f"{pct(res['create_ms'], 50):.1f}", "", ""),
        ("snapshot create p99 (ms)", f"{pct(res['create_ms'], 99):.1f}", "< 100",
         "met" if pct(res["create_ms"], 99) < 100 else "missed"),
        ("snapshot delete p50 / p99 (ms)", f"{pct(res['delete_ms'], 50):.1f} / {pct(res['delete_ms'], 99):.1f}", "", ""),
        ("foreground p99 without snapshots (us)", span("fg_p99_without_us"), "", ""),
        ("foreground p99 with a snapshot a second (us)", span("fg_p99_with_us"), "", ""),
        ("  ratio with / without", f"{ratio:.2f}", "<= 1.5", "met" if ratio <= 1.5 else "missed"),
        ("foreground IOPS without / with", f"{med('fg_iops_without'):.0f} / {med('fg_iops_with'):.0f}", "", ""),
        ("zstd level 1, one core (MB/s)", span("zstd1_mb_s"), "baseline", ""),
        ("SHA-256 + CRC32C + zstd per chunk, one core (MB/s)", span("chunk_work_mb_s"), "", ""),
        (f"full export of {size >> 20} MiB to a directory (MB/s)", span("export_mb_s"),
         f">= {0.5 * med('zstd1_mb_s'):.0f} (50 % of zstd-1)",
         "met" if med("export_mb_s") >= 0.5 * med("zstd1_mb_s") else "missed"),
        ("incremental (1 % rewritten): bytes uploaded / bytes changed", span("incremental_upload_per_changed"),
         "< 2", "met" if med("incremental_upload_per_changed") < 2 else "missed"),
        ("restore (MB/s)", span("restore_mb_s"), ">= 100", "met" if med("restore_mb_s") >= 100 else "missed"),
        ("dedup: two clones (1 % each rewritten), plaintext / stored", span("dedup_ratio"), "", ""),
        ("  the second clone's export: objects already in the store", span("dedup_second_reused"), "", ""),
    ]
    print()
    print(f"| figure (median [min-max] over {rounds} rounds) | value | goal | |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    print(f"\n{len(res['create_ms'])} snapshots created under load; {time.monotonic() - t_start:.0f} s in all")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"snapshot-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"raw": res, "rows": rows, "rounds": rounds, "seconds": seconds, "size": size},
                               indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
