"""The SCSI command layer (raftblock/gateway/scsi.py) and the persistent reservation state machine
(scsi_pr.py) against an in-memory backend. Each test names the SPC-4 / SBC-3 clause it enforces;
the field values are the ones libiscsi's iscsi-test-cu checks."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from raftblock.gateway import scsi, scsi_pr
from raftblock.gateway.scsi import (
    CHECK_CONDITION,
    GOOD,
    RESERVATION_CONFLICT,
    Lun,
    MemoryPrStore,
    Nexus,
    ScsiResult,
)

T = TypeVar("T")
BLOCK = 4096  # the backend's internal block
LBS = 512


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class MemBackend:
    """A volume in a bytearray with raftblock's semantics: 4 KiB blocks that are allocated or holes
    (holes read zeros); trim drops whole blocks only; zero() reads back zeros; block_status reports
    runs of allocation from the offset; compare_and_write is atomic (nothing else runs meanwhile)."""

    def __init__(self, size_bytes: int) -> None:
        self._size = size_bytes
        self.data = bytearray(size_bytes)
        self.allocated = [False] * ((size_bytes + BLOCK - 1) // BLOCK)
        self.calls: list[tuple[str, int, int]] = []
        self.flushes = 0
        self.fail: Exception | None = None

    @property
    def size_bytes(self) -> int:
        return self._size

    def resize(self, size_bytes: int) -> None:
        self._size = size_bytes
        self.data = self.data[:size_bytes] + bytearray(max(0, size_bytes - len(self.data)))
        self.allocated = (self.allocated + [False] * size_bytes)[: (size_bytes + BLOCK - 1) // BLOCK]

    def _check(self, offset: int, length: int) -> None:
        if self.fail is not None:
            raise self.fail
        assert 0 <= offset and offset + length <= self._size, (offset, length)

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.calls.append(("read", offset, length))
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.calls.append(("write", offset, len(data)))
        self.data[offset:offset + len(data)] = data
        for b in range(offset // BLOCK, (offset + len(data) + BLOCK - 1) // BLOCK):
            self.allocated[b] = True

    async def flush(self) -> None:
        self.flushes += 1

    def _drop_whole(self, offset: int, length: int) -> None:
        for b in range((offset + BLOCK - 1) // BLOCK, (offset + length) // BLOCK):
            self.allocated[b] = False
            self.data[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.calls.append(("trim", offset, length))
        self._drop_whole(offset, length)

    async def zero(self, offset: int, length: int, no_hole: bool) -> None:
        self._check(offset, length)
        self.calls.append(("zero_no_hole" if no_hole else "zero", offset, length))
        self.data[offset:offset + length] = bytes(length)
        for b in range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK):
            self.allocated[b] = True
        if not no_hole:
            self._drop_whole(offset, length)

    async def block_status(self, offset: int, length: int, max_descriptors: int) -> list[tuple[int, bool]]:
        self._check(offset, length)
        runs: list[tuple[int, bool]] = []
        pos, stop = offset, offset + length
        while pos < stop:
            alloc = self.allocated[pos // BLOCK]
            end = min(stop, (pos // BLOCK + 1) * BLOCK)
            if runs and runs[-1][1] == alloc:
                runs[-1] = (runs[-1][0] + end - pos, alloc)
            elif len(runs) == max_descriptors:
                break
            else:
                runs.append((end - pos, alloc))
            pos = end
        return runs

    async def compare_and_write(self, offset: int, verify: bytes | memoryview,
                                data: bytes | memoryview) -> int | None:
        self._check(offset, len(verify))
        current = self.data[offset:offset + len(verify)]
        for i, (a, b) in enumerate(zip(current, bytes(verify), strict=True)):
            if a != b:
                return i
        await self.write(offset, data)
        return None


A = Nexus("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test,i,0x23d000000001",
          "iqn.2024-01.io.raftblock:vol1,t,0x0001", 1)
B = Nexus("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2,i,0x23d000000002",
          "iqn.2024-01.io.raftblock:vol1,t,0x0001", 1)
C = Nexus("iqn.1994-05.com.example:host3,i,0x23d000000003", "iqn.2024-01.io.raftblock:vol1,t,0x0002", 2)


def make(size_bytes: int = 8 << 20, store: MemoryPrStore | None = None, **kw: object) -> tuple[Lun, MemBackend]:
    be = MemBackend(size_bytes)
    lun = Lun("vol1", be, volume_id=0x1234, pr_store=store or MemoryPrStore(), **kw)  # type: ignore[arg-type]
    return lun, be


def ex(lun: Lun, cdb: bytes, data: bytes = b"", nexus: Nexus = A, edtl: int | None = None) -> ScsiResult:
    return run(lun.execute(nexus, cdb, data, edtl_bytes=edtl))


def sense_of(r: ScsiResult) -> tuple[int, int, int]:
    assert r.status == CHECK_CONDITION and r.sense[0] & 0x7F == 0x70, r
    return r.sense[2] & 0x0F, r.sense[12], r.sense[13]


def info_of(r: ScsiResult) -> int:
    assert r.sense[0] & 0x80, "VALID (INFORMATION) not set"
    return int.from_bytes(r.sense[3:7], "big")


def field_of(r: ScsiResult) -> tuple[bool, int, int | None]:
    """(C/D, FIELD POINTER, BIT POINTER or None) of the sense-key specific bytes."""
    sks = r.sense[15:18]
    assert sks[0] & 0x80, "SKSV not set"
    return bool(sks[0] & 0x40), int.from_bytes(sks[1:3], "big"), (sks[0] & 0x07) if sks[0] & 0x08 else None


INVALID_OPCODE = (0x05, 0x20, 0x00)
INVALID_CDB = (0x05, 0x24, 0x00)
INVALID_PARAM = (0x05, 0x26, 0x00)
PARAM_LEN = (0x05, 0x1A, 0x00)
LBA_OOB = (0x05, 0x21, 0x00)
MISCOMPARE = (0x0E, 0x1D, 0x00)


# --- CDB builders (byte layouts of SBC-3 / SPC-4) -----------------------------------------------------
def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + (lba & 0xFFFFFFFF).to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\x00"


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + blocks.to_bytes(4, "big") + b"\x00\x00"


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + (lba & (2**64 - 1)).to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\x00\x00"


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((scsi.COMPARE_AND_WRITE, flags)) + lba.to_bytes(8, "big") + bytes(3) + bytes((blocks, 0, 0))


def ws10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw10(scsi.WRITE_SAME_10, lba, blocks, flags)


def ws16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw16(scsi.WRITE_SAME_16, lba, blocks, flags)


def unmap_cdb(plen: int, anchor: bool = False) -> bytes:
    return bytes((scsi.UNMAP, 1 if anchor else 0, 0, 0, 0, 0, 0)) + plen.to_bytes(2, "big") + b"\x00"


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    return (len(descs) + 6).to_bytes(2, "big") + len(descs).to_bytes(2, "big") + bytes(4) + descs


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return bytes((scsi.INQUIRY, evpd, page)) + alloc.to_bytes(2, "big") + b"\x00"


def rc16(alloc: int = 32) -> bytes:
    return bytes((scsi.SERVICE_ACTION_IN_16, scsi.SAI_READ_CAPACITY_16)) + bytes(8) + alloc.to_bytes(4, "big") + bytes(2)


def lba_status(lba: int, alloc: int = 24) -> bytes:
    return (bytes((scsi.SERVICE_ACTION_IN_16, scsi.SAI_GET_LBA_STATUS)) + lba.to_bytes(8, "big")
            + alloc.to_bytes(4, "big") + bytes(2))


def mode_sense6(page: int = 0x3F, pc: int = 0, dbd: bool = False, sub: int = 0, alloc: int = 255) -> bytes:
    return bytes((scsi.MODE_SENSE_6, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0))


def mode_sense10(page: int = 0x3F, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 4096) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes((scsi.MODE_SENSE_10, b1, (pc << 6) | page, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\x00"


def rsoc(options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 65535) -> bytes:
    return (bytes((scsi.MAINTENANCE_IN, scsi.MI_REPORT_SUPPORTED_OPERATION_CODES, (0x80 if rctd else 0) | options,
                   opcode)) + sa.to_bytes(2, "big") + alloc.to_bytes(4, "big") + bytes(2))


def pr_in(sa: int, alloc: int = 8192) -> bytes:
    return bytes((scsi.PERSISTENT_RESERVE_IN, sa)) + bytes(5) + alloc.to_bytes(2, "big") + b"\x00"


def pr_out(sa: int, rk: int = 0, sark: int = 0, pr_type: int = 0, flags: int = 0, scope: int = 0,
           plen: int = 24) -> tuple[bytes, bytes]:
    cdb = bytes((scsi.PERSISTENT_RESERVE_OUT, sa, (scope << 4) | pr_type, 0, 0)) + plen.to_bytes(4, "big") + b"\x00"
    params = rk.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(4) + bytes((flags, 0, 0, 0))
    return cdb, params


def prout(lun: Lun, nexus: Nexus, sa: int, **kw: int) -> ScsiResult:
    cdb, params = pr_out(sa, **kw)
    assert lun.data_out_bytes(cdb) == 24
    return ex(lun, cdb, params, nexus)


TUR = bytes(6)
READ_CAPACITY_10 = bytes((scsi.READ_CAPACITY_10,)) + bytes(9)
REQUEST_SENSE = bytes((scsi.REQUEST_SENSE, 0, 0, 0, 252, 0))
RESERVE6 = bytes((scsi.RESERVE_6,)) + bytes(5)
RELEASE6 = bytes((scsi.RELEASE_6,)) + bytes(5)


def keys_of(lun: Lun, nexus: Nexus = A) -> tuple[int, list[int]]:
    r = ex(lun, pr_in(scsi_pr.SA_READ_KEYS), nexus=nexus)
    assert r.status == GOOD
    d = bytes(r.data)
    n = int.from_bytes(d[4:8], "big")
    return int.from_bytes(d[0:4], "big"), [int.from_bytes(d[8 + i:16 + i], "big") for i in range(0, n, 8)]


def reservation_of(lun: Lun, nexus: Nexus = A) -> tuple[int, int] | None:
    d = bytes(ex(lun, pr_in(scsi_pr.SA_READ_RESERVATION), nexus=nexus).data)
    if int.from_bytes(d[4:8], "big") == 0:
        return None
    return int.from_bytes(d[8:16], "big"), d[21] & 0x0F


def clear_uas(lun: Lun, *nexuses: Nexus) -> None:
    for n in nexuses:
        while ex(lun, TUR, nexus=n).status != GOOD:
            pass


# === INQUIRY ===========================================================================================
def test_standard_inquiry_claims_spc4_and_sbc3() -> None:
    """SPC-4 6.6.2: standard data, VERSION 6 (SPC-4), RESPONSE DATA FORMAT 2, ADDITIONAL LENGTH = n-4;
    version descriptors SPC-4 (0460h) and SBC-3 (04C0h) (libiscsi reads SBC-3 support from them)."""
    lun, _ = make()
    d = bytes(ex(lun, inquiry(alloc=260)).data)
    assert d[0] == 0x00 and d[1] & 0x80 == 0  # PQ 0, direct access, not removable
    assert d[2] == 0x06 and d[3] & 0x0F == 2 and d[3] & 0xC0 == 0
    assert d[4] == len(d) - 5
    assert d[8:16] == b"RAFTBLCK" and d[16:32] == b"raftblock volume" and d[32:36] == b"0001"
    descriptors = {int.from_bytes(d[58 + 2 * i:60 + 2 * i], "big") for i in range(8)}
    assert {0x0460, 0x04C0} <= descriptors


def test_inquiry_is_cut_to_allocation_length() -> None:
    """SPC-4 4.2.5.6: the device server returns at most ALLOCATION LENGTH bytes (16-bit field)."""
    lun, _ = make()
    assert len(ex(lun, inquiry(alloc=5)).data) == 5
    assert ex(lun, inquiry(alloc=511)).data == ex(lun, inquiry(alloc=512)).data


def test_inquiry_page_code_without_evpd_is_invalid_field() -> None:
    """SPC-4 6.6.1: EVPD=0 with a non-zero PAGE CODE is INVALID FIELD IN CDB, pointing at byte 2."""
    lun, _ = make()
    r = ex(lun, inquiry(evpd=0, page=1))
    assert sense_of(r) == INVALID_CDB
    assert field_of(r)[:2] == (True, 2)


def test_unknown_vpd_page_is_invalid_field() -> None:
    """SPC-4 6.6.1: a VPD page the device server does not have is INVALID FIELD IN CDB."""
    lun, _ = make()
    assert sense_of(ex(lun, inquiry(1, 0x89))) == INVALID_CDB


def test_supported_vpd_pages_are_ascending_and_all_readable() -> None:
    """SPC-4 7.8.13: page 00h lists the supported pages in ascending order; each one can be read."""
    lun, _ = make()
    d = bytes(ex(lun, inquiry(1, 0x00)).data)
    pages = list(d[4:4 + int.from_bytes(d[2:4], "big")])
    assert pages == sorted(pages) and {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for p in pages:
        r = ex(lun, inquiry(1, p))
        assert r.status == GOOD and r.data[1] == p
        assert len(r.data) == 4 + int.from_bytes(r.data[2:4], "big")


def _designators(d: bytes) -> list[tuple[int, int, int, bytes]]:
    out, at = [], 4
    while at < len(d):
        n = d[at + 3]
        out.append((d[at] & 0x0F, (d[at + 1] >> 4) & 0x03, d[at + 1] & 0x0F, d[at + 4:at + 4 + n]))
        at += 4 + n
    return out


def test_device_identification_names_lu_and_target_port() -> None:
    """SPC-4 7.8.6: an NAA designator for the LU (derived from volume_id), a T10 vendor ID designator,
    and the relative target port / SCSI name string of the port the command came through."""
    lun, _ = make()
    d = bytes(ex(lun, inquiry(1, 0x83), nexus=C).data)
    des = _designators(d)
    naa = [v for cs, assoc, t, v in des if t == 3 and assoc == 0]
    assert naa and naa[0][0] >> 4 == 0x3 and int.from_bytes(naa[0], "big") & ((1 << 60) - 1) == 0x1234
    assert any(t == 1 and assoc == 0 and v.startswith(b"RAFTBLCK") for cs, assoc, t, v in des)
    assert (1, 1, 4, (2).to_bytes(4, "big")) in des  # relative target port 2
    names = [v.rstrip(b"\x00") for cs, assoc, t, v in des if t == 8]
    assert C.target_port.encode() in names and b"iqn.2024-01.io.raftblock:vol1" in names
    assert all(len(v) % 4 == 0 for cs, assoc, t, v in des if t == 8)
    assert bytes(ex(lun, inquiry(1, 0x80)).data)[4:] == b"0000000000001234"


def test_block_limits_vpd() -> None:
    """SBC-3 6.5.3: page length 3Ch; WSNZ; MAXIMUM COMPARE AND WRITE LENGTH; OPTIMAL TRANSFER LENGTH
    GRANULARITY 8 (4 KiB internal blocks); MAXIMUM TRANSFER LENGTH; UNMAP limits (libiscsi: not 0 and
    at most 1M blocks); OPTIMAL UNMAP GRANULARITY 8; MAXIMUM WRITE SAME LENGTH."""
    lun, _ = make()
    d = bytes(ex(lun, inquiry(1, 0xB0)).data)
    assert len(d) == 64 and d[3] == 0x3C
    assert d[4] & 0x01 == 1
    assert d[5] == (64 << 10) // LBS
    assert int.from_bytes(d[6:8], "big") == 8
    assert int.from_bytes(d[8:12], "big") == (32 << 20) // LBS
    assert 0 < int.from_bytes(d[20:24], "big") <= 1024 * 1024
    assert 0 < int.from_bytes(d[24:28], "big") <= 1024 * 1024
    assert int.from_bytes(d[28:32], "big") == 8 and d[32] & 0x80
    assert int.from_bytes(d[36:44], "big") == (1 << 30) // LBS


def test_block_device_characteristics_and_provisioning_vpd() -> None:
    """SBC-3 6.5.2: MEDIUM ROTATION RATE 1 (non-rotating); SBC-3 6.5.4: LBPU, LBPWS, LBPWS10, LBPRZ=1,
    ANC_SUP=0, PROVISIONING TYPE thin (010b)."""
    lun, _ = make()
    d = bytes(ex(lun, inquiry(1, 0xB1)).data)
    assert d[3] == 0x3C and int.from_bytes(d[4:6], "big") == 1
    d = bytes(ex(lun, inquiry(1, 0xB2)).data)
    assert d[5] & 0xE0 == 0xE0 and (d[5] >> 2) & 0x07 == 1 and d[5] & 0x02 == 0 and d[6] & 0x07 == 2


# === READ CAPACITY =====================================================================================
def test_read_capacity_10_and_16() -> None:
    """SBC-3 5.15/5.16: last LBA and block length; (16) LBPME=1, LBPRZ=1, LOGICAL BLOCKS PER PHYSICAL
    BLOCK EXPONENT 3 (4 KiB physical blocks), no protection; cut to the allocation length."""
    lun, _ = make(8 << 20)
    d = bytes(ex(lun, READ_CAPACITY_10).data)
    assert int.from_bytes(d[0:4], "big") == (8 << 20) // LBS - 1 and int.from_bytes(d[4:8], "big") == LBS
    d = bytes(ex(lun, rc16()).data)
    assert int.from_bytes(d[0:8], "big") == (8 << 20) // LBS - 1 and int.from_bytes(d[8:12], "big") == LBS
    assert d[12] == 0 and d[13] == 3 and d[14] & 0xC0 == 0xC0
    assert len(ex(lun, rc16(alloc=15)).data) == 15 and ex(lun, rc16(alloc=0)).data == b""


def test_read_capacity_16_physical_block_is_configurable() -> None:
    """SBC-3 5.16: LBPPBE reports physical_block_bytes / logical_block_bytes as a power of two."""
    lun, _ = make(physical_block_bytes=512)
    assert ex(lun, rc16()).data[13] == 0


# === READ / WRITE =====================================================================================
@pytest.mark.parametrize("size", [10, 12, 16])
def test_write_then_read_round_trip(size: int) -> None:
    """SBC-3 5.32/5.33 (WRITE 10/12/16), 5.11-5.13 (READ): the blocks written are the blocks read."""
    lun, _ = make()
    build, op_w, op_r = {10: (rw10, scsi.WRITE_10, scsi.READ_10), 12: (rw12, scsi.WRITE_12, scsi.READ_12),
                         16: (rw16, scsi.WRITE_16, scsi.READ_16)}[size]
    data = bytes(range(256)) * 6
    assert lun.data_out_bytes(build(op_w, 7, 3, 0)) == 3 * LBS
    assert ex(lun, build(op_w, 7, 3, 0), data).status == GOOD
    assert bytes(ex(lun, build(op_r, 7, 3, 0)).data) == data


def test_read6_write6_transfer_length_zero_means_256() -> None:
    """SBC-3 5.10/5.31: READ(6)/WRITE(6) TRANSFER LENGTH 0 is 256 blocks."""
    lun, _ = make()
    assert lun.data_out_bytes(rw6(scsi.WRITE_6, 1, 0)) == 256 * LBS
    assert ex(lun, rw6(scsi.WRITE_6, 1, 0), b"\x5a" * 256 * LBS).status == GOOD
    d = bytes(ex(lun, rw6(scsi.READ_6, 1, 0)).data)
    assert d == b"\x5a" * 256 * LBS


def test_zero_blocks_and_out_of_range() -> None:
    """SBC-3 4.5: LBA + transfer length past the capacity is LBA OUT OF RANGE (also with 0 blocks
    past the end); a 0-block transfer inside is GOOD and moves nothing."""
    lun, _ = make()
    n = lun.block_count
    assert ex(lun, rw10(scsi.READ_10, 0, 0)).status == GOOD
    assert ex(lun, rw10(scsi.READ_10, n - 1, 1)).status == GOOD
    for cdb in (rw10(scsi.READ_10, n + 1, 0), rw10(scsi.READ_10, n, 1), rw10(scsi.READ_10, n - 1, 2),
                rw10(scsi.READ_10, 0xFFFFFFFF, 1), rw16(scsi.READ_16, 2**63, 1), rw16(scsi.WRITE_16, 2**64 - 1, 1),
                rw6(scsi.READ_6, 0x1FFFFF, 1)):
        assert sense_of(ex(lun, cdb)) == LBA_OOB, cdb.hex()
    assert lun.data_out_bytes(rw10(scsi.WRITE_10, n, 1)) == 0


def test_transfer_longer_than_maximum_is_invalid_field() -> None:
    """SBC-3 6.5.3: a TRANSFER LENGTH over MAXIMUM TRANSFER LENGTH is INVALID FIELD IN CDB, pointing at
    the TRANSFER LENGTH field."""
    lun, _ = make(max_transfer_bytes=64 * LBS)
    r = ex(lun, rw10(scsi.READ_10, 0, 65))
    assert sense_of(r) == INVALID_CDB and field_of(r) == (True, 7, 7)
    assert lun.data_out_bytes(rw10(scsi.WRITE_10, 0, 65)) == 0


@pytest.mark.parametrize("op", [scsi.READ_10, scsi.WRITE_10, scsi.VERIFY_10, scsi.WRITE_AND_VERIFY_10])
def test_protection_fields_are_invalid(op: int) -> None:
    """SBC-3 5.x: RDPROTECT/WRPROTECT/VRPROTECT != 0 without protection information is INVALID FIELD
    IN CDB at byte 1 bit 7."""
    lun, _ = make()
    for prot in range(1, 8):
        r = ex(lun, rw10(op, 0, 1, prot << 5), bytes(LBS))
        assert sense_of(r) == INVALID_CDB and field_of(r) == (True, 1, 7)


def test_dpo_fua_accepted_and_advertised() -> None:
    """SBC-3 6.4.2: DPOFUA=1 in the device-specific parameter, so DPO/FUA (and SBC-3's FUA_NV) are
    accepted on READ/WRITE; CDB usage data shows them (SPC-4 6.35.3)."""
    lun, _ = make()
    ms = bytes(ex(lun, mode_sense6()).data)
    assert ms[2] & 0x10
    for flags in (0x10, 0x08, 0x18, 0x02, 0x1A):
        assert ex(lun, rw10(scsi.WRITE_10, 0, 1, flags), bytes(LBS)).status == GOOD
        assert ex(lun, rw10(scsi.READ_10, 0, 1, flags)).status == GOOD
    for op in (scsi.READ_10, scsi.COMPARE_AND_WRITE):
        d = bytes(ex(lun, rsoc(1, op)).data)
        assert d[4] == op and d[5] & 0x18 == 0x18


def test_short_data_out_writes_only_the_blocks_received() -> None:
    """SAM-5 / RFC 7143 11.4.5.1: EDTL < transfer length is an overflow: the whole blocks received are
    written and the command succeeds (libiscsi Write10Residuals: second block untouched)."""
    lun, be = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 2), b"a" * 2 * LBS)
    assert ex(lun, rw10(scsi.WRITE_10, 0, 2), b"b" * LBS).status == GOOD
    assert be.data[:2 * LBS] == b"b" * LBS + b"a" * LBS
    assert ex(lun, rw10(scsi.WRITE_10, 0, 1), b"c" * 200).status == GOOD  # no whole block: nothing written
    assert be.data[:LBS] == b"b" * LBS
    assert ex(lun, rw10(scsi.WRITE_10, 0, 1), b"d" * 3 * LBS).status == GOOD  # more than TL: the rest ignored
    assert be.data[:2 * LBS] == b"d" * LBS + b"a" * LBS


def test_unsupported_opcodes_are_invalid_command_operation_code() -> None:
    """SPC-4 4.5.6: an opcode the device server does not implement is INVALID COMMAND OPERATION CODE
    (libiscsi then skips): ORWRITE, WRITE ATOMIC(16), EXTENDED COPY, RECEIVE COPY RESULTS, READ DEFECT
    DATA, SANITIZE, FORMAT UNIT."""
    lun, _ = make()
    for op in (0x8B, 0x9C, 0x83, 0x84, 0x37, 0xB7, 0x48, 0x04, 0xC0, 0x7F):
        cdb = bytes((op,)) + bytes(15)
        assert sense_of(ex(lun, cdb)) == INVALID_OPCODE, hex(op)
        assert lun.data_out_bytes(cdb) == 0
    assert sense_of(ex(lun, b"")) == INVALID_OPCODE


def test_naca_is_refused() -> None:
    """SAM-5 5.9: NACA=1 in the CONTROL byte without ACA support is INVALID FIELD IN CDB."""
    lun, _ = make()
    r = ex(lun, bytes((0, 0, 0, 0, 0, 0x04)))
    assert sense_of(r) == INVALID_CDB and field_of(r) == (True, 5, 2)


# === VERIFY / WRITE AND VERIFY ========================================================================
def test_verify_bytchk_compares_and_reports_offset() -> None:
    """SBC-3 5.27: BYTCHK=01b compares the Data-Out Buffer with the medium; a difference is MISCOMPARE,
    MISCOMPARE DURING VERIFY OPERATION, with the offset of the first differing byte in INFORMATION."""
    lun, _ = make()
    data = bytes(range(256)) * 8
    ex(lun, rw10(scsi.WRITE_10, 4, 4), data)
    cdb = rw10(scsi.VERIFY_10, 4, 4, 0x02)
    assert lun.data_out_bytes(cdb) == 4 * LBS
    assert ex(lun, cdb, data).status == GOOD
    bad = bytearray(data)
    bad[1234] ^= 0x58
    r = ex(lun, cdb, bytes(bad))
    assert sense_of(r) == MISCOMPARE and info_of(r) == 1234


def test_verify_without_bytchk_moves_no_data() -> None:
    """SBC-3 5.27: BYTCHK=0 verifies the medium only: no data-out, GOOD whatever the initiator holds."""
    lun, _ = make()
    cdb = rw16(scsi.VERIFY_16, 0, 300)
    assert lun.data_out_bytes(cdb) == 0
    assert ex(lun, cdb).status == GOOD
    assert sense_of(ex(lun, rw16(scsi.VERIFY_16, lun.block_count, 1))) == LBA_OOB


def test_verify_bytchk_11b_compares_one_block_with_each() -> None:
    """SBC-4 5.30: BYTCHK=11b sends one block, compared with every block of the range."""
    lun, be = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 3), b"\x11" * 3 * LBS)
    cdb = rw10(scsi.VERIFY_10, 0, 3, 0x06)
    assert lun.data_out_bytes(cdb) == LBS
    assert ex(lun, cdb, b"\x11" * LBS).status == GOOD
    be.data[2 * LBS + 10] = 0
    r = ex(lun, cdb, b"\x11" * LBS)
    assert sense_of(r) == MISCOMPARE and info_of(r) == 10


def test_verify_bytchk_10b_is_reserved() -> None:
    """SBC-4 5.30: BYTCHK=10b is reserved: INVALID FIELD IN CDB."""
    lun, _ = make()
    assert sense_of(ex(lun, rw10(scsi.VERIFY_10, 0, 1, 0x04))) == INVALID_CDB


def test_write_and_verify_writes() -> None:
    """SBC-3 5.34: WRITE AND VERIFY writes the data (then verifies it); 0 blocks is GOOD."""
    lun, be = make()
    cdb = rw12(scsi.WRITE_AND_VERIFY_12, 3, 2, 0x02)
    assert lun.data_out_bytes(cdb) == 2 * LBS
    assert ex(lun, cdb, b"v" * 2 * LBS).status == GOOD
    assert be.data[3 * LBS:5 * LBS] == b"v" * 2 * LBS
    assert ex(lun, rw10(scsi.WRITE_AND_VERIFY_10, 0, 0)).status == GOOD


# === COMPARE AND WRITE ================================================================================
def test_compare_and_write_success_and_miscompare() -> None:
    """SBC-3 5.2: equal verify data -> the write data is written; otherwise MISCOMPARE with the offset
    of the first differing byte in INFORMATION and nothing written."""
    lun, be = make()
    ex(lun, rw16(scsi.WRITE_16, 10, 2), b"A" * 2 * LBS)
    cdb = caw(10, 2)
    assert lun.data_out_bytes(cdb) == 4 * LBS
    assert ex(lun, cdb, b"A" * 2 * LBS + b"B" * 2 * LBS).status == GOOD
    assert be.data[10 * LBS:12 * LBS] == b"B" * 2 * LBS
    verify = bytearray(b"B" * 2 * LBS)
    verify[2 * LBS - 27] = ord("C")
    r = ex(lun, cdb, bytes(verify) + b"Z" * 2 * LBS)
    assert sense_of(r) == MISCOMPARE and info_of(r) == 2 * LBS - 27
    assert be.data[10 * LBS:12 * LBS] == b"B" * 2 * LBS


def test_compare_and_write_limits_and_data_out_size() -> None:
    """SBC-3 5.2: NUMBER OF LOGICAL BLOCKS over MAXIMUM COMPARE AND WRITE LENGTH (VPD B0) is INVALID
    FIELD IN CDB; a data-out size other than 2 x blocks is refused (libiscsi InvalidDataOutSize, and
    NUMBER OF LOGICAL BLOCKS 0 with data)."""
    lun, _ = make(compare_write_max_bytes=4 * LBS)
    assert lun.data_out_bytes(caw(0, 5)) == 0
    assert sense_of(ex(lun, caw(0, 5), bytes(10 * LBS))) == INVALID_CDB
    assert sense_of(ex(lun, caw(0, 1), bytes(2 * LBS), edtl=4 * LBS)) == INVALID_CDB
    assert sense_of(ex(lun, caw(0, 1), bytes(LBS))) == INVALID_CDB
    assert sense_of(ex(lun, caw(0, 0), b"", edtl=512 * LBS)) == INVALID_CDB
    assert ex(lun, caw(0, 0)).status == GOOD
    assert sense_of(ex(lun, caw(lun.block_count - 1, 2), bytes(4 * LBS))) == LBA_OOB


# === WRITE SAME =======================================================================================
def test_write_same_replicates_the_block() -> None:
    """SBC-3 5.41: WRITE SAME writes the one block of the Data-Out Buffer to every LBA of the range,
    in pieces of at most MAXIMUM TRANSFER LENGTH."""
    lun, be = make(max_transfer_bytes=4 * LBS)
    block = bytes(range(256)) * 2
    cdb = ws10(3, 10)
    assert lun.data_out_bytes(cdb) == LBS
    assert ex(lun, cdb, block).status == GOOD
    assert be.data[3 * LBS:13 * LBS] == block * 10
    assert max(n for op, _, n in be.calls if op == "write") <= 4 * LBS


def test_write_same_of_zeros_uses_zero() -> None:
    """SBC-3 5.41 / 4.7.3.3: zeros without UNMAP are written as allocated zeros (zero(no_hole=True));
    with UNMAP the range is unmapped and, LBPRZ=1, reads zeros (zero(no_hole=False))."""
    lun, be = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 16), b"\xff" * 16 * LBS)
    assert ex(lun, ws16(0, 16), bytes(LBS)).status == GOOD
    assert be.calls[-1] == ("zero_no_hole", 0, 16 * LBS)
    ex(lun, rw10(scsi.WRITE_10, 0, 16), b"\xff" * 16 * LBS)
    assert ex(lun, ws10(1, 9, 0x08), bytes(LBS)).status == GOOD
    assert be.calls[-1] == ("zero", LBS, 9 * LBS)
    assert bytes(ex(lun, rw10(scsi.READ_10, 0, 16)).data) == b"\xff" * LBS + bytes(9 * LBS) + b"\xff" * 6 * LBS
    assert be.allocated[0] is True and be.allocated[1] is True  # partial 4 KiB blocks stay, zeroed


def test_write_same_16_ndob_needs_no_data() -> None:
    """SBC-4 5.45: NDOB=1 (WRITE SAME(16)) means zeros and no Data-Out Buffer."""
    lun, be = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 8), b"\xff" * 8 * LBS)
    cdb = ws16(0, 8, 0x08 | 0x01)
    assert lun.data_out_bytes(cdb) == 0
    assert ex(lun, cdb).status == GOOD
    assert be.data[:8 * LBS] == bytes(8 * LBS) and be.allocated[0] is False


def test_write_same_field_checks() -> None:
    """SBC-3 5.41/6.5.3: NUMBER OF LOGICAL BLOCKS 0 with WSNZ=1, over MAXIMUM WRITE SAME LENGTH, ANCHOR
    (ANC_SUP=0) and WRPROTECT are INVALID FIELD IN CDB; out-of-range is LBA OUT OF RANGE; a data-out
    other than one block is refused (libiscsi WriteSame InvalidDataOutSize)."""
    lun, _ = make(write_same_max_bytes=100 * LBS)
    n = lun.block_count
    assert sense_of(ex(lun, ws10(0, 0), bytes(LBS))) == INVALID_CDB
    assert sense_of(ex(lun, ws16(0, 101), bytes(LBS))) == INVALID_CDB
    assert sense_of(ex(lun, ws10(0, 1, 0x10 | 0x08), bytes(LBS))) == INVALID_CDB
    assert sense_of(ex(lun, ws10(0, 1, 0x20), bytes(LBS))) == INVALID_CDB
    assert sense_of(ex(lun, ws10(n - 1, 2), bytes(LBS))) == LBA_OOB
    assert sense_of(ex(lun, ws16(0x8000000000000000, 1), bytes(LBS))) == LBA_OOB
    assert sense_of(ex(lun, ws10(0, 1, 0x08), bytes(LBS // 2))) == INVALID_CDB
    assert sense_of(ex(lun, ws10(0, 1, 0x08), bytes(LBS), edtl=2 * LBS)) == INVALID_CDB
    assert ex(lun, ws10(n - 1, 1), bytes(LBS)).status == GOOD


# === UNMAP / GET LBA STATUS ============================================================================
def test_unmap_zeroes_every_range_even_partial_blocks() -> None:
    """SBC-3 5.28 with LBPRZ=1 (4.7.3.2): unmapped LBAs read zeros, including LBAs of partly unmapped
    4 KiB backend blocks; whole blocks become holes."""
    lun, be = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 32), b"a" * 32 * LBS)
    params = unmap_params((1, 1), (8, 8), (30, 0))
    assert lun.data_out_bytes(unmap_cdb(len(params))) == len(params)
    assert ex(lun, unmap_cdb(len(params)), params).status == GOOD
    d = bytes(ex(lun, rw10(scsi.READ_10, 0, 32)).data)
    assert d == b"a" * LBS + bytes(LBS) + b"a" * 6 * LBS + bytes(8 * LBS) + b"a" * 16 * LBS
    assert be.allocated[:3] == [True, False, True]


def test_unmap_checks_before_changing_anything() -> None:
    """SBC-3 5.28: a descriptor past the capacity is LBA OUT OF RANGE; more descriptors than MAXIMUM
    UNMAP BLOCK DESCRIPTOR COUNT or blocks than MAXIMUM UNMAP LBA COUNT is INVALID FIELD IN PARAMETER
    LIST; a parameter list shorter than 8 bytes is PARAMETER LIST LENGTH ERROR; ANCHOR is refused.
    None of them unmaps anything."""
    lun, be = make(unmap_descriptors_max=2, unmap_max_bytes=16 * LBS)
    ex(lun, rw10(scsi.WRITE_10, 0, 8), b"a" * 8 * LBS)
    for params, want in ((unmap_params((0, 8), (lun.block_count, 1)), LBA_OOB),
                         (unmap_params((0, 1), (1, 1), (2, 1)), INVALID_PARAM),
                         (unmap_params((0, 8), (8, 9)), INVALID_PARAM)):
        r = ex(lun, unmap_cdb(len(params)), params)
        assert sense_of(r) == want
    r = ex(lun, unmap_cdb(len(unmap_params((0, 1), (1, 1), (2, 1)))), unmap_params((0, 1), (1, 1), (2, 1)))
    assert field_of(r)[0] is False  # the field is in the parameter list
    assert sense_of(ex(lun, unmap_cdb(6), bytes(6))) == PARAM_LEN
    assert sense_of(ex(lun, unmap_cdb(24, anchor=True), unmap_params((0, 1)))) == INVALID_CDB
    assert ex(lun, unmap_cdb(0)).status == GOOD
    assert ex(lun, unmap_cdb(8), unmap_params()).status == GOOD
    assert be.data[:8 * LBS] == b"a" * 8 * LBS and not [c for c in be.calls if c[0].startswith("zero")]


def _lba_descriptors(r: ScsiResult) -> list[tuple[int, int, int]]:
    d = bytes(r.data)
    n = int.from_bytes(d[0:4], "big") - 4
    return [(int.from_bytes(d[8 + i:16 + i], "big"), int.from_bytes(d[16 + i:20 + i], "big"), d[20 + i] & 0x0F)
            for i in range(0, n, 16) if 8 + i + 16 <= len(d)]


def test_get_lba_status_reports_mapped_and_deallocated() -> None:
    """SBC-3 5.4: the first descriptor starts at STARTING LOGICAL BLOCK ADDRESS; PROVISIONING STATUS 0
    mapped, 1 deallocated; descriptors are cut to the allocation length, PARAMETER DATA LENGTH is not."""
    lun, _ = make()
    ex(lun, rw10(scsi.WRITE_10, 0, 24), b"x" * 24 * LBS)
    ex(lun, unmap_cdb(24), unmap_params((8, 8)))
    r = ex(lun, lba_status(0, alloc=8 + 16 * 8))
    descs = _lba_descriptors(r)
    assert descs[:3] == [(0, 8, 0), (8, 8, 1), (16, 8, 0)]
    assert descs[3][0] == 24 and descs[3][2] == 1
    assert _lba_descriptors(ex(lun, lba_status(9)))[0] == (9, 7, 1)
    short = ex(lun, lba_status(0, alloc=24))
    assert len(short.data) == 24 and int.from_bytes(bytes(short.data)[0:4], "big") == 20
    assert sense_of(ex(lun, lba_status(lun.block_count))) == LBA_OOB
    assert sense_of(ex(lun, lba_status(2**64 - 1))) == LBA_OOB


# === SYNCHRONIZE CACHE / PRE-FETCH / START STOP / PREVENT ALLOW =======================================
def test_synchronize_cache_flushes() -> None:
    """SBC-3 5.22/5.23: SYNCHRONIZE CACHE (10/16) waits for the backend's flush; the range is checked."""
    lun, be = make()
    assert ex(lun, rw10(scsi.SYNCHRONIZE_CACHE_10, 0, 0)).status == GOOD
    assert ex(lun, rw16(scsi.SYNCHRONIZE_CACHE_16, 0, 10, 0x02)).status == GOOD
    assert be.flushes == 2
    assert sense_of(ex(lun, rw10(scsi.SYNCHRONIZE_CACHE_10, lun.block_count + 1, 0))) == LBA_OOB


def test_pre_fetch_is_good_not_condition_met() -> None:
    """SBC-3 5.9: without a cache PRE-FETCH answers GOOD (CONDITION MET would claim cached blocks);
    the range is checked."""
    lun, _ = make()
    assert ex(lun, rw10(scsi.PRE_FETCH_10, 0, 256, 0x02)).status == GOOD
    assert ex(lun, rw16(scsi.PRE_FETCH_16, lun.block_count - 1, 1)).status == GOOD
    assert sense_of(ex(lun, rw10(scsi.PRE_FETCH_10, lun.block_count - 1, 2))) == LBA_OOB


def test_start_stop_and_prevent_allow_on_fixed_medium() -> None:
    """SBC-3 5.20 / SPC-4 6.13: the medium is not removable (RMB=0) and always ready."""
    lun, _ = make()
    assert ex(lun, bytes((scsi.START_STOP_UNIT, 1, 0, 0, 0x01, 0))).status == GOOD
    assert ex(lun, bytes((scsi.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0))).status == GOOD
    assert ex(lun, TUR).status == GOOD


# === MODE SENSE / MODE SELECT =========================================================================
def _pages(data: bytes, header: int) -> dict[int, bytes]:
    bdl = data[3] if header == 4 else int.from_bytes(data[6:8], "big")
    out, at = {}, header + bdl
    while at < len(data):
        out[data[at] & 0x3F] = data[at:at + 2 + data[at + 1]]
        at += 2 + data[at + 1]
    return out


def test_mode_sense_all_pages() -> None:
    """SPC-4 6.11/7.5: MODE SENSE(6) 3Fh returns the header, a short block descriptor (blocks, block
    length) and the caching (WCE=0), control (QAM 1, D_SENSE 0, SWP 0) and informational exceptions
    pages; MODE DATA LENGTH excludes itself."""
    lun, _ = make()
    d = bytes(ex(lun, mode_sense6()).data)
    assert d[0] == len(d) - 1 and d[3] == 8
    assert int.from_bytes(d[4:8], "big") == lun.block_count and int.from_bytes(d[9:12], "big") == LBS
    pages = _pages(d, 4)
    assert set(pages) == {0x08, 0x0A, 0x1C}
    assert pages[0x08][1] == 0x12 and pages[0x08][2] & 0x04 == 0
    assert pages[0x0A][1] == 0x0A and pages[0x0A][2] & 0x04 == 0 and pages[0x0A][3] >> 4 == 1
    assert pages[0x0A][4] & 0x08 == 0
    one = bytes(ex(lun, mode_sense6(0x0A)).data)
    assert _pages(one, 4) == {0x0A: pages[0x0A]}
    assert len(ex(lun, mode_sense6(alloc=4)).data) == 4


def test_mode_sense_10_dbd_and_llbaa() -> None:
    """SPC-4 6.12: DBD=1 omits block descriptors; LLBAA=1 gives a 16-byte descriptor with LONGLBA."""
    lun, _ = make()
    d = bytes(ex(lun, mode_sense10(dbd=True)).data)
    assert int.from_bytes(d[0:2], "big") == len(d) - 2 and int.from_bytes(d[6:8], "big") == 0
    d = bytes(ex(lun, mode_sense10(llbaa=True)).data)
    assert d[4] & 0x01 and int.from_bytes(d[6:8], "big") == 16
    assert int.from_bytes(d[8:16], "big") == lun.block_count and int.from_bytes(d[20:24], "big") == LBS


def test_mode_sense_page_control() -> None:
    """SPC-4 6.11: PC=01b changeable values are all zero (nothing can change); 10b default equals
    current; 11b saved is SAVING PARAMETERS NOT SUPPORTED (39h/00h); unknown page/subpage INVALID
    FIELD IN CDB."""
    lun, _ = make()
    cur = _pages(bytes(ex(lun, mode_sense6()).data), 4)
    chg = _pages(bytes(ex(lun, mode_sense6(pc=1)).data), 4)
    assert all(p[2:] == bytes(len(p) - 2) for p in chg.values()) and set(chg) == set(cur)
    assert _pages(bytes(ex(lun, mode_sense6(pc=2)).data), 4) == cur
    assert sense_of(ex(lun, mode_sense6(pc=3))) == (0x05, 0x39, 0x00)
    r = ex(lun, mode_sense6(0x19))
    assert sense_of(r) == INVALID_CDB and field_of(r) == (True, 2, 5)
    assert sense_of(ex(lun, mode_sense6(0x0A, sub=1))) == INVALID_CDB


def test_mode_select_accepts_current_refuses_changes() -> None:
    """SPC-4 6.9/6.10: parameters equal to the current values are accepted; changing a field the
    changeable mask does not allow (WCE) is INVALID FIELD IN PARAMETER LIST at that byte; SP=1 is
    INVALID FIELD IN CDB (no saved pages); a list shorter than its header PARAMETER LIST LENGTH ERROR."""
    lun, _ = make()
    d = bytes(ex(lun, mode_sense6(0x08)).data)
    params = bytes((0, 0, 0, 8)) + d[4:]
    cdb = bytes((scsi.MODE_SELECT_6, 0x10, 0, 0, len(params), 0))
    assert lun.data_out_bytes(cdb) == len(params)
    assert ex(lun, cdb, params).status == GOOD
    changed = bytearray(params)
    changed[12 + 2] |= 0x04  # WCE
    r = ex(lun, cdb, bytes(changed))
    assert sense_of(r) == INVALID_PARAM and field_of(r) == (False, 14, None)
    assert sense_of(ex(lun, bytes((scsi.MODE_SELECT_6, 0x11, 0, 0, len(params), 0)), params)) == INVALID_CDB
    assert sense_of(ex(lun, bytes((scsi.MODE_SELECT_6, 0x10, 0, 0, 3, 0)), bytes(3))) == PARAM_LEN
    ten = bytes((0, 0, 0, 0, 0, 0, 0, 0)) + d[12:]
    cdb10 = bytes((scsi.MODE_SELECT_10, 0x10)) + bytes(5) + len(ten).to_bytes(2, "big") + b"\x00"
    assert ex(lun, cdb10, ten).status == GOOD


def test_control_page_swp_is_not_changeable() -> None:
    """SPC-4 7.5.8: SWP is not in the changeable mask (libiscsi Control-SWP then skips)."""
    lun, _ = make()
    chg = _pages(bytes(ex(lun, mode_sense6(0x0A, pc=1, dbd=True)).data), 4)
    assert chg[0x0A][4] & 0x08 == 0


# === REPORT LUNS / REQUEST SENSE / RSOC ===============================================================
def test_report_luns_lists_lun_0() -> None:
    """SPC-4 6.33: one LUN (0), LUN LIST LENGTH 8; SELECT REPORT 01h (well known) is empty."""
    lun, _ = make()
    cdb = bytes((scsi.REPORT_LUNS, 0, 0, 0, 0, 0)) + (64).to_bytes(4, "big") + bytes(2)
    assert bytes(ex(lun, cdb).data) == (8).to_bytes(4, "big") + bytes(4) + bytes(8)
    wk = bytes((scsi.REPORT_LUNS, 0, 1, 0, 0, 0)) + (64).to_bytes(4, "big") + bytes(2)
    assert bytes(ex(lun, wk).data) == bytes(8)
    assert sense_of(ex(lun, bytes((scsi.REPORT_LUNS, 0, 7, 0, 0, 0)) + (64).to_bytes(4, "big") + bytes(2))) == INVALID_CDB


def test_request_sense_without_condition_is_no_sense() -> None:
    """SPC-4 6.39: no pending condition: GOOD with NO SENSE / NO ADDITIONAL SENSE INFORMATION, fixed
    format, or descriptor format when DESC=1."""
    lun, _ = make()
    r = ex(lun, REQUEST_SENSE)
    assert r.status == GOOD and r.data[0] == 0x70 and r.data[2] & 0x0F == 0 and r.data[12:14] == b"\x00\x00"
    r = ex(lun, bytes((scsi.REQUEST_SENSE, 1, 0, 0, 252, 0)))
    assert r.status == GOOD and r.data[0] == 0x72


def _rsoc_all(lun: Lun, rctd: bool = False) -> list[tuple[int, int, int, int]]:
    d = bytes(ex(lun, rsoc(rctd=rctd)).data)
    n = int.from_bytes(d[0:4], "big")
    out, at = [], 4
    while at < 4 + n:
        out.append((d[at], int.from_bytes(d[at + 2:at + 4], "big"), d[at + 5], int.from_bytes(d[at + 6:at + 8], "big")))
        if d[at + 5] & 0x02:
            assert int.from_bytes(d[at + 8:at + 10], "big") == 0x0A
            at += 12
        at += 8
    return out


def test_report_supported_operation_codes_lists_what_executes() -> None:
    """SPC-4 6.35: every listed command is implemented (none answers INVALID COMMAND OPERATION CODE)
    and every command answered is listed; one-command forms return the CDB usage data starting with
    the opcode (SUPPORT 011b); reporting option 1 on an opcode with service actions and option 2 on
    one without are INVALID FIELD IN CDB."""
    lun, _ = make()
    listed = _rsoc_all(lun)
    ops = {op for op, *_ in listed}
    assert {0x00, 0x03, 0x12, 0x25, 0x28, 0x2A, 0x35, 0x41, 0x42, 0x5E, 0x5F, 0x89, 0x93, 0x9E, 0xA0, 0xA3} <= ops
    for op, sa, flags, length in listed:
        servactv = bool(flags & 0x01)
        assert flags & 0x02 == 0 and (servactv or sa == 0)
        one = ex(lun, rsoc(2 if servactv else 1, op, sa))
        d = bytes(one.data)
        assert one.status == GOOD and d[1] & 0x07 == 0x03 and int.from_bytes(d[2:4], "big") == length
        assert d[4] == op and len(d) == 4 + length
        assert sense_of(ex(lun, rsoc(1 if servactv else 2, op, sa))) == INVALID_CDB
        cdb = bytes((op, sa)) + bytes(length - 2)
        r = ex(lun, cdb, bytes(lun.data_out_bytes(cdb)))
        assert r.status != CHECK_CONDITION or sense_of(r)[1:] != (0x20, 0x00), hex(op)
    for op in range(256):
        if op in ops:
            continue
        r = ex(lun, bytes((op,)) + bytes(15))
        assert sense_of(r) == INVALID_OPCODE, hex(op)
        assert bytes(ex(lun, rsoc(1, op)).data)[1] & 0x07 == 0x01  # SUPPORT 001b: not supported


def test_report_supported_operation_codes_rctd() -> None:
    """SPC-4 6.35.2: RCTD=1 adds a command timeouts descriptor (length 0Ah) to every command and sets
    CTDP; RCTD=0 sets no CTDP."""
    lun, _ = make()
    listed = _rsoc_all(lun, rctd=True)
    assert listed and all(flags & 0x02 for _, _, flags, _ in listed)
    d = bytes(ex(lun, rsoc(1, scsi.READ_16, rctd=True)).data)
    assert d[1] & 0x80 and int.from_bytes(d[4 + 16:4 + 18], "big") == 0x0A


def test_unsupported_service_actions_point_at_byte_1() -> None:
    """SPC-4 4.5.6: an unsupported service action of SERVICE ACTION IN(16) / MAINTENANCE IN is INVALID
    FIELD IN CDB with the field pointer at byte 1 (libiscsi reads that as not implemented)."""
    lun, _ = make()
    for cdb in (bytes((scsi.SERVICE_ACTION_IN_16, 0x13)) + bytes(14), bytes((scsi.MAINTENANCE_IN, 0x0A)) + bytes(10)):
        r = ex(lun, cdb)
        assert sense_of(r) == INVALID_CDB and field_of(r)[1] == 1


# === unit attention and resets ========================================================================
def test_no_power_on_unit_attention_for_new_nexus() -> None:
    """Rule 4 of scsi.py: a nexus the Lun has not seen gets no POWER ON UA (simple initiators)."""
    lun, _ = make()
    assert ex(lun, TUR, nexus=A).status == GOOD
    assert ex(lun, rw10(scsi.READ_10, 0, 1), nexus=B).status == GOOD


def test_lun_reset_unit_attention_for_every_nexus() -> None:
    """SAM-5 6.3.3 / SPC-4 5.14: LOGICAL UNIT RESET establishes BUS DEVICE RESET FUNCTION OCCURRED
    (29h/03h) for every I_T nexus, the resetting one included (libiscsi MultipathIO.Reset); INQUIRY
    and REPORT LUNS run without clearing it; the next other command gets it once."""
    lun, _ = make()
    ex(lun, TUR, nexus=A)
    ex(lun, TUR, nexus=B)
    lun.reset(A, kind="lun")
    assert ex(lun, inquiry(), nexus=B).status == GOOD
    for n in (A, B):
        assert sense_of(ex(lun, TUR, nexus=n)) == (0x06, 0x29, 0x03)
        assert ex(lun, TUR, nexus=n).status == GOOD
    lun.reset(C, kind="lun")  # a nexus that only sent the task management function
    assert sense_of(ex(lun, TUR, nexus=C)) == (0x06, 0x29, 0x03)


def test_request_sense_returns_and_clears_unit_attention() -> None:
    """SPC-4 5.14 (UA_INTLCK_CTRL 00b): REQUEST SENSE returns the pending UA as its data and clears it;
    a target reset reports POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h), the code
    libiscsi's RESERVE(6) helper retries on."""
    lun, _ = make()
    ex(lun, TUR, nexus=B)
    lun.reset(None, kind="target")
    r = ex(lun, REQUEST_SENSE, nexus=B)
    assert r.status == GOOD and r.data[2] & 0x0F == 0x06 and bytes(r.data[12:14]) == b"\x29\x00"
    assert ex(lun, TUR, nexus=B).status == GOOD
    with pytest.raises(ValueError):
        lun.reset(None, kind="bus")


def test_capacity_change_unit_attention() -> None:
    """SBC-3 4.10: a changed capacity establishes CAPACITY DATA HAS CHANGED (2Ah/09h) for every nexus."""
    lun, be = make(8 << 20)
    ex(lun, TUR, nexus=A)
    be.resize(16 << 20)
    assert sense_of(ex(lun, TUR, nexus=A)) == (0x06, 0x2A, 0x09)
    assert int.from_bytes(bytes(ex(lun, READ_CAPACITY_10).data)[0:4], "big") == (16 << 20) // LBS - 1


def test_nexus_lost_forgets_its_unit_attentions() -> None:
    """Rule 4 of scsi.py: a lost nexus is forgotten; when it comes back it is new (no UA)."""
    lun, _ = make()
    ex(lun, TUR, nexus=B)
    lun.reset(A, kind="lun")
    lun.nexus_lost(B)
    assert ex(lun, TUR, nexus=B).status == GOOD
    assert ex(lun, TUR, nexus=A).status == CHECK_CONDITION


# === RESERVE(6) / RELEASE(6) ==========================================================================
def test_reserve6_conflicts_for_other_nexuses() -> None:
    """SPC-2 7.21/7.22: RESERVE twice by the holder is GOOD; another nexus gets RESERVATION CONFLICT on
    RESERVE, MODE SENSE and media access, while INQUIRY and REQUEST SENSE still run and its RELEASE is
    GOOD without effect; after the holder releases, the other can reserve (libiscsi 2Initiators)."""
    lun, _ = make()
    assert ex(lun, RESERVE6, nexus=A).status == GOOD
    assert ex(lun, RESERVE6, nexus=A).status == GOOD
    assert ex(lun, RESERVE6, nexus=B).status == RESERVATION_CONFLICT
    assert ex(lun, RELEASE6, nexus=B).status == GOOD
    assert ex(lun, mode_sense6(), nexus=A).status == GOOD
    assert ex(lun, mode_sense6(), nexus=B).status == RESERVATION_CONFLICT
    assert ex(lun, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT
    assert ex(lun, inquiry(), nexus=B).status == GOOD and ex(lun, REQUEST_SENSE, nexus=B).status == GOOD
    assert ex(lun, RELEASE6, nexus=A).status == GOOD
    assert ex(lun, RESERVE6, nexus=B).status == GOOD


def test_reserve6_ends_with_reset_and_nexus_loss() -> None:
    """SPC-2 5.5.1: a reset or the loss of the holder's nexus ends a RESERVE reservation."""
    lun, _ = make()
    ex(lun, RESERVE6, nexus=A)
    lun.reset(A, kind="lun")
    clear_uas(lun, A, B)
    assert ex(lun, RESERVE6, nexus=B).status == GOOD
    lun.nexus_lost(B)
    assert ex(lun, RESERVE6, nexus=A).status == GOOD
    lun.reset(None, kind="target")
    clear_uas(lun, B)
    assert ex(lun, RESERVE6, nexus=B).status == GOOD


def test_reserve6_conflicts_with_persistent_registrations() -> None:
    """SPC-4 5.7.3 (CRH=0): while any PR registration exists, RESERVE(6)/RELEASE(6) conflict; a RESERVE
    holder makes other nexuses' PERSISTENT RESERVE commands conflict."""
    lun, _ = make()
    assert prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=7).status == GOOD
    assert ex(lun, RESERVE6, nexus=A).status == RESERVATION_CONFLICT
    assert ex(lun, RELEASE6, nexus=B).status == RESERVATION_CONFLICT
    assert prout(lun, A, scsi_pr.SA_REGISTER, rk=7).status == GOOD
    assert ex(lun, RESERVE6, nexus=A).status == GOOD
    assert prout(lun, B, scsi_pr.SA_REGISTER, sark=9).status == RESERVATION_CONFLICT
    assert ex(lun, pr_in(0), nexus=B).status == RESERVATION_CONFLICT


# === persistent reservations ==========================================================================
def test_register_read_keys_reregister_unregister() -> None:
    """SPC-4 5.7.7/6.16: REGISTER AND IGNORE registers; REGISTER from a registered nexus with a wrong
    RESERVATION KEY conflicts; SARK 0 unregisters; PRgeneration counts each successful registration."""
    lun, _ = make()
    gen0, keys = keys_of(lun)
    assert keys == []
    assert prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=0xABC).status == GOOD
    assert keys_of(lun) == (gen0 + 1, [0xABC])
    assert prout(lun, A, scsi_pr.SA_REGISTER, sark=0xABD).status == RESERVATION_CONFLICT
    assert prout(lun, A, scsi_pr.SA_REGISTER, rk=0xABC, sark=0xDEF).status == GOOD
    assert prout(lun, B, scsi_pr.SA_REGISTER, rk=5, sark=6).status == RESERVATION_CONFLICT  # unregistered, RK != 0
    assert prout(lun, A, scsi_pr.SA_REGISTER, rk=0xDEF).status == GOOD
    gen, keys = keys_of(lun)
    assert keys == [] and gen == gen0 + 3


