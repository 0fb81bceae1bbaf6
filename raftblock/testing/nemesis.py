# The nemesis of the fault campaign (issue 7): the faults a NetCluster suffers, and a record of each.
#
# Owns: the faults it injects and their undoing: kill -9 (+ restart), SIGSTOP (+ SIGCONT), partitions
# of one node, a rack and a "bridge" (one node sees both sides, the sides do not see each other) with
# heal, a power cut (kill -9 of every process at once, then restart all), bit flips in the block data
# of a node's stored blocks (engine segments, or the WAL segment a linked block lives in), and a full disk on
# the node whose data dir is a small loop-mounted ext4.
#
# Rules:
# 1. Every fault appends a `FaultRecord` saying what actually fired: kind, target, monotonic times of
#    firing and healing (time.monotonic is the clock of the recorded histories), details, or the error
#    that kept it from firing. A campaign reports from these records, never from what it asked for.
# 2. Whatever stops or cuts something has an undo (`heal_all`), called by the campaign in `finally`:
#    a paused process is always continued, a partition always healed, a ballast always removed.
# 3. A process is signalled by the pid in its pid file (checked by /proc/PID/cmdline), never by name.
from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from raftblock.testing.netns import NetCluster

log = structlog.get_logger("raftblock.testing.nemesis")

BLOCK = 4096
SEG_HEADER = 64
REC_HEADER = struct.Struct("<I4sBBHIIIQQQ")  # docs/format/segment.md, "Record"
REC_WRITE = 1
REC_LINK = 3  # write-once: the block's data is in a WAL segment (docs/format/write-once.md)
FLAG_HISTORY = 2
PAUSE_MAX_S = 15.0  # a SIGSTOP longer than this is refused: the campaign bounds every pause
BALLAST = "ballast"


@dataclass
class FaultRecord:
    kind: str
    target: str
    fired_at: float | None = None  # time.monotonic()
    healed_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None and self.error is None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fired"] = self.fired
        return d


@dataclass
class Flip:
    path: str
    offset: int
    bit: int
    extent_id: int
    block: int
    lsn: int


