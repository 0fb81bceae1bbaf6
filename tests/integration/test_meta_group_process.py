"""The metadata group as three real processes (`python -m raftblock.meta.node`) on loopback, driven
through the admin port by MetaClient:

- a volume created through one node survives kill -9 of the leader; the others elect a new leader
  (Raft §5.2) and keep committing; the killed node, restarted, catches up (§5.3);
- kill -9 of all three and a restart: the state is intact (every acknowledged command was fsync'ed
  before it was acknowledged; Raft §5.4 durability of the log and of term/vote).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftblock.meta.node import write_local_configs
from raftblock.meta.rpc import MetaClient, MetaClientError
from raftblock.replication.raft.types import NodeId
from raftblock.testing.serve import free_port

GiB = 1 << 30
READY_TIMEOUT_S = 20.0


class MetaProcs:
    """Three metadata node processes; every one is killed at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.raft = [free_port() for _ in range(3)]
        self.admin_ports = [free_port() for _ in range(3)]
        self.configs = write_local_configs(directory, self.raft, self.admin_ports, cluster_id="it")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.secret = (directory / "cluster.secret").read_bytes().strip()

    @property
    def admin(self) -> dict[NodeId, str]:
        return {NodeId(i + 1): f"127.0.0.1:{p}" for i, p in enumerate(self.admin_ports)}

    def start(self, i: int) -> None:
        log = open(self.dir / f"meta-{i}.log", "ab")  # noqa: SIM115 (the child owns it)
        p = subprocess.Popen([sys.executable, "-m", "raftblock.meta.node", "--config", str(self.configs[i - 1]),
                              "--log-format", "json"], stdout=subprocess.PIPE, stderr=log, cwd=self.dir)
        log.close()
        self.procs[i] = p
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                raise AssertionError(f"meta-{i} not READY: {line!r}\n{self.log_tail(i)}")
            if sel.select(left):
                chunk = os.read(p.stdout.fileno(), 1)
                if not chunk:
                    raise AssertionError(f"meta-{i} closed stdout\n{self.log_tail(i)}")
                line += chunk
        sel.close()
        assert line.startswith(b"READY meta id=%d" % i), line

    def kill9(self, i: int) -> None:
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()

    def close(self) -> None:
        for i in list(self.procs):
            with contextlib.suppress(Exception):
                self.kill9(i)

    def log_tail(self, i: int, n: int = 30) -> str:
        p = self.dir / f"meta-{i}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[MetaProcs]:
    mp = MetaProcs(tmp_path)
    try:
        yield mp
    finally:
        mp.close()


async def _leader(client: MetaClient, alive: list[int], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i in alive:
            try:
                st = await client.status(NodeId(i))
            except (OSError, ConnectionError, TimeoutError):
                continue
            if st["is_leader"]:
                return i
        await asyncio.sleep(0.1)
    raise AssertionError(f"no leader among {alive} in {timeout_s}s")


async def _heartbeats(client: MetaClient, stop: asyncio.Event) -> None:
    """Three storage nodes heartbeating the metadata leader (memory only, never logged)."""
    while not stop.is_set():
        for n in (1, 2, 3):
            with contextlib.suppress(MetaClientError, OSError, TimeoutError):
                await client.heartbeat(NodeId(n), used_bytes=0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.3)


async def _scenario(mp: MetaProcs) -> dict[str, float]:
    figures: dict[str, float] = {}
    client = MetaClient(mp.admin, mp.secret, attempt_timeout_s=2.0, deadline_s=20.0)
    hb_client = MetaClient(mp.admin, mp.secret, attempt_timeout_s=1.0, deadline_s=2.0)
    stop = asyncio.Event()
    for i in (1, 2, 3):
        assert (await client.register_node(i, f"r{i - 1}", f"127.0.0.1:{20000 + i}", 1 << 40)).ok
    hb = asyncio.create_task(_heartbeats(hb_client, stop))
    try:
        deadline = time.monotonic() + 20
        while not (await client.state()).cluster_id:  # the leader names the cluster on its first control tick
            assert time.monotonic() < deadline, "the metadata leader did not record the cluster id"
            await asyncio.sleep(0.05)
        res = await client.create_volume("v1", GiB)
        assert res.ok, res
        st = await client.state()
        assert st.cluster_id == "it"
        v1 = st.volumes["v1"]
        assert len(set(v1.extent_groups)) >= 2

        leader = await _leader(client, [1, 2, 3], 10)
        mp.kill9(leader)
        t0 = time.monotonic()
        others = [i for i in (1, 2, 3) if i != leader]
        new_leader = await _leader(client, others, 20)
        figures["reelection_s"] = time.monotonic() - t0
        assert new_leader != leader
        st = await client.state()
        assert st.volumes["v1"] == v1
        assert (await client.create_volume("v2", 2 * GiB)).ok  # a majority of two commits

        mp.start(leader)  # the killed node comes back and catches up
        t0 = time.monotonic()
        deadline = time.monotonic() + 20
        while True:
            try:
                local = (await client.call(NodeId(leader), {"op": "state", "barrier": False}))["state"]
                if "v2" in local["volumes"]:
                    break
            except (OSError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"meta-{leader} did not catch up\n{mp.log_tail(leader)}"
            await asyncio.sleep(0.1)
        figures["catch_up_s"] = time.monotonic() - t0
        before = await client.state()
    finally:
        stop.set()
        await hb

    # power cut of the whole group: kill -9 all, restart all
    for i in (1, 2, 3):
        mp.kill9(i)
    t0 = time.monotonic()
    for i in (1, 2, 3):
        mp.start(i)
    after = await client.state()
    figures["restart_all_s"] = time.monotonic() - t0
    assert after.volumes == before.volumes
    assert after.groups == before.groups
    assert {n: (r.rack, r.address) for n, r in after.nodes.items()} == \
        {n: (r.rack, r.address) for n, r in before.nodes.items()}
    return figures


def test_meta_group_survives_leader_kill_and_whole_group_power_cut(procs: MetaProcs) -> None:
    for i in (1, 2, 3):
        procs.start(i)
    figures = asyncio.run(_scenario(procs))
    print(f"\nmetadata group: {figures}")
