"""SCSI command layer of the iSCSI gateway (SPC-4 / SBC-3), without I/O except awaiting the volume.

Owns what a logical unit does with a CDB: decoding and checking it, the data-in it answers, what it
asks of the `Backend` (a raftblock Volume), unit attentions, SPC-2 reservations, and persistent
reservations (state machine in scsi_pr.py, state in a `PrStore`). The iSCSI transport (iscsi.py,
iscsi_server.py) owns PDUs, sessions, R2T, task management and residuals: it asks `data_out_bytes`
how much data-out to collect, calls `execute`, sends the `ScsiResult`, and tells the Lun about
resets (`reset`) and lost sessions (`nexus_lost`).

Rules:
1. Data-out. `execute` gets what the initiator sent, normally min(EDTL, `data_out_bytes(cdb)`) bytes;
   anything past `data_out_bytes` is ignored. A write that receives less than its transfer length
   (EDTL < TL) writes the whole logical blocks it got and succeeds (SAM overflow: the transport
   reports the residual; libiscsi iSCSIResiduals). COMPARE AND WRITE and WRITE SAME, whose data-out
   is one indivisible structure, answer INVALID FIELD IN CDB when the data-out size (`edtl_bytes`, or
   the received length when the transport does not pass it) differs from `data_out_bytes`.
   `data_out_bytes` is 0 for a CDB `execute` will refuse, so nothing is solicited for it.
2. Data-in is cut here to the CDB's ALLOCATION LENGTH; the transport cuts it to EDTL.
3. Errors are CHECK CONDITION with fixed-format sense data (D_SENSE=0). INVALID FIELD IN CDB and
   INVALID FIELD IN PARAMETER LIST carry the sense-key-specific field pointer (SPC-4 4.5.2.4.2).
   Unsupported opcodes answer INVALID COMMAND OPERATION CODE (20h/00h); unsupported service actions
   of MAINTENANCE IN / SERVICE ACTION IN answer INVALID FIELD IN CDB pointing at byte 1 (libiscsi
   reads both as "not implemented"). Backend errors: ENOSPC is DATA PROTECT / SPACE ALLOCATION FAILED
   WRITE PROTECT (27h/07h); other failures MEDIUM ERROR (reads 11h/00h, writes 0Ch/00h) or HARDWARE
   ERROR / INTERNAL TARGET FAILURE (44h/00h).
4. Unit attentions are queued per I_T nexus (SPC-4 5.14, UA_INTLCK_CTRL=0): a nexus with one pending
   gets it as CHECK CONDITION on its next command, except INQUIRY and REPORT LUNS (which run and keep
   it) and REQUEST SENSE (which returns and clears it). No power-on UA is established for a nexus the
   Lun has not seen (simple initiators keep working); `reset` (for every known nexus, the resetting
   one included, SAM-5 6.3.3), persistent reservation changes and a change of the volume size
   (CAPACITY DATA HAS CHANGED) establish them for the nexuses it knows.
5. Persistent reservations: PERSISTENT RESERVE OUT loads the state from the PrStore, applies the
   service action (scsi_pr.apply_out) and stores the result with compare-and-swap, retrying on a lost
   race (`pr_cas_attempts_max`), so several gateways and restarts share one state. PERSISTENT RESERVE
   IN reads the store. Every other command is checked against a per-Lun cache of the state that this
   Lun's own updates refresh and that is reloaded when older than `pr_cache_s` (1 s), from the store's
   `peek` when it has one (a cheap read of a copy the store follows anyway: the gateway's map, itself at
   most a refresh old) or else `load`: a reservation taken through another gateway binds this one within
   about two seconds. The unit attentions a PR change
   causes reach the nexuses this Lun object knows (other gateways' nexuses see the new state, not a UA).
6. RESERVE(6)/RELEASE(6) (SPC-2) reservations live in this Lun object only (they are not shared
   between gateways, and they end with `reset` and with the holder's `nexus_lost`). While any
   persistent reservation registration exists, RESERVE(6)/RELEASE(6) conflict (CRH=0, SPC-4 5.7.3).
7. Thin provisioning (LBPME=1, LBPRZ=1, SBC-3 4.7): UNMAP and WRITE SAME with UNMAP call
   `backend.zero(no_hole=False)`: whole 4 KiB blocks become holes, partial ones are written with zeros,
   so an unmapped LBA always reads zeros. WRITE SAME without UNMAP of zeros is `zero(no_hole=True)`.
8. Writes are durable when the backend returns (no write cache, WCE=0): FUA and DPO are accepted
   (DPOFUA=1), SYNCHRONIZE CACHE waits for `backend.flush()`.
9. Every buffer is bounded: transfers by `max_transfer_bytes`, COMPARE AND WRITE by
   `compare_write_max_bytes`, WRITE SAME by `write_same_max_bytes` (written in `max_transfer_bytes`
   pieces), UNMAP by `unmap_max_bytes` / `unmap_descriptors_max`, GET LBA STATUS by
   `lba_status_descriptors_max` / `lba_status_scan_bytes_max`, unit attentions by `ua_queue_max`.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from raftblock.gateway import scsi_pr
from raftblock.gateway.scsi_pr import (
    ABORTED_COMMAND,
    ASC_INVALID_FIELD_IN_CDB,
    ASC_INVALID_FIELD_IN_PARAMETER_LIST,
    ASC_PARAMETER_LIST_LENGTH_ERROR,
    DATA_PROTECT,
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    MEDIUM_ERROR,
    MISCOMPARE,
    NO_SENSE,
    UNIT_ATTENTION,
    PrState,
    Sense,
)

log = structlog.get_logger(__name__)

# --- SAM status -------------------------------------------------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02
RESERVATION_CONFLICT = 0x18

# --- additional sense codes (SPC-4 Annex D) ----------------------------------------------------------
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
ASC_POWER_ON_RESET = (0x29, 0x00)
ASC_BUS_DEVICE_RESET = (0x29, 0x03)
ASC_CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)

# --- operation codes --------------------------------------------------------------------------------
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
RESERVE_6 = 0x16
RELEASE_6 = 0x17
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_AND_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
PRE_FETCH_10 = 0x34
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
READ_16 = 0x88
COMPARE_AND_WRITE = 0x89
WRITE_16 = 0x8A
WRITE_AND_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
PRE_FETCH_16 = 0x90
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_AND_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF

SAI_READ_CAPACITY_16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_SUPPORTED_OPERATION_CODES = 0x0C

# VPD pages we answer, ascending (SPC-4 7.8.13 wants them ascending in page 0x00)
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2
VPD_PAGES = (VPD_SUPPORTED_PAGES, VPD_UNIT_SERIAL_NUMBER, VPD_DEVICE_IDENTIFICATION, VPD_BLOCK_LIMITS,
             VPD_BLOCK_DEVICE_CHARACTERISTICS, VPD_LOGICAL_BLOCK_PROVISIONING)

# version descriptors (SPC-4 Table 29): SAM-5, iSCSI (no version claimed), SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)

MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C
MODE_PAGE_ALL = 0x3F

BACKEND_BLOCK_BYTES = 4096  # raftblock's internal block: the physical block we advertise by default
RECOMMENDED_TIMEOUT_S = 30

Buffer = bytes | bytearray | memoryview

# PR access classes of a command (scsi_pr rule 4)
_ALLOWED, _READ, _WRITE = 0, 1, 2


class Backend(Protocol):
    """The byte-addressed volume a LUN exports (raftblock.client.volume.Volume)."""

    @property
    def size_bytes(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: bytes | memoryview) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def zero(self, offset: int, length: int, no_hole: bool) -> None: ...

    async def block_status(self, offset: int, length: int, max_descriptors: int) -> list[tuple[int, bool]]: ...

    async def compare_and_write(self, offset: int, verify: bytes | memoryview,
                                data: bytes | memoryview) -> int | None: ...


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus: initiator port "iqn...,i,0x<isid>", target port "iqn...,t,0x<tpgt>"."""

    initiator: str
    target_port: str
    relative_port_id: int = 1

    @property
    def pr_id(self) -> scsi_pr.PrNexus:
        return (self.initiator, self.target_port)


