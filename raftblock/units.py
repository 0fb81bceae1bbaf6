"""Sizes in and out, one style everywhere: IEC binary units (KiB, MiB, GiB, TiB, PiB).

Rules:
1. `parse_size` takes a whole or decimal number with an optional binary unit: `4096`, `4096B`, `64M`,
   `64MiB`, `1.5G`, `2TiB` (the unit letter in either case). K/M/G/T/P mean KiB/MiB/GiB/TiB/PiB, as in
   qemu-img, rbd and vitastor-cli.
2. `10GB`, `10kB` (an SI-looking unit) is refused with a line that says what to write instead, never read
   silently as GiB; so are negative, zero and fractional-byte sizes.
3. `format_size` prints IEC units: exact when whole (`1GiB`), else one decimal (`1.5GiB`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SI = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(?:([KMGTP])(iB|B)?|(B))?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text` (rule 1); ValueError with one line naming the fix otherwise (rule 2)."""
    m = _RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64M, 1G, 2TiB: binary units)")
    number, unit, suffix = m.group(1), (m.group(2) or "").upper(), m.group(3)
    if unit and suffix is not None and suffix.lower() == "b":
        n = Decimal(number)
        raise ValueError(f"{text!r} is ambiguous: write {number}{unit} or {number}{unit}iB for "
                         f"{_exact(n * _UNITS[unit])} bytes, or {_exact(n * _SI[unit])} for {number} {unit}B "
                         f"(10^{len(str(_SI[unit])) - 1} bytes each)")
    try:
        value = Decimal(number) * _UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"not a size: {text!r}") from None
    if value <= 0:
        raise ValueError(f"size must be positive, not {text.strip()!r}")
    if value != value.to_integral_value():
        raise ValueError(f"size {text.strip()!r} is not a whole number of bytes")
    return int(value)


def _exact(d: Decimal) -> str:
    return str(int(d)) if d == d.to_integral_value() else str(d)


def format_size(n: int) -> str:
    """Rule 3 (a size that one decimal would round to a whole unit it is not, e.g. 4097 bytes, shows two
    decimals or its bytes: never a figure that looks exact and is not)."""
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            if n % _UNITS[unit] == 0:
                return f"{n // _UNITS[unit]}{unit}iB"
            one = f"{n / _UNITS[unit]:.1f}"
            if one.endswith(".0"):
                return f"{n / _UNITS[unit]:.2f}{unit}iB" if unit != "K" else f"{n}B"
            return f"{one}{unit}iB"
    return f"{n}B"
