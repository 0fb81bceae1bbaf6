"""Hot loops, each a Cython module with a pure-Python twin, chosen once at import (docs/fast.md):
`blockcrc` (per-4-KiB-block CRC32C), `bitmap` (word-at-a-time block bitmaps), `segwriter` (segment
record framing into a caller's buffer).

Rule 1: `RAFTBLOCK_NO_EXTENSIONS=1` forces the twins (aiohttp does the same with AIOHTTP_NO_EXTENSIONS).
Rule 2: the twin is the specification; tests run the same cases on both (tests/unit/test_fast*.py).
Rule 3: callers import the selected module from here (`from raftblock._fast import blockcrc`), never a
        twin directly.
Rule 4: this package imports nothing but the standard library and `crc32c`, so it loads in an
        environment holding only the wheel and crc32c (tests/unit/test_fast_wheel.py).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("RAFTBLOCK_NO_EXTENSIONS") == "1"


def _select(name: str) -> ModuleType:
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"raftblock._fast._{name}_c")
        except ImportError:
            pass
    return importlib.import_module(f"raftblock._fast._{name}_py")


blockcrc = _select("blockcrc")
bitmap = _select("bitmap")
segwriter = _select("segwriter")
