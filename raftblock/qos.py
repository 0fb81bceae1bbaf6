"""Quality of service: per-volume limits, reservations and weights, shared by the gateway and the storage nodes.

A volume's `QosSpec` lives in the metadata map (meta/state.py VolumeRecord, `volume set-qos`). The gateway that
has the volume attached keeps the host at its limits (`Limits.reserve`: the host waits there instead of
flooding a node, client/volume.py); each storage node schedules the client requests it leads with `Scheduler`
(node/admission.py), and its own repair and scrub traffic under their own classes in the same scheduler.

Rules:
1. A class (a volume, or one of a node's own kinds of traffic: repair, scrub) has a QosSpec: limits in ops/s
   and bytes/s, each a token bucket whose depth is its burst (0: one second's worth, the bucket starts full);
   a reservation (`min_iops`); a weight (1 when unset). 0 means none.
2. Limits always hold: a request starts only when both buckets hold its cost, or, for a request larger than
   a bucket, when the bucket is full; it then takes its whole cost, leaving the bucket in debt, so the rate
   over any long window is the limit plus at most one burst.
3. `Scheduler` is dmClock's server side (mClock, Gulati et al., OSDI 2010) over a node's in-flight slots
   (`slots_ops` requests, `slots_bytes` bytes; what the node may have queued in replication at once). A free
   slot goes first to a class whose reservation tag is due (R tags in real time, 1/min_iops apart; the
   smallest first); otherwise to the class, among those its limits let go, with the smallest proportional
   tag (P tags in virtual time, `cost / weight` apart, a backlogged class starting at the virtual time of
   the last dispatch: an idle class banks no credit and is never starved). A request dispatched by weight
   does not count against its class's reservation (the R tag does not move).
   No request waits longer than `wait_max_s` once its limits let it go: the oldest such head goes first (a
   starvation guard: a class of weight 1 beside one of weight 10,000 still makes progress, and no request
   waits at a node past its client's attempt timeout).
4. A request's cost for weights is `1 + bytes / WEIGHT_BYTES` (a 1 MiB write weighs 17 4 KiB writes: close to
   the CPU each costs a node, bench/README.md); for limits and reservations an op is an op.
5. Pure: time is an argument; no I/O, no asyncio, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

WEIGHT_BYTES = 64 << 10  # rule 4
WEIGHT_MAX = 10_000
INF = float("inf")


@dataclass(frozen=True)
class QosSpec:
    iops: int = 0  # limit, operations per second (0: none)
    bytes_per_s: int = 0  # limit, bytes per second (0: none)
    burst_iops: int = 0  # the ops bucket's depth (0: `iops`, one second)
    burst_bytes: int = 0  # the bytes bucket's depth (0: `bytes_per_s`, one second)
    min_iops: int = 0  # reservation, operations per second (0: none)
    weight: int = 1  # share of what is left once reservations are met

    def problem(self) -> str:
        """Why this spec is refused ("" = valid)."""
        for name in ("iops", "bytes_per_s", "burst_iops", "burst_bytes", "min_iops"):
            if getattr(self, name) < 0:
                return f"{name} must be >= 0"
        if not 1 <= self.weight <= WEIGHT_MAX:
            return f"weight must be 1..{WEIGHT_MAX}"
        if self.burst_iops and not self.iops:
            return "a burst of IOPS needs an IOPS limit"
        if self.burst_bytes and not self.bytes_per_s:
            return "a burst of bytes/s needs a bytes/s limit"
        if self.burst_iops and self.burst_iops < self.iops / 100:
            return "the IOPS burst must hold at least 10 ms of the limit"
        if self.iops and self.min_iops > self.iops:
            return f"the reservation ({self.min_iops} IOPS) is above the limit ({self.iops} IOPS)"
        return ""

    @property
    def unset(self) -> bool:
        return self == UNSET

    def describe(self) -> dict[str, int]:
        return {"iops": self.iops, "bytes_per_s": self.bytes_per_s, "burst_iops": self.burst_iops or self.iops,
                "burst_bytes": self.burst_bytes or self.bytes_per_s, "min_iops": self.min_iops,
                "weight": self.weight}


UNSET = QosSpec()


class Bucket:
    """A token bucket (rule 2): `rate` tokens per second, at most `depth`, starting full."""

    __slots__ = ("depth", "rate", "t", "tokens")

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate = rate
        self.depth = max(depth, 1.0)
        self.tokens = self.depth
        self.t = now

    def refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.depth, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def ready_at(self, now: float, cost: float) -> float:
        self.refill(now)
        need = min(cost, self.depth)
        if self.tokens >= need:
            return now
        return self.t + (need - self.tokens) / self.rate


class Limits:
    """A spec's two buckets (rule 2). `ready_at` + `take` for a scheduler that decides when a request goes;
    `reserve` for a caller that waits itself (the gateway: every caller takes its tokens at once, in arrival
    order, and sleeps until they would have been there)."""

    __slots__ = ("bytes", "ops")

    def __init__(self, spec: QosSpec, now: float) -> None:
        self.ops = Bucket(spec.iops, spec.burst_iops or spec.iops, now) if spec.iops > 0 else None
        self.bytes = (Bucket(spec.bytes_per_s, spec.burst_bytes or spec.bytes_per_s, now)
                      if spec.bytes_per_s > 0 else None)

    def ready_at(self, now: float, nbytes: int) -> float:
        t = now
        if self.ops is not None:
            t = max(t, self.ops.ready_at(now, 1))
        if self.bytes is not None and nbytes:
            t = max(t, self.bytes.ready_at(now, nbytes))
        return t

    def take(self, nbytes: int) -> None:
        if self.ops is not None:
            self.ops.tokens -= 1
        if self.bytes is not None:
            self.bytes.tokens -= nbytes

    def reserve(self, now: float, nbytes: int) -> float:
        """Take this request's tokens now (into debt if need be); the seconds to wait before it may start."""
        t = self.ready_at(now, nbytes)
        self.take(nbytes)
        return t - now


