# The 3-rack cluster as `make demo` starts it (`raftblock cluster up`, on free ports), with real clients.
#
# Enforces (issue "cluster"): the NBD contract of part 1 through the gateway and Raft groups (qemu-img
# info, qemu-io patterns aligned and unaligned, nbdinfo --json flags, ext4 through nbdfuse across a
# cluster restart); a 1 GiB volume spans >= 2 extent groups led from >= 2 nodes; kill -9 of the node
# leading the group that holds the data while a client writes: I/O resumes by itself and nothing
# acknowledged is lost (tagged writer + verifier), `cluster up` brings the node back and it catches up;
# power cut (volatile disks, kill -9 of every process, gateway too): every acknowledged write reads back.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    BLOCK,
    CLIENTS,
    MiB,
    cluster_ring,
    find_on_disk,
    flip_byte,
    kill_group,
    nbd_read,
    nbd_write,
    require_libnbd,
    require_tools,
    run,
    signed_hello,
)
from .test_ext4_nbdfuse import _make_tree, _phase, _read_sums
from .test_power_cut import Journal, _count_acks, judge
from .test_qemu_clients import QEMU_WRITES, _apply, _qemu_io, _runs

RAFTBLOCK = [sys.executable, "-m", "raftblock.cli"]


class Cluster:
    """`gateway`: None for `cluster up`'s default layout (NBD served by the nodes), "separate" for a gateway
    process of its own: what a test needs whose host must survive the death of any one node."""

    def __init__(self, root: Path, disk: str = "os", gateway: str | None = None) -> None:
        self.root = root
        self.disk = disk
        self.gateway = gateway
        self.uri = ""

    def cli(self, *args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*RAFTBLOCK, *args, "--dir", str(self.root)], capture_output=True, text=True,
                           timeout=timeout_s)
        if check:
            assert r.returncode == 0, f"raftblock {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return r

    def up(self) -> str:
        r = self.cli("cluster", "up", "--nbd-port", "0", "--iscsi-port", "0", "--disk", self.disk,
                     *(["--gateway", self.gateway] if self.gateway else []))
        self.uri = r.stdout.strip().splitlines()[-1]
        assert self.uri.startswith("nbd://"), r.stdout
        return self.uri

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("cluster", "status", "--json").stdout))

    def set_raft(self, **settings: int) -> None:
        """Node settings (`[raft]` of every node's config), as an operator edits them: the configs are
        written by a first `cluster up`, then the cluster is stopped and the settings appended."""
        self.up()
        self.down()
        for cfg in sorted((self.root / "nodes").glob("n*.toml")):
            cfg.write_text(cfg.read_text() + "\n[raft]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def pids(self) -> dict[str, int]:
        out = {}
        for f in (self.root / "run").glob("*.pid"):
            out[f.stem] = int(f.read_text())
        return out

    def kill(self, name: str) -> None:
        os.kill(self.pids()[name], signal.SIGKILL)
        _wait(lambda: not Path(f"/proc/{self.pids()[name]}").exists() or _zombie(self.pids()[name]), 30, f"{name} to die")

    def down(self) -> None:
        self.cli("cluster", "down", check=False)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def _cleanup(c: Cluster) -> None:
    c.down()
    for pid in c.pids().values():  # never leave a process behind, even after a failed `down`
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


@pytest.fixture
def separate_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", gateway="separate")  # the host outlives a stopped or killed node
    yield c
    _cleanup(c)


@pytest.fixture
def volatile_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", disk="volatile-tear", gateway="separate")  # hosts outlive node kills
    yield c
    _cleanup(c)


MODES = ["raft", "chain"]  # every real-client test of the data path runs on both kinds of volume


@pytest.mark.parametrize("mode", MODES)
def test_cluster_serves_real_clients(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    require_tools("qemu-img", "qemu-io", "nbdinfo")
    base = cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "1G", "--replication", mode)
    st = cluster.status()
    (vol,) = [v for v in st["volumes"] if v["name"] == "vol"]
    assert len(vol["groups"]) >= 2, vol
    assert vol["replication"] == mode and {g["replication"] for g in st["groups"]} == {mode}, st

    def leaders() -> set[Any]:
        return {g["leader"] for g in cluster.status()["groups"] if g["group"] in vol["groups"]}

    # placement gives each group a different preferred leader; the elected leader hands over to it
    _wait(lambda: None not in leaders() and len(leaders()) >= 2, 30, "the groups to be led from 2 nodes")
    assert {n["state"] for n in st["nodes"]} == {"up"} and len({n["rack"] for n in st["nodes"]}) == 3
    uri = f"{base}/vol"
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", uri], timeout_s=30).stdout)
    assert info["virtual-size"] == 1 << 30
    nbdinfo = json.loads(run(["nbdinfo", "--json", uri], timeout_s=30).stdout)["exports"][0]
    assert (nbdinfo["block_size_minimum"], nbdinfo["block_size_preferred"]) == (512, 4096)
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert nbdinfo[flag] is True, flag
    model = bytearray(2 * MiB)
    cmds = []
    for pattern, offset, length in QEMU_WRITES:
        cmds.append(f"write -P {pattern:#x} {offset} {length}")
        _apply(model, offset, bytes([pattern]) * length)
    # and across the first extent edge (64 MiB), into another group
    cmds.append(f"write -P 0x77 {64 * MiB - 3000} 7000")
    _qemu_io(uri, cmds)
    _qemu_io(uri, [f"read -P {v:#x} {o} {n}" for v, o, n in _runs(bytes(model))] + [f"read -P 0x77 {64 * MiB - 3000} 7000"])
    # NBD BLOCK_STATUS (base:allocation) through the groups: written ranges are data, the rest holes
    m = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri], timeout_s=60).stdout)
    data = [(e["start"], e["length"]) for e in m if e["data"]]
    holes = [(e["start"], e["length"]) for e in m if not e["data"]]
    assert data and data[0][0] == 0, m
    assert any(s <= 4 * MiB and s + n >= 60 * MiB for s, n in holes), m  # unwritten middle of extent 0
    assert any(s <= 64 * MiB - 4096 < s + n for s, n in data), m  # the write across the extent edge
    assert any(s + n == 1 << 30 for s, n in holes), m  # the unwritten end of the volume
    assert cluster.cli("volume", "delete", "missing", check=False).returncode != 0


