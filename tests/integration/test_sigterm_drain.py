# SIGTERM while requests are in flight: every request gets its reply, the process exits 0, and every write
# that was acknowledged is there after a restart.
#
# Enforces: NBD proto.md "Terminating the transmission phase": "On a server shutdown, the server SHOULD
# wait for inflight requests to be serviced prior to initiating a hard disconnect. A server MAY speed this
# process up by issuing error replies. The error value ... SHOULD be ESHUTDOWN" -- so each request sent
# gets a reply that is success or NBD_ESHUTDOWN, never silence; and the serve contract "SIGTERM drains
# in-flight requests then exits 0".
from __future__ import annotations

import random
import signal
import subprocess
import threading
import time

import pytest

from . import nbdwire as w
from .helpers import MiB, ServeFactory

# 13 requests in one burst: few enough that a server reads them all at once (raftblock's gateway bounds
# requests in flight per connection well above this), so all of them are "in flight" when SIGTERM lands,
# and large enough (256 KiB writes with FUA) that several still are.
NWRITES = 8
WRITE_BYTES = 256 * 1024
NREADS = 4
READ_OFF = 32 * MiB


@pytest.mark.timeout(120)
def test_sigterm_answers_in_flight_requests_and_exits_0(serve_factory: ServeFactory) -> None:
    srv = serve_factory(["vol:64M"])
    assert srv.port is not None
    rng = random.Random(5)
    known = rng.randbytes(WRITE_BYTES)
    with w.RawConn("127.0.0.1", srv.port) as c:
        c.connect_export("vol")
        c.write(READ_OFF, known)
        c.disconnect()

    writes = {cookie: (cookie * WRITE_BYTES, rng.randbytes(WRITE_BYTES)) for cookie in range(1, NWRITES + 1)}
    reads: list[int] = []
    flush_cookie = 999
    batch = []
    for cookie, (off, data) in writes.items():
        batch.append(w.RawConn.request_bytes(w.NBD_CMD_WRITE, cookie, off, len(data), w.NBD_CMD_FLAG_FUA, data))
        if cookie % (NWRITES // NREADS) == 0:
            rcookie = 100 + len(reads)
            reads.append(rcookie)
            batch.append(w.RawConn.request_bytes(w.NBD_CMD_READ, rcookie, READ_OFF, WRITE_BYTES))
    batch.append(w.RawConn.request_bytes(w.NBD_CMD_FLUSH, flush_cookie, 0, 0))
    expected = set(writes) | set(reads) | {flush_cookie}

    c = w.RawConn("127.0.0.1", srv.port, timeout_s=30)
    c.connect_export("vol")
    send_error: list[BaseException] = []

    def sender() -> None:  # a thread, so server back-pressure cannot deadlock us against our own reads
        try:
            c.send(b"".join(batch))
        except OSError as e:
            send_error.append(e)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    replies: dict[int, w.Reply] = {}
    read_lengths = dict.fromkeys(reads, WRITE_BYTES)
    after_sigterm = 0
    closed = None
    try:
        first = c.read_reply(read_lengths)
        replies[first.cookie] = first
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        sigterm_at = time.monotonic()
        while set(replies) != expected:
            rep = c.read_reply(read_lengths)
            assert rep.cookie in expected and rep.cookie not in replies, f"unexpected or duplicate reply {rep}"
            replies[rep.cookie] = rep
            after_sigterm += 1
    except w.Closed as e:
        closed = str(e)
    except TimeoutError:
        closed = "no reply and no close within 30s (the server hangs)"
    finally:
        t.join(timeout=30)
        c.close()

    missing = sorted(expected - set(replies))
    assert not missing, (f"connection ended ({closed}) with {len(missing)} requests unanswered: {missing}; "
                         f"{after_sigterm} replies arrived after SIGTERM; sender error {send_error}")
    bad = {k: r.error for k, r in replies.items() if r.error not in (0, w.NBD_ESHUTDOWN)}
    assert not bad, f"replies must be success or NBD_ESHUTDOWN: {bad}"
    for cookie in reads:
        if replies[cookie].error == 0:
            assert replies[cookie].data == known, f"read {cookie} returned wrong data during shutdown"

    try:
        rc = srv.proc.wait(timeout=30)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve still running 30s after SIGTERM\n{srv.log_tail()}") from None
    assert rc == 0, f"serve exited {rc} after SIGTERM, {time.monotonic() - sigterm_at:.1f}s\n{srv.log_tail()}"
    srv.stop()  # reap and note

    srv.restart()
    with w.RawConn("127.0.0.1", srv.port) as c2:
        c2.connect_export("vol")
        for cookie, (off, data) in writes.items():
            if replies[cookie].error == 0:
                assert c2.read(off, len(data)) == data, f"acknowledged write {cookie} lost across SIGTERM"
        c2.disconnect()
