# Start, stop, kill, pause and restart N `python -m raftblock.node.raftnode` processes for tests and bench.
#
# Owns: the child processes, their config files, ports and log files. Rules:
#   1. Readiness is the `READY raft://HOST:PORT` line on stdout, waited for with a deadline; never a sleep.
#   2. stderr (the structured log) goes to DIR/nN.log, so a failing test can show its tail.
#   3. Every process this module starts is ended by `close()` (also the context manager), by its pid,
#      never by name; a stopped (SIGSTOP) process is continued before it is terminated.
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raftblock.testing.serve import free_port

READY_PREFIX = "READY raft://"


class NodeProcessError(RuntimeError):
    pass


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RaftNodes:
    def __init__(
        self,
        base_dir: Path | str,
        nodes: int = 3,
        groups: int = 100,
        *,
        disk: str = "volatile",
        raft: dict[str, Any] | None = None,
        engine: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.ids = list(range(1, nodes + 1))
        self.groups = groups
        self.disk = disk
        self.raft = raft or {}
        self.engine = engine or {"segment_size_bytes": 8 << 20}
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.addresses: dict[int, tuple[str, int]] = {i: (host, free_port(host)) for i in self.ids}
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.stopped: set[int] = set()

    # -- config ---------------------------------------------------------------------------------------------
    def config_path(self, nid: int) -> Path:
        return self.base_dir / f"n{nid}.toml"

    def log_path(self, nid: int) -> Path:
        return self.base_dir / f"n{nid}.log"

    def _write_config(self, nid: int) -> None:
        host, port = self.addresses[nid]
        lines = [
            f"node_id = {nid}",
            f"data_dir = {_toml_value(str(self.base_dir / f'n{nid}'))}",
            f'listen = "{host}:{port}"',
            f'disk = "{self.disk}"',
            "[peers]",
            *(f'{i} = "{h}:{p}"' for i, (h, p) in self.addresses.items()),
            "[groups]",
            "first = 1",
            f"count = {self.groups}",
            f"members = {_toml_value(self.ids)}",
            "[raft]",
            *(f"{k} = {_toml_value(v)}" for k, v in self.raft.items()),
            "[engine]",
            *(f"{k} = {_toml_value(v)}" for k, v in self.engine.items()),
        ]
        self.config_path(nid).write_text("\n".join(lines) + "\n")

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start_all(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for nid in self.ids:
            self._spawn(nid)
        for nid in self.ids:
            self._wait_ready(nid)

    def start(self, nid: int) -> None:
        self._spawn(nid)
        self._wait_ready(nid)

    def _spawn(self, nid: int) -> None:
        if nid in self.procs and self.procs[nid].poll() is None:
            raise NodeProcessError(f"node {nid} is already running")
        self._write_config(nid)
        logf = open(self.log_path(nid), "a")  # noqa: SIM115 - owned by the child from here on
        try:
            self.procs[nid] = subprocess.Popen(
                [sys.executable, "-m", "raftblock.node.raftnode", "--config", str(self.config_path(nid)),
                 "--log-format", "json"],
                stdout=subprocess.PIPE,
                stderr=logf,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            logf.close()
        self.stopped.discard(nid)

    def _wait_ready(self, nid: int) -> None:
        p = self.procs[nid]
        assert p.stdout is not None
        deadline = time.monotonic() + self.ready_timeout_s
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeProcessError(f"node {nid} not ready in {self.ready_timeout_s}s\n{self.log_tail(nid)}")
                if not sel.select(timeout=left):
                    continue
                line = p.stdout.readline()
                if not line:
                    raise NodeProcessError(f"node {nid} exited ({p.wait()})\n{self.log_tail(nid)}")
                if line.startswith(READY_PREFIX):
                    return
        finally:
            sel.close()

    def pid(self, nid: int) -> int:
        return self.procs[nid].pid

    def kill(self, nid: int) -> None:
        """kill -9 (with a volatile disk: a power cut of that node)."""
        p = self.procs[nid]
        p.kill()
        p.wait(timeout=10)
        self.stopped.discard(nid)

    def pause(self, nid: int) -> None:
        os.kill(self.procs[nid].pid, signal.SIGSTOP)
        self.stopped.add(nid)

    def resume(self, nid: int) -> None:
        os.kill(self.procs[nid].pid, signal.SIGCONT)
        self.stopped.discard(nid)

    def terminate(self, nid: int, timeout_s: float = 15.0) -> int:
        p = self.procs[nid]
        if p.poll() is not None:
            return p.returncode
        if nid in self.stopped:
            self.resume(nid)
        p.terminate()
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
            return -9

    def close(self) -> dict[int, int]:
        codes: dict[int, int] = {}
        for nid in list(self.procs):
            codes[nid] = self.terminate(nid)
            out = self.procs[nid].stdout
            if out is not None:
                out.close()
        return codes

    def log_tail(self, nid: int, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path(nid).read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RaftNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
