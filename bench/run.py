"""raftblock bench: fio (nbd engine) against the raftblock cluster (over NBD and over iSCSI), `raftblock serve`,
`qemu-nbd` (cache=none and writeback), tgt (iSCSI), and etcd's 4 KiB puts, same jobs, same disk, same rounds.

Owns: starting every target, pre-filling them, running every job on every target in interleaved order for
several rounds, recording the machine's load and steal time per run and the CPU each process spent per I/O,
reporting medians against the baseline (qemu-nbd, cache=none) of the same round, and judging issue 16's goals.
The cluster runs in both layouts: `cluster` (NBD served by the storage nodes; the volume's groups led by the
node it is attached through) and `cluster-gw` (a separate gateway process); `cluster-iscsi` is a third instance
whose volume is reached over iSCSI (node 1's embedded gateway), next to `tgt` (tgtd serving a raw file, O_DIRECT).
fio has no iSCSI engine here, so both iSCSI targets are reached the same way: a qemu-nbd bridge (libiscsi
initiator) turns the iSCSI LUN into an NBD export on a unix socket; the bridge counts as one of the target's
processes (CPU, memory), so their rows carry one more hop and process than the NBD rows.

Rules:
1. One job file (bench/jobs/block.fio) for every fio target; only the URI differs.
2. Targets alternate inside every round (order reversed every other round), so drift in a shared machine's
   load hits all of them; load average and steal are recorded for each run, so a noisy run can be spotted.
3. Read jobs only read data that was written first (`prefill`), on every fio target.
4. A ratio is computed per round (a target's run against the baseline's run of the same round), then its
   median and min-max over rounds are reported.
5. CPU is read from /proc/PID/stat (utime+stime: every thread of the process) over a window inside the
   measured part of each run, for every process of the target and for the load generator.
6. Memory is read from /proc/PID/status (RssAnon) at the same window edges, for every process of every
   target; the report gives each target's largest total and its largest process over the whole bench.
7. Disk writes are read from the work directory's block device (/sys/dev/block/M:m/stat, sectors written) at
   the same window edges: for every write job, the bytes that reached the device per byte the client wrote,
   divided by the target's storage processes (a cluster's nodes share the device). Not /proc/PID/io
   write_bytes: with large folios (kernel 6.x) it counts a whole folio for every small write into it.
8. Nothing here asserts performance; it measures and reports (bench/results/*.json and *.png).
9. tgt runs only as its own tgtd (foreground, its own control port and portal), which is always stopped, and
   is left out of the default targets (with a note) when tgtd is not installed.

Usage: python bench/run.py [--quick] [--rounds N] [--runtime S] [--size 256M] [--jobs a,b] [--targets cluster,qemu-nbd]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB_FILE = HERE / "jobs" / "block.fio"
RESULTS = HERE / "results"
EXPORT = "bench"
VOLUME_BYTES = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

JOBS = [
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randread-4k-qd1",
    "randread-4k-qd32",
    "write-1m-qd4",
    "read-1m-qd4",
    "randwrite-4k-qd1-fsync",
    "randwrite-4k-qd32-fsync",
    "write-1m-qd4-fsync",
]
# etcd runs only these two jobs, as 4 KiB puts from 1 and 32 concurrent clients
ETCD_CLIENTS = {"randwrite-4k-qd1": 1, "randwrite-4k-qd32": 32}
TARGETS = ["cluster", "cluster-encrypted", "cluster-gw", "cluster-iscsi", "raftblock", "qemu-nbd", "qemu-nbd-wb", "tgt",
           "etcd"]
ISCSI_TARGETS = ["cluster-iscsi", "tgt"]  # reached through IscsiBridge (qemu-nbd as the iSCSI initiator)
BASELINE = "qemu-nbd"  # every ratio in the table is against this target's run of the same job and round
GOAL_TARGET = "cluster"

sys.path.insert(0, str(REPO))  # `python bench/run.py` from a checkout without the package installed
sys.path.insert(0, str(HERE))  # etcd_baseline


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


# -- machine load and process CPU --------------------------------------------------------------------------

def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@dataclass
class Machine:
    load_before: float
    load_after: float
    steal_pct: float
    busy_pct: float


class LoadProbe:
    def __enter__(self) -> LoadProbe:
        self.load0 = loadavg()
        self.cpu0 = cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu1 = cpu_times()
        delta = [b - a for a, b in zip(self.cpu0, cpu1, strict=False)]
        total = sum(delta[:8]) or 1  # user nice system idle iowait irq softirq steal (guest is inside user)
        idle = delta[3] + delta[4]
        self.machine = Machine(self.load0, loadavg(), 100.0 * delta[7] / total, 100.0 * (total - idle) / total)


def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of the whole process (all its threads), seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def proc_rss_anon(pid: int) -> int:
    """Anonymous resident bytes of a process (RssAnon); 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


DEVICE_STAT: Path | None = None  # /sys/dev/block/MAJ:MIN/stat of the work directory's device (rule 7)


def device_of(path: Path) -> Path | None:
    """The block device statistics file of the file system holding `path` (None: not a block device)."""
    st = os.stat(path)
    p = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    return p if p.exists() else None


def device_written_bytes() -> int | None:
    """Bytes written to the work directory's device so far (sectors written, field 7 of the stat file: what
    reached the device, file system journal included); None when unknown."""
    if DEVICE_STAT is None:
        return None
    try:
        return int(DEVICE_STAT.read_text().split()[6]) * 512
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class CpuSample:
    at: float
    procs: dict[str, float | None]  # "target/role" -> cpu seconds
    loadgen: float | None
    rss: dict[str, int] = field(default_factory=dict)  # "target/role" -> RssAnon bytes (rule 6)
    device_written: int | None = None  # bytes written to the work directory's device so far (rule 7)


def cpu_sample(pids: dict[str, int], loadgen_pid: int | None) -> CpuSample:
    return CpuSample(time.monotonic(), {k: proc_cpu_s(p) for k, p in pids.items()},
                     self_cpu_s() if loadgen_pid is None else proc_cpu_s(loadgen_pid),
                     {k: proc_rss_anon(p) for k, p in pids.items()}, device_written_bytes())