@pytest.mark.parametrize("mode", MODES)
def test_cluster_ext4_survives_cluster_restart(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    require_tools("nbdfuse", "fusermount3", "mkfs.ext4", "fsck.ext4", "unshare")
    cluster.up()
    cluster.cli("volume", "create", "fs", "--size", "128M", "--replication", mode)
    src = tmp_path / "src"
    expected = _make_tree(src)
    work = tmp_path / "work"
    work.mkdir()
    _phase("write", f"{cluster.uri}/fs", work, src)
    assert _read_sums(work / "sums.write") == expected
    cluster.down()
    cluster.up()
    _phase("verify", f"{cluster.uri}/fs", work)
    assert _read_sums(work / "sums.verify") == expected


NBLOCKS = 1024  # 4 MiB: all in the volume's first extent, so in one group
QD = 8


def _writer(py: str, uri: str, journal: Path, seed: int, first_seq: int, max_ops: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py, str(CLIENTS / "nbd_tagged_writer.py"), uri, str(journal), str(NBLOCKS), str(seed), str(first_seq),
         str(QD), str(max_ops)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _verify(uri: str, journal: Path, tmp_path: Path, when: str) -> Journal:
    j = Journal.load(journal)
    got = nbd_read(uri, 0, NBLOCKS * BLOCK, tmp_path)
    assert got["ok"], f"{when}: read failed: {got}"
    problems = judge(got["data"], j, NBLOCKS)
    assert not problems, f"{when}: {len(problems)} bad blocks ({len(j.acked)} acked): {problems[:10]}"
    return j


@pytest.mark.parametrize("mode", MODES)
def test_kill_leader_under_writes_then_power_cut(volatile_cluster: Cluster, tmp_path: Path, mode: str) -> None:
    """Raft: kill -9 the leader; chain: kill -9 the head (the tail's turn is in
    test_chain_zombie_head_is_fenced_and_tail_kill_loses_nothing)."""
    py = require_libnbd()
    cluster = volatile_cluster
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "256M", "--replication", mode)
    group = cluster.status()["volumes"][0]["extent_groups"][0]
    uri = f"{cluster.uri}/vol"
    journal = tmp_path / "journal.txt"

    # 1. kill -9 the leader of the data's group while the writer runs; I/O must resume by itself.
    writer = _writer(py, uri, journal, seed=1, first_seq=1, max_ops=1500)
    try:
        _wait(lambda: _count_acks(journal) >= 300, 90, "300 acknowledged writes")
        leader = next(g["leader"] for g in cluster.status()["groups"] if g["group"] == group)
        assert leader, "the data's group has no leader"
        acks_at_kill = _count_acks(journal)
        t_kill = time.monotonic()
        cluster.kill(f"n{leader}")
        _wait(lambda: _count_acks(journal) > acks_at_kill + QD, 30, "writes to resume after the leader was killed")
        pause_s = time.monotonic() - t_kill
        # failure detection: the metadata group marks the silent node suspect (3 missed heartbeats)
        _wait(lambda: next(n for n in cluster.status()["nodes"] if n["id"] == leader)["map_state"] in ("suspect", "down"),
              30, f"n{leader} to be marked suspect")
        out, err = writer.communicate(timeout=180)
    finally:
        kill_group(writer)
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["end"] == "max_ops" and result["failed"] == 0, (result, err.decode()[-2000:])
    print(f"\nI/O pause after kill -9 of leader n{leader}: {pause_s:.2f}s")
    j = _verify(uri, journal, tmp_path, "after killing the leader")

    # 2. `cluster up` brings the node back; it catches up with the group.
    cluster.up()

    def caught_up() -> bool:
        g = next(g for g in cluster.status()["groups"] if g["group"] == group)
        applied = g["applied"]
        return str(leader) in applied and len(set(applied.values())) == 1

    _wait(caught_up, 60, f"n{leader} to catch up")

    # 3. power cut: more writes, then kill -9 every process at once (gateway too), `cluster up`.
    writer = _writer(py, uri, journal, seed=2, first_seq=j.max_seq() + 1, max_ops=1_000_000)
    try:
        base = _count_acks(journal)
        _wait(lambda: _count_acks(journal) >= base + 300, 90, "300 more acknowledged writes")
        pids = list(cluster.pids().values())
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        writer.communicate(timeout=60)
    finally:
        kill_group(writer)
    # The machine is off once every process is gone (a dying process holds its listening socket for a
    # moment after its lock is released: `cluster up` before that met EADDRINUSE).
    _wait(lambda: all(_zombie(pid) for pid in pids), 30, "every process to die")
    cluster.up()
    _verify(uri, journal, tmp_path, "after a power cut of the whole cluster")


@pytest.mark.parametrize(("mode", "where"), [("raft", "engine"), ("chain", "engine"), ("raft", "wal")])
def test_corrupt_replica_is_read_from_a_peer_and_repaired(cluster: Cluster, tmp_path: Path, mode: str,
                                                          where: str) -> None:
    """DESIGN "Data path": a block failing its CRC on the member that serves reads (the Raft leader, the
    chain's tail) is served from a healthy replica and rewritten; `cluster status` shows the error on that
    node. `where`: "engine" with write-once off (the block in an engine segment), "wal" with it on (stored
    once, in the WAL, the engine linking to it: docs/format/write-once.md)."""
    require_libnbd()
    if where == "engine":
        cluster.set_raft(write_once_min_bytes=0)  # every block written into the engine too
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "256M", "--replication", mode)
    uri = f"{cluster.uri}/vol"
    data = os.urandom(64 << 10)
    nbd_write(uri, 0, data, tmp_path, fua=True)
    group = cluster.status()["volumes"][0]["extent_groups"][0]
    needle = data[8192:8192 + 64]  # inside the third 4 KiB block
    node: dict[str, Any] = {}
    for _attempt in range(5):
        # The leader applied the write before acknowledging it, but leadership may have moved since (the
        # preferred-leader balancer) to a node that applies it only when it learns the commit index: ask
        # for the leader until its engine holds the block (deadline 10 s).
        deadline = time.monotonic() + 10
        while True:
            g = next(g for g in cluster.status()["groups"] if g["group"] == group)
            leader = g["leader"] if mode == "raft" else g["members"][-1]
            hits = find_on_disk(cluster.root / f"n{leader}" / where, needle)
            if hits or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert hits, "the written block is not in the leader's engine"
        # Segment cleaning may move the record between finding it and reading it (then the flip hit a
        # dead copy and the read is clean): flip every copy found, and try again if nothing was caught.
        for path, off in hits:
            flip_byte(path, off)
        got = nbd_read(uri, 0, len(data), tmp_path)
        assert got["ok"] and got["data"] == data, "the read did not return the acknowledged data"
        node = next(n for n in cluster.status()["nodes"] if n["id"] == leader)
        if node["errors"].get("corrupt_reads", 0) >= 1:
            break
    assert node["errors"].get("corrupt_reads", 0) >= 1 and node["errors"].get("blocks_repaired", 0) >= 1, node
    # repaired in place: the next read finds no bad block
    got = nbd_read(uri, 0, len(data), tmp_path)
    assert got["ok"] and got["data"] == data
    again = next(n for n in cluster.status()["nodes"] if n["id"] == leader)
    assert again["errors"]["corrupt_reads"] == node["errors"]["corrupt_reads"], again


