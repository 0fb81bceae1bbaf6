"""The NBD codec without sockets (NBD proto.md, fixed newstyle negotiation and transmission phase),
and the request validator (nbdkit validate_request style)."""

from __future__ import annotations

import struct

import pytest

from raftblock.gateway import nbd
from raftblock.gateway.nbd import Cmd, Opt
from raftblock.gateway.validate import validate_request

EXPORT = nbd.ExportInfo(name="vol", size_bytes=1 << 20, transmission_flags=nbd.TF_HAS_FLAGS | nbd.TF_SEND_FUA)


def catalog() -> nbd.ExportCatalog:
    return nbd.ExportCatalog(lambda n: EXPORT if n == "vol" else None, lambda: ["vol"])


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def parse_opt_replies(buf: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(buf):
        magic, option, rtype, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == nbd.REPLY_MAGIC_OPT
        pos += 20
        out.append((option, rtype, buf[pos : pos + length]))
        pos += length
    return out


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def drain(conn: nbd.ServerConnection) -> list[object]:
    events = []
    while True:
        ev = conn.next_event()
        if ev is nbd.NEED_DATA:
            return events
        events.append(ev)


def handshake(conn: nbd.ServerConnection, flags: int = 3) -> bytes:
    greeting = conn.data_to_send()
    conn.receive_data(struct.pack(">I", flags))
    assert drain(conn) == []
    return greeting


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    # proto.md "Fixed newstyle negotiation": NBDMAGIC, IHAVEOPT, handshake flags
    conn = nbd.ServerConnection(catalog())
    magic, ihaveopt, flags = struct.unpack(">QQH", conn.data_to_send())
    assert (magic, ihaveopt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES


def test_go_sends_block_size_and_export_info_then_selects() -> None:
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.GO, go_data("vol", (nbd.INFO_BLOCK_SIZE,))))
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], nbd.ExportSelected)
    replies = parse_opt_replies(conn.data_to_send())
    assert replies[-1][1] == nbd.REP_ACK
    infos = {struct.unpack_from(">H", d)[0]: d for _, t, d in replies if t == nbd.REP_INFO}
    assert struct.unpack(">HIII", infos[nbd.INFO_BLOCK_SIZE]) == (nbd.INFO_BLOCK_SIZE, 512, 4096, 32 << 20)
    assert struct.unpack(">HQH", infos[nbd.INFO_EXPORT]) == (nbd.INFO_EXPORT, 1 << 20, EXPORT.transmission_flags)
    assert conn.in_transmission


def test_go_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    # proto.md: NBD_REP_ERR_UNKNOWN for an export the server does not have
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.GO, go_data("nope")))
    assert drain(conn) == []
    ((_, rtype, msg),) = parse_opt_replies(conn.data_to_send())
    assert rtype == nbd.REP_ERR_UNKNOWN and b"nope" in msg
    conn.receive_data(opt(Opt.GO, go_data("vol")))
    assert isinstance(drain(conn)[0], nbd.ExportSelected)


def test_export_name_with_zeroes_and_without() -> None:
    for flags, extra in ((3, 0), (1, 124)):
        conn = nbd.ServerConnection(catalog())
        handshake(conn, flags)
        conn.receive_data(opt(Opt.EXPORT_NAME, b"vol"))
        (ev,) = drain(conn)
        assert isinstance(ev, nbd.ExportSelected)
        out = conn.data_to_send()
        assert len(out) == 10 + extra
        assert struct.unpack_from(">QH", out) == (1 << 20, EXPORT.transmission_flags)


def test_export_name_unknown_closes() -> None:
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.EXPORT_NAME, b"zzz"))
    with pytest.raises(nbd.ProtocolError):
        drain(conn)


def test_list_unknown_option_abort() -> None:
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.LIST) + opt(99) + opt(Opt.ABORT))
    events = drain(conn)
    assert isinstance(events[0], nbd.Closed)
    replies = parse_opt_replies(conn.data_to_send())
    assert replies[0][1] == nbd.REP_SERVER and replies[0][2] == struct.pack(">I", 3) + b"vol"
    assert replies[1][1] == nbd.REP_ACK
    assert replies[2][:2] == (99, nbd.REP_ERR_UNSUP)
    assert replies[3][:2] == (Opt.ABORT, nbd.REP_ACK)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def test_meta_context_needs_structured_then_selects_base_allocation() -> None:
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.SET_META_CONTEXT, meta_data("vol", ["base:allocation"])))
    drain(conn)
    assert parse_opt_replies(conn.data_to_send())[0][1] == nbd.REP_ERR_INVALID
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(Opt.SET_META_CONTEXT, meta_data("vol", ["base:allocation", "qemu:dirty-bitmap:x"])))
    conn.receive_data(opt(Opt.GO, go_data("vol")))
    (ev,) = drain(conn)
    assert isinstance(ev, nbd.ExportSelected)
    assert ev.structured_replies and ev.meta_context_ids == (nbd.BASE_ALLOCATION_ID,)
    replies = parse_opt_replies(conn.data_to_send())
    ctx = [d for _, t, d in replies if t == nbd.REP_META_CONTEXT]
    assert ctx == [struct.pack(">I", nbd.BASE_ALLOCATION_ID) + b"base:allocation"]


