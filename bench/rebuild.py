"""raftblock bench-rebuild: kill a node holding `--size` of Raft replicas and time the cluster's own rebuild.

Owns the measurement of issue 7's acceptance item "Kill a node holding 1 GiB of replicas: the cluster
re-replicates by itself to full redundancy; the closing note gives the rebuild rate (MB/s) and the foreground
4k write p99 during the rebuild vs before."

One round, on a fresh cluster (`cluster up`: 4 storage nodes in 3 racks, disk=os, free ports, its own dir):
1. Volume `fg` (64 MiB, one extent group) for the foreground load, then volume `fill` (2 x --size). `fill` is
   written sequentially (bench/jobs/block.fio `prefill`: 1 MiB writes, QD8) far enough that one node of the
   two-node rack holds >= --size of replica data. The victim is the node of that rack holding the most replica
   bytes (allocated bytes of its groups, as their leaders report them); the other node of the rack is the
   spare, the only node a group that loses the victim can take in (3 replicas in 3 racks).
2. Foreground: bench/jobs/block.fio `randwrite-4k-qd1` (the job bench/run.py measures) on `fg`, started before
   the kill and stopped after the "after" window, with a per-I/O latency log (fio --write_lat_log,
   --log_avg_msec=0, --log_unix_epoch=1: completion time and latency of every write). Windows: "before" (the
   --before seconds before the kill: the baseline, same job on the same volume), "detection" (the kill to the
   first snapshot chunk sent), "rebuild" (that to whole again), "after" (--after seconds from whole again).
3. SIGKILL of the victim (pid from the cluster's pid file, checked against /proc/PID/cmdline). cluster_status is
   polled every POLL_S, before the kill too, so every window carries the same monitoring load. Recorded: the
   victim `down` in the map, removed from every group, the first copy (the earliest of: a "copying" repair's
   start, i.e. the poll time minus the stream's elapsed_s; the last poll before the survivors'
   repair_bytes_sent counters first grew), streams seen (group, from, to, bytes), the most streams at once,
   and whole again: every group has 3 members, none the victim, a leader, no repair listed, and every member
   caught up: applied indexes within APPLIED_SLACK of each other, or every member at least where the most
   advanced one was at the previous poll (the foreground group takes writes while its members are polled).
4. Replica bytes rebuilt = the victim's replica bytes (allocated bytes of its groups at the kill); rebuild rate =
   those bytes / copy time (first copy to whole again). Also reported: the growth of the survivors'
   `repair_bytes_sent` counters (every snapshot chunk sent, streams that were restarted included) over the same
   time, the snapshot images made and installed, and the Raft term changes of the groups.
5. After the cluster is down, its logs are read for warnings and errors and for the repair's timeline
   (meta_node_states, meta_raft_change, raft.conf_change, raft.group_hosted), relative to the kill.
Nothing here asserts performance. Each figure is reported as median [min-max] over --rounds rounds; markdown
and JSON go to bench/results/rebuild-<time>[-quick].{md,json}. The cluster always goes down (errors, Ctrl-C).

Usage: python bench/rebuild.py [--quick] [--size 1G] [--rounds 3] [--repair-rate BYTES/S] [--down-grace-ms MS]
                               [--before S] [--after S] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from run import JOB_FILE, REPO, RESULTS, LoadProbe, parse_size, spread, versions

sys.path.insert(0, str(REPO))

NODES, RACKS = 4, 3
EXTENT = 64 << 20
FG_BYTES = 64 << 20
FG_JOB = "randwrite-4k-qd1"
POLL_S = 0.5
RAMP_S = 2.0  # the foreground job runs this long before the "before" window opens
APPLIED_SLACK = 64  # entries a member may trail the others by and still count as caught up (live writes)
REPAIR_RATE_DEFAULT = 64 << 20  # RuntimeConfig.repair_bytes_per_s
DOWN_GRACE_DEFAULT_MS = 15_000  # HealthConfig.down_grace_ms
WATCH_COUNTERS = ("repair_bytes_sent", "snapshot_images_made", "snapshots_installed", "leader_transfers",
                  "conf_changes_proposed", "wal_sync_slow")
WINDOWS = ("before", "detection", "rebuild", "after")
TIMELINE_EVENTS = ("meta_node_states", "meta_raft_change", "raft.conf_change", "raft.group_hosted",
                   "raft.group_discarded", "raft.replica_discarded")


class Interrupted(Exception):
    pass


def _on_term(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


# -- the cluster ------------------------------------------------------------------------------------------------

def start_cluster(root: Path, repair_rate: int | None, down_grace_ms: int | None) -> tuple[str, dict[str, str]]:
    """A fresh 4-node / 3-rack cluster. With an override, the layout and configs are written first (what
    cluster_up does on a new directory), the override appended to the TOML files, then cluster_up starts it."""
    from raftblock.node.cluster import cluster_up
    from raftblock.node.layout import Layout, create_layout, write_configs

    edits: dict[str, str] = {}
    if repair_rate is not None or down_grace_ms is not None:
        layout = Layout(root)
        root.mkdir(parents=True, exist_ok=True)
        cmap = create_layout(layout, NODES, RACKS, None, "127.0.0.1")
        cmap.replication = "raft"
        write_configs(layout, cmap, "os", "127.0.0.1", free_port())
        cmap.save(layout.map_path)
        if repair_rate is not None:
            for n in cmap.nodes:
                p = layout.node_config(n.node_id)
                p.write_text(p.read_text().rstrip("\n") + f"\n\n[raft]\nrepair_bytes_per_s = {repair_rate}\n")
                edits[str(p.relative_to(root))] = f"[raft] repair_bytes_per_s = {repair_rate}"
        if down_grace_ms is not None:
            for k in sorted(cmap.meta_admin):
                p = layout.meta_config(int(k))
                p.write_text(p.read_text().rstrip("\n") + f"\n\n[health]\ndown_grace_ms = {down_grace_ms}\n")
                edits[str(p.relative_to(root))] = f"[health] down_grace_ms = {down_grace_ms}"
    uri = cluster_up(root, nodes=NODES, racks=RACKS, nbd_port=0, disk="os")
    return uri, edits


def node_pid(root: Path, node_id: int) -> int:
    from raftblock.node.layout import Layout, running_pid

    layout = Layout(root)
    pid = running_pid(layout, f"n{node_id}", layout.node_config(node_id))
    if pid is None:
        raise RuntimeError(f"node {node_id} is not running (no live pid file)")
    return pid


def racks_of(root: Path) -> dict[int, str]:
    from raftblock.node.clustermap import ClusterMap
    from raftblock.node.layout import Layout

    return {n.node_id: n.rack for n in ClusterMap.load(Layout(root).map_path).nodes}


def status(root: Path) -> dict[str, Any]:
    from raftblock.node.cluster import cluster_status

    return cluster_status(root)


def fill_bytes_needed(st: dict[str, Any], volume: str, candidates: list[int], size: int) -> tuple[int, int]:
    """The shortest sequential fill of `volume` (whole extents) after which one candidate node holds >= size
    of it (extent i lives in group extent_groups[i]); (fill bytes, that node). Raises when even a full fill
    would not do."""
    vol = next(v for v in st["volumes"] if v["name"] == volume)
    members = {g["group"]: set(g["members"]) for g in st["groups"]}
    held = dict.fromkeys(candidates, 0)
    for i, gid in enumerate(vol["extent_groups"]):
        for c in candidates:
            if c in members[gid]:
                held[c] += EXTENT
        best = max(candidates, key=lambda c: (held[c], -c))
        if held[best] >= size:
            return (i + 1) * EXTENT, best
    raise RuntimeError(f"volume {volume} ({mib(vol['size_bytes'])}) cannot put {mib(size)} on one node of "
                       f"{candidates}: at most {mib(max(held.values()))}")


def node_bytes(st: dict[str, Any], node: int) -> int:
    return sum(g["allocated_bytes"] or 0 for g in st["groups"] if node in g["members"])


def repair_sent(st: dict[str, Any], skip: int | None = None) -> dict[int, int]:
    return {n["id"]: int(n.get("counters", {}).get("repair_bytes_sent", 0)) for n in st["nodes"]
            if n.get("state") == "up" and n["id"] != skip}


def counters_of(st: dict[str, Any], skip: int) -> dict[int, dict[str, int]]:
    """The repair-related counters of every reachable node but `skip`."""
    return {n["id"]: {k: int(n.get("counters", {}).get(k, 0)) for k in WATCH_COUNTERS} for n in st["nodes"]
            if n.get("state") == "up" and n["id"] != skip}


def counter_growth(a: dict[int, dict[str, int]], b: dict[int, dict[str, int]]) -> dict[str, dict[int, int]]:
    """Per counter, per node: b - a (nodes in both)."""
    return {k: {n: b[n][k] - a[n][k] for n in sorted(set(a) & set(b))} for k in WATCH_COUNTERS}


def group_applied_max(st: dict[str, Any]) -> dict[int, int]:
    return {g["group"]: max((int(v) for v in g["applied"].values()), default=0) for g in st["groups"]}


def whole(st: dict[str, Any], victim: int, prev_max: dict[int, int]) -> tuple[bool, str]:
    """Every group at 3 members, none the victim, with a leader, caught up; no repair listed. A member is caught
    up when the members' applied indexes are within APPLIED_SLACK, or when it has applied at least what the
    most advanced member had applied at the previous poll (`prev_max`): less than one poll behind, which is
    what a replica of a group taking writes looks like when its members are asked one after the other."""
    for g in st["groups"]:
        m = g["members"]
        if len(m) != 3 or victim in m:
            return False, f"group {g['group']} members {m}"
        if not g["leader"]:
            return False, f"group {g['group']} has no leader"
        applied = [int(v) for k, v in g["applied"].items() if int(k) in m]
        if len(applied) != 3:
            return False, f"group {g['group']}: {len(applied)}/3 members report it"
        if max(applied) - min(applied) > APPLIED_SLACK and min(applied) < prev_max.get(g["group"], max(applied)):
            return False, f"group {g['group']} applied {g['applied']}"
    if st["repairs"]:
        return False, f"{len(st['repairs'])} repair(s) listed"
    return True, ""


# -- fio ---------------------------------------------------------------------------------------------------------

def fio_env(uri: str, size: int, runtime_s: int) -> dict[str, str]:
    return dict(os.environ, NBD_URI=uri, SIZE=str(size), RUNTIME=str(runtime_s), RAMP="0")


def fio_json(path: Path) -> dict[str, Any]:
    text = path.read_text() if path.exists() else ""
    start = text.find("{")  # fio prints "fio: terminating on signal 2" before the JSON when stopped
    return dict(json.loads(text[start:])) if start >= 0 else {}


def prefill(uri: str, size: int, work: Path, name: str) -> float:
    out = work / f"fio-prefill-{name}.json"
    t0 = time.monotonic()
    r = subprocess.run(["fio", "--section=prefill", "--output-format=json", f"--output={out}", str(JOB_FILE)],
                       env=fio_env(uri, size, 0), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=600 + size / 5e6)
    took = time.monotonic() - t0
    j = fio_json(out).get("jobs", [{}])[0]
    if r.returncode != 0 or j.get("error"):
        raise RuntimeError(f"fio prefill of {name} failed ({r.returncode}, error {j.get('error')}): "
                           f"{r.stderr.strip()[-500:]}")
    return took


class Foreground:
    """bench/jobs/block.fio randwrite-4k-qd1 on the fg volume, every write's completion time and latency logged."""

    def __init__(self, uri: str, work: Path) -> None:
        self.prefix = work / "fg"
        self.out = work / "fio-fg.json"
        self.err = open(work / "fio-fg.stderr", "w+")  # noqa: SIM115 -- closed in stop()
        cmd = ["fio", f"--section={FG_JOB}", f"--write_lat_log={self.prefix}", "--log_avg_msec=0",
               "--log_unix_epoch=1", "--continue_on_error=all", "--output-format=json", f"--output={self.out}",
               str(JOB_FILE)]
        self.cmd = cmd
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, env=fio_env(uri, FG_BYTES, 3600), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.err, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fio stops its job and writes the logs and the JSON
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.err.seek(0)
        stderr = self.err.read()
        self.err.close()
        j = fio_json(self.out)
        job = (j.get("jobs") or [{}])[0]
        return {"rc": self.proc.returncode, "stderr": stderr.strip()[-2000:], "error": job.get("error"),
                "total_err": job.get("total_err"), "first_error": job.get("first_error"),
                "write_ios": job.get("write", {}).get("total_ios"), "cmd": self.cmd}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if not self.err.closed:
            self.err.close()

    def samples(self) -> tuple[list[float], list[float]]:
        """(completion unix time s, latency us) of every write, in completion order."""
        ts: list[float] = []
        lat: list[float] = []
        for p in sorted(self.prefix.parent.glob(self.prefix.name + "_lat.*.log")):
            with open(p) as f:
                for line in f:
                    parts = line.split(",")
                    if len(parts) >= 3 and parts[2].strip() == "1":  # ddir 1 = write
                        ts.append(int(parts[0]) / 1000)
                        lat.append(int(parts[1]) / 1000)
        order = sorted(range(len(ts)), key=ts.__getitem__)
        return [ts[i] for i in order], [lat[i] for i in order]


