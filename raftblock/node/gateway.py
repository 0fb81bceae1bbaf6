"""`raftblock gateway --config FILE`: the NBD gateway of a cluster.

Composition root of the gateway process: it follows the cluster map in the metadata group, opens one
NodeClient to the storage nodes (one connection per node, leader cache, retries within a deadline) and
exports every volume of the map over NBD; each extent goes to the GroupClient named by its extent id
(clustermap.py rule 2).

Config (TOML):

    bind = "127.0.0.1"
    port = 10809
    admin_socket = "/run/raftblock/gateway.sock"   # JSON lines: {"op": "reload"} | {"op": "status"}
    admin_listen = "10.0.9.1:7401"                 # optional: the same over TCP, for a deployed cluster's CLI
                                                   # (challenge with the cluster secret, gateway/admin.py)
    http = "10.0.9.1:9401"                         # optional: Prometheus /metrics
    iscsi = "10.0.9.1:3260"                        # optional: the iSCSI target (gateway/iscsi_server.py)
    iscsi_portal = "gw1.example:3260"              # optional: the address SendTargets announces
    deadline_s = 10.0                              # how long one I/O may wait for a leader
    refresh_s = 1.0                                # how often the map is re-read from the metadata group
    gateway_id = "gw1"                             # who holds a volume's attachment (exclusive attach)
    [meta]                                         # the metadata group: admin ports and the cluster secret
    admin = { 1 = "10.0.1.1:7201", 2 = "10.0.2.1:7201", 3 = "10.0.3.1:7201" }
    secret_file = "/etc/raftblock/cluster.secret"

Storage node addresses come from the map (nodes register theirs).

Rules:
1. A write is acknowledged to the host only after the group's leader answered OK: committed on a
   majority of fsynced WALs and applied (GroupClient rule 1). FLUSH and FUA are therefore honest.
2. The map is re-read every `refresh_s` and on `reload` (sent by `raftblock volume create/delete`);
   volumes that vanished stop accepting new connections; attached hosts keep theirs until they detach.
   A metadata outage does not stop I/O on volumes already known.
3. Exclusive attach: the first host connection to a volume attaches it in the metadata group for this
   gateway (refused if another gateway holds it); the attach epoch goes with every request to the
   volume's groups, and nodes refuse older epochs, so a gateway whose attachment was taken over (`volume
   attach --force`) is fenced. The last connection's close detaches.
4. SIGTERM drains in-flight requests, then exits 0.
5. With an admin socket, `<admin_socket>.lock` is held for the process's lifetime (node/dirlock.py): a
   second gateway on the same socket exits 1 at once instead of taking the socket from the first.
6. Snapshots (control/snapshots.py): the admin op `hold` raises the acknowledgement barrier of the named
   volumes (client/volume.py rule 4) until the same connection sends `release`, closes, or `timeout_s`
   passes. A volume attached here while one of its snapshots is `creating` serves no I/O until that cut
   is over (ready or gone); a cut still `creating` after CUT_WAIT_S is failed (`deleting`) by the gateway,
   so the CLI that made it cannot mark it ready later without this gateway's barrier.
7. iSCSI (gateway/iscsi_server.py) serves the same catalog with the same attach, barrier and durability
   rules; CHAP credentials of a volume's target come from the map (`volume set-chap`), and SCSI persistent
   reservations live in the metadata group (`MetaPrStore`: compare-and-set by version), so they hold across
   gateways and gateway restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import structlog

from raftblock.client.router import GroupClient, NodeClient
from raftblock.client.volume import Volume
from raftblock.gateway.iscsi import Chap
from raftblock.gateway.iscsi_server import IscsiConfig, IscsiServer
from raftblock.gateway.nbd_server import GatewayConfig, NbdServer, VolumeCatalog
from raftblock.ids import group_of_extent
from raftblock.meta.rpc import MetaClient, MetaClientError
from raftblock.meta.state import MetaState
from raftblock.node.clustermap import volume_infos
from raftblock.node.dirlock import DirectoryInUse, lock_file
from raftblock.obs.exporters import gateway_fill
from raftblock.obs.serve import start_metrics
from raftblock.replication.raft.types import NodeId
from raftblock.sealing import VolumeKeys
from raftblock.tls import TlsConfig, set_identity
from raftblock.wire.auth import KeyRing

log = structlog.get_logger(__name__)

ADMIN_LINE_BYTES_MAX = 64 << 10
CUT_WAIT_S = 10.0  # rule 6


class AttachRefused(Exception):
    pass


class _Hold:
    def __init__(self, ready: asyncio.Future[int]) -> None:
        self.count = 1
        self.ready = ready
        self.epoch = 0


class Gateway:
    def __init__(self, meta_admin: dict[int, str], secret: bytes, deadline_s: float, gateway_id: str = "gw1",
                 client: NodeClient | None = None) -> None:
        self.gateway_id = gateway_id
        self._holds: dict[str, _Hold] = {}
        self.deadline_s = deadline_s
        self.meta = MetaClient({NodeId(k): v for k, v in meta_admin.items()}, secret)
        self._secret = secret
        self._auth_logged: dict[str, float] = {}
        self.state: MetaState | None = None
        # Node addresses: from the map. A gateway inside a node is handed that node's client (node/inproc.py).
        self.client = client if client is not None else NodeClient({}, deadline_s=deadline_s)
        self.catalog = VolumeCatalog()
        self.iscsi: IscsiServer | None = None  # set by start_gateway when iSCSI is configured
        self._groups: dict[int, GroupClient] = {}
        self.keys = VolumeKeys(secret, self.meta.next_seal_epoch)  # encrypted volumes (raftblock/sealing.py)

    def group_for(self, extent_id: int) -> GroupClient:
        gid = group_of_extent(extent_id)
        g = self._groups.get(gid)
        if g is None:
            rec = self.state.groups.get(gid) if self.state is not None else None  # type: ignore[call-overload]
            mode = "chain" if rec is not None and rec.mode == "chain" else "raft"
            g = self._groups[gid] = GroupClient(self.client, gid, self.deadline_s, mode=mode)
        return g

    async def reload(self) -> None:
        st = await self.meta.state(barrier=True)
        for n in st.nodes.values():  # storage nodes as the map knows them (they register their address)
            host, _, port = n.address.rpartition(":")
            self.client.nodes[int(n.node_id)] = (host, int(port))
        changed = self.state is None or st.volumes != self.state.volumes
        if self.state is None or st.data_key_set() != self.state.data_key_set():
            # the data port's keys (raftblock/wire/auth.py): requests to the nodes are signed with them
            self.client.set_ring(KeyRing.from_map(self._secret, st.data_key_set()))
        self.keys.update(st.master_keys)
        if changed:
            vol_of = {int(g): v.volume_id for v in st.volumes.values() for g in v.extent_groups}
            self.client.volume_of = lambda gid: vol_of.get(gid, 0)
        self.state = st
        for gid, grec in st.groups.items():  # chains: route to the map's head and tail at once
            if grec.mode == "chain" and grec.members:
                self.client.leaders[int(gid)] = int(grec.members[0])
                self.client.leaders[-int(gid)] = int(grec.members[-1])
        if not changed:
            return
        volumes = []
        for info in volume_infos(st):
            old = self.catalog.get(info.name)
            if old is not None and old.info.volume_id == info.volume_id and \
                    old.info.extent_size_bytes == info.extent_size_bytes:
                old.info = info  # the same volume (grown): connections and holds keep their object
                volumes.append(old)
            else:
                volumes.append(Volume(info, self.group_for, self.keys))
        self.catalog.replace_all(volumes)
        log.info("gateway.map_loaded", volumes=len(st.volumes), groups=len(st.groups))

    # --- exclusive attach (nbd_server.Attacher) -------------------------------------------------
    async def acquire(self, volume: str) -> None:
        h = self._holds.get(volume)
        if h is not None:
            h.count += 1
            await asyncio.shield(h.ready)
            return
        h = self._holds[volume] = _Hold(asyncio.get_running_loop().create_future())
        try:
            res = await self.meta.attach(volume, self.gateway_id)
            if not res.ok:
                raise AttachRefused(res.message or res.error)
            h.epoch = int(res.value["attach_epoch"])
        except Exception as e:
            del self._holds[volume]
            h.ready.set_exception(e)
            h.ready.exception()  # retrieved: waiters re-raise it
            raise
        self._set_epoch(volume, h.epoch)
        try:
            await self._await_cuts(volume)
        except Exception as e:
            del self._holds[volume]
            h.ready.set_exception(e)
            h.ready.exception()
            raise
        h.ready.set_result(h.epoch)
        log.info("gateway.attached", volume=volume, attach_epoch=h.epoch, gateway=self.gateway_id)

    async def _await_cuts(self, volume: str) -> None:
        """Rule 6: no I/O on a volume while a snapshot of it is being cut without this gateway's barrier."""
        deadline = time.monotonic() + CUT_WAIT_S
        while True:
            st = await self.meta.state(barrier=True)
            v = st.volumes.get(volume)
            pending = [r.name for r in st.snapshots.values()
                       if v is not None and r.volume_id == v.volume_id and r.state == "creating"]
            if not pending:
                return
            if time.monotonic() > deadline:
                for name in pending:
                    res = await self.meta.set_snapshot_state(volume, name, "deleting")
                    log.warning("gateway.cut_failed", volume=volume, snapshot=name, ok=res.ok, error=res.error)
                continue
            await asyncio.sleep(0.05)

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: dict[str, Any]) -> None:
        """Rule 6: the barrier of `req["volumes"]` until `release`, the connection's end or the timeout."""
        names = req.get("volumes")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("hold: volumes must be a list of names")
        if any(self.catalog.get(n) is None for n in names):
            await self.reload()  # a volume made since the last map read (a round trip avoided otherwise)
        vols = []
        for n in names:
            vol = self.catalog.get(n)
            if vol is None:
                raise ValueError(f"hold: no volume {n!r} here")
            vols.append(vol)
        timeout_s = float(req.get("timeout_s", 30.0))
        for vol in vols:
            vol.hold()
        t0 = time.monotonic()
        try:
            writer.write(json.dumps({"ok": True, "held": names}).encode() + b"\n")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.readline(), timeout_s)
            except TimeoutError:
                log.warning("gateway.hold_timeout", volumes=names, timeout_s=timeout_s)
        finally:
            for vol in vols:
                vol.release()
            log.info("gateway.hold_released", volumes=names, held_ms=round((time.monotonic() - t0) * 1000, 2))

    def release(self, volume: str) -> None:
        h = self._holds.get(volume)
        if h is None:
            return
        h.count -= 1
        if h.count == 0:
            del self._holds[volume]
            asyncio.get_running_loop().create_task(self._detach(volume, h.epoch))

    async def _detach(self, volume: str, epoch: int) -> None:
        try:
            res = await self.meta.detach(volume, self.gateway_id, epoch)
            log.info("gateway.detached", volume=volume, attach_epoch=epoch, ok=res.ok, error=res.error)
        except (MetaClientError, OSError, TimeoutError) as e:
            log.warning("gateway.detach_failed", volume=volume, error=str(e))

    def _set_epoch(self, volume: str, epoch: int) -> None:
        if self.state is None or volume not in self.state.volumes:
            return
        for gid in set(self.state.volumes[volume].extent_groups):
            self.group_for(int(gid) << 32).epoch = epoch

    async def follow(self, stop: asyncio.Event, refresh_s: float) -> None:
        while not stop.is_set():
            try:
                await self.reload()
            except (MetaClientError, OSError, TimeoutError) as e:
                log.warning("gateway.meta_unreachable", error=str(e))
            try:
                await asyncio.wait_for(stop.wait(), refresh_s)
            except TimeoutError:
                pass

    def chap(self, volume: str) -> Chap | None:
        """Rule 7: CHAP of `volume`'s iSCSI target ("" = discovery sessions), from the map."""
        st = self.state
        if st is None:
            return None
        key = 0
        if volume:
            rec = st.volumes.get(volume)
            if rec is None:
                return None
            key = rec.volume_id
        a = st.iscsi_auth.get(key)
        if a is None:
            return None
        return Chap(a.user, a.secret.encode(), a.target_user, a.target_secret.encode())

    def status(self) -> dict[str, Any]:
        vols = self.state.volumes.values() if self.state is not None else []
        return {
            "volumes": {v.name: {"size_bytes": v.size_bytes, "attached": self.catalog.attached.get(v.name, 0)}
                        for v in vols},
            "leaders": {str(g): n for g, n in sorted(self.client.leaders.items())},
            "retries": self.client.retries,
        }

    async def admin_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The admin connection over TCP: the peer proves the cluster secret first (gateway/admin.py rule 1)."""
        from raftblock.gateway.admin import AdminAuthError, challenge

        try:
            await challenge(reader, writer, self._secret)
        except (AdminAuthError, OSError) as e:
            peer = str(writer.get_extra_info("peername", ("?",))[0])
            now = time.monotonic()
            if now - self._auth_logged.get(peer, -1e9) > 60:  # once per peer per minute
                self._auth_logged[peer] = now
                log.warning("gateway.admin_refused", peer=peer, error=str(e))
            try:
                writer.write(b'{"ok": false, "error": "authentication failed"}\n')
                await writer.drain()
            except OSError:
                pass
            writer.close()
            return
        await self.admin(reader, writer)

    async def admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if len(line) > ADMIN_LINE_BYTES_MAX:
                raise ValueError("request too long")
            req = json.loads(line or b"{}")
            op = req.get("op")
            if op == "reload":
                await self.reload()
                resp: dict[str, Any] = {"ok": True}
            elif op == "status":
                resp = {"ok": True, **self.status()}
            elif op == "hold":
                await self.hold(reader, writer, req)
                resp = {"ok": True, "released": True}
            else:
                resp = {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, OSError, MetaClientError, TimeoutError, RecursionError) as e:
            resp = {"ok": False, "error": str(e)}
        writer.write(json.dumps(resp).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()


class MetaPrStore:
    """Rule 7: a volume's persistent reservation state in the metadata group (scsi.PrStore)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _volume_id(self, volume: str, st: MetaState | None = None) -> int:
        st = st or self.gw.state or await self.gw.meta.state(barrier=True)
        rec = st.volumes.get(volume)
        if rec is None:
            raise OSError(f"no volume {volume!r} in the map")
        return rec.volume_id

    async def load(self, volume: str) -> tuple[int, bytes]:
        st = await self.gw.meta.state(barrier=True)
        r = st.reservations.get(await self._volume_id(volume, st))
        return (r.version, r.blob.encode()) if r is not None else (0, b"")

    def peek(self, volume: str) -> tuple[int, bytes]:
        """The state as this gateway's copy of the map has it (re-read every refresh_s): what the data path
        checks, without a metadata round trip per volume per second."""
        st = self.gw.state
        rec = st.volumes.get(volume) if st is not None else None
        r = st.reservations.get(rec.volume_id) if st is not None and rec is not None else None
        return (r.version, r.blob.encode()) if r is not None else (0, b"")

    async def cas(self, volume: str, version: int, blob: bytes) -> bool:
        res = await self.gw.meta.set_reservation(await self._volume_id(volume), version, blob.decode())
        if res.ok:
            return True
        if res.error == "stale":
            return False
        raise OSError(f"the metadata group refused the reservation update: {res.message or res.error}")


