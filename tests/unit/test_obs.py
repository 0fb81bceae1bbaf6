"""obs/histogram.py (le semantics, cumulative buckets) and the status page's HTML (escaping, states)."""

from __future__ import annotations

from raftblock.control.statuspage import render
from raftblock.obs.histogram import Histogram
from raftblock.obs.metrics import Families, exposition, make_registry


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.001", 2), ("0.01", 3), ("0.1", 4), ("+Inf", 5)]
    assert h.count == 5 and abs(h.sum - 3.0535) < 1e-9
    assert h.quantile(0.5) == 0.01 and h.quantile(1.0) == float("inf") and Histogram((1.0,)).quantile(0.9) == 0.0


def test_a_registry_exposes_the_collectors_families_and_the_build_info() -> None:
    h = Histogram((0.5,))
    h.observe(0.25)

    def fill(f: Families) -> None:
        f.counter("raftblock_test_ops", "Ops.", 7, {"op": "read"})
        f.gauge("raftblock_test_level", "Level.", 1.5)
        f.histogram("raftblock_test_seconds", "Time.", h, {"op": "read"})
        f.declare_gauge("raftblock_test_empty", "Nothing yet.", ["volume"])

    text = exposition(make_registry(fill, "9.9.9")).decode()
    assert 'raftblock_build_info{version="9.9.9"} 1.0' in text
    assert 'raftblock_test_ops_total{op="read"} 7.0' in text
    assert 'raftblock_test_seconds_bucket{le="0.5",op="read"} 1.0' in text
    assert 'raftblock_test_seconds_count{op="read"} 1.0' in text
    assert "# TYPE raftblock_test_empty gauge" in text and "process_cpu_seconds_total" in text


def _view(**kw: object) -> dict[str, object]:
    v: dict[str, object] = {
        "cluster_id": "c1", "generated_ms": 0, "map_version": 3, "this_node": 2, "leader": 1, "is_leader": True,
        "racks": {"r<1>": [{"id": 4, "rack": "r<1>", "address": "h:1", "state": "down", "draining": False,
                            "reachable": False, "capacity_bytes": 100, "used_bytes": 95, "groups": 2,
                            "leading": None, "errors": {"corrupt_reads": 1}}]},
        "groups": {"total": 2, "degraded": 1},
        "repairs": [{"group": 7, "volume": "v", "state": "copying", "from": 1, "to": 5, "bytes_done": 50,
                     "bytes_total": 200, "rate_bytes_per_s": 10, "eta_s": 15.0},
                    {"group": 8, "volume": "v", "state": "degraded", "why": "2/3 live <copies>"}],
        "volumes": [{"name": "v", "size_bytes": 1 << 30, "replication": "raft", "state": "ready", "groups": 2,
                     "snapshots": 1, "attached": {"gateway": "gw1", "epoch": 4}}],
    }
    v.update(kw)
    return v


def test_the_status_page_escapes_what_it_shows_and_marks_states() -> None:
    page = render(_view())
    assert "<1>" not in page and "r&lt;1&gt;" in page and "&lt;copies&gt;" in page
    assert 'data-node="4" data-state="down"' in page and 'class="bar full"' in page  # 95 % used
    assert 'data-group="7" data-state="copying"' in page and "n1 → n5" in page and "25%" in page
    assert 'data-volume="v"' in page and "gw1" in page and "epoch 4" in page
    assert 'http-equiv="refresh"' in page and "<script" not in page
    assert "not the leader" not in page
    assert "not the leader" in render(_view(is_leader=False))
    assert 'id="no-repairs"' in render(_view(repairs=[]))
