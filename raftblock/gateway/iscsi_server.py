"""iSCSI target: the asyncio adapter binding the sans-I/O codec (iscsi.py) and the SCSI layer (scsi.py) to
sockets and volumes, beside the NBD server and over the same VolumeCatalog.

Owns connections (one session each), targets (one per volume, LUN 0), task management and shutdown.

Rules:
1. Target names: `iqn.2026-12.org.raftblock:<volume>` when the volume name is a valid iSCSI name part
   (lower case letters, digits, '.', '-'); otherwise `iqn.2026-12.org.raftblock:id<volume id>`, with the
   volume's name as TargetAlias. iSCSI names are case-insensitive (RFC 3722): lookups fold case.
2. Commands of a session run concurrently (like NBD requests); the CmdSN window (iscsi.py rule 1) bounds
   how many. Every answer goes through the codec in completion order.
3. A login for an (initiator, ISID) that already has a session reinstates it (RFC 7143 6.3.5, ERL 0): the
   old connection is closed first. A login not finished within `login_timeout_s` is closed.
4. ABORT TASK, ABORT/CLEAR TASK SET, LUN RESET and TARGET WARM RESET wait until the aborted commands
   have ended (a write already sent to the groups completes or fails there) and send no response for
   them; the TMF response comes after. So nothing an initiator believes aborted lands later.
5. The exclusive attach (node/gateway.py rule 3) is taken at login of a normal session and given back
   when its connection closes; commands wait for it, and a refused attach closes the session.
6. Shutdown: stop accepting, let running commands finish (bounded by `drain_timeout_s`), close.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import structlog

from raftblock.gateway import iscsi, scsi
from raftblock.gateway.nbd_server import (
    Attacher,
    OpStats,
    VolumeCatalog,
    attach_done,
    release_attach,
    set_keepalive,
)
from raftblock.gateway.scsi_pr import Sense
from raftblock.replication.group import GroupError

log = structlog.get_logger(__name__)

IQN_PREFIX = "iqn.2026-12.org.raftblock"
_IQN_PART = re.compile(r"^[a-z0-9.-]+$")
ABORT_WAIT_S = 30.0

# SCSI opcode -> the `op` label of raftblock_gateway_io_* (obs/exporters.py)
_READS = {0x08, 0x28, 0xA8, 0x88}
_WRITES = {0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x89}
_OP_NAMES = {**dict.fromkeys(_READS, "read"), **dict.fromkeys(_WRITES, "write"), 0x35: "flush", 0x91: "flush",
             0x42: "trim", 0x41: "zero", 0x93: "zero"}


def target_name(volume: str, volume_id: int) -> str:
    """Rule 1."""
    if _IQN_PART.match(volume):
        return f"{IQN_PREFIX}:{volume}"
    return f"{IQN_PREFIX}:id{volume_id}"


@dataclass
class IscsiConfig:
    bind: str = "127.0.0.1"
    port: int = 3260
    login_timeout_s: float = 15.0
    drain_timeout_s: float = 30.0
    max_transfer_bytes: int = 32 << 20
    queue_depth: int = 128
    portal: str = ""  # the address SendTargets announces ("" = the listening address)


class _Running:
    __slots__ = ("cmd", "task", "suppressed")

    def __init__(self, cmd: iscsi.Command) -> None:
        self.cmd = cmd
        self.task: asyncio.Task[None] | None = None
        self.suppressed = False


class IscsiConnection(asyncio.Protocol):
    _ids = itertools.count(1)

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.id = next(self._ids)
        self.transport: asyncio.Transport | None = None
        limits = iscsi.Limits(max_transfer_bytes=server.config.max_transfer_bytes,
                              queue_depth=server.config.queue_depth)
        self.codec = iscsi.TargetConnection(server.target_catalog, data_out_bytes=self._data_out_bytes,
                                            limits=limits, new_tsih=server.new_tsih)
        self.volume = ""
        self.session_type = ""  # "" until logged in
        self.lun: scsi.Lun | None = None
        self.nexus: scsi.Nexus | None = None
        self.session_key: tuple[str, bytes] | None = None
        self.running: dict[int, _Running] = {}
        self.attach_task: asyncio.Task[None] | None = None
        self.closing = False
        self.io: dict[str, OpStats] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._bg: set[asyncio.Task[None]] = set()
        self.log = log.bind(iscsi_conn=self.id)

    # --- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_keepalive(transport)
        self.log = self.log.bind(peer=str(self.transport.get_extra_info("peername")))
        self.server.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.server.config.login_timeout_s, self._login_timeout)

    def _login_timeout(self) -> None:
        if not self.codec.logged_in:
            self.log.warning("iscsi.login_timeout")
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.codec.receive_data(data)
        try:
            while not self.closing:
                ev = self.codec.next_event()
                if ev is iscsi.NEED_DATA:
                    break
                if isinstance(ev, iscsi.Command):
                    self._on_command(ev)
                elif isinstance(ev, iscsi.LoggedIn):
                    self._on_login(ev)
                elif isinstance(ev, iscsi.TaskManagement):
                    self._spawn(self._on_tmf(ev))
                elif isinstance(ev, iscsi.LogoutRequested):
                    self._spawn(self._on_logout(ev))
                elif isinstance(ev, iscsi.Closed):
                    if ev.reason.startswith("login refused"):
                        self.server.logins["refused"] += 1
                        self.log.warning("iscsi.login_refused", reason=ev.reason)
                    else:
                        self.log.info("iscsi.closed_by_codec", reason=ev.reason)
                    self._flush()
                    self.close()
        except iscsi.ProtocolError as e:
            self.server.protocol_errors += 1
            self.log.warning("iscsi.protocol_error", error=str(e))
            self._flush()
            self.close()
            return
        finally:
            if self.codec.data_errors:  # iscsi.py rule 3: a write ended for a broken Data-Out sequence
                self.server.data_out_refused += len(self.codec.data_errors)
                self.log.warning("iscsi.data_out_refused", errors=self.codec.data_errors[:8])
                self.codec.data_errors.clear()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self.session_key is not None and self.server.sessions.get(self.session_key) is self:
            del self.server.sessions[self.session_key]
        if self.lun is not None and self.nexus is not None:
            self.lun.nexus_lost(self.nexus)
        if self.volume:
            self.server.catalog.attached[self.volume] -= 1
            self.log.info("iscsi.detached", volume=self.volume)
            if self.server.attacher is not None and self.attach_task is not None:
                release_attach(self.server.attacher, self.volume, self.attach_task)

    # --- events -----------------------------------------------------------------------------------
    def _on_login(self, ev: iscsi.LoggedIn) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.log = self.log.bind(initiator=ev.initiator, session_type=ev.session_type)
        self.server.logins["ok"] += 1
        self.session_type = ev.session_type
        if ev.session_type != "Normal":
            self.log.info("iscsi.discovery_login")
            return
        key = (ev.initiator.lower(), ev.isid)
        old = self.server.sessions.get(key)
        if old is not None and old is not self:
            self.log.info("iscsi.session_reinstated")  # rule 3
            old.close()
        self.session_key = key
        self.server.sessions[key] = self
        volume = self.server.volume_of(ev.target)
        assert volume is not None  # the codec checked target_exists
        self.volume = volume
        self.lun = self.server.lun_for(volume)
        self.lun.forget_reservations()  # scsi.py rule 5: the first command reads the store itself
        self.nexus = scsi.Nexus(initiator=f"{ev.initiator},i,0x{ev.isid.hex()}", target_port=f"{ev.target},t,0x0001")
        cat = self.server.catalog
        self.io = cat.io_of(volume)
        cat.attached[volume] = cat.attached.get(volume, 0) + 1
        if self.server.attacher is not None:
            self.attach_task = asyncio.get_running_loop().create_task(self.server.attacher.acquire(volume))
        self.log = self.log.bind(volume=volume)
        p = self.codec.params
        self.log.info("iscsi.attached", target=ev.target, header_digest=p.header_digest, data_digest=p.data_digest,
                      immediate_data=p.immediate_data, initial_r2t=p.initial_r2t,
                      first_burst=p.first_burst_bytes, max_burst=p.max_burst_bytes,
                      initiator_segment=p.max_recv_data_segment_bytes)

    def _on_command(self, cmd: iscsi.Command) -> None:
        r = _Running(cmd)
        self.running[cmd.itt] = r
        r.task = asyncio.get_running_loop().create_task(self._run(r))

    async def _run(self, r: _Running) -> None:
        cmd = r.cmd
        lun, nexus = self.lun, self.nexus
        assert lun is not None and nexus is not None
        st = self.io.get(_OP_NAMES.get(cmd.cdb[0], "other")) if self.io else None
        t0 = time.monotonic()
        ok = False
        status, sense = scsi.CHECK_CONDITION, b""
        data: bytes | bytearray | memoryview = b""
        try:
            at = self.attach_task
            if at is not None and not attach_done(at):
                try:
                    await asyncio.shield(at)
                except Exception as e:  # noqa: BLE001 — refused attach (rule 5)
                    self.log.warning("iscsi.attach_refused", error=str(e))
                    self.close()
                    return
            if cmd.lun != 0:
                status, data, sense = _other_lun(cmd.cdb)
                if cmd.cdb[0] == 0xA0:  # REPORT LUNS answers on any LUN
                    res = await lun.execute(nexus, cmd.cdb, cmd.data_out, edtl_bytes=cmd.edtl if cmd.write else None)
                    status, data, sense = res.status, res.data, res.sense
            else:
                res = await lun.execute(nexus, cmd.cdb, cmd.data_out, edtl_bytes=cmd.edtl if cmd.write else None)
                status, data, sense = res.status, res.data, res.sense
            ok = status == scsi.GOOD
        except GroupError as e:
            self.log.warning("iscsi.command_failed", opcode=cmd.cdb[0], error=str(e))
            sense = _sense(0x04 if e.errno == 5 else 0x0B, 0x44 if e.errno == 5 else 0x00, 0)
        except Exception as e:  # noqa: BLE001 — the process stays up; the host gets a hardware error
            self.log.exception("iscsi.command_crashed", opcode=cmd.cdb[0], error=type(e).__name__)
            sense = _sense(0x04, 0x44, 0x00)  # HARDWARE ERROR, INTERNAL TARGET FAILURE
        finally:
            self.running.pop(cmd.itt, None)
            if st is not None:
                st.ops += 1
                st.latency.observe(time.monotonic() - t0)
                if ok:
                    st.bytes += len(data) if cmd.read else len(cmd.data_out)
                else:
                    st.errors += 1
        self.codec.complete(cmd, status, data, sense, send=not r.suppressed and not self.closing)
        self._schedule_flush()

    async def _abort(self, runs: list[_Running]) -> None:
        """Rule 4: no response for them, and wait until they have ended."""
        tasks = []
        for r in runs:
            r.suppressed = True
            if r.task is not None:
                tasks.append(r.task)
        if tasks:
            await asyncio.wait(tasks, timeout=ABORT_WAIT_S)

    async def _on_tmf(self, ev: iscsi.TaskManagement) -> None:
        fn = ev.function
        codec = self.codec
        if fn == iscsi.TMF_ABORT_TASK:
            if codec.forget_write(ev.referenced_itt):
                resp = iscsi.TMF_RSP_COMPLETE
            elif ev.referenced_itt in self.running:
                await self._abort([self.running[ev.referenced_itt]])
                resp = iscsi.TMF_RSP_COMPLETE
            else:
                # Not here: never received (in the window: nothing to do) or already answered.
                resp = iscsi.TMF_RSP_COMPLETE if iscsi.sn_le(codec.exp_cmdsn, ev.ref_cmdsn) else iscsi.TMF_RSP_NO_TASK
        elif fn in (iscsi.TMF_ABORT_TASK_SET, iscsi.TMF_CLEAR_TASK_SET):
            codec.forget_all_writes()
            await self._abort(list(self.running.values()))
            resp = iscsi.TMF_RSP_COMPLETE
        elif fn in (iscsi.TMF_LUN_RESET, iscsi.TMF_TARGET_WARM_RESET):
            if fn == iscsi.TMF_LUN_RESET and ev.lun != 0:
                resp = iscsi.TMF_RSP_NO_LUN
            else:
                # Every task of the logical unit, of every session on it, ends without a response.
                peers = [c for c in self.server.connections if c.volume == self.volume]
                runs = [r for c in peers for r in c.running.values()]
                for c in peers:
                    c.codec.forget_all_writes()
                await self._abort(runs)
                if self.lun is not None:
                    self.lun.reset(self.nexus, kind="lun" if fn == iscsi.TMF_LUN_RESET else "target")
                resp = iscsi.TMF_RSP_COMPLETE
        else:
            resp = iscsi.TMF_RSP_NOT_SUPPORTED
        self.log.info("iscsi.task_management", function=fn, referenced_itt=ev.referenced_itt, response=resp)
        codec.tmf_response(ev.itt, resp)
        self._flush()

    async def _on_logout(self, ev: iscsi.LogoutRequested) -> None:
        if self.running:
            await asyncio.wait([r.task for r in self.running.values() if r.task is not None],
                               timeout=self.server.config.drain_timeout_s)
        reason_ok = ev.reason in (0, 1)
        self.codec.logout_response(ev.itt, 0 if reason_ok else 1)
        self.log.info("iscsi.logout", reason=ev.reason)
        self._flush()
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------
    def _data_out_bytes(self, target: str, cdb: bytes) -> int:
        """How much write data a command of this session carries: its logical unit, found once at login (the
        codec hands out commands only after LoggedIn)."""
        return self.lun.data_out_bytes(cdb) if self.lun is not None else 0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _schedule_flush(self) -> None:
        # Answers completed in one loop turn leave in one send.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self.codec.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def close(self) -> None:
        self._flush()
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _sense(key: int, asc: int, ascq: int) -> bytes:
    return Sense(key, asc, ascq).encode()


def _other_lun(cdb: bytes) -> tuple[int, bytes, bytes]:
    """A LUN other than 0 (SPC-4 4.6.? / SAM-5): INQUIRY says no device (peripheral qualifier 011b), the rest
    LOGICAL UNIT NOT SUPPORTED."""
    if cdb[0] == 0x12 and not cdb[1] & 1:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        data = bytes([0x7F, 0, 6, 2, 31]) + bytes(31)
        return scsi.GOOD, data[:alloc], b""
    return scsi.CHECK_CONDITION, b"", _sense(0x05, 0x25, 0x00)


class IscsiServer:
    def __init__(self, catalog: VolumeCatalog, config: IscsiConfig, attacher: Attacher | None = None, *,
                 chap: Callable[[str], iscsi.Chap | None] = lambda volume: None,
                 pr_store: scsi.PrStore | None = None) -> None:
        self.catalog = catalog
        self.config = config
        self.attacher = attacher
        self._chap = chap
        self.pr_store: scsi.PrStore = pr_store if pr_store is not None else scsi.MemoryPrStore()
        self.connections: set[IscsiConnection] = set()
        self.sessions: dict[tuple[str, bytes], IscsiConnection] = {}
        self._luns: dict[str, tuple[object, scsi.Lun]] = {}
        self._tsih = itertools.count(1)
        # for /metrics (obs/exporters.py)
        self.logins = {"ok": 0, "refused": 0}
        self.protocol_errors = 0  # connections closed for input that could not be framed
        self.data_out_refused = 0  # writes ended for a broken Data-Out sequence
        self.shutting_down = False
        self.address = ""
        self._server: asyncio.AbstractServer | None = None
        self.target_catalog = iscsi.TargetCatalog(
            target_names=self.target_names,
            target_exists=lambda name: self.volume_of(name) is not None,
            chap=self.chap_for,
            portal_addresses=lambda: [f"{self.config.portal or self.address},1"],
        )

    # --- targets ----------------------------------------------------------------------------------
    def _targets(self) -> dict[str, str]:
        out = {}
        for name in self.catalog.names():
            vol = self.catalog.get(name)
            if vol is not None:
                out[target_name(name, vol.info.volume_id)] = name
        return out

    def target_names(self) -> list[str]:
        return sorted(self._targets())

    def volume_of(self, target: str) -> str | None:
        return self._targets().get(target.lower())

    def chap_for(self, target: str) -> iscsi.Chap | None:
        if not target:
            return self._chap("")
        vol = self.volume_of(target)
        return self._chap(vol) if vol is not None else None

    def lun_for(self, volume: str) -> scsi.Lun:
        vol = self.catalog.get(volume)
        assert vol is not None
        have = self._luns.get(volume)
        if have is not None and have[0] is vol:
            return have[1]
        lun = scsi.Lun(volume, vol, volume_id=vol.info.volume_id, pr_store=self.pr_store,
                       max_transfer_bytes=self.config.max_transfer_bytes)
        self._luns[volume] = (vol, lun)
        return lun

    def new_tsih(self) -> int:
        return next(self._tsih) % 0xFFFF or next(self._tsih)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: IscsiConnection(self), self.config.bind, self.config.port,
                                                reuse_address=True, backlog=128)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("iscsi.listening", bind=host, port=port)
        return host, port

    async def shutdown(self) -> None:
        """Rule 6."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        tasks = [r.task for c in self.connections for r in c.running.values() if r.task is not None]
        for c in list(self.connections):
            if c.transport is not None and not c.transport.is_closing():
                c.transport.pause_reading()
        if tasks:
            log.info("iscsi.draining", inflight=len(tasks))
            await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
        for c in list(self.connections):
            c.close()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("iscsi.stopped")