def test_malformed_option_data_is_err_invalid() -> None:
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.GO, b"\x00\x00\x00\x09ab"))  # name length past the data
    assert drain(conn) == []
    assert parse_opt_replies(conn.data_to_send())[0][1] == nbd.REP_ERR_INVALID


def test_option_too_long_and_bad_magic_are_protocol_errors() -> None:
    conn = nbd.ServerConnection(catalog(), max_option_bytes=100)
    handshake(conn)
    conn.receive_data(struct.pack(">QII", nbd.IHAVEOPT, Opt.GO, 101))
    with pytest.raises(nbd.ProtocolError):
        drain(conn)
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(b"GARBAGE!" * 3)
    with pytest.raises(nbd.ProtocolError):
        drain(conn)


def transmitting(structured: bool = True) -> nbd.ServerConnection:
    conn = nbd.ServerConnection(catalog(), max_payload_bytes=1 << 16)
    handshake(conn)
    if structured:
        conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(Opt.GO, go_data("vol")))
    drain(conn)
    conn.data_to_send()
    return conn


def req(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def test_requests_are_framed_across_arbitrary_splits() -> None:
    conn = transmitting()
    wire = req(Cmd.WRITE, 4096, 8, cookie=1) + b"ABCDEFGH" + req(Cmd.READ, 0, 512, cookie=2) + req(Cmd.FLUSH, 0, 0, cookie=3)
    events: list[object] = []
    for i in range(len(wire)):  # one byte at a time
        conn.receive_data(wire[i : i + 1])
        events += drain(conn)
    assert [(e.cookie, e.cmd) for e in events] == [(1, Cmd.WRITE), (2, Cmd.READ), (3, Cmd.FLUSH)]  # type: ignore[attr-defined]
    assert bytes(events[0].payload) == b"ABCDEFGH"  # type: ignore[attr-defined]


def test_oversized_write_payload_is_discarded_not_buffered() -> None:
    # proto.md: the server SHOULD NOT disconnect on an oversize request; answer an error instead.
    conn = transmitting()
    conn.receive_data(req(Cmd.WRITE, 0, 1 << 17, cookie=5))
    assert drain(conn) == []
    for _ in range(31):
        conn.receive_data(bytes(4096))
        assert drain(conn) == []
    conn.receive_data(bytes(4096) + req(Cmd.READ, 0, 512, cookie=6))
    events = drain(conn)
    assert events[0].oversized and events[0].payload is None and events[0].cookie == 5  # type: ignore[attr-defined]
    assert events[1].cookie == 6  # type: ignore[attr-defined]


def test_bad_request_magic_closes() -> None:
    conn = transmitting()
    conn.receive_data(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    with pytest.raises(nbd.ProtocolError):
        drain(conn)


def test_reply_encodings() -> None:
    conn = transmitting(structured=True)
    hdr, data = conn.reply_read(9, 4096, b"xy")
    assert struct.unpack(">IHHQIQ", hdr) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_OFFSET_DATA, 9, 10, 4096)
    assert bytes(data) == b"xy"
    err = conn.reply_error(9, nbd.EIO, "bad")
    assert struct.unpack_from(">IHHQIIH", err) == (nbd.STRUCTURED_REPLY_MAGIC, 1, nbd.REPLY_TYPE_ERROR, 9, 9, nbd.EIO, 3)
    bs = conn.reply_block_status(9, 1, [(4096, 3), (8192, 0)])
    assert struct.unpack(">IHHQIIIIII", bs)[5:] == (1, 4096, 3, 8192, 0)
    plain = transmitting(structured=False)
    assert plain.reply_error(9, nbd.EINVAL) == struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, nbd.EINVAL, 9)


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (Cmd.READ, 0, 512, 0, None),
        (Cmd.READ, (1 << 20) - 512, 1024, 0, nbd.EINVAL),  # past the end
        (Cmd.WRITE, (1 << 20) - 512, 1024, 0, nbd.ENOSPC),  # proto.md: ENOSPC for a write past the end
        (Cmd.WRITE, 0, 512, 1 << 9, nbd.EINVAL),  # unknown flag bit
        (Cmd.WRITE, 0, 512, nbd.CMD_FLAG_FUA, None),
        (Cmd.READ, 0, 512, nbd.CMD_FLAG_NO_HOLE, nbd.EINVAL),  # flag not valid for READ
        (Cmd.READ, 0, 0, 0, nbd.EINVAL),
        (Cmd.FLUSH, 0, 0, 0, None),
        (Cmd.FLUSH, 4096, 0, 0, nbd.EINVAL),
        (Cmd.TRIM, 0, 1 << 20, 0, None),
        (Cmd.BLOCK_STATUS, 0, 4096, nbd.CMD_FLAG_REQ_ONE, None),
        (Cmd.WRITE_ZEROES, 0, 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO, nbd.ENOTSUP),
        (77, 0, 512, 0, nbd.EINVAL),  # unknown command
    ],
)
def test_validate(cmd: int, offset: int, length: int, flags: int, error: int | None) -> None:
    payload = memoryview(bytes(length)) if cmd == Cmd.WRITE else None
    r = nbd.Request(1, cmd, flags, offset, length, payload)
    rej = validate_request(r, EXPORT, structured_replies=True, meta_context_ids=(1,))
    assert (rej.error if rej else None) == error


