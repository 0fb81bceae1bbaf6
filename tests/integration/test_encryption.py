"""Encryption at rest (issue 20, docs/encryption.md) on a real cluster, with real clients: an encrypted volume's
data reaches no disk in plaintext (segments, WAL, the image a rebuilt node receives), its snapshots read back
through a clone with the same key, a block moved to another address reads as an I/O error (never as data), and a
master-key rotation rewraps the keys without rewriting data: new processes read everything back; backups to S3
(moto's server) hold ciphertext only and restore under the volume's key."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import metric, require_tools
from .test_cluster import Cluster, _cleanup, _counter, _group, _wait

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


def _marked(tag: bytes, size: int) -> bytes:
    """`size` bytes of numbered lines `tag-NNNNNNNN|`: plaintext a grep of the disks finds if it is there."""
    line = len(tag) + 10
    return b"".join(b"%s-%08d|" % (tag, i) for i in range(size // line)).ljust(size, b".")


def _qemu(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, (argv, r.stdout, r.stderr)
    return r


def _image(uri: str, out: Path) -> bytes:
    _qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    return out.read_bytes()


def _files_holding(root: Path, needle: bytes) -> list[str]:
    """The files under the storage nodes' data directories (engine segments, WAL, images) holding `needle`."""
    hits = []
    for n in sorted(root.glob("n[0-9]*")):
        for f in n.rglob("*"):
            if f.is_file() and needle in f.read_bytes():
                hits.append(str(f.relative_to(root)))
    return hits


