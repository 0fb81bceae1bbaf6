# One owner per data directory, and cluster commands that find a cluster whatever path names it.
#
# Enforces (issue 13, items 1 and 2): a second `raftblock serve` on a directory in use, a second
# `raftblock node --config` of a node that serves I/O, and a second metadata node each exit at once with
# "... is in use by pid N" and touch nothing (the running process keeps serving, its data intact: before
# the lock, the second serve lost acknowledged writes and the second node rolled the live node's WAL);
# `cluster status|down|up` addressed by relative, absolute and symlinked paths of one directory see the
# same processes, `up` starts nothing twice, `down` leaves no process behind; kill -9 releases the lock.
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raftblock.node.dirlock import lock_holder

from .helpers import MiB, ServeFactory, nbd_read, nbd_write

RAFTBLOCK = [sys.executable, "-m", "raftblock.cli"]
SECOND_EXIT_S = 15.0  # the second process must give up at once: no port binding, no recovery


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under d (but LOCK, whose open is all a loser may do): size and mtime (ns)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "LOCK":
            st = p.stat()
            out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns)
    return out


def _second(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the would-be second owner to its exit (killed, and the test failed, if it is still up after
    SECOND_EXIT_S: it must give up before binding a port or recovering anything)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=SECOND_EXIT_S, cwd=cwd)


def test_a_second_serve_on_a_directory_in_use_exits_at_once_and_touches_nothing(
        serve_factory: ServeFactory, tmp_path: Path) -> None:
    sp = serve_factory(["v:64M"])
    a = bytes([0xAA]) * (8 * MiB)
    nbd_write(sp.uri("v"), 0, a, tmp_path)
    assert lock_holder(sp.data_dir) == sp.pid
    before = _tree(sp.data_dir)
    r = _second([*sp.command, "serve", "--dir", str(sp.data_dir), "--port", "0", "--volume", "v:64M"])
    assert r.returncode == 1
    assert f"data directory {sp.data_dir} is in use by pid {sp.pid}" in r.stderr, r.stderr
    assert "READY" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback
    assert _tree(sp.data_dir) == before
    assert (sp.data_dir / "LOCK").read_text().strip() == str(sp.pid)
    # the first one still serves, and after its own restart every acknowledged byte is there
    b = bytes([0xBB]) * MiB
    nbd_write(sp.uri("v"), 16 * MiB, b, tmp_path)
    sp.stop()
    sp.restart()
    got = nbd_read(sp.uri("v"), 0, 8 * MiB, tmp_path)
    assert got["ok"] and got["data"] == a
    got = nbd_read(sp.uri("v"), 16 * MiB, MiB, tmp_path)
    assert got["ok"] and got["data"] == b


def test_a_killed_serve_releases_its_lock_at_once(serve_factory: ServeFactory, tmp_path: Path) -> None:
    sp = serve_factory(["v:64M"])
    nbd_write(sp.uri("v"), 0, b"\x5a" * MiB, tmp_path)
    sp.kill()
    assert lock_holder(sp.data_dir) is None
    sp.restart()  # the first attempt: no retry loop, no stale-lock cleanup needed
    assert lock_holder(sp.data_dir) == sp.pid
    got = nbd_read(sp.uri("v"), 0, MiB, tmp_path)
    assert got["ok"] and got["data"] == b"\x5a" * MiB


def _cli(*args: str, cwd: Path, check: bool = True, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*RAFTBLOCK, *args], capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    if check:
        assert r.returncode == 0, f"raftblock {' '.join(args)} failed ({r.returncode}): {r.stderr}"
    return r


