# Chain repair: the configuration changes the metadata leader makes to chain-replicated groups
# (docs/chain.md, "What the metadata group must guarantee"). A core without I/O: the committed map and
# the members' latest reports (carried by their heartbeats) in, SetGroupMembers commands out.
#
# Rules:
# 1. One change per group at a time, each a compare-and-set on the group's epoch (SetGroupMembers).
# 2. A restarted member (it reports no configuration, and an epoch at least the map's: it persisted that
#    epoch and may have acted in it) gets a bump: same members, epoch + 1. It then syncs with its log.
# 3. A member whose node is not `up` (suspect or down: silent for longer than the lease nodes are given)
#    is removed, but only once every other member has adopted the current epoch and the first surviving
#    member (the head afterwards) has caught up, and never below one member. The head's successor becomes
#    head; a joiner that was still catching up behind the failed member syncs again from its new
#    predecessor (so a failure during a rejoin does not stall the chain).
# 4. A chain shorter than `replicas` gets an `up` node in a rack it does not use, at the tail, once every
#    member has adopted the current epoch and caught up. The node joins with its durable log if it has one
#    (it syncs: matching records are kept, anything else is replaced by a snapshot).
# 5. A member's report is [epoch adopted, configured 0/1, caught up 0/1] per group (ChainHost.report).
#    Caught up (ChainCore.caught_up): synced in this epoch and applied what its predecessor held; or known
#    to hold every acknowledged write without syncing again: the head, or the head's successor caught up
#    in the epoch before (so a head that fails as a change is made can still be replaced).
# 6. A member on a draining node (`node drain`) leaves a whole chain once every member is settled; rule 4
#    then adds a node at the tail. One drained member per group at a time.
from __future__ import annotations

from collections.abc import Mapping, Sequence

from raftblock.meta.state import MetaState, SetGroupMembers
from raftblock.replication.raft.types import NodeId

Report = Sequence[int]


def plan_chain_changes(
    st: MetaState, reports: Mapping[NodeId, Mapping[int, Report]], max_changes: int = 16
) -> list[tuple[SetGroupMembers, str]]:
    """(command, reason) for the groups that need a change now; at most `max_changes`."""
    out: list[tuple[SetGroupMembers, str]] = []
    for gid in sorted(st.groups):
        g = st.groups[gid]
        if g.mode != "chain":
            continue
        members = [int(m) for m in g.members]

        def rep(m: int, gid: int = int(gid)) -> Report | None:
            return reports.get(NodeId(m), {}).get(gid)

        def up(m: int) -> bool:
            n = st.nodes.get(NodeId(m))
            return n is not None and n.state == "up"

        def settled(m: int, epoch: int = g.epoch) -> bool:
            r = rep(m)
            return r is not None and len(r) >= 3 and r[0] == epoch and r[1] == 1 and r[2] == 1

        def learned(m: int, epoch: int = g.epoch) -> bool:
            r = rep(m)
            return r is not None and len(r) >= 2 and r[0] == epoch and r[1] == 1

        restarted = [m for m in members if up(m) and (r := rep(m)) is not None and len(r) >= 2
                     and r[1] == 0 and r[0] >= g.epoch]
        cmd: SetGroupMembers | None = None
        reason = ""
        if restarted:
            cmd = SetGroupMembers(int(gid), tuple(members), g.epoch)
            reason = f"member {restarted[0]} restarted"
        else:
            failed = [m for m in members if not up(m)]
            if failed and len(members) > 1:
                others = [m for m in members if m != failed[0]]
                # The first survivor becomes (or stays) head: it must hold every acknowledged write, so it
                # must be caught up; the others only need to have adopted the epoch (a joiner after the
                # failed member syncs again from its new predecessor).
                if settled(others[0]) and all(learned(m) for m in others):
                    cmd = SetGroupMembers(int(gid), tuple(others), g.epoch)
                    reason = f"member {failed[0]} is {st.nodes[NodeId(failed[0])].state if NodeId(failed[0]) in st.nodes else 'gone'}"
            elif not failed and len(members) < st.replicas and all(settled(m) for m in members):
                racks = {st.nodes[NodeId(m)].rack for m in members}
                spare = sorted(
                    (n.reserved_bytes, int(n.node_id))
                    for n in st.nodes.values()
                    if n.state == "up" and not n.draining and int(n.node_id) not in members and n.rack not in racks
                )
                if spare:
                    new = spare[0][1]
                    cmd = SetGroupMembers(int(gid), (*members, new), g.epoch)
                    reason = f"node {new} joins at the tail"
            elif (not failed and len(members) >= st.replicas and all(settled(m) for m in members)
                  and (leaving := [m for m in members if st.nodes[NodeId(m)].draining])):
                # Rule 6: a member on a draining node leaves a whole, settled chain; rule 4 then adds a
                # node at the tail, which copies the data (two live copies meanwhile).
                others = [m for m in members if m != leaving[0]]
                cmd = SetGroupMembers(int(gid), tuple(others), g.epoch)
                reason = f"drain node {leaving[0]}"
        if cmd is not None:
            out.append((cmd, reason))
            if len(out) >= max_changes:
                break
    return out
