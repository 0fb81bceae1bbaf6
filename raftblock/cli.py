"""The `raftblock` command line.

Rule 1: errors are one line on stderr and a non-zero exit (0 done, 1 failed, 2 usage); `--help` works
everywhere, `--json` on every command that reports something, `--version`. RAFTBLOCK_DEBUG=1 shows the
traceback of an OSError/ValueError instead of its one line.
Rule 2: long-running commands configure logging (obs.log) and run one event loop (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftblock.units import parse_size


def _loop_run(coro: object) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type,no-any-return]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type,no-any-return]


def _volume_arg(text: str) -> tuple[str, int]:
    from raftblock.meta.state import VOLUME_NAME_BYTES_MAX, valid_volume_name

    name, sep, size = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:SIZE, got {text!r}")
    if not valid_volume_name(name):
        raise argparse.ArgumentTypeError(f"volume name {name!r}: 1-{VOLUME_NAME_BYTES_MAX} of [A-Za-z0-9._-]")
    try:
        return name, parse_size(size)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0-65535 (0 picks a free one)")
    return port


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_serve(args: argparse.Namespace) -> int:
    from raftblock.gateway.nbd_server import GatewayConfig
    from raftblock.node.dirlock import DirectoryInUse
    from raftblock.node.serve import ServeError, VolumeSpec, run_serve
    from raftblock.obs.log import configure
    from raftblock.storage.engine import EngineConfig

    configure(args.log_format, args.log_level)
    specs = [VolumeSpec(n, s) for n, s in args.volume]
    gw = GatewayConfig(bind=args.bind, port=args.port)
    ec = EngineConfig(segment_size_bytes=args.segment_size)
    try:
        return _loop_run(run_serve(_target(args), specs, gw, disk_mode=args.disk, engine_config=ec))
    except DirectoryInUse as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 1
    except ServeError as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 1


# The cluster directory of every cluster command: --dir, else $RAFTBLOCK_DIR, else .raftblock (two clusters
# side by side: `export RAFTBLOCK_DIR=/tmp/c2` in the second shell, `make demo DIR=/tmp/c2 NBD_PORT=10810`).
DEMO_DIR = Path(os.environ.get("RAFTBLOCK_DIR") or ".raftblock")
# A deployed cluster's file (metadata addresses, secret), written by ansible/roles/common on every host
ETC_CLUSTER_FILE = Path("/etc/raftblock/cluster.toml")


def _local_target(args: argparse.Namespace) -> Path:
    """A command that starts or stops this machine's processes: --dir, else $RAFTBLOCK_DIR, else .raftblock."""
    return Path(args.dir) if args.dir else DEMO_DIR


def _target(args: argparse.Namespace) -> Path:
    """Which cluster a command addresses: --cluster FILE, else --dir DIR, else $RAFTBLOCK_CLUSTER, else
    $RAFTBLOCK_DIR, else /etc/raftblock/cluster.toml when it exists (a deployed host), else .raftblock. A
    cluster file names a deployed cluster; DIR/cluster.toml of a local one is that directory."""
    if getattr(args, "cluster", None):
        return Path(args.cluster)
    if getattr(args, "dir", None):
        return Path(args.dir)
    if os.environ.get("RAFTBLOCK_CLUSTER"):
        return Path(os.environ["RAFTBLOCK_CLUSTER"])
    if os.environ.get("RAFTBLOCK_DIR"):
        return Path(os.environ["RAFTBLOCK_DIR"])
    if ETC_CLUSTER_FILE.exists() and not DEMO_DIR.exists():
        return ETC_CLUSTER_FILE
    return DEMO_DIR
