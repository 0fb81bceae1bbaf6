# The Ansible deployment (ansible/) on hosts made of Linux namespaces (nshosts.py), driven through the
# `nsenter` connection plugin (connection_plugins/) with the production roles and playbooks.
#
# Enforces (issue 18, the Ansible part): site.yml deploys a 3-rack cluster (metadata m1..m3 and storage nodes
# s1..s3, one of each per rack, and a gateway gw1 outside the racks) from the wheelhouse with pip --no-index,
# as systemd units; a second run changes nothing and `--check --diff` reports nothing to change; verify.yml
# passes; a volume created from the root namespace through a cluster file takes qemu-io patterns and an ext4
# file system (nbdfuse, fsck clean) through the gateway; upgrade.yml moves every process to a newer wheel one
# host at a time while a fio crc32c verify job writes through the gateway, without an I/O error (the gateway,
# whose restart cuts its hosts' connections, is upgraded after the job); every process then reports the new
# version; a power cut of a whole rack (kill -9 of everything in its hosts) leaves I/O through the gateway
# working and every acknowledged byte readable, and upgrade.yml refuses to stop a node then (stop-check exits 1:
# the play fails before touching it); site.yml brings the rack back and the cluster is healthy; add-node.yml
# deploys a new storage node that receives replicas, decommission.yml drains and removes it.
#
# Needs root (namespaces, mounts), ansible-core and docker-systemctl-replacement (the `deploy` extra), and
# qemu-io, nbdfuse, fio, mkfs.ext4. Runs in `make test`; `make test-ansible` runs only this.
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nshosts
import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLUGINS = Path(__file__).resolve().parent / "connection_plugins"
EXT4_SCRIPT = REPO / "tests" / "integration" / "scripts" / "ext4_nbdfuse.sh"
VENV_BIN = Path(sys.executable).parent
RAFTBLOCK = [str(VENV_BIN / "raftblock")] if (VENV_BIN / "raftblock").exists() else [sys.executable, "-m", "raftblock.cli"]
TOOLS = ("qemu-io", "nbdfuse", "fusermount3", "fio", "mkfs.ext4", "fsck.ext4", "unshare", "nsenter", "ip", "make")

# host -> (role, rack). The gateway is in no rack: a rack's power cut leaves it (and its hosts) running.
HOSTS = {
    "m1": ("metadata", "r1"), "m2": ("metadata", "r2"), "m3": ("metadata", "r3"),
    "s1": ("node", "r1"), "s2": ("node", "r2"), "s3": ("node", "r3"),
    "gw1": ("gateway", None),
}
RACK_GROUP = {"r1": "rack_a", "r2": "rack_b", "r3": "rack_c"}
NODE_ID = {"s1": 11, "s2": 21, "s3": 31}
CUT_RACK = "r1"
ADD_RACK, ADD_ID = "r3", 32  # the storage node add-node.yml brings (host s4)
NBD_PORT = 10809
# docker-systemctl-replacement ignores AmbientCapabilities: the gateway (user raftblock) could not bind 3260
ISCSI_PORT = 13260
MiB = 1 << 20
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                   r"\s+rescued=(\d+)\s+ignored=(\d+)", re.M)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):  # `make test` installs everything: a skip in CI would hide a missing step
        pytest.fail(reason)
    pytest.skip(reason)


