# The sans-I/O iSCSI target codec (raftblock/gateway/iscsi.py), driven by a hand-built initiator.
#
# Enforces: RFC 7143 login (stages, T/C bits, TSIH, TargetPortalGroupTag in the first response, declared
# MaxRecvDataSegmentLength), CHAP (RFC 1994 MD5, mutual, wrong secret and reflected challenge refused),
# the CmdSN window (4.2.2.1: outside silently ignored, a gap waits), write data collection (immediate
# data, unsolicited Data-Out, R2T with DataSN per sequence), residuals (11.4.5), Data-In segmentation by
# the initiator's MaxRecvDataSegmentLength and MaxBurstLength, digests (CRC32C, little endian on the wire
# as libiscsi reads them), and rule 3: broken sequences end the connection after a Reject.
from __future__ import annotations

import hashlib
import struct

import crc32c
import pytest

from raftblock.gateway import iscsi
from raftblock.gateway.iscsi import Chap, TargetConnection

IQN = "iqn.2026-12.org.raftblock:vol"
INITIATOR = "iqn.2026-12.org.example:host1"
ISID = bytes.fromhex("400001370000")


def catalog(chap: Chap | None = None) -> iscsi.TargetCatalog:
    return iscsi.TargetCatalog(
        target_names=lambda: [IQN, IQN + "2"],
        target_exists=lambda n: n in (IQN, IQN + "2"),
        chap=lambda n: chap if n else None,
        portal_addresses=lambda: ["127.0.0.1:3260,1"],
    )


def write_len(target: str, cdb: bytes) -> int:
    """WRITE(10) only, 512-byte blocks (the SCSI layer's job in the product)."""
    return struct.unpack_from(">H", cdb, 7)[0] * 512 if cdb[0] == 0x2A else 0


def conn(chap: Chap | None = None, **limits: int | bool) -> TargetConnection:
    lim = iscsi.Limits(**limits)  # type: ignore[arg-type]
    return TargetConnection(catalog(chap), data_out_bytes=write_len, limits=lim,
                            random_bytes=lambda n: bytes(range(1, n + 1)))


class Pdu:
    def __init__(self, raw: bytes, hd: bool = False) -> None:
        self.bhs = raw[:48]
        off = 48 + self.bhs[4] * 4 + (4 if hd else 0)
        dsl = int.from_bytes(self.bhs[5:8], "big")
        self.data = raw[off : off + dsl]
        self.opcode = self.bhs[0] & 0x3F
        self.flags = self.bhs[1]

    def u32(self, off: int) -> int:
        return int(struct.unpack_from(">I", self.bhs, off)[0])

    @property
    def keys(self) -> dict[str, str]:
        return dict(iscsi.parse_text(self.data))


def drain(c: TargetConnection, hd: bool = False, dd: bool = False) -> list[Pdu]:
    raw = b"".join(bytes(x) for x in c.data_to_send())
    out = []
    while raw:
        dsl = int.from_bytes(raw[5:8], "big")
        n = 48 + raw[4] * 4 + (4 if hd else 0) + iscsi.pad4(dsl) + (4 if dd and dsl else 0)
        out.append(Pdu(raw[:n], hd))
        raw = raw[n:]
    return out


def events(c: TargetConnection) -> list[object]:
    out = []
    while True:
        ev = c.next_event()
        if ev is iscsi.NEED_DATA:
            return out
        out.append(ev)


def pdu(opcode: int, flags: int, itt: int, data: bytes = b"", *, fields: dict[int, bytes] | None = None,
        immediate: bool = False, hd: bool = False, dd: bool = False) -> bytes:
    b = bytearray(48)
    b[0] = opcode | (0x40 if immediate else 0)
    b[1] = flags
    b[5:8] = len(data).to_bytes(3, "big")
    struct.pack_into(">I", b, 16, itt)
    for off, v in (fields or {}).items():
        b[off : off + len(v)] = v
    out = bytes(b)
    if hd:
        out += crc32c.crc32c(bytes(b)).to_bytes(4, "little")
    padded = data + bytes(iscsi.pad4(len(data)) - len(data))
    out += padded
    if dd and data:
        out += crc32c.crc32c(padded).to_bytes(4, "little")
    return out


def login_pdu(keys: list[tuple[str, str]], csg: int, nsg: int, transit: bool, cmdsn: int = 1, itt: int = 0,
              cont: bool = False) -> bytes:
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    return pdu(iscsi.OP_LOGIN_REQ, flags, itt, iscsi.encode_text(keys), immediate=True,
               fields={8: ISID, 24: struct.pack(">I", cmdsn)})


