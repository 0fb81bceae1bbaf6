"""etcd as the reference for Raft commits: a 3-member etcd cluster on loopback (Debian's etcd-server),
4 KiB puts from N concurrent clients.

The client is small on purpose: each concurrent client is one keep-alive HTTP/1.1 connection to a
member's grpc-gateway (`POST /v3/kv/put`, JSON with base64 key/value), one put in flight per client,
clients spread over the three members (followers forward to the leader, as etcd clients' round robin
would). etcd acknowledges a put after its Raft entry is committed on a majority of fsynced WALs, the
same promise as a raftblock write.

`load_detailed` (used by bench/run.py) also warms up before measuring, records each put's latency
(request written to response read, as the client sees it) and calls `mark("start")`/`mark("end")` at the
edges of the measured window, so a caller can read CPU counters exactly over it.

    python bench/etcd_baseline.py [--clients 1,32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VALUE_BYTES = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    def __init__(self, base: Path, members: int = 3) -> None:
        self.base = base
        self.names = [f"e{i}" for i in range(1, members + 1)]
        self.peer = {n: _free_port() for n in self.names}
        self.client = {n: _free_port() for n in self.names}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, timeout_s: float = 30.0) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd not found (apt-get install etcd-server)")
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for n in self.names:
            log = open(self.base / f"{n}.log", "wb")
            self.procs.append(subprocess.Popen(
                ["etcd", "--name", n, "--data-dir", str(self.base / n),
                 "--listen-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--listen-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "raftblock-bench", "--logger", "zap", "--log-outputs", "stderr"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if asyncio.run(self._healthy()):
                return
            time.sleep(0.2)  # polling interval while etcd elects a leader
        raise RuntimeError(f"etcd not healthy within {timeout_s}s (logs in {self.base})")

    async def _healthy(self) -> bool:
        try:
            await put_once("127.0.0.1", self.client[self.names[0]], b"health", b"ok")
            return True
        except (OSError, ValueError, asyncio.IncompleteReadError):
            return False

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in zip(self.names, self.procs, strict=False)}

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _request(port: int, key: bytes, value: bytes) -> bytes:
    body = json.dumps({"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}).encode()
    return (f"POST /v3/kv/put HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    if status != b"200":
        raise ValueError(f"etcd answered {status!r}: {body[:200]!r}")


async def put_once(host: str, port: int, key: bytes, value: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request(port, key, value))
        await writer.drain()
        await _read_response(reader)
    finally:
        writer.close()


async def load(cluster: EtcdCluster, clients: int, seconds: float) -> float:
    """Puts per second with `clients` concurrent clients (one put in flight each)."""
    return float((await load_detailed(cluster, clients, seconds))["puts_per_s"])


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q / 100.0 * len(sorted_values)))]


async def load_detailed(cluster: EtcdCluster, clients: int, seconds: float, warmup_s: float = 0.0,
                        mark: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`clients` concurrent clients, one put in flight each, for `warmup_s` unmeasured then `seconds`
    measured: puts completed inside the measured window per second, and the latency of the puts
    started inside it (p50/p99 in µs)."""
    value = os.urandom(VALUE_BYTES)
    measure_at = time.monotonic() + warmup_s
    stop_at = measure_at + seconds
    done = 0
    lat_s: list[float] = []

    async def client(i: int) -> None:
        nonlocal done
        port = cluster.client[cluster.names[i % len(cluster.names)]]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            k = 0
            while (t0 := time.monotonic()) < stop_at:
                writer.write(_request(port, f"c{i}/k{k % 256}".encode(), value))
                await writer.drain()
                await _read_response(reader)
                t1 = time.monotonic()
                if measure_at <= t1 <= stop_at:
                    done += 1
                if t0 >= measure_at:
                    lat_s.append(t1 - t0)
                k += 1
        finally:
            writer.close()

    async def marks() -> None:
        await asyncio.sleep(max(0.0, measure_at - time.monotonic()))  # the window's edges, not synchronisation
        if mark is not None:
            mark("start")
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        if mark is not None:
            mark("end")

    await asyncio.gather(marks(), *(client(i) for i in range(clients)))
    lat_s.sort()
    return {"clients": clients, "puts": done, "seconds": seconds, "puts_per_s": done / seconds,
            "p50_us": _percentile(lat_s, 50) * 1e6, "p99_us": _percentile(lat_s, 99) * 1e6,
            "value_bytes": VALUE_BYTES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,32")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="etcd-bench-"))
    cluster = EtcdCluster(base)
    try:
        cluster.start()
        for c in (int(x) for x in args.clients.split(",")):
            print(f"etcd 4 KiB puts, {c} clients: {asyncio.run(load(cluster, c, args.seconds)):.0f}/s")
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
