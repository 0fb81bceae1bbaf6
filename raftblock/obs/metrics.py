"""Prometheus metrics of a raftblock process (`http = "HOST:PORT"` in its config): GET /metrics.

Rules:
1. Nothing on the I/O path talks to prometheus_client. Counters the process keeps anyway (the node's
   counters, the engine's and WAL's stats, the replicas' views) are read when Prometheus scrapes, by a
   collector of the process (`Collector`); the two latency distributions that need one observation per
   event (a WAL fdatasync, a gateway I/O) go into `Histogram`: a bisect and two additions, no lock.
2. Names follow Prometheus' conventions: `raftblock_<process>_<what>_<unit>`, counters end in `_total`,
   base units (seconds, bytes). The list is in docs/operations.md ("Metrics") and is the contract of
   ansible/files/prometheus/alerts.yml and the Grafana dashboard.
3. A scrape runs on the process's event loop (the HTTP server is asyncio, obs/http.py): a collector reads
   the process's state without locks, in one loop turn, so what it reports is one consistent instant.
4. Each process has its own registry (tests run several processes' servers in one interpreter), with the
   standard process_* and python_* collectors and `raftblock_build_info{version}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _Collector

from raftblock.obs.histogram import Histogram

# The text exposition format every Prometheus 2.x reads (prometheus_client's "latest" says version=1.0.0,
# the same text with a newer name-escaping scheme that older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Families:
    """What a collector yields, built with one call per sample: `f.counter(name, doc, value, labels)`."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def _family(self, kind: type, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = kind(name, doc, labels=list(labels), **kw)
        return fam

    def gauge(self, name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        self._family(GaugeMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        """`name` without `_total` (prometheus_client adds it)."""
        labels = labels or {}
        self._family(CounterMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), value)

    def histogram(self, name: str, doc: str, h: Histogram, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        self._family(HistogramMetricFamily, name, doc, list(labels), unit="").add_metric(
            list(labels.values()), h.buckets(), h.sum)

    def declare_gauge(self, name: str, doc: str, labels: Sequence[str]) -> None:
        """A family with no sample yet (no volume attached): still described, so queries and alerts see it."""
        self._family(GaugeMetricFamily, name, doc, labels)

    def declare_counter(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self._family(CounterMetricFamily, name, doc, labels)

    def all(self) -> Iterable[Any]:
        return self._by_name.values()


class Collector(_Collector):
    """Rule 3: `fill(families)` reads the process's state at scrape time."""

    def __init__(self, fill: Callable[[Families], None]) -> None:
        self.fill = fill

    def collect(self) -> Iterable[Any]:
        f = Families()
        self.fill(f)
        return list(f.all())


def make_registry(fill: Callable[[Families], None], version: str, labels: dict[str, str] | None = None) -> \
        CollectorRegistry:
    """Rule 4: a process's registry: its own collector, process_* / python_* and the build info."""
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)

    def with_build(f: Families) -> None:
        f.gauge("raftblock_build_info", "The raftblock version this process runs (value 1).", 1.0,
                {"version": version, **(labels or {})})
        fill(f)

    reg.register(Collector(with_build))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
