# Hostile and broken clients on raw sockets: the server answers precisely or hangs up, never crashes,
# never changes stored bytes, and keeps serving other clients.
#
# Enforces NBD proto.md:
#   - "Handshake": client flags with unknown bits -> the server MUST drop the connection (garbage handshake);
#     a client that disappears mid-option is just a closed connection.
#   - NBD_OPT_GO / NBD_OPT_INFO on an unknown export -> NBD_REP_ERR_UNKNOWN, and option haggling continues;
#     NBD_OPT_EXPORT_NAME on an unknown export -> the server MUST terminate the session.
#   - "Request types" / validation (nbdkit validate_request()): a read past the end -> NBD_EINVAL; a write
#     past the end -> NBD_EINVAL or NBD_ENOSPC; an unknown command flag -> NBD_EINVAL; an unknown command
#     -> NBD_EINVAL; the connection stays usable afterwards (the request was well framed).
#   - "Block size constraints": a request over the maximum (64 MiB > 32 MiB) -> an error or a hard disconnect.
#   - A request with a bad magic -> the server cannot frame the stream and closes the connection.
# After every case: a fresh client is served and the volume's checksum is unchanged.
from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from raftblock.testing.serve import ServeProcess

from . import nbdwire as w
from .helpers import BLOCK, MiB, serve_command

SIZE = 64 * MiB
KNOWN_OFF = 3 * MiB
KNOWN = random.Random(9).randbytes(64 * 1024)


class ClusterServer:
    """The 3-rack cluster's NBD server (node 1's gateway, the default layout), with the ServeProcess methods
    these tests use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port: int | None = None
        self.log_path = root / "logs" / "n1.log"

    def start(self) -> None:
        from raftblock.node.cluster import cluster_up, volume_create

        uri = cluster_up(self.root, nbd_port=0)
        self.port = int(uri.rsplit(":", 1)[1])
        volume_create(self.root, "vol", SIZE)
        volume_create(self.root, "other", MiB)

    def alive(self) -> bool:
        from raftblock.node.layout import Layout, running_pid

        layout = Layout(self.root)
        return running_pid(layout, "n1", layout.node_config(1)) is not None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        from raftblock.node.cluster import cluster_down

        cluster_down(self.root)


@pytest.fixture(scope="module", params=["serve", "cluster"])
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One server for all cases here (each case must leave it healthy for the next, which is the point):
    `raftblock serve`, then the 3-rack cluster's gateway (issue "cluster": bad input as in part 1)."""
    base = tmp_path_factory.mktemp("bad_input")
    sp: Any
    if request.param == "serve":
        sp = ServeProcess(base / "srv", ["vol:64M", "other:1M"], log_path=base / "srv.log", command=serve_command())
    else:
        sp = ClusterServer(base / "cluster")
    sp.start()
    port = _port(sp)
    try:
        with w.RawConn("127.0.0.1", port) as c:
            c.connect_export("vol")
            c.write(KNOWN_OFF, KNOWN, flags=w.NBD_CMD_FLAG_FUA)
            c.disconnect()
        whole_before = w.volume_sha256("127.0.0.1", port, "vol")
        yield sp
        assert w.volume_sha256("127.0.0.1", port, "vol") == whole_before, "stored bytes changed"
    finally:
        sp.close()
        print(f"\n===== server log {sp.log_path} (tail) =====\n{sp.log_tail(40)}")


@pytest.fixture
def healthy(shared_server: ServeProcess) -> Iterator[ServeProcess]:
    """Checks before and after the case: a fresh client is served and the bytes the bad requests aim at
    (the first 4 MiB, the last 1 MiB) are unchanged; the whole volume is compared once per module."""
    before = _fingerprint(shared_server)
    yield shared_server
    assert shared_server.alive(), f"server died:\n{shared_server.log_tail()}"
    with w.RawConn("127.0.0.1", _port(shared_server)) as c:
        exp = c.connect_export("vol")
        assert exp.size == SIZE
        known_ok = c.read(KNOWN_OFF, len(KNOWN)) == KNOWN
        if not known_ok:  # put it back, so one bad case does not fail every later one
            c.write(KNOWN_OFF, KNOWN, flags=w.NBD_CMD_FLAG_FUA)
        c.disconnect()
    assert known_ok, "a fresh client must read the known data"
    assert _fingerprint(shared_server) == before, "stored bytes changed"


