"""The monitoring files under ansible/files/: Prometheus alerting rules (alerts.yml), their promtool unit tests
(alerts_test.yml), the example scrape config (prometheus.yml) and the Grafana dashboard (grafana/raftblock.json).

promtool checks and unit-tests the rules; the dashboard's and the rules' expressions may only name the
metrics the processes export (METRICS below, the names raftblock/ exposes on /metrics), and every alert must
have a promtool case where it fires and one where it does not. The promtool tests skip when promtool
(Debian: `apt-get install prometheus`) is not on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "ansible" / "files" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"
CONFIG = PROM / "prometheus.yml"
DASHBOARD = ROOT / "ansible" / "files" / "grafana" / "raftblock.json"

# What the metadata nodes, storage nodes and gateways export (besides prometheus_client's process_* and
# python_* metrics). A histogram is queried through its _bucket, _sum and _count series.
GAUGES_AND_COUNTERS = {
    # metadata node
    "raftblock_meta_leader",
    "raftblock_meta_map_version",
    "raftblock_meta_nodes",
    "raftblock_meta_node_up",
    "raftblock_meta_group_replicas",
    "raftblock_meta_group_replicas_up",
    "raftblock_meta_groups",
    "raftblock_meta_volumes",
    "raftblock_meta_proposals_total",
    # storage node
    "raftblock_node_disk_free_bytes",
    "raftblock_node_disk_size_bytes",
    "raftblock_node_groups_hosted",
    "raftblock_node_groups_led",
    "raftblock_group_term",
    "raftblock_group_commit_apply_lag_entries",
    "raftblock_node_repair_bytes_total",
    "raftblock_node_repair_remaining_bytes",
    "raftblock_node_repair_eta_seconds",
    "raftblock_node_snapshot_bytes_sent_total",
    "raftblock_node_scrub_bytes_total",
    "raftblock_node_scrub_errors_total",
    "raftblock_node_frames_refused_total",
    "raftblock_node_client_ops_total",
    # gateway
    "raftblock_gateway_io_operations_total",
    "raftblock_gateway_io_bytes_total",
    "raftblock_gateway_io_errors_total",
    "raftblock_gateway_connections",
    # every process
    "raftblock_build_info",
    # issue 20: authentication and QoS
    "raftblock_node_auth_refused_total",
    "raftblock_node_data_key_active",
}
HISTOGRAMS = {"raftblock_node_wal_fdatasync_seconds", "raftblock_gateway_io_latency_seconds"}
METRICS = GAUGES_AND_COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

NAME = re.compile(r"raftblock_[a-z0-9_]*[a-z0-9]")
# Grafana's macros and the dashboard's variables, as promtool has to see them.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$volume": ".*",
    "$node": ".*",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)"
)


def _promtool(*args: str, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, *args], cwd=cwd or PROM, capture_output=True, text=True, timeout=120)
    out = f"$ promtool {' '.join(args)}\n{r.stdout}{r.stderr}"
    assert r.returncode == 0, out
    return out


def unknown_metrics(text: str) -> set[str]:
    """The raftblock_* names in text that no process exports."""
    return {n for n in NAME.findall(text) if n not in METRICS}


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        return None
    return yaml


def alert_rules() -> list[tuple[str, str]]:
    """(alertname, severity) of every rule of alerts.yml."""
    yaml = _yaml()
    if yaml is None:  # no PyYAML: read the rule file's own lines
        names = re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), re.M)
        sevs = re.findall(r"^\s*severity:\s*(\S+)", ALERTS.read_text(), re.M)
        assert len(names) == len(sevs), "every alert needs a severity label"
        return list(zip(names, sevs, strict=True))
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["labels"]["severity"]) for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and query variable of the dashboard."""
    out: list[tuple[str, str]] = []

    def panels(ps: list[dict[str, Any]]) -> None:
        for p in ps:
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")))
            panels(p.get("panels", []))

    panels(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append((f"variable {v['name']}", q.get("query", "") if isinstance(q, dict) else q or ""))
    return out


# ---------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", ALERTS.name)
    assert "SUCCESS" in out, out


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    out = _promtool("test", "rules", ALERTS_TEST.name)
    assert "SUCCESS" in out, out


@needs_promtool
def test_promtool_checks_the_example_config_and_its_rule_file() -> None:
    # rule_files are resolved relative to prometheus.yml: alerts.yml is checked with it.
    out = _promtool("check", "config", CONFIG.name)
    assert "1 rule files found" in out, out


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool parses each expression of the dashboard as a recording rule (Grafana's macros replaced)."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs(json.loads(DASHBOARD.read_text()))):
        if expr.startswith("label_values("):  # a Grafana variable function, not PromQL
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr)
            assert m, f"{where}: {expr}"
            expr = m.group(1)
        for k, v in GRAFANA_SUBSTITUTIONS.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    assert rules
    # JSON is YAML: no PyYAML needed to write the rule file.
    (tmp_path / "dashboard_rules.yml").write_text(
        json.dumps({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    out = _promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out, out


# ---------------------------------------------------------------- the rules


def test_rules_and_their_tests_name_only_exported_metrics() -> None:
    for f in (ALERTS, ALERTS_TEST):
        assert not unknown_metrics(f.read_text()), f"{f.name}: {sorted(unknown_metrics(f.read_text()))}"


def test_every_rule_has_for_severity_summary_description_and_runbook() -> None:
    yaml = _yaml()
    if yaml is None:
        pytest.skip("PyYAML is not installed: the rule structure is not checked")
    doc = yaml.safe_load(ALERTS.read_text())
    assert [g["name"] for g in doc["groups"]] == ["raftblock"]
    rules = doc["groups"][0]["rules"]
    assert rules
    for r in rules:
        name = r.get("alert")
        assert name and name.startswith("Raftblock"), r
        assert "for" in r, f"{name}: no `for:`"
        assert r.get("labels", {}).get("severity") in ("critical", "warning"), name
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name}: no {key} annotation"
        assert "docs/operations.md#alerts" in ann["runbook_url"], name


def test_the_required_alerts_exist() -> None:
    have = set(alert_rules())
    want = {
        ("RaftblockNodeDown", "warning"),
        ("RaftblockTargetDown", "warning"),
        ("RaftblockGroupWithoutQuorum", "critical"),
        ("RaftblockGroupDegraded", "warning"),
        ("RaftblockRepairStalled", "warning"),
        ("RaftblockDiskNearlyFull", "warning"),
        ("RaftblockDiskNearlyFull", "critical"),
        ("RaftblockScrubFoundErrors", "warning"),
        ("RaftblockFsyncLatencyHigh", "warning"),
        ("RaftblockNoMetadataLeader", "critical"),
        ("RaftblockFramesRefused", "warning"),
        ("RaftblockAuthRefused", "warning"),
    }
    assert have == want, f"missing {sorted(want - have)}, unexpected {sorted(have - want)}"


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    """For each (alert, severity) of alerts.yml a promtool case expects it firing, and for each alert a case
    expects nothing firing."""
    yaml = _yaml()
    fires: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    if yaml is None:  # no PyYAML: blocks of `alertname:` lines, each up to the next one
        text = ALERTS_TEST.read_text()
        for m in re.finditer(r"alertname:\s*(\S+)\s*\n(.*?)(?=^\s*- eval_time:|\Z)", text, re.M | re.S):
            name, body = m.group(1), m.group(2)
            if re.search(r"exp_alerts:\s*\[\]", body):
                quiet.add(name)
            for sev in re.findall(r"severity:\s*(\S+)", body):
                fires.add((name, sev))
    else:
        doc = yaml.safe_load(ALERTS_TEST.read_text())
        assert doc["rule_files"] == [ALERTS.name]
        for case in doc["tests"]:
            for t in case.get("alert_rule_test", []):
                exp = t.get("exp_alerts") or []
                if not exp:
                    quiet.add(t["alertname"])
                for a in exp:
                    fires.add((t["alertname"], a.get("exp_labels", {}).get("severity", "")))
    rules = alert_rules()
    assert not [r for r in rules if r not in fires], (
        f"no case where these fire: {[r for r in rules if r not in fires]}"
    )
    assert not [n for n, _ in rules if n not in quiet], (
        f"no case where these stay quiet: {[n for n, _ in rules if n not in quiet]}"
    )


# ---------------------------------------------------------------- the dashboard


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name, label in (("volume", "volume"), ("node", "node")):
        assert variables[name]["type"] == "query"
        assert dashboard_exprs({"templating": {"list": [variables[name]]}})[0][1].endswith(f", {label})")
    ids = []
    for p in dash["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_expressions_name_only_exported_metrics() -> None:
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert exprs
    bad = [(where, sorted(unknown_metrics(e))) for where, e in exprs if unknown_metrics(e)]
    assert not bad, bad
    assert all(e.strip() for _, e in exprs), "an empty query"


def test_dashboard_shows_every_exported_metric() -> None:
    """Each metric family appears in some panel (so a metric added to the list is also charted)."""
    used = {n for _, e in dashboard_exprs(json.loads(DASHBOARD.read_text())) for n in NAME.findall(e)}
    families = {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith(tuple(HISTOGRAMS)) else n for n in used
    }
    missing = (GAUGES_AND_COUNTERS | HISTOGRAMS) - families
    assert not missing, sorted(missing)


def test_the_checks_catch_an_unknown_metric() -> None:
    """The name check is not vacuous: a misspelt, a made-up and a bare histogram name are caught."""
    assert unknown_metrics("rate(raftblock_node_repair_byte_total[5m])") == {
        "raftblock_node_repair_byte_total"
    }
    assert unknown_metrics("raftblock_gateway_io_latency_seconds") == {"raftblock_gateway_io_latency_seconds"}
    assert unknown_metrics('sum(raftblock_gateway_io_latency_seconds_bucket{job=~"raftblock.*"})') == set()
