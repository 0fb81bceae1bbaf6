"""The process's memory, as an operator sees it (RSS), and giving freed memory back.

Rules:
1. glibc keeps memory Python freed in its heaps and arenas (a received 512 MiB snapshot image, a compacted
   log) and shows it as RSS for good unless asked to return it: `trim_heap` calls malloc_trim(0) after
   such a release, on a worker thread (ctypes drops the GIL during the call). Measured on a node that had
   received two 512 MiB images: RssAnon 1,150 MiB before the call, 267 MiB after.
2. Where malloc_trim does not exist (not glibc), `trim_heap` does nothing and says so (False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def trim_heap() -> bool:
    """Rule 1; False when the C library has no malloc_trim."""
    global _trim, _looked
    if not _looked:
        _looked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = libc.malloc_trim
        except (OSError, AttributeError):
            _trim = None
    if _trim is None:
        return False
    _trim(0)
    return True


def rss_anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process (/proc/PID/status RssAnon), 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
