# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A fixed-size bitmap over N bits (Cython; twin and specification: _bitmap_py.py, whose Rules hold here).

Storage: ceil(N / 64) uint64 words, bit i in word i >> 6 at bit i & 63, so on a little-endian CPU the
words in memory are the twin's byte order (to_bytes / from_bytes are one memcpy). Every operation works
a word at a time (masks for the partial words at the ends of a range, memset for the whole words
between, __builtin_popcountll to count, __builtin_ctzll to find the next set or clear bit); no Python
object is touched per bit.
Invariant: the bits of the last word beyond N are always zero (set_range stays inside the map,
from_bytes refuses set padding bits), so counting and comparing never mask the tail.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memset

import sys

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

IMPLEMENTATION = "cython"

cdef uint64_t ONES = 0xFFFFFFFFFFFFFFFFULL
# On a little-endian CPU the word array already is the to_bytes layout: one memcpy each way. A big-endian
# CPU gets the twin (an import error here), rather than a byte-swapping path no test here would run.
if sys.byteorder != "little":
    raise ImportError("_bitmap_c supports little-endian CPUs only")


cdef inline uint64_t _lo_mask(Py_ssize_t start) noexcept nogil:
    """Bits start & 63 .. 63 of a word."""
    return ONES << (start & 63)


cdef inline uint64_t _hi_mask(Py_ssize_t last) noexcept nogil:
    """Bits 0 .. last & 63 of a word (inclusive)."""
    return ONES >> (63 - (last & 63))