def _pids(st: dict[str, Any]) -> dict[str, int | None]:
    out: dict[str, int | None] = {f"n{n['id']}": n["pid"] for n in st["nodes"]}
    out.update({f"m{m['id']}": m["pid"] for m in st["metadata"]})
    out["gateway"] = st["gateway"]["pid"]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_cluster_commands_find_one_cluster_by_any_path_and_no_process_runs_twice(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    root = work / "c"
    link = tmp_path / "link"
    link.symlink_to(root)
    started: list[int] = []
    try:
        # a separate gateway: its admin-socket lock is one of the owners checked here
        uri = _cli("cluster", "up", "--dir", "c", "--nbd-port", "0", "--gateway", "separate",
                   cwd=work).stdout.strip().splitlines()[-1]
        by = {}
        for name, d, cwd in (("relative", "c", work), ("absolute", str(root), tmp_path),
                             ("symlink", str(link), tmp_path), ("dotted", "../work/./c", work)):
            by[name] = _pids(json.loads(_cli("cluster", "status", "--json", "--dir", d, cwd=cwd).stdout))
        started = [p for p in by["relative"].values() if p is not None]
        assert len(started) == 7, by["relative"]  # m1..m3, n1..n3, gateway
        assert all(v == by["relative"] for v in by.values()), by

        # `up` by another spelling starts nothing: every process is found by the lock it holds
        _cli("cluster", "up", "--dir", str(link), "--nbd-port", "0", cwd=tmp_path)
        assert _pids(json.loads(_cli("cluster", "status", "--json", "--dir", str(root), cwd=tmp_path).stdout)) \
            == by["relative"]

        # a second node 1 while it serves I/O: exits at once, the node's WAL and engine untouched
        payload = os.urandom(4 * MiB)
        _cli("volume", "create", "v", "--size", "64M", "--dir", str(root), cwd=tmp_path)
        nbd_write(f"{uri}/v", 0, payload, tmp_path)
        n1 = root / "n1"
        pid_n1 = by["relative"]["n1"]
        wal_before = sorted(p.name for p in (n1 / "wal").iterdir())
        # ... while a host writes 16 MiB (1 MiB at a time) at 16 MiB
        writer = subprocess.Popen(["qemu-io", "-f", "raw", *[a for k in range(16) for a in
                                   ("-c", f"write -P 0x{0x30 + k:x} {(16 + k) * MiB} {MiB}")], f"{uri}/v"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            r = _second([*RAFTBLOCK, "node", "--config", str(root / "nodes" / "n1.toml"), "--log-format", "json"])
            out, err = writer.communicate(timeout=120)
        finally:
            if writer.poll() is None:
                writer.kill()
        assert writer.returncode == 0 and "error" not in (out + err).lower(), out + err
        assert r.returncode == 1
        assert r.stderr.strip() == f"raftblock node: data directory {n1.resolve()} is in use by pid {pid_n1}", r.stderr
        # one line and no log line: neither the engine nor the WAL was recovered (the WAL not rolled), which
        # is what the second process did before it failed on its busy port
        assert sorted(p.name for p in (n1 / "wal").iterdir()) == wal_before
        # a second metadata node 1, likewise
        r = _second([sys.executable, "-m", "raftblock.meta.node", "--config", "meta/meta-1.toml"], cwd=root)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == f"raftblock meta: metadata data directory {root / 'meta' / 'meta-1'} is in use " \
            f"by pid {by['relative']['m1']}", r.stderr
        # a second gateway on the same admin socket
        r = _second([*RAFTBLOCK, "gateway", "--config", str(root / "nodes" / "gateway.toml")])
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().endswith(f"gateway.sock is in use by pid {by['relative']['gateway']}"), r.stderr
        # ... and the cluster still serves what it acknowledged, and new writes
        more = os.urandom(MiB)
        nbd_write(f"{uri}/v", 8 * MiB, more, tmp_path)
        got = nbd_read(f"{uri}/v", 0, 4 * MiB, tmp_path)
        assert got["ok"] and hashlib.sha256(got["data"]).digest() == hashlib.sha256(payload).digest()
        got = nbd_read(f"{uri}/v", 16 * MiB, 16 * MiB, tmp_path)
        assert got["ok"] and got["data"] == b"".join(bytes([0x30 + k]) * MiB for k in range(16))

        # kill -9 releases the lock: `up` (yet another spelling) restarts node 1 at once on its data
        os.kill(pid_n1, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid_n1):
            assert time.monotonic() < deadline, "n1 did not die"
            time.sleep(0.05)
        assert lock_holder(n1) is None
        _cli("cluster", "up", "--dir", "../work/./c", "--nbd-port", "0", cwd=work)
        after = _pids(json.loads(_cli("cluster", "status", "--json", "--dir", "c", cwd=work).stdout))
        assert after["n1"] not in (None, pid_n1) and lock_holder(n1) == after["n1"]
        assert {k: v for k, v in after.items() if k != "n1"} == {k: v for k, v in by["relative"].items() if k != "n1"}
        started.append(after["n1"])
        got = nbd_read(f"{uri}/v", 8 * MiB, MiB, tmp_path)
        assert got["ok"] and got["data"] == more

        # `down` through the symlink stops every one of them
        r = _cli("cluster", "down", "--dir", str(link), cwd=tmp_path)
        deadline = time.monotonic() + 60
        while [p for p in started if _alive(p)]:
            assert time.monotonic() < deadline, [p for p in started if _alive(p)]
            time.sleep(0.05)
        st = _cli("cluster", "status", "--json", "--dir", "c", cwd=work, check=False)
        assert st.returncode != 0  # nothing answers any more
    finally:
        _cli("cluster", "down", "--dir", str(root), cwd=tmp_path, check=False)
        for p in started:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
