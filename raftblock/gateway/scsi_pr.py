"""Persistent reservations (SPC-4 5.7, 6.15, 6.16) as a pure state machine.

Owns the persistent-reservation state of one logical unit (registrations, the reservation, the
PRgeneration counter), its serialised form (JSON, kept by the gateway's PrStore so that every gateway
and every restart sees the same state), the PERSISTENT RESERVE OUT service actions applied to it, the
PERSISTENT RESERVE IN parameter data read from it, and the access check other commands go through.
It never touches a store, a clock, a session or a volume: scsi.py loads, applies, stores and delivers.

Also owns `Sense`, the CHECK CONDITION description both this module and scsi.py report with (scsi.py
imports this module, never the reverse).

Rules:
1. A registration belongs to one I_T nexus, named by (initiator port name, target port name)
   (`PrNexus`). SPEC_I_PT and ALL_TG_PT are not supported (REPORT CAPABILITIES says SIP_C=0, ATP_C=0):
   a parameter list setting them is refused with INVALID FIELD IN PARAMETER LIST. REGISTER AND MOVE
   is not supported (INVALID FIELD IN CDB on the service action). PREEMPT AND ABORT acts as PREEMPT:
   aborting the preempted nexuses' tasks is the transport's business.
2. `apply_out` never mutates its input: it returns the new state (the same object when nothing
   changed), the outcome (GOOD, RESERVATION CONFLICT or a `Sense`) and the unit attentions to
   establish (SPC-4 5.7.11, 5.7.12): RESERVATIONS RELEASED, RESERVATIONS PREEMPTED, REGISTRATIONS
   PREEMPTED, each for the initiator port of a registered I_T nexus other than the requester.
3. PRgeneration (32 bits, wrapping) counts every successful REGISTER, REGISTER AND IGNORE EXISTING
   KEY, CLEAR, PREEMPT and PREEMPT AND ABORT; never RESERVE or RELEASE (SPC-4 6.16.2).
4. Access (`access_allowed`, SPC-4 5.7.1 / SBC-3 4.17 tables) knows two command classes: "read"
   (conflicts only under Exclusive Access types) and "write" (conflicts under every type). The
   reservation holder, and every registrant of an all-registrants reservation, is never refused;
   registrants of a registrants-only reservation may read and write; others see the WE / EA rules.
5. The state is bounded: at most `registrations_max` registrations; one more is refused with
   INSUFFICIENT REGISTRATION RESOURCES (55h/04h). Keys are 64 bits.
6. APTPL is accepted and reported (PTPL_C=1): the state is kept in the PrStore, which survives any
   gateway restart, whatever the initiator asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

# --- SPC-4 sense keys and the additional sense codes both modules use ---------------------------------
NO_SENSE = 0x00
NOT_READY = 0x02
MEDIUM_ERROR = 0x03
HARDWARE_ERROR = 0x04
ILLEGAL_REQUEST = 0x05
UNIT_ATTENTION = 0x06
DATA_PROTECT = 0x07
ABORTED_COMMAND = 0x0B
MISCOMPARE = 0x0E

ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (0x26, 0x04)
ASC_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
ASC_RESERVATIONS_RELEASED = (0x2A, 0x04)
ASC_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
ASC_INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)

# --- PERSISTENT RESERVE OUT / IN (SPC-4 6.15, 6.16) ------------------------------------------------
SA_REGISTER = 0x00
SA_RESERVE = 0x01
SA_RELEASE = 0x02
SA_CLEAR = 0x03
SA_PREEMPT = 0x04
SA_PREEMPT_AND_ABORT = 0x05
SA_REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
SA_REGISTER_AND_MOVE = 0x07
OUT_SERVICE_ACTIONS = (SA_REGISTER, SA_RESERVE, SA_RELEASE, SA_CLEAR, SA_PREEMPT, SA_PREEMPT_AND_ABORT,
                       SA_REGISTER_AND_IGNORE_EXISTING_KEY)

SA_READ_KEYS = 0x00
SA_READ_RESERVATION = 0x01
SA_REPORT_CAPABILITIES = 0x02
SA_READ_FULL_STATUS = 0x03
IN_SERVICE_ACTIONS = (SA_READ_KEYS, SA_READ_RESERVATION, SA_REPORT_CAPABILITIES, SA_READ_FULL_STATUS)

WRITE_EXCLUSIVE = 0x1
EXCLUSIVE_ACCESS = 0x3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8
TYPES = (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
         EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, WRITE_EXCLUSIVE_ALL_REGISTRANTS, EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
ALL_REGISTRANTS_TYPES = (WRITE_EXCLUSIVE_ALL_REGISTRANTS, EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
REGISTRANTS_ONLY_TYPES = (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
SCOPE_LU = 0x0

BASIC_PARAMETER_LIST_BYTES = 24
KEY_MAX = (1 << 64) - 1
GENERATION_MASK = 0xFFFFFFFF
REGISTRATIONS_MAX = 256
ISCSI_PROTOCOL_ID = 0x5
STATE_FORMAT = 1

PrNexus = tuple[str, str]  # (initiator port name, target port name)


@dataclass(frozen=True)
class Sense:
    """One CHECK CONDITION: sense key, ASC/ASCQ, optionally the INFORMATION field and the field pointer
    (SPC-4 4.5.2.4.2: `field` is the byte, `bit` the left-most bit of the field or None for the whole
    byte, `in_cdb` says whether the byte is in the CDB or in the parameter list)."""

    key: int
    asc: int
    ascq: int
    information: int | None = None
    field: int | None = None
    bit: int | None = None
    in_cdb: bool = True

    @classmethod
    def of(cls, key: int, code: tuple[int, int], **kw: int | bool | None) -> Sense:
        return cls(key, code[0], code[1], **kw)  # type: ignore[arg-type]

    def _sks(self) -> bytes:
        if self.field is None:
            return b"\x00\x00\x00"
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x07)
        return bytes((b0,)) + (self.field & 0xFFFF).to_bytes(2, "big")

    def encode(self) -> bytes:
        """Fixed-format sense data (SPC-4 4.5.3), 18 bytes."""
        b = bytearray(18)
        b[0] = 0x70 | (0x80 if self.information is not None else 0)
        b[2] = self.key & 0x0F
        if self.information is not None:
            b[3:7] = (self.information & 0xFFFFFFFF).to_bytes(4, "big")
        b[7] = 10
        b[12] = self.asc
        b[13] = self.ascq
        b[15:18] = self._sks()
        return bytes(b)

    def encode_descriptor(self) -> bytes:
        """Descriptor-format sense data (SPC-4 4.5.2), for REQUEST SENSE with DESC=1."""
        descs = b""
        if self.information is not None:
            descs += bytes((0x00, 0x0A, 0x80, 0x00)) + self.information.to_bytes(8, "big")
        if self.field is not None:
            descs += bytes((0x02, 0x06, 0x00, 0x00)) + self._sks() + b"\x00"
        return bytes((0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, len(descs))) + descs


def _invalid_cdb(byte: int, bit: int | None = None) -> Sense:
    return Sense.of(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field=byte, bit=bit)


def _invalid_param(byte: int, bit: int | None = None) -> Sense:
    return Sense.of(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, field=byte, bit=bit, in_cdb=False)


# --- state ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    nexus: PrNexus
    key: int
    relative_port_id: int = 1


@dataclass(frozen=True)
class Reservation:
    holder: PrNexus  # for an all-registrants type: the nexus that reserved (every registrant holds it)
    type: int


@dataclass(frozen=True)
class PrState:
    generation: int = 0
    registrations: tuple[Registration, ...] = ()
    reservation: Reservation | None = None
    aptpl: bool = False

    def registration(self, who: PrNexus) -> Registration | None:
        for r in self.registrations:
            if r.nexus == who:
                return r
        return None

    def is_holder(self, who: PrNexus) -> bool:
        res = self.reservation
        if res is None:
            return False
        if res.type in ALL_REGISTRANTS_TYPES:
            return self.registration(who) is not None
        return res.holder == who

    def holder_key(self) -> int:
        """The RESERVATION KEY READ RESERVATION reports: 0 for all-registrants types (SPC-4 6.15.3.2)."""
        res = self.reservation
        if res is None or res.type in ALL_REGISTRANTS_TYPES:
            return 0
        reg = self.registration(res.holder)
        return reg.key if reg is not None else 0

    def encode(self) -> bytes:
        res = self.reservation
        doc = {
            "format": STATE_FORMAT,
            "generation": self.generation,
            "aptpl": self.aptpl,
            "registrations": [
                {"initiator": r.nexus[0], "target_port": r.nexus[1], "key": r.key, "rtpi": r.relative_port_id}
                for r in self.registrations
            ],
            "reservation": None if res is None else
            {"initiator": res.holder[0], "target_port": res.holder[1], "type": res.type},
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, blob: bytes) -> PrState:
        """The state `encode` wrote; an empty blob is the initial state. Raises ValueError on anything else."""
        if not blob:
            return cls()
        try:
            doc = json.loads(blob)
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown PR state format {doc.get('format')!r}")
            regs = tuple(
                Registration((_str(r["initiator"]), _str(r["target_port"])), _key(r["key"]), _int(r["rtpi"], 0xFFFF))
                for r in doc["registrations"]
            )
            rd = doc["reservation"]
            res = None
            if rd is not None:
                rtype = _int(rd["type"], 0xF)
                if rtype not in TYPES:
                    raise ValueError(f"bad reservation type {rtype}")
                res = Reservation((_str(rd["initiator"]), _str(rd["target_port"])), rtype)
            return cls(_int(doc["generation"], GENERATION_MASK), regs, res, bool(doc["aptpl"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed PR state: {e}") from e


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _int(v: object, max_value: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= max_value:
        raise ValueError(f"expected an integer in [0, {max_value}], got {v!r}")
    return v


def _key(v: object) -> int:
    return _int(v, KEY_MAX)


# --- PERSISTENT RESERVE OUT ---------------------------------------------------------------------------
UnitAttention = tuple[PrNexus, int, int]  # (I_T nexus, ASC, ASCQ)


@dataclass(frozen=True)
class PrOutcome:
    state: PrState
    conflict: bool = False  # RESERVATION CONFLICT
    sense: Sense | None = None  # CHECK CONDITION
    unit_attentions: tuple[UnitAttention, ...] = field(default_factory=tuple)

    @property
    def good(self) -> bool:
        return not self.conflict and self.sense is None


def _uas(nexuses: list[PrNexus] | tuple[PrNexus, ...], code: tuple[int, int]) -> tuple[UnitAttention, ...]:
    seen: list[PrNexus] = []
    for n in nexuses:
        if n not in seen:
            seen.append(n)
    return tuple((n, code[0], code[1]) for n in seen)


def _bump(state: PrState, **changes: object) -> PrState:
    return replace(state, generation=(state.generation + 1) & GENERATION_MASK, **changes)  # type: ignore[arg-type]


def apply_out(
    state: PrState,
    who: PrNexus,
    *,
    service_action: int,
    scope: int,
    pr_type: int,
    parameter_list_bytes: int,
    params: bytes | memoryview,
    relative_port_id: int = 1,
    registrations_max: int = REGISTRATIONS_MAX,
) -> PrOutcome:
    """Apply one PERSISTENT RESERVE OUT from `who` (CDB fields and parameter list) to `state` (rule 2)."""
    if service_action not in OUT_SERVICE_ACTIONS:
        return PrOutcome(state, sense=_invalid_cdb(1, 4))
    if parameter_list_bytes != BASIC_PARAMETER_LIST_BYTES or len(params) < BASIC_PARAMETER_LIST_BYTES:
        return PrOutcome(state, sense=Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
    p = bytes(params[:BASIC_PARAMETER_LIST_BYTES])
    rk = int.from_bytes(p[0:8], "big")
    sark = int.from_bytes(p[8:16], "big")
    flags = p[20]
    if flags & 0x08:  # SPEC_I_PT (rule 1)
        return PrOutcome(state, sense=_invalid_param(20, 3))
    registering = service_action in (SA_REGISTER, SA_REGISTER_AND_IGNORE_EXISTING_KEY)
    if registering and flags & 0x04:  # ALL_TG_PT (rule 1)
        return PrOutcome(state, sense=_invalid_param(20, 2))
    if service_action in (SA_RESERVE, SA_RELEASE, SA_PREEMPT, SA_PREEMPT_AND_ABORT):
        if scope != SCOPE_LU:
            return PrOutcome(state, sense=_invalid_cdb(2, 7))
        if service_action != SA_RELEASE and pr_type not in TYPES:
            return PrOutcome(state, sense=_invalid_cdb(2, 3))
    if registering:
        return _register(state, who, rk, sark, bool(flags & 0x01), relative_port_id,
                         service_action == SA_REGISTER_AND_IGNORE_EXISTING_KEY, registrations_max)
    reg = state.registration(who)
    if reg is None or reg.key != rk:
        return PrOutcome(state, conflict=True)
    if service_action == SA_RESERVE:
        return _reserve(state, who, pr_type)
    if service_action == SA_RELEASE:
        return _release(state, who, pr_type)
    if service_action == SA_CLEAR:
        others = [r.nexus for r in state.registrations if r.nexus != who]
        new = _bump(state, registrations=(), reservation=None)
        return PrOutcome(new, unit_attentions=_uas(others, ASC_RESERVATIONS_PREEMPTED))
    return _preempt(state, who, sark, pr_type)


def _register(state: PrState, who: PrNexus, rk: int, sark: int, aptpl: bool, rtpi: int, ignore: bool,
              registrations_max: int) -> PrOutcome:
    reg = state.registration(who)
    if reg is None:
        if not ignore and rk != 0:
            return PrOutcome(state, conflict=True)
        if sark == 0:  # unregistered nexus registering key 0: nothing to do (SPC-4 5.7.7)
            return PrOutcome(_bump(state))
        if len(state.registrations) >= registrations_max:
            return PrOutcome(state, sense=Sense.of(ILLEGAL_REQUEST, ASC_INSUFFICIENT_REGISTRATION_RESOURCES))
        regs = state.registrations + (Registration(who, sark, rtpi),)
        return PrOutcome(_bump(state, registrations=regs, aptpl=aptpl))
    if not ignore and rk != reg.key:
        return PrOutcome(state, conflict=True)
    if sark == 0:
        new, uas = _unregister(state, who)
        return PrOutcome(_bump(new, aptpl=aptpl), unit_attentions=uas)
    regs = tuple(replace(r, key=sark) if r.nexus == who else r for r in state.registrations)
    return PrOutcome(_bump(state, registrations=regs, aptpl=aptpl))


def _unregister(state: PrState, who: PrNexus) -> tuple[PrState, tuple[UnitAttention, ...]]:
    """Remove `who`'s registration; a holder leaving ends its reservation (SPC-4 5.7.11.3), except an
    all-registrants one, which lasts while anyone is registered."""
    regs = tuple(r for r in state.registrations if r.nexus != who)
    res = state.reservation
    uas: tuple[UnitAttention, ...] = ()
    if res is not None:
        if res.type in ALL_REGISTRANTS_TYPES:
            if not regs:
                res = None
            elif res.holder == who:
                res = Reservation(regs[0].nexus, res.type)
        elif res.holder == who:
            if res.type in REGISTRANTS_ONLY_TYPES:
                uas = _uas([r.nexus for r in regs], ASC_RESERVATIONS_RELEASED)
            res = None
    return replace(state, registrations=regs, reservation=res), uas


def _reserve(state: PrState, who: PrNexus, pr_type: int) -> PrOutcome:
    res = state.reservation
    if res is None:
        return PrOutcome(replace(state, reservation=Reservation(who, pr_type)))
    if state.is_holder(who) and res.type == pr_type:
        return PrOutcome(state)  # a holder reserving again with the same type: no change
    return PrOutcome(state, conflict=True)


def _release(state: PrState, who: PrNexus, pr_type: int) -> PrOutcome:
    res = state.reservation
    if res is None or not state.is_holder(who):
        return PrOutcome(state)  # SPC-4 5.7.11.2: not an error, nothing happens
    if pr_type != res.type:
        return PrOutcome(state, sense=Sense.of(ILLEGAL_REQUEST, ASC_INVALID_RELEASE_OF_PERSISTENT_RESERVATION))
    uas: tuple[UnitAttention, ...] = ()
    if res.type not in (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS):
        uas = _uas([r.nexus for r in state.registrations if r.nexus != who], ASC_RESERVATIONS_RELEASED)
    return PrOutcome(replace(state, reservation=None), unit_attentions=uas)


def _preempt(state: PrState, who: PrNexus, sark: int, pr_type: int) -> PrOutcome:
    """SPC-4 5.7.11.4: remove the registrations of key `sark` (and take the reservation over when
    `sark` names its holder, or is 0 under an all-registrants reservation)."""
    res = state.reservation
    any_with_key = any(r.key == sark for r in state.registrations)

    def remove(nexuses: set[PrNexus]) -> tuple[Registration, ...]:
        return tuple(r for r in state.registrations if r.nexus not in nexuses)

    if res is not None and res.type in ALL_REGISTRANTS_TYPES and sark == 0:
        gone = {r.nexus for r in state.registrations if r.nexus != who}
        new = _bump(state, registrations=remove(gone), reservation=Reservation(who, pr_type))
        return PrOutcome(new, unit_attentions=_uas(sorted(gone), ASC_REGISTRATIONS_PREEMPTED))
    if res is not None and res.type not in ALL_REGISTRANTS_TYPES and sark == state.holder_key():
        gone = {r.nexus for r in state.registrations if r.key == sark and r.nexus != who}
        regs = remove(gone)
        uas = _uas(sorted(gone), ASC_REGISTRATIONS_PREEMPTED)
        if pr_type != res.type:
            uas += _uas([r.nexus for r in regs if r.nexus != who], ASC_RESERVATIONS_RELEASED)
        new = _bump(state, registrations=regs, reservation=Reservation(who, pr_type))
        return PrOutcome(new, unit_attentions=uas)
    if sark == 0:
        return PrOutcome(state, sense=_invalid_param(8))
    if not any_with_key:
        return PrOutcome(state, conflict=True)
    gone = {r.nexus for r in state.registrations if r.key == sark and r.nexus != who}
    new = _bump(state, registrations=remove(gone))
    return PrOutcome(new, unit_attentions=_uas(sorted(gone), ASC_REGISTRATIONS_PREEMPTED))


# --- access (rule 4) --------------------------------------------------------------------------------
def access_allowed(state: PrState, who: PrNexus, *, write: bool) -> bool:
    """May `who` run a command of the read (write=False) or write class under `state`'s reservation?"""
    res = state.reservation
    if res is None or state.is_holder(who):
        return True
    t = res.type
    if t == WRITE_EXCLUSIVE:
        return not write
    if t == EXCLUSIVE_ACCESS:
        return False
    registered = state.registration(who) is not None
    if t in (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, WRITE_EXCLUSIVE_ALL_REGISTRANTS):
        return registered or not write
    return registered


