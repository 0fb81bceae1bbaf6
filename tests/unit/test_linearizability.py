# The block-store linearizability checker (raftblock.testing.linearizability): hand-written bad histories
# it must reject and good ones it must accept, indeterminate and failed operations, the JSONL recorder,
# a differential test against a brute-force reference on tiny random histories, histories simulated
# from a real register (linearizable by construction) with one read corrupted, and a 2,000-op history.
from __future__ import annotations

import random
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from raftblock.testing.linearizability import History, Op, check, norm_value

V1, V2, V3 = (1, 1), (2, 1), (3, 1)  # (client, seq) tags


def w(value: Any, call: float, ret: float | None, client: int = 1, key: int = 0, ok: bool = True) -> Op:
    return Op(client=client, kind="w", key=key, value=value, call=call, ret=ret, ok=ok)


def r(value: Any, call: float, ret: float | None, client: int = 2, key: int = 0, ok: bool = True) -> Op:
    return Op(client=client, kind="r", key=key, value=value, call=call, ret=ret, ok=ok)


def assert_bad(ops: list[Op]) -> str:
    res = check(ops)
    assert res.ok is False, res
    assert res.bad_key == 0
    assert res.explain and res.ops
    return res.explain


def assert_good(ops: list[Op]) -> None:
    res = check(ops)
    assert res.ok is True, res.explain


# ---- known-bad histories -------------------------------------------------------------------------------

def test_stale_read_rejected() -> None:
    assert_bad([w(V1, 0, 1), w(V2, 2, 3), r(V1, 4, 5)])


def test_lost_acknowledged_write_rejected() -> None:
    # The write was acknowledged and nothing is concurrent; the later read sees the block as before.
    explain = assert_bad([w(V1, 0, 1), r(None, 2, 3)])
    assert "zeroes" in explain
    # The same with bytes: an acknowledged 4 KiB block that reads back as zeroes.
    assert_bad([w(b"\x01" * 4096, 0, 1), r(bytes(4096), 2, 3)])


def test_value_nobody_wrote_rejected() -> None:
    explain = assert_bad([w(V1, 0, 1), r(V3, 2, 3)])
    assert "no write" in explain
    # A value written only by a write that definitely failed counts as never written.
    assert_bad([w(V1, 0, 1, ok=False), r(V1, 2, 3)])


def test_read_from_the_future_rejected() -> None:
    # The read returned before the write that produced its value was even invoked.
    assert "before the only write" in assert_bad([r(V1, 0, 1), w(V1, 2, 3)])
    # The same value written twice: the search, not the shortcut, has to find it.
    assert_bad([r(V1, 0, 1), w(V1, 2, 3), w(V1, 4, 5, client=3)])


def test_reads_contradicting_real_time_rejected() -> None:
    # Two concurrent writes; reads in real-time order see V1, then V2, then V1 again: each pair alone is
    # fine, the three together need V1 written twice.
    ops = [w(V1, 0, 10, client=1), w(V2, 0, 10, client=3), r(V1, 1, 2), r(V2, 3, 4), r(V1, 5, 6, client=4)]
    assert_bad(ops)
    assert_good(ops[:4])
    # Two readers disagreeing on the order of two concurrent writes, after both writes finished.
    assert_bad([w(V1, 0, 3, client=1), w(V2, 0, 3, client=3),
                r(V1, 4, 5, client=2), r(V2, 4, 5, client=4),
                r(V2, 6, 7, client=2), r(V1, 6, 7, client=4)])


def test_bad_key_is_named_and_other_blocks_pass() -> None:
    ops = [w(V1, 0, 1, key=k) for k in range(4)] + [r(V1, 2, 3, key=k) for k in range(4)]
    ops[6] = r(None, 2, 3, key=2)
    res = check(ops)
    assert res.ok is False and res.bad_key == 2
    assert res.keys == 4
    assert res.explain.startswith("block 2:")


# ---- known-good histories ------------------------------------------------------------------------------