def _wait(cond: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(interval_s)


def run(argv: list[str], timeout_s: float = 120, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run to completion in its own process group; the whole group is killed on timeout."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env, cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout_s}s: {' '.join(argv)}\n{out[-3000:]}\n{err[-3000:]}") from None
    cp = subprocess.CompletedProcess(argv, p.returncode, out, err)
    if check and cp.returncode != 0:
        raise AssertionError(f"exit {cp.returncode}: {' '.join(argv)}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    return cp


@dataclass
class Recap:
    hosts: dict[str, dict[str, int]]
    output: str
    rc: int

    def changed(self) -> dict[str, int]:
        return {h: r["changed"] for h, r in self.hosts.items() if r["changed"]}


@dataclass
class Deployment:
    """The hosts, the inventory the test writes for them, and ansible-playbook runs against ansible/."""

    work: Path
    hosts: nshosts.Hosts
    wheelhouse: Path
    version: str
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    runs: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # more of group_vars/all, as an operator edits it

    @property
    def inventory(self) -> Path:
        return self.work / "inventory"

    def addr(self, host: str) -> str:
        return self.hosts[host].address

    @property
    def gateway_uri(self) -> str:
        return f"nbd://{self.addr('gw1')}:{NBD_PORT}"

    def write_inventory(self, extra_nodes: dict[str, tuple[str, int]] | None = None) -> None:
        """hosts.yml, group_vars (the secret in an ansible-vault encrypted file, as production keeps it) and
        the racks; `extra_nodes`: more storage hosts, name -> (rack, node id)."""
        nodes = {h: (HOSTS[h][1], NODE_ID[h]) for h in HOSTS if HOSTS[h][0] == "node"} | (extra_nodes or {})

        def hostvars(h: str, **kw: Any) -> dict[str, Any]:
            return {"ansible_nsenter_pid": self.hosts[h].holder, "raftblock_address": self.addr(h), **kw}

        racks: dict[str, dict[str, Any]] = {g: {"hosts": {}} for g in RACK_GROUP.values()}
        for h, (rack, nid) in nodes.items():
            racks[RACK_GROUP[rack]]["hosts"][h] = hostvars(h, raftblock_node_id=nid)
        doc = {"all": {
            "vars": {"ansible_connection": "nsenter", "ansible_python_interpreter": "/usr/bin/python3",
                     "ansible_become": False},
            "children": {
                "metadata": {"hosts": {h: hostvars(h, raftblock_metadata_id=int(h[1:]), raftblock_rack=HOSTS[h][1])
                                       for h in HOSTS if HOSTS[h][0] == "metadata"}},
                "nodes": {"children": racks},
                "gateways": {"hosts": {"gw1": hostvars("gw1")}},
            }}}
        gv = self.inventory / "group_vars"
        (gv / "all").mkdir(parents=True, exist_ok=True)
        (self.inventory / "hosts.yml").write_text(json.dumps(doc, indent=1) + "\n")  # JSON is YAML
        (gv / "all" / "main.yml").write_text(
            f"raftblock_cluster_id: test-{self.hosts.tag}\n"
            f"raftblock_version: \"{self.version}\"\n"
            f"raftblock_wheelhouse_src: {self.wheelhouse}\n"
            "raftblock_cluster_secret: \"{{ vault_raftblock_cluster_secret }}\"\n"
            "raftblock_stop_timeout_s: 60\n"
            "raftblock_health_timeout_s: 300\n"
            f"raftblock_gateway_iscsi_port: {ISCSI_PORT}\n"
            + "".join(f"{k}: {json.dumps(v)}\n" for k, v in self.settings.items()))
        for rack, group in RACK_GROUP.items():
            (gv / f"{group}.yml").write_text(f"raftblock_rack: {rack}\n")
        vault = gv / "all" / "vault.yml"
        if not vault.exists():
            self.vault_password.write_text(secrets.token_hex(16) + "\n")
            self.vault_password.chmod(0o600)
            vault.write_text(f'vault_raftblock_cluster_secret: "{self.secret}"\n')
            run([str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(self.vault_password),
                 str(vault)], env=self.env())
            assert vault.read_text().startswith("$ANSIBLE_VAULT;"), vault.read_text()[:80]

    @property
    def vault_password(self) -> Path:
        return self.work / "vault-password"

    def env(self) -> dict[str, str]:
        home = self.work / "ansible-home"
        home.mkdir(exist_ok=True)
        return {**os.environ,
                "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
                "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS),
                "ANSIBLE_PIPELINING": "True",
                "ANSIBLE_HOME": str(home),
                "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "ANSIBLE_DEPRECATION_WARNINGS": "False",
                "PYTHONWARNINGS": "ignore",
                "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def playbook(self, name: str, *args: str, expect_ok: bool = True, timeout_s: float = 1200) -> Recap:
        """ansible-playbook ansible/NAME against the test's inventory; its output goes to work/ansible-N-NAME.log."""
        self.runs += 1
        log = self.work / f"ansible-{self.runs:02d}-{name.removesuffix('.yml')}.log"
        t0 = time.monotonic()
        cp = run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), "--vault-password-file",
                  str(self.vault_password), name, *args], timeout_s=timeout_s, check=False, env=self.env(),
                 cwd=ANSIBLE_DIR)
        took = time.monotonic() - t0
        self.timings[f"{self.runs:02d} {name} {' '.join(args)}".strip()] = round(took, 1)
        log.write_text(cp.stdout + "\n--- stderr ---\n" + cp.stderr)
        recap = Recap({m[0]: dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored"),
                                      map(int, m[1:]), strict=True))
                       for m in RECAP.findall(cp.stdout)}, cp.stdout, cp.returncode)
        if expect_ok:
            bad = {h: r for h, r in recap.hosts.items() if r["failed"] or r["unreachable"]}
            assert cp.returncode == 0 and recap.hosts and not bad, (
                f"ansible-playbook {name} {' '.join(args)} failed (rc {cp.returncode}, {bad}); log {log}:\n"
                f"{cp.stdout[-8000:]}\n{cp.stderr[-3000:]}\n{self.journal_tails()}")
        return recap

    def journal_tails(self, lines: int = 15) -> str:
        """The last lines each host's services wrote (docker-systemctl-replacement's journal files)."""
        out = []
        for name, h in self.hosts.hosts.items():
            for f in sorted((h.root / "var.upper" / "log" / "journal").glob("raftblock-*.log")):
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"===== {name} {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def cluster_file(self) -> Path:
        """A cluster file on the controller (the root namespace) naming the deployed metadata group."""
        d = self.work / "client"
        d.mkdir(exist_ok=True)
        secret = d / "cluster.secret"
        secret.write_text(self.secret + "\n")
        secret.chmod(0o600)
        meta = [h for h in HOSTS if HOSTS[h][0] == "metadata"]
        f = d / "cluster.toml"
        f.write_text(f'cluster_id = "test-{self.hosts.tag}"\nsecret_file = "cluster.secret"\n[meta]\n'
                     "admin = { " + ", ".join(f'{h[1:]} = "{self.addr(h)}:7201"' for h in meta) + " }\n"
                     "http = { " + ", ".join(f'{h[1:]} = "{self.addr(h)}:9201"' for h in meta) + " }\n")
        return f

    def cli(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*RAFTBLOCK, *args, "--cluster", str(self.cluster_file())], timeout_s=timeout_s, check=check)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("cluster", "status", "--json").stdout))


