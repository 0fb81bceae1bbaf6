"""Commits/s of 4 KiB proposals on one Raft group and across 100 groups, and the idle CPU of a node.

Three `raftnode` processes on loopback (real fdatasync, disk=os) with 100 groups each; a client in this
process keeps `--inflight` 4 KiB writes outstanding (each acknowledged only after commit on a majority
of fsynced WALs and apply on the leader) for `--seconds`, first on group 1 only, then spread over all
groups. Then the cluster idles and each node's CPU is read from /proc/PID/stat over `--idle-seconds`.

    .venv/bin/python bench/raft_commits.py [--seconds 5] [--inflight 64] [--idle-seconds 10] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from raftblock._fast import blockcrc
from raftblock.replication.raft.group import RaftClient, RaftGroup
from raftblock.replication.raft.types import Role
from raftblock.testing.raftnodes import RaftNodes

GROUPS = 100


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat)


async def wait_leaders(client: RaftClient, ids: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        led: set[int] = set()
        for n in ids:
            for gi in (await client.node_status(n)).groups:
                if gi.role == Role.LEADER:
                    led.add(gi.group)
        if len(led) == GROUPS:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("not every group has a leader")


async def load(client: RaftClient, groups: list[int], inflight: int, seconds: float) -> tuple[int, float]:
    data = os.urandom(4096)
    crcs = blockcrc.block_crcs(data)
    stop_at = time.monotonic() + seconds
    done = 0
    rng = random.Random(1)

    async def worker(w: int) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            g = groups[rng.randrange(len(groups))]
            await RaftGroup(client, g).write(g << 32, w % 64, data, crcs)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return done, time.monotonic() - t0


async def run(cluster: RaftNodes, args: argparse.Namespace) -> dict[str, float]:
    client = RaftClient(cluster.addresses, deadline_s=30.0)
    await wait_leaders(client, cluster.ids)
    out: dict[str, float] = {}
    await load(client, [1], 8, 1.0)  # warm up connections / leader cache
    for name, groups in (("one_group", [1]), ("hundred_groups", list(range(1, GROUPS + 1)))):
        before = {n: (await client.node_status(n)).counters["entries_proposed"] for n in cluster.ids}
        n, dt = await load(client, groups, args.inflight, args.seconds)
        after = {n: (await client.node_status(n)).counters["entries_proposed"] for n in cluster.ids}
        entries = sum(after.values()) - sum(before.values())
        out[f"{name}_writes_per_s"] = n / dt
        out[f"{name}_entries_per_s"] = entries / dt
    await client.close()
    pids = {n: cluster.pid(n) for n in cluster.ids}
    t0 = {n: cpu_ticks(p) for n, p in pids.items()}
    w0 = time.monotonic()
    await asyncio.sleep(args.idle_seconds)  # measuring an idle interval, not synchronising
    wall = time.monotonic() - w0
    hz = os.sysconf("SC_CLK_TCK")
    for n, p in pids.items():
        out[f"idle_cpu_percent_node{n}"] = 100.0 * (cpu_ticks(p) - t0[n]) / hz / wall
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--disk", default="os")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="raft-bench-"))
    cluster = RaftNodes(base, nodes=3, groups=GROUPS, disk=args.disk)
    try:
        cluster.start_all()
        res = asyncio.run(run(cluster, args))
    finally:
        cluster.close()
    print(json.dumps({k: round(v, 1) for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
