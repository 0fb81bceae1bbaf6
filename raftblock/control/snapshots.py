# Snapshots driven from the control plane: `raftblock snapshot create|list|delete` (docs/snapshots.md
# sections 2 and 3).
#
# Owns: the order of a cut across processes (metadata records, the writers' acknowledgement barriers, the
# SNAP ops) and its clean failure. The gateways' side is node/gateway.py (admin op `hold`, rule 6); the
# replicas' side is the SNAP op (wire/ops.py, replication/apply.py rule 6).
#
# Rules:
# 1. create: the records first (CreateSnapshot: `creating`, one snap_id per volume), then the map is read
#    again (a linearizable read, after the records): the gateway of every attached volume raises its
#    acknowledgement barrier (`hold`, kept for as long as the admin connection); only once every barrier is
#    up does a SNAP op go to any group, to every group of every volume (proposed here through any node:
#    the same op the gateway would propose); once all committed the barriers fall (the cut is made), then
#    the records become `ready`.
#    A gateway that attaches a volume while one of its snapshots is `creating` waits for it first
#    (gateway rule 6): either the attach came first, and this read sees it, or the cut completes before
#    the new writer acknowledges anything. So no cut is ever made without its writer's barrier.
# 2. Anything failing before `ready` (a gateway unreachable, a group without a leader, a record taken
#    over): UNSNAP in every group, the records gone; never half visible. If even that fails, the record
#    stays `deleting` and `snapshot delete` finishes it.
# 3. delete: `deleting`, UNSNAP in every group of the volume (idempotent on the replicas), then gone. No
#    data moves in the foreground: what only that snapshot kept becomes garbage for the cleaner.
# 4. Group snapshots (several volumes, one name) follow rule 1 with every volume's barrier up before the
#    first SNAP op: consistent with each other.
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from raftblock.client.router import GroupClient, NodeClient
from raftblock.client.volume import Volume
from raftblock.meta.rpc import MetaClient
from raftblock.meta.state import MetaState, SnapshotRecord
from raftblock.node.clustermap import volume_infos
from raftblock.replication.group import GroupError
from raftblock.sealing import VolumeKeys
from raftblock.wire.auth import KeyRing

log = structlog.get_logger(__name__)

HOLD_TIMEOUT_S = 30.0  # a gateway lowers a barrier on its own after this long (a CLI that hung)


class SnapshotError(Exception):
    """A snapshot command that could not be done; the message is the one line the operator sees."""


async def _no_epoch(key_id: int) -> int:
    raise SnapshotError(f"this command reads encrypted volumes (key id {key_id}), it does not write them")


class ClusterIO:
    """The data path as the control plane uses it: group clients in each group's mode, at the attach epoch of
    the volume they serve (so the nodes accept them next to the volume's gateway)."""

    def __init__(self, st: MetaState, peers: dict[int, tuple[str, int]], deadline_s: float = 20.0,
                 secret: bytes | None = None, new_epoch: Callable[[int], Awaitable[int]] | None = None) -> None:
        """`new_epoch`: the metadata group's NextSealEpoch, for a tool that writes to encrypted volumes
        (raftblock/sealing.py rule 3); without it, their blocks can be read, not written."""
        self.st = st
        self.deadline_s = deadline_s
        self.keys = VolumeKeys(secret, new_epoch or _no_epoch)
        self.keys.update(st.master_keys)
        vol_of = {int(g): v.volume_id for v in st.volumes.values() for g in v.extent_groups}
        # `secret`: the cluster secret, to unwrap the data port's keys (raftblock/wire/auth.py)
        ring = KeyRing.from_map(secret, st.data_key_set()) if secret is not None else None
        self.client = NodeClient(peers, deadline_s=deadline_s, ring=ring, volume_of=lambda g: vol_of.get(g, 0))
        for gid, g in st.groups.items():
            if g.mode == "chain" and g.members:
                self.client.leaders[int(gid)] = int(g.members[0])
                self.client.leaders[-int(gid)] = int(g.members[-1])

    def group(self, gid: int, epoch: int = 0) -> GroupClient:
        g = self.st.groups.get(gid)  # type: ignore[call-overload]
        mode = "chain" if g is not None and g.mode == "chain" else "raft"
        return GroupClient(self.client, gid, self.deadline_s, epoch=epoch, mode=mode)

    def groups_of(self, volume: str) -> list[GroupClient]:
        v = self.st.volumes[volume]
        epoch = self.st.attach_epochs.get(volume, 0)
        return [self.group(int(g), epoch) for g in dict.fromkeys(v.extent_groups)]

    def volume(self, name: str) -> Volume:
        info = next(i for i in volume_infos(self.st, ("ready", "restoring", "failed")) if i.name == name)
        epoch = self.st.attach_epochs.get(name, 0)
        cache: dict[int, GroupClient] = {}

        def group_for(extent_id: int) -> GroupClient:
            gid = extent_id >> 32
            if gid not in cache:
                cache[gid] = self.group(gid, epoch)
            return cache[gid]

        return Volume(info, group_for, self.keys)

    async def close(self) -> None:
        await self.client.close()


