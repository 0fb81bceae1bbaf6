# Placement: which nodes hold the extent groups of a new volume. A pure function of its inputs.
#
# Rules:
# 1. Every extent group gets `replicas` members on `replicas` distinct racks, all of them `up`
#    (never suspect or down); with fewer distinct racks among up nodes, placement fails with a
#    PlacementError that names the racks it found.
# 2. The first member is the preferred leader. Leaders are balanced: each new group's leader is the
#    eligible node leading the fewest groups so far (existing groups count), so leader counts over
#    eligible nodes stay within 1 of each other when every group was placed here.
# 3. The other members are the nodes with the most free space (capacity - reserved) in racks the
#    group does not use yet. Each member reserves (extents in group x extent size) bytes: the store
#    is thin-provisioned, so the reservation steers spreading; it never refuses a volume.
# 4. Deterministic: no clock, no randomness; every tie is broken by node id.
# 5. A volume of E extents gets ceil(E / extents_per_group_max) groups (at least 1); extents are
#    striped over them (extent i -> group i mod G), so sequential I/O spreads over the group leaders.
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from raftblock.replication.raft.types import NodeId

EXTENT_SIZE_BYTES_DEFAULT = 64 << 20
EXTENTS_PER_GROUP_MAX_DEFAULT = 8  # 512 MiB per group: a 1 GiB volume spans 2 groups
REPLICAS_DEFAULT = 3


class PlacementError(Exception):
    """The cluster cannot place the volume; the message says why (e.g. the racks found)."""


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node."""

    node_id: NodeId
    rack: str
    up: bool
    capacity_bytes: int
    reserved_bytes: int


@dataclass(frozen=True)
class GroupPlan:
    """One new extent group: members[0] is the preferred leader; extents are indexes in the volume."""

    members: tuple[NodeId, ...]
    extents: tuple[int, ...]


def extent_count(size_bytes: int, extent_size_bytes: int) -> int:
    return max(1, -(-size_bytes // extent_size_bytes))


def group_count(extents: int, extents_per_group_max: int) -> int:
    return max(1, -(-extents // extents_per_group_max))


def place(
    nodes: Sequence[NodeView],
    size_bytes: int,
    *,
    extent_size_bytes: int = EXTENT_SIZE_BYTES_DEFAULT,
    extents_per_group_max: int = EXTENTS_PER_GROUP_MAX_DEFAULT,
    replicas: int = REPLICAS_DEFAULT,
    leader_counts: Mapping[NodeId, int] | None = None,
) -> list[GroupPlan]:
    """Plan the extent groups of a new volume of `size_bytes`.

    leader_counts: groups each node already leads (preferred leader = first member), for balance.
    """
    assert size_bytes > 0 and extent_size_bytes > 0 and extents_per_group_max > 0 and replicas > 0
    eligible = sorted((n for n in nodes if n.up), key=lambda n: n.node_id)
    racks = sorted({n.rack for n in eligible})
    if len(racks) < replicas:
        all_racks = sorted({n.rack for n in nodes})
        down = sorted(int(n.node_id) for n in nodes if not n.up)
        raise PlacementError(
            f"need {replicas} racks with an up node, found {len(racks)}: {racks or '[]'}"
            f" (all racks known: {all_racks or '[]'}; nodes not up: {down or '[]'})"
        )
    extents = extent_count(size_bytes, extent_size_bytes)
    groups = group_count(extents, extents_per_group_max)
    striped: list[list[int]] = [[] for _ in range(groups)]
    for i in range(extents):
        striped[i % groups].append(i)

    leads = {n.node_id: int((leader_counts or {}).get(n.node_id, 0)) for n in eligible}
    free = {n.node_id: n.capacity_bytes - n.reserved_bytes for n in eligible}
    members_of = {n.node_id: 0 for n in eligible}
    rack_of = {n.node_id: n.rack for n in eligible}
    plans: list[GroupPlan] = []
    for ext in striped:
        reserve = len(ext) * extent_size_bytes
        leader = min(eligible, key=lambda n: (leads[n.node_id], -free[n.node_id], n.node_id)).node_id
        chosen = [leader]
        used_racks = {rack_of[leader]}
        while len(chosen) < replicas:
            candidates = [n for n in eligible if n.rack not in used_racks]
            best = min(candidates, key=lambda n: (-free[n.node_id], members_of[n.node_id], n.node_id))
            chosen.append(best.node_id)
            used_racks.add(best.rack)
        leads[leader] += 1
        for m in chosen:
            free[m] -= reserve
            members_of[m] += 1
        plans.append(GroupPlan(members=tuple(chosen), extents=tuple(ext)))
    return plans


def leader_counts_of(groups: Iterable[Sequence[NodeId]]) -> dict[NodeId, int]:
    """Preferred-leader counts of existing groups (first member of each)."""
    out: dict[NodeId, int] = {}
    for members in groups:
        if members:
            out[members[0]] = out.get(members[0], 0) + 1
    return out
