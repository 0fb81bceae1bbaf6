"""The pysyncobj seams of the metadata group (raftblock/meta/group.py), each proved:

- the pin: pysyncobj is exactly the version (and the files) the seams were written against;
- durable term/vote: a vote is fsync'ed before it is sent, and a restarted node does not vote twice in a
  term (Raft §5.2: "each server will vote for at most one candidate in a given term");
- the snapshot (fullDumpFile) is fsync'ed, renamed in durably, restores the state, and never overrides
  the configured membership;
- the Raft port listens only on the configured host (pysyncobj's default is 0.0.0.0);
- an unauthenticated peer's frames are refused before unpickling (a pickle that would create a marker
  never runs), and the node keeps working;
- heartbeats are not log entries: only transitions are.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pysyncobj
import pysyncobj.serializer
import pysyncobj.syncobj
import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.node import TCPNode
from pysyncobj.transport import Transport

from raftblock.control.health import HealthConfig
from raftblock.meta import group as meta_group
from raftblock.meta.group import MetaConfig, MetaGroup, MetaNode, Timings
from raftblock.meta.journal import DurableJournal, durable_replace
from raftblock.meta.state import CreateVolume, InitCluster, RegisterNode, Result
from raftblock.replication.raft.types import NodeId
from raftblock.testing.serve import free_port

SECRET = b"test-cluster-secret-0123456789"
FAST = Timings(election_timeout_ms_min=310, election_timeout_ms_max=500, connection_retry_ms=100)

# sha256 of the pysyncobj 0.3.17 files whose internals the seams rely on (read when they were written)
PINNED_SOURCES = {
    "config.py": "fbbc7ff9f18e4d15a7fd563376e42f5bd192956879d4b810b056d5248b955698",
    "encryptor.py": "db20725465efdfc6d7a3b5b2112f53bc5426d36c56312ebdf5fbcf05423a7c19",
    "journal.py": "9cf1eaf6acc704581a4cf7d3de330a404403913107adc91c929778b7e3f35edf",
    "serializer.py": "4d39fde2f15000ad8f507ec229ebd4f6a86371b6f84d4dc1439a9cccd52857ee",
    "syncobj.py": "e8bdf06797085d734df86e24ab4802fe87893dff77268565ec036f7ad4a1cfe4",
    "tcp_connection.py": "7784ed8da031369fe36f805cb186a2e94a3bd6f10fed2dd59c8cc3713fd6331c",
    "tcp_server.py": "bde2f216c1a585029188d0438b44762e2e797dfc53bbce387839daaa46b9a60d",
    "transport.py": "0c9d89f9c4781ec9772df8011d7975a1a4a1a5f541357e12eae85a813e92b50b",
}


def _deadline(cond: Callable[[], bool], timeout_s: float, what: str, step: Callable[[], None] | None = None) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- the pin


def test_pysyncobj_is_pinned_and_seams_are_installed() -> None:
    assert importlib.metadata.version("pysyncobj") == meta_group.PYSYNCOBJ_PINNED == "0.3.17"
    assert pysyncobj.syncobj.createJournal is meta_group._create_journal
    assert pysyncobj.serializer.atomicReplace is durable_replace
    root = Path(pysyncobj.__file__).parent
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in PINNED_SOURCES}
    assert digests == PINNED_SOURCES, (
        "pysyncobj's sources changed: re-read every seam in raftblock/meta/group.py before updating the pin")


# ---------------------------------------------------------------------------------------------- helpers


class FakeTransport(Transport):  # type: ignore[misc]
    """pysyncobj's documented transport seam: records what the node sends, lets the test deliver."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(None, None, [])
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.events = events

    @property
    def ready(self) -> bool:
        return True

    def tryGetReady(self) -> None:  # noqa: N802
        pass

    def waitReady(self) -> None:  # noqa: N802
        pass

    def send(self, node: Any, message: Any) -> bool:
        self.sent.append((node.id, message))
        self.events.append(f"send {message.get('type')}")
        return True

    def deliver(self, from_address: str, message: dict[str, Any]) -> None:
        self._onMessageReceived(TCPNode(from_address), message)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    out: list[str] = []
    real_fsync, real_fdatasync, real_rename = os.fsync, os.fdatasync, os.rename

    def fsync(fd: int) -> None:
        out.append("fsync")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        out.append("fdatasync")
        real_fdatasync(fd)

    def rename(a: Any, b: Any) -> None:
        out.append(f"rename {Path(b).name}")
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "rename", rename)
    yield out


