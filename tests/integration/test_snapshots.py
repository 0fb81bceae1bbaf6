# Snapshots on a running cluster (issue 17; docs/snapshots.md sections 1-3), with real processes and a real host.
#
# Enforces: `snapshot create` taken in a loop while the tagged writer writes at QD16 through a node's gateway
# over a 2-group span: every snapshot is a crash-consistent cut (every block holds a write issued before the
# command returned and none older than the newest acknowledged before it started: judge_cut), and the
# attached volume's writes were held, not paused (barrier_ms reported). `snapshot list` shows them ready
# with the bytes only each keeps; `snapshot delete` drops one and the others still read back. A cut left
# `creating` by a killed CLI keeps a newly attaching host out until the gateway fails it (gateway rule 6), and
# `snapshot delete` finishes it. Bad input: unknown volume or snapshot, duplicate names: one line, exit 1.
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftblock.testing.journal import judge_cut

from .helpers import BLOCK, CLIENTS, _skip_or_fail, kill_group, nbd_sha256, require_libnbd, require_tools
from .test_cluster import RAFTBLOCK, Cluster, _cleanup
from .test_ext4_nbdfuse import _make_tree, _phase, _read_sums

pytestmark = pytest.mark.timeout(420)

EXTENT_BLOCKS = (64 << 20) // BLOCK
NBLOCKS = 2 * EXTENT_BLOCKS  # the first two extents: two extent groups (extent i -> group i mod G)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


def read_snapshot(c: Cluster, volume: str, name: str, length: int) -> bytes:
    """The snapshot's first `length` bytes, read from the cluster's groups at the pin."""
    from raftblock.control.snapshots import ClusterIO
    from raftblock.meta.rpc import MetaClient
    from raftblock.node.clustermap import ClusterMap
    from raftblock.replication.raft.types import NodeId

    cmap = ClusterMap.load(c.root / "cluster.json")
    secret = (c.root / "meta" / "cluster.secret").read_bytes().strip()

    async def go() -> bytes:
        meta = MetaClient({NodeId(int(k)): v for k, v in cmap.meta_admin.items()}, secret)
        st = await meta.state(barrier=True)
        rec = st.snapshot_of(volume, name)
        assert rec is not None and rec.state == "ready", rec
        io = ClusterIO(st, cmap.peers(), secret=secret)
        try:
            vol = io.volume(volume)
            out = bytearray()
            step = 4 << 20
            for off in range(0, length, step):
                out += await vol.read_snapshot(rec.snap_id, off, min(step, length - off))
            return bytes(out)
        finally:
            await io.close()

    return asyncio.run(go())


def _snaps(c: Cluster, volume: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in json.loads(c.cli("snapshot", "list", volume, "--json").stdout)}


