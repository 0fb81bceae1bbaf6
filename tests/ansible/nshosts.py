# Hosts made of Linux namespaces, for the Ansible deployment test (tests/ansible/test_deploy.py).
#
# A host is a network namespace + a mount namespace + a UTS namespace, kept alive by a holder process
# (`sleep infinity`). Ansible reaches it through the `nsenter` connection plugin (connection_plugins/), which
# runs every command with `nsenter -t HOLDER -n -m -u`; the test itself reaches it over the network.
#
#   network   veth `eth0` in the host, its peer in a bridge of the root namespace; addresses 10.214.N.0/24
#             (N picked free per run), the bridge itself .254 (the controller and the test, e.g. qemu-io)
#   mounts    private copy-on-write views (overlayfs, upper layer in the run's directory) of /etc, /var,
#             /root and /usr/local, so useradd, unit files, configs and logs are the host's own; an empty
#             tmpfs /opt, /run (with /run/systemd/system: Ansible then sees systemd) and /tmp;
#             /var/lib/raftblock a plain directory of the run (the engine's data on the real file system);
#             docker-systemctl-replacement's systemctl3.py over /usr/bin/systemctl; this machine's pip
#             configuration removed (an air-gapped rack host has no package index)
#   hostname  the host's name
#
# Rules:
# 1. Names carry a per-run tag: netns `rbh<tag>-<host>`, bridge `rbh<tag>`, veths `rbh<tag>v<i>`; the run is
#    recorded in /run/rbhosts/<tag>.json with the test's pid, so `cleanup_stale()` removes the leftovers of a
#    run whose process is gone (a crashed or killed test), and two runs side by side never collide (the
#    subnet is picked under a lock among those no address of the root namespace or other run uses).
# 2. `destroy()` (idempotent, also after a failed create) kills every process of each host's netns (`ip netns
#    pids`: services, holders, commands), deletes the netns, the veths, the bridge and the run's directory.
# 3. The real /etc (and every other shared directory) is never written: every write lands in a host's
#    overlay upper layer or tmpfs.
# 4. No sleeps as synchronisation: the holder writes its pid once its mounts are made; waits have deadlines.
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY = Path("/run/rbhosts")
NETNS_DIR = Path("/run/netns")
OVERLAYS = ("/etc", "/var", "/root", "/usr/local")
# The machine's pip configuration points at local indexes: a rack host has none (it must install from the
# wheelhouse the playbook ships), so these go from the host's view of /etc and /root.
PIP_CONFIG = ("/etc/pip.conf", "/etc/xdg/pip", "/root/.pip", "/root/.config/pip")


class HostError(RuntimeError):
    pass


def _run(argv: list[str], check: bool = True, input_text: str | None = None,
         timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout_s)
    if check and r.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _netns_pids(ns: str) -> list[int]:
    r = _run(["ip", "netns", "pids", ns], check=False)
    return [int(t) for t in r.stdout.split() if t.isdigit()]


def _kill_netns(ns: str, keep: int | None = None, deadline_s: float = 10.0) -> list[int]:
    """SIGKILL every process in netns NS (but `keep`) until none is left; returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + deadline_s
    while True:
        pids = [p for p in _netns_pids(ns) if p != keep and _alive(p)]
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise HostError(f"processes of {ns} survive SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _systemctl_replacement() -> str:
    """docker-systemctl-replacement's systemctl3.py: the module itself (a standalone script; the `deploy` extra
    installs it into this interpreter's site-packages), not the console-script wrapper, which imports it."""
    import importlib.util

    spec = importlib.util.find_spec("systemctl2.systemctl3")
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise HostError("docker-systemctl-replacement (systemctl3.py) is not installed: pip install '.[deploy]'")
    return spec.origin


def _used_subnets() -> set[int]:
    """Third octets N of 10.214.N.0/24 that some address or route of the root namespace uses."""
    used = set()
    out = _run(["ip", "-4", "-o", "addr", "show"]).stdout + _run(["ip", "-4", "route", "show"]).stdout
    for tok in out.split():
        if tok.startswith("10.214."):
            parts = tok.split("/")[0].split(".")
            if len(parts) == 4 and parts[2].isdigit():
                used.add(int(parts[2]))
    if REGISTRY.exists():
        for f in REGISTRY.glob("*.json"):
            try:
                used.add(int(json.loads(f.read_text())["subnet"]))
            except (OSError, ValueError, KeyError):
                pass
    return used