def login(c: TargetConnection, extra: list[tuple[str, str]] | None = None, target: str = IQN) -> Pdu:
    keys = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", target),
            ("MaxRecvDataSegmentLength", "8192"), *(extra or [])]
    c.receive_data(login_pdu(keys, 1, 3, True))
    evs = events(c)
    assert any(isinstance(e, iscsi.LoggedIn) for e in evs), evs
    return drain(c)[-1]


def cmd_pdu(itt: int, cmdsn: int, cdb: bytes, edtl: int, *, read: bool = False, write: bool = False,
            data: bytes = b"", immediate: bool = False, hd: bool = False, dd: bool = False) -> bytes:
    flags = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 1
    return pdu(iscsi.OP_SCSI_CMD, flags, itt, data, immediate=immediate, hd=hd, dd=dd,
               fields={20: struct.pack(">II", edtl, cmdsn), 32: cdb.ljust(16, b"\0")})


def data_out(itt: int, ttt: int, datasn: int, offset: int, data: bytes, final: bool) -> bytes:
    return pdu(iscsi.OP_DATA_OUT, 0x80 if final else 0, itt, data,
               fields={20: struct.pack(">I", ttt), 36: struct.pack(">II", datasn, offset)})


def write10(blocks: int) -> bytes:
    return bytes([0x2A, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", blocks) + b"\0"


def test_login_negotiates_and_declares() -> None:
    """RFC 7143 6.3 / 13: a one-step operational login; the answer carries TargetPortalGroupTag (13.9, first
    response of a normal session), our MaxRecvDataSegmentLength, and the min/OR/AND results."""
    c = conn()
    rsp = login(c, [("MaxBurstLength", "16777215"), ("FirstBurstLength", "4096"), ("InitialR2T", "No"),
                    ("ImmediateData", "Yes"), ("HeaderDigest", "None,CRC32C"), ("DataDigest", "CRC32C,None"),
                    ("ErrorRecoveryLevel", "2"), ("MaxConnections", "4"), ("X-com.example.foo", "1")])
    assert rsp.opcode == iscsi.OP_LOGIN_RSP and rsp.flags & 0x80 and rsp.flags & 3 == 3
    assert rsp.bhs[36:38] == b"\0\0"
    assert struct.unpack_from(">H", rsp.bhs, 14)[0] != 0  # TSIH given in the final response
    k = rsp.keys
    assert k["TargetPortalGroupTag"] == "1"
    assert k["MaxRecvDataSegmentLength"] == str(iscsi.Limits().max_recv_data_segment_bytes)
    assert k["MaxBurstLength"] == str(iscsi.Limits().max_burst_bytes)  # min()
    assert k["FirstBurstLength"] == "4096"
    assert k["InitialR2T"] == "No" and k["ImmediateData"] == "Yes"
    assert k["HeaderDigest"] == "None" and k["DataDigest"] == "CRC32C"  # the initiator's first choice we know
    assert k["ErrorRecoveryLevel"] == "0" and k["MaxConnections"] == "1"
    assert k["X-com.example.foo"] == "NotUnderstood"
    assert c.params.data_digest and not c.params.header_digest


def test_login_to_unknown_target_and_without_initiator_name() -> None:
    c = conn()
    c.receive_data(login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN + "x")], 1, 3, True))
    evs = events(c)
    rsp = drain(c)[-1]
    assert rsp.bhs[36:38] == bytes([2, 3])  # 11.13.5: Not found
    assert isinstance(evs[-1], iscsi.Closed)
    c = conn()
    c.receive_data(login_pdu([("TargetName", IQN)], 1, 3, True))
    events(c)
    assert drain(c)[-1].bhs[36:38] == bytes([2, 7])  # missing parameter


def _chap_login(c: TargetConnection, user: str, secret: bytes, mutual: tuple[int, bytes] | None = None) -> Pdu:
    base = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", IQN)]
    c.receive_data(login_pdu([*base, ("AuthMethod", "CHAP,None")], 0, 1, True))
    events(c)
    r1 = drain(c)[-1]
    assert r1.keys["AuthMethod"] == "CHAP" and not r1.flags & 0x80  # stays in security negotiation
    c.receive_data(login_pdu([("CHAP_A", "5")], 0, 1, False))
    events(c)
    k = drain(c)[-1].keys
    ident, challenge = int(k["CHAP_I"]), bytes.fromhex(k["CHAP_C"][2:])
    resp = hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()
    keys = [("CHAP_N", user), ("CHAP_R", "0x" + resp)]
    if mutual is not None:
        keys += [("CHAP_I", str(mutual[0])), ("CHAP_C", "0x" + mutual[1].hex())]
    c.receive_data(login_pdu(keys, 0, 1, True))
    events(c)
    return drain(c)[-1]