# --- PERSISTENT RESERVE IN parameter data (SPC-4 6.15) -------------------------------------------------
def read_keys(state: PrState) -> bytes:
    keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations)
    return state.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys


def read_reservation(state: PrState) -> bytes:
    head = state.generation.to_bytes(4, "big")
    res = state.reservation
    if res is None:
        return head + (0).to_bytes(4, "big")
    body = state.holder_key().to_bytes(8, "big") + bytes(5) + bytes(((SCOPE_LU << 4) | res.type,)) + bytes(2)
    return head + len(body).to_bytes(4, "big") + body


def report_capabilities(state: PrState) -> bytes:
    """CRH=0, SIP_C=0, ATP_C=0, PTPL_C=1; TMV=1 with every type; ALLOW COMMANDS=001b (TEST UNIT READY
    is allowed through WE and EA reservations)."""
    b = bytearray(8)
    b[0:2] = (8).to_bytes(2, "big")
    b[2] = 0x01
    b[3] = 0x80 | (0x1 << 4) | (0x01 if state.aptpl else 0)
    b[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    b[5] = 0x01  # EX_AC_AR
    return bytes(b)


def transport_id(initiator: str) -> bytes:
    """The iSCSI TransportID of an initiator port (SPC-4 7.6.4.6): format 01b for "name,i,0xISID",
    format 00b for a bare name; NUL-terminated, padded to a multiple of 4, at least 24 bytes."""
    fmt = 0x40 if ",i,0x" in initiator.lower() else 0x00
    name = initiator.encode() + b"\x00"
    name += bytes(-len(name) % 4)
    if len(name) < 20:
        name += bytes(20 - len(name))
    return bytes((fmt | ISCSI_PROTOCOL_ID, 0)) + len(name).to_bytes(2, "big") + name


def read_full_status(state: PrState) -> bytes:
    descs = b""
    res = state.reservation
    for r in state.registrations:
        holder = state.is_holder(r.nexus)
        tid = transport_id(r.nexus[0])
        descs += (
            r.key.to_bytes(8, "big")
            + bytes(4)
            + bytes((0x01 if holder else 0x00,))
            + bytes((((SCOPE_LU << 4) | res.type) if holder and res is not None else 0,))
            + bytes(4)
            + r.relative_port_id.to_bytes(2, "big")
            + len(tid).to_bytes(4, "big")
            + tid
        )
    return state.generation.to_bytes(4, "big") + len(descs).to_bytes(4, "big") + descs


def read_in(state: PrState, service_action: int) -> bytes:
    """The PERSISTENT RESERVE IN parameter data of `service_action` (one of IN_SERVICE_ACTIONS)."""
    if service_action == SA_READ_KEYS:
        return read_keys(state)
    if service_action == SA_READ_RESERVATION:
        return read_reservation(state)
    if service_action == SA_REPORT_CAPABILITIES:
        return report_capabilities(state)
    if service_action == SA_READ_FULL_STATUS:
        return read_full_status(state)
    raise ValueError(f"unknown PERSISTENT RESERVE IN service action {service_action:#x}")
