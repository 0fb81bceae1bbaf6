"""A cluster reached through its cluster file only (what a deployed host's /etc/raftblock/cluster.toml is): no
local directory, no process of it visible. Volume commands, status with every process's metrics URL, a
snapshot of a volume a host is writing through a gateway reached on its authenticated TCP admin port, the
refusals of commands that only make sense on a local cluster."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .helpers import SYSTEM_PYTHON, require_libnbd
from .test_cluster import RAFTBLOCK, Cluster, _cleanup, _wait

WRITER = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
i = 0
print("connected", flush=True)
while True:
    h.pwrite(bytes([i % 256]) * 65536, (i % 64) * 65536)
    i += 1
    if i == 64:
        print("written", flush=True)
    if i >= 64 and sys.stdin.readline() == "":
        break
h.shutdown()
"""

def test_a_cluster_reached_only_through_its_cluster_file(tmp_path: Path) -> None:
    require_libnbd()
    c = Cluster(tmp_path / "cluster", gateway="separate")
    writer = None
    try:
        c.up()
        c.down()
        gw_cfg = c.root / "nodes" / "gateway.toml"
        gw_cfg.write_text(gw_cfg.read_text().replace("deadline_s = 10.0\n",
                                                     'deadline_s = 10.0\nadmin_listen = "127.0.0.1:0"\n', 1))
        c.up()
        remote = tmp_path / "etc"
        remote.mkdir()
        text = (c.root / "cluster.toml").read_text().replace('secret_file = "meta/cluster.secret"',
                                                             'secret_file = "cluster.secret"')
        (remote / "cluster.toml").write_text(text)
        (remote / "cluster.secret").write_bytes((c.root / "meta" / "cluster.secret").read_bytes())
        cfile = str(remote / "cluster.toml")

        def rb(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            r = subprocess.run([*RAFTBLOCK, *args], capture_output=True, text=True, timeout=120,
                               env={**os.environ, **(env or {})}, cwd=tmp_path)
            if check:
                assert r.returncode == 0, f"raftblock {' '.join(args)}: {r.stderr}"
            return r

        rb("volume", "create", "v", "--size", "64M", "--cluster", cfile)
        listed = json.loads(rb("volume", "list", "--json", env={"RAFTBLOCK_CLUSTER": cfile}).stdout)
        assert [v["name"] for v in listed] == ["v"]
        st = json.loads(rb("cluster", "status", "--json", "--cluster", cfile).stdout)
        assert st["healthy"], st["problems"]
        assert all(n["metrics_url"] and n["pid"] is None and n["state"] == "up" for n in st["nodes"]), st["nodes"]
        assert [g["id"] for g in st["gateways"]] == ["gw1"] and st["gateways"][0]["metrics_url"], st["gateways"]
        assert all(m["metrics_url"] for m in st["metadata"]) and st["status_url"], st["metadata"]

        # a host writing through the gateway: the volume is attached there; the snapshot raises that
        # gateway's barrier over its TCP admin port, authenticated with the secret of the cluster file
        writer = subprocess.Popen([SYSTEM_PYTHON, "-c", WRITER, f"{c.uri}/v"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "connected"
        assert writer.stdout.readline().strip() == "written"
        made = json.loads(rb("snapshot", "create", "v", "s1", "--json", "--cluster", cfile).stdout)
        assert made["name"] == "s1" and made["barrier_ms"] > 0, made
        r = rb("volume", "detach", "v", "--cluster", cfile, check=False)
        assert r.returncode == 1 and "in use" in r.stderr, r.stderr  # the gateway told it a host is connected
        # a wrong secret: the metadata group refuses, one line
        (remote / "cluster.secret").write_text("0" * 64 + "\n")
        r = rb("volume", "list", "--cluster", cfile, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        (remote / "cluster.secret").write_bytes((c.root / "meta" / "cluster.secret").read_bytes())
        # what only a local cluster can do
        r = rb("node", "add", "--cluster", cfile, check=False)
        assert r.returncode == 1 and "local cluster" in r.stderr, r.stderr
        r = rb("cluster", "up", "--cluster", cfile, check=False)
        assert r.returncode == 2  # no such option there
        writer.stdin.close()  # type: ignore[union-attr]
        assert writer.wait(timeout=60) == 0
        writer = None
        _wait(lambda: not json.loads(rb("volume", "list", "--json", "--cluster", cfile).stdout)[0]["attached_by"],
              30, "the gateway to detach the volume")
        assert json.loads(rb("snapshot", "list", "v", "--json", "--cluster", cfile).stdout)[0]["state"] == "ready"
    finally:
        if writer is not None:
            writer.kill()
        _cleanup(c)
