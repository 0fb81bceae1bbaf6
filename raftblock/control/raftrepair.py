# Raft repair: the membership changes the metadata leader makes to Raft-replicated extent groups
# (docs/replication.md, "Re-replication"). A core without I/O: the committed map and the group leaders'
# reports (carried by their heartbeats) in, SetGroupMembers commands out. The group's leader carries each
# change out as one single-server Raft configuration change (thesis 4.1), NodeRuntime._reconfigure.
#
# Rules:
# 1. One change per group at a time, each a compare-and-set on the group's epoch, and only once the
#    group has carried out the last one: an `up` node reports that it leads the group with exactly the
#    map's members as its voters (a group without a leader gets no change; it cannot commit one).
# 2. A member whose node is `down` (silent past the detector's down grace, not merely suspect) is removed
#    first. With that member dead, a quorum of the old configuration is a quorum of the survivors, so the
#    removal commits at once, and the add that follows never makes the quorum wait for a replica that is
#    still copying (adding first would: 3 of 4 with one of them dead).
# 3. A group with fewer than `replicas` members gets an `up` node of a rack it does not use: the one with
#    the fewest groups, then the most free space, then the lowest id. It joins with an empty log and is
#    sent a snapshot of the group's extents plus the log tail (bounded by the nodes' repair rate).
# 4. Groups with the fewest live copies are changed first; at most `max_changes` per call.
# 5. A report is [configuration epoch, voter ids...] per group the node leads (NodeRuntime.raft_report).
from __future__ import annotations

from collections.abc import Mapping, Sequence

from raftblock.meta.state import MetaState, SetGroupMembers
from raftblock.replication.raft.types import GroupId, NodeId

Report = Sequence[int]


def leaders_view(st: MetaState, reports: Mapping[NodeId, Mapping[int, Report]]) -> dict[int, tuple[int, int, frozenset[int]]]:
    """Per group: (leader node, configuration epoch, voters) as reported by an `up` node that leads it
    (the highest configuration epoch wins if two claim it)."""
    out: dict[int, tuple[int, int, frozenset[int]]] = {}
    for nid, reps in reports.items():
        n = st.nodes.get(nid)
        if n is None or n.state != "up":
            continue
        for gid, r in reps.items():
            if len(r) < 2:
                continue
            cur = out.get(gid)
            if cur is None or r[0] > cur[1]:
                out[gid] = (int(nid), int(r[0]), frozenset(int(v) for v in r[1:]))
    return out


def plan_raft_changes(
    st: MetaState, reports: Mapping[NodeId, Mapping[int, Report]], max_changes: int = 16
) -> list[tuple[SetGroupMembers, str]]:
    """(command, reason) for the Raft groups that need a change now, fewest live copies first."""
    leads = leaders_view(st, reports)
    count: dict[int, int] = {}
    for g in st.groups.values():
        for m in g.members:
            count[int(m)] = count.get(int(m), 0) + 1
    planned: list[tuple[int, int, SetGroupMembers, str]] = []
    for gid in sorted(st.groups):
        g = st.groups[gid]
        if g.mode != "raft":
            continue
        members = [int(m) for m in g.members]
        lead = leads.get(int(gid))
        if lead is None or lead[2] != frozenset(members):
            continue  # rule 1: no leader, or the last change is not carried out yet

        def state(m: int) -> str:
            n = st.nodes.get(NodeId(m))
            return n.state if n is not None else "down"

        live = sum(1 for m in members if state(m) == "up")
        dead = [m for m in members if state(m) == "down"]
        if dead and len(members) > 1:
            gone = dead[0]
            new = tuple(x for x in members if x != gone)
            planned.append((live, int(gid), SetGroupMembers(int(gid), new, g.epoch), f"remove down node {gone}"))
            continue
        if len(members) < st.replicas:
            racks = {st.nodes[NodeId(m)].rack for m in members if NodeId(m) in st.nodes}
            cands = [n for n in st.nodes.values() if n.state == "up" and int(n.node_id) not in members
                     and n.rack not in racks]
            if not cands:
                continue
            best = min(cands, key=lambda n: (count.get(int(n.node_id), 0), -(n.capacity_bytes - n.reserved_bytes),
                                            int(n.node_id)))
            count[int(best.node_id)] = count.get(int(best.node_id), 0) + 1
            new = (*members, int(best.node_id))
            planned.append((live, int(gid), SetGroupMembers(int(gid), new, g.epoch),
                            f"add node {int(best.node_id)} (rack {best.rack})"))
    planned.sort(key=lambda p: (p[0], p[1]))
    return [(cmd, reason) for _, _, cmd, reason in planned[:max_changes]]


def repair_needed(st: MetaState) -> dict[int, str]:
    """Raft and chain groups short of live copies, with why: for `cluster status`."""
    out: dict[int, str] = {}
    for gid, g in st.groups.items():
        states = [st.nodes[NodeId(m)].state if NodeId(m) in st.nodes else "down" for m in g.members]
        live = states.count("up")
        if live < st.replicas:
            out[int(GroupId(gid))] = f"{live}/{st.replicas} live copies ({len(g.members)} members)"
    return out
