"""DataPlane: a storage node's client front (the CLIENT_REQ frames of wire/client.py), for both replica
kinds.

Rules:
1. Edge checks of block I/O (write, trim, read, block status), in one place (`refusal`): the group is
   hosted here, the node knows the fences, the request's attach epoch is current (zombie fencing by
   generation: the highest epoch seen for a group, from requests or from the metadata map, wins, and
   anything older is refused, so a gateway that lost its attachment can never write again).
2. A write is checked again here (range, payload, per-block CRC32C on arrival), admitted only while the
   data disk has `space_reserve_bytes` free (statvfs, looked at most every 0.2 s), and handed to its
   replica without a task or a future (replication/requests.py rule 1): the reply leaves when it applies.
3. A read is served in the frame's callback when the replica says it may (`read_now`: a Raft leader's
   lease with everything applied, a synced chain tail under its lease), after the ticks caught up;
   anything else takes the general path (a task), which answers every case precisely.
4. A corrupt local block is read from another member and rewritten (repair.py); a request that cannot be
   served gets one precise status (`error_response`), never a dropped connection.
5. Block I/O (READ, WRITE, TRIM) that passed the edge checks waits for admission (node/admission.py: the
   node's QoS scheduler, per-volume limits, reservations and weights) before it reaches its replica; the
   replica is looked up again when it runs (it may have gone while the request waited).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

import structlog

from raftblock.ids import group_of_extent
from raftblock.node.admission import REPAIR, SCRUB, Admission, AdmissionSettings
from raftblock.node.checks import check_range, check_seal, validate_write
from raftblock.node.repair import PeerRepair
from raftblock.replication.replica import Links, Replica
from raftblock.replication.requests import NotLeaderError, Reply, RetryError
from raftblock.replication.wal import Wal
from raftblock.storage.engine import CorruptBlockError, Engine, NoSpaceError
from raftblock.storage.segment import MAX_BLOCK, MAX_WRITE_BLOCKS
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import (
    BLOCK_STATUS_BLOCKS_MAX,
    OP_C_BLOCK_STATUS,
    OP_C_NODE_STATUS,
    OP_C_READ,
    OP_C_REPLICA_READ,
    OP_C_SCRUB_CRCS,
    OP_C_SCRUB_REPAIR,
    OP_C_SNAP,
    OP_C_STATUS,
    OP_C_TRIM,
    OP_C_UNSNAP,
    OP_C_WRITE,
    ST_BAD_REQUEST,
    ST_CORRUPT,
    ST_NO_SPACE,
    ST_NOT_LEADER,
    ST_STALE_EPOCH,
    ST_UNAVAILABLE,
    ST_UNKNOWN_GROUP,
)
from raftblock.wire.framing import Frame, FrameType
from raftblock.wire.ops import BLOCK_SIZE, entries_of, seal_blocks

log = structlog.get_logger(__name__)

_FENCED_OPS = (OP_C_WRITE, OP_C_TRIM, OP_C_READ, OP_C_BLOCK_STATUS, OP_C_SNAP, OP_C_UNSNAP)
SPACE_CHECK_S = 0.2


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DataSettings(AdmissionSettings, Protocol):
    space_reserve_bytes: int


class DataHost(Protocol):
    """What the data plane needs of its node (node/host.py NodeHost)."""

    node_id: int
    counters: Counter[str]
    client_ops: Counter[int]
    engine: Engine
    wal: Wal
    peers: dict[int, tuple[str, int]]
    fences_known: bool
    commits: int
    repair: PeerRepair

    @property
    def cfg(self) -> DataSettings: ...

    @property
    def replicas(self) -> Mapping[int, Replica]: ...

    @property
    def links(self) -> Links: ...

    @property
    def failed(self) -> BaseException | None: ...

    def catch_up_ticks(self) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class ClientLink(Protocol):
    """Where a client request's reply goes: a socket (node/transport.py Connection: one CLIENT_RESP frame) or
    the gateway in this process (node/inproc.py: no encoding at all)."""

    def reply(self, gid: int, resp: pb.ClientResponse, data: Sequence[bytes | bytearray | memoryview]) -> None: ...


class DataPlane:
    def __init__(self, host: DataHost) -> None:
        self.host = host
        self.fence_epochs: dict[int, int] = {}  # group -> highest attach epoch seen (rule 1)
        self._space_checked_at = 0.0
        self._space_free = 1 << 62
        self.admission = Admission(host.cfg, self._run, self._refuse_busy)

    # == rule 1 ==================================================================================================
    def fence_ok(self, gid: int, epoch: int) -> bool:
        cur = self.fence_epochs.get(gid, 0)
        if epoch < cur:
            return False
        if epoch > cur:
            self.fence_epochs[gid] = epoch
        return True

    def raise_fence(self, gid: int, epoch: int) -> None:
        if epoch > self.fence_epochs.get(gid, 0):
            self.fence_epochs[gid] = epoch

    def refusal(self, gid: int, req: pb.ClientRequest) -> Refused | None:
        h = self.host
        if gid not in h.replicas:
            h.counters["client_unknown_group"] += 1
            return Refused(ST_UNKNOWN_GROUP, f"group {gid} is not hosted here")
        if not h.fences_known:
            return Refused(ST_UNAVAILABLE, "node starting: waiting for the metadata map")
        # A snapshot's image never changes: reading it needs no attachment (a clone's gateway reads its
        # parent's snapshot while another gateway has the parent attached). A FILL only writes holes, and on a
        # volume that ignores trims while anything fills it (client/volume.py rules 5, 6): the flatten or lazy
        # restore command writes it beside the gateway that has the volume attached.
        snap_read = req.snap_id and (req.op == OP_C_READ or req.op == OP_C_BLOCK_STATUS)
        if not snap_read and not req.fill and not self.fence_ok(gid, req.epoch):
            h.counters["stale_epoch_refused"] += 1
            return Refused(ST_STALE_EPOCH, f"attach epoch {req.epoch} is older than "
                           f"{self.fence_epochs.get(gid, 0)}: another gateway attached this volume")
        return None

    # == frames ==================================================================================================
    def on_frame(self, conn: ClientLink, frame: Frame) -> None:
        if frame.type != FrameType.CLIENT_REQ:
            self.host.counters["frames_malformed"] += 1
            return
        self.on_request(conn, frame.group, pb.ClientRequest.FromString(frame.message), frame.payload)

    def on_request(self, conn: ClientLink, gid: int, req: pb.ClientRequest,
                   payload: bytes | bytearray | memoryview) -> None:
        """One client request, from a socket (`on_frame`) or from the gateway in this process
        (node/inproc.py): answered once, through `conn.reply`."""
        h = self.host
        op = req.op
        h.client_ops[op] += 1  # raftblock_node_client_ops_total{op} (obs/exporters.py)
        if op in _FENCED_OPS:
            refused = self.refusal(gid, req)
            if refused is not None:
                self.answer(conn, gid, req.request_id, refused)
                return
            if op == OP_C_WRITE or op == OP_C_READ or op == OP_C_TRIM:  # rule 5
                slot = self.admission.admit(conn, gid, req, payload)
                if slot is None:
                    return  # it waits: _run carries it out when admitted
                conn = slot
            r = h.replicas[gid]
            if op == OP_C_WRITE or op == OP_C_TRIM or op == OP_C_SNAP or op == OP_C_UNSNAP:
                self._write(conn, r, req, payload)
                return
            if op == OP_C_READ and self._read_now(conn, r, req):
                return
        h.spawn(self._serve(conn, gid, req))

    def _run(self, conn: ClientLink, gid: int, req: pb.ClientRequest, payload: bytes | bytearray | memoryview) -> None:
        """An admitted request that waited (rule 5)."""
        h = self.host
        r = h.replicas.get(gid)
        if r is None:
            h.counters["client_unknown_group"] += 1
            self.answer(conn, gid, req.request_id, Refused(ST_UNKNOWN_GROUP, f"group {gid} is not hosted here"))
        elif req.op == OP_C_READ:
            if not self._read_now(conn, r, req):
                h.spawn(self._serve(conn, gid, req))
        else:
            self._write(conn, r, req, payload)

    def _refuse_busy(self, conn: ClientLink, gid: int, req: pb.ClientRequest, why: str) -> None:
        self.host.counters["client_refused_busy"] += 1
        self.answer(conn, gid, req.request_id, Refused(ST_UNAVAILABLE, why))

    def answer(self, conn: Any, gid: int, request_id: int, exc: BaseException | None) -> None:
        """A reply without data: OK, or the status `exc` maps to."""
        resp = pb.ClientResponse(request_id=request_id, node_id=self.host.node_id)
        if exc is not None:
            self.error_response(resp, exc)
        conn.reply(gid, resp, ())

    # == rule 2 ==================================================================================================
    def _write(self, conn: ClientLink, r: Replica, req: pb.ClientRequest, payload: bytes | bytearray | memoryview) -> None:
        reply = Reply(self, conn, r.id, req.request_id)
        try:
            op = validate_write(r.id, req, payload)
            r.check_writable()  # NOT_LEADER before NO_SPACE: a full follower must not fail a write
            self.check_space()
            r.add_pending(op, reply)
        except Exception as e:  # every refusal becomes a precise status (error_response)
            reply.set_exception(e)

    def check_space(self) -> None:
        """NoSpaceError (ENOSPC at the NBD level) while the data disk has less than `space_reserve_bytes`
        free, so a full disk refuses new writes instead of failing them after they were committed."""
        h = self.host
        now = time.monotonic()
        if now - self._space_checked_at > SPACE_CHECK_S:
            self._space_checked_at = now
            try:
                st = os.statvfs(h.engine.directory)
                self._space_free = st.f_bavail * st.f_frsize
            except OSError:
                self._space_free = 1 << 62
        if self._space_free < h.cfg.space_reserve_bytes:
            h.counters["writes_refused_no_space"] += 1
            raise NoSpaceError(f"node {h.node_id}: {self._space_free} bytes free on its data disk, "
                               f"below the reserve of {h.cfg.space_reserve_bytes}")

    # == rule 3 ==================================================================================================
    def _read_now(self, conn: ClientLink, r: Replica, req: pb.ClientRequest) -> bool:
        h = self.host
        if h.failed is not None:
            return False
        n = req.count
        gid = r.id
        if group_of_extent(req.extent_id) != gid or n < 1 or n > MAX_WRITE_BLOCKS or req.block + n > MAX_BLOCK:
            return False
        h.catch_up_ticks()
        if not r.read_now():
            return False
        if req.snap_id:
            return False  # the general path: a snapshot's old versions are not read repaired
        try:
            data, crcs = h.engine.read(req.extent_id, req.block, n)
            if req.seal_at:
                first, end = check_seal(req.block, n, req.seal_at)
                entries = entries_of(h.engine.read(req.extent_id, first, end - first)[0], req.block, n)
        except (CorruptBlockError, ValueError):
            return False  # the general path reads again, logs, and repairs from a replica (or says what is wrong)
        resp = pb.ClientResponse(request_id=req.request_id, node_id=h.node_id)
        resp.crcs.extend(crcs)
        conn.reply(gid, resp, (data, entries) if req.seal_at else (data,))
        h.counters["reads_lease_fast" if r.kind == "raft" else "chain_reads_fast"] += 1
        return True

    async def _serve(self, conn: ClientLink, gid: int, req: pb.ClientRequest) -> None:
        """The general path: every op, every refusal answered with its status."""
        h = self.host
        resp = pb.ClientResponse(request_id=req.request_id, node_id=h.node_id)
        out: list[bytes | bytearray | memoryview] = []
        try:
            op = req.op
            if op == OP_C_NODE_STATUS:
                self._node_status(resp)
            else:
                r = h.replicas.get(gid)
                if r is None:
                    h.counters["client_unknown_group"] += 1
                    resp.status = ST_UNKNOWN_GROUP
                    resp.error = f"group {gid} is not hosted here"
                elif op == OP_C_STATUS:
                    info = r.info(self.allocated_bytes_by_group().get(gid, 0))
                    if req.snap_stats:
                        for sid, n in sorted(h.engine.snapshot_stats(gid).items()):
                            info.snap_ids.append(sid)
                            info.snap_unique_blocks.append(n)
                    resp.groups.append(info)
                elif op == OP_C_READ or op == OP_C_BLOCK_STATUS:
                    await self._read(r, req, resp, out)
                elif op == OP_C_REPLICA_READ:
                    slot = await self.admission.admit_internal(REPAIR, req.count * BLOCK_SIZE)  # rule 5
                    try:
                        data, crcs = await h.repair.replica_read(r, req)
                    finally:
                        self.admission.done(slot)
                    resp.crcs.extend(crcs)
                    out.append(data)
                elif op == OP_C_SCRUB_CRCS or op == OP_C_SCRUB_REPAIR:
                    slot = await self.admission.admit_internal(SCRUB, req.count * BLOCK_SIZE)
                    try:
                        await h.repair.serve_scrub(r, req, resp)
                    finally:
                        self.admission.done(slot)
                else:
                    resp.status = ST_BAD_REQUEST
                    resp.error = f"unknown op {op}"
        except (NotLeaderError, RetryError, CorruptBlockError, NoSpaceError, ValueError) as e:
            self.error_response(resp, e)
        conn.reply(gid, resp, out)

    async def _read(self, r: Replica, req: pb.ClientRequest, resp: pb.ClientResponse,
                    out: list[bytes | bytearray | memoryview]) -> None:
        """A read or block status at a linearizable point (the replica's read barrier)."""
        h = self.host
        gid = r.id
        n = check_range(gid, req, BLOCK_STATUS_BLOCKS_MAX if req.op == OP_C_BLOCK_STATUS else MAX_WRITE_BLOCKS)
        if h.failed is not None:
            raise RetryError(f"node failed: {h.failed!r}")
        if req.op == OP_C_BLOCK_STATUS:
            await r.read_barrier()
            if req.snap_id:  # allocated in a snapshot, or changed between two (an incremental backup)
                try:
                    runs = h.engine.snapshot_runs(req.snap_id, req.extent_id, req.block, n, req.since_snap_id)
                except KeyError as e:
                    raise ValueError(f"group {gid}: {e.args[0]}") from e
            else:
                runs = h.engine.block_status(req.extent_id, req.block, n)
            for count, allocated in runs:
                resp.runs.extend((count, int(allocated)))
            return
        applied = await r.read_barrier()
        if req.snap_id:  # a snapshot's image, as this replica pinned it when it applied the SNAP op
            try:
                data, crcs = h.engine.read_snapshot(req.snap_id, req.extent_id, req.block, n)
                if req.seal_at:  # docs/encryption.md: the entries as the same snapshot keeps them
                    first, end = seal_blocks(req.block, n, req.seal_at)
                    meta = h.engine.read_snapshot(req.snap_id, req.extent_id, first, end - first)[0]
            except KeyError as e:
                raise ValueError(f"no snapshot {req.snap_id} of group {gid} here") from e
            resp.crcs.extend(crcs)
            out.append(data)
            if req.seal_at:
                out.append(entries_of(meta, req.block, n))
            return
        data, crcs = await self._read_repaired(r, req.extent_id, req.block, n, applied)
        resp.crcs.extend(crcs)
        out.append(data)
        if req.seal_at:
            first, end = seal_blocks(req.block, n, req.seal_at)
            meta, _ = await self._read_repaired(r, req.extent_id, first, end - first, applied)
            out.append(entries_of(meta, req.block, n))

    async def _read_repaired(self, r: Replica, extent_id: int, block: int, n: int,
                             applied: int) -> tuple[bytearray, list[int]]:
        h = self.host
        try:
            return h.engine.read(extent_id, block, n)
        except CorruptBlockError as e:
            h.counters["corrupt_reads"] += 1
            log.error(f"{r.kind}.corrupt_read", group=r.id, extent_id=extent_id, block=e.block, reason=e.reason)
            return await h.repair.read_repair(r.id, r.read_sources(), extent_id, block, n, applied)

    def _node_status(self, resp: pb.ClientResponse) -> None:
        h = self.host
        h.catch_up_ticks()
        by_group = self.allocated_bytes_by_group()  # one pass over the index, not one per group
        chain: dict[str, int] = {}
        for r in h.replicas.values():
            resp.groups.append(r.info(by_group.get(r.id, 0)))
            for k, v in r.counters().items():
                chain[k] = chain.get(k, 0) + v
        for k, v in h.counters.items():
            resp.counters[k] = v
        for k, v in h.wal.stats().items():
            resp.counters[k] = v
        resp.counters["commits"] = h.commits
        for k, v in chain.items():
            resp.counters[k] = v
        for k, v in h.engine.stats().items():
            resp.counters[f"engine_{k}"] = int(v)
        resp.counters["peers_connected"] = len(h.links.conns)

    def allocated_bytes_by_group(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e, blocks in self.host.engine.index.extents.items():
            gid = group_of_extent(e)
            out[gid] = out.get(gid, 0) + len(blocks) * BLOCK_SIZE
        return out

    # == rule 4 ==================================================================================================
    def error_response(self, resp: pb.ClientResponse, e: BaseException) -> None:
        """The status a client sees for a refused or failed request."""
        if isinstance(e, Refused):
            resp.status = e.status
            resp.error = e.message
        elif isinstance(e, NotLeaderError):
            resp.status = ST_NOT_LEADER
            lead = e.leader
            resp.leader_hint = lead
            peers = self.host.peers
            if lead in peers:
                h, p = peers[lead]
                resp.leader_address = f"{h}:{p}"
        elif isinstance(e, RetryError):
            resp.status = ST_UNAVAILABLE
            resp.error = str(e)
        elif isinstance(e, CorruptBlockError):
            resp.status = ST_CORRUPT
            resp.error = str(e)
        elif isinstance(e, NoSpaceError):
            resp.status = ST_NO_SPACE
            resp.error = str(e)
        elif isinstance(e, ValueError):
            resp.status = ST_BAD_REQUEST
            resp.error = str(e)
        else:
            resp.status = ST_UNAVAILABLE
            resp.error = f"internal error: {e!r}"
            log.error("node.client_request_failed", error=repr(e), exc_info=e)
