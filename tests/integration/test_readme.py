# The README's commands, in order, on a fresh cluster: a newcomer's first hour, as a test.
#
# Enforces (issue 14): every ```sh block of README.md runs, in the order of the page, from the repository
# root, each command checked (bash -euo pipefail), as root and inside a private mount namespace (the
# nbdfuse + loop mount recipe must not leak a mount). The only changes: the NBD port and the cluster
# directory come from RAFTBLOCK_NBD_PORT / RAFTBLOCK_DIR (which `make demo` and every command honour), and
# /tmp/fuse, /tmp/mnt, /tmp/raftblock-backups and the port in URIs are this test's own. A README command that stops working fails
# here; before this test, the file-system recipe hung (mkfs ran before the FUSE file existed).
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .helpers import require_tools

REPO = Path(__file__).resolve().parents[2]
BLOCK_TIMEOUT_S = 600


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def test_every_sh_block_of_the_readme_runs_in_order(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io", "nbdinfo", "nbdfuse", "mkfs.ext4", "unshare", "fusermount3")
    if os.geteuid() != 0:
        raise AssertionError("the README's file-system recipe needs root (loop mount)")
    blocks = sh_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 4 and blocks[0].strip() == "make demo", blocks[:1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "cluster"
    env = {**os.environ, "RAFTBLOCK_DIR": str(root), "RAFTBLOCK_NBD_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("MAKEFLAGS", None)
    try:
        for k, block in enumerate(blocks):
            script = (block.replace("127.0.0.1:10809", f"127.0.0.1:{port}")
                      .replace("/tmp/fuse", str(tmp_path / "fuse")).replace("/tmp/mnt", str(tmp_path / "mnt"))
                      .replace("/tmp/raftblock-backups", str(tmp_path / "backups")))
            proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-euo", "pipefail", "-c",
                                     script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left in the background
                except ProcessLookupError:
                    pass
                if proc.poll() is None:
                    proc.wait()
            assert proc.returncode == 0, f"README sh block {k + 1} failed ({proc.returncode}):\n{script}\n--- output:\n" \
                                         f"{out[-4000:]}"
            if k == 0:
                assert f"nbd://127.0.0.1:{port}/demo" in out, out
    finally:
        subprocess.run([sys.executable, "-m", "raftblock.cli", "cluster", "down", "--dir", str(root)],
                       capture_output=True, timeout=120)
