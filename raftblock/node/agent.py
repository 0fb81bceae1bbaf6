"""MetaAgent: a storage node's link to the metadata group.

Owns: registering the node (rack, data address, capacity), heartbeating the metadata leader, and
reconciling the groups this node hosts with the map (a group whose members include this node is
hosted; members[0] is its preferred leader, or a chain's head), handing chain groups their configuration
(members and epoch) and, after each heartbeat the metadata leader accepted, their lease.

Rules:
1. Heartbeats are not log entries (the metadata leader keeps them in memory); they carry used bytes.
2. The map is polled every `interval_s` (and at once when the node starts); a group appears on every
   member within one interval of `volume create`. A metadata outage never stops the data path: groups
   already hosted keep serving, the agent retries.
3. A group that vanishes from the map (volume deleted; ids are never reused, so an id below the map's
   next_group_id that the map lacks is gone for good) is dropped here: the WAL records it empty and
   forgets it, the engine drops its extents, so it pins neither WAL segments nor disk space.
4. A group that names other members only, and has its full count of them, replaced this node: its copy
   (hosted, or only in the WAL after a restart) is discarded. One still short of members keeps it: the
   node may be added back, and then catches up from its log.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import structlog

from raftblock.meta.rpc import MetaClient, MetaClientError
from raftblock.meta.state import GroupId, MetaState
from raftblock.replication.raft.runtime import NodeRuntime

log = structlog.get_logger(__name__)


class MetaAgent:
    def __init__(self, client: MetaClient, runtime: NodeRuntime, node_id: int, rack: str, address: str,
                 data_dir: Path, interval_s: float = 1.0, disk_id: str = "") -> None:
        self.client = client
        self.runtime = runtime
        self.node_id = node_id
        self.rack = rack
        self.address = address
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.disk_id = disk_id  # the data directory's identity: a new one tells the map the disk was replaced
        self.state: MetaState | None = None
        self.registered = False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except (MetaClientError, OSError, TimeoutError) as e:
                log.warning("agent.meta_unreachable", error=str(e))
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def step(self) -> None:
        if not self.registered:
            capacity = shutil.disk_usage(self.data_dir).total
            res = await self.client.register_node(self.node_id, self.rack, self.address, capacity, self.disk_id)
            if not res.ok:
                log.error("agent.register_refused", error=res.error, message=res.message)
                return
            self.registered = True
            log.info("agent.registered", node=self.node_id, rack=self.rack, capacity_bytes=capacity,
                     left_groups=res.value.get("left_groups", []))
        used = int(self.runtime.engine.stats().get("live_bytes", 0))
        sent = time.monotonic()
        chains = self.runtime.chains.report() if self.runtime.chains.groups else None
        lease_ms, epochs = await self.client.heartbeat(self.node_id, used, chains,  # type: ignore[arg-type]
                                                       self.runtime.raft_report())
        if lease_ms > 0:
            # The metadata leader took this heartbeat: it will not remove this node from a chain before
            # `sent + lease_ms` (it waits for a longer silence), so the node's tails may serve reads until
            # then, in the epochs it named (a removal already decided is in them).
            self.runtime.grant_chain_lease(sent + lease_ms / 1000.0, epochs)
        st = await self.client.state_if_changed(self.state)
        self.state = st
        self.reconcile(st)

    def reconcile(self, st: MetaState) -> None:
        for n in st.nodes.values():  # nodes added after this one started (`node add`): their addresses
            if int(n.node_id) not in self.runtime.peers and int(n.node_id) != self.node_id and ":" in n.address:
                host, port = n.address.rsplit(":", 1)
                if port.isdigit():
                    self.runtime.add_peer(int(n.node_id), host, int(port))
        for gid, g in sorted(st.groups.items()):
            members = [int(m) for m in g.members]
            if g.mode == "chain":
                # A member hosts it; a former member keeps getting the configuration (it learns it was
                # removed, and stops acting in the old epoch), until the chain is whole without it: then
                # it was replaced, and drops its stale replica.
                known = int(gid) in self.runtime.chains.groups or int(gid) in self.runtime._recovered
                if self.node_id in members or known:
                    self.runtime.host_chain_group(int(gid), members, g.epoch)
                if self.node_id not in members and len(members) >= st.replicas \
                        and int(gid) in self.runtime.chains.groups:
                    self.runtime.discard_chain_group(int(gid))
            elif self.node_id in members:
                self.runtime.host_group(int(gid), members, g.epoch)
            elif len(members) >= st.replicas and (int(gid) in self.runtime.groups
                                                  or int(gid) in self.runtime._recovered):
                # Replaced or moved away: the group is whole without this node (a dead member's removal was
                # carried out before its replacement was added; a live one's replacement caught up before
                # it was removed, control/raftrepair.py), so its copy is stale: drop it (a leader hands
                # leadership on first).
                self.runtime.retarget(int(gid), members, g.epoch)
                self.runtime.discard_group(int(gid))
        # Deleted volumes: a group the map allocated once (id below next_group_id) and no longer has is gone
        # for good; its replica here (hosted, or only in the WAL) is dropped, engine space and WAL segments
        # with it. A Ready in flight makes it wait for the next poll.
        here = set(self.runtime.groups) | set(self.runtime.chains.groups) | set(self.runtime._recovered)
        for hid in sorted(here):
            if GroupId(hid) not in st.groups and hid < st.next_group_id:
                self.runtime.delete_group(hid)
        # Fencing: each group learns its volume's latest attach epoch from the map too (not only from
        # the requests of the gateway that holds it).
        for name, vol in st.volumes.items():
            epoch = st.attach_epochs.get(name, 0)
            if epoch:
                for gid in set(vol.extent_groups):
                    self.runtime.raise_fence(int(gid), epoch)
        if not self.runtime.fences_known:
            self.runtime.fences_known = True
            log.info("agent.fences_known", groups=len(self.runtime.groups))