def test_chap_one_way_and_mutual() -> None:
    """RFC 7143 12.1.3 / RFC 1994: CHAP_R = MD5(CHAP_I || secret || CHAP_C); mutual: the target answers the
    initiator's challenge with its own secret."""
    c = conn(Chap("alice", b"initiator-secret"))
    r = _chap_login(c, "alice", b"initiator-secret")
    assert r.bhs[36:38] == b"\0\0" and r.flags & 0x80 and r.flags & 3 == 1
    c = conn(Chap("alice", b"initiator-secret", "tgt", b"the-target-secret"))
    their = bytes(range(100, 116))
    r = _chap_login(c, "alice", b"initiator-secret", mutual=(7, their))
    assert r.bhs[36:38] == b"\0\0"
    assert r.keys["CHAP_N"] == "tgt"
    assert r.keys["CHAP_R"] == "0x" + hashlib.md5(bytes([7]) + b"the-target-secret" + their).hexdigest()


@pytest.mark.parametrize("case", ["wrong-secret", "wrong-user", "skip-security", "reflection"])
def test_chap_refusals(case: str) -> None:
    c = conn(Chap("alice", b"initiator-secret", "tgt", b"the-target-secret") if case == "reflection"
             else Chap("alice", b"initiator-secret"))
    if case == "skip-security":
        c.receive_data(login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN)], 1, 3, True))
        evs = events(c)
        r = drain(c)[-1]
    elif case == "reflection":  # our own challenge sent back to us (RFC 7143 12.1.3)
        base = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP")]
        c.receive_data(login_pdu(base, 0, 1, False))
        events(c)
        drain(c)
        c.receive_data(login_pdu([("CHAP_A", "5")], 0, 1, False))
        events(c)
        k = drain(c)[-1].keys
        ident, ch = int(k["CHAP_I"]), bytes.fromhex(k["CHAP_C"][2:])
        rsp = hashlib.md5(bytes([ident]) + b"initiator-secret" + ch).hexdigest()
        c.receive_data(login_pdu([("CHAP_N", "alice"), ("CHAP_R", "0x" + rsp), ("CHAP_I", str(ident)),
                                  ("CHAP_C", k["CHAP_C"])], 0, 1, True))
        evs = events(c)
        r = drain(c)[-1]
    else:
        r = _chap_login(c, "alice" if case == "wrong-secret" else "bob",
                        b"wrong-secret!!" if case == "wrong-secret" else b"initiator-secret")
        evs = []  # _chap_login drained the events
    assert r.bhs[36:38] == bytes([2, 1]), r.bhs[36:38]  # Authentication failure
    assert c.closed and not c.logged_in
    assert case in ("wrong-secret", "wrong-user") or any(isinstance(e, iscsi.Closed) for e in evs)


def test_cmdsn_window() -> None:
    """RFC 7143 4.2.2.1: a command outside [ExpCmdSN, MaxCmdSN] is silently ignored; one inside but ahead
    waits for the gap; immediate commands do not advance ExpCmdSN."""
    c = conn(queue_depth=4)
    login(c)
    tur = bytes(6)
    c.receive_data(cmd_pdu(1, 1 + 4, tur, 0))  # MaxCmdSN + 1
    c.receive_data(cmd_pdu(2, 0, tur, 0))  # below ExpCmdSN: a duplicate
    assert events(c) == [] and drain(c) == []
    c.receive_data(cmd_pdu(3, 2, tur, 0))  # ahead by one: waits
    assert events(c) == []
    c.receive_data(cmd_pdu(4, 1, tur, 0, immediate=True))  # immediate: runs, CmdSN not consumed
    assert [e.itt for e in events(c)] == [4]  # type: ignore[attr-defined]
    c.receive_data(cmd_pdu(5, 1, tur, 0))  # fills the gap: 5 then 3
    evs = events(c)
    assert [e.itt for e in evs] == [5, 3]  # type: ignore[attr-defined]
    assert c.exp_cmdsn == 3
    # three outstanding of four: MaxCmdSN leaves room for one more
    assert c.max_cmdsn == c.exp_cmdsn + 4 - 3 - 1
    for e in [*evs]:
        c.complete(e, 0)  # type: ignore[arg-type]
    rsp = drain(c)
    assert [p.opcode for p in rsp] == [iscsi.OP_SCSI_RSP] * 2
    assert rsp[-1].u32(32) == 3 + 4 - 1 - 1  # one still outstanding (itt 4)


