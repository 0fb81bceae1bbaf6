# Start and stop one `raftblock serve` process for tests and the benchmark.
#
# Owns: the child process, its port, its log file. Rules:
#   1. Readiness is the `READY nbd://HOST:PORT` line on stdout, waited for with a deadline; never a sleep.
#   2. stderr (the structured log) goes to a file, so a test can assert on events after the fact and a
#      failing test can show the tail of the log.
#   3. A port is picked free just before start; if the server loses the race for it, start again on
#      another one (bounded by `start_attempts_max`).
#   4. Every process this module starts is ended by `stop()`/`kill()` (or the context manager), never
#      by name.
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

READY_PREFIX = "READY nbd://"
DISK_MODES = ("os", "volatile", "volatile-tear")


class ServeError(RuntimeError):
    """The server did not become ready, or exited when it should not have."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its group; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def default_command() -> list[str]:
    """`raftblock` next to the running interpreter (the venv's console script), else `python -m`."""
    script = Path(sys.executable).parent / "raftblock"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "raftblock.cli"]


class ServeProcess:
    """One `raftblock serve` child process.

    volumes: "NAME:SIZE" strings or (name, size) pairs; size is bytes or a string like "64M".
    port: None picks a free port just before starting; 0 lets the server pick (read from its READY line).
    command: the program to run instead of `raftblock` (its argv before `serve`), e.g. for a test double.
    """

    start_attempts_max = 3

    def __init__(
        self,
        data_dir: Path | str,
        volumes: Sequence[str | tuple[str, int | str]],
        *,
        disk: str = "os",
        host: str = "127.0.0.1",
        port: int | None = None,
        log_format: str = "json",
        log_path: Path | str | None = None,
        command: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if disk not in DISK_MODES:
            raise ValueError(f"disk must be one of {DISK_MODES}, not {disk!r}")
        self.data_dir = Path(data_dir)
        self.volumes = [v if isinstance(v, str) else f"{v[0]}:{v[1]}" for v in volumes]
        self.disk = disk
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.log_format = log_format
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.serve.log"
        self.command = list(command) if command else default_command()
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._pump: threading.Thread | None = None
        self.starts = 0  # how many times this object started a process (restarts append to the same log)

    # -- life cycle -------------------------------------------------------------------------------------

    def argv(self, port: int) -> list[str]:
        args = [*self.command, "serve", "--dir", str(self.data_dir), "--bind", self.host, "--port", str(port)]
        for v in self.volumes:
            args += ["--volume", v]
        args += ["--disk", self.disk, "--log-format", self.log_format, *self.extra_args]
        return args

    def start(self, timeout_s: float = 30.0) -> ServeProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError("already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last_error: ServeError | None = None
        for _ in range(self.start_attempts_max):
            port = self.requested_port if self.requested_port is not None else free_port(self.host)
            try:
                self._start_once(port, timeout_s)
                return self
            except ServeError as e:
                last_error = e
                if self.requested_port is not None or "in use" not in self.log_tail().lower():
                    break
        assert last_error is not None
        raise last_error

    def _start_once(self, port: int, timeout_s: float) -> None:
        self.starts += 1
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self.argv(port))}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # a Ctrl-C in the test runner must not hit the server first
            )
        self.returncode = None
        try:
            line = self._wait_ready_line(timeout_s)
        except ServeError:
            self.kill()
            raise
        uri = line[len("READY "):]
        hostport = uri[len("nbd://"):].rstrip("/")
        self.port = int(hostport.rsplit(":", 1)[1])
        if port != 0 and self.port != port:
            self.kill()
            raise ServeError(f"server announced {uri}, but was asked for port {port}")

    def _wait_ready_line(self, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServeError(f"no READY line within {timeout_s}s\n{self.log_tail()}")
                if sel.select(min(remaining, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        rc = self.proc.wait(timeout=5)
                        raise ServeError(f"server exited ({rc}) before READY\n{self.log_tail()}")
                    buf += chunk
                    while b"\n" in buf:
                        raw, buf = buf.split(b"\n", 1)
                        line = raw.decode(errors="replace").strip()
                        if line.startswith(READY_PREFIX):
                            if buf:
                                self._note(f"unexpected stdout after READY: {buf!r}")
                            self._drain_stdout()
                            return line
                        # anything else on stdout is a contract violation worth seeing in the log
                        self._note(f"unexpected stdout line: {line!r}")
                elif self.proc.poll() is not None:
                    raise ServeError(f"server exited ({self.proc.returncode}) before READY\n{self.log_tail()}")
        finally:
            sel.close()

    def _drain_stdout(self) -> None:
        """Keep reading stdout after READY (a full pipe would block the server); log anything that comes."""
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout

        def pump() -> None:
            try:
                for raw in iter(stdout.readline, b""):
                    self._note(f"unexpected stdout after READY: {raw.decode(errors='replace').rstrip()!r}")
            except (OSError, ValueError):
                pass
            finally:
                stdout.close()

        self._pump = threading.Thread(target=pump, name=f"serve-stdout-{self.proc.pid}", daemon=True)
        self._pump.start()

    def _note(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"--- harness: {text}\n")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; the exit status (SIGKILL and ServeError if it does not exit in time)."""
        if self.proc is None:
            raise ServeError("not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServeError(f"server did not exit within {timeout_s}s of SIGTERM\n{self.log_tail()}") from None
        return self._reap()

    def kill(self) -> int:
        """SIGKILL (a power cut, for the process) and reap."""
        if self.proc is None:
            raise ServeError("not started")
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        return self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        if self._pump is not None:
            self._pump.join(timeout=5)  # it ends at EOF and closes stdout
            self._pump = None
        elif self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = rc
        self._note(f"exited with {rc}")
        return rc

    def restart(self, timeout_s: float = 30.0) -> ServeProcess:
        """Start again on the same directory; reuses the port so URIs held by a test stay valid."""
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError("still running; stop() or kill() first")
        if self.port is not None and not self.requested_port:
            saved, self.requested_port = self.requested_port, self.port
            try:
                return self.start(timeout_s)
            finally:
                self.requested_port = saved
        return self.start(timeout_s)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Best-effort clean-up: SIGTERM, then SIGKILL; never raises."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None and self.returncode is None:
                self._reap()
            return
        try:
            self.stop(timeout_s=10)
        except ServeError:
            pass

    def __enter__(self) -> ServeProcess:
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses --------------------------------------------------------------------------------------

    def uri(self, volume: str = "") -> str:
        if self.port is None:
            raise ServeError("not started")
        return f"nbd://{self.host}:{self.port}/{volume}"

    # -- log --------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_events(self, since_start: int | None = None) -> Iterator[dict[str, Any]]:
        """JSON log events (lines that parse as objects with an `event` key).

        since_start: only events of that start (1-based; see `starts`); None for all.
        """
        start = 0
        for line in self.log_text().splitlines():
            if line.startswith("--- start #"):
                start = int(line[len("--- start #"):].split(":", 1)[0])
                continue
            if since_start is not None and start != since_start:
                continue
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                yield obj

    def wait_for_event(self, event: str, timeout_s: float = 10.0, since_start: int | None = None) -> dict[str, Any]:
        """Poll the log until an event with that name appears (deadline, not sleep-and-hope)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for e in self.log_events(since_start):
                if e.get("event") == event:
                    return e
            if time.monotonic() >= deadline:
                raise ServeError(f"no {event!r} event within {timeout_s}s\n{self.log_tail()}")
            time.sleep(0.05)  # polling interval, not synchronisation
