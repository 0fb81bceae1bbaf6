"""Fuzz targets: one function per parser that reads bytes from outside (tests/fuzz/README.md).

Every target takes one `bytes` input and either returns (the input was handled: decoded, or refused with
one of the exception types the parser documents) or raises (a finding). Inputs are interpreted by a small
deterministic byte reader (`Input`), never by atheris' FuzzedDataProvider, so the same function serves the
atheris harness (atheris_run.py), the Hypothesis properties (test_fuzz_*.py) and the regression replay
(test_regressions.py) alike. `seeds(target)` gives small valid inputs made by the encoders: the corpus seeds.

Findings are `Finding` (an invariant broken: a buffer over its bound, an event of the wrong type, a decoded
value the parser should have refused) or any exception a parser does not document. Allocation bounds are
checked with tracemalloc when it is tracing (`alloc_bound`): the Hypothesis tests and the atheris runner turn
it on for the targets whose risk is an allocation from a length field.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import random
import re
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import crc32c
import zstandard
from google.protobuf.message import DecodeError

from raftblock.backup import chunk as bchunk
from raftblock.backup.manifest import Manifest, ManifestError
from raftblock.gateway import iscsi, nbd, scsi
from raftblock.gateway.validate import validate_request
from raftblock.replication.chain.types import ChainMessage, Record
from raftblock.replication.chain.types import MessageType as ChainType
from raftblock.replication.raft.types import (
    ConfState,
    Entry,
    EntryType,
    GroupId,
    HardState,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)
from raftblock.replication.wal import REC_HEADER as WAL_REC_HEADER
from raftblock.replication.wal import SEG_HEADER as WAL_SEG_HEADER
from raftblock.replication.wal import Wal, WalCorruptError
from raftblock.replication.wal import _seed as wal_seed
from raftblock.replication.wal import segment_name as wal_segment_name
from raftblock.storage import index as sindex
from raftblock.storage import recovery as srecovery
from raftblock.storage import segment as sseg
from raftblock.storage.disk import MemDisk
from raftblock.wire import chaincodec, framing, ops, raftcodec
from raftblock.wire import raftblock_pb2 as pb

_UNIT = Path(__file__).resolve().parent.parent / "unit"
if str(_UNIT) not in sys.path:
    sys.path.append(str(_UNIT))  # tests import their siblings rootdir-style (tests/unit/test_iscsi_server.py)

from test_scsi import MemBackend  # noqa: E402  (needs tests/unit on sys.path)


class Finding(AssertionError):
    """A parser broke one of its rules on this input."""


def check(cond: object, what: str) -> None:
    if not cond:
        raise Finding(what)


class Input:
    """Reads a fuzz input front to back; past its end every read gives zeros (or fewer bytes)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(0, n)]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n).ljust(n, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 4) % n


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """`data` cut the way a socket might deliver it: whole (seed 0) or in pseudo-random pieces."""
    if seed == 0 or not data:
        yield data
        return
    rng = random.Random(seed)
    top = (1, 3, 17, 64, 1024, 1 << 16)[seed % 6]
    pos = 0
    while pos < len(data):
        n = rng.randint(1, top)
        yield data[pos : pos + n]
        pos += n


@contextmanager
def alloc_bound(limit: int, what: str) -> Iterator[None]:
    """When tracemalloc is tracing: the block allocates at most `limit` bytes more than it started with."""
    if not tracemalloc.is_tracing():
        yield
        return
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    yield
    peak = tracemalloc.get_traced_memory()[1] - base
    check(peak <= limit, f"{what}: allocated {peak} bytes at peak, bound {limit}")


def _fields(obj: object) -> tuple[object, ...]:
    out = []
    for name in type(obj).__slots__:  # type: ignore[attr-defined]
        v = getattr(obj, name)
        if isinstance(v, memoryview):
            v = bytes(v)
        elif isinstance(v, list | tuple) and v and hasattr(v[0], "__slots__"):
            v = tuple(_fields(x) for x in v)
        elif hasattr(v, "__slots__") and not isinstance(v, int):
            v = _fields(v)
        out.append(v)
    return tuple(out)


# =====================================================================================================
# NBD (gateway/nbd.py): ServerConnection. Documented failure: ProtocolError (then the adapter closes).
# =====================================================================================================
NBD_EXPORT = nbd.ExportInfo("vol", 1 << 20, nbd.TF_HAS_FLAGS | nbd.TF_SEND_FLUSH | nbd.TF_SEND_FUA
                            | nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES | nbd.TF_SEND_DF, description="fuzz")
NBD_LARGE_PAYLOAD = 32 << 20  # the default max_payload_bytes: a WRITE longer than this is discarded


def _nbd_catalog() -> nbd.ExportCatalog:
    return nbd.ExportCatalog(lambda n: NBD_EXPORT if n == "vol" else None, lambda: ["vol", "other"])


