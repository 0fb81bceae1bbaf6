# cython: language_level=3, boundscheck=False, wraparound=False
"""Per-4-KiB-block CRC32C over a multi-block buffer (Cython; twin: _blockcrc_py.py).

We do not hand-write CRC: this calls the CRC32C routine of the `crc32c` package's own C extension
(its hardware path when the CPU has SSE4.2, else its slicing-by-8), found once at import through
ctypes (_crc32c_ptr.py, shared with _segwriter_c), and loops over the blocks without touching Python
objects. An import-time self-check against the package's Python API (RFC 3720 B.4 vectors) refuses to
load on any mismatch, so a changed `crc32c` build falls back to the pure twin instead of computing
wrong checksums.
"""

from libc.stdint cimport uint32_t, uintptr_t

ctypedef uint32_t (*crc_fn)(uint32_t, const unsigned char*, unsigned long) noexcept nogil

cdef crc_fn _crc = NULL
cdef enum:
    BLOCK = 4096
cdef uint32_t ALL_ONES = 0xFFFFFFFFu
BLOCK_SIZE = 4096
IMPLEMENTATION = "cython"


cdef inline uint32_t _block(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    return _crc(ALL_ONES, p, <unsigned long>n) ^ ALL_ONES


def _bind() -> None:
    global _crc
    import crc32c

    from raftblock._fast._crc32c_ptr import routine_address

    _crc = <crc_fn><uintptr_t>routine_address()
    for sample in (bytes(32), b"\xff" * 32, bytes(range(32)), bytes(range(256)) * 16):
        if block_crcs_any(sample) != crc32c.crc32c(sample):
            _crc = NULL
            raise ImportError("crc32c's C routine did not pass the self-check")


def block_crcs_any(data) -> int:
    cdef const unsigned char[::1] mv = memoryview(data).cast("B")
    return _block(&mv[0], mv.shape[0])


def block_crcs(data) -> list:
    """CRC32C of each 4 KiB block of `data` (len(data) must be a multiple of 4096)."""
    cdef const unsigned char[::1] mv = memoryview(data).cast("B")
    cdef Py_ssize_t n = mv.shape[0]
    if n % BLOCK:
        raise ValueError(f"buffer of {n} bytes is not a whole number of 4 KiB blocks")
    cdef Py_ssize_t count = n // BLOCK, i
    out = [0] * count
    if n == 0:
        return out
    cdef const unsigned char* p = &mv[0]
    for i in range(count):
        out[i] = _block(p + i * BLOCK, BLOCK)
    return out


def first_mismatch(data, crcs) -> int:
    """Index of the first block whose CRC32C differs from crcs[i], or -1 if all match."""
    cdef const unsigned char[::1] mv = memoryview(data).cast("B")
    cdef Py_ssize_t n = mv.shape[0]
    cdef Py_ssize_t count = len(crcs), i
    if n != count * BLOCK:
        raise ValueError(f"{n} bytes do not match {count} block CRCs")
    if n == 0:
        return -1
    cdef const unsigned char* p = &mv[0]
    for i in range(count):
        if _block(p + i * BLOCK, BLOCK) != <uint32_t>crcs[i]:
            return i
    return -1


_bind()