def disk_bytes_per_client_byte(a: CpuSample, b: CpuSample, target: str, client_bytes: float) -> float | None:
    """Rule 7: bytes written to the device per byte the client wrote, per storage process of the target (the
    nodes n1..nN of a cluster share the device; a single-copy target is one)."""
    if a.device_written is None or b.device_written is None or client_bytes <= 0:
        return None
    roles = [k.split("/", 1)[1] for k in b.procs if k.split("/", 1)[0] == target]
    storage = [r for r in roles if re.fullmatch(r"n\d+", r)] or [None]
    return (b.device_written - a.device_written) / len(storage) / client_bytes


@dataclass
class Cpu:
    """CPU over a window inside one run's measured part: µs per I/O and % of one core."""

    window_s: float
    target_us_per_io: float  # every process of the measured target together
    loadgen_us_per_io: float  # fio, or the etcd client (this process)
    target_pct: float
    loadgen_pct: float
    by_process_us_per_io: dict[str, float]
    idle_others_pct: float  # the other targets, idle while this one runs
    idle_by_target_pct: dict[str, float] = field(default_factory=dict)
    rss_by_process: dict[str, int] = field(default_factory=dict)  # RssAnon at the window's end (rule 6)


def cpu_between(a: CpuSample, b: CpuSample, target: str, iops: float) -> Cpu | None:
    wall = b.at - a.at
    if wall <= 0 or iops <= 0 or a.loadgen is None or b.loadgen is None:
        return None
    mine: dict[str, float] = {}
    others: dict[str, float] = defaultdict(float)
    for k, v0 in a.procs.items():
        v1 = b.procs.get(k)
        if v0 is None or v1 is None:
            continue
        tname, role = k.split("/", 1)
        if tname == target:
            mine[role] = v1 - v0
        else:
            others[tname] += v1 - v0
    ios = iops * wall
    tgt = sum(mine.values())
    lg = b.loadgen - a.loadgen
    rss = {k.split("/", 1)[1]: max(a.rss.get(k, 0), v) for k, v in b.rss.items() if k.split("/", 1)[0] == target}
    return Cpu(wall, 1e6 * tgt / ios, 1e6 * lg / ios, 100 * tgt / wall, 100 * lg / wall,
               {r: 1e6 * v / ios for r, v in sorted(mine.items())}, 100 * sum(others.values()) / wall,
               {t: 100 * v / wall for t, v in sorted(others.items())}, dict(sorted(rss.items())))


def disk_text(runs: list[Any]) -> str:
    """Rule 7: per target and write job, the median bytes written to disk per client byte, per storage process."""
    lines = ["Disk writes (rule 7): bytes that reached the device per byte the client wrote, per storage process, "
             "median over rounds (device sectors written: WAL, engine, checkpoints, file system journal; other "
             "targets idle meanwhile)"]
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in runs:
        v = r.extra.get("disk_bytes_per_client_byte")
        if v is not None:
            by[(r.target, r.job)].append(v)
    for (t, job), vs in sorted(by.items()):
        lines.append(f"  {t:<13} {job:<24} {med(vs):>5.2f}  [{min(vs):.2f}-{max(vs):.2f}]")
    return "\n".join(lines)


def memory_text(runs: list[Any]) -> str:
    """Rule 6: per target, its processes' largest RssAnon total over every measured run, and its largest
    process (after which job)."""
    lines = ["Memory (RssAnon, rule 6): per target, the largest total of its processes over every run, and its "
             "largest process"]
    tot: dict[str, tuple[int, str]] = {}
    big: dict[str, tuple[int, str, str]] = {}
    for r in runs:
        if r.cpu is None or not r.cpu.rss_by_process:
            continue
        t = sum(r.cpu.rss_by_process.values())
        if t > tot.get(r.target, (-1, ""))[0]:
            tot[r.target] = (t, r.job)
        role, v = max(r.cpu.rss_by_process.items(), key=lambda kv: kv[1])
        if v > big.get(r.target, (-1, "", ""))[0]:
            big[r.target] = (v, role, r.job)
    for t, (v, job) in tot.items():
        bv, role, bjob = big[t]
        lines.append(f"  {t:<13} total {v >> 20:>6} MiB (after {job}); largest process {role} {bv >> 20} MiB "
                     f"(after {bjob})")
    return "\n".join(lines)


# -- targets -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port} after {timeout_s}s") from None
            time.sleep(0.05)  # polling interval


class Target:
    name = ""
    fio = True  # measured with fio over NBD (etcd is not)

    def start(self, work: Path) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def supports(self, job: str) -> bool:
        return True

    def describe(self) -> str:
        return self.name


class RaftblockTarget(Target):
    name = "raftblock"

    def start(self, work: Path) -> str:
        from raftblock.testing.serve import ServeProcess

        self.sp = ServeProcess(work / "raftblock", [f"{EXPORT}:{VOLUME_BYTES}"], disk="os",
                               log_path=work / "raftblock.log")
        self.sp.start(timeout_s=60)
        return self.sp.uri(EXPORT)

    def stop(self) -> None:
        rc = self.sp.stop()
        if rc != 0:
            print(f"warning: raftblock serve exited {rc}; log tail:\n{self.sp.log_tail()}", file=sys.stderr)

    def pids(self) -> dict[str, int]:
        return {"serve": self.sp.pid}

    def describe(self) -> str:
        return "raftblock serve --disk os (one copy, fsync before every reply)"


class ClusterTarget(Target):
    """The 3-node, 3-rack Raft cluster as `make demo` starts it (free ports), one volume, attached through the
    gateway inside node 1 (which becomes its groups' leader: leader affinity)."""

    name = "cluster"
    gateway = "embedded"
    iscsi_port: int | None = None  # cluster_up's default
    encrypt = False

    def start(self, work: Path) -> str:
        from raftblock.node.cluster import cluster_up, volume_create

        self.root = work / self.name
        uri = cluster_up(self.root, nbd_port=0, disk="os", gateway=self.gateway, iscsi_port=self.iscsi_port)
        volume_create(self.root, EXPORT, VOLUME_BYTES, encrypt=self.encrypt)
        self._pids = self._find_pids()
        return f"{uri}/{EXPORT}"

    def _find_pids(self) -> dict[str, int]:
        """Every process of the cluster, from its pid files (checked against /proc/PID/cmdline)."""
        from raftblock.node.clustermap import ClusterMap
        from raftblock.node.layout import Layout, running_pid

        layout = Layout(self.root)
        cmap = ClusterMap.load(layout.map_path)
        configs = {f"m{k}": layout.meta_config(int(k)) for k in sorted(cmap.meta_admin)}
        configs.update({f"n{n.node_id}": layout.node_config(n.node_id) for n in cmap.nodes})
        if cmap.gateway == "separate":
            configs["gateway"] = layout.gateway_config
        pids = {name: running_pid(layout, name, cfg) for name, cfg in configs.items()}
        missing = [name for name, pid in pids.items() if pid is None]
        if missing:
            raise RuntimeError(f"cluster processes not running: {missing}")
        return {k: v for k, v in pids.items() if v is not None}

    def pids(self) -> dict[str, int]:
        return self._pids

    def stop(self) -> None:
        from raftblock.node.cluster import cluster_down

        cluster_down(self.root)

    def describe(self) -> str:
        return ("raftblock cluster: 3 nodes in 3 racks, Raft, 3 replicas, 3 metadata processes, NBD served by "
                "node 1 (its groups' leader) (loopback, disk=os)")


