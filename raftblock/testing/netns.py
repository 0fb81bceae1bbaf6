# Cluster hosts in network namespaces, so that partitions are real (issue 7, "The harness").
#
# Owns: the namespaces of one run, the veth pairs and the bridge joining them, the per-host nftables
# table that drops traffic from blocked peers, and (NetCluster) a `raftblock cluster` laid out in them.
#
#   PREFIX-br      the bridge `br0`; one veth end per host (named after the host)
#   PREFIX-ct      the control host: the harness's own TCP calls and the NBD clients (never partitioned)
#   PREFIX-gw      the gateway
#   PREFIX-mI      metadata process I (rack of storage node I: "beside" it, as `cluster up` places it)
#   PREFIX-nI      storage node I, rack r{I mod R} as `cluster up` numbers them
#
# Addresses are 10.213.0.0/16 inside the run's own bridge namespace, so runs side by side never clash.
#
# Rules:
# 1. Names carry a per-run prefix `rbf<harness pid>x<random>-`; `cleanup_stale()` removes namespaces of
#    runs whose harness pid is gone (a crashed run), after killing the processes still inside them.
# 2. A partition is enforced in the receiving host: its nftables input chain drops packets from the
#    blocked addresses (silence, as a cut cable: senders time out, they get no error). `heal()` empties
#    every blocked set. The control host is never blocked.
# 3. The harness enters the control namespace with `entered()` (setns on the calling thread only, undone
#    on exit); processes are started with an `ip netns exec NS` prefix, so their pid is the process's own.
# 4. Everything made here is removed by `destroy()` (idempotent), also after a failed start.
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from raftblock.node import cluster as cl
from raftblock.node import layout as lay
from raftblock.node.clustermap import ClusterMap, NodeEntry

log = structlog.get_logger("raftblock.testing.netns")

NETNS_DIR = Path("/run/netns")
PREFIX_BASE = "rbf"
SUBNET = "10.213.0.0/16"
CLONE_NEWNET = 0x40000000
FAULT_TABLE = "rbfault"
NODE_PORT = 7000
META_RAFT_PORT = 7100
META_ADMIN_PORT = 7200
NBD_PORT = 10809


SCRUB_PASS_INTERVAL_S = 3.0  # campaign clusters scrub often: a bit flip is found by the scrub or by a read
SCRUB_BYTES_PER_S = 32 << 20

class NetnsError(RuntimeError):
    pass


