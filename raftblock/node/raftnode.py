"""`raftblock node --config FILE` (or `python -m raftblock.node.raftnode`): one storage node.

Owns: the composition root of a storage node (config, data-directory lock, Disk, Engine, WAL, NodeHost,
MetaAgent, scrubber, signals). Under a metadata group (`[meta]`) the groups come from the map; without
one, from `[groups]` / `[[group]]` (static membership, the Raft benches and tests).

Config (TOML):

    node_id = 1                       # >= 1; node ids are not addresses
    data_dir = "/var/lib/raftblock/n1"  # engine/ (segments) and wal/ (the shared Raft log) inside
    listen = "127.0.0.1:7001"         # peers and clients use this one port
    disk = "os"                       # os | volatile | volatile-tear (tests: lose unsynced data on kill -9)
    [peers]                           # every node of the cluster, this one included
    1 = "127.0.0.1:7001"
    2 = "127.0.0.1:7002"
    3 = "127.0.0.1:7003"
    [groups]                          # groups first .. first+count-1, each replicated on `members`
    first = 1
    count = 100
    members = [1, 2, 3]
    # or, instead of [groups], one table per group (what `raftblock cluster up` writes):
    # [[group]]
    # id = 1
    # members = [1, 2, 3]
    [raft]                            # optional: HostConfig fields (node/config.py: tick_ms, batch_writes_max, ...)
    tick_ms = 100
    [engine]                          # optional: EngineConfig fields (segment_size_bytes, ...)
    [gateway]                         # optional (needs [meta]): serve NBD from this process (node/gateway.py)
    bind = "127.0.0.1"
    port = 10809
    admin_socket = "/run/raftblock/n1-gateway.sock"
    gateway_id = "n1"                 # default "n<node_id>"

`data_dir/LOCK` is held (node/dirlock.py) from before the engine and the WAL are opened until the process
exits: a second process of the same node exits at once, having touched nothing.

An extent belongs to group `extent_id >> 32`. Rules: prints `READY raft://HOST:PORT` on stdout once
listening (logs go to stderr); SIGTERM/SIGINT stop cleanly (WAL synced, engine checkpointed), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from raftblock.control.health import HealthConfig
from raftblock.control.scrub import Scrubber
from raftblock.node.config import HostConfig
from raftblock.node.dirlock import DirectoryInUse, lock_directory
from raftblock.node.host import NodeHost
from raftblock.node.serve import load_or_create_cluster_id
from raftblock.obs.exporters import gateway_fill, node_fill
from raftblock.obs.log import configure, set_process
from raftblock.obs.serve import start_metrics
from raftblock.replication.wal import Wal
from raftblock.storage.disk import make_disk
from raftblock.storage.engine import Engine, EngineConfig

log = structlog.get_logger(__name__)

ENGINE_CLEAN_INTERVAL_S = 1.0
ENGINE_CLEAN_BUDGET_BYTES = 8 << 20  # the trickle, every CLEAN_TRICKLE_EVERY s, while dead bytes are below the target


class NodeConfig:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.node_id = int(raw["node_id"])
        if self.node_id < 1:
            raise ValueError("node_id must be >= 1")
        self.data_dir = Path(raw["data_dir"])
        self.host, self.port = parse_address(raw["listen"])
        self.disk = str(raw.get("disk", "os"))
        self.peers = {int(k): parse_address(v) for k, v in raw["peers"].items()}
        self.groups: dict[int, list[int]] = {}
        if "group" in raw:  # [[group]] tables: id + members each (groups placed across racks)
            for g in raw["group"]:
                members = [int(m) for m in g["members"]]
                if self.node_id in members:
                    self.groups[int(g["id"])] = members
        elif "groups" in raw or "meta" not in raw:
            # Static groups; without a metadata group and without [groups], one group 1 on every peer.
            # Under a metadata group the map alone says which groups exist (and whether they are Raft
            # or chain groups): no group is made up here.
            g = raw.get("groups", {})
            first, count = int(g.get("first", 1)), int(g.get("count", 1))
            members = [int(m) for m in g.get("members", sorted(self.peers))]
            self.groups = {gid: members for gid in range(first, first + count) if self.node_id in members}
        self.rack = str(raw.get("rack", ""))
        meta = raw.get("meta")
        # [meta] admin = {1 = "host:port", ...}, secret_file = "...": groups then come from the metadata map
        self.meta_admin: dict[int, str] = {int(k): str(v) for k, v in meta["admin"].items()} if meta else {}
        self.meta_secret_file = Path(meta["secret_file"]) if meta else None
        # Heartbeats to the metadata leader and map polls: as often as the detector there expects them.
        self.meta_heartbeat_s = int(meta.get("heartbeat_interval_ms", HealthConfig().heartbeat_interval_ms)) / 1000 \
            if meta else 1.0
        self.raft = dict(raw.get("raft", {}))
        self.engine = dict(raw.get("engine", {}))
        self.seed = raw.get("seed")
        # [gateway]: this node serves NBD too (node/gateway.py; bind, port, admin_socket, gateway_id, ...)
        self.gateway: dict[str, Any] | None = dict(raw["gateway"]) if "gateway" in raw else None
        if self.gateway is not None and not meta:
            raise ValueError("[gateway] needs [meta]: the gateway follows the metadata map")
        self.meta_raw: dict[str, Any] = dict(meta) if meta else {}
        # http = "HOST:PORT": Prometheus /metrics of this node (and of its gateway), obs/metrics.py
        self.http: str | None = str(raw["http"]) if raw.get("http") else None
        # [tls] ca, cert, key (raftblock/tls.py): its embedded gateway's NBD needs STARTTLS and host certificates
        from raftblock.tls import TlsConfig

        self.tls = TlsConfig.from_table(raw.get("tls"))  # also the data port's and the metadata client's TLS

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        with open(path, "rb") as f:
            return cls(tomllib.load(f))


def parse_address(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


CLEAN_CHUNK_BYTES = 2 << 20  # one call of Engine.clean: the loop runs other work between chunks
CLEAN_TRICKLE_EVERY = 5  # below the target: one round in this many (as before the pace: 8 MiB per 5 s)


def cleaning_budget(live: int, garbage: int, cfg: EngineConfig, interval_s: float) -> int:
    """Bytes the cleaner may rewrite in the next `interval_s` when it is behind: dead bytes above
    max(cleaning_garbage_target x live bytes, two segments). 0: not behind (the trickle applies)."""
    target = max(cfg.cleaning_garbage_target * live, 2 * cfg.segment_size_bytes)
    return int(cfg.cleaning_bytes_per_s * interval_s) if garbage > target else 0


async def _engine_cleaning(engine: Engine, stop: asyncio.Event) -> None:
    """Segment cleaning, checked once a second. Behind (`cleaning_budget` > 0): up to that many bytes, in
    chunks with the loop free between them, what the copies dirtied flushed on a worker thread after each
    (Engine rule 1: sync() may run on any thread), so the fdatasync a finished segment needs on the loop
    (cleaner rule 4) has little left to write. Otherwise every CLEAN_TRICKLE_EVERY rounds one trickle of
    ENGINE_CLEAN_BUDGET_BYTES: an engine fdatasync every second while nothing needs cleaning would compete
    with the WAL's (measured: p99 of a mixed write load 55-90 ms became 130-190 ms)."""
    loop = asyncio.get_running_loop()
    rounds = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), ENGINE_CLEAN_INTERVAL_S)
            return
        except TimeoutError:
            pass
        rounds += 1
        try:
            budget = cleaning_budget(*engine.space(), engine.config, ENGINE_CLEAN_INTERVAL_S)
            behind = budget > 0
            if not behind:
                if rounds % CLEAN_TRICKLE_EVERY:
                    continue
                budget = ENGINE_CLEAN_BUDGET_BYTES
            # The cleaner copies only from synced segments (Engine.cleanable); flush on a worker thread first.
            await loop.run_in_executor(None, engine.sync)
            while budget > 0 and not stop.is_set():
                n = engine.clean(min(budget, CLEAN_CHUNK_BYTES) if behind else budget)
                if n == 0:
                    break
                budget -= n
                if behind:
                    await loop.run_in_executor(None, engine.sync)
        except OSError as e:
            log.warning("engine.cleaning_failed", error=str(e))


