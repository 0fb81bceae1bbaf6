# Backups of a running cluster's snapshots to a real S3 HTTP endpoint (moto's server on loopback, started here;
# boto3 talks HTTP to it), through the CLI as an operator runs it (issue 17; docs/snapshots.md section 5).
#
# Enforces: export of a snapshot, restore into a new volume that reads back byte for byte through NBD;
# incremental export uploads less than twice the bytes changed, found from the groups' indexes; a clone's
# backup reuses its parent's chunks (dedup across volumes); backup list / verify / delete with collection of
# unnamed objects; an export killed (kill -9 of the CLI) and run again resumes; a storage node killed during an
# export and during a restore; bad input, each one line and exit 1 with nothing changed: a tampered chunk
# (verify names it, restore names it and leaves the volume `failed`, not served), an unknown volume or
# snapshot, a manifest of another format version, a bucket that does not exist, wrong credentials.
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import nbd_read, nbd_sha256, nbd_write, require_libnbd
from .test_cluster import RAFTBLOCK, Cluster, _cleanup

pytestmark = pytest.mark.timeout(420)
MiB = 1 << 20
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[str]:
    _client(s3_endpoint).create_bucket(Bucket="bkp")
    try:
        yield s3_endpoint
    finally:
        _moto_auth(s3_endpoint, "inf")  # the server runs in this process: its auth setting would outlive the test