class _Waiting:
    __slots__ = ("arrival", "item", "nbytes")

    def __init__(self, item: Any, nbytes: int, arrival: float) -> None:
        self.item = item
        self.nbytes = nbytes
        self.arrival = arrival


class QosClass:
    """One class's spec, buckets, tags, queue and counters."""

    __slots__ = ("admitted", "by_age", "by_reservation", "key", "limits", "p_next", "queue", "r_prev", "r_step",
                 "spec", "waited", "wait_s", "weight")

    def __init__(self, key: Hashable, spec: QosSpec, now: float) -> None:
        self.key = key
        self.queue: deque[_Waiting] = deque()
        self.p_next = 0.0
        self.r_prev = -INF
        self.admitted = 0  # requests dispatched
        self.waited = 0  # ... of which waited in the queue
        self.wait_s = 0.0  # their total time in the queue
        self.by_reservation = 0  # ... dispatched because the reservation was due
        self.by_age = 0  # ... dispatched by the starvation guard
        self.set_spec(spec, now)

    def set_spec(self, spec: QosSpec, now: float) -> None:
        self.spec = spec
        self.limits = Limits(spec, now)
        self.r_step = 1.0 / spec.min_iops if spec.min_iops > 0 else 0.0
        self.weight = float(max(spec.weight, 1))

    def r_tag(self) -> float:
        """The head request's reservation tag (INF without a reservation)."""
        if not self.r_step:
            return INF
        return max(self.r_prev + self.r_step, self.queue[0].arrival)


