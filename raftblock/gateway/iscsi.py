"""iSCSI target codec, without I/O (h11 style): bytes in, events and bytes out (RFC 7143).

Owns the wire format and the per-connection state of an iSCSI target: PDU framing with optional CRC32C
header and data digests, the login phase (security negotiation with CHAP and mutual CHAP, operational
parameter negotiation), discovery (SendTargets), the CmdSN window, the collection of a command's write
data (immediate data, unsolicited Data-Out, R2T), the Data-In / SCSI Response of a completed command,
NOP, task management and logout framing. It never touches a socket, a clock or a volume; what a SCSI
command means is `scsi.py`'s job.

Rules:
1. One connection per session (MaxConnections=1, ErrorRecoveryLevel=0): the CmdSN window lives here.
   A non-immediate request outside [ExpCmdSN, MaxCmdSN] (serial arithmetic, RFC 1982) is silently ignored
   (RFC 7143 4.2.2.1); one ahead of ExpCmdSN waits in a bounded queue until the gap fills. MaxCmdSN
   closes as commands are outstanding, so an initiator can never have more than `queue_depth` in flight.
   An immediate command skips the window but counts against it: one that arrives while `queue_depth`
   commands are outstanding or collecting data gets a Reject (reason 0x06, too many immediate commands).
2. A command is handed out (`Command`) only when all its write data has arrived. The data it may carry
   is what the CDB asks for (`data_out_bytes`, from the SCSI layer). When the initiator's Expected Data
   Transfer Length differs, the command runs on min(EDTL, what the CDB asks) bytes and the residual
   (overflow: EDTL short of the CDB; underflow: EDTL beyond it) is reported in the response (RFC 7143
   11.4.5; FCP-4 9.4.2 choice a, what libiscsi 1.19's iSCSIResiduals expects); nothing beyond EDTL is
   solicited or used. Data-In is cut to the EDTL, with the residual.
3. Whatever cannot be framed (bad opcode in the login phase, a header digest error, a data segment larger
   than we declared, a data digest error) raises `ProtocolError` after a Reject PDU was queued where the
   RFC has one; the adapter then closes the connection (ERL 0: the initiator recovers the session). A
   Data-Out that breaks its task's sequence (wrong DataSN, offset or transfer tag, data beyond what was
   asked) gets a Reject and ends that task with CHECK CONDITION, ABORTED COMMAND (4Bh/00h DATA PHASE
   ERROR, 4Bh/05h DATA OFFSET ERROR); the session goes on. Nothing is executed for a command whose data
   did not arrive whole.
4. Every buffer is bounded: a data segment by our MaxRecvDataSegmentLength (8 KiB during login), a
   command's data by `max_transfer_bytes`, login and text key=value data by `TEXT_BYTES_MAX`, pending
   out-of-order commands by the window. A command's data buffer grows as its data arrives (unsolicited
   data within the first burst, solicited data within its R2T), never to a length a header only
   announces (EDTL, the CDB's transfer length).
5. Authentication: a target whose `chap` returns credentials refuses any login that does not complete
   CHAP (MD5, RFC 1994) in the security stage; mutual CHAP answers the initiator's challenge with the
   target secret. A challenge equal to ours (a reflection) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

# --- opcodes (RFC 7143 11.1.1) ----------------------------------------------------------------------
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK = 0x10
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_ASYNC = 0x32
OP_REJECT = 0x3F

# Reject reasons (11.17.1)
REJECT_DATA_DIGEST = 0x02
REJECT_PROTOCOL_ERROR = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE_COMMAND = 0x06  # too many immediate commands
REJECT_INVALID_PDU_FIELD = 0x09
REJECT_WAITING_FOR_LOGOUT = 0x0C

# Task management functions (11.5.1) and responses (11.6.1)
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8
TMF_RSP_COMPLETE = 0
TMF_RSP_NO_TASK = 1
TMF_RSP_NO_LUN = 2
TMF_RSP_NOT_SUPPORTED = 5
TMF_RSP_REJECTED = 255

# Login status (11.13.5)
LOGIN_OK = 0x0000
LOGIN_AUTH_FAILED = 0x0201
LOGIN_FORBIDDEN = 0x0202
LOGIN_NOT_FOUND = 0x0203
LOGIN_MISSING_PARAM = 0x0207
LOGIN_CANT_INCLUDE = 0x0208
LOGIN_UNSUPPORTED_VERSION = 0x0205
LOGIN_INVALID_REQUEST = 0x020B
LOGIN_TARGET_ERROR = 0x0300
LOGIN_OUT_OF_RESOURCES = 0x0302

# SCSI status and sense of the commands the codec itself ends (rule 3)
STATUS_CHECK_CONDITION = 0x02
SENSE_ABORTED_COMMAND = 0x0B
ASC_DATA_PHASE_ERROR = (0x4B, 0x00)
ASC_DATA_OFFSET_ERROR = (0x4B, 0x05)

RSVD_TAG = 0xFFFFFFFF
BHS_BYTES = 48
LOGIN_SEGMENT_BYTES_MAX = 8192  # what the target accepts before MaxRecvDataSegmentLength is negotiated
TEXT_BYTES_MAX = 64 << 10  # key=value data of one login stage or one text exchange (over continuations)
AHS_BYTES_MAX = 1020  # TotalAHSLength is one byte of 4-byte words
SERIAL_HALF = 1 << 31

_BHS_COMMON = struct.Struct(">BBBBB3s8sI")  # opcode, flags, b2, b3, ahslen, dsl, lun/isid, itt


class ProtocolError(Exception):
    """The initiator broke the protocol in a way that ends the connection (rule 3)."""


class Stage(IntEnum):
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(_crc32c.crc32c(data))


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982, 32 bits): a < b."""
    return a != b and ((a < b and b - a < SERIAL_HALF) or (a > b and a - b > SERIAL_HALF))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def _u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def pad4(n: int) -> int:
    return (n + 3) & ~3


# --- text keys (RFC 7143 6, 13) ---------------------------------------------------------------------
def parse_text(data: bytes) -> list[tuple[str, str]]:
    """key=value\\0 pairs, in order. Raises ValueError on a pair without '='."""
    out = []
    for part in data.split(b"\0"):
        if not part:
            continue
        key, sep, value = part.partition(b"=")
        if not sep:
            raise ValueError(f"text key without a value: {part[:64]!r}")
        out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return out