def _run(argv: list[str], input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def cleanup_stale() -> list[str]:
    """Remove namespaces left by runs whose harness process is gone (and kill what still runs inside)."""
    removed = []
    names = sorted(p.name for p in NETNS_DIR.glob(f"{PREFIX_BASE}*")) if NETNS_DIR.exists() else []
    for name in names:
        m = re.match(rf"{PREFIX_BASE}(\d+)x[0-9a-f]+-", name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _kill_inside(name)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    if removed:
        log.info("netns.stale_removed", namespaces=removed)
    return removed


def _kill_inside(ns: str) -> None:
    r = _run(["ip", "netns", "pids", ns], check=False)
    for tok in r.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Host:
    name: str  # "ct", "gw", "m1", "n2", ...
    address: str
    rack: str | None = None


@dataclass
class Net:
    """The namespaces of one run. `hosts`: host name -> rack (None: no rack, e.g. control, gateway)."""

    hosts: dict[str, Host] = field(default_factory=dict)
    prefix: str = ""
    made: list[str] = field(default_factory=list)
    blocked: dict[str, set[str]] = field(default_factory=dict)  # host -> hosts it drops traffic from

    @classmethod
    def create(cls, racks: dict[str, str | None]) -> Net:
        cleanup_stale()
        net = cls(prefix=f"{PREFIX_BASE}{os.getpid()}x{secrets.token_hex(3)}-")
        try:
            net._build(racks)
        except BaseException:
            net.destroy()
            raise
        return net

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def _build(self, racks: dict[str, str | None]) -> None:
        br = self.ns("br")
        self._add_ns(br)
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i, (name, rack) in enumerate(racks.items()):
            addr = f"10.213.{1 + i // 250}.{1 + i % 250}"
            self.hosts[name] = Host(name, addr, rack)
            ns = self.ns(name)
            self._add_ns(ns)
            _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v-{name}", "netns", br])
            _run(["ip", "-n", br, "link", "set", f"v-{name}", "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=(
                f"table inet {FAULT_TABLE} {{\n"
                "  set blocked { type ipv4_addr; }\n"
                "  chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }\n"
                "}\n"))
        log.info("netns.created", prefix=self.prefix, hosts={h.name: h.address for h in self.hosts.values()})

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.made.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def rack_hosts(self, rack: str) -> list[str]:
        return [h.name for h in self.hosts.values() if h.rack == rack]

    @contextlib.contextmanager
    def entered(self, host: str = "ct") -> Iterator[None]:
        """Run the calling thread (and the processes it starts) in HOST's network namespace."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.ns(host), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    # --- partitions ------------------------------------------------------------------------------
    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Hosts of side A and side B stop hearing each other (both directions); other pairs are kept."""
        a, b = sorted(set(side_a)), sorted(set(side_b))
        if "ct" in a or "ct" in b or set(a) & set(b):
            raise ValueError(f"bad partition sides {a} / {b}")
        for x, others in [(h, b) for h in a] + [(h, a) for h in b]:
            addrs = ", ".join(self.address(o) for o in others)
            _run(["ip", "netns", "exec", self.ns(x), "nft", "add", "element", "inet", FAULT_TABLE, "blocked",
                  f"{{ {addrs} }}"])
            self.blocked.setdefault(x, set()).update(others)
        log.info("netns.partition", side_a=a, side_b=b)

    def isolate(self, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
        """HOSTS against every other host but the control host; returns the two sides."""
        inside = sorted(set(hosts))
        outside = sorted(h for h in self.hosts if h not in inside and h != "ct")
        self.partition(inside, outside)
        return inside, outside

    def heal(self) -> None:
        for host in sorted(self.blocked):
            _run(["ip", "netns", "exec", self.ns(host), "nft", "flush", "set", "inet", FAULT_TABLE, "blocked"])
        self.blocked.clear()
        log.info("netns.healed", prefix=self.prefix)

    def reachable(self, src: str, dst: str, port: int, timeout_s: float = 1.0) -> bool:
        """One TCP connect from SRC to DST:PORT (used by the harness's self-test)."""
        code = ("import socket,sys\n"
                "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
                "try: s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
                "except ConnectionRefusedError: print('refused')\n"
                "except OSError: print('silent')\n")
        r = _run([*self.exec_prefix(src), sys.executable, "-c", code, self.address(dst), str(port), str(timeout_s)],
                 check=False)
        return r.stdout.strip() in ("ok", "refused")

    def destroy(self) -> None:
        for ns in reversed(self.made):
            _kill_inside(ns)
            _run(["ip", "netns", "del", ns], check=False)
        if self.made:
            log.info("netns.destroyed", prefix=self.prefix)
        self.made.clear()


# --- a cluster in the namespaces -----------------------------------------------------------------
def cluster_hosts(nodes: int, racks: int) -> dict[str, str | None]:
    """Host name -> rack: storage node i in rack r{i mod racks} (as `cluster up`), metadata process i
    beside storage node i, the control host and the gateway without a rack."""
    hosts: dict[str, str | None] = {"ct": None, "gw": None}
    metas = 3 if nodes >= 3 else 1
    for i in range(1, metas + 1):
        hosts[f"m{i}"] = f"r{i % racks}"
    for i in range(1, nodes + 1):
        hosts[f"n{i}"] = f"r{i % racks}"
    return hosts


@dataclass
class NetCluster:
    """`raftblock cluster` processes, one host (namespace) each, in the layout of raftblock/node/cluster.py
    (DIR/cluster.json, nodes/, meta/, run/, logs/), so `raftblock cluster down|status --dir DIR` work on it.
    `small_disks`: those nodes' data dirs are small loop-mounted ext4s (`disk_image_mib`), each in a private
    mount namespace of its node's process (the nemesis fills one with `nsenter -m`)."""

    root: Path
    net: Net
    nodes: int = 3
    racks: int = 3
    disk: str = "os"
    replication: str = "raft"
    small_disks: frozenset[int] = frozenset()
    disk_image_mib: int = 160
    layout: lay.Layout = field(init=False)
    cmap: ClusterMap = field(init=False)

    def __post_init__(self) -> None:
        self.layout = lay.Layout(self.root)

    @property
    def nbd_uri(self) -> str:
        return f"nbd://{self.net.address('gw')}:{NBD_PORT}"

    def configure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entries = [NodeEntry(i, f"r{i % self.racks}", self.net.address(f"n{i}"), NODE_PORT)
                   for i in range(1, self.nodes + 1)]
        metas = 3 if self.nodes >= 3 else 1
        cid = secrets.token_hex(16)
        self._write_meta_configs(metas, cid)
        admin = {str(i): f"{self.net.address(f'm{i}')}:{META_ADMIN_PORT}" for i in range(1, metas + 1)}
        self.cmap = ClusterMap(cid, entries, admin, replication=self.replication)
        lay.write_configs(self.layout, self.cmap, self.disk, self.net.address("gw"), NBD_PORT)
        for node in range(1, self.nodes + 1):
            # The scrub passes every few seconds (a scenario lasts about 30 s), at a rate a small volume
            # allows; small segments where a small file system must hold a node's engine and WAL.
            raft = f"scrub_pass_interval_s = {SCRUB_PASS_INTERVAL_S}\nscrub_bytes_per_s = {SCRUB_BYTES_PER_S}\n"
            engine = ""
            if node in self.small_disks:
                raft += "wal_segment_bytes_max = 4194304\n"
                engine = "\n[engine]\nsegment_size_bytes = 4194304\n"
            with open(self.layout.node_config(node), "a") as f:
                f.write(f"{engine}\n[raft]\n{raft}")
        for node in sorted(self.small_disks):
            img = self.disk_image(node)
            with open(img, "wb") as f:
                f.truncate(self.disk_image_mib << 20)
            _run(["mkfs.ext4", "-q", "-F", str(img)])
        self.cmap.save(self.layout.map_path)

    def _write_meta_configs(self, metas: int, cluster_id: str) -> None:
        """As raftblock.meta.node.write_local_configs, but each member on its own host."""
        d = self.root / "meta"
        d.mkdir(parents=True, exist_ok=True)
        secret = d / "cluster.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        members = "".join(
            f'\n[[members]]\nid = {i}\nraft = "{self.net.address(f"m{i}")}:{META_RAFT_PORT}"\n'
            f'admin = "{self.net.address(f"m{i}")}:{META_ADMIN_PORT}"\n' for i in range(1, metas + 1))
        for i in range(1, metas + 1):
            (d / f"meta-{i}.toml").write_text(f'node_id = {i}\ndata_dir = "meta-{i}"\nsecret_file = "cluster.secret"\n'
                                             f'cluster_id = "{cluster_id}"\n{members}')

    def disk_image(self, node_id: int) -> Path:
        return self.root / f"n{node_id}.ext4"

    # --- processes -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every process: metadata first, then storage nodes, then the gateway (start order)."""
        return [f"m{k}" for k in sorted(self.cmap.meta_admin, key=int)] + \
            [f"n{n.node_id}" for n in self.cmap.nodes] + ["gateway"]

    def config(self, name: str) -> Path:
        if name == "gateway":
            return self.layout.gateway_config
        if name.startswith("m"):
            return self.layout.meta_config(int(name[1:]))
        return self.layout.node_config(int(name[1:]))

    def argv(self, name: str) -> list[str]:
        cfg = str(self.config(name))
        if name.startswith("m"):
            cmd = [sys.executable, "-m", "raftblock.meta.node", "--config", cfg, "--log-format", "json"]
        else:
            kind = "gateway" if name == "gateway" else "node"
            cmd = [sys.executable, "-m", "raftblock.cli", kind, "--config", cfg, "--log-format", "json"]
        host = "gw" if name == "gateway" else name
        prefix = self.net.exec_prefix(host)
        if name.startswith("n") and int(name[1:]) in self.small_disks:
            data = self.layout.data_dir(int(name[1:]))
            data.mkdir(parents=True, exist_ok=True)
            prefix += ["unshare", "-m", "--propagation", "private", "sh", "-c",
                       f'mount -o loop "{self.disk_image(int(name[1:]))}" "{data}" && exec "$0" "$@"']
        return prefix + cmd

    def pid(self, name: str) -> int | None:
        return lay.running_pid(self.layout, name, self.config(name))

    def start(self, names: Iterable[str] | None = None) -> None:
        """Start the named processes that are not running (all by default), wait until each is READY."""
        wanted = list(self.names() if names is None else names)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in wanted:
            if name != "gateway" and self.pid(name) is None:
                procs[name] = lay.spawn(self.layout, name, self.argv(name))
        for name, proc in procs.items():
            lay.wait_ready(self.layout, name, proc)
        if "gateway" in wanted and self.pid("gateway") is None:
            gw = lay.spawn(self.layout, "gateway", self.argv("gateway"))
            lay.wait_ready(self.layout, "gateway", gw)

    def signal(self, name: str, sig: int) -> int | None:
        pid = self.pid(name)
        if pid is not None:
            os.kill(pid, sig)
        return pid

    def wait_dead(self, name: str, pid: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and not _zombie(pid):
            if time.monotonic() > deadline:
                raise NetnsError(f"{name} (pid {pid}) still alive {timeout_s:.0f} s after SIGKILL")
            time.sleep(lay.POLL_S)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def wait_healthy(self, timeout_s: float = cl.HEALTHY_TIMEOUT_S, groups: set[int] | None = None) -> None:
        """From the control host (the caller must be inside `net.entered()`). Also waits for the metadata
        group to have initialised the cluster id, which `cl.wait_healthy` does not (a `volume create`
        right after `cluster up` can otherwise be refused with "the cluster has no id yet")."""
        deadline = time.monotonic() + timeout_s
        cl.wait_healthy(self.layout, self.cmap, groups, timeout_s)
        while not cl.read_map(self.layout, self.cmap).cluster_id:
            if time.monotonic() > deadline:
                raise lay.ClusterError(f"metadata group without a cluster id after {timeout_s:.0f} s")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        return cl.cluster_status(self.root)

    def down(self) -> None:
        """SIGTERM with a deadline, then SIGKILL anything left (a paused process is continued first)."""
        for name in self.names():
            self.signal(name, signal.SIGCONT)
        try:
            cl.cluster_down(self.root)
        except Exception as e:  # noqa: BLE001 - the SIGKILL below is the backstop
            log.warning("netns.cluster_down_failed", error=str(e))
        for name in self.names():
            pid = self.signal(name, signal.SIGKILL)
            if pid is not None:
                self.wait_dead(name, pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