def test_write_with_immediate_unsolicited_and_r2t() -> None:
    """ImmediateData + InitialR2T=No: immediate data, then unsolicited Data-Out up to FirstBurstLength
    (DataSN from 0), then R2Ts of at most MaxBurstLength, each sequence's DataSN from 0."""
    c = conn(immediate_data=True)
    login(c, [("InitialR2T", "No"), ("ImmediateData", "Yes"), ("FirstBurstLength", "2048"),
              ("MaxBurstLength", "4096")])
    payload = bytes(range(256)) * 40  # 10240 bytes = 20 blocks
    c.receive_data(cmd_pdu(9, 1, write10(20), 10240, write=True, data=payload[:1024]))
    assert events(c) == []
    c.receive_data(data_out(9, iscsi.RSVD_TAG, 0, 1024, payload[1024:1536], False))
    c.receive_data(data_out(9, iscsi.RSVD_TAG, 1, 1536, payload[1536:2048], True))
    assert events(c) == []
    r2ts = drain(c)
    assert [p.opcode for p in r2ts] == [iscsi.OP_R2T]
    assert struct.unpack_from(">III", r2ts[0].bhs, 36) == (0, 2048, 4096)  # R2TSN, offset, length
    off = 2048
    for r2tsn in range(2):
        r2t = r2ts[-1]
        ttt, offset, length = r2t.u32(20), r2t.u32(40), r2t.u32(44)
        assert offset == off and r2t.u32(36) == r2tsn
        half = length // 2
        c.receive_data(data_out(9, ttt, 0, offset, payload[offset : offset + half], False))
        c.receive_data(data_out(9, ttt, 1, offset + half, payload[offset + half : offset + length], True))
        evs = events(c)
        off += length
        if off < 10240:
            r2ts = drain(c)
            assert evs == [] and [p.opcode for p in r2ts] == [iscsi.OP_R2T]
    assert len(evs) == 1
    cmd = evs[0]
    assert isinstance(cmd, iscsi.Command) and cmd.data_out == payload


@pytest.mark.parametrize("bad", ["datasn-repeat", "datasn-27", "wrong-ttt", "beyond-burst", "unknown-task"])
def test_bad_data_out_fails_the_task_and_runs_nothing(bad: str) -> None:
    """Rule 3 (libiscsi iSCSIDataSnInvalid): a Data-Out out of sequence is answered with a Reject and its
    command ends in CHECK CONDITION, ABORTED COMMAND, never handed out (nothing is written); the session
    goes on (the next command runs); Data-Out for no task at all gets a Reject."""
    c = conn()
    login(c, [("ImmediateData", "No"), ("InitialR2T", "Yes")])
    c.receive_data(cmd_pdu(1, 1, write10(2), 1024, write=True))
    assert events(c) == []
    r2t = drain(c)[-1]
    ttt = r2t.u32(20)
    c.receive_data(data_out(1, ttt, 0, 0, bytes(512), False))
    second = {"datasn-repeat": data_out(1, ttt, 0, 512, bytes(512), True),
              "datasn-27": data_out(1, ttt, 27, 512, bytes(512), True),
              "wrong-ttt": data_out(1, ttt + 5, 1, 512, bytes(512), True),
              "beyond-burst": data_out(1, ttt, 1, 512, bytes(1024), True),
              "unknown-task": data_out(77, ttt, 1, 512, bytes(512), True)}[bad]
    c.receive_data(second)
    assert events(c) == []  # nothing to run
    out = drain(c)
    assert out[0].opcode == iscsi.OP_REJECT and out[0].data[:48] == second[:48]
    if bad == "unknown-task":
        assert len(out) == 1
        return
    rsp = out[1]
    assert rsp.opcode == iscsi.OP_SCSI_RSP and rsp.bhs[3] == 2 and rsp.u32(16) == 1
    sense = rsp.data[2:]
    assert sense[2] == 0x0B and sense[12] == 0x4B  # ABORTED COMMAND, data phase / offset error
    c.receive_data(data_out(1, ttt, 1, 512, bytes(512), True))  # late data of the failed task: dropped
    c.receive_data(cmd_pdu(2, 2, bytes(6), 0))  # TEST UNIT READY on the same session
    (ev,) = events(c)
    assert isinstance(ev, iscsi.Command) and ev.itt == 2 and drain(c) == []