class IscsiBridge:
    """qemu-nbd as an iSCSI initiator: `qemu-nbd -f raw --cache=none -t -e 4 -k SOCKET iscsi://HOST:PORT/IQN/LUN`,
    so fio's nbd engine (Debian's fio has no libiscsi engine) reaches an iSCSI target the same way for every
    iSCSI target. It listens on a unix socket in a short temp dir (paths are limited to 107 bytes)."""

    argv_tail = ["-f", "raw", "--cache=none", "-t", "-e", "4"]

    def start(self, iscsi_url: str, log_path: Path) -> str:
        self.dir = tempfile.mkdtemp(prefix="rb-iscsi-")
        self.sock = os.path.join(self.dir, "s")
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(["qemu-nbd", *self.argv_tail, "-x", EXPORT, "-k", self.sock, iscsi_url],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd bridge to {iscsi_url} exited with {self.proc.returncode} "
                                   f"(log: {log_path})")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"qemu-nbd bridge to {iscsi_url} not listening after 30s") from None
                time.sleep(0.05)  # polling interval
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe(self) -> str:
        return "qemu-nbd " + " ".join(self.argv_tail) + " iscsi://... (libiscsi initiator, unix socket to fio)"


class EncryptedClusterTarget(ClusterTarget):
    """The same cluster, its volume created with --encrypt (docs/encryption.md): what encryption at rest costs."""

    name = "cluster-encrypted"
    encrypt = True

    def describe(self) -> str:
        return super().describe() + ", the volume encrypted (AES-256-GCM at the gateway)"


class SeparateGatewayClusterTarget(ClusterTarget):
    """The same cluster with NBD served by a separate `raftblock gateway` process (a gateway machine)."""

    name = "cluster-gw"
    gateway = "separate"

    def describe(self) -> str:
        return ("raftblock cluster: 3 nodes in 3 racks, Raft, 3 replicas, 3 metadata processes, a separate gateway "
                "process (loopback, disk=os)")


