# Scrub: a node's background pass over every replica it holds (DESIGN "Scrub"; docs/replication.md).
#
# Owns: the pass loop, its pacing, and the comparison of replicas. It sees its node through `ScrubNode`
# (node/host.py NodeHost) and each replica through its ScrubView (replication/replica.py); the node's
# data plane serves the member-to-member requests it uses (SCRUB_CRCS, SCRUB_REPAIR, REPLICA_READ).
#
# Rules:
# 1. Bounded: each run of blocks (1 MiB at most) takes its turn in the node's QoS scheduler under class "scrub"
#    (node/admission.py rule 3: at most `scrub_bytes_per_s`, a fair share beside the volumes when the node is
#    saturated), one run in flight, and a pause of `scrub_pass_interval_s` between passes; the members it
#    compares with admit its SCRUB_CRCS the same way.
# 2. Every allocated block (and every block the engine has marked bad) is read back and its CRC32C
#    checked (Engine.read). A bad block is fetched from another member and rewritten (the read-repair
#    path): counters scrub_errors_found, scrub_blocks_repaired, scrub_repair_failed.
# 3. Replicas are compared by the member that orders the writes (a Raft leader holding its lease, the
#    chain's head): it asks each other member for the CRCs of the run, once that member has applied at
#    least what the comparer had when it read (SCRUB_CRCS). A difference is a finding only if it persists
#    when both sides are at the same point: the comparer reads again; a member that is ahead may
#    legitimately hold newer writes. After `COMPARE_TRIES` such tries it is a suspect; the same run of the
#    same member found again in the next pass is a mismatch (scrub_mismatches; scrub_suspects counts
#    the first findings). A Raft follower with a mismatch is told to copy the run from its leader
#    (SCRUB_REPAIR, node/repair.py); a member that serves reads refuses (Replica.repair_refusal),
#    and a chain's mismatches are reported only. Counters scrub_replica_repairs, scrub_compare_skipped.
# 4. A pass logs what it found; `raftblock cluster status` shows the counters per node.
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from raftblock.replication.image import group_extents, runs
from raftblock.replication.replica import ScrubView
from raftblock.storage.engine import CorruptBlockError, Engine
from raftblock.storage.segment import MAX_WRITE_BLOCKS
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.ops import BLOCK_SIZE

log = structlog.get_logger(__name__)

RUN_BLOCKS = min(256, MAX_WRITE_BLOCKS)  # 1 MiB per read
COMPARE_TRIES = 4
COMPARE_RETRY_S = 0.2


class ScrubSettings(Protocol):
    scrub_bytes_per_s: int
    scrub_pass_interval_s: float


class ScrubNode(Protocol):
    """What the scrub needs of its node."""

    node_id: int
    counters: Counter[str]
    engine: Engine

    @property
    def cfg(self) -> ScrubSettings: ...

    @property
    def failed(self) -> BaseException | None: ...

    def scrub_groups(self) -> list[int]: ...

    def scrub_view(self, gid: int) -> ScrubView | None: ...

    async def qos_admit(self, key: str, nbytes: int) -> Any: ...

    def qos_done(self, slot: Any) -> None: ...

    async def read_repair(self, gid: int, others: list[int], extent_id: int, block: int, n: int,
                          applied: int) -> tuple[bytearray, list[int]]: ...

    async def call_peer(self, peer: int, gid: int, req: pb.ClientRequest) -> tuple[pb.ClientResponse, Any]: ...


