# The metadata admin port: how processes outside the metadata group (CLI, gateway, storage nodes, tests)
# propose commands, read the map and send heartbeats. JSON lines over TCP; no pickle.
#
# Rules:
# 1. Authenticate first: the server sends {"hello": NONCE}; the client answers {"auth": HMAC-SHA256(secret,
#    "raftblock-meta-admin" + NONCE)}; anything else closes the connection. Nothing is acted on before.
# 2. Bounded: a request line is at most `LINE_BYTES_MAX`; a connection serves requests one at a time;
#    the server holds at most `connections_max` connections.
# 3. Requests: {"op": "propose", "command": {...}} | {"op": "state", "barrier": bool, "known": N} | {"op": "status"}
#    ("known": the applied count of the caller's copy; answered {"unchanged": true} when it is current)
#    | {"op": "heartbeat", "node_id": N, "used_bytes": B, "chains": {GID: [EPOCH, CONFIGURED, CAUGHT_UP]},
#       "raft": {GID: [CONF_EPOCH, CAUGHT_UP_MASK, VOTER...]} (the Raft groups the node leads)}
#    (answered with "lease_ms": the chain lease the node may take, docs/chain.md). Replies: {"ok": true, ...} or
#    {"ok": false, "error": CODE, "message": TEXT, "leader": ID|null}. A heartbeat to a follower answers
#    error "not_leader" with the leader's id; the client follows it.
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import structlog

from raftblock import tls
from raftblock.meta.group import MetaNode, MetaUnavailable, NotLeader
from raftblock.meta.state import (
    Attach,
    Command,
    CommandError,
    CreateSnapshot,
    CreateVolume,
    DeleteVolume,
    Detach,
    MetaState,
    NextSealEpoch,
    RegisterGateway,
    RegisterNode,
    RemoveNode,
    RenameVolume,
    ResizeVolume,
    Result,
    SetDataKey,
    SetIscsiAuth,
    SetMasterKey,
    SetQos,
    SetReservation,
    SetSnapshotState,
    SetVolumeState,
    command_from_dict,
    encode_command,
)
from raftblock.qos import UNSET, QosSpec
from raftblock.replication.raft.types import NodeId

log = structlog.get_logger(__name__)

# Commands an operator or a control loop issues that change the map: logged once, by the metadata node
# that took the proposal, as the audit trail (heartbeats and node-state batches are not: too frequent or
# logged by the failure detector itself).
AUDITED = frozenset({"create_volume", "delete_volume", "rename_volume", "attach", "detach", "set_node_drain",
                     "register_node", "register_gateway", "set_group_members", "create_snapshot", "set_snapshot_state",
                     "set_volume_state", "resize_volume", "remove_node", "set_iscsi_auth", "set_qos",
                     "set_data_key", "set_master_key"})
# never in a log line
_SECRET_FIELDS = frozenset({"secret", "target_secret", "wrapped", "data_key", "encrypt_key", "rewrapped"})

LINE_BYTES_MAX = 8 << 20  # a state reply for a large cluster fits
_AUTH_CONTEXT = b"raftblock-meta-admin"


def _mac(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, _AUTH_CONTEXT + nonce.encode(), hashlib.sha256).hexdigest()