def cleanup_stale() -> list[str]:
    """Destroy the runs recorded in /run/rbhosts whose test process is gone; returns their tags."""
    removed = []
    if not REGISTRY.exists():
        return removed
    for f in sorted(REGISTRY.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(rec.get("pid", 0))):
            continue
        run = Hosts(tag=rec["tag"], subnet=int(rec["subnet"]), base=Path(rec["base"]))
        run._netns_made = list(rec.get("netns", []))
        run._links_made = list(rec.get("links", []))
        run.destroy()
        removed.append(rec["tag"])
    return removed


@dataclass
class Host:
    name: str
    address: str
    netns: str
    root: Path  # this host's directory in the run's base (overlay layers, data, holder log)
    holder: int = 0  # pid of the process holding its mount and UTS namespaces

    @property
    def data_dir(self) -> Path:
        """What the host sees as /var/lib/raftblock."""
        return self.root / "data"

    def alive(self) -> bool:
        return self.holder > 0 and _alive(self.holder)


@dataclass
class Hosts:
    """The hosts of one run: `Hosts.create(["m1", "s1", ...])`, then `destroy()` (or use it as a context manager)."""

    tag: str = ""
    subnet: int = 0
    base: Path = Path()
    hosts: dict[str, Host] = field(default_factory=dict)
    _netns_made: list[str] = field(default_factory=list)
    _links_made: list[str] = field(default_factory=list)

    # -- creation ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, names: list[str], base_dir: Path | None = None) -> Hosts:
        if os.geteuid() != 0:
            raise HostError("namespace hosts need root")
        cleanup_stale()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        systemctl = _systemctl_replacement()
        tag = secrets.token_hex(3)
        with open(REGISTRY / ".lock", "w") as lk:  # two runs must not pick the same subnet
            fcntl.flock(lk, fcntl.LOCK_EX)
            free = [n for n in range(1, 254) if n not in _used_subnets()]
            if not free:
                raise HostError("no free 10.214.N.0/24 subnet")
            subnet = free[secrets.randbelow(len(free))]
            base = Path(tempfile.mkdtemp(prefix=f"rbh{tag}-", dir=base_dir))
            run = cls(tag=tag, subnet=subnet, base=base)
            run._record()
        # Its shebang names the interpreter of the venv it was installed in, which a host may not see (a
        # checkout under /tmp: the hosts' /tmp is their own): a copy run by the system's python3 instead.
        own = base / "systemctl3.py"
        text = Path(systemctl).read_text()
        own.write_text("#!/usr/bin/python3\n" + (text.split("\n", 1)[1] if text.startswith("#!") else text))
        own.chmod(0o755)
        systemctl = str(own)
        try:
            run._build(names, systemctl)
        except BaseException:
            run.destroy()
            raise
        return run

    def _record(self) -> None:
        rec = {"tag": self.tag, "pid": os.getpid(), "subnet": self.subnet, "base": str(self.base),
               "netns": self._netns_made, "links": self._links_made}
        tmp = REGISTRY / f".{self.tag}.tmp"
        tmp.write_text(json.dumps(rec))
        tmp.replace(REGISTRY / f"{self.tag}.json")

    @property
    def bridge(self) -> str:
        return f"rbh{self.tag}"

    @property
    def gateway_address(self) -> str:
        """The root namespace's address on the bridge (the controller, the test's NBD clients)."""
        return f"10.214.{self.subnet}.254"

    def _build(self, names: list[str], systemctl: str) -> None:
        br = self.bridge
        self._links_made.append(br)
        self._record()
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway_address}/24", "dev", br])
        _run(["ip", "link", "set", br, "up"])
        self._add_hosts(names, systemctl)

    def add(self, names: list[str]) -> list[Host]:
        """More hosts in the same run (a server racked later: add-node.yml); `destroy()` removes them too."""
        return self._add_hosts(names, str(self.base / "systemctl3.py"))  # the copy create() made

    def _add_hosts(self, names: list[str], systemctl: str) -> list[Host]:
        made = []
        for name in names:
            if name in self.hosts:
                raise HostError(f"host {name} exists")
            i = len(self.hosts) + 1
            if i > 250:
                raise HostError("at most 250 hosts per run")
            ns, veth = f"rbh{self.tag}-{name}", f"rbh{self.tag}v{i}"
            host = Host(name, f"10.214.{self.subnet}.{i}", ns, self.base / name)
            self.hosts[name] = host
            self._netns_made.append(ns)
            self._links_made.append(veth)
            self._record()
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._start_holder(host, systemctl)
            made.append(host)
        for host in made:
            self._wait_holder(host)
        return made

    def _start_holder(self, host: Host, systemctl: str) -> None:
        host.root.mkdir(parents=True)
        (host.data_dir).mkdir()
        lines = ["set -eu"]
        for d in OVERLAYS:
            key = d.strip("/").replace("/", "_")
            upper, work = host.root / f"{key}.upper", host.root / f"{key}.work"
            upper.mkdir()
            work.mkdir()
            lines.append(f"mount -t overlay overlay -o lowerdir={d},upperdir={upper},workdir={work} {d}")
        lines += [
            f"rm -rf {' '.join(PIP_CONFIG)}",
            f"mkdir -p /var/lib/raftblock && mount --bind {host.data_dir} /var/lib/raftblock",
            "mount -t tmpfs -o mode=0755 tmpfs /opt",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/systemd/system /run/lock /run/user && chmod 1777 /run/lock",
            f"mount --bind {systemctl} /usr/bin/systemctl",
            f"hostname {host.name}",
            f"echo {host.name} > /etc/hostname",
            f"printf '127.0.1.1\\t{host.name}\\n{host.address}\\t{host.name}\\n' >> /etc/hosts",
            f"echo $$ > {host.root}/holder.pid",  # before /tmp is hidden (the run's base may be under /tmp)
            "mount -t tmpfs -o mode=1777 tmpfs /tmp",
            "cd /",
            "exec sleep infinity",
        ]
        script = host.root / "holder.sh"
        script.write_text("\n".join(lines) + "\n")
        with open(host.root / "holder.log", "wb") as log:
            subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation",
                              "private", "sh", str(script)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)

    def _wait_holder(self, host: Host, timeout_s: float = 30.0) -> None:
        pidfile = host.root / "holder.pid"
        deadline = time.monotonic() + timeout_s
        while True:
            if pidfile.exists() and pidfile.read_text().strip().isdigit():
                pid = int(pidfile.read_text())
                # the pid is the shell's, which execs `sleep`: wait until it did (its /tmp is then private)
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                        host.holder = pid
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                log = (host.root / "holder.log").read_text(errors="replace")
                raise HostError(f"host {host.name}: holder did not start within {timeout_s}s:\n{log}")
            time.sleep(0.02)

    # -- use ---------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def nsenter(self, name: str) -> list[str]:
        """argv prefix running a command inside host NAME (network, mounts, hostname)."""
        return ["nsenter", f"--target={self.hosts[name].holder}", "--net", "--mount", "--uts", "--wd=/"]

    def run(self, name: str, argv: list[str], check: bool = True, timeout_s: float = 60,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run([*self.nsenter(name), *argv], check=check, timeout_s=timeout_s, input_text=input_text)

    def pids(self, name: str) -> list[int]:
        """Every process of host NAME but its holder."""
        h = self.hosts[name]
        return [p for p in _netns_pids(h.netns) if p != h.holder and _alive(p)]

    def power_cut(self, name: str) -> list[int]:
        """kill -9 every process of host NAME (its services, whatever runs there); the host itself (its
        namespaces and files) stays, as a machine whose power went and came back would keep its disks."""
        h = self.hosts[name]
        return _kill_netns(h.netns, keep=h.holder)

    # -- teardown ----------------------------------------------------------------------------------------
    def destroy(self) -> None:
        errors = []
        for ns in list(self._netns_made):
            try:
                if (NETNS_DIR / ns).exists():
                    _kill_netns(ns)
                    _run(["ip", "netns", "del", ns], check=False)
            except (HostError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        for link in reversed(self._links_made):
            if Path(f"/sys/class/net/{link}").exists():
                _run(["ip", "link", "del", link], check=False)
        if self.base != Path() and self.base.exists():
            # overlay upper layers hold files of other owners and modes: remove as root, ignoring nothing else
            shutil.rmtree(self.base, ignore_errors=True)
        if self.tag:
            (REGISTRY / f"{self.tag}.json").unlink(missing_ok=True)
        self._netns_made.clear()
        self._links_made.clear()
        for h in self.hosts.values():
            h.holder = 0
        if errors:
            raise HostError("; ".join(errors))