MEMBERS = {NodeId(1): "127.0.0.1:1", NodeId(2): "127.0.0.1:2", NodeId(3): "127.0.0.1:3"}


def _vote_request(term: int) -> dict[str, Any]:
    return {"type": "request_vote", "term": term, "last_log_index": 1, "last_log_term": 0}


# ---------------------------------------------------------------------------------------------- term/vote


def test_vote_is_durable_before_sent_and_not_given_twice_after_restart(tmp_path: Path, events: list[str]) -> None:
    cfg = MetaConfig(NodeId(1), MEMBERS, tmp_path, SECRET, timings=FAST)
    t = FakeTransport(events)
    g = MetaGroup(cfg, transport=t)
    assert isinstance(g._SyncObj__raftLog, DurableJournal)  # the seam took: our journal, not pysyncobj's
    events.clear()
    t.deliver(MEMBERS[NodeId(2)], _vote_request(5))
    assert [m["type"] for _, m in t.sent] == ["response_vote"]
    sent_at = events.index("send response_vote")
    assert "rename raft.log.state" in events[:sent_at] and "fsync" in events[:sent_at]
    g._doDestroy()

    t2 = FakeTransport(events)
    g2 = MetaGroup(cfg, transport=t2)  # "restart" from the same directory
    assert g2.raftCurrentTerm == 5
    t2.deliver(MEMBERS[NodeId(3)], _vote_request(5))
    assert t2.sent == []  # already voted for node 2 in term 5
    t2.deliver(MEMBERS[NodeId(3)], _vote_request(6))
    assert [m["type"] for _, m in t2.sent] == ["response_vote"]  # a new term is a new vote
    g2._doDestroy()


# ---------------------------------------------------------------------------------------------- snapshot


def _single(tmp_path: Path, events: list[str], members: dict[NodeId, str] | None = None) -> tuple[MetaGroup, FakeTransport]:
    cfg = MetaConfig(NodeId(1), members or {NodeId(1): "127.0.0.1:1"}, tmp_path, SECRET, timings=FAST)
    t = FakeTransport(events)
    return MetaGroup(cfg, transport=t), t


def _commit(g: MetaGroup, cmd: Any) -> dict[str, Any]:
    from raftblock.meta.state import encode_command

    box: list[Any] = []
    g._apply(encode_command(cmd), callback=lambda res, err: box.append((res, err)))
    _deadline(lambda: bool(box), 5, "commit", step=lambda: g.doTick(0.01))
    res, err = box[0]
    assert err == 0, err
    return res  # type: ignore[no-any-return]


