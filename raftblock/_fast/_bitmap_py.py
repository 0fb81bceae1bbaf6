"""A fixed-size bitmap over N bits (per-extent allocated / dirty block maps) — the pure-Python twin and
specification of _bitmap_c.pyx.

Rule 1: bit order is little-endian and stable (it is what `to_bytes` writes, e.g. into snapshot
        manifests): bit i lives in byte i // 8 at bit position i % 8 (value 1 << (i % 8)); the unused high
        bits of the last byte are zero. This is exactly `int.to_bytes(..., "little")` of the integer whose
        bit i is bit i of the map, which is how this twin stores it.
Rule 2: the size never changes; positions and ranges outside [0, N) raise IndexError (no negative
        indexing), a negative size ValueError. A range is (start, count); count 0 is an empty range.
Rule 3: `len()` is the number of bits, not of set bits (ask `popcount()`); mutating a bitmap while
        iterating its `runs()` gives unspecified (but memory-safe) results.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import index

IMPLEMENTATION = "python"


class Bitmap:
    """N bits, all clear at creation."""

    __slots__ = ("_nbits", "_v")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, nbits: int) -> None:
        nbits = index(nbits)
        if nbits < 0:
            raise ValueError(f"a bitmap has a non-negative size, got {nbits}")
        self._nbits = nbits
        self._v = 0

    def _range(self, start: int, count: int) -> tuple[int, int]:
        start, count = index(start), index(count)
        if start < 0 or count < 0 or start + count > self._nbits:
            raise IndexError(f"range start={start} count={count} outside a bitmap of {self._nbits} bits")
        return start, count

    def set_range(self, start: int, count: int) -> None:
        start, count = self._range(start, count)
        self._v |= ((1 << count) - 1) << start

    def clear_range(self, start: int, count: int) -> None:
        start, count = self._range(start, count)
        self._v &= ~(((1 << count) - 1) << start)

    def test(self, i: int) -> bool:
        i = index(i)
        if not 0 <= i < self._nbits:
            raise IndexError(f"bit {i} outside a bitmap of {self._nbits} bits")
        return bool((self._v >> i) & 1)

    def test_range_any(self, start: int, count: int) -> bool:
        """True if any bit of the range is set (False for an empty range)."""
        start, count = self._range(start, count)
        return (self._v >> start) & ((1 << count) - 1) != 0

    def test_range_all(self, start: int, count: int) -> bool:
        """True if every bit of the range is set (True for an empty range)."""
        start, count = self._range(start, count)
        mask = (1 << count) - 1
        return (self._v >> start) & mask == mask

    def popcount(self, start: int = 0, count: int | None = None) -> int:
        """Number of set bits in [start, start + count) (default: from start to the end)."""
        if count is None:
            count = self._nbits - index(start)
        start, count = self._range(start, count)
        return ((self._v >> start) & ((1 << count) - 1)).bit_count()

    def _find(self, pos: int, value: bool) -> int:
        """Smallest i >= pos with bit i == value, or N if there is none."""
        if pos >= self._nbits:
            return self._nbits
        x = self._v >> pos
        if not value:
            x = ~x  # infinitely many ones above the map: clamped to N below
        if x == 0:
            return self._nbits
        return min(pos + (x & -x).bit_length() - 1, self._nbits)

    def runs(self, value: bool = True) -> Iterator[tuple[int, int]]:
        """(start, length) of every maximal run of bits equal to `value`, in increasing order."""
        value = bool(value)
        pos = 0
        while True:
            pos = self._find(pos, value)
            if pos >= self._nbits:
                return
            end = self._find(pos, not value)
            yield pos, end - pos
            pos = end

    def to_bytes(self) -> bytes:
        """ceil(N / 8) bytes in the Rule 1 bit order."""
        return self._v.to_bytes((self._nbits + 7) // 8, "little")

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, nbits: int | None = None) -> Bitmap:
        """Inverse of `to_bytes` (nbits defaults to 8 * len(data)); the length must be ceil(nbits / 8)
        bytes and the unused bits of the last byte zero, else ValueError."""
        raw = bytes(memoryview(data).cast("B"))
        n = len(raw) * 8 if nbits is None else index(nbits)
        bm = cls(n)
        if len(raw) != (n + 7) // 8:
            raise ValueError(f"{len(raw)} bytes do not hold a bitmap of {n} bits")
        v = int.from_bytes(raw, "little")
        if v >> n:
            raise ValueError("bits set beyond the end of the bitmap")
        bm._v = v
        return bm

    def copy(self) -> Bitmap:
        bm = type(self)(self._nbits)
        bm._v = self._v
        return bm

    def __len__(self) -> int:
        return self._nbits

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._nbits == other._nbits and self._v == other._v

    def __repr__(self) -> str:
        return f"Bitmap(nbits={self._nbits}, set={self._v.bit_count()})"