@pytest.mark.parametrize(("blocks", "edtl", "used", "over", "under"), [
    (1, 0, 0, 512, 0), (2, 512, 512, 512, 0), (1, 200, 200, 312, 0),  # EDTL < SPDTL: only EDTL used
    (1, 1024, 512, 0, 512), (1, 10000, 512, 0, 10000 - 512),  # EDTL > SPDTL: only SPDTL used
])
def test_write_residuals(blocks: int, edtl: int, used: int, over: int, under: int) -> None:
    """Rule 2 / libiscsi 1.19 iSCSIResiduals.Write10Residuals (FCP-4 9.4.2 choice a: data beyond the
    shorter of the two lengths is neither requested nor used; the residual says by how much)."""
    c = conn(immediate_data=True)
    login(c, [("ImmediateData", "Yes"), ("InitialR2T", "Yes")])
    imm = bytes([0x62]) * min(edtl, 512)
    c.receive_data(cmd_pdu(1, 1, write10(blocks), edtl, write=True, data=imm))
    evs = events(c)
    if not evs:  # solicited the rest of what the CDB asks
        r2t = drain(c)[-1]
        assert r2t.opcode == iscsi.OP_R2T and r2t.u32(40) + r2t.u32(44) == min(edtl, blocks * 512)
        c.receive_data(data_out(1, r2t.u32(20), 0, r2t.u32(40), bytes(r2t.u32(44)), True))
        evs = events(c)
    (cmd,) = evs
    assert isinstance(cmd, iscsi.Command)
    assert (cmd.residual_overflow, cmd.residual_underflow) == (over, under)
    assert len(cmd.data_out) == used
    c.complete(cmd, 0)
    rsp = drain(c)[-1]
    assert rsp.opcode == iscsi.OP_SCSI_RSP
    assert rsp.flags & 0x06 == (0x04 if over else 0x02)
    assert rsp.u32(44) == over + under


def test_data_in_segments_residuals_and_phase_collapse() -> None:
    """Data-In cut by the initiator's MaxRecvDataSegmentLength, F at every MaxBurstLength, the status in
    the last Data-In (S bit) with the underflow residual (EDTL > data); overflow when EDTL < data."""
    c = conn()
    login(c, [("MaxBurstLength", "16384")])  # our declared 8192 applies to what we send (login's MRDSL)
    read10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 80, 0])
    c.receive_data(cmd_pdu(3, 1, read10, 50000, read=True))
    (cmd,) = events(c)
    data = bytes(range(256)) * 160  # 40960
    c.complete(cmd, 0, data)  # type: ignore[arg-type]
    out = drain(c)
    assert all(p.opcode == iscsi.OP_DATA_IN for p in out)
    assert [len(p.data) for p in out] == [8192] * 5
    assert [p.u32(36) for p in out] == [0, 1, 2, 3, 4]  # DataSN
    assert [p.u32(40) for p in out] == [0, 8192, 16384, 24576, 32768]  # buffer offset
    assert [bool(p.flags & 0x80) for p in out] == [False, True, False, True, True]  # end of each 16 KiB burst
    assert out[-1].flags & 0x01 and out[-1].flags & 0x02 and out[-1].u32(44) == 50000 - 40960
    assert b"".join(p.data for p in out) == data
    c.receive_data(cmd_pdu(4, 2, read10, 1000, read=True))
    (cmd,) = events(c)
    c.complete(cmd, 0, data)  # type: ignore[arg-type]
    out = drain(c)
    assert len(out[0].data) == 1000 and out[-1].flags & 0x04 and out[-1].u32(44) == 40960 - 1000


def test_check_condition_sends_sense_in_the_response() -> None:
    c = conn()
    login(c)
    c.receive_data(cmd_pdu(5, 1, bytes([0xFF]) + bytes(5), 0))
    (cmd,) = events(c)
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
    c.complete(cmd, 2, b"", sense)  # type: ignore[arg-type]
    (rsp,) = drain(c)
    assert rsp.opcode == iscsi.OP_SCSI_RSP and rsp.bhs[3] == 2
    assert rsp.data == struct.pack(">H", len(sense)) + sense


