# The metadata state machine: the cluster map and the commands that change it. Pure: no I/O, no clock,
# no pysyncobj (group.py replicates it).
#
# Rules:
# 1. A command is a frozen dataclass with a JSON encoding (`encode_command`/`decode_command`); nothing is
#    pickled. Time is a field of the command (`now_ms`, set by the proposer), never read here.
# 2. `apply` is deterministic and total: the same state and command give the same state and result on
#    every replica, and a refused command (bad input, conflict) returns an error Result and changes
#    nothing; it never raises (an exception inside pysyncobj's apply loop would re-apply forever).
# 3. Snapshots are JSON with sorted keys: `to_json(from_json(s)) == s`.
# 4. Node liveness heartbeats are not commands; only state transitions (up/suspect/down) are.
# 5. Exclusive attach with fencing: a volume has at most one gateway; each attach bumps its
#    `attach_epoch`; a call carrying an older epoch (a stale gateway) is refused with `stale_epoch`.
# 6. An extent group's `epoch` is its configuration version: every member change bumps it, and a change
#    must name the epoch it expects (compare-and-set), so two repairers cannot both win.
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from raftblock.meta.placement import (
    EXTENT_SIZE_BYTES_DEFAULT,
    EXTENTS_PER_GROUP_MAX_DEFAULT,
    REPLICAS_DEFAULT,
    NodeView,
    PlacementError,
    extent_count,
    leader_counts_of,
    place,
)
from raftblock.qos import QosSpec
from raftblock.replication.raft.types import GroupId, NodeId
from raftblock.sealing import EPOCH_MAX as SEAL_EPOCH_MAX
from raftblock.sealing import SealRef, data_blocks
from raftblock.units import format_size
from raftblock.wire.auth import DataKeys

NodeState = Literal["up", "suspect", "down"]
ReplicationMode = Literal["raft", "chain"]
NODE_STATES: tuple[str, ...] = ("up", "suspect", "down")
MODES: tuple[str, ...] = ("raft", "chain")

VOLUME_NAME_BYTES_MAX = 64
CHAP_SECRET_BYTES_MIN = 12
CHAP_FIELD_BYTES_MAX = 255
RESERVATION_BYTES_MAX = 64 << 10
GROUPS_PER_NODE_MAX = 512  # extent-group replicas one node runs; placement refuses a volume past it (a 4-node demo
# on one 2-core machine was saturated by ~2,300 per node: issue 14 re-read)
VOLUME_SIZE_BYTES_MAX = 4 << 40  # 4 TiB: 65536 extents of 64 MiB, each listed in the map
CLONE_DEPTH_MAX = 8  # a clone of a clone ... reads through at most this many volumes (flatten to go deeper)
GROUP_MEMBERS_MAX = 7
STATE_CHANGES_PER_COMMAND_MAX = 256
BLOCK_SIZE = 4096


# ---------------------------------------------------------------------------------------------- records


@dataclass
class NodeRecord:
    node_id: NodeId
    rack: str
    address: str  # data-plane address host:port; ids are not addresses
    capacity_bytes: int
    reserved_bytes: int = 0  # sum over the groups it is a member of: extents x extent size
    state: NodeState = "up"
    state_since_ms: int = 0
    last_heartbeat_ms: int = 0  # as known when the last transition was committed (heartbeats are not logged)
    returns: int = 0  # times it came back up from suspect/down
    registered_ms: int = 0
    disk_id: str = ""  # the identity of its data directory (made with it); "" = not told
    draining: bool = False  # `node drain`: its replicas move elsewhere; nothing new is placed on it
    http: str = ""  # its /metrics "host:port" ("" = none told)


@dataclass
class VolumeRecord:
    name: str
    volume_id: int
    size_bytes: int
    mode: ReplicationMode
    created_ms: int
    extent_size_bytes: int
    extent_groups: list[GroupId]  # extent index -> extent group
    # QoS (raftblock/qos.py QosSpec; `volume create|set-qos`): limits (0 = none) with their bursts (bucket
    # depths, 0 = one second of the limit), a reservation (min IOPS) and a weight
    qos_iops_max: int = 0
    qos_bytes_per_s_max: int = 0
    qos_burst_iops: int = 0
    qos_burst_bytes: int = 0
    qos_min_iops: int = 0
    qos_weight: int = 1
    # "ready" (served), "restoring" (being filled from a backup: not served, docs/snapshots.md section 5),
    # "failed" (a restore that did not complete: not served, kept for the operator to delete)
    state: str = "ready"
    # A clone reads the blocks it never wrote from this snapshot of that volume (0: not a clone)
    parent_volume_id: int = 0
    parent_snap_id: int = 0
    origin: str = ""  # where a restored volume comes from (URL, volume@snapshot): a re-run resumes only that
    # A lazy restore still filling (docs/snapshots.md section 5): "URL#VOLUME@SNAPSHOT"; gateways fetch a chunk
    # not filled yet before reading it. Cleared when the background fill is complete.
    lazy_source: str = ""
    # Encryption at rest (raftblock/sealing.py, docs/encryption.md): the key id (0 = not encrypted; the volume
    # whose creation made the key, a clone shares its parent's), its data key wrapped by master key `enc_master`
    enc_key_id: int = 0
    enc_key: str = ""
    enc_master: int = 0

    def qos(self) -> QosSpec:
        return QosSpec(self.qos_iops_max, self.qos_bytes_per_s_max, self.qos_burst_iops, self.qos_burst_bytes,
                       self.qos_min_iops, self.qos_weight)

    def seal(self) -> SealRef | None:
        return SealRef(self.enc_key_id, self.enc_master, self.enc_key) if self.enc_key_id else None

    def extent_data_bytes(self) -> int:
        """The volume bytes an extent holds (less than its size when encrypted: sealing.py rule 1)."""
        return extent_data_bytes(self.extent_size_bytes, bool(self.enc_key_id))


def extent_data_bytes(extent_size_bytes: int, encrypted: bool) -> int:
    return data_blocks(extent_size_bytes // BLOCK_SIZE) * BLOCK_SIZE if encrypted else extent_size_bytes


@dataclass
class GroupRecord:
    group_id: GroupId
    members: list[NodeId]  # members[0] = preferred leader (raft) / head (chain)
    epoch: int
    mode: ReplicationMode


@dataclass
class GatewayRecord:
    gateway_id: str
    address: str  # NBD host:port
    registered_ms: int
    node_id: int = 0  # the storage node it runs in (its leader affinity), 0 = a gateway machine of its own
    http: str = ""  # its /metrics "host:port" ("" = none told)
    admin: str = ""  # its admin port "host:port" (gateway/admin.py; "" = only its local unix socket)


@dataclass
class SnapshotRecord:
    """A volume snapshot (docs/snapshots.md section 3): `creating` until every group of the volume applied its
    SNAP op (then `ready`), `deleting` from the delete until every group applied UNSNAP (then gone)."""

    volume_id: int
    name: str
    snap_id: int
    created_ms: int
    state: str = "creating"
    size_bytes: int = 0  # the volume's size when it was taken (0 in records older than this field)


@dataclass
class IscsiAuth:
    """CHAP credentials of a volume's iSCSI target (gateway/iscsi.py rule 5): what an initiator proves (user,
    secret) and, for mutual CHAP, what the target proves back. Kept out of every status output."""

    user: str
    secret: str
    target_user: str = ""
    target_secret: str = ""


@dataclass
class Reservation:
    """A volume's SCSI persistent reservation state (gateway/scsi_pr.py), shared by every gateway: replaced
    only by a SetReservation naming the version it read (compare-and-set)."""

    version: int
    blob: str


@dataclass
class Attachment:
    gateway_id: str
    attach_epoch: int
    since_ms: int


@dataclass(frozen=True)
class Result:
    ok: bool
    error: str = ""  # machine-readable code when not ok
    message: str = ""
    value: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "message": self.message, "value": self.value}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        return cls(bool(d["ok"]), str(d.get("error", "")), str(d.get("message", "")), dict(d.get("value", {})))


