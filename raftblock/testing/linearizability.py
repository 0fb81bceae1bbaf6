# Linearizability checker for block-store histories (issue 7).
#
# Clients write 4 KiB blocks and read them back concurrently; a `History` records every operation's
# invocation and completion (ok with the value read, a definite failure, or indeterminate: a timeout or
# an NBD error, which may have taken effect at any time after the call, or never). `check` decides
# whether some total order of the operations respects real time and the semantics of a register per
# block. Each block is an independent register (initial value: zeroes), so blocks are checked one by
# one (P-compositionality, Herlihy & Wing). Per block the search is Wing & Gong's with Lowe's
# memoisation, as porcupine does it (anishathalye/porcupine, checker.go): call/return entries sorted by
# time in a doubly linked list, depth-first linearisation of calls with backtracking at the first
# return whose call was not placed, and a cache of (linearised set as an int bitset, register value)
# that prunes states already explored. Iterative, no recursion.
#
# Operations whose outcome is unknown:
#  * indeterminate write: its return is at +infinity. Placing a write after every other operation is
#    indistinguishable from it never happening (no read follows it), so "may never take effect" needs
#    no extra branch. One whose value no read returned is dropped up front (it can always be omitted).
#  * indeterminate read: dropped (it observed nothing we know).
#  * failed op (guaranteed not applied): dropped; its value then counts as never written.
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INF = float("inf")
_CHECK_EVERY = 4096  # search steps between deadline checks


