"""Histogram: a latency distribution with one observation per event at the cost of a bisect and three
additions, no lock (obs/metrics.py rule 1); exported as a Prometheus histogram at scrape time."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# fdatasync of a WAL: 50 us (NVMe with power-loss protection) .. 2.5 s (a failing disk)
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5)
# one I/O as a host sees it at the gateway: 100 us .. 10 s
IO_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0)

class Histogram:
    """Rule 1: one observation is a bisect and three additions (any thread that owns the event)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le semantics: value <= bound
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last: what HistogramMetricFamily takes."""
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((_float(b), acc))
        out.append(("+Inf", self.count))
        return out

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile q (0 when empty): for status pages and benches."""
        if not self.count:
            return 0.0
        want = q * self.count
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            if acc >= want:
                return b
        return float("inf")


def _float(b: float) -> str:
    return repr(float(b))