async def run_node(cfg: NodeConfig) -> int:
    # Before the engine or the WAL recovers anything: a second process of this node must not touch them.
    set_process(node=cfg.node_id, rack=cfg.rack)
    from raftblock.tls import set_identity

    set_identity(cfg.tls)  # [tls]: the data port, the peer links and the metadata client are TLS (raftblock/tls.py)
    dlock = lock_directory(cfg.data_dir)
    disk = make_disk(cfg.disk)
    cluster_id = load_or_create_cluster_id(cfg.data_dir)
    (cfg.data_dir / "engine").mkdir(exist_ok=True)
    engine_cfg = dict(cfg.engine)
    if "compaction_garbage_ratio" in engine_cfg:  # its name before segment cleaning was called cleaning
        engine_cfg.setdefault("cleaning_garbage_ratio", engine_cfg.pop("compaction_garbage_ratio"))
        log.warning("config.key_renamed", old="engine.compaction_garbage_ratio", new="engine.cleaning_garbage_ratio")
    hcfg = HostConfig(cfg.node_id, **cfg.raft)
    # The WAL first: the engine's LINK records (write-once) point into its segments.
    wal, recovered = Wal.open(disk, str(cfg.data_dir / "wal"), hcfg.wal_segment_bytes_max)
    engine = Engine.open(disk, str(cfg.data_dir / "engine"), cluster_id, EngineConfig(**engine_cfg), wal=wal)
    rt = NodeHost(hcfg, engine, wal, recovered, cfg.groups, cfg.peers, seed=cfg.seed)
    if cfg.meta_admin:
        rt.fences_known = False  # no client I/O until the first map read (MetaAgent.reconcile)
        # The data port's keys (node/agent.py rule 7): those saved at the last poll, else none until the first.
        from raftblock.node.agent import load_data_keys
        from raftblock.wire.auth import KeyRing

        dk = load_data_keys(cfg.data_dir)
        ring = None
        if dk is not None and cfg.meta_secret_file is not None:
            try:
                ring = KeyRing.from_map(cfg.meta_secret_file.read_bytes().strip(), dk)
            except ValueError as e:  # another cluster secret: the map's keys are read at the first poll
                log.warning("raftnode.data_keys_unreadable", error=str(e))
        rt.set_auth("unknown" if dk is None or (dk.active and ring is None) else ("on" if ring else "off"), ring)
    port = await rt.start(cfg.host, cfg.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A node that failed (a disk or apply error: host.py rule 3) serves nothing any more: the process exits 1
    # after the usual drain, so its supervisor (systemd's Restart=on-failure) restarts it, and the restart's
    # recovery (or its refusal to start) is what the operator sees, not a process that looks up and is not.
    def on_failed() -> None:
        loop.call_soon_threadsafe(stop.set)

    rt.on_failed = on_failed
    cleaner = loop.create_task(_engine_cleaning(engine, stop))
    scrubber = loop.create_task(Scrubber(rt).run(stop))
    agent_task = None
    if cfg.meta_admin and cfg.meta_secret_file is not None:
        from raftblock.meta.rpc import MetaClient
        from raftblock.meta.state import NodeId as MetaNodeId
        from raftblock.node.agent import MetaAgent

        client = MetaClient({MetaNodeId(k): v for k, v in cfg.meta_admin.items()},
                            cfg.meta_secret_file.read_bytes().strip())
        agent = MetaAgent(client, rt, cfg.node_id, cfg.rack, f"{cfg.host}:{port}", cfg.data_dir,
                          interval_s=cfg.meta_heartbeat_s, disk_id=cluster_id.hex(),  # made with the data directory: a new disk, a new id
                          http=cfg.http or "")
        agent_task = loop.create_task(agent.run(stop))
    gateway = None
    if cfg.gateway is not None:
        from raftblock.client.router import NodeClient
        from raftblock.node.gateway import start_gateway

        deadline_s = float(cfg.gateway.get("deadline_s", 10.0))
        gateway = await start_gateway(cfg.gateway, cfg.meta_raw, node_id=cfg.node_id, default_id=f"n{cfg.node_id}",
                                      tls=cfg.tls,
                                      http=cfg.http or "",
                                      client=NodeClient({}, deadline_s=deadline_s, links=rt.client_links))
    http = None
    if cfg.http:
        http = await start_metrics(cfg.http, f"node {cfg.node_id}", node_fill(rt, cfg.rack),
                                   *([gateway_fill(gateway.gw)] if gateway is not None else []))
    # The first word after READY is the node's address (what `cluster up` waits for); the gateway's follows.
    print(f"READY raft://{cfg.host}:{port}" + (f" {gateway.uri}" if gateway is not None else "")
          + (f" iscsi://{gateway.iscsi.address}" if gateway is not None and gateway.iscsi is not None else ""),
          flush=True)
    await stop.wait()
    log.info("raftnode.stopping", node=cfg.node_id)
    if http is not None:
        await http.close()
    if gateway is not None:
        await gateway.stop()  # in-flight requests drained while the replicas still run
    await cleaner
    await scrubber
    if agent_task is not None:
        await agent_task
    await rt.stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    failed = rt.failed
    log.info("raftnode.stopped", node=cfg.node_id, failed=repr(failed) if failed is not None else None)
    dlock.release()
    return 1 if failed is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftblock.node.raftnode")
    ap.add_argument("--config", required=True)
    ap.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    configure(args.log_format, args.log_level)
    cfg = NodeConfig.load(args.config)
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run_node(cfg))
        return uvloop.run(run_node(cfg))
    except DirectoryInUse as e:
        print(f"raftblock node: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