def test_read_keys_additional_length_is_not_cut() -> None:
    """SPC-4 6.15.2: ADDITIONAL LENGTH is the full key list even when the allocation length cuts it."""
    lun, _ = make()
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    d = bytes(ex(lun, pr_in(scsi_pr.SA_READ_KEYS, alloc=8)).data)
    assert len(d) == 8 and int.from_bytes(d[4:8], "big") == 8


ACCESS = [  # libiscsi ProutReserve.Access*: (type, registered read, registered write, unregistered read, write)
    (scsi_pr.EXCLUSIVE_ACCESS, False, False, False, False),
    (scsi_pr.WRITE_EXCLUSIVE, True, False, True, False),
    (scsi_pr.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
    (scsi_pr.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
    (scsi_pr.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
    (scsi_pr.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
]


@pytest.mark.parametrize("pr_type,reg_read,reg_write,unreg_read,unreg_write", ACCESS)
def test_reservation_access_by_type(pr_type: int, reg_read: bool, reg_write: bool, unreg_read: bool,
                                    unreg_write: bool) -> None:
    """SPC-4 5.7.1 / SBC-3 4.17 (Table 13): which media accesses of a non-holder get RESERVATION
    CONFLICT, registered and unregistered, for each of the six types; the holder is never refused;
    READ RESERVATION reports key 0 for all-registrants types (SPC-4 6.15.3)."""
    lun, _ = make()
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=pr_type).status == GOOD
    all_reg = pr_type in scsi_pr.ALL_REGISTRANTS_TYPES
    assert reservation_of(lun) == (0 if all_reg else 1, pr_type)

    def allowed(n: Nexus, write: bool) -> bool:
        cdb = rw10(scsi.WRITE_10 if write else scsi.READ_10, 1, 1)
        r = ex(lun, cdb, bytes(LBS), nexus=n)
        assert r.status in (GOOD, RESERVATION_CONFLICT)
        return r.status == GOOD

    assert allowed(A, False) and allowed(A, True)
    assert (allowed(B, False), allowed(B, True)) == (reg_read, reg_write)
    assert prout(lun, B, scsi_pr.SA_REGISTER, rk=2).status == GOOD
    assert (allowed(B, False), allowed(B, True)) == (unreg_read, unreg_write)
    assert ex(lun, inquiry(), nexus=B).status == GOOD and ex(lun, READ_CAPACITY_10, nexus=B).status == GOOD
    assert prout(lun, A, scsi_pr.SA_RELEASE, rk=1, pr_type=pr_type).status == GOOD
    assert reservation_of(lun) is None and allowed(B, True)


@pytest.mark.parametrize("pr_type", scsi_pr.TYPES)
def test_holder_unregistering_ends_reservation_unless_all_registrants(pr_type: int) -> None:
    """SPC-4 5.7.11.3: the holder unregistering releases its reservation (registrants-only types tell
    the other registrants RESERVATIONS RELEASED, 2Ah/04h); an all-registrants reservation lasts while
    anyone is registered and is released by any registrant (libiscsi ProutReserve.Ownership*)."""
    lun, _ = make()
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=pr_type)
    assert prout(lun, A, scsi_pr.SA_REGISTER, rk=1).status == GOOD
    if pr_type in scsi_pr.ALL_REGISTRANTS_TYPES:
        assert reservation_of(lun) == (0, pr_type)
        assert prout(lun, B, scsi_pr.SA_RELEASE, rk=2, pr_type=pr_type).status == GOOD
        assert reservation_of(lun) is None
    else:
        assert reservation_of(lun) is None
        r = ex(lun, TUR, nexus=B)
        if pr_type in scsi_pr.REGISTRANTS_ONLY_TYPES:
            assert sense_of(r) == (0x06, 0x2A, 0x04)
        else:
            assert r.status == GOOD


def test_reserve_rules() -> None:
    """SPC-4 5.7.9: RESERVE needs a registration and its key; the holder may repeat it with the same
    type (no change) but not another type; another registrant conflicts; RESERVE and RELEASE do not
    change PRgeneration (libiscsi ProutClear checks +1 for CLEAR only); scope other than LU_SCOPE and
    unknown types are INVALID FIELD IN CDB."""
    lun, _ = make()
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=0, pr_type=1).status == RESERVATION_CONFLICT
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    gen, _ = keys_of(lun)
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=9, pr_type=1).status == RESERVATION_CONFLICT
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=1).status == GOOD
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=1).status == GOOD
    assert prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=3).status == RESERVATION_CONFLICT
    assert prout(lun, B, scsi_pr.SA_RESERVE, rk=2, pr_type=1).status == RESERVATION_CONFLICT
    assert sense_of(prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=2)) == INVALID_CDB
    assert sense_of(prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=1, scope=1)) == INVALID_CDB
    r = prout(lun, A, scsi_pr.SA_RELEASE, rk=1, pr_type=3)
    assert sense_of(r) == (0x05, 0x26, 0x04)  # INVALID RELEASE OF PERSISTENT RESERVATION
    assert prout(lun, B, scsi_pr.SA_RELEASE, rk=2, pr_type=1).status == GOOD  # not the holder: no effect
    assert reservation_of(lun) == (1, 1)
    assert prout(lun, A, scsi_pr.SA_RELEASE, rk=1, pr_type=1).status == GOOD
    assert keys_of(lun)[0] == gen


