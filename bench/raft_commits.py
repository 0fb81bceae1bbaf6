"""Commits/s of 4 KiB writes on our Raft (one group, and all groups) against etcd, and the idle CPU of
a node hosting `--groups` groups (1,000 by default) with leader stability over the idle window, and each
node's anonymous resident memory (RssAnon) after the load rounds and after the idle window.

Three `raftnode` processes on loopback (real fdatasync, disk=os) with `--groups` groups each (1,000 by default), and a 3-member
etcd on loopback (bench/etcd_baseline.py), both running for the whole bench. In each of `--rounds`
rounds, interleaved: etcd 4 KiB puts with 1 and 32 concurrent clients; raftblock 4 KiB writes with 1 and
32 in flight on group 1, and 32 in flight spread over all groups (each write acknowledged only
after commit on a majority of fsynced WALs and apply on the leader). Medians, min-max, and the ratio to
etcd at the same concurrency. Then the cluster idles and each node's CPU is read from /proc/PID/stat; the
leader and term of every group are read before and after the idle window (a group whose leader or term
changed while idle is counted as unstable).

    .venv/bin/python bench/raft_commits.py [--rounds 3] [--seconds 5] [--idle-seconds 10] [--no-etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raftblock._fast import blockcrc
from raftblock.client.router import GroupClient, NodeClient
from raftblock.obs.memory import rss_anon_bytes
from raftblock.replication.raft.types import Role
from raftblock.testing.raftnodes import RaftNodes

GROUPS = 1000


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat)


async def leaders(client: NodeClient, ids: list[int]) -> dict[int, tuple[int, int]]:
    """group -> (leader node, term), from every node's status."""
    led: dict[int, tuple[int, int]] = {}
    for n in ids:
        for gi in (await client.node_status(n)).groups:
            if gi.role == Role.LEADER:
                led[gi.group] = (n, gi.term)
    return led


