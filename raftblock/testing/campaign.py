# The fault campaign (issue 7): seeded scenarios, each a small cluster in network namespaces, four NBD
# clients recording a history through the gateway, one nemesis acting, then heal, a final read-back, and
# the linearizability checker's verdict. `python -m raftblock.testing.campaign` (`make faults`).
#
# Owns: the scenario plan a seed decides (mode, nemesis kind, targets, timing), running it, judging it,
# and the results file. A scenario's row: seed, mode, nemesis, which faults fired (FaultRecord), ops,
# checker verdict, acknowledged writes lost at the final read-back, I/O pause (longest gap between
# completed operations after each fault), verdict.
#
# Rules:
# 1. The seed decides everything random: `plan(seed)` is pure; the same seed replays the same scenario
#    (the cluster's own timing is not seeded: a replay is the same scenario, not the same interleaving).
#    Seeds 1..18 cover every (mode, nemesis) pair once, so every n*18 seeds cover each pair n times.
# 2. Results append to a JSONL file, one line per scenario, written when it ends; seeds already in it
#    are skipped unless --rerun. The history of a scenario that is not a pass is kept beside it.
# 3. A scenario always brings its processes and namespaces down (finally), whatever failed.
# 4. A checker violation is a finding about the product: the history is kept and the seed printed; the
#    checker is never adjusted to make it pass.
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from raftblock.node import cluster as cl
from raftblock.obs.log import configure
from raftblock.testing.linearizability import History, Op, check
from raftblock.testing.nemesis import PAUSE_MAX_S, Nemesis
from raftblock.testing.netns import Net, NetCluster, cluster_hosts
from raftblock.testing.serve import kill_group

log = structlog.get_logger("raftblock.testing.campaign")

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "integration" / "clients" / "nbd_history_client.py"
SYSTEM_PYTHON = "/usr/bin/python3"
DEFAULT_RESULTS = REPO / "bench" / "results" / "faults.jsonl"
KINDS = ("kill", "pause", "partition_node", "partition_rack", "partition_leader_rack", "partition_bridge",
         "power_cut", "bit_flip", "disk_full")
MODES = ("raft", "chain")
COMBOS = [(m, k) for k in KINDS for m in MODES]
DEFAULT_SEEDS = 54  # 3 x every (mode, nemesis) pair
CLIENTS = 4
NBLOCKS = 32  # shared blocks, all in the volume's one extent group
COLD = 16  # blocks [NBLOCKS, NBLOCKS + COLD): written once before the load, read only at the end
VOLUME_BYTES = 64 << 20
LOAD_S = 26.0
OPS_MIN = 500
CHECK_TIMEOUT_S = 60.0
PAUSE_WINDOW_S = 10.0  # a fault's pause is looked for from its firing to this long after its healing

# One pass over blocks [FIRST, FIRST+COUNT) as client 0, one request at a time, each retried (with
# reconnects) until a deadline, recorded in the history format: "r" reads every block (the final
# read-back), "w" writes block b tagged (0, b + 1) (the cold blocks a bit-flip scenario corrupts).
BLOCK_PASS = r"""
import json, struct, sys, time
import nbd
repo, uri, path = sys.argv[1], sys.argv[2], sys.argv[3]
first, count, deadline_s, mode = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
sys.path.insert(0, repo)
from raftblock.testing.linearizability import History
h = History(path)
end = time.monotonic() + deadline_s
conn, done, errors = None, 0, 0
for block in range(first, first + count):
    while time.monotonic() < end:
        if conn is None:
            try:
                conn = nbd.NBD(); conn.connect_uri(uri)
            except nbd.Error:
                conn = None; time.sleep(0.1); continue
        data = struct.pack(">QQ", 0, block + 1) * 256
        op = h.invoke(0, mode, block, data if mode == "w" else None)
        try:
            if mode == "w":
                conn.pwrite(data, block * 4096); h.ok(op)
            else:
                h.ok(op, bytes(conn.pread(4096, block * 4096)))
            done += 1
            break
        except nbd.Error:
            h.timeout(op); errors += 1; conn = None
h.close()
print(json.dumps({"done": done, "errors": errors}))
"""


@dataclass
class Scenario:
    seed: int
    mode: str
    nemesis: str
    target: str  # a role: "leader" (Raft leader / chain head), "tail", "follower", "meta", "rack"
    fire_after_s: float  # from the moment every client has started
    hold_s: float  # how long the fault stays before it is healed (restart, SIGCONT, heal, ballast removed)
    flips: int = 0
    nodes: int = 3
    racks: int = 3

    def replay(self) -> str:
        if plan(self.seed) != self:  # a fixed scenario of tests/faults/test_campaign.py
            return "pytest tests/faults/test_campaign.py"
        return f"make faults SEEDS={self.seed} RERUN=1   # python -m raftblock.testing.campaign --seeds {self.seed} --rerun"