def test_exclusive_attach_fences_a_stale_gateway(cluster: Cluster, tmp_path: Path) -> None:
    """Issue "cluster" item 5: one gateway at a time per volume (attach recorded in the metadata group
    with an epoch); after a forced takeover the old gateway's writes are refused by the nodes."""
    from .nbdwire import NBD_CMD_WRITE, RawConn

    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M")
    host, port = cluster.uri.removeprefix("nbd://").rsplit(":", 1)
    c1 = RawConn(host, int(port))
    c1.connect_export("vol")
    c1.write(0, b"A" * 4096)  # node 1's gateway attaches the volume
    st = cluster.status()
    assert st["volumes"][0]["attached_by"] == "n1", st["volumes"]

    # a second gateway on the same cluster: a separate process (a gateway machine)
    cfg = (cluster.root / "nodes" / "gateway.toml").read_text()
    gw2_port = free_tcp_port()
    cfg = "\n".join(line for line in cfg.splitlines() if not line.startswith(("port", "admin_socket", "gateway_id")))
    gw2_cfg = tmp_path / "gw2.toml"
    gw2_cfg.write_text(f'port = {gw2_port}\ngateway_id = "gw2"\n' + cfg)
    gw2 = subprocess.Popen([*RAFTBLOCK, "gateway", "--config", str(gw2_cfg), "--log-format", "json"],
                           stdout=subprocess.PIPE, stderr=open(tmp_path / "gw2.log", "wb"), start_new_session=True)
    try:
        assert gw2.stdout is not None and gw2.stdout.readline().startswith(b"READY"), (tmp_path / "gw2.log").read_text()
        c2 = RawConn(host, gw2_port)
        c2.connect_export("vol")
        rep = c2.call(NBD_CMD_WRITE, 4096, 4096, data=b"B" * 4096)
        assert rep.error == 1, f"gw2 must be refused (EPERM) while n1 holds the volume, got {rep.error}"
        c2.close()

        # the operator moves the volume to gw2; n1 is fenced from then on
        r = cluster.cli("volume", "attach", "vol", "--gateway", "gw2", "--force")
        assert "attach epoch 2" in r.stdout, r.stdout
        c3 = RawConn(host, gw2_port)
        c3.connect_export("vol")
        c3.write(8192, b"C" * 4096)
        rep = c1.call(NBD_CMD_WRITE, 8192, 4096, data=b"Z" * 4096, cookie=2)
        assert rep.error == 1, f"the fenced gateway's write must get EPERM, got {rep.error}"
        assert c3.read(0, 3 * 4096) == b"A" * 4096 + bytes(4096) + b"C" * 4096
        c3.close()
        c1.close()
    finally:
        gw2.terminate()
        try:
            gw2.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gw2.kill()
            gw2.wait()


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_forged_frames_to_a_node_are_refused_counted_and_it_keeps_serving(cluster: Cluster, tmp_path: Path) -> None:
    """docs/format/wire.md reader's cases, on a node process of the cluster: wrong CRC (dropped), unknown
    group (refused), stale term (Raft paper 5.1: ignored), unknown frame type (malformed), bad magic
    (connection closed); all counted, shown in `cluster status`, and the node keeps serving."""
    import socket

    from raftblock.replication.raft.types import GroupId, Message, MessageType, NodeId
    from raftblock.wire.framing import ROLE_PEER, encode_frame
    from raftblock.wire.raftcodec import encode_raft

    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M")
    st = cluster.status()
    group = st["volumes"][0]["extent_groups"][0]
    node = next(n for n in st["nodes"] if n["id"] == 1)
    host, port = node["address"].rsplit(":", 1)
    # The frames come from an insider: signed with the cluster's keys (raftblock/wire/auth.py), as node 3 would;
    # what is checked is the layer behind authentication (test_auth.py checks the outsiders).
    ring = cluster_ring(cluster.root)
    hb = Message(MessageType.HEARTBEAT, GroupId(group), NodeId(3), NodeId(1), 0, commit=0)
    unk = Message(MessageType.HEARTBEAT, GroupId(999_999), NodeId(3), NodeId(1), 50)

    def bad_crc(s: Any) -> bytes:
        b = bytearray(b"".join(bytes(p) for p in s.seal(encode_raft(hb))))
        b[-1] ^= 0x55
        return bytes(b)

    def counter(name: str) -> int:
        n1 = next(n for n in cluster.status()["nodes"] if n["id"] == 1)
        return int(n1["counters"].get(name, 0))

    # Each forged frame on a connection of its own, claiming to be peer 3: the real node 3 reconnecting
    # may replace (close) that connection at any moment, so a send may fail (BrokenPipe, reset) or the
    # frame be lost with it. Both are legal outcomes of that race: send again until the node counts it.
    for make, name in ((bad_crc, "frames_bad_crc"),  # wrong CRC: dropped (and, signed, the connection closed)
                       (lambda s: s.seal(encode_raft(unk)), "raft_unknown_group"),
                       (lambda s: s.seal(encode_raft(hb)), "raft_stale_term"),  # term 0
                       (lambda s: s.seal(encode_frame(99, group, b"junk")), "frames_malformed")):  # unknown type
        before = counter(name)
        deadline = time.monotonic() + 30
        while counter(name) <= before:
            assert time.monotonic() < deadline, f"the node never counted {name}"
            try:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    signed_hello(s, ring, 3, ROLE_PEER, first=lambda session, make=make: [
                        f if isinstance(f, bytes) else b"".join(bytes(p) for p in f) for f in [make(session)]])
                    end = time.monotonic() + 2
                    while counter(name) <= before and time.monotonic() < end:
                        time.sleep(0.05)
            except OSError:
                pass
    errors = next(n for n in cluster.status()["nodes"] if n["id"] == 1)["errors"]
    assert all(errors.get(k, 0) >= 1 for k in ("frames_bad_crc", "raft_unknown_group", "frames_malformed")), errors
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"XX" + bytes(40))  # bad magic: the node closes this connection
        s.settimeout(10)
        try:
            while s.recv(1 << 16):  # what the node had sent before (its HELLO, answers) drains first
                pass
        except TimeoutError:
            raise AssertionError("the node kept a connection with a bad magic open") from None
    _wait(lambda: next(n for n in cluster.status()["nodes"] if n["id"] == 1)["errors"].get("frames_bad_magic", 0) >= 1,
          30, "the bad magic to be counted")
    from .nbdwire import RawConn

    h, p = cluster.uri.removeprefix("nbd://").rsplit(":", 1)
    with RawConn(h, int(p)) as c:
        c.connect_export("vol")
        c.write(0, b"Q" * 65536)
        assert c.read(0, 65536) == b"Q" * 65536
    assert {n["state"] for n in cluster.status()["nodes"]} == {"up"}
    # and Prometheus sees them, by reason (the RaftblockFramesRefused alert's series)
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(node["metrics_url"], timeout=10).read().decode()
    refused = {s.labels["reason"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
               if s.name == "raftblock_node_frames_refused_total"}
    assert all(refused[r] >= 1 for r in ("bad_crc", "unknown_group", "malformed", "bad_magic")), refused


def _group(cluster: Cluster, gid: int) -> dict[str, Any]:
    return next(g for g in cluster.status()["groups"] if g["group"] == gid)


def _counter(cluster: Cluster, node: int, name: str) -> int:
    """A node's counter as `cluster status` reports it; a status that could not reach the node (it has no
    counters then, which would read as 0) is asked again."""
    deadline = time.monotonic() + 30
    while True:
        n = next(n for n in cluster.status()["nodes"] if n["id"] == node)
        if "counters" in n or time.monotonic() > deadline:
            return int(n.get("counters", {}).get(name, 0))


def test_chain_zombie_head_is_fenced_and_tail_kill_loses_nothing(separate_cluster: Cluster, tmp_path: Path) -> None:
    """Chain fencing at process level (docs/chain.md "Epochs"): a head frozen (SIGSTOP) is removed by the
    metadata group (epoch + 1) while the writer goes on through the new head; thawed, the zombie cannot
    acknowledge a write (a write sent straight to it is refused or never answered OK, and never becomes
    visible); forged frames of the old epoch are refused and counted (stale_epoch) as are frames from a
    non-member (not_neighbour); the thawed node rejoins at the tail and its predecessor is killed at once
    (a failure during a rejoin), then the tail is killed (one member left); the verifier finds every
    acknowledged write; the killed nodes come back, rejoin at the tail and the chain is whole again."""
    import asyncio
    import socket

    from raftblock.client.router import NodeClient
    from raftblock.replication.chain.types import ChainMessage, MessageType, Record
    from raftblock.replication.raft.types import GroupId, NodeId
    from raftblock.wire import raftblock_pb2 as pb
    from raftblock.wire.chaincodec import encode_chain
    from raftblock.wire.client import OP_C_WRITE, ST_OK
    from raftblock.wire.framing import ROLE_PEER
    from raftblock.wire.ops import OP_TRIM, BlockOp, encode_batch

    py = require_libnbd()
    cluster = separate_cluster
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M", "--replication", "chain")
    st = cluster.status()
    gid = st["volumes"][0]["extent_groups"][0]
    head = _group(cluster, gid)["members"][0]
    addr = {n["id"]: n["address"] for n in st["nodes"]}
    epoch0 = _group(cluster, gid)["epoch"]
    uri = f"{cluster.uri}/vol"
    journal = tmp_path / "journal.txt"
    writer = _writer(py, uri, journal, seed=3, first_seq=1, max_ops=1_000_000)
    try:
        _wait(lambda: _count_acks(journal) >= 200, 90, "200 acknowledged writes")
        # 1. freeze the head: the metadata group removes it, the writer goes on through the next member
        os.kill(cluster.pids()[f"n{head}"], signal.SIGSTOP)
        try:
            _wait(lambda: head not in _group(cluster, gid)["members"], 60, f"n{head} to be removed")
            acks = _count_acks(journal)
            _wait(lambda: _count_acks(journal) > acks + QD, 30, "writes to go on through the new head")
        finally:
            os.kill(cluster.pids()[f"n{head}"], signal.SIGCONT)
        # 2. the zombie: a write sent straight to it (block 2000, outside the writer's blocks) is never OK
        block = 2000
        extent = gid << 32
        payload = b"Z" * BLOCK

        zombie_ring = cluster_ring(cluster.root)  # the zombie holds the cluster's keys

        async def zombie_write() -> int:
            from raftblock._fast import blockcrc

            h, p = addr[head].rsplit(":", 1)
            client = NodeClient({head: (h, int(p))}, attempt_timeout_s=5.0, ring=zombie_ring)
            req = pb.ClientRequest(op=OP_C_WRITE, extent_id=extent, block=block, count=1)
            req.crcs.extend(blockcrc.block_crcs(payload))
            try:
                resp, _ = await client.call_node(head, gid, req, [payload])
                return int(resp.status)
            except (OSError, TimeoutError):
                return -1
            finally:
                await client.close()

        status = asyncio.run(zombie_write())
        assert status != ST_OK, "a removed head acknowledged a write"
        # 3. forged frames: the old epoch to the new head, and a write from a node that is not its predecessor
        new_head = _group(cluster, gid)["members"][0]
        cur_epoch = _group(cluster, gid)["epoch"]
        assert cur_epoch > epoch0
        stale0 = _counter(cluster, new_head, "chain_stale_epoch")
        nn0 = _counter(cluster, new_head, "chain_not_neighbour")
        h, p = addr[new_head].rsplit(":", 1)
        rec = Record(10**6, encode_batch([BlockOp(OP_TRIM, extent, 0, 16)]), epoch0)  # would trim acked data
        forged = [ChainMessage(MessageType.ACK, GroupId(gid), NodeId(head), NodeId(new_head), epoch0, seq=10**6),
                  ChainMessage(MessageType.WRITE, GroupId(gid), NodeId(head), NodeId(new_head), epoch0,
                               seq=10**6, records=(rec,)),
                  ChainMessage(MessageType.WRITE, GroupId(gid), NodeId(head), NodeId(new_head), cur_epoch,
                               seq=10**6, records=(rec,))]

        def refused() -> bool:
            # two old-epoch frames are stale; the third is from a non-neighbour, or stale too if the
            # group's epoch moved on meanwhile (the thawed node rejoining)
            stale = _counter(cluster, new_head, "chain_stale_epoch") - stale0
            nn = _counter(cluster, new_head, "chain_not_neighbour") - nn0
            return stale >= 2 and stale + nn >= 3

        # The real node may replace this connection at any time (one per node pair), closing it under a
        # send (BrokenPipe) or before the frames are read: legal outcomes of that race, so send again until
        # they are counted.
        ring = cluster_ring(cluster.root)
        give_up = time.monotonic() + 60
        while not refused() and time.monotonic() < give_up:
            try:
                with socket.create_connection((h, int(p)), timeout=10) as s:
                    # an insider (the zombie holds the cluster's keys): signed, so the epoch checks are what refuse
                    # the frames in the same write as the AUTH: read in the turn the node attaches this connection
                    signed_hello(s, ring, head, ROLE_PEER, first=lambda session: [
                        b"".join(bytes(b) for b in session.seal(encode_chain(m))) for m in forged])
                    deadline = time.monotonic() + 5
                    while not refused() and time.monotonic() < deadline:
                        time.sleep(0.1)
            except OSError:
                pass
        counts = {k: _counter(cluster, new_head, k) for k in ("chain_stale_epoch", "chain_not_neighbour",
                                                              "chain_not_member", "chain_future_epoch",
                                                              "chain_wrong_destination", "frames_malformed")}
        assert refused(), f"the forged CHAIN frames were not refused and counted: {counts}, before: {stale0}/{nn0}"
        # 4. the thawed node rejoins at the tail (it syncs: its log ends in the zombie's record, so a
        #    snapshot replaces it); kill -9 its predecessor at once: a failure during a rejoin must not stall
        _wait(lambda: _group(cluster, gid)["members"][-1] == head, 60, f"n{head} to rejoin at the tail")
        pred = _group(cluster, gid)["members"][-2]
        acks = _count_acks(journal)
        cluster.kill(f"n{pred}")
        _wait(lambda: _count_acks(journal) > acks + QD, 60, "writes to resume after the joiner's predecessor was killed")
        # 5. kill -9 the tail: the chain goes on with one member (never below one)
        _wait(lambda: pred not in _group(cluster, gid)["members"], 60, f"n{pred} to be removed")
        tail = _group(cluster, gid)["members"][-1]
        acks = _count_acks(journal)
        cluster.kill(f"n{tail}")
        _wait(lambda: _count_acks(journal) > acks + QD, 60, "writes to resume after the tail was killed")
    finally:
        kill_group(writer)
    j = _verify(uri, journal, tmp_path, "after a zombie head and two kills")
    assert len(j.acked) >= 200
    got = nbd_read(uri, block * BLOCK, BLOCK, tmp_path)
    assert got["ok"] and got["data"] == bytes(BLOCK), "the zombie's write became visible"
    # 6. the killed nodes come back and rejoin at the tail; every member applies the same
    cluster.up()

    def whole() -> bool:
        g = _group(cluster, gid)
        return sorted(g["members"]) == sorted(addr) and len(set(g["applied"].values())) == 1 \
            and len(g["applied"]) == 3

    _wait(whole, 90, "the chain to be whole again")
    _verify(uri, journal, tmp_path, "after the rejoins")


def test_chain_replacement_disk_joins_at_the_tail_by_a_chunked_snapshot(cluster: Cluster, tmp_path: Path) -> None:
    """docs/chain.md "Join at the tail": the head's node is killed and comes back at once with a new disk
    (data dir wiped), before the metadata group has noticed it was gone. It registers with a new disk id,
    so it leaves the chain (an empty head would hand its emptiness down the chain); the metadata group
    adds it back at the tail and its predecessor sends the group's image (72 MiB: more than one frame
    may carry, so in chunks), then the records after it. Reads are the tail's: every block reads back
    from the replacement."""
    import shutil

    require_tools("qemu-io")
    base = cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "256M", "--replication", "chain")
    uri = f"{base}/vol"
    _qemu_io(uri, ["write -P 0x5c 0 72M", "write -P 0xc5 200M 1M"])
    gid = cluster.status()["volumes"][0]["extent_groups"][0]
    assert all(g == gid for g in cluster.status()["volumes"][0]["extent_groups"]), "one group for the volume"
    head = _group(cluster, gid)["members"][0]
    cluster.kill(f"n{head}")
    shutil.rmtree(cluster.root / f"n{head}")  # a new disk
    cluster.up()

    def whole() -> bool:
        g = _group(cluster, gid)
        return g["members"][-1] == head and len(g["applied"]) == 3 and len(set(g["applied"].values())) == 1

    _wait(whole, 120, f"n{head} to rejoin at the tail and catch up")
    assert _counter(cluster, head, "chain_images_received") >= 1
    assert _counter(cluster, head, "chain_snapshots_installed") >= 1
    _qemu_io(uri, ["read -P 0x5c 0 72M", "read -P 0 72M 128M", "read -P 0xc5 200M 1M"])  # served by the new tail


