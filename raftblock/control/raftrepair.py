# Raft repair and moves: the membership changes the metadata leader makes to Raft-replicated extent groups
# (docs/replication.md, "Re-replication", "Drain and rebalancing"). A core without I/O: the committed map
# and the group leaders' reports (carried by their heartbeats) in, SetGroupMembers commands out. The
# group's leader carries each change out as one single-server Raft configuration change (thesis 4.1),
# NodeRuntime._reconfigure.
#
# Rules:
# 1. One change per group at a time, each a compare-and-set on the group's epoch, and only once the
#    group has carried out the last one: an `up` node reports that it leads the group with exactly the
#    map's members as its voters (a group without a leader gets no change; it cannot commit one).
# 2. A member whose node is `down` (silent past the detector's down grace, not merely suspect) is removed
#    first. With that member dead, a quorum of the old configuration is a quorum of the survivors, so the
#    removal commits at once, and the add that follows never makes the quorum wait for a replica that is
#    still copying (adding first would: 3 of 4 with one of them dead).
# 3. A group with fewer than `replicas` members gets an `up`, not draining node of a rack it does not
#    use: the one with the fewest groups, then the most free space, then the lowest id. It joins with an
#    empty log and is sent a snapshot of the group's extents plus the log tail (bounded by the nodes'
#    repair rate).
# 4. Moving a live member (drain, rebalance) is the other order: add the new member first (the group has
#    replicas + 1 members, the leaving one last, one rack shared for the while), and remove the leaving
#    member once the leader reports every voter caught up. The live old member keeps the quorum whole
#    while the new one copies. At most `moves_max` groups move at once (bounded bytes in flight).
# 5. Moves: every group with a member on a draining node; then, with none pending, one group from the
#    node with the most groups to one with the fewest when they differ by more than one (rebalancing: a
#    new node fills up, a returning one too).
# 6. Groups with the fewest live copies are changed first; at most `max_changes` per call.
# 7. A report is [configuration epoch, caught-up mask, voter ids...] per group the node leads
#    (NodeRuntime.raft_report); bit i of the mask: voter i caught up.
from __future__ import annotations

from collections.abc import Mapping, Sequence

from raftblock.meta.state import MetaState, SetGroupMembers
from raftblock.replication.raft.types import GroupId, NodeId

Report = Sequence[int]


class Lead:
    __slots__ = ("node", "epoch", "voters", "caught_up")

    def __init__(self, node: int, epoch: int, voters: tuple[int, ...], mask: int) -> None:
        self.node = node
        self.epoch = epoch
        self.voters = frozenset(voters)
        self.caught_up = frozenset(v for i, v in enumerate(voters) if mask >> i & 1)


def leaders_view(st: MetaState, reports: Mapping[NodeId, Mapping[int, Report]]) -> dict[int, Lead]:
    """Per group: what an `up` node that leads it reports (the highest configuration epoch wins if two
    claim it)."""
    out: dict[int, Lead] = {}
    for nid, reps in reports.items():
        n = st.nodes.get(nid)
        if n is None or n.state != "up":
            continue
        for gid, r in reps.items():
            if len(r) < 3:
                continue
            cur = out.get(gid)
            if cur is None or r[0] > cur.epoch:
                out[gid] = Lead(int(nid), int(r[0]), tuple(int(v) for v in r[2:]), int(r[1]))
    return out


def _state(st: MetaState, m: int) -> str:
    n = st.nodes.get(NodeId(m))
    return n.state if n is not None else "down"


def _usable(st: MetaState, m: int) -> bool:
    n = st.nodes.get(NodeId(m))
    return n is not None and n.state == "up" and not n.draining


def _counts(st: MetaState) -> dict[int, int]:
    count: dict[int, int] = {int(n): 0 for n in st.nodes}
    for g in st.groups.values():
        for m in g.members:
            count[int(m)] = count.get(int(m), 0) + 1
    return count


def _pick(st: MetaState, count: dict[int, int], exclude: set[int], racks: set[str]) -> int | None:
    """An up, not draining node outside `exclude` and `racks`: fewest groups, most free space, lowest id."""
    cands = [n for n in st.nodes.values() if _usable(st, int(n.node_id)) and int(n.node_id) not in exclude
             and n.rack not in racks]
    if not cands:
        return None
    best = min(cands, key=lambda n: (count.get(int(n.node_id), 0), -(n.capacity_bytes - n.reserved_bytes),
                                    int(n.node_id)))
    return int(best.node_id)


def _rack(st: MetaState, m: int) -> str:
    n = st.nodes.get(NodeId(m))
    return n.rack if n is not None else ""