def encode_text(pairs: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


@dataclass(frozen=True)
class Chap:
    """CHAP credentials of a target: what the initiator must prove (user, secret), and for mutual CHAP what
    the target proves back (target_user, target_secret; empty: one-way)."""

    user: str
    secret: bytes
    target_user: str = ""
    target_secret: bytes = b""


@dataclass
class TargetCatalog:
    """What the login and discovery phases need to know (pure callbacks, answered from memory)."""

    target_names: Callable[[], Sequence[str]]  # IQNs this portal serves
    target_exists: Callable[[str], bool]
    chap: Callable[[str], Chap | None]  # per target IQN ("" = discovery sessions); None = no authentication
    portal_addresses: Callable[[], Sequence[str]]  # "host:port,TPGT" for SendTargets
    target_alias: Callable[[str], str] = lambda name: ""


@dataclass(frozen=True)
class Limits:
    max_recv_data_segment_bytes: int = 256 << 10  # what we declare (we receive)
    max_burst_bytes: int = 1 << 20
    first_burst_bytes: int = 256 << 10
    max_transfer_bytes: int = 32 << 20  # one command's data
    queue_depth: int = 128  # commands outstanding per session (MaxCmdSN - ExpCmdSN + 1)
    immediate_data: bool = True  # a small write is one PDU
    initial_r2t: bool = False  # a larger one streams its first burst without waiting for an R2T


@dataclass
class Params:
    """The negotiated operational parameters of one session/connection (RFC 7143 13)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_bytes: int = 8192  # the initiator's: how much we may send in one PDU
    max_burst_bytes: int = 262144
    first_burst_bytes: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1


# --- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoggedIn:
    """Login complete: full feature phase. `target` is "" for a discovery session."""

    session_type: str  # "Normal" | "Discovery"
    initiator: str
    target: str
    isid: bytes
    tsih: int


@dataclass
class Command:
    """A SCSI command whose write data (if any) has arrived whole; answer it with `complete`."""

    itt: int
    lun: int
    cdb: bytes
    edtl: int  # the initiator's Expected Data Transfer Length
    read: bool
    write: bool
    cmdsn: int
    immediate: bool
    data_out: bytes | bytearray | memoryview = b""
    # decided by the codec (rule 2): the write residual to report
    residual_overflow: int = 0
    residual_underflow: int = 0


@dataclass(frozen=True)
class TaskManagement:
    itt: int
    function: int
    lun: int
    referenced_itt: int
    ref_cmdsn: int


@dataclass(frozen=True)
class LogoutRequested:
    itt: int
    reason: int


@dataclass(frozen=True)
class Closed:
    reason: str


class NeedData:
    pass


NEED_DATA = NeedData()
Event = LoggedIn | Command | TaskManagement | LogoutRequested | Closed | NeedData


@dataclass
class _Pdu:
    bhs: bytes
    ahs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def itt(self) -> int:
        return int(struct.unpack_from(">I", self.bhs, 16)[0])

    def u32(self, off: int) -> int:
        return int(struct.unpack_from(">I", self.bhs, off)[0])


@dataclass
class _WriteTask:
    """A command collecting its write data (R2T, Data-Out)."""

    cmd: Command
    want: int  # bytes to collect (min(EDTL, what the CDB asks), rule 2)
    buf: bytearray  # what arrived so far, grown as it comes (rule 4); holes read as zeros
    size: int = 0  # the most it may hold: `want`, or the immediate and unsolicited data if more
    unsolicited_end: int = 0  # unsolicited Data-Out lies within [0, this): the first burst
    received: int = 0
    unsolicited_left: int = 0  # unsolicited Data-Out bytes still expected (InitialR2T=No)
    next_datasn: int = 0
    r2t_ttt: int = RSVD_TAG  # the outstanding R2T (MaxOutstandingR2T=1)
    r2t_offset: int = 0
    r2t_length: int = 0
    r2t_received: int = 0
    next_r2t_offset: int = 0
    r2tsn: int = 0
    lun_field: bytes = bytes(8)


class TargetConnection:
    """One iSCSI connection (= one session, rule 1), target side.

    Feed `receive_data`, drain `next_event` until NEED_DATA, send `data_to_send`. Answer `Command` with
    `complete`, `TaskManagement` with `tmf_response`, `LogoutRequested` with `logout_response`."""

    def __init__(
        self,
        catalog: TargetCatalog,
        *,
        data_out_bytes: Callable[[str, bytes], int],
        limits: Limits = Limits(),
        random_bytes: Callable[[int], bytes] = os.urandom,
        new_tsih: Callable[[], int] = lambda: 1,
    ) -> None:
        self._catalog = catalog
        self._data_out_bytes = data_out_bytes
        self.limits = limits
        self._random = random_bytes
        self._new_tsih = new_tsih
        self._buf = bytearray()
        self._pos = 0
        self._out: list[bytes | memoryview] = []
        self.params = Params()
        self._pending_params = Params()
        self.stage = Stage.SECURITY
        self.logged_in = False
        self.closed = False
        self.session_type = "Normal"
        self.initiator = ""
        self.target = ""
        self.isid = b""
        self.tsih = 0
        self._login_text = bytearray()
        self._login_first = True
        self._chap: Chap | None = None
        self._chap_state = 0  # 0 none, 1 AuthMethod=CHAP agreed, 2 challenge sent, 3 authenticated
        self._chap_id = 0
        self._chap_challenge = b""
        self._auth_required = False
        self._login_itt = 0
        self._tpgt_pending = True
        self._mrdsl_declared = False
        self._stat_sn = int.from_bytes(self._random(4), "big") & 0x7FFFFFFF
        self.exp_cmdsn = 0
        self.outstanding = 0  # commands handed out and not yet completed (MaxCmdSN window)
        self._queued: dict[int, _Pdu] = {}  # rule 1: CmdSN -> PDU waiting for the gap to fill
        self._writes: dict[int, _WriteTask] = {}  # ITT -> task collecting data
        self._ttt_next = 1
        self._ready: list[Event] = []
        self._text_in = bytearray()
        self._text_out = b""  # a long Text response being sent in pieces (continuation)
        self._text_ttt = RSVD_TAG
        self.tasks_itt: set[int] = set()  # ITTs of commands handed out and not completed
        self._failed_itts: dict[int, None] = {}  # writes ended by a Data-Out error: their late data is dropped
        self.data_errors: list[str] = []  # why (for the adapter's log); it clears the list

    # --- sequence numbers -------------------------------------------------------------------------
    @property
    def max_cmdsn(self) -> int:
        room = self.limits.queue_depth - self.outstanding - len(self._writes)
        return (self.exp_cmdsn + room - 1) & 0xFFFFFFFF

    def _next_statsn(self) -> int:
        sn = self._stat_sn
        self._stat_sn = (self._stat_sn + 1) & 0xFFFFFFFF
        return sn

    # --- input ------------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > (1 << 20):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def _read_pdu(self) -> _Pdu | None:
        avail = len(self._buf) - self._pos
        if avail < BHS_BYTES:
            return None
        p = self._pos
        ahs_bytes = self._buf[p + 4] * 4
        dsl = int.from_bytes(self._buf[p + 5 : p + 8], "big")
        hd = 4 if self.params.header_digest else 0
        dd = 4 if self.params.data_digest and dsl else 0
        limit = self.limits.max_recv_data_segment_bytes if self.logged_in else LOGIN_SEGMENT_BYTES_MAX
        if dsl > limit:
            bhs = bytes(self._buf[p : p + BHS_BYTES])
            self._reject(bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError(f"data segment of {dsl} bytes exceeds the declared maximum {limit}")
        total = BHS_BYTES + ahs_bytes + hd + pad4(dsl) + dd
        if avail < total:
            return None
        bhs = bytes(self._buf[p : p + BHS_BYTES])
        ahs = bytes(self._buf[p + BHS_BYTES : p + BHS_BYTES + ahs_bytes])
        q = p + BHS_BYTES + ahs_bytes
        if hd:
            got = int.from_bytes(self._buf[q : q + 4], "little")
            if got != crc32c(bhs + ahs):
                raise ProtocolError("header digest error")  # the header cannot be trusted: close (RFC 7143 7.8)
            q += 4
        data = bytes(self._buf[q : q + dsl])
        if dd:
            padded = self._buf[q : q + pad4(dsl)]
            got = int.from_bytes(self._buf[q + pad4(dsl) : q + pad4(dsl) + 4], "little")
            if got != crc32c(padded):
                self._pos += total
                self._reject(bhs, REJECT_DATA_DIGEST)
                raise ProtocolError("data digest error")
        self._pos += total
        return _Pdu(bhs, ahs, data)

    def next_event(self) -> Event:
        """The next event, or NEED_DATA. Raises ProtocolError (rule 3); the adapter sends what is queued
        and closes."""
        while True:
            if self._ready:
                return self._ready.pop(0)
            if self.closed:
                return NEED_DATA
            pdu = self._read_pdu()
            if pdu is None:
                return NEED_DATA
            if not self.logged_in:
                self._on_login_phase(pdu)
            else:
                self._on_full_feature(pdu)

    # --- output helpers ---------------------------------------------------------------------------
    def _emit(self, bhs: bytearray, data: bytes | memoryview = b"") -> None:
        dsl = len(data)
        bhs[5:8] = _u24(dsl)
        self._out.append(bytes(bhs))
        if self.params.header_digest:
            self._out.append(crc32c(bhs).to_bytes(4, "little"))
        if dsl:
            self._out.append(data)
            padding = pad4(dsl) - dsl
            if padding:
                self._out.append(bytes(padding))
            if self.params.data_digest:
                crc = _crc32c.crc32c(data)
                if padding:
                    crc = _crc32c.crc32c(bytes(padding), crc)
                self._out.append(int(crc).to_bytes(4, "little"))

    def _bhs(self, opcode: int, flags: int, itt: int) -> bytearray:
        b = bytearray(BHS_BYTES)
        b[0] = opcode
        b[1] = flags
        struct.pack_into(">I", b, 16, itt)
        return b

    def _sns(self, b: bytearray, statsn: int | None) -> None:
        if statsn is not None:
            struct.pack_into(">I", b, 24, statsn)
        struct.pack_into(">II", b, 28, self.exp_cmdsn, self.max_cmdsn)

    def _reject(self, bhs: bytes, reason: int) -> None:
        b = self._bhs(OP_REJECT, 0x80, RSVD_TAG)
        b[2] = reason
        self._sns(b, self._stat_sn)
        self._emit(b, bhs)

    # --- login phase (RFC 7143 6.3, 11.12) --------------------------------------------------------
    def _login_reject(self, itt: int, status: int, reason: str) -> None:
        b = self._bhs(OP_LOGIN_RSP, 0, itt)
        b[2], b[3] = 0, 0
        b[8:14] = self.isid.ljust(6, b"\0")[:6]
        struct.pack_into(">I", b, 24, self._next_statsn())
        struct.pack_into(">II", b, 28, self.exp_cmdsn, self.exp_cmdsn)
        b[36], b[37] = status >> 8, status & 0xFF
        self._emit(b)
        self.closed = True
        self._ready.append(Closed(f"login refused: {reason}"))

    def _on_login_phase(self, pdu: _Pdu) -> None:
        if pdu.opcode != OP_LOGIN_REQ:
            # Only login PDUs before the full feature phase (RFC 7143 6.3): answer with a login reject.
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, f"opcode 0x{pdu.opcode:02x} before login")
            raise ProtocolError(f"opcode 0x{pdu.opcode:02x} during login")
        bhs = pdu.bhs
        transit, cont = bool(bhs[1] & 0x80), bool(bhs[1] & 0x40)
        csg, nsg = (bhs[1] >> 2) & 3, bhs[1] & 3
        vmax, vmin = bhs[2], bhs[3]
        isid, tsih = bytes(bhs[8:14]), struct.unpack_from(">H", bhs, 14)[0]
        cmdsn = pdu.u32(24)
        if self._login_first:
            self._login_first = False
            self.isid = isid
            self.exp_cmdsn = cmdsn
            self._login_itt = pdu.itt
            if vmin > 0 or vmax < 0:
                self._login_reject(pdu.itt, LOGIN_UNSUPPORTED_VERSION, "version")
                return
            if tsih != 0:
                # Adding a connection to an existing session (MC/S): not offered (MaxConnections=1).
                self._login_reject(pdu.itt, 0x020A, "multiple connections per session are not supported")
                return
        elif isid != self.isid:
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, "ISID changed during login")
            return
        if transit and cont:
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, "T and C both set")
            return
        if csg == 2 or (transit and nsg not in (1, 3)) or (transit and nsg <= csg):
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, f"stage transition {csg}->{nsg}")
            return
        self._login_text += pdu.data
        if len(self._login_text) > TEXT_BYTES_MAX:
            self._login_reject(pdu.itt, LOGIN_OUT_OF_RESOURCES, "login text too long")
            return
        if cont:
            # More text follows: acknowledge with an empty response (RFC 7143 6.3 text continuation).
            self._login_response(pdu.itt, csg, 0, False, [])
            return
        try:
            keys = parse_text(bytes(self._login_text))
        except ValueError as e:
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, str(e))
            return
        self._login_text.clear()
        if csg != self.stage and not (self.stage == Stage.SECURITY and csg == Stage.OPERATIONAL):
            self._login_reject(pdu.itt, LOGIN_INVALID_REQUEST, f"stage {csg} after {int(self.stage)}")
            return
        if csg == Stage.OPERATIONAL and self.stage == Stage.SECURITY:
            # The initiator skipped security negotiation: only if nothing asks for authentication.
            if not self._identify(pdu.itt, keys):
                return
            if self._auth_required:
                self._login_reject(pdu.itt, LOGIN_AUTH_FAILED, "this target needs CHAP authentication")
                return
            self.stage = Stage.OPERATIONAL
        reply: list[tuple[str, str]] = []
        if csg == Stage.SECURITY:
            if not self._security(pdu.itt, keys, reply):
                return
            if transit and self._chap_state not in (0, 3):
                transit = False  # CHAP not finished: stay in this stage
            if transit and self._auth_required and self._chap_state != 3:
                self._login_reject(pdu.itt, LOGIN_AUTH_FAILED, "CHAP not completed")
                return
        else:
            if not self._operational(pdu.itt, keys, reply):
                return
        if transit:
            if nsg == Stage.FULL_FEATURE:
                if self.session_type == "Normal" and not self.target:
                    self._login_reject(pdu.itt, LOGIN_MISSING_PARAM, "TargetName missing")
                    return
                if csg == Stage.SECURITY:
                    # Going straight to full feature: our declarations must still reach the initiator.
                    self._declare(reply, set())
                self.tsih = self._new_tsih()
                self._login_response(pdu.itt, csg, nsg, True, reply)
                self.params = self._pending_params
                self.logged_in = True
                self.stage = Stage.FULL_FEATURE
                self._ready.append(LoggedIn(self.session_type, self.initiator, self.target, self.isid, self.tsih))
                return
            self._login_response(pdu.itt, csg, nsg, True, reply)
            self.stage = Stage(nsg)
            return
        self._login_response(pdu.itt, csg, 0, False, reply)

    def _login_response(self, itt: int, csg: int, nsg: int, transit: bool, keys: list[tuple[str, str]]) -> None:
        b = self._bhs(OP_LOGIN_RSP, (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0), itt)
        b[2], b[3] = 0, 0
        b[8:14] = self.isid
        struct.pack_into(">H", b, 14, self.tsih if transit and nsg == Stage.FULL_FEATURE else 0)
        struct.pack_into(">I", b, 24, self._next_statsn())
        struct.pack_into(">II", b, 28, self.exp_cmdsn, self.max_cmdsn)
        if self._tpgt_pending and self.session_type == "Normal" and self.target:
            # "MUST be returned in the first Login Response PDU" of a normal session (RFC 7143 13.9)
            keys = [*keys, ("TargetPortalGroupTag", "1")]
            self._tpgt_pending = False
        self._emit(b, encode_text(keys))

    def _identify(self, itt: int, keys: list[tuple[str, str]]) -> bool:
        """InitiatorName / SessionType / TargetName: required in the first login request (RFC 7143 13.12)."""
        d = dict(keys)
        if not self.initiator:
            if "InitiatorName" not in d:
                self._login_reject(itt, LOGIN_MISSING_PARAM, "InitiatorName missing")
                return False
            self.initiator = d["InitiatorName"]
            st = d.get("SessionType", "Normal")
            if st not in ("Normal", "Discovery"):
                self._login_reject(itt, LOGIN_INVALID_REQUEST, f"SessionType {st!r}")
                return False
            self.session_type = st
            if st == "Normal":
                name = d.get("TargetName", "")
                if not name:
                    self._login_reject(itt, LOGIN_MISSING_PARAM, "TargetName missing")
                    return False
                if not self._catalog.target_exists(name):
                    self._login_reject(itt, LOGIN_NOT_FOUND, f"no target {name}")
                    return False
                self.target = name
            self._chap = self._catalog.chap(self.target)
            self._auth_required = self._chap is not None
        return True

    def _security(self, itt: int, keys: list[tuple[str, str]], reply: list[tuple[str, str]]) -> bool:
        if not self._identify(itt, keys):
            return False
        d = dict(keys)
        if "AuthMethod" in d:
            offered = [m.strip() for m in d["AuthMethod"].split(",")]
            if self._auth_required:
                if "CHAP" not in offered:
                    self._login_reject(itt, LOGIN_AUTH_FAILED, "this target needs CHAP")
                    return False
                reply.append(("AuthMethod", "CHAP"))
                self._chap_state = 1
            else:
                reply.append(("AuthMethod", "None" if "None" in offered else "Reject"))
        if "CHAP_A" in d:
            if self._chap_state != 1:
                self._login_reject(itt, LOGIN_INVALID_REQUEST, "CHAP_A without AuthMethod=CHAP")
                return False
            if "5" not in [a.strip() for a in d["CHAP_A"].split(",")]:
                self._login_reject(itt, LOGIN_AUTH_FAILED, "only CHAP with MD5 (CHAP_A=5)")
                return False
            self._chap_id = self._random(1)[0]
            self._chap_challenge = self._random(16)
            reply += [("CHAP_A", "5"), ("CHAP_I", str(self._chap_id)), ("CHAP_C", "0x" + self._chap_challenge.hex())]
            self._chap_state = 2
        if "CHAP_R" in d or "CHAP_N" in d:
            if self._chap_state != 2 or self._chap is None:
                self._login_reject(itt, LOGIN_INVALID_REQUEST, "CHAP_R before a challenge")
                return False
            if not self._chap_verify(itt, d, reply):
                return False
        for k, v in keys:
            if k in ("InitiatorName", "SessionType", "TargetName", "AuthMethod", "InitiatorAlias") or k.startswith("CHAP_"):
                continue
            # Operational keys may come in the security stage too (RFC 7143 6.3): negotiate them.
            self._negotiate_key(k, v, reply)
        return True

    def _chap_verify(self, itt: int, d: dict[str, str], reply: list[tuple[str, str]]) -> bool:
        assert self._chap is not None
        chap = self._chap
        try:
            response = _chap_decode(d.get("CHAP_R", ""))
        except ValueError:
            self._login_reject(itt, LOGIN_AUTH_FAILED, "CHAP_R is not hex or base64")
            return False
        expect = hashlib.md5(bytes([self._chap_id]) + chap.secret + self._chap_challenge).digest()
        if d.get("CHAP_N", "") != chap.user or not hmac.compare_digest(response, expect):
            self._login_reject(itt, LOGIN_AUTH_FAILED, "CHAP authentication failed")
            return False
        if "CHAP_I" in d or "CHAP_C" in d:  # mutual CHAP: the initiator challenges us
            if not chap.target_secret:
                self._login_reject(itt, LOGIN_AUTH_FAILED, "mutual CHAP asked but no target secret is set")
                return False
            try:
                their_id = int(d.get("CHAP_I", ""), 0)
                their_c = _chap_decode(d.get("CHAP_C", ""))
            except ValueError:
                self._login_reject(itt, LOGIN_AUTH_FAILED, "bad CHAP_I or CHAP_C")
                return False
            if not 0 <= their_id <= 255 or not their_c or their_c == self._chap_challenge:
                self._login_reject(itt, LOGIN_AUTH_FAILED, "bad or reflected CHAP challenge")
                return False
            r = hashlib.md5(bytes([their_id]) + chap.target_secret + their_c).digest()
            reply += [("CHAP_N", chap.target_user), ("CHAP_R", "0x" + r.hex())]
        elif chap.target_secret:
            self._login_reject(itt, LOGIN_AUTH_FAILED, "this target needs mutual CHAP")
            return False
        self._chap_state = 3
        return True

    def _operational(self, itt: int, keys: list[tuple[str, str]], reply: list[tuple[str, str]]) -> bool:
        if not self._identify(itt, keys):
            return False
        seen = set()
        for k, v in keys:
            if k in ("InitiatorName", "SessionType", "TargetName", "InitiatorAlias"):
                continue
            if k == "AuthMethod" or k.startswith("CHAP_"):
                self._login_reject(itt, LOGIN_INVALID_REQUEST, f"{k} in the operational stage")
                return False
            seen.add(k)
            self._negotiate_key(k, v, reply)
        self._declare(reply, seen)
        return True

    def _declare(self, reply: list[tuple[str, str]], seen: set[str]) -> None:
        """Our declarative MaxRecvDataSegmentLength, once per login (RFC 7143 13.12)."""
        if not self._mrdsl_declared and "MaxRecvDataSegmentLength" not in dict(reply):
            reply.append(("MaxRecvDataSegmentLength", str(self.limits.max_recv_data_segment_bytes)))
        self._mrdsl_declared = True

    def _negotiate_key(self, k: str, v: str, reply: list[tuple[str, str]]) -> None:
        p = self._pending_params
        lim = self.limits
        discovery = self.session_type == "Discovery"

        def num(lo: int, hi: int) -> int | None:
            try:
                n = int(v, 0)
            except ValueError:
                return None
            return n if lo <= n <= hi else None

        def yes_no() -> bool | None:
            return {"Yes": True, "No": False}.get(v)

        if k in ("HeaderDigest", "DataDigest"):
            offered = [x.strip() for x in v.split(",")]
            choice = next((x for x in offered if x in ("CRC32C", "None")), "Reject")
            reply.append((k, choice))
            if choice != "Reject":
                setattr(p, "header_digest" if k == "HeaderDigest" else "data_digest", choice == "CRC32C")
        elif k == "MaxRecvDataSegmentLength":
            n = num(512, (1 << 24) - 1)
            if n is None:
                reply.append((k, "Reject"))
            else:
                p.max_recv_data_segment_bytes = n
                if not self._mrdsl_declared:
                    reply.append((k, str(lim.max_recv_data_segment_bytes)))
                    self._mrdsl_declared = True
        elif discovery and k in ("MaxBurstLength", "FirstBurstLength", "ImmediateData", "InitialR2T",
                                 "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "MaxConnections"):
            reply.append((k, "Irrelevant"))
        elif k == "MaxBurstLength":
            n = num(512, (1 << 24) - 1)
            if n is None:
                reply.append((k, "Reject"))
            else:
                p.max_burst_bytes = min(n, lim.max_burst_bytes)
                reply.append((k, str(p.max_burst_bytes)))
        elif k == "FirstBurstLength":
            n = num(512, (1 << 24) - 1)
            if n is None:
                reply.append((k, "Reject"))
            else:
                p.first_burst_bytes = min(n, lim.first_burst_bytes)
                reply.append((k, str(p.first_burst_bytes)))
        elif k == "ImmediateData":
            b = yes_no()
            if b is None:
                reply.append((k, "Reject"))
            else:
                p.immediate_data = b and lim.immediate_data
                reply.append((k, "Yes" if p.immediate_data else "No"))
        elif k == "InitialR2T":
            b = yes_no()
            if b is None:
                reply.append((k, "Reject"))
            else:
                p.initial_r2t = b or lim.initial_r2t
                reply.append((k, "Yes" if p.initial_r2t else "No"))
        elif k in ("DataPDUInOrder", "DataSequenceInOrder"):
            b = yes_no()
            # We accept data in any order within a burst (offsets are checked); sequences stay in order.
            reply.append((k, "Reject" if b is None else ("Yes" if b else "No")))
        elif k == "MaxOutstandingR2T":
            n = num(1, 65535)
            reply.append((k, "Reject" if n is None else "1"))
        elif k == "ErrorRecoveryLevel":
            n = num(0, 2)
            reply.append((k, "Reject" if n is None else "0"))
        elif k == "MaxConnections":
            n = num(1, 65535)
            reply.append((k, "Reject" if n is None else "1"))
        elif k == "DefaultTime2Wait":
            n = num(0, 3600)
            if n is None:
                reply.append((k, "Reject"))
            else:
                p.default_time2wait = max(n, 2)
                reply.append((k, str(p.default_time2wait)))
        elif k == "DefaultTime2Retain":
            n = num(0, 3600)
            reply.append((k, "Reject" if n is None else "0"))  # ERL 0: nothing is retained
            p.default_time2retain = 0
        elif k in ("IFMarker", "OFMarker"):
            reply.append((k, "No"))
        elif k in ("OFMarkInt", "IFMarkInt"):
            reply.append((k, "Irrelevant"))
        elif k in ("TargetAlias", "TargetAddress", "TargetPortalGroupTag"):
            reply.append((k, "Reject"))  # target-declared keys: an initiator may not send them
        elif k.startswith("X-") or k.startswith("X#"):
            reply.append((k, "NotUnderstood"))
        else:
            reply.append((k, "NotUnderstood"))

    # --- full feature phase ------------------------------------------------------------------------
    def _check_cmdsn(self, pdu: _Pdu) -> bool:
        """Rule 1: True if this non-immediate request is next in order (ExpCmdSN advances); queue or drop
        otherwise."""
        cmdsn = pdu.u32(24)
        if pdu.immediate:
            return True
        if cmdsn == self.exp_cmdsn:
            self.exp_cmdsn = (self.exp_cmdsn + 1) & 0xFFFFFFFF
            return True
        if sn_lt(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn) and len(self._queued) < self.limits.queue_depth:
            self._queued[cmdsn] = pdu  # a gap: wait for it
        return False  # outside the window or a duplicate: silently ignored

    def _drain_queued(self) -> None:
        while self.exp_cmdsn in self._queued:
            pdu = self._queued.pop(self.exp_cmdsn)
            self.exp_cmdsn = (self.exp_cmdsn + 1) & 0xFFFFFFFF
            self._dispatch(pdu)

    def _on_full_feature(self, pdu: _Pdu) -> None:
        op = pdu.opcode
        if op == OP_DATA_OUT:
            self._on_data_out(pdu)
            return
        if op == OP_SNACK:
            self._reject(pdu.bhs, REJECT_NOT_SUPPORTED)  # ERL 0
            return
        if op not in (OP_NOP_OUT, OP_SCSI_CMD, OP_TMF_REQ, OP_TEXT_REQ, OP_LOGOUT_REQ):
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError(f"opcode 0x{op:02x} in the full feature phase")
        if op == OP_NOP_OUT and pdu.itt == RSVD_TAG:
            # A ping answering our NOP-In (or one that wants no answer): carries CmdSN but does not advance it.
            return
        if self.session_type == "Discovery" and op in (OP_SCSI_CMD, OP_TMF_REQ):
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError("SCSI command in a discovery session")
        if op == OP_SCSI_CMD and pdu.immediate and self.outstanding + len(self._writes) >= self.limits.queue_depth:
            self._reject(pdu.bhs, REJECT_IMMEDIATE_COMMAND)  # rule 1: immediate commands count against the window
            return
        if not self._check_cmdsn(pdu):
            return
        self._dispatch(pdu)
        self._drain_queued()

    def _dispatch(self, pdu: _Pdu) -> None:
        op = pdu.opcode
        if op == OP_SCSI_CMD:
            self._on_command(pdu)
        elif op == OP_NOP_OUT:
            b = self._bhs(OP_NOP_IN, 0x80, pdu.itt)
            b[8:16] = pdu.bhs[8:16]
            struct.pack_into(">I", b, 20, RSVD_TAG)
            self._sns(b, self._next_statsn())
            self._emit(b, pdu.data[: self.params.max_recv_data_segment_bytes])
        elif op == OP_TMF_REQ:
            fn = pdu.flags & 0x7F
            lun = _lun_of(pdu.bhs)
            self._ready.append(TaskManagement(pdu.itt, fn, lun, pdu.u32(20), pdu.u32(32)))
        elif op == OP_TEXT_REQ:
            self._on_text(pdu)
        elif op == OP_LOGOUT_REQ:
            self._ready.append(LogoutRequested(pdu.itt, pdu.flags & 0x7F))

    def _on_text(self, pdu: _Pdu) -> None:
        ttt = pdu.u32(20)
        cont = bool(pdu.flags & 0x40)
        if ttt != RSVD_TAG and ttt == self._text_ttt and self._text_out:
            self._send_text_piece(pdu.itt)
            return
        self._text_in += pdu.data
        if len(self._text_in) > TEXT_BYTES_MAX:
            self._text_in.clear()
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError("text request too long")
        if cont:
            b = self._bhs(OP_TEXT_RSP, 0, pdu.itt)
            self._text_ttt = self._alloc_ttt()
            struct.pack_into(">I", b, 20, self._text_ttt)
            self._sns(b, self._next_statsn())
            self._emit(b)
            return
        try:
            keys = parse_text(bytes(self._text_in))
        except ValueError:
            self._text_in.clear()
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError("malformed text request") from None
        self._text_in.clear()
        reply: list[tuple[str, str]] = []
        for k, v in keys:
            if k == "SendTargets":
                if v == "All" and self.session_type == "Discovery":
                    names = list(self._catalog.target_names())
                elif v == "" or (v == "All" and self.session_type == "Normal"):
                    names = [self.target] if self.target else []
                elif self._catalog.target_exists(v):
                    names = [v]
                else:
                    names = []
                for name in names:
                    reply.append(("TargetName", name))
                    reply += [("TargetAddress", a) for a in self._catalog.portal_addresses()]
            else:
                reply.append((k, "NotUnderstood"))
        self._text_out = encode_text(reply)
        self._text_ttt = RSVD_TAG
        self._send_text_piece(pdu.itt)

    def _send_text_piece(self, itt: int) -> None:
        n = self.params.max_recv_data_segment_bytes
        piece, self._text_out = self._text_out[:n], self._text_out[n:]
        more = bool(self._text_out)
        b = self._bhs(OP_TEXT_RSP, 0x40 if more else 0x80, itt)
        if more:
            self._text_ttt = self._alloc_ttt()
        else:
            self._text_ttt = RSVD_TAG
        struct.pack_into(">I", b, 20, self._text_ttt)
        self._sns(b, self._next_statsn())
        self._emit(b, piece)

    def _alloc_ttt(self) -> int:
        t = self._ttt_next
        self._ttt_next = (self._ttt_next + 1) & 0x7FFFFFFF or 1
        return t

    # --- SCSI commands and their data ---------------------------------------------------------------
    def _on_command(self, pdu: _Pdu) -> None:
        bhs = pdu.bhs
        flags = pdu.flags
        read, write = bool(flags & 0x40), bool(flags & 0x20)
        edtl = pdu.u32(20)
        cdb = bytes(bhs[32:48])
        if pdu.ahs:  # extended CDB (AHS type 1): the rest of a CDB longer than 16 bytes
            ahs_len, ahs_type = struct.unpack_from(">HB", pdu.ahs, 0)
            if ahs_type == 1 and 4 + ahs_len - 1 <= len(pdu.ahs):
                cdb += pdu.ahs[4 : 4 + ahs_len - 1]
        cmd = Command(pdu.itt, _lun_of(bhs), cdb, edtl, read, write, pdu.u32(24), pdu.immediate)
        self._failed_itts.pop(pdu.itt, None)
        if pdu.itt in self._writes or pdu.itt in self.tasks_itt:
            self._reject(bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError(f"task tag 0x{pdu.itt:08x} already in use")
        if edtl > self.limits.max_transfer_bytes:
            edtl = cmd.edtl = self.limits.max_transfer_bytes + 1  # refused below; never allocated
        imm = pdu.data
        if imm and (not write or not self.params.immediate_data or len(imm) > min(edtl, self.params.first_burst_bytes)):
            self._reject(bhs, REJECT_PROTOCOL_ERROR)
            raise ProtocolError("immediate data not allowed or longer than the first burst")
        if not write:
            if edtl and not read:
                cmd.read = True  # a command with a buffer but no direction: treat the buffer as Data-In
            self._handout(cmd)
            return
        need = self._data_out_bytes(self.target, cdb)
        if need > self.limits.max_transfer_bytes:
            need = 0  # the SCSI layer answers the oversized transfer itself (from the CDB)
        want = min(edtl, need)
        if edtl < need:
            cmd.residual_overflow = need - edtl
        elif edtl > need:
            cmd.residual_underflow = edtl - need
        unsolicited = 0 if self.params.initial_r2t else min(edtl, self.params.first_burst_bytes) - len(imm)
        # What we gather: immediate + unsolicited data always (they are on the way), solicited up to `want`.
        unsolicited = max(unsolicited, 0)
        gather = max(want, len(imm) + unsolicited)
        wt = _WriteTask(cmd, want, bytearray(imm), size=gather, unsolicited_end=len(imm) + unsolicited,
                        lun_field=bytes(bhs[8:16]))
        wt.unsolicited_left = unsolicited
        wt.received = len(imm)
        wt.next_r2t_offset = len(imm) + unsolicited
        self._writes[pdu.itt] = wt
        self._advance_write(wt)

    def _advance_write(self, wt: _WriteTask) -> None:
        if wt.unsolicited_left > 0 or wt.r2t_ttt != RSVD_TAG:
            return
        if wt.next_r2t_offset < wt.want:
            length = min(wt.want - wt.next_r2t_offset, self.params.max_burst_bytes)
            wt.r2t_ttt = self._alloc_ttt()
            wt.r2t_offset, wt.r2t_length, wt.r2t_received = wt.next_r2t_offset, length, 0
            wt.next_r2t_offset += length
            wt.next_datasn = 0
            b = self._bhs(OP_R2T, 0x80, wt.cmd.itt)
            b[8:16] = wt.lun_field
            struct.pack_into(">I", b, 20, wt.r2t_ttt)
            self._sns(b, self._stat_sn)
            struct.pack_into(">III", b, 36, wt.r2tsn, wt.r2t_offset, length)
            wt.r2tsn += 1
            self._emit(b)
            return
        del self._writes[wt.cmd.itt]
        cmd = wt.cmd
        if len(wt.buf) < wt.want:  # data that never came (offsets repeated): zeros, as a hole reads
            wt.buf += bytes(wt.want - len(wt.buf))
        # no copy: the collected buffer is the command's (a view when unsolicited data ran past what it asks)
        cmd.data_out = wt.buf if wt.want == len(wt.buf) else memoryview(wt.buf)[: wt.want]
        self._handout(cmd)

    def _on_data_out(self, pdu: _Pdu) -> None:
        wt = self._writes.get(pdu.itt)
        if wt is None:
            # Data for a command already answered, failed or aborted: dropped. For no task at all: Reject.
            if pdu.itt not in self.tasks_itt and pdu.itt not in self._failed_itts:
                self._reject(pdu.bhs, REJECT_INVALID_PDU_FIELD)
            return
        ttt, datasn, offset = pdu.u32(20), pdu.u32(36), pdu.u32(40)
        n = len(pdu.data)
        final = bool(pdu.flags & 0x80)
        if datasn != wt.next_datasn:
            self._fail_write(wt, pdu, ASC_DATA_PHASE_ERROR, f"DataSN {datasn}, expected {wt.next_datasn}")
            return
        if offset + n > wt.size:
            self._fail_write(wt, pdu, ASC_DATA_OFFSET_ERROR, "data beyond the expected transfer length")
            return
        if ttt == RSVD_TAG:  # unsolicited (InitialR2T=No), DataSN counting from 0
            if n > wt.unsolicited_left or offset + n > wt.unsolicited_end:
                self._fail_write(wt, pdu, ASC_DATA_OFFSET_ERROR, "unsolicited data beyond the first burst")
                return
            wt.unsolicited_left -= n
            wt.next_datasn += 1
            if final or wt.unsolicited_left == 0:
                if wt.unsolicited_left:  # ended early: R2T the rest from here
                    wt.next_r2t_offset = offset + n
                wt.unsolicited_left = 0
                wt.next_datasn = 0
        else:  # solicited by our one outstanding R2T, DataSN counting from 0
            if ttt != wt.r2t_ttt:
                self._fail_write(wt, pdu, ASC_DATA_PHASE_ERROR, f"target transfer tag 0x{ttt:08x} not outstanding")
                return
            if offset < wt.r2t_offset or offset + n > wt.r2t_offset + wt.r2t_length:
                self._fail_write(wt, pdu, ASC_DATA_OFFSET_ERROR, "Data-Out outside the solicited range")
                return
            wt.r2t_received += n
            wt.next_datasn += 1
            if final:
                if wt.r2t_received != wt.r2t_length:
                    self._fail_write(wt, pdu, ASC_DATA_PHASE_ERROR, "R2T burst ended short")
                    return
                wt.r2t_ttt = RSVD_TAG
                wt.next_datasn = 0
        if offset + n > len(wt.buf):
            wt.buf += bytes(offset + n - len(wt.buf))
        wt.buf[offset : offset + n] = pdu.data
        wt.received += n
        self._advance_write(wt)

    def _fail_write(self, wt: _WriteTask, pdu: _Pdu, asc: tuple[int, int], why: str) -> None:
        """Rule 3: a Data-Out out of sequence: Reject it, end its command with CHECK CONDITION, ABORTED
        COMMAND (RFC 7143 11.4.7.2) without running it; later Data-Out of that task is dropped."""
        self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
        del self._writes[wt.cmd.itt]
        self._remember_failed(wt.cmd.itt)
        self.data_errors.append(why)
        self._handout_done(wt.cmd)
        sense = bytearray(18)
        sense[0], sense[2], sense[7], sense[12], sense[13] = 0x70, SENSE_ABORTED_COMMAND, 10, asc[0], asc[1]
        self.complete(wt.cmd, STATUS_CHECK_CONDITION, b"", bytes(sense))

    def _handout_done(self, cmd: Command) -> None:
        """Count a command that is answered by the codec itself as outstanding, so `complete` balances."""
        self.outstanding += 1
        self.tasks_itt.add(cmd.itt)

    def _handout(self, cmd: Command) -> None:
        self.outstanding += 1
        self.tasks_itt.add(cmd.itt)
        self._ready.append(cmd)

    def complete(self, cmd: Command, status: int, data: bytes | bytearray | memoryview = b"",
                 sense: bytes = b"", *, send: bool = True) -> None:
        """Answer `cmd`: Data-In PDUs (cut to EDTL and to the initiator's segment size, rule 2) and the
        status. `send=False` frees the command's slot without an answer (an aborted task)."""
        self.outstanding -= 1
        self.tasks_itt.discard(cmd.itt)
        if not send or self.closed:
            return
        over = under = 0
        if cmd.write:
            over, under = cmd.residual_overflow, cmd.residual_underflow
            data = b""
        elif cmd.read:
            if len(data) > cmd.edtl:
                over = len(data) - cmd.edtl
                data = memoryview(data)[: cmd.edtl]
            elif len(data) < cmd.edtl:
                under = cmd.edtl - len(data)
        else:
            data = b""
        rflags = (0x04 if over else 0) | (0x02 if under else 0)
        residual = over or under
        collapse = status == 0 and not sense and len(data) > 0
        if data:
            mv = memoryview(data)
            seg = self.params.max_recv_data_segment_bytes
            burst = self.params.max_burst_bytes
            datasn = 0
            off = 0
            total = len(mv)
            while off < total:
                n = min(seg, total - off, burst - off % burst)
                last = off + n == total
                end_of_burst = last or (off + n) % burst == 0
                f = 0x80 if end_of_burst else 0
                if last and collapse:
                    f |= 0x01 | rflags
                b = self._bhs(OP_DATA_IN, f, cmd.itt)
                struct.pack_into(">I", b, 20, RSVD_TAG)
                if last and collapse:
                    b[3] = status
                    struct.pack_into(">I", b, 24, self._next_statsn())
                    struct.pack_into(">I", b, 44, residual)
                struct.pack_into(">II", b, 28, self.exp_cmdsn, self.max_cmdsn)
                struct.pack_into(">II", b, 36, datasn, off)
                self._emit(b, mv[off : off + n])
                datasn += 1
                off += n
            if collapse:
                return
            exp_datasn = datasn
        else:
            exp_datasn = 0
        b = self._bhs(OP_SCSI_RSP, 0x80 | rflags, cmd.itt)
        b[2] = 0  # command completed at target
        b[3] = status
        self._sns(b, self._next_statsn())
        struct.pack_into(">I", b, 36, exp_datasn)
        struct.pack_into(">I", b, 44, residual)
        self._emit(b, struct.pack(">H", len(sense)) + sense if sense else b"")

    def forget_write(self, itt: int) -> bool:
        """ABORT TASK of a command still collecting its data: drop it (and its late Data-Out). True if there
        was one."""
        if self._writes.pop(itt, None) is None:
            return False
        self._remember_failed(itt)
        return True

    def _remember_failed(self, itt: int) -> None:
        self._failed_itts[itt] = None
        while len(self._failed_itts) > self.limits.queue_depth:  # rule 4: bounded
            del self._failed_itts[next(iter(self._failed_itts))]

    def forget_all_writes(self) -> None:
        for itt in list(self._writes):
            self.forget_write(itt)

    def tmf_response(self, itt: int, response: int) -> None:
        b = self._bhs(OP_TMF_RSP, 0x80, itt)
        b[2] = response
        self._sns(b, self._next_statsn())
        self._emit(b)

    def logout_response(self, itt: int, response: int = 0) -> None:
        b = self._bhs(OP_LOGOUT_RSP, 0x80, itt)
        b[2] = response
        self._sns(b, self._next_statsn())
        struct.pack_into(">HH", b, 40, 0 if response == 0 else 2, 0)
        self._emit(b)
        self.closed = True

    def nop_in(self) -> None:
        """A target ping (keep-alive); the initiator answers with a NOP-Out we ignore."""
        b = self._bhs(OP_NOP_IN, 0x80, RSVD_TAG)
        struct.pack_into(">I", b, 20, self._alloc_ttt())
        self._sns(b, self._stat_sn)
        self._emit(b)


def _lun_of(bhs: bytes) -> int:
    """The LUN in SAM-2 single level format (peripheral device or flat addressing)."""
    first = bhs[8]
    if first >> 6 == 0:
        return int(bhs[9])
    if first >> 6 == 1:
        return ((first & 0x3F) << 8) | bhs[9]
    return 0xFFFF  # no such LUN


def _chap_decode(value: str) -> bytes:
    if value[:2] in ("0x", "0X"):
        return bytes.fromhex(value[2:])
    if value[:2] in ("0b", "0B"):
        return base64.b64decode(value[2:], validate=True)
    raise ValueError("CHAP value must be 0x (hex) or 0b (base64)")