def test_release_of_registrants_only_tells_the_others() -> None:
    """SPC-4 5.7.11.2: releasing a reservation other than WE / EA establishes RESERVATIONS RELEASED
    for the other registrants."""
    lun, _ = make()
    ex(lun, TUR, nexus=B)
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    prout(lun, A, scsi_pr.SA_RELEASE, rk=1, pr_type=scsi_pr.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert sense_of(ex(lun, TUR, nexus=B)) == (0x06, 0x2A, 0x04)
    assert ex(lun, TUR, nexus=A).status == GOOD


def test_clear_removes_everything_and_tells_the_others() -> None:
    """SPC-4 5.7.11.6: CLEAR removes every registration and the reservation, PRgeneration +1, and
    establishes RESERVATIONS PREEMPTED (2Ah/03h) for the other registrants."""
    lun, _ = make()
    ex(lun, TUR, nexus=B)
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.EXCLUSIVE_ACCESS)
    gen, _ = keys_of(lun)
    assert prout(lun, B, scsi_pr.SA_CLEAR, rk=3).status == RESERVATION_CONFLICT
    assert prout(lun, A, scsi_pr.SA_CLEAR, rk=1).status == GOOD
    assert keys_of(lun) == (gen + 1, []) and reservation_of(lun) is None
    assert sense_of(ex(lun, TUR, nexus=B)) == (0x06, 0x2A, 0x03)