async def wait_leaders(client: NodeClient, ids: list[int], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(await leaders(client, ids)) == GROUPS:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("not every group has a leader")


async def load(client: NodeClient, groups: list[int], inflight: int, seconds: float) -> tuple[int, float]:
    data = os.urandom(4096)
    crcs = blockcrc.block_crcs(data)
    stop_at = time.monotonic() + seconds
    done = 0
    rng = random.Random(1)

    async def worker(w: int) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            g = groups[rng.randrange(len(groups))]
            await GroupClient(client, g).write(g << 32, w % 64, data, crcs)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return done, time.monotonic() - t0


CASES = [  # (name, what, concurrency): "etcd" or the raftblock groups written
    ("etcd, 1 client", "etcd", 1),
    ("raftblock 1 group, 1 in flight", "one", 1),
    ("etcd, 32 clients", "etcd", 32),
    ("raftblock 1 group, 32 in flight", "one", 32),
    ("raftblock all groups, 32 in flight", "all", 32),
]
BASELINE = {1: "etcd, 1 client", 32: "etcd, 32 clients"}


async def run(cluster: RaftNodes, etcd: object | None, args: argparse.Namespace) -> dict[str, object]:
    from etcd_baseline import EtcdCluster
    from etcd_baseline import load as etcd_load

    client = NodeClient(cluster.addresses, deadline_s=30.0)
    await wait_leaders(client, cluster.ids)
    await load(client, [1], 8, 1.0)  # warm up connections / leader cache
    results: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    for rnd in range(args.rounds):
        for name, what, conc in CASES:
            if what == "etcd":
                if etcd is None:
                    continue
                assert isinstance(etcd, EtcdCluster)
                rate = await etcd_load(etcd, conc, args.seconds)
            else:
                groups = [1] if what == "one" else list(range(1, GROUPS + 1))
                n, dt = await load(client, groups, conc, args.seconds)
                rate = n / dt
            results[name].append(rate)
            print(f"  round {rnd} {name:<36} {rate:8.0f}/s", flush=True)
    await wait_leaders(client, cluster.ids)
    before = await leaders(client, cluster.ids)
    pids = {n: cluster.pid(n) for n in cluster.ids}
    rss_loaded = {n: rss_anon_bytes(p) for n, p in pids.items()}  # after the load rounds, all groups written
    t0 = {n: cpu_ticks(p) for n, p in pids.items()}
    w0 = time.monotonic()
    await asyncio.sleep(args.idle_seconds)  # measuring an idle interval, not synchronising
    wall = time.monotonic() - w0
    hz = os.sysconf("SC_CLK_TCK")
    idle = {n: 100.0 * (cpu_ticks(p) - t0[n]) / hz / wall for n, p in pids.items()}
    rss_idle = {n: rss_anon_bytes(p) for n, p in pids.items()}
    after = await leaders(client, cluster.ids)
    await client.close()
    unstable = sorted(g for g in range(1, GROUPS + 1) if before.get(g) != after.get(g))
    return {"groups": GROUPS, "results": results, "idle_cpu_percent": idle, "idle_seconds": wall,
            "rss_anon_after_load": rss_loaded, "rss_anon_after_idle": rss_idle,
            "groups_with_leader_after_idle": len(after), "groups_unstable_while_idle": unstable}


def table(res: dict[str, list[float]]) -> str:
    lines = [f"{'case':<38} {'writes/s med':>12} {'[min-max]':>17} {'etcd same conc.':>16} {'ratio':>6}",
             "-" * 93]
    for name, _what, conc in CASES:
        vals = res.get(name) or []
        if not vals:
            continue
        med = statistics.median(vals)
        base = res.get(BASELINE[conc]) or []
        bmed = statistics.median(base) if base else float("nan")
        ratio = med / bmed if base and not name.startswith("etcd") else float("nan")
        lines.append(f"{name:<38} {med:>12.0f} {f'[{min(vals):.0f}-{max(vals):.0f}]':>17} {bmed:>16.0f} "
                     f"{ratio:>6.2f}")
    return "\n".join(lines)


def main() -> int:
    global GROUPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--disk", default="os")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-etcd", action="store_true", help="skip the etcd baseline")
    ap.add_argument("--groups", type=int, default=GROUPS, help="extent groups hosted by every node")
    args = ap.parse_args()
    GROUPS = args.groups
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from etcd_baseline import EtcdCluster

    base = Path(args.dir or tempfile.mkdtemp(prefix="raft-bench-"))
    cluster = RaftNodes(base / "raft", nodes=3, groups=GROUPS, disk=args.disk)
    etcd = None if args.no_etcd else EtcdCluster(base / "etcd")
    try:
        if etcd is not None:
            (base / "etcd").mkdir(parents=True, exist_ok=True)
            etcd.start()
        cluster.start_all()
        out = asyncio.run(run(cluster, etcd, args))
    finally:
        cluster.close()
        if etcd is not None:
            etcd.stop()
    res = out["results"]
    assert isinstance(res, dict)
    print()
    print(table(res))
    idle = out["idle_cpu_percent"]
    assert isinstance(idle, dict)
    print(f"\nidle CPU of a node with {GROUPS} groups over {out['idle_seconds']:.0f} s (% of one core): "
          + ", ".join(f"node {n}: {v:.1f}" for n, v in idle.items()))
    loaded, rested = out["rss_anon_after_load"], out["rss_anon_after_idle"]
    assert isinstance(loaded, dict) and isinstance(rested, dict)
    print(f"RssAnon of a node with {GROUPS} groups, after the load rounds / after the idle window (MiB): "
          + ", ".join(f"node {n}: {loaded[n] >> 20} / {rested[n] >> 20}" for n in loaded))
    unstable = out["groups_unstable_while_idle"]
    assert isinstance(unstable, list)
    print(f"groups with a leader after the idle window: {out['groups_with_leader_after_idle']}/{GROUPS}; "
          f"leader or term changed while idle: {len(unstable)}")
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / f"raft-commits-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
