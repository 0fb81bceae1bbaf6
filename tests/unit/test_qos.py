"""raftblock/qos.py: limits, reservations and weights, on a simulated server (time is an argument)."""

from __future__ import annotations

import heapq

import pytest

from raftblock.qos import INF, Limits, QosSpec, Scheduler


def simulate(specs: dict[str, QosSpec], demand: dict[str, int], seconds: float, *, slots: int = 8,
             service_s: float = 0.01, nbytes: int = 4096, start: dict[str, float] | None = None,
             wait_max_s: float = INF) -> tuple[dict[str, list[float]], Scheduler]:
    """A server with `slots` in flight, each request taking `service_s`; each class keeps `demand[k]` requests
    outstanding (a closed loop, like fio at that queue depth) from time `start[k]`. Returns each class's
    dispatch times."""
    sched = Scheduler(slots, 1 << 40, wait_max_s)
    for k, s in specs.items():
        sched.set_spec(k, s, 0.0)
    start = start or {}
    done: dict[str, list[float]] = {k: [] for k in specs}
    events: list[tuple[float, int, str, str]] = []  # (time, seq, kind, class)
    seq = 0

    def push(t: float, kind: str, k: str) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, k))

    for k, qd in demand.items():
        for _ in range(qd):
            push(start.get(k, 0.0), "arrive", k)
    wake_at = INF
    while events:
        t, _, kind, k = heapq.heappop(events)
        if t > seconds:
            break
        if kind == "arrive":
            c = sched.cls(k, t)
            if sched.admit_now(c, nbytes, t):
                done[k].append(t)
                push(t + service_s, "finish", k)
            else:
                sched.enqueue(c, k, nbytes, t)
        elif kind == "finish":
            sched.release(nbytes)
            push(t, "arrive", k)  # closed loop: the next request of that class
        # dispatch whatever may go now
        while True:
            item, wake = sched.next(t)
            if item is None:
                if wake < INF and wake != wake_at:
                    wake_at = wake
                    push(wake, "wake", "")
                break
            done[item].append(t)
            push(t + service_s, "finish", item)
    return done, sched


def rate(times: list[float], t0: float, t1: float) -> float:
    return sum(1 for t in times if t0 <= t < t1) / (t1 - t0)


def test_an_iops_limit_holds_over_any_long_window_plus_one_burst() -> None:
    spec = QosSpec(iops=200, burst_iops=50)
    done, _ = simulate({"a": spec}, {"a": 64}, 30.0, slots=64, service_s=0.002)
    n = len(done["a"])
    assert 200 * 30 <= n <= 200 * 30 + 50 + 1
    # every one-second window after the burst holds the limit within one request
    for s in range(1, 29):
        assert abs(rate(done["a"], s, s + 1) - 200) <= 1.0


def test_a_bytes_limit_holds_and_a_big_request_leaves_the_bucket_in_debt() -> None:
    spec = QosSpec(bytes_per_s=1 << 20)  # 1 MiB/s, 256 4 KiB requests per second
    done, _ = simulate({"a": spec}, {"a": 16}, 10.0, slots=16)
    assert abs(len(done["a"]) - 256 * 11) <= 2  # ten seconds plus the one-second bucket it started with
    lim = Limits(QosSpec(bytes_per_s=1000, burst_bytes=1000), 0.0)
    assert lim.ready_at(0.0, 5000) == 0.0  # bigger than the bucket: goes when the bucket is full ...
    lim.take(5000)
    assert lim.ready_at(0.0, 10) == pytest.approx(4.01)  # ... and the next one waits for the debt