def test_preempt_removes_registration() -> None:
    """SPC-4 5.7.11.4.3: without a reservation PREEMPT removes the registrations of SARK, PRgeneration
    +1, REGISTRATIONS PREEMPTED (2Ah/05h) for them (libiscsi ProutPreempt.RemoveRegistration); SARK 0
    is INVALID FIELD IN PARAMETER LIST; an unknown SARK conflicts."""
    lun, _ = make()
    ex(lun, TUR, nexus=A)
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=0x11)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=0x22)
    gen, _ = keys_of(lun)
    assert prout(lun, B, scsi_pr.SA_PREEMPT, rk=0x22, sark=0x99, pr_type=3).status == RESERVATION_CONFLICT
    r = prout(lun, B, scsi_pr.SA_PREEMPT, rk=0x22, sark=0, pr_type=3)
    assert sense_of(r) == INVALID_PARAM and field_of(r)[:2] == (False, 8)
    assert prout(lun, B, scsi_pr.SA_PREEMPT, rk=0x22, sark=0x11, pr_type=3).status == GOOD
    assert keys_of(lun, B) == (gen + 1, [0x22]) and reservation_of(lun, B) is None
    assert sense_of(ex(lun, TUR, nexus=A)) == (0x06, 0x2A, 0x05)


def test_preempt_takes_over_reservation() -> None:
    """SPC-4 5.7.11.4.4: PREEMPT naming the holder's key removes it and makes the preempter the holder
    with the new type; the remaining registrants learn RESERVATIONS RELEASED when the type changes;
    PREEMPT AND ABORT acts the same here. Under an all-registrants reservation SARK 0 removes every
    other registrant and takes a new reservation."""
    lun, _ = make()
    for n in (A, B, C):
        ex(lun, TUR, nexus=n)
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2)
    prout(lun, C, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=3)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.WRITE_EXCLUSIVE)
    assert prout(lun, B, scsi_pr.SA_PREEMPT_AND_ABORT, rk=2, sark=1, pr_type=scsi_pr.EXCLUSIVE_ACCESS).status == GOOD
    assert reservation_of(lun, B) == (2, scsi_pr.EXCLUSIVE_ACCESS)
    assert keys_of(lun, B)[1] == [2, 3]
    assert sense_of(ex(lun, TUR, nexus=A)) == (0x06, 0x2A, 0x05)
    assert sense_of(ex(lun, TUR, nexus=C)) == (0x06, 0x2A, 0x04)
    prout(lun, B, scsi_pr.SA_RELEASE, rk=2, pr_type=scsi_pr.EXCLUSIVE_ACCESS)
    prout(lun, B, scsi_pr.SA_RESERVE, rk=2, pr_type=scsi_pr.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    assert prout(lun, C, scsi_pr.SA_PREEMPT, rk=3, sark=0, pr_type=scsi_pr.EXCLUSIVE_ACCESS).status == GOOD
    assert keys_of(lun, C)[1] == [3] and reservation_of(lun, C) == (3, scsi_pr.EXCLUSIVE_ACCESS)


def test_report_capabilities() -> None:
    """SPC-4 6.15.4: LENGTH 8, ALLOW COMMANDS <= 5, TMV with all six types, SIP_C=ATP_C=0, PTPL_C=1."""
    lun, _ = make()
    d = bytes(ex(lun, pr_in(scsi_pr.SA_REPORT_CAPABILITIES)).data)
    assert int.from_bytes(d[0:2], "big") == 8 and (d[3] >> 4) & 0x07 <= 5 and d[3] & 0x80
    assert int.from_bytes(d[4:6], "big") == 0xEA01 and d[2] & 0x0C == 0 and d[2] & 0x01


def test_read_full_status_transport_ids() -> None:
    """SPC-4 6.15.5: one descriptor per registration with key, R_HOLDER, scope/type, relative target
    port and an iSCSI TransportID (format 01b: "name,i,0x<isid>", NUL-terminated, multiple of 4)."""
    lun, _ = make()
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, C, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=3)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.WRITE_EXCLUSIVE)
    d = bytes(ex(lun, pr_in(scsi_pr.SA_READ_FULL_STATUS)).data)
    assert int.from_bytes(d[4:8], "big") == len(d) - 8
    at, seen = 8, []
    while at < len(d):
        key, holder, st, rtpi = int.from_bytes(d[at:at + 8], "big"), d[at + 12] & 1, d[at + 13], d[at + 18:at + 20]
        tlen = int.from_bytes(d[at + 20:at + 24], "big")
        tid = d[at + 24:at + 24 + tlen]
        assert tid[0] == 0x45 and tlen % 4 == 0 and int.from_bytes(tid[2:4], "big") == tlen - 4
        seen.append((key, holder, st, int.from_bytes(rtpi, "big"), tid[4:].rstrip(b"\x00").decode()))
        at += 24 + tlen
    assert seen == [(1, 1, scsi_pr.WRITE_EXCLUSIVE, 1, A.initiator), (3, 0, 0, 2, C.initiator)]


