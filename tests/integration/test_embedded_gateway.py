# Enforces (issue 16 item 1): the storage nodes serve NBD themselves (`cluster up` by default, `[gateway]` in a
# node's config). A volume attached through node N's gateway gets N as the leader of its Raft groups (leader
# affinity, node/agent.py rule 6); until then, and for an extent led elsewhere, the request is forwarded once
# over the peer connection (node/inproc.py). Exclusive attach and fencing hold between the nodes' gateways as
# between separate gateways; a node's gateway survives another node's death; every acknowledged write reads
# back through another node's gateway.
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import CLIENTS, kill_group, nbd_read, require_libnbd, require_tools, run
from .test_cluster import NBLOCKS, QD, Cluster, _cleanup, _verify, _wait
from .test_power_cut import _count_acks

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


def _gateways(c: Cluster) -> dict[int, str]:
    return {g["node"]: g["uri"] for g in c.status()["gateways"]}


def _leaders(c: Cluster, groups: list[int]) -> set[Any]:
    return {g["leader"] for g in c.status()["groups"] if g["group"] in groups}


def _node_counter(c: Cluster, node: int, name: str) -> int:
    n = next(n for n in c.status()["nodes"] if n["id"] == node)
    return int(n.get("counters", {}).get(name, 0))


def test_nodes_serve_nbd_with_leader_affinity(cluster: Cluster, tmp_path: Path) -> None:
    py = require_libnbd()
    require_tools("qemu-io")
    cluster.up()
    st = cluster.status()
    gws = _gateways(cluster)
    assert sorted(gws) == [1, 2, 3] and all(u and u.startswith("nbd://") for u in gws.values()), st["gateways"]
    assert st["gateway"]["uri"] == gws[1] == cluster.uri  # the cluster's NBD address: node 1's gateway
    assert not (cluster.root / "run" / "gateway.pid").exists()  # no separate gateway process
    cluster.cli("volume", "create", "vol", "--size", "256M")
    (vol,) = cluster.status()["volumes"]
    groups = vol["groups"]
    # members[0] (node 1) leads before anything is attached: the first election may pick another member, which
    # hands leadership to the preferred one within a few ticks (volume create returns once any leader is up)
    _wait(lambda: _leaders(cluster, groups) == {1}, 30, "node 1 (members[0]) to lead before anything is attached")

    # 1. A host attached through node 3: its writes are forwarded to node 1 over the peer link at first, then
    #    node 3 leads the volume's group (affinity), and the writes are served where they arrive.
    journal = tmp_path / "journal.txt"
    uri3 = f"{gws[3]}/vol"
    writer = subprocess.Popen(
        [py, str(CLIENTS / "nbd_tagged_writer.py"), uri3, str(journal), str(NBLOCKS), "7", "1", str(QD), "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait(lambda: _count_acks(journal) >= 50, 60, "50 acknowledged writes through node 3")
        assert _node_counter(cluster, 3, "client_requests_forwarded") > 0, "the first writes went to node 1's leader"
        _wait(lambda: _leaders(cluster, groups) == {3}, 30, "node 3 to lead the volume's group (leader affinity)")
        assert cluster.status()["volumes"][0]["attached_by"] == "n3"
        forwarded = _node_counter(cluster, 3, "client_requests_forwarded")
        acks = _count_acks(journal)
        _wait(lambda: _count_acks(journal) >= acks + 300, 60, "300 more acknowledged writes")
        assert _node_counter(cluster, 3, "client_requests_forwarded") == forwarded, "led here: nothing forwarded"

        # 2. Exclusive attach between the nodes' gateways: node 2 cannot take the volume while node 3 holds it.
        r = subprocess.run([py, str(CLIENTS / "nbd_tool.py"), "write", f"{gws[2]}/vol", "0", str(journal)],
                           capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout)["ok"] is False, r.stdout

        # 3. Another node dies: node 3's gateway goes on (the group keeps a majority).
        cluster.kill("n1")
        acks = _count_acks(journal)
        _wait(lambda: _count_acks(journal) >= acks + 100, 60, "writes to go on after node 1 was killed")
    finally:
        kill_group(writer)
        writer.communicate(timeout=30)
    # Exclusive attach: node 3's gateway detaches when its last connection closed; node 2 may attach then.
    _wait(lambda: cluster.status()["volumes"][0]["attached_by"] is None, 30, "node 3's gateway to detach")
    j = _verify(f"{gws[2]}/vol", journal, tmp_path, "through node 2 after node 3's host left")
    assert len(j.acked) >= 450

    # 4. qemu-io through node 2's gateway: node 2 leads now; a pattern written and read back, and the
    #    previous writer's blocks are untouched past it.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 8M 1M", "-c", "read -P 0x5c 8M 1M", f"{gws[2]}/vol"], timeout_s=60)
    _wait(lambda: _leaders(cluster, groups) == {2}, 30, "node 2 to lead after attaching there")
    got = nbd_read(f"{gws[2]}/vol", 8 << 20, 1 << 20, tmp_path)
    assert got["ok"] and got["data"] == b"\x5c" * (1 << 20)