def _qemu_io(uri: str, *cmds: str, timeout_s: float = 120) -> str:
    argv = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        argv += ["-c", c]
    cp = run(argv, timeout_s=timeout_s, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0 and "failed" not in out and "error" not in out.lower(), f"qemu-io {cmds}:\n{out[-3000:]}"
    return out


def _metrics_version(addr: str, port: int) -> str | None:
    """The version in raftblock_build_info of the process serving /metrics at ADDR:PORT (None: no answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r'^raftblock_build_info\{[^}]*version="([^"]+)"', text, re.M)
    return m.group(1) if m else None


def _newer_wheel(wheel: Path, out_dir: Path, work: Path) -> tuple[Path, str]:
    """The same raftblock wheel as version V.post1 (METADATA, dist-info name, __version__), repacked with `wheel`
    (which recomputes RECORD): what a release of the same code looks like to pip, the units and /metrics."""
    old = wheel.name.split("-")[1]
    new = f"{old}.post1"
    unpack = work / "unpack"
    run([sys.executable, "-m", "wheel", "unpack", "-d", str(unpack), str(wheel)])
    src = unpack / f"raftblock-{old}"
    info = src / f"raftblock-{old}.dist-info"
    meta = info / "METADATA"
    meta.write_text(re.sub(r"^Version: .*$", f"Version: {new}", meta.read_text(), count=1, flags=re.M))
    init = src / "raftblock" / "__init__.py"
    init.write_text(re.sub(r'^__version__ = ".*"$', f'__version__ = "{new}"', init.read_text(), count=1, flags=re.M))
    info.rename(src / f"raftblock-{new}.dist-info")
    run([sys.executable, "-m", "wheel", "pack", "-d", str(out_dir), str(src)])
    made = sorted(out_dir.glob(f"raftblock-{new}-*.whl"))
    assert made, list(out_dir.iterdir())
    return made[0], new


class FioLoop:
    """fio verify jobs (crc32c, libnbd engine) back to back through the gateway until stopped; each job writes
    a region then reads it back and checks every block. Any error fails the test."""

    def __init__(self, uri: str, work: Path) -> None:
        self.uri, self.work = uri, work
        self.stop = threading.Event()
        self.jobs: list[tuple[int, float, str]] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.proc: subprocess.Popen[str] | None = None

    def _loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            t0 = time.monotonic()
            argv = ["fio", "--name=upgrade", "--ioengine=nbd", f"--uri={self.uri}", "--rw=randwrite", "--bs=4k",
                    "--size=16M", f"--offset={(n % 4) * 16}M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
                    "--do_verify=1", "--verify_state_save=0", f"--randseed={n}", "--output-format=json",
                    f"--output={self.work}/fio-{n}.json"]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True, cwd=self.work)
            out, _ = self.proc.communicate()
            self.jobs.append((self.proc.returncode, round(time.monotonic() - t0, 1), out[-2000:]))
            if self.proc.returncode != 0:
                return

    def __enter__(self) -> FioLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=300)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    if os.geteuid() != 0:
        pytest.skip("namespace hosts need root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        _skip_or_fail(f"missing tools: {' '.join(missing)} (make sysdeps installs them)")
    for exe in ("ansible-playbook", "ansible-vault", "systemctl3.py"):
        if not (VENV_BIN / exe).exists():
            _skip_or_fail(f"{exe} is not installed beside {sys.executable} (the `deploy` extra: pip install -e '.[deploy]')")
    if not Path("/dev/fuse").exists():
        _skip_or_fail("no /dev/fuse (nbdfuse)")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # The wheelhouse an air-gapped rack installs from: built by `make wheelhouse` (a no-op when up to date).
    run(["make", "-C", str(REPO), "--no-print-directory", "wheelhouse", f"PY={sys.executable}"], timeout_s=900)
    built = sorted((REPO / "dist" / "wheelhouse").glob("raftblock-*.whl"))
    assert len(built) == 1, built
    wheelhouse = tmp_path / "wheelhouse"
    shutil.copytree(REPO / "dist" / "wheelhouse", wheelhouse)
    timings["make wheelhouse"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    hosts = nshosts.Hosts.create(list(HOSTS))
    timings["namespace hosts"] = round(time.monotonic() - t0, 1)
    d = Deployment(tmp_path, hosts, wheelhouse, built[0].name.split("-")[1], timings=timings)
    try:
        d.write_inventory()
        yield d
    finally:
        print("\ntimings (s): " + json.dumps(d.timings, indent=1))
        t0 = time.monotonic()
        hosts.destroy()
        print(f"cleanup: {time.monotonic() - t0:.1f}s")


def _phase(d: Deployment, name: str, t0: float) -> float:
    now = time.monotonic()
    d.timings[name] = round(now - t0, 1)
    return now


@pytest.mark.timeout(3600)
def test_deploy_converge_io_upgrade_and_rack_power_cut(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment

    # -- deploy, converge, check ------------------------------------------------------------------------
    first = d.playbook("site.yml")
    assert all(r["changed"] > 0 for r in first.hosts.values()), first.hosts
    assert set(first.hosts) == set(HOSTS), first.hosts
    second = d.playbook("site.yml")
    assert second.changed() == {}, f"a second site.yml changed something: {second.changed()}\n{second.output[-6000:]}"
    check = d.playbook("site.yml", "--check", "--diff")
    assert check.changed() == {}, f"--check --diff on a converged cluster: {check.changed()}\n{check.output[-6000:]}"
    d.playbook("verify.yml")

    # every host has its own user, configs and units (the harness's private /etc), the secret 0600
    for h in HOSTS:
        got = d.hosts.run(h, ["stat", "-c", "%a %U", "/etc/raftblock/cluster.secret"]).stdout.split()
        assert got == ["600", "raftblock"], (h, got)
    assert not Path("/etc/raftblock").exists(), "the test wrote the real /etc"

    # -- I/O through the gateway, from the root namespace ------------------------------------------------
    t0 = time.monotonic()
    st = d.status()
    assert st["healthy"], st["problems"]
    assert {(n["id"], n["rack"]) for n in st["nodes"] if n["state"] == "up"} == \
        {(NODE_ID[h], HOSTS[h][1]) for h in NODE_ID}, st["nodes"]
    d.cli("volume", "create", "vol1", "--size", "256M")
    d.cli("volume", "create", "fs1", "--size", "256M")
    d.cli("volume", "create", "load", "--size", "128M")
    vol1 = f"{d.gateway_uri}/vol1"
    _qemu_io(vol1, "write -P 0xa5 0 4M", "write -P 0x3c 100M 1M", "write -P 0x11 255M 1M")
    _qemu_io(vol1, "read -P 0xa5 0 4M", "read -P 0x3c 100M 1M", "read -P 0x11 255M 1M", "read -P 0 4M 1M")
    # the same bytes over the gateway's iSCSI target
    _qemu_io(f"iscsi://{d.addr('gw1')}:{ISCSI_PORT}/iqn.2026-12.org.raftblock:vol1/0", "read -P 0xa5 0 4M",
             "read -P 0x3c 100M 1M")
    # a snapshot of an attached volume from the controller: the CLI raises gw1's barrier over its admin port
    d.cli("snapshot", "create", "vol1", "before-upgrade")
    snaps = json.loads(d.cli("snapshot", "list", "vol1", "--json").stdout)
    assert [s["name"] for s in snaps if s["state"] == "ready"] == ["before-upgrade"], snaps
    t0 = _phase(d, "qemu-io patterns, a snapshot", t0)

    src = tmp_path / "tree"
    for i, size in enumerate((0, 1, 4095, 4097, 300_000, 3 * MiB + 5)):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 2}" / f"f{i}.bin").write_bytes(os.urandom(size))
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    for phase in ("write", "verify"):
        run(["unshare", "-m", "--propagation", "private", "bash", str(EXT4_SCRIPT), phase, f"{d.gateway_uri}/fs1",
             str(ext4), str(src)], timeout_s=300)
    assert (ext4 / "sums.write").read_text() == (ext4 / "sums.verify").read_text()
    assert len((ext4 / "sums.write").read_text().splitlines()) == 6
    _phase(d, "ext4 through nbdfuse", t0)

    # -- rolling upgrade to a newer wheel under a fio verify load ------------------------------------------
    t0 = time.monotonic()
    newer, new = _newer_wheel(next(d.wheelhouse.glob("raftblock-*.whl")), d.wheelhouse, tmp_path)
    pids_before = {h: d.hosts.pids(h) for h in HOSTS}
    with FioLoop(f"{d.gateway_uri}/load", tmp_path) as fio:
        _wait(lambda: fio.jobs or (fio.proc is not None and fio.proc.poll() is None), 60, "fio to start")
        d.playbook("upgrade.yml", "-e", f"raftblock_version={new}", "--tags", "metadata,nodes")
        # at least one whole job (write + verify) ran after the upgrade, on the new processes
        done = len(fio.jobs)
        _wait(lambda: len(fio.jobs) > done or any(rc for rc, _, _ in fio.jobs), 300, "a fio job after the upgrade")
    assert fio.jobs and all(rc == 0 for rc, _, _ in fio.jobs), f"fio failed during the upgrade: {fio.jobs[-1]}"
    d.timings["fio jobs during the upgrade"] = len(fio.jobs)
    d.playbook("upgrade.yml", "-e", f"raftblock_version={new}", "--tags", "gateways")
    t0 = _phase(d, "upgrade (all)", t0)
    for h, (role, _) in HOSTS.items():
        port = {"metadata": 9201, "node": 9301, "gateway": 9401}[role]
        assert _metrics_version(d.addr(h), port) == new, f"{h} does not run {new}"
        assert d.hosts.run(h, ["/opt/raftblock/venv/bin/raftblock", "--version"]).stdout.split()[-1] == new
        assert set(d.hosts.pids(h)).isdisjoint(pids_before[h]), f"{h}: a process of the old version still runs"
    d.version = new
    d.write_inventory()
    d.playbook("verify.yml")  # (a converged site.yml here changes nothing: checked in development, left out for time)
    _qemu_io(vol1, "read -P 0xa5 0 4M", "read -P 0x3c 100M 1M", "read -P 0x11 255M 1M")
    # a setting changed in the inventory: site.yml rewrites that config and its handler restarts the process
    gw_pids = d.hosts.pids("gw1")
    d.settings["raftblock_gateway_deadline_s"] = 12.0
    d.write_inventory()
    changed = d.playbook("site.yml", "--limit", "gateways").changed()
    assert set(changed) == {"gw1"}, changed
    assert "deadline_s = 12.0" in d.hosts.run("gw1", ["cat", "/etc/raftblock/gateway.toml"]).stdout
    assert gw_pids and set(d.hosts.pids("gw1")).isdisjoint(gw_pids), "the gateway was not restarted"
    _qemu_io(vol1, "read -P 0xa5 0 4M")
    t0 = _phase(d, "after upgrade: site.yml, verify.yml, read back, a config change", t0)

    # -- power cut of a whole rack --------------------------------------------------------------------
    cut = [h for h, (_, rack) in HOSTS.items() if rack == CUT_RACK]
    for h in cut:
        assert d.hosts.power_cut(h), f"nothing ran on {h}"
    _qemu_io(vol1, "write -P 0x77 8M 2M", "read -P 0x77 8M 2M", "read -P 0xa5 0 4M", "read -P 0x3c 100M 1M",
             "read -P 0x11 255M 1M", timeout_s=180)
    run(["unshare", "-m", "--propagation", "private", "bash", str(EXT4_SCRIPT), "verify", f"{d.gateway_uri}/fs1",
         str(ext4)], timeout_s=300)
    assert (ext4 / "sums.write").read_text() == (ext4 / "sums.verify").read_text()
    st = d.status()
    down = {n["id"] for n in st["nodes"] if n["state"] != "up"}
    assert down <= {NODE_ID[h] for h in cut if h in NODE_ID}, st["nodes"]
    t0 = _phase(d, f"rack {CUT_RACK} power cut: I/O", t0)

    # the upgrade gate: stopping s2 now would leave the groups s1 was in without a majority, so
    # `node stop-check` exits 1, the play fails on s2 and goes no further (s2 and s3 keep their processes)
    pids = {h: d.hosts.pids(h) for h in ("s2", "s3")}
    gate = d.playbook("upgrade.yml", "-e", f"raftblock_version={new}", "--tags", "nodes", "--skip-tags", "always",
                      "--limit", "s2,s3", expect_ok=False)
    assert gate.rc != 0 and gate.hosts.get("s2", {}).get("failed") == 1, gate.output[-4000:]
    assert "s3" not in gate.hosts and "stop-check" in gate.output, gate.output[-4000:]
    assert {h: d.hosts.pids(h) for h in ("s2", "s3")} == pids, "upgrade.yml touched a node after stop-check said no"
    t0 = _phase(d, f"rack {CUT_RACK} power cut: I/O, upgrade gate", t0)

    # -- power back: site.yml starts the rack's processes again, the cluster heals ---------------------------
    back = d.playbook("site.yml")
    assert set(back.changed()) == set(cut), back.changed()
    d.playbook("verify.yml")
    _qemu_io(vol1, "read -P 0x77 8M 2M", "read -P 0xa5 0 4M")
    t0 = _phase(d, f"rack {CUT_RACK} back", t0)

    # -- a new storage node (add-node.yml), then its decommission ---------------------------------------------
    # In rack r3: with 3 replicas in 3 racks a new node can only take replicas from a node of its own rack, and
    # the leader's rebalancing moves from the node with the most groups, the highest id among equals (here 31).
    d.hosts.add(["s4"])
    d.write_inventory(extra_nodes={"s4": (ADD_RACK, ADD_ID)})
    added = d.playbook("add-node.yml", "--limit", "s4")
    assert set(added.hosts) == {"s4"}, added.hosts
    st = d.status()
    s4 = [n for n in st["nodes"] if n["id"] == ADD_ID]
    assert s4 and s4[0]["state"] == "up" and s4[0]["rack"] == ADD_RACK and s4[0]["groups"] > 0, st["nodes"]
    assert st["healthy"], st["problems"]
    # (a site.yml now would add s4 to the other nodes' [peers], read at start only: one file each, no restart;
    # left out of the default suite for its time, as the converged runs above check site.yml's idempotence)
    d.playbook("decommission.yml", "-e", "node=s4")
    st = d.status()
    assert ADD_ID not in {n["id"] for n in st["nodes"]} and st["healthy"], (st["nodes"], st["problems"])
    assert not d.hosts.pids("s4"), "the decommissioned node still runs"
    d.write_inventory()
    d.playbook("verify.yml")
    _qemu_io(vol1, "read -P 0x77 8M 2M", "read -P 0xa5 0 4M", "read -P 0x3c 100M 1M", "read -P 0x11 255M 1M")
    _phase(d, "add-node, decommission", t0)