def test_pr_in_unknown_service_actions_fail() -> None:
    """SPC-4 6.15.1: PERSISTENT RESERVE IN service actions 04h-1Fh are INVALID FIELD IN CDB."""
    lun, _ = make()
    for sa in range(4):
        assert ex(lun, pr_in(sa)).status == GOOD
    for sa in range(4, 0x20):
        assert sense_of(ex(lun, pr_in(sa))) == INVALID_CDB


def test_pr_out_parameter_checks() -> None:
    """SPC-4 6.16.3: a PARAMETER LIST LENGTH other than 24 is PARAMETER LIST LENGTH ERROR; SPEC_I_PT and
    ALL_TG_PT (not supported) INVALID FIELD IN PARAMETER LIST; REGISTER AND MOVE is not supported."""
    lun, _ = make()
    cdb, params = pr_out(scsi_pr.SA_REGISTER, sark=1, plen=23)
    assert lun.data_out_bytes(cdb) == 0 and sense_of(ex(lun, cdb, params[:23])) == PARAM_LEN
    r = prout(lun, A, scsi_pr.SA_REGISTER, sark=1, flags=0x08)
    assert sense_of(r) == INVALID_PARAM and field_of(r) == (False, 20, 3)
    assert sense_of(prout(lun, A, scsi_pr.SA_REGISTER, sark=1, flags=0x04)) == INVALID_PARAM
    assert prout(lun, A, scsi_pr.SA_REGISTER, sark=1, flags=0x01).status == GOOD  # APTPL accepted
    assert ex(lun, pr_in(scsi_pr.SA_REPORT_CAPABILITIES)).data[3] & 0x01  # PTPL_A
    cdb, params = pr_out(scsi_pr.SA_REGISTER_AND_MOVE, rk=1, sark=2)
    assert sense_of(ex(lun, cdb, params)) == INVALID_CDB