cdef class Bitmap:
    """N bits, all clear at creation."""

    cdef uint64_t* _w
    cdef Py_ssize_t _nbits
    cdef Py_ssize_t _nwords

    def __cinit__(self, Py_ssize_t nbits):
        if nbits < 0:
            raise ValueError(f"a bitmap has a non-negative size, got {nbits}")
        self._nbits = nbits
        self._nwords = (nbits + 63) >> 6
        self._w = <uint64_t*>PyMem_Calloc(self._nwords if self._nwords else 1, sizeof(uint64_t))
        if self._w == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._w)

    __hash__ = None  # mutable

    cdef int _check(self, Py_ssize_t start, Py_ssize_t count) except -1:
        if start < 0 or count < 0 or start > self._nbits - count:
            raise IndexError(f"range start={start} count={count} outside a bitmap of {self._nbits} bits")
        return 0

    cdef void _fill(self, Py_ssize_t start, Py_ssize_t count, bint value) noexcept nogil:
        cdef Py_ssize_t last, ws, we
        cdef uint64_t m
        if count == 0:
            return
        last = start + count - 1
        ws = start >> 6
        we = last >> 6
        if ws == we:
            m = _lo_mask(start) & _hi_mask(last)
            if value:
                self._w[ws] |= m
            else:
                self._w[ws] &= ~m
            return
        if value:
            self._w[ws] |= _lo_mask(start)
            self._w[we] |= _hi_mask(last)
        else:
            self._w[ws] &= ~_lo_mask(start)
            self._w[we] &= ~_hi_mask(last)
        if we - ws > 1:
            memset(&self._w[ws + 1], 0xFF if value else 0, <size_t>(we - ws - 1) * sizeof(uint64_t))

    cdef Py_ssize_t _count(self, Py_ssize_t start, Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t last, ws, we, i, n = 0
        if count == 0:
            return 0
        last = start + count - 1
        ws = start >> 6
        we = last >> 6
        if ws == we:
            return __builtin_popcountll(self._w[ws] & _lo_mask(start) & _hi_mask(last))
        n = __builtin_popcountll(self._w[ws] & _lo_mask(start))
        n += __builtin_popcountll(self._w[we] & _hi_mask(last))
        for i in range(ws + 1, we):
            n += __builtin_popcountll(self._w[i])
        return n

    cdef bint _any(self, Py_ssize_t start, Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t last, ws, we, i
        if count == 0:
            return False
        last = start + count - 1
        ws = start >> 6
        we = last >> 6
        if ws == we:
            return (self._w[ws] & _lo_mask(start) & _hi_mask(last)) != 0
        if (self._w[ws] & _lo_mask(start)) or (self._w[we] & _hi_mask(last)):
            return True
        for i in range(ws + 1, we):
            if self._w[i]:
                return True
        return False

    cdef bint _all(self, Py_ssize_t start, Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t last, ws, we, i
        cdef uint64_t m
        if count == 0:
            return True
        last = start + count - 1
        ws = start >> 6
        we = last >> 6
        if ws == we:
            m = _lo_mask(start) & _hi_mask(last)
            return (self._w[ws] & m) == m
        m = _lo_mask(start)
        if (self._w[ws] & m) != m:
            return False
        m = _hi_mask(last)
        if (self._w[we] & m) != m:
            return False
        for i in range(ws + 1, we):
            if self._w[i] != ONES:
                return False
        return True

    cdef Py_ssize_t _find(self, Py_ssize_t pos, bint value) noexcept nogil:
        """Smallest i >= pos with bit i == value, or N if there is none."""
        cdef Py_ssize_t wi, r
        cdef uint64_t x
        if pos >= self._nbits:
            return self._nbits
        wi = pos >> 6
        x = self._w[wi] if value else ~self._w[wi]
        x &= _lo_mask(pos)
        while x == 0:
            wi += 1
            if wi >= self._nwords:
                return self._nbits
            x = self._w[wi] if value else ~self._w[wi]
        r = (wi << 6) + __builtin_ctzll(x)
        return r if r < self._nbits else self._nbits  # ~word has ones beyond N

    def set_range(self, Py_ssize_t start, Py_ssize_t count) -> None:
        self._check(start, count)
        self._fill(start, count, True)

    def clear_range(self, Py_ssize_t start, Py_ssize_t count) -> None:
        self._check(start, count)
        self._fill(start, count, False)

    def test(self, Py_ssize_t i) -> bool:
        if i < 0 or i >= self._nbits:
            raise IndexError(f"bit {i} outside a bitmap of {self._nbits} bits")
        return (self._w[i >> 6] >> (i & 63)) & 1 != 0

    def test_range_any(self, Py_ssize_t start, Py_ssize_t count) -> bool:
        """True if any bit of the range is set (False for an empty range)."""
        self._check(start, count)
        return self._any(start, count)

    def test_range_all(self, Py_ssize_t start, Py_ssize_t count) -> bool:
        """True if every bit of the range is set (True for an empty range)."""
        self._check(start, count)
        return self._all(start, count)

    def popcount(self, Py_ssize_t start=0, count=None) -> int:
        """Number of set bits in [start, start + count) (default: from start to the end)."""
        cdef Py_ssize_t n
        if count is None:
            self._check(start, 0)
            n = self._nbits - start
        else:
            n = count
        self._check(start, n)
        return self._count(start, n)

    def runs(self, value=True):
        """(start, length) of every maximal run of bits equal to `value`, in increasing order."""
        cdef bint v = bool(value)
        cdef Py_ssize_t pos = 0, end
        while True:
            pos = self._find(pos, v)
            if pos >= self._nbits:
                return
            end = self._find(pos, not v)
            yield (pos, end - pos)
            pos = end

    def to_bytes(self) -> bytes:
        """ceil(N / 8) bytes in the little-endian bit order of the twin's Rule 1."""
        cdef Py_ssize_t nbytes = (self._nbits + 7) >> 3
        out = PyBytes_FromStringAndSize(NULL, nbytes)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
        memcpy(p, self._w, <size_t>nbytes)
        return out

    @classmethod
    def from_bytes(cls, data, nbits=None):
        """Inverse of `to_bytes` (nbits defaults to 8 * len(data)); the length must be ceil(nbits / 8)
        bytes and the unused bits of the last byte zero, else ValueError."""
        cdef const unsigned char[::1] mv = memoryview(data).cast("B")
        cdef Py_ssize_t nbytes = mv.shape[0]
        cdef Py_ssize_t n = nbytes * 8 if nbits is None else nbits
        cdef Bitmap bm = cls(n)
        if nbytes != (n + 7) >> 3:
            raise ValueError(f"{nbytes} bytes do not hold a bitmap of {n} bits")
        if n & 7 and mv[nbytes - 1] >> (n & 7):
            raise ValueError("bits set beyond the end of the bitmap")
        if nbytes == 0:
            return bm
        memcpy(bm._w, &mv[0], <size_t>nbytes)
        return bm

    def copy(self) -> Bitmap:
        cdef Bitmap bm = type(self)(self._nbits)
        if self._nwords:
            memcpy(bm._w, self._w, <size_t>self._nwords * sizeof(uint64_t))
        return bm

    def __len__(self) -> int:
        return self._nbits

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        cdef Bitmap o = <Bitmap>other
        if self._nbits != o._nbits:
            return False
        return self._nwords == 0 or memcmp(self._w, o._w, <size_t>self._nwords * sizeof(uint64_t)) == 0

    def __repr__(self) -> str:
        return f"Bitmap(nbits={self._nbits}, set={self._count(0, self._nbits)})"
