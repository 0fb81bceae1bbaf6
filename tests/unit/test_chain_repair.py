# control/chainrepair.py: the chain configuration changes the metadata leader proposes (docs/chain.md,
# "What the metadata group must guarantee"): bump on restart, removal of a member that is not up only when
# the survivors adopted the epoch and the next head caught up, join at the tail only when all settled.
from __future__ import annotations

from raftblock.control.chainrepair import plan_chain_changes
from raftblock.meta.state import (
    CreateVolume,
    InitCluster,
    MetaState,
    RegisterNode,
    SetGroupMembers,
    SetNodeStates,
    StateChange,
)
from raftblock.replication.raft.types import NodeId


def _state(nodes: int = 4, mode: str = "chain") -> tuple[MetaState, int]:
    st = MetaState()
    assert st.apply(InitCluster("c")).ok
    for i in range(1, nodes + 1):
        assert st.apply(RegisterNode(i, f"r{i}", f"127.0.0.1:{7000 + i}", 1 << 40, 0)).ok
    res = st.apply(CreateVolume("v", 64 << 20, 0, mode))
    assert res.ok, res
    (gid,) = res.value["groups"]
    return st, gid


def _reports(st: MetaState, gid: int, **over: list[int]) -> dict[NodeId, dict[int, list[int]]]:
    g = st.groups[gid]  # type: ignore[index]
    out = {NodeId(m): {gid: [g.epoch, 1, 1]} for m in g.members}
    for k, v in over.items():
        out[NodeId(int(k[1:]))] = {gid: v}
    return out


def _down(st: MetaState, node: int, state: str = "suspect") -> None:
    assert st.apply(SetNodeStates((StateChange(node, state, 0),), 0)).ok


def test_nothing_to_do_on_a_whole_settled_chain_and_raft_groups_are_left_alone() -> None:
    st, gid = _state()
    assert plan_chain_changes(st, _reports(st, gid)) == []
    st2, gid2 = _state(mode="raft")
    _down(st2, st2.groups[gid2].members[0])  # type: ignore[index]
    assert plan_chain_changes(st2, {}) == []


def test_a_restarted_member_gets_an_epoch_bump_with_the_same_members() -> None:
    st, gid = _state()
    g = st.groups[gid]  # type: ignore[index]
    m = g.members[1]
    [(cmd, reason)] = plan_chain_changes(st, _reports(st, gid, **{f"n{m}": [g.epoch, 0, 0]}))
    assert cmd == SetGroupMembers(gid, tuple(g.members), g.epoch) and "restarted" in reason
    # a fresh member that never adopted anything (epoch 0) is not "restarted"
    assert plan_chain_changes(st, _reports(st, gid, **{f"n{m}": [0, 0, 0]})) == []


def test_a_member_that_is_not_up_is_removed_once_the_survivors_adopted_the_epoch() -> None:
    st, gid = _state()
    g = st.groups[gid]  # type: ignore[index]
    head, mid, tail = g.members
    _down(st, tail)
    # the middle has not adopted the current epoch yet: no change (a zombie chain could still ack)
    assert plan_chain_changes(st, _reports(st, gid, **{f"n{mid}": [g.epoch - 1 if g.epoch > 1 else 0, 1, 1]})) == []
    [(cmd, _)] = plan_chain_changes(st, _reports(st, gid))
    assert cmd == SetGroupMembers(gid, (head, mid), g.epoch)


def test_the_next_head_must_have_caught_up_but_a_joiner_behind_the_failed_member_need_not() -> None:
    st, gid = _state()
    g = st.groups[gid]  # type: ignore[index]
    head, mid, tail = g.members
    _down(st, head)
    # the next head (mid) still catching up: removing the head could lose acknowledged writes
    assert plan_chain_changes(st, _reports(st, gid, **{f"n{mid}": [g.epoch, 1, 0]})) == []
    # a tail still catching up (a joiner) does not block the removal of the failed head
    [(cmd, _)] = plan_chain_changes(st, _reports(st, gid, **{f"n{tail}": [g.epoch, 1, 0]}))
    assert cmd == SetGroupMembers(gid, (mid, tail), g.epoch)


def test_a_single_member_is_never_removed() -> None:
    st, gid = _state()
    g = st.groups[gid]  # type: ignore[index]
    only = g.members[0]
    assert st.apply(SetGroupMembers(gid, (only,), g.epoch)).ok
    _down(st, only, "down")
    assert plan_chain_changes(st, _reports(st, gid)) == []


def test_a_short_chain_gets_an_up_node_of_an_unused_rack_at_the_tail_when_settled() -> None:
    st, gid = _state(nodes=4)
    g = st.groups[gid]  # type: ignore[index]
    head, mid, tail = g.members
    assert st.apply(SetGroupMembers(gid, (head, mid), g.epoch)).ok
    spare = ({1, 2, 3, 4} - {head, mid}) - {tail}
    (other,) = spare
    _down(st, tail)
    [(cmd, reason)] = plan_chain_changes(st, _reports(st, gid))
    assert cmd == SetGroupMembers(gid, (head, mid, other), g.epoch) and "tail" in reason
    # not while a member is still catching up
    assert plan_chain_changes(st, _reports(st, gid, **{f"n{mid}": [g.epoch, 1, 0]})) == []
    # no up node in an unused rack: nothing
    _down(st, other)
    assert plan_chain_changes(st, _reports(st, gid)) == []
