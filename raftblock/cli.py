"""The `raftblock` command line.

Rule 1: errors are one line on stderr and a non-zero exit; `--help` works everywhere.
Rule 2: long-running commands configure logging (obs.log) and run one event loop (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from raftblock.units import parse_size


def _loop_run(coro: object) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type,no-any-return]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type,no-any-return]


def _volume_arg(text: str) -> tuple[str, int]:
    name, sep, size = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:SIZE, got {text!r}")
    try:
        return name, parse_size(size)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_serve(args: argparse.Namespace) -> int:
    from raftblock.gateway.nbd_server import GatewayConfig
    from raftblock.node.serve import ServeError, VolumeSpec, run_serve
    from raftblock.obs.log import configure
    from raftblock.storage.engine import EngineConfig

    configure(args.log_format, args.log_level)
    specs = [VolumeSpec(n, s) for n, s in args.volume]
    gw = GatewayConfig(bind=args.bind, port=args.port)
    ec = EngineConfig(segment_size_bytes=args.segment_size)
    try:
        return _loop_run(run_serve(Path(args.dir), specs, gw, disk_mode=args.disk, engine_config=ec))
    except ServeError as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 1


DEMO_DIR = Path(".raftblock")


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a one-copy server in the background (the cluster demo arrives with the cluster issue)."""
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    pidfile = d / "serve.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), 0)
            print(f"already running (pid {pidfile.read_text().strip()}); stop it with: .venv/bin/raftblock demo-down")
            return 0
        except (OSError, ValueError):
            pidfile.unlink()
    logf = open(d / "serve.log", "ab")
    readyf = d / "serve.ready"
    readyf.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftblock.cli", "serve", "--dir", str(d), "--port", str(args.nbd_port),
         "--volume", f"demo:{args.size}", "--log-format", "json"],
        stdout=open(readyf, "wb"), stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = readyf.read_text() if readyf.exists() else ""
        if text.startswith("READY"):
            uri = text.split()[1]
            print(f"raftblock is serving volume 'demo' ({args.size}) at {uri}/demo")
            print(f"  attach:  qemu-img info {uri}/demo    nbdinfo {uri}/demo")
            print(f"  logs:    {d / 'serve.log'}")
            print("  stop:    .venv/bin/raftblock demo-down")
            return 0
        if proc.poll() is not None:
            print(f"raftblock demo: server exited with {proc.returncode}; see {d / 'serve.log'}", file=sys.stderr)
            pidfile.unlink(missing_ok=True)
            return 1
        time.sleep(0.1)
    print("raftblock demo: server did not become ready in 60 s", file=sys.stderr)
    return 1


def cmd_demo_down(args: argparse.Namespace) -> int:
    pidfile = Path(args.dir) / "serve.pid"
    if not pidfile.exists():
        print("not running")
        return 0
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink()
        print("not running")
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    print("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftblock", description="raftblock distributed block store")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve volumes from one local copy over NBD (single node)")
    s.add_argument("--dir", required=True, help="data directory (created if missing)")
    s.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=10809, help="NBD port (default 10809; 0 picks a free one)")
    s.add_argument("--volume", type=_volume_arg, action="append", default=[], metavar="NAME:SIZE",
                   help="volume to create on first start, e.g. demo:1G (repeatable)")
    s.add_argument("--disk", choices=["os", "volatile", "volatile-tear"], default="os",
                   help="disk port: os (real), volatile (test: unsynced writes die with the process), "
                        "volatile-tear (also leaves torn partial writes)")
    s.add_argument("--segment-size", type=_size_arg, default=64 << 20, metavar="SIZE",
                   help="engine segment file size (default 64M; each is preallocated)")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="start a local demo server in the background")
    d.add_argument("--dir", default=str(DEMO_DIR))
    d.add_argument("--nbd-port", type=int, default=10809)
    d.add_argument("--size", default="1G")
    d.set_defaults(func=cmd_demo)

    dd = sub.add_parser("demo-down", help="stop the local demo server")
    dd.add_argument("--dir", default=str(DEMO_DIR))
    dd.set_defaults(func=cmd_demo_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