def test_reserve_spaces_waiting_callers_in_arrival_order() -> None:
    lim = Limits(QosSpec(iops=10, burst_iops=1), 0.0)
    waits = [lim.reserve(0.0, 4096) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # after an idle second the bucket is full again (depth 1), not five seconds of credit
    assert lim.reserve(2.0, 4096) == 0.0
    assert lim.reserve(2.0, 4096) == pytest.approx(0.1)


def test_weights_share_a_saturated_server_in_proportion() -> None:
    done, _ = simulate({"a": QosSpec(weight=1), "b": QosSpec(weight=3)}, {"a": 32, "b": 32}, 10.0)
    a, b = rate(done["a"], 1, 10), rate(done["b"], 1, 10)
    assert a + b == pytest.approx(800, rel=0.01)  # 8 slots, 10 ms each
    assert b / a == pytest.approx(3.0, rel=0.05)


def test_a_reservation_is_met_while_a_heavier_class_saturates_the_server() -> None:
    specs = {"quiet": QosSpec(weight=1), "noisy": QosSpec(weight=100)}
    done, _ = simulate(specs, {"quiet": 16, "noisy": 64}, 10.0)
    without = rate(done["quiet"], 1, 10)
    assert without < 20  # ~800/101: the weights alone leave it little
    specs["quiet"] = QosSpec(weight=1, min_iops=300)
    done, sched = simulate(specs, {"quiet": 16, "noisy": 64}, 10.0)
    assert rate(done["quiet"], 1, 10) >= 300 * 0.98
    assert rate(done["quiet"] + done["noisy"], 1, 10) == pytest.approx(800, rel=0.01)  # nothing idles
    assert sched.classes["quiet"].by_reservation > 0.9 * len(done["quiet"]) - 50


def test_the_starvation_guard_bounds_every_wait() -> None:
    """Weight 1 beside weight 10,000: the weights alone leave the light class waiting seconds per request (a
    client's attempt timeout is 1 s); with the guard no request waits much past `wait_max_s`."""
    specs = {"light": QosSpec(weight=1), "heavy": QosSpec(weight=10_000)}
    done, sched = simulate(specs, {"light": 8, "heavy": 64}, 20.0)
    light = sched.classes["light"]
    assert light.waited and light.wait_s / light.waited > 2.0  # without the guard
    done, sched = simulate(specs, {"light": 8, "heavy": 64}, 20.0, wait_max_s=0.5)
    light = sched.classes["light"]
    assert light.by_age > 0
    assert light.wait_s / light.waited <= 0.5 + 0.02
    assert rate(done["heavy"], 1, 20) > 0.9 * 800  # the heavy class keeps nearly everything


def test_requests_dispatched_by_weight_do_not_count_against_the_reservation() -> None:
    # a heavy class that gets plenty by weight needs its reservation rarely
    specs = {"a": QosSpec(weight=10, min_iops=100), "b": QosSpec(weight=1)}
    done, sched = simulate(specs, {"a": 32, "b": 32}, 10.0)
    a = sched.classes["a"]
    assert rate(done["a"], 1, 10) > 600
    assert a.by_reservation < 0.25 * a.admitted


def test_an_idle_class_banks_no_credit() -> None:
    # b runs alone for 5 s, then a starts: a gets its half at once, not 5 s of catch-up that starves b
    done, _ = simulate({"a": QosSpec(), "b": QosSpec()}, {"a": 32, "b": 32}, 8.0, start={"a": 5.0})
    assert rate(done["b"], 5.5, 8) == pytest.approx(400, rel=0.05)
    assert rate(done["a"], 5.5, 8) == pytest.approx(400, rel=0.05)


def test_a_quiet_class_goes_ahead_of_a_backlog() -> None:
    """A QD1 class behind a QD64 one waits for one slot, not for the backlog (its P tag is the virtual time)."""
    done, sched = simulate({"noisy": QosSpec(), "quiet": QosSpec()}, {"noisy": 64, "quiet": 1}, 5.0)
    q = sched.classes["quiet"]
    assert q.waited > 0
    assert q.wait_s / q.waited < 0.01 + 1e-9  # at most one service time
    assert rate(done["quiet"], 1, 5) > 45  # ~1 / (10 ms + wait)


def test_limits_hold_in_the_reservation_phase_too() -> None:
    done, _ = simulate({"a": QosSpec(iops=50, burst_iops=5, min_iops=50), "b": QosSpec(weight=100)},
                       {"a": 16, "b": 64}, 10.0)
    assert rate(done["a"], 1, 10) <= 50.5


def test_poll_waits_its_turn_only_when_others_wait() -> None:
    sched = Scheduler(1, 1 << 30)
    repair = sched.cls("repair", 0.0)
    vol = sched.cls("v", 0.0)
    sched.set_spec("repair", QosSpec(bytes_per_s=10 << 20), 0.0)
    assert sched.poll(repair, 1 << 20, 0.0)  # nothing waits: goes
    assert sched.admit_now(vol, 4096, 0.0)  # the one slot
    sched.enqueue(vol, "w1", 4096, 0.0)  # a client request waits; repair has the later P tag now
    assert not sched.poll(repair, 1 << 20, 0.0)
    sched.release(4096)
    assert sched.next(0.0)[0] == "w1"
    assert sched.poll(repair, 1 << 20, 0.0)  # nothing waits again
    # its limit holds (10 MiB/s, a 10 MiB bucket that started full and gave 2 MiB)
    n = sum(1 for _ in range(20) if sched.poll(repair, 1 << 20, 0.0))
    assert n == 8


def test_drop_returns_the_queued_items() -> None:
    sched = Scheduler(1, 1 << 30)
    c = sched.cls(7, 0.0)
    assert sched.admit_now(c, 0, 0.0)
    sched.enqueue(c, "x", 0, 0.0)
    sched.enqueue(c, "y", 0, 0.0)
    assert sched.drop(7) == ["x", "y"]
    assert sched.queued == 0 and not sched.backlogged


@pytest.mark.parametrize(("spec", "problem"), [
    (QosSpec(iops=-1), "iops must be >= 0"),
    (QosSpec(weight=0), "weight must be 1..10000"),
    (QosSpec(burst_iops=10), "a burst of IOPS needs an IOPS limit"),
    (QosSpec(burst_bytes=10), "a burst of bytes/s needs a bytes/s limit"),
    (QosSpec(iops=100, min_iops=200), "the reservation (200 IOPS) is above the limit (100 IOPS)"),
    (QosSpec(iops=10000, burst_iops=50), "the IOPS burst must hold at least 10 ms of the limit"),
    (QosSpec(iops=100, min_iops=100, weight=5), ""),
])
def test_spec_checks(spec: QosSpec, problem: str) -> None:
    assert spec.problem() == problem
