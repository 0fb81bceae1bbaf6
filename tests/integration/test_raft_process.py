"""Process test of the extent-group Raft runtime (issue 3, part 4): three `raftnode` processes on
loopback with 100 groups each (3 replicas per group), volatile disks (kill -9 = power cut).

Enforces: Raft §5.2 (every group elects a new leader after its leader's node dies), §5.4 / Leader
Completeness plus our durability rule (no acknowledged write is lost: acked = committed on a majority
of fsynced WALs), catch-up of a restarted node (§5.3, and snapshot install §7 when the leaders'
WALs were compacted past it), and §5.2/§6 availability (no write completes without a majority: two
of three nodes SIGSTOPped; it completes after SIGCONT).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from raftblock._fast import blockcrc
from raftblock.client.router import GroupClient, NodeClient
from raftblock.replication.group import Unavailable
from raftblock.replication.raft.types import Role
from raftblock.testing.raftload import AckJournal, Writer, extent_of, tagged_block, verify
from raftblock.testing.raftnodes import RaftNodes
from raftblock.wire import raftblock_pb2 as pb

GROUPS = 100
CLIENT_ID = 7
RAFT = {
    "tick_ms": 100,
    "election_timeout_ticks": 10,
    "heartbeat_interval_ticks": 2,
    # Small WAL segments and an early compaction so the run exercises WAL truncation and, for the
    # restarted node, catch-up from behind the leaders' compaction point (snapshot install).
    "wal_segment_bytes_max": 2 << 20,
    "wal_compact_bytes": 6 << 20,
}


async def _statuses(client: NodeClient, nodes: list[int]) -> dict[int, pb.ClientResponse]:
    out: dict[int, pb.ClientResponse] = {}
    for nid in nodes:
        try:
            out[nid] = await client.node_status(nid)
        except (OSError, ConnectionError, TimeoutError):
            client._drop(nid)
    return out


def _leaders(st: dict[int, pb.ClientResponse]) -> dict[int, tuple[int, int]]:
    """group -> (leader node, term), for groups whose leader is among the answering nodes."""
    best: dict[int, tuple[int, int]] = {}
    for nid, resp in st.items():
        for gi in resp.groups:
            if gi.role == Role.LEADER and gi.term >= best.get(gi.group, (0, -1))[1]:
                best[gi.group] = (nid, gi.term)
    return best


async def _wait_all_leaders(client: NodeClient, nodes: list[int], timeout_s: float) -> dict[int, tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = _leaders(await _statuses(client, nodes))
        if len(leaders) == GROUPS:
            return leaders
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, GROUPS + 1)) - set(leaders))
            raise AssertionError(f"groups without a leader after {timeout_s}s: {missing[:20]} ...")
        await asyncio.sleep(0.2)


async def _scenario(cluster: RaftNodes, tmp: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    client = NodeClient(cluster.addresses, attempt_timeout_s=1.0, deadline_s=10.0)
    all_nodes = list(cluster.ids)
    t0 = time.monotonic()
    await _wait_all_leaders(client, all_nodes, 30.0)
    figures["first_election_s"] = time.monotonic() - t0

    journal = AckJournal(tmp / "acks.journal")
    writer = Writer(client, CLIENT_ID, range(1, GROUPS + 1), blocks_per_group=8, workers=48, journal=journal,
                    write_deadline_s=15.0)
    stop = asyncio.Event()
    load = asyncio.create_task(writer.run(stop))

    # Load until enough writes are acknowledged (bounded by a deadline, not by a sleep).
    deadline = time.monotonic() + 30.0
    while writer.acks < 3000 and time.monotonic() < deadline and not load.done():
        await asyncio.sleep(0.1)
    assert writer.acks >= 500, f"only {writer.acks} writes acknowledged before the kill"
    figures["acks_before_kill"] = writer.acks

    # kill -9 the node leading the most groups, under load.
    leaders = _leaders(await _statuses(client, all_nodes))
    counts = {n: sum(1 for ln, _ in leaders.values() if ln == n) for n in all_nodes}
    victim = max(counts, key=lambda n: counts[n])
    figures["victim_led_groups"] = counts[victim]
    cluster.kill(victim)
    t_kill = time.monotonic()
    live = [n for n in all_nodes if n != victim]
    await _wait_all_leaders(client, live, 30.0)
    figures["failover_all_groups_s"] = time.monotonic() - t_kill

    acks_at_failover = writer.acks
    deadline = time.monotonic() + 20.0
    while writer.acks < acks_at_failover + 1000 and time.monotonic() < deadline and not load.done():
        await asyncio.sleep(0.1)
    assert writer.acks > acks_at_failover, "no write acknowledged after the failover"
    stop.set()
    await asyncio.wait_for(load, 60.0)
    journal.close()
    figures["acks_total"] = writer.acks
    figures["write_failures"] = writer.failures

    # No acknowledged write is lost: the journal (fsynced) against a read-back through the leaders.
    acked = AckJournal.load(tmp / "acks.journal")
    assert acked == {k: v for k, v in writer.acked.items()}
    problems = await verify(client, acked, writer.attempted, CLIENT_ID)
    assert not problems, f"{len(problems)} problems, first: {problems[:10]}"

    # Restart the killed node: it catches up (its applied index reaches the leaders').
    st = await _statuses(client, live)
    target = {gi.group: gi.applied for resp in st.values() for gi in resp.groups if gi.role == Role.LEADER}
    assert len(target) == GROUPS
    cluster.start(victim)
    t_restart = time.monotonic()
    deadline = time.monotonic() + 40.0
    while True:
        try:
            mine = {gi.group: gi.applied for gi in (await client.node_status(victim)).groups}
        except (OSError, ConnectionError, TimeoutError):
            client._drop(victim)
            mine = {}
        behind = [g for g, a in target.items() if mine.get(g, -1) < a]
        if not behind:
            break
        assert time.monotonic() < deadline, f"restarted node {victim} still behind in groups {behind[:20]}"
        await asyncio.sleep(0.2)
    figures["catch_up_s"] = time.monotonic() - t_restart
    counters = (await client.node_status(victim)).counters
    figures["victim_snapshots_installed"] = counters.get("snapshots_installed", 0)

    # Two of three nodes stopped: a write does not complete; after SIGCONT it does.
    await _wait_all_leaders(client, all_nodes, 30.0)
    group = 1
    paused = [n for n in all_nodes if n != victim]
    for n in paused:
        cluster.pause(n)
    data = tagged_block(CLIENT_ID, group, 0, 10**9)
    task = asyncio.create_task(
        GroupClient(client, group, deadline_s=60.0).write(extent_of(group), 0, data, blockcrc.block_crcs(data))
    )
    done, _ = await asyncio.wait({task}, timeout=3.0)
    assert not done, "a write completed with two of three nodes stopped"
    for n in paused:
        cluster.resume(n)
    t_cont = time.monotonic()
    await asyncio.wait_for(task, 45.0)
    figures["write_after_sigcont_s"] = time.monotonic() - t_cont
    back, _ = await GroupClient(client, group).read(extent_of(group), 0, 1)
    assert bytes(back) == data

    # An unreachable majority is reported as Unavailable, not as success, within the deadline.
    for n in paused:
        cluster.pause(n)
    try:
        with pytest.raises(Unavailable):
            await GroupClient(client, 2, deadline_s=2.0).write(extent_of(2), 0, data, blockcrc.block_crcs(data))
    finally:
        for n in paused:
            cluster.resume(n)
    await client.close()
    return figures


def test_three_nodes_hundred_groups_kill_restart_pause(tmp_path: Path) -> None:
    cluster = RaftNodes(tmp_path, nodes=3, groups=GROUPS, disk="volatile", raft=RAFT)
    try:
        cluster.start_all()
        figures = asyncio.run(_scenario(cluster, tmp_path))
        print("raft process test figures:", {k: round(v, 3) for k, v in figures.items()})
    except BaseException:
        for nid in cluster.ids:
            print(f"--- node {nid} log tail ---\n{cluster.log_tail(nid)}")
        raise
    finally:
        codes = cluster.close()
    assert all(c == 0 for c in codes.values()), f"nodes did not stop cleanly: {codes}"
