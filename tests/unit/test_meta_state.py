"""The metadata state machine (raftblock/meta/state.py): commands as JSON (no pickle), deterministic
apply, refusal without change, exclusive attach with fencing epochs, epoch compare-and-set on group
membership, deterministic snapshots."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftblock.meta.state import (
    COMMANDS,
    Attach,
    CommandError,
    CreateSnapshot,
    CreateVolume,
    DeleteVolume,
    Detach,
    InitCluster,
    MetaState,
    NextSealEpoch,
    Noop,
    RegisterGateway,
    RegisterNode,
    RemoveNode,
    RenameVolume,
    ResizeVolume,
    SetDataKey,
    SetGroupMembers,
    SetIscsiAuth,
    SetMasterKey,
    SetNodeDrain,
    SetNodeStates,
    SetQos,
    SetReservation,
    SetSnapshotState,
    SetVolumeState,
    StateChange,
    decode_command,
    encode_command,
)
from raftblock.qos import QosSpec
from raftblock.replication.raft.types import GroupId, NodeId
from raftblock.wire.auth import DataKeys

GiB = 1 << 30


def cluster(racks: int = 3, per_rack: int = 1) -> MetaState:
    s = MetaState()
    assert s.apply(InitCluster("c1")).ok
    nid = 1
    for r in range(racks):
        for _ in range(per_rack):
            assert s.apply(RegisterNode(nid, f"r{r}", f"127.0.0.1:{9000 + nid}", 1 << 40, 1000)).ok
            nid += 1
    return s


ALL = [
    InitCluster("c1"),
    RegisterNode(1, "r0", "h:1", 10, 5),
    SetNodeStates((StateChange(1, "down", 3),), 9),
    CreateVolume("v", GiB, 7, "chain", 100, 200),
    DeleteVolume("v"),
    Attach("v", "gw1", 8, True),
    Detach("v", "gw1", 3),
    SetGroupMembers(4, (1, 2, 3), 2),
    Noop(),
    SetNodeDrain(2, True),
    RenameVolume("v", "w"),
    RegisterGateway("gw1", "127.0.0.1:10809", 5),
    RegisterGateway("n2", "127.0.0.1:10810", 5, 2),
    CreateSnapshot("v", "nightly", 9),
    SetSnapshotState("v", "nightly", "ready"),
    SetVolumeState("v", "ready", "restoring", True),
    CreateVolume("c", GiB, 7, "raft", state="restoring", parent="v@nightly", origin="s3://b/p"),
    ResizeVolume("v", 2 * GiB, True),
    RemoveNode(4),
    RegisterNode(5, "r1", "h:5", 10, 5, "d5", "h:9100"),
    RegisterGateway("gw2", "127.0.0.1:10811", 5, 0, "127.0.0.1:9101"),
    SetIscsiAuth("v", "host1", "initiator-secret", "tgt", "target-secret!"),
    SetReservation(7, 3, '{"registrations": []}'),
    SetQos("v", 500, 10 << 20, 800, 0, 100, 4),
    SetDataKey("add", 2, "d3JhcHBlZA=="),
    InitCluster("c2", data_key="d3JhcHBlZA=="),
    SetMasterKey(0, 1, "bWFzdGVy", '{"7": "d3JhcHBlZA=="}'),
    CreateVolume("e", GiB, 7, encrypt_key="d3JhcHBlZA==", encrypt_master=1, encrypt_key_id=12345),
    NextSealEpoch(12345),
]


def test_data_keys_are_added_activated_and_retired_in_order() -> None:
    s = MetaState()
    assert s.apply(InitCluster("c", data_key="k1")).ok
    assert s.data_key_set() == DataKeys({1: "k1"}, 1)
    assert s.apply(SetDataKey("add", 3, "k3")).error == "invalid"  # versions go one by one
    assert s.apply(SetDataKey("add", 2, "k2")).ok and s.data_key_active == 1  # accepted, not used yet
    assert s.apply(SetDataKey("retire", 1)).error == "invalid"  # the active one
    assert s.apply(SetDataKey("activate", 4)).error == "unknown_key"
    assert s.apply(SetDataKey("activate", 2)).ok and s.apply(SetDataKey("retire", 1)).ok
    assert MetaState.from_json(s.to_json()).data_key_set() == DataKeys({2: "k2"}, 2)
    old = MetaState()  # a cluster made before data keys: the first one added is used at once
    assert old.apply(InitCluster("c")).ok and old.data_key_active == 0
    assert old.apply(SetDataKey("add", 1, "k1")).ok and old.data_key_active == 1


def test_qos_is_set_at_create_and_changed_whole_and_checked() -> None:
    s = cluster()
    assert s.apply(CreateVolume("q", GiB, 7, "raft", 1000, 50 << 20, 2000, 0, 200, 3)).ok
    v = s.volumes["q"]
    assert v.qos() == QosSpec(1000, 50 << 20, 2000, 0, 200, 3)
    r = s.apply(CreateVolume("bad", GiB, 7, "raft", 100, 0, 0, 0, 200))
    assert not r.ok and r.error == "invalid" and "above the limit" in r.message and "bad" not in s.volumes
    assert s.apply(SetQos("q", 0, 0, 0, 0, 50, 1)).ok  # the whole spec: the limits are gone
    assert s.volumes["q"].qos() == QosSpec(min_iops=50)
    for bad in (SetQos("q", weight=0), SetQos("q", burst_iops=5), SetQos("q", -1)):
        r = s.apply(bad)
        assert not r.ok and r.error == "invalid", bad
    assert s.volumes["q"].qos() == QosSpec(min_iops=50)  # a refused change changes nothing
    assert s.apply(SetQos("nope", 1)).error == "unknown_volume"
    again = MetaState.from_json(s.to_json())
    assert again.volumes["q"].qos() == QosSpec(min_iops=50)
    # a map saved before the QoS fields existed loads with none
    d = json.loads(s.to_json())
    for k in ("qos_burst_iops", "qos_burst_bytes", "qos_min_iops", "qos_weight"):
        del d["volumes"]["q"][k]
    assert MetaState.from_dict(d).volumes["q"].qos() == QosSpec()


def test_iscsi_chap_rules_and_secrets_stay_out_of_status() -> None:
    """RFC 7143 12.1.3: secrets of at least 96 bits, different in the two directions; removing CHAP with an
    empty user; a deleted volume takes its CHAP and reservations with it."""
    s = cluster()
    assert s.apply(CreateVolume("v", 64 << 20, 7)).ok
    vid = s.volumes["v"].volume_id
    for bad in (SetIscsiAuth("v", "u", "short"), SetIscsiAuth("v", "u", "initiator-secret", "t", ""),
                SetIscsiAuth("v", "u", "same-secret-12", "t", "same-secret-12"), SetIscsiAuth("v", "u=1", "x" * 12),
                SetIscsiAuth("nope", "u", "initiator-secret")):
        assert not s.apply(bad).ok, bad
    assert s.apply(SetIscsiAuth("v", "u", "initiator-secret", "t", "target-secret!")).ok
    assert s.iscsi_auth[vid].target_user == "t"
    assert MetaState.from_json(s.to_json()).iscsi_auth == s.iscsi_auth
    assert s.apply(SetIscsiAuth("v")).ok and vid not in s.iscsi_auth
    assert s.apply(SetIscsiAuth("", "d", "discovery-secret")).ok and 0 in s.iscsi_auth


def test_reservation_state_is_compare_and_set() -> None:
    s = cluster()
    assert s.apply(CreateVolume("v", 64 << 20, 7)).ok
    vid = s.volumes["v"].volume_id
    assert s.apply(SetReservation(vid, 0, "a")).value["version"] == 1
    stale = s.apply(SetReservation(vid, 0, "b"))
    assert not stale.ok and stale.error == "stale" and s.reservations[vid].blob == "a"
    assert s.apply(SetReservation(vid, 1, "b")).ok and s.reservations[vid].version == 2
    assert not s.apply(SetReservation(vid + 100, 0, "c")).ok
    assert s.apply(DeleteVolume("v")).ok and vid not in s.reservations


def test_a_node_leaves_the_map_only_when_it_holds_no_replica() -> None:
    s = cluster(racks=4)
    res = s.apply(CreateVolume("v", 64 << 20, 7))
    assert res.ok, res
    used = {int(m) for g in s.groups.values() for m in g.members}
    member, spare = min(used), next(int(n) for n in s.nodes if int(n) not in used)
    res = s.apply(RemoveNode(member))
    assert not res.ok and res.error == "not_drained" and "drain it first" in res.message
    assert NodeId(member) in s.nodes
    assert s.apply(RemoveNode(spare)).ok
    assert NodeId(spare) not in s.nodes
    assert s.apply(RemoveNode(spare)).error == "unknown_node"
    # registered again (the same machine rejoining): a new node in the map, with its metrics address
    assert s.apply(RegisterNode(spare, "r9", "h:1", 10, 5, "", "h:9100")).ok
    assert s.nodes[NodeId(spare)].http == "h:9100"
    assert MetaState.from_json(s.to_json()).nodes[NodeId(spare)].http == "h:9100"


def test_every_command_round_trips_as_json() -> None:
    assert {c.op for c in ALL} == set(COMMANDS)
    for cmd in ALL:
        text = encode_command(cmd)
        assert json.loads(text)["op"] == cmd.op
        assert decode_command(text) == cmd


@pytest.mark.parametrize("text", [
    b"\x80\x02}q\x00.",  # a pickle is not a command
    '{"op": "nope"}',
    '{"op": "create_volume", "name": "v", "size_bytes": "1", "now_ms": 0}',
    '{"op": "create_volume", "name": "v", "size_bytes": true, "now_ms": 0}',
    '{"op": "create_volume", "name": "v", "size_bytes": 4096, "now_ms": 0, "evil": 1}',
    '{"op": "create_volume", "name": "v"}',
    '{"op": "set_node_states", "changes": [1], "now_ms": 0}',
    "[]",
])
def test_bad_commands_are_refused_and_change_nothing(text: str | bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(text)
    s = cluster()
    before = s.to_dict()
    res = s.apply_encoded(text)
    assert not res.ok and res.error == "bad_command"
    after = s.to_dict()
    assert after.pop("applied") == before.pop("applied") + 1
    assert after == before


def test_create_volume_places_and_maps_every_extent() -> None:
    s = cluster()
    res = s.apply(CreateVolume("demo", GiB, 1))
    assert res.ok, res
    vol = s.volumes["demo"]
    assert len(vol.extent_groups) == 16
    groups = {s.groups[g].group_id: s.groups[g] for g in vol.extent_groups}
    assert len(groups) >= 2 and len({g.members[0] for g in groups.values()}) >= 2
    for g in groups.values():
        assert len({s.nodes[m].rack for m in g.members}) == 3 and g.epoch == 1 and g.mode == "raft"
    assert s.extent_group("demo", 0).group_id == vol.extent_groups[0]
    # each member reserved its extents' bytes; the whole volume is reserved 3 times over
    assert sum(n.reserved_bytes for n in s.nodes.values()) == 3 * GiB
    assert s.apply(CreateVolume("demo", GiB, 2)).error == "exists"


def test_create_volume_refuses_clearly() -> None:
    s = MetaState()
    assert s.apply(CreateVolume("v", GiB, 0)).error == "not_initialised"
    s = cluster(racks=2, per_rack=2)
    res = s.apply(CreateVolume("v", GiB, 0))
    assert res.error == "placement" and "['r0', 'r1']" in res.message
    assert "v" not in s.volumes and not s.groups
    s = cluster()
    for bad in (CreateVolume("", GiB, 0), CreateVolume("a/b", GiB, 0), CreateVolume("v", 1000, 0),
                CreateVolume("v", GiB, 0, "paxos"), CreateVolume("v", 0, 0)):
        assert s.apply(bad).error == "invalid", bad
    # a down node is never chosen: with one of three racks down there is no placement
    assert s.apply(SetNodeStates((StateChange(3, "down", 0),), 5)).ok
    assert s.apply(CreateVolume("v", GiB, 0)).error == "placement"


def test_exclusive_attach_with_fencing() -> None:
    s = cluster()
    assert s.apply(CreateVolume("v", GiB, 0)).ok
    a1 = s.apply(Attach("v", "gw1", 10))
    assert a1.ok and a1.value["attach_epoch"] == 1
    assert s.apply(Attach("v", "gw1", 11)).value["attach_epoch"] == 1  # idempotent for the holder
    refused = s.apply(Attach("v", "gw2", 12))
    assert refused.error == "attached" and "gw1" in refused.message
    forced = s.apply(Attach("v", "gw2", 13, force=True))
    assert forced.ok and forced.value == {"attach_epoch": 2, "gateway_id": "gw2", "fenced": "gw1"}
    # the old gateway is fenced: its epoch is stale
    assert s.check_attach("v", "gw1", 1) is not None
    assert s.apply(Detach("v", "gw1", 1)).error == "stale_epoch"
    assert s.check_attach("v", "gw2", 2) is None
    assert s.apply(DeleteVolume("v")).error == "attached"
    assert s.apply(Detach("v", "gw2", 2)).ok
    # the next attach gets a new epoch, so a gateway holding epoch 2 stays fenced
    assert s.apply(Attach("v", "gw3", 14)).value["attach_epoch"] == 3
    assert s.apply(Detach("v", "gw3", 3)).ok
    assert s.apply(DeleteVolume("v")).ok
    assert not s.groups and all(n.reserved_bytes == 0 for n in s.nodes.values())


def test_group_membership_is_compare_and_set_on_epoch() -> None:
    s = cluster(racks=4)
    assert s.apply(CreateVolume("v", 64 << 20, 0)).ok
    gid = GroupId(1)
    old = list(s.groups[gid].members)
    spare = next(n for n in s.nodes if n not in old)
    new = (*old[:2], int(spare))
    assert s.apply(SetGroupMembers(gid, new, 1)).value == {"epoch": 2}
    assert s.apply(SetGroupMembers(gid, tuple(old), 1)).error == "stale_epoch"  # the loser of a race
    assert s.groups[gid].members == [NodeId(m) for m in new]
    assert s.nodes[old[2]].reserved_bytes == 0 and s.nodes[spare].reserved_bytes == 64 << 20
    same_rack = (int(old[0]), int(old[0]))
    assert s.apply(SetGroupMembers(gid, same_rack, 2)).error == "invalid"
    assert s.apply(SetGroupMembers(gid, (1, 99), 2)).error == "unknown_node"


def test_same_rack_members_refused() -> None:
    s = cluster(racks=3, per_rack=2)
    assert s.apply(CreateVolume("v", 64 << 20, 0)).ok
    members = s.groups[GroupId(1)].members
    twin = next(n for n, r in s.nodes.items() if r.rack == s.nodes[members[0]].rack and n != members[0])
    assert s.apply(SetGroupMembers(1, (int(members[0]), int(twin)), 1)).error == "same_rack"


def test_node_state_transitions_count_returns() -> None:
    s = cluster()
    assert s.apply(SetNodeStates((StateChange(1, "suspect", 500),), 3000)).value == {"changed": [1]}
    assert s.apply(SetNodeStates((StateChange(1, "down", 500),), 9000)).ok
    assert s.nodes[NodeId(1)].state == "down" and s.nodes[NodeId(1)].state_since_ms == 9000
    assert s.apply(SetNodeStates((StateChange(1, "up", 9500),), 9600)).ok
    n = s.nodes[NodeId(1)]
    assert (n.state, n.returns, n.last_heartbeat_ms) == ("up", 1, 9500)
    assert s.apply(SetNodeStates((StateChange(7, "up", 0),), 1)).error == "unknown_node"
    assert s.apply(SetNodeStates((StateChange(1, "dead", 0),), 1)).error == "invalid"


def test_node_cannot_change_rack_while_holding_replicas() -> None:
    s = cluster()
    assert s.apply(RegisterNode(1, "r0", "h:2", 5 << 40, 1)).ok  # address and capacity may change
    assert s.apply(CreateVolume("v", GiB, 0)).ok
    assert s.apply(RegisterNode(1, "r9", "h:2", 5 << 40, 1)).error == "rack_change"


def test_init_cluster_once() -> None:
    s = cluster()
    assert s.apply(InitCluster("c1")).ok
    assert s.apply(InitCluster("other")).error == "cluster_id"


def test_snapshot_round_trip_is_exact() -> None:
    s = cluster()
    for cmd in (CreateVolume("a", GiB, 1), CreateVolume("b", 3 * GiB, 2, "chain"), Attach("a", "g", 3),
                SetNodeStates((StateChange(2, "suspect", 1),), 4)):
        assert s.apply(cmd).ok
    text = s.to_json()
    assert MetaState.from_json(text).to_json() == text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


_cmds = st.sampled_from([
    CreateVolume("a", GiB, 1), CreateVolume("b", 2 * GiB, 1, "chain"), DeleteVolume("a"), DeleteVolume("b"),
    Attach("a", "g1", 2), Attach("a", "g2", 2), Attach("a", "g2", 3, True), Detach("a", "g1", 1),
    Detach("a", "g2", 2), SetNodeStates((StateChange(1, "down", 1),), 5),
    SetNodeStates((StateChange(1, "up", 6),), 7), SetGroupMembers(1, (4, 2, 3), 1),
    RegisterNode(4, "r0", "h:4", 1 << 40, 8), Noop(), CreateSnapshot("a", "s1", 3), CreateSnapshot("b", "s1", 4),
    SetSnapshotState("a", "s1", "ready"), SetSnapshotState("a", "s1", "deleting"), SetSnapshotState("a", "s1", "gone"),
])


@settings(max_examples=100, deadline=None)
@given(st.lists(_cmds, max_size=30))
def test_replicas_applying_the_same_log_agree(log: list) -> None:  # type: ignore[type-arg]
    """Determinism (what replication relies on): two replicas, one restored from a snapshot halfway."""
    a, b = cluster(), cluster()
    half = len(log) // 2
    results_a = [a.apply_encoded(encode_command(c)) for c in log]
    for c in log[:half]:
        b.apply_encoded(encode_command(c))
    b = MetaState.from_json(b.to_json())
    results_b = [b.apply_encoded(encode_command(c)) for c in log[half:]]
    assert results_a[half:] == results_b
    assert a.to_json() == b.to_json()
    for v in a.volumes.values():  # invariants hold after any sequence
        assert all(g in a.groups for g in v.extent_groups)
    assert all(n.reserved_bytes >= 0 for n in a.nodes.values())


def test_a_node_back_with_a_new_disk_leaves_its_groups_but_not_the_last_place() -> None:
    """A node that registers again with another disk id lost what its groups' members must hold: it
    leaves every group it is in (epoch + 1), chain or Raft (a voter that forgot its log and votes must not
    vote), except where it is the only member; the same disk id, or none, changes nothing."""
    from raftblock.meta.state import CreateVolume, InitCluster, MetaState, RegisterNode, SetGroupMembers

    st = MetaState()
    assert st.apply(InitCluster("c")).ok
    for i in (1, 2, 3):
        assert st.apply(RegisterNode(i, f"r{i}", f"h:{i}", 1 << 40, 0, disk_id=f"d{i}")).ok
    chain = st.apply(CreateVolume("c1", 64 << 20, 0, "chain")).value["groups"][0]
    solo = st.apply(CreateVolume("c2", 64 << 20, 0, "chain")).value["groups"][0]
    raft = st.apply(CreateVolume("r1", 64 << 20, 0, "raft")).value["groups"][0]
    assert st.apply(SetGroupMembers(solo, (1,), 1)).ok
    before = {g: (list(st.groups[g].members), st.groups[g].epoch) for g in (chain, solo, raft)}
    reserved = st.nodes[1].reserved_bytes
    assert st.apply(RegisterNode(1, "r1", "h:1", 1 << 40, 5, disk_id="d1")).value["left_groups"] == []
    assert st.apply(RegisterNode(1, "r1", "h:1", 1 << 40, 5)).value["left_groups"] == []
    res = st.apply(RegisterNode(1, "r1", "h:1", 1 << 40, 5, disk_id="new"))
    assert res.ok and res.value["left_groups"] == sorted([chain, raft])
    assert st.groups[chain].members == [m for m in before[chain][0] if m != 1]
    assert st.groups[chain].epoch == before[chain][1] + 1
    assert (st.groups[solo].members, st.groups[solo].epoch) == ([1], before[solo][1])  # never the last one
    assert st.groups[raft].members == [m for m in before[raft][0] if m != 1]
    assert st.groups[raft].epoch == before[raft][1] + 1
    assert st.nodes[1].disk_id == "new" and st.nodes[1].reserved_bytes == reserved - 2 * (64 << 20)
    assert MetaState.from_json(st.to_json()).to_json() == st.to_json()


def test_rename_keeps_the_volume_and_its_attach_epoch_and_is_refused_while_attached() -> None:
    s = cluster()
    assert s.apply(CreateVolume("v", GiB, 1)).ok
    assert s.apply(CreateVolume("other", GiB, 1)).ok
    att = s.apply(Attach("v", "gw1", 2))
    assert att.ok
    res = s.apply(RenameVolume("v", "w"))
    assert not res.ok and res.error == "attached"
    assert s.apply(Detach("v", "gw1", att.value["attach_epoch"])).ok
    assert s.apply(RenameVolume("v", "other")).error == "exists"
    assert s.apply(RenameVolume("v", "bad name!")).error == "invalid"
    assert s.apply(RenameVolume("nope", "x")).error == "not_found"
    before = s.volumes["v"]
    assert s.apply(RenameVolume("v", "w")).ok
    assert "v" not in s.volumes and s.volumes["w"] is before and before.name == "w"
    # the nodes fence by attach epoch: the renamed volume's next attach is newer than any before
    assert s.attach_epochs["w"] == att.value["attach_epoch"] and "v" not in s.attach_epochs
    assert s.apply(Attach("w", "gw2", 3)).value["attach_epoch"] == att.value["attach_epoch"] + 1


def test_a_gateway_inside_a_node_gives_its_volumes_leader_affinity() -> None:
    """node/agent.py rule 6: a volume attached through the gateway inside node N prefers N as the leader of
    its groups; a separate gateway (node_id 0) and a detached volume prefer nobody."""
    from raftblock.node.agent import leader_affinity

    s = cluster()
    assert s.apply(CreateVolume("v", GiB, 1)).ok
    groups = set(s.volumes["v"].extent_groups)
    assert s.apply(RegisterGateway("gw1", "127.0.0.1:10809", 2)).ok
    assert s.apply(RegisterGateway("n3", "127.0.0.1:10811", 2, 3)).ok
    assert s.gateways["n3"].node_id == 3 and s.gateways["gw1"].node_id == 0
    assert s.apply(RegisterGateway("bad", "127.0.0.1:1", 2, -1)).error == "invalid"
    assert leader_affinity(s) == {}
    assert s.apply(Attach("v", "gw1", 3)).ok
    assert leader_affinity(s) == {}  # a gateway machine: leaders stay where the map put them
    assert s.apply(Attach("v", "n3", 4, True)).ok
    assert leader_affinity(s) == {int(g): 3 for g in groups}
    epoch = s.attachments["v"].attach_epoch
    assert s.apply(Detach("v", "n3", epoch)).ok
    assert leader_affinity(s) == {}
    # an old snapshot without node_id still loads (gateways registered before issue 16)
    d = s.to_dict()
    for g in d["gateways"].values():
        g.pop("node_id")
    assert MetaState.from_dict(d).gateways["n3"].node_id == 0


def test_snapshot_records_name_hand_out_ids_and_walk_their_states() -> None:
    """docs/snapshots.md section 3: one name per volume, cluster-wide ids never reused, creating -> ready ->
    deleting -> gone (and creating -> deleting: a cut that failed), kept across a rename, gone with the
    volume, and in the snapshot of the state."""
    s = cluster()
    assert s.apply(CreateVolume("v", 3 * GiB, 1)).ok
    assert s.apply(CreateVolume("w", GiB, 1)).ok
    r = s.apply(CreateSnapshot("v", "s1", 10))
    assert r.ok and r.value["snap_id"] == 1
    assert r.value["groups"] == list(dict.fromkeys(int(g) for g in s.volumes["v"].extent_groups))
    assert s.apply(CreateSnapshot("v", "s1", 11)).error == "exists"
    assert s.apply(CreateSnapshot("w", "s1", 11)).value["snap_id"] == 2  # names are per volume
    assert s.apply(CreateSnapshot("nope", "s", 11)).error == "unknown_volume"
    assert s.apply(CreateSnapshot("v", "bad name!", 11)).error == "invalid"
    assert s.apply(SetSnapshotState("v", "s1", "gone")).error == "invalid"  # not before UNSNAP everywhere
    assert s.apply(SetSnapshotState("v", "s1", "ready")).ok
    assert s.apply(SetSnapshotState("v", "s1", "creating")).error == "invalid"
    assert s.apply(SetSnapshotState("v", "nope", "ready")).error == "unknown_snapshot"
    assert MetaState.from_json(s.to_json()).to_json() == s.to_json()
    assert s.apply(RenameVolume("v", "v2")).ok
    rec = s.snapshot_of("v2", "s1")
    assert rec is not None and rec.state == "ready" and rec.snap_id == 1
    assert s.apply(SetSnapshotState("v2", "s1", "deleting")).ok
    assert s.apply(SetSnapshotState("v2", "s1", "gone")).ok and s.snapshot_of("v2", "s1") is None
    assert s.apply(CreateSnapshot("v2", "s1", 12)).value["snap_id"] == 3  # ids are never reused
    assert s.apply(DeleteVolume("v2")).ok
    assert [r.name for r in s.snapshots.values()] == ["s1"] and s.snapshot_of("w", "s1") is not None
    old = json.loads(s.to_json())
    del old["snapshots"], old["next_snap_id"]  # a state saved before snapshots existed still loads
    assert MetaState.from_dict(old).snapshots == {}


def test_clones_and_restore_targets_in_the_map() -> None:
    """A clone names a ready snapshot and is at least its size; neither the snapshot nor its volume can be
    deleted while a clone reads through to it; detaching the parent (flatten) ends that; a restore target is
    created `restoring` and turns ready or failed only from there; clone chains are bounded."""
    from raftblock.meta.state import CLONE_DEPTH_MAX

    s = cluster()
    assert s.apply(CreateVolume("v", GiB, 1)).ok
    assert s.apply(CreateSnapshot("v", "s1", 2)).ok
    assert s.apply(CreateVolume("c", GiB, 3, parent="v@s1")).error == "unknown_snapshot"  # still creating
    assert s.apply(SetSnapshotState("v", "s1", "ready")).ok
    assert s.apply(CreateVolume("c", GiB // 2, 3, parent="v@s1")).error == "invalid"  # smaller than the snapshot
    assert s.apply(CreateVolume("c", GiB, 3, parent="nope@s1")).error == "unknown_volume"
    assert s.apply(CreateVolume("c", GiB, 3, parent="v@s1")).ok
    c = s.volumes["c"]
    assert (c.parent_volume_id, c.parent_snap_id) == (s.volumes["v"].volume_id, 1)
    assert s.apply(SetSnapshotState("v", "s1", "deleting")).error == "has_clones"
    assert s.apply(DeleteVolume("v")).error == "has_clones"
    assert s.apply(SetVolumeState("c", detach_parent=True)).ok and s.volumes["c"].parent_volume_id == 0
    assert s.apply(SetSnapshotState("v", "s1", "deleting")).ok
    assert s.apply(CreateVolume("r", GiB, 4, state="restoring", origin="s3://b/x")).ok
    assert s.apply(SetVolumeState("r", "ready", expected="ready")).error == "invalid"
    assert s.apply(SetVolumeState("r", "failed", expected="restoring")).ok and s.volumes["r"].state == "failed"
    assert s.apply(CreateVolume("x", GiB, 4, state="failed")).error == "invalid"
    assert MetaState.from_json(s.to_json()).to_json() == s.to_json()
    prev = "c"  # flattened above: the root of a new chain
    for depth in range(1, CLONE_DEPTH_MAX + 1):
        assert s.apply(CreateSnapshot(prev, "s", 5)).ok and s.apply(SetSnapshotState(prev, "s", "ready")).ok
        r = s.apply(CreateVolume(f"d{depth}", GiB, 6, parent=f"{prev}@s"))
        if depth < CLONE_DEPTH_MAX:  # d{depth} reads through depth volumes
            assert r.ok, (depth, r)
            prev = f"d{depth}"
        else:
            assert r.error == "invalid" and "flatten" in r.message, (depth, r)
            break


def test_resize_grows_with_new_groups_and_shrinks_only_when_allowed() -> None:
    s = cluster()
    assert s.apply(CreateVolume("v", GiB, 1)).ok  # 16 extents in 2 groups
    before = list(s.volumes["v"].extent_groups)
    r = s.apply(ResizeVolume("v", 2 * GiB))
    assert r.ok and len(r.value["groups"]) == 2, r
    v = s.volumes["v"]
    assert v.size_bytes == 2 * GiB and v.extent_groups[:16] == before and len(v.extent_groups) == 32
    assert set(v.extent_groups[16:]) == {GroupId(g) for g in r.value["groups"]}
    assert len(s.apply(ResizeVolume("v", 2 * GiB + 4096)).value["groups"]) == 1  # one more extent, a new group
    assert s.apply(ResizeVolume("v", 2 * GiB + 8192)).value["groups"] == []  # inside the last extent
    assert len(s.volumes["v"].extent_groups) == 33
    assert s.apply(ResizeVolume("v", GiB)).error == "shrink"
    assert s.apply(ResizeVolume("v", 1000)).error == "invalid"
    assert s.apply(CreateSnapshot("v", "s", 1)).ok
    assert s.apply(ResizeVolume("v", GiB, True)).error == "has_snapshots"
    assert s.apply(SetSnapshotState("v", "s", "deleting")).ok and s.apply(SetSnapshotState("v", "s", "gone")).ok
    assert s.apply(Attach("v", "gw1", 1)).ok
    assert s.apply(ResizeVolume("v", GiB, True)).error == "attached"
    assert s.apply(Detach("v", "gw1", s.attachments["v"].attach_epoch)).ok
    reserved = {n: s.nodes[n].reserved_bytes for n in s.nodes}
    added = set(s.groups) - set(before)
    r = s.apply(ResizeVolume("v", GiB, True))
    assert r.ok and sorted(r.value["removed_groups"]) == sorted(int(g) for g in added), r
    assert s.volumes["v"].extent_groups == before and set(s.groups) == set(before)
    assert sum(s.nodes[n].reserved_bytes for n in s.nodes) < sum(reserved.values())
    assert MetaState.from_json(s.to_json()).to_json() == s.to_json()