def _ok(**value: Any) -> Result:
    return Result(True, value=value)


def _err(code: str, message: str) -> Result:
    return Result(False, code, message)


# ---------------------------------------------------------------------------------------------- commands


class CommandError(ValueError):
    """A command could not be decoded (bad JSON, unknown op, wrong field types)."""


@dataclass(frozen=True)
class Command:
    op: ClassVar[str] = ""


@dataclass(frozen=True)
class InitCluster(Command):
    op: ClassVar[str] = "init_cluster"
    cluster_id: str
    extent_size_bytes: int = EXTENT_SIZE_BYTES_DEFAULT
    extents_per_group_max: int = EXTENTS_PER_GROUP_MAX_DEFAULT
    replicas: int = REPLICAS_DEFAULT
    data_key: str = ""  # the first data key, wrapped (raftblock/wire/auth.py): the data port is authenticated


@dataclass(frozen=True)
class SetDataKey(Command):
    """Data-key rotation (raftblock/wire/auth.py rule 3): `add` a new version (one above the highest, wrapped),
    make a known version `active` (used for sending), or `retire` one that is not active."""

    op: ClassVar[str] = "set_data_key"
    action: str  # add | activate | retire
    version: int
    wrapped: str = ""


@dataclass(frozen=True)
class SetMasterKey(Command):
    """A new master key (sealing.py rule 5): version one above the highest, wrapped under the cluster secret,
    active at once, with every encrypted volume's data key rewrapped by it (`rewrapped`: JSON {volume id:
    wrapped key}, exactly the encrypted volumes); refused unless `expected` is still the active version."""

    op: ClassVar[str] = "set_master_key"
    expected: int
    version: int
    wrapped: str
    rewrapped: str = "{}"


@dataclass(frozen=True)
class NextSealEpoch(Command):
    """The next nonce epoch of a data key (sealing.py rule 3): every writing process takes its own."""

    op: ClassVar[str] = "next_seal_epoch"
    key_id: int


@dataclass(frozen=True)
class RegisterNode(Command):
    op: ClassVar[str] = "register_node"
    node_id: int
    rack: str
    address: str
    capacity_bytes: int
    now_ms: int
    disk_id: str = ""
    http: str = ""


@dataclass(frozen=True)
class RemoveNode(Command):
    """`raftblock node remove ID` (decommission): a node that holds no replica leaves the map."""

    op: ClassVar[str] = "remove_node"
    node_id: int


@dataclass(frozen=True)
class StateChange:
    node_id: int
    state: str
    last_heartbeat_ms: int


@dataclass(frozen=True)
class SetNodeStates(Command):
    """A batch of liveness transitions found by the failure detector on the leader."""

    op: ClassVar[str] = "set_node_states"
    changes: tuple[StateChange, ...]
    now_ms: int


@dataclass(frozen=True)
class SetNodeDrain(Command):
    """`raftblock node drain ID` (draining=True) / `node undrain ID` (False)."""

    op: ClassVar[str] = "set_node_drain"
    node_id: int
    draining: bool


@dataclass(frozen=True)
class CreateVolume(Command):
    op: ClassVar[str] = "create_volume"
    name: str
    size_bytes: int
    now_ms: int
    mode: str = "raft"
    qos_iops_max: int = 0
    qos_bytes_per_s_max: int = 0
    qos_burst_iops: int = 0
    qos_burst_bytes: int = 0
    qos_min_iops: int = 0
    qos_weight: int = 1
    state: str = "ready"  # "restoring": a restore target, not served until SetVolumeState makes it ready
    parent: str = ""  # a clone: "VOLUME@SNAPSHOT" (a ready snapshot; the clone is at least its size)
    origin: str = ""
    lazy_source: str = ""  # a lazy restore: served at once, chunks fetched on demand (VolumeRecord.lazy_source)
    # encrypted (sealing.py): a new data key wrapped by the active master key, its version and its key id (random,
    # unique: bound into the wrapping and into every block's associated data); a clone gets its parent's instead
    encrypt_key: str = ""
    encrypt_master: int = 0
    encrypt_key_id: int = 0


@dataclass(frozen=True)
class SetVolumeState(Command):
    """A restore target becomes `ready` or `failed` (only from `expected`); `detach_parent`: a flattened clone
    no longer reads through to its parent snapshot."""

    op: ClassVar[str] = "set_volume_state"
    name: str
    state: str = ""
    expected: str = ""
    detach_parent: bool = False
    lazy_done: bool = False  # a lazy restore's fill is complete: reads no longer fetch


@dataclass(frozen=True)
class ResizeVolume(Command):
    """Grow a volume (new extents in new groups, placed as at creation) or, with `allow_shrink`, shrink it (its
    last extents go; groups no volume uses any more are removed). Shrinking is refused while the volume is
    attached or has snapshots or clones; the caller trims the bytes past the new size first."""

    op: ClassVar[str] = "resize_volume"
    name: str
    size_bytes: int
    allow_shrink: bool = False


@dataclass(frozen=True)
class DeleteVolume(Command):
    op: ClassVar[str] = "delete_volume"
    name: str


@dataclass(frozen=True)
class Attach(Command):
    op: ClassVar[str] = "attach"
    volume: str
    gateway_id: str
    now_ms: int
    force: bool = False


@dataclass(frozen=True)
class Detach(Command):
    op: ClassVar[str] = "detach"
    volume: str
    gateway_id: str
    attach_epoch: int


@dataclass(frozen=True)
class RegisterGateway(Command):
    """A gateway announces itself (id, NBD address) when it starts: `volume attach --gateway` names one."""

    op: ClassVar[str] = "register_gateway"
    gateway_id: str
    address: str
    now_ms: int
    node_id: int = 0  # a gateway inside this storage node (node/agent.py rule 6: leader affinity)
    http: str = ""
    admin: str = ""


@dataclass(frozen=True)
class RenameVolume(Command):
    """A new name for a detached volume; its id, groups and attach epochs stay (nodes fence by epoch)."""

    op: ClassVar[str] = "rename_volume"
    name: str
    new_name: str


@dataclass(frozen=True)
class SetGroupMembers(Command):
    op: ClassVar[str] = "set_group_members"
    group_id: int
    members: tuple[int, ...]
    expected_epoch: int


