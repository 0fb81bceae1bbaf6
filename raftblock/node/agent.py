"""MetaAgent: a storage node's link to the metadata group.

Owns: registering the node (rack, data address, capacity), heartbeating the metadata leader, and
reconciling the groups this node hosts with the map (a group whose members include this node is
hosted; members[0] is its preferred leader, or a chain's head), handing chain groups their configuration
(members and epoch) and, after each heartbeat the metadata leader accepted, their lease.

Rules:
1. Heartbeats are not log entries (the metadata leader keeps them in memory); they carry used bytes and
   the node's chain and Raft reports.
2. Heartbeats travel on their own path: a thread of the agent (its own event loop, its own MetaClient
   and connections) sends one every `interval_s`, so bulk work on the node's event loop (a snapshot
   install, the log tail after it, compaction, scrub) never delays them into a `suspect` (issue 13: a
   node receiving a rebuild was suspected 3 times in 15 s, each time a chain volume's 20 groups lost and
   took it back). The thread carries the loop's liveness: the loop stamps a pulse every `PULSE_S`, and a
   heartbeat is withheld while the last pulse is older than `loop_stall_max_s` (2 intervals), so a wedged
   loop still goes `suspect` within that bound plus the detector's. Whatever reads loop-owned state (the
   engine's used bytes, the chain and Raft reports) runs on the loop: the pulse publishes a report once
   per interval, and the next heartbeat takes it (a heartbeat without one leaves the leader's copy as it
   was; a report is never sent twice, one whose heartbeat failed is dropped). A chain lease the reply
   grants is handed to the loop (call_soon_threadsafe) with the time taken before the heartbeat left.
3. The map is polled every `interval_s` on the loop (and at once when the node starts); a group appears
   on every member within one interval of `volume create`. A metadata outage never stops the data path:
   groups already hosted keep serving, the agent retries.
4. A group that vanishes from the map (volume deleted; ids are never reused, so an id below the map's
   next_group_id that the map lacks is gone for good) is dropped here: the WAL records it empty and
   forgets it, the engine drops its extents, so it pins neither WAL segments nor disk space.
5. A group that names other members only, and has its full count of them, replaced this node: its copy
   (hosted, or only in the WAL after a restart) is discarded. One still short of members keeps it: the
   node may be added back, and then catches up from its log.
7. The data port's keys (raftblock/wire/auth.py) come from the map: a changed set (a rotation) reaches the
   node's transport and repair client at the poll that reads it, and is saved (still wrapped) as
   DATA_DIR/data-keys.json, so a restarted node authenticates before its first poll (without it, a node of
   a cluster with keys refuses every connection until then).
6. Leader affinity: a volume attached by a gateway that runs inside a storage node (`[gateway]` in its config,
   node/gateway.py) has that node as the preferred leader of its Raft groups where it is a member (the map's
   first member otherwise), so the host's writes take no extra hop; every member computes the same from the
   map, and the leader hands leadership over within a balance interval (node/ticker.py rule 2). A chain's
   head stays the map's: moving it is a reconfiguration, not a preference.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from raftblock.meta.rpc import MetaClient, MetaClientError
from raftblock.meta.state import GroupId, MetaState
from raftblock.replication.raft.types import NodeId
from raftblock.wire.auth import DataKeys, KeyRing

DATA_KEYS_FILE = "data-keys.json"

if TYPE_CHECKING:
    from raftblock.node.host import NodeHost

log = structlog.get_logger(__name__)

PULSE_S = 0.1  # the loop stamps its liveness this often (rule 2)
LOOP_STALL_LOG_S = 0.25  # a pulse this late is logged (agent.loop_stalled) and counted (loop_stalls)


def leader_affinity(st: MetaState) -> dict[int, int]:
    """Rule 6: group -> the storage node whose gateway holds the volume's attachment (gateways inside nodes)."""
    out: dict[int, int] = {}
    for name, att in st.attachments.items():
        gw = st.gateways.get(att.gateway_id)
        vol = st.volumes.get(name)
        if gw is None or vol is None or not gw.node_id:
            continue
        for gid in vol.extent_groups:
            out[int(gid)] = int(gw.node_id)
    return out