@pytest.mark.parametrize("seen", [V1, V2])
def test_concurrent_writes_read_in_either_order(seen: Any) -> None:
    assert_good([w(V1, 0, 3, client=1), w(V2, 1, 4, client=3), r(seen, 5, 6)])


def test_concurrent_writes_observed_switching_while_in_flight() -> None:
    # During the overlap a reader may see V2 then V1 (order V2, V1), and must then keep seeing V1.
    ops = [w(V1, 0, 3, client=1), w(V2, 1, 4, client=3), r(V2, 1.5, 2), r(V1, 2.5, 3.5)]
    assert_good([*ops, r(V1, 5, 6)])
    assert_bad([*ops, r(V2, 5, 6)])


@pytest.mark.parametrize("seen", [None, V1])
def test_read_concurrent_with_write_returns_old_or_new(seen: Any) -> None:
    assert_good([w(V1, 0, 2), r(seen, 1, 3), r(V1, 4, 5)])


@pytest.mark.parametrize("seen", [False, True])
def test_indeterminate_write_seen_or_never_seen(seen: bool) -> None:
    later = V1 if seen else None
    assert_good([w(V1, 0, None), r(later, 1, 2), r(later, 3, 4)])
    # ... or seen only long after the client gave up on it.
    assert_good([w(V1, 0, None), r(None, 1, 2), r(V1, 100, 101)])


def test_indeterminate_write_once_visible_stays_visible() -> None:
    # Seen by a read, then not seen by a read that began after the first returned: the write would have to
    # take effect and then un-happen. Rejected.
    assert_bad([w(V1, 0, None), r(V1, 1, 2), r(None, 3, 4, client=3)])
    # If the two reads overlap, the second may be ordered first (before the write took effect): accepted.
    assert_good([w(V1, 0, None), r(V1, 1, 3), r(None, 2, 4, client=3)])
    # Overwritten by an acknowledged write in between: the later read sees that one, fine.
    assert_good([w(V1, 0, None), r(V1, 1, 2), w(V2, 2.5, 2.8, client=3), r(V2, 3, 4)])
    # An indeterminate write cannot take effect before it was invoked.
    assert_bad([r(V1, 0, 1), w(V1, 2, None)])


def test_failed_and_indeterminate_reads_dropped() -> None:
    # A definitely failed write never took effect; a read that failed or timed out observed nothing.
    assert_good([w(V1, 0, 1), w(V2, 2, 3, ok=False), r(V1, 4, 5), r(V3, 4, 5, ok=False), r(V3, 4, None)])
    assert_bad([w(V1, 0, 1), w(V2, 2, 3, ok=False), r(V2, 4, 5)])
    res = check([w(V1, 0, 1), w(V2, 2, 3, ok=False), r(V1, 4, 5), r(V3, 4, None)])
    assert res.ops_checked == 2


def test_time_budget_gives_unknown() -> None:
    ops = simulate(random.Random(1), clients=4, per_client=50)
    res = check(ops, timeout_s=0.0)
    assert res.ok is None and res.unknown_keys == [0]
    assert not res
    assert check(ops).ok is True


# ---- the recorder ---------------------------------------------------------------------------------------

def test_history_records_and_replays(tmp_path: Path) -> None:
    clock = iter(range(100))
    live = tmp_path / "live.jsonl"
    h = History(path=live, clock=lambda: float(next(clock)))
    blk = b"\x07" * 4096
    a = h.invoke(1, "w", 5, blk)        # t0
    b = h.invoke(2, "w", 5, b"\x08" * 4096)  # t1, will time out
    c = h.invoke(3, "w", 5, b"\x09" * 4096)  # t2, will definitely fail
    h.ok(a)                             # t3
    h.timeout(b)                        # t4
    h.fail(c)                           # t5
    d = h.invoke(2, "r", 5)             # t6
    h.ok(d, blk)                        # t7
    h.invoke(4, "r", 5)                 # t8, never completes
    h.close()
    ops = h.to_ops()
    assert [o.status for o in ops] == ["ok", "info", "fail", "ok", "info"]
    assert ops[0].call == 0 and ops[0].ret == 3 and ops[3].value == norm_value(blk)
    assert check(ops).ok is True
    saved = tmp_path / "h.jsonl"
    h.save(saved)
    assert History.load(saved).to_ops() == ops
    assert History.load(live).to_ops() == ops  # the streamed file says the same
    # A read returning the failed write's block is caught after the round trip.
    bad = History.load(saved)
    e = bad.invoke(2, "r", 5, t=20)
    bad.ok(e, b"\x09" * 4096, t=21)
    assert check(bad.to_ops()).ok is False


