"""Parsing and printing of sizes: `64M`, `1G`, `1GiB`, `4096` (binary multiples; K/M/G/T = KiB/MiB/...)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64M, 1G, 2TiB)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    """Exact when the size is a whole number of a unit (1GiB), else one decimal (1.5GiB)."""
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            if n % _UNITS[unit] == 0:
                return f"{n // _UNITS[unit]}{unit}iB"
            return f"{n / _UNITS[unit]:.1f}{unit}iB"
    return f"{n}B"
