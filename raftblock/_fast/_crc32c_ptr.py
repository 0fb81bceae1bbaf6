"""The address of the `crc32c` package's own C CRC-32C routine, for the Cython modules (shared by
_blockcrc_c and _segwriter_c; the pure twins call `crc32c.crc32c` instead).

Rule 1: we never hand-write CRC: the address is that of a routine inside crc32c's C extension, found
        through ctypes (the extension exports its symbols).
Rule 2: the routine the package itself uses comes first (hardware when `crc32c.hardware_based`, so a
        CRC32C_SKIP_HW_PROBE or FORCE_SW setting of the package is honoured), then its software one.
Rule 3: an address is returned only if the routine reproduces `crc32c.crc32c` on RFC 3720 B.4 vectors
        and on seeded inputs; otherwise ImportError, so the caller's import fails and the pure twin is
        selected (raftblock/_fast/__init__.py) instead of computing wrong checksums.

The routine's contract (crc32c's ext/common.h `crc_function`): `uint32_t f(uint32_t crc, const unsigned
char *data, unsigned long length)` working on the *inverted* register, so
`crc32c.crc32c(data, seed) == f(seed ^ 0xFFFFFFFF, data, len) ^ 0xFFFFFFFF`.
"""

from __future__ import annotations

import ctypes

_HW_NAMES = ("_crc32c_hw_adler", "_crc32c_hw_arm64")
_SW_NAME = "_crc32c_sw_slicing_by_8"
_ALL_ONES = 0xFFFFFFFF
# (data, seed): RFC 3720 B.4 vectors, a 4 KiB block (the long-input paths of the hardware routine),
# and seeded inputs (segment records seed their header CRC)
_SAMPLES = (
    (bytes(32), 0),
    (b"\xff" * 32, 0),
    (bytes(range(32)), 0),
    (bytes(range(256)) * 16, 0),
    (bytes(range(256)) * 40 + b"odd", 0x12345678),
    (b"123456789", 0xFFFFFFFF),
    (b"", 0xDEADBEEF),
)


def routine_address() -> int:
    """Address of a checked CRC-32C routine of crc32c's C extension; ImportError if none passes."""
    import crc32c
    import crc32c._crc32c as ext

    lib = ctypes.CDLL(ext.__file__)  # the already-loaded extension: its tables are initialised
    names = [*_HW_NAMES, _SW_NAME] if crc32c.hardware_based else [_SW_NAME]
    proto = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_ulong)
    for name in names:
        sym = getattr(lib, name, None)
        if sym is None:
            continue
        addr = ctypes.cast(sym, ctypes.c_void_p).value
        if not addr:
            continue
        fn = proto(addr)
        if all(
            fn(seed ^ _ALL_ONES, data, len(data)) ^ _ALL_ONES == crc32c.crc32c(data, seed)
            for data, seed in _SAMPLES
        ):
            return addr
    raise ImportError("no C routine of the crc32c package passed the CRC-32C self-check")