def norm_value(v: Any) -> Hashable:
    """Canonical register value: None for 'never written' (None, 0, empty or all-zero bytes), a short
    blake2b digest for other bytes (only equality matters, and 4 KiB per event would bloat a history),
    tuples for lists (JSON round trip), anything else hashable as is."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        if b.count(0) == len(b):
            return None
        return "b2:" + hashlib.blake2b(b, digest_size=16).hexdigest()
    if isinstance(v, list):
        return tuple(norm_value(x) if isinstance(x, list) else x for x in v)
    return v


@dataclass(frozen=True)
class Op:
    """One operation on one block. `ret` None: indeterminate (timeout, NBD error, never completed).
    `ok` False with `ret` set: failed, and guaranteed not applied. For reads `value` is the value
    returned; for writes the value written."""

    client: int
    kind: str  # "w" or "r"
    key: int
    value: Any
    call: float
    ret: float | None = None
    ok: bool = True

    @property
    def status(self) -> str:
        if self.ret is None:
            return "info"
        return "ok" if self.ok else "fail"

    def describe(self) -> str:
        end = "?" if self.ret is None else f"{self.ret:.6g}"
        what = "write" if self.kind == "w" else "read"
        arrow = "" if self.kind == "w" else " ->"
        tail = {"ok": "", "fail": " FAILED", "info": " indeterminate"}[self.status]
        return f"{what}{arrow} {_show(self.value)} by client {self.client} [{self.call:.6g}, {end}]{tail}"


@dataclass
class Result:
    ok: bool | None  # None: the time budget ran out before a verdict
    bad_key: int | None = None
    explain: str = ""
    ops: list[Op] = field(default_factory=list)  # the operations the explanation names
    ops_checked: int = 0  # after dropping failed ops, indeterminate reads and unobserved pending writes
    keys: int = 0
    unknown_keys: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    def __bool__(self) -> bool:
        return self.ok is True


def _show(v: Any) -> str:
    v = norm_value(v)
    if v is None:
        return "zeroes"
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


class _Timeout(Exception):
    pass


def check(ops: Iterable[Op], timeout_s: float | None = None) -> Result:
    """Is the history linearizable, block by block? Stops at the first block that is not."""
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + timeout_s
    by_key: dict[int, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind not in ("w", "r"):
            raise ValueError(f"op kind must be 'w' or 'r', got {op.kind!r}")
        by_key[op.key].append(op)
    res = Result(ok=True, keys=len(by_key))
    for key in sorted(by_key):
        kept = _prune(by_key[key])
        res.ops_checked += len(kept)
        try:
            bad = _check_key(kept, deadline)
        except _Timeout:
            res.unknown_keys.append(key)
            res.ok = None
            continue
        if bad is not None:
            res.ok, res.bad_key = False, key
            res.explain, res.ops = f"block {key}: " + bad[0], bad[1]
            break
    if res.ok is None and not res.explain:
        res.explain = f"time budget ran out on blocks {res.unknown_keys}"
    res.elapsed_s = time.monotonic() - t0
    return res


def _prune(ops: list[Op]) -> list[Op]:
    read_values = {norm_value(o.value) for o in ops if o.kind == "r" and o.status == "ok"}
    kept = []
    for o in ops:
        st = o.status
        if st == "fail":
            continue
        if o.kind == "r" and st != "ok":
            continue
        if o.kind == "w" and st == "info" and norm_value(o.value) not in read_values:
            continue
        kept.append(o)
    return kept


def _check_key(ops: list[Op], deadline: float | None) -> tuple[str, list[Op]] | None:
    """None if linearizable, else (explanation, operations involved). Raises _Timeout."""
    # Intern values: 0 is the initial (zero) block.
    ids: dict[Hashable, int] = {None: 0}
    n = len(ops)
    val = [ids.setdefault(norm_value(o.value), len(ids)) for o in ops]
    is_write = [o.kind == "w" for o in ops]
    definite = [o.ret is not None for o in ops]
    written = {val[k] for k in range(n) if is_write[k]} | {0}
    for k, o in enumerate(ops):
        if not is_write[k] and val[k] not in written:
            return f"{o.describe()} returned a value no write (that did not fail) wrote", [o]

    # The only write of a value must precede every read of it: a write's return can be moved up to the
    # earliest return of a read of its value. That turns an observed indeterminate write into one that
    # ends, which keeps the search narrow.
    rets = [INF if o.ret is None else o.ret for o in ops]
    writers: dict[int, list[int]] = defaultdict(list)
    first_read: dict[int, int] = {}
    for k in range(n):
        if is_write[k]:
            writers[val[k]].append(k)
        elif val[k] and (val[k] not in first_read or rets[k] < rets[first_read[val[k]]]):
            first_read[val[k]] = k
    for v, rk in first_read.items():
        if len(writers[v]) == 1:
            k = writers[v][0]
            if rets[rk] < ops[k].call:
                return (f"{ops[rk].describe()} returned before the only write of that value, "
                        f"{ops[k].describe()}, was invoked"), [ops[rk], ops[k]]
            if rets[rk] < rets[k]:
                rets[k] = rets[rk]
                definite[k] = True  # it was observed, so it took effect

    # Entries: node 2k is op k's call, 2k+1 its return; node 2n is the list head.
    ents = []
    for k, o in enumerate(ops):
        ents.append((o.call, 0, 2 * k))
        ents.append((rets[k], 1, 2 * k + 1))
    ents.sort()  # calls before returns at equal times: touching operations count as concurrent
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for _, _, node in ents:
        nxt[last] = node
        prv[node] = last
        last = node
    bits = [1 << k for k in range(n)]

    remaining = sum(definite)
    reads_left = [0] * len(ids)  # per value: reads / writes of it not placed yet
    writes_left = [0] * len(ids)
    for k in range(n):
        (writes_left if is_write[k] else reads_left)[val[k]] += 1
    state = 0
    lin = 0
    stack: list[tuple[int, int]] = []  # (call node, register value before it)
    cache: set[tuple[int, int]] = set()
    steps = 0
    best_depth = -1
    best: tuple[int, int, int, list[int]] = (-1, 0, 0, [])  # blocked op, value held, placed set, last ops
    fresh = True  # a new search node: look for a read to place first
    entry = head
    while remaining:
        steps += 1
        if deadline is not None and steps % _CHECK_EVERY == 1 and time.monotonic() > deadline:
            raise _Timeout
        place = -1
        dead = False
        if fresh:
            # Reads first. A read that may go now (its call precedes the first pending return) and returns
            # the current value can be placed now without loss: any linearisation of the rest that places
            # it later stays valid with it moved here (it changes no state, and everything that must
            # precede it already has). So it is the only branch to explore at this node.
            fresh = False
            e = nxt[head]
            while not e & 1:
                if not is_write[e >> 1] and val[e >> 1] == state:
                    break
                e = nxt[e]
            if not e & 1:
                if (lin | bits[e >> 1], state) in cache:
                    dead = True  # that branch was explored and failed, so this node fails too
                else:
                    place = e
            else:
                entry = nxt[head]
        if place < 0 and not dead:
            if not entry & 1:  # a call: a read here does not match (else it was placed); try a write
                k = entry >> 1
                if (is_write[k] and (lin | bits[k], val[k]) not in cache
                        and not (reads_left[state] and not writes_left[state] and val[k] != state)):
                    # (the second test: overwriting the value while reads of it are still to be placed and
                    # no other write of it is left would strand those reads)
                    place = entry
                else:
                    entry = nxt[entry]
                    continue
            else:  # op k's return with op k not placed: this prefix is a dead end
                k = entry >> 1
                if len(stack) > best_depth:
                    best_depth = len(stack)
                    best = (k, state, lin, [e >> 1 for e, _ in stack[-3:]])
                dead = True
        if place >= 0:
            k = place >> 1
            new = val[k]
            lin |= bits[k]
            cache.add((lin, new))
            stack.append((place, state))
            state = new
            # lift the call and its return out of the list
            p, q = prv[place], nxt[place]
            nxt[p] = q
            prv[q] = p  # q exists: the return follows the call
            r = place + 1
            p, q = prv[r], nxt[r]
            nxt[p] = q
            if q != -1:
                prv[q] = p
            if is_write[k]:
                writes_left[new] -= 1
            else:
                reads_left[new] -= 1
            if definite[k]:
                remaining -= 1
            fresh = True
            continue
        # Backtrack. Reads were forced moves, so undo through them to the last write and try the next
        # call after that write.
        while stack:
            e, state = stack.pop()
            k = e >> 1
            lin &= ~bits[k]
            r = e + 1
            p, q = prv[r], nxt[r]
            nxt[p] = r
            if q != -1:
                prv[q] = r
            p, q = prv[e], nxt[e]
            nxt[p] = e
            prv[q] = e
            if definite[k]:
                remaining += 1
            if is_write[k]:
                writes_left[val[k]] += 1
                entry = nxt[e]
                break
            reads_left[val[k]] += 1
        else:
            break
    if not remaining:
        return None
    blocked, held, placed_set, placed = best
    b = ops[blocked]
    inv = {i: v for v, i in ids.items()}
    waiting = [ops[i] for i in range(n) if not placed_set >> i & 1 and not is_write[i] and val[i] == held]
    conc = [o for o in ops if o is not b and o.call <= (INF if b.ret is None else b.ret)
            and (INF if o.ret is None else o.ret) >= b.call]
    msg = (f"not linearizable ({n} ops); the deepest attempt placed {best_depth} ops, then could not "
           f"place {b.describe()}")
    if b.kind == "r":
        msg += f" (the register held {_show(inv[held])})"
    elif waiting:
        msg += (f" by the time it must have taken effect: the register held {_show(inv[held])}, which {waiting[0].describe()} "
                "must still see")
    if placed:
        msg += "; last placed: " + "; ".join(ops[i].describe() for i in placed)
    msg += f"; {len(conc)} concurrent op(s)"
    if conc:
        msg += ": " + "; ".join(o.describe() for o in conc[:4]) + ("; ..." if len(conc) > 4 else "")
    return msg, [b, *waiting[:1], *(ops[i] for i in placed), *conc[:4]]


class History:
    """Thread-safe recorder: `invoke` before sending a request, then exactly one of `ok` (with the value
    read, for reads), `fail` (only when the system guarantees the op was not applied) or `timeout`
    (anything else: a timeout, an NBD error, a dropped connection). Operations never completed are
    indeterminate. Values are stored canonically (`norm_value`: bytes become a digest). With `path`,
    every event is appended to that JSONL file as it happens, so a crashed campaign leaves a usable
    history; `save`/`load` write and read the same format."""

    def __init__(self, path: str | Path | None = None, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._events: list[dict[str, Any]] = []
        self._next = 0
        self._file = open(path, "a") if path is not None else None  # kept open: see close()

    def _add(self, ev: dict[str, Any]) -> None:
        self._events.append(ev)
        if self._file is not None:
            self._file.write(json.dumps(ev) + "\n")
            self._file.flush()

    def invoke(self, client: int, kind: str, key: int, value: Any = None, t: float | None = None) -> int:
        if kind not in ("w", "r"):
            raise ValueError(f"kind must be 'w' or 'r', got {kind!r}")
        with self._lock:
            i = self._next
            self._next += 1
            self._add({"e": "invoke", "id": i, "t": self._clock() if t is None else t, "client": client,
                       "kind": kind, "key": key, "value": norm_value(value) if kind == "w" else None})
            return i

    def ok(self, op_id: int, value: Any = None, t: float | None = None) -> None:
        """Completed; `value` is what a read returned (ignored for writes)."""
        self._end(op_id, "ok", t, norm_value(value))

    def fail(self, op_id: int, t: float | None = None) -> None:
        """Definitely not applied. NBD errors are not that: record them with `timeout`."""
        self._end(op_id, "fail", t)

    def timeout(self, op_id: int, t: float | None = None) -> None:
        """Indeterminate: may have taken effect at any time after the call, or never."""
        self._end(op_id, "info", t)

    def _end(self, op_id: int, kind: str, t: float | None, value: Any = None) -> None:
        with self._lock:
            ev: dict[str, Any] = {"e": kind, "id": op_id, "t": self._clock() if t is None else t}
            if kind == "ok":
                ev["value"] = value
            self._add(ev)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def to_ops(self) -> list[Op]:
        return _events_to_ops(self.events())

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(json.dumps(ev) + "\n" for ev in self.events()))

    @classmethod
    def load(cls, path: str | Path) -> History:
        h = cls()
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if "value" in ev:
                ev["value"] = norm_value(ev["value"])
            h._events.append(ev)
            if ev["e"] == "invoke":
                h._next = max(h._next, ev["id"] + 1)
        return h


def _events_to_ops(events: list[dict[str, Any]]) -> list[Op]:
    inv: dict[int, dict[str, Any]] = {}
    end: dict[int, dict[str, Any]] = {}
    for ev in events:
        (inv if ev["e"] == "invoke" else end)[ev["id"]] = ev
    ops = []
    for i, a in sorted(inv.items()):
        z = end.get(i)
        kind = "info" if z is None else z["e"]
        value = a["value"] if a["kind"] == "w" else (z or {}).get("value")
        ret = None if kind == "info" or z is None else float(z["t"])
        ops.append(Op(client=a["client"], kind=a["kind"], key=a["key"], value=value, call=float(a["t"]),
                      ret=ret, ok=kind == "ok"))
    return ops