def _moto_auth(endpoint: str, free_requests: str) -> None:
    """moto checks credentials (IAM) after `free_requests` more requests ("inf": never)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(),
                                                  method="POST", headers={"Content-Type": "text/plain"})).read()


def _client(endpoint: str, key: str = "testing", secret: str = "testing") -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


@pytest.fixture
def cluster(tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # boto3 reads it: the CLI is given no --endpoint-url
    c = Cluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


def _json(r: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(r.stdout)


def _backup(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`raftblock backup ...`: no cluster (no --dir)."""
    r = subprocess.run([*RAFTBLOCK, "backup", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 or not check, (args, r.stderr)
    return r


def _one_line_error(c: Cluster, *args: str) -> str:
    r = c.cli(*args, check=False)
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("raftblock ")]
    progress = [ln for ln in lines if "ETA" in ln]  # a progress bar may have been drawn before the error
    assert r.returncode == 1 and len(errors) == 1 and len(errors) + len(progress) == len(lines), (args, r.stderr)
    return errors[0]


def test_export_incremental_restore_dedup_verify_delete(cluster: Cluster, s3: str, tmp_path: Path) -> None:
    require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "256M")
    rng = random.Random(5)
    base = rng.randbytes(24 * MiB)
    tail = rng.randbytes(MiB)
    uri = f"{cluster.uri}/vol"
    nbd_write(uri, 0, base, tmp_path)
    nbd_write(uri, 200 * MiB, tail, tmp_path)
    cluster.cli("snapshot", "create", "vol", "s1")
    full = _json(cluster.cli("snapshot", "export", "vol@s1", "s3://bkp/c1", "--json"))
    assert full["chunks"] == 64 and full["uploaded_objects"] == 7, full  # 6 chunks of base + 1 of tail; zeros: none
    assert 25 * MiB < full["uploaded_bytes"] < 26 * MiB, full  # random data: zstd keeps it as is

    # 1 % of the data changed: three 64 KiB writes
    changes = [(1 * MiB, rng.randbytes(64 << 10)), (9 * MiB + 4096, rng.randbytes(64 << 10)),
               (200 * MiB, rng.randbytes(64 << 10))]
    for off, data in changes:
        nbd_write(uri, off, data, tmp_path)
    cluster.cli("snapshot", "create", "vol", "s2")
    r = cluster.cli("snapshot", "export", "vol@s2", "s3://bkp/c1", "--since", "s1")
    assert "incremental from s1 (3 chunks changed)" in r.stdout, r.stdout
    assert "export vol@s2" in r.stderr and "ETA" in r.stderr, r.stderr  # the progress bar
    inc = next(b for b in _json(_backup("list", "s3://bkp/c1", "--json")) if b["snapshot"] == "s2")
    assert inc["parent"] == "s1"
    objs = {o["Key"]: o["Size"] for o in _client(s3).list_objects_v2(Bucket="bkp", Prefix="c1/")["Contents"]}
    delta_bytes = sum(size for key, size in objs.items() if key.startswith("c1/deltas/"))
    changed = sum(len(d) for _, d in changes)
    assert 0 < delta_bytes < 2 * changed, (delta_bytes, changed)

    # restore the newest (s2) and s1: byte for byte
    r = _json(cluster.cli("snapshot", "restore", "s3://bkp/c1", "new2", "--json"))
    assert r["source"] == "vol@s2" and r["size_bytes"] == 256 * MiB, r
    assert nbd_sha256(f"{cluster.uri}/new2") == nbd_sha256(uri)
    cluster.cli("snapshot", "restore", "s3://bkp/c1", "new1", "--snapshot", "s1")
    want = bytearray(256 * MiB)
    want[0:len(base)] = base
    want[200 * MiB:200 * MiB + len(tail)] = tail
    assert nbd_sha256(f"{cluster.uri}/new1") == hashlib.sha256(want).hexdigest()
    vols = {v["name"]: v for v in _json(cluster.cli("volume", "list", "--json"))}
    assert vols["new1"]["state"] == "ready"

    # a clone of s1 backed up to the same place reuses every chunk of its parent's backup
    cluster.cli("volume", "clone", "vol@s1", "twin")
    cluster.cli("snapshot", "create", "twin", "t1")
    dup = _json(cluster.cli("snapshot", "export", "twin@t1", "s3://bkp/c1", "--json"))
    assert dup["uploaded_objects"] == 0 and dup["reused_objects"] == 7, dup  # its 7 distinct chunk objects

    assert "ok, every chunk read and checked" in _backup("verify", "s3://bkp/c1").stdout

    # a tampered chunk: verify names it; a restore names it, leaves the volume failed and unserved
    victim = sorted(k for k in objs if k.startswith("c1/chunks/"))[0]
    body = bytearray(_client(s3).get_object(Bucket="bkp", Key=victim)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    _client(s3).put_object(Bucket="bkp", Key=victim, Body=bytes(body))
    name = victim.rsplit("/", 1)[1]
    r = _backup("verify", "s3://bkp/c1", "vol@s1", check=False)
    assert r.returncode == 1 and name in r.stdout, r.stdout
    err = _one_line_error(cluster, "snapshot", "restore", "s3://bkp/c1", "bad", "--snapshot", "s1", "--from-volume",
                          "vol")
    assert name in err and "left `failed`" in err, err
    vols = {v["name"]: v for v in _json(cluster.cli("volume", "list", "--json"))}
    assert vols["bad"]["state"] == "failed"
    assert not nbd_read(f"{cluster.uri}/bad", 0, 4096, tmp_path)["ok"], "a failed restore is served"
    _client(s3).put_object(Bucket="bkp", Key=victim, Body=bytes(body[: len(body) // 2]))  # truncated now
    err = _one_line_error(cluster, "snapshot", "restore", "s3://bkp/c1", "bad", "--snapshot", "s1", "--from-volume",
                          "vol")  # the same restore again: it may, and fails the same way
    assert name in err, err
    cluster.cli("volume", "delete", "bad")

    # delete s1's backup: the objects only it named go, s2's (deltas against s1's chunks) stay sound
    before = len(_client(s3).list_objects_v2(Bucket="bkp", Prefix="c1/")["Contents"])
    gone = _json(_backup("delete", "s3://bkp/c1", "twin@t1", "--min-age", "0", "--json"))
    assert gone["objects_removed"] == 0, gone  # every object of twin@t1 is named by vol's backups too
    _backup("delete", "s3://bkp/c1", "vol@s1", "--min-age", "0")
    after = len(_client(s3).list_objects_v2(Bucket="bkp", Prefix="c1/")["Contents"])
    assert after < before
    listed = {(b["volume"], b["snapshot"]) for b in _json(_backup("list", "s3://bkp/c1", "--json"))}
    assert listed == {("vol", "s2")}


def test_bad_input_is_one_line_and_changes_nothing(cluster: Cluster, s3: str) -> None:
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "64M")
    cluster.cli("snapshot", "create", "vol", "s1")
    cluster.cli("snapshot", "export", "vol@s1", "s3://bkp/x")
    assert "no volume nosuch" in _one_line_error(cluster, "snapshot", "export", "nosuch@s1", "s3://bkp/x")
    assert "has no snapshot s9" in _one_line_error(cluster, "snapshot", "export", "vol@s9", "s3://bkp/x")
    assert "no backup of vol@s0" in _one_line_error(cluster, "snapshot", "export", "vol@s1", "s3://bkp/x",
                                                    "--since", "s0")
    assert "bucket 'nope' does not exist" in _one_line_error(cluster, "snapshot", "export", "vol@s1", "s3://nope/x")
    assert "no backup" in _one_line_error(cluster, "snapshot", "restore", "s3://bkp/empty", "r")
    assert "exists" in _one_line_error(cluster, "snapshot", "restore", "s3://bkp/x", "vol")
    # a manifest of another format version
    man = json.loads(_client(s3).get_object(Bucket="bkp", Key="x/manifests/vol/s1.json")["Body"].read())
    man["version"] = 2
    _client(s3).put_object(Bucket="bkp", Key="x/manifests/vol/s2.json", Body=json.dumps(man).encode())
    assert "version" in _one_line_error(cluster, "snapshot", "restore", "s3://bkp/x", "r", "--snapshot", "s2")
    # wrong credentials (moto checks them once IAM auth is on)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "nope"}
    _moto_auth(s3, "0")
    r = subprocess.run([*RAFTBLOCK, "backup", "list", "s3://bkp/x"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "access denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    vols = [v["name"] for v in _json(cluster.cli("volume", "list", "--json"))]
    assert vols == ["vol"], vols  # no restore left a volume behind


def test_export_resumes_after_kill_and_survives_a_node_kill(cluster: Cluster, s3: str, tmp_path: Path) -> None:
    """kill -9 of the exporting CLI halfway: the same command again uploads only what is missing. A storage node
    killed during an export and during a restore: both complete (the groups keep a majority)."""
    require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "128M")
    data = random.Random(9).randbytes(64 * MiB)
    nbd_write(f"{cluster.uri}/vol", 0, data, tmp_path)
    cluster.cli("snapshot", "create", "vol", "s1")
    argv = [*RAFTBLOCK, "snapshot", "export", "vol@s1", "s3://bkp/r", "--bandwidth", "8M", "--parallel", "2",
            "--dir", str(cluster.root), "--json"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def chunks() -> int:
        return len(_client(s3).list_objects_v2(Bucket="bkp", Prefix="r/chunks/").get("Contents", []))

    deadline = time.monotonic() + 60
    while chunks() < 3:
        assert time.monotonic() < deadline and p.poll() is None, p.stderr and p.stderr.read()
        time.sleep(0.05)
    os.killpg(p.pid, 9)
    p.wait()
    done_before = chunks()
    assert 3 <= done_before < 16, done_before
    assert "Contents" not in _client(s3).list_objects_v2(Bucket="bkp", Prefix="r/manifests/")  # not a backup yet
    # again, with node 2 killed while it runs
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    cluster.kill("n2")
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    res = json.loads(out)
    # only what was missing went up: 16 distinct data chunks in all (the other 16 of the 128 MiB are zeros)
    assert res["uploaded_objects"] == 16 - done_before and res["reused_objects"] == done_before, (res, done_before)
    cluster.cli("cluster", "up")  # n2 back
    r = subprocess.Popen([*RAFTBLOCK, "snapshot", "restore", "s3://bkp/r", "back", "--dir", str(cluster.root)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def restoring() -> bool:
        return any(v["name"] == "back" and v["state"] == "restoring"
                   for v in _json(cluster.cli("volume", "list", "--json")))

    deadline = time.monotonic() + 60
    while not restoring():
        assert time.monotonic() < deadline and r.poll() is None, r.stderr and r.stderr.read()
        time.sleep(0.05)
    cluster.kill("n3")
    out, err = r.communicate(timeout=180)
    assert r.returncode == 0, err
    assert nbd_sha256(f"{cluster.uri}/back", 0, 64 * MiB) == hashlib.sha256(data).hexdigest()


def test_lazy_restore_serves_at_once(cluster: Cluster, s3: str, tmp_path: Path) -> None:
    """`snapshot restore --lazy`: the volume is served while the restore streams in (paced here so the host
    gets ahead of it); a read of a chunk not restored yet returns the backup's data; a block the host writes
    there is not overwritten when the fill reaches it; no snapshot of it until the fill is done; afterwards
    the volume equals the backup except what the host wrote."""
    require_libnbd()
    cluster.up()
    cluster.cli("volume", "create", "vol", "--size", "128M")
    data = random.Random(3).randbytes(64 * MiB)
    nbd_write(f"{cluster.uri}/vol", 0, data, tmp_path)
    cluster.cli("snapshot", "create", "vol", "s1")
    cluster.cli("snapshot", "export", "vol@s1", "s3://bkp/lz")
    p = subprocess.Popen([*RAFTBLOCK, "snapshot", "restore", "s3://bkp/lz", "fast", "--lazy", "--parallel", "1",
                          "--bandwidth", "6M", "--dir", str(cluster.root)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert "is served now" in line, (line, p.stderr and p.stderr.read())
    uri = f"{cluster.uri}/fast"
    tail = nbd_read(uri, 60 * MiB, 4 * MiB, tmp_path)  # the last data chunk: far ahead of the fill
    assert tail["ok"] and tail["data"] == data[60 * MiB:], "a lazy read returned something else than the backup"
    mine = b"\xab" * 4096
    nbd_write(uri, 62 * MiB, mine, tmp_path)
    assert p.poll() is None, "the fill finished before the host's reads: nothing lazy was tested"
    err = _one_line_error(cluster, "snapshot", "create", "fast", "early")
    assert "still being restored lazily" in err, err
    out, errs = p.communicate(timeout=180)
    assert p.returncode == 0, errs
    want = bytearray(data)
    want[62 * MiB:62 * MiB + 4096] = mine
    assert nbd_sha256(uri, 0, 64 * MiB) == hashlib.sha256(want).hexdigest()
    assert nbd_sha256(uri, 64 * MiB, 64 * MiB) == hashlib.sha256(bytes(64 * MiB)).hexdigest()
    cluster.cli("snapshot", "create", "fast", "after")  # the fill is done: snapshots are allowed
