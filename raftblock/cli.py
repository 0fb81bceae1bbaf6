"""The `raftblock` command line.

Rule 1: errors are one line on stderr and a non-zero exit; `--help` works everywhere.
Rule 2: long-running commands configure logging (obs.log) and run one event loop (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
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
    name, sep, size = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:SIZE, got {text!r}")
    try:
        return name, parse_size(size)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_serve(args: argparse.Namespace) -> int:
    from raftblock.gateway.nbd_server import GatewayConfig
    from raftblock.node.serve import ServeError, VolumeSpec, run_serve
    from raftblock.obs.log import configure
    from raftblock.storage.engine import EngineConfig

    configure(args.log_format, args.log_level)
    specs = [VolumeSpec(n, s) for n, s in args.volume]
    gw = GatewayConfig(bind=args.bind, port=args.port)
    ec = EngineConfig(segment_size_bytes=args.segment_size)
    try:
        return _loop_run(run_serve(Path(args.dir), specs, gw, disk_mode=args.disk, engine_config=ec))
    except ServeError as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"raftblock serve: {e}", file=sys.stderr)
        return 1


# The cluster directory of every cluster command: --dir, else $RAFTBLOCK_DIR, else .raftblock (two clusters
# side by side: `export RAFTBLOCK_DIR=/tmp/c2` in the second shell, `make demo DIR=/tmp/c2 NBD_PORT=10810`).
DEMO_DIR = Path(os.environ.get("RAFTBLOCK_DIR") or ".raftblock")
DEMO_NBD_PORT = int(os.environ.get("RAFTBLOCK_NBD_PORT") or 10809)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, cluster_up

    try:
        uri = cluster_up(Path(args.dir), nodes=args.nodes, racks=args.racks, nbd_port=args.nbd_port,
                         port_base=args.port_base, disk=args.disk, replication=args.replication)
    except ClusterError as e:
        return _fail("cluster up", e)
    print(uri)
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, cluster_down

    try:
        stopped = cluster_down(Path(args.dir), args.node, args.force)
    except ClusterError as e:
        return _fail("cluster down", e)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, cluster_status
    from raftblock.units import format_size

    try:
        st = cluster_status(Path(args.dir))
    except ClusterError as e:
        return _fail("cluster status", e)
    if args.json:
        _print_json(st)
        return 0
    print(f"cluster {st['cluster_id']}   gateway: {st['gateway']['uri'] or 'stopped'} (pid {st['gateway']['pid']})")
    print("\nNODES\n  id  rack  address               pid      process      map      groups  leading  used/capacity"
          "        wal        errors")
    for n in st["nodes"]:
        errors = " ".join(f"{k}={v}" for k, v in n.get("errors", {}).items()) or "-"
        print(f"  {n['id']:<3} {n['rack']:<5} {n['address']:<21} {str(n['pid']):<8} {n['state']:<12} {n['map_state']:<8} "
              f"{n.get('groups', '-'):<7} {n.get('leading', '-'):<8} "
              f"{format_size(n.get('used_bytes', 0)) + '/' + format_size(n.get('capacity_bytes', 0)):<20} "
              f"{format_size(n.get('wal_bytes', 0)):<10} {errors}")
    print("\nMETADATA GROUP\n  " + "  ".join(f"m{m['id']} {m['admin']} (pid {m['pid']})" for m in st["metadata"]))
    print("\nEXTENT GROUPS\n  id   replication  members     leader  term  epoch")
    for g in st["groups"]:
        print(f"  {g['group']:<4} {g['replication']:<12} {','.join(map(str, g['members'])):<11} "
              f"{str(g['leader'] or '-'):<7} {g['term']:<5} {g['epoch']}")
    print_repairs(st["repairs"])
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
    """Redraw the repairs every `interval` seconds until none is left (or Ctrl-C); --once: one frame."""
    import time as _time

    from raftblock.node.cluster import ClusterError, cluster_status

    while True:
        try:
            st = cluster_status(Path(args.dir))
        except ClusterError as e:
            return _fail("repair watch", e)
        if sys.stdout.isatty():
            print("\x1b[2J\x1b[H", end="")
        print(_time.strftime("%H:%M:%S"), f"cluster {st['cluster_id']}")
        print_repairs(st["repairs"])
        sys.stdout.flush()
        if args.once or not st["repairs"]:
            return 0
        _time.sleep(args.interval)


def cmd_volume_create(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, volume_create

    try:
        v = volume_create(Path(args.dir), args.name, args.size, args.replication)
    except ClusterError as e:
        return _fail("volume create", e)
    print(f"created volume {v['name']} ({v['size_bytes']} bytes, {v['extents']} extents in groups {v['groups']}, "
          f"replication {v.get('replication', '?')})")
    return 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, volume_list
    from raftblock.units import format_size

    try:
        vols = volume_list(Path(args.dir))
    except ClusterError as e:
        return _fail("volume list", e)
    if args.json:
        _print_json(vols)
    else:
        for v in vols:
            print(f"{v['name']}\t{format_size(v['size_bytes'])}\t{v['replication']}")
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, volume_delete

    try:
        volume_delete(Path(args.dir), args.name)
    except ClusterError as e:
        return _fail("volume delete", e)
    print(f"deleted volume {args.name}")
    return 0


def cmd_volume_attach(args: argparse.Namespace) -> int:
    from raftblock.node.cluster import ClusterError, volume_attach

    try:
        epoch = volume_attach(Path(args.dir), args.name, args.gateway, args.force)
    except ClusterError as e:
        return _fail("volume attach", e)
    print(f"volume {args.name} attached to gateway {args.gateway} (attach epoch {epoch})")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from raftblock.node import raftnode

    if args.action is not None:
        return cmd_node_action(args)
    if args.config is None:
        print("raftblock node: --config FILE (run a node), add, or drain|undrain|stop-check ID", file=sys.stderr)
        return 2
    return raftnode.main(["--config", args.config, "--log-format", args.log_format, "--log-level", args.log_level])


def cmd_node_action(args: argparse.Namespace) -> int:
    """`node stop-check ID` (exit 0: safe to stop now, 1: not), `node drain ID [--wait]`, `node undrain ID`."""
    import time as _time

    from raftblock.node.cluster import ClusterError, cluster_status, node_add, node_drain, node_stop_check

    if args.action == "add":
        try:
            info = node_add(Path(args.dir), args.rack)
        except ClusterError as e:
            return _fail("node add", e)
        print(f"added node {info['node_id']} in rack {info['rack']} at {info['address']}; replicas move to it "
              f"one group at a time (raftblock repair watch)")
        return 0
    if args.node_id is None:
        print(f"raftblock node {args.action}: which node? (node {args.action} ID)", file=sys.stderr)
        return 2
    d = Path(args.dir)
    try:
        if args.action == "stop-check":
            risks = node_stop_check(d, args.node_id)
            if not risks:
                print(f"node {args.node_id}: safe to stop now (every group keeps a majority of live members)")
                return 0
            print(f"node {args.node_id}: NOT safe to stop now:")
            for g, why in risks:
                print(f"  group {g}: {why}")
            return 1
        res = node_drain(d, args.node_id, args.action == "drain", args.force)
        print(f"node {args.node_id}: draining={res['draining']}, member of {res['groups']} group(s)")
        if args.action != "drain" or not args.wait:
            return 0
        while True:  # --wait: until the node holds no replica
            st = cluster_status(d)
            left = [g["group"] for g in st["groups"] if args.node_id in g["members"]]
            copying = [r for r in st["repairs"] if r["state"] == "copying"]
            print(f"  {len(left)} group(s) left on node {args.node_id}; {len(copying)} cop(ies) in flight", flush=True)
            if not left:
                return 0
            _time.sleep(1.0)
    except ClusterError as e:
        return _fail(f"node {args.action}", e)


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
    from raftblock.node.cluster import ClusterError, cluster_up, volume_create, volume_list

    d = Path(args.dir)
    try:
        uri = cluster_up(d, nbd_port=args.nbd_port, replication=args.replication)
        if not any(v["name"] == "demo" for v in volume_list(d)):
            volume_create(d, "demo", parse_size(args.size))
    except ClusterError as e:
        return _fail("demo", e)
    print(f"raftblock cluster is up (3 nodes in 3 racks) in {d}/; volume 'demo' ({args.size}) at {uri}/demo")
    print(f"  attach:  qemu-img info {uri}/demo     nbdinfo {uri}/demo")
    print(f"  status:  .venv/bin/raftblock cluster status --dir {d}")
    print(f"  stop:    .venv/bin/raftblock cluster down --dir {d}")
    return 0


def _fail(what: str, e: BaseException) -> int:
    print(f"raftblock {what}: {e}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftblock", description="raftblock distributed block store")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve volumes from one local copy over NBD (single node)")
    s.add_argument("--dir", required=True, help="data directory (created if missing)")
    s.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=10809, help="NBD port (default 10809; 0 picks a free one)")
    s.add_argument("--volume", type=_volume_arg, action="append", default=[], metavar="NAME:SIZE",
                   help="volume to create on first start, e.g. demo:1G (repeatable)")
    s.add_argument("--disk", choices=["os", "volatile", "volatile-tear"], default="os",
                   help="disk port: os (real), volatile (test: unsynced writes die with the process), "
                        "volatile-tear (also leaves torn partial writes)")
    s.add_argument("--segment-size", type=_size_arg, default=64 << 20, metavar="SIZE",
                   help="engine segment file size (default 64M; each is preallocated)")
    s.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("cluster", help="a local cluster: up, down, status")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    cu = csub.add_parser("up", help="start (or complete) a local cluster; prints the NBD base URI")
    cu.add_argument("--dir", default=str(DEMO_DIR))
    cu.add_argument("--nodes", type=int, default=3)
    cu.add_argument("--racks", type=int, default=3)
    cu.add_argument("--nbd-port", type=int, default=10809, help="gateway NBD port (0 picks a free one)")
    cu.add_argument("--port-base", type=int, default=None, help="node i listens on P+i (default: free ports)")
    cu.add_argument("--disk", choices=["os", "volatile", "volatile-tear"], default="os")
    cu.add_argument("--replication", choices=["raft", "chain"], default=None,
                    help="default replication of new volumes (fixed when the cluster is made; default raft)")
    cu.set_defaults(func=cmd_cluster_up)
    cd = csub.add_parser("down", help="stop every process of the cluster (data stays)")
    cd.add_argument("--dir", default=str(DEMO_DIR))
    cd.add_argument("--node", type=int, default=None,
                    help="stop only this storage node; refused when a group would lose its majority")
    cd.add_argument("--force", action="store_true", help="with --node: stop it even so")
    cd.set_defaults(func=cmd_cluster_down)
    cs = csub.add_parser("status", help="nodes, extent groups and volumes")
    cs.add_argument("--dir", default=str(DEMO_DIR))
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_cluster_status)

    r = sub.add_parser("repair", help="re-replication in progress")
    rsub = r.add_subparsers(dest="repair_command", required=True)
    rw = rsub.add_parser("watch", help="progress bars of the replicas being rebuilt, until none is left")
    rw.add_argument("--dir", default=str(DEMO_DIR))
    rw.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    rw.add_argument("--once", action="store_true", help="print one frame and exit")
    rw.set_defaults(func=cmd_repair_watch)

    v = sub.add_parser("volume", help="create, list, delete volumes")
    vsub = v.add_subparsers(dest="volume_command", required=True)
    vc = vsub.add_parser("create", help="create a volume")
    vc.add_argument("name")
    vc.add_argument("--size", type=_size_arg, required=True, help="e.g. 1G")
    vc.add_argument("--replication", choices=["raft", "chain"], default=None,
                    help="raft (a majority of 3 fsyncs) or chain (head -> middle -> tail, all fsync); "
                         "default: the cluster's (cluster up --replication)")
    vc.add_argument("--dir", default=str(DEMO_DIR))
    vc.set_defaults(func=cmd_volume_create)
    vl = vsub.add_parser("list", help="list volumes")
    vl.add_argument("--dir", default=str(DEMO_DIR))
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=cmd_volume_list)
    vd = vsub.add_parser("delete", help="delete a volume (refused while a host is attached)")
    vd.add_argument("name")
    vd.add_argument("--dir", default=str(DEMO_DIR))
    vd.set_defaults(func=cmd_volume_delete)


    va = vsub.add_parser("attach", help="attach a volume to a gateway (--force takes it over and fences the old one)")
    va.add_argument("name")
    va.add_argument("--gateway", required=True, help="gateway id (gateway_id in its config)")
    va.add_argument("--force", action="store_true")
    va.add_argument("--dir", default=str(DEMO_DIR))
    va.set_defaults(func=cmd_volume_attach)

    n = sub.add_parser("node", help="run one storage node in the foreground (what systemd runs); "
                                    "or drain|undrain|stop-check ID")
    n.add_argument("action", nargs="?", choices=["add", "drain", "undrain", "stop-check"],
                   help="drain: move its replicas elsewhere; stop-check: would stopping it now leave a group "
                        "without a majority (exit 1)")
    n.add_argument("node_id", nargs="?", type=int)
    n.add_argument("--config", default=None, help="run the node of this config in the foreground")
    n.add_argument("--dir", default=str(DEMO_DIR), help="the cluster (for drain, undrain, stop-check)")
    n.add_argument("--wait", action="store_true", help="drain: wait until the node holds no replica")
    n.add_argument("--force", action="store_true", help="drain even if the stop check fails")
    n.add_argument("--rack", default=None, help="add: the new node's rack (default: the rack with fewest nodes)")
    n.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    n.add_argument("--log-level", default="info")
    n.set_defaults(func=cmd_node)

    g = sub.add_parser("gateway", help="run the NBD gateway in the foreground (what systemd runs)")
    g.add_argument("--config", required=True)
    g.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    g.add_argument("--log-level", default="info")
    g.set_defaults(func=cmd_gateway)

    d = sub.add_parser("demo", help="start a local 3-rack cluster with a volume 'demo' (make demo)")
    d.add_argument("--dir", default=str(DEMO_DIR), help="cluster directory (default $RAFTBLOCK_DIR or .raftblock)")
    d.add_argument("--nbd-port", type=int, default=DEMO_NBD_PORT,
                   help="gateway NBD port (default $RAFTBLOCK_NBD_PORT or 10809; 0 picks a free one)")
    d.add_argument("--size", default="1G")
    d.add_argument("--replication", choices=["raft", "chain"], default=None,
                   help="the cluster's default replication (when the demo cluster is first made)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:  # `raftblock cluster status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