def _spare_cluster(c: Cluster, mode: str, writes: list[str]) -> tuple[str, int, dict[int, str], list[int], int, int]:
    """4 nodes in 3 racks, a 128 MiB volume of one group in `mode` written by qemu-io `writes`: (uri, group,
    rack of each node, members, the spare node, the member in the spare's rack)."""
    r = c.cli("cluster", "up", "--nbd-port", "0", "--nodes", "4", "--racks", "3",
              *(["--gateway", c.gateway] if c.gateway else []))
    base = r.stdout.strip().splitlines()[-1]
    c.cli("volume", "create", "vol", "--size", "128M", "--replication", mode)
    uri = f"{base}/vol"
    _qemu_io(uri, writes)
    st = c.status()
    gid = st["volumes"][0]["extent_groups"][0]
    rack = {n["id"]: n["rack"] for n in st["nodes"]}
    members = _group(c, gid)["members"]
    (spare,) = [n for n in rack if n not in members]
    (victim,) = [m for m in members if rack[m] == rack[spare]]
    return uri, gid, rack, members, spare, victim


def test_raft_re_replicates_to_a_spare_node_and_the_replaced_node_discards(tmp_path: Path) -> None:
    """Issue "self-healing", re-replication (Raft): 4 nodes in 3 racks; the member whose rack has a spare
    node dies. Once the detector calls it down, the metadata group removes it (the group's leader commits
    a single-server removal), then adds the spare (a single-server add), which joins with an empty log and
    copies the extents by snapshot plus the log tail; every block reads back, writes go on meanwhile, and
    `raftblock repair watch` reports. The dead node comes back after it was replaced: it drops its stale
    replica (WAL first, then the engine)."""
    require_tools("qemu-io")
    c = Cluster(tmp_path / "cluster", gateway="separate")  # the host outlives the victim
    try:
        uri, gid, rack, members, spare, victim = _spare_cluster(c, "raft", ["write -P 0x3c 0 24M", "write -P 0xc3 100M 1M"])
        c.kill(f"n{victim}")
        _qemu_io(uri, ["write -P 0x77 50M 2M"])  # the survivors are a majority: writes go on at once

        def healed() -> bool:
            g = _group(c, gid)
            return (sorted(g["members"]) == sorted([m for m in members if m != victim] + [spare])
                    and len(g["applied"]) == 3 and len(set(g["applied"].values())) == 1)

        _wait(healed, 120, f"n{spare} to replace n{victim}")
        assert len({rack[m] for m in _group(c, gid)["members"]}) == 3
        out = c.cli("repair", "watch", "--once").stdout
        assert "REPAIRS" in out and "none" in out, out
        leader = _group(c, gid)["leader"]
        c.kill(f"n{leader}")  # the new replica must be a full member: it and the third form the majority
        _qemu_io(uri, ["read -P 0x3c 0 24M", "read -P 0x77 50M 2M", "read -P 0 52M 48M", "read -P 0xc3 100M 1M"])
        c.cli("cluster", "up")  # the old leader, and the replaced node, come back

        def discarded() -> bool:
            n = next(n for n in c.status()["nodes"] if n["id"] == victim)
            return n.get("counters", {}).get("replicas_discarded", 0) >= 1 and n.get("groups") == 0

        _wait(discarded, 60, f"n{victim} to drop its stale replica")
        assert victim not in _group(c, gid)["members"] and str(victim) not in _group(c, gid)["applied"]
        _qemu_io(uri, ["read -P 0x3c 0 24M", "read -P 0x77 50M 2M"])
    finally:
        _cleanup(c)