# None: a new cluster gets 10809, an existing one keeps its configured port (a re-run of `make demo` works).
DEMO_NBD_PORT = int(os.environ["RAFTBLOCK_NBD_PORT"]) if os.environ.get("RAFTBLOCK_NBD_PORT") else None
DEMO_ISCSI_PORT = int(os.environ["RAFTBLOCK_ISCSI_PORT"]) if os.environ.get("RAFTBLOCK_ISCSI_PORT") else None


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _ranges(ids: list[int]) -> str:
    """`groups 4-9, 12` for a sorted list of ids."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
    return f"group{'s' if len(ids) != 1 else ''} {text}"


def _report(args: argparse.Namespace, obj: object, text: str) -> int:
    """A command's result: `obj` as JSON with --json, else the line `text`."""
    if args.json:
        _print_json(obj)
    else:
        print(text)
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import cluster_up

    notes: list[str] = []
    uri = cluster_up(_local_target(args), nodes=args.nodes, racks=args.racks, nbd_port=args.nbd_port,
                     port_base=args.port_base, disk=args.disk, replication=args.replication, notes=notes,
                     gateway=args.gateway, iscsi_port=args.iscsi_port, tls=args.tls)
    for n in notes:
        print(f"raftblock cluster up: {n}", file=sys.stderr)
    return _report(args, {"uri": uri, "dir": str(_local_target(args)), "notes": notes}, uri)


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import cluster_down

    stopped = cluster_down(_local_target(args), args.node, args.force)
    return _report(args, {"stopped": stopped}, "stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import cluster_status
    from raftblock.units import format_size

    st = cluster_status(_target(args))
    if args.json:
        _print_json(st)
        return 0
    print(f"cluster {st['cluster_id']}   gateway: {st['gateway']['uri'] or 'stopped'} (pid {st['gateway']['pid']})")
    if len(st["gateways"]) > 1:
        print("  gateways: " + "  ".join(f"{g['id']} {g['uri'] or 'stopped'}" for g in st["gateways"]))
    print("\nNODES\n  id  rack  address               pid      process      map      groups  leading  used/capacity"
          "        wal        errors")
    for n in st["nodes"]:
        errors = " ".join(f"{k}={v}" for k, v in n.get("errors", {}).items()) or "-"
        print(f"  {n['id']:<3} {n['rack']:<5} {n['address']:<21} {str(n['pid'] or '-'):<8} {n['state']:<12} {n['map_state']:<8} "
              f"{n.get('groups', '-'):<7} {n.get('leading', '-'):<8} "
              f"{format_size(n.get('used_bytes', 0)) + '/' + format_size(n.get('capacity_bytes', 0)):<20} "
              f"{format_size(n.get('wal_bytes', 0)):<10} {errors}")
    print("\nMETADATA GROUP\n  " + "  ".join(f"m{m['id']} {m['admin']} (pid {m['pid']})" for m in st["metadata"]))
    if st.get("status_url"):
        print(f"  status page: {st['status_url']}   metrics: /metrics on every process (--json: metrics_url)")
    print("\nEXTENT GROUPS\n  id   replication  members     leader  term  epoch")
    for g in st["groups"]:
        print(f"  {g['group']:<4} {g['replication']:<12} {','.join(map(str, g['members'])):<11} "
              f"{str(g['leader'] or '-'):<7} {g['term']:<5} {g['epoch']}")
    print_repairs(st["repairs"])
    if st["problems"]:
        print("\nNOT HEALTHY\n" + "\n".join(f"  {p}" for p in st["problems"]))
    print("\nVOLUMES\n  name             size        allocated   extents  groups       connections  attached by")
    for v in st["volumes"]:
        print(f"  {v['name']:<16} {format_size(v['size_bytes']):<11} {format_size(v['allocated_bytes']):<11} "
              f"{v['extents']:<8} {','.join(map(str, v['groups'])):<12} {v['attached']:<12} {v['attached_by'] or '-'}")
    return 0


def _bar(frac: float, width: int = 30) -> str:
    n = int(max(0.0, min(1.0, frac)) * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def print_repairs(repairs: list[dict[str, Any]]) -> None:
    from raftblock.units import format_size

    if not repairs:
        print("\nREPAIRS\n  none: every group has its full count of live copies")
        return
    print("\nREPAIRS\n  group  from  to   progress                              done/total            rate       ETA")
    for r in repairs:
        if r["state"] != "copying":
            print(f"  {r['group']:<6} {'-':<5} {'-':<4} {r['state']}: {r['why']}")
            continue
        frac = r["bytes_done"] / max(1, r["bytes_total"])
        eta = f"{r['eta_s']:.0f} s" if r["eta_s"] is not None else "-"
        print(f"  {r['group']:<6} n{r['from']:<4} n{r['to']:<3} {_bar(frac)} {frac * 100:5.1f}%  "
              f"{format_size(r['bytes_done']) + '/' + format_size(r['bytes_total']):<21} "
              f"{format_size(r['rate_bytes_per_s']) + '/s':<10} {eta}")


def cmd_repair_watch(args: argparse.Namespace) -> int:
    """Redraw the repairs every `interval` seconds until none is left (or Ctrl-C); --once: one frame
    (--json: the repairs as JSON, once)."""
    from raftblock.node.cluster import cluster_status

    while True:
        st = cluster_status(_target(args))
        if args.json:
            _print_json(st["repairs"])
            return 0
        if sys.stdout.isatty():
            print("\x1b[2J\x1b[H", end="")
        print(time.strftime("%H:%M:%S"), f"cluster {st['cluster_id']}")
        print_repairs(st["repairs"])
        sys.stdout.flush()
        if args.once or not st["repairs"]:
            return 0
        time.sleep(args.interval)


def cmd_volume_create(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_create
    from raftblock.qos import QosSpec
    from raftblock.units import format_size

    v = volume_create(_target(args), args.name, args.size, args.replication, qos=QosSpec(**_qos_changes(args)),
                      encrypt=args.encrypt)
    qos = _qos_text(v["qos"])
    return _report(args, v, f"created volume {v['name']} ({format_size(v['size_bytes'])}, {v['extents']} extents "
                            f"in {_ranges(v['groups'])}, replication {v['replication']}"
                            + (", encrypted" if v["encrypted"] else "")
                            + (f", QoS {qos})" if qos != "none" else ")"))


_QOS_ARGS = {"iops": "iops", "mbps": "bytes_per_s", "burst_iops": "burst_iops", "burst_mbps": "burst_bytes",
             "min_iops": "min_iops", "weight": "weight"}
MB = 1_000_000


def _qos_changes(args: argparse.Namespace) -> dict[str, int]:
    """The QoS options given (QosSpec field -> value); MB/s options are decimal megabytes."""
    out = {}
    for opt, field in _QOS_ARGS.items():
        v = getattr(args, opt)
        if v is not None:
            out[field] = round(v * MB) if opt.endswith("mbps") else int(v)
    return out


def _qos_text(q: dict[str, int]) -> str:
    parts = []
    if q["iops"]:
        parts.append(f"limit {q['iops']} IOPS (burst {q['burst_iops']})")
    if q["bytes_per_s"]:
        parts.append(f"limit {q['bytes_per_s'] / MB:g} MB/s (burst {q['burst_bytes'] / MB:g} MB)")
    if q["min_iops"]:
        parts.append(f"reserved {q['min_iops']} IOPS")
    if q["weight"] != 1:
        parts.append(f"weight {q['weight']}")
    return ", ".join(parts) or "none"


def _qos_opts(p: argparse.ArgumentParser) -> None:
    def nonneg(kind: type) -> Callable[[str], float]:
        def parse(text: str) -> float:
            try:
                v = kind(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
            if v < 0:
                raise argparse.ArgumentTypeError(f"{text} is negative")
            return float(v)
        return parse

    g = p.add_argument_group("QoS (0 = none; enforced at the gateway and on every node leading the volume)")
    g.add_argument("--iops", type=nonneg(int), default=None, metavar="N", help="limit: operations per second")
    g.add_argument("--mbps", type=nonneg(float), default=None, metavar="N", help="limit: MB/s (1 MB = 10^6 bytes)")
    g.add_argument("--burst-iops", type=nonneg(int), default=None, metavar="N",
                   help="operations that may go at once above --iops after an idle spell (default: one second's)")
    g.add_argument("--burst-mbps", type=nonneg(float), default=None, metavar="N",
                   help="MB that may go at once above --mbps (default: one second's)")
    g.add_argument("--min-iops", type=nonneg(int), default=None, metavar="N",
                   help="reservation: operations per second the volume gets even when the nodes are saturated")
    g.add_argument("--weight", type=nonneg(int), default=None, metavar="N",
                   help="share of what is left beyond reservations, relative to other volumes (1-10000, default 1)")


def cmd_volume_set_qos(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_set_qos

    changes = _qos_changes(args)
    if not changes and not args.clear:
        print("raftblock volume set-qos: nothing to set (--iops, --mbps, --burst-iops, --burst-mbps, --min-iops, "
              "--weight or --clear)", file=sys.stderr)
        return 2
    res = volume_set_qos(_target(args), args.name, changes, args.clear)
    return _report(args, res, f"QoS of {args.name}: {_qos_text(res['qos'])}")


class _Progress:
    """A progress bar on stderr with rate and ETA: redrawn in place on a terminal, a line every 5 s otherwise
    (a log, CI). `unit`: "B" for bytes, else items; `scale`: bytes per item for the rate when counting items."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, done_bytes: int | None = None) -> None:
        from raftblock.units import format_size

        now = time.monotonic()
        final = done >= total
        if self.quiet or (not final and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        el = max(1e-6, now - self.t0)
        frac = done / max(1, total)
        rate = (done_bytes if done_bytes is not None else done) / el
        eta = (el / frac - el) if 0 < frac < 1 else 0.0
        amount = f"{format_size(done_bytes)}" if done_bytes is not None else f"{done}/{total}"
        line = (f"{self.label} {_bar(frac)} {frac * 100:5.1f}%  {amount}  "
                f"{format_size(int(rate)) + '/s' if done_bytes is not None else f'{rate:.1f}/s'}  ETA {eta:.0f} s")
        print(("\r" + line + " " * 4) if self.tty else line, end="\n" if final or not self.tty else "",
              file=sys.stderr, flush=True)


def cmd_volume_clone(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_clone
    from raftblock.units import format_size

    v = volume_clone(_target(args), args.source, args.name, args.replication)
    return _report(args, v, f"created volume {v['name']} ({format_size(v['size_bytes'])}), a clone of {args.source}: "
                            f"it reads through to the snapshot until written or flattened")


def cmd_volume_flatten(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_flatten
    from raftblock.units import format_size

    bar = _Progress(f"flatten {args.name}", quiet=args.json)
    res = volume_flatten(_target(args), args.name, lambda done, total: bar(done * 4096, total * 4096, done * 4096))
    if res["parent"] is None:
        return _report(args, res, f"volume {args.name} is not a clone: nothing to flatten")
    return _report(args, res, f"volume {args.name} flattened: {format_size(res['copied_bytes'])} copied from "
                              f"{res['parent']}; it no longer depends on it")


def cmd_volume_resize(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_resize
    from raftblock.units import format_size

    r = volume_resize(_target(args), args.name, args.size, args.allow_shrink)
    grown = r["size_bytes"] >= r["old_size_bytes"]
    return _report(args, r, f"volume {args.name}: {format_size(r['old_size_bytes'])} -> {format_size(r['size_bytes'])}"
                            + ("; NBD clients see the new size when they next connect" if grown else ""))


def cmd_volume_rollback(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_rollback
    from raftblock.units import format_size

    bar = _Progress(f"rollback {args.name}", quiet=args.json)
    r = volume_rollback(_target(args), args.name, args.snapshot,
                        lambda done, total: bar(done * 4096, total * 4096, done * 4096))
    return _report(args, r, f"volume {args.name} rolled back to {args.snapshot} "
                            f"({format_size(r['copied_bytes'])} copied back)")


def cmd_volume_list(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_list
    from raftblock.units import format_size

    vols = volume_list(_target(args))
    if args.json:
        _print_json(vols)
        return 0
    if vols:
        print(f"{'NAME':<20} {'SIZE':<10} {'REPLICATION':<12} {'STATE':<10} {'ATTACHED BY':<12} PARENT")
    for v in vols:
        print(f"{v['name']:<20} {format_size(v['size_bytes']):<10} {v['replication']:<12} {v['state']:<10} "
              f"{v['attached_by'] or '-':<12} {v['parent'] or '-'}")
    return 0


def cmd_volume_info(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_info
    from raftblock.units import format_size

    v = volume_info(_target(args), args.name)
    if args.json:
        _print_json(v)
        return 0
    print(f"volume {v['name']} (id {v['id']})\n"
          f"  size:        {format_size(v['size_bytes'])} ({v['size_bytes']} bytes)\n"
          f"  replication: {v['replication']}\n"
          f"  created:     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v['created_ms'] / 1000))}\n"
          f"  allocated:   {format_size(v['allocated_bytes'])}\n"
          f"  extents:     {v['extents']} of {format_size(v['extent_size_bytes'])}\n"
          f"  attached by: {v['attached_by'] or '-'} (attach epoch {v['attach_epoch']}, "
          f"{v['connections']} connection(s))\n"
          f"  QoS:         {_qos_text(v['qos'])}")
    enc = v["encryption"]
    print(f"  encryption:  {enc['cipher']}, key id {enc['key_id']} (wrapped by master key {enc['master_key']})"
          if enc else "  encryption:  none")
    print("  groups:      id    members     leader  term  epoch")
    for g in v["groups"]:
        print(f"               {g['group']:<5} {','.join(map(str, g['members'])):<11} {str(g['leader'] or '-'):<7} "
              f"{g['term']:<5} {g['epoch']}")
    for r in v["repairs"]:
        print(f"  repair:      group {r['group']}: {r['state']}" + (f" ({r['why']})" if r.get("why") else ""))
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_delete

    volume_delete(_target(args), args.name)
    return _report(args, {"deleted": args.name}, f"deleted volume {args.name}")


def cmd_volume_attach(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_attach

    epoch = volume_attach(_target(args), args.name, args.gateway, args.force)
    return _report(args, {"name": args.name, "gateway": args.gateway, "attach_epoch": epoch},
                   f"volume {args.name} attached to gateway {args.gateway} (attach epoch {epoch})")


def cmd_volume_detach(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_detach

    res = volume_detach(_target(args), args.name, args.force)
    return _report(args, res, f"volume {args.name} detached from gateway {res['attached_by']}" if res["detached"]
                   else f"volume {args.name} was not attached")


def cmd_volume_rename(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_rename

    res = volume_rename(_target(args), args.name, args.new_name)
    return _report(args, res, f"volume {args.name} renamed to {args.new_name}")


def cmd_volume_set_chap(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import volume_set_chap

    def secret(path: str | None) -> str:
        if path is None:
            return ""
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return text.strip()

    if args.clear:
        res = volume_set_chap(_target(args), args.name, "", "")
        return _report(args, res, f"CHAP removed from {args.name or 'discovery'}")
    if not args.user or args.secret_file is None:
        print("raftblock volume set-chap: --user and --secret-file are required (or --clear)", file=sys.stderr)
        return 2
    if bool(args.target_user) != (args.target_secret_file is not None):
        print("raftblock volume set-chap: mutual CHAP needs --target-user and --target-secret-file", file=sys.stderr)
        return 2
    res = volume_set_chap(_target(args), args.name, args.user, secret(args.secret_file),
                          args.target_user or "", secret(args.target_secret_file))
    what = "mutual CHAP" if args.target_user else "CHAP"
    return _report(args, res, f"{what} set for the iSCSI target of {args.name or 'discovery sessions'}")


def _snap_ref(text: str) -> tuple[str, str]:
    vol, sep, snap = text.partition("@")
    if not sep or not vol or not snap:
        raise argparse.ArgumentTypeError(f"expected VOLUME@SNAPSHOT, got {text!r}")
    return vol, snap


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import snapshot_create

    if args.group is not None:
        if args.volume is not None and args.name is not None:
            print("raftblock snapshot create: --group VOL1,VOL2 NAME, or VOL NAME, not both", file=sys.stderr)
            return 2
        volumes = [v for v in args.group.split(",") if v]
        name = args.volume if args.name is None else args.name
    else:
        volumes = [args.volume] if args.volume else []
        name = args.name
    if not volumes or not name:
        print("raftblock snapshot create: which volume and name? (snapshot create VOL NAME)", file=sys.stderr)
        return 2
    made = snapshot_create(_target(args), volumes, name)
    barrier = max(m["barrier_ms"] for m in made)
    text = "\n".join(f"snapshot {m['volume']}@{m['name']} created (id {m['snap_id']}, {len(m['groups'])} group(s))"
                     for m in made)
    if barrier:
        text += f"\nwrites' acknowledgements held {barrier:.1f} ms for the cut; no I/O was paused"
    return _report(args, made if args.group else made[0], text)


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import snapshot_list
    from raftblock.units import format_size

    snaps = snapshot_list(_target(args), args.volume)
    if args.json:
        _print_json(snaps)
        return 0
    if not snaps:
        print(f"volume {args.volume} has no snapshots")
        return 0
    print(f"{'NAME':<24} {'ID':<6} {'CREATED':<20} {'STATE':<10} {'SIZE':<10} UNIQUE")
    for s in snaps:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_ms"] / 1000))
        unique = format_size(s["unique_bytes"]) if s["unique_bytes"] is not None else "?"
        print(f"{s['name']:<24} {s['snap_id']:<6} {created:<20} {s['state']:<10} {format_size(s['size_bytes']):<10} "
              f"{unique}")
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import snapshot_delete

    res = snapshot_delete(_target(args), args.volume, args.name)
    return _report(args, res, f"deleted snapshot {args.volume}@{args.name}; the space it alone kept returns as the "
                              f"cleaner runs")


def _store(args: argparse.Namespace, url: str) -> Any:
    """The backup store of `url` (s3://BUCKET/PREFIX or a directory), throttled by --bandwidth if given."""
    from raftblock.backup.store import StoreError, Throttled, open_store
    from raftblock.node.layout import ClusterError

    try:
        store: Any = open_store(url, endpoint_url=getattr(args, "endpoint_url", None),
                                region=getattr(args, "region", None))
    except StoreError as e:
        raise ClusterError(str(e)) from e
    if getattr(args, "bandwidth", 0):
        store = Throttled(store, args.bandwidth)
    return store


def cmd_snapshot_export(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import snapshot_export
    from raftblock.units import format_size

    vol, snap = args.source
    bar = _Progress(f"export {vol}@{snap}", quiet=args.json)
    chunk = 4 << 20
    res = snapshot_export(_target(args), vol, snap, _store(args, args.url), args.since, args.parallel,
                          lambda done, total, _up: bar(done, total, done * chunk))
    text = (f"exported {vol}@{snap} to {res['url']}: {res['chunks']} chunks, {format_size(res['changed_bytes'])} read, "
            f"{format_size(res['uploaded_bytes'])} uploaded in {res['uploaded_objects']} objects, "
            f"{res['reused_objects']} already there")
    if args.since:
        text += f"; incremental from {args.since}" + (
            f" ({res['changed_chunks']} chunks changed)" if res["changed_chunks"] is not None else
            " (its snapshot is gone from the cluster: every chunk read and compared)")
    if res["resumed_chunks"]:
        text += f"; resumed ({res['resumed_chunks']} chunks done by an interrupted run)"
    return _report(args, res, text)


def cmd_snapshot_restore(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import snapshot_restore
    from raftblock.units import format_size

    bar = _Progress(f"restore {args.name}", quiet=args.json)
    chunk = 4 << 20
    def served() -> None:
        print(f"volume {args.name} is served now (lazy restore: reads fetch what they need); filling the rest",
              file=sys.stderr if args.json else sys.stdout, flush=True)

    res = snapshot_restore(_target(args), _store(args, args.url), args.name, args.snapshot, args.from_volume,
                           args.replication, args.parallel, lambda done, total, _w: bar(done, total, done * chunk),
                           lazy=args.lazy, on_served=served)
    return _report(args, res, f"restored {res['source']} from {res['url']} into volume {res['volume']} "
                              f"({format_size(res['size_bytes'])}, {format_size(res['written_bytes'])} written, every "
                              f"chunk verified)" + (" (an interrupted restore, run again)" if res["resumed"] else ""))


def cmd_backup_list(args: argparse.Namespace) -> int:
    from raftblock.backup.transfer import list_manifests, load_manifest
    from raftblock.units import format_size

    store = _store(args, args.url)
    mans = [load_manifest(store, v, s) for v, s in list_manifests(store, args.volume)]
    rows: list[dict[str, Any]] = [{"volume": m.volume, "snapshot": m.snapshot, "created_ms": m.created_ms, "size_bytes": m.size_bytes,
             "chunks": m.chunk_count(), "objects": len(m.objects()), "parent": m.parent} for m in mans]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no backups in {store.url}")
        return 0
    print(f"{'VOLUME':<20} {'SNAPSHOT':<20} {'CREATED':<20} {'SIZE':<10} {'OBJECTS':<8} INCREMENTAL FROM")
    for r in sorted(rows, key=lambda r: (r["volume"], r["created_ms"])):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_ms"] / 1000))
        print(f"{r['volume']:<20} {r['snapshot']:<20} {created:<20} {format_size(r['size_bytes']):<10} "
              f"{r['objects']:<8} {r['parent'] or '-'}")
    return 0


def cmd_backup_verify(args: argparse.Namespace) -> int:
    from raftblock.backup.transfer import list_manifests, load_manifest, verify

    store = _store(args, args.url)
    which = [args.backup] if args.backup else list(list_manifests(store))
    if not which:
        print(f"raftblock backup verify: no backups in {store.url}", file=sys.stderr)
        return 1
    report: list[dict[str, Any]] = []
    for vol, snap in which:
        problems = verify(store, load_manifest(store, vol, snap), args.parallel)
        report.append({"volume": vol, "snapshot": snap, "ok": not problems, "problems": problems})
    bad = [r for r in report if not r["ok"]]
    if args.json:
        _print_json(report)
    else:
        for r in report:
            print(f"{r['volume']}@{r['snapshot']}: " + ("ok, every chunk read and checked" if r["ok"] else
                                                         f"{len(r['problems'])} bad: " + "; ".join(r["problems"][:5])))
    return 1 if bad else 0


def cmd_backup_delete(args: argparse.Namespace) -> int:
    from raftblock.backup.transfer import collect, delete_backup
    from raftblock.units import format_size

    store = _store(args, args.url)
    vol, snap = args.backup
    delete_backup(store, vol, snap)
    removed, freed = collect(store, min_age_s=args.min_age)
    return _report(args, {"deleted": f"{vol}@{snap}", "objects_removed": removed, "bytes_freed": freed},
                   f"deleted backup {vol}@{snap}; {removed} objects no backup names removed ({format_size(freed)})")


def cmd_cluster_wait_healthy(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import cluster_wait_healthy

    t0 = time.monotonic()
    st = cluster_wait_healthy(_target(args), args.timeout)
    took = round(time.monotonic() - t0, 1)
    return _report(args, {"healthy": True, "waited_s": took, "nodes": len(st["nodes"]), "groups": len(st["groups"])},
                   f"healthy: {len(st['nodes'])} nodes up, {len(st['groups'])} groups with every replica "
                   f"(waited {took} s)")


def cmd_cert_init(args: argparse.Namespace) -> int:
    from raftblock import tls

    out = Path(args.out)
    ca_cert, _ = tls.init_ca(out, args.cluster_name)
    made = [str(ca_cert)]
    ips = list(args.ip or [])
    dns = list(args.dns or [])
    for i in range(1, args.nodes + 1):
        made.append(str(tls.issue(out, out, tls.node_name(i), dns, ips)[0]))
    for i in range(1, args.metas + 1):
        made.append(str(tls.issue(out, out, tls.meta_name(i), dns, ips)[0]))
    for g in args.gateway or []:
        made.append(str(tls.issue(out, out, tls.gateway_name(g), dns, ips)[0]))
    made.append(str(tls.issue(out, out, tls.ADMIN_NAME, [])[0]))
    for h in args.host or []:
        made.append(str(tls.nbd_client_dir(out / "hosts" / h, out, h)))
    return _report(args, {"dir": str(out), "made": made},
                   f"CA and {len(made) - 1} certificates in {out} (keys 0600): {', '.join(Path(m).name for m in made)}")


def cmd_cluster_rotate_key(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import rotate_key

    res = rotate_key(_target(args), args.timeout, say=(lambda _m: None) if args.json else
                     (lambda m: print(m, file=sys.stderr)))
    return _report(args, res, f"data key {res['active']} active" + (f", {res['retired']} retired" if res["retired"]
                                                                      else ""))


def cmd_cluster_rotate_master_key(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import rotate_master_key

    res = rotate_master_key(_target(args))
    return _report(args, res, f"master key {res['master_key']} active; {res['volumes_rewrapped']} volume key(s) "
                              f"rewrapped, no data rewritten")


def cmd_node(args: argparse.Namespace) -> int:
    from raftblock.node import raftnode

    if args.action is not None:
        return cmd_node_action(args)
    if args.config is None:
        print("raftblock node: --config FILE (run a node), add, or drain|undrain|stop-check ID", file=sys.stderr)
        return 2
    return raftnode.main(["--config", args.config, "--log-format", args.log_format, "--log-level", args.log_level])


def cmd_node_action(args: argparse.Namespace) -> int:
    """`node stop-check ID` (exit 0: safe to stop now, 1: not), `node drain ID [--wait]`, `node undrain ID`,
    `node add [--rack R]`."""
    from raftblock.node.cluster import cluster_status, node_add, node_drain, node_stop_check

    if args.action == "add":
        info = node_add(_target(args), args.rack)
        if info["note"]:
            print(f"raftblock node add: {info['note']}", file=sys.stderr)
        return _report(args, info, f"added node {info['node_id']} in rack {info['rack']} at {info['address']}; "
                                   f"replicas move to it one group at a time (raftblock repair watch)")
    if args.node_id is None:
        print(f"raftblock node {args.action}: which node? (node {args.action} ID)", file=sys.stderr)
        return 2
    d = _target(args)
    if args.action == "stop-check":
        risks = node_stop_check(d, args.node_id)
        if args.json:
            _print_json({"node": args.node_id, "safe": not risks,
                         "risks": [{"group": g, "why": why} for g, why in risks]})
            return 0 if not risks else 1
        if not risks:
            print(f"node {args.node_id}: safe to stop now (every Raft group keeps a majority of live members, "
                  f"every chain all but one of its copies)")
            return 0
        print(f"node {args.node_id}: NOT safe to stop now:")
        for g, why in risks:
            print(f"  group {g}: {why}")
        return 1
    if args.action == "remove":
        from raftblock.node.cluster import node_remove

        node_remove(d, args.node_id)
        return _report(args, {"node": args.node_id, "removed": True},
                       f"node {args.node_id} removed from the map (stop its process and wipe its disk)")
    res = node_drain(d, args.node_id, args.action == "drain", args.force)
    if args.json and not args.wait:
        _print_json({"node": args.node_id, **res})
        return 0
    print(f"node {args.node_id}: draining={res['draining']}, member of {res['groups']} group(s)",
          file=sys.stderr if args.json else sys.stdout)
    if args.action != "drain" or not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:  # --wait: until the node holds no replica; says what each group left waits for
        st = cluster_status(d)
        left = [g["group"] for g in st["groups"] if args.node_id in g["members"]]
        copying = [r for r in st["repairs"] if r["state"] == "copying"]
        waiting = [r for r in st["repairs"] if r["state"] != "copying" and r["group"] in left]
        line = f"  {len(left)} group(s) left on node {args.node_id}; {len(copying)} cop(ies) in flight"
        if waiting:
            line += "; waiting: " + "; ".join(f"group {r['group']}: {r['why']}" for r in waiting[:3])
        print(line, flush=True, file=sys.stderr if args.json else sys.stdout)
        if not left:
            if args.json:
                _print_json({"node": args.node_id, "draining": True, "groups": 0})
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"raftblock node drain: {len(left)} group(s) still on node {args.node_id} after "
                  f"{args.timeout:.0f} s (groups {', '.join(map(str, left[:10]))})", file=sys.stderr)
            return 1
        time.sleep(1.0)


def cmd_meta(args: argparse.Namespace) -> int:
    from raftblock.meta import node as meta_node

    return meta_node.main(["--config", args.config, "--log-format", args.log_format])


def cmd_gateway(args: argparse.Namespace) -> int:
    from raftblock.node import gateway
    from raftblock.obs.log import configure

    configure(args.log_format, args.log_level)
    try:
        return gateway.main(args.config)
    except (OSError, ValueError, KeyError) as e:
        return _fail("gateway", e)


def cmd_demo(args: argparse.Namespace) -> int:
    """`make demo`: a 3-node, 3-rack cluster on loopback with a 1 GiB volume `demo`."""
    from raftblock.node.cluster import cluster_up, volume_create, volume_list

    d = _local_target(args)
    notes: list[str] = []
    uri = cluster_up(d, nbd_port=args.nbd_port, replication=args.replication, notes=notes,
                     iscsi_port=args.iscsi_port)
    for n in notes:
        print(f"raftblock demo: {n}", file=sys.stderr)
    if not any(v["name"] == "demo" for v in volume_list(d)):
        volume_create(d, "demo", args.size)
    from raftblock.gateway.iscsi_server import IQN_PREFIX
    from raftblock.node.cluster import iscsi_portals
    from raftblock.node.clustermap import ClusterMap
    from raftblock.node.layout import local_layout

    cmap = ClusterMap.load(d / "cluster.json")
    http = cmap.meta_http
    page = f"http://{http[min(http, key=int)]}/" if http else None
    portals = iscsi_portals(local_layout(d, "demo"), cmap)
    iscsi_uri = f"iscsi://{portals[0]}/{IQN_PREFIX}:demo/0" if portals else None
    if args.json:
        _print_json({"dir": str(d), "uri": uri, "volume": f"{uri}/demo", "status_url": page, "iscsi": iscsi_uri})
        return 0
    rb = ".venv/bin/raftblock" if Path(".venv/bin/raftblock").exists() else "raftblock"
    flag = f" --dir {d}" if d != Path(".raftblock") else ""
    print(f"raftblock cluster is up (3 nodes in 3 racks) in {d}/; volume 'demo' at {uri}/demo")
    print(f"  attach:  qemu-img info {uri}/demo     nbdinfo {uri}/demo")
    if iscsi_uri:
        print(f"  iSCSI:   iscsi-inq {iscsi_uri}     qemu-img info {iscsi_uri}")
    print(f"  status:  {rb} cluster status{flag}" + (f"     page: {page} (Prometheus: /metrics on every process)"
                                                        if page else ""))
    print(f"  stop:    {rb} cluster down{flag}")
    return 0


def _fail(what: str, e: BaseException) -> int:
    print(f"raftblock {what}: {e}", file=sys.stderr)
    return 1


EXIT_CODES = """exit codes: 0 done; 1 failed (one line on stderr says why); 2 usage error.
Sizes: 4096, 64M, 1G, 2TiB: binary units (K/M/G/T = KiB/MiB/GiB/TiB); 10GB is refused as ambiguous.
The cluster: --cluster FILE (a deployed cluster's cluster.toml), else --dir DIR (a local one), else
$RAFTBLOCK_CLUSTER, else $RAFTBLOCK_DIR, else /etc/raftblock/cluster.toml if it exists and there is no
.raftblock here, else .raftblock."""


def _dir(p: argparse.ArgumentParser, what: str = "the cluster directory", local: bool = False) -> None:
    p.add_argument("--dir", default=None, help=f"{what} (default $RAFTBLOCK_DIR or .raftblock)")
    if not local:
        p.add_argument("--cluster", default=None, metavar="FILE",
                       help="a deployed cluster's file (metadata addresses, secret; default $RAFTBLOCK_CLUSTER, "
                            f"else {ETC_CLUSTER_FILE} when there is no .raftblock here)")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")


def _backup_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint (MinIO, Ceph RGW, ...; default $AWS_ENDPOINT_URL, else AWS). Credentials and "
                        "region: the standard AWS environment variables or ~/.aws")
    p.add_argument("--region", default=None, help="S3 region (default $AWS_REGION / $AWS_DEFAULT_REGION)")
    if p.prog.split()[-1] in ("export", "restore", "verify"):
        p.add_argument("--parallel", type=int, default=4, help="objects in flight (default 4; memory is "
                                                               "about 2 x 4 MiB each)")


class _Parser(argparse.ArgumentParser):
    """argparse, with `--size -1G` read as a (refused) value rather than as an unknown option."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("epilog", EXIT_CODES)
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-\d")


def build_parser() -> argparse.ArgumentParser:
    from raftblock import __version__

    p = _Parser(prog="raftblock", description="raftblock distributed block store")
    p.add_argument("--version", action="version", version=f"raftblock {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="serve volumes from one local copy over NBD (single node)")
    s.add_argument("--dir", required=True, help="data directory (created if missing)")
    s.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port_arg, default=10809, help="NBD port (default 10809; 0 picks a free one)")
    s.add_argument("--volume", type=_volume_arg, action="append", default=[], metavar="NAME:SIZE",
                   help="volume to create on first start, e.g. demo:1G (repeatable)")
    s.add_argument("--disk", choices=["os", "volatile", "volatile-tear"], default="os",
                   help="disk port: os (real), volatile (test: unsynced writes die with the process), "
                        "volatile-tear (also leaves torn partial writes)")
    s.add_argument("--segment-size", type=_size_arg, default=64 << 20, metavar="SIZE",
                   help="engine segment file size (default 64M; each is preallocated)")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("cluster", help="a local cluster: up, down, status")
    csub = c.add_subparsers(dest="cluster_command", required=True, parser_class=_Parser)
    cu = csub.add_parser("up", help="start (or complete) a local cluster; prints the NBD base URI")
    _dir(cu, local=True)
    cu.add_argument("--nodes", type=int, default=None, help="storage nodes of a new cluster (default 3)")
    cu.add_argument("--tls", action="store_true",
                    help="a new cluster with a lab CA and certificates in DIR/tls: NBD needs STARTTLS (nbds://) "
                         "and a host certificate (DIR/tls/hosts/local for this machine)")
    cu.add_argument("--racks", type=int, default=None, help="racks of a new cluster: node i is in rack r{i mod R} "
                                                            "(default 3)")
    cu.add_argument("--nbd-port", type=_port_arg, default=None,
                    help="gateway NBD port (new cluster: default 10809; 0 picks a free one; existing cluster: "
                         "default the configured one, also for 0 while it is free; a new one is written to its gateway config)")
    cu.add_argument("--iscsi-port", type=_port_arg, default=None,
                    help="gateway iSCSI port (new cluster: default 3260, or a free one when 3260 is taken; 0 picks a "
                         "free one; a cluster made before iSCSI gets one now)")
    cu.add_argument("--port-base", type=_port_arg, default=None,
                    help="node i listens on P+i, metadata node i on P+100+i and P+200+i (default: free ports)")
    cu.add_argument("--disk", choices=["os", "volatile", "volatile-tear"], default=None,
                    help="disk port of a new cluster: os (default); volatile / volatile-tear are test modes that lose "
                         "unsynced writes on kill -9")
    cu.add_argument("--replication", choices=["raft", "chain"], default=None,
                    help="default replication of new volumes (fixed when the cluster is made; default raft)")
    cu.add_argument("--gateway", choices=["embedded", "separate"], default=None,
                    help="where NBD is served (fixed when the cluster is made): embedded (default: every storage "
                         "node serves NBD, node 1 on --nbd-port; the groups of a volume prefer the node it is "
                         "attached through as leader) or separate (one `raftblock gateway` process)")
    _json(cu)
    cu.set_defaults(func=cmd_cluster_up)
    cd = csub.add_parser("down", help="stop every process of the cluster (data stays)")
    _dir(cd, local=True)
    cd.add_argument("--node", type=int, default=None,
                    help="stop only this storage node; refused when a group would lose its majority")
    cd.add_argument("--force", action="store_true", help="with --node: stop it even so")
    _json(cd)
    cd.set_defaults(func=cmd_cluster_down)
    cs = csub.add_parser("status", help="nodes, extent groups and volumes")
    _dir(cs)
    _json(cs)
    cs.set_defaults(func=cmd_cluster_status)
    cw = csub.add_parser("wait-healthy", help="wait until every node is up, every group has a leader and all its "
                                              "replicas, nothing is being rebuilt (exit 1 after --timeout)")
    _dir(cw)
    cw.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    _json(cw)
    cw.set_defaults(func=cmd_cluster_wait_healthy)
    ck = csub.add_parser("rotate-key", help="a new key for the data port's signed frames, without downtime: added, "
                                             "made active once every node has it, the old one retired after")
    _dir(ck)
    ck.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the nodes at each step")
    _json(ck)
    ck.set_defaults(func=cmd_cluster_rotate_key)
    cm = csub.add_parser("rotate-master-key", help="a new master key for encryption at rest: every encrypted "
                                                   "volume's data key rewrapped by it, no data rewritten")
    _dir(cm)
    _json(cm)
    cm.set_defaults(func=cmd_cluster_rotate_master_key)

    ce = sub.add_parser("cert", help="TLS certificates for a lab cluster")
    cesub = ce.add_subparsers(dest="cert_command", required=True, parser_class=_Parser)
    ci = cesub.add_parser("init", help="a CA (kept if it exists) and certificates signed by it: nodes, metadata "
                                       "members, gateways, the operators' CLI, NBD hosts (raftblock/tls.py)")
    ci.add_argument("--out", required=True, metavar="DIR", help="where the PEM files go (keys 0600)")
    ci.add_argument("--nodes", type=int, default=3, help="storage node certificates node-1..N (default 3)")
    ci.add_argument("--metas", type=int, default=3, help="metadata member certificates meta-1..N (default 3)")
    ci.add_argument("--gateway", action="append", metavar="ID", help="a separate gateway's certificate (repeat)")
    ci.add_argument("--host", action="append", metavar="NAME",
                    help="an NBD host: DIR/hosts/NAME/{ca-cert,client-cert,client-key}.pem, the directory qemu's "
                         "tls-creds-x509 and libnbd's tls-certificates read (repeat)")
    ci.add_argument("--ip", action="append", metavar="ADDR", help="an address the servers are reached by (repeat)")
    ci.add_argument("--dns", action="append", metavar="NAME", help="a host name the servers are reached by (repeat)")
    ci.add_argument("--cluster-name", default="", help="put in the CA's name")
    _json(ci)
    ci.set_defaults(func=cmd_cert_init)

    r = sub.add_parser("repair", help="re-replication in progress")
    rsub = r.add_subparsers(dest="repair_command", required=True, parser_class=_Parser)
    rw = rsub.add_parser("watch", help="progress bars of the replicas being rebuilt, until none is left")
    _dir(rw)
    rw.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    rw.add_argument("--once", action="store_true", help="print one frame and exit")
    _json(rw)
    rw.set_defaults(func=cmd_repair_watch)

    v = sub.add_parser("volume", help="create, list, info, rename, attach, detach, delete volumes")
    vsub = v.add_subparsers(dest="volume_command", required=True, parser_class=_Parser)
    vc = vsub.add_parser("create", help="create a volume")
    vc.add_argument("name")
    vc.add_argument("--size", type=_size_arg, required=True, help="e.g. 10G (= 10GiB)")
    vc.add_argument("--replication", choices=["raft", "chain"], default=None,
                    help="raft (a majority of 3 fsyncs) or chain (head -> middle -> tail, all fsync); "
                         "default: the cluster's (cluster up --replication)")
    vc.add_argument("--encrypt", action="store_true",
                    help="AES-256-GCM at rest under a new data key wrapped by the cluster's master key: nodes, WAL, "
                         "rebuilds and snapshots only ever hold ciphertext (docs/encryption.md)")
    _qos_opts(vc)
    _dir(vc)
    _json(vc)
    vc.set_defaults(func=cmd_volume_create)
    vq = vsub.add_parser("set-qos", help="change a volume's QoS (limits, burst, reservation, weight), also while "
                                         "attached; options not given keep their value")
    vq.add_argument("name")
    _qos_opts(vq)
    vq.add_argument("--clear", action="store_true", help="start from no QoS (then apply the options given)")
    _dir(vq)
    _json(vq)
    vq.set_defaults(func=cmd_volume_set_qos)
    vl = vsub.add_parser("list", help="list volumes")
    _dir(vl)
    _json(vl)
    vl.set_defaults(func=cmd_volume_list)
    vi = vsub.add_parser("info", help="one volume: size, replication, groups, leaders, allocated, attachment")
    vi.add_argument("name")
    _dir(vi)
    _json(vi)
    vi.set_defaults(func=cmd_volume_info)
    vr = vsub.add_parser("rename", help="rename a volume (refused while attached)")
    vr.add_argument("name")
    vr.add_argument("new_name")
    _dir(vr)
    _json(vr)
    vr.set_defaults(func=cmd_volume_rename)
    vch = vsub.add_parser("set-chap", help="CHAP (or mutual CHAP) for a volume's iSCSI target; an initiator without "
                                           "it is refused at login")
    vch.add_argument("name", help='the volume ("" for discovery sessions)')
    vch.add_argument("--user", default="", help="the CHAP name the initiator logs in with")
    vch.add_argument("--secret-file", default=None, metavar="FILE",
                     help="a file holding the initiator's CHAP secret (12-255 bytes; - reads stdin)")
    vch.add_argument("--target-user", default="", help="mutual CHAP: the name the target answers with")
    vch.add_argument("--target-secret-file", default=None, metavar="FILE",
                     help="mutual CHAP: a file holding the target's secret (must differ from the initiator's)")
    vch.add_argument("--clear", action="store_true", help="remove CHAP: any initiator may log in")
    _dir(vch)
    _json(vch)
    vch.set_defaults(func=cmd_volume_set_chap)
    vcl = vsub.add_parser("clone", help="a writable volume from a snapshot, at once (reads fall through to the "
                                        "snapshot until written)")
    vcl.add_argument("source", type=lambda t: "@".join(_snap_ref(t)), metavar="VOLUME@SNAPSHOT")
    vcl.add_argument("name", help="the new volume")
    vcl.add_argument("--replication", choices=["raft", "chain"], default=None,
                     help="default: the parent volume's")
    _dir(vcl)
    _json(vcl)
    vcl.set_defaults(func=cmd_volume_clone)
    vfl = vsub.add_parser("flatten", help="copy a clone's parent blocks into it (progress bar), then drop the link")
    vfl.add_argument("name")
    _dir(vfl)
    _json(vfl)
    vfl.set_defaults(func=cmd_volume_flatten)
    vrs = vsub.add_parser("resize", help="grow a volume online (clients see it on their next connection); "
                                         "shrink only with --allow-shrink, detached")
    vrs.add_argument("name")
    vrs.add_argument("size", type=_size_arg, help="the new size, e.g. 20G")
    vrs.add_argument("--allow-shrink", action="store_true", help="shrinking loses the data past the new size")
    _dir(vrs)
    _json(vrs)
    vrs.set_defaults(func=cmd_volume_resize)
    vrb = vsub.add_parser("rollback", help="make a volume its snapshot again (refused while attached)")
    vrb.add_argument("name")
    vrb.add_argument("snapshot")
    _dir(vrb)
    _json(vrb)
    vrb.set_defaults(func=cmd_volume_rollback)
    vd = vsub.add_parser("delete", help="delete a volume (refused while attached)")
    vd.add_argument("name")
    _dir(vd)
    _json(vd)
    vd.set_defaults(func=cmd_volume_delete)
    va = vsub.add_parser("attach", help="attach a volume to a gateway (--force takes it over and fences the old one)")
    va.add_argument("name")
    va.add_argument("--gateway", required=True, help="gateway id (gateway_id in its config, e.g. gw1)")
    va.add_argument("--force", action="store_true", help="take the volume over from the gateway holding it (fenced)")
    _dir(va)
    _json(va)
    va.set_defaults(func=cmd_volume_attach)
    vt = vsub.add_parser("detach", help="end a volume's attachment (refused while a host is connected)")
    vt.add_argument("name")
    vt.add_argument("--force", action="store_true", help="detach even with a host connected")
    _dir(vt)
    _json(vt)
    vt.set_defaults(func=cmd_volume_detach)

    sn = sub.add_parser("snapshot", help="snapshots of volumes: create, list, delete")
    ssub = sn.add_subparsers(dest="snapshot_command", required=True, parser_class=_Parser)
    sc = ssub.add_parser("create", help="a crash-consistent snapshot of a volume (or --group of volumes), "
                                        "taken while I/O goes on")
    sc.add_argument("volume", nargs="?", help="the volume (omit with --group)")
    sc.add_argument("name", nargs="?", help="the snapshot's name, unique per volume")
    sc.add_argument("--group", metavar="VOL1,VOL2", default=None,
                    help="snapshot these volumes in one cut, consistent with each other (a database and its log)")
    _dir(sc)
    _json(sc)
    sc.set_defaults(func=cmd_snapshot_create)
    sl = ssub.add_parser("list", help="a volume's snapshots: name, time, state, size, bytes only each keeps")
    sl.add_argument("volume")
    _dir(sl)
    _json(sl)
    sl.set_defaults(func=cmd_snapshot_list)
    sd = ssub.add_parser("delete", help="delete a snapshot (no I/O stall: the cleaner frees its space at its pace)")
    sd.add_argument("volume")
    sd.add_argument("name")
    _dir(sd)
    _json(sd)
    sd.set_defaults(func=cmd_snapshot_delete)
    se = ssub.add_parser("export", help="upload a snapshot to s3://BUCKET/PREFIX or a directory, as verified "
                                        "content-addressed chunks; incremental with --since; re-run to resume")
    se.add_argument("source", type=_snap_ref, metavar="VOLUME@SNAPSHOT")
    se.add_argument("url", metavar="URL", help="s3://BUCKET/PREFIX or a directory path")
    se.add_argument("--since", metavar="SNAPSHOT", default=None,
                    help="upload only the chunks changed since this snapshot (exported to the same URL before)")
    _backup_opts(se)
    se.add_argument("--bandwidth", type=_size_arg, default=0, metavar="RATE",
                    help="upload at most RATE bytes per second, e.g. 50M (default: unbounded)")
    _dir(se)
    _json(se)
    se.set_defaults(func=cmd_snapshot_export)
    sr = ssub.add_parser("restore", help="create a volume from a backup, every chunk verified")
    sr.add_argument("url", metavar="URL", help="s3://BUCKET/PREFIX or a directory path")
    sr.add_argument("name", help="the new volume")
    sr.add_argument("--snapshot", default=None, help="which backup (default: the newest)")
    sr.add_argument("--from-volume", default=None, help="whose backups (needed when the URL holds several volumes')")
    sr.add_argument("--replication", choices=["raft", "chain"], default=None, help="default: the cluster's")
    sr.add_argument("--bandwidth", type=_size_arg, default=0, metavar="RATE",
                    help="download at most RATE bytes per second, e.g. 50M (default: unbounded)")
    sr.add_argument("--lazy", action="store_true",
                    help="serve the volume at once: a read of a chunk not restored yet fetches it first, while this "
                         "command fills the rest (run it again if it stops)")
    _backup_opts(sr)
    _dir(sr)
    _json(sr)
    sr.set_defaults(func=cmd_snapshot_restore)

    b = sub.add_parser("backup", help="backups in an object store: list, verify, delete (no cluster needed)")
    bsub = b.add_subparsers(dest="backup_command", required=True, parser_class=_Parser)
    bl = bsub.add_parser("list", help="the backups at URL")
    bl.add_argument("url", metavar="URL")
    bl.add_argument("--volume", default=None, help="only this volume's")
    _backup_opts(bl)
    _json(bl)
    bl.set_defaults(func=cmd_backup_list)
    bv = bsub.add_parser("verify", help="read and check every chunk of a backup (or all) without restoring; exit 1 "
                                        "if any is bad")
    bv.add_argument("url", metavar="URL")
    bv.add_argument("backup", nargs="?", type=_snap_ref, metavar="VOLUME@SNAPSHOT", help="default: every backup")
    _backup_opts(bv)
    _json(bv)
    bv.set_defaults(func=cmd_backup_verify)
    bd = bsub.add_parser("delete", help="delete a backup, then the objects no backup names any more")
    bd.add_argument("url", metavar="URL")
    bd.add_argument("backup", type=_snap_ref, metavar="VOLUME@SNAPSHOT")
    bd.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                    help="remove unnamed objects only this old (an export running now has objects its manifest "
                         "does not name yet; default 3600)")
    _backup_opts(bd)
    _json(bd)
    bd.set_defaults(func=cmd_backup_delete)

    n = sub.add_parser("node", help="run one storage node in the foreground (what systemd runs); "
                                    "or add, drain|undrain|stop-check|remove ID")
    n.add_argument("action", nargs="?", choices=["add", "drain", "undrain", "stop-check", "remove"],
                   help="drain: move its replicas elsewhere; stop-check: would stopping it now leave a group "
                        "without a majority (exit 1); remove: a drained node leaves the map (decommission)")
    n.add_argument("node_id", nargs="?", type=int)
    n.add_argument("--config", default=None, help="run the node of this config in the foreground")
    _dir(n, "the cluster (for add, drain, undrain, stop-check)")
    n.add_argument("--wait", action="store_true", help="drain: wait until the node holds no replica")
    n.add_argument("--timeout", type=float, default=0.0, help="drain --wait: give up after this many seconds (exit 1)")
    n.add_argument("--force", action="store_true", help="drain even if a check fails")
    n.add_argument("--rack", default=None,
                   help="add: the new node's rack (default: a draining node's, else the rack with fewest nodes)")
    _json(n)
    n.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    n.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    n.set_defaults(func=cmd_node)

    m = sub.add_parser("meta", help="run one metadata node in the foreground (what systemd runs)")
    m.add_argument("--config", required=True, help="the metadata node's TOML config (see raftblock/meta/node.py)")
    m.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    m.set_defaults(func=cmd_meta)

    g = sub.add_parser("gateway", help="run the NBD gateway in the foreground (what systemd runs)")
    g.add_argument("--config", required=True, help="the gateway's TOML config (see raftblock/node/gateway.py)")
    g.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.set_defaults(func=cmd_gateway)

    lg = sub.add_parser("logs", help="every process's log of a local cluster, merged in time order")
    _dir(lg, local=True)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    lg.add_argument("--node", action="append", default=[], metavar="NAME",
                    help="only these processes: n1, m2, gateway, or a node id (repeatable)")
    lg.add_argument("--level", choices=["debug", "info", "warning", "error"], default="debug",
                    help="only events at this level or above")
    lg.add_argument("--since", type=float, default=None, metavar="SECONDS", help="only the last SECONDS")
    lg.add_argument("--lines", "-n", type=int, default=0, help="only the last N lines (before --follow)")
    lg.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines), with `process`")
    lg.set_defaults(func=cmd_logs)

    d = sub.add_parser("demo", help="start a local 3-rack cluster with a volume 'demo' (make demo)")
    _dir(d, local=True)
    d.add_argument("--nbd-port", type=_port_arg, default=DEMO_NBD_PORT,
                   help="gateway NBD port (default $RAFTBLOCK_NBD_PORT, else 10809 for a new cluster and the "
                        "configured one for an existing cluster; 0 picks a free one)")
    d.add_argument("--iscsi-port", type=_port_arg, default=DEMO_ISCSI_PORT,
                   help="gateway iSCSI port (default $RAFTBLOCK_ISCSI_PORT, else 3260, or a free one when 3260 is "
                        "taken; 0 picks a free one)")
    d.add_argument("--size", type=_size_arg, default=1 << 30, help="the volume's size (default 1G)")
    d.add_argument("--replication", choices=["raft", "chain"], default=None,
                   help="the cluster's default replication (when the demo cluster is first made)")
    _json(d)
    d.set_defaults(func=cmd_demo)
    return p


def cmd_logs(args: argparse.Namespace) -> int:
    from raftblock.node.logs import follow_logs

    return follow_logs(_local_target(args), names=args.node, level=args.level, since_s=args.since, lines=args.lines,
                       follow=args.follow, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    from raftblock.node.layout import ClusterError
    from raftblock.replication.group import GroupError

    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "node", "meta", "gateway"):
        # A command that does one thing: its library's warnings on stderr, one line each; nothing on stdout
        # (which is for the result, and --json). The long-running commands configure their own logging.
        from raftblock.obs.log import configure

        configure("console", "warning")
    what = " ".join(x for x in (args.command, getattr(args, f"{args.command}_command", None),
                                getattr(args, "action", None)) if x)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:  # `raftblock cluster status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except (ClusterError, GroupError, OSError, ValueError) as e:
        # an expected condition (the cluster, a group, a file, a port, a parse): one line, no traceback
        if os.environ.get("RAFTBLOCK_DEBUG"):
            raise
        return _fail(what, e)
    return rc


if __name__ == "__main__":
    sys.exit(main())
