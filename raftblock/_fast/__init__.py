"""Hot loops, each a Cython module with a pure-Python twin, chosen once at import.

Rule 1: `RAFTBLOCK_NO_EXTENSIONS=1` forces the twins (aiohttp does the same with AIOHTTP_NO_EXTENSIONS).
Rule 2: the twin is the specification; tests run the same cases on both (tests/unit/test_fast.py).
Rule 3: callers import the selected module from here (`from raftblock._fast import blockcrc`), never a
        twin directly.
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
