"""PeerRepair: what a node's replicas fetch from, and serve to, the other members of their groups, and the
node's repair budget.

Rules:
1. Repair bandwidth: Raft snapshot chunks and chain image chunks (`allow`) and the replica reads of read repair
   take their turn in the node's QoS scheduler under class "repair" (node/admission.py rule 3): at most
   `repair_bytes_per_s` (0 = unbounded), at least `repair_min_bytes_per_s` while client I/O saturates the
   node, otherwise a fair share beside the volumes.
2. Read repair: a read whose local copy fails its CRC is served from another member (in the replica's
   order, `read_sources`), once that member has applied what this one had (REPLICA_READ, `min_applied`),
   then only the blocks still bad here are rewritten (a block overwritten meanwhile keeps its newer value).
3. A member answers REPLICA_READ once it has applied `min_applied` (waiting up to REPLICA_READ_WAIT_S: a
   chain predecessor applies a record when the tail's acknowledgement comes back), so the answer is no
   older than what the asking member would have returned.
4. Scrub repair (SCRUB_REPAIR, control/scrub.py): only a replica whose `repair_refusal` is None (a Raft
   follower of that very leader) copies a differing range from the source; a member that serves reads
   must never go back in time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from raftblock._fast import blockcrc
from raftblock.node.checks import check_range
from raftblock.replication.replica import Replica
from raftblock.replication.requests import RetryError
from raftblock.storage.engine import ZERO_BLOCK_CRC, CorruptBlockError, Engine
from raftblock.storage.segment import MAX_WRITE_BLOCKS
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import OP_C_REPLICA_READ, OP_C_SCRUB_CRCS, ST_OK
from raftblock.wire.ops import BLOCK_SIZE

log = structlog.get_logger(__name__)

REPLICA_READ_WAIT_S = 2.0  # how long a replica waits to reach `min_applied` before answering UNAVAILABLE


class RepairSettings(Protocol):
    snapshot_chunk_bytes: int
    repair_bytes_per_s: int
    tick_ms: int


class RepairHost(Protocol):
    """What repair needs of its node (node/host.py NodeHost)."""

    counters: Counter[str]
    engine: Engine
    peers: dict[int, tuple[str, int]]

    @property
    def cfg(self) -> RepairSettings: ...

    def qos_poll(self, key: str, nbytes: int) -> bool: ...


class PeerRepair:
    def __init__(self, host: RepairHost) -> None:
        self.host = host
        self._ring: Any = None
        self._client: Any = None  # a data-plane client to the peers, made on the first repair

    # == rule 1 ==================================================================================================
    def allow(self, nbytes: int) -> bool:
        """May `nbytes` of repair go now? False: send later (the scheduler said wait)."""
        if not self.host.qos_poll("repair", nbytes):
            return False
        self.host.counters["repair_bytes_sent"] += nbytes
        return True

    # == the client to the peers =================================================================================
    def peer(self) -> Any:
        from raftblock.client.router import NodeClient

        if self._client is None:
            self._client = NodeClient(self.host.peers, attempt_timeout_s=REPLICA_READ_WAIT_S + 1, ring=self._ring)
        return self._client

    def set_ring(self, ring: Any) -> None:
        """The data port's keys (node/transport.py rule 4): this node's requests to its peers are signed too."""
        self._ring = ring
        if self._client is not None:
            self._client.set_ring(ring)

    def add_peer(self, pid: int, host: str, port: int) -> None:
        if self._client is not None:
            self._client.nodes[pid] = (host, port)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # == rule 3 ==================================================================================================
    async def replica_read(self, r: Replica, req: pb.ClientRequest) -> tuple[bytearray, list[int]]:
        n = check_range(r.id, req, MAX_WRITE_BLOCKS)
        await self.wait_applied(r.applied, req.min_applied)
        self.host.counters["replica_reads_served"] += 1
        return self.host.engine.read(req.extent_id, req.block, n)

    async def wait_applied(self, applied: Callable[[], int], min_applied: int) -> None:
        deadline = time.monotonic() + REPLICA_READ_WAIT_S
        while applied() < min_applied:
            if time.monotonic() > deadline:
                raise RetryError(f"replica applied {applied()} < {min_applied}")
            await asyncio.sleep(self.host.cfg.tick_ms / 1000)

    # == rule 2 ==================================================================================================
    async def read_repair(self, gid: int, others: list[int], extent_id: int, block: int, n: int,
                          applied: int) -> tuple[bytearray, list[int]]:
        h = self.host
        engine = h.engine
        req = pb.ClientRequest(op=OP_C_REPLICA_READ, extent_id=extent_id, block=block, count=n, min_applied=applied)
        last = "no other member"
        for peer in others:
            try:
                resp, data = await self.peer().call_node(peer, gid, req)
            except (OSError, ConnectionError, TimeoutError) as e:
                last = f"node {peer}: {e!r}"
                continue
            crcs = list(resp.crcs)
            if resp.status != ST_OK or len(data) != n * BLOCK_SIZE or blockcrc.first_mismatch(data, crcs) >= 0:
                last = f"node {peer}: status {resp.status} {resp.error}"
                continue
            repaired = 0
            for i in range(n):
                try:
                    engine.read(extent_id, block + i, 1)
                except CorruptBlockError:
                    chunk = memoryview(data)[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
                    engine.write(extent_id, block + i, chunk, [crcs[i]])
                    repaired += 1
            h.counters["read_repairs"] += 1
            h.counters["blocks_repaired"] += repaired
            log.warning("raft.read_repaired", group=gid, extent_id=extent_id, block=block, count=n,
                        blocks_repaired=repaired, source=peer)
            return bytearray(data), crcs
        h.counters["read_repair_failed"] += 1
        raise CorruptBlockError(extent_id, block, f"local copy corrupt and no healthy replica answered ({last})")

    # == rule 4 ==================================================================================================
    async def serve_scrub(self, r: Replica, req: pb.ClientRequest, resp: pb.ClientResponse) -> None:
        """SCRUB_CRCS (the CRCs of a run once `min_applied` is applied here) and SCRUB_REPAIR."""
        h = self.host
        n = check_range(r.id, req, MAX_WRITE_BLOCKS)
        if req.op == OP_C_SCRUB_CRCS:
            await self.wait_applied(r.applied, req.min_applied)
            _, crcs = h.engine.read(req.extent_id, req.block, n)
            resp.crcs.extend(crcs)
            resp.applied = r.applied()
            return
        why = r.repair_refusal(int(req.source_node))
        if why is not None:
            h.counters["scrub_repairs_refused"] += 1
            raise RetryError(f"scrub repair refused: {why}")
        resp.runs.append(await self.repair_from(r, int(req.source_node), req.extent_id, req.block, n))

    async def repair_from(self, r: Replica, source: int, extent_id: int, block: int, n: int) -> int:
        """Copy the blocks of the range that differ from `source`'s (or are corrupt here), as of a point at
        least as new as what this replica has applied. Returns the number of blocks rewritten."""
        h = self.host
        engine = h.engine
        gid = r.id
        req = pb.ClientRequest(op=OP_C_REPLICA_READ, extent_id=extent_id, block=block, count=n,
                               min_applied=r.applied())
        resp, data = await self.peer().call_node(source, gid, req)
        crcs = list(resp.crcs)
        if resp.status != ST_OK or len(data) != n * BLOCK_SIZE or blockcrc.first_mismatch(data, crcs) >= 0:
            raise RetryError(f"node {source}: status {resp.status} {resp.error}")
        fixed = 0
        for i in range(n):
            try:
                _, mine = engine.read(extent_id, block + i, 1)
                if mine[0] == crcs[i]:
                    continue
            except CorruptBlockError:
                pass
            if crcs[i] == ZERO_BLOCK_CRC:
                engine.trim(extent_id, block + i, 1)  # zeros there (trimmed, or never written)
            else:
                engine.write(extent_id, block + i, memoryview(data)[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], [crcs[i]])
            fixed += 1
        h.counters["scrub_blocks_rewritten"] += fixed
        log.warning("scrub.replica_repaired", group=gid, extent_id=extent_id, block=block, count=n,
                    blocks_rewritten=fixed, source=source)
        return fixed