def test_node_stop_check_refuses_and_drain_moves_every_replica_away(tmp_path: Path) -> None:
    """Issue "self-healing", drain and stop-check (Raft): `node stop-check` says a member may be stopped
    while the others are up, and refuses (exit 1, `cluster down --node` too) while another member is down;
    `node drain --wait` adds the spare of the node's rack first, removes the drained node once the spare
    caught up, and returns when it holds nothing; it drops its copy; every block reads back; then it may be
    stopped."""
    require_tools("qemu-io")
    c = Cluster(tmp_path / "cluster")
    try:
        uri, gid, rack, members, spare, victim = _spare_cluster(c, "raft", ["write -P 0x5a 0 16M", "write -P 0xa5 90M 1M"])
        ok = c.cli("node", "stop-check", str(victim))
        assert "safe to stop" in ok.stdout, ok.stdout
        other = next(m for m in members if m != victim)
        c.kill(f"n{other}")
        _wait(lambda: next(n for n in c.status()["nodes"] if n["id"] == other)["map_state"] != "up", 30,
              f"n{other} to be suspected")
        no = c.cli("node", "stop-check", str(victim), check=False)
        assert no.returncode == 1 and f"group {gid}" in no.stdout and "majority" in no.stdout, no.stdout
        down = c.cli("cluster", "down", "--node", str(victim), check=False)
        assert down.returncode == 1 and "majority" in down.stderr, down.stderr
        assert c.pids().get(f"n{victim}") and Path(f"/proc/{c.pids()[f'n{victim}']}").exists()  # still running
        refused = c.cli("node", "drain", str(victim), check=False)
        assert refused.returncode == 1 and "majority" in refused.stderr, refused.stderr
        c.cli("cluster", "up")
        _wait(lambda: all(n["map_state"] == "up" for n in c.status()["nodes"]), 60, "every node up again")
        out = c.cli("node", "drain", str(victim), "--wait", timeout_s=180).stdout
        assert "0 group(s) left" in out, out
        g = _group(c, gid)
        assert sorted(g["members"]) == sorted([m for m in members if m != victim] + [spare])
        assert len({rack[m] for m in g["members"]}) == 3

        def dropped() -> bool:
            n = next(n for n in c.status()["nodes"] if n["id"] == victim)
            return n.get("groups") == 0 and n.get("counters", {}).get("replicas_discarded", 0) >= 1

        _wait(dropped, 60, f"n{victim} to drop its copy")
        _qemu_io(uri, ["read -P 0x5a 0 16M", "read -P 0 16M 74M", "read -P 0xa5 90M 1M"])
        assert c.cli("node", "stop-check", str(victim)).returncode == 0
        assert c.cli("cluster", "down", "--node", str(victim)).stdout.strip() == f"stopped: n{victim}"
    finally:
        _cleanup(c)