def load_config(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


class RunningGateway:
    """A started gateway (`start_gateway`): its NBD address, and `stop()`."""

    def __init__(self, gw: Gateway, server: NbdServer, uri: str, admin: asyncio.AbstractServer | None,
                 held: Any, own_client: bool, admin_tcp: asyncio.AbstractServer | None = None,
                 iscsi: IscsiServer | None = None) -> None:
        self.gw = gw
        self.server = server
        self.iscsi = iscsi
        self.uri = uri
        self._admin = admin
        self._admin_tcp = admin_tcp
        self._held = held
        self._own_client = own_client
        self._stop = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None

    def follow(self, refresh_s: float) -> None:
        self._follower = asyncio.get_running_loop().create_task(self.gw.follow(self._stop, refresh_s))

    async def stop(self) -> None:
        """Rule 4: no new connections, in-flight requests drained, then the admin socket and the lock go."""
        self._stop.set()
        if self._follower is not None:
            await self._follower
        await self.server.shutdown()
        if self.iscsi is not None:
            await self.iscsi.shutdown()
        if self._admin is not None:
            self._admin.close()
        if self._admin_tcp is not None:
            self._admin_tcp.close()
        if self._own_client:
            await self.gw.client.close()
        if self._held is not None:
            self._held.release()


async def start_gateway(cfg: dict[str, Any], meta: dict[str, Any], *, client: NodeClient | None = None,
                        node_id: int = 0, default_id: str = "gw1", http: str = "",
                        tls: TlsConfig | None = None) -> RunningGateway:
    """Start a gateway from its config table (`cfg`: bind, port, admin_socket, deadline_s, refresh_s,
    gateway_id) and the [meta] table. `client`/`node_id`: a gateway inside storage node `node_id`, reaching
    the groups through that node (node/inproc.py); the map records which node it runs on, so the groups of
    the volumes it attaches prefer that node as their leader (node/agent.py rule 6)."""
    admin_path = cfg.get("admin_socket")
    # One gateway per admin socket: a second one would unlink the socket of the first (node/dirlock.py).
    held = lock_file(Path(f"{admin_path}.lock"), f"gateway admin socket {admin_path}") if admin_path else None
    try:
        secret = Path(meta["secret_file"]).read_bytes().strip()
        meta_admin = {int(k): str(v) for k, v in meta["admin"].items()}
        gw = Gateway(meta_admin, secret, float(cfg.get("deadline_s", 10.0)), str(cfg.get("gateway_id", default_id)),
                     client=client)
        await gw.reload()
        # `tls` (the process's [tls]): NBD needs STARTTLS and a host certificate of the cluster CA (raftblock/tls.py)
        server = NbdServer(gw.catalog, GatewayConfig(bind=cfg.get("bind", "127.0.0.1"),
                                                     port=int(cfg.get("port", 10809)),
                                                     tls=tls.server_context() if tls is not None else None),
                           attacher=gw)
        host, port = await server.start()
        iscsi_server = None
        if cfg.get("iscsi"):
            ihost, _, iport = str(cfg["iscsi"]).rpartition(":")
            iscsi_server = IscsiServer(gw.catalog, IscsiConfig(bind=ihost.strip("[]"), port=int(iport),
                                                               portal=str(cfg.get("iscsi_portal", ""))),
                                       attacher=gw, chap=gw.chap, pr_store=MetaPrStore(gw))
            await iscsi_server.start()
            gw.iscsi = iscsi_server
        admin_tcp = None
        admin_listen = str(cfg.get("admin_listen") or "")
        if admin_listen:
            ahost, _, aport = admin_listen.rpartition(":")
            from raftblock import tls as tls_mod  # with the process's [tls]: mutual TLS only

            admin_tcp = await asyncio.start_server(gw.admin_tcp, ahost.strip("[]"), int(aport), ssl=tls_mod.server_ctx())
            admin_listen = f"{ahost}:{admin_tcp.sockets[0].getsockname()[1]}"
        # In the map, so `volume attach --gateway ID` can tell a gateway that exists from a typo, and the
        # CLI of a deployed cluster finds its metrics and its admin port.
        res = await gw.meta.register_gateway(gw.gateway_id, f"{host}:{port}", node_id, http or str(cfg.get("http", "")),
                                             admin_listen)
        if not res.ok:
            await server.shutdown()
            if iscsi_server is not None:
                await iscsi_server.shutdown()
            raise ValueError(f"the metadata group refused gateway {gw.gateway_id!r}: {res.message}")
        admin = None
        if admin_path:
            Path(admin_path).unlink(missing_ok=True)
            admin = await asyncio.start_unix_server(gw.admin, path=admin_path)
            os.chmod(admin_path, 0o600)
    except BaseException:
        if held is not None:
            held.release()
        raise
    scheme = "nbds" if tls is not None else "nbd"  # nbds://: qemu and libnbd then STARTTLS (raftblock/tls.py)
    running = RunningGateway(gw, server, f"{scheme}://{host}:{port}", admin, held, own_client=client is None,
                             admin_tcp=admin_tcp, iscsi=iscsi_server)
    running.follow(float(cfg.get("refresh_s", 1.0)))
    return running


async def run_gateway(cfg: dict[str, Any]) -> int:
    from raftblock.obs.log import set_process

    set_process(gateway=str(cfg.get("gateway_id", "gw1")))
    identity = TlsConfig.from_table(cfg.get("tls"))
    set_identity(identity)  # raftblock/tls.py: its links to the nodes and the metadata group are TLS too
    running = await start_gateway(cfg, cfg["meta"], tls=identity)
    http = await start_metrics(str(cfg["http"]), f"gateway {running.gw.gateway_id}", gateway_fill(running.gw)) \
        if cfg.get("http") else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    iscsi = f" iscsi://{running.iscsi.address}" if running.iscsi is not None else ""
    print(f"READY {running.uri}{iscsi}", flush=True)
    await stop.wait()
    log.info("gateway.stopping")
    if http is not None:
        await http.close()
    await running.stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("gateway.stopped")
    return 0


def main(config: str) -> int:
    cfg = load_config(Path(config))
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run_gateway(cfg))
        return uvloop.run(run_gateway(cfg))
    except DirectoryInUse as e:
        print(f"raftblock gateway: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
