"""Operators' view of a running cluster: /metrics on every process (checked by Debian's `promtool check
metrics` and scraped by a real Prometheus server loading ansible/files/prometheus/alerts.yml), the HTTP
server's answers to bad requests, and the metadata leader's status page in headless Chromium with a node
killed and its replicas being rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import require_libnbd, require_tools
from .test_cluster import Cluster, _cleanup, _wait

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ansible" / "files" / "prometheus" / "alerts.yml"


def _get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **kw: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout_s) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _promtool_check(body: bytes) -> None:
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert r.returncode == 0, f"promtool check metrics: {r.stdout.decode()} {r.stderr.decode()}"


def _qemu_write(uri: str, pattern: int, offset: int, length: str) -> None:
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Cluster]:
    """What `make demo` starts (`raftblock demo`): three nodes in three racks, NBD in the nodes, volume demo."""
    c = Cluster(tmp_path / "demo")
    out = json.loads(c.cli("demo", "--nbd-port", "0", "--json", timeout_s=180).stdout)
    c.uri = out["uri"]
    assert out["status_url"].startswith("http://"), out
    yield c
    _cleanup(c)


def test_a_demo_cluster_is_scraped_by_prometheus_and_every_endpoint_passes_promtool(demo: Cluster,
                                                                                  tmp_path: Path) -> None:
    require_tools("promtool", "prometheus", "qemu-io")
    _qemu_write(f"{demo.uri}/demo", 0x5A, 0, "4M")
    st = demo.status()
    targets = {"raftblock-meta": [m["metrics_url"] for m in st["metadata"]],
               "raftblock-node": [n["metrics_url"] for n in st["nodes"]]}
    assert all(targets["raftblock-meta"]) and all(targets["raftblock-node"]), st
    assert st["status_url"] and st["healthy"], st
    samples = {}
    for urls in targets.values():
        for url in urls:
            code, body, headers = _get(url)
            assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), (url, code)
            _promtool_check(body)
            samples[url] = _samples(body.decode())
    leaders = [u for u in targets["raftblock-meta"] if samples[u]["raftblock_meta_leader"][0][1] == 1.0]
    assert len(leaders) == 1, {u: samples[u]["raftblock_meta_leader"] for u in targets["raftblock-meta"]}
    lead = samples[leaders[0]]
    assert sorted(int(lab["node"]) for lab, v in lead["raftblock_meta_node_up"] if v == 1.0) == [1, 2, 3]
    assert {lab["state"]: v for lab, v in lead["raftblock_meta_groups"]}["healthy"] >= 1
    # the writes, seen by the gateway inside node 1 (demo attaches through it) and by the WALs
    n1 = samples[targets["raftblock-node"][0]]
    writes = [v for lab, v in n1["raftblock_gateway_io_operations_total"]
              if lab["volume"] == "demo" and lab["op"] == "write"]
    assert writes and writes[0] >= 1, n1.get("raftblock_gateway_io_operations_total")
    assert sum(v for lab, v in n1["raftblock_gateway_io_bytes_total"] if lab["op"] == "write") >= 4 << 20
    assert any(v > 0 for u in targets["raftblock-node"]
               for lab, v in samples[u]["raftblock_node_wal_fdatasync_seconds_count"])

    # A real Prometheus server: scrapes every target, loads the alert rules, answers a query per target.
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    jobs = "".join(
        f"  - job_name: {job}\n    scrape_interval: 1s\n    static_configs:\n      - targets: "
        f"{json.dumps([urllib.parse.urlsplit(u).netloc for u in urls])}\n"
        for job, urls in targets.items())
    cfg.write_text(f"global:\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\nscrape_configs:\n{jobs}")
    proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def query(q: str) -> list[dict[str, Any]]:
            code, body, _ = _get(f"{api}/query?{urllib.parse.urlencode({'query': q})}")
            assert code == 200, body
            return list(json.loads(body)["data"]["result"])

        def all_up() -> bool:
            try:
                res = query("up")
            except (OSError, AssertionError):
                return False
            return len(res) == 6 and all(r["value"][1] == "1" for r in res)

        _wait(all_up, 60, f"Prometheus to scrape all 6 targets (log: {tmp_path / 'prometheus.log'})")
        for job, urls in targets.items():
            for u in urls:
                inst = urllib.parse.urlsplit(u).netloc
                res = query(f'raftblock_build_info{{job="{job}",instance="{inst}"}}')
                assert len(res) == 1 and res[0]["metric"]["version"], (job, inst, res)
        assert len(query("raftblock_meta_leader == 1")) == 1
        assert query('raftblock_gateway_io_operations_total{volume="demo",op="write"} > 0')
        code, body, _ = _get(f"{api}/rules")
        names = {r["name"] for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
        assert {"RaftblockNodeDown", "RaftblockGroupWithoutQuorum", "RaftblockFsyncLatencyHigh"} <= names, names
        firing = [a["labels"]["alertname"] for a in json.loads(_get(f"{api}/alerts")[1])["data"]["alerts"]
                  if a["state"] == "firing"]
        assert not firing, firing  # a healthy cluster raises none
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_http_port_answers_bad_requests_precisely_and_a_separate_gateway_exports_its_volumes(
        tmp_path: Path) -> None:
    require_tools("promtool", "qemu-io")
    c = Cluster(tmp_path / "cluster", gateway="separate")
    try:
        c.up()
        c.cli("volume", "create", "v", "--size", "64M")
        _qemu_write(f"{c.uri}/v", 0x11, 0, "1M")
        # a read past the end (libnbd with its own checks off): the host gets EINVAL, the gateway counts it
        r = subprocess.run([require_libnbd(), "-c", "import nbd, sys\nh = nbd.NBD()\nh.set_strict_mode(0)\n"
                            "h.connect_uri(sys.argv[1])\ntry:\n    h.pread(8 << 20, 60 << 20)\n"
                            "except nbd.Error as e:\n    print('refused', e.errno)\n", f"{c.uri}/v"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("refused"), r.stdout + r.stderr
        st = c.status()
        gw = st["gateways"][0]["metrics_url"]
        assert gw, st["gateways"]
        code, body, _ = _get(gw)
        assert code == 200
        _promtool_check(body)
        s = _samples(body.decode())
        ops = {lab["op"]: v for lab, v in s["raftblock_gateway_io_operations_total"] if lab["volume"] == "v"}
        assert ops.get("write", 0) >= 1, ops
        errors = {lab["op"]: v for lab, v in s["raftblock_gateway_io_errors_total"] if lab["volume"] == "v"}
        assert errors.get("read", 0) >= 1, errors
        assert sum(v for lab, v in s["raftblock_gateway_io_latency_seconds_count"] if lab["volume"] == "v") >= 2
        # bad requests: each gets its status, the process serves the next one
        host, port = urllib.parse.urlsplit(gw).netloc.rsplit(":", 1)

        def raw(data: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as sk:
                sk.sendall(data)
                out = b""
                while chunk := sk.recv(65536):
                    out += chunk
                return out

        assert raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert raw(b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert raw(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"HEAD /metrics HTTP/1.1\r\n\r\n").split(b"\r\n\r\n", 1)[1] == b""
        assert _get(gw)[0] == 200
        assert _get(gw.replace("/metrics", "/healthz"))[1] == b"ok\n"
        # logs for journald: JSON lines on stderr, each naming the process that wrote it
        for name, key, want in (("n1", "rack", st["nodes"][0]["rack"]), ("gateway", "gateway", "gw1"), ("m1", "meta", 1)):
            events = [json.loads(line) for line in (c.root / "logs" / f"{name}.log").read_text().splitlines()
                      if line.startswith("{")]
            assert events and all(e.get(key) == want for e in events), (name, [e for e in events if e.get(key) != want][:3])
    finally:
        _cleanup(c)


def _chromium(*args: str, tmp: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                          capture_output=True, timeout=timeout_s)


def test_the_status_page_in_chromium_shows_a_killed_node_and_the_repair(tmp_path: Path) -> None:
    """Four nodes in three racks (n1 and n4 share rack r1): n1 killed, its groups degraded, then (once the
    detector calls it down) rebuilt on n4, paced so the copy shows. What Chromium renders is checked through
    the rows' data attributes; its screenshot is kept (RAFTBLOCK_SCREENSHOT=path copies it there)."""
    require_tools("chromium", "qemu-io")
    c = Cluster(tmp_path / "cluster", gateway="separate")
    try:
        c.cli("cluster", "up", "--nbd-port", "0", "--nodes", "4", "--gateway", "separate")
        c.down()
        for cfg in sorted((c.root / "nodes").glob("n*.toml")):  # slow enough to be seen copying
            cfg.write_text(cfg.read_text() + "\n[raft]\nrepair_bytes_per_s = 8388608\n")
        c.up()
        c.cli("volume", "create", "v", "--size", "256M")
        _qemu_write(f"{c.uri}/v", 0x33, 0, "96M")
        st = c.status()
        url = st["status_url"]
        code, body, _ = _get(url)
        assert code in (200, 307), code
        page = _chromium("--dump-dom", url, tmp=tmp_path).stdout.decode()
        assert 'id="no-repairs"' in page and 'data-node="1" data-state="up"' in page, page[:2000]
        victim = 1
        c.kill(f"n{victim}")

        def view() -> dict[str, Any]:
            return dict(json.loads(urllib.request.urlopen(url.rstrip("/") + "/status.json", timeout=10).read()))

        def copying() -> bool:
            return any(r.get("state") == "copying" for r in view()["repairs"])

        _wait(lambda: any(n["id"] == victim and n["state"] != "up" for ns in view()["racks"].values() for n in ns),
              30, "the page to show the killed node")
        page = _chromium("--dump-dom", url, tmp=tmp_path).stdout.decode()
        assert f'data-node="{victim}" data-state="suspect"' in page or f'data-node="{victim}" data-state="down"' in page
        assert 'id="repairs"' in page and 'data-group="' in page, page[:3000]
        assert '<tr data-volume="v">' in page
        _wait(copying, 90, "a replica of n1's groups to be rebuilt on n4")
        shot = tmp_path / "status-page.png"
        r = _chromium(f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars", url, tmp=tmp_path)
        assert shot.exists() and shot.stat().st_size > 20_000, r.stderr.decode()[-2000:]
        page = _chromium("--dump-dom", url, tmp=tmp_path).stdout.decode()
        assert 'data-state="copying"' in page and "n4" in page, page[:3000]
        if os.environ.get("RAFTBLOCK_SCREENSHOT"):
            shutil.copy(shot, os.environ["RAFTBLOCK_SCREENSHOT"])
    finally:
        _cleanup(c)
