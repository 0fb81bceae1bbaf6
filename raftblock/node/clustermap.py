"""The cluster map of a local cluster: nodes and racks, extent groups and their members, volumes and
their extents. Interim home: a JSON file in the cluster directory, written atomically and fsynced,
changed only by the `raftblock` CLI. The metadata group (raftblock/meta, pysyncobj) replaces this file
as the source of truth; the shape of the map stays.

Rules:
1. Extent ids are assigned once and never move between groups: extent_id = group_id << 32 | n, where n
   counts the extents ever placed in that group. The node runtime checks an extent's group from its id.
2. Every group has 3 members on 3 nodes in 3 different racks (placement refuses otherwise, naming the
   racks it found); a volume's extents go to the groups holding the fewest extents, ties by id, so a
   volume is spread over groups (and so over group leaders).
3. Volume names are unique; sizes are positive multiples of 4096.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raftblock.client.volume import BLOCK_SIZE, VolumeInfo

EXTENT_SIZE_BYTES = 64 << 20
REPLICAS = 3


class MapError(Exception):
    """A request the map refuses (one line for the operator)."""


@dataclass
class NodeEntry:
    node_id: int
    rack: str
    host: str
    port: int


@dataclass
class GroupEntry:
    group_id: int
    members: list[int]
    extents_placed: int = 0


@dataclass
class VolumeEntry:
    name: str
    volume_id: int
    size_bytes: int
    extent_size_bytes: int
    extent_ids: list[int]
    replication: str = "raft"

    def info(self) -> VolumeInfo:
        return VolumeInfo(self.name, self.volume_id, self.size_bytes, self.extent_size_bytes, tuple(self.extent_ids))


@dataclass
class ClusterMap:
    cluster_id: str
    nodes: list[NodeEntry]
    groups: list[GroupEntry]
    volumes: list[VolumeEntry] = field(default_factory=list)

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> ClusterMap:
        raw = json.loads(path.read_text())
        return cls(
            cluster_id=raw["cluster_id"],
            nodes=[NodeEntry(**n) for n in raw["nodes"]],
            groups=[GroupEntry(**g) for g in raw["groups"]],
            volumes=[VolumeEntry(**v) for v in raw.get("volumes", [])],
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- queries ------------------------------------------------------------------------------
    def node(self, node_id: int) -> NodeEntry:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def volume(self, name: str) -> VolumeEntry | None:
        return next((v for v in self.volumes if v.name == name), None)

    def peers(self) -> dict[int, tuple[str, int]]:
        return {n.node_id: (n.host, n.port) for n in self.nodes}

    # --- changes ------------------------------------------------------------------------------
    def create_volume(self, name: str, size_bytes: int) -> VolumeEntry:
        if not name or "/" in name or len(name.encode()) > 255:
            raise MapError(f"invalid volume name {name!r}")
        if self.volume(name) is not None:
            raise MapError(f"volume {name} already exists")
        if size_bytes <= 0 or size_bytes % BLOCK_SIZE:
            raise MapError(f"size {size_bytes} is not a positive multiple of 4096")
        if not self.groups:
            raise MapError("the cluster has no extent groups")
        extents = -(-size_bytes // EXTENT_SIZE_BYTES)
        ids: list[int] = []
        for _ in range(extents):
            g = min(self.groups, key=lambda e: (e.extents_placed, e.group_id))
            ids.append(g.group_id << 32 | g.extents_placed)
            g.extents_placed += 1
        vid = max((v.volume_id for v in self.volumes), default=0) + 1
        vol = VolumeEntry(name, vid, size_bytes, EXTENT_SIZE_BYTES, ids)
        self.volumes.append(vol)
        return vol

    def delete_volume(self, name: str) -> VolumeEntry:
        vol = self.volume(name)
        if vol is None:
            raise MapError(f"no volume {name}")
        self.volumes.remove(vol)
        return vol


def place_groups(nodes: list[NodeEntry], group_count: int) -> list[GroupEntry]:
    """Members for `group_count` new groups: 3 nodes in 3 distinct racks each, spreading replicas and
    first members (the preferred leaders) evenly. Fails clearly with fewer than 3 racks."""
    racks: dict[str, list[NodeEntry]] = {}
    for n in sorted(nodes, key=lambda n: n.node_id):
        racks.setdefault(n.rack, []).append(n)
    if len(racks) < REPLICAS:
        raise MapError(
            f"placement needs {REPLICAS} racks for {REPLICAS} replicas; found {len(racks)}: {', '.join(sorted(racks)) or 'none'}"
        )
    load = {n.node_id: 0 for n in nodes}
    lead = {n.node_id: 0 for n in nodes}
    groups = []
    for gid in range(1, group_count + 1):
        # the least-loaded node of each rack, then the 3 least-loaded racks
        best = [min(members, key=lambda n: (load[n.node_id], n.node_id)) for members in racks.values()]
        best.sort(key=lambda n: (load[n.node_id], n.node_id))
        chosen = best[:REPLICAS]
        chosen.sort(key=lambda n: (lead[n.node_id], load[n.node_id], n.node_id))
        for n in chosen:
            load[n.node_id] += 1
        lead[chosen[0].node_id] += 1
        groups.append(GroupEntry(gid, [n.node_id for n in chosen]))
    return groups