def test_history_tolerates_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    h = History(path=p)
    h.ok(h.invoke(1, "w", 0, (1, 1)))
    h.close()
    p.write_text(p.read_text() + '{"e": "ok", "id"')
    ops = History.load(p).to_ops()
    assert len(ops) == 1 and ops[0].value == (1, 1) and ops[0].status == "ok"


# ---- simulated real register ----------------------------------------------------------------------------

def simulate(rng: random.Random, clients: int, per_client: int, keys: int = 1, p_read: float = 0.5,
             p_timeout: float = 0.0, p_fail: float = 0.0) -> list[Op]:
    """A history of an atomic register per key with random timing: each op takes effect at a random point
    inside its interval (a timed-out write: at any later time, or never; a failed one: never)."""
    plan: list[tuple[int, str, int, Any, float, float | None, bool, float | None]] = []
    for c in range(clients):
        t = rng.random()
        for seq in range(per_client):
            call = t + rng.expovariate(2.0)
            ret: float | None = call + rng.uniform(0.05, 2.0)
            kind = "r" if rng.random() < p_read else "w"
            key = rng.randrange(keys)
            ok = True
            at: float | None = rng.uniform(call, ret)  # type: ignore[arg-type]
            t = ret  # type: ignore[assignment]
            x = rng.random()
            if x < p_timeout:
                ret = None
                at = call + rng.uniform(0, 20) if rng.random() < 0.6 else None
            elif x < p_timeout + p_fail:
                ok, at = False, None
            plan.append((c, kind, key, (c, seq), call, ret, ok, at))
    reg: dict[int, Any] = {}
    seen: dict[int, Any] = {}
    for i in sorted((i for i, p in enumerate(plan) if p[7] is not None), key=lambda i: plan[i][7]):  # type: ignore[arg-type, return-value]
        _, kind, key, value, *_ = plan[i]
        if kind == "w":
            reg[key] = value
        else:
            seen[i] = reg.get(key)
    return [Op(client=c, kind=kind, key=key, value=value if kind == "w" else seen.get(i), call=call, ret=ret,
               ok=ok) for i, (c, kind, key, value, call, ret, ok, _) in enumerate(plan)]


def brute_force(ops: list[Op]) -> bool:
    """Reference: search every order that respects real time; failed ops and indeterminate reads are
    dropped, indeterminate writes may be placed anywhere after their call or left out."""
    ops = [o for o in ops if o.status == "ok" or (o.status == "info" and o.kind == "w")]
    n = len(ops)

    @cache
    def go(left: frozenset[int], state: Any) -> bool:
        if all(ops[i].ret is None for i in left):
            return True
        for i in left:
            o = ops[i]
            if any(ops[j].ret is not None and ops[j].ret < o.call for j in left):  # type: ignore[operator]
                continue
            if o.kind == "w":
                if go(left - {i}, norm_value(o.value)):
                    return True
            elif norm_value(o.value) == state and go(left - {i}, state):
                return True
        return False

    return go(frozenset(range(n)), None)