def window_stats(ts: list[float], lat: list[float], a: float, b: float) -> dict[str, float]:
    i, j = bisect.bisect_left(ts, a), bisect.bisect_left(ts, b)
    vals = sorted(lat[i:j])
    dur = b - a
    # the longest time without a completion inside the window (a stall of the foreground)
    edges = [a, *ts[i:j], b]
    gap = max((y - x for x, y in zip(edges, edges[1:], strict=False)), default=float("nan"))
    return {"start": a, "end": b, "duration_s": dur, "ios": len(vals),
            "iops": len(vals) / dur if dur > 0 else float("nan"),
            "p50_us": pct(vals, 50), "p99_us": pct(vals, 99), "p999_us": pct(vals, 99.9),
            "max_us": vals[-1] if vals else float("nan"), "longest_gap_s": gap}


# -- logs ----------------------------------------------------------------------------------------------------------

def read_logs(root: Path, t_kill: float, victim: int) -> dict[str, Any]:
    """Warnings/errors by process and event, non-JSON lines (tracebacks), and the repair timeline."""
    counts: dict[str, int] = {}
    samples: dict[str, str] = {}
    other: dict[str, int] = {}
    timeline: list[dict[str, Any]] = []
    for p in sorted((root / "logs").glob("*.log")):
        proc = p.stem
        with open(p, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    other[proc] = other.get(proc, 0) + 1
                    samples.setdefault(f"{proc}: (not JSON)", line[:300])
                    continue
                if not isinstance(rec, dict):
                    continue
                level, event = str(rec.get("level", "")), str(rec.get("event", ""))
                ts = rec.get("timestamp")
                t = (datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
                     if isinstance(ts, str) else float("nan"))
                if level in ("warning", "error", "critical", "exception"):
                    k = f"{proc} {level} {event}"
                    counts[k] = counts.get(k, 0) + 1
                    samples.setdefault(k, line[:400])
                if event in TIMELINE_EVENTS and t >= t_kill - 1:
                    extra = {k: v for k, v in rec.items() if k not in ("event", "level", "timestamp")}
                    timeline.append({"t_s": round(t - t_kill, 2), "proc": proc, "event": event, **extra})
    timeline.sort(key=lambda e: e["t_s"])
    return {"warnings_errors": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "samples": samples,
            "non_json_lines": other, "timeline": timeline[:400], "victim": victim}


# -- one round -------------------------------------------------------------------------------------------------------

class Round:
    def __init__(self, idx: int, root: Path, work: Path, a: argparse.Namespace, size: int) -> None:
        self.idx, self.root, self.work, self.a, self.size = idx, root, work, a, size
        self.res: dict[str, Any] = {"round": idx}
        self.fg: Foreground | None = None
        self.polls: list[dict[str, Any]] = []
        self.poll_errors = 0

    def say(self, msg: str) -> None:
        print(f"  [r{self.idx}] {msg}", flush=True)

    def poll(self) -> tuple[dict[str, Any] | None, float]:
        """cluster_status, and the wall time of the middle of the call."""
        from raftblock.node.layout import ClusterError

        t0 = time.time()
        try:
            st = status(self.root)
        except (ClusterError, OSError, TimeoutError) as e:
            self.poll_errors += 1
            self.polls.append({"t": t0, "error": str(e)[:200]})
            return None, t0
        return st, (t0 + time.time()) / 2

    def run(self) -> dict[str, Any]:
        a, res = self.a, self.res
        t0 = time.monotonic()
        uri, edits = start_cluster(self.root, a.repair_rate, a.down_grace_ms)
        res["config_edits"] = edits
        res["setup_s"] = {"cluster_up": time.monotonic() - t0}
        from raftblock.node.cluster import volume_create

        volume_create(self.root, "fg", FG_BYTES, "raft")
        volume_create(self.root, "fill", max(EXTENT, -(-2 * self.size // EXTENT) * EXTENT), "raft")
        racks = racks_of(self.root)
        by_rack: dict[str, list[int]] = {}
        for n, r in racks.items():
            by_rack.setdefault(r, []).append(n)
        pair = next(sorted(ns) for ns in by_rack.values() if len(ns) == 2)
        st = status(self.root)
        fill, planned = fill_bytes_needed(st, "fill", pair, self.size)
        res["setup_s"]["prefill_fg"] = prefill(f"{uri}/fg", FG_BYTES, self.work, "fg")
        took = prefill(f"{uri}/fill", fill, self.work, "fill")
        res["setup_s"]["prefill_fill"] = took
        res["fill_bytes"] = fill
        self.say(f"cluster up in {res['setup_s']['cluster_up']:.1f}s; filled {mib(fill)} of `fill` in {took:.1f}s "
                 f"({fill / took / 1e6:.0f} MB/s), fg prefilled in {res['setup_s']['prefill_fg']:.1f}s")
        st = status(self.root)
        held = {n: node_bytes(st, n) for n in pair}
        victim = max(pair, key=lambda n: (held[n], -n))
        spare = next(n for n in pair if n != victim)
        groups_before = {g["group"]: list(g["members"]) for g in st["groups"]}
        vol_groups = {v["name"]: v["groups"] for v in st["volumes"]}
        fg_groups = vol_groups["fg"]
        victim_groups = sorted(g for g, m in groups_before.items() if victim in m)
        leading = sorted(g["group"] for g in st["groups"] if g["leader"] == victim)
        res.update(victim=victim, spare=spare, rack=racks[victim], replica_bytes_by_node=held,
                   victim_bytes=held[victim], planned_victim=planned, groups_before=groups_before,
                   volume_groups=vol_groups, victim_groups=victim_groups, victim_leading=leading,
                   fg_group_loses_member=any(g in victim_groups for g in fg_groups),
                   fg_group_loses_leader=any(g in leading for g in fg_groups),
                   victim_group_bytes={g["group"]: g["allocated_bytes"] for g in st["groups"]
                                       if g["group"] in victim_groups})
        if held[victim] < self.size:
            raise RuntimeError(f"victim n{victim} holds {mib(held[victim])} < {mib(self.size)}: {held}")
        self.say(f"victim n{victim} (rack {racks[victim]}, {mib(held[victim])} in groups {victim_groups}, leads "
                 f"{leading or 'none'}), spare n{spare}; fg volume in groups {fg_groups}"
                 f"{' (loses a member: the victim)' if res['fg_group_loses_member'] else ''}")

        # foreground load, then the "before" window, polled as during the rebuild
        with LoadProbe() as probe:
            self.fg = Foreground(f"{uri}/fg", self.work)
            t_open = time.monotonic() + RAMP_S
            t_kill_at = t_open + a.before
            last_st: dict[str, Any] | None = None
            while time.monotonic() < t_kill_at:
                if not self.fg.alive():
                    raise RuntimeError(f"foreground fio ended early: {self.fg.stop()}")
                s, _ = self.poll()
                if s is not None:
                    last_st = s
                time.sleep(max(0.0, min(POLL_S, t_kill_at - time.monotonic())))  # pacing
            if last_st is None:
                raise RuntimeError("cluster_status failed through the whole before window")
            sent0 = repair_sent(last_st, skip=victim)
            res["counters_before"] = counters_of(last_st, victim)
            res["terms_before"] = {g["group"]: g["term"] for g in last_st["groups"]}
            pid = node_pid(self.root, victim)
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            res["t_kill"] = t_kill
            res["t_fg_start"] = self.fg.t_start
            self.say(f"killed n{victim} (pid {pid}); waiting for the detector "
                     f"({a.down_grace_ms or DOWN_GRACE_DEFAULT_MS} ms down grace), the removal, the copy")
            self.watch(victim, t_kill, sent0)
            # the "after" window
            t_end = time.monotonic() + a.after
            while time.monotonic() < t_end:
                self.poll()
                time.sleep(max(0.0, min(POLL_S, t_end - time.monotonic())))  # pacing
            res["t_fg_stop"] = time.time()
            res["fio_fg"] = self.fg.stop()
        res["machine"] = {"load_before": probe.machine.load_before, "load_after": probe.machine.load_after,
                          "steal_pct": probe.machine.steal_pct, "busy_pct": probe.machine.busy_pct}
        self.windows()
        res["poll_errors"] = self.poll_errors
        return res

    def watch(self, victim: int, t_kill: float, sent0: dict[int, int]) -> None:
        """Poll until whole again (or the deadline), recording the phases and the streams."""
        a, res = self.a, self.res
        rate = a.repair_rate if a.repair_rate is not None else REPAIR_RATE_DEFAULT
        grace_s = (a.down_grace_ms or DOWN_GRACE_DEFAULT_MS) / 1000
        timeout = a.timeout or (grace_s + 120 + 3 * res["victim_bytes"] / (rate or 20e6))
        deadline = time.monotonic() + timeout
        streams: dict[str, dict[str, Any]] = {}
        t_down = t_removed = t_first_seen = t_copy_start = t_whole = t_suspect = None
        max_parallel = 0
        t_sent = None  # the last poll before the survivors' repair_bytes_sent first grew
        prev_max: dict[int, int] = {}
        prev_t = t_kill
        last_print = 0.0
        why = ""
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            st, t = self.poll()
            if st is not None:
                last = st
                vstate = next((n["map_state"] for n in st["nodes"] if n["id"] == victim), "?")
                if vstate == "suspect" and t_suspect is None:
                    t_suspect = t
                    self.say(f"+{t - t_kill:5.1f}s n{victim} suspect")
                if vstate == "down" and t_down is None:
                    t_down = t
                    self.say(f"+{t - t_kill:5.1f}s n{victim} down in the map")
                if t_removed is None and not any(victim in g["members"] for g in st["groups"]):
                    t_removed = t
                    self.say(f"+{t - t_kill:5.1f}s n{victim} removed from every group")
                copying = [r for r in st["repairs"] if r["state"] == "copying"]
                max_parallel = max(max_parallel, len(copying))
                for r in copying:
                    key = f"g{r['group']} n{r['from']}->n{r['to']}"
                    s = streams.setdefault(key, {"group": r["group"], "from": r["from"], "to": r["to"],
                                                 "first_seen": t, "start_est": t - r["elapsed_s"]})
                    s.update(last_seen=t, bytes_total=r["bytes_total"], bytes_done=r["bytes_done"],
                             rate_bytes_per_s=r["rate_bytes_per_s"])
                    s["start_est"] = min(s["start_est"], t - r["elapsed_s"])
                    if t_first_seen is None:
                        t_first_seen = t
                        self.say(f"+{t - t_kill:5.1f}s first copy: {key} ({mib(r['bytes_total'])})")
                    t_copy_start = min(t_copy_start or s["start_est"], s["start_est"])
                sent = sum(v - sent0.get(k, 0) for k, v in repair_sent(st, skip=victim).items())
                if sent > 0 and t_sent is None:
                    t_sent = prev_t
                    t_copy_start = min(t_copy_start or t_sent, t_sent)
                prev_t = t
                ok, why = whole(st, victim, prev_max)
                prev_max = group_applied_max(st)
                self.polls.append({"t": round(t - t_kill, 2), "victim": vstate, "copying": len(copying),
                                   "degraded": sum(1 for r in st["repairs"] if r["state"] == "degraded"),
                                   "sent": sent, "whole": ok,
                                   "leaders": {g["group"]: g["leader"] for g in st["groups"]},
                                   "terms": {g["group"]: g["term"] for g in st["groups"]},
                                   "nodes": {n["id"]: n["state"] for n in st["nodes"]},
                                   "sent_by": repair_sent(st, skip=victim), "why": why,
                                   "applied": {g["group"]: g["applied"] for g in st["groups"]
                                               if g["group"] in res["victim_groups"]}})
                if copying and (time.monotonic() - last_print >= 2.0):
                    last_print = time.monotonic()
                    parts = [f"g{r['group']} n{r['from']}->n{r['to']} {mib(r['bytes_done'])}/{mib(r['bytes_total'])} "
                             f"{r['rate_bytes_per_s'] / 1e6:.1f} MB/s ETA "
                             f"{'-' if r['eta_s'] is None else format(r['eta_s'], '.0f') + 's'}" for r in copying]
                    self.say(f"+{t - t_kill:5.1f}s copying: {' | '.join(parts)}; sent {mib(sent)}")
                elif t_down is not None and not ok and time.monotonic() - last_print >= 2.0:
                    last_print = time.monotonic()
                    self.say(f"+{t - t_kill:5.1f}s no stream listed; not whole: {why}; sent {mib(sent)}")
                if ok and t_removed is not None:
                    t_whole = t
                    res["repair_bytes_sent"] = sent
                    res["counter_growth"] = counter_growth(res["counters_before"], counters_of(st, victim))
                    self.say(f"+{t - t_kill:5.1f}s whole again: every group 3 members, none n{victim}, caught up; "
                             f"{mib(sent)} sent")
                    break
            if self.fg is not None and not self.fg.alive() and "fg_ended_at" not in res:
                res["fg_ended_at"] = time.time() - t_kill
                self.say("warning: the foreground fio ended during the rebuild")
            time.sleep(POLL_S)  # pacing of the status polls
        res.update(t_suspect=t_suspect, t_down=t_down, t_removed=t_removed, t_first_copy_seen=t_first_seen,
                   t_first_sent_bound=t_sent,
                   t_copy_start=t_copy_start, t_whole=t_whole, streams=list(streams.values()),
                   max_parallel_streams=max_parallel, repair_rate=rate, down_grace_s=grace_s,
                   timeout_s=timeout, polls=self.polls)
        if last is not None:
            res["groups_after"] = {g["group"]: g["members"] for g in last["groups"]}
            res["repairs_last"] = last["repairs"]
            res["node_errors_after"] = {n["id"]: n.get("errors", {}) for n in last["nodes"] if n.get("errors")}
        if t_whole is None:
            res["not_whole_why"] = why
            self.say(f"NOT whole after {timeout:.0f}s: {why}; repairs {last['repairs'] if last else '?'}")
            return
        terms = [p["terms"] for p in self.polls if "terms" in p]
        tb = res["terms_before"]
        res["term_changes"] = {g: t - tb[g] for g, t in terms[-1].items() if g in tb} if terms else {}
        res["detect_s"] = (t_copy_start or t_whole) - t_kill
        res["down_after_s"] = t_down - t_kill if t_down else None
        res["copy_s"] = t_whole - (t_copy_start or t_whole)
        res["kill_to_whole_s"] = t_whole - t_kill
        cs = res["copy_s"]
        res["rate_mb_s"] = res["victim_bytes"] / cs / 1e6 if cs > 0 else float("nan")
        res["sent_mb_s"] = res["repair_bytes_sent"] / cs / 1e6 if cs > 0 else float("nan")

    def windows(self) -> None:
        res = self.res
        assert self.fg is not None
        ts, lat = self.fg.samples()
        t_kill = res["t_kill"]
        t_copy = res.get("t_copy_start") or res.get("t_whole")
        t_whole = res.get("t_whole")
        w: dict[str, dict[str, float]] = {"before": window_stats(ts, lat, t_kill - self.a.before, t_kill)}
        if t_copy is not None:
            w["detection"] = window_stats(ts, lat, t_kill, t_copy)
        if t_copy is not None and t_whole is not None:
            w["rebuild"] = window_stats(ts, lat, t_copy, t_whole)
        if t_whole is not None:
            w["after"] = window_stats(ts, lat, t_whole, min(t_whole + self.a.after, res["t_fg_stop"]))
        res["fg_windows"] = w
        res["fg_writes_logged"] = len(ts)
        b, r = w["before"], w.get("rebuild")
        res["p99_ratio"] = r["p99_us"] / b["p99_us"] if r and b["p99_us"] else float("nan")
        res["p50_ratio"] = r["p50_us"] / b["p50_us"] if r and b["p50_us"] else float("nan")
        res["iops_ratio"] = r["iops"] / b["iops"] if r and b["iops"] else float("nan")


# -- report ------------------------------------------------------------------------------------------------------------

def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:,.{nd}f}"


def cell(vals: list[Any], nd: int = 1) -> str:
    s = spread([float(v) for v in vals if v is not None])
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return _f(s["median"], nd)
    return f"{_f(s['median'], nd)} [{_f(s['min'], nd)}-{_f(s['max'], nd)}]"


def markdown(rounds: list[dict[str, Any]], settings: str) -> str:
    ok = [r for r in rounds if r.get("t_whole")]
    rate = rounds[0].get("repair_rate", REPAIR_RATE_DEFAULT) if rounds else REPAIR_RATE_DEFAULT
    L = [f"## raftblock bench-rebuild: kill -9 of a node holding replicas, re-replication by the cluster ({settings})",
         "", f"{len(ok)} of {len(rounds)} round(s) whole again; median [min-max] over those rounds.", "",
         "| figure | value |", "|---|---|",
         f"| replica bytes rebuilt: the victim's groups (MiB) | "
         f"{cell([r['victim_bytes'] / (1 << 20) for r in rounds], 0)} |",
         f"| snapshot bytes sent by the survivors (MiB; more than rebuilt when a stream restarted) | "
         f"{cell([r['repair_bytes_sent'] / (1 << 20) for r in ok], 0)} |",
         f"| groups rebuilt (the victim's) | {cell([len(r['victim_groups']) for r in rounds], 0)} |",
         f"| kill -> victim `down` in the map (s) | {cell([r.get('down_after_s') for r in ok])} |",
         f"| detection: kill -> first snapshot chunk (s) | {cell([r.get('detect_s') for r in ok])} |",
         f"| copy time: first chunk -> whole again (s) | {cell([r.get('copy_s') for r in ok])} |",
         f"| kill -> whole again (s) | {cell([r.get('kill_to_whole_s') for r in ok])} |",
         f"| **rebuild rate (MB/s = replica bytes rebuilt / copy time)** | **{cell([r.get('rate_mb_s') for r in ok])}** |",
         f"| snapshot send rate (MB/s = bytes sent / copy time) | {cell([r.get('sent_mb_s') for r in ok])} |",
         f"| configured repair_bytes_per_s per sending node | {rate / 1e6:.1f} MB/s ({rate / (1 << 20):.0f} MiB/s)"
         f"{'' if rate else ' (unbounded)'} |",
         f"| groups copied in parallel (most streams seen at once) | "
         f"{cell([r.get('max_parallel_streams') for r in ok], 0)} |",
         f"| sending nodes (distinct `from` of the streams seen) | "
         f"{cell([len({s['from'] for s in r.get('streams', [])}) for r in ok], 0)} |",
         f"| snapshot images made by the survivors (kill -> whole) | "
         f"{cell([sum(r['counter_growth']['snapshot_images_made'].values()) for r in ok], 0)} |",
         f"| snapshots installed (kill -> whole) | "
         f"{cell([sum(r['counter_growth']['snapshots_installed'].values()) for r in ok], 0)} |",
         f"| Raft term changes in the victim's groups (kill -> whole) | "
         f"{cell([sum(r['term_changes'].get(g, 0) for g in r['victim_groups']) for r in ok], 0)} |",
         f"| Raft term changes in the foreground group (kill -> whole) | "
         f"{cell([sum(r['term_changes'].get(g, 0) for g in r['volume_groups']['fg']) for r in ok], 0)} |",
         "", f"### foreground: fio `{FG_JOB}` (bench/jobs/block.fio) on a 64 MiB volume, per window", "",
         "| window | duration s | IOPS | p50 us | p99 us | p99.9 us | max us | longest gap s |",
         "|---|---|---|---|---|---|---|---|"]
    for wname in WINDOWS:
        ws = [r["fg_windows"][wname] for r in rounds if wname in r.get("fg_windows", {})]
        if not ws:
            continue
        L.append(f"| {wname}{' (baseline)' if wname == 'before' else ''} | {cell([w['duration_s'] for w in ws])} | "
                 f"{cell([w['iops'] for w in ws], 0)} | {cell([w['p50_us'] for w in ws], 0)} | "
                 f"{cell([w['p99_us'] for w in ws], 0)} | {cell([w['p999_us'] for w in ws], 0)} | "
                 f"{cell([w['max_us'] for w in ws], 0)} | {cell([w['longest_gap_s'] for w in ws], 2)} |")
    L += ["", f"**p99 rebuild / p99 before: {cell([r.get('p99_ratio') for r in ok], 2)}** "
          f"(p50: {cell([r.get('p50_ratio') for r in ok], 2)}, IOPS: {cell([r.get('iops_ratio') for r in ok], 2)})", "",
          "Baseline: the same fio job on the same volume in the `before` window (the last "
          f"{rounds[0]['before_s'] if rounds else '?'} s before the kill). Windows: detection = kill to the first "
          "snapshot chunk sent; rebuild = that to whole again (every group 3 members, none the victim, all caught "
          "up, no repair listed; polled every 0.5 s, so a phase boundary is known to about 0.5 s); after = the "
          "following seconds. Latency is fio's per-write submission-to-completion time.", "",
          "### rounds", "",
          "| round | victim (rack) | victim MiB | fg group loses a member | down s | detect s | copy s | MB/s | "
          "streams | p99 before us | p99 rebuild us | ratio | fio errors |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        w = r.get("fg_windows", {})
        lose = ("leader" if r.get("fg_group_loses_leader") else "yes") if r.get("fg_group_loses_member") else "no"
        L.append(f"| {r['round']} | n{r['victim']} ({r['rack']}) | {r['victim_bytes'] / (1 << 20):,.0f} | {lose} | "
                 f"{_f(r.get('down_after_s'))} | {_f(r.get('detect_s'))} | {_f(r.get('copy_s'))} | "
                 f"{_f(r.get('rate_mb_s'))} | {len(r.get('streams', []))} | "
                 f"{_f(w.get('before', {}).get('p99_us'), 0)} | {_f(w.get('rebuild', {}).get('p99_us'), 0)} | "
                 f"{_f(r.get('p99_ratio'), 2)} | {r.get('fio_fg', {}).get('total_err', '-')} |")
    for r in rounds:
        if r.get("fg_group_loses_member"):
            L.append(f"\nRound {r['round']}: the foreground volume's group was on the victim: it lost a member"
                     f"{' (its leader: a Raft election in the detection window)' if r.get('fg_group_loses_leader') else ''}"
                     " and was rebuilt too.")
        if not r.get("t_whole"):
            L.append(f"\nRound {r['round']}: NOT whole again within {r.get('timeout_s', 0):.0f} s: "
                     f"{r.get('not_whole_why') or r.get('error')}")
    return "\n".join(L)


# -- main ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="--size 256M --rounds 1 --after 5")
    p.add_argument("--size", help="replica bytes the victim holds, at least (default 1G; quick 256M)")
    p.add_argument("--rounds", type=int, help="fresh clusters, one kill each (default 3; quick 1)")
    p.add_argument("--repair-rate", type=int, default=None,
                   help="bytes/s written into every node's [raft] repair_bytes_per_s (default: the product's, 64 MiB/s)")
    p.add_argument("--down-grace-ms", type=int, default=None,
                   help="[health] down_grace_ms of the metadata nodes (default: the product's, 15000)")
    p.add_argument("--before", type=float, default=15.0, help="seconds of foreground before the kill (baseline)")
    p.add_argument("--after", type=float, help="seconds of foreground after whole again (default 10; quick 5)")
    p.add_argument("--timeout", type=float, help="seconds from the kill to give up waiting for whole again "
                   "(default: down grace + 120 + 3 x victim bytes / repair rate)")
    p.add_argument("--workdir", help="where the clusters live (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep each round's cluster directory (data and logs)")
    a = p.parse_args(argv)
    a.size = parse_size(a.size or ("256M" if a.quick else "1G"))
    rounds = a.rounds or (1 if a.quick else 3)
    a.after = a.after if a.after is not None else (5.0 if a.quick else 10.0)
    if a.down_grace_ms is not None and a.down_grace_ms <= 3000:
        p.error("--down-grace-ms must exceed the suspect time (3 x 1000 ms heartbeats)")
    if a.repair_rate is not None and a.repair_rate < 0:
        p.error("--repair-rate must be >= 0 (0 = unbounded)")
    if shutil.which("fio") is None:
        p.error("fio not found (make sysdeps)")
    signal.signal(signal.SIGTERM, _on_term)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = RESULTS / f"rebuild-{stamp}{'-quick' if a.quick else ''}"
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="raftblock-rebuild-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench-rebuild: {rounds} round(s), victim >= {mib(a.size)}, {NODES} nodes / {RACKS} racks, repair rate "
          f"{'default' if a.repair_rate is None else a.repair_rate}, down grace "
          f"{a.down_grace_ms or DOWN_GRACE_DEFAULT_MS} ms, before {a.before:.0f}s, after {a.after:.0f}s; work dir {work}",
          flush=True)
    from raftblock.node.cluster import cluster_down

    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    interrupted = False
    for i in range(rounds):
        rdir = work / f"round-{i}"
        rdir.mkdir(exist_ok=True)
        root = rdir / "cluster"
        rnd = Round(i, root, rdir, a, a.size)
        rnd.res["before_s"] = a.before
        try:
            results.append(rnd.run())
        except KeyboardInterrupt:
            interrupted = True
            rnd.res["error"] = "interrupted"
            print("  interrupted: bringing the cluster down", flush=True)
        except Exception as e:  # noqa: BLE001 -- report the round, bring the cluster down, go on
            rnd.res["error"] = f"{type(e).__name__}: {e}"
            print(f"  [r{i}] failed: {rnd.res['error']}", flush=True)
        finally:
            if rnd.fg is not None:
                rnd.fg.kill()
            try:
                cluster_down(root)
            except Exception as e:  # noqa: BLE001
                print(f"  [r{i}] cluster_down: {e}", file=sys.stderr, flush=True)
        if "t_kill" in rnd.res and root.exists():
            rnd.res["logs"] = read_logs(root, rnd.res["t_kill"], rnd.res["victim"])
            le = rnd.res["logs"]["warnings_errors"]
            if le:
                print(f"  [r{i}] log warnings/errors: " + "; ".join(f"{k} x{v}" for k, v in list(le.items())[:8]))
        if "error" in rnd.res and not any(r is rnd.res for r in results):
            results.append(rnd.res)
        if not a.keep and not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
        if interrupted:
            break
    if not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)

    measured = [r for r in results if "fg_windows" in r]
    loads = [r["machine"]["load_before"] for r in measured if "machine" in r] or [float("nan")]
    steal = [r["machine"]["steal_pct"] for r in measured if "machine" in r] or [float("nan")]
    settings = (f"{stamp}, {len(measured)} round(s), victim >= {mib(a.size)}, down grace "
                f"{a.down_grace_ms or DOWN_GRACE_DEFAULT_MS} ms, load {min(loads):.1f}-{max(loads):.1f}, steal "
                f"{min(steal):.1f}-{max(steal):.1f}%, {os.cpu_count()} CPUs, {time.monotonic() - t0:.0f}s")
    md = markdown(measured, settings) if measured else f"## raftblock bench-rebuild ({settings}): no round measured"
    for r in results:
        if "error" in r:
            md += f"\n\nRound {r['round']} failed: {r['error']}"
    print()
    print(md)
    stem.with_suffix(".md").write_text(md + "\n")
    doc = {"when": stamp, "settings": {"size": a.size, "rounds": rounds, "quick": a.quick, "repair_rate": a.repair_rate,
                                       "down_grace_ms": a.down_grace_ms, "before_s": a.before, "after_s": a.after,
                                       "poll_s": POLL_S, "applied_slack": APPLIED_SLACK, "fg_job": FG_JOB,
                                       "fg_bytes": FG_BYTES, "nodes": NODES, "racks": RACKS},
           "versions": versions(), "rounds": results, "markdown": md}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {stem.with_suffix('.md')} {stem.with_suffix('.json')}")
    return 130 if interrupted else (0 if measured and all(r.get("t_whole") for r in measured) else 1)


if __name__ == "__main__":
    sys.exit(main())
