# One metadata node as a process: `raftblock meta --config FILE` (or `python -m raftblock.meta.node`; TOML).
#
# Rules:
# 1. The config names every member (id, Raft address, admin address); ids are not addresses.
# 2. The secret comes from a file (mode 0600 recommended), never from the command line.
# 3. stdout carries one line, `READY meta id=N admin=HOST:PORT raft=HOST:PORT`, once both ports listen;
#    logs go to stderr. SIGTERM/SIGINT stop it cleanly; kill -9 loses nothing acknowledged.
# 4. data_dir/LOCK is held for the process's lifetime (node/dirlock.py), taken before the journal is
#    opened: a second process of the same metadata node exits 1 at once, having touched nothing.
#
# Config:
#   node_id = 1
#   data_dir = "/var/lib/raftblock/meta"
#   secret_file = "/etc/raftblock/cluster.secret"
#   cluster_id = "prod-1"
#   http = "10.0.1.1:9201"   # optional: Prometheus /metrics and, on the leader, the status page (/)
#   [health]            # optional: HealthConfig fields
#   [timings]           # optional: Timings fields
#   [[members]]         # one per metadata node
#   id = 1
#   raft = "10.0.1.1:7001"
#   admin = "10.0.1.1:7101"
#   http = "10.0.1.1:9201"   # optional: where a follower's page redirects to when this member leads
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from raftblock.control.health import HealthConfig
from raftblock.meta.group import MetaConfig, MetaNode, Timings
from raftblock.meta.rpc import AdminServer
from raftblock.node.dirlock import DirectoryInUse, lock_directory
from raftblock.obs.log import configure, set_process
from raftblock.replication.raft.types import NodeId

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NodeFile:
    meta: MetaConfig
    admin: dict[NodeId, str]
    health: HealthConfig
    http: str | None = None
    members_http: dict[int, str] | None = None


def load_config(path: Path) -> NodeFile:
    doc: dict[str, Any] = tomllib.loads(path.read_text())
    try:
        members = {NodeId(int(m["id"])): str(m["raft"]) for m in doc["members"]}
        admin = {NodeId(int(m["id"])): str(m["admin"]) for m in doc["members"]}
        base = path.parent
        secret = (base / doc["secret_file"]).read_bytes().strip()
        meta = MetaConfig(
            node_id=NodeId(int(doc["node_id"])),
            members=members,
            data_dir=base / doc["data_dir"],
            secret=secret,
            cluster_id=str(doc.get("cluster_id", "")),
            timings=Timings(**doc.get("timings", {})),
        )
        from raftblock import tls

        # [tls] (raftblock/tls.py): the admin port serves TLS, mutual, certificates of the cluster CA
        tls.set_identity(tls.TlsConfig.from_table(doc.get("tls"), base=base))
        members_http = {int(m["id"]): str(m["http"]) for m in doc["members"] if m.get("http")}
        http = str(doc["http"]) if doc.get("http") else members_http.get(int(meta.node_id))
        return NodeFile(meta, admin, HealthConfig(**doc.get("health", {})), http, members_http)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{path}: bad metadata node config: {e!r}") from None


def write_local_configs(directory: Path, raft_ports: list[int], admin_ports: list[int],
                        cluster_id: str = "local", host: str = "127.0.0.1",
                        http_ports: list[int] | None = None) -> list[Path]:
    """Configs for a metadata group on one machine (tests, `cluster up`): node i is `meta-i.toml` with its
    data in `meta-i/`; a fresh random secret in `cluster.secret` (0600) unless one exists."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "cluster.secret"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    http = http_ports or [0] * len(raft_ports)
    members = "".join(f'\n[[members]]\nid = {i}\nraft = "{host}:{r}"\nadmin = "{host}:{a}"\n'
                      + (f'http = "{host}:{h}"\n' if h else "")
                      for i, (r, a, h) in enumerate(zip(raft_ports, admin_ports, http, strict=True), start=1))
    paths = []
    for i in range(1, len(raft_ports) + 1):
        p = directory / f"meta-{i}.toml"
        p.write_text(f'node_id = {i}\ndata_dir = "meta-{i}"\nsecret_file = "cluster.secret"\n'
                     f'cluster_id = "{cluster_id}"\n' + (f'http = "{host}:{http[i - 1]}"\n' if http[i - 1] else "")
                     + members)
        paths.append(p)
    return paths


async def run(cfg: NodeFile) -> None:
    # The journal and state in data_dir have one owner: taken before pysyncobj opens anything there.
    set_process(meta=int(cfg.meta.node_id))
    dlock = lock_directory(cfg.meta.data_dir, "metadata data directory")
    node = MetaNode(cfg.meta, cfg.health)
    await node.start()
    server = AdminServer(node, cfg.admin[cfg.meta.node_id], cfg.meta.secret)
    await server.start()
    http = None
    if cfg.http:
        from raftblock.control.statuspage import StatusPage
        from raftblock.obs.exporters import meta_fill
        from raftblock.obs.serve import start_metrics

        page = StatusPage(node, cfg.members_http or {})
        http = await start_metrics(cfg.http, f"meta {cfg.meta.node_id}", meta_fill(node),
                                   extra={"/": page.html_page, "/status.json": page.json_page})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY meta id={cfg.meta.node_id} admin={cfg.admin[cfg.meta.node_id]} raft={cfg.meta.address}",
          flush=True)
    await stop.wait()
    log.info("meta_node_stopping", node_id=cfg.meta.node_id)
    if http is not None:
        await http.close()
    await server.close()
    await node.close()
    dlock.release()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftblock.meta.node", description="run one metadata node")
    ap.add_argument("--config", required=True, type=Path, help="TOML file (see raftblock/meta/node.py)")
    ap.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    args = ap.parse_args(argv)
    configure(args.log_format)
    try:
        asyncio.run(run(load_config(args.config)))
    except DirectoryInUse as e:
        print(f"raftblock meta: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