def plan(seed: int) -> Scenario:
    rng = random.Random(seed)
    mode, kind = COMBOS[(seed - 1) % len(COMBOS)]
    roles = {"kill": ["leader", "leader", "follower", "meta"], "pause": ["leader", "leader", "follower"],
             "partition_node": ["leader", "follower"], "partition_rack": ["rack"],
             "partition_leader_rack": ["leader"], "partition_bridge": ["leader", "follower"],
             "power_cut": ["all"], "bit_flip": ["leader"], "disk_full": ["leader", "follower"]}[kind]
    target = rng.choice(roles)
    if mode == "chain" and target == "follower" and rng.random() < 0.5:
        target = "tail"
    hold = rng.uniform(3.0, 7.0) if kind != "pause" else rng.uniform(2.0, min(7.0, PAUSE_MAX_S))
    return Scenario(seed, mode, kind, target, fire_after_s=round(rng.uniform(4.0, 7.0), 2), hold_s=round(hold, 2),
                    flips=rng.randint(3, 8) if kind == "bit_flip" else 0)


# --- one scenario ----------------------------------------------------------------------------------
def _roles(c: NetCluster, gid: int, mode: str) -> dict[str, Any]:
    st = c.status()
    g = next(g for g in st["groups"] if g["group"] == gid)
    members = list(g["members"])
    leader = (g["leader"] or members[0]) if mode == "raft" else members[0]
    tail = members[-1]
    followers = [m for m in members if m != leader]
    return {"leader": leader, "tail": tail, "followers": followers, "members": members, "status": st}