def nbd_opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def nbd_go(name: str = "vol", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def nbd_meta(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def nbd_req(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def target_nbd(data: bytes) -> None:
    """Byte 0: mode (bit 0 small limits; bits 1-6 a scripted handshake prefix; bit 7 shutting down);
    byte 1: how the stream is cut; the rest: the client's bytes after the prefix."""
    inp = Input(data)
    mode, cut = inp.u8(), inp.u8()
    small = bool(mode & 1)
    max_payload = 4096 if small else NBD_LARGE_PAYLOAD
    max_option = 1024 if small else 64 << 10
    conn = nbd.ServerConnection(_nbd_catalog(), max_option_bytes=max_option, max_payload_bytes=max_payload,
                                shutting_down=lambda: bool(mode & 0x80))
    check(len(conn.data_to_send()) == 18, "greeting is 18 bytes")
    prefix = b""
    if mode & 2:
        prefix += struct.pack(">I", 3 if mode & 4 else 1)
        if mode & 8:
            prefix += nbd_opt(nbd.Opt.STRUCTURED_REPLY)
        if mode & 16:
            prefix += nbd_opt(nbd.Opt.SET_META_CONTEXT, nbd_meta("vol", ["base:allocation"]))
        if mode & 32:
            prefix += nbd_opt(nbd.Opt.EXPORT_NAME, b"vol") if mode & 64 else nbd_opt(nbd.Opt.GO, nbd_go())
    max_frame = max(nbd._REQ.size + max_payload, nbd._OPT_HDR.size + max_option)
    selected: nbd.ExportSelected | None = None
    for piece in chunks(prefix + inp.rest(), cut):
        conn.receive_data(piece)
        while True:
            try:
                ev = conn.next_event()
            except nbd.ProtocolError:
                return  # rule 2: the adapter closes the connection
            if ev is nbd.NEED_DATA:
                break
            check(isinstance(ev, nbd.ExportSelected | nbd.Request | nbd.Closed), f"event {ev!r}")
            if isinstance(ev, nbd.Closed):
                return
            if isinstance(ev, nbd.ExportSelected):
                check(selected is None and conn.in_transmission, "ExportSelected twice or outside transmission")
                selected = ev
                continue
            assert isinstance(ev, nbd.Request)
            check(selected is not None, "a request before transmission")
            assert selected is not None
            _nbd_answer(conn, ev, selected, max_payload)
        check(isinstance(conn.data_to_send(), bytes), "data_to_send")
        # Rule 4: what waits unconsumed is at most one frame; the consumed prefix is dropped past 1 MiB.
        waiting = len(conn._buf) - conn._pos
        check(waiting <= max_frame, f"{waiting} bytes buffered, more than one frame ({max_frame})")
        check(len(conn._buf) <= (1 << 20) + max_frame + len(piece), f"receive buffer {len(conn._buf)} bytes")


def _nbd_answer(conn: nbd.ServerConnection, req: nbd.Request, sel: nbd.ExportSelected, max_payload: int) -> None:
    if req.cmd == nbd.Cmd.WRITE:
        if req.oversized:  # rule 3
            check(req.payload is None and req.length > max_payload, "oversized WRITE that fits")
        else:
            check(req.payload is not None and len(req.payload) == req.length <= max_payload,
                  f"WRITE payload of {None if req.payload is None else len(req.payload)} for length {req.length}")
    else:
        check(req.payload is None and not req.oversized, "a payload on a request other than WRITE")
    rej = validate_request(req, sel.export, structured_replies=sel.structured_replies,
                           meta_context_ids=sel.meta_context_ids)
    if rej is not None:
        check(isinstance(rej.error, int) and rej.error > 0, "rejection without an errno")
        conn.reply_error(req.cookie, rej.error, rej.message)
    elif req.cmd == nbd.Cmd.READ:
        conn.reply_read(req.cookie, req.offset, bytes(min(req.length, 4096)))
    elif req.cmd == nbd.Cmd.BLOCK_STATUS:
        conn.reply_block_status(req.cookie, nbd.BASE_ALLOCATION_ID, [(max(1, min(req.length, 4096)), 0)])
    else:
        conn.reply_ok(req.cookie)


def _seeds_nbd() -> list[bytes]:
    go = nbd_opt(nbd.Opt.GO, nbd_go("vol", (nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)))
    flags = struct.pack(">I", 3)
    return [
        bytes([0, 0]) + flags + nbd_opt(nbd.Opt.LIST) + nbd_opt(nbd.Opt.STRUCTURED_REPLY)
        + nbd_opt(nbd.Opt.LIST_META_CONTEXT, nbd_meta("vol", [])) + go,
        bytes([1, 5]) + flags + nbd_opt(nbd.Opt.INFO, nbd_go("vol")) + nbd_opt(99) + nbd_opt(nbd.Opt.ABORT),
        bytes([2 | 4 | 8 | 16 | 32 | 1, 0]) + nbd_req(nbd.Cmd.WRITE, 4096, 8, cookie=1) + b"ABCDEFGH"
        + nbd_req(nbd.Cmd.READ, 0, 512, cookie=2) + nbd_req(nbd.Cmd.BLOCK_STATUS, 0, 4096, cookie=3)
        + nbd_req(nbd.Cmd.FLUSH, 0, 0) + nbd_req(nbd.Cmd.TRIM, 0, 4096) + nbd_req(nbd.Cmd.DISC, 0, 0),
        bytes([2 | 32 | 64 | 1, 3]) + nbd_req(nbd.Cmd.WRITE, 0, 8192, cookie=5) + bytes(8192)
        + nbd_req(nbd.Cmd.WRITE_ZEROES, 0, 4096, flags=nbd.CMD_FLAG_FAST_ZERO),
        bytes([2 | 32, 1]) + nbd_req(nbd.Cmd.CACHE, 0, 1) + b"\x25\x60\x95\x13",
        bytes([2 | 4, 2]) + nbd_opt(nbd.Opt.EXPORT_NAME, b"nope"),
    ]


# =====================================================================================================
# SCSI (gateway/scsi.py): Lun.execute and Lun.data_out_bytes over an in-memory volume. Documented: a
# CDB the Lun refuses is CHECK CONDITION (rule 3); an exception inside `execute` that is not the backend's
# would also become CHECK CONDITION (HARDWARE ERROR), so the harness's Lun re-raises it: a finding.
# =====================================================================================================
SCSI_BYTES = 1 << 20
_NEXUSES = (
    scsi.Nexus("iqn.2026-12.org.example:a,i,0x1", "iqn.2026-12.org.raftblock:vol,t,0x1", 1),
    scsi.Nexus("iqn.2026-12.org.example:b,i,0x2", "iqn.2026-12.org.raftblock:vol,t,0x1", 1),
    scsi.Nexus("iqn.2026-12.org.example:c,i,0x3", "iqn.2026-12.org.raftblock:vol,t,0x2", 2),
)
_LOOP: asyncio.AbstractEventLoop | None = None


def run(coro: object) -> object:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)  # type: ignore[arg-type]


class FuzzBackend(MemBackend):
    """test_scsi's in-memory volume; `failing` says whether the harness made it fail on purpose."""

    @property
    def failing(self) -> bool:
        return self.fail is not None


class SparseBackend:
    """A large volume of which only the written 4 KiB blocks are held (so a CDB may name any LBA of a 1 TiB
    volume, and a transfer of the full `max_transfer_bytes` is in range); otherwise MemBackend's semantics."""

    def __init__(self, size_bytes: int = 1 << 40) -> None:
        self.size_bytes = size_bytes
        self.blocks: dict[int, bytes] = {}
        self.fail: Exception | None = None

    @property
    def failing(self) -> bool:
        return self.fail is not None

    def _check(self, offset: int, length: int) -> None:
        if self.fail is not None:
            raise self.fail
        check(0 <= offset and length >= 0 and offset + length <= self.size_bytes, f"backend access {offset}+{length}")

    def _get(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos = offset
        while pos < offset + length:
            b, o = divmod(pos, BLK)
            n = min(BLK - o, offset + length - pos)
            out += self.blocks.get(b, bytes(BLK))[o : o + n]
            pos += n
        return bytes(out)

    def _put(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            b, o = divmod(offset + pos, BLK)
            n = min(BLK - o, len(data) - pos)
            blk = bytearray(self.blocks.get(b, bytes(BLK)))
            blk[o : o + n] = data[pos : pos + n]
            self.blocks[b] = bytes(blk)
            pos += n

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self._get(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self._put(offset, bytes(data))

    async def flush(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for b in range(-(-offset // BLK), (offset + length) // BLK):
            self.blocks.pop(b, None)

    async def zero(self, offset: int, length: int, no_hole: bool) -> None:
        self._check(offset, length)
        for b in [b for b in self.blocks if offset // BLK <= b <= (offset + length) // BLK]:
            lo, hi = max(offset, b * BLK), min(offset + length, (b + 1) * BLK)
            if hi > lo:
                self._put(lo, bytes(hi - lo))

    async def block_status(self, offset: int, length: int, max_descriptors: int) -> list[tuple[int, bool]]:
        self._check(offset, length)
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < offset + length and len(runs) < max_descriptors:
            alloc = pos // BLK in self.blocks
            end = min(offset + length, (pos // BLK + 1) * BLK)
            if runs and runs[-1][1] == alloc:
                runs[-1] = (runs[-1][0] + end - pos, alloc)
            else:
                runs.append((end - pos, alloc))
            pos = end
            if not alloc:  # skip a hole quickly to the next written block or the end
                nxt = min((b * BLK for b in self.blocks if b * BLK >= pos), default=offset + length)
                nxt = min(nxt, offset + length)
                if nxt > pos:
                    runs[-1] = (runs[-1][0] + nxt - pos, False)
                    pos = nxt
        return runs

    async def compare_and_write(self, offset: int, verify: bytes | memoryview,
                                data: bytes | memoryview) -> int | None:
        self._check(offset, len(verify))
        cur = self._get(offset, len(verify))
        for i, (a, b) in enumerate(zip(cur, bytes(verify), strict=True)):
            if a != b:
                return i
        self._put(offset, bytes(data))
        return None


class StrictLun(scsi.Lun):
    """A Lun whose non-backend exceptions escape (the real one turns them into HARDWARE ERROR)."""

    def _backend_sense(self, e: Exception, cdb: bytes) -> scsi.Sense:  # type: ignore[override]
        if not getattr(self.backend, "failing", False):
            raise Finding(f"exception inside Lun.execute (cdb {cdb.hex()}): {e!r}") from e
        return scsi.Lun._backend_sense(e, cdb)



class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def new_lun(lbs: int = 512, small: bool = True, sparse: bool = False
            ) -> tuple[StrictLun, FuzzBackend | SparseBackend, Clock]:
    be: FuzzBackend | SparseBackend = SparseBackend() if sparse else FuzzBackend(SCSI_BYTES)
    clock = Clock()
    kw: dict[str, int] = {}
    if small:
        kw = {"max_transfer_bytes": 64 << 10, "write_same_max_bytes": 256 << 10, "unmap_max_bytes": 256 << 10,
              "unmap_descriptors_max": 8, "lba_status_descriptors_max": 8, "ua_queue_max": 4,
              "compare_write_max_bytes": 8192, "pr_registrations_max": 8}
    lun = StrictLun("vol", be, volume_id=0x1234, pr_store=scsi.MemoryPrStore(), logical_block_bytes=lbs,
                    clock=clock, **kw)  # type: ignore[arg-type]
    return lun, be, clock


SCSI_STATUSES = (scsi.GOOD, scsi.CHECK_CONDITION, scsi.RESERVATION_CONFLICT)


def scsi_command(lun: StrictLun, nexus: scsi.Nexus, cdb: bytes, data: bytes, edtl: int | None) -> scsi.ScsiResult:
    n = lun.data_out_bytes(cdb)
    check(isinstance(n, int) and 0 <= n <= max(lun.max_transfer_bytes, 1 << 16) * 2,
          f"data_out_bytes {n} for cdb {cdb.hex()}")
    res = run(lun.execute(nexus, cdb, data, edtl_bytes=edtl))
    check(isinstance(res, scsi.ScsiResult), f"execute returned {res!r}")
    assert isinstance(res, scsi.ScsiResult)
    check(res.status in SCSI_STATUSES, f"status {res.status:#x}")
    if res.status == scsi.CHECK_CONDITION:
        check(len(res.sense) >= 18 and res.sense[0] & 0x7F in (0x70, 0x71), f"sense {res.sense.hex()}")
    check(len(res.data) <= lun.max_transfer_bytes + (1 << 16), f"{len(res.data)} bytes of data-in")
    return res


def target_scsi(data: bytes) -> None:
    """Byte 0: logical block size and limits; then commands: [ctl u8][cdb len u8][cdb][data len u16][data]."""
    inp = Input(data)
    mode = inp.u8()
    lun, be, clock = new_lun((512, 1024, 2048, 4096)[mode & 3], small=not mode & 4, sparse=bool(mode & 8))
    while inp.remaining():
        ctl = inp.u8()
        cdb = inp.take(inp.u8() % 33)
        payload = inp.take(inp.u16() % (lun.max_transfer_bytes + 1024))
        nexus = _NEXUSES[ctl % 3]
        be.fail = None
        if ctl & 0x08:
            be.fail = OSError(errno.ENOSPC if ctl & 0x10 else errno.EIO, "fuzz")
        if ctl & 0x20:
            clock.t += 2.0  # the PR cache goes stale
        if ctl & 0x40:
            lun.reset(nexus if ctl & 0x10 else None, kind="lun" if ctl & 1 else "target")
        if ctl & 0x80:
            lun.nexus_lost(_NEXUSES[(ctl >> 2) % 3])
        scsi_command(lun, nexus, cdb, payload, len(payload) if ctl & 0x04 else None)


def _cdb(*b: int, n: int = 10) -> bytes:
    return bytes(b).ljust(n, b"\0")


def _seeds_scsi() -> list[bytes]:
    def cmd(cdb: bytes, data: bytes = b"", ctl: int = 0) -> bytes:
        return bytes([ctl, len(cdb)]) + cdb + struct.pack("<H", len(data)) + data

    pr_out = struct.pack(">QQ", 0, 0x1234) + bytes(8)
    unmap = struct.pack(">HH", 22, 16) + bytes(4) + struct.pack(">QI", 8, 8) + bytes(4)
    return [
        bytes([0]) + cmd(_cdb(0x12, 0, 0, 0, 0xFF, n=6)) + cmd(_cdb(0x12, 1, 0x83, 0, 0xFF, n=6))
        + cmd(_cdb(0x25)) + cmd(_cdb(0x9E, 0x10, n=16)[:13] + b"\0\0\x20" ) + cmd(_cdb(0xA0, n=12)),
        bytes([0]) + cmd(_cdb(0x2A, 0, 0, 0, 0, 8, 0, 0, 2)) + cmd(_cdb(0x2A, 0, 0, 0, 0, 8, 0, 0, 2), bytes(1024))
        + cmd(_cdb(0x28, 0, 0, 0, 0, 8, 0, 0, 2)) + cmd(_cdb(0x2F, 2, 0, 0, 0, 8, 0, 0, 2), bytes(1024)),
        bytes([1]) + cmd(_cdb(0x89, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 1, n=16), bytes(2048))
        + cmd(_cdb(0x93, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, n=16), bytes(1024)),
        bytes([0]) + cmd(_cdb(0x42, 0, 0, 0, 0, 0, 0, 0, 24), unmap) + cmd(_cdb(0x35)) + cmd(_cdb(0x00, n=6)),
        bytes([0]) + cmd(_cdb(0x5F, 0, 0, 0, 0, 0, 0, 0, 24), pr_out)
        + cmd(_cdb(0x5F, 1, 0x05, 0, 0, 0, 0, 0, 24), struct.pack(">QQ", 0x1234, 0) + bytes(8))
        + cmd(_cdb(0x5E, 0, 0, 0, 0, 0, 0, 1, 0)) + cmd(_cdb(0x5E, 1, 0, 0, 0, 0, 0, 1, 0), ctl=1),
        bytes([2]) + cmd(_cdb(0x1A, 0, 0x3F, 0, 0xFF, n=6)) + cmd(_cdb(0x55, 0x10, 0, 0, 0, 0, 0, 0, 0))
        + cmd(_cdb(0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, n=12)) + cmd(_cdb(0x03, 0, 0, 0, 0xFF, n=6), ctl=0x40)
        + cmd(_cdb(0x16, n=6)) + cmd(_cdb(0x17, n=6), ctl=1),
    ]


# =====================================================================================================
# iSCSI (gateway/iscsi.py): TargetConnection driven by a fuzzed initiator. Documented: ProtocolError
# (after which the adapter sends what is queued and closes), Closed events; the Lun answers commands.
# =====================================================================================================
ISCSI_IQN = "iqn.2026-12.org.raftblock:vol"
ISCSI_INITIATOR = "iqn.2026-12.org.example:host1"
ISCSI_ISID = bytes.fromhex("400001370000")
CHAP_SECRET = b"initiator-secret"
CHAP_TARGET_SECRET = b"the-target-secret"


def iscsi_pdu(opcode: int, flags: int, itt: int, data: bytes = b"", *, fields: dict[int, bytes] | None = None,
              immediate: bool = False, hd: bool = False, dd: bool = False, ahs: bytes = b"",
              bhs: bytes | None = None) -> bytes:
    b = bytearray(bhs.ljust(48, b"\0")[:48] if bhs is not None else bytes(48))
    if bhs is None:
        b[0] = opcode | (0x40 if immediate else 0)
        b[1] = flags
        struct.pack_into(">I", b, 16, itt)
    for off, v in (fields or {}).items():
        b[off : off + len(v)] = v
    ahs = ahs[: 255 * 4]
    ahs += bytes(-len(ahs) % 4)
    b[4] = len(ahs) // 4
    b[5:8] = len(data).to_bytes(3, "big")
    out = bytes(b) + ahs
    if hd:
        out += crc32c.crc32c(bytes(b) + ahs).to_bytes(4, "little")
    padded = data + bytes(iscsi.pad4(len(data)) - len(data))
    out += padded
    if dd and data:
        out += crc32c.crc32c(padded).to_bytes(4, "little")
    return out


def iscsi_login_pdu(keys: list[tuple[str, str]], csg: int, nsg: int, transit: bool, cmdsn: int = 1,
                    itt: int = 0, cont: bool = False) -> bytes:
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    return iscsi_pdu(iscsi.OP_LOGIN_REQ, flags, itt, iscsi.encode_text(keys), immediate=True,
                     fields={8: ISCSI_ISID, 24: struct.pack(">I", cmdsn)})


class _Initiator:
    """The fuzzed initiator: feeds PDUs, answers events as iscsi_server.py does, reads what comes back."""

    def __init__(self, inp: Input, mode: int) -> None:
        self.inp = inp
        self.mode = mode
        chap = None
        if mode & 0x40:
            chap = iscsi.Chap("alice", CHAP_SECRET, "tgt" if mode & 0x20 else "", CHAP_TARGET_SECRET if mode & 0x20 else b"")
        self.small = bool(mode & 8)
        limits = iscsi.Limits(max_recv_data_segment_bytes=8192, max_burst_bytes=16384, first_burst_bytes=8192,
                              max_transfer_bytes=64 << 10, queue_depth=8) if self.small else iscsi.Limits()
        self.lun, self.backend, _ = new_lun(512, small=self.small, sparse=True)
        catalog = iscsi.TargetCatalog(
            target_names=lambda: [ISCSI_IQN, ISCSI_IQN + "2"],
            target_exists=lambda n: n in (ISCSI_IQN, ISCSI_IQN + "2"),
            chap=lambda n: chap if n else None,
            portal_addresses=lambda: ["127.0.0.1:3260,1"],
        )
        self.counter = 0
        self.conn = iscsi.TargetConnection(catalog, data_out_bytes=self._data_out_bytes, limits=limits,
                                           random_bytes=self._random, new_tsih=lambda: 7)
        self.fed = 0
        self.done = False
        self.held: list[iscsi.Command] = []
        self.r2ts: list[tuple[int, int, int, int]] = []  # (itt, ttt, offset, length) seen
        self.itts: list[int] = [1]
        self.next_itt = 1
        self.cmdsn = 1
        self.last_keys: dict[str, str] = {}

    def _random(self, n: int) -> bytes:
        self.counter += 1
        return hashlib.sha256(self.counter.to_bytes(8, "little")).digest()[:n].ljust(n, b"\x5a")

    def _data_out_bytes(self, target: str, cdb: bytes) -> int:
        return self.lun.data_out_bytes(cdb)

    # --- feeding ---------------------------------------------------------------------------------------
    def feed(self, raw: bytes, cut: int = 0) -> list[bytes]:
        """Feed `raw`; returns the BHS of every PDU the target sent meanwhile (empty once closed)."""
        if self.done:
            return []
        was_logged_in = self.conn.logged_in
        out: list[bytes] = []
        for piece in chunks(raw, cut):
            self.conn.receive_data(piece)
            self.fed += len(piece)
            if not self.drain():
                break
        sent = b"".join(bytes(p) for p in self.conn.data_to_send())
        if not self.conn.logged_in:
            self._last_login_keys(sent)
        out = self._parse(sent, strict=was_logged_in and self.conn.logged_in)
        self._check_bounds()
        return out

    def drain(self) -> bool:
        c = self.conn
        while True:
            try:
                ev = c.next_event()
            except iscsi.ProtocolError:
                self.done = True
                return False
            if ev is iscsi.NEED_DATA:
                return True
            if isinstance(ev, iscsi.Closed):
                self.done = True
                return False
            if isinstance(ev, iscsi.LoggedIn):
                check(c.logged_in, "LoggedIn while not logged in")
                continue
            if isinstance(ev, iscsi.Command):
                check(c.logged_in and c.session_type == "Normal", "a SCSI command outside a normal session")
                self.held.append(ev)
                if len(self.held) > (self.inp.u8() % 4 if self.mode & 0x10 else 0):
                    self.complete_held()
                continue
            if isinstance(ev, iscsi.TaskManagement):
                if ev.function == iscsi.TMF_ABORT_TASK:
                    c.forget_write(ev.referenced_itt)
                elif ev.function in (iscsi.TMF_LUN_RESET, iscsi.TMF_TARGET_WARM_RESET, iscsi.TMF_ABORT_TASK_SET):
                    c.forget_all_writes()
                c.tmf_response(ev.itt, iscsi.TMF_RSP_COMPLETE)
                continue
            if isinstance(ev, iscsi.LogoutRequested):
                self.complete_held()
                c.logout_response(ev.itt)
                continue
            raise Finding(f"event {ev!r}")

    def complete_held(self) -> None:
        held, self.held = self.held, []
        for cmd in held:
            data = bytes(cmd.data_out)
            if cmd.write:  # rule 2: the command runs on min(EDTL, what the CDB asks)
                need = self.lun.data_out_bytes(cmd.cdb)
                need = 0 if need > self.conn.limits.max_transfer_bytes else need
                check(len(data) == min(cmd.edtl, need),
                      f"write data of {len(data)} bytes for EDTL {cmd.edtl}, CDB asks {need}")
            res = scsi_command(self.lun, _NEXUSES[0], cmd.cdb, data, cmd.edtl if cmd.write else None)
            self.conn.complete(cmd, res.status, res.data, res.sense)

    def _parse(self, raw: bytes, strict: bool) -> list[bytes]:
        hd = 4 if self.conn.params.header_digest else 0
        dd = self.conn.params.data_digest
        mrdsl = self.conn.params.max_recv_data_segment_bytes
        out = []
        pos = 0
        while pos + 48 <= len(raw):
            bhs = raw[pos : pos + 48]
            dsl = int.from_bytes(bhs[5:8], "big")
            if strict:
                check(dsl <= max(mrdsl, 8192), f"the target sent a {dsl}-byte segment, the initiator takes {mrdsl}")
            out.append(bhs)
            pos += 48 + bhs[4] * 4 + hd + iscsi.pad4(dsl) + (4 if dd and dsl else 0)
        if strict:
            check(pos == len(raw), f"target output does not frame: {pos} of {len(raw)} bytes")
        for bhs in out:
            if bhs[0] & 0x3F == iscsi.OP_R2T:
                itt, ttt = struct.unpack_from(">II", bhs, 16)
                _sn, off, length = struct.unpack_from(">III", bhs, 36)
                check(0 < length <= self.conn.params.max_burst_bytes, f"R2T for {length} bytes")
                self.r2ts.append((itt, ttt, off, length))
        return out

    def _check_bounds(self) -> None:
        c = self.conn
        lim = c.limits
        check(len(c._queued) <= lim.queue_depth, f"{len(c._queued)} PDUs queued for the CmdSN window")
        check(len(c._failed_itts) <= lim.queue_depth, "remembered failed tasks")
        tasks = len(c._writes) + c.outstanding
        check(tasks <= 2 * lim.queue_depth, f"{tasks} tasks at once (queue depth {lim.queue_depth})")
        waiting = len(c._buf) - c._pos
        seg = max(lim.max_recv_data_segment_bytes, iscsi.LOGIN_SEGMENT_BYTES_MAX)
        pdu_max = 48 + iscsi.AHS_BYTES_MAX + 8 + seg + 4
        check(waiting <= pdu_max or self.done or c.closed, f"{waiting} bytes wait in the receive buffer")
        # Rule 4 and no allocation from a length field: the write buffers hold what arrived plus at most one
        # burst per task.
        held = sum(len(wt.buf) for wt in c._writes.values())
        burst = max(c.params.first_burst_bytes, c.params.max_burst_bytes, lim.first_burst_bytes)
        bound = self.fed + len(c._writes) * 2 * burst
        check(held <= bound, f"write buffers hold {held} bytes after {self.fed} bytes in ({len(c._writes)} tasks)")

    # --- login -----------------------------------------------------------------------------------------
    def _last_login_keys(self, raw: bytes) -> None:
        pos, last = 0, b""
        while pos + 48 <= len(raw):
            dsl = int.from_bytes(raw[pos + 5 : pos + 8], "big")
            start = pos + 48 + raw[pos + 4] * 4
            last = raw[start : start + dsl]
            pos = start + iscsi.pad4(dsl)
        self.last_keys = _iscsi_text_keys(last)

    def login(self) -> None:
        mode = self.mode
        discovery = bool(mode & 2)
        keys = [("InitiatorName", ISCSI_INITIATOR), ("SessionType", "Discovery" if discovery else "Normal")]
        if not discovery:
            keys.append(("TargetName", ISCSI_IQN))
        op = [("MaxRecvDataSegmentLength", "8192"), ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
              ("ImmediateData", "Yes"), ("InitialR2T", "No" if mode & 4 else "Yes")]
        if mode & 0x80:
            op += [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
        if mode & 0x40 and not discovery:
            self.feed(iscsi_login_pdu([*keys, ("AuthMethod", "CHAP,None")], 0, 1, True))
            self.feed(iscsi_login_pdu([("CHAP_A", "5")], 0, 1, False))
            chall = self.last_keys
            if "CHAP_I" not in chall or "CHAP_C" not in chall:
                return
            ident, ch = int(chall["CHAP_I"]), bytes.fromhex(chall["CHAP_C"][2:])
            resp = hashlib.md5(bytes([ident]) + CHAP_SECRET + ch).hexdigest()
            ck = [("CHAP_N", "alice"), ("CHAP_R", "0x" + resp)]
            if mode & 0x20:
                ck += [("CHAP_I", "9"), ("CHAP_C", "0x" + bytes(range(100, 116)).hex())]
            self.feed(iscsi_login_pdu(ck, 0, 1, True))
            self.feed(iscsi_login_pdu(op, 1, 3, True))
        else:
            self.feed(iscsi_login_pdu(keys + op, 1, 3, True))



def _iscsi_text_keys(raw: bytes) -> dict[str, str]:
    try:
        return dict(iscsi.parse_text(raw))
    except ValueError:
        return {}


def target_iscsi(data: bytes) -> None:
    """Byte 0: mode (bit 0 scripted login; 1 discovery; 2 InitialR2T=No; 3 small limits; 4 hold commands;
    5 mutual CHAP; 6 CHAP; 7 digests); then steps: [ctl u8][fields...] (see `_iscsi_step`)."""
    inp = Input(data)
    mode = inp.u8()
    ini = _Initiator(inp, mode)
    if mode & 1:
        ini.login()
    steps = 0
    while inp.remaining() and not ini.done and steps < 256:
        steps += 1
        _iscsi_step(ini, inp)
    if not ini.done:
        ini.complete_held()
        ini.feed(b"")


def _iscsi_step(ini: _Initiator, inp: Input) -> None:
    c = ini.conn
    ctl = inp.u8()
    kind = ctl & 7
    hd = c.params.header_digest and c.logged_in
    dd = c.params.data_digest and c.logged_in
    immediate = bool(ctl & 0x08)
    cut = inp.u8() if ctl & 0x20 else 0
    if ctl & 0x80:
        cmdsn = inp.u32()
    else:
        cmdsn = c.exp_cmdsn if c.logged_in else ini.cmdsn
    if kind == 0:  # a raw PDU: BHS from the input, framed (AHS, lengths, padding, digests) by the harness
        bhs = inp.take(48)
        ahs = inp.take(4 * (inp.u8() % 4))
        data = inp.take(inp.u16() % 9000)
        raw = iscsi_pdu(0, 0, 0, data, bhs=bhs, ahs=ahs, hd=hd, dd=dd)
    elif kind == 1:  # SCSI command
        itt = ini.next_itt
        ini.next_itt += 1
        ini.itts = (ini.itts + [itt])[-8:]
        cdb = inp.take(inp.u8() % 17).ljust(16, b"\0")
        flags = 0x80 | (inp.u8() & 0x67)
        edtl = inp.u32() % ((1 << 17) if not ctl & 0x40 else (1 << 32))
        imm = inp.take(inp.u16() % 9000)
        ahs = b""
        if ctl & 0x10:  # an extended CDB
            ext = inp.take(inp.u8() % 32)
            ahs = struct.pack(">HB", len(ext) + 1, 1) + b"\0" + ext
        raw = iscsi_pdu(iscsi.OP_SCSI_CMD, flags, itt, imm, immediate=immediate, hd=hd, dd=dd, ahs=ahs,
                        fields={8: bytes([0, inp.u8() % 2]), 20: struct.pack(">II", edtl, cmdsn), 32: cdb[:16]})
    elif kind == 2:  # Data-Out: for an R2T seen, or unsolicited for a recent task
        sel = inp.u8()
        if ini.r2ts and not sel & 1:
            itt, ttt, off, length = ini.r2ts.pop(0)
        else:
            itt, ttt, off, length = ini.itts[sel % len(ini.itts)], iscsi.RSVD_TAG, 0, 8192
        pieces = 1 + inp.u8() % 4
        step = max(1, -(-length // pieces))
        raw = b""
        datasn = 0
        pos = off
        while pos < off + length:
            n = min(step, off + length - pos)
            last = pos + n >= off + length
            f = 0x80 if last or sel & 2 else 0
            sn = datasn if not sel & 4 else inp.u32()
            where = pos if not sel & 8 else inp.u32()
            raw += iscsi_pdu(iscsi.OP_DATA_OUT, f, itt, inp.take(n).ljust(n, b"\xaa"), hd=hd, dd=dd,
                             fields={20: struct.pack(">I", ttt), 36: struct.pack(">II", sn, where)})
            datasn += 1
            pos += n
            if sel & 2:
                break
    elif kind == 3:  # NOP-Out
        itt = iscsi.RSVD_TAG if ctl & 0x10 else ini.next_itt
        ini.next_itt += 1
        raw = iscsi_pdu(iscsi.OP_NOP_OUT, 0x80, itt, inp.take(inp.u16() % 1024), immediate=immediate, hd=hd, dd=dd,
                        fields={20: struct.pack(">II", iscsi.RSVD_TAG, cmdsn)})
    elif kind == 4:  # task management
        fn = inp.u8() % 10
        ref = ini.itts[inp.u8() % len(ini.itts)]
        raw = iscsi_pdu(iscsi.OP_TMF_REQ, 0x80 | fn, ini.next_itt, immediate=True, hd=hd, dd=dd,
                        fields={20: struct.pack(">II", ref, cmdsn)})
        ini.next_itt += 1
    elif kind == 5:  # text
        keys = inp.take(inp.u16() % 2048) if ctl & 0x10 else b"SendTargets=" + (b"All" if ctl & 0x40 else b"") + b"\0"
        cont = 0x40 if ctl & 0x40 and ctl & 0x10 else 0
        raw = iscsi_pdu(iscsi.OP_TEXT_REQ, 0x80 if not cont else cont, ini.next_itt, keys, immediate=immediate,
                        hd=hd, dd=dd, fields={20: struct.pack(">II", inp.u32() if ctl & 0x40 else iscsi.RSVD_TAG, cmdsn)})
        ini.next_itt += 1
    elif kind == 6:  # logout, or a login PDU (before the full feature phase)
        if not c.logged_in:
            body = inp.take(inp.u16() % 2048)
            flags = inp.u8()
            raw = iscsi_pdu(iscsi.OP_LOGIN_REQ, flags, 0, body, immediate=True,
                            fields={8: ISCSI_ISID, 24: struct.pack(">I", cmdsn)})
        else:
            raw = iscsi_pdu(iscsi.OP_LOGOUT_REQ, 0x80 | (inp.u8() % 3), ini.next_itt, immediate=immediate,
                            hd=hd, dd=dd, fields={24: struct.pack(">I", cmdsn)})
    else:  # raw bytes, unframed
        raw = inp.take(inp.u16() % 4096)
    if ctl & 0x10 and kind == 0:  # corrupt a byte of the framed PDU
        if raw:
            at = inp.u16() % len(raw)
            raw = raw[:at] + bytes([inp.u8()]) + raw[at + 1 :]
    if not immediate and kind in (1, 3, 5) and not ctl & 0x80:
        ini.cmdsn += 1
    ini.feed(raw, cut)


def _seeds_iscsi() -> list[bytes]:
    def step_cmd(cdb: bytes, flags: int, edtl: int, imm: bytes = b"") -> bytes:
        return bytes([1, len(cdb)]) + cdb + bytes([flags]) + struct.pack("<I", edtl) + struct.pack("<H", len(imm)) \
            + imm + b"\0"

    w10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 16, 0])
    r10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    data_out = bytes([2, 0, 1]) + bytes(8192)
    seeds = [
        bytes([1]) + step_cmd(w10, 0x20, 8192) + data_out + step_cmd(r10, 0x40, 4096) + bytes([3, 0, 0])
        + bytes([5]) + bytes([6, 0]),
        bytes([1 | 4]) + step_cmd(w10, 0x20, 8192, bytes(1024)) + bytes([2, 1, 2]) + bytes(8192),
        bytes([1 | 8 | 0x10]) + step_cmd(w10, 0x20, 8192) + step_cmd(bytes([0x12, 0, 0, 0, 0xFF, 0]), 0x40, 255)
        + bytes([4, 1, 0]) + data_out,
        bytes([1 | 2]) + bytes([5 | 0x40]) + bytes([6, 0]),
        bytes([1 | 0x40]) + step_cmd(bytes([0x00] * 6), 0, 0),
        bytes([1 | 0x40 | 0x20 | 0x80]) + step_cmd(r10, 0x40, 4096),
        bytes([0]) + bytes([6]) + struct.pack("<H", 60) + iscsi.encode_text(
            [("InitiatorName", ISCSI_INITIATOR), ("TargetName", ISCSI_IQN)])[:60] + bytes([0x87]),
    ]
    return seeds


# =====================================================================================================
# Wire (wire/framing.py, ops.py, raftcodec.py, chaincodec.py, raftblock_pb2). Documented failures:
# FatalFrameError (the stream is closed), BadFrame events (a frame skipped); decode_batch, decode_raft,
# decode_heartbeats, decode_chain_frame: ValueError; protobuf FromString: DecodeError.
# =====================================================================================================
_PB = (pb.Hello, pb.RaftMsg, pb.ChainMsg, pb.HeartbeatBatch, pb.ClientRequest, pb.ClientResponse, pb.GroupInfo,
       pb.EntryHeader, pb.SnapMeta, pb.ChainRecordHeader)


def decode_frame_message(frame: framing.Frame) -> None:
    """What the node does with a frame of each type (node/host.py, dataplane.py, transport.py)."""
    t = frame.type
    try:
        if t == framing.FrameType.RAFT:
            raft_roundtrip(raftcodec.decode_raft(frame.group, frame.message, frame.payload))
        elif t == framing.FrameType.HEARTBEATS:
            raftcodec.decode_heartbeats(frame.message)
        elif t == framing.FrameType.CHAIN:
            chain_roundtrip(*chaincodec.decode_chain_frame(frame.group, frame.message, frame.payload))
        elif t == framing.FrameType.HELLO:
            pb.Hello.FromString(frame.message)
        elif t == framing.FrameType.CLIENT_REQ:
            pb.ClientRequest.FromString(frame.message)
        elif t == framing.FrameType.CLIENT_RESP:
            pb.ClientResponse.FromString(frame.message)
    except DecodeError:
        check(t not in (framing.FrameType.RAFT, framing.FrameType.HEARTBEATS, framing.FrameType.CHAIN),
              "DecodeError out of a codec that documents ValueError")
    except ValueError:
        check(t in (framing.FrameType.RAFT, framing.FrameType.HEARTBEATS, framing.FrameType.CHAIN),
              "ValueError out of protobuf")


def target_frame(data: bytes) -> None:
    """Byte 0: how the bytes come in (bit 0: BufferedProtocol; bits 1-2: frames built by encode_frame first);
    byte 1: how the stream is cut; then frame specs (when built) and the raw rest."""
    inp = Input(data)
    mode, cut = inp.u8(), inp.u8()
    stream = b""
    for _ in range((mode >> 1) & 3):
        ftype = inp.u8() % 8
        group = inp.u32()
        message = inp.take(inp.u16() % 2048)
        payload = inp.take(inp.u16())
        raw = framing.encode_frame_bytes(ftype, group, message, [payload])
        if mode & 8 and raw:  # one flipped bit somewhere in the frame
            at = inp.u32() % (8 * len(raw))
            raw = raw[: at // 8] + bytes([raw[at // 8] ^ (1 << (at % 8))]) + raw[at // 8 + 1 :]
        stream += raw
    stream += inp.rest()
    dec = framing.FrameDecoder()
    fed = 0
    buffered = bool(mode & 1)
    for piece in chunks(stream, cut):
        if buffered:
            view = memoryview(piece)
            while len(view):
                buf = dec.get_buffer(-1)
                n = min(len(buf), len(view))
                check(n > 0, "get_buffer gave an empty buffer")
                buf[:n] = view[:n]
                dec.buffer_updated(n)
                view = view[n:]
        else:
            dec.feed(piece)
        fed += len(piece)
        while True:
            try:
                ev = dec.next_event()
            except framing.FatalFrameError as e:
                check(e.counter in ("frames_bad_magic", "frames_too_large"), f"counter {e.counter}")
                return
            if ev is None:
                break
            check(isinstance(ev, framing.Frame | framing.BadFrame), f"event {ev!r}")
            if isinstance(ev, framing.Frame):
                check(len(ev.message) <= framing.MESSAGE_LEN_MAX and len(ev.payload) <= framing.PAYLOAD_LEN_MAX,
                      "frame over the limits")
                decode_frame_message(ev)
        check(dec.buffered_bytes() <= fed, f"{dec.buffered_bytes()} bytes buffered after {fed} fed")
        big = dec._big
        check(big is None or len(big) <= framing.BIG_FRAME_BYTES_MAX, "a big-frame buffer over its bound")


def frame_roundtrip(frames: list[tuple[int, int, bytes, list[bytes]]], cut: int, buffered: bool) -> None:
    """encode_frame -> FrameDecoder gives the same frames, whatever the cut."""
    stream = b"".join(framing.encode_frame_bytes(t, g, m, p) for t, g, m, p in frames)
    dec = framing.FrameDecoder()
    got: list[tuple[int, int, bytes, bytes]] = []
    for piece in chunks(stream, cut):
        if buffered:
            view = memoryview(piece)
            while len(view):
                buf = dec.get_buffer(-1)
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                dec.buffer_updated(n)
                view = view[n:]
        else:
            dec.feed(piece)
        while (ev := dec.next_event()) is not None:
            check(isinstance(ev, framing.Frame), f"{ev!r} from a well-formed stream")
            assert isinstance(ev, framing.Frame)
            got.append((ev.type, ev.group, bytes(ev.message), bytes(ev.payload)))
    check(got == [(t, g, m, b"".join(p)) for t, g, m, p in frames], "frames differ after a round trip")
    check(dec.buffered_bytes() == 0, "bytes left after the last frame")


def _seeds_frame() -> list[bytes]:
    hello = pb.Hello(node_id=2, role=framing.ROLE_PEER, version=framing.WIRE_VERSION).SerializeToString()
    raft = b"".join(bytes(p) for p in raftcodec.encode_raft(_sample_raft()))
    chain = b"".join(bytes(p) for p in chaincodec.encode_chain(_sample_chain()))
    hb = b"".join(bytes(p) for p in raftcodec.encode_heartbeats(NodeId(1), NodeId(2), [_sample_hb()], False))
    req = pb.ClientRequest(request_id=1, op=1, extent_id=5, block=1, count=1, crcs=[7]).SerializeToString()
    return [
        bytes([0, 0]) + framing.encode_frame_bytes(framing.FrameType.HELLO, 0, hello) + raft + hb,
        bytes([1, 3]) + chain + framing.encode_frame_bytes(framing.FrameType.CLIENT_REQ, 9, req, [bytes(4096)]),
        bytes([2, 0, framing.FrameType.CLIENT_RESP, 1, 0, 0, 0, 4, 0]) + b"\x08\x01\x10\x00" + b"\0\0",
        bytes([0, 4]) + framing.encode_frame_bytes(framing.FrameType.RAFT, 1, b"", [bytes(40 << 10)])[:30000],
        bytes([0, 0]) + b"RB\x02" + bytes(40),
    ]


def target_ops(data: bytes) -> None:
    """Byte 0: write_spans' min_bytes (in 4 KiB); the rest: an op batch."""
    inp = Input(data)
    min_bytes = inp.u8() * 4096
    raw = inp.rest()
    spans = ops.write_spans(raw, min_bytes)
    for off, length in spans:
        check(0 <= off and off + length <= len(raw) and length >= min_bytes, f"span {off}+{length}")
    try:
        batch = ops.decode_batch(raw)
    except ValueError:
        return
    writes = [bytes(op.data) for op in batch if op.kind == ops.OP_WRITE and len(op.data) >= min_bytes]
    check([raw[o : o + n] for o, n in spans] == writes, "write_spans disagrees with decode_batch")
    for op in batch:
        if op.kind in (ops.OP_WRITE, ops.OP_FILL):
            check(len(op.crcs) == op.count and len(op.data) == op.count * ops.BLOCK_SIZE, "write op lengths")
            check(len(op.aux) == (ops.AUX_BYTES * op.count if op.seal_at else 0), "sealed write op entries")
        else:
            check(op.kind in (ops.OP_TRIM, ops.OP_SNAP, ops.OP_UNSNAP), f"op kind {op.kind}")
        if op.seal_at:
            check(op.block + op.count <= op.seal_at, "sealed op reaching its metadata region")
    if batch:
        again = ops.decode_batch(ops.encode_batch(batch))
        check([_op_tuple(o) for o in again] == [_op_tuple(o) for o in batch], "encode(decode(x)) decodes otherwise")


def _op_tuple(op: ops.BlockOp) -> tuple[object, ...]:
    """An op as apply sees it: a name with client id 0 is no name (rule 4), whatever its other fields."""
    name = (op.client, op.wid, op.low) if op.client else (0, 0, 0)
    return (op.kind, op.extent_id, op.block, op.count, tuple(op.crcs), bytes(op.data), *name, op.seal_at,
            bytes(op.aux))


def _seeds_ops() -> list[bytes]:
    blk = bytes(range(256)) * 16
    return [
        bytes([0]) + ops.encode_batch([ops.BlockOp(ops.OP_WRITE, 1 << 32, 3, 1, [crc32c.crc32c(blk)], blk)]),
        bytes([1]) + ops.encode_batch([ops.BlockOp(ops.OP_TRIM, 5, 0, 9), ops.BlockOp(ops.OP_SNAP, 7, 0, 0),
                                       ops.BlockOp(ops.OP_WRITE, 5, 1, 2, [1, 2], blk * 2, client=3, wid=4, low=1)]),
        bytes([0]) + ops.encode_batch([ops.BlockOp(ops.OP_FILL, 2, 0, 1, [0], bytes(4096)),
                                       ops.BlockOp(ops.OP_UNSNAP, 7, 0, 0)]),
    ]


# --- Raft and chain messages ----------------------------------------------------------------------
def _sample_raft() -> Message:
    return Message(MessageType.APP, GroupId(3), NodeId(1), NodeId(2), 5, log_term=4, index=10,
                   entries=[Entry(5, 11, EntryType.NORMAL, b"abc"), Entry(5, 12, EntryType.CONFIG, b"")],
                   commit=9, context=2, lease_tick=-4, epoch=1)


def _sample_hb() -> Message:
    return Message(MessageType.HEARTBEAT, GroupId(3), NodeId(1), NodeId(2), 5, commit=3, context=1, lease_tick=7)


def _sample_chain() -> ChainMessage:
    return ChainMessage(ChainType.WRITE, GroupId(4), NodeId(1), NodeId(2), 3, 7,
                        (Record(6, b"x" * 10, 2), Record(7, b"", 3)), b"", 2)


def raft_roundtrip(m: Message) -> None:
    parts = raftcodec.encode_raft(m)
    raw = b"".join(bytes(p) for p in parts)
    dec = framing.FrameDecoder()
    dec.feed(raw)
    f = dec.next_event()
    check(isinstance(f, framing.Frame), "encode_raft did not frame")
    assert isinstance(f, framing.Frame)
    again = raftcodec.decode_raft(f.group, f.message, f.payload)
    check(_fields(again) == _fields(m), f"raft message changed in a round trip: {m!r} -> {again!r}")


def chain_roundtrip(m: ChainMessage, offset: int = 0, total: int = 0) -> None:
    if total:
        parts = chaincodec.encode_snapshot_chunk(m, offset, total, m.data)
    else:
        parts = chaincodec.encode_chain(m)
    raw = b"".join(bytes(p) for p in parts)
    dec = framing.FrameDecoder()
    dec.feed(raw)
    f = dec.next_event()
    assert isinstance(f, framing.Frame)
    again, o2, t2 = chaincodec.decode_chain_frame(f.group, f.message, f.payload)
    check((_fields(again), o2 if t2 else 0, t2) == (_fields(m), offset if total else 0, total),
          "chain message changed in a round trip")


def target_raftmsg(data: bytes) -> None:
    """Byte 0: which decoder (RAFT, HEARTBEATS, CHAIN); u16 message length; message; the rest: payload."""
    inp = Input(data)
    which = inp.u8() % 3
    group = inp.u32()
    message = inp.take(inp.u16())
    payload = inp.rest()
    try:
        if which == 0:
            raft_roundtrip(raftcodec.decode_raft(group, message, payload))
        elif which == 1:
            msgs = raftcodec.decode_heartbeats(message)
            check(all(m.type in (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP) for m in msgs), "heartbeat type")
        else:
            chain_roundtrip(*chaincodec.decode_chain_frame(group, message, payload))
    except ValueError:
        return  # rule 3 (raftcodec) / rule 2 (chaincodec): the caller drops the frame and counts it


def _seeds_raftmsg() -> list[bytes]:
    out = []
    for which, parts in ((0, raftcodec.encode_raft(_sample_raft())),
                         (1, raftcodec.encode_heartbeats(NodeId(1), NodeId(2), [_sample_hb()], True)),
                         (2, chaincodec.encode_chain(_sample_chain())),
                         (2, chaincodec.encode_snapshot_chunk(
                             ChainMessage(ChainType.SNAPSHOT, GroupId(4), NodeId(1), NodeId(2), 3, 7, (), b"", 2),
                             0, 100, b"img" * 10))):
        msg = bytes(parts[1])
        payload = b"".join(bytes(p) for p in parts[2:])
        out.append(bytes([which]) + struct.pack("<IH", 4, len(msg)) + msg + payload)
    snap = Message(MessageType.SNAP, GroupId(3), NodeId(1), NodeId(2), 5, chunk_index=0, chunk_total=2, data=b"img",
                   snap_meta=SnapshotMeta(10, 4, ConfState(frozenset({NodeId(1), NodeId(2)}), 3)))
    parts = raftcodec.encode_raft(snap)
    out.append(bytes([0]) + struct.pack("<IH", 3, len(parts[1])) + bytes(parts[1]) + b"img")
    return out


def target_proto(data: bytes) -> None:
    """Byte 0: which message; the rest: its serialization. Only DecodeError may come out of FromString."""
    inp = Input(data)
    cls = _PB[inp.u8() % len(_PB)]
    raw = inp.rest()
    try:
        m = cls.FromString(raw)
    except DecodeError:
        return
    again = cls.FromString(m.SerializeToString())
    check(again == m, f"{cls.__name__} changed in a round trip")


def _seeds_proto() -> list[bytes]:
    msgs = [pb.Hello(node_id=2, role=1, version=1), pb.RaftMsg(type=3, src=1, dst=2, term=5, lease_tick=-3),
            pb.ChainMsg(type=1, src=1, dst=2, records=[pb.ChainRecordHeader(seq=1, data_len=3)]),
            pb.HeartbeatBatch(src=1, dst=2, group=[1, 2], term=[3, 3], commit=[0, 1], context=[1, 1],
                              lease_tick=[-1, 2], epoch=[0, 0]),
            pb.ClientRequest(request_id=1, op=2, extent_id=1 << 33, count=4, crcs=[1, 2, 3, 4], fill=True),
            pb.ClientResponse(request_id=1, status=1, leader_address="10.0.0.1:7000", counters={"a": -1},
                              groups=[pb.GroupInfo(group=1, mode="raft", snap_ids=[1])], runs=[1, 0, 2, 1])]
    return [bytes([_PB.index(type(m))]) + m.SerializeToString() for m in msgs]


# =====================================================================================================
# Storage (storage/segment.py, recovery.py, index.py checkpoint codec). Documented: the scanner reports
# records and bad regions and never raises; read_record returns a reason string; decode_checkpoint a reason
# string; recovery raises ValueError only for a directory of another cluster, an unknown format version, or
# LINK records without a WAL; everything else is torn tail (cut) or corruption (reported).
# =====================================================================================================
CLUSTER = bytes(range(16))
SEG_DIR = "/e"
BLK = 4096


def _refix_segment_crcs(buf: bytearray, seed: int) -> None:
    """Give every 8-aligned structurally sane record header a valid header CRC (and a WRITE's payload blocks
    valid CRCs): the mutated fields then reach recovery, as a buggy writer would."""
    if len(buf) >= 64 and buf[:8] == sseg.SEG_MAGIC:
        struct.pack_into("<I", buf, 60, crc32c.crc32c(bytes(buf[:60])))
    off = 64
    while off + sseg.REC_HEADER_SIZE <= len(buf):
        hdr = sseg.parse_header_fields(buf, off)
        if isinstance(hdr, str) or off + hdr.length > len(buf):
            off += 8
            continue
        if hdr.rtype == sseg.REC_WRITE:
            pay = off + sseg.payload_offset(hdr.count)
            for i in range(hdr.count):
                s = pay + i * BLK
                struct.pack_into("<I", buf, off + sseg.REC_HEADER_SIZE + 4 * i, crc32c.crc32c(bytes(buf[s : s + BLK])))
        end = off + sseg._checked_length(hdr)
        struct.pack_into("<I", buf, off, crc32c.crc32c(bytes(buf[off + 4 : end]), seed))
        off += hdr.length


def _build_records(inp: Input, seg_id: int, lsn0: int, n: int) -> tuple[bytearray, int]:
    """A segment file of `n` records made by the encoders from the input's fields."""
    seed = sseg.segment_seed(CLUSTER, seg_id)
    buf = bytearray(sseg.encode_segment_header(CLUSTER, seg_id, lsn0))
    lsn = lsn0
    for _ in range(n):
        kind = inp.u8()
        ext = (inp.u8() % 3) | ((inp.u8() % 2) << 32)
        block = inp.u16() % 64
        lsn += 1 + inp.u8() % 3
        mark = sseg.position(seg_id, len(buf)) if kind & 0x80 else 0
        flags = sseg.FLAG_HISTORY if kind & 0x40 else 0
        k = kind % 5
        if k == 0:
            count = 1 + inp.u8() % 3
            pat = inp.take(8) or b"\1"
            payload = (pat * (count * BLK // len(pat) + 1))[: count * BLK]
            crcs = [crc32c.crc32c(payload[i * BLK : (i + 1) * BLK]) for i in range(count)]
            rec, _ = sseg.build_write_record(seed, ext, block, lsn, mark, payload, crcs, flags)
        elif k == 1:
            rec = sseg.build_trim_record(seed, ext, block, 1 + inp.u16(), lsn, mark, flags)
        elif k == 2:
            count = 1 + inp.u8() % 4
            rec = sseg.build_link_record(seed, ext, block, lsn, mark, [inp.u32() for _ in range(count)],
                                         1 + inp.u8() % 3, inp.u16() * 8, flags)
        else:
            rec = sseg.build_mark_record(seed, sseg.REC_PIN if k == 3 else sseg.REC_UNPIN, ext >> 32, 1 + inp.u8() % 3,
                                         lsn, mark, max(0, lsn - inp.u8()))
        buf += rec
    return buf, lsn


def _mutate(inp: Input, buf: bytearray, n: int) -> None:
    """`n` mutations: flip a byte, zero a range, cut the file, duplicate or drop a range, write a u32."""
    for _ in range(n):
        if not buf:
            return
        op = inp.u8() % 6
        at = inp.u32() % len(buf)
        if op == 0:
            buf[at] ^= 1 << (inp.u8() % 8) or 1
        elif op == 1:
            ln = inp.u16() % 4096
            buf[at : at + ln] = bytes(len(buf[at : at + ln]))
        elif op == 2:
            del buf[at:]
        elif op == 3:
            ln = inp.u16() % 8192
            buf[at:at] = buf[at : at + ln]
        elif op == 4:
            ln = inp.u16() % 8192
            del buf[at : at + ln]
        else:
            buf[at : at + 4] = struct.pack("<I", inp.u32())[: len(buf) - at]


def _segment_file(inp: Input, seg_id: int, lsn0: int = 0) -> tuple[bytearray, int]:
    """One segment file: [layout u8] then raw bytes, or records built from the input then mutations."""
    layout = inp.u8()
    lsn = lsn0
    if layout & 3 == 0:
        buf = bytearray(inp.take(inp.u16()))
    elif layout & 3 == 1:
        buf = bytearray(sseg.encode_segment_header(CLUSTER, seg_id, lsn0)) + inp.take(inp.u16())
    else:
        buf, lsn = _build_records(inp, seg_id, lsn0, inp.u8() % 12)
        _mutate(inp, buf, inp.u8() % 4)
    if layout & 4:
        _refix_segment_crcs(buf, sseg.segment_seed(CLUSTER, seg_id))
    if layout & 8:
        buf += bytes(inp.u8() * 64)  # preallocated zeros
    return buf, lsn


def target_segment(data: bytes) -> None:
    inp = Input(data)
    verify = bool(inp.u8() & 1)
    buf, _ = _segment_file(inp, 1)
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    path = f"{SEG_DIR}/{sseg.segment_name(1)}"
    f = disk.open_file(path, create=True)
    f.pwrite(bytes(buf), 0)
    seed = sseg.segment_seed(CLUSTER, 1)
    size = len(buf)
    hdr = sseg.decode_segment_header(bytes(buf[:64]))
    check(isinstance(hdr, sseg.SegmentHeader | str), "segment header decode")
    with alloc_bound(4 * size + (4 << 20), "scan_segment"):
        res = sseg.scan_segment(f, seed, sseg.SEG_HEADER_SIZE, verify_payload=verify)
    check(res.file_size == size and sseg.SEG_HEADER_SIZE <= res.end <= max(size, sseg.SEG_HEADER_SIZE), "scan end")
    spans = sorted([(r.offset, r.hdr.length, "r") for r in res.records] + [(b.offset, b.length, "b") for b in res.bad])
    prev = sseg.SEG_HEADER_SIZE
    for off, ln, what in spans:
        check(off >= prev and ln > 0 and off + ln <= size, f"{what} at {off}+{ln} overlaps or leaves the file")
        prev = off + ln
    for r in res.records:
        check(r.hdr.length == sseg.record_length(r.hdr.rtype, r.hdr.count), "record length")
        got = sseg.read_record(f, seed, r.offset, verify_payload=verify)
        check(not isinstance(got, str) and got[0] == r.hdr, f"read_record disagrees with the scan at {r.offset}")
        check(all(0 <= i < r.hdr.count for i in r.bad_blocks), "bad block index")
    for b in res.bad:
        check(b.hint is None or b.hint.length <= b.length, "a hint longer than its region")
    for off in (0, 8, 64, size // 2 & ~7, size):
        got = sseg.read_record(f, seed, off)
        check(isinstance(got, str | tuple), "read_record result")


def _seeds_segment() -> list[bytes]:
    def built(n: int, recs: bytes, layout: int = 2, muts: bytes = b"\0") -> bytes:
        return bytes([1, layout]) + bytes([n]) + recs + muts

    w = bytes([0, 1, 0]) + struct.pack("<H", 3) + bytes([1, 0]) + b"datadata"
    t = bytes([1, 1, 0]) + struct.pack("<H", 9) + bytes([1]) + struct.pack("<H", 40)
    ln = bytes([2, 2, 1]) + struct.pack("<H", 0) + bytes([1, 1]) + struct.pack("<I", 7) + bytes([1]) \
        + struct.pack("<H", 1)
    pin = bytes([3, 0, 1]) + struct.pack("<H", 0) + bytes([1, 1, 1])
    return [
        built(3, w + t + w.replace(b"data", b"zzzz")),
        built(4, w + ln + pin + t, muts=bytes([1, 0]) + struct.pack("<I", 200)),
        built(2, bytes([0x80]) + w[1:] + t, layout=2 | 8, muts=bytes([1, 2]) + struct.pack("<I", 5000)),
        built(2, w + t, layout=2 | 4, muts=bytes([1, 5]) + struct.pack("<II", 64 + 20, 1000)),
        bytes([0, 1]) + struct.pack("<H", 48) + bytes(48),
    ]


def _checkpoint_bytes(inp: Input, segs: list[int]) -> bytes:
    """A checkpoint made by encode_checkpoint from the input's tuples (mode 1) or raw bytes (mode 0)."""
    mode = inp.u8()
    if mode & 1 == 0:
        raw = bytearray(inp.take(inp.u16()))
    else:
        def seg() -> int:
            return segs[inp.u8() % len(segs)] if segs and inp.u8() & 1 else inp.u8()

        def u32() -> int:
            return inp.u32() if mode & 2 else inp.u8()

        ck = sindex.Checkpoint(
            CLUSTER, inp.u16(), seg(), 64 + 8 * inp.u8(), 1 + inp.u8(),
            runs=[(inp.u8() % 3, u32(), u32(), seg(), 64 + 8 * inp.u8(), u32(), u32(), inp.u16(),
                   sseg.FLAG_LINK if mode & 4 else 0) for _ in range(inp.u8() % 6)],
            tombs=[(seg(), 64 + 8 * inp.u8(), u32(), u32(), inp.u8() % 3, inp.u16()) for _ in range(inp.u8() % 3)],
            segmin=[(seg(), inp.u8() % 3, inp.u16()) for _ in range(inp.u8() % 3)],
            bad=[(inp.u8() % 3, u32(), inp.u16()) for _ in range(inp.u8() % 3)],
            pins=[(inp.u8() % 2, inp.u8() % 3, inp.u16()) for _ in range(inp.u8() % 3)],
            hist=[(inp.u8() % 3, u32(), u32(), seg(), 64 + 8 * inp.u8(), u32(), u32(), inp.u16(), inp.u16(), 0)
                  for _ in range(inp.u8() % 3)],
            marks=[(seg(), 64 + 8 * inp.u8(), sseg.REC_PIN, 0, 1, inp.u16(), inp.u16()) for _ in range(inp.u8() % 2)],
        )
        raw = bytearray(sindex.encode_checkpoint(ck))
        _mutate(inp, raw, inp.u8() % 3)
    if mode & 8 and len(raw) >= sindex.CKPT_HEADER_SIZE + 4:  # lengths and CRC made valid again
        struct.pack_into("<Q", raw, 64, len(raw) - sindex.CKPT_HEADER_SIZE - 4)
        struct.pack_into("<I", raw, len(raw) - 4, crc32c.crc32c(bytes(raw[:-4])))
    return bytes(raw)


def target_checkpoint(data: bytes) -> None:
    inp = Input(data)
    raw = _checkpoint_bytes(inp, [1, 2])
    with alloc_bound(64 * len(raw) + (1 << 20), "decode_checkpoint"):
        ck = sindex.decode_checkpoint(raw)
    if isinstance(ck, str):
        return
    check(isinstance(ck, sindex.Checkpoint), f"decode_checkpoint returned {ck!r}")
    again = sindex.decode_checkpoint(sindex.encode_checkpoint(ck))
    check(again == ck, "checkpoint changed in a round trip")


def _seeds_checkpoint() -> list[bytes]:
    one = bytes([1 | 8]) + bytes([3, 0, 1, 2, 0, 0, 1]) + bytes([2, 1, 5, 1, 1, 0, 2, 1, 3, 0, 0, 2, 9, 0])
    return [one, bytes([0]) + struct.pack("<H", 84) + b"RBCHKPT1" + bytes(76), bytes([1 | 2 | 8]) + bytes(40)]


def _wal_fake(seq: int) -> None:
    return None


def target_recovery(data: bytes) -> None:
    """Byte 0: options (verify_on_open, a checkpoint, a checkpoint.tmp, a WAL for LINKs); u8 segment count;
    the segments (see _segment_file); the checkpoint (see _checkpoint_bytes)."""
    inp = Input(data)
    opts = inp.u8()
    nseg = 1 + inp.u8() % 3
    disk = MemDisk()
    disk.makedirs(SEG_DIR)
    total = 0
    lsn = 0
    ids: list[int] = []
    for k in range(nseg):
        sid = k + 1 + (inp.u8() % 2 if opts & 0x10 else 0)
        if sid in ids:
            continue
        buf, lsn = _segment_file(inp, sid, lsn)
        ids.append(sid)
        disk.files[f"{SEG_DIR}/{sseg.segment_name(sid)}"] = buf
        total += len(buf)
    if opts & 2:
        raw = _checkpoint_bytes(inp, ids)
        disk.files[f"{SEG_DIR}/{srecovery.CHECKPOINT_NAME}"] = bytearray(raw)
        total += len(raw)
    if opts & 4:
        disk.files[f"{SEG_DIR}/{srecovery.CHECKPOINT_TMP_NAME}"] = bytearray(b"junk")
    wal_file = None if opts & 8 else _wal_fake
    for _round in range(2):  # recovery again after the first one cut and reported: the same rules
        try:
            with alloc_bound(64 * total + (16 << 20), "recover"):
                rec = srecovery.recover(disk, SEG_DIR, CLUSTER, verify_on_open=bool(opts & 1), wal_file=wal_file)
        except ValueError as e:
            msg = str(e)
            check("belongs to cluster" in msg or "unknown segment format version" in msg
                  or "holds LINK records" in msg, f"ValueError {msg!r}")
            return
        _check_index(rec)
        for f in rec.files.values():
            f.close()


def _check_index(rec: srecovery.Recovered) -> None:
    idx = rec.index
    rep = rec.report
    check(rep.torn_tail_bytes >= 0 and rep.records_replayed >= 0, "report counts")
    check(idx.blocks_allocated == sum(len(m) for m in idx.extents.values()), "blocks_allocated")
    for eid, emap in idx.extents.items():
        for blk, r in emap.items():
            check(r.extent_id == eid and r.seg in idx.segs, f"index entry {eid}/{blk} names {r.seg}")
            check(r.rtype in (sseg.REC_WRITE, sseg.REC_LINK), "index entry of a TRIM")
    for cr in rep.corrupt:
        check(cr.length >= 0 and cr.offset >= 0, "corrupt range")


def _seeds_recovery() -> list[bytes]:
    segs = _seeds_segment()
    return [
        bytes([0, 0]) + segs[0][1:],
        bytes([1 | 2, 1]) + segs[1][1:] + segs[2][1:] + _seeds_checkpoint()[0],
        bytes([2 | 8, 0]) + segs[3][1:] + _seeds_checkpoint()[2],
        bytes([0x10, 2]) + b"\0" + segs[0][1:] + b"\1" + segs[4][1:] + b"\0" + segs[2][1:],
    ]


# =====================================================================================================
# WAL (replication/wal.py): Wal.open on segments written by Wal itself, then mutated. Documented: a bad
# record in the newest segment is a torn tail (cut), in an older one WalCorruptError (rule 4).
# =====================================================================================================
WAL_DIR = "/w"


def _wal_refix(buf: bytearray, seq: int) -> None:
    """Valid record CRCs again after a mutation: the records' bodies reach the decoders."""
    if len(buf) < WAL_SEG_HEADER.size:
        return
    magic = bytes(buf[:8])
    seed = 0 if magic == b"RBWAL001" else wal_seed(seq)
    off = WAL_SEG_HEADER.size
    while off + WAL_REC_HEADER.size <= len(buf):
        _crc, blen, _t, _g = WAL_REC_HEADER.unpack_from(buf, off)
        end = off + WAL_REC_HEADER.size + blen
        if end > len(buf):
            return
        struct.pack_into("<I", buf, off, crc32c.crc32c(bytes(buf[off + 4 : end]), seed))
        off = end


def _wal_write(inp: Input, disk: MemDisk) -> None:
    wal, _ = Wal.open(disk, WAL_DIR, segment_bytes_max=(1 + inp.u8() % 8) * 1024)
    wal.write_once_min_bytes = 8192 if inp.u8() & 1 else 0
    nxt: dict[int, int] = {}
    for _ in range(inp.u8() % 16):
        op = inp.u8()
        g = 1 + op % 3
        kind = (op >> 2) % 5
        if kind == 0:
            first = nxt.get(g, 1)
            ents = []
            for i in range(1 + inp.u8() % 3):
                if inp.u8() & 1:
                    blk = inp.take(16).ljust(16, b"\0") * 256
                    n = 2 + inp.u8() % 2
                    data = ops.encode_batch([ops.BlockOp(ops.OP_WRITE, g << 32, 0, n, [crc32c.crc32c(blk)] * n, blk * n,
                                                         client=inp.u8())])
                else:
                    data = inp.take(inp.u8())
                ents.append(Entry(1 + inp.u8() % 2, first + i, EntryType.NORMAL, data))
            wal.append_entries(g, ents)
            nxt[g] = first + len(ents)
        elif kind == 1:
            wal.set_hard_state(g, HardState(inp.u8(), NodeId(inp.u8() % 4), inp.u8()))
        elif kind == 2:
            idx = max(0, nxt.get(g, 1) - 1 - inp.u8() % 3)
            wal.compact(g, SnapshotMeta(idx, 1, ConfState(frozenset({NodeId(1), NodeId(2)}), inp.u8()), inp.take(inp.u8() % 8)))
        elif kind == 3:
            idx = nxt.get(g, 1) + inp.u8() % 3
            wal.install_snapshot(g, SnapshotMeta(idx, 2, ConfState(frozenset({NodeId(3)}), 1)))
            nxt[g] = idx + 1
        else:
            wal.flush()
            wal.sync()
    wal.flush()
    wal.sync()
    wal.close()


def target_wal(data: bytes) -> None:
    """Byte 0: layout (bit 0 raw segment bytes, else written by Wal; bit 1 CRCs made valid after the
    mutations; bit 2 a second raw segment); then the writes or the raw bytes; then mutations."""
    inp = Input(data)
    layout = inp.u8()
    disk = MemDisk()
    disk.makedirs(WAL_DIR)
    if layout & 1:
        for seq in (1, 2) if layout & 4 else (1,):
            head = WAL_SEG_HEADER.pack(b"RBWAL003", seq) if inp.u8() & 1 else b""
            disk.files[f"{WAL_DIR}/{wal_segment_name(seq)}"] = bytearray(head + inp.take(inp.u16()))
    else:
        _wal_write(inp, disk)
    names = sorted(p for p in disk.files if p.endswith(".log"))
    for _ in range(inp.u8() % 3):
        if not names:
            break
        path = names[inp.u8() % len(names)]
        buf = disk.files[path]
        _mutate(inp, buf, 1)
        if layout & 2:
            _wal_refix(buf, int(path.rsplit("-", 1)[1][:16], 16))
    total = sum(len(b) for b in disk.files.values())
    try:
        with alloc_bound(8 * total + (16 << 20), "Wal.open"):
            wal, groups = Wal.open(disk, WAL_DIR)
    except WalCorruptError:
        return
    try:
        for g, st in groups.items():
            base = st.snap.index if st.snap is not None else 0
            for k, e in enumerate(st.entries):
                check(e.index == base + 1 + k, f"group {g}: entry {e.index} at position {k} after {base}")
            last = st.entries[-1].index if st.entries else base
            check(st.hard_state.commit <= last, f"group {g}: commit {st.hard_state.commit} past {last}")
    finally:
        wal.close()
    Wal.open(disk, WAL_DIR)[0].close()  # what the first open cut stays cut: a second open works


def _seeds_wal() -> list[bytes]:
    ents = bytes([0, 0, 0]) + bytes([3, 0, 1, 1]) + b"abc" + bytes([1]) + bytes([1, 1, 2, 0])
    return [
        bytes([0, 2, 1, 6]) + ents[3:] + bytes([4, 1, 1, 9]) + bytes([8, 1, 1, 2, 0]) + bytes([16]) + bytes([0]),
        bytes([0, 0, 0, 3, 0, 2]) + b"\x01" + b"0123456789abcdef" + b"\x01\x00" + b"\x01" + bytes([1]) + bytes([1]),
        bytes([2, 1, 0, 4, 0, 1, 1, 0, 1, 5, 1, 2, 3, 4]) + bytes([1, 0]) + struct.pack("<I", 30) + bytes([7]),
        bytes([1, 1]) + struct.pack("<H", 30) + WAL_REC_HEADER.pack(0, 9, 2, 1) + bytes(9),
    ]


# =====================================================================================================
# Backups (backup/chunk.py, manifest.py). Documented: ChunkError (decode, apply_delta), ManifestError.
# =====================================================================================================
CHUNK_NAME = "0" * 64


def target_chunk(data: bytes) -> None:
    """Byte 0: bit 0 delta kind expected; bit 1 apply the decoded delta; the rest: the object."""
    inp = Input(data)
    mode, base_sel = inp.u8(), inp.u8()
    kind = bchunk.KIND_DELTA if mode & 1 else bchunk.KIND_FULL
    obj = inp.rest()
    name = CHUNK_NAME
    if mode & 4 and len(obj) >= 24:  # name the object after what it claims to hold: the hash check passes
        try:
            if 0 <= zstandard.frame_content_size(obj[24:]) <= 1 << 16 or zstandard.frame_content_size(obj[24:]) == -1:
                name = bchunk.chunk_name(zstandard.ZstdDecompressor().decompress(obj[24:], max_output_size=1 << 16))
        except zstandard.ZstdError:
            pass
    try:
        with alloc_bound(2 * bchunk.PLAIN_BYTES_MAX + 4 * len(obj) + (1 << 20), "chunk.decode"):
            plain = bchunk.decode(name, obj, kind)
    except bchunk.ChunkError as e:
        check(e.name == name and e.reason, "ChunkError without a reason")
        plain = obj[24:] if mode & 2 else b""
    check(len(plain) <= bchunk.PLAIN_BYTES_MAX or not mode & 2, "plaintext over the bound")
    if mode & 2:
        base = bytes([mode]) * (base_sel * 512 if mode & 8 else bchunk.CHUNK_BYTES // 64)
        base_name = bchunk.chunk_name(base)
        delta = bytes(plain)
        if mode & 16 and len(delta) >= 32:
            delta = bytes.fromhex(base_name) + delta[32:]
        try:
            out = bchunk.apply_delta(name, delta, base_name, base)
        except bchunk.ChunkError:
            return
        check(len(out) == len(base), "a delta changed the chunk's length")


def delta_roundtrip(base: bytes, new: bytes) -> None:
    blocks = bchunk.changed_blocks(base, new)
    plain = bchunk.delta_plain(bchunk.chunk_name(base), new, blocks)
    name, obj = bchunk.encode(plain, bchunk.KIND_DELTA)
    got = bchunk.decode(name, obj, bchunk.KIND_DELTA)
    check(bchunk.apply_delta(name, got, bchunk.chunk_name(base), base) == new, "delta round trip")


def _seeds_chunk() -> list[bytes]:
    base = bytes(16384)
    new = bytearray(base)
    new[5000] = 1
    plain = bchunk.delta_plain(bchunk.chunk_name(base), bytes(new), bchunk.changed_blocks(base, bytes(new)))
    return [bytes([4, 0]) + bchunk.encode(b"hello world" * 100)[1], bytes([1 | 2 | 4, 0]) + bchunk.encode(plain, 2)[1],
            bytes([0, 0]) + bchunk.encode(b"")[1], bytes([2 | 8 | 16, 32]) + bytes(24) + plain]


def target_manifest(data: bytes) -> None:
    try:
        m = Manifest.from_json(data)
    except ManifestError:
        return
    for ent in m.chunks:
        check(ent[0] in ("zero", "full", "delta") and all(re.fullmatch(r"[0-9a-f]{64}", n) for n in ent[1:]),
              f"chunk entry {ent!r} accepted")
    check(len(m.chunks) == m.chunk_count(), "chunk count")
    again = Manifest.from_json(m.to_json())
    check(again == m, "manifest changed in a round trip")


def _seeds_manifest() -> list[bytes]:
    n = "ab" * 32
    m = Manifest("vol", "s1", 3 * bchunk.CHUNK_BYTES + 5, [("zero",), ("full", n), ("delta", n, "cd" * 32), ("zero",)],
                 snap_id=3, created_ms=1, parent="s0", stats={"chunks": 4})
    return [m.to_json(), json.dumps({"format": "raftblock-backup", "version": 1}).encode(), b"[[[{}]]]"]


# =====================================================================================================
TARGETS: dict[str, Callable[[bytes], None]] = {
    "nbd": target_nbd,
    "iscsi": target_iscsi,
    "scsi": target_scsi,
    "frame": target_frame,
    "ops": target_ops,
    "raftmsg": target_raftmsg,
    "proto": target_proto,
    "segment": target_segment,
    "checkpoint": target_checkpoint,
    "recovery": target_recovery,
    "wal": target_wal,
    "chunk": target_chunk,
    "manifest": target_manifest,
}

_SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "nbd": _seeds_nbd, "iscsi": _seeds_iscsi, "scsi": _seeds_scsi, "frame": _seeds_frame, "ops": _seeds_ops,
    "raftmsg": _seeds_raftmsg, "proto": _seeds_proto, "segment": _seeds_segment, "checkpoint": _seeds_checkpoint,
    "recovery": _seeds_recovery, "wal": _seeds_wal, "chunk": _seeds_chunk, "manifest": _seeds_manifest,
}

# Targets whose main risk is an allocation sized by a length field: the atheris runner traces them.
TRACED = ("chunk", "checkpoint", "segment", "recovery", "wal")
# libFuzzer's -max_len per target (inputs longer than this are cut).
MAX_LEN = {"nbd": 1 << 16, "iscsi": 1 << 16, "scsi": 1 << 14, "frame": 1 << 17, "chunk": 1 << 16}


def seeds(target: str) -> list[bytes]:
    return _SEEDS[target]()


def corpus(target: str) -> list[bytes]:
    """The encoders' seeds and the committed corpus of `target` (what the Hypothesis properties mutate)."""
    files = sorted(p for p in (Path(__file__).resolve().parent / "corpus" / target).glob("*") if p.is_file())
    return seeds(target) + [p.read_bytes() for p in files if not p.name.startswith("seed-")]
