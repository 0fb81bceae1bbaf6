"""node/admission.py: a node's QoS scheduler in front of its data plane, on a real event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from raftblock.node import admission as adm_mod
from raftblock.node.admission import Admission, Slot
from raftblock.qos import QosSpec
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.client import OP_C_READ, OP_C_WRITE


class Cfg:
    qos_slots_ops = 2
    qos_slots_bytes = 1 << 20
    qos_wait_max_ms = 500
    repair_bytes_per_s = 0
    repair_min_bytes_per_s = 0
    scrub_bytes_per_s = 0
    snapshot_chunk_bytes = 1 << 20


class Link:
    def __init__(self) -> None:
        self.replies: list[tuple[int, pb.ClientResponse]] = []

    def reply(self, gid: int, resp: pb.ClientResponse, data: Any) -> None:
        self.replies.append((gid, resp))


class Plane:
    """What the data plane does with an admitted request: records it; the test answers it."""

    def __init__(self) -> None:
        self.ran: list[tuple[Slot, int, pb.ClientRequest]] = []
        self.refused: list[tuple[int, pb.ClientRequest, str]] = []

    def run(self, conn: Any, gid: int, req: pb.ClientRequest, payload: Any) -> None:
        self.ran.append((conn, gid, req))

    def refuse(self, conn: Any, gid: int, req: pb.ClientRequest, why: str) -> None:
        self.refused.append((gid, req, why))


def _write(rid: int) -> pb.ClientRequest:
    return pb.ClientRequest(op=OP_C_WRITE, request_id=rid, count=1)


async def _until(cond: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def make() -> tuple[Admission, Plane]:
    p = Plane()
    a = Admission(Cfg(), p.run, p.refuse)
    a.set_volumes({1: ("a", QosSpec(), [10]), 2: ("b", QosSpec(weight=3), [20])})
    return a, p


def test_requests_past_the_slots_wait_and_run_as_slots_free_by_weight() -> None:
    async def go() -> None:
        a, p = make()
        link = Link()
        s1 = a.admit(link, 10, _write(1), b"x" * 4096)
        s2 = a.admit(link, 20, _write(2), b"x" * 4096)
        assert isinstance(s1, Slot) and isinstance(s2, Slot)  # the fast path: slots free, nothing waits
        for rid in range(3, 11):  # four of each volume wait
            assert a.admit(link, 10 if rid % 2 else 20, _write(rid), b"x" * 4096) is None
        assert a.sched.queued == 8 and not p.ran
        order = []
        for _ in range(8):
            slot = s1 if not order else order[-1][0]
            slot.reply(10, pb.ClientResponse(), ())  # the reply gives the slot back ...
            n = len(order)
            await _until(lambda: len(p.ran) > n, "a dispatch")  # noqa: B023 (... the next runs on a later callback)
            order.append(p.ran[-1])
        gids = [g for _, g, _ in order]
        # weight 3 against 1: b's four go before a's last three
        assert gids[:5].count(20) == 4, gids
        assert link.replies and a.sched.used_ops == 2
    asyncio.run(go())


def test_a_limit_holds_at_the_node_and_a_timer_wakes_the_queue() -> None:
    async def go() -> None:
        a, p = make()
        a.set_volumes({1: ("a", QosSpec(iops=20, burst_iops=1), [10])})
        a.sched.slots_ops = 100
        link = Link()
        t0 = time.monotonic()
        slots = [a.admit(link, 10, _write(i), b"x" * 4096) for i in range(5)]
        assert isinstance(slots[0], Slot) and slots[1:] == [None] * 4  # one token; the rest wait for time
        await _until(lambda: len(p.ran) == 4, "four more at 20 IOPS")
        assert time.monotonic() - t0 >= 0.19  # 4 x 50 ms, nothing early
    asyncio.run(go())


def test_a_full_queue_refuses_and_a_deleted_volume_refuses_what_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        monkeypatch.setattr(adm_mod, "QUEUE_MAX", 3)
        a, p = make()
        link = Link()
        assert a.admit(link, 10, _write(1), b"") and a.admit(link, 10, _write(2), b"")
        for rid in (3, 4, 5):
            assert a.admit(link, 10, _write(rid), b"") is None
        assert a.admit(link, 20, _write(6), b"") is None
        assert [r.request_id for _, r, _ in p.refused] == [6] and "busy" in p.refused[0][2]
        a.set_volumes({2: ("b", QosSpec(), [20])})  # volume a deleted: its three waiting requests are refused
        assert sorted(r.request_id for _, r, _ in p.refused) == [3, 4, 5, 6]
        assert a.sched.queued == 0
    asyncio.run(go())


def test_a_slot_whose_reply_never_came_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        a, p = make()
        link = Link()
        s1 = a.admit(link, 10, _write(1), b"")
        assert s1 is not None and a.admit(link, 10, _write(2), b"") is not None
        assert a.admit(link, 10, _write(3), b"") is None
        monkeypatch.setattr(adm_mod, "SLOT_LOST_S", -1.0)
        a.every_second()
        assert a.slots_lost == 2
        await _until(lambda: len(p.ran) == 1, "the waiting request")
        s1.reply(10, pb.ClientResponse(), ())  # a late reply does not free a slot twice
        assert a.sched.used_ops == 1 and link.replies
    asyncio.run(go())


def test_internal_traffic_waits_its_turn_and_reads_count_their_bytes() -> None:
    async def go() -> None:
        a, p = make()
        link = Link()
        read = pb.ClientRequest(op=OP_C_READ, request_id=1, count=256)  # 1 MiB: every byte slot
        s1 = a.admit(link, 10, read, b"")
        assert s1 is not None and s1.nbytes == 1 << 20
        waiter = asyncio.ensure_future(a.admit_internal("scrub", 4096))
        await asyncio.sleep(0)
        assert not waiter.done()  # the bytes in flight are the node's limit
        s1.reply(10, pb.ClientResponse(), ())
        slot = await asyncio.wait_for(waiter, 5)
        assert a.sched.used_bytes == 4096
        a.done(slot)
        assert a.sched.used_ops == 0 and a.sched.used_bytes == 0
        assert a.poll("repair", 1 << 20)  # nothing waits: repair goes
    asyncio.run(go())
