"""Hypothesis strategies shared by the fuzz properties: valid seeds mutated the way libFuzzer does."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Fuzz properties: no deadline (the first examples pay for imports and caches), the health checks that
# judge data generation off (inputs are large on purpose), a few hundred examples (tests/fuzz stays under a
# minute: see README.md).
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 63) - 1, (1 << 64) - 1]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_ops: int = 8) -> bytes:
    """One of `seeds` with up to `max_ops` edits: bit flips, byte sets, cuts, insertions, interesting
    integers written over a field, truncation."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.integers(0, 6))
        if not data:
            data += draw(st.binary(min_size=1, max_size=32))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[at] = draw(st.integers(0, 255))
        elif op == 2:
            del data[at : at + draw(st.integers(1, 64))]
        elif op == 3:
            data[at:at] = draw(st.binary(max_size=64))
        elif op == 4:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[at : at + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
        elif op == 5:
            n = draw(st.integers(1, 256))
            data[at:at] = data[at : at + n]
        else:
            del data[at:]
    return bytes(data)


def fuzz(max_examples: int = 100) -> settings:
    """FUZZ with `max_examples` (each test's count is tuned to its speed: README.md, "Runtime")."""
    return settings(FUZZ, max_examples=max_examples)