def test_validate_oversized_and_block_status_without_context() -> None:
    big = nbd.Request(1, Cmd.READ, 0, 0, (32 << 20) + 512)
    export = nbd.ExportInfo("v", 1 << 30, 0)
    assert validate_request(big, export, structured_replies=True, meta_context_ids=(1,)).error == nbd.EOVERFLOW  # type: ignore[union-attr]
    w = nbd.Request(1, Cmd.WRITE, 0, 0, 64 << 20, None, oversized=True)
    assert validate_request(w, export, structured_replies=True, meta_context_ids=(1,)).error == nbd.EOVERFLOW  # type: ignore[union-attr]
    bs = nbd.Request(1, Cmd.BLOCK_STATUS, 0, 0, 4096)
    assert validate_request(bs, export, structured_replies=True, meta_context_ids=()).error == nbd.EINVAL  # type: ignore[union-attr]
    df = nbd.Request(1, Cmd.READ, nbd.CMD_FLAG_DF, 0, 4096)
    assert validate_request(df, export, structured_replies=False, meta_context_ids=()).error == nbd.EINVAL  # type: ignore[union-attr]


def test_starttls_when_tls_is_required() -> None:
    """proto.md "TLS support", FORCEDTLS: before the handshake only STARTTLS and ABORT; other options get
    NBD_REP_ERR_TLS_REQD, EXPORT_NAME closes; after it, STARTTLS again is ERR_INVALID and the rest works."""
    conn = nbd.ServerConnection(catalog(), tls_required=True)
    handshake(conn)
    conn.receive_data(opt(Opt.LIST) + opt(Opt.GO, go_data("vol")))
    assert drain(conn) == []
    assert [r[:2] for r in parse_opt_replies(conn.data_to_send())] == [(Opt.LIST, nbd.REP_ERR_TLS_REQD),
                                                                       (Opt.GO, nbd.REP_ERR_TLS_REQD)]
    conn.receive_data(opt(Opt.STARTTLS, b"x"))  # STARTTLS takes no data
    assert drain(conn) == []
    assert parse_opt_replies(conn.data_to_send())[0][:2] == (Opt.STARTTLS, nbd.REP_ERR_INVALID)
    conn.receive_data(opt(Opt.STARTTLS))
    assert drain(conn) == [nbd.StartTls()]
    assert parse_opt_replies(conn.data_to_send())[0][:2] == (Opt.STARTTLS, nbd.REP_ACK)
    conn.tls_started()
    conn.receive_data(opt(Opt.STARTTLS) + opt(Opt.GO, go_data("vol")))
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], nbd.ExportSelected)
    assert parse_opt_replies(conn.data_to_send())[0][:2] == (Opt.STARTTLS, nbd.REP_ERR_INVALID)
    # EXPORT_NAME before TLS: no error reply exists for it, the connection closes
    conn = nbd.ServerConnection(catalog(), tls_required=True)
    handshake(conn)
    conn.receive_data(opt(Opt.EXPORT_NAME, b"vol"))
    with pytest.raises(nbd.ProtocolError, match="STARTTLS"):
        drain(conn)
    # bytes after STARTTLS before the handshake: the client did not wait for the ACK
    conn = nbd.ServerConnection(catalog(), tls_required=True)
    handshake(conn)
    conn.receive_data(opt(Opt.STARTTLS) + b"\x16\x03\x01")
    with pytest.raises(nbd.ProtocolError, match="before the TLS handshake"):
        drain(conn)
    # a gateway without TLS: STARTTLS is ERR_POLICY and plain options go on
    conn = nbd.ServerConnection(catalog())
    handshake(conn)
    conn.receive_data(opt(Opt.STARTTLS) + opt(Opt.GO, go_data("vol")))
    assert isinstance(drain(conn)[0], nbd.ExportSelected)
    assert parse_opt_replies(conn.data_to_send())[0][:2] == (Opt.STARTTLS, nbd.REP_ERR_POLICY)