def test_digests_both_ways_and_a_header_digest_error_closes() -> None:
    """RFC 7143 11.1 / libiscsi lib/pdu.c: CRC32C over the header and the padded data, little endian; a bad
    header digest cannot be trusted: the connection ends."""
    c = conn()
    login(c, [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    c.receive_data(pdu(iscsi.OP_NOP_OUT, 0x80, 11, b"ping!", hd=True, dd=True,
                       fields={20: struct.pack(">II", iscsi.RSVD_TAG, 1)}))
    assert events(c) == []
    raw = b"".join(bytes(x) for x in c.data_to_send())
    assert raw[0] == iscsi.OP_NOP_IN
    assert int.from_bytes(raw[48:52], "little") == crc32c.crc32c(raw[:48])
    assert raw[52:57] == b"ping!" and int.from_bytes(raw[60:64], "little") == crc32c.crc32c(raw[52:60])
    bad = bytearray(pdu(iscsi.OP_NOP_OUT, 0x80, 12, b"", hd=True, fields={20: struct.pack(">II", iscsi.RSVD_TAG, 2)}))
    bad[49] ^= 1
    c.receive_data(bytes(bad))
    with pytest.raises(iscsi.ProtocolError, match="header digest"):
        events(c)


def test_oversized_segment_and_login_garbage_are_refused() -> None:
    c = conn()
    c.receive_data(pdu(iscsi.OP_SCSI_CMD, 0x80, 1))  # not a login PDU before login
    with pytest.raises(iscsi.ProtocolError):
        events(c)
    assert drain(c)[-1].bhs[36:38] == bytes([2, 0x0B])  # invalid request during login
    c = conn()
    huge = bytearray(48)
    huge[0] = 0x43
    huge[5:8] = (1 << 20).to_bytes(3, "big")  # 1 MiB of login text: over the 8 KiB login limit
    c.receive_data(bytes(huge))
    with pytest.raises(iscsi.ProtocolError, match="exceeds"):
        events(c)
    bad = bytearray(login_pdu([], 1, 3, True))
    bad[5:8] = (14).to_bytes(3, "big")
    c = conn()
    c.receive_data(bytes(bad[:48]) + b"no-equals-sign\0\0")  # a key without '='
    evs = events(c)
    assert isinstance(evs[-1], iscsi.Closed) and drain(c)[-1].bhs[36:38] == bytes([2, 0x0B])


def test_sendtargets_discovery_with_continuation() -> None:
    """RFC 7143 Appendix C: SendTargets=All in a discovery session lists every target with its portals; a
    reply longer than the initiator's MaxRecvDataSegmentLength comes in pieces (C bit, TTT)."""
    names = [f"iqn.2026-12.org.raftblock:v{i:04d}" for i in range(400)]
    cat = iscsi.TargetCatalog(target_names=lambda: names, target_exists=lambda n: n in names,
                              chap=lambda n: None, portal_addresses=lambda: ["127.0.0.1:3260,1"])
    c = TargetConnection(cat, data_out_bytes=write_len)
    c.receive_data(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery"),
                              ("MaxRecvDataSegmentLength", "4096")], 1, 3, True))
    (ev,) = events(c)
    assert isinstance(ev, iscsi.LoggedIn) and ev.session_type == "Discovery"
    drain(c)
    text = b""
    cmdsn = 2
    c.receive_data(pdu(iscsi.OP_TEXT_REQ, 0x80, 20, b"SendTargets=All\0",
                       fields={20: struct.pack(">II", iscsi.RSVD_TAG, 1)}))
    while True:
        events(c)
        (rsp,) = drain(c)
        assert rsp.opcode == iscsi.OP_TEXT_RSP and len(rsp.data) <= 4096
        text += rsp.data
        if rsp.flags & 0x80:
            break
        assert rsp.flags & 0x40 and rsp.u32(20) != iscsi.RSVD_TAG
        c.receive_data(pdu(iscsi.OP_TEXT_REQ, 0x80, 20, b"", fields={20: struct.pack(">II", rsp.u32(20), cmdsn)}))
        cmdsn += 1
    pairs = iscsi.parse_text(text)
    assert [v for k, v in pairs if k == "TargetName"] == names
    assert {v for k, v in pairs if k == "TargetAddress"} == {"127.0.0.1:3260,1"}
