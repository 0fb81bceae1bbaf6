"""Micro-benchmark of raftblock/_fast: every Cython module against its pure-Python twin, same inputs,
same process (docs/fast.md keeps the latest table).

Each operation is timed with timeit: the loop count is picked by `Timer.autorange` (>= 0.2 s per
repeat; 0.05 s with --quick), then the median per-call time of 5 repeats is reported, in µs. The
machine is shared: the 1-minute load average before the run is recorded next to the table; compare
runs before trusting a small difference.

    .venv/bin/python bench/micro_fast.py [--quick] [--repeat 5]

Prints a table (operation, twin µs, cython µs, speed-up) and writes bench/results/micro-fast-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import crc32c

BLOCK = 4096
MAP_BITS = 1 << 18


def _load(name: str, impl: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"raftblock._fast._{name}_{impl}")
    except ImportError:
        return None


def _crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)]


def cases(mod: dict[str, ModuleType]) -> list[tuple[str, Callable[[], Any]]]:
    """(operation, zero-argument call) for one implementation of every module."""
    rng = random.Random(1)
    mib = rng.randbytes(1 << 20)
    kib4 = mib[:BLOCK]
    mib_crcs, kib4_crcs = _crcs(mib), _crcs(kib4)
    bc, bm, sw = mod["blockcrc"], mod["bitmap"], mod["segwriter"]

    full = bm.Bitmap(MAP_BITS)
    full.set_range(0, MAP_BITS)
    striped = bm.Bitmap(MAP_BITS)  # 4096 runs of 32 set bits
    for start in range(0, MAP_BITS, 64):
        striped.set_range(start, 32)
    striped_bytes = striped.to_bytes()
    work = bm.Bitmap(MAP_BITS)
    probes = [rng.randrange(MAP_BITS) for _ in range(1000)]
    test = striped.test

    def set_clear() -> None:
        work.set_range(3, 100_000)
        work.clear_range(3, 100_000)

    def test_1000() -> None:
        for i in probes:
            test(i)

    buf = bytearray(64 + 48 + 1024 + (1 << 20))
    frame = sw.frame_write
    return [
        ("blockcrc.block_crcs 1 MiB", lambda: bc.block_crcs(mib)),
        ("blockcrc.block_crcs 4 KiB", lambda: bc.block_crcs(kib4)),
        ("blockcrc.first_mismatch 1 MiB", lambda: bc.first_mismatch(mib, mib_crcs)),
        ("bitmap set_range+clear_range 100k bits", set_clear),
        ("bitmap test x1000 (2^18 bits)", test_1000),
        ("bitmap test_range_all 2^18 bits", lambda: full.test_range_all(0, MAP_BITS)),
        ("bitmap popcount 2^18 bits", striped.popcount),
        ("bitmap runs() 4096 runs", lambda: list(striped.runs())),
        ("bitmap to_bytes 2^18 bits", striped.to_bytes),
        ("bitmap from_bytes 2^18 bits", lambda: bm.Bitmap.from_bytes(striped_bytes, MAP_BITS)),
        ("segwriter frame_write 4 KiB", lambda: frame(buf, 64, 7, 1, 2, 3, 4, kib4, kib4_crcs)),
        ("segwriter frame_write 1 MiB", lambda: frame(buf, 64, 7, 1, 2, 3, 4, mib, mib_crcs)),
        ("segwriter frame_trim", lambda: sw.frame_trim(buf, 64, 7, 1, 2, 3, 4, 5)),
    ]


def measure(fn: Callable[[], Any], repeat: int, min_s: float) -> tuple[float, int]:
    """Median seconds per call over `repeat` repeats, and the loop count of each repeat."""
    timer = timeit.Timer(fn)
    number, total = timer.autorange()
    while total < min_s:
        number *= 2
        total = timer.timeit(number)
    runs = timer.repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number, number


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | twin µs | cython µs | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        c = "n/a" if r["cython_us"] is None else f"{r['cython_us']:.2f}"
        s = "n/a" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"| {r['operation']} | {r['twin_us']:.2f} | {c} | {s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="0.05 s per repeat instead of 0.2 s")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    min_s = 0.05 if args.quick else 0.2
    names = ("blockcrc", "bitmap", "segwriter")
    twin = {n: _load(n, "py") for n in names}
    cy = {n: _load(n, "c") for n in names}
    assert all(twin.values()), "the pure twins always import"
    have_c = all(cy.values())
    if not have_c:
        print("Cython modules not built (make compile): cython column is n/a", file=sys.stderr)
    load_before = os.getloadavg()[0]
    twin_cases = cases(twin)  # type: ignore[arg-type]
    cy_cases = cases(cy) if have_c else [(op, None) for op, _ in twin_cases]  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    for (op, tf), (_, cf) in zip(twin_cases, cy_cases, strict=True):
        t_s, t_n = measure(tf, args.repeat, min_s)
        c_s, c_n = measure(cf, args.repeat, min_s) if cf is not None else (None, None)
        rows.append({
            "operation": op,
            "twin_us": t_s * 1e6,
            "cython_us": None if c_s is None else c_s * 1e6,
            "speedup": None if c_s is None else t_s / c_s,
            "twin_number": t_n,
            "cython_number": c_n,
        })
        print(f"  {op}: done", file=sys.stderr)
    load_after = os.getloadavg()[0]
    out = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"repeat": args.repeat, "min_seconds_per_repeat": min_s, "statistic": "median per call"},
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_before": load_before, "loadavg_1m_after": load_after,
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "crc32c": getattr(crc32c, "__version__", None),
                     "crc32c_hardware_based": crc32c.hardware_based},
        "rows": rows,
    }
    print(table(rows))
    print(f"\nload average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"micro-fast-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
