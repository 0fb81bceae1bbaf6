"""Fuzz properties of the gateway codecs: the NBD server codec (gateway/nbd.py), the iSCSI target codec
(gateway/iscsi.py) and the SCSI logical unit's CDB decoding (gateway/scsi.py). Arbitrary and mutated input
ends in typed events, ProtocolError (NBD, iSCSI) or CHECK CONDITION (SCSI), never another exception, and
what a header announces is never buffered before it arrives."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from fuzz_strategies import fuzz, mutated
from fuzz_targets import (
    NBD_LARGE_PAYLOAD,
    _Initiator,
    corpus,
    iscsi_pdu,
    nbd_go,
    nbd_opt,
    nbd_req,
    new_lun,
    run,
    scsi_command,
    target_iscsi,
    target_nbd,
    target_scsi,
)
from hypothesis import given
from hypothesis import strategies as st

from raftblock.gateway import iscsi, nbd, scsi

U32 = st.integers(0, (1 << 32) - 1)


# --- NBD ---------------------------------------------------------------------------------------------
def _transmitting(**kw: int) -> nbd.ServerConnection:
    conn = nbd.ServerConnection(nbd.ExportCatalog(lambda n: nbd.ExportInfo("vol", 1 << 20, 1) if n == "vol" else None,
                                                  lambda: ["vol"]), **kw)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + nbd_opt(nbd.Opt.GO, nbd_go()))
    assert isinstance(conn.next_event(), nbd.ExportSelected)
    conn.data_to_send()
    return conn


@fuzz(200)
@given(st.lists(st.tuples(st.sampled_from(list(nbd.Cmd)), st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1),
                          st.integers(0, (1 << 64) - 1), st.integers(0, 9000)), max_size=8), st.integers(0, 255))
def test_nbd_requests_are_framed_whatever_the_cut(reqs: list[tuple[int, int, int, int, int]], cut: int) -> None:
    """A request stream cut anywhere gives back the requests (WRITE payloads whole) in order."""
    from fuzz_targets import chunks

    conn = _transmitting(max_payload_bytes=4096)
    wire = b""
    want = []
    for cmd, flags, cookie, offset, length in reqs:
        payload = bytes([cookie & 0xFF]) * length if cmd == nbd.Cmd.WRITE and length <= 4096 else b""
        wire += nbd_req(cmd, offset, length, flags, cookie) + payload
        if cmd == nbd.Cmd.WRITE and length > 4096:
            wire += bytes(length)  # discarded, not buffered (rule 3)
        want.append((cookie, cmd, flags, offset, length, payload if cmd == nbd.Cmd.WRITE and length <= 4096 else None))
    got = []
    for piece in chunks(wire, cut):
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not nbd.NEED_DATA:
            assert isinstance(ev, nbd.Request)
            got.append((ev.cookie, ev.cmd, ev.flags, ev.offset, ev.length,
                        None if ev.payload is None else bytes(ev.payload)))
    assert got == want


@fuzz(600)
@given(st.binary(max_size=4096))
def test_nbd_codec_takes_arbitrary_bytes(data: bytes) -> None:
    target_nbd(data)


@fuzz(800)
@given(mutated(corpus("nbd")))
def test_nbd_codec_takes_mutated_sessions(data: bytes) -> None:
    target_nbd(data)


@fuzz(30)
@given(st.integers(NBD_LARGE_PAYLOAD + 1, (1 << 32) - 1), st.integers(1, 8))
def test_an_oversized_nbd_write_is_discarded_not_buffered(traced: None, length: int, pieces: int) -> None:
    """Rule 3: a WRITE over max_payload_bytes (32 MiB) is read and dropped as it comes."""
    conn = _transmitting()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    conn.receive_data(nbd_req(nbd.Cmd.WRITE, 0, length, cookie=9))
    assert conn.next_event() is nbd.NEED_DATA
    for _ in range(pieces):
        conn.receive_data(bytes(256 << 10))
        assert conn.next_event() is nbd.NEED_DATA
        assert len(conn._buf) - conn._pos == 0
    assert tracemalloc.get_traced_memory()[1] - base < 4 << 20


# --- SCSI --------------------------------------------------------------------------------------------
@fuzz(500)
@given(st.binary(min_size=1, max_size=32), st.binary(max_size=2048), st.sampled_from([512, 4096]), st.booleans())
def test_any_cdb_is_good_or_check_condition(cdb: bytes, data: bytes, lbs: int, sparse: bool) -> None:
    """Rule 3: a CDB the Lun refuses is CHECK CONDITION; nothing inside `execute` raises (the harness's Lun
    lets an internal exception escape instead of answering HARDWARE ERROR)."""
    lun, _be, _clock = new_lun(lbs, sparse=sparse)
    scsi_command(lun, scsi.Nexus("i", "t", 1), cdb, data, None)


@fuzz(300)
@given(st.sampled_from([0x28, 0x2A, 0x2F, 0x8A, 0x88, 0x93, 0x41, 0x89, 0x42, 0x9E, 0x35, 0x34, 0x12, 0xA3, 0x5E,
                        0x5F, 0x1A, 0x5A, 0x15, 0x55, 0x03, 0x00, 0x16, 0x17, 0x25, 0xA0, 0x08, 0x0A, 0x2E, 0x8E]),
       st.binary(min_size=15, max_size=15), st.binary(max_size=4096), st.sampled_from([512, 4096]))
def test_supported_opcodes_with_any_fields(op: int, rest: bytes, data: bytes, lbs: int) -> None:
    lun, _be, _clock = new_lun(lbs, sparse=True)
    for n in (6, 10, 12, 16):
        scsi_command(lun, scsi.Nexus("i", "t", 1), bytes([op]) + rest[: n - 1], data, len(data))


@fuzz(100)
@given(st.integers(0, (1 << 20) - 64), st.integers(1, 32), st.binary(min_size=1, max_size=8))
def test_scsi_write_then_read_round_trips(lba: int, blocks: int, pattern: bytes) -> None:
    lun, _be, _clock = new_lun(512, small=False, sparse=True)
    data = (pattern * (blocks * 512))[: blocks * 512]
    nexus = scsi.Nexus("i", "t", 1)
    w = bytes([0x8A, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"
    assert scsi_command(lun, nexus, w, data, len(data)).status == scsi.GOOD
    r = bytes([0x88, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"
    res = scsi_command(lun, nexus, r, b"", None)
    assert res.status == scsi.GOOD and bytes(res.data) == data


@fuzz(500)
@given(mutated(corpus("scsi")))
def test_scsi_takes_mutated_command_streams(data: bytes) -> None:
    target_scsi(data)


# --- iSCSI -------------------------------------------------------------------------------------------
@fuzz(200)
@given(st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_characters="=\0", blacklist_categories=["Cs"]),
                                  min_size=1, max_size=20),
                          st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                                  max_size=40)), max_size=8))
def test_iscsi_text_keys_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert iscsi.parse_text(iscsi.encode_text(pairs)) == pairs


@fuzz(150)
@given(st.integers(1, 64), st.sampled_from([0, 512, 4096]), st.integers(1, 5), st.binary(min_size=1, max_size=8),
       st.booleans())
def test_iscsi_write_data_arrives_whole(blocks: int, immediate: int, pieces: int, pattern: bytes,
                                        initial_r2t: bool) -> None:
    """Rule 2: a WRITE's data, sent as immediate data then Data-Out PDUs answering the target's R2Ts (or
    unsolicited), reaches the command byte for byte."""
    mode = 1 | (0 if initial_r2t else 4)
    ini = _Initiator(_NoInput(), mode)
    ini.login()
    assert ini.conn.logged_in
    data = (pattern * (blocks * 512))[: blocks * 512]
    imm = data[: min(immediate, len(data))]
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", blocks) + b"\0"
    got: list[iscsi.Command] = []
    ini.complete_held = lambda: got.extend(ini.held) or ini.held.clear()  # type: ignore[method-assign]
    ini.feed(iscsi_pdu(iscsi.OP_SCSI_CMD, 0xA1, 5, imm, fields={20: struct.pack(">II", len(data), ini.conn.exp_cmdsn),
                                                            32: cdb.ljust(16, b"\0")}))
    sent = len(imm)
    if not initial_r2t and sent < len(data):  # the rest of the first burst, unsolicited
        end = min(len(data), ini.conn.params.first_burst_bytes)
        if end > sent:
            ini.feed(iscsi_pdu(iscsi.OP_DATA_OUT, 0x80, 5, data[sent:end], fields={20: struct.pack(">I", iscsi.RSVD_TAG),
                                                                                  36: struct.pack(">II", 0, sent)}))
            sent = end
    while ini.r2ts:
        itt, ttt, off, length = ini.r2ts.pop(0)
        step = -(-length // pieces)
        for k, pos in enumerate(range(off, off + length, step)):
            n = min(step, off + length - pos)
            ini.feed(iscsi_pdu(iscsi.OP_DATA_OUT, 0x80 if pos + n >= off + length else 0, itt, data[pos : pos + n],
                               fields={20: struct.pack(">I", ttt), 36: struct.pack(">II", k, pos)}))
    assert len(got) == 1 and bytes(got[0].data_out) == data


class _NoInput:
    def u8(self) -> int:
        return 0


@fuzz(400)
@given(st.binary(max_size=4096))
def test_iscsi_codec_takes_arbitrary_bytes(data: bytes) -> None:
    target_iscsi(data)


@fuzz(800)
@given(mutated(corpus("iscsi")))
def test_iscsi_codec_takes_mutated_sessions(data: bytes) -> None:
    target_iscsi(data)


@pytest.mark.parametrize("edtl", [1 << 20, 0xFFFFFFFF])
def test_an_iscsi_write_header_allocates_nothing_before_its_data(edtl: int, traced: None) -> None:
    """Rule 4: a command announcing 32 MiB of write data (EDTL, the CDB's transfer length) allocates as its
    data arrives, not when its header does (regression: corpus/regressions/iscsi/write-buffer-from-edtl)."""
    ini = _Initiator(_NoInput(), 1)
    ini.login()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0])
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    ini.feed(iscsi_pdu(iscsi.OP_SCSI_CMD, 0xA1, 5, b"", fields={20: struct.pack(">II", edtl, ini.conn.exp_cmdsn),
                                                             32: cdb.ljust(16, b"\0")}))
    assert len(ini.conn._writes) == 1
    assert tracemalloc.get_traced_memory()[1] - base < 1 << 20


def test_immediate_commands_count_against_the_window() -> None:
    """Rule 1: immediate commands skip the CmdSN window but not the queue depth: past it they get a Reject
    (reason 0x06) and no task (regression: corpus/regressions/iscsi/immediate-commands-unbounded)."""
    ini = _Initiator(_NoInput(), 1 | 8)
    ini.login()
    qd = ini.conn.limits.queue_depth
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]).ljust(16, b"\0")
    rejects = 0
    for itt in range(10, 10 + 3 * qd):
        out = ini.feed(iscsi_pdu(iscsi.OP_SCSI_CMD, 0xA1, itt, b"", immediate=True,
                                 fields={20: struct.pack(">II", 4096, ini.conn.exp_cmdsn), 32: cdb}))
        rejects += sum(1 for b in out if b[0] & 0x3F == iscsi.OP_REJECT and b[2] == iscsi.REJECT_IMMEDIATE_COMMAND)
    assert len(ini.conn._writes) + ini.conn.outstanding <= qd
    assert rejects == 2 * qd


def test_a_lun_decoding_error_would_be_a_finding() -> None:
    """The harness's Lun turns an exception inside execute into a failure (so the properties above can fail)."""
    lun, be, _clock = new_lun(512, sparse=True)

    async def boom(offset: int, length: int) -> bytes:
        raise KeyError("not the backend's failure")

    be.read = boom  # type: ignore[method-assign]
    with pytest.raises(AssertionError):
        run(lun.execute(scsi.Nexus("i", "t", 1), bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), b""))