@dataclass(frozen=True)
class CreateSnapshot(Command):
    """Name a new snapshot of a volume and hand out its cluster-wide snap_id (state `creating`)."""

    op: ClassVar[str] = "create_snapshot"
    volume: str
    name: str
    now_ms: int


@dataclass(frozen=True)
class SetSnapshotState(Command):
    """`ready` once every group applied SNAP; `deleting` when a delete starts; `gone` once every group applied
    UNSNAP (the record is dropped)."""

    op: ClassVar[str] = "set_snapshot_state"
    volume: str
    name: str
    state: str


@dataclass(frozen=True)
class SetIscsiAuth(Command):
    """CHAP for a volume's iSCSI target (`volume` "" = discovery sessions); an empty `user` removes it."""

    op: ClassVar[str] = "set_iscsi_auth"
    volume: str
    user: str = ""
    secret: str = ""
    target_user: str = ""
    target_secret: str = ""


@dataclass(frozen=True)
class SetQos(Command):
    """A volume's QoS, all of it (raftblock/qos.py QosSpec); the CLI fills what it was not told from the map."""

    op: ClassVar[str] = "set_qos"
    name: str
    iops_max: int = 0
    bytes_per_s_max: int = 0
    burst_iops: int = 0
    burst_bytes: int = 0
    min_iops: int = 0
    weight: int = 1

    def spec(self) -> QosSpec:
        return QosSpec(self.iops_max, self.bytes_per_s_max, self.burst_iops, self.burst_bytes, self.min_iops,
                       self.weight)


@dataclass(frozen=True)
class SetReservation(Command):
    """Replace the persistent reservation state of a volume if it is still at `expected_version`."""

    op: ClassVar[str] = "set_reservation"
    volume_id: int
    expected_version: int
    blob: str


@dataclass(frozen=True)
class Noop(Command):
    """Changes nothing; committing one is a read barrier (a linearizable read point)."""

    op: ClassVar[str] = "noop"


COMMANDS: dict[str, type[Command]] = {
    c.op: c
    for c in (InitCluster, RegisterNode, SetNodeStates, CreateVolume, DeleteVolume, Attach, Detach,
              SetGroupMembers, Noop, SetNodeDrain, RenameVolume, RegisterGateway, CreateSnapshot, SetSnapshotState,
              SetVolumeState, ResizeVolume, RemoveNode, SetIscsiAuth, SetReservation, SetQos, SetDataKey,
              SetMasterKey, NextSealEpoch)
}


def encode_command(cmd: Command) -> str:
    d = asdict(cmd)
    d["op"] = cmd.op
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _check(value: Any, typ: type, name: str) -> Any:
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CommandError(f"{name}: expected an integer, got {value!r}")
    if typ is not int and not isinstance(value, typ):
        raise CommandError(f"{name}: expected {typ.__name__}, got {value!r}")
    return value