def _node_counters(status: dict[str, Any], node_id: int) -> dict[str, int]:
    n: dict[str, Any] = next((n for n in status["nodes"] if n["id"] == node_id), {})
    return {k: int(v) for k, v in n.get("counters", {}).items() if k in cl.ERROR_COUNTERS}


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _until(t: float) -> None:
    """The nemesis's schedule: fire or heal at monotonic time T (a planned delay, not synchronisation)."""
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def _history_events(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_scenario(sc: Scenario, work: Path) -> dict[str, Any]:
    """Run one scenario in WORK (made empty first); return its result row (JSON-able)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.monotonic()
    rng = random.Random(sc.seed * 7919 + 1)
    row: dict[str, Any] = {"seed": sc.seed, "mode": sc.mode, "nemesis": sc.nemesis, "plan": asdict(sc),
                           "replay": sc.replay(), "work": str(work)}
    print(f"seed {sc.seed}: {sc.mode} {sc.nemesis} ({sc.target}, fire +{sc.fire_after_s}s, hold {sc.hold_s}s); "
          f"replay: {sc.replay()}", flush=True)
    net = Net.create(cluster_hosts(sc.nodes, sc.racks))
    # disk full: every node on a small file system, so the target is picked by its role when the fault fires
    small = frozenset(range(1, sc.nodes + 1)) if sc.nemesis == "disk_full" else frozenset()
    c = NetCluster(work / "cluster", net, nodes=sc.nodes, racks=sc.racks, replication=sc.mode,
                   disk="volatile-tear" if sc.nemesis == "power_cut" else "os", small_disks=small)
    nem = Nemesis(c, rng)
    histories = [work / f"history-{i}.jsonl" for i in range(1, CLIENTS + 1)]
    readback = work / "history-0.jsonl"
    clients: list[subprocess.Popen[bytes]] = []
    notes: list[str] = []
    try:
        c.configure()
        c.start()
        with net.entered("ct"):
            c.wait_healthy()
            vol = cl.volume_create(c.root, "vol", VOLUME_BYTES, sc.mode)
            gid = vol["groups"][0]
            extents = {gid << 32}
            uri = f"{c.nbd_uri}/vol"
            # cold blocks, written once: a bit flip in them stays until the final read-back finds it
            cold = _block_pass(uri, work / "history-cold.jsonl", NBLOCKS, COLD, "w")
            if cold.get("done") != COLD:
                raise RuntimeError(f"could not write the cold blocks: {cold}")
            clients = [subprocess.Popen([SYSTEM_PYTHON, str(CLIENT), str(REPO), uri, str(p), str(i + 1), str(NBLOCKS),
                                         str(sc.seed * 100 + i), str(LOAD_S)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                       for i, p in enumerate(histories)]
            _wait(lambda: all(_history_events(p) >= 20 for p in histories), 30, "every client to get going")
            t_load = time.monotonic()
            _until(t_load + sc.fire_after_s - 0.3)
            roles = _roles(c, gid, sc.mode)  # just before firing: leadership moves (preferred leaders)
            row["roles_before"] = {k: v for k, v in roles.items() if k != "status"}
            _until(t_load + sc.fire_after_s)
            counters_before = _fire(sc, c, nem, roles, extents, t_load)
            _until(t_load + sc.fire_after_s + sc.hold_s)
            _heal(sc, nem, roles)
            outs = []
            for p in clients:
                try:
                    outs.append(p.communicate(timeout=LOAD_S + 60))
                except subprocess.TimeoutExpired:
                    notes.append("a client did not finish in time (killed)")
                    kill_group(p)
                    outs.append(p.communicate())
            row["clients"] = [_last_json(o) for o, _ in outs]
            nem.heal_all()
            t_heal = time.monotonic()
            try:
                c.wait_healthy(timeout_s=60)
            except cl.ClusterError as e:
                notes.append(f"not healthy 60 s after heal: {e}")
            row["healthy_after_heal_s"] = round(time.monotonic() - t_heal, 2)
            row["readback"] = _block_pass(uri, readback, 0, NBLOCKS + COLD, "r")
            if counters_before is not None:
                node, before = counters_before
                try:
                    after = _node_counters(c.status(), node)
                    row["corruption"] = {"node": node, **{k: after.get(k, 0) - before.get(k, 0) for k in
                                                          ("corrupt_reads", "read_repairs", "blocks_repaired",
                                                           "read_repair_failed", "scrub_errors_found",
                                                           "scrub_blocks_repaired", "scrub_mismatches")}}
                except cl.ClusterError as e:
                    notes.append(f"no counters after the run: {e}")
    except Exception as e:  # noqa: BLE001 - a harness or cluster failure is reported as the scenario's verdict
        row["error"] = f"{type(e).__name__}: {e}"
        log.exception("campaign.scenario_error", seed=sc.seed)
    finally:
        for p in clients:
            kill_group(p)
        try:
            nem.heal_all()
        except Exception as e:  # noqa: BLE001
            notes.append(f"heal_all failed: {e}")
        c.down()
        net.destroy()
    row["faults"] = [r.to_json() for r in nem.records]
    row["notes"] = notes
    _judge(row, histories, readback)
    row["seconds"] = round(time.monotonic() - t_start, 1)
    return row


def _fire(sc: Scenario, c: NetCluster, nem: Nemesis, roles: dict[str, Any], extents: set[int],
          t_load: float) -> tuple[int, dict[str, int]] | None:
    leader, tail, followers = roles["leader"], roles["tail"], roles["followers"]
    node = {"leader": leader, "tail": tail, "follower": followers[0] if followers else leader}.get(sc.target, leader)
    k = sc.nemesis
    if k == "kill":
        nem.kill("m1" if sc.target == "meta" else f"n{node}")
    elif k == "pause":
        nem.pause(f"n{node}")
    elif k == "partition_node":
        nem.partition_hosts(k, [f"n{node}"], role=sc.target)
    elif k in ("partition_rack", "partition_leader_rack"):
        rack = c.net.hosts[f"n{node}"].rack if k == "partition_leader_rack" else \
            random.Random(sc.seed).choice(sorted({h.rack for h in c.net.hosts.values() if h.rack}))
        assert rack is not None
        nem.partition_hosts(k, c.net.rack_hosts(rack), rack=rack)
    elif k == "partition_bridge":
        nem.partition_bridge(f"n{node}")
    elif k == "power_cut":
        nem.power_cut()
    elif k == "bit_flip":
        # the chain's reads are served by the tail, Raft's by the leader: flip where the reads go
        target = tail if sc.mode == "chain" else leader
        before = _node_counters(roles["status"], target)
        nem.bit_flips(target, extents, sc.flips, blocks=set(range(NBLOCKS, NBLOCKS + COLD)))
        return target, before
    elif k == "disk_full":
        nem.disk_full(node)
    else:
        raise ValueError(f"unknown nemesis {k}")
    if nem.records:  # the role the target had when the fault fired, as the last status said
        nem.records[-1].details.update(role=sc.target, leader_at_fire=leader, members=roles["members"])
    return None


def _heal(sc: Scenario, nem: Nemesis, roles: dict[str, Any]) -> None:
    k = sc.nemesis
    if k == "kill":
        for name in list(nem._killed):
            nem.restart(name)
    elif k == "pause":
        for name in list(nem._paused):
            nem.resume(name)
    elif k.startswith("partition"):
        nem.heal()
    elif k == "disk_full":
        for node in list(nem._full):
            nem.disk_free(node)


def _block_pass(uri: str, history: Path, first: int, count: int, mode: str) -> dict[str, Any]:
    r = subprocess.run([SYSTEM_PYTHON, "-c", BLOCK_PASS, str(REPO), uri, str(history), str(first), str(count), "60",
                        mode], capture_output=True, timeout=120)
    out = _last_json(r.stdout)
    return out if isinstance(out, dict) else {"done": 0, "errors": None, "stderr": r.stderr.decode()[-500:]}




def _last_json(out: bytes) -> Any:
    for line in reversed(out.decode(errors="replace").strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


# --- judging ---------------------------------------------------------------------------------------
def lost_acked_writes(ops: list[Op]) -> list[int]:
    """Blocks whose final read-back (client 0) lost an acknowledged write: the value read is not that of
    the newest acknowledged write or of a write not known to precede it (concurrent or later)."""
    final = {}
    for op in ops:
        if op.client == 0 and op.kind == "r" and op.ret is not None and op.ok:
            final[op.key] = op.value
    writes: dict[int, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "w":
            writes[op.key].append(op)
    lost = []
    for key, value in sorted(final.items()):
        acked = [w for w in writes[key] if w.ret is not None and w.ok]
        if not acked:
            continue
        src = [w for w in writes[key] if w.value == value]
        src_ret = min((w.ret if w.ret is not None else float("inf")) for w in src) if src else None
        if src_ret is None or any(w.call > src_ret for w in acked):
            lost.append(key)
    return lost


def io_pauses(ops: list[Op], faults: list[dict[str, Any]]) -> list[float]:
    """Per fired fault, the longest gap between consecutive completed operations (any client but the
    read-back) from its firing to PAUSE_WINDOW_S after its healing."""
    done = sorted(op.ret for op in ops if op.client != 0 and op.ret is not None)
    # no completion after a fault at all: the pause lasts until the end of what was observed
    end = max((t for op in ops for t in (op.call, op.ret) if t is not None), default=0.0)
    out = []
    for f in faults:
        if not f.get("fired"):
            continue
        t0 = float(f["fired_at"])
        t1 = float(f.get("healed_at") or t0) + PAUSE_WINDOW_S
        times = [t0] + [t for t in done if t0 < t <= t1]
        times += [t for t in done if t > t1][:1] or [max(end, t0)]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        out.append(round(max(gaps, default=0.0), 3))
    return out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _judge(row: dict[str, Any], histories: list[Path], readback: Path) -> None:
    cold = readback.with_name("history-cold.jsonl")
    ops = [op for p in [*histories, cold, readback] if p.exists() for op in History.load(p).to_ops()]
    row["ops"] = sum(1 for op in ops if op.client != 0)
    row["ops_completed"] = sum(1 for op in ops if op.client != 0 and op.ret is not None)
    row["indeterminate"] = sum(1 for op in ops if op.client != 0 and op.ret is None)
    res = check(ops, timeout_s=CHECK_TIMEOUT_S) if ops else None
    row["linearizable"] = None if res is None else res.ok
    row["violations"] = 1 if res is not None and res.ok is False else 0
    if res is not None and res.ok is False:
        row["violation"] = res.explain
    lost = lost_acked_writes(ops)
    row["lost_acked_writes"] = len(lost)
    row["lost_blocks"] = lost
    pauses = io_pauses(ops, row["faults"])
    row["pauses_s"] = pauses
    row["pause_p50_s"], row["pause_p99_s"] = _pct(pauses, 0.5), _pct(pauses, 0.99)
    fired = [f for f in row["faults"] if f["fired"]]
    readback_ok = bool(row.get("readback")) and row["readback"].get("done") == NBLOCKS + COLD
    flipped = {b for f in fired if f["kind"] == "bit_flip" for b in f["details"].get("blocks", [])}
    repaired = row.get("corruption", {}).get("blocks_repaired", 0)
    if row.get("error"):
        verdict = "ERROR"
    elif row["violations"] or lost:
        verdict = "FAIL"
    elif not fired:
        verdict = "NO-FAULT"
    elif row["linearizable"] is None:
        verdict = "UNKNOWN"
    elif flipped and repaired < len(flipped):
        verdict = "UNREPAIRED"  # a flipped block was read back right, but the node did not count a repair
    elif not readback_ok:
        verdict = "UNAVAILABLE"  # the volume did not serve the final read-back within its deadline after heal
    elif row["ops"] < OPS_MIN:
        verdict = "SHORT"
    else:
        verdict = "pass"
    row["verdict"] = verdict


# --- the campaign ----------------------------------------------------------------------------------
def _fault_summary(row: dict[str, Any]) -> str:
    parts = []
    for f in row.get("faults", []):
        s = f"{f['kind']}:{f['target']}"
        if not f["fired"]:
            s += f"(NOT FIRED: {f.get('error')})"
        elif f["kind"] == "bit_flip":
            c = row.get("corruption", {})
            s += f"({len(f['details'].get('flips', []))} flips, corrupt_reads {c.get('corrupt_reads', '?')}, " \
                 f"scrub found {c.get('scrub_errors_found', '?')}, repaired {c.get('blocks_repaired', '?')})"
        parts.append(s)
    return "; ".join(parts) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    out = ["| seed | mode | nemesis | faults fired | ops | violations | lost acked | pause p50/p99 s | verdict |",
           "|---:|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: r["seed"]):
        out.append(f"| {r['seed']} | {r['mode']} | {r['nemesis']} | {_fault_summary(r)} | {r.get('ops', 0)} | "
                   f"{r.get('violations', 0)} | {r.get('lost_acked_writes', 0)} | "
                   f"{f(r.get('pause_p50_s'))} / {f(r.get('pause_p99_s'))} | {r['verdict']} |")
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["mode"], r["nemesis"])].append(r)
    out += ["", "| mode | nemesis | scenarios | fired | pass | pause p50 s | pause p99 s |", "|---|---|---:|---:|---:|---|---|"]
    for (mode, kind), rs in sorted(by.items()):
        pauses = [p for r in rs for p in r.get("pauses_s", [])]
        out.append(f"| {mode} | {kind} | {len(rs)} | {sum(1 for r in rs if any(x['fired'] for x in r['faults']))} | "
                   f"{sum(1 for r in rs if r['verdict'] == 'pass')} | {f(_pct(pauses, 0.5))} | {f(_pct(pauses, 0.99))} |")
    return "\n".join(out)


def load_results(path: Path) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            rows[int(r["seed"])] = r  # the latest run of a seed wins
    return rows


def parse_seeds(spec: str) -> list[int]:
    """"7", "1-54", "3,9,12-14"."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftblock.testing.campaign", description=__doc__)
    ap.add_argument("--seeds", default=f"1-{DEFAULT_SEEDS}", help="e.g. 7, 1-54, 3,9,12-14 (default 1-54)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSONL file (appended; resumes by seed)")
    ap.add_argument("--rerun", action="store_true", help="run seeds already in the results file again")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep every scenario's directory, not only failures")
    ap.add_argument("--log-format", default="console", choices=["auto", "json", "console"])
    args = ap.parse_args(argv)
    configure(args.log_format)
    seeds = parse_seeds(args.seeds)
    done = load_results(args.results)
    todo = [s for s in seeds if args.rerun or s not in done]
    print(f"campaign: {len(seeds)} seeds, {len(seeds) - len(todo)} already in {args.results}, running {len(todo)}",
          flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    keep_dir = args.results.parent / "faults"
    scratch = args.work or Path(tempfile.mkdtemp(prefix="raftblock-faults-"))
    for seed in todo:
        sc = plan(seed)
        work = scratch / f"seed-{seed}"
        row = run_scenario(sc, work)
        if row["verdict"] != "pass" or args.keep:
            dest = keep_dir / f"seed-{seed}"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                shutil.copytree(work, dest, ignore=shutil.ignore_patterns("*.ext4", "engine", "wal", "*.sock"),
                                symlinks=True)
                row["kept"] = str(dest)
            except (OSError, shutil.Error) as e:
                row["kept"] = f"{dest} (partly: {e})"
        shutil.rmtree(work, ignore_errors=True)
        row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[seed] = row
        print(f"seed {seed}: {row['verdict']}: {row.get('ops', 0)} ops, violations {row.get('violations')}, "
              f"lost {row.get('lost_acked_writes')}, pauses {row.get('pauses_s')}, faults {_fault_summary(row)}"
              f"{', error ' + row['error'] if row.get('error') else ''} ({row['seconds']} s)"
              f"{'; kept in ' + row['kept'] if row.get('kept') else ''}", flush=True)
    if args.work is None:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [done[s] for s in seeds if s in done]
    print()
    print(table(rows))
    bad = [r["seed"] for r in rows if r["verdict"] != "pass"]
    if bad:
        print(f"\nnot passed: seeds {bad}; replay one with `make faults SEEDS=n RERUN=1`")
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