def test_node_add_rebalances_replicas_onto_the_new_node(tmp_path: Path) -> None:
    """Issue "self-healing", rebalancing: on a 3-node cluster whose groups all use every node, `node add`
    starts a fourth node; the running nodes learn its address from the map and the metadata leader moves
    groups to it, one at a time, each new member caught up before the old one leaves; the data reads back
    through the moved group."""
    require_tools("qemu-io")
    c = Cluster(tmp_path / "cluster")
    try:
        r = c.cli("cluster", "up", "--nbd-port", "0")
        base = r.stdout.strip().splitlines()[-1]
        for i in range(3):
            c.cli("volume", "create", f"v{i}", "--size", "64M", "--replication", "raft")
            _qemu_io(f"{base}/v{i}", [f"write -P 0x{0x41 + i:x} 0 8M"])
        out = c.cli("node", "add").stdout
        assert "added node 4" in out, out

        def moved() -> bool:
            st = c.status()
            on4 = [g for g in st["groups"] if 4 in g["members"]]
            return (len(on4) >= 1 and all(len(g["members"]) == 3 for g in st["groups"])
                    and all(len(g["applied"]) == 3 and len(set(g["applied"].values())) == 1 for g in on4))

        _wait(moved, 120, "a group to move to node 4")
        st = c.status()
        counts = {n["id"]: sum(1 for g in st["groups"] if n["id"] in g["members"]) for n in st["nodes"]}
        assert counts[4] >= 1 and sum(counts.values()) == 9, counts
        for g in st["groups"]:
            assert len({next(n["rack"] for n in st["nodes"] if n["id"] == m) for m in g["members"]}) == 3
        for i in range(3):
            _qemu_io(f"{base}/v{i}", [f"read -P 0x{0x41 + i:x} 0 8M", "read -P 0 8M 56M"])
    finally:
        _cleanup(c)


