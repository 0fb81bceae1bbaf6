"""`raftblock serve`: one process, one copy — the engine, a LocalGroup and the NBD gateway.

The composition root of the single-node mode: it is the one-copy baseline of the bench and the way to
run the data path without a cluster. Its directory holds:

    DIR/cluster.json    cluster id (16 random bytes, hex), written once
    DIR/volumes.json    volumes: name, id, size, extent size (atomically replaced, fsynced)
    DIR/engine/         the storage engine's segments and checkpoints

    DIR/LOCK            held (flock) while the process runs: a second one on DIR exits at once

Rules:
0. The directory's lock is taken before anything in it is read or written (node/dirlock.py).
1. Volumes named on the command line are created on first start; on a restart the stored definition
   wins, and a different size on the command line is an error (never a silent resize).
2. Start-up reports every corrupt block range the engine found, mapped to volume byte ranges.
3. SIGTERM/SIGINT drain in-flight requests, close the engine (sync + checkpoint), exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from raftblock._fast import blockcrc
from raftblock.client.volume import BLOCK_SIZE, Volume, VolumeInfo
from raftblock.gateway.nbd_server import GatewayConfig, NbdServer, VolumeCatalog
from raftblock.node.dirlock import lock_directory
from raftblock.replication.local import LocalGroup
from raftblock.storage.disk import make_disk
from raftblock.storage.engine import Engine, EngineConfig

log = structlog.get_logger(__name__)

EXTENT_SIZE_BYTES = 64 << 20
EXTENT_INDEX_BITS = 24
COMPACTION_INTERVAL_S = 1.0
COMPACTION_BUDGET_BYTES_PER_S = 32 << 20


def _volume_info(d: dict[str, Any]) -> VolumeInfo:
    """A volume as volumes.json keeps it (one-copy mode has no QoS: a `qos` key, written by a build that had it
    there, is dropped)."""
    d = dict(d)
    d.pop("qos", None)
    return VolumeInfo(**d)


class ServeError(Exception):
    """A start-up problem the operator must fix; printed as one line."""


@dataclass
class VolumeSpec:
    name: str
    size_bytes: int


def write_json_atomic(path: Path, obj: object) -> None:
    """Replace `path` with `obj` as JSON: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_or_create_cluster_id(directory: Path) -> bytes:
    path = directory / "cluster.json"
    if path.exists():
        return bytes.fromhex(json.loads(path.read_text())["cluster_id"])
    cid = secrets.token_bytes(16)
    write_json_atomic(path, {"cluster_id": cid.hex()})
    return cid


def load_or_create_volumes(directory: Path, wanted: list[VolumeSpec]) -> list[VolumeInfo]:
    path = directory / "volumes.json"
    stored: list[VolumeInfo] = []
    if path.exists():
        stored = [_volume_info(v) for v in json.loads(path.read_text())["volumes"]]
    by_name = {v.name: v for v in stored}
    changed = False
    for spec in wanted:
        if spec.size_bytes <= 0 or spec.size_bytes % BLOCK_SIZE:
            raise ServeError(f"volume {spec.name}: size {spec.size_bytes} is not a positive multiple of 4096")
        have = by_name.get(spec.name)
        if have is not None:
            if have.size_bytes != spec.size_bytes:
                raise ServeError(
                    f"volume {spec.name} exists with size {have.size_bytes}, not {spec.size_bytes} (resize is not supported)"
                )
            continue
        max_size = EXTENT_SIZE_BYTES << EXTENT_INDEX_BITS
        if spec.size_bytes > max_size:
            raise ServeError(f"volume {spec.name}: size exceeds {max_size} bytes")
        vid = max((v.volume_id for v in stored), default=0) + 1
        info = VolumeInfo(name=spec.name, volume_id=vid, size_bytes=spec.size_bytes, extent_size_bytes=EXTENT_SIZE_BYTES)
        stored.append(info)
        by_name[spec.name] = info
        changed = True
        log.info("volume.created", volume=spec.name, size_bytes=spec.size_bytes, volume_id=vid)
    if changed or not path.exists():
        write_json_atomic(path, {"volumes": [{k: x for k, x in asdict(v).items() if k != "qos"} for v in stored]})
    return stored


def report_corruption(engine: Engine, volumes: list[VolumeInfo]) -> None:
    by_id = {v.volume_id: v for v in volumes}
    for c in engine.report.corrupt:
        log.error(
            "engine.corruption",
            segment=c.segment,
            offset=c.offset,
            length=c.length,
            extent_id=c.extent_id,
            block_start=c.block_start,
            block_count=c.block_count,
            reason=c.reason,
        )
        if c.extent_id is None or c.block_start is None or c.block_count is None:
            continue
        vol = by_id.get(c.extent_id >> EXTENT_INDEX_BITS)
        if vol is None:
            continue
        index = c.extent_id & ((1 << EXTENT_INDEX_BITS) - 1)
        start = index * vol.extent_size_bytes + c.block_start * BLOCK_SIZE
        log.error(
            "volume.corruption",
            volume=vol.name,
            offset_bytes=start,
            length_bytes=c.block_count * BLOCK_SIZE,
            reason=c.reason,
        )


async def _cleaning_loop(engine: Engine, stop: asyncio.Event) -> None:
    budget = int(COMPACTION_BUDGET_BYTES_PER_S * COMPACTION_INTERVAL_S)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), COMPACTION_INTERVAL_S)
            return
        except TimeoutError:
            pass
        try:
            moved = engine.clean(budget)
            if moved:
                log.debug("engine.cleaned", bytes_rewritten=moved)
        except OSError as e:  # ENOSPC while cleaning: try again later, data is untouched
            log.warning("engine.cleaning_failed", error=str(e))


async def run_serve(
    directory: Path,
    specs: list[VolumeSpec],
    gateway: GatewayConfig,
    disk_mode: str = "os",
    engine_config: EngineConfig | None = None,
    ready_stream: TextIO | None = None,
) -> int:
    dlock = lock_directory(directory)  # before anything in it is read or written (node/dirlock.py)
    log.info("serve.starting", directory=str(directory), disk=disk_mode, fast=blockcrc.IMPLEMENTATION)
    cluster_id = load_or_create_cluster_id(directory)
    volumes = load_or_create_volumes(directory, specs)
    if not volumes:
        log.warning("serve.no_volumes", directory=str(directory),
                    hint="nothing to export: add --volume NAME:SIZE (created on first start)")
    disk = make_disk(disk_mode)
    engine_dir = directory / "engine"
    engine_dir.mkdir(exist_ok=True)
    engine = Engine.open(disk, str(engine_dir), cluster_id, engine_config or EngineConfig())
    report_corruption(engine, volumes)
    group = LocalGroup(engine)
    catalog = VolumeCatalog()
    def group_for(_extent_id: int) -> LocalGroup:
        return group

    for info in volumes:
        catalog.add(Volume(info, group_for))
    server = NbdServer(catalog, gateway)
    host, port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cleaner = loop.create_task(_cleaning_loop(engine, stop))
    out = ready_stream if ready_stream is not None else sys.stdout
    print(f"READY nbd://{host}:{port}", file=out, flush=True)
    await stop.wait()
    log.info("serve.stopping")
    await server.shutdown()
    await cleaner
    group.close()
    # Shutdown is complete: a second SIGTERM arriving while the loop closes must not turn exit 0 into -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("serve.stopped")
    dlock.release()
    return 0