def _fingerprint(sp: ServeProcess) -> str:
    h = hashlib.sha256()
    with w.RawConn("127.0.0.1", _port(sp)) as c:
        c.connect_export("vol")
        h.update(c.read(0, 4 * MiB))
        h.update(c.read(SIZE - MiB, MiB))
        c.disconnect()
    return h.hexdigest()


def _port(sp: ServeProcess) -> int:
    assert sp.port is not None
    return sp.port


def _still_serving(c: w.RawConn) -> None:
    """The same connection answers a well-formed request correctly (framing was not lost)."""
    assert c.call(w.NBD_CMD_READ, KNOWN_OFF, BLOCK, cookie=77).data == KNOWN[:BLOCK]


def _expect_closed(c: w.RawConn, what: str) -> None:
    try:
        c.wait_closed(timeout_s=10)
    except TimeoutError:
        raise AssertionError(f"server kept the connection open after {what}") from None


def test_garbage_instead_of_handshake(healthy: ServeProcess) -> None:
    with w.RawConn("127.0.0.1", _port(healthy)) as c:
        c.read_greeting()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + random.Random(1).randbytes(200))
        _expect_closed(c, "garbage client flags (proto.md: unknown flag -> MUST drop the connection)")
    with w.RawConn("127.0.0.1", _port(healthy)) as c:  # garbage before even reading the greeting
        c.send(b"\xff" * 4096)
        _expect_closed(c, "4 KiB of 0xff")


