# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Segment record framing into a caller's buffer (Cython; twin and specification: _segwriter_py.py,
whose Rules hold here; layout: docs/format/segment.md "Record").

One call copies the payload into the buffer (memmove: the payload may be a view of the same buffer),
computes every block's CRC32C from the copied bytes, pair-checks them against the caller's CRCs, and
writes the CRC array, the little-endian header and its seeded CRC — no Python object per block. The
CRC routine is the `crc32c` package's own C function (address from _crc32c_ptr.py, as _blockcrc_c).
Payloads of 64 KiB or more are copied and checksummed without the GIL, so other threads (the event
loop, the WAL sync thread) run while a 1 MiB record is framed.
"""

from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memmove, memset

from raftblock._fast._segformat import (
    BLOCK_SIZE,
    MAX_BLOCK,
    MAX_WRITE_BLOCKS,
    REC_HEADER_SIZE,
    REC_MAGIC,
    REC_TRIM,
    REC_WRITE,
    BlockCrcMismatch,
)

ctypedef uint32_t (*crc_fn)(uint32_t, const unsigned char*, unsigned long) noexcept nogil

cdef crc_fn _crc = NULL
cdef enum:
    BLOCK = 4096
    HDR = 48
    MAXW = 256
    TYPE_WRITE = 1
    TYPE_TRIM = 2
    NOGIL_MIN_BYTES = 65536
cdef uint64_t LAST_BLOCK = 0xFFFFFFFFULL
cdef uint32_t ALL_ONES = 0xFFFFFFFFu

IMPLEMENTATION = "cython"
__all__ = ["BlockCrcMismatch", "IMPLEMENTATION", "frame_trim", "frame_write", "frame_write_head"]


cdef inline uint32_t _crc32c(uint32_t seed, const unsigned char* p, size_t n) noexcept nogil:
    return _crc(seed ^ ALL_ONES, p, <unsigned long>n) ^ ALL_ONES


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)


cdef inline void _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>v)
    _put32(p + 4, <uint32_t>(v >> 32))


cdef void _header(unsigned char* p, uint8_t rtype, uint8_t flags, uint32_t count, uint32_t length,
                  uint32_t block, uint64_t extent_id, uint64_t lsn, uint64_t sync_mark, uint32_t seed,
                  size_t crc_end) noexcept nogil:
    """Header fields at p[4:48], then header_crc = crc32c(p[4:crc_end], seed) at p[0:4]."""
    memcpy(p + 4, b"RBRC", 4)
    p[8] = rtype
    p[9] = flags
    p[10] = 0
    p[11] = 0
    _put32(p + 12, count)
    _put32(p + 16, length)
    _put32(p + 20, block)
    _put64(p + 24, extent_id)
    _put64(p + 32, lsn)
    _put64(p + 40, sync_mark)
    _put32(p, _crc32c(seed, p + 4, crc_end - 4))


cdef Py_ssize_t _frame_write(unsigned char* p, Py_ssize_t pay_off, const unsigned char* payload,
                             Py_ssize_t count, bint check, Py_ssize_t first_invalid, const uint32_t* want,
                             uint8_t flags, uint32_t block, uint64_t extent_id, uint64_t lsn,
                             uint64_t sync_mark, uint32_t seed, bint copy) noexcept nogil:
    """Copy (unless `copy` is false: frame_write_head), checksum, pair-check, then CRC array and header;
    returns the first mismatching block or -1 (then nothing but the payload has been written)."""
    cdef Py_ssize_t i, n = count * BLOCK, carr = pay_off - HDR
    cdef uint32_t got[MAXW]
    cdef const unsigned char* src = payload
    if copy:
        memmove(p + pay_off, payload, <size_t>n)
        src = p + pay_off
    for i in range(count):
        got[i] = _crc32c(0, src + i * BLOCK, BLOCK)
    if check:
        for i in range(count):
            if i == first_invalid or got[i] != want[i]:
                return i
    for i in range(count):
        _put32(p + HDR + 4 * i, got[i])
    memset(p + HDR + 4 * count, 0, <size_t>(carr - 4 * count))
    _header(p, TYPE_WRITE, flags, <uint32_t>count, <uint32_t>(pay_off + n), block, extent_id, lsn, sync_mark,
            seed, <size_t>pay_off)
    return -1


cdef object _out_view(object buf):
    if type(buf) is bytearray:
        return buf
    mv = memoryview(buf).cast("B")
    if mv.readonly:
        raise TypeError("the record buffer is read-only")
    return mv


cdef int _check_fits(Py_ssize_t offset, Py_ssize_t length, Py_ssize_t size) except -1:
    if offset < 0 or offset > size - length:
        raise ValueError(f"a {length}-byte record does not fit at offset {offset} of a {size}-byte buffer")
    return 0


def frame_write(buf, Py_ssize_t offset, uint32_t seed, uint64_t extent_id, uint32_t block, uint64_t lsn,
                uint64_t sync_mark, payload, crcs=None, uint8_t flags=0):
    """Frame one WRITE record (header, CRC array, payload) at buf[offset:]; returns offset + its length."""
    return _frame(buf, offset, seed, extent_id, block, lsn, sync_mark, payload, crcs, flags, True)


def frame_write_head(buf, Py_ssize_t offset, uint32_t seed, uint64_t extent_id, uint32_t block, uint64_t lsn,
                     uint64_t sync_mark, payload, crcs=None, uint8_t flags=0):
    """The header and CRC array of the WRITE record of `payload` at buf[offset:], not the payload (twin's
    Rule 5: the CRCs are computed where the payload lies); returns offset + their length."""
    return _frame(buf, offset, seed, extent_id, block, lsn, sync_mark, payload, crcs, flags, False)


cdef object _frame(buf, Py_ssize_t offset, uint32_t seed, uint64_t extent_id, uint32_t block, uint64_t lsn,
                   uint64_t sync_mark, payload, crcs, uint8_t flags, bint copy):
    cdef const unsigned char[::1] pay = payload if type(payload) is bytes or type(payload) is bytearray \
        else memoryview(payload).cast("B")
    cdef Py_ssize_t n = pay.shape[0], count, i, carr, pay_off, length, bad = -1
    cdef Py_ssize_t first_invalid
    cdef long long v
    cdef uint32_t want[MAXW]
    cdef bint check = crcs is not None
    cdef unsigned char* p
    if n == 0 or n % BLOCK or n > MAXW * BLOCK:
        raise ValueError(f"a WRITE payload is 1..{MAXW} whole {BLOCK}-byte blocks, got {n} bytes")
    count = n // BLOCK
    if <uint64_t>block + <uint64_t>count > LAST_BLOCK:
        raise ValueError(f"blocks {block}..{block + count} run past block {LAST_BLOCK}")
    first_invalid = count
    if check:
        if len(crcs) != count:
            raise ValueError(f"{len(crcs)} CRCs for {count} payload blocks")
        for i in range(count):
            try:
                v = PyNumber_Index(crcs[i])  # integers only (TypeError), as the twin's operator.index
            except OverflowError:
                v = -1
            if v < 0 or v > <long long>ALL_ONES:
                if first_invalid == count:
                    first_invalid = i  # no CRC32C equals it: a mismatch (twin: compares unequal)
                want[i] = 0
            else:
                want[i] = <uint32_t>v
    carr = (4 * count + 7) & ~7
    pay_off = HDR + carr
    length = pay_off + n if copy else pay_off
    cdef unsigned char[::1] out = _out_view(buf)
    _check_fits(offset, length, out.shape[0])
    p = &out[0] + offset
    if n >= NOGIL_MIN_BYTES:
        with nogil:
            bad = _frame_write(p, pay_off, &pay[0], count, check, first_invalid, want, flags, block, extent_id,
                               lsn, sync_mark, seed, copy)
    else:
        bad = _frame_write(p, pay_off, &pay[0], count, check, first_invalid, want, flags, block, extent_id,
                           lsn, sync_mark, seed, copy)
    if bad >= 0:
        raise BlockCrcMismatch(bad)
    return offset + length


def frame_trim(buf, Py_ssize_t offset, uint32_t seed, uint64_t extent_id, uint32_t block, uint32_t count,
               uint64_t lsn, uint64_t sync_mark, uint8_t flags=0):
    """Frame one TRIM record (a header only) at buf[offset:]; returns offset + 48."""
    if count < 1:
        raise ValueError("a TRIM covers at least one block")
    if <uint64_t>block + <uint64_t>count > LAST_BLOCK:
        raise ValueError(f"blocks {block}..{block + count} run past block {LAST_BLOCK}")
    cdef unsigned char[::1] out = _out_view(buf)
    _check_fits(offset, HDR, out.shape[0])
    _header(&out[0] + offset, TYPE_TRIM, flags, count, HDR, block, extent_id, lsn, sync_mark, seed, HDR)
    return offset + HDR


def _bind() -> None:
    global _crc
    import crc32c

    from raftblock._fast._crc32c_ptr import routine_address

    if (BLOCK, HDR, MAXW, TYPE_WRITE, TYPE_TRIM, LAST_BLOCK, b"RBRC") != (
        BLOCK_SIZE, REC_HEADER_SIZE, MAX_WRITE_BLOCKS, REC_WRITE, REC_TRIM, MAX_BLOCK, REC_MAGIC
    ):
        raise ImportError("_segwriter_c's constants differ from _segformat.py")
    _crc = <crc_fn><uintptr_t>routine_address()
    cdef const unsigned char[::1] mv
    for sample, seed in ((bytes(32), 0), (bytes(range(256)) * 16, 0), (b"123456789", 0x9E3779B9)):
        mv = sample
        if _crc32c(seed, &mv[0], mv.shape[0]) != crc32c.crc32c(sample, seed):
            _crc = NULL
            raise ImportError("crc32c's C routine did not pass the self-check")


_bind()
