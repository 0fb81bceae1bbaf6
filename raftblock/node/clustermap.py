"""The layout of a local cluster (`raftblock cluster up`): which processes exist and where they listen.
The cluster map itself (volumes, extent -> group, group members and epochs, node states) lives in the
metadata group (raftblock/meta); this file only says how to reach it.

Rules:
1. Written by the first `cluster up`, atomically and fsynced; rewritten only to add a node (`node add`) or
   to move the NBD port of node 1's gateway (`cluster up --nbd-port` while it is stopped).
2. Extent ids are derived from the map: the extent with index i of a volume whose extent i lives in
   group g has id `g << 32 | i` (groups belong to one volume; the node runtime checks the group of an
   extent from its id).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raftblock.client.volume import VolumeInfo
from raftblock.ids import extent_id
from raftblock.meta.state import CLONE_DEPTH_MAX, MetaState, VolumeRecord
from raftblock.node.serve import write_json_atomic


@dataclass
class NodeEntry:
    node_id: int
    rack: str
    host: str
    port: int
    nbd_port: int = 0  # the NBD port of the gateway inside this node (gateway = "embedded"), 0 = none
    http_port: int = 0  # its /metrics (obs/metrics.py); 0 = none (clusters made before metrics)
    iscsi_port: int = 0  # the iSCSI port of the gateway inside this node (gateway = "embedded"), 0 = none


@dataclass
class ClusterMap:
    cluster_id: str
    nodes: list[NodeEntry]
    meta_admin: dict[str, str] = field(default_factory=dict)  # metadata node id -> admin "host:port"
    replication: str = "raft"  # the default of `volume create` (`cluster up --replication`)
    # "embedded": every storage node serves NBD itself (node/gateway.py inside the node, leader affinity);
    # "separate": one `raftblock gateway` process (DIR/nodes/gateway.toml). Absent in clusters made before.
    gateway: str = "separate"
    meta_http: dict[str, str] = field(default_factory=dict)  # metadata node id -> "host:port" (/metrics, status page)
    gateway_http: int = 0  # the separate gateway's /metrics port (0 = none)
    gateway_iscsi: int = 0  # the separate gateway's iSCSI port (0 = none)
    tls: bool = False  # `cluster up --tls`: DIR/tls holds a lab CA and certificates; NBD needs STARTTLS

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> ClusterMap:
        raw = json.loads(path.read_text())
        return cls(
            cluster_id=raw["cluster_id"],
            nodes=[NodeEntry(**n) for n in raw["nodes"]],
            meta_admin=dict(raw.get("meta_admin", {})),
            replication=str(raw.get("replication", "raft")),
            gateway=str(raw.get("gateway", "separate")),
            meta_http=dict(raw.get("meta_http", {})),
            gateway_http=int(raw.get("gateway_http", 0)),
            gateway_iscsi=int(raw.get("gateway_iscsi", 0)),
            tls=bool(raw.get("tls", False)),
        )

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    # --- queries ------------------------------------------------------------------------------
    def node(self, node_id: int) -> NodeEntry:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def peers(self) -> dict[int, tuple[str, int]]:
        return {n.node_id: (n.host, n.port) for n in self.nodes}


def registered_nodes(st: MetaState) -> list[NodeEntry]:
    """The storage nodes as they registered with the metadata group (address, rack), by id: the layout of a
    cluster known only through its map (a deployed cluster's CLI, the status page)."""
    out = []
    for n in sorted(st.nodes.values(), key=lambda n: n.node_id):
        host, _, port = n.address.rpartition(":")
        out.append(NodeEntry(int(n.node_id), n.rack, host.strip("[]"), int(port)))
    return out


def volume_infos(st: MetaState, states: tuple[str, ...] = ("ready",)) -> list[VolumeInfo]:
    """The data path's view of the volumes of the metadata map in one of `states` (a volume being restored
    or whose restore failed is not served). A clone's info carries its parent's, for the read-through."""
    def info(v: VolumeRecord, depth: int = 0) -> VolumeInfo:
        parent = st.volume_by_id(v.parent_volume_id) if v.parent_volume_id else None
        return VolumeInfo(v.name, v.volume_id, v.size_bytes, v.extent_size_bytes,
                          tuple(extent_id(int(g), i) for i, g in enumerate(v.extent_groups)),
                          parent=info(parent, depth + 1) if parent is not None and depth < CLONE_DEPTH_MAX else None,
                          parent_snap_id=v.parent_snap_id if parent is not None else 0,
                          parent_size_bytes=snap.size_bytes if parent is not None and (
                              snap := st.snapshots.get(v.parent_snap_id)) is not None else 0,
                          lazy_source=v.lazy_source, qos=v.qos(), seal=v.seal())

    return [info(v) for v in sorted(st.volumes.values(), key=lambda v: v.name) if v.state in states]
