"""atheris (libFuzzer) harness over the targets of fuzz_targets.py (tests/fuzz/README.md).

    .venv/bin/python tests/fuzz/atheris_run.py --target nbd --seconds 60
    .venv/bin/python tests/fuzz/atheris_run.py --target all --runs 1000000
    .venv/bin/python tests/fuzz/atheris_run.py --target all --seed-corpus     # (re)write the encoders' seeds
    .venv/bin/python tests/fuzz/atheris_run.py --target wal --minimize         # shrink the committed corpus

Each target runs in a process of its own (libFuzzer exits when it is done or finds something), with the
raftblock modules instrumented for coverage. It reads the committed corpus tests/fuzz/corpus/<target>/ and
the regression inputs, and grows a working corpus under build/fuzz/corpus/<target>/ (not committed);
`--minimize` merges the working corpus into the committed one keeping only inputs that add coverage (at most
--keep files). A crash (an exception a parser does not document, or a broken invariant), a hang (-timeout)
or an allocation over -rss_limit_mb (or over a target's tracemalloc bound) is a finding: libFuzzer writes
the input to build/fuzz/artifacts/<target>/ and this script exits non-zero.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
WORK = ROOT / "build" / "fuzz"
TARGET_NAMES = ["nbd", "iscsi", "scsi", "frame", "ops", "raftmsg", "proto", "segment", "checkpoint", "recovery",
                "wal", "chunk", "manifest"]


def _child(target: str, libfuzzer_args: list[str], traced: bool) -> None:
    """Runs in the target's own process: instrument, then hand over to libFuzzer (never returns)."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["raftblock"]):
        import fuzz_targets
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # corruption reports: not to stdout
    fn = fuzz_targets.TARGETS[target]
    if traced:
        import tracemalloc

        tracemalloc.start()

    def one(data: bytes) -> None:
        fn(data)

    atheris.Setup([str(_wrapper(target, traced)), *libfuzzer_args], one)
    atheris.Fuzz()


def _wrapper(target: str, traced: bool) -> Path:
    """libFuzzer runs argv[0] again for -merge and -set_cover_merge: a script that comes back here."""
    path = WORK / "bin" / f"{target}{'-traced' if traced else ''}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    flag = " --traced" if traced else ""
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --child {target}{flag} -- "$@"\n')
    path.chmod(0o755)
    return path


def _libfuzzer_args(target: str, a: argparse.Namespace, dirs: list[Path]) -> list[str]:
    from fuzz_targets import MAX_LEN

    art = WORK / "artifacts" / target
    art.mkdir(parents=True, exist_ok=True)
    args = [f"-rss_limit_mb={a.rss_limit_mb}", f"-timeout={a.timeout}", f"-artifact_prefix={art}/",
            f"-max_len={MAX_LEN.get(target, 1 << 15)}", "-print_final_stats=1", f"-seed={a.fuzz_seed}"]
    dictionary = HERE / "dicts" / f"{target}.dict"
    if dictionary.exists():
        args.append(f"-dict={dictionary}")
    if a.runs:
        args.append(f"-runs={a.runs}")
    if a.seconds:
        args.append(f"-max_total_time={a.seconds}")
    return args + [str(d) for d in dirs]


def seed_corpus(target: str) -> int:
    import fuzz_targets

    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("seed-*"):
        old.unlink()
    seeds = fuzz_targets.seeds(target)
    for k, s in enumerate(seeds):
        (d / f"seed-{k:02d}").write_bytes(s)
    return len(seeds)