@dataclass
class ScsiResult:
    status: int  # GOOD / CHECK_CONDITION / RESERVATION_CONFLICT
    data: Buffer = b""  # data-in, already cut to the CDB's allocation length (rule 2)
    sense: bytes = b""  # fixed-format sense data when status is CHECK_CONDITION


class PrStore(Protocol):
    """Where persistent reservation state lives (the metadata group later; memory now)."""

    async def load(self, volume: str) -> tuple[int, bytes]: ...  # (version, blob); (0, b"") when none

    async def cas(self, volume: str, version: int, blob: bytes) -> bool: ...  # store if still at `version`


class MemoryPrStore:
    """An in-memory PrStore: for tests and a standalone gateway (state is lost with the process)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[int, bytes]] = {}

    async def load(self, volume: str) -> tuple[int, bytes]:
        return self._data.get(volume, (0, b""))

    async def cas(self, volume: str, version: int, blob: bytes) -> bool:
        if self._data.get(volume, (0, b""))[0] != version:
            return False
        self._data[volume] = (version + 1, bytes(blob))
        return True


class CommandError(Exception):
    """A command ends with CHECK CONDITION and this sense."""

    def __init__(self, sense: Sense) -> None:
        super().__init__(f"sense {sense.key:#x} {sense.asc:#04x}/{sense.ascq:#04x}")
        self.sense = sense


class _Conflict(Exception):
    """A command ends with RESERVATION CONFLICT."""


def _invalid_cdb(byte: int, bit: int | None = None) -> CommandError:
    return CommandError(Sense.of(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field=byte, bit=bit))


def _invalid_param(byte: int, bit: int | None = None) -> CommandError:
    return CommandError(Sense.of(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, field=byte, bit=bit,
                                 in_cdb=False))


def _lba_out_of_range() -> CommandError:
    return CommandError(Sense.of(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE))


def _be(b: Buffer, start: int, length: int) -> int:
    return int.from_bytes(b[start:start + length], "big")


def _cdb_bytes(op: int) -> int:
    """CDB length by operation code group (SPC-4 4.2.5.1); 0 for the groups we never accept."""
    group = op >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 0)


def _ascii(value: str, width: int, what: str) -> bytes:
    """An INQUIRY text field: printable ASCII (SPC-4 4.4.1), left-aligned, padded with spaces."""
    if not value.isascii() or not value.isprintable() or len(value) > width:
        raise ValueError(f"{what} must be printable ASCII of at most {width} characters: {value!r}")
    return value.encode("ascii").ljust(width, b" ")


def _first_difference(a: Buffer, b: Buffer) -> int | None:
    """Offset of the first byte where `a` and `b` (same length) differ, or None."""
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if ma == mb:
        return None
    step = 4096
    for start in range(0, len(ma), step):
        if ma[start:start + step] != mb[start:start + step]:
            for i in range(start, min(start + step, len(ma))):
                if ma[i] != mb[i]:
                    return i
    return None


@dataclass
class _Command:
    """A decoded CDB: what the checks before execution need, and the fields the handlers use."""

    op: int
    kind: str  # handler name
    access: int = _ALLOWED  # PR access class (scsi_pr rule 4)
    writes: bool = False  # refused on a read-only LUN
    spc2_allowed: bool = False  # runs for any nexus while another holds a RESERVE(6) reservation
    data_out_bytes: int = 0
    lba: int = 0
    blocks: int = 0
    bytchk: int = 0
    unmap: bool = False
    ndob: bool = False
    parameter_bytes: int = 0


@dataclass(frozen=True)
class _OpInfo:
    """One supported (opcode, service action) for REPORT SUPPORTED OPERATION CODES (SPC-4 6.35)."""

    opcode: int
    service_action: int | None  # None: the opcode has no service actions
    usage: bytes  # CDB USAGE DATA: the opcode, then per CDB byte the bits the device server uses


def _usage(*b: int) -> bytes:
    return bytes(b)


_LBA8 = (0xFF,) * 8
_RW10 = (0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x04)
_RW12 = (0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x04)
_RW16 = (0xFA, *_LBA8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x04)
_V10 = (0xF6, *_RW10[1:])
_V12 = (0xF6, *_RW12[1:])
_V16 = (0xF6, *_RW16[1:])

SUPPORTED_OPS: tuple[_OpInfo, ...] = (
    _OpInfo(TEST_UNIT_READY, None, _usage(TEST_UNIT_READY, 0, 0, 0, 0, 0x04)),
    _OpInfo(REQUEST_SENSE, None, _usage(REQUEST_SENSE, 0x01, 0, 0, 0xFF, 0x04)),
    _OpInfo(READ_6, None, _usage(READ_6, 0x1F, 0xFF, 0xFF, 0xFF, 0x04)),
    _OpInfo(WRITE_6, None, _usage(WRITE_6, 0x1F, 0xFF, 0xFF, 0xFF, 0x04)),
    _OpInfo(INQUIRY, None, _usage(INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, 0x04)),
    _OpInfo(MODE_SELECT_6, None, _usage(MODE_SELECT_6, 0x11, 0, 0, 0xFF, 0x04)),
    _OpInfo(RESERVE_6, None, _usage(RESERVE_6, 0, 0, 0, 0, 0x04)),
    _OpInfo(RELEASE_6, None, _usage(RELEASE_6, 0, 0, 0, 0, 0x04)),
    _OpInfo(MODE_SENSE_6, None, _usage(MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, 0x04)),
    _OpInfo(START_STOP_UNIT, None, _usage(START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, 0x04)),
    _OpInfo(PREVENT_ALLOW_MEDIUM_REMOVAL, None, _usage(PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, 0x04)),
    _OpInfo(READ_CAPACITY_10, None, _usage(READ_CAPACITY_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x04)),
    _OpInfo(READ_10, None, _usage(READ_10, *_RW10)),
    _OpInfo(WRITE_10, None, _usage(WRITE_10, *_RW10)),
    _OpInfo(WRITE_AND_VERIFY_10, None, _usage(WRITE_AND_VERIFY_10, *_V10)),
    _OpInfo(VERIFY_10, None, _usage(VERIFY_10, *_V10)),
    _OpInfo(PRE_FETCH_10, None, _usage(PRE_FETCH_10, 0x02, *_RW10[1:])),
    _OpInfo(SYNCHRONIZE_CACHE_10, None, _usage(SYNCHRONIZE_CACHE_10, 0x06, *_RW10[1:])),
    _OpInfo(WRITE_SAME_10, None, _usage(WRITE_SAME_10, 0xF8, *_RW10[1:])),
    _OpInfo(UNMAP, None, _usage(UNMAP, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x04)),
    _OpInfo(MODE_SELECT_10, None, _usage(MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04)),
    _OpInfo(MODE_SENSE_10, None, _usage(MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x04)),
    *(
        _OpInfo(PERSISTENT_RESERVE_IN, sa, _usage(PERSISTENT_RESERVE_IN, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04))
        for sa in scsi_pr.IN_SERVICE_ACTIONS
    ),
    *(
        _OpInfo(PERSISTENT_RESERVE_OUT, sa,
                _usage(PERSISTENT_RESERVE_OUT, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04))
        for sa in scsi_pr.OUT_SERVICE_ACTIONS
    ),
    _OpInfo(READ_16, None, _usage(READ_16, *_RW16)),
    _OpInfo(COMPARE_AND_WRITE, None, _usage(COMPARE_AND_WRITE, 0xFA, *_LBA8, 0, 0, 0, 0xFF, 0x1F, 0x04)),
    _OpInfo(WRITE_16, None, _usage(WRITE_16, *_RW16)),
    _OpInfo(WRITE_AND_VERIFY_16, None, _usage(WRITE_AND_VERIFY_16, *_V16)),
    _OpInfo(VERIFY_16, None, _usage(VERIFY_16, *_V16)),
    _OpInfo(PRE_FETCH_16, None, _usage(PRE_FETCH_16, 0x02, *_RW16[1:])),
    _OpInfo(SYNCHRONIZE_CACHE_16, None, _usage(SYNCHRONIZE_CACHE_16, 0x06, *_RW16[1:])),
    _OpInfo(WRITE_SAME_16, None, _usage(WRITE_SAME_16, 0xF9, *_RW16[1:])),
    _OpInfo(SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16,
            _usage(SERVICE_ACTION_IN_16, 0x1F, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04)),
    _OpInfo(SERVICE_ACTION_IN_16, SAI_GET_LBA_STATUS,
            _usage(SERVICE_ACTION_IN_16, 0x1F, *_LBA8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04)),
    _OpInfo(REPORT_LUNS, None, _usage(REPORT_LUNS, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04)),
    _OpInfo(MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPERATION_CODES,
            _usage(MAINTENANCE_IN, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04)),
    _OpInfo(READ_12, None, _usage(READ_12, *_RW12)),
    _OpInfo(WRITE_12, None, _usage(WRITE_12, *_RW12)),
    _OpInfo(WRITE_AND_VERIFY_12, None, _usage(WRITE_AND_VERIFY_12, *_V12)),
    _OpInfo(VERIFY_12, None, _usage(VERIFY_12, *_V12)),
)
_OPCODES = frozenset(o.opcode for o in SUPPORTED_OPS)
_SA_OPCODES = frozenset(o.opcode for o in SUPPORTED_OPS if o.service_action is not None)
_READ_OPS = frozenset((READ_6, READ_10, READ_12, READ_16, VERIFY_10, VERIFY_12, VERIFY_16))
_WRITE_OPS = frozenset((WRITE_6, WRITE_10, WRITE_12, WRITE_16, WRITE_AND_VERIFY_10, WRITE_AND_VERIFY_12,
                        WRITE_AND_VERIFY_16, COMPARE_AND_WRITE, WRITE_SAME_10, WRITE_SAME_16, UNMAP))

# READ/WRITE/VERIFY/WRITE AND VERIFY layouts: opcode -> (kind, LBA byte, LBA bytes, TL byte, TL bytes)
_RW_LAYOUT: dict[int, tuple[str, int, int, int, int]] = {
    READ_10: ("read", 2, 4, 7, 2), READ_12: ("read", 2, 4, 6, 4), READ_16: ("read", 2, 8, 10, 4),
    WRITE_10: ("write", 2, 4, 7, 2), WRITE_12: ("write", 2, 4, 6, 4), WRITE_16: ("write", 2, 8, 10, 4),
    VERIFY_10: ("verify", 2, 4, 7, 2), VERIFY_12: ("verify", 2, 4, 6, 4), VERIFY_16: ("verify", 2, 8, 10, 4),
    WRITE_AND_VERIFY_10: ("write_verify", 2, 4, 7, 2), WRITE_AND_VERIFY_12: ("write_verify", 2, 4, 6, 4),
    WRITE_AND_VERIFY_16: ("write_verify", 2, 8, 10, 4),
}
# SYNCHRONIZE CACHE / PRE-FETCH / WRITE SAME layouts: opcode -> (LBA byte, LBA bytes, count byte, count bytes)
_RANGE_LAYOUT: dict[int, tuple[int, int, int, int]] = {
    SYNCHRONIZE_CACHE_10: (2, 4, 7, 2), SYNCHRONIZE_CACHE_16: (2, 8, 10, 4),
    PRE_FETCH_10: (2, 4, 7, 2), PRE_FETCH_16: (2, 8, 10, 4),
    WRITE_SAME_10: (2, 4, 7, 2), WRITE_SAME_16: (2, 8, 10, 4),
}


@dataclass
class _PrCache:
    state: PrState = field(default_factory=PrState)
    version: int = -1
    loaded_s: float = float("-inf")


class Lun:
    """One logical unit (LUN 0) over one volume; `execute` may run concurrently for many commands."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        volume_id: int,
        pr_store: PrStore,
        logical_block_bytes: int = 512,
        max_transfer_bytes: int = 32 << 20,
        vendor: str = "RAFTBLCK",
        product: str = "raftblock volume",
        revision: str = "0001",
        physical_block_bytes: int = BACKEND_BLOCK_BYTES,
        read_only: bool = False,
        compare_write_max_bytes: int = 64 << 10,
        write_same_max_bytes: int = 1 << 30,
        unmap_max_bytes: int = 512 << 20,
        unmap_descriptors_max: int = 256,
        lba_status_descriptors_max: int = 256,
        lba_status_scan_bytes_max: int = 1 << 30,
        ua_queue_max: int = 16,
        pr_cache_s: float = 1.0,
        pr_cas_attempts_max: int = 16,
        pr_registrations_max: int = scsi_pr.REGISTRATIONS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        lbs = logical_block_bytes
        if lbs not in (512, 1024, 2048, 4096):
            raise ValueError(f"logical_block_bytes must be 512, 1024, 2048 or 4096, not {lbs}")
        if physical_block_bytes % lbs or (physical_block_bytes // lbs) & (physical_block_bytes // lbs - 1):
            raise ValueError("physical_block_bytes must be a power-of-two multiple of logical_block_bytes")
        if max_transfer_bytes < lbs or max_transfer_bytes % lbs:
            raise ValueError("max_transfer_bytes must be a positive multiple of logical_block_bytes")
        self.name = name
        self.backend = backend
        self.volume_id = volume_id
        self.logical_block_bytes = lbs
        self.physical_block_bytes = physical_block_bytes
        self.max_transfer_bytes = max_transfer_bytes
        self.read_only = read_only
        self._vendor = _ascii(vendor, 8, "vendor")
        self._product = _ascii(product, 16, "product")
        self._revision = _ascii(revision, 4, "revision")
        self._pr_store = pr_store
        self._max_transfer_blocks = max_transfer_bytes // lbs
        self._caw_blocks_max = min(255, max(1, compare_write_max_bytes // lbs))
        self._write_same_blocks_max = max(1, write_same_max_bytes // lbs)
        self._unmap_blocks_max = min(0xFFFFFFFE, max(1, unmap_max_bytes // lbs))
        self._unmap_descriptors_max = unmap_descriptors_max
        self._lba_status_descriptors_max = lba_status_descriptors_max
        self._lba_status_scan_bytes_max = lba_status_scan_bytes_max
        self._ua_queue_max = ua_queue_max
        self._pr_cache_s = pr_cache_s
        self._pr_cas_attempts_max = pr_cas_attempts_max
        self._pr_registrations_max = pr_registrations_max
        self._clock = clock
        self._ua: dict[Nexus, list[tuple[int, int]]] = {}  # known nexuses -> pending (ASC, ASCQ)
        self._reserve6: Nexus | None = None
        self._pr = _PrCache()
        self._pr_lock = asyncio.Lock()  # serialises this Lun's PR OUT (load, apply, compare-and-swap)
        self._pr_load_lock = asyncio.Lock()
        self._size_bytes_seen = backend.size_bytes

    # --- geometry -------------------------------------------------------------------------------------
    @property
    def block_count(self) -> int:
        return self.backend.size_bytes // self.logical_block_bytes

    @property
    def serial(self) -> str:
        return f"{self.volume_id & 0xFFFFFFFFFFFFFFFF:016x}"

    # --- transport interface --------------------------------------------------------------------------
    def data_out_bytes(self, cdb: bytes) -> int:
        """Bytes of data-out `cdb` moves; 0 when it moves none or `execute` will refuse it (rule 1)."""
        try:
            return self._decode(cdb).data_out_bytes
        except CommandError:
            return 0

    async def execute(self, nexus: Nexus, cdb: bytes, data_out: Buffer = b"", *,
                      edtl_bytes: int | None = None) -> ScsiResult:
        """Run one command from `nexus`. `edtl_bytes`: the initiator's data-out transfer length when the
        transport knows it (rule 1)."""
        queue = self._ua.setdefault(nexus, [])
        self._check_capacity()
        op = cdb[0] if cdb else -1
        if queue and op not in (INQUIRY, REPORT_LUNS, REQUEST_SENSE):
            asc, ascq = queue.pop(0)
            return self._check(Sense(UNIT_ATTENTION, asc, ascq))
        try:
            cmd = self._decode(cdb)
            if self._reserve6 is not None and self._reserve6 != nexus and not cmd.spc2_allowed:
                raise _Conflict()
            if cmd.access != _ALLOWED:
                state = await self._pr_state()
                if not scsi_pr.access_allowed(state, nexus.pr_id, write=cmd.access == _WRITE):
                    raise _Conflict()
            if cmd.writes and self.read_only:
                raise CommandError(Sense.of(DATA_PROTECT, ASC_WRITE_PROTECTED))
            data = memoryview(data_out)[: cmd.data_out_bytes] if cmd.data_out_bytes else memoryview(b"")
            handler = getattr(self, "_op_" + cmd.kind)
            return await handler(nexus, cdb, cmd, data, len(data_out) if edtl_bytes is None else edtl_bytes)
        except _Conflict:
            return ScsiResult(RESERVATION_CONFLICT)
        except CommandError as e:
            return self._check(e.sense)
        except Exception as e:  # a backend failure (rule 3); the command fails, the gateway stays up
            return self._check(self._backend_sense(e, cdb))

    def reset(self, nexus: Nexus | None, *, kind: str) -> None:
        """LUN RESET ("lun") or TARGET WARM/COLD RESET ("target") received from `nexus` (None: not from
        a nexus). SAM-5 6.3.3: a unit attention for every I_T nexus, the one that asked included
        (libiscsi MultipathIO.Reset checks every path): BUS DEVICE RESET FUNCTION OCCURRED (29h/03h)
        for a LUN reset, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h) for a target reset.
        The RESERVE(6) reservation ends; persistent reservations survive (SPC-4 5.7.2)."""
        if kind == "lun":
            code = ASC_BUS_DEVICE_RESET
        elif kind == "target":
            code = ASC_POWER_ON_RESET
        else:
            raise ValueError(f"reset kind must be 'lun' or 'target', not {kind!r}")
        self._reserve6 = None
        if nexus is not None:
            self._ua.setdefault(nexus, [])
        for n in self._ua:
            self._add_ua(n, code)

    def forget_reservations(self) -> None:
        """The next command reads the persistent reservation state from the store itself (not a followed
        copy): called when a session logs in, so a volume that moved here from another gateway starts from
        the authoritative state."""
        self._pr = _PrCache()

    def nexus_lost(self, nexus: Nexus) -> None:
        """The session of `nexus` is gone: its RESERVE(6) reservation and pending UAs go; its PR
        registrations stay (SPC-4 5.7.2)."""
        if self._reserve6 == nexus:
            self._reserve6 = None
        self._ua.pop(nexus, None)

    # --- internals: UA, sense, PR cache -------------------------------------------------------------
    def _add_ua(self, nexus: Nexus, code: tuple[int, int]) -> None:
        queue = self._ua.setdefault(nexus, [])
        if code in queue:
            return
        if len(queue) >= self._ua_queue_max:
            queue.pop(0)
        queue.append(code)

    def _check_capacity(self) -> None:
        size = self.backend.size_bytes
        if size != self._size_bytes_seen:
            self._size_bytes_seen = size
            for n in self._ua:
                self._add_ua(n, ASC_CAPACITY_DATA_HAS_CHANGED)

    @staticmethod
    def _check(sense: Sense) -> ScsiResult:
        return ScsiResult(CHECK_CONDITION, sense=sense.encode())

    @staticmethod
    def _backend_sense(e: Exception, cdb: bytes) -> Sense:
        op = cdb[0] if cdb else -1
        if getattr(e, "errno", None) == errno.ENOSPC:
            return Sense.of(DATA_PROTECT, ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        log.warning("scsi.backend_failed", opcode=op, error=repr(e), exc_info=not hasattr(e, "errno"))
        if op in _READ_OPS:
            return Sense.of(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR)
        if op in _WRITE_OPS:
            return Sense.of(MEDIUM_ERROR, ASC_WRITE_ERROR)
        return Sense.of(HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE)

    async def _pr_state(self) -> PrState:
        """The cached PR state, reloaded when older than `pr_cache_s` (rule 5); concurrent commands that
        find it stale share one load."""
        if self._clock() - self._pr.loaded_s >= self._pr_cache_s:
            async with self._pr_load_lock:
                if self._clock() - self._pr.loaded_s >= self._pr_cache_s:
                    peek = getattr(self._pr_store, "peek", None)
                    if peek is None or self._pr.version < 0:  # the first read after `forget_reservations`: the store
                        await self._pr_load()
                    else:
                        # A store that follows the state anyway (the gateway's copy of the map) answers without
                        # a round trip; never older than what this Lun itself stored.
                        version, blob = peek(self.name)
                        if version > self._pr.version:
                            self._pr = _PrCache(PrState.decode(blob), version, self._clock())
                        else:
                            self._pr.loaded_s = self._clock()
        return self._pr.state

    async def _pr_load(self) -> tuple[int, PrState]:
        version, blob = await self._pr_store.load(self.name)
        state = PrState.decode(blob)
        self._pr = _PrCache(state, version, self._clock())
        return version, state

    # --- decoding -------------------------------------------------------------------------------------
    def _decode(self, cdb: bytes) -> _Command:
        """Check the CDB fields that decide whether and how much data moves; raises CommandError."""
        if not cdb:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE))
        op = cdb[0]
        n = _cdb_bytes(op)
        if n == 0 or op not in _OPCODES:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE))
        if len(cdb) < n:
            raise _invalid_cdb(len(cdb))
        if cdb[n - 1] & 0x04:  # NACA: ACA is not supported (SAM-5 5.9)
            raise _invalid_cdb(n - 1, 2)
        if op in _RW_LAYOUT:
            return self._decode_rw(cdb, op)
        if op in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            blocks = cdb[4] or 256
            return self._rw_command(op, "read" if op == READ_6 else "write", lba, blocks, 4)
        if op == COMPARE_AND_WRITE:
            return self._decode_caw(cdb)
        if op in (WRITE_SAME_10, WRITE_SAME_16):
            return self._decode_write_same(cdb, op)
        if op in _RANGE_LAYOUT:
            la, ln, ca, cn = _RANGE_LAYOUT[op]
            lba, blocks = _be(cdb, la, ln), _be(cdb, ca, cn)
            if lba + blocks > self.block_count:
                raise _lba_out_of_range()
            if op in (SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16):
                return _Command(op, "synchronize_cache", access=_WRITE, lba=lba, blocks=blocks)
            return _Command(op, "pre_fetch", access=_READ, lba=lba, blocks=blocks)
        if op == UNMAP:
            if cdb[1] & 0x01:  # ANCHOR: ANC_SUP=0
                raise _invalid_cdb(1, 0)
            plen = _be(cdb, 7, 2)
            return _Command(op, "unmap", access=_WRITE, writes=True, data_out_bytes=plen, parameter_bytes=plen)
        if op in (MODE_SELECT_6, MODE_SELECT_10):
            plen = cdb[4] if op == MODE_SELECT_6 else _be(cdb, 7, 2)
            if cdb[1] & 0x01:  # SP: no saved pages
                raise _invalid_cdb(1, 0)
            if plen and not cdb[1] & 0x10:  # PF=0: only the SPC page format is understood
                raise _invalid_cdb(1, 4)
            return _Command(op, "mode_select", access=_WRITE, data_out_bytes=plen, parameter_bytes=plen)
        if op == PERSISTENT_RESERVE_OUT:
            sa = cdb[1] & 0x1F
            plen = _be(cdb, 5, 4)
            if sa not in scsi_pr.OUT_SERVICE_ACTIONS:
                raise _invalid_cdb(1, 4)
            if plen != scsi_pr.BASIC_PARAMETER_LIST_BYTES:
                raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
            return _Command(op, "pr_out", data_out_bytes=plen, parameter_bytes=plen)
        return self._decode_other(cdb, op)

    def _rw_command(self, op: int, kind: str, lba: int, blocks: int, tl_byte: int, bytchk: int = 0) -> _Command:
        if lba + blocks > self.block_count:
            raise _lba_out_of_range()
        moves_data = kind in ("read", "write", "write_verify") or bytchk == 1
        if moves_data and blocks > self._max_transfer_blocks:
            raise _invalid_cdb(tl_byte, 7)
        lbs = self.logical_block_bytes
        out = 0
        if kind in ("write", "write_verify") or bytchk == 1:
            out = blocks * lbs
        elif bytchk == 3 and blocks:
            out = lbs
        writes = kind in ("write", "write_verify")
        return _Command(op, kind, access=_WRITE if writes else _READ, writes=writes, data_out_bytes=out,
                        lba=lba, blocks=blocks, bytchk=bytchk)

    def _decode_rw(self, cdb: bytes, op: int) -> _Command:
        kind, la, ln, ta, tn = _RW_LAYOUT[op]
        if cdb[1] & 0xE0:  # RDPROTECT / WRPROTECT / VRPROTECT: no protection information
            raise _invalid_cdb(1, 7)
        bytchk = 0
        if kind in ("verify", "write_verify"):
            bytchk = (cdb[1] >> 1) & 0x03
            if bytchk == 2 or (kind == "write_verify" and bytchk == 3):
                raise _invalid_cdb(1, 2)
        return self._rw_command(op, kind, _be(cdb, la, ln), _be(cdb, ta, tn), ta, bytchk)

    def _decode_caw(self, cdb: bytes) -> _Command:
        if cdb[1] & 0xE0:
            raise _invalid_cdb(1, 7)
        lba, blocks = _be(cdb, 2, 8), cdb[13]
        if blocks > self._caw_blocks_max:
            raise _invalid_cdb(13)
        if lba + blocks > self.block_count:
            raise _lba_out_of_range()
        return _Command(COMPARE_AND_WRITE, "compare_and_write", access=_WRITE, writes=True,
                        data_out_bytes=2 * blocks * self.logical_block_bytes, lba=lba, blocks=blocks)

    def _decode_write_same(self, cdb: bytes, op: int) -> _Command:
        la, ln, ca, cn = _RANGE_LAYOUT[op]
        if cdb[1] & 0xE0:
            raise _invalid_cdb(1, 7)
        if cdb[1] & 0x10:  # ANCHOR: ANC_SUP=0
            raise _invalid_cdb(1, 4)
        ndob = op == WRITE_SAME_16 and bool(cdb[1] & 0x01)
        lba, blocks = _be(cdb, la, ln), _be(cdb, ca, cn)
        if blocks == 0:  # WSNZ=1: "to the end of the medium" is not supported
            raise _invalid_cdb(ca, 7)
        if lba + blocks > self.block_count:
            raise _lba_out_of_range()
        if blocks > self._write_same_blocks_max:
            raise _invalid_cdb(ca, 7)
        return _Command(op, "write_same", access=_WRITE, writes=True,
                        data_out_bytes=0 if ndob else self.logical_block_bytes, lba=lba, blocks=blocks,
                        unmap=bool(cdb[1] & 0x08), ndob=ndob)

    def _decode_other(self, cdb: bytes, op: int) -> _Command:
        """Commands without data-out; their remaining fields are checked by their handlers."""
        if op == SERVICE_ACTION_IN_16:
            sa = cdb[1] & 0x1F
            if sa == SAI_READ_CAPACITY_16:
                return _Command(op, "read_capacity_16", spc2_allowed=True)
            if sa == SAI_GET_LBA_STATUS:
                lba = _be(cdb, 2, 8)
                if lba >= self.block_count:
                    raise _lba_out_of_range()
                return _Command(op, "get_lba_status", access=_READ, lba=lba)
            raise _invalid_cdb(1, 4)
        if op == MAINTENANCE_IN:
            if cdb[1] & 0x1F != MI_REPORT_SUPPORTED_OPERATION_CODES:
                raise _invalid_cdb(1, 4)
            return _Command(op, "report_supported_operation_codes", spc2_allowed=True)
        if op == START_STOP_UNIT:
            plain_start = cdb[4] & 0xF1 == 0x01  # START=1, POWER CONDITION=0
            return _Command(op, "good", access=_ALLOWED if plain_start else _WRITE)
        if op == PREVENT_ALLOW_MEDIUM_REMOVAL:
            return _Command(op, "good", access=_WRITE if cdb[4] & 0x03 else _ALLOWED)
        kinds: dict[int, tuple[str, int, bool]] = {
            TEST_UNIT_READY: ("good", _ALLOWED, False),
            REQUEST_SENSE: ("request_sense", _ALLOWED, True),
            INQUIRY: ("inquiry", _ALLOWED, True),
            READ_CAPACITY_10: ("read_capacity_10", _ALLOWED, True),
            REPORT_LUNS: ("report_luns", _ALLOWED, True),
            MODE_SENSE_6: ("mode_sense", _READ, False),
            MODE_SENSE_10: ("mode_sense", _READ, False),
            RESERVE_6: ("reserve_6", _ALLOWED, False),
            RELEASE_6: ("release_6", _ALLOWED, True),
            PERSISTENT_RESERVE_IN: ("pr_in", _ALLOWED, False),
        }
        kind, access, spc2 = kinds[op]
        return _Command(op, kind, access=access, spc2_allowed=spc2)

    # --- block commands -------------------------------------------------------------------------------
    def _span(self, cmd: _Command) -> tuple[int, int]:
        return cmd.lba * self.logical_block_bytes, cmd.blocks * self.logical_block_bytes

    def _whole_blocks(self, data: memoryview) -> memoryview:
        return data[: len(data) - len(data) % self.logical_block_bytes]

    async def _op_read(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        offset, length = self._span(cmd)
        if not length:
            return ScsiResult(GOOD)
        return ScsiResult(GOOD, await self.backend.read(offset, length))

    async def _op_write(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        got = self._whole_blocks(data)  # rule 1: EDTL < TL writes what arrived
        if len(got):
            await self.backend.write(cmd.lba * self.logical_block_bytes, got)
        return ScsiResult(GOOD)

    async def _op_write_verify(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                               edtl: int) -> ScsiResult:
        got = self._whole_blocks(data)
        offset = cmd.lba * self.logical_block_bytes
        if len(got):
            await self.backend.write(offset, got)
            if cmd.bytchk:
                back = await self.backend.read(offset, len(got))
                diff = _first_difference(back, got)
                if diff is not None:
                    raise CommandError(Sense.of(MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY, information=diff))
        return ScsiResult(GOOD)

    async def _op_verify(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        offset, length = self._span(cmd)
        lbs = self.logical_block_bytes
        if cmd.bytchk == 0:  # medium verification: every block must be readable
            done = 0
            while done < length:
                n = min(self.max_transfer_bytes, length - done)
                await self.backend.read(offset + done, n)
                done += n
            return ScsiResult(GOOD)
        if cmd.bytchk == 1:
            got = self._whole_blocks(data)
            if not len(got):
                return ScsiResult(GOOD)
            diff = _first_difference(await self.backend.read(offset, len(got)), got)
        else:  # 11b: one block compared with every block of the range
            if len(data) < lbs or not length:
                return ScsiResult(GOOD)
            diff = None
            done = 0
            chunk_blocks = self._max_transfer_blocks
            while done < length and diff is None:
                n = min(chunk_blocks * lbs, length - done)
                d = _first_difference(await self.backend.read(offset + done, n), bytes(data[:lbs]) * (n // lbs))
                if d is not None:
                    diff = d % lbs  # the offset in the Data-Out Buffer, which holds one block
                done += n
        if diff is not None:
            raise CommandError(Sense.of(MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY, information=diff))
        return ScsiResult(GOOD)

    async def _op_compare_and_write(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                    edtl: int) -> ScsiResult:
        if edtl != cmd.data_out_bytes or len(data) != cmd.data_out_bytes:  # rule 1
            raise _invalid_cdb(13)
        if not cmd.blocks:
            return ScsiResult(GOOD)
        offset, length = self._span(cmd)
        diff = await self.backend.compare_and_write(offset, data[:length], data[length:])
        if diff is not None:
            raise CommandError(Sense.of(MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY, information=diff))
        return ScsiResult(GOOD)

    async def _op_write_same(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                             edtl: int) -> ScsiResult:
        lbs = self.logical_block_bytes
        if edtl != cmd.data_out_bytes or len(data) != cmd.data_out_bytes:  # rule 1
            raise _invalid_cdb(7 if cmd.op == WRITE_SAME_10 else 10, 7)
        block = bytes(lbs) if cmd.ndob else bytes(data)
        offset, length = self._span(cmd)
        if not any(block):  # rule 7
            await self.backend.zero(offset, length, not cmd.unmap)
            return ScsiResult(GOOD)
        chunk_blocks = min(cmd.blocks, self._max_transfer_blocks)
        pattern = block * chunk_blocks
        done = 0
        while done < length:
            n = min(len(pattern), length - done)
            await self.backend.write(offset + done, memoryview(pattern)[:n])
            done += n
        return ScsiResult(GOOD)

    async def _op_unmap(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        plen = cmd.parameter_bytes
        if plen == 0:
            return ScsiResult(GOOD)
        if plen < 8 or len(data) < 8:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
        bd_bytes = min(_be(data, 2, 2), len(data) - 8)
        count = bd_bytes // 16
        if count > self._unmap_descriptors_max:
            raise _invalid_param(2)
        ranges: list[tuple[int, int]] = []
        total = 0
        capacity = self.block_count
        for i in range(count):
            at = 8 + 16 * i
            lba, blocks = _be(data, at, 8), _be(data, at + 8, 4)
            if lba + blocks > capacity:
                raise _lba_out_of_range()
            total += blocks
            if total > self._unmap_blocks_max:
                raise _invalid_param(at + 8)
            if blocks:
                ranges.append((lba, blocks))
        lbs = self.logical_block_bytes
        for lba, blocks in ranges:  # rule 7: unmapped LBAs read zeros
            await self.backend.zero(lba * lbs, blocks * lbs, False)
        return ScsiResult(GOOD)

    async def _op_synchronize_cache(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                    edtl: int) -> ScsiResult:
        await self.backend.flush()
        return ScsiResult(GOOD)

    async def _op_pre_fetch(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                            edtl: int) -> ScsiResult:
        # No cache to load: GOOD says "the cache cannot hold them" (SBC-3 5.9); CONDITION MET would lie.
        return ScsiResult(GOOD)

    async def _op_get_lba_status(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                 edtl: int) -> ScsiResult:
        alloc = _be(cdb, 10, 4)
        lbs = self.logical_block_bytes
        start = cmd.lba * lbs
        scan = min(self.block_count * lbs - start, self._lba_status_scan_bytes_max)
        scan -= scan % lbs
        max_desc = max(1, min(self._lba_status_descriptors_max, (alloc - 8) // 16))
        runs = await self.backend.block_status(start, scan, max_desc) or [(scan, True)]
        descs = bytearray()
        pos = start
        for length, allocated in runs[:max_desc]:
            first, end = pos // lbs, (pos + length) // lbs
            pos += length
            while end > first:
                n = min(end - first, 0xFFFFFFFF)
                descs += first.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes((0 if allocated else 1,)) + bytes(3)
                first += n
        body = bytes(4) + bytes(descs)  # PARAMETER DATA LENGTH counts the bytes after itself
        return ScsiResult(GOOD, (len(body).to_bytes(4, "big") + body)[:alloc])

    async def _op_read_capacity_10(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                   edtl: int) -> ScsiResult:
        if not cdb[8] & 0x01 and _be(cdb, 2, 4):  # PMI=0 with an LBA (SBC-3 5.15)
            raise _invalid_cdb(2, 7)
        last = min(max(self.block_count - 1, 0), 0xFFFFFFFF)
        return ScsiResult(GOOD, last.to_bytes(4, "big") + self.logical_block_bytes.to_bytes(4, "big"))

    async def _op_read_capacity_16(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                   edtl: int) -> ScsiResult:
        alloc = _be(cdb, 10, 4)
        b = bytearray(32)
        b[0:8] = max(self.block_count - 1, 0).to_bytes(8, "big")
        b[8:12] = self.logical_block_bytes.to_bytes(4, "big")
        b[13] = (self.physical_block_bytes // self.logical_block_bytes).bit_length() - 1  # LBPPBE
        b[14] = 0x80 | 0x40  # LBPME, LBPRZ (rule 7); LOWEST ALIGNED LBA 0
        return ScsiResult(GOOD, bytes(b[:alloc]))

    # --- SPC commands ---------------------------------------------------------------------------------
    async def _op_good(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        """TEST UNIT READY; START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL on a medium that is never
        removed or stopped (RMB=0)."""
        return ScsiResult(GOOD)

    async def _op_request_sense(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                                edtl: int) -> ScsiResult:
        queue = self._ua.get(nexus, [])
        sense = Sense(UNIT_ATTENTION, *queue.pop(0)) if queue else Sense.of(NO_SENSE, ASC_NO_ADDITIONAL_SENSE)
        raw = sense.encode_descriptor() if cdb[1] & 0x01 else sense.encode()
        return ScsiResult(GOOD, raw[: cdb[4]])

    async def _op_inquiry(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        if cdb[1] & 0x02:  # CMDDT (obsolete)
            raise _invalid_cdb(1, 1)
        page = cdb[2]
        alloc = _be(cdb, 3, 2)
        if not cdb[1] & 0x01:
            if page:
                raise _invalid_cdb(2)
            return ScsiResult(GOOD, self._standard_inquiry()[:alloc])
        builders: dict[int, Callable[[], bytes]] = {
            VPD_SUPPORTED_PAGES: lambda: bytes(VPD_PAGES),
            VPD_UNIT_SERIAL_NUMBER: lambda: self.serial.encode(),
            VPD_DEVICE_IDENTIFICATION: lambda: self._device_identification(nexus),
            VPD_BLOCK_LIMITS: self._block_limits,
            VPD_BLOCK_DEVICE_CHARACTERISTICS: self._block_device_characteristics,
            VPD_LOGICAL_BLOCK_PROVISIONING: self._logical_block_provisioning,
        }
        build = builders.get(page)
        if build is None:
            raise _invalid_cdb(2)
        body = build()
        return ScsiResult(GOOD, (bytes((0x00, page)) + len(body).to_bytes(2, "big") + body)[:alloc])

    def _standard_inquiry(self) -> bytes:
        b = bytearray(96)
        b[0] = 0x00  # peripheral qualifier 0, direct access block device
        b[2] = 0x06  # SPC-4
        b[3] = 0x12  # HISUP, RESPONSE DATA FORMAT 2
        b[4] = len(b) - 5
        b[7] = 0x02  # CMDQUE
        b[8:16] = self._vendor
        b[16:32] = self._product
        b[32:36] = self._revision
        for i, v in enumerate(VERSION_DESCRIPTORS):
            b[58 + 2 * i: 60 + 2 * i] = v.to_bytes(2, "big")
        return bytes(b)

    def _device_identification(self, nexus: Nexus) -> bytes:
        def desig(code_set: int, piv_assoc_type: int, value: bytes, protocol: int = 0) -> bytes:
            return bytes(((protocol << 4) | code_set, piv_assoc_type, 0, len(value))) + value

        def name_string(name: str) -> bytes:
            raw = name.encode() + b"\x00"
            return raw + bytes(-len(raw) % 4)

        naa = (0x3 << 60) | (self.volume_id & ((1 << 60) - 1))  # NAA 3: locally assigned
        iscsi = scsi_pr.ISCSI_PROTOCOL_ID
        out = desig(1, 0x03, naa.to_bytes(8, "big"))  # logical unit, NAA
        out += desig(2, 0x01, self._vendor + self.serial.encode())  # logical unit, T10 vendor ID
        out += desig(1, 0x80 | 0x10 | 0x04, nexus.relative_port_id.to_bytes(4, "big"), iscsi)  # relative port
        out += desig(3, 0x80 | 0x10 | 0x08, name_string(nexus.target_port), iscsi)  # target port name
        target = nexus.target_port.split(",t,")[0]
        out += desig(3, 0x80 | 0x20 | 0x08, name_string(target), iscsi)  # target device name
        return out

    def _block_limits(self) -> bytes:
        b = bytearray(0x3C)
        per_physical = self.physical_block_bytes // self.logical_block_bytes
        b[0] = 0x01  # WSNZ
        b[1] = self._caw_blocks_max
        b[2:4] = per_physical.to_bytes(2, "big")  # OPTIMAL TRANSFER LENGTH GRANULARITY
        b[4:8] = self._max_transfer_blocks.to_bytes(4, "big")
        b[16:20] = self._unmap_blocks_max.to_bytes(4, "big")
        b[20:24] = self._unmap_descriptors_max.to_bytes(4, "big")
        b[24:28] = per_physical.to_bytes(4, "big")  # OPTIMAL UNMAP GRANULARITY
        b[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        b[32:40] = self._write_same_blocks_max.to_bytes(8, "big")
        return bytes(b)

    @staticmethod
    def _block_device_characteristics() -> bytes:
        b = bytearray(0x3C)
        b[0:2] = (1).to_bytes(2, "big")  # MEDIUM ROTATION RATE: non-rotating medium
        return bytes(b)

    @staticmethod
    def _logical_block_provisioning() -> bytes:
        # LBPU, LBPWS, LBPWS10, LBPRZ (001b); ANC_SUP=0, DP=0; PROVISIONING TYPE thin (010b)
        return bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00))

    async def _op_report_luns(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                              edtl: int) -> ScsiResult:
        select = cdb[2]
        if select not in (0x00, 0x01, 0x02):
            raise _invalid_cdb(2)
        luns = bytes(8) if select != 0x01 else b""  # LUN 0 only; it is not a well known LUN
        alloc = _be(cdb, 6, 4)
        return ScsiResult(GOOD, (len(luns).to_bytes(4, "big") + bytes(4) + luns)[:alloc])

    async def _op_report_supported_operation_codes(self, nexus: Nexus, cdb: bytes, cmd: _Command,
                                                   data: memoryview, edtl: int) -> ScsiResult:
        rctd = bool(cdb[2] & 0x80)
        options = cdb[2] & 0x07
        alloc = _be(cdb, 6, 4)
        timeouts = (10).to_bytes(2, "big") + bytes(2) + bytes(4) + RECOMMENDED_TIMEOUT_S.to_bytes(4, "big")
        if options == 0:
            out = bytearray()
            for o in SUPPORTED_OPS:
                flags = (0x02 if rctd else 0) | (0x01 if o.service_action is not None else 0)
                out += bytes((o.opcode, 0)) + (o.service_action or 0).to_bytes(2, "big")
                out += bytes((0, flags)) + len(o.usage).to_bytes(2, "big")
                if rctd:
                    out += timeouts
            return ScsiResult(GOOD, (len(out).to_bytes(4, "big") + out)[:alloc])
        if options not in (1, 2, 3):
            raise _invalid_cdb(2, 2)
        opcode, sa = cdb[3], _be(cdb, 4, 2)
        has_sa = opcode in _SA_OPCODES
        if options == 1 and has_sa:
            raise _invalid_cdb(3)
        if options == 2 and not has_sa:
            raise _invalid_cdb(3)
        match = [o for o in SUPPORTED_OPS if o.opcode == opcode and (not has_sa or o.service_action == sa)]
        if not match:
            return ScsiResult(GOOD, bytes((0, 0x01, 0, 0))[:alloc])  # SUPPORT 001b: not supported
        usage = match[0].usage
        body = bytes((0, (0x80 if rctd else 0) | 0x03)) + len(usage).to_bytes(2, "big") + usage
        if rctd:
            body += timeouts
        return ScsiResult(GOOD, body[:alloc])

    # --- mode parameters ------------------------------------------------------------------------------
    def _mode_pages(self) -> dict[int, bytes]:
        """Current values; none can be changed (changeable masks are all zero), default = current."""
        caching = bytearray(20)
        caching[0:2] = bytes((MODE_PAGE_CACHING, 18))  # WCE=0 (rule 8), RCD=0
        control = bytearray(12)
        control[0:2] = bytes((MODE_PAGE_CONTROL, 10))
        control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 00b
        control[8:10] = (0xFFFF).to_bytes(2, "big")  # BUSY TIMEOUT PERIOD: unlimited
        info = bytearray(12)
        info[0:2] = bytes((MODE_PAGE_INFORMATIONAL_EXCEPTIONS, 10))
        info[2] = 0x08  # DEXCPT: no informational exception reporting
        return {MODE_PAGE_CACHING: bytes(caching), MODE_PAGE_CONTROL: bytes(control),
                MODE_PAGE_INFORMATIONAL_EXCEPTIONS: bytes(info)}

    def _device_specific_parameter(self) -> int:
        return (0x80 if self.read_only else 0) | 0x10  # WP, DPOFUA

    async def _op_mode_sense(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                             edtl: int) -> ScsiResult:
        six = cmd.op == MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = cdb[4] if six else _be(cdb, 7, 2)
        if pc == 3:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED))
        pages = self._mode_pages()
        if page == MODE_PAGE_ALL:
            if subpage not in (0x00, 0xFF):
                raise _invalid_cdb(3)
            chosen = [pages[k] for k in sorted(pages)]
        elif page in pages:
            if subpage:
                raise _invalid_cdb(3)
            chosen = [pages[page]]
        else:
            raise _invalid_cdb(2, 5)
        if pc == 1:  # changeable: nothing is
            chosen = [p[:2] + bytes(len(p) - 2) for p in chosen]
        body = b"".join(chosen)
        blocks = self.block_count
        lbs = self.logical_block_bytes
        if dbd:
            desc = b""
        elif llbaa:
            desc = blocks.to_bytes(8, "big") + bytes(4) + lbs.to_bytes(4, "big")
        else:
            desc = min(blocks, 0xFFFFFFFF).to_bytes(4, "big") + bytes(1) + lbs.to_bytes(3, "big")
        dsp = self._device_specific_parameter()
        if six:
            total = 4 + len(desc) + len(body)
            head = bytes((total - 1, 0, dsp, len(desc)))
        else:
            total = 8 + len(desc) + len(body)
            head = (total - 2).to_bytes(2, "big") + bytes((0, dsp, 0x01 if llbaa and desc else 0, 0))
            head += len(desc).to_bytes(2, "big")
        return ScsiResult(GOOD, (head + desc + body)[:alloc])

    async def _op_mode_select(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                              edtl: int) -> ScsiResult:
        """Accepts parameters equal to the current ones; refuses any change (nothing is changeable)."""
        plen = cmd.parameter_bytes
        if plen == 0:
            return ScsiResult(GOOD)
        six = cmd.op == MODE_SELECT_6
        hlen = 4 if six else 8
        if plen < hlen or len(data) < plen:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
        p = bytes(data[:plen])
        bdl = p[3] if six else _be(p, 6, 2)
        long_lba = not six and bool(p[4] & 0x01)
        if hlen + bdl > plen:
            raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
        dlen = 16 if long_lba else 8
        if bdl % dlen:
            raise _invalid_param(3 if six else 6)
        lbs = self.logical_block_bytes
        blocks = self.block_count if long_lba else min(self.block_count, 0xFFFFFFFF)
        for at in range(hlen, hlen + bdl, dlen):
            count, length = (_be(p, at, 8), _be(p, at + 12, 4)) if long_lba else (_be(p, at, 4), _be(p, at + 5, 3))
            if length != lbs:  # the logical block size cannot change
                raise _invalid_param(at + (12 if long_lba else 5))
            if count not in (0, blocks):
                raise _invalid_param(at)
        pages = self._mode_pages()
        at = hlen + bdl
        while at < plen:
            if at + 2 > plen:
                raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
            code = p[at] & 0x3F
            if p[at] & 0x40 or code not in pages:  # no subpages; unknown page
                raise _invalid_param(at, 5)
            current = pages[code]
            if p[at + 1] != current[1]:
                raise _invalid_param(at + 1)
            if at + 2 + p[at + 1] > plen:
                raise CommandError(Sense.of(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR))
            given = p[at + 2: at + 2 + current[1]]
            diff = _first_difference(given, current[2:])
            if diff is not None:
                raise _invalid_param(at + 2 + diff)
            at += 2 + current[1]
        return ScsiResult(GOOD)

    # --- reservations ---------------------------------------------------------------------------------
    async def _op_reserve_6(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                            edtl: int) -> ScsiResult:
        if (await self._pr_state()).registrations:  # rule 6
            raise _Conflict()
        if self._reserve6 is not None and self._reserve6 != nexus:
            raise _Conflict()
        self._reserve6 = nexus
        return ScsiResult(GOOD)

    async def _op_release_6(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview,
                            edtl: int) -> ScsiResult:
        if (await self._pr_state()).registrations:  # rule 6
            raise _Conflict()
        if self._reserve6 == nexus:
            self._reserve6 = None
        return ScsiResult(GOOD)  # releasing someone else's reservation, or none: no effect (SPC-2 7.21)

    async def _op_pr_in(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        sa = cdb[1] & 0x1F
        if sa not in scsi_pr.IN_SERVICE_ACTIONS:
            raise _invalid_cdb(1, 4)
        _, state = await self._pr_load()
        return ScsiResult(GOOD, scsi_pr.read_in(state, sa)[: _be(cdb, 7, 2)])

    async def _op_pr_out(self, nexus: Nexus, cdb: bytes, cmd: _Command, data: memoryview, edtl: int) -> ScsiResult:
        """Load, apply, compare-and-swap; retried when another writer got there first (rule 5)."""
        async with self._pr_lock:
            for _ in range(self._pr_cas_attempts_max):
                version, state = await self._pr_load()
                out = scsi_pr.apply_out(
                    state, nexus.pr_id, service_action=cdb[1] & 0x1F, scope=cdb[2] >> 4, pr_type=cdb[2] & 0x0F,
                    parameter_list_bytes=cmd.parameter_bytes, params=data, relative_port_id=nexus.relative_port_id,
                    registrations_max=self._pr_registrations_max,
                )
                if out.conflict:
                    raise _Conflict()
                if out.sense is not None:
                    raise CommandError(out.sense)
                if out.state is not state:
                    if not await self._pr_store.cas(self.name, version, out.state.encode()):
                        continue
                    self._pr = _PrCache(out.state, version + 1, self._clock())
                for who, asc, ascq in out.unit_attentions:
                    for n in list(self._ua):
                        if n.pr_id == who:
                            self._add_ua(n, (asc, ascq))
                return ScsiResult(GOOD)
        log.warning("scsi.pr_cas_exhausted", volume=self.name, attempts=self._pr_cas_attempts_max)
        return self._check(Sense.of(ABORTED_COMMAND, ASC_NO_ADDITIONAL_SENSE))