def test_differential_against_brute_force() -> None:
    rng = random.Random(7)
    outcomes = {True: 0, False: 0}
    for _ in range(300):
        ops = simulate(rng, clients=rng.randint(2, 3), per_client=rng.randint(1, 3), p_read=0.5,
                       p_timeout=0.2, p_fail=0.1)
        reads = [i for i, o in enumerate(ops) if o.kind == "r" and o.status == "ok"]
        if reads and rng.random() < 0.6:  # re-point one read at another written value (or zeroes)
            i = rng.choice(reads)
            choices = [None, *(o.value for o in ops if o.kind == "w")]
            ops[i] = Op(ops[i].client, "r", 0, rng.choice(choices), ops[i].call, ops[i].ret)
        want = brute_force(ops)
        got = check(ops)
        assert got.ok is want, (ops, got)
        outcomes[want] += 1
    assert outcomes[True] > 50 and outcomes[False] > 30, outcomes


def test_differential_with_repeated_values() -> None:
    # Few distinct values (zeroes among them, spelled three ways): writes repeat values, so the checker's
    # shortcuts for values with a single writer do not apply and the search does the work.
    rng = random.Random(8)
    outcomes = {True: 0, False: 0}
    for _ in range(300):
        ops = simulate(rng, clients=rng.randint(2, 3), per_client=rng.randint(1, 3), p_timeout=0.2, p_fail=0.1)
        ops = [Op(o.client, o.kind, 0, rng.choice([None, 0, bytes(8), 1, 2]), o.call, o.ret, o.ok) for o in ops]
        want = brute_force(ops)
        assert check(ops).ok is want, ops
        outcomes[want] += 1
    assert outcomes[True] > 50 and outcomes[False] > 50, outcomes


def test_simulated_histories_pass_and_a_corrupted_read_fails() -> None:
    rng = random.Random(3)
    for _ in range(40):
        ops = simulate(rng, clients=rng.randint(2, 6), per_client=rng.randint(5, 30), keys=rng.randint(1, 3),
                       p_timeout=0.05, p_fail=0.05)
        res = check(ops)
        assert res.ok is True, res.explain
        reads = [i for i, o in enumerate(ops) if o.kind == "r" and o.status == "ok"]
        if not reads:
            continue
        i = rng.choice(reads)
        ops[i] = Op(ops[i].client, "r", ops[i].key, ("nobody", i), ops[i].call, ops[i].ret)
        res = check(ops)
        assert res.ok is False and res.bad_key == ops[i].key
        assert ops[i] in res.ops


@pytest.mark.parametrize("clients", [8, 16])
def test_performance_2000_ops_one_block(clients: int) -> None:
    ops = simulate(random.Random(11), clients=clients, per_client=2000 // clients, p_timeout=0.01)
    t0 = time.monotonic()
    res = check(ops)
    dt = time.monotonic() - t0
    print(f"\n{len(ops)} ops, concurrency {clients}: checked {res.ops_checked} in {dt:.3f} s")
    assert res.ok is True, res.explain
    assert dt < 10
    # A stale read near the end is found in about the same time.
    last_write = max((o for o in ops if o.kind == "w" and o.status == "ok"), key=lambda o: o.ret or 0)
    first_write = min((o for o in ops if o.kind == "w" and o.status == "ok"), key=lambda o: o.call)
    t1 = time.monotonic()
    bad = check([*ops, r(first_write.value, (last_write.ret or 0) + 100, (last_write.ret or 0) + 101, client=99)])
    print(f"with a stale read appended: {time.monotonic() - t1:.3f} s")
    assert bad.ok is False
    # A stale read in the middle: the search has to exhaust the orders of everything concurrent before it.
    ops = simulate(random.Random(1), clients=clients, per_client=2000 // clients, p_timeout=0.1)
    reads = [i for i, o in enumerate(ops) if o.kind == "r" and o.ret is not None and o.value is not None]
    i = reads[len(reads) // 2]
    old = [o for o in ops if o.kind == "w" and o.status == "ok" and o.ret < ops[i].call - 5]  # type: ignore[operator]
    ops[i] = Op(ops[i].client, "r", 0, old[-1].value, ops[i].call, ops[i].ret)
    t1 = time.monotonic()
    bad = check(ops)
    print(f"stale read mid-history, 10% timed-out ops: {time.monotonic() - t1:.3f} s")
    assert bad.ok is False and ops[i].value in [o.value for o in bad.ops]
    assert time.monotonic() - t1 < 10