def run_target(target: str, a: argparse.Namespace) -> int:
    from fuzz_targets import TRACED

    work = WORK / "corpus" / target
    work.mkdir(parents=True, exist_ok=True)
    committed = CORPUS / target
    committed.mkdir(parents=True, exist_ok=True)
    dirs = [work, committed]
    reg = CORPUS / "regressions" / target
    if reg.is_dir():
        dirs.append(reg)
    traced = target in TRACED and not a.no_trace
    cmd = [sys.executable, __file__, "--child", target, "--", *_libfuzzer_args(target, a, dirs)]
    if traced:
        cmd.insert(4, "--traced")
    t0 = time.monotonic()
    print(f"=== fuzz {target}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=not a.verbose, text=True, errors="replace")
    took = time.monotonic() - t0
    out = (proc.stdout or "") + (proc.stderr or "")
    stats = [ln for ln in out.splitlines() if ln.startswith("stat::") or "DONE" in ln or "#" in ln and "pulse" in ln]
    runs = next((ln.split(":")[-1].strip() for ln in stats if "number_of_executed_units" in ln), "?")
    speed = next((ln.split(":")[-1].strip() for ln in stats if "average_exec_per_sec" in ln), "?")
    print(f"--- {target}: exit {proc.returncode}, {runs} inputs, {speed} exec/s, {took:.0f} s, "
          f"working corpus {len(list(work.iterdir()))} files", flush=True)
    if proc.returncode != 0 and not a.verbose:
        print("\n".join(out.splitlines()[-80:]), flush=True)
    return proc.returncode


def minimize(target: str, a: argparse.Namespace) -> None:
    """Keep in the committed corpus only what adds coverage (libFuzzer -set_cover_merge), at most --keep
    files, the smallest first."""
    committed = CORPUS / target
    work = WORK / "corpus" / target
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        args = ["-set_cover_merge=1", f"-rss_limit_mb={a.rss_limit_mb}", f"-timeout={a.timeout}", str(out),
                str(committed), str(work)]
        cmd = [sys.executable, __file__, "--child", target, "--", *args]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        kept = sorted(out.iterdir(), key=lambda p: (p.stat().st_size, p.name))
        seeds = sorted(committed.glob("seed-*"))
        for old in committed.iterdir():
            if not old.name.startswith("seed-"):
                old.unlink()
        room = max(0, a.keep - len(seeds))
        seed_bytes = {s.read_bytes() for s in seeds}
        n = 0
        for p in kept:
            if n >= room:
                break
            if p.read_bytes() in seed_bytes:
                continue
            shutil.copy(p, committed / p.name)
            n += 1
    size = sum(p.stat().st_size for p in committed.iterdir())
    print(f"{target}: committed corpus {len(list(committed.iterdir()))} files, {size} bytes")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        target = sys.argv[2]
        rest = sys.argv[3:]
        traced = "--traced" in rest[: rest.index("--")] if "--" in rest else False
        _child(target, rest[rest.index("--") + 1 :] if "--" in rest else rest, traced)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="all", help=f"one of {', '.join(TARGET_NAMES)}, or all")
    p.add_argument("--runs", type=int, default=0, help="inputs per target (libFuzzer -runs)")
    p.add_argument("--seconds", type=int, default=0, help="seconds per target (libFuzzer -max_total_time)")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="libFuzzer -rss_limit_mb (an allocation over it is a finding)")
    p.add_argument("--timeout", type=int, default=10, help="libFuzzer -timeout: seconds one input may take (a hang)")
    p.add_argument("--fuzz-seed", type=int, default=0, help="libFuzzer -seed (0: random)")
    p.add_argument("--no-trace", action="store_true", help="no tracemalloc bounds (faster, RSS limit only)")
    p.add_argument("--seed-corpus", action="store_true", help="write the encoders' seeds to tests/fuzz/corpus/<target>/")
    p.add_argument("--minimize", action="store_true", help="merge the working corpus into the committed one")
    p.add_argument("--keep", type=int, default=40, help="--minimize: files kept per target")
    p.add_argument("--verbose", action="store_true", help="libFuzzer's output as it comes")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    targets = TARGET_NAMES if a.target == "all" else a.target.split(",")
    for t in targets:
        if t not in TARGET_NAMES:
            p.error(f"unknown target {t}")
    if a.seed_corpus:
        for t in targets:
            print(f"{t}: {seed_corpus(t)} seeds")
        return 0
    if a.minimize:
        for t in targets:
            minimize(t, a)
        return 0
    if not a.runs and not a.seconds:
        a.seconds = 30
    failed = [t for t in targets if run_target(t, a) != 0]
    if failed:
        print(f"FINDINGS in: {', '.join(failed)} (inputs under {WORK / 'artifacts'})")
        return 1
    print(f"no findings in {len(targets)} target(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
