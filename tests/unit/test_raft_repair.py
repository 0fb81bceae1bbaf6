# control/raftrepair.py: the membership changes the metadata leader proposes for Raft groups
# (docs/replication.md, "Re-replication"): one change at a time, only once the group's leader reports the
# map's members as its voters; a down member removed first, then an up node of an unused rack added.
from __future__ import annotations

from raftblock.control.raftrepair import plan_raft_changes, repair_needed
from raftblock.meta.state import (
    CreateVolume,
    InitCluster,
    MetaState,
    RegisterNode,
    SetNodeStates,
    StateChange,
)
from raftblock.replication.raft.types import NodeId

RACKS = {1: "a", 2: "b", 3: "c", 4: "a", 5: "b"}


def _state(volumes: int = 1) -> tuple[MetaState, list[int]]:
    st = MetaState()
    assert st.apply(InitCluster("c")).ok
    for i in (1, 2, 3, 4, 5):
        assert st.apply(RegisterNode(i, RACKS[i], f"127.0.0.1:{7000 + i}", 1 << 40, 0)).ok
    gids = []
    for v in range(volumes):
        res = st.apply(CreateVolume(f"v{v}", 64 << 20, 0, "raft"))
        assert res.ok, res
        gids += res.value["groups"]
    return st, gids


def _lead(st: MetaState, gids: list[int], leader: int | None = None) -> dict[NodeId, dict[int, list[int]]]:
    """Each group's leader (its first live member, or `leader`) reports the map's members as voters."""
    out: dict[NodeId, dict[int, list[int]]] = {}
    for gid in gids:
        g = st.groups[gid]  # type: ignore[index]
        lead = leader if leader is not None else next(m for m in g.members if st.nodes[m].state == "up")
        out.setdefault(NodeId(lead), {})[gid] = [g.epoch, (1 << len(g.members)) - 1, *sorted(g.members)]
    return out


def _set(st: MetaState, node: int, state: str) -> None:
    assert st.apply(SetNodeStates((StateChange(node, state, 0),), 0)).ok


def test_a_down_member_is_removed_then_a_node_of_its_rack_is_added() -> None:
    st, (gid,) = _state()
    members = list(st.groups[gid].members)  # type: ignore[index]
    victim = members[0]
    _set(st, victim, "suspect")
    assert plan_raft_changes(st, _lead(st, [gid])) == []  # suspect: not yet
    _set(st, victim, "down")
    assert repair_needed(st) == {gid: "2/3 live copies (3 members)"}
    [(cmd, why)] = plan_raft_changes(st, _lead(st, [gid]))
    assert cmd.members == tuple(m for m in members if m != victim) and "remove" in why
    assert st.apply(cmd).ok
    # Not carried out yet: the leader still reports the old voters -> no next change.
    g = st.groups[gid]  # type: ignore[index]
    stale = {NodeId(members[1]): {gid: [g.epoch - 1, 7, *sorted(members)]}}
    assert plan_raft_changes(st, stale) == []
    [(cmd, why)] = plan_raft_changes(st, _lead(st, [gid]))
    (added,) = set(cmd.members) - set(g.members)
    assert st.nodes[NodeId(added)].rack == st.nodes[NodeId(victim)].rack and "add" in why
    assert st.apply(cmd).ok
    assert plan_raft_changes(st, _lead(st, [gid])) == []  # whole again
    assert repair_needed(st) == {}


def test_no_change_without_a_live_leader_or_a_spare_in_an_unused_rack() -> None:
    st, (gid,) = _state()
    members = list(st.groups[gid].members)  # type: ignore[index]
    _set(st, members[0], "down")
    assert plan_raft_changes(st, {}) == []  # nobody leads: a change could not commit
    leader = members[1]
    reps = _lead(st, [gid], leader)
    _set(st, leader, "suspect")  # a report from a node that is not up does not count
    assert plan_raft_changes(st, reps) == []
    _set(st, leader, "up")
    [(cmd, _)] = plan_raft_changes(st, reps)
    assert st.apply(cmd).ok
    rack = st.nodes[NodeId(members[0])].rack
    for n in st.nodes.values():  # every node of the dead member's rack is down
        if n.rack == rack:
            _set(st, int(n.node_id), "down")
    assert plan_raft_changes(st, _lead(st, [gid])) == []


def test_groups_with_the_fewest_live_copies_go_first_and_adds_spread() -> None:
    st, gids = _state(volumes=6)
    _set(st, 1, "down")
    _set(st, 2, "down")
    reps: dict[NodeId, dict[int, list[int]]] = {}
    for gid in gids:
        g = st.groups[gid]  # type: ignore[index]
        live = [m for m in g.members if st.nodes[m].state == "up"]
        if live:
            reps.setdefault(NodeId(live[0]), {})[gid] = [g.epoch, 7, *sorted(g.members)]
    plan = plan_raft_changes(st, reps, max_changes=3)
    lives = [sum(1 for m in st.groups[c.group_id].members if st.nodes[m].state == "up") for c, _ in plan]  # type: ignore[index]
    assert lives == sorted(lives) and len(plan) <= 3
    all_plan = plan_raft_changes(st, reps)
    assert {c.group_id for c, _ in all_plan} == {gid for gid in gids
                                                   if {1, 2} & set(st.groups[gid].members)  # type: ignore[index]
                                                   and any(st.nodes[m].state == "up" for m in st.groups[gid].members)}  # type: ignore[index]