def test_an_encrypted_volume_reaches_no_disk_in_plaintext(cluster: Cluster, tmp_path: Path, s3_endpoint: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools("qemu-img", "qemu-io")
    base = cluster.up()
    cluster.cli("volume", "create", "sec", "--size", "64M", "--encrypt", "--replication", "chain")
    cluster.cli("volume", "create", "plain", "--size", "64M", "--replication", "chain")
    info = json.loads(cluster.cli("volume", "info", "sec", "--json").stdout)
    assert info["encryption"]["cipher"] == "AES-256-GCM" and info["encryption"]["master_key"] == 1, info
    assert json.loads(cluster.cli("volume", "info", "plain", "--json").stdout)["encryption"] is None
    sec, plain = _marked(b"SEALED-MARKER", 8 * MiB), _marked(b"PLAIN-MARKER", 8 * MiB)
    (tmp_path / "sec.raw").write_bytes(sec)
    (tmp_path / "plain.raw").write_bytes(plain)
    for name, src in (("sec", "sec.raw"), ("plain", "plain.raw")):
        _qemu("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / src), f"{base}/{name}")
    _qemu("qemu-io", "-f", "raw", "-c", "write -P 0x5a 20M 1M", "-c", "write -P 0x6c 30M 64k",
          "-c", "discard 30M 64k", f"{base}/sec")
    img = _image(f"{base}/sec", tmp_path / "out.raw")
    assert img[: 8 * MiB] == sec and img[20 * MiB : 21 * MiB] == b"\x5a" * MiB
    assert img[30 * MiB : 31 * MiB] == bytes(MiB) and img[8 * MiB : 20 * MiB] == bytes(12 * MiB)

    n1 = next(n for n in cluster.status()["nodes"] if n["id"] == 1)  # its embedded gateway sealed them
    assert metric(n1["metrics_url"], "raftblock_gateway_blocks_sealed_total") >= (8 * MiB + MiB + 64 * 1024) // 4096
    assert metric(n1["metrics_url"], "raftblock_gateway_blocks_opened_total") >= 8 * MiB // 4096
    # a snapshot, then the volume changes; a clone of the snapshot (the same key) reads the old blocks
    cluster.cli("snapshot", "create", "sec", "s1")
    _qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", f"{base}/sec")
    cluster.cli("volume", "clone", "sec@s1", "old")
    assert json.loads(cluster.cli("volume", "info", "old", "--json").stdout)["encryption"]["key_id"] == \
        info["encryption"]["key_id"]
    old = _image(f"{base}/old", tmp_path / "old.raw")
    assert old[: 8 * MiB] == sec and old[20 * MiB : 21 * MiB] == b"\x5a" * MiB
    # flattened: the CLI seals the copied blocks itself (a nonce epoch of its own), the clone keeps reading them
    r = cluster.cli("volume", "flatten", "old", "--json")
    assert json.loads(r.stdout)["copied_bytes"] >= 9 * MiB, r.stdout
    assert _image(f"{base}/old", tmp_path / "old.raw") == old
    assert _image(f"{base}/sec", tmp_path / "out.raw")[:MiB] == b"\x11" * MiB

    # a node with a new disk: rebuilt from the others (the chain's image, then the records after it)
    st = cluster.status()
    groups = {v["name"]: v["extent_groups"][0] for v in st["volumes"]}
    victim = 3  # not node 1: its embedded gateway serves the host
    cluster.kill(f"n{victim}")
    shutil.rmtree(cluster.root / f"n{victim}")
    cluster.up()

    def whole() -> bool:
        gs = [_group(cluster, groups[v]) for v in ("sec", "plain")]
        return all(victim in g["members"] and len(g["applied"]) == 3 and len(set(g["applied"].values())) == 1
                   for g in gs)

    _wait(whole, 120, f"n{victim} to be rebuilt in both volumes' groups")
    assert _counter(cluster, victim, "chain_images_received") >= 2

    # the disks: the plain volume's lines are there (also on the rebuilt node: the grep would find them), the
    # encrypted volume's are nowhere, nor its pattern runs
    plain_hits = _files_holding(cluster.root, b"PLAIN-MARKER-00000007|")
    assert any(h.startswith(f"n{victim}/") for h in plain_hits) and len(plain_hits) >= 3, plain_hits
    for needle in (b"SEALED-MARKER", b"\x5a" * 4096, b"\x11" * 4096):
        assert _files_holding(cluster.root, needle) == [], needle

    # a block moved on disk: ciphertext and entry of block 0 written as block 5 by an insider holding the
    # cluster's keys; the host reads an I/O error there, never block 0's data, and block 0 still reads
    _move_block(cluster, "sec", 0, 5)
    r = _qemu("qemu-io", "-f", "raw", "-c", "read 20k 4k", f"{base}/sec", ok=False)
    assert "Input/output error" in r.stdout + r.stderr, (r.stdout, r.stderr)
    _qemu("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4k", "-c", "read -P 0x11 24k 1000k", f"{base}/sec")
    _qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 20k 4k", f"{base}/sec")  # the host rewrites it: it reads

    # a new master key: every encrypted volume's key rewrapped (sec and its clone), no data rewritten; the
    # processes started after it unwrap with it
    res = json.loads(cluster.cli("cluster", "rotate-master-key", "--json").stdout)
    assert res == {"master_key": 2, "volumes_rewrapped": 2}, res
    cluster.down()
    cluster.up()
    assert json.loads(cluster.cli("volume", "info", "old", "--json").stdout)["encryption"]["master_key"] == 2
    assert _image(f"{base}/old", tmp_path / "old.raw")[: 8 * MiB] == sec
    img = _image(f"{base}/sec", tmp_path / "out.raw")
    assert img[:MiB] == b"\x11" * MiB and img[20 * MiB : 21 * MiB] == b"\x5a" * MiB

    # a backup of the snapshot to S3 (moto's server): chunks leave as stored (ciphertext and entries), the key
    # wrapped in the manifest; restored into a new volume under the same key, it reads back
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="enc")
    cluster.cli("snapshot", "export", "sec@s1", "s3://enc/b", "--endpoint-url", s3_endpoint)
    _qemu("qemu-io", "-f", "raw", "-c", "write -P 0x22 40M 1M", f"{base}/sec")
    cluster.cli("snapshot", "create", "sec", "s2")
    r = cluster.cli("snapshot", "export", "sec@s2", "s3://enc/b", "--since", "s1", "--endpoint-url", s3_endpoint,
                    "--json")
    assert json.loads(r.stdout)["changed_chunks"] == 2, r.stdout  # incremental: chunks 0 and 10 are read
    from raftblock.backup import chunk as bchunk
    from raftblock.backup.manifest import Manifest

    objects = [o["Key"] for o in s3.list_objects_v2(Bucket="enc", Prefix="b/")["Contents"]]
    man = Manifest.from_json(s3.get_object(Bucket="enc", Key="b/manifests/sec/s1.json")["Body"].read())
    assert man.sealed is not None and man.sealed["key_id"] == int(info["encryption"]["key_id"], 16)
    for key in objects:
        body = s3.get_object(Bucket="enc", Key=key)["Body"].read()
        if "/chunks/" in key or "/deltas/" in key:
            name = key.rsplit("/", 1)[1]
            body = bchunk.decode(name, body, bchunk.KIND_DELTA if "/deltas/" in key else bchunk.KIND_FULL)
        for needle in (b"SEALED-MARKER", b"\x5a" * 4096, b"\x22" * 4096):
            assert needle not in body, (key, needle)
    for snap, name in (("s1", "back1"), ("s2", "back2")):
        cluster.cli("snapshot", "restore", "s3://enc/b", name, "--from-volume", "sec", "--snapshot", snap,
                    "--endpoint-url", s3_endpoint)
    got = _image(f"{base}/back1", tmp_path / "b1.raw")
    assert got[: 8 * MiB] == sec and got[20 * MiB : 21 * MiB] == b"\x5a" * MiB and got[40 * MiB : 41 * MiB] == bytes(MiB)
    got = _image(f"{base}/back2", tmp_path / "b2.raw")
    assert got[:MiB] == b"\x11" * MiB and got[40 * MiB : 41 * MiB] == b"\x22" * MiB
    assert json.loads(cluster.cli("volume", "info", "back2", "--json").stdout)["encryption"]["key_id"] == \
        info["encryption"]["key_id"]
    assert _files_holding(cluster.root, b"SEALED-MARKER") == []
    r = cluster.cli("snapshot", "restore", "s3://enc/b", "lazy", "--from-volume", "sec", "--snapshot", "s1", "--lazy",
                    "--endpoint-url", s3_endpoint, check=False)
    assert r.returncode == 1 and "without --lazy" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _move_block(cluster: Cluster, volume: str, src: int, dst: int) -> None:
    from raftblock.control.snapshots import ClusterIO
    from raftblock.node.cluster import _load, _secret, meta_client, open_layout

    layout = open_layout(cluster.root)
    cmap = _load(layout)

    async def go() -> None:
        st = await meta_client(layout, cmap).state(barrier=True)
        io = ClusterIO(st, cmap.peers(), secret=_secret(layout))
        try:
            vol = io.volume(volume)
            ((eid, blk, _n, _vb),) = vol._pieces(src, src + 1)
            g = vol._sealed(vol._group_for(eid))
            data, crcs, entries = await g.read_sealed(eid, blk, 1, vol._seal_at)
            await g.write_sealed(eid, blk + dst - src, data, crcs, vol._seal_at, entries)
        finally:
            await io.close()

    asyncio.run(go())