def test_snapshot_is_fsynced_restores_state_and_keeps_configured_members(tmp_path: Path, events: list[str]) -> None:
    g, _ = _single(tmp_path, events)
    _deadline(g.is_leader, 5, "single-node leadership", step=lambda: g.doTick(0.01))
    assert _commit(g, InitCluster("c"))["ok"]
    for i in (1, 2, 3):
        assert _commit(g, RegisterNode(i, f"r{i}", f"h:{i}", 1 << 40, 0))["ok"]
    assert _commit(g, CreateVolume("v", 1 << 30, 0))["ok"]
    events.clear()
    g.forceLogCompaction()
    dump = tmp_path / "snapshot.json"
    _deadline(dump.exists, 5, "the snapshot", step=lambda: g.doTick(0.01))
    g.doTick(0)  # pysyncobj sees the serializer finished and drops the journal prefix
    i = events.index("rename snapshot.json")
    assert events[i - 1] == "fsync" and events[i + 1] == "fsync"  # file synced before, directory after
    assert len(g._SyncObj__raftLog) <= 3
    expected = g.state_json()
    g._doDestroy()

    # restart with a different configured membership: the dump's state comes back, the membership does not
    members = {NodeId(1): "127.0.0.1:1", NodeId(2): "127.0.0.1:2", NodeId(3): "127.0.0.1:3"}
    g2, _ = _single(tmp_path, events, members)
    g2.doTick(0)  # loads fullDumpFile
    assert g2.state_json() == expected
    assert {n.address for n in g2.otherNodes} == {"127.0.0.1:2", "127.0.0.1:3"}
    assert g2.conf.dynamicMembershipChange is False
    assert g2._load(str(dump))[2] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    g2._doDestroy()


# ---------------------------------------------------------------------------------------------- sockets


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on `port`."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.add(addr)
    return out


def test_listens_only_on_the_configured_address(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    cfg = MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.2:{port}"}, tmp_path / "ours", SECRET, timings=FAST)
    g = MetaGroup(cfg)
    try:
        g.waitBinded()
        assert _listening(port) == {"0200007F"}  # 127.0.0.2, not 0.0.0.0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        g.destroy_synchronous()
    # pysyncobj's default for the same self address: every interface
    port2 = free_port("127.0.0.2")
    stock = SyncObj(f"127.0.0.2:{port2}", [], SyncObjConf(appendEntriesPeriod=0.05, raftMinTimeout=0.31,
                                                         raftMaxTimeout=0.5))
    try:
        stock.waitBinded()
        assert _listening(port2) == {"00000000"}
    finally:
        stock.destroy_synchronous()


class _Marker:
    """A pickle that creates a directory when unpickled: proof of code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def _evil_frames(marker: Path) -> list[bytes]:
    payload = zlib.compress(pickle.dumps(_Marker(marker), protocol=2), 3)
    fake_token = b"gAAAAA" + os.urandom(90)  # looks like Fernet, is not authenticated
    return [struct.pack("i", len(payload)) + payload, struct.pack("i", len(fake_token)) + fake_token,
            struct.pack("i", -5) + os.urandom(16)]


def _send_frames(port: int, frames: list[bytes]) -> None:
    for frame in frames:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(frame)
            s.settimeout(2)
            try:
                while s.recv(4096):  # the node closes the connection on a bad frame
                    pass
            except (ConnectionResetError, TimeoutError):
                pass


def test_unauthenticated_peer_is_refused_before_unpickling(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        MetaConfig(NodeId(1), {NodeId(1): "127.0.0.1:1"}, tmp_path, b"short")

    async def scenario() -> None:
        port = free_port()
        node = MetaNode(MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.1:{port}"}, tmp_path / "m", SECRET,
                                   cluster_id="c", timings=FAST))
        await node.start()
        try:
            marker = tmp_path / "pwned"
            await asyncio.to_thread(_send_frames, port, _evil_frames(marker))
            assert not marker.exists()
            res = await node.propose(InitCluster("c"), timeout_s=10)  # the node keeps working
            assert res.ok
        finally:
            await node.close()

    asyncio.run(scenario())

    # the same frames against pysyncobj without a password: the pickle runs (the test can see it)
    port = free_port()
    stock = SyncObj(f"127.0.0.1:{port}", [], SyncObjConf(appendEntriesPeriod=0.05, raftMinTimeout=0.31,
                                                        raftMaxTimeout=0.5))
    try:
        stock.waitBinded()
        marker = tmp_path / "pwned-stock"
        _send_frames(port, _evil_frames(marker)[:1])
        _deadline(marker.exists, 5, "the control pickle to run")
    finally:
        stock.destroy_synchronous()


def test_an_unauthenticated_peer_cannot_make_the_raft_port_buffer_a_huge_message(tmp_path: Path) -> None:
    """Rule 4: a declared length over META_MESSAGE_MAX disconnects at once; pysyncobj alone would wait, buffering
    up to 2 GiB of the peer's bytes before it could check anything."""
    from raftblock.meta import group as group_mod

    async def scenario() -> None:
        port = free_port()
        node = MetaNode(MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.1:{port}"}, tmp_path / "m", SECRET,
                                   cluster_id="c", timings=FAST))
        await node.start()
        before = group_mod.refused_oversize

        def flood() -> int:
            sent = 0
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(struct.pack("i", (1 << 31) - 1))  # "a 2 GiB message follows"
                chunk = os.urandom(1 << 16)
                try:
                    while sent < (256 << 20):  # the node hangs up long before 256 MiB
                        s.sendall(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            return sent

        try:
            sent = await asyncio.to_thread(flood)
            assert sent < (64 << 20), f"{sent} bytes accepted before the node hung up"
            assert group_mod.refused_oversize == before + 1
            res = await node.propose(InitCluster("c"), timeout_s=10)  # the node keeps working
            assert res.ok
        finally:
            await node.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- write rate


def test_heartbeats_are_not_log_entries(tmp_path: Path) -> None:
    health = HealthConfig(heartbeat_interval_ms=100, down_grace_ms=800, proposal_interval_ms_min=0)

    async def scenario() -> None:
        port = free_port()
        node = MetaNode(MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.1:{port}"}, tmp_path, SECRET, cluster_id="c",
                                   timings=FAST), health)
        await node.start()
        try:
            for i in (1, 2, 3):
                assert (await node.propose(RegisterNode(i, f"r{i}", f"h:{i}", 1 << 40, 0))).ok
            await _until(lambda: node.detector is not None and bool(node.state().cluster_id), 10)
            log0 = node.status()["commit_index"]
            for _ in range(30):  # 1.5 s of heartbeats from all three: no log entry
                for i in (1, 2, 3):
                    node.heartbeat(NodeId(i), used_bytes=i)
                await asyncio.sleep(0.05)
            assert node.status()["commit_index"] == log0
            assert {s.node_id: s.state for s in node.state().nodes.values()} == {1: "up", 2: "up", 3: "up"}
            # node 3 goes silent: exactly two entries, up -> suspect -> down
            await _until(lambda: _heartbeat_until_down(node), 5)
            assert node.status()["commit_index"] == log0 + 2
        finally:
            await node.close()

    asyncio.run(scenario())