class Nemesis:
    def __init__(self, cluster: NetCluster, rng: random.Random) -> None:
        self.c = cluster
        self.net = cluster.net
        self.rng = rng
        self.records: list[FaultRecord] = []
        self._paused: dict[str, FaultRecord] = {}
        self._partition: FaultRecord | None = None
        self._full: dict[int, FaultRecord] = {}
        self._killed: dict[str, FaultRecord] = {}

    def _record(self, kind: str, target: str, **details: Any) -> FaultRecord:
        r = FaultRecord(kind, target, details=dict(details))
        self.records.append(r)
        return r

    def _fired(self, r: FaultRecord) -> FaultRecord:
        r.fired_at = time.monotonic()
        log.info("nemesis.fired", kind=r.kind, target=r.target, **r.details)
        return r

    # --- processes -------------------------------------------------------------------------------
    def kill(self, name: str) -> FaultRecord:
        """kill -9 NAME; `restart` brings it back (on its data)."""
        r = self._record("kill", name)
        pid = self.c.pid(name)
        if pid is None:
            r.error = "not running"
            return r
        os.kill(pid, signal.SIGKILL)
        self._fired(r).details["pid"] = pid
        self.c.wait_dead(name, pid)
        self._killed[name] = r
        return r

    def restart(self, name: str) -> None:
        r = self._killed.pop(name, None)
        self.c.start([name])
        if r is not None:
            r.healed_at = time.monotonic()
            r.details["new_pid"] = self.c.pid(name)

    def pause(self, name: str) -> FaultRecord:
        """SIGSTOP NAME; `resume` (or heal_all) sends SIGCONT. The caller bounds the pause (PAUSE_MAX_S)."""
        r = self._record("pause", name)
        pid = self.c.signal(name, signal.SIGSTOP)
        if pid is None:
            r.error = "not running"
            return r
        self._fired(r).details["pid"] = pid
        self._paused[name] = r
        return r

    def resume(self, name: str) -> None:
        r = self._paused.pop(name, None)
        self.c.signal(name, signal.SIGCONT)
        if r is not None:
            r.healed_at = time.monotonic()
            if r.fired_at is not None and r.healed_at - r.fired_at > PAUSE_MAX_S:
                r.details["over_bound_s"] = round(r.healed_at - r.fired_at, 3)

    def power_cut(self) -> FaultRecord:
        """kill -9 every process of the cluster at once (gateway and metadata too), then start them all."""
        r = self._record("power_cut", "all")
        pids = {n: p for n in self.c.names() if (p := self.c.pid(n)) is not None}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        self._fired(r).details["pids"] = pids
        for name, pid in pids.items():
            self.c.wait_dead(name, pid)
        self.c.start()
        r.healed_at = time.monotonic()
        return r

    # --- network ---------------------------------------------------------------------------------
    def partition(self, kind: str, side_a: list[str], side_b: list[str], **details: Any) -> FaultRecord:
        """Hosts of side A and B stop hearing each other (net.partition); `heal` undoes it."""
        r = self._record(kind, ",".join(sorted(side_a)), side_a=sorted(side_a), side_b=sorted(side_b), **details)
        try:
            self.net.partition(side_a, side_b)
        except Exception as e:
            r.error = f"{type(e).__name__}: {e}"
            self.net.heal()
            return r
        self._partition = self._fired(r)
        return r

    def partition_hosts(self, kind: str, hosts: list[str], **details: Any) -> FaultRecord:
        inside = sorted(set(hosts))
        outside = sorted(h for h in self.net.hosts if h not in inside and h != "ct")
        return self.partition(kind, inside, outside, **details)

    def partition_bridge(self, center: str) -> FaultRecord:
        """CENTER (a storage node) and its rack see everyone; the other racks are split in two sides that do
        not see each other; the gateway goes with the first side."""
        rack = self.net.hosts[center].rack
        others = sorted({h.rack for h in self.net.hosts.values() if h.rack and h.rack != rack})
        if len(others) < 2:
            r = self._record("partition_bridge", center)
            r.error = "needs 3 racks"
            return r
        self.rng.shuffle(others)
        half = len(others) // 2
        side_a = [h for r in others[:half] for h in self.net.rack_hosts(r)] + ["gw"]
        side_b = [h for r in others[half:] for h in self.net.rack_hosts(r)]
        return self.partition("partition_bridge", side_a, side_b, center=center, center_rack=rack)

    def heal(self) -> None:
        self.net.heal()
        if self._partition is not None:
            self._partition.healed_at = time.monotonic()
            self._partition = None

    # --- disks -----------------------------------------------------------------------------------
    def bit_flips(self, node_id: int, extent_ids: set[int], count: int, blocks: set[int] | None = None) -> FaultRecord:
        """Flip one bit in the data of COUNT live blocks (newest version of a block of EXTENT_IDS, of BLOCKS
        inside the extent if given) of node NODE_ID, in place, while it runs (the file's page cache is what
        it reads): in an engine segment, or, for a linked block (write-once), in the WAL segment it points
        into."""
        r = self._record("bit_flip", f"n{node_id}")
        # newest version of each block; a block relocated by compaction has copies with the same LSN:
        # every copy is flipped (the index points at one of them)
        live: dict[tuple[int, int], tuple[int, list[tuple[str, int]]]] = {}
        engine = self.c.layout.data_dir(node_id) / "engine"
        wal = self.c.layout.data_dir(node_id) / "wal"
        for seg in sorted(engine.glob("seg-*.log")):
            for ext, blk, lsn, path, off in _write_blocks(seg, wal):
                if ext not in extent_ids or (blocks is not None and blk not in blocks):
                    continue
                have = live.get((ext, blk))
                if have is None or have[0] < lsn:
                    live[(ext, blk)] = (lsn, [(path, off)])
                elif have[0] == lsn and (path, off) not in have[1]:
                    have[1].append((path, off))
        if not live:
            r.error = "no stored block of the volume on that node"
            return r
        flips = []
        for (ext, blk) in self.rng.sample(sorted(live), min(count, len(live))):
            lsn, copies = live[(ext, blk)]
            delta, bit = self.rng.randrange(BLOCK), self.rng.randrange(8)
            for path, off in copies:
                fd = os.open(path, os.O_RDWR)
                try:
                    b = os.pread(fd, 1, off + delta)
                    os.pwrite(fd, bytes([b[0] ^ (1 << bit)]), off + delta)
                finally:
                    os.close(fd)
                flips.append(Flip(path, off + delta, bit, ext, blk, lsn))
        r.details["flips"] = [asdict(f) for f in flips]
        r.details["blocks"] = sorted({f.block for f in flips})
        self._fired(r)
        r.healed_at = r.fired_at  # nothing to undo: the node must find and repair them
        return r

    def disk_full(self, node_id: int) -> FaultRecord:
        """Fill node NODE_ID's file system (a loop-mounted ext4 of NetCluster.small_disks) with a ballast."""
        r = self._record("disk_full", f"n{node_id}")
        pid = self.c.pid(f"n{node_id}")
        if node_id not in self.c.small_disks or pid is None:
            r.error = "not a node with a small disk" if pid is not None else "not running"
            return r
        data = self.c.layout.data_dir(node_id)
        fill = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c",
                               f'dd if=/dev/zero of="{data}/{BALLAST}" bs=1M 2>/dev/null; sync; '
                               f'df -B1 --output=avail "{data}" | tail -1'],
                              capture_output=True, text=True, timeout=120)
        try:
            avail = int(fill.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r.error = f"could not fill: {fill.stderr.strip()[-300:]}"
            return r
        r.details.update(pid=pid, avail_bytes=avail)
        if avail > 1 << 20:
            r.error = f"still {avail} bytes free"
            return r
        self._full[node_id] = self._fired(r)
        return r

    def disk_free(self, node_id: int) -> None:
        """Remove the ballast: through the running node's mount namespace, or, if the node died, by
        mounting its image in a private mount namespace of our own."""
        r = self._full.pop(node_id, None)
        pid = self.c.pid(f"n{node_id}")
        data = self.c.layout.data_dir(node_id)
        if pid is not None:
            cmd = ["nsenter", "-t", str(pid), "-m", "rm", "-f", f"{data}/{BALLAST}"]
        else:
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount -o loop "{self.c.disk_image(node_id)}" "{data}" && rm -f "{data}/{BALLAST}"']
        subprocess.run(cmd, capture_output=True, timeout=60, check=True)
        if r is not None:
            r.healed_at = time.monotonic()
            r.details["node_alive_at_heal"] = pid is not None

    # --- undo everything -------------------------------------------------------------------------
    def heal_all(self) -> None:
        """Undo whatever is still in force (every step is attempted; the first error is raised after)."""
        errors: list[BaseException] = []
        steps: list[tuple[Any, Any]] = [(self.resume, n) for n in list(self._paused)]
        steps += [(lambda _: self.heal(), None)]
        steps += [(self.disk_free, i) for i in list(self._full)]
        steps += [(self.restart, n) for n in list(self._killed)]
        for fn, arg in steps:
            try:
                fn(arg)
            except Exception as e:  # noqa: BLE001 - collected and re-raised
                errors.append(e)
        if errors:
            raise errors[0]


def _write_blocks(path: Path, wal: Path) -> list[tuple[int, int, int, str, int]]:
    """(extent_id, block, lsn, file and offset of the block's data) of every block of every WRITE or LINK
    record of a segment (a LINK's data is in WAL segment wal_seq of the directory `wal`), walking records
    from the header to the first thing that is not a record header."""
    out: list[tuple[int, int, int, str, int]] = []
    data = path.read_bytes()
    x = SEG_HEADER
    while x + REC_HEADER.size <= len(data):
        _crc, magic, typ, flags, _r, count, length, block, extent, lsn, _sm = REC_HEADER.unpack_from(data, x)
        if magic != b"RBRC" or length < REC_HEADER.size or x + length > len(data):
            break
        if typ == REC_WRITE and not flags & FLAG_HISTORY:
            payload = x + REC_HEADER.size + (4 * count + 7) // 8 * 8
            out.extend((extent, block + i, lsn, str(path), payload + i * BLOCK) for i in range(count))
        elif typ == REC_LINK and not flags & FLAG_HISTORY:
            seq, woff = struct.unpack_from("<QQ", data, x + length - 16)
            files = [f for f in (wal / f"wal-{seq:016x}.log", wal / f"wal-{seq:016x}.held") if f.exists()]
            if files:
                out.extend((extent, block + i, lsn, str(files[0]), woff + i * BLOCK) for i in range(count))
        x += length
    return out