class ClusterIscsiTarget(ClusterTarget):
    """The same cluster as `cluster` (its own instance), its volume reached over iSCSI: node 1's embedded
    gateway serves the target (LUN 0), qemu-nbd bridges it to NBD for fio (IscsiBridge)."""

    name = "cluster-iscsi"
    iscsi_port = 0  # a free one

    def start(self, work: Path) -> str:
        from raftblock.gateway.iscsi_server import target_name
        from raftblock.node.cluster import iscsi_portals
        from raftblock.node.clustermap import ClusterMap
        from raftblock.node.layout import Layout

        super().start(work)
        try:  # Bench.stop_all stops only targets that started: what started here goes down on a failure
            layout = Layout(self.root)
            portals = iscsi_portals(layout, ClusterMap.load(layout.map_path))
            if not portals:
                raise RuntimeError(f"the cluster in {self.root} serves no iSCSI portal")
            self.iscsi_url = f"iscsi://{portals[0]}/{target_name(EXPORT, 0)}/0"  # EXPORT is a valid IQN part
            self.bridge = IscsiBridge()
            return self.bridge.start(self.iscsi_url, work / f"{self.name}-bridge.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if hasattr(self, "bridge") and hasattr(self.bridge, "proc"):
                self.bridge.stop()
        finally:
            super().stop()

    def pids(self) -> dict[str, int]:
        return {**self._pids, "bridge": self.bridge.pid}

    def describe(self) -> str:
        return ("raftblock cluster as `cluster` (3 nodes, 3 racks, Raft, 3 replicas, 3 metadata processes, "
                f"disk=os), the volume over iSCSI from node 1's embedded gateway (LUN 0), through a "
                f"{IscsiBridge().describe()}; CPU counts the bridge")


def tgtd_path() -> str | None:
    """tgtd (Debian's `tgt`), also when /usr/sbin is not on PATH."""
    for tool in ("tgtd", "tgtadm"):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            return None
    return shutil.which("tgtd") or "/usr/sbin/tgtd"


class TgtTarget(Target):
    """tgt (the Linux SCSI target framework's user-space daemon) serving a raw file on the same file system,
    opened O_DIRECT (`--bsoflags direct`, as qemu-nbd --cache=none), reached through the same IscsiBridge.
    Its own tgtd on its own control port (-C) and a free portal, so a system tgtd is never touched."""

    name = "tgt"
    iqn = "iqn.2026-12.org.raftblock.bench:tgt"
    sock_dir = Path("/var/run/tgtd")  # tgtd's control sockets: socket.N and socket.N.lock

    def _adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        tgtadm = shutil.which("tgtadm") or "/usr/sbin/tgtadm"
        r = subprocess.run([tgtadm, "-C", str(self.control), *args], capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: rc {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self, work: Path) -> str:
        import random

        tgtd = tgtd_path()
        if tgtd is None:
            raise RuntimeError("tgtd/tgtadm not found (apt-get install tgt)")
        image = work / f"{self.name}.raw"
        with open(image, "wb") as f:
            f.truncate(VOLUME_BYTES)
        self.had_sock_dir = self.sock_dir.exists()
        # -C takes 0..32767; one no other tgtd uses (its socket and lock file absent)
        self.control = next(n for n in random.sample(range(1000, 32768), 200)
                            if not (self.sock_dir / f"socket.{n}").exists()
                            and not (self.sock_dir / f"socket.{n}.lock").exists())
        port = free_port()
        self.log = open(work / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen([tgtd, "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{port}"],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:  # Bench.stop_all stops only targets that started: never leave this tgtd behind on a failure
            wait_listening(port, self.proc)
            deadline = time.monotonic() + 30
            while self._adm("--mode", "system", "--op", "show", check=False).returncode != 0:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tgtd control port {self.control} not answering (log: {work}/{self.name}.log)")
                time.sleep(0.05)  # polling interval
            lld = ["--lld", "iscsi"]
            self._adm(*lld, "--mode", "target", "--op", "new", "--tid", "1", "-T", self.iqn)
            self._adm(*lld, "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", str(image),
                      "--bsoflags", "direct")
            self._adm(*lld, "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")
            self.bridge = IscsiBridge()
            return self.bridge.start(f"iscsi://127.0.0.1:{port}/{self.iqn}/1", work / f"{self.name}-bridge.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if hasattr(self, "bridge") and hasattr(self.bridge, "proc"):
                self.bridge.stop()  # logs out first: a target with a session is not deleted without --force
        finally:
            try:
                if self.proc.poll() is None:
                    self._adm("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", "1",
                              check=False)
                    self._adm("--mode", "system", "--op", "delete", check=False)  # tgtd exits
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
            finally:
                self.log.close()
                for leftover in (f"socket.{self.control}", f"socket.{self.control}.lock"):  # ours only
                    (self.sock_dir / leftover).unlink(missing_ok=True)
                if not self.had_sock_dir:
                    try:
                        self.sock_dir.rmdir()
                    except OSError:
                        pass  # not empty: another tgtd's since

    def pids(self) -> dict[str, int]:
        return {"tgtd": self.proc.pid, "bridge": self.bridge.pid}

    def describe(self) -> str:
        return ("tgt (tgtd, defaults) serving a 1 GiB raw file on the same filesystem as LUN 1, backing store "
                f"rdwr opened O_DIRECT (--bsoflags direct), one copy; through a {IscsiBridge().describe()}; "
                "CPU counts tgtd and the bridge")


class QemuNbdTarget(Target):
    name = "qemu-nbd"
    argv_tail = ["-f", "raw", "--cache=none", "--aio=native", "-t", "-e", "4"]

    def start(self, work: Path) -> str:
        image = work / f"{self.name}.raw"
        with open(image, "wb") as f:
            f.truncate(VOLUME_BYTES)
        port = free_port()
        self.log = open(work / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(
            ["qemu-nbd", *self.argv_tail, "-x", EXPORT, "-b", "127.0.0.1", "-p", str(port), str(image)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(port, self.proc)
        return f"nbd://127.0.0.1:{port}/{EXPORT}"

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()

    def pids(self) -> dict[str, int]:
        return {"qemu-nbd": self.proc.pid}

    def describe(self) -> str:
        return "qemu-nbd " + " ".join(self.argv_tail) + " (raw file, same filesystem, one copy)"


class QemuNbdWritebackTarget(QemuNbdTarget):
    name = "qemu-nbd-wb"
    argv_tail = ["-f", "raw", "--cache=writeback", "-t", "-e", "4"]


class EtcdTarget(Target):
    """3-member etcd on loopback (Debian's etcd-server); `randwrite-4k-qd1/qd32` are 4 KiB puts from
    1/32 concurrent clients (bench/etcd_baseline.py: HTTP/1.1 keep-alive to the grpc-gateway)."""

    name = "etcd"
    fio = False

    def start(self, work: Path) -> str:
        from etcd_baseline import EtcdCluster

        base = work / "etcd"
        base.mkdir(parents=True, exist_ok=True)
        self.cluster = EtcdCluster(base)
        self.cluster.start()
        return ",".join(f"http://127.0.0.1:{p}" for p in self.cluster.client.values())

    def stop(self) -> None:
        self.cluster.stop()

    def pids(self) -> dict[str, int]:
        return self.cluster.pids()

    def supports(self, job: str) -> bool:
        return job in ETCD_CLIENTS

    def describe(self) -> str:
        return ("etcd 3.x, 3 members on loopback (fsync on), 4 KiB puts; client: bench/etcd_baseline.py "
                "(asyncio, one keep-alive HTTP/1.1 connection per client to the v3 grpc-gateway "
                "POST /v3/kv/put, one put in flight each, clients spread over the 3 members)")


REGISTRY: dict[str, type[Target]] = {
    "cluster": ClusterTarget, "cluster-encrypted": EncryptedClusterTarget, "cluster-gw": SeparateGatewayClusterTarget, "cluster-iscsi": ClusterIscsiTarget,
    "raftblock": RaftblockTarget, "qemu-nbd": QemuNbdTarget, "qemu-nbd-wb": QemuNbdWritebackTarget,
    "tgt": TgtTarget, "etcd": EtcdTarget,
}


# -- one run -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    job: str
    target: str
    round: int
    iops: float
    mb_s: float
    p50_us: float  # what the client waits for; -fsync jobs: write + flush percentiles added
    p99_us: float
    machine: Machine
    cpu: Cpu | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, targets: list[Target], work: Path, size: int, runtime_s: int, ramp_s: int) -> None:
        self.targets = targets
        self.work = work
        self.size = size
        self.runtime_s = runtime_s
        self.ramp_s = ramp_s
        self.uris: dict[str, str] = {}

    def stop_all(self) -> None:
        """Stop every target that was started, even when one of them fails to stop."""
        for t in self.targets:
            if t.name in self.uris:
                try:
                    t.stop()
                except Exception as e:  # noqa: BLE001 -- keep stopping the others
                    print(f"warning: stopping {t.name}: {e}", file=sys.stderr)

    def all_pids(self) -> dict[str, int]:
        return {f"{t.name}/{role}": pid for t in self.targets if t.name in self.uris
                for role, pid in t.pids().items()}

    def fio(self, section: str, uri: str, ramp_s: int, sample: bool) -> tuple[dict[str, Any], list[CpuSample]]:
        out = self.work / "fio.json"
        out.unlink(missing_ok=True)
        env = dict(os.environ, NBD_URI=uri, SIZE=str(self.size), RUNTIME=str(self.runtime_s), RAMP=str(ramp_s))
        cmd = ["fio", f"--section={section}", "--output-format=json", f"--output={out}", str(JOB_FILE)]
        samples: list[CpuSample] = []
        with open(self.work / "fio.stderr", "w+") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            try:
                if sample and self.runtime_s >= 2:
                    # A window inside the measured part: fio connects in well under 0.3 s, then ramps
                    # for ramp_s, then measures for runtime_s.
                    pids = self.all_pids()
                    for at in (t0 + ramp_s + 0.3, t0 + ramp_s + self.runtime_s - 0.2):
                        time.sleep(max(0.0, at - time.monotonic()))  # the window's edges, not synchronisation
                        if proc.poll() is None:
                            samples.append(cpu_sample(pids, proc.pid))
                rc = proc.wait(timeout=self.runtime_s + ramp_s + 300)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            err.seek(0)
            stderr = err.read()
        text = out.read_text() if out.exists() else ""
        if rc != 0 or "{" not in text:
            raise RuntimeError(f"fio {section} on {uri} failed ({rc}):\n{stderr[-2000:]}\n{text[-2000:]}")
        result: dict[str, Any] = json.loads(text[text.index("{"):])  # the nbd engine prints a line before the JSON
        return result, samples

    def prefill(self, t: Target) -> float:
        t0 = time.monotonic()
        self.fio("prefill", self.uris[t.name], 0, sample=False)
        return time.monotonic() - t0

    def measure(self, job: str, t: Target, rnd: int) -> Run:
        with LoadProbe() as probe:
            if t.fio:
                fio, samples = self.fio(job, self.uris[t.name], self.ramp_s, sample=True)
            else:
                res, samples = self.etcd(job, t)
        if t.fio:
            r = summarize(job, t.name, rnd, fio, probe.machine)
        else:
            r = Run(job, t.name, rnd, res["puts_per_s"], res["puts_per_s"] * res["value_bytes"] / 1e6,
                    res["p50_us"], res["p99_us"], probe.machine,
                    extra={"clients": res["clients"], "puts": res["puts"], "ddir": "put"})
        if len(samples) == 2:
            r.cpu = cpu_between(samples[0], samples[1], t.name, r.iops)
            if r.extra.get("ddir") == "write" and r.cpu is not None:
                ratio = disk_bytes_per_client_byte(samples[0], samples[1], t.name, r.mb_s * 1e6 * r.cpu.window_s)
                if ratio is not None:
                    r.extra["disk_bytes_per_client_byte"] = ratio
        return r

    def etcd(self, job: str, t: Target) -> tuple[dict[str, Any], list[CpuSample]]:
        from etcd_baseline import load_detailed

        assert isinstance(t, EtcdTarget)
        pids = self.all_pids()
        samples: list[CpuSample] = []

        def mark(_edge: str) -> None:
            samples.append(cpu_sample(pids, None))  # the client runs in this process

        res = asyncio.run(load_detailed(t.cluster, ETCD_CLIENTS[job], self.runtime_s, self.ramp_s, mark))
        return res, samples


def summarize(job: str, target: str, rnd: int, fio: dict[str, Any], machine: Machine) -> Run:
    j = fio["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job} on {target}: error {j['error']}")
    ddir = "read" if j["read"]["io_bytes"] else "write"
    d = j[ddir]
    lat = d.get("lat_ns", {}).get("percentile") or d["clat_ns"].get("percentile", {})
    p50, p99 = lat.get("50.000000", 0) / 1000, lat.get("99.000000", 0) / 1000
    extra: dict[str, Any] = {"ddir": ddir, "io_bytes": d["io_bytes"], "ios": d.get("total_ios"),
                             "runtime_ms": j["job_runtime"], "fio_usr_cpu_pct": j.get("usr_cpu"),
                             "fio_sys_cpu_pct": j.get("sys_cpu"), "io_p50_us": p50, "io_p99_us": p99}
    if j.get("sync", {}).get("total_ios"):
        sl = j["sync"]["lat_ns"].get("percentile", {})
        extra["flushes"] = j["sync"]["total_ios"]
        extra["flush_p50_us"] = sl.get("50.000000", 0) / 1000
        extra["flush_p99_us"] = sl.get("99.000000", 0) / 1000
        # what a host waits for a durable write: the write, then its flush
        p50, p99 = p50 + extra["flush_p50_us"], p99 + extra["flush_p99_us"]
    return Run(job, target, rnd, d["iops"], d["bw"] * 1024 / 1e6, p50, p99, machine, extra=extra)


# -- report ------------------------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


class Results:
    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self.by: dict[tuple[str, str], list[Run]] = defaultdict(list)
        self.at: dict[tuple[str, str, int], Run] = {}
        for r in runs:
            self.by[(r.job, r.target)].append(r)
            self.at[(r.job, r.target, r.round)] = r

    def ratios(self, job: str, target: str, metric: str, base_job: str, base_target: str) -> list[float]:
        """Per round: target's metric / baseline's metric in the same round."""
        out = []
        for r in self.by.get((job, target), []):
            b = self.at.get((base_job, base_target, r.round))
            if b is not None and getattr(b, metric):
                out.append(getattr(r, metric) / getattr(b, metric))
        return out

    def row(self, job: str, target: str, baseline: str) -> dict[str, Any] | None:
        rs = self.by.get((job, target), [])
        if not rs:
            return None
        cpus = [r.cpu for r in rs if r.cpu is not None]
        row: dict[str, Any] = {
            "job": job, "target": target, "rounds": len(rs),
            "iops": spread([r.iops for r in rs]), "mb_s": spread([r.mb_s for r in rs]),
            "p50_us": spread([r.p50_us for r in rs]), "p99_us": spread([r.p99_us for r in rs]),
            "cpu_target_us_per_io": spread([c.target_us_per_io for c in cpus]),
            "cpu_loadgen_us_per_io": spread([c.loadgen_us_per_io for c in cpus]),
            "load_max": max(r.machine.load_before for r in rs), "steal_pct_max": max(r.machine.steal_pct for r in rs),
            "busy_pct_median": med([r.machine.busy_pct for r in rs]),
        }
        by_proc: dict[str, list[float]] = defaultdict(list)
        for c in cpus:
            for k, v in c.by_process_us_per_io.items():
                by_proc[k].append(v)
        row["cpu_by_process_us_per_io"] = {k: med(v) for k, v in by_proc.items()}
        if target != baseline and target != "etcd" and (job, baseline) in self.by:
            row["baseline"] = {"target": baseline, "job": job, "iops": med([r.iops for r in self.by[(job, baseline)]])}
            row["ratio_iops"] = spread(self.ratios(job, target, "iops", job, baseline))
            row["ratio_p50"] = spread(self.ratios(job, target, "p50_us", job, baseline))
            row["ratio_p99"] = spread(self.ratios(job, target, "p99_us", job, baseline))
        return row


def fmt(v: float, nd: int = 0) -> str:
    return "-" if v != v else f"{v:.{nd}f}"


def rng(s: dict[str, float], nd: int = 0) -> str:
    return "" if s["n"] < 1 or s["min"] != s["min"] else f"[{s['min']:.{nd}f}-{s['max']:.{nd}f}]"


def table(rows: list[dict[str, Any]], baseline: str) -> str:
    head = (f"{'job':<24} {'target':<13} {'IOPS med [min-max]':>24} {'MB/s':>7} {'p50 us':>8} {'p99 us':>8} "
            f"{'CPU us/IO tgt+gen':>18}  {baseline + ' IOPS':>13} {'ratio [min-max]':>20} {'p50 x':>6} {'p99 x':>6} "
            f"{'load/steal%':>11}")
    lines = [head, "-" * len(head)]
    last = None
    for row in rows:
        if last is not None and row["job"] != last:
            lines.append("")
        last = row["job"]
        cpu = f"{fmt(row['cpu_target_us_per_io']['median'])}+{fmt(row['cpu_loadgen_us_per_io']['median'])}"
        if "baseline" in row:
            base = fmt(row["baseline"]["iops"])
            ratio = f"{fmt(row['ratio_iops']['median'], 2)} {rng(row['ratio_iops'], 2)}"
            p50x, p99x = fmt(row["ratio_p50"]["median"], 1), fmt(row["ratio_p99"]["median"], 1)
        else:
            base, ratio, p50x, p99x = ("(baseline)" if row["target"] == baseline else ""), "", "", ""
        iops = f"{fmt(row['iops']['median'])} {rng(row['iops'])}"
        lines.append(
            f"{row['job']:<24} {row['target']:<13} {iops:>24} {fmt(row['mb_s']['median'], 1):>7} "
            f"{fmt(row['p50_us']['median']):>8} {fmt(row['p99_us']['median']):>8} {cpu:>18}  {base:>13} "
            f"{ratio:>20} {p50x:>6} {p99x:>6} {row['load_max']:>5.2f}/{row['steal_pct_max']:<5.1f}")
    lines.append("")
    lines.append(f"IOPS, MB/s, latency: median over rounds; ratio, p50 x, p99 x: target / {baseline} in the same "
                 f"round, median [min-max] over rounds.")
    lines.append("p50/p99: fio completion latency (submit to completion); -fsync rows: the write's percentile plus "
                 "its flush's (what a host waits for a durable write).")
    lines.append("CPU us/IO: utime+stime per I/O of all the target's processes + the load generator's (fio; for "
                 "etcd the Python client); load/steal%: highest 1-min load average before and steal during a run.")
    lines.append("etcd rows: 4 KiB puts/s (randwrite-4k-qd1 = 1 client, randwrite-4k-qd32 = 32 clients), put latency.")
    if any(r["target"] in ISCSI_TARGETS for r in rows):
        lines.append(f"{', '.join(ISCSI_TARGETS)} rows: iSCSI through a qemu-nbd bridge (libiscsi initiator, NBD on a "
                     "unix socket to fio): one more hop and process than the NBD rows; the bridge's CPU is in 'tgt'.")
    return "\n".join(lines)


GOALS = [  # (id, text, target, target job, metric, baseline target, baseline job, op, threshold): issue 16
    ("randwrite-qd32-vs-qemu-fsync", "4k randwrite QD32 IOPS >= 35% of qemu-nbd --fsync=1",
     GOAL_TARGET, "randwrite-4k-qd32", "iops", "qemu-nbd", "randwrite-4k-qd32-fsync", ">=", 0.35),
    ("randwrite-qd32-vs-etcd", "4k randwrite QD32 IOPS >= 3x etcd 4 KiB puts/s at 32 clients",
     GOAL_TARGET, "randwrite-4k-qd32", "iops", "etcd", "randwrite-4k-qd32", ">=", 3.0),
    ("randwrite-qd1-p50", "4k randwrite QD1 p50 <= 3x qemu-nbd --fsync=1 QD1 (write+flush)",
     GOAL_TARGET, "randwrite-4k-qd1", "p50_us", "qemu-nbd", "randwrite-4k-qd1-fsync", "<=", 3.0),
    ("randwrite-qd1-p99", "4k randwrite QD1 p99 <= 2x qemu-nbd --fsync=1 QD1 (write+flush)",
     GOAL_TARGET, "randwrite-4k-qd1", "p99_us", "qemu-nbd", "randwrite-4k-qd1-fsync", "<=", 2.0),
    ("randwrite-qd1-p50-gw", "separate gateway: 4k randwrite QD1 p50 <= 4x qemu-nbd --fsync=1 QD1",
     "cluster-gw", "randwrite-4k-qd1", "p50_us", "qemu-nbd", "randwrite-4k-qd1-fsync", "<=", 4.0),
    ("randread-qd1-p50", "4k randread QD1 p50 <= 2x qemu-nbd",
     GOAL_TARGET, "randread-4k-qd1", "p50_us", "qemu-nbd", "randread-4k-qd1", "<=", 2.0),
    ("randread-qd32-iops", "4k randread QD32 IOPS >= 60% of qemu-nbd",
     GOAL_TARGET, "randread-4k-qd32", "iops", "qemu-nbd", "randread-4k-qd32", ">=", 0.6),
    ("write-1m-iops", "1M sequential write IOPS >= 30% of qemu-nbd --fsync=1",
     GOAL_TARGET, "write-1m-qd4", "iops", "qemu-nbd", "write-1m-qd4-fsync", ">=", 0.3),
    ("write-1m-p99", "1M sequential write p99 <= 4x qemu-nbd --fsync=1",
     GOAL_TARGET, "write-1m-qd4", "p99_us", "qemu-nbd", "write-1m-qd4-fsync", "<=", 4.0),
]


def goals(res: Results) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for gid, text, target, job, metric, btarget, bjob, op, thr in GOALS:
        s = spread(res.ratios(job, target, metric, bjob, btarget))
        met = None if s["n"] == 0 else (s["median"] >= thr if op == ">=" else s["median"] <= thr)
        out.append({"id": gid, "goal": text, "target": target, "job": job, "metric": metric,
                    "baseline": f"{btarget} {bjob}", "op": op, "threshold": thr, "ratio": s, "met": met})
    # CPU per replicated 4 KiB write: reported, no threshold
    cpu: dict[str, Any] = {}
    for target, job in [(GOAL_TARGET, "randwrite-4k-qd1"), (GOAL_TARGET, "randwrite-4k-qd32"),
                        ("cluster-gw", "randwrite-4k-qd1"), ("cluster-gw", "randwrite-4k-qd32"),
                        ("qemu-nbd", "randwrite-4k-qd1-fsync"), ("qemu-nbd", "randwrite-4k-qd32-fsync"),
                        ("etcd", "randwrite-4k-qd1"), ("etcd", "randwrite-4k-qd32")]:
        rs = [r for r in res.by.get((job, target), []) if r.cpu is not None]
        if rs:
            idle = med([r.cpu.idle_by_target_pct[target] for r in res.runs
                        if r.cpu is not None and target in r.cpu.idle_by_target_pct])
            cpu[f"{target} {job}"] = {
                "target_us_per_io": spread([r.cpu.target_us_per_io for r in rs if r.cpu]),
                "loadgen_us_per_io": spread([r.cpu.loadgen_us_per_io for r in rs if r.cpu]),
                "target_idle_pct": idle,  # the target's CPU while idle (other targets' runs), % of one core
                "above_idle_us_per_io": spread([1e4 * (r.cpu.target_pct - idle) / r.iops for r in rs if r.cpu]),
            }
    out.append({"id": "cpu-per-write", "goal": "CPU per replicated 4 KiB write (all processes together), reported",
                "target": GOAL_TARGET, "met": None, "cpu": cpu})
    return out


def goals_text(gs: list[dict[str, Any]]) -> str:
    lines = [f"Goals ({GOAL_TARGET}: 3 nodes, 3 racks, Raft, NBD served by the leader's node; cluster-gw: the same "
             "through a separate gateway process; ratio = target / baseline in the same round, median [min-max] over "
             "rounds)"]
    for g in gs:
        if g["id"] == "cpu-per-write":
            continue
        s = g["ratio"]
        verdict = "n/a    " if g["met"] is None else ("met    " if g["met"] else "NOT met")
        lines.append(f"  [{verdict}] {g['goal']:<68} ratio {fmt(s['median'], 2):>6} {rng(s, 2):<13} "
                     f"(need {g['op']} {g['threshold']:g}; baseline {g['baseline']})")
    cpu = gs[-1]["cpu"]
    lines.append("  [report ] CPU per 4 KiB write, us (median; target processes + load generator; the target's CPU "
                 "above its idle CPU)")
    for k, v in cpu.items():
        what = "per put, 3 etcd members + client" if k.startswith("etcd") else (
            "per replicated write, 3 meta + 3 nodes + fio" if k.startswith(GOAL_TARGET + " ")
            else "per replicated write, 3 meta + 3 nodes + gateway + fio" if k.startswith("cluster-gw")
            else "per write, qemu-nbd + fio")
        lines.append(f"            {k:<36} {fmt(v['target_us_per_io']['median']):>6} + "
                     f"{fmt(v['loadgen_us_per_io']['median']):<5} {rng(v['target_us_per_io']):<13} above idle "
                     f"{fmt(v['above_idle_us_per_io']['median']):>5} (idle {fmt(v['target_idle_pct'])}% of a core)"
                     f"  {what}")
    return "\n".join(lines)


def plot(res: Results, jobs: list[str], targets: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    jobs = [j for j in jobs if any(r.job == j for r in res.runs)]
    targets = [t for t in targets if any(r.target == t for r in res.runs)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, len(jobs) * 1.5), 10), sharex=True)
    width = 0.8 / max(1, len(targets))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(targets):
        xs, ys, lo, hi, p50, p99 = [], [], [], [], [], []
        for k, j in enumerate(jobs):
            rs = res.by.get((j, t), [])
            if not rs:
                continue
            xs.append(k + i * width)
            m = med([r.iops for r in rs])
            ys.append(m)
            lo.append(m - min(r.iops for r in rs))
            hi.append(max(r.iops for r in rs) - m)
            p50.append(med([r.p50_us for r in rs]))
            p99.append(med([r.p99_us for r in rs]))
        c = colors[i % len(colors)]
        label = t + (" (4 KiB puts, 1/32 clients)" if t == "etcd" else "")
        ax1.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label, color=c)
        ax2.bar(xs, p99, width, color=c, alpha=0.35)
        ax2.bar(xs, p50, width, color=c, label=t)
    ax1.set_yscale("log")
    ax1.set_ylabel("IOPS (median, bars: min-max over rounds)")
    ax1.legend(fontsize=8, ncol=min(5, len(targets)))
    ax1.set_title(title, fontsize=9)
    ax1.grid(axis="y", which="both", alpha=0.3)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency us (solid p50, light p99; -fsync: write+flush)")
    ax2.grid(axis="y", which="both", alpha=0.3)
    ax2.set_xticks([k + width * (len(targets) - 1) / 2 for k in range(len(jobs))])
    ax2.set_xticklabels(jobs, rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {"fio": out(["fio", "--version"]), "qemu-nbd": out(["qemu-nbd", "--version"]),
            "etcd": out(["etcd", "--version"]),
            "git": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "git_dirty": str(out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]) != "?"),
            "python": platform.python_version(), "kernel": platform.release(), "cpus": str(os.cpu_count())}


# -- main --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 64 MiB region (about 3 minutes)")
    p.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    p.add_argument("--runtime", type=int, help="measured seconds per run (default 7; quick 3)")
    p.add_argument("--ramp", type=int, help="unmeasured warm-up seconds per run (default 1)")
    p.add_argument("--size", help="region the jobs touch, e.g. 256M (default 256M; quick 64M)")
    p.add_argument("--jobs", help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--targets", help=f"comma-separated subset of {','.join(REGISTRY)} (default: "
                   f"{','.join(TARGETS)}; tgt only when tgtd is installed)")
    p.add_argument("--workdir", help="where the targets keep their data (default: a temp dir, removed after)")
    p.add_argument("--out", help="result JSON path (default bench/results/bench-<time>.json)")
    args = p.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 3)
    runtime_s = args.runtime or (3 if args.quick else 7)
    ramp_s = args.ramp if args.ramp is not None else 1
    size = parse_size(args.size or ("64M" if args.quick else "256M"))
    jobs = args.jobs.split(",") if args.jobs else JOBS
    unknown = set(jobs) - set(JOBS)
    if unknown:
        p.error(f"unknown jobs {sorted(unknown)}")
    if args.targets:
        names = args.targets.split(",")
    else:
        names = list(TARGETS)
        if tgtd_path() is None:
            names.remove("tgt")
            print("note: tgtd/tgtadm not found (Debian package tgt): the tgt target is skipped", flush=True)
    if set(names) - set(REGISTRY):
        p.error(f"unknown targets {sorted(set(names) - set(REGISTRY))}")
    if "tgt" in names and tgtd_path() is None:
        p.error("tgt: tgtd/tgtadm not found (apt-get install tgt)")
    tools = {"fio": "fio (make sysdeps)", "qemu-nbd": "qemu-nbd (make sysdeps)",
             "etcd": "etcd (apt-get install etcd-server)"}
    needs_qemu = {"qemu-nbd", "qemu-nbd-wb", "cluster-iscsi", "tgt"}  # the iSCSI targets' bridge is qemu-nbd
    for tool in ["fio"] + (["qemu-nbd"] if needs_qemu & set(names) else []) + (["etcd"] if "etcd" in names else []):
        if shutil.which(tool) is None:
            p.error(f"{tools[tool]} not found")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = Path(args.out) if args.out else RESULTS / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raftblock-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global DEVICE_STAT
    DEVICE_STAT = device_of(work)

    targets = [REGISTRY[n]() for n in names]
    bench = Bench(targets, work, size, runtime_s, ramp_s)
    runs: list[Run] = []
    setup_s: dict[str, float] = {}
    t0 = time.monotonic()
    n_runs = sum(1 for j in jobs for t in targets if t.supports(j)) * rounds
    print(f"bench: {n_runs} runs ({len(jobs)} jobs x {', '.join(names)}; {rounds} rounds), {runtime_s}s "
          f"(+{ramp_s}s ramp) each, region {size >> 20} MiB, work dir {work}", flush=True)
    try:
        for t in targets:
            s0 = time.monotonic()
            bench.uris[t.name] = t.start(work)
            msg = f"  {t.name}: {bench.uris[t.name]} up in {time.monotonic() - s0:.1f}s"
            if t.fio:
                msg += f", pre-filled {size >> 20} MiB in {bench.prefill(t):.1f}s"
            setup_s[t.name] = time.monotonic() - s0
            print(msg, flush=True)
        for rnd in range(rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for job in jobs:
                for t in order:
                    if not t.supports(job):
                        continue
                    r = bench.measure(job, t, rnd)
                    runs.append(r)
                    cpu = (f" cpu {r.cpu.target_us_per_io:>6.0f}+{r.cpu.loadgen_us_per_io:<4.0f}us/IO"
                           if r.cpu else "")
                    print(f"  round {rnd} {job:<24} {t.name:<13} {r.iops:>9.0f} IOPS {r.mb_s:>7.1f} MB/s "
                          f"p50 {r.p50_us:>7.0f}us p99 {r.p99_us:>8.0f}us{cpu}  load {r.machine.load_before:.2f} "
                          f"steal {r.machine.steal_pct:.1f}%", flush=True)
    finally:
        bench.stop_all()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    res = Results(runs)
    baseline = BASELINE if BASELINE in names else names[-1]
    rows = [row for job in jobs for t in names if (row := res.row(job, t, baseline)) is not None]
    report = table(rows, baseline)
    gs = goals(res)
    gtext = goals_text(gs)
    steals = [r.machine.steal_pct for r in runs] or [float("nan")]
    loads = [r.machine.load_before for r in runs] or [float("nan")]
    idle = [r.cpu.idle_others_pct for r in runs if r.cpu]
    total_s = time.monotonic() - t0
    machine = (f"machine: {os.cpu_count()} CPUs, load average {min(loads):.2f}-{max(loads):.2f}, steal "
               f"{min(steals):.1f}-{max(steals):.1f}% per run; idle targets used {fmt(med(idle))}% of a core "
               f"(median) during others' runs; {total_s:.0f}s total")
    print()
    print(report)
    mtext = memory_text(runs)
    dtext = disk_text(runs)
    print()
    print(gtext)
    print()
    print(mtext)
    print()
    print(dtext)
    print()
    print(machine)
    doc = {
        "when": stamp,
        "settings": {"rounds": rounds, "runtime_s": runtime_s, "ramp_s": ramp_s, "region_bytes": size,
                     "volume_bytes": VOLUME_BYTES, "job_file": str(JOB_FILE.relative_to(REPO)), "quick": args.quick,
                     "jobs": jobs, "targets": names, "baseline": baseline, "etcd_clients": ETCD_CLIENTS},
        "targets": {t.name: t.describe() for t in targets},
        "versions": versions(),
        "setup_s": setup_s,
        "total_s": total_s,
        "machine": {"load_min": min(loads), "load_max": max(loads), "steal_pct_min": min(steals),
                    "steal_pct_max": max(steals), "idle_targets_pct_median": med(idle)},
        "runs": [asdict(r) for r in runs],
        "rows": rows,
        "goals": gs,
        "table": report,
        "goals_text": gtext,
        "memory_text": mtext,
        "disk_text": dtext,
    }
    out_json.write_text(json.dumps(doc, indent=1))
    print(f"results: {out_json}")
    png = out_json.with_suffix(".png")
    title = (f"raftblock bench {stamp}: {rounds} round(s) x {runtime_s}s, region {size >> 20} MiB; "
             f"load {min(loads):.1f}-{max(loads):.1f}, steal {min(steals):.1f}-{max(steals):.1f}%")
    if plot(res, jobs, names, png, title):
        print(f"chart:   {png}")
    else:
        print("chart:   skipped (matplotlib not installed: pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