class Scrubber:
    def __init__(self, rt: ScrubNode) -> None:
        self.rt = rt
        self.passes = 0
        self._suspects: set[tuple[int, int, int, int]] = set()  # (group, extent, block, member) last pass
        self._found: set[tuple[int, int, int, int]] = set()  # this pass

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.rt.cfg
        if cfg.scrub_bytes_per_s <= 0:
            return
        while not stop.is_set():
            try:
                await self.one_pass(stop)
            except Exception as e:  # a scrub bug must not take the node down; it is logged and retried
                log.error("scrub.pass_failed", error=repr(e), exc_info=e)
            try:
                await asyncio.wait_for(stop.wait(), cfg.scrub_pass_interval_s)
            except TimeoutError:
                pass

    async def one_pass(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        rt = self.rt
        c = rt.counters
        before = {k: c[k] for k in ("scrub_blocks", "scrub_errors_found", "scrub_blocks_repaired",
                                    "scrub_suspects", "scrub_mismatches", "scrub_replica_repairs")}
        self._found = set()
        t0 = time.monotonic()
        for gid in rt.scrub_groups():
            for ext in group_extents(rt.engine, gid):
                index = rt.engine.index
                blocks = sorted(set(index.extents.get(ext, {})) | set(index.bad.get(ext, ())))
                for first, n in runs(blocks):
                    if stop is not None and stop.is_set():
                        return {}
                    slot = await rt.qos_admit("scrub", n * BLOCK_SIZE)  # rule 1
                    try:
                        if rt.scrub_view(gid) is None or rt.failed is not None:
                            break  # discarded meanwhile, or the node failed
                        await self.scrub_run(gid, ext, first, n)
                    finally:
                        rt.qos_done(slot)
        self.passes += 1
        self._suspects = self._found
        c["scrub_passes"] += 1
        found = {k: c[k] - v for k, v in before.items()}
        log.info("scrub.pass_done", passes=self.passes, seconds=round(time.monotonic() - t0, 1), **found)
        return found

    async def scrub_run(self, gid: int, ext: int, block: int, n: int) -> None:
        rt = self.rt
        c = rt.counters
        view = rt.scrub_view(gid)
        if view is None:
            return
        applied, others, comparer, _ = view
        at = applied()
        try:
            _, crcs = rt.engine.read(ext, block, n)
        except CorruptBlockError as e:
            log.error("scrub.corrupt_block", group=gid, extent_id=ext, block=e.block, reason=e.reason)
            repaired_before = c["blocks_repaired"]
            try:
                await rt.read_repair(gid, others, ext, block, n, at)
            except CorruptBlockError:
                c["scrub_repair_failed"] += 1
                return
            fixed = c["blocks_repaired"] - repaired_before
            c["scrub_errors_found"] += max(1, fixed)
            c["scrub_blocks_repaired"] += fixed
            at = applied()
            _, crcs = rt.engine.read(ext, block, n)
        c["scrub_blocks"] += n
        if comparer:
            for peer in others:
                await self._compare(gid, peer, ext, block, n, crcs, at, applied)

    async def _compare(self, gid: int, peer: int, ext: int, block: int, n: int, crcs: list[int], at: int,
                       applied: Callable[[], int]) -> None:
        from raftblock.wire.client import OP_C_SCRUB_CRCS, OP_C_SCRUB_REPAIR, ST_OK

        rt = self.rt
        c = rt.counters
        for _ in range(COMPARE_TRIES):
            req = pb.ClientRequest(op=OP_C_SCRUB_CRCS, extent_id=ext, block=block, count=n, min_applied=at)
            try:
                resp, _ = await rt.call_peer(peer, gid, req)
            except (OSError, ConnectionError, TimeoutError):
                c["scrub_compare_skipped"] += 1
                return
            if resp.status != ST_OK or len(resp.crcs) != n:
                c["scrub_compare_skipped"] += 1  # lagging, corrupt there (its own scrub repairs it), gone
                return
            theirs = list(resp.crcs)
            if theirs == crcs:
                return
            # Different: are we at the same point? Read again; the member may be ahead of our first read.
            at = applied()
            try:
                _, crcs = rt.engine.read(ext, block, n)
            except CorruptBlockError:
                return  # ours went bad meanwhile: the next pass repairs it first
            if theirs == crcs:
                return
            if at == resp.applied:
                break  # same point, different data: a finding
            await asyncio.sleep(COMPARE_RETRY_S)
        key = (gid, ext, block, peer)
        self._found.add(key)
        differ = sum(1 for a, b in zip(crcs, theirs, strict=True) if a != b)
        if key not in self._suspects:
            c["scrub_suspects"] += 1
            log.info("scrub.replicas_differ_once", group=gid, extent_id=ext, block=block, count=n, member=peer,
                     blocks=differ)
            return
        c["scrub_mismatches"] += 1
        log.error("scrub.replicas_differ", group=gid, extent_id=ext, block=block, count=n, member=peer, blocks=differ)
        view = rt.scrub_view(gid)
        if view is None or not view.repairs:
            return  # gone, or a chain: reported, not repaired
        req = pb.ClientRequest(op=OP_C_SCRUB_REPAIR, extent_id=ext, block=block, count=n, source_node=rt.node_id)
        try:
            resp, _ = await rt.call_peer(peer, gid, req)
        except (OSError, ConnectionError, TimeoutError) as e:
            log.warning("scrub.replica_repair_failed", group=gid, member=peer, error=repr(e))
            return
        if resp.status == ST_OK:
            c["scrub_replica_repairs"] += 1