def test_close_ends_even_when_a_cancellation_is_swallowed(tmp_path: Path) -> None:
    """On Python 3.11 asyncio.wait_for (inside propose) swallows a cancellation that lands in the same loop
    turn as its result (CPython gh-86296): the leader-duties loop then went on and `close()` waited for it
    forever (a test hung for 300 s once). Here propose swallows every cancellation on purpose."""
    health = HealthConfig(heartbeat_interval_ms=100, down_grace_ms=800, proposal_interval_ms_min=0)

    async def scenario() -> None:
        port = free_port()
        node = MetaNode(MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.1:{port}"}, tmp_path, SECRET, cluster_id="c",
                                   timings=FAST), health)
        await node.start()
        entered = asyncio.Event()

        async def swallowing_propose(cmd: object, timeout_s: float = 10.0) -> Result:
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # what 3.11's wait_for does when the result arrives in the same turn
            return Result(True)

        assert (await node.propose(RegisterNode(7, "r7", "h:7", 1 << 40, 0))).ok
        node.propose = swallowing_propose  # type: ignore[method-assign]
        await asyncio.wait_for(entered.wait(), 10)  # node 7 never heartbeats: the detector proposes
        closing = asyncio.ensure_future(node.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        if not done:  # the bug: end the loop another way so the test reports instead of hanging
            g, node.group = node.group, None
            if node._task is not None:
                node._task.cancel()  # swallowed again, but the loop now finds no group and returns
            await closing
            if g is not None:
                await asyncio.to_thread(g.destroy_synchronous)
            raise AssertionError("close() did not end: the leader-duties loop outlived its cancellation")

    asyncio.run(scenario())


def test_chain_leases_only_for_up_members_at_the_current_epoch_and_a_silent_member_is_removed(tmp_path: Path) -> None:
    """docs/chain.md, leases: a heartbeat gets a lease and the epochs of the chains the node is in; a node
    that is not `up` in the committed map gets no lease; the leader removes a silent member from its chain
    once the others report the epoch adopted and caught up, and the node, back, gets a lease without
    that chain (it must not serve it in the old epoch). Margins for a loaded machine: a loop turn of this
    test may take hundreds of ms, so nodes 1 and 2 are suspected only after 900 ms of silence; a removal of
    one of them anyway is a legal outcome the asserts accept."""
    health = HealthConfig(heartbeat_interval_ms=300, down_grace_ms=3000, proposal_interval_ms_min=0)

    async def scenario() -> None:
        port = free_port()
        node = MetaNode(MetaConfig(NodeId(1), {NodeId(1): f"127.0.0.1:{port}"}, tmp_path, SECRET, cluster_id="c",
                                   timings=FAST), health)
        await node.start()
        try:
            for i in (1, 2, 3):
                assert (await node.propose(RegisterNode(i, f"r{i}", f"h:{i}", 1 << 40, 0))).ok
            await _until(lambda: node.detector is not None and bool(node.state().cluster_id), 10)
            res = await node.propose(CreateVolume("c", 64 << 20, 0, "chain"))
            (gid,) = res.value["groups"]

            def all_up() -> bool:  # on a slow machine the detector may have suspected them already
                for i in (1, 2, 3):
                    node.heartbeat(NodeId(i))
                return all(n.state == "up" for n in node.state().nodes.values())

            await _until(all_up, 10)
            lease, epochs = node.heartbeat(NodeId(1), chains={gid: [1, 1, 1]})
            g = node.state().groups[gid]
            assert lease == health.suspect_after_ms * 2 // 3 and epochs == {gid: g.epoch}

            def beat_two() -> bool:  # nodes 1 and 2 report epoch adopted and caught up; node 3 is silent
                g = node.state().groups[gid]
                for i in (1, 2):
                    node.heartbeat(NodeId(i), chains={gid: [g.epoch, 1, 1]})
                return NodeId(3) not in g.members

            await _until(beat_two, 10)
            assert node.state().groups[gid].epoch >= 2
            assert node.state().nodes[NodeId(3)].state != "up"
            assert node.heartbeat(NodeId(3), chains={gid: [1, 1, 1]}) == (0, {})  # not up: no lease

            def back() -> bool:
                node.heartbeat(NodeId(1))
                node.heartbeat(NodeId(2))
                return node.heartbeat(NodeId(3))[0] > 0

            await _until(back, 10)
            # up again: the lease names the chain only at an epoch that has node 3 (re-added at the tail
            # meanwhile, maybe), never the old one it was removed from
            lease, epochs = node.heartbeat(NodeId(3))
            g = node.state().groups[gid]
            assert lease > 0 and epochs.get(gid, 0) != 1
            assert gid not in epochs or (epochs[gid] == g.epoch >= 3 and NodeId(3) in g.members)
        finally:
            await node.close()

    asyncio.run(scenario())


def _heartbeat_until_down(node: MetaNode) -> bool:
    node.heartbeat(NodeId(1))
    node.heartbeat(NodeId(2))
    return node.state().nodes[NodeId(3)].state == "down"


async def _until(cond: Callable[[], bool], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met in {timeout_s}s")
        await asyncio.sleep(0.02)