# chain: `make test-slow` (the suite's 30-minute limit; the chain's SNAP op and barrier run in the other tests here)
@pytest.mark.parametrize("mode", ["raft", pytest.param("chain", marks=pytest.mark.slow)])
def test_snapshots_under_load_are_crash_consistent_cuts(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    py = require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "1G", "--replication", mode)
    uri = {g["node"]: g["uri"] for g in cluster.status()["gateways"]}[2]  # a node's gateway: not the CLI's
    journal = tmp_path / "journal.txt"
    writer = subprocess.Popen([py, str(CLIENTS / "nbd_tagged_writer.py"), f"{uri}/vol", str(journal), str(NBLOCKS),
                               "17", "1", "16", "1000000", "/dev/null", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    cuts: list[tuple[str, int, int, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 30
        while journal.stat().st_size < 20000 if journal.exists() else True:
            assert time.monotonic() < deadline and writer.poll() is None, writer.stderr and writer.stderr.read()
            time.sleep(0.05)
        for i in range(5):
            before = journal.stat().st_size
            r = cluster.cli("snapshot", "create", "vol", f"s{i}", "--json")
            after = journal.stat().st_size
            cuts.append((f"s{i}", before, after, json.loads(r.stdout)))
            assert writer.poll() is None, "the writer stopped while snapshots were taken"
    finally:
        kill_group(writer)
    text = journal.read_text()
    acked_during = [text[b:a].count("\nA ") for _, b, a, _ in cuts]
    assert sum(acked_during) > 0, f"no write completed while a snapshot was being taken: {acked_during}"
    images = {}
    for name, before, after, made in cuts:
        assert made["barrier_ms"] > 0, f"{name}: the attached volume's gateway did not hold its writes: {made}"
        assert len(made["groups"]) == 2, made
        data = read_snapshot(cluster, "vol", name, NBLOCKS * BLOCK)
        problems = judge_cut(data, text, before, after, NBLOCKS)
        assert not problems, f"{mode} snapshot {name}: {len(problems)} bad blocks: {problems[:5]}"
        assert any(data[k:k + 8] == b"PWRCUT01" for k in range(0, len(data), BLOCK)), f"{name} holds no write"
        images[name] = data
    # the judge has teeth: the first snapshot is not a cut of the last snapshot's window
    assert judge_cut(images["s0"], text, cuts[-1][1], cuts[-1][2], NBLOCKS)
    # a snapshot cloned reads back over NBD what the judge accepted
    cluster.cli("volume", "clone", "vol@s4", "c4")
    assert nbd_sha256(f"{uri}/c4", 0, NBLOCKS * BLOCK) == hashlib.sha256(images["s4"]).hexdigest()
    cluster.cli("volume", "delete", "c4")

    snaps = _snaps(cluster, "vol")
    assert sorted(snaps) == [f"s{i}" for i in range(5)] and {s["state"] for s in snaps.values()} == {"ready"}
    assert all(s["unique_bytes"] is not None for s in snaps.values()), snaps
    # blocks overwritten between two snapshots are kept by the older one alone
    assert sum(s["unique_bytes"] for s in snaps.values()) > 0, snaps
    s3_before = images["s3"]
    r = cluster.cli("snapshot", "delete", "vol", "s2", "--json")
    assert json.loads(r.stdout)["name"] == "s2"
    assert sorted(_snaps(cluster, "vol")) == ["s0", "s1", "s3", "s4"]
    assert read_snapshot(cluster, "vol", "s3", NBLOCKS * BLOCK) == s3_before


def test_group_snapshot_and_bad_input(cluster: Cluster) -> None:
    cluster.up()
    cluster.cli("volume", "create", "db", "--size", "64M")
    cluster.cli("volume", "create", "log", "--size", "64M")
    made = json.loads(cluster.cli("snapshot", "create", "--group", "db,log", "g1", "--json").stdout)
    assert [(m["volume"], m["name"]) for m in made] == [("db", "g1"), ("log", "g1")]
    assert made[0]["snap_id"] != made[1]["snap_id"]
    for args, says in [
        (("snapshot", "create", "nosuch", "x"), "no volume 'nosuch'"),
        (("snapshot", "create", "db", "g1"), "already has a snapshot 'g1'"),
        (("snapshot", "create", "--group", "db,nosuch", "g2"), "no volume 'nosuch'"),
        (("snapshot", "create", "db", "bad/name"), "snapshot name"),
        (("snapshot", "delete", "db", "nosuch"), "volume db has no snapshot nosuch"),
        (("snapshot", "list", "nosuch"), "no volume nosuch"),
    ]:
        r = cluster.cli(*args, check=False)
        assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, r.stderr)
    # a failed group create left nothing behind on the volume that existed
    assert sorted(_snaps(cluster, "db")) == ["g1"]
    assert sorted(_snaps(cluster, "log")) == ["g1"]


def test_cut_left_creating_is_failed_by_an_attaching_gateway(cluster: Cluster, tmp_path: Path) -> None:
    """A CLI killed between the record and the cut: the next host to attach waits, then the gateway fails the
    cut (`deleting`), the host gets its I/O, and `snapshot delete` removes what is left."""
    py = require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M")
    from raftblock.meta.rpc import MetaClient
    from raftblock.node.clustermap import ClusterMap
    from raftblock.replication.raft.types import NodeId

    cmap = ClusterMap.load(cluster.root / "cluster.json")
    secret = (cluster.root / "meta" / "cluster.secret").read_bytes().strip()
    meta = MetaClient({NodeId(int(k)): v for k, v in cmap.meta_admin.items()}, secret)
    res = asyncio.run(meta.create_snapshot("vol", "orphan"))
    assert res.ok, res
    assert _snaps(cluster, "vol")["orphan"]["state"] == "creating"
    t0 = time.monotonic()
    r = subprocess.run([py, "-c", "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
                        "h.pwrite(b'x'*4096, 0); print(h.pread(4096, 0)[:1].decode())", f"{cluster.uri}/vol"],
                       capture_output=True, text=True, timeout=60)
    waited = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout.strip() == "x", r.stderr
    assert waited >= 9, f"the host got I/O after {waited:.1f} s while a cut was still `creating`"
    assert _snaps(cluster, "vol")["orphan"]["state"] == "deleting"
    cluster.cli("snapshot", "delete", "vol", "orphan")
    assert _snaps(cluster, "vol") == {}


def test_ext4_snapshot_clone_flatten(cluster: Cluster, tmp_path: Path, s3_endpoint: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written, snapshot, files changed; the snapshot's clone mounts with the old files (fsck clean),
    the volume with the new ones; writing the clone leaves the snapshot alone; a snapshot with clones cannot
    be deleted, nor its volume; flatten cuts the link and the clone keeps its files. The same snapshot
    exported to S3 (moto's server) and restored into a new volume mounts with the old files too."""
    require_tools("nbdfuse", "fusermount3", "mkfs.ext4", "fsck.ext4", "unshare", "mount", "umount", "mountpoint")
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        _skip_or_fail("mount -o loop needs root and /dev/fuse")
    old_tree, new_tree = _make_tree(tmp_path / "old", seed=1), _make_tree(tmp_path / "new", seed=2)
    cluster.up()
    cluster.cli("volume", "create", "fs", "--size", "256M")
    work = tmp_path / "work"
    work.mkdir()
    _phase("write", f"{cluster.uri}/fs", work, tmp_path / "old")
    assert _read_sums(work / "sums.write") == old_tree
    cluster.cli("snapshot", "create", "fs", "before")
    _phase("change", f"{cluster.uri}/fs", work, tmp_path / "new")
    assert _read_sums(work / "sums.change") == new_tree

    cluster.cli("volume", "clone", "fs@before", "old")
    cluster.cli("volume", "clone", "fs@before", "scratch")
    _phase("verify", f"{cluster.uri}/old", work)
    assert _read_sums(work / "sums.verify") == old_tree, "the clone does not hold the snapshot's files"
    _phase("verify", f"{cluster.uri}/fs", work)
    assert _read_sums(work / "sums.verify") == new_tree
    _phase("change", f"{cluster.uri}/scratch", work, tmp_path / "new")  # writing a clone
    assert _read_sums(work / "sums.change") == new_tree
    _phase("verify", f"{cluster.uri}/old", work)
    assert _read_sums(work / "sums.verify") == old_tree, "writing one clone changed its sibling"

    for args, says in [(("snapshot", "delete", "fs", "before"), "has clones reading through to it: old, scratch"),
                       (("volume", "delete", "fs"), "has clones"),
                       (("volume", "clone", "fs@nosuch", "x"), "volume fs has no snapshot nosuch"),
                       (("volume", "clone", "fs@before", "old"), "exists")]:
        r = cluster.cli(*args, check=False)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    cluster.cli("volume", "delete", "scratch")
    r = cluster.cli("volume", "flatten", "old")
    assert "flattened" in r.stdout and "copied from fs@before" in r.stdout, r.stdout
    assert "flatten old" in r.stderr and "100.0%" in r.stderr and "ETA" in r.stderr, r.stderr  # the progress bar
    res = json.loads(cluster.cli("volume", "flatten", "old", "--json").stdout)
    assert res == {"name": "old", "copied_bytes": 0, "parent": None}, res  # nothing left to do
    vols = {v["name"]: v for v in json.loads(cluster.cli("volume", "list", "--json").stdout)}
    assert vols["old"]["parent"] is None
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="fsbk")
    cluster.cli("snapshot", "export", "fs@before", "s3://fsbk/c", "--endpoint-url", s3_endpoint)
    cluster.cli("snapshot", "delete", "fs", "before")
    _phase("verify", f"{cluster.uri}/old", work)
    assert _read_sums(work / "sums.verify") == old_tree, "the flattened clone lost files"
    cluster.cli("snapshot", "restore", "s3://fsbk/c", "back", "--endpoint-url", s3_endpoint)
    _phase("verify", f"{cluster.uri}/back", work)
    assert _read_sums(work / "sums.verify") == old_tree, "the restored volume does not hold the snapshot's files"


def _qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, (cmds, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.parametrize("mode", ["raft", pytest.param("chain", marks=pytest.mark.slow)])
def test_rollback_and_resize(cluster: Cluster, mode: str) -> None:
    """rollback: refused while attached; copies back only what changed (a trim included), trims what was
    written past the snapshot's size; resize: grows online (a connected host keeps its size, the next
    connection sees the new one), shrinking refused without --allow-shrink and with snapshots, and a volume
    grown again reads zeros past the old end."""
    require_tools("qemu-io", "nbdinfo")
    py = require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "128M", "--replication", mode)
    uri = f"{cluster.uri}/vol"
    _qemu_io(uri, "write -P 0x11 0 8M", "write -P 0x22 100M 1M")
    cluster.cli("snapshot", "create", "vol", "s1")
    _qemu_io(uri, "write -P 0x33 4M 4M", "write -z 100M 1M", "write -P 0x44 120M 1M")

    # grow online: a host connected across the resize keeps working; the next connection sees 1 GiB
    host = subprocess.Popen([py, "-c", "import nbd,sys\nh=nbd.NBD(); h.connect_uri(sys.argv[1]); print(h.get_size(), "
                             "flush=True); sys.stdin.readline(); h.pwrite(b'z'*4096, 0); print(h.pread(4096, 0)[:1]"
                             ".decode(), h.get_size(), flush=True)", uri],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert host.stdout is not None and host.stdin is not None
    assert host.stdout.readline().strip() == str(128 << 20)
    r = json.loads(cluster.cli("volume", "resize", "vol", "1G", "--json").stdout)
    assert r["size_bytes"] == 1 << 30 and r["new_groups"], r
    host.stdin.write("go\n")
    host.stdin.flush()
    out, err = host.communicate(timeout=60)
    assert host.returncode == 0 and out.split() == ["z", str(128 << 20)], (out, err)
    assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True).stdout.strip() == str(1 << 30)
    _qemu_io(uri, "write -P 0x55 900M 1M", "read -P 0x55 900M 1M")

    st = cluster.cli("volume", "attach", "vol", "--gateway", "n1", check=False)
    assert st.returncode == 0, st.stderr
    err = _one_line_error(cluster, "volume", "rollback", "vol", "s1")
    assert "attached by gateway n1" in err, err
    cluster.cli("volume", "detach", "vol")
    r = json.loads(cluster.cli("volume", "rollback", "vol", "s1", "--json").stdout)
    assert r["copied_bytes"] == (5 << 20) + 4096, r  # 4 MiB overwritten, 1 MiB zeroed, the host's block 0: no more
    _qemu_io(uri, "read -P 0x11 0 8M", "read -P 0x22 100M 1M", "read -P 0 120M 1M", "read -P 0 900M 1M")
    assert json.loads(cluster.cli("volume", "info", "vol", "--json").stdout)["state"] == "ready"

    assert "--allow-shrink" in _one_line_error(cluster, "volume", "resize", "vol", "64M")
    assert "has snapshots" in _one_line_error(cluster, "volume", "resize", "vol", "64M", "--allow-shrink")
    cluster.cli("snapshot", "delete", "vol", "s1")
    cluster.cli("volume", "resize", "vol", "100M", "--allow-shrink")
    assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True).stdout.strip() == str(100 << 20)
    cluster.cli("volume", "resize", "vol", "256M")
    _qemu_io(uri, "read -P 0x11 0 8M", "read -P 0 100M 156M")


def _one_line_error(c: Cluster, *args: str) -> str:
    r = c.cli(*args, check=False)
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("raftblock ")]
    assert r.returncode == 1 and len(errors) == 1 and all("ETA" in ln for ln in lines if ln not in errors), \
        (args, r.stderr)
    return errors[0]


# The chain variant is behind `slow` for the default suite's time (`pytest -m slow` runs it): the kill path is
# the same control-plane code for both kinds, and the chain's cut is covered by the load test above.
@pytest.mark.parametrize("mode", ["raft", pytest.param("chain", marks=pytest.mark.slow)])
def test_node_killed_during_snapshot_create(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    """kill -9 of a storage node while `snapshot create` runs under a QD16 writer: the command completes (the
    groups keep a majority / the chain drops the member) or fails with one line and leaves nothing half
    made; every ready snapshot is a cut; with the node still down and after it is back, snapshots work."""
    py = require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "1G", "--replication", mode)
    uri = {g["node"]: g["uri"] for g in cluster.status()["gateways"]}[1]
    journal = tmp_path / "journal.txt"
    writer = subprocess.Popen([py, str(CLIENTS / "nbd_tagged_writer.py"), f"{uri}/vol", str(journal), str(NBLOCKS),
                               "23", "1", "16", "1000000", "/dev/null", "90"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    cuts: list[tuple[str, int, int]] = []
    try:
        deadline = time.monotonic() + 30
        while not journal.exists() or journal.stat().st_size < 20000:
            assert time.monotonic() < deadline and writer.poll() is None, writer.stderr and writer.stderr.read()
            time.sleep(0.05)

        def snap(name: str, kill: str | None = None) -> bool:
            before = journal.stat().st_size
            p = subprocess.Popen([*RAFTBLOCK, "snapshot", "create", "vol", name, "--dir", str(cluster.root)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if kill:
                cluster.kill(kill)
            out, err = p.communicate(timeout=120)
            after = journal.stat().st_size
            if p.returncode == 0:
                cuts.append((name, before, after))
                return True
            assert p.returncode == 1 and len(err.strip().splitlines()) == 1, err
            return False

        assert snap("s0")
        made = snap("s1", kill="n3")
        states = {s["name"]: s["state"] for s in json.loads(cluster.cli("snapshot", "list", "vol", "--json").stdout)}
        assert states.get("s1") == ("ready" if made else None) or (not made and states.get("s1") == "deleting"), states
        assert snap("s2")  # with the node still down
        cluster.cli("cluster", "up")  # the node comes back and catches up
        assert snap("s3")
        assert writer.poll() is None, "the writer stopped"
    finally:
        kill_group(writer)
    text = journal.read_text()
    for name, before, after in cuts:
        data = read_snapshot(cluster, "vol", name, NBLOCKS * BLOCK)
        problems = judge_cut(data, text, before, after, NBLOCKS)
        assert not problems, f"{mode} snapshot {name}: {problems[:5]}"


def test_a_deleted_snapshots_space_is_released(cluster: Cluster) -> None:
    """Redirect-on-write: overwriting a snapshot's blocks keeps their old versions (pinned bytes, counted as
    occupied; `snapshot list` says how much only it keeps); deleting it makes them garbage at once, for the
    cleaner at its pace, with no I/O in the foreground."""
    require_tools("qemu-io")
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M")
    uri = f"{cluster.uri}/vol"

    def engine(key: str) -> int:
        return max(int(n.get("counters", {}).get(key, 0)) for n in cluster.status()["nodes"])

    _qemu_io(uri, "write -P 0x11 0 32M")
    cluster.cli("snapshot", "create", "vol", "s1")
    _qemu_io(uri, "write -P 0x22 0 32M", "write -P 0x33 0 32M")
    (s1,) = json.loads(cluster.cli("snapshot", "list", "vol", "--json").stdout)
    assert s1["unique_bytes"] == 32 << 20, s1
    assert engine("engine_pinned_bytes") == 32 << 20
    live_pinned = engine("engine_live_bytes")
    assert live_pinned >= 64 << 20, live_pinned  # the current 32 MiB and the snapshot's 32 MiB
    cluster.cli("snapshot", "delete", "vol", "s1")
    deadline = time.monotonic() + 30
    while engine("engine_pinned_bytes") or engine("engine_live_bytes") > live_pinned - (32 << 20):
        assert time.monotonic() < deadline, f"live bytes still {engine('engine_live_bytes')} (pinned: {live_pinned})"
        time.sleep(0.2)
    _qemu_io(uri, "read -P 0x33 0 32M")