def save_data_keys(data_dir: Path, dk: DataKeys) -> None:
    path = Path(data_dir) / DATA_KEYS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"active": dk.active, "wrapped": {str(k): v for k, v in dk.wrapped.items()}}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_data_keys(data_dir: Path) -> DataKeys | None:
    try:
        d = json.loads((Path(data_dir) / DATA_KEYS_FILE).read_text())
        return DataKeys({int(k): str(v) for k, v in d["wrapped"].items()}, int(d["active"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class MetaAgent:
    def __init__(self, client: MetaClient, host: NodeHost, node_id: int, rack: str, address: str,
                 data_dir: Path, interval_s: float = 1.0, disk_id: str = "",
                 loop_stall_max_s: float | None = None, beat_client: MetaClient | None = None,
                 http: str = "") -> None:
        self.client = client
        self.host = host
        self.node_id = node_id
        self.rack = rack
        self.address = address
        self.http = http  # its /metrics address, told with the registration
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.disk_id = disk_id  # the data directory's identity: a new one tells the map the disk was replaced
        self.state: MetaState | None = None
        self._data_keys: DataKeys | None = None  # rule 7: the set the transport has
        self.registered = False
        # Rule 2. The heartbeat thread's own client: one attempt of at most two intervals, so a heartbeat
        # never arrives much later than the liveness it vouches for.
        self.loop_stall_max_s = loop_stall_max_s if loop_stall_max_s is not None else 2 * interval_s
        beat_timeout_s = max(1.0, 2 * interval_s)
        self.beat_client = beat_client or MetaClient(client.admin, client.secret, attempt_timeout_s=beat_timeout_s,
                                                     deadline_s=beat_timeout_s)
        self.beats = 0  # heartbeats the metadata leader took
        self.beats_withheld = 0  # heartbeats not sent: the loop had not pulsed within loop_stall_max_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pulse_at = 0.0  # monotonic time of the loop's last pulse (read by the thread)
        self._pulse_handle: asyncio.TimerHandle | None = None
        self._report_due = 0.0
        self._report: tuple[int, dict[int, list[int]] | None, dict[int, list[int]]] | None = None
        self._report_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._withholding = False
        self._beat_failing = False

    async def run(self, stop: asyncio.Event) -> None:
        self.start_beating()
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except (MetaClientError, OSError, TimeoutError) as e:
                    log.warning("agent.meta_unreachable", error=str(e))
                try:
                    await asyncio.wait_for(stop.wait(), self.interval_s)
                except TimeoutError:
                    pass
        finally:
            await self.stop_beating()

    # -- heartbeats (rule 2) -----------------------------------------------------------------------------

    def start_beating(self) -> None:
        """On the loop: start the pulse and the heartbeat thread."""
        self._loop = asyncio.get_running_loop()
        self._pulse()
        self._beat_thread = threading.Thread(target=self._beat_main, name=f"heartbeat-n{self.node_id}", daemon=True)
        self._beat_thread.start()

    async def stop_beating(self) -> None:
        self._beat_stop.set()
        if self._pulse_handle is not None:
            self._pulse_handle.cancel()
        if self._beat_thread is not None:
            await asyncio.to_thread(self._beat_thread.join, 10.0)

    def _pulse(self) -> None:
        """On the loop, every PULSE_S: stamp the loop's liveness; once per interval, publish the report the
        next heartbeat carries (everything it reads belongs to the loop)."""
        now = time.monotonic()
        late = now - self._pulse_at - PULSE_S if self._pulse_at else 0.0
        if late > LOOP_STALL_LOG_S:
            c = self.host.counters
            c["loop_stalls"] += 1
            c["loop_stall_max_ms"] = max(c["loop_stall_max_ms"], int(late * 1000))
            log.warning("agent.loop_stalled", late_ms=round(late * 1000))
        self._pulse_at = now
        if now >= self._report_due:
            self._report_due = now + self.interval_s
            used = int(self.host.engine.stats().get("live_bytes", 0))
            chains, raft = self.host.report()
            report = (used, chains, raft)
            with self._report_lock:
                self._report = report
        assert self._loop is not None
        self._pulse_handle = self._loop.call_later(PULSE_S, self._pulse)

    def _beat_main(self) -> None:
        """The heartbeat thread: one heartbeat every interval (from the start of the previous one)."""
        loop = asyncio.new_event_loop()
        try:
            next_at = time.monotonic()
            while not self._beat_stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = time.monotonic() + self.interval_s
                try:
                    loop.run_until_complete(self.beat())
                except Exception as e:  # a bug here must not end the heartbeats for good: logged, next interval
                    log.error("agent.heartbeat_error", error=repr(e), exc_info=e)
        finally:
            loop.close()

    async def beat(self) -> bool:
        """One heartbeat (on the heartbeat thread's loop); True if the metadata leader took it."""
        if not self.registered:
            return False
        stalled_s = time.monotonic() - self._pulse_at
        if stalled_s > self.loop_stall_max_s:
            # The loop is wedged: it serves nothing, so the detector must see this node as silent.
            self.beats_withheld += 1
            if not self._withholding:
                log.warning("agent.heartbeat_withheld", loop_stalled_ms=round(stalled_s * 1000))
            self._withholding = True
            return False
        self._withholding = False
        with self._report_lock:
            report, self._report = self._report, None
        used, chains, raft = report if report is not None else (None, None, None)
        sent = time.monotonic()
        try:
            lease_ms, epochs = await self.beat_client.heartbeat(NodeId(self.node_id), used, chains, raft)
        except (MetaClientError, OSError, TimeoutError) as e:
            # Its report is dropped with it: the loop publishes a newer one within an interval.
            if not self._beat_failing:
                log.warning("agent.heartbeat_failed", error=str(e))
            self._beat_failing = True
            return False
        self._beat_failing = False
        self.beats += 1
        if lease_ms > 0:
            # The metadata leader took this heartbeat: it will not remove this node from a chain before
            # `sent + lease_ms` (it waits for a longer silence), so the node's tails may serve reads until
            # then, in the epochs it named (a removal already decided is in them).
            self._on_loop(self.host.grant_chain_lease, sent + lease_ms / 1000.0, epochs)
        return True

    def _on_loop(self, fn: Any, *args: Any) -> None:
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the node's loop is closed: it is stopping

    # -- the map -----------------------------------------------------------------------------------------

    async def step(self) -> None:
        if not self.registered:
            capacity = shutil.disk_usage(self.data_dir).total
            res = await self.client.register_node(self.node_id, self.rack, self.address, capacity, self.disk_id,
                                                   self.http)
            if not res.ok:
                log.error("agent.register_refused", error=res.error, message=res.message)
                return
            self.registered = True
            log.info("agent.registered", node=self.node_id, rack=self.rack, capacity_bytes=capacity,
                     left_groups=res.value.get("left_groups", []))
        st = await self.client.state_if_changed(self.state)
        self.state = st
        self.reconcile(st)

    def _keys(self, st: MetaState) -> None:
        """Rule 7: the data port's keys from the map; kept (wrapped) in the data directory for the next start."""
        dk = st.data_key_set()
        if dk == self._data_keys or not st.cluster_id:
            # A map not initialised yet says nothing of keys: the metadata leader puts the first one in
            # init_cluster, so the node stays "unknown" (refusing connections) rather than "off" meanwhile.
            return
        ring = KeyRing.from_map(self.client.secret, dk)
        self.host.set_auth("on" if ring is not None else "off", ring)
        self._data_keys = dk
        save_data_keys(self.data_dir, dk)
        log.info("agent.data_keys", versions=sorted(dk.wrapped), active=dk.active)

    def reconcile(self, st: MetaState) -> None:
        for n in st.nodes.values():  # nodes added after this one started (`node add`): their addresses
            if int(n.node_id) not in self.host.peers and int(n.node_id) != self.node_id and ":" in n.address:
                host, port = n.address.rsplit(":", 1)
                if port.isdigit():
                    self.host.add_peer(int(n.node_id), host, int(port))
        affinity = leader_affinity(st)
        for gid, g in sorted(st.groups.items()):
            members = [int(m) for m in g.members]
            near = affinity.get(int(gid), 0)
            if g.mode != "chain" and near in members[1:]:  # rule 6: the attaching node leads
                members.remove(near)
                members.insert(0, near)
            if g.mode == "chain":
                # A member hosts it; a former member keeps getting the configuration (it learns it was
                # removed, and stops acting in the old epoch), until the chain is whole without it: then
                # it was replaced, and drops its stale replica.
                known = self.host.kind_of(int(gid)) == "chain" or int(gid) in self.host.recovered
                if self.node_id in members or known:
                    self.host.host_replica(int(gid), "chain", members, g.epoch)
                if self.node_id not in members and len(members) >= st.replicas \
                        and self.host.kind_of(int(gid)) == "chain":
                    self.host.discard(int(gid))
            elif self.node_id in members:
                self.host.host_replica(int(gid), "raft", members, g.epoch)
            elif len(members) >= st.replicas and (self.host.kind_of(int(gid)) == "raft"
                                                  or int(gid) in self.host.recovered):
                # Replaced or moved away: the group is whole without this node (a dead member's removal was
                # carried out before its replacement was added; a live one's replacement caught up before
                # it was removed, control/raftrepair.py), so its copy is stale: drop it (a leader hands
                # leadership on first).
                self.host.configure(int(gid), members, g.epoch)
                self.host.discard(int(gid))
        # Deleted volumes: a group the map allocated once (id below next_group_id) and no longer has is gone
        # for good; its replica here (hosted, or only in the WAL) is dropped, engine space and WAL segments
        # with it. A Ready in flight makes it wait for the next poll.
        here = set(self.host.replicas) | set(self.host.recovered)
        for hid in sorted(here):
            if GroupId(hid) not in st.groups and hid < st.next_group_id:
                self.host.delete_group(hid)
        # Fencing: each group learns its volume's latest attach epoch from the map too (not only from
        # the requests of the gateway that holds it).
        for name, vol in st.volumes.items():
            epoch = st.attach_epochs.get(name, 0)
            if epoch:
                for gid in set(vol.extent_groups):
                    self.host.raise_fence(int(gid), epoch)
        self._keys(st)
        # QoS: each volume's spec and groups, for the node's scheduler (node/admission.py rule 1)
        self.host.data.admission.set_volumes({
            v.volume_id: (name, v.qos(), [int(g) for g in set(v.extent_groups)]) for name, v in st.volumes.items()})
        if not self.host.fences_known:
            self.host.fences_known = True
            log.info("agent.fences_known", groups=len(self.host.replicas))
