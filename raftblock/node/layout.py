"""A local cluster's directory and processes (`raftblock cluster ...`, node/cluster.py): the layout of
DIR, the configs written into it, finding a process by the lock it holds (node/dirlock.py), starting one
detached and waiting for its READY line, stopping one (SIGTERM, deadline, SIGKILL).

Rules (node/cluster.py rules 2 and 3 are carried out here):
1. A process is found by the lock it holds on its data directory (the gateway: on its admin socket), read
   from /proc/locks; a pid file is only the fallback for a directory this process cannot see, checked
   against the process's command line by inode. Never by name.
2. A started process is detached (its own session, its log in DIR/logs/NAME.log); `wait_ready` returns its
   READY line or raises ClusterError with the last lines of its log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftblock.meta.node import write_local_configs
from raftblock.node.clustermap import ClusterMap, NodeEntry
from raftblock.node.dirlock import LOCK_NAME, file_lock_holder

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05


class ClusterError(Exception):
    """Something the operator must fix; printed as one line."""


@dataclass
class Layout:
    root: Path
    # A deployed cluster, reached through its cluster file (cluster.toml: metadata addresses, secret): no
    # local processes, configs or sockets; the storage nodes come from the metadata map (cluster.py _load).
    cluster_file: Path | None = None

    @property
    def remote(self) -> bool:
        return self.cluster_file is not None

    def cluster_doc(self) -> dict[str, Any]:
        assert self.cluster_file is not None
        try:
            doc = tomllib.loads(self.cluster_file.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster file {self.cluster_file}") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ClusterError(f"cluster file {self.cluster_file}: {e}") from None
        if not isinstance(doc.get("meta"), dict) or not isinstance(doc["meta"].get("admin"), dict) \
                or not doc["meta"]["admin"]:
            raise ClusterError(f"cluster file {self.cluster_file}: no [meta] admin = {{ 1 = \"HOST:PORT\", ... }}")
        if not isinstance(doc.get("secret_file"), str):
            raise ClusterError(f"cluster file {self.cluster_file}: no secret_file")
        return doc

    @property
    def map_path(self) -> Path:
        return self.root / "cluster.json"

    def node_config(self, node_id: int) -> Path:
        return self.root / "nodes" / f"n{node_id}.toml"

    def meta_config(self, meta_id: int) -> Path:
        return self.root / "meta" / f"meta-{meta_id}.toml"

    @property
    def secret_file(self) -> Path:
        if self.cluster_file is not None:
            return self.cluster_file.parent / str(self.cluster_doc()["secret_file"])
        return self.root / "meta" / "cluster.secret"

    @property
    def gateway_config(self) -> Path:
        return self.root / "nodes" / "gateway.toml"

    def data_dir(self, node_id: int) -> Path:
        return self.root / f"n{node_id}"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def admin_socket(self) -> Path:
        return self.run / "gateway.sock"

    def node_admin_socket(self, node_id: int) -> Path:
        """The admin socket of the gateway inside node `node_id`."""
        return self.run / f"n{node_id}-gateway.sock"

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def readyfile(self, name: str) -> Path:
        return self.run / f"{name}.ready"


def open_layout(target: Path) -> Layout:
    """What a command's --cluster / --dir names: a local cluster's directory, or a cluster file. The cluster
    file of a local cluster (DIR/cluster.toml) is that directory (its processes can be seen and started).
    Its `[tls]` (the operators' certificate) becomes this process's TLS identity (raftblock/tls.py)."""
    if target.suffix == ".toml" or target.is_file():
        if (target.parent / "cluster.json").exists():
            layout = Layout(target.parent)
        else:
            layout = Layout(target.parent, cluster_file=target)
    else:
        layout = Layout(target)
    set_cli_identity(layout)
    return layout


def set_cli_identity(layout: Layout) -> None:
    from raftblock import tls

    path = layout.cluster_file or layout.root / "cluster.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return
    try:
        tls.set_identity(tls.TlsConfig.from_table(doc.get("tls"), base=path.parent))
    except ValueError as e:
        raise ClusterError(f"{path}: {e}") from None


def local_layout(target: Path, what: str) -> Layout:
    """`what` starts or stops processes of this machine: refused on a deployed cluster's file."""
    layout = open_layout(target)
    if layout.remote:
        raise ClusterError(f"{what} works on a local cluster (--dir); {layout.cluster_file} names a deployed "
                           f"cluster, whose processes systemd runs (ansible/README.md)")
    return layout


# --- processes -----------------------------------------------------------------------------------
def lock_path(layout: Layout, name: str) -> Path:
    """The lock the process `name` holds while it runs (node/dirlock.py): its data directory's, or the
    gateway's admin socket's."""
    if name == "gateway":
        return Path(f"{layout.admin_socket}.lock")
    if name.startswith("m"):
        return layout.root / "meta" / f"meta-{int(name[1:])}" / LOCK_NAME
    return layout.data_dir(int(name[1:])) / LOCK_NAME


def running_pid(layout: Layout, name: str, config: Path) -> int | None:
    """The live process `name` of this cluster, whatever path spelling named the directory: the holder of
    its lock (the kernel's table), else (a data directory on a mount this process cannot see: the fault
    campaign's small disks) the pid file's process, if its command line names `config` (the same file,
    compared by inode relative to that process's working directory)."""
    if layout.remote:
        return None  # a deployed cluster's processes run on other machines
    pid = file_lock_holder(lock_path(layout, name))
    if pid is not None:
        return pid
    try:
        pid = int(layout.pidfile(name).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
        want = os.stat(config)
    except (OSError, ValueError):
        return None
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return None
    for arg in cmdline:
        if not arg:
            continue
        try:
            st = os.stat(os.path.join(f"/proc/{pid}/cwd", os.fsdecode(arg)))
        except (OSError, ValueError):
            continue
        if (st.st_ino, st.st_dev) == (want.st_ino, want.st_dev):
            return pid
    return None


def spawn(layout: Layout, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    layout.run.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    ready = layout.readyfile(name)
    ready.unlink(missing_ok=True)
    with open(ready, "wb") as out, open(layout.logs / f"{name}.log", "ab") as err:
        offset = err.tell()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log_offset = offset  # type: ignore[attr-defined]  # where this run's log starts (_why)
    layout.pidfile(name).write_text(str(proc.pid))
    return proc


def wait_ready(layout: Layout, name: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    ready = layout.readyfile(name)
    while time.monotonic() < deadline:
        text = ready.read_text() if ready.exists() else ""
        if text.startswith("READY"):
            return text.split()[1]
        if proc.poll() is not None:
            log_path = layout.logs / f"{name}.log"
            raise ClusterError(f"{name} exited with {proc.returncode}: "
                               f"{why_failed(log_path, getattr(proc, 'log_offset', 0))} (log: {log_path})")
        time.sleep(POLL_S)
    raise ClusterError(f"{name} not ready within {START_TIMEOUT_S:.0f} s (see {layout.logs / (name + '.log')})")


def why_failed(log_path: Path, offset: int) -> str:
    """What a process that died at start said last, in one line: its own one-line error (the CLI's rule),
    the last line of a traceback, or its last error/warning log event's fields."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "no log"
    events: list[dict[str, Any]] = []
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            return line  # not a log event: the process's own last word
        if isinstance(ev, dict) and ev.get("level") in ("error", "critical", "warning"):
            events.append(ev)
    if events:
        ev = events[0]
        exc = str(ev.get("exception") or "").strip().splitlines()
        detail = ev.get("error") or (exc[-1] if exc else "")
        return f"{ev.get('event')}: {detail}" if detail else str(ev.get("event"))
    return lines[-1] if lines else "no output"


def stop_process(layout: Layout, name: str, config: Path) -> bool:
    pid = running_pid(layout, name, config)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running_pid(layout, name, config) == pid and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if running_pid(layout, name, config) == pid:
        os.kill(pid, signal.SIGKILL)
        while running_pid(layout, name, config) == pid:
            time.sleep(POLL_S)
    layout.pidfile(name).unlink(missing_ok=True)
    return True


# --- configuration -------------------------------------------------------------------------------
_PORTS_GIVEN: set[int] = set()  # ports this process handed out (a layout asks for a dozen at once)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str) -> int:
    """A TCP port free now, below the kernel's ephemeral range. Outgoing connections take their source ports
    from that range: a cluster port there can be taken by any connect() on the machine while the cluster is
    stopped (and kept up to a minute in TIME_WAIT), and the next `cluster up` fails with EADDRINUSE (seen in
    the tests that stop and restart a cluster). Falls back to the kernel's pick if none is found."""
    lo = _ephemeral_low()
    start = 10000 if lo > 12000 else 1024
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(start, lo)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def meta_section(layout: Layout, cmap: ClusterMap) -> str:
    admin = ", ".join(f"{k} = {toml_str(v)}" for k, v in sorted(cmap.meta_admin.items()))
    return f"[meta]\nadmin = {{ {admin} }}\nsecret_file = {toml_str(str(layout.secret_file.resolve()))}\n"


def tls_section(layout: Layout, base: str) -> str:
    """`[tls]` of a process whose certificate is DIR/tls/BASE-cert.pem (`cluster up --tls`, raftblock/tls.py)."""
    d = (layout.root / "tls").resolve()
    return (f"\n[tls]   # raftblock/tls.py: NBD needs STARTTLS and a host certificate of this CA\n"
            f"ca = {toml_str(str(d / 'ca-cert.pem'))}\ncert = {toml_str(str(d / f'{base}-cert.pem'))}\n"
            f"key = {toml_str(str(d / f'{base}-key.pem'))}\n")


def make_lab_certs(layout: Layout, cmap: ClusterMap) -> None:
    """`cluster up --tls`: a CA and the certificates of a local cluster in DIR/tls (existing ones kept), and an
    NBD client directory for this machine's hosts (DIR/tls/hosts/local: what qemu's tls-creds-x509 and libnbd's
    tls-certificates read)."""
    from raftblock import tls

    d = layout.root / "tls"
    tls.init_ca(d, cmap.cluster_id)
    hosts = sorted({n.host for n in cmap.nodes})
    for n in cmap.nodes:
        if not (d / f"node-{n.node_id}-cert.pem").exists():
            tls.issue(d, d, tls.node_name(n.node_id), ["localhost"], [n.host])
    if not (d / "gateway-gw1-cert.pem").exists():
        tls.issue(d, d, tls.gateway_name("gw1"), ["localhost"], hosts)
    if not (d / "admin-cert.pem").exists():
        tls.issue(d, d, tls.ADMIN_NAME, [])
    if not (d / "hosts" / "local" / "client-cert.pem").exists():
        tls.nbd_client_dir(d / "hosts" / "local", d, "local")
    for mid in sorted(int(k) for k in cmap.meta_admin):
        if not (d / f"meta-{mid}-cert.pem").exists():
            tls.issue(d, d, tls.meta_name(mid), ["localhost"], hosts)
        cfg = layout.meta_config(mid)
        if cfg.exists() and "[tls]" not in cfg.read_text():
            with cfg.open("a") as f:
                f.write(tls_section(layout, f"meta-{mid}"))


def write_node_configs(layout: Layout, cmap: ClusterMap, disk: str) -> None:
    """Every storage node's config (`raftblock node --config`): its place, data dir, all peers and, with
    gateways inside the nodes, its [gateway] table (NBD port from the layout)."""
    (layout.root / "nodes").mkdir(parents=True, exist_ok=True)
    peers = "\n".join(f'{n.node_id} = {toml_str(f"{n.host}:{n.port}")}' for n in cmap.nodes)
    meta = meta_section(layout, cmap)
    for n in cmap.nodes:
        text = (
            f"# raftblock node {n.node_id} (rack {n.rack}); written by `raftblock cluster up`\n"
            f"node_id = {n.node_id}\n"
            f"rack = {toml_str(n.rack)}\n"
            f"data_dir = {toml_str(str(layout.data_dir(n.node_id).resolve()))}\n"
            f'listen = {toml_str(f"{n.host}:{n.port}")}\n'
            + (f'http = {toml_str(f"{n.host}:{n.http_port}")}   # Prometheus /metrics\n' if n.http_port else "")
            + f"disk = {toml_str(disk)}\n\n[peers]\n{peers}\n\n{meta}"
        )
        if cmap.gateway == "embedded" and n.nbd_port:
            text += (
                f"\n[gateway]   # this node serves NBD (leader affinity for the volumes attached here)\n"
                f'gateway_id = "n{n.node_id}"\n'
                f"bind = {toml_str(n.host)}\nport = {n.nbd_port}\n"
                + (f'iscsi = {toml_str(f"{n.host}:{n.iscsi_port}")}\n' if n.iscsi_port else "")
                + f"admin_socket = {toml_str(str(layout.node_admin_socket(n.node_id).resolve()))}\n"
                "deadline_s = 10.0\n"
            )
        if cmap.tls:
            text += tls_section(layout, f"node-{n.node_id}")
        layout.node_config(n.node_id).write_text(text)


def write_configs(layout: Layout, cmap: ClusterMap, disk: str, nbd_bind: str, nbd_port: int) -> None:
    """The node configs, and the config of a separate gateway (started only with gateway = "separate"; with
    gateways inside the nodes it is the template for a dedicated gateway machine)."""
    write_node_configs(layout, cmap, disk)
    meta = meta_section(layout, cmap)
    port = nbd_port if cmap.gateway == "separate" else 0  # the nodes serve the cluster's port
    layout.gateway_config.write_text(
        "# raftblock gateway; written by `raftblock cluster up`\n"
        'gateway_id = "gw1"\n'
        f"bind = {toml_str(nbd_bind)}\nport = {port}\n"
        f"admin_socket = {toml_str(str(layout.admin_socket.resolve()))}\n"
        + (f'http = {toml_str(f"{nbd_bind}:{cmap.gateway_http}")}   # Prometheus /metrics\n'
           if cmap.gateway_http else "")
        + (f'iscsi = {toml_str(f"{nbd_bind}:{cmap.gateway_iscsi}")}\n'
           if cmap.gateway == "separate" and cmap.gateway_iscsi else "")
        + "deadline_s = 10.0\n\n"
        f"{meta}"
        + (tls_section(layout, "gateway-gw1") if cmap.tls else "")
    )
    write_cluster_file(layout, cmap)


def write_cluster_file(layout: Layout, cmap: ClusterMap) -> None:
    """DIR/cluster.toml: how a `raftblock` command reaches this cluster (`--cluster FILE`), the same file a
    deployed host gets at /etc/raftblock/cluster.toml (ansible/roles/common)."""
    admin = ", ".join(f"{k} = {toml_str(v)}" for k, v in sorted(cmap.meta_admin.items()))
    http = ", ".join(f"{k} = {toml_str(v)}" for k, v in sorted(cmap.meta_http.items()))
    text = (f"# How `raftblock` commands reach this cluster (--cluster FILE); written by `raftblock cluster up`\n"
            f"cluster_id = {toml_str(cmap.cluster_id)}\n"
            f"secret_file = {toml_str(os.path.relpath(layout.secret_file, layout.root))}   # relative to this file\n"
            f"replication = {toml_str(cmap.replication)}   # the default of `volume create`\n\n"
            f"[meta]\nadmin = {{ {admin} }}\n" + (f"http = {{ {http} }}\n" if http else "")
            + ("\n[tls]   # the operators' certificate (raftblock/tls.py): every link of this cluster is TLS\n"
               'ca = "tls/ca-cert.pem"\ncert = "tls/admin-cert.pem"\nkey = "tls/admin-key.pem"\n' if cmap.tls else ""))
    path = layout.root / "cluster.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def create_layout(layout: Layout, nodes: int, racks: int, port_base: int | None, host: str,
                  gateway: str = "separate", nbd_port: int = 0, iscsi_port: int = 0) -> ClusterMap:
    """`gateway` "embedded": node 1 serves NBD on `nbd_port` and iSCSI on `iscsi_port`, node i > 1 on P+300+i
    and P+700+i (`port_base`) or free ports; "separate": the gateway serves iSCSI on `iscsi_port`. 0: no iSCSI."""
    if nodes < 1 or racks < 1:
        raise ClusterError("--nodes and --racks must be at least 1")
    entries = []
    for i in range(1, nodes + 1):
        port = port_base + i if port_base else free_port(host)
        entries.append(NodeEntry(i, f"r{i % racks}", host, port))
        if gateway == "embedded":
            entries[-1].nbd_port = nbd_port if i == 1 else port_base + 300 + i if port_base else free_port(host)
            if iscsi_port:
                entries[-1].iscsi_port = (iscsi_port if i == 1 else port_base + 700 + i if port_base
                                          else free_port(host))
    metas = 3 if nodes >= 3 else 1
    raft_ports = [port_base + 100 + i if port_base else free_port(host) for i in range(1, metas + 1)]
    admin_ports = [port_base + 200 + i if port_base else free_port(host) for i in range(1, metas + 1)]
    http_ports = [port_base + 500 + i if port_base else free_port(host) for i in range(1, metas + 1)]
    for n in entries:
        n.http_port = port_base + 400 + n.node_id if port_base else free_port(host)
    cid = secrets.token_hex(16)
    write_local_configs(layout.root / "meta", raft_ports, admin_ports, cluster_id=cid, host=host, http_ports=http_ports)
    admin = {str(i): f"{host}:{p}" for i, p in enumerate(admin_ports, start=1)}
    return ClusterMap(cid, entries, admin, gateway=gateway,
                      meta_http={str(i): f"{host}:{p}" for i, p in enumerate(http_ports, start=1)},
                      gateway_http=port_base + 600 if port_base else free_port(host),
                      gateway_iscsi=iscsi_port if gateway == "separate" else 0)
