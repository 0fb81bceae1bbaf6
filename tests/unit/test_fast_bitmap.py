"""`_fast.bitmap`: the same cases on the Cython module and its twin, the bit order of to_bytes
(raftblock/_fast/_bitmap_py.py Rule 1), and seeded differential runs of C vs twin vs a list of bools
(etcd's "dumb alternative version"; STYLE.md: differential tests)."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest
from test_fast import load_impl  # the one loader of a module's twin or Cython build (skips if not built)

SIZES = [0, 1, 7, 8, 63, 64, 65, 127, 128, 129, 200, 1000, 4097]


@pytest.fixture(scope="module", params=["python", "cython"])
def bm(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("bitmap", request.param)


def test_new_bitmap_is_clear(bm: ModuleType) -> None:
    for n in SIZES:
        b = bm.Bitmap(n)
        assert len(b) == n
        assert b.popcount() == 0
        assert list(b.runs()) == []
        assert list(b.runs(False)) == ([(0, n)] if n else [])
        assert b.to_bytes() == bytes((n + 7) // 8)
        assert b == bm.Bitmap(n)
    with pytest.raises(ValueError):
        bm.Bitmap(-1)


def test_ranges_across_word_edges(bm: ModuleType) -> None:
    b = bm.Bitmap(200)
    for start, count in [(0, 1), (63, 2), (64, 64), (130, 70), (10, 0)]:
        b.set_range(start, count)
    want = {0, 63, 64} | set(range(64, 128)) | set(range(130, 200))
    assert [i for i in range(200) if b.test(i)] == sorted(want)
    assert list(b.runs()) == [(0, 1), (63, 65), (130, 70)]
    assert list(b.runs(False)) == [(1, 62), (128, 2)]
    assert b.popcount() == len(want)
    assert b.popcount(60, 10) == 7  # 63, 64..69
    assert b.popcount(129) == 70
    assert b.test_range_all(63, 65) and not b.test_range_all(62, 66)
    assert b.test_range_any(128, 3) and not b.test_range_any(128, 2)
    assert b.test_range_all(5, 0) and not b.test_range_any(0, 0)  # empty ranges
    b.clear_range(1, 198)
    assert list(b.runs()) == [(0, 1), (199, 1)]
    b.set_range(0, 200)
    assert b.test_range_all(0, 200) and b.popcount() == 200 and list(b.runs(False)) == []


def test_to_bytes_is_little_endian_bit_order(bm: ModuleType) -> None:
    # Rule 1: bit i is byte i // 8, value 1 << (i % 8); unused high bits of the last byte are zero
    b = bm.Bitmap(10)
    b.set_range(0, 1)
    b.set_range(9, 1)
    assert b.to_bytes() == b"\x01\x02"
    b = bm.Bitmap(70)
    b.set_range(3, 6)  # bits 3..8
    b.set_range(69, 1)
    assert b.to_bytes() == bytes([0xF8, 0x01, 0, 0, 0, 0, 0, 0, 0x20])
    b.set_range(0, 70)
    assert b.to_bytes() == b"\xff" * 8 + b"\x3f"
    assert int.from_bytes(b.to_bytes(), "little") == (1 << 70) - 1


def test_from_bytes_round_trip_and_refusals(bm: ModuleType) -> None:
    b = bm.Bitmap.from_bytes(b"\xf8\x01\x00\x00\x00\x00\x00\x00\x20", 70)
    assert list(b.runs()) == [(3, 6), (69, 1)]
    assert bm.Bitmap.from_bytes(b.to_bytes(), 70) == b
    assert len(bm.Bitmap.from_bytes(b"\x00\x80")) == 16  # nbits defaults to 8 * len
    assert bm.Bitmap.from_bytes(memoryview(bytearray(b"\x05")), 3).to_bytes() == b"\x05"
    assert len(bm.Bitmap.from_bytes(b"", 0)) == 0
    with pytest.raises(ValueError):
        bm.Bitmap.from_bytes(b"\x00\x00", 70)  # wrong length
    with pytest.raises(ValueError):
        bm.Bitmap.from_bytes(b"\x08", 3)  # bit 3 set in a 3-bit map
    with pytest.raises(ValueError):
        bm.Bitmap.from_bytes(b"", -1)


def test_equality_copy_and_hash(bm: ModuleType) -> None:
    a, b = bm.Bitmap(100), bm.Bitmap(100)
    a.set_range(10, 5)
    assert a != b
    b.set_range(10, 5)
    assert a == b and not (a != b)
    assert bm.Bitmap(100) != bm.Bitmap(101)
    assert a != b"\x00" and a != 5
    c = a.copy()
    c.clear_range(10, 1)
    assert a.test(10) and not c.test(10)
    with pytest.raises(TypeError):
        hash(a)
    assert "nbits=100" in repr(a) and "set=5" in repr(a)


def test_out_of_range_is_index_error(bm: ModuleType) -> None:
    b = bm.Bitmap(64)
    for call in (
        lambda: b.test(64),
        lambda: b.test(-1),
        lambda: b.set_range(60, 5),
        lambda: b.clear_range(-1, 1),
        lambda: b.set_range(0, -1),
        lambda: b.test_range_any(65, 0),
        lambda: b.test_range_all(1, 64),
        lambda: b.popcount(65),
        lambda: b.popcount(0, 65),
    ):
        with pytest.raises(IndexError):
            call()
    assert b.popcount(64) == 0 and b.popcount(64, 0) == 0
    assert bm.Bitmap(0).popcount() == 0


class _ListModel:
    """The dumbest bitmap: a list of bools."""

    def __init__(self, n: int) -> None:
        self.bits = [False] * n

    def runs(self, value: bool) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for i, b in enumerate(self.bits):
            if b == value:
                if out and out[-1][0] + out[-1][1] == i:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                else:
                    out.append((i, 1))
        return out

    def to_bytes(self) -> bytes:
        return sum(1 << i for i, b in enumerate(self.bits) if b).to_bytes((len(self.bits) + 7) // 8, "little")


def _random_range(rng: random.Random, n: int) -> tuple[int, int]:
    if n == 0 or rng.random() < 0.05:
        return 0, 0
    start = rng.randrange(n)
    if rng.random() < 0.3:  # short ranges near word edges
        start = min(n - 1, max(0, (start & ~63) + rng.choice([-1, 0, 1, 63])))
    return start, rng.randint(0, n - start)


@pytest.mark.parametrize("seed", range(4))
def test_differential_c_vs_twin_vs_list(seed: int) -> None:
    py = load_impl("bitmap", "python")
    c = load_impl("bitmap", "cython")
    rng = random.Random(seed)
    for n in SIZES + [rng.randrange(1, 3000) for _ in range(3)]:
        model = _ListModel(n)
        maps: list[Any] = [py.Bitmap(n), c.Bitmap(n)]
        for _ in range(150):
            op = rng.choice(["set", "set", "clear", "test", "any", "all", "count", "runs", "bytes", "eq"])
            start, count = _random_range(rng, n)
            if op in ("set", "clear"):
                for m in maps:
                    getattr(m, f"{op}_range")(start, count)
                model.bits[start : start + count] = [op == "set"] * count
                continue
            if op == "test":
                if n == 0:
                    continue
                i = rng.randrange(n)
                got = [m.test(i) for m in maps]
                want: object = model.bits[i]
            elif op == "any":
                got = [m.test_range_any(start, count) for m in maps]
                want = any(model.bits[start : start + count])
            elif op == "all":
                got = [m.test_range_all(start, count) for m in maps]
                want = all(model.bits[start : start + count])
            elif op == "count":
                got = [m.popcount(start, count) for m in maps]
                want = sum(model.bits[start : start + count])
            elif op == "runs":
                value = rng.random() < 0.5
                got = [list(m.runs(value)) for m in maps]
                want = model.runs(value)
            elif op == "bytes":
                got = [m.to_bytes() for m in maps]
                want = model.to_bytes()
                got += [type(m).from_bytes(want, n).to_bytes() for m in maps]
            else:
                got = [m == type(m).from_bytes(model.to_bytes(), n) for m in maps]
                want = True
            assert all(g == want for g in got), (seed, n, op, start, count, got, want)
        assert [m.to_bytes() for m in maps] == [model.to_bytes()] * 2
        assert [m.popcount() for m in maps] == [sum(model.bits)] * 2
