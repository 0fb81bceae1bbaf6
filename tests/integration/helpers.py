# Helpers for the real-client integration tests: running external programs with a deadline, running the
# libnbd client programs under the system Python, and looking at the engine's files from outside.
#
# Rules: every child gets its own process group and a timeout; on timeout the whole group is killed,
# so a wedged client (nbdfuse, qemu-io) never outlives its test.
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from raftblock.testing.serve import ServeProcess, default_command, kill_group  # noqa: F401 (re-exported)

HERE = Path(__file__).resolve().parent
CLIENTS = HERE / "clients"
SCRIPTS = HERE / "scripts"
SYSTEM_PYTHON = "/usr/bin/python3"
BLOCK = 4096
SECTOR = 512
MiB = 1 << 20

# serve_factory(volumes=["vol:64M"], disk="os", name="srv", start=True, **ServeProcess kwargs)
ServeFactory = Callable[..., ServeProcess]


def serve_command() -> list[str]:
    """argv before `serve`: `raftblock` by default; RAFTBLOCK_SERVE_CMD (developer aid) overrides it."""
    override = os.environ.get("RAFTBLOCK_SERVE_CMD")
    return shlex.split(override) if override else default_command()


def _skip_or_fail(reason: str) -> None:
    """A missing tool skips on a developer's machine but fails in CI (CI=true), where `make test` has
    installed everything: a skip there would hide a missing install step."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        _skip_or_fail(f"missing tools: {' '.join(missing)} (make sysdeps installs them)")


_libnbd_ok: bool | None = None


def require_libnbd() -> str:
    """The interpreter that has libnbd's Python bindings (Debian python3-libnbd), or skip."""
    global _libnbd_ok
    if _libnbd_ok is None:
        try:
            r = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
            _libnbd_ok = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _libnbd_ok = False
    if not _libnbd_ok:
        _skip_or_fail(f"{SYSTEM_PYTHON} cannot import nbd (install python3-libnbd)")
    return SYSTEM_PYTHON


def run(
    argv: Sequence[str],
    timeout_s: float = 60.0,
    check: bool = True,
    input_bytes: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion in its own process group; kill the group on timeout."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(input_bytes, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout_s}s: {' '.join(argv)}\nstdout:\n{out.decode(errors='replace')[-3000:]}"
            f"\nstderr:\n{err.decode(errors='replace')[-3000:]}"
        ) from None
    cp = subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and cp.returncode != 0:
        raise AssertionError(
            f"exit {cp.returncode}: {' '.join(argv)}\nstdout:\n{cp.stdout[-3000:]}\nstderr:\n{cp.stderr[-3000:]}"
        )
    return cp




def nbd_client(script: str, *args: object, timeout_s: float = 60.0) -> dict[str, Any]:
    """Run clients/<script> under the system Python; return its JSON result."""
    py = require_libnbd()
    cp = run([py, str(CLIENTS / script), *map(str, args)], timeout_s=timeout_s)
    try:
        result: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"{script} printed no JSON result\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}") from None
    return result


def nbd_write(uri: str, offset: int, data: bytes, tmp: Path, fua: bool = False) -> None:
    src = tmp / f"w-{offset}-{len(data)}.bin"
    src.write_bytes(data)
    r = nbd_client("nbd_tool.py", "write", uri, offset, src, *(["--fua"] if fua else []))
    src.unlink()
    assert r["ok"], f"libnbd write {offset}+{len(data)} failed: {r}"


def nbd_read(uri: str, offset: int, length: int, tmp: Path) -> dict[str, Any]:
    """{"ok": True, "data": bytes} or the error result (errno, errnum, message)."""
    dst = tmp / f"r-{offset}-{length}.bin"
    r = nbd_client("nbd_tool.py", "read", uri, offset, length, dst)
    if r["ok"]:
        r["data"] = dst.read_bytes()
    dst.unlink(missing_ok=True)
    return r


def nbd_sha256(uri: str, offset: int | None = None, length: int | None = None) -> str:
    args: list[object] = ["sha256", uri]
    if offset is not None:
        args += [offset, length]
    r = nbd_client("nbd_tool.py", *args)
    assert r["ok"], f"libnbd checksum failed: {r}"
    return str(r["sha256"])


def data_files(data_dir: Path) -> list[Path]:
    """Every regular file below a server's --dir. The engine's segment files are among them; which names
    it uses is its business (the serve contract says `*.seg`, the engine writes `seg-<id>.log`)."""
    return sorted(p for p in data_dir.rglob("*") if p.is_file())


def find_on_disk(data_dir: Path, needle: bytes) -> list[tuple[Path, int]]:
    """Every (file, byte offset) below data_dir where needle occurs."""
    hits = []
    for p in data_files(data_dir):
        data = p.read_bytes()
        pos = data.find(needle)
        while pos != -1:
            hits.append((p, pos))
            pos = data.find(needle, pos + 1)
    return hits


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def cluster_ring(root: Path) -> Any:
    """The data port's key ring of a local cluster (raftblock/wire/auth.py), as its processes unwrap it."""
    import asyncio

    from raftblock.node.cluster import _load, meta_client, open_layout
    from raftblock.wire.auth import KeyRing

    layout = open_layout(root)
    st = asyncio.run(meta_client(layout, _load(layout)).state(barrier=True))
    return KeyRing.from_map(layout.secret_file.read_bytes().strip(), st.data_key_set())


def signed_hello(sock: Any, ring: Any, node_id: int, role: int, first: Any = None) -> Any:
    """A blocking socket to a node's data port, made into an authenticated session as a node (or a gateway)
    holding the cluster's keys would: HELLO both ways, then AUTH. Returns the Session: seal frames with it.
    `first(session)`: the frames (bytes) to send in the same write as the AUTH, so that the node reads them in
    the turn it attaches this connection (a peer's real connection may replace a forged one at any time)."""
    from raftblock.wire import raftblock_pb2 as pb
    from raftblock.wire.auth import FRAME_AUTH, Session, session_id
    from raftblock.wire.framing import Frame, FrameDecoder, FrameType, encode_frame, encode_frame_bytes

    nonce = os.urandom(16)
    sock.sendall(encode_frame_bytes(FrameType.HELLO, 0, pb.Hello(node_id=node_id, role=role, version=1, nonce=nonce,
                                                                  auth=1).SerializeToString()))
    dec = FrameDecoder()
    while (ev := dec.next_event()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the node closed the connection before its HELLO")
        dec.feed(data)
    assert isinstance(ev, Frame) and ev.type == FrameType.HELLO
    s = Session(ring, session_id(nonce, pb.Hello.FromString(ev.message).nonce), dialer=True)
    out = b"".join(bytes(p) for p in s.seal(encode_frame(FRAME_AUTH, 0, b"")))
    sock.sendall(out + (b"".join(first(s)) if first is not None else b""))
    return s


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the series of `name` on a /metrics page whose labels include `labels` (0 if none)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        k, _, v = line.rpartition(" ")
        base, _, rest = k.partition("{")
        if base == name and all(f'{lk}="{lv}"' in rest for lk, lv in labels.items()):
            total += float(v)
    return total