def test_registration_limit() -> None:
    """scsi_pr rule 5: registrations beyond the bound are INSUFFICIENT REGISTRATION RESOURCES (55h/04h)."""
    lun, _ = make(pr_registrations_max=1)
    assert prout(lun, A, scsi_pr.SA_REGISTER, sark=1).status == GOOD
    assert sense_of(prout(lun, B, scsi_pr.SA_REGISTER, sark=2)) == (0x05, 0x55, 0x04)


def test_persistent_reservations_survive_reset() -> None:
    """SPC-4 5.7.2: persistent reservations and registrations are not affected by resets."""
    lun, _ = make()
    prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    prout(lun, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.EXCLUSIVE_ACCESS)
    lun.reset(None, kind="target")
    lun.nexus_lost(A)
    clear_uas(lun, A, B)
    assert reservation_of(lun) == (1, scsi_pr.EXCLUSIVE_ACCESS)
    assert ex(lun, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT


def test_state_is_shared_through_the_store() -> None:
    """scsi.py rule 5: two Luns (two gateways) over one PrStore share registrations at once for PR IN /
    OUT, and another Lun's reservation binds media access once its cache (pr_cache_s) expires."""
    store = MemoryPrStore()
    now = [0.0]
    g1, be = make(store=store, clock=lambda: now[0])
    g2 = Lun("vol1", be, volume_id=0x1234, pr_store=store, clock=lambda: now[0])
    assert ex(g2, rw10(scsi.READ_10, 0, 1), nexus=B).status == GOOD  # caches "no reservation"
    prout(g1, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    assert keys_of(g2, B)[1] == [1]
    assert prout(g1, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.EXCLUSIVE_ACCESS).status == GOOD
    now[0] += 1.0
    assert ex(g2, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT
    assert prout(g2, B, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=2).status == GOOD
    assert keys_of(g1)[1] == [1, 2]


class PeekStore(MemoryPrStore):
    """A store with `peek`: the gateway's followed copy of the map, which lags the store (`lagged`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lagged: tuple[int, bytes] = (0, b"")
        self.loads = 0

    def peek(self, volume: str) -> tuple[int, bytes]:
        return self.lagged

    async def load(self, volume: str) -> tuple[int, bytes]:
        self.loads += 1
        return await super().load(volume)


def test_data_commands_read_the_followed_copy_and_never_go_back() -> None:
    """scsi.py rule 5: with `peek`, a data command's cache refresh costs no store round trip (only the first
    read after `forget_reservations` loads); a reservation another gateway took binds once the followed
    copy has it; a copy older than this Lun's own update is ignored (its reservation does not vanish)."""
    store = PeekStore()
    now = [0.0]
    g1, be = make(store=store, clock=lambda: now[0])
    g2 = Lun("vol1", be, volume_id=0x1234, pr_store=store, clock=lambda: now[0])
    assert ex(g2, rw10(scsi.READ_10, 0, 1), nexus=B).status == GOOD  # its first read: from the store
    prout(g1, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1)
    assert prout(g1, A, scsi_pr.SA_RESERVE, rk=1, pr_type=scsi_pr.EXCLUSIVE_ACCESS).status == GOOD
    loads = store.loads
    now[0] += 1.0
    assert ex(g1, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT  # lagging copy ignored
    assert ex(g2, rw10(scsi.READ_10, 0, 1), nexus=B).status == GOOD  # g2's followed copy does not have it yet
    store.lagged = store._data["vol1"]
    now[0] += 1.0
    assert ex(g2, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT
    assert store.loads == loads  # data commands never called load
    g3 = Lun("vol1", be, volume_id=0x1234, pr_store=store, clock=lambda: now[0])
    store.lagged = (0, b"")
    g3.forget_reservations()  # a session logged in: the first command asks the store, not the copy
    assert ex(g3, rw10(scsi.READ_10, 0, 1), nexus=B).status == RESERVATION_CONFLICT


class RacingStore(MemoryPrStore):
    """A store where another writer wins the first compare-and-swap."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    async def cas(self, volume: str, version: int, blob: bytes) -> bool:
        if not self.raced:
            self.raced = True
            other = scsi_pr.PrState(registrations=(scsi_pr.Registration(B.pr_id, 0x77),))
            await super().cas(volume, version, other.encode())
            return False
        return await super().cas(volume, version, blob)


def test_pr_out_retries_a_lost_compare_and_swap() -> None:
    """scsi.py rule 5: PR OUT reloads and reapplies when another writer changed the state first."""
    store = RacingStore()
    lun, _ = make(store=store)
    assert prout(lun, A, scsi_pr.SA_REGISTER_AND_IGNORE_EXISTING_KEY, sark=1).status == GOOD
    assert store.raced and keys_of(lun)[1] == [0x77, 1]


def test_pr_state_encode_decode() -> None:
    """scsi_pr: the serialised state round-trips; an empty blob is the initial state; garbage is refused."""
    st = scsi_pr.PrState(5, (scsi_pr.Registration(A.pr_id, 2**64 - 1, 3),),
                         scsi_pr.Reservation(A.pr_id, scsi_pr.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY), True)
    assert scsi_pr.PrState.decode(st.encode()) == st
    assert scsi_pr.PrState.decode(b"") == scsi_pr.PrState()
    for bad in (b"{", b"[]", b'{"format": 2}', st.encode().replace(b'"type":6', b'"type":2')):
        with pytest.raises(ValueError):
            scsi_pr.PrState.decode(bad)


def test_apply_out_is_pure() -> None:
    """scsi_pr rule 2: apply_out returns a new state and leaves its input untouched."""
    st = scsi_pr.PrState()
    _, params = pr_out(scsi_pr.SA_REGISTER, sark=1)
    out = scsi_pr.apply_out(st, A.pr_id, service_action=scsi_pr.SA_REGISTER, scope=0, pr_type=0,
                            parameter_list_bytes=24, params=params)
    assert out.good and out.state.registrations and st == scsi_pr.PrState()


# === errors, protection, data_out_bytes ===============================================================
def test_backend_errors_map_to_sense() -> None:
    """SBC-3 4.7.3.6: ENOSPC is DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h); other
    failures are MEDIUM ERROR (reads 11h/00h, writes 0Ch/00h); the Lun keeps working."""
    lun, be = make()
    be.fail = OSError(errno.ENOSPC, "full")
    assert sense_of(ex(lun, rw10(scsi.WRITE_10, 0, 1), bytes(LBS))) == (0x07, 0x27, 0x07)
    be.fail = OSError(errno.EIO, "gone")
    assert sense_of(ex(lun, rw10(scsi.READ_10, 0, 1))) == (0x03, 0x11, 0x00)
    assert sense_of(ex(lun, rw10(scsi.WRITE_10, 0, 1), bytes(LBS))) == (0x03, 0x0C, 0x00)
    be.fail = None
    assert ex(lun, rw10(scsi.READ_10, 0, 1)).status == GOOD


def test_read_only_lun_refuses_writes() -> None:
    """SBC-3 4.11: a write-protected LU reports WP in MODE SENSE and answers DATA PROTECT / WRITE
    PROTECTED (27h/00h) to every write, UNMAP, WRITE SAME and COMPARE AND WRITE; reads work."""
    lun, _ = make(read_only=True)
    assert ex(lun, mode_sense6()).data[2] & 0x80
    for cdb, data in ((rw10(scsi.WRITE_10, 0, 1), bytes(LBS)), (ws16(0, 1, 0x08), bytes(LBS)),
                      (unmap_cdb(24), unmap_params((0, 1))), (caw(0, 1), bytes(2 * LBS)),
                      (rw16(scsi.WRITE_AND_VERIFY_16, 0, 1, 0x02), bytes(LBS))):
        assert sense_of(ex(lun, cdb, data)) == (0x07, 0x27, 0x00)
    assert ex(lun, rw10(scsi.READ_10, 0, 1)).status == GOOD


def test_data_out_bytes() -> None:
    """The transport's question (scsi.py rule 1): bytes of data-out per CDB, 0 for none or a refusal."""
    lun, _ = make()
    assert lun.data_out_bytes(rw16(scsi.WRITE_16, 0, 8)) == 8 * LBS
    assert lun.data_out_bytes(caw(0, 3)) == 6 * LBS
    assert lun.data_out_bytes(ws10(0, 100)) == LBS
    assert lun.data_out_bytes(unmap_cdb(40)) == 40
    assert lun.data_out_bytes(bytes((scsi.MODE_SELECT_10, 0x10)) + bytes(5) + (20).to_bytes(2, "big") + b"\x00") == 20
    assert lun.data_out_bytes(pr_out(scsi_pr.SA_RESERVE)[0]) == 24
    for cdb in (rw10(scsi.READ_10, 0, 8), TUR, inquiry(), rw10(scsi.WRITE_10, 0, 1, 0x20), ws10(0, 0),
                bytes((0x8B,)) + bytes(15), b""):
        assert lun.data_out_bytes(cdb) == 0, cdb.hex()


def test_constructor_validates() -> None:
    """Lun refuses geometry and INQUIRY strings it could not report (SPC-4 4.4.1: ASCII fields)."""
    be = MemBackend(1 << 20)
    for kw in ({"logical_block_bytes": 520}, {"physical_block_bytes": 3 * 512}, {"max_transfer_bytes": 100},
               {"vendor": "TOO-LONG-VENDOR"}, {"product": "caf\u00e9"}):
        with pytest.raises(ValueError):
            Lun("v", be, volume_id=1, pr_store=MemoryPrStore(), **kw)  # type: ignore[arg-type]
    lun = Lun("v", be, volume_id=1, pr_store=MemoryPrStore(), logical_block_bytes=4096)
    assert lun.block_count == 256 and ex(lun, rc16()).data[13] == 0
