# The iSCSI adapter (raftblock/gateway/iscsi_server.py) on real sockets in this process, over an in-memory
# volume: what needs the clock and the event loop.
#
# Enforces: rule 3 (a login that never finishes is closed after login_timeout_s while other sessions go on),
# rule 4 (ABORT TASK answers only after the aborted write has ended, and that write gets no response), and
# rule 3's reinstatement (a login with a live session's ISID closes the old one).
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from test_scsi import MemBackend  # rootdir-relative import, as test_fast_bitmap.py does

from raftblock.gateway.iscsi_server import IQN_PREFIX, IscsiConfig, IscsiServer
from raftblock.gateway.nbd_server import VolumeCatalog

TARGET = f"{IQN_PREFIX}:vol"


class _Vol(MemBackend):
    """MemBackend named like a catalog Volume; a write can be held until `gate` is set."""

    def __init__(self) -> None:
        super().__init__(8 << 20)
        self.info: Any = type("Info", (), {"name": "vol", "volume_id": 9})()
        self.gate: asyncio.Event | None = None
        self.writes_done = 0

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await super().write(offset, data)
        self.writes_done += 1


def _pdu(op: int, flags: int, itt: int, data: bytes = b"", fields: dict[int, bytes] | None = None) -> bytes:
    b = bytearray(48)
    b[0], b[1] = op, flags
    b[5:8] = len(data).to_bytes(3, "big")
    struct.pack_into(">I", b, 16, itt)
    for off, v in (fields or {}).items():
        b[off : off + len(v)] = v
    return bytes(b) + data + bytes(-len(data) % 4)


async def _read_pdu(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    bhs = await r.readexactly(48)
    dsl = int.from_bytes(bhs[5:8], "big")
    data = await r.readexactly(dsl + (-dsl % 4))
    return bhs, data[:dsl]


async def _login(port: int, isid: int = 1) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    keys = (f"InitiatorName=iqn.2026-12.org.example:h\0TargetName={TARGET}\0ImmediateData=Yes\0"
            "InitialR2T=No\0").encode()
    w.write(_pdu(0x43, 0x87, 1, keys, {8: bytes([0x40, 0, 0, 0, 0, isid]), 24: struct.pack(">I", 1)}))
    bhs, _ = await _read_pdu(r)
    assert bhs[0] == 0x23 and bhs[36:38] == b"\0\0"
    return r, w


async def _serve(vol: _Vol, **cfg: Any) -> IscsiServer:
    cat = VolumeCatalog()
    cat.add(vol)  # type: ignore[arg-type]
    srv = IscsiServer(cat, IscsiConfig(port=0, **cfg))
    await srv.start()
    return srv


def test_a_login_that_never_finishes_is_closed_and_others_go_on() -> None:
    async def main() -> None:
        vol = _Vol()
        srv = await _serve(vol, login_timeout_s=0.3)
        port = int(srv.address.rsplit(":", 1)[1])
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(_pdu(0x43, 0x87, 1)[:20])  # half a login PDU, then silence
            r2, w2 = await _login(port)
            assert await asyncio.wait_for(r1.read(100), 5) == b""  # closed by the target
            w2.write(_pdu(0x01, 0x80, 5, b"", {20: struct.pack(">II", 0, 1), 32: bytes(16)}))  # TEST UNIT READY
            bhs, _ = await asyncio.wait_for(_read_pdu(r2), 5)
            assert bhs[0] == 0x21 and bhs[3] == 0
            w1.close()
            w2.close()
        finally:
            await srv.shutdown()

    asyncio.run(main())


def test_abort_task_answers_after_the_aborted_write_ended_and_it_gets_no_response() -> None:
    """RFC 7143 4.2.3.? / rule 4: the TMF response follows the end of the aborted task; no SCSI Response
    for it (the initiator must not see both)."""

    async def main() -> None:
        vol = _Vol()
        vol.gate = asyncio.Event()
        srv = await _serve(vol)
        port = int(srv.address.rsplit(":", 1)[1])
        try:
            r, w = await _login(port)
            cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])  # WRITE(10) LBA 0, 8 blocks, immediate data
            w.write(_pdu(0x01, 0xA1, 7, b"\x5a" * 4096, {20: struct.pack(">II", 4096, 1), 32: cdb.ljust(16, b"\0")}))
            await asyncio.sleep(0.05)  # let the write reach the (held) volume; the check below does not rely on it
            w.write(_pdu(0x02, 0x81, 8, b"", {20: struct.pack(">II", 7, 2), 32: struct.pack(">I", 1)}))
            early = asyncio.ensure_future(_read_pdu(r))
            done, _ = await asyncio.wait([early], timeout=0.3)
            assert not done, "the TMF response came while the aborted write was still running"
            vol.gate.set()
            bhs, _ = await asyncio.wait_for(early, 5)
            assert bhs[0] == 0x22 and struct.unpack_from(">I", bhs, 16)[0] == 8 and bhs[2] == 0  # complete
            w.write(_pdu(0x01, 0x80, 9, b"", {20: struct.pack(">II", 0, 3), 32: bytes(16)}))
            bhs, _ = await asyncio.wait_for(_read_pdu(r), 5)
            assert bhs[0] == 0x21 and struct.unpack_from(">I", bhs, 16)[0] == 9  # not the aborted write's
            assert vol.writes_done == 1
            w.close()
        finally:
            await srv.shutdown()

    asyncio.run(main())


def test_a_login_with_a_live_sessions_isid_reinstates_it() -> None:
    """RFC 7143 6.3.5 (ERL 0): the old connection is closed."""

    async def main() -> None:
        srv = await _serve(_Vol())
        port = int(srv.address.rsplit(":", 1)[1])
        try:
            r1, w1 = await _login(port, isid=3)
            r2, w2 = await _login(port, isid=3)
            assert await asyncio.wait_for(r1.read(100), 5) == b""
            w2.write(_pdu(0x01, 0x80, 5, b"", {20: struct.pack(">II", 0, 1), 32: bytes(16)}))
            bhs, _ = await asyncio.wait_for(_read_pdu(r2), 5)
            assert bhs[0] == 0x21
            w1.close()
            w2.close()
        finally:
            await srv.shutdown()

    asyncio.run(main())


def test_host_connections_have_tcp_keepalive() -> None:
    """A host that vanished without a FIN must not hold its volume's exclusive attach forever: keepalive
    probes end its connection (nbd_server.set_keepalive, used by both servers)."""

    async def main() -> None:
        srv = await _serve(_Vol())
        port = int(srv.address.rsplit(":", 1)[1])
        try:
            r, w = await _login(port)
            (conn,) = srv.connections
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            w.close()
        finally:
            await srv.shutdown()

    asyncio.run(main())