def _split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class AdminServer:
    def __init__(self, node: MetaNode, address: str, secret: bytes, connections_max: int = 64) -> None:
        self.node = node
        self.address = address
        self.secret = secret
        self.connections_max = connections_max
        self._conns = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = _split(self.address)
        # TLS (raftblock/tls.py) when the process has an identity: mutual, certificates of the cluster CA
        self._server = await asyncio.start_server(self._serve, host, port, limit=LINE_BYTES_MAX,
                                                  ssl=tls.server_ctx())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._conns >= self.connections_max:
            writer.close()
            return
        self._conns += 1
        try:
            nonce = os.urandom(16).hex()
            writer.write(json.dumps({"hello": nonce}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                auth = json.loads(line).get("auth", "")
            except (ValueError, AttributeError, RecursionError):  # deeply nested JSON too
                auth = ""
            if not isinstance(auth, str) or not hmac.compare_digest(auth, _mac(self.secret, nonce)):
                log.warning("meta_admin_auth_refused", peer=str(writer.get_extra_info("peername")))
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                reply = await self._handle(line, str(writer.get_extra_info("peername")))
                writer.write(json.dumps(reply, sort_keys=True).encode() + b"\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            return
        finally:
            self._conns -= 1
            writer.close()

    async def _handle(self, line: bytes, peer: str = "") -> dict[str, Any]:
        try:
            req = json.loads(line)
            op = req["op"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return {"ok": False, "error": "bad_request", "message": "a JSON object with an op"}
        node = self.node
        try:
            if op == "propose":
                cmd = command_from_dict(req.get("command"))
                res = await node.propose(cmd)
                if cmd.op in AUDITED:  # the audit trail: who changed the map, as applied (`raftblock logs`)
                    fields = {k: ("<set>" if v else "") if k in _SECRET_FIELDS else v
                              for k, v in asdict(cmd).items() if k != "now_ms"}
                    if not res.ok:
                        fields.update(refused=res.error, message=res.message)
                    (log.info if res.ok else log.warning)("meta_audit", command=cmd.op, ok=res.ok, peer=peer,
                                                          **fields)
                return {"ok": True, "result": res.to_json()}
            if op == "state":
                barrier = req.get("barrier", True)
                st = await node.read() if barrier else node.state()
                known = req.get("known")
                if not barrier and isinstance(known, int) and known == st.applied:
                    return {"ok": True, "unchanged": True, "node_id": node.config.node_id}  # cheap poll
                return {"ok": True, "state": st.to_dict(), "node_id": node.config.node_id}
            if op == "status":
                return {"ok": True, "status": node.status()}
            if op == "heartbeat":
                nid, used = req.get("node_id"), req.get("used_bytes")
                if not isinstance(nid, int) or (used is not None and not isinstance(used, int)):
                    return {"ok": False, "error": "bad_request", "message": "node_id: int, used_bytes: int"}
                chains = _chain_report(req.get("chains"))
                if chains is None and req.get("chains") is not None:
                    return {"ok": False, "error": "bad_request",
                            "message": "chains: {group id: [epoch, configured, caught_up]}"}
                raft = _report(req.get("raft"), 2, 10)
                if raft is None and req.get("raft") is not None:
                    return {"ok": False, "error": "bad_request",
                            "message": "raft: {group id: [configuration epoch, caught-up mask, voter...]}"}
                lease_ms, epochs = node.heartbeat(NodeId(nid), used, chains, raft)
                return {"ok": True, "lease_ms": lease_ms, "chain_epochs": {str(k): v for k, v in epochs.items()}}
            return {"ok": False, "error": "bad_request", "message": f"unknown op {op!r}"}
        except CommandError as e:
            return {"ok": False, "error": "bad_request", "message": str(e)}
        except NotLeader as e:
            return {"ok": False, "error": "not_leader", "message": str(e), "leader": e.leader}
        except MetaUnavailable as e:
            return {"ok": False, "error": "unavailable", "message": e.reason, "leader": node.leader_id(),
                    "outcome_unknown": e.outcome_unknown}


def _chain_report(raw: Any) -> dict[int, list[int]] | None:
    """A heartbeat's chain report, validated: {"gid": [int, int, int]} (JSON object keys are strings)."""
    return _report(raw, 3, 3)


def _report(raw: Any, n_min: int, n_max: int) -> dict[int, list[int]] | None:
    """{"gid": [n_min..n_max non-negative ints]}, validated; None if anything is off."""
    if not isinstance(raw, dict) or len(raw) > 1 << 20:
        return None
    out: dict[int, list[int]] = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit() and isinstance(v, list) and n_min <= len(v) <= n_max
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)):
            return None
        out[int(k)] = [int(x) for x in v]
    return out


class MetaClientError(Exception):
    pass


class MetaClient:
    """Talks to the metadata group through any member's admin port; follows the leader; retries within
    `deadline_s`. Use from asyncio."""

    def __init__(self, admin: Mapping[NodeId, str], secret: bytes, attempt_timeout_s: float = 3.0,
                 deadline_s: float = 20.0) -> None:
        self.admin = dict(admin)
        self.secret = secret
        self.attempt_timeout_s = attempt_timeout_s
        self.deadline_s = deadline_s
        self.leader: NodeId | None = None

    async def call(self, node_id: NodeId, req: dict[str, Any]) -> dict[str, Any]:
        """One request to one node (no retry)."""
        host, port = _split(self.admin[node_id])

        async def go() -> dict[str, Any]:
            ctx = tls.client_ctx()
            reader, writer = await asyncio.open_connection(host, port, limit=LINE_BYTES_MAX, ssl=ctx,
                                                           server_hostname=tls.meta_name(int(node_id)) if ctx else None)
            try:
                hello = json.loads(await reader.readline())
                writer.write(json.dumps({"auth": _mac(self.secret, hello["hello"])}).encode() + b"\n")
                writer.write(json.dumps(req).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
                if not line:
                    raise ConnectionError(f"metadata node {node_id} closed the connection (bad secret?)")
                reply: dict[str, Any] = json.loads(line)
                return reply
            finally:
                writer.close()

        return await asyncio.wait_for(go(), self.attempt_timeout_s)

    async def _retrying(self, req: dict[str, Any], leader_only: bool) -> dict[str, Any]:
        deadline = time.monotonic() + self.deadline_s
        last = "no metadata node answered"
        order = sorted(self.admin)
        i = 0
        while time.monotonic() < deadline:
            target = self.leader if self.leader in self.admin else order[i % len(order)]
            i += 1
            try:
                reply = await self.call(target, req)  # type: ignore[arg-type]
            except (OSError, ConnectionError, TimeoutError, ValueError, KeyError) as e:
                last = f"node {target}: {e!r}"
                self.leader = None
                await asyncio.sleep(0.1)
                continue
            if reply.get("ok"):
                if leader_only or req["op"] == "propose":
                    self.leader = target
                return reply
            if reply.get("error") in ("not_leader", "unavailable"):
                last = f"node {target}: {reply.get('error')}: {reply.get('message')}"
                hint = reply.get("leader")
                self.leader = NodeId(hint) if isinstance(hint, int) and hint != target else None
                await asyncio.sleep(0.1 if self.leader is None else 0)
                continue
            raise MetaClientError(f"{reply.get('error')}: {reply.get('message')}")
        raise MetaClientError(f"metadata group unavailable for {self.deadline_s}s: {last}")

    async def propose(self, cmd: Command) -> Result:
        reply = await self._retrying({"op": "propose", "command": json.loads(encode_command(cmd))}, False)
        return Result.from_json(reply["result"])

    async def state(self, barrier: bool = True) -> MetaState:
        reply = await self._retrying({"op": "state", "barrier": barrier}, False)
        return MetaState.from_dict(reply["state"])

    async def state_if_changed(self, known: MetaState | None) -> MetaState:
        """The map as the answering metadata node has it (no barrier); `known` back, not copied, when that
        node has applied nothing since (a poll several times a second stays cheap)."""
        req: dict[str, Any] = {"op": "state", "barrier": False}
        if known is not None:
            req["known"] = known.applied
        reply = await self._retrying(req, False)
        if reply.get("unchanged") and known is not None:
            return known
        return MetaState.from_dict(reply["state"])

    async def status(self, node_id: NodeId) -> dict[str, Any]:
        reply = await self.call(node_id, {"op": "status"})
        status: dict[str, Any] = reply["status"]
        return status

    async def heartbeat(self, node_id: NodeId, used_bytes: int | None = None,
                        chains: dict[int, list[int]] | None = None,
                        raft: dict[int, list[int]] | None = None) -> tuple[int, dict[int, int]]:
        """Returns the chain lease the metadata leader grants: (ms from before the call, {group: epoch});
        (0, {}) if none (MetaNode.heartbeat)."""
        req: dict[str, Any] = {"op": "heartbeat", "node_id": int(node_id), "used_bytes": used_bytes}
        if chains is not None:
            req["chains"] = {str(k): v for k, v in chains.items()}
        if raft is not None:
            req["raft"] = {str(k): v for k, v in raft.items()}
        reply = await self._retrying(req, True)
        lease = reply.get("lease_ms", 0)
        raw = reply.get("chain_epochs", {})
        epochs = {int(k): int(v) for k, v in raw.items() if str(k).isdigit() and isinstance(v, int)} \
            if isinstance(raw, dict) else {}
        return (lease if isinstance(lease, int) else 0), epochs

    # -- conveniences --------------------------------------------------------------------------------

    async def register_node(self, node_id: int, rack: str, address: str, capacity_bytes: int,
                            disk_id: str = "", http: str = "") -> Result:
        return await self.propose(RegisterNode(node_id, rack, address, capacity_bytes, _now_ms(), disk_id, http))

    async def remove_node(self, node_id: int) -> Result:
        return await self.propose(RemoveNode(node_id))

    async def create_volume(self, name: str, size_bytes: int, mode: str = "raft", state: str = "ready",
                            parent: str = "", origin: str = "", lazy_source: str = "",
                            qos: QosSpec = UNSET, encrypt: bool = False,
                            seal_from: dict[str, Any] | None = None) -> Result:
        """`encrypt`: a new data key (raftblock/sealing.py), wrapped here by the active master key (made first if
        the cluster has none); wrapped again if the master key changed meanwhile. `seal_from`: the key of an
        encrypted volume's backup ({key_id, master, wrapped}: backup/manifest.py rule 3), the restored volume's."""
        for _ in range(5):
            if seal_from is not None:
                try:
                    key, master, key_id = await self._restored_volume_key(seal_from)
                except ValueError as e:
                    return Result(False, "unknown_key", str(e))
            else:
                key, master, key_id = await self._new_volume_key() if encrypt else ("", 0, 0)
            res = await self.propose(CreateVolume(name, size_bytes, _now_ms(), mode, qos.iops, qos.bytes_per_s,
                                                  qos.burst_iops, qos.burst_bytes, qos.min_iops, qos.weight,
                                                  state=state, parent=parent, origin=origin, lazy_source=lazy_source,
                                                  encrypt_key=key, encrypt_master=master, encrypt_key_id=key_id))
            if res.error != "stale_master":
                return res
        return res

    async def _new_volume_key(self) -> tuple[str, int, int]:
        from raftblock import sealing

        st = await self.state(barrier=True)
        if not st.master_key_active:
            await self.rotate_master_key(st)
            st = await self.state(barrier=True)
        v = st.master_key_active
        master = self._master_key(st, v)
        key_id = secrets.randbits(63) or 1
        return sealing.wrap_volume_key(master, key_id, sealing.new_data_key()), v, key_id

    def _master_key(self, st: MetaState, version: int) -> bytes:
        """The map's master key of `version`, unwrapped with the cluster secret (raftblock/sealing.py rule 5)."""
        from raftblock import sealing

        return sealing.unwrap_master_key(self.secret, version, st.master_keys[version])

    async def _restored_volume_key(self, seal: dict[str, Any]) -> tuple[str, int, int]:
        from raftblock import sealing

        st = await self.state(barrier=True)
        wrapped_master = st.master_keys.get(int(seal["master"]))
        if wrapped_master is None or not st.master_key_active:
            raise ValueError(f"the backup's key is wrapped by master key {seal['master']}, which this cluster does "
                             f"not have (a backup of another cluster?)")
        key_id = int(seal["key_id"])
        try:
            old = sealing.unwrap_master_key(self.secret, int(seal["master"]), wrapped_master)
            key = sealing.unwrap_volume_key(old, key_id, str(seal["wrapped"]))
        except ValueError as e:
            raise ValueError(f"the backup's key does not unwrap in this cluster: {e}") from e
        v = st.master_key_active
        return sealing.wrap_volume_key(self._master_key(st, v), key_id, key), v, key_id

    async def rotate_master_key(self, st: MetaState | None = None) -> Result:
        """A new master key, every encrypted volume's data key rewrapped by it (sealing.py rule 5): no data is
        rewritten. Retried when a volume was created meanwhile."""
        from raftblock import sealing

        res = Result(False, "stale_master", "not tried")
        for _ in range(5):
            st = st if st is not None else await self.state(barrier=True)
            version = max(st.master_keys, default=0) + 1
            new = sealing.new_data_key()
            rewrapped = {}
            for vol in st.volumes.values():
                if vol.enc_key_id:
                    old = self._master_key(st, vol.enc_master)
                    key = sealing.unwrap_volume_key(old, vol.enc_key_id, vol.enc_key)
                    rewrapped[str(vol.volume_id)] = sealing.wrap_volume_key(new, vol.enc_key_id, key)
            res = await self.propose(SetMasterKey(st.master_key_active, version,
                                                  sealing.wrap_master_key(self.secret, version, new),
                                                  json.dumps(rewrapped)))
            if res.error != "stale_master":
                return res
            st = None
        return res

    async def next_seal_epoch(self, key_id: int) -> int:
        res = await self.propose(NextSealEpoch(key_id))
        if not res.ok:
            from raftblock.replication.group import Unavailable

            raise Unavailable(f"no nonce epoch for key id {key_id}: {res.message or res.error}")
        return int(res.value["epoch"])

    async def set_qos(self, name: str, qos: QosSpec) -> Result:
        return await self.propose(SetQos(name, qos.iops, qos.bytes_per_s, qos.burst_iops, qos.burst_bytes,
                                         qos.min_iops, qos.weight))

    async def resize_volume(self, name: str, size_bytes: int, allow_shrink: bool = False) -> Result:
        return await self.propose(ResizeVolume(name, size_bytes, allow_shrink))

    async def set_volume_state(self, name: str, state: str = "", expected: str = "",
                               detach_parent: bool = False, lazy_done: bool = False) -> Result:
        return await self.propose(SetVolumeState(name, state, expected, detach_parent, lazy_done))

    async def delete_volume(self, name: str) -> Result:
        return await self.propose(DeleteVolume(name))

    async def attach(self, volume: str, gateway_id: str, force: bool = False) -> Result:
        return await self.propose(Attach(volume, gateway_id, _now_ms(), force))

    async def detach(self, volume: str, gateway_id: str, attach_epoch: int) -> Result:
        return await self.propose(Detach(volume, gateway_id, attach_epoch))

    async def rename_volume(self, name: str, new_name: str) -> Result:
        return await self.propose(RenameVolume(name, new_name))

    async def register_gateway(self, gateway_id: str, address: str, node_id: int = 0, http: str = "",
                               admin: str = "") -> Result:
        return await self.propose(RegisterGateway(gateway_id, address, _now_ms(), node_id, http, admin))

    async def create_snapshot(self, volume: str, name: str) -> Result:
        return await self.propose(CreateSnapshot(volume, name, _now_ms()))

    async def set_snapshot_state(self, volume: str, name: str, state: str) -> Result:
        return await self.propose(SetSnapshotState(volume, name, state))

    async def set_iscsi_auth(self, volume: str, user: str = "", secret: str = "", target_user: str = "",
                             target_secret: str = "") -> Result:
        return await self.propose(SetIscsiAuth(volume, user, secret, target_user, target_secret))

    async def set_data_key(self, action: str, version: int, wrapped: str = "") -> Result:
        return await self.propose(SetDataKey(action, version, wrapped))

    async def set_reservation(self, volume_id: int, expected_version: int, blob: str) -> Result:
        return await self.propose(SetReservation(volume_id, expected_version, blob))


def _now_ms() -> int:
    """Wall-clock ms for records (created_ms, registered_ms); ordering never depends on it."""
    return int(time.time() * 1000)
