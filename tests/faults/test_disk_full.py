"""Disk full: a write that finds no space gets NBD ENOSPC (not a hang, not a crash), nothing already
stored is harmed, and writes succeed again once space returns.

The server runs in a private mount namespace on a small tmpfs (`unshare -m --propagation private`, so
the mount never leaks); the test fills that file system with a ballast file and later deletes it, from
inside the same namespace (`nsenter -t PID -m`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from raftblock.testing.serve import ServeProcess, default_command

SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20

# Writes 1 MiB chunks (chunk i filled with byte i+1) until the first error; prints JSON
# {"written": [..indexes acknowledged..], "errno": E or null}.
WRITER = r"""
import json, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
start, count = int(sys.argv[2]), int(sys.argv[3])
written, err = [], None
for i in range(start, start + count):
    try:
        h.pwrite(bytes([i % 251 + 1]) * (1 << 20), i << 20)
        written.append(i)
    except nbd.Error as e:
        err = e.errno
        break
# The connection is still usable after the error: a flush is answered.
h.flush()
h.shutdown()
print(json.dumps({"written": written, "errno": err}))
"""

# Reads the chunks given and prints the indexes whose content is wrong.
VERIFIER = r"""
import json, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
bad = [i for i in json.loads(sys.argv[2]) if h.pread(1 << 20, i << 20) != bytes([i % 251 + 1]) * (1 << 20)]
h.shutdown()
print(json.dumps(bad))
"""


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: `make sysdeps` installs them")


def _client(script: str, *args: str) -> object:
    r = subprocess.run([SYSTEM_PYTHON, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _in_ns(pid: int, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=60)


def test_disk_full_gives_enospc_keeps_data_and_recovers(tmp_path: Path) -> None:
    _need("unshare", "nsenter", SYSTEM_PYTHON)
    data_dir = tmp_path / "srv"
    data_dir.mkdir()
    wrapper = [
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs -o size=40m tmpfs "{data_dir}" && exec "$0" "$@"',
        *default_command(),
    ]
    sp = ServeProcess(data_dir, ["vol:64M"], command=wrapper, log_path=tmp_path / "srv.log",
                      extra_args=["--segment-size", "4M"])
    try:
        sp.start()
        pid = sp.pid
        uri = sp.uri("vol")
        # Some data first, while there is space.
        first = _client(WRITER, uri, "0", "4")
        assert first == {"written": [0, 1, 2, 3], "errno": None}, first
        # Fill the file system: the ballast takes every free byte (dd stops at ENOSPC).
        _in_ns(pid, f'dd if=/dev/zero of="{data_dir}/ballast" bs=1M 2>/dev/null; sync')
        df = _in_ns(pid, f'df -B1 --output=avail "{data_dir}" | tail -1')
        assert int(df.stdout.strip()) < MiB, df.stdout
        full = _client(WRITER, uri, "4", "40")
        assert full["errno"] == "ENOSPC", f"expected ENOSPC, got {full}"  # type: ignore[index]
        assert sp.proc is not None and sp.proc.poll() is None, "server died on a full disk"
        acked = [0, 1, 2, 3, *full["written"]]  # type: ignore[index]
        assert _client(VERIFIER, uri, json.dumps(acked)) == [], "acknowledged data changed on a full disk"
        # Space returns: writes work again, and everything acknowledged is still there.
        _in_ns(pid, f'rm -f "{data_dir}/ballast"')
        nxt = len(acked)
        again = _client(WRITER, uri, str(nxt), "4")
        assert again == {"written": list(range(nxt, nxt + 4)), "errno": None}, again
        assert _client(VERIFIER, uri, json.dumps(acked + list(range(nxt, nxt + 4)))) == []
        events = [json.loads(line) for line in sp.log_path.read_text().splitlines() if line.startswith("{")]
        assert any(e.get("event") == "nbd.request_failed" and e.get("errno") == 28 for e in events)
    finally:
        sp.close()