@pytest.mark.parametrize("cut", [4, 10, 16, 20, 30])
def test_truncated_handshake(healthy: ServeProcess, cut: int) -> None:
    """The client sends the flags and part of an NBD_OPT_GO, then closes; nothing must break."""
    name = b"vol"
    opt = (struct.pack(">I", w.NBD_FLAG_C_FIXED_NEWSTYLE | w.NBD_FLAG_C_NO_ZEROES)
           + struct.pack(">QII", w.IHAVEOPT, w.NBD_OPT_GO, 4 + len(name) + 2)
           + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    with w.RawConn("127.0.0.1", _port(healthy)) as c:
        c.read_greeting()
        c.send(opt[:cut])
    # the `healthy` fixture checks that the server goes on serving


def test_unknown_export(healthy: ServeProcess) -> None:
    with w.RawConn("127.0.0.1", _port(healthy)) as c:
        c.handshake()
        for option in (w.NBD_OPT_INFO, w.NBD_OPT_GO):
            rep = c.opt_go("no-such-volume", option)
            assert isinstance(rep, w.OptReply) and rep.type == w.NBD_REP_ERR_UNKNOWN, (
                f"option {option} on an unknown export: want NBD_REP_ERR_UNKNOWN, got {rep}")
        # option haggling goes on after an error reply
        exp = c.opt_go("vol")
        assert isinstance(exp, w.Export) and exp.size == SIZE, exp
        _still_serving(c)
        c.disconnect()
    with w.RawConn("127.0.0.1", _port(healthy)) as c:
        c.handshake()
        c.send_option(w.NBD_OPT_EXPORT_NAME, b"no-such-volume")
        _expect_closed(c, "NBD_OPT_EXPORT_NAME of an unknown export (proto.md: MUST terminate the session)")


def test_list_and_abort(healthy: ServeProcess) -> None:
    with w.RawConn("127.0.0.1", _port(healthy)) as c:
        c.handshake()
        c.send_option(w.NBD_OPT_LIST)
        names = []
        while (rep := c.read_opt_reply()).type == w.NBD_REP_SERVER:
            (n,) = struct.unpack(">I", rep.data[:4])
            names.append(rep.data[4:4 + n].decode())
        assert rep.type == w.NBD_REP_ACK and sorted(names) == ["other", "vol"], (rep, names)
        c.send_option(w.NBD_OPT_ABORT)
        assert c.read_opt_reply().type == w.NBD_REP_ACK, "proto.md NBD_OPT_ABORT: the server MUST reply NBD_REP_ACK"
        _expect_closed(c, "NBD_OPT_ABORT")


def _connected(sp: ServeProcess) -> w.RawConn:
    c = w.RawConn("127.0.0.1", _port(sp))
    exp = c.connect_export("vol")
    assert exp.size == SIZE
    return c


Case = Callable[[w.RawConn], w.Reply]
EINVAL_CASES: dict[str, tuple[Case, set[int]]] = {
    "read past the end": (lambda c: c.call(w.NBD_CMD_READ, SIZE - BLOCK, 2 * BLOCK), {w.NBD_EINVAL}),
    "read starting at the end": (lambda c: c.call(w.NBD_CMD_READ, SIZE, BLOCK), {w.NBD_EINVAL}),
    "read at offset 2**63": (lambda c: c.call(w.NBD_CMD_READ, 1 << 63, BLOCK), {w.NBD_EINVAL}),
    "write past the end": (lambda c: c.call(w.NBD_CMD_WRITE, SIZE - 512, BLOCK, data=b"\xee" * BLOCK),
                           {w.NBD_EINVAL, w.NBD_ENOSPC}),
    "write with an unknown flag bit": (lambda c: c.call(w.NBD_CMD_WRITE, KNOWN_OFF, BLOCK, flags=1 << 12,
                                                        data=b"\xee" * BLOCK), {w.NBD_EINVAL}),
    "trim past the end": (lambda c: c.call(w.NBD_CMD_TRIM, SIZE - BLOCK, 2 * BLOCK), {w.NBD_EINVAL, w.NBD_ENOSPC}),
    "write zeroes past the end": (lambda c: c.call(w.NBD_CMD_WRITE_ZEROES, SIZE, BLOCK),
                                  {w.NBD_EINVAL, w.NBD_ENOSPC}),
    "unknown command 0x42": (lambda c: c.call(0x42, 0, BLOCK), {w.NBD_EINVAL}),
}


@pytest.mark.parametrize("case", list(EINVAL_CASES))
def test_invalid_request_gets_error_and_connection_goes_on(healthy: ServeProcess, case: str) -> None:
    send, allowed = EINVAL_CASES[case]
    with _connected(healthy) as c:
        rep = send(c)
        assert rep.error in allowed, f"{case}: want one of {sorted(allowed)}, got error {rep.error}"
        _still_serving(c)
        c.disconnect()


def test_request_over_the_maximum_block_size(healthy: ServeProcess) -> None:
    """64 MiB READ and WRITE (max is 32 MiB): an error reply or a hard disconnect, never a crash."""
    with _connected(healthy) as c:
        try:
            rep = c.call(w.NBD_CMD_READ, 0, 64 * MiB)
        except w.Closed:
            pass
        else:
            assert rep.error in {w.NBD_EINVAL, w.NBD_ENOMEM, w.NBD_EOVERFLOW}, f"64 MiB READ: error {rep.error}"
            _still_serving(c)
    with _connected(healthy) as c:
        try:
            c.request(w.NBD_CMD_WRITE, 5, 0, 64 * MiB)
            chunk = b"\xee" * MiB
            for _ in range(64):
                c.send(chunk)
            rep = c.read_reply()
        except (w.Closed, BrokenPipeError, ConnectionResetError):
            pass
        else:
            assert rep.error in {w.NBD_EINVAL, w.NBD_ENOMEM, w.NBD_EOVERFLOW}, f"64 MiB WRITE: error {rep.error}"


def test_bad_request_magic_closes_the_connection(healthy: ServeProcess) -> None:
    with _connected(healthy) as c:
        _still_serving(c)
        c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, w.NBD_CMD_WRITE, 9, KNOWN_OFF, BLOCK) + b"\xee" * BLOCK)
        try:
            got = c.wait_closed(timeout_s=10)
        except TimeoutError:
            raise AssertionError("server kept the connection open after a request with a bad magic") from None
        assert not got, f"the server answered a request with a bad magic: {got[:64].hex()}"