def test_chain_re_replicates_to_a_spare_node_of_the_dead_members_rack(tmp_path: Path) -> None:
    """Issue "self-healing", re-replication (chain): 4 nodes in 3 racks; the member whose rack has a spare
    node dies; the metadata group removes it and adds the spare at the tail (3 replicas in 3 racks again),
    which copies the data; every block reads back from it (the tail serves reads). The dead node comes
    back after it was replaced: it drops its stale replica."""
    require_tools("qemu-io")
    c = Cluster(tmp_path / "cluster", gateway="separate")  # the host outlives the victim
    try:
        uri, gid, rack, members, spare, victim = _spare_cluster(c, "chain", ["write -P 0x3c 0 8M", "write -P 0xc3 100M 1M"])
        c.kill(f"n{victim}")

        def healed() -> bool:
            g = _group(c, gid)
            return (g["members"][-1] == spare and victim not in g["members"] and len(g["members"]) == 3
                    and len(g["applied"]) == 3 and len(set(g["applied"].values())) == 1)

        _wait(healed, 120, f"n{spare} to replace n{victim}")
        assert len({rack[m] for m in _group(c, gid)["members"]}) == 3
        _qemu_io(uri, ["read -P 0x3c 0 8M", "read -P 0 8M 92M", "read -P 0xc3 100M 1M"])  # from the new tail
        c.cli("cluster", "up")  # the replaced node comes back

        def discarded() -> bool:
            n = next(n for n in c.status()["nodes"] if n["id"] == victim)
            return n.get("counters", {}).get("chain_replicas_discarded", 0) >= 1 and n.get("groups") == 0

        _wait(discarded, 60, f"n{victim} to drop its stale replica")
        assert victim not in _group(c, gid)["members"] and str(victim) not in _group(c, gid)["applied"]
        _qemu_io(uri, ["read -P 0x3c 0 8M", "read -P 0xc3 100M 1M"])
    finally:
        _cleanup(c)


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_clients_stay_linearizable_across_a_kill(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    """Issue "self-healing", the checker at work (raftblock/testing/linearizability.py): four clients
    read and write 16 shared blocks through the gateway, one request at a time each, while the Raft leader
    / the chain's head is killed; every client records its history; the whole history must be linearizable
    (per block a register; errors count as indeterminate) and hold at least 500 completed operations.
    It once found the double apply of a write retried across the failover (chain); exactly-once writes
    (replication/sessions.py) fixed it. That race is rare here (3 runs in a row pass with the fix taken
    out), so its deterministic check is tests/unit/test_runtime.py's retried-write test."""
    from raftblock.testing.linearizability import History, check

    py = require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M", "--replication", mode)
    gid = cluster.status()["volumes"][0]["extent_groups"][0]
    uri = f"{cluster.uri}/vol"
    paths = [tmp_path / f"history-{c}.jsonl" for c in range(4)]
    procs = [subprocess.Popen([py, str(CLIENTS / "nbd_history_client.py"), str(Path(__file__).parents[2]), uri,
                               str(p), str(c + 1), "16", str(c * 7 + 1), "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for c, p in enumerate(paths)]
    try:
        _wait(lambda: all(p.exists() and p.stat().st_size > 20_000 for p in paths), 60, "the clients to get going")
        g = _group(cluster, gid)
        victim = g["leader"] if mode == "raft" else g["members"][0]
        cluster.kill(f"n{victim}")
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    counts = [json.loads(o.decode().strip().splitlines()[-1]) for o, _ in outs]
    ops = [op for p in paths for op in History.load(p).to_ops()]
    res = check(ops, timeout_s=60)
    print(f"\n{mode}: {len(ops)} ops ({counts}), linearizable={res.ok} in {res.elapsed_s:.2f}s")
    assert res.ok is True, res.explain
    assert sum(c["ok"] for c in counts) >= 500, counts