def _caught(st: MetaState, gids: list[int], mask: int | None = None) -> dict[NodeId, dict[int, list[int]]]:
    out: dict[NodeId, dict[int, list[int]]] = {}
    for gid in gids:
        g = st.groups[gid]  # type: ignore[index]
        lead = next(m for m in g.members if st.nodes[m].state == "up" and not st.nodes[m].draining)
        m = (1 << len(g.members)) - 1 if mask is None else mask
        out.setdefault(NodeId(lead), {})[gid] = [g.epoch, m, *sorted(g.members)]
    return out


def test_drain_adds_the_new_member_first_and_removes_the_old_one_once_caught_up() -> None:
    from raftblock.meta.state import SetNodeDrain

    st, (gid,) = _state()
    members = list(st.groups[gid].members)  # type: ignore[index]
    src = members[0]
    assert st.apply(SetNodeDrain(src, True)).ok
    [(cmd, why)] = plan_raft_changes(st, _caught(st, [gid]))
    assert len(cmd.members) == 4 and cmd.members[-1] == src and "drain" in why
    (dst,) = set(cmd.members) - set(members)
    assert st.nodes[NodeId(dst)].rack == st.nodes[NodeId(src)].rack  # the only rack free of the others
    assert st.apply(cmd).ok  # one rack shared while the new member copies
    g = st.groups[gid]  # type: ignore[index]
    voters = sorted(g.members)
    not_dst = sum(1 << i for i, v in enumerate(voters) if v != dst)
    assert plan_raft_changes(st, _caught(st, [gid], not_dst)) == []  # still copying: nothing yet
    [(cmd, why)] = plan_raft_changes(st, _caught(st, [gid]))
    assert set(cmd.members) == set(members) - {src} | {dst} and "remove" in why
    assert st.apply(cmd).ok
    assert plan_raft_changes(st, _caught(st, [gid])) == []


def test_a_new_node_gets_groups_moved_to_it_one_at_a_time() -> None:
    st, gids = _state(volumes=4)
    assert st.apply(RegisterNode(6, "c", "127.0.0.1:7006", 1 << 40, 0)).ok
    before = {int(n): sum(1 for g in st.groups.values() if n in g.members) for n in st.nodes}
    assert before[6] == 0
    plan = plan_raft_changes(st, _caught(st, gids))
    moves = [(c, w) for c, w in plan if "rebalance" in w]
    assert len(moves) == 1, plan  # moves_max 1: bounded bytes in flight
    cmd, _ = moves[0]
    assert cmd.members[-2] == 6 and st.apply(cmd).ok
    # While it moves, no other move starts.
    assert [w for _, w in plan_raft_changes(st, _caught(st, gids, mask=0)) if "rebalance" in w] == []


def test_stop_check_names_the_groups_that_would_lose_their_majority() -> None:
    from raftblock.control.raftrepair import stop_check

    st, (gid,) = _state()
    members = list(st.groups[gid].members)  # type: ignore[index]
    assert stop_check(st, members[0]) == []
    _set(st, members[1], "down")
    [(g, why)] = stop_check(st, members[0])
    assert g == gid and "majority" in why
    assert stop_check(st, 5 if 5 not in members else 4) == []  # holds nothing of it


def test_stop_check_refuses_to_leave_a_chain_with_one_copy() -> None:
    """Issue 14 re-read: a chain already down to two members (one removed) was called safe to stop one of
    them, and then acknowledged writes on a single copy."""
    from raftblock.control.raftrepair import stop_check
    from raftblock.meta.state import SetGroupMembers

    st = MetaState()
    assert st.apply(InitCluster("c")).ok
    for i in (1, 2, 3):
        assert st.apply(RegisterNode(i, RACKS[i], f"127.0.0.1:{7000 + i}", 1 << 40, 0)).ok
    (gid,) = st.apply(CreateVolume("c", 64 << 20, 0, "chain")).value["groups"]
    members = [int(m) for m in st.groups[gid].members]
    assert stop_check(st, members[0]) == []  # whole: one failure at a time is fine
    _set(st, members[2], "suspect")
    assert st.apply(SetGroupMembers(gid, tuple(members[:2]), st.groups[gid].epoch)).ok  # the chain repair removed it
    [(g, why)] = stop_check(st, members[0])
    assert g == gid and "1 live copy after the stop, at least 2 needed" in why
