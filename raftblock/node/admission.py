"""Admission: a storage node's QoS scheduler in front of its data plane (raftblock/qos.py `Scheduler`).

Rules:
1. Every client READ, WRITE and TRIM of a volume's group passes here before it reaches its replica, from a
   socket or from the gateway in this process alike (`DataPlane.on_request`); its class is its volume
   (`set_volumes`, from the map the agent follows: the volume's QosSpec, changed while attached within a
   map poll). A group the map has not told about yet is scheduled under class 0 (no limits, weight 1).
2. A request holds one of the node's in-flight slots (`qos_slots_ops` requests, `qos_slots_bytes` bytes)
   from admission until its reply leaves (`Slot.reply`); a free slot goes to the next request the scheduler
   picks (reservations, then weights, limits always), dispatched on a later callback, never inside the
   reply that freed the slot (a reply may run inside a replica's apply).
3. The node's own traffic takes its turn in the same scheduler: Raft snapshot and chain image chunks sent to
   a rebuilding or lagging replica (class "repair": the `repair_bytes_per_s` limit and a reservation of
   `repair_min_bytes_per_s`, `poll`: no slot), scrub reads (class "scrub", `scrub_bytes_per_s`, `admit`:
   waits in the queue like a client request) and replica reads for read repair (class "repair").
4. Bounded: at most `QUEUE_MAX` requests wait; past it a request is refused UNAVAILABLE (the client retries
   within its deadline). A slot whose reply never came is given back after `SLOT_LOST_S` (logged), so a
   lost reply cannot shrink the node's capacity.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from raftblock.qos import INF, QosClass, QosSpec, Scheduler
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import OP_C_READ
from raftblock.wire.ops import BLOCK_SIZE

log = structlog.get_logger(__name__)

QUEUE_MAX = 4096
SLOT_LOST_S = 120.0
REPAIR = "repair"
SCRUB = "scrub"


class AdmissionSettings(Protocol):
    qos_slots_ops: int
    qos_slots_bytes: int
    qos_wait_max_ms: int
    repair_bytes_per_s: int
    repair_min_bytes_per_s: int
    scrub_bytes_per_s: int
    snapshot_chunk_bytes: int


class Link(Protocol):
    def reply(self, gid: int, resp: pb.ClientResponse, data: Any) -> None: ...


class Slot:
    """A client link whose first reply gives its slot back (rule 2)."""

    __slots__ = ("adm", "conn", "nbytes", "t")

    def __init__(self, adm: Admission, conn: Link, nbytes: int, t: float) -> None:
        self.adm = adm
        self.conn = conn
        self.nbytes = nbytes
        self.t = t

    def reply(self, gid: int, resp: pb.ClientResponse, data: Any) -> None:
        self.adm.done(self)
        self.conn.reply(gid, resp, data)


class Admission:
    def __init__(self, cfg: AdmissionSettings, run: Callable[[Any, int, pb.ClientRequest, Any], None],
                 refuse: Callable[[Any, int, pb.ClientRequest, str], None]) -> None:
        self.cfg = cfg
        self._run = run  # DataPlane: carry out an admitted request
        self._refuse = refuse  # DataPlane: answer UNAVAILABLE
        now = time.monotonic()
        self.sched = Scheduler(cfg.qos_slots_ops, cfg.qos_slots_bytes, cfg.qos_wait_max_ms / 1000)
        self.group_class: dict[int, QosClass] = {}
        self.names: dict[int, str] = {}  # volume id -> name (metrics)
        self.default = self.sched.cls(0, now)
        self.set_internal()
        self.inflight: set[Slot] = set()
        self.refused = 0
        self.slots_lost = 0
        self._dispatch_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = INF

    def set_internal(self) -> None:
        cfg, now = self.cfg, time.monotonic()
        chunk = max(cfg.snapshot_chunk_bytes, 1)
        self.sched.set_spec(REPAIR, QosSpec(bytes_per_s=max(cfg.repair_bytes_per_s, 0),
                                            burst_bytes=max(cfg.repair_bytes_per_s // 10, 2 * chunk)
                                            if cfg.repair_bytes_per_s > 0 else 0,
                                            min_iops=-(-cfg.repair_min_bytes_per_s // chunk)
                                            if cfg.repair_min_bytes_per_s > 0 else 0), now)
        self.sched.set_spec(SCRUB, QosSpec(bytes_per_s=max(cfg.scrub_bytes_per_s, 0),
                                           burst_bytes=1 << 20 if cfg.scrub_bytes_per_s > 0 else 0), now)

    # == rule 1 ==================================================================================================
    def set_volumes(self, volumes: Mapping[int, tuple[str, QosSpec, list[int]]]) -> None:
        """The map's volumes: id -> (name, spec, groups). Called by the agent after every map change."""
        now = time.monotonic()
        group_class: dict[int, QosClass] = {}
        for vid, (name, spec, groups) in volumes.items():
            self.sched.set_spec(vid, spec, now)
            c = self.sched.classes[vid]
            self.names[vid] = name
            for g in groups:
                group_class[g] = c
        for vid in [k for k in self.sched.classes if isinstance(k, int) and k and k not in volumes]:
            for item in self.sched.drop(vid):  # deleted: whatever still waits is refused
                if isinstance(item[0], asyncio.Future):
                    continue
                conn, gid, req, _payload, _n = item
                self._refuse(conn, gid, req, "volume deleted")
            self.names.pop(vid, None)
        self.group_class = group_class

    def volume_of(self, gid: int) -> int:
        """The volume id of group `gid` as the map says (0: not known); node/transport.py checks a frame signed
        with a volume's key against it."""
        c = self.group_class.get(gid)
        return c.key if c is not None and isinstance(c.key, int) else 0

    # == client requests ===========================================================================================
    def admit(self, conn: Link, gid: int, req: pb.ClientRequest, payload: Any) -> Slot | None:
        """The link to run `req` with now (a Slot), or None: it waits (it runs later, or is refused)."""
        nbytes = req.count * BLOCK_SIZE if req.op == OP_C_READ else len(payload)
        c = self.group_class.get(gid, self.default)
        now = time.monotonic()
        if self.sched.admit_now(c, nbytes, now):
            slot = Slot(self, conn, nbytes, now)
            self.inflight.add(slot)
            return slot
        if self.sched.queued >= QUEUE_MAX:
            self.refused += 1
            self._refuse(conn, gid, req, f"node busy: {QUEUE_MAX} requests wait for admission")
            return None
        self.sched.enqueue(c, (conn, gid, req, payload, nbytes), nbytes, now)
        self._wake(now)
        return None

    def done(self, slot: Slot) -> None:
        if slot in self.inflight:
            self.inflight.discard(slot)
            self.sched.release(slot.nbytes)
            if self.sched.queued:
                self._soon()

    # == internal traffic (rule 3) ===============================================================================
    def poll(self, key: str, nbytes: int) -> bool:
        return self.sched.poll(self.sched.cls(key, 0.0), nbytes, time.monotonic())

    async def admit_internal(self, key: str, nbytes: int) -> Slot:
        """Wait for a slot of class `key`; the caller gives it back with `done(slot)`."""
        now = time.monotonic()
        c = self.sched.cls(key, now)
        if self.sched.admit_now(c, nbytes, now):
            slot = Slot(self, _NO_LINK, nbytes, now)
            self.inflight.add(slot)
            return slot
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self.sched.enqueue(c, (fut, nbytes), nbytes, now)
        self._wake(now)
        return await fut

    # == dispatch (rule 2) =========================================================================================
    def _soon(self) -> None:
        if not self._dispatch_soon:
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def _wake(self, now: float) -> None:
        item, wake = self.sched.next(now)
        if item is not None:
            self._start(item, now)
            self._soon()
            return
        self._arm(wake, now)

    def _arm(self, wake: float, now: float) -> None:
        if wake < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = wake
            self._timer = asyncio.get_running_loop().call_later(max(0.0, wake - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, INF
        self.dispatch()

    def dispatch(self) -> None:
        self._dispatch_soon = False
        now = time.monotonic()
        while True:
            item, wake = self.sched.next(now)
            if item is None:
                if wake < INF:
                    self._arm(wake, now)
                return
            self._start(item, now)

    def _start(self, item: Any, now: float) -> None:
        if isinstance(item[0], asyncio.Future):
            fut, nbytes = item
            if fut.done():  # its waiter was cancelled
                self.sched.release(nbytes)
                return
            slot = Slot(self, _NO_LINK, nbytes, now)
            self.inflight.add(slot)
            fut.set_result(slot)
            return
        conn, gid, req, payload, nbytes = item
        slot = Slot(self, conn, nbytes, now)
        self.inflight.add(slot)
        self._run(slot, gid, req, payload)

    # == rule 4 ==================================================================================================
    def every_second(self) -> None:
        now = time.monotonic()
        lost = [s for s in self.inflight if now - s.t > SLOT_LOST_S]
        for s in lost:
            self.slots_lost += 1
            self.done(s)
        if lost:
            log.warning("admission.slots_lost", count=len(lost), seconds=SLOT_LOST_S)

    def stats(self) -> dict[str, Any]:
        s = self.sched
        return {"slots_used": s.used_ops, "slots_bytes_used": s.used_bytes, "slots": s.slots_ops,
                "queued": s.queued, "refused": self.refused, "slots_lost": self.slots_lost}


class _NoLink:
    def reply(self, gid: int, resp: pb.ClientResponse, data: Any) -> None:
        pass


_NO_LINK = _NoLink()