class GatewayHold:
    """One gateway's acknowledgement barrier on some volumes, held while the admin connection is open."""

    def __init__(self, gateway_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gateway_id = gateway_id
        self.reader = reader
        self.writer = writer

    @classmethod
    async def raise_(cls, gateway_id: str, sock: Path | str, volumes: list[str], timeout_s: float = 10.0,
                     secret: bytes | None = None) -> GatewayHold:
        """`sock`: the gateway's unix socket, or its TCP admin address (answered with `secret`)."""
        from raftblock.gateway.admin import AdminAuthError, connect

        try:
            reader, writer = await connect(sock, secret, timeout_s)
            writer.write(json.dumps({"op": "hold", "volumes": volumes, "timeout_s": HOLD_TIMEOUT_S}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        except (OSError, TimeoutError, AdminAuthError) as e:
            raise SnapshotError(f"gateway {gateway_id} (which has {', '.join(volumes)} attached) did not raise its "
                                f"barrier: {e or type(e).__name__}") from e
        try:
            resp = json.loads(line)
        except ValueError:
            resp = {"ok": False, "error": f"unreadable reply {line[:80]!r}"}
        if not resp.get("ok"):
            writer.close()
            raise SnapshotError(f"gateway {gateway_id} refused to hold {', '.join(volumes)}: {resp.get('error')}")
        return cls(gateway_id, reader, writer)

    async def lower(self) -> None:
        try:
            self.writer.write(b'{"op": "release"}\n')
            await self.writer.drain()
            await asyncio.wait_for(self.reader.readline(), 5.0)
        except (OSError, TimeoutError):
            pass  # the gateway lowers it itself when the connection ends
        finally:
            self.writer.close()


@dataclass
class Created:
    volume: str
    name: str
    snap_id: int
    created_ms: int
    groups: list[int]
    barrier_ms: float  # how long the writers' acknowledgements were held (0: no volume was attached)


def _ok(res: Any) -> dict[str, Any]:
    if not res.ok:
        raise SnapshotError(res.message or res.error)
    return dict(res.value or {})


async def create(meta: MetaClient, peers: dict[int, tuple[str, int]], volumes: list[str], name: str,
                 gateway_socket: Callable[[str], Path | str | None], deadline_s: float = 20.0) -> list[Created]:
    """Rule 1: snapshot `name` of every volume in `volumes`, one crash-consistent cut across all of them."""
    if len(set(volumes)) != len(volumes):
        raise SnapshotError(f"a volume is named twice in {','.join(volumes)}")
    made: list[str] = []
    try:
        for v in volumes:
            _ok(await meta.create_snapshot(v, name))
            made.append(v)
    except SnapshotError:
        await _forget(meta, None, made, name)
        raise
    st = await meta.state(barrier=True)
    io = ClusterIO(st, peers, deadline_s, secret=meta.secret)
    holds: list[GatewayHold] = []
    out: list[Created] = []
    try:
        lazy = [v for v in volumes if st.volumes[v].lazy_source]
        if lazy:  # its snapshot would miss the chunks not restored yet
            raise SnapshotError(f"volume {', '.join(lazy)} is still being restored lazily: snapshot it once "
                                f"`snapshot restore --lazy` has finished")
        by_gateway: dict[str, list[str]] = {}
        for v in volumes:
            att = st.attachments.get(v)
            if att is not None:
                by_gateway.setdefault(att.gateway_id, []).append(v)
        t0 = time.monotonic()
        for gw, vols in sorted(by_gateway.items()):
            sock = gateway_socket(gw)
            if sock is None:
                raise SnapshotError(f"volume {', '.join(vols)} is attached by gateway {gw}, which cannot be reached "
                                    f"from here (not running on this machine, and no admin_listen in its config): "
                                    f"its writes cannot be held for the cut (give it admin_listen, or run this "
                                    f"on its machine, or detach it: raftblock volume detach --force)")
            holds.append(await GatewayHold.raise_(gw, sock, vols, secret=meta.secret))
        try:
            await asyncio.gather(*(g.snapshot(st.snapshot_of(v, name).snap_id)  # type: ignore[union-attr]
                                   for v in volumes for g in io.groups_of(v)))
        except GroupError as e:
            raise SnapshotError(f"a group did not take the snapshot: {e}") from e
        barrier_ms = (time.monotonic() - t0) * 1000 if holds else 0.0
        for h in holds:  # the cut is made: every SNAP op committed (the record becomes ready after)
            await h.lower()
        holds = []
        for v in volumes:
            _ok(await meta.set_snapshot_state(v, name, "ready"))
        for v in volumes:
            r = st.snapshot_of(v, name)
            assert r is not None
            out.append(Created(v, name, r.snap_id, r.created_ms, [int(g) for g in dict.fromkeys(st.volumes[v].extent_groups)],
                               barrier_ms))
        return out
    except BaseException:
        await _forget(meta, io, made, name)
        raise
    finally:
        for h in holds:
            await h.lower()
        await io.close()


async def _forget(meta: MetaClient, io: ClusterIO | None, volumes: list[str], name: str) -> None:
    """Rule 2: a cut that failed leaves nothing: UNSNAP everywhere, records gone (else left `deleting`)."""
    for v in volumes:
        try:
            if io is None:  # no SNAP op was proposed: nothing is pinned anywhere
                _ok(await meta.set_snapshot_state(v, name, "deleting"))
                _ok(await meta.set_snapshot_state(v, name, "gone"))
                continue
            await delete(meta, io, v, name, io.st)
        except (SnapshotError, GroupError, OSError, TimeoutError) as e:
            log.warning("snapshot.cleanup_failed", volume=v, name=name, error=str(e))


async def delete(meta: MetaClient, io: ClusterIO | None, volume: str, name: str, st: MetaState,
                 peers: dict[int, tuple[str, int]] | None = None) -> SnapshotRecord:
    """Rule 3."""
    r = st.snapshot_of(volume, name)
    if r is None:
        if volume not in st.volumes:
            raise SnapshotError(f"no volume {volume}")
        raise SnapshotError(f"volume {volume} has no snapshot {name}")
    if r.state != "deleting":
        _ok(await meta.set_snapshot_state(volume, name, "deleting"))
    own = io is None
    if io is None:
        assert peers is not None
        io = ClusterIO(st, peers, secret=meta.secret)
    try:
        await asyncio.gather(*(g.snapshot(r.snap_id, drop=True) for g in io.groups_of(volume)))
    except GroupError as e:
        raise SnapshotError(f"snapshot {volume}@{name} is being deleted, but a group did not drop it yet: {e} "
                            f"(run the delete again once the group is back)") from e
    finally:
        if own:
            await io.close()
    _ok(await meta.set_snapshot_state(volume, name, "gone"))
    return r


async def stats(io: ClusterIO, volume: str) -> dict[int, int]:
    """snap_id -> blocks only that snapshot keeps (what deleting it frees), summed over the volume's groups,
    as each group's leader (or chain tail) counts them."""
    out: dict[int, int] = {}
    for g in io.groups_of(volume):
        for sid, n in (await g.snapshot_stats()).items():
            out[sid] = out.get(sid, 0) + n
    return out