def command_from_dict(d: Any) -> Command:
    if not isinstance(d, dict):
        raise CommandError("a command is a JSON object")
    cls = COMMANDS.get(d.get("op", ""))
    if cls is None:
        raise CommandError(f"unknown op {d.get('op')!r}; known: {sorted(COMMANDS)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name == "changes":
            if not isinstance(v, list) or len(v) > STATE_CHANGES_PER_COMMAND_MAX:
                raise CommandError(f"changes: a list of at most {STATE_CHANGES_PER_COMMAND_MAX}")
            kwargs[f.name] = tuple(
                StateChange(_check(c.get("node_id"), int, "node_id"), _check(c.get("state"), str, "state"),
                            _check(c.get("last_heartbeat_ms"), int, "last_heartbeat_ms"))
                if isinstance(c, dict) else _bad(c)
                for c in v
            )
        elif f.name == "members":
            if not isinstance(v, list):
                raise CommandError("members: a list of node ids")
            kwargs[f.name] = tuple(_check(m, int, "members[]") for m in v)
        else:
            typ = {"int": int, "str": str, "bool": bool}[str(f.type)]
            kwargs[f.name] = _check(v, typ, f.name)
    unknown = set(d) - {f.name for f in fields(cls)} - {"op"}
    if unknown:
        raise CommandError(f"{cls.op}: unknown fields {sorted(unknown)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CommandError(f"{cls.op}: {e}") from None


def _bad(c: Any) -> StateChange:
    raise CommandError(f"changes[]: expected an object, got {c!r}")


def decode_command(text: str | bytes) -> Command:
    try:
        d = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CommandError(f"not JSON: {e}") from None
    return command_from_dict(d)


# ---------------------------------------------------------------------------------------------- the state


class MetaState:
    """The cluster map. Mutated only through `apply`."""

    def __init__(self) -> None:
        self.cluster_id = ""
        self.extent_size_bytes = EXTENT_SIZE_BYTES_DEFAULT
        self.extents_per_group_max = EXTENTS_PER_GROUP_MAX_DEFAULT
        self.replicas = REPLICAS_DEFAULT
        self.nodes: dict[NodeId, NodeRecord] = {}
        self.volumes: dict[str, VolumeRecord] = {}
        self.groups: dict[GroupId, GroupRecord] = {}
        self.attachments: dict[str, Attachment] = {}  # volume name -> current attachment
        self.attach_epochs: dict[str, int] = {}  # volume name -> last attach epoch (kept across detach)
        self.gateways: dict[str, GatewayRecord] = {}  # gateway id -> its last registration
        self.next_volume_id = 1
        self.next_group_id = 1
        self.snapshots: dict[int, SnapshotRecord] = {}  # snap_id -> record
        self.next_snap_id = 1
        self.iscsi_auth: dict[int, IscsiAuth] = {}  # volume id (0: discovery) -> CHAP of its iSCSI target
        self.reservations: dict[int, Reservation] = {}  # volume id -> SCSI persistent reservations
        # the data port's keys (raftblock/wire/auth.py): version -> key wrapped under the cluster secret
        self.data_keys: dict[int, str] = {}
        self.data_key_active = 0  # 0: no keys (a cluster made before them): the data port is not authenticated
        self.master_keys: dict[int, str] = {}  # encryption at rest (sealing.py rule 5): version -> wrapped
        self.master_key_active = 0
        self.seal_epochs: dict[int, int] = {}  # key id -> last nonce epoch handed out (rule 3)
        self.applied = 0  # commands applied (including refused ones): a cheap change counter

    # -- apply ------------------------------------------------------------------------------------------

    def apply(self, cmd: Command) -> Result:
        self.applied += 1
        handler = getattr(self, "_apply_" + cmd.op)
        try:
            result: Result = handler(cmd)
        except PlacementError as e:
            return _err("placement", str(e))
        return result

    def apply_encoded(self, text: str | bytes) -> Result:
        try:
            cmd = decode_command(text)
        except CommandError as e:
            self.applied += 1
            return _err("bad_command", str(e))
        return self.apply(cmd)

    def _apply_noop(self, cmd: Noop) -> Result:
        return _ok()

    def _apply_init_cluster(self, cmd: InitCluster) -> Result:
        if self.cluster_id:
            if self.cluster_id == cmd.cluster_id:
                return _ok(cluster_id=self.cluster_id)
            return _err("cluster_id", f"cluster is {self.cluster_id!r}, not {cmd.cluster_id!r}")
        if not cmd.cluster_id:
            return _err("invalid", "cluster_id must not be empty")
        if cmd.extent_size_bytes <= 0 or cmd.extent_size_bytes % BLOCK_SIZE:
            return _err("invalid", f"extent_size_bytes must be a positive multiple of {BLOCK_SIZE}")
        if cmd.extents_per_group_max < 1 or not 1 <= cmd.replicas <= GROUP_MEMBERS_MAX:
            return _err("invalid", "extents_per_group_max >= 1 and 1 <= replicas <= 7")
        self.cluster_id = cmd.cluster_id
        self.extent_size_bytes = cmd.extent_size_bytes
        self.extents_per_group_max = cmd.extents_per_group_max
        self.replicas = cmd.replicas
        if cmd.data_key:
            self.data_keys = {1: cmd.data_key}
            self.data_key_active = 1
        return _ok(cluster_id=self.cluster_id)

    def _apply_set_data_key(self, cmd: SetDataKey) -> Result:
        v = cmd.version
        if cmd.action == "add":
            if v != max(self.data_keys, default=0) + 1 or not cmd.wrapped:
                return _err("invalid", f"a new data key is version {max(self.data_keys, default=0) + 1}, wrapped")
            self.data_keys[v] = cmd.wrapped
            if not self.data_key_active:  # the first key of a cluster made before keys existed: used at once
                self.data_key_active = v
        elif cmd.action == "activate":
            if v not in self.data_keys:
                return _err("unknown_key", f"no data key {v} (known: {sorted(self.data_keys)})")
            self.data_key_active = v
        elif cmd.action == "retire":
            if v not in self.data_keys:
                return _err("unknown_key", f"no data key {v} (known: {sorted(self.data_keys)})")
            if v == self.data_key_active:
                return _err("invalid", f"data key {v} is the active one: activate another first")
            del self.data_keys[v]
        else:
            return _err("invalid", f"action {cmd.action!r}: add, activate or retire")
        return _ok(versions=sorted(self.data_keys), active=self.data_key_active)

    def data_key_set(self) -> DataKeys:
        return DataKeys(dict(self.data_keys), self.data_key_active)

    def _apply_set_master_key(self, cmd: SetMasterKey) -> Result:
        if cmd.expected != self.master_key_active:
            return _err("stale_master", f"the active master key is {self.master_key_active}, not {cmd.expected}")
        want = max(self.master_keys, default=0) + 1
        if cmd.version != want or not cmd.wrapped:
            return _err("invalid", f"a new master key is version {want}, wrapped")
        try:
            rewrapped = json.loads(cmd.rewrapped)
        except ValueError:
            rewrapped = None
        encrypted = {str(v.volume_id) for v in self.volumes.values() if v.enc_key_id}
        if not isinstance(rewrapped, dict) or set(rewrapped) != encrypted or \
                not all(isinstance(w, str) and w for w in rewrapped.values()):
            return _err("stale_master", "rewrapped must hold exactly the encrypted volumes' keys "
                        f"({len(encrypted)} now)")
        self.master_keys[cmd.version] = cmd.wrapped
        self.master_key_active = cmd.version
        for v in self.volumes.values():
            if v.enc_key_id:
                v.enc_key = rewrapped[str(v.volume_id)]
                v.enc_master = cmd.version
        return _ok(version=cmd.version, volumes=len(encrypted))

    def _apply_next_seal_epoch(self, cmd: NextSealEpoch) -> Result:
        if not any(v.enc_key_id == cmd.key_id for v in self.volumes.values()) or cmd.key_id <= 0:
            return _err("unknown_key", f"no encrypted volume has key id {cmd.key_id}")
        epoch = self.seal_epochs.get(cmd.key_id, 0) + 1
        if epoch > SEAL_EPOCH_MAX:
            return _err("exhausted", f"key id {cmd.key_id} used its {SEAL_EPOCH_MAX} nonce epochs")
        self.seal_epochs[cmd.key_id] = epoch
        return _ok(epoch=epoch)

    def _apply_register_node(self, cmd: RegisterNode) -> Result:
        nid = NodeId(cmd.node_id)
        if cmd.node_id <= 0 or not cmd.rack or not cmd.address or cmd.capacity_bytes < 0:
            return _err("invalid", "node_id > 0, rack and address non-empty, capacity_bytes >= 0")
        old = self.nodes.get(nid)
        if old is None:
            self.nodes[nid] = NodeRecord(nid, cmd.rack, cmd.address, cmd.capacity_bytes,
                                         state_since_ms=cmd.now_ms, last_heartbeat_ms=cmd.now_ms,
                                         registered_ms=cmd.now_ms, disk_id=cmd.disk_id, http=cmd.http)
            return _ok(node_id=cmd.node_id, new=True)
        if old.rack != cmd.rack and any(nid in g.members for g in self.groups.values()):
            return _err("rack_change", f"node {cmd.node_id} is in rack {old.rack!r} and holds replicas; "
                        f"it cannot move to {cmd.rack!r}")
        old.rack, old.address, old.capacity_bytes, old.http = cmd.rack, cmd.address, cmd.capacity_bytes, cmd.http
        removed: list[int] = []
        if cmd.disk_id and old.disk_id and cmd.disk_id != old.disk_id:
            # A new disk: the node lost whatever its groups' members must hold, and its place in them. It
            # leaves every group it is in (epoch + 1; never the last member), before it can act in one
            # again: a chain's repair adds it back at the tail, where it copies the data; a Raft group's
            # leader removes it from the configuration (a voter that forgot its log and its votes must not
            # vote) and the Raft repair adds a node back, which joins with an empty log.
            for gid, g in sorted(self.groups.items()):
                if nid in g.members and len(g.members) > 1:
                    per_member = self._group_bytes(gid)
                    g.members = [m for m in g.members if m != nid]
                    g.epoch += 1
                    old.reserved_bytes -= per_member
                    removed.append(int(gid))
        if cmd.disk_id:
            old.disk_id = cmd.disk_id
        return _ok(node_id=cmd.node_id, new=False, left_groups=removed)

    # -- snapshots (docs/snapshots.md section 3) -----------------------------------------------------------

    def snapshot_of(self, volume: str, name: str) -> SnapshotRecord | None:
        v = self.volumes.get(volume)
        if v is None:
            return None
        return next((r for r in self.snapshots.values() if r.volume_id == v.volume_id and r.name == name), None)

    def _apply_create_snapshot(self, cmd: CreateSnapshot) -> Result:
        v = self.volumes.get(cmd.volume)
        if v is None:
            return _err("unknown_volume", f"no volume {cmd.volume!r}")
        if not valid_volume_name(cmd.name):
            return _err("invalid", f"snapshot name {cmd.name!r}: letters, digits, '.', '_' and '-'")
        if self.snapshot_of(cmd.volume, cmd.name) is not None:
            return _err("exists", f"volume {cmd.volume!r} already has a snapshot {cmd.name!r}")
        sid = self.next_snap_id
        self.next_snap_id += 1
        self.snapshots[sid] = SnapshotRecord(v.volume_id, cmd.name, sid, cmd.now_ms, size_bytes=v.size_bytes)
        return _ok(snap_id=sid, groups=[int(g) for g in dict.fromkeys(v.extent_groups)])

    def _apply_set_snapshot_state(self, cmd: SetSnapshotState) -> Result:
        r = self.snapshot_of(cmd.volume, cmd.name)
        if r is None:
            return _err("unknown_snapshot", f"volume {cmd.volume!r} has no snapshot {cmd.name!r}")
        allowed = {"creating": ("ready", "deleting"), "ready": ("deleting",), "deleting": ("gone",)}
        if cmd.state not in allowed[r.state]:
            return _err("invalid", f"snapshot {cmd.name!r} is {r.state}: it cannot become {cmd.state}")
        clones = self.clones_of(r.volume_id, r.snap_id)
        if cmd.state == "deleting" and clones:
            return _err("has_clones", f"snapshot {cmd.volume}@{cmd.name} has clones reading through to it: "
                        f"{', '.join(clones)} (volume flatten or delete them first)")
        if cmd.state == "gone":
            del self.snapshots[r.snap_id]
        else:
            r.state = cmd.state
        return _ok(snap_id=r.snap_id, state=cmd.state)

    def _apply_set_node_drain(self, cmd: SetNodeDrain) -> Result:
        n = self.nodes.get(NodeId(cmd.node_id))
        if n is None:
            return _err("unknown_node", f"node {cmd.node_id} is not registered")
        n.draining = bool(cmd.draining)
        left = sum(1 for g in self.groups.values() if n.node_id in g.members)
        return _ok(node_id=cmd.node_id, draining=n.draining, groups=left)

    def _apply_remove_node(self, cmd: RemoveNode) -> Result:
        n = self.nodes.get(NodeId(cmd.node_id))
        if n is None:
            return _err("unknown_node", f"node {cmd.node_id} is not registered")
        held = sorted(int(gid) for gid, g in self.groups.items() if n.node_id in g.members)
        if held:
            return _err("not_drained", f"node {cmd.node_id} still holds replicas of {len(held)} groups "
                        f"({', '.join(map(str, held[:8]))}{', ...' if len(held) > 8 else ''}): drain it first "
                        f"(raftblock node drain {cmd.node_id} --wait)")
        del self.nodes[NodeId(cmd.node_id)]
        return _ok(node_id=cmd.node_id)

    def _apply_set_node_states(self, cmd: SetNodeStates) -> Result:
        for c in cmd.changes:
            if NodeId(c.node_id) not in self.nodes:
                return _err("unknown_node", f"node {c.node_id} is not registered")
            if c.state not in NODE_STATES:
                return _err("invalid", f"state {c.state!r} is not one of {NODE_STATES}")
        changed = []
        for c in cmd.changes:
            n = self.nodes[NodeId(c.node_id)]
            n.last_heartbeat_ms = max(n.last_heartbeat_ms, c.last_heartbeat_ms)
            if n.state == c.state:
                continue
            if c.state == "up":
                n.returns += 1
            n.state = c.state  # type: ignore[assignment]
            n.state_since_ms = cmd.now_ms
            changed.append(c.node_id)
        return _ok(changed=changed)

    def _apply_create_volume(self, cmd: CreateVolume) -> Result:
        if not self.cluster_id:
            return _err("not_initialised", "the cluster has no id yet (init_cluster first)")
        if not valid_volume_name(cmd.name):
            return _err("invalid", f"volume name {cmd.name!r}: 1-{VOLUME_NAME_BYTES_MAX} of [A-Za-z0-9._-]")
        if cmd.name in self.volumes:
            return _err("exists", f"volume {cmd.name!r} exists")
        if cmd.mode not in MODES:
            return _err("invalid", f"mode {cmd.mode!r} is not one of {MODES}")
        if cmd.size_bytes <= 0 or cmd.size_bytes % BLOCK_SIZE or cmd.size_bytes > VOLUME_SIZE_BYTES_MAX:
            return _err("invalid", f"a volume's size must be a positive multiple of 4KiB, "
                        f"at most {format_size(VOLUME_SIZE_BYTES_MAX)}")
        problem = QosSpec(cmd.qos_iops_max, cmd.qos_bytes_per_s_max, cmd.qos_burst_iops, cmd.qos_burst_bytes,
                          cmd.qos_min_iops, cmd.qos_weight).problem()
        if problem:
            return _err("invalid", f"QoS: {problem}")
        if cmd.state not in ("ready", "restoring"):
            return _err("invalid", f"a new volume is ready or restoring, not {cmd.state!r}")
        if cmd.lazy_source and (cmd.state != "ready" or cmd.parent):
            return _err("invalid", "a lazy restore is a ready volume without a parent")
        parent: SnapshotRecord | None = None
        if cmd.parent:
            pvol, _, psnap = cmd.parent.partition("@")
            if pvol not in self.volumes:
                return _err("unknown_volume", f"no volume {pvol!r}")
            parent = self.snapshot_of(pvol, psnap)
            if parent is None or parent.state != "ready":
                return _err("unknown_snapshot", f"volume {pvol!r} has no ready snapshot {psnap!r}")
            if cmd.size_bytes < (parent.size_bytes or self.volumes[pvol].size_bytes):
                return _err("invalid", f"a clone of {cmd.parent} is at least its size")
            depth, up = 1, self.volumes[pvol]
            while up.parent_volume_id and (nxt := self.volume_by_id(up.parent_volume_id)) is not None:
                depth, up = depth + 1, nxt
            if depth >= CLONE_DEPTH_MAX:
                return _err("invalid", f"{pvol} is a clone {depth - 1} levels deep: flatten it before cloning it "
                            f"again (at most {CLONE_DEPTH_MAX - 1} levels)")
        key_id, key, master = 0, "", 0
        if parent is not None:  # a clone reads its parent's blocks: it shares the parent's key (sealing.py)
            if cmd.encrypt_key:
                return _err("invalid", "a clone of an encrypted volume is encrypted with its parent's key")
            pv = self.volume_by_id(parent.volume_id)
            if pv is not None and pv.enc_key_id:
                key_id, key, master = pv.enc_key_id, pv.enc_key, pv.enc_master
        elif cmd.encrypt_key:
            if not self.master_key_active or cmd.encrypt_master != self.master_key_active:
                return _err("stale_master", f"the active master key is {self.master_key_active}, not "
                            f"{cmd.encrypt_master}: wrap the volume's key again")
            # A key id in use is the same key again (a restored backup of an encrypted volume): the nonce epochs
            # stay per key id, so the two volumes never share a nonce (sealing.py rule 3)
            if not 0 < cmd.encrypt_key_id < 1 << 63:
                return _err("invalid", f"key id {cmd.encrypt_key_id}: 1..2^63-1")
            key_id, key, master = cmd.encrypt_key_id, cmd.encrypt_key, cmd.encrypt_master
        placed = self._place(cmd.name, extent_count(cmd.size_bytes, extent_data_bytes(self.extent_size_bytes,
                                                                                      bool(key_id)))
                             * self.extent_size_bytes, cmd.mode)
        if isinstance(placed, Result):
            return placed
        mapping, group_ids = placed
        vid = self.next_volume_id
        self.next_volume_id += 1
        self.volumes[cmd.name] = VolumeRecord(cmd.name, vid, cmd.size_bytes, cmd.mode,  # type: ignore[arg-type]
                                              cmd.now_ms, self.extent_size_bytes, mapping,
                                              cmd.qos_iops_max, cmd.qos_bytes_per_s_max, cmd.qos_burst_iops,
                                              cmd.qos_burst_bytes, cmd.qos_min_iops, cmd.qos_weight, state=cmd.state,
                                              parent_volume_id=parent.volume_id if parent else 0,
                                              parent_snap_id=parent.snap_id if parent else 0, origin=cmd.origin,
                                              lazy_source=cmd.lazy_source, enc_key_id=key_id, enc_key=key,
                                              enc_master=master)
        return _ok(volume_id=vid, groups=group_ids)

    def _place(self, name: str, size_bytes: int, mode: str) -> tuple[list[GroupId], list[int]] | Result:
        """New extent groups for `size_bytes` of volume `name`: the extent -> group mapping of those bytes
        (indexes from 0) and the new groups' ids; a Result when refused."""
        views = [NodeView(n.node_id, n.rack, n.state == "up" and not n.draining, n.capacity_bytes, n.reserved_bytes)
                 for n in self.nodes.values()]
        plans = place(views, size_bytes, extent_size_bytes=self.extent_size_bytes,
                      extents_per_group_max=self.extents_per_group_max, replicas=self.replicas,
                      leader_counts=leader_counts_of(g.members for g in self.groups.values()))
        # Each replica is a Raft or chain group the node runs on one event loop: past a few hundred
        # idle groups per node, ticks and heartbeats alone saturate a core (GROUPS_PER_NODE_MAX).
        # A volume that would put more than GROUPS_PER_NODE_MAX on a node is refused before it exists.
        per_node = {m: 0 for m in self.nodes}
        for g in self.groups.values():
            for m in g.members:
                if m in per_node:
                    per_node[m] += 1
        for p in plans:
            for m in p.members:
                per_node[m] += 1
        over = sorted(int(m) for m, n in per_node.items() if n > GROUPS_PER_NODE_MAX)
        if over:
            return _err("too_many_groups",
                        f"volume {name!r} needs {len(plans)} extent groups ({format_size(self.extents_per_group_max * self.extent_size_bytes)} "
                        f"each); nodes {over} would host more than {GROUPS_PER_NODE_MAX} groups: add nodes, or make "
                        f"it smaller (about {format_size(self._room_bytes())} fits now)")
        extents = sum(len(p.extents) for p in plans)
        mapping: list[GroupId] = [GroupId(0)] * extents
        group_ids = []
        for p in plans:
            gid = GroupId(self.next_group_id)
            self.next_group_id += 1
            self.groups[gid] = GroupRecord(gid, list(p.members), 1, mode)  # type: ignore[arg-type]
            for m in p.members:
                self.nodes[m].reserved_bytes += len(p.extents) * self.extent_size_bytes
            for e in p.extents:
                mapping[e] = gid
            group_ids.append(int(gid))
        return mapping, group_ids

    def _apply_resize_volume(self, cmd: ResizeVolume) -> Result:
        v = self.volumes.get(cmd.name)
        if v is None:
            return _err("unknown_volume", f"no volume {cmd.name!r}")
        if cmd.size_bytes <= 0 or cmd.size_bytes % BLOCK_SIZE or cmd.size_bytes > VOLUME_SIZE_BYTES_MAX:
            return _err("invalid", f"a volume's size must be a positive multiple of 4KiB, "
                        f"at most {format_size(VOLUME_SIZE_BYTES_MAX)}")
        if cmd.size_bytes == v.size_bytes:
            return _ok(size_bytes=v.size_bytes, groups=[], removed_groups=[])
        old_extents = len(v.extent_groups)
        new_extents = -(-cmd.size_bytes // v.extent_data_bytes())
        if cmd.size_bytes < v.size_bytes:
            if not cmd.allow_shrink:
                return _err("shrink", f"volume {cmd.name!r} is {format_size(v.size_bytes)}: shrinking to "
                            f"{format_size(cmd.size_bytes)} loses the data past it (allow_shrink)")
            if cmd.name in self.attachments:
                return _err("attached", f"volume {cmd.name!r} is attached by gateway "
                            f"{self.attachments[cmd.name].gateway_id!r}: shrink it detached")
            if any(r.volume_id == v.volume_id for r in self.snapshots.values()) or self.clones_of(v.volume_id):
                return _err("has_snapshots", f"volume {cmd.name!r} has snapshots or clones: they keep its "
                            f"size (delete them first)")
            dropped = v.extent_groups[new_extents:]
            v.extent_groups = v.extent_groups[:new_extents]
            v.size_bytes = cmd.size_bytes
            return _ok(size_bytes=v.size_bytes, groups=[], removed_groups=self._release_extents(dropped, v))
        group_ids: list[int] = []
        if new_extents > old_extents:
            placed = self._place(cmd.name, (new_extents - old_extents) * v.extent_size_bytes, v.mode)
            if isinstance(placed, Result):
                return placed
            mapping, group_ids = placed
            v.extent_groups = [*v.extent_groups, *mapping]
        v.size_bytes = cmd.size_bytes
        return _ok(size_bytes=v.size_bytes, groups=group_ids, removed_groups=[])

    def _release_extents(self, extent_groups: list[GroupId], vol: VolumeRecord) -> list[int]:
        """Give back the reservations of these extents of `vol`; remove the groups no volume uses any more."""
        still_used = {g for v in self.volumes.values() for g in v.extent_groups}
        per_group: dict[GroupId, int] = {}
        for g in extent_groups:
            per_group[g] = per_group.get(g, 0) + 1
        removed = []
        for gid, count in sorted(per_group.items()):
            grp = self.groups.get(gid)
            if grp is None:
                continue
            for m in grp.members:
                if m in self.nodes:
                    self.nodes[m].reserved_bytes -= count * vol.extent_size_bytes
            if gid not in still_used:
                del self.groups[gid]
                removed.append(int(gid))
        return removed

    def volume_by_id(self, volume_id: int) -> VolumeRecord | None:
        return next((v for v in self.volumes.values() if v.volume_id == volume_id), None)

    def clones_of(self, volume_id: int, snap_id: int = 0) -> list[str]:
        """Volumes reading through to `volume_id` (to its snapshot `snap_id` only, if given)."""
        return sorted(v.name for v in self.volumes.values()
                      if v.parent_volume_id == volume_id and (not snap_id or v.parent_snap_id == snap_id))

    def _apply_set_volume_state(self, cmd: SetVolumeState) -> Result:
        v = self.volumes.get(cmd.name)
        if v is None:
            return _err("unknown_volume", f"no volume {cmd.name!r}")
        if cmd.state:
            if cmd.state not in ("ready", "restoring", "failed"):
                return _err("invalid", f"volume state {cmd.state!r}")
            if cmd.expected and v.state != cmd.expected:
                return _err("invalid", f"volume {cmd.name!r} is {v.state}, not {cmd.expected}")
            v.state = cmd.state
        if cmd.detach_parent:
            v.parent_volume_id = v.parent_snap_id = 0
        if cmd.lazy_done:
            v.lazy_source = ""
        return _ok(state=v.state)

    def _apply_delete_volume(self, cmd: DeleteVolume) -> Result:
        vol = self.volumes.get(cmd.name)
        if vol is None:
            return _err("not_found", f"no volume {cmd.name!r}")
        if cmd.name in self.attachments:
            a = self.attachments[cmd.name]
            return _err("attached", f"volume {cmd.name!r} is attached by gateway {a.gateway_id!r}")
        clones = self.clones_of(vol.volume_id)
        if clones:
            return _err("has_clones", f"volume {cmd.name!r} has clones reading through to its snapshots: "
                        f"{', '.join(clones)} (volume flatten or delete them first)")
        del self.volumes[cmd.name]
        self.attach_epochs.pop(cmd.name, None)
        self.iscsi_auth.pop(vol.volume_id, None)
        self.reservations.pop(vol.volume_id, None)
        for sid in [k for k, r in self.snapshots.items() if r.volume_id == vol.volume_id]:
            del self.snapshots[sid]  # their pins go with the groups' replicas (node/host.py drop_replica)
        return _ok(removed_groups=self._release_extents(vol.extent_groups, vol))

    def _apply_set_qos(self, cmd: SetQos) -> Result:
        v = self.volumes.get(cmd.name)
        if v is None:
            return _err("unknown_volume", f"no volume {cmd.name!r}")
        spec = cmd.spec()
        problem = spec.problem()
        if problem:
            return _err("invalid", f"QoS: {problem}")
        v.qos_iops_max, v.qos_bytes_per_s_max, v.qos_burst_iops = spec.iops, spec.bytes_per_s, spec.burst_iops
        v.qos_burst_bytes, v.qos_min_iops, v.qos_weight = spec.burst_bytes, spec.min_iops, spec.weight
        return _ok(volume_id=v.volume_id, qos=spec.describe())

    def _apply_set_iscsi_auth(self, cmd: SetIscsiAuth) -> Result:
        if cmd.volume:
            vol = self.volumes.get(cmd.volume)
            if vol is None:
                return _err("not_found", f"no volume {cmd.volume!r}")
            key = vol.volume_id
        else:
            key = 0
        if not cmd.user:
            self.iscsi_auth.pop(key, None)
            return _ok()
        # RFC 7143 12.1.3: CHAP secrets of at least 96 bits; the two directions use different secrets.
        for what, v in (("user", cmd.user), ("target user", cmd.target_user)):
            if len(v.encode()) > CHAP_FIELD_BYTES_MAX or any(c in v for c in "\0\n="):
                return _err("invalid", f"CHAP {what}: at most {CHAP_FIELD_BYTES_MAX} bytes, no '=' or control characters")
        for what, v in (("secret", cmd.secret), ("target secret", cmd.target_secret)):
            if v and not CHAP_SECRET_BYTES_MIN <= len(v.encode()) <= CHAP_FIELD_BYTES_MAX:
                return _err("invalid", f"CHAP {what}: {CHAP_SECRET_BYTES_MIN}-{CHAP_FIELD_BYTES_MAX} bytes")
        if not cmd.secret:
            return _err("invalid", "CHAP secret missing")
        if bool(cmd.target_user) != bool(cmd.target_secret):
            return _err("invalid", "mutual CHAP needs both a target user and a target secret")
        if cmd.target_secret and cmd.target_secret == cmd.secret:
            return _err("invalid", "mutual CHAP: the target secret must differ from the initiator's")
        self.iscsi_auth[key] = IscsiAuth(cmd.user, cmd.secret, cmd.target_user, cmd.target_secret)
        return _ok()

    def _apply_set_reservation(self, cmd: SetReservation) -> Result:
        if not any(v.volume_id == cmd.volume_id for v in self.volumes.values()):
            return _err("not_found", f"no volume with id {cmd.volume_id}")
        if len(cmd.blob) > RESERVATION_BYTES_MAX:
            return _err("invalid", f"reservation state over {RESERVATION_BYTES_MAX} bytes")
        cur = self.reservations.get(cmd.volume_id)
        have = cur.version if cur is not None else 0
        if have != cmd.expected_version:
            return _err("stale", f"reservation state is at version {have}, not {cmd.expected_version}")
        self.reservations[cmd.volume_id] = Reservation(have + 1, cmd.blob)
        return _ok(version=have + 1)

    def _apply_attach(self, cmd: Attach) -> Result:
        if cmd.volume not in self.volumes:
            return _err("not_found", f"no volume {cmd.volume!r}")
        if not cmd.gateway_id:
            return _err("invalid", "gateway_id must not be empty")
        cur = self.attachments.get(cmd.volume)
        if cur is not None and cur.gateway_id == cmd.gateway_id and not cmd.force:
            return _ok(attach_epoch=cur.attach_epoch, gateway_id=cur.gateway_id)
        if cur is not None and not cmd.force:
            return _err("attached", f"volume {cmd.volume!r} is attached by gateway {cur.gateway_id!r} "
                        f"(attach epoch {cur.attach_epoch}); attach with force to take it over")
        epoch = self.attach_epochs.get(cmd.volume, 0) + 1
        self.attach_epochs[cmd.volume] = epoch
        self.attachments[cmd.volume] = Attachment(cmd.gateway_id, epoch, cmd.now_ms)
        return _ok(attach_epoch=epoch, gateway_id=cmd.gateway_id,
                   fenced=cur.gateway_id if cur is not None else "")

    def _apply_detach(self, cmd: Detach) -> Result:
        refusal = self.check_attach(cmd.volume, cmd.gateway_id, cmd.attach_epoch)
        if refusal is not None:
            return refusal
        del self.attachments[cmd.volume]
        return _ok()

    def _room_bytes(self) -> int:
        """Roughly how big a new volume may be under GROUPS_PER_NODE_MAX: the groups the fullest racks'
        nodes can still take, times the bytes per group."""
        free = sorted((GROUPS_PER_NODE_MAX - sum(1 for g in self.groups.values() if m in g.members)
                       for m, n in self.nodes.items() if n.state == "up" and not n.draining), reverse=True)
        groups = sum(free) // max(1, self.replicas) if len(free) >= self.replicas else 0
        return max(0, groups) * self.extents_per_group_max * self.extent_size_bytes

    def _apply_register_gateway(self, cmd: RegisterGateway) -> Result:
        if not cmd.gateway_id or len(cmd.gateway_id) > VOLUME_NAME_BYTES_MAX or not cmd.address:
            return _err("invalid", "gateway_id (1-64 bytes) and address must not be empty")
        if cmd.node_id < 0:
            return _err("invalid", "node_id must be >= 0")
        self.gateways[cmd.gateway_id] = GatewayRecord(cmd.gateway_id, cmd.address, cmd.now_ms, cmd.node_id, cmd.http,
                                                      cmd.admin)
        return _ok()

    def _apply_rename_volume(self, cmd: RenameVolume) -> Result:
        vol = self.volumes.get(cmd.name)
        if vol is None:
            return _err("not_found", f"no volume {cmd.name!r}")
        if not valid_volume_name(cmd.new_name):
            return _err("invalid", f"volume name {cmd.new_name!r}: 1-{VOLUME_NAME_BYTES_MAX} of [A-Za-z0-9._-]")
        if cmd.new_name in self.volumes:
            return _err("exists", f"volume {cmd.new_name!r} exists")
        if cmd.name in self.attachments:
            a = self.attachments[cmd.name]
            return _err("attached", f"volume {cmd.name!r} is attached by gateway {a.gateway_id!r}; detach it first")
        del self.volumes[cmd.name]
        vol.name = cmd.new_name
        self.volumes[cmd.new_name] = vol
        if cmd.name in self.attach_epochs:
            self.attach_epochs[cmd.new_name] = self.attach_epochs.pop(cmd.name)
        return _ok(name=cmd.new_name, volume_id=vol.volume_id)

    def _apply_set_group_members(self, cmd: SetGroupMembers) -> Result:
        grp = self.groups.get(GroupId(cmd.group_id))
        if grp is None:
            return _err("not_found", f"no extent group {cmd.group_id}")
        if grp.epoch != cmd.expected_epoch:
            return _err("stale_epoch", f"group {cmd.group_id} is at epoch {grp.epoch}, not {cmd.expected_epoch}")
        members = [NodeId(m) for m in cmd.members]
        if not 1 <= len(members) <= GROUP_MEMBERS_MAX or len(set(members)) != len(members):
            return _err("invalid", f"members: 1-{GROUP_MEMBERS_MAX} distinct node ids")
        unknown = [m for m in members if m not in self.nodes]
        if unknown:
            return _err("unknown_node", f"nodes {unknown} are not registered")
        racks = [self.nodes[m].rack for m in members]
        # One extra member may share a rack while a live member's replica moves (drain, rebalance: the new
        # one is added and caught up before the old one leaves).
        if len(racks) - len(set(racks)) > (1 if len(members) > self.replicas else 0):
            return _err("same_rack", f"members {list(cmd.members)} share racks {racks}")
        bytes_per_member = self._group_bytes(grp.group_id)
        for m in grp.members:
            if m in self.nodes:
                self.nodes[m].reserved_bytes -= bytes_per_member
        for m in members:
            self.nodes[m].reserved_bytes += bytes_per_member
        grp.members = members
        grp.epoch += 1
        return _ok(epoch=grp.epoch)

    def _group_bytes(self, gid: GroupId) -> int:
        return sum(v.extent_size_bytes for v in self.volumes.values() for g in v.extent_groups if g == gid)

    # -- reads ------------------------------------------------------------------------------------------

    def check_attach(self, volume: str, gateway_id: str, attach_epoch: int) -> Result | None:
        """None if (gateway, epoch) holds the volume now, else the refusal (stale_epoch / not_attached)."""
        cur = self.attachments.get(volume)
        if cur is None:
            return _err("not_attached", f"volume {volume!r} is not attached")
        if cur.gateway_id != gateway_id or cur.attach_epoch != attach_epoch:
            return _err("stale_epoch", f"volume {volume!r} is attached by {cur.gateway_id!r} at attach epoch "
                        f"{cur.attach_epoch}; ({gateway_id!r}, {attach_epoch}) is fenced")
        return None

    def extent_group(self, volume: str, extent_index: int) -> GroupRecord:
        return self.groups[self.volumes[volume].extent_groups[extent_index]]

    # -- snapshot ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "cluster_id": self.cluster_id,
            "extent_size_bytes": self.extent_size_bytes,
            "extents_per_group_max": self.extents_per_group_max,
            "replicas": self.replicas,
            "nodes": {str(k): asdict(v) for k, v in self.nodes.items()},
            "volumes": {k: asdict(v) for k, v in self.volumes.items()},
            "groups": {str(k): asdict(v) for k, v in self.groups.items()},
            "attachments": {k: asdict(v) for k, v in self.attachments.items()},
            "attach_epochs": dict(self.attach_epochs),
            "gateways": {k: asdict(v) for k, v in self.gateways.items()},
            "next_volume_id": self.next_volume_id,
            "next_group_id": self.next_group_id,
            "snapshots": {str(k): asdict(v) for k, v in self.snapshots.items()},
            "next_snap_id": self.next_snap_id,
            "iscsi_auth": {str(k): asdict(v) for k, v in self.iscsi_auth.items()},
            "reservations": {str(k): asdict(v) for k, v in self.reservations.items()},
            "data_keys": {str(k): v for k, v in self.data_keys.items()},
            "data_key_active": self.data_key_active,
            "master_keys": {str(k): v for k, v in self.master_keys.items()},
            "master_key_active": self.master_key_active,
            "seal_epochs": {str(k): v for k, v in self.seal_epochs.items()},
            "applied": self.applied,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaState:
        if d.get("format") != 1:
            raise ValueError(f"unknown metadata snapshot format {d.get('format')!r}")
        s = cls()
        s.cluster_id = d["cluster_id"]
        s.extent_size_bytes = d["extent_size_bytes"]
        s.extents_per_group_max = d["extents_per_group_max"]
        s.replicas = d["replicas"]
        s.nodes = {NodeId(int(k)): NodeRecord(**v) for k, v in d["nodes"].items()}
        s.volumes = {k: VolumeRecord(**v) for k, v in d["volumes"].items()}
        s.groups = {GroupId(int(k)): GroupRecord(**v) for k, v in d["groups"].items()}
        s.attachments = {k: Attachment(**v) for k, v in d["attachments"].items()}
        s.attach_epochs = dict(d["attach_epochs"])
        s.gateways = {k: GatewayRecord(**v) for k, v in d.get("gateways", {}).items()}  # absent before issue 14
        s.next_volume_id = d["next_volume_id"]
        s.next_group_id = d["next_group_id"]
        # absent before issue 17
        s.snapshots = {int(k): SnapshotRecord(**v) for k, v in d.get("snapshots", {}).items()}
        s.next_snap_id = d.get("next_snap_id", 1)
        # absent before issue 19
        s.iscsi_auth = {int(k): IscsiAuth(**v) for k, v in d.get("iscsi_auth", {}).items()}
        s.reservations = {int(k): Reservation(**v) for k, v in d.get("reservations", {}).items()}
        # absent before issue 20
        s.data_keys = {int(k): str(v) for k, v in d.get("data_keys", {}).items()}
        s.data_key_active = int(d.get("data_key_active", 0))
        s.master_keys = {int(k): str(v) for k, v in d.get("master_keys", {}).items()}
        s.master_key_active = int(d.get("master_key_active", 0))
        s.seal_epochs = {int(k): int(v) for k, v in d.get("seal_epochs", {}).items()}
        s.applied = d["applied"]
        return s

    @classmethod
    def from_json(cls, text: str | bytes) -> MetaState:
        return cls.from_dict(json.loads(text))


def valid_volume_name(name: str) -> bool:
    return (0 < len(name.encode()) <= VOLUME_NAME_BYTES_MAX and name not in (".", "..")
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in name))