class Scheduler:
    """dmClock over in-flight slots (rule 3). The driver calls `admit_now` for a request that arrives (the fast
    path: nothing queued anywhere, a slot free, the limits let it go), else `enqueue`; then `next` whenever a
    slot is released or the wake-up time it returned has come, and `release` when a request ends."""

    def __init__(self, slots_ops: int, slots_bytes: int, wait_max_s: float = 0.5) -> None:
        self.slots_ops = slots_ops
        self.slots_bytes = slots_bytes
        self.wait_max_s = wait_max_s  # rule 3: the starvation guard
        self.used_ops = 0
        self.used_bytes = 0
        self.vtime = 0.0
        self.classes: dict[Hashable, QosClass] = {}
        self.backlogged: dict[Hashable, QosClass] = {}  # classes with a queue, in the order they got one
        self.queued = 0

    # -- classes ------------------------------------------------------------------------------------------
    def cls(self, key: Hashable, now: float) -> QosClass:
        c = self.classes.get(key)
        if c is None:
            c = self.classes[key] = QosClass(key, UNSET, now)
        return c

    def set_spec(self, key: Hashable, spec: QosSpec, now: float) -> None:
        c = self.classes.get(key)
        if c is None:
            self.classes[key] = QosClass(key, spec, now)
        elif c.spec != spec:
            c.set_spec(spec, now)

    def drop(self, key: Hashable) -> list[Any]:
        """Forget a class (its volume is gone); the items still queued, for the driver to refuse."""
        c = self.classes.pop(key, None)
        if c is None:
            return []
        self.backlogged.pop(key, None)
        self.queued -= len(c.queue)
        return [w.item for w in c.queue]

    def __iter__(self) -> Iterator[QosClass]:
        return iter(self.classes.values())

    # -- slots ----------------------------------------------------------------------------------------------
    def _fits(self, nbytes: int) -> bool:
        return self.used_ops < self.slots_ops and (
            self.used_bytes == 0 or self.used_bytes + nbytes <= self.slots_bytes)

    def release(self, nbytes: int) -> None:
        self.used_ops -= 1
        self.used_bytes -= nbytes

    # -- tags -----------------------------------------------------------------------------------------------
    def _charge(self, c: QosClass, nbytes: int, r_tag: float) -> None:
        """A request of `c` goes: its limits, its P tag, and its R tag when the reservation was due (`r_tag`,
        INF when it goes by weight)."""
        c.limits.take(nbytes)
        p = c.p_next if c.p_next > self.vtime else self.vtime
        self.vtime = p
        c.p_next = p + (1.0 + nbytes / WEIGHT_BYTES) / c.weight
        if r_tag < INF:
            c.r_prev = r_tag
            c.by_reservation += 1
        c.admitted += 1

    # -- the fast path --------------------------------------------------------------------------------------
    def admit_now(self, c: QosClass, nbytes: int, now: float) -> bool:
        """Nothing waits anywhere, a slot is free and `c`'s limits let this request go: it goes (slot taken)."""
        if self.queued or not self._fits(nbytes):
            return False
        if c.limits.ops is not None or c.limits.bytes is not None:
            if c.limits.ready_at(now, nbytes) > now:
                return False
        self._charge(c, nbytes, now if c.r_step and c.r_prev + c.r_step <= now else INF)
        self.used_ops += 1
        self.used_bytes += nbytes
        return True

    def enqueue(self, c: QosClass, item: Any, nbytes: int, now: float) -> None:
        if not c.queue:
            self.backlogged[c.key] = c
        c.queue.append(_Waiting(item, nbytes, now))
        self.queued += 1

    # -- dispatch -------------------------------------------------------------------------------------------
    def next(self, now: float) -> tuple[Any, float]:
        """The next request to run (its slot taken) and INF; or (None, t): nothing may go before time t (INF:
        nothing until a slot is released or a request arrives)."""
        if not self.queued or self.used_ops >= self.slots_ops:
            return None, INF
        best_r: QosClass | None = None
        best_r_tag = INF
        best_p: QosClass | None = None
        best_p_tag = INF
        oldest: QosClass | None = None
        oldest_at = now - self.wait_max_s
        wake = INF
        for c in self.backlogged.values():
            head = c.queue[0]
            ready = c.limits.ready_at(now, head.nbytes) if (c.limits.ops or c.limits.bytes) else now
            if ready > now:
                if ready < wake:
                    wake = ready
                continue
            if head.arrival < oldest_at:
                oldest, oldest_at = c, head.arrival
            if c.r_step:
                r = c.r_tag()
                if r <= now and r < best_r_tag:
                    best_r, best_r_tag = c, r
            p = c.p_next if c.p_next > self.vtime else self.vtime
            if p < best_p_tag:
                best_p, best_p_tag = c, p
        chosen = best_r if best_r is not None else best_p
        if oldest is not None and chosen is not oldest:
            chosen, best_r_tag = oldest, INF  # the starvation guard (rule 3): it goes as if by weight
            oldest.by_age += 1
        if chosen is None:
            return None, wake
        head = chosen.queue[0]
        if not self._fits(head.nbytes):
            return None, INF  # head of line: the bytes in flight must drain first
        chosen.queue.popleft()
        self.queued -= 1
        if not chosen.queue:
            del self.backlogged[chosen.key]
        self._charge(chosen, head.nbytes, best_r_tag if chosen is best_r else INF)
        chosen.waited += 1
        chosen.wait_s += now - head.arrival
        self.used_ops += 1
        self.used_bytes += head.nbytes
        return head.item, INF

    # -- traffic that takes no slot ---------------------------------------------------------------------------
    def poll(self, c: QosClass, nbytes: int, now: float) -> bool:
        """May a request of `c` that holds no slot (a repair chunk the node sends) go now? Yes when its limits
        let it and either nothing waits, its reservation is due, or its P tag is no later than any waiting
        class's (it then takes its turn as if it had waited)."""
        if c.limits.ready_at(now, nbytes) > now:
            return False
        r_due = bool(c.r_step) and c.r_prev + c.r_step <= now
        if self.queued and not r_due:
            p = c.p_next if c.p_next > self.vtime else self.vtime
            for o in self.backlogged.values():
                if (o.p_next if o.p_next > self.vtime else self.vtime) < p:
                    return False
        self._charge(c, nbytes, max(c.r_prev + c.r_step, now) if r_due else INF)
        return True