def plan_raft_changes(
    st: MetaState, reports: Mapping[NodeId, Mapping[int, Report]], max_changes: int = 16, moves_max: int = 1
) -> list[tuple[SetGroupMembers, str]]:
    """(command, reason) for the Raft groups that need a change now, fewest live copies first."""
    leads = leaders_view(st, reports)
    count = _counts(st)
    planned: list[tuple[int, int, SetGroupMembers, str]] = []
    moving = 0
    settled: list[int] = []
    for gid in sorted(st.groups):
        g = st.groups[gid]
        if g.mode != "raft":
            continue
        members = [int(m) for m in g.members]
        if len(members) > st.replicas:
            moving += 1
        lead = leads.get(int(gid))
        if lead is None or lead.voters != frozenset(members):
            continue  # rule 1: no leader, or the last change is not carried out yet
        live = sum(1 for m in members if _state(st, m) == "up")
        dead = [m for m in members if _state(st, m) == "down"]
        if dead and len(members) > 1:
            gone = dead[0]
            new = tuple(x for x in members if x != gone)
            planned.append((live, int(gid), SetGroupMembers(int(gid), new, g.epoch), f"remove down node {gone}"))
            continue
        if len(members) > st.replicas:
            if lead.caught_up >= frozenset(members):  # rule 4: the new member has copied everything
                new = tuple(members[:-1])
                planned.append((live, int(gid), SetGroupMembers(int(gid), new, g.epoch),
                                f"moved: remove node {members[-1]}"))
            continue
        if len(members) < st.replicas:
            racks = {_rack(st, m) for m in members}
            best = _pick(st, count, set(members), racks)
            if best is None:
                continue
            count[best] = count.get(best, 0) + 1
            planned.append((live, int(gid), SetGroupMembers(int(gid), (*members, best), g.epoch),
                            f"add node {best} (rack {_rack(st, best)})"))
            continue
        if lead.caught_up >= frozenset(members) and live == len(members):
            settled.append(int(gid))
    # Rule 5: moves of live members, bounded.
    for sgid in settled:
        if moving >= moves_max:
            break
        g = st.groups[GroupId(sgid)]
        members = [int(m) for m in g.members]
        src = next((m for m in members if st.nodes[NodeId(m)].draining), None)
        if src is None:
            continue
        others = [m for m in members if m != src]
        dst = _pick(st, count, set(members), {_rack(st, m) for m in others})
        if dst is None:
            continue
        count[dst] = count.get(dst, 0) + 1
        count[src] -= 1
        moving += 1
        planned.append((len(members), sgid, SetGroupMembers(sgid, (*others, dst, src), g.epoch),
                        f"drain node {src}: add node {dst} first"))
    if moving < moves_max and not any(n.draining for n in st.nodes.values()):
        usable = {m: c for m, c in count.items() if _usable(st, m)}
        if usable:
            hi = max(usable, key=lambda m: (usable[m], m))
            lo = min(usable, key=lambda m: (usable[m], m))
            if usable[hi] - usable[lo] > 1:
                for sgid in settled:
                    members = [int(m) for m in st.groups[GroupId(sgid)].members]
                    if hi not in members or lo in members:
                        continue
                    others = [m for m in members if m != hi]
                    if _rack(st, lo) in {_rack(st, m) for m in others}:
                        continue
                    g = st.groups[GroupId(sgid)]
                    planned.append((len(members), sgid, SetGroupMembers(sgid, (*others, lo, hi), g.epoch),
                                    f"rebalance: node {hi} ({usable[hi]} groups) -> node {lo} ({usable[lo]})"))
                    break
    planned.sort(key=lambda p: (p[0], p[1]))
    return [(cmd, reason) for _, _, cmd, reason in planned[:max_changes]]


def stop_check(st: MetaState, node_id: int) -> list[tuple[int, str]]:
    """The groups that stopping `node_id` now would leave without a majority of live members (Raft), or
    stalled (a chain tolerates one failure at a time): [(group, why)]; empty means safe to stop."""
    out: list[tuple[int, str]] = []
    for gid, g in sorted(st.groups.items()):
        members = [int(m) for m in g.members]
        if node_id not in members:
            continue
        live_after = [m for m in members if m != node_id and _state(st, m) == "up"]
        if g.mode == "chain":
            # A chain acknowledges a write once every member has it: stopping a member is safe only while
            # the rest stay at least replicas - 1 live copies (one failure at a time, never down to one).
            if len(live_after) < max(1, st.replicas - 1) or len(live_after) < len(members) - 1:
                out.append((int(gid), f"chain {members}: {len(live_after)} live cop{'y' if len(live_after) == 1 else 'ies'} "
                                      f"after the stop, at least {max(1, st.replicas - 1)} needed "
                                      f"({', '.join(f'n{m} {_state(st, m)}' for m in members if m != node_id) or 'no other member'})"))
        elif len(live_after) < len(members) // 2 + 1:
            out.append((int(gid), f"Raft {members}: {len(live_after)} live of {len(members)} after the stop, "
                                  f"a majority is {len(members) // 2 + 1}"))
    return out


def drain_blockers(st: MetaState, node_id: int) -> list[tuple[int, str]]:
    """The groups whose replica on `node_id` no node could take over now (rule 3's candidates: `up`, not
    draining, not a member, in a rack the other members do not use): a drain would wait for them
    forever. [(group, why)]; empty: every replica has somewhere to go."""
    out: list[tuple[int, str]] = []
    for gid, g in sorted(st.groups.items()):
        members = [int(m) for m in g.members]
        if node_id not in members:
            continue
        used = {_rack(st, m) for m in members if m != node_id}
        ok = [n for n in st.nodes.values() if n.state == "up" and not n.draining and int(n.node_id) not in members
              and n.rack not in used]
        if not ok:
            racks = sorted({n.rack for n in st.nodes.values()} - used) or ["a new rack"]
            out.append((int(gid), f"no up node outside racks {', '.join(sorted(used))} to take it "
                                  f"(add one: raftblock node add --rack {racks[0]})"))
    return out


def repair_needed(st: MetaState) -> dict[int, str]:
    """Raft and chain groups short of live copies, with why: for `cluster status`."""
    out: dict[int, str] = {}
    for gid, g in st.groups.items():
        states = [st.nodes[NodeId(m)].state if NodeId(m) in st.nodes else "down" for m in g.members]
        live = states.count("up")
        if live < st.replicas:
            out[int(GroupId(gid))] = f"{live}/{st.replicas} live copies ({len(g.members)} members)"
    return out
