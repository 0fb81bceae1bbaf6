"""`_fast.segwriter`: record framing is byte-identical to the framing segment.py had before it (kept
below, verbatim, as `_legacy_*`) and to a golden digest, so existing segment files still read; the same
cases run on the Cython module and its twin; seeded differential runs of C vs twin.
Format: docs/format/segment.md "Record". Pair check: TigerBeetle ("assert validity right before writing")."""

from __future__ import annotations

import array
import hashlib
import random
import struct
from types import ModuleType
from typing import Any, cast

import crc32c
import pytest
from test_fast import load_impl  # the one loader of a module's twin or Cython build (skips if not built)

from raftblock._fast._segformat import BlockCrcMismatch
from raftblock.storage import segment
from raftblock.storage.disk import DiskFile

BLOCK = 4096
_REC_HEADER = struct.Struct("<I4sBBHIIIQQQ")


@pytest.fixture(scope="module", params=["python", "cython"])
def sw(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("segwriter", request.param)


# --- segment.py's framing before _fast.segwriter (commit ede768f), verbatim but for the names -------


def _legacy_write_record(
    seed: int, extent_id: int, block: int, lsn: int, sync_mark: int, payload: Any, crcs: Any, flags: int = 0
) -> tuple[bytearray, int | None]:
    count = len(crcs)
    carr = (4 * count + 7) & ~7
    length = 48 + carr + BLOCK * count
    buf = bytearray(length)
    pay_off = 48 + carr
    buf[pay_off:] = payload
    view = memoryview(buf)
    bad: int | None = None
    for i in range(count):
        s = pay_off + i * BLOCK
        if crc32c.crc32c(view[s : s + BLOCK], 0) != crcs[i]:
            bad = i
            break
    if bad is not None:
        return buf, bad
    struct.pack_into(f"<{count}I", buf, 48, *crcs)
    _REC_HEADER.pack_into(buf, 0, 0, b"RBRC", 1, flags, 0, count, length, block, extent_id, lsn, sync_mark)
    hcrc = crc32c.crc32c(view[4:pay_off], seed)
    struct.pack_into("<I", buf, 0, hcrc)
    return buf, None


def _legacy_trim_record(
    seed: int, extent_id: int, block: int, count: int, lsn: int, sync_mark: int, flags: int = 0
) -> bytearray:
    buf = bytearray(48)
    _REC_HEADER.pack_into(buf, 0, 0, b"RBRC", 2, flags, 0, count, 48, block, extent_id, lsn, sync_mark)
    struct.pack_into("<I", buf, 0, crc32c.crc32c(memoryview(buf)[4:], seed))
    return buf


# --------------------------------------------------------------------------------------------------


def _payload(count: int, tag: int) -> bytes:
    return bytes((tag * 131 + i * 7 + (i >> 12)) & 0xFF for i in range(count * BLOCK))


def _crcs(payload: bytes | bytearray | memoryview) -> list[int]:
    mv = memoryview(payload)
    return [crc32c.crc32c(mv[i : i + BLOCK]) for i in range(0, len(mv), BLOCK)]


SEED = segment.segment_seed(b"cluster-0123456\x00", 7)
GOLDEN = {
    # sha256 of records framed by the legacy code above; a change here is a change of the on-disk format
    "write-3": "c17fd7d08b5ae2225a37e22f50472c8221a0178d6a3c2d3f59a09cbe8181f085",
    "trim": "556fbc384a3e5c5f71a05224cc2ada924cff122e53c213829cf569438bcb085b",
}


def _golden_write() -> bytearray:
    pay = _payload(3, 5)
    buf, bad = _legacy_write_record(SEED, 0x0102030405060708, 1000, 77, (7 << 32) | 4096, pay, _crcs(pay), 0x01)
    assert bad is None
    return buf


def test_legacy_framing_matches_golden_digest() -> None:
    assert hashlib.sha256(_golden_write()).hexdigest() == GOLDEN["write-3"]
    trim = _legacy_trim_record(SEED, 9, 0, (1 << 32) - 1, 78, (7 << 32) | 8192, 0x03)
    assert hashlib.sha256(trim).hexdigest() == GOLDEN["trim"]


@pytest.mark.parametrize("count", [1, 2, 3, 16, 255, 256])
def test_write_record_bytes_identical_to_legacy(sw: ModuleType, count: int) -> None:
    pay = _payload(count, count)
    crcs = _crcs(pay)
    args = (SEED, 42 + count, 3 * count, 10**12 + count, (9 << 32) | 64, pay, crcs, count & 3)
    want, bad = _legacy_write_record(*args)
    assert bad is None
    buf = bytearray(len(want))
    assert sw.frame_write(buf, 0, *args) == len(want)
    assert buf == want
    assert segment.build_write_record(*args) == (want, None)  # the engine's path, whichever module is selected
    buf2 = bytearray(len(want))
    sw.frame_write(buf2, 0, *args[:6], None, args[7])  # CRCs computed, not given
    assert buf2 == want


@pytest.mark.parametrize("count", [1, 3, 16, 256])
def test_head_framing_is_the_record_without_its_payload(sw: ModuleType, count: int) -> None:
    """Rule 5: frame_write_head writes exactly the bytes frame_write puts before the payload (so [head,
    payload] written back to back is the same record), reads the payload where it lies, and pair-checks it
    the same way (16+ blocks: the C module without the GIL)."""
    pay = _payload(count, count + 7)
    crcs = _crcs(pay)
    args = (SEED, 7 + count, 5 * count, 10**9 + count, (3 << 32) | 128, pay, crcs, count & 3)
    want, _ = _legacy_write_record(*args)
    pay_off = len(want) - count * BLOCK
    head = bytearray(b"\xee" * (pay_off + 24))
    assert sw.frame_write_head(head, 8, *args) == 8 + pay_off
    assert head[:8] == b"\xee" * 8 and head[8 + pay_off :] == b"\xee" * 16  # nothing outside the head
    assert bytes(head[8 : 8 + pay_off]) + pay == want
    head2 = bytearray(pay_off)
    sw.frame_write_head(head2, 0, *args[:6], None, args[7])  # CRCs computed, not given
    assert head2 == head[8 : 8 + pay_off]
    view = memoryview(bytearray(b"x" * 5 + pay))[5:]  # a view of someone else's buffer, read in place
    assert sw.frame_write_head(bytearray(pay_off), 0, *args[:5], view, crcs, args[7]) == pay_off
    bad = list(crcs)
    bad[count - 1] ^= 4
    untouched = bytearray(pay_off)
    with pytest.raises(sw.BlockCrcMismatch) as e:
        sw.frame_write_head(untouched, 0, *args[:6], bad, args[7])
    assert e.value.index == count - 1 and untouched == bytearray(pay_off)  # nothing written
    with pytest.raises(ValueError):
        sw.frame_write_head(bytearray(pay_off - 1), 0, *args)  # the head does not fit


def test_trim_record_bytes_identical_to_legacy(sw: ModuleType) -> None:
    for args in [(SEED, 1, 2, 3, 4, 5, 0), (0, 2**64 - 1, 0, 2**32 - 1, 2**64 - 1, 2**64 - 1, 255),
                 (0xFFFFFFFF, 0, 2**32 - 2, 1, 0, 0, 0x02)]:
        want = _legacy_trim_record(*args)
        buf = bytearray(48)
        assert sw.frame_trim(buf, 0, *args) == 48
        assert buf == want
        assert segment.build_trim_record(*args) == want


def test_framed_records_read_back(sw: ModuleType) -> None:
    """What the writer frames, segment.py's reader accepts (scan and read_record paths)."""
    pay = _payload(5, 1)
    buf = bytearray(segment.SEG_HEADER_SIZE + 2 * segment.record_length(1, 5) + 48 + 4096)
    off = segment.SEG_HEADER_SIZE
    off = sw.frame_write(buf, off, SEED, 11, 20, 1, 0, pay, _crcs(pay))
    off = sw.frame_trim(buf, off, SEED, 11, 21, 2, 2, 0)
    off = sw.frame_write(buf, off, SEED, 11, 20, 3, segment.position(7, off), memoryview(pay), None, segment.FLAG_RELOCATED)
    res = segment.scan_segment(cast(DiskFile, _MemFile(bytes(buf))), SEED, segment.SEG_HEADER_SIZE)
    assert res.bad == [] and res.end == off
    assert [(r.hdr.rtype, r.hdr.lsn, r.hdr.flags, r.bad_blocks) for r in res.records] == [
        (1, 1, 0, []), (2, 2, 0, []), (1, 3, segment.FLAG_RELOCATED, [])
    ]
    got = segment.read_record(cast(DiskFile, _MemFile(bytes(buf))), SEED, res.records[2].offset)
    assert not isinstance(got, str)
    hdr, body, bad = got
    assert bad == [] and bytes(body[segment.payload_offset(5) :]) == pay and hdr.sync_mark == segment.position(7, res.records[2].offset)


class _MemFile:
    """The two DiskFile calls the reader makes, over bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset : offset + n]

    def size(self) -> int:
        return len(self.data)


def test_in_place_framing_leaves_the_rest_of_the_buffer(sw: ModuleType) -> None:
    pay = _payload(3, 9)
    want, _ = _legacy_write_record(SEED, 1, 2, 3, 4, pay, _crcs(pay))
    buf = bytearray(b"\xaa" * (13 + len(want) + 48 + 11))  # stale bytes: the CRC array padding is rewritten
    end = sw.frame_write(buf, 13, SEED, 1, 2, 3, 4, pay, _crcs(pay))
    assert end == 13 + len(want)
    end2 = sw.frame_trim(memoryview(buf), end, SEED, 1, 2, 3, 5, 6)
    assert end2 == end + 48
    assert buf[:13] == b"\xaa" * 13 and buf[end2:] == b"\xaa" * 11
    assert buf[13:end] == want
    assert buf[end:end2] == _legacy_trim_record(SEED, 1, 2, 3, 5, 6)


def test_payload_types_and_overlap(sw: ModuleType) -> None:
    pay = _payload(2, 3)
    want, _ = _legacy_write_record(SEED, 1, 2, 3, 4, pay, _crcs(pay))
    for p in (bytearray(pay), memoryview(pay), memoryview(b"xx" + pay)[2:], array.array("I", pay)):
        buf = bytearray(len(want))
        sw.frame_write(buf, 0, SEED, 1, 2, 3, 4, p, tuple(_crcs(pay)))
        assert buf == want
    # the payload is a view of the destination buffer itself (memmove, not memcpy)
    big = bytearray(len(want) + 100)
    big[0 : len(pay)] = pay
    end = sw.frame_write(big, 100, SEED, 1, 2, 3, 4, memoryview(big)[0 : len(pay)], _crcs(pay))
    assert big[100:end] == want
    big = bytearray(len(want) + 200)
    big[150 : 150 + len(pay)] = pay
    end = sw.frame_write(big, 0, SEED, 1, 2, 3, 4, memoryview(big)[150 : 150 + len(pay)], _crcs(pay))
    assert big[0:end] == want


@pytest.mark.parametrize("bad_index", [0, 1, 19])
def test_pair_check_mismatch(sw: ModuleType, bad_index: int) -> None:
    count = 20  # >= 64 KiB: the C module checks without the GIL
    pay = _payload(count, 1)
    crcs = _crcs(pay)
    crcs[bad_index] ^= 0x10
    if bad_index < count - 1:
        crcs[count - 1] ^= 1  # a later mismatch is not the one reported
    legacy, bad = _legacy_write_record(SEED, 1, 2, 3, 4, pay, crcs)
    assert bad == bad_index
    buf = bytearray(len(legacy))
    with pytest.raises(sw.BlockCrcMismatch) as e:
        sw.frame_write(buf, 0, SEED, 1, 2, 3, 4, pay, crcs)
    assert e.value.index == bad_index and isinstance(e.value, ValueError)
    assert buf == legacy  # payload copied, CRC array and header not written
    assert segment.build_write_record(SEED, 1, 2, 3, 4, pay, crcs) == (legacy, bad_index)


def test_out_of_range_crc_value_is_a_mismatch(sw: ModuleType) -> None:
    pay = _payload(3, 1)
    for bad in (-1, 2**32, 2**70, -(2**70)):
        crcs = _crcs(pay)
        crcs[1] = bad
        with pytest.raises(sw.BlockCrcMismatch) as e:
            sw.frame_write(bytearray(segment.record_length(1, 3)), 0, SEED, 1, 2, 3, 4, pay, crcs)
        assert e.value.index == 1
        assert _legacy_write_record(SEED, 1, 2, 3, 4, pay, crcs)[1] == 1


def test_one_error_class_for_both() -> None:
    assert load_impl("segwriter", "python").BlockCrcMismatch is BlockCrcMismatch
    assert load_impl("segwriter", "cython").BlockCrcMismatch is BlockCrcMismatch


def test_refusals_write_nothing(sw: ModuleType) -> None:
    pay = _payload(2, 1)
    crcs = _crcs(pay)
    n = segment.record_length(1, 2)
    ok = (SEED, 1, 2, 3, 4)
    cases: list[tuple[type[BaseException], tuple[Any, ...]]] = [
        (ValueError, (bytearray(n), 0, *ok, b"", [])),
        (ValueError, (bytearray(n), 0, *ok, pay[:-1], None)),
        (ValueError, (bytearray(n + 257 * BLOCK), 0, *ok, bytes(257 * BLOCK), None)),
        (ValueError, (bytearray(n), 0, *ok, pay, crcs[:1])),
        (ValueError, (bytearray(n - 1), 0, *ok, pay, crcs)),
        (ValueError, (bytearray(n), 1, *ok, pay, crcs)),
        (ValueError, (bytearray(n), -1, *ok, pay, crcs)),
        (ValueError, (bytearray(n), 0, SEED, 1, 2**32 - 2, 3, 4, pay, crcs)),  # block + count > 2^32 - 1
        (TypeError, (bytes(n), 0, *ok, pay, crcs)),
        (TypeError, (bytearray(n), 0, *ok, pay, [crcs[0], 1.5])),
        (OverflowError, (bytearray(n), 0, -1, 1, 2, 3, 4, pay, crcs)),
        (OverflowError, (bytearray(n), 0, 2**32, 1, 2, 3, 4, pay, crcs)),
        (OverflowError, (bytearray(n), 0, SEED, 2**64, 2, 3, 4, pay, crcs)),
        (OverflowError, (bytearray(n), 0, SEED, 1, 2**32, 3, 4, pay, crcs)),
        (OverflowError, (bytearray(n), 0, SEED, 1, 2, -3, 4, pay, crcs)),
        (OverflowError, (bytearray(n), 0, SEED, 1, 2, 3, 2**64, pay, crcs)),
        (OverflowError, (bytearray(n), 0, *ok, pay, crcs, 256)),
    ]
    for exc, args in cases:
        buf = args[0]
        before = bytes(buf)
        with pytest.raises(exc):
            sw.frame_write(*args)
        assert bytes(buf) == before, (exc, args[1:5])
    trims: list[tuple[type[BaseException], tuple[Any, ...]]] = [
        (ValueError, (bytearray(48), 0, SEED, 1, 2, 0, 3, 4)),
        (ValueError, (bytearray(48), 0, SEED, 1, 1, 2**32 - 1, 3, 4)),
        (ValueError, (bytearray(47), 0, SEED, 1, 2, 1, 3, 4)),
        (TypeError, (b"\x00" * 48, 0, SEED, 1, 2, 1, 3, 4)),
        (OverflowError, (bytearray(48), 0, SEED, 1, 2, 2**32, 3, 4)),
        (OverflowError, (bytearray(48), 0, SEED, 1, 2, 1, 3, 4, -1)),
    ]
    for exc, args in trims:
        with pytest.raises(exc):
            sw.frame_trim(*args)
        assert bytes(args[0]) == bytes(len(args[0]))


@pytest.mark.parametrize("seed", range(3))
def test_differential_c_vs_twin(seed: int) -> None:
    """Many random records framed back to back into two buffers with stale bytes; every result,
    exception and byte must agree."""
    py, c = load_impl("segwriter", "python"), load_impl("segwriter", "cython")
    rng = random.Random(seed)
    size = 3 << 20
    stale = rng.randbytes(4096) * (size // 4096)
    bufs = [bytearray(stale), bytearray(stale)]
    off = rng.randrange(64)
    for _ in range(120):
        if rng.random() < 0.2:
            args: tuple[Any, ...] = (off, rng.getrandbits(32), rng.getrandbits(64), rng.getrandbits(31),
                                     rng.randint(1, 2**31), rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(8))
            outs = []
            for mod, buf in ((py, bufs[0]), (c, bufs[1])):
                try:
                    outs.append(mod.frame_trim(buf, *args))
                except (ValueError, OverflowError) as e:
                    outs.append(type(e))
        else:
            count = rng.choice([1, 1, 2, 3, 8, 16, 17, rng.randint(1, 256)])
            pay = rng.randbytes(count * BLOCK)
            crcs: list[int] | None = _crcs(pay)
            roll = rng.random()
            if roll < 0.15:
                assert crcs is not None
                crcs[rng.randrange(count)] ^= 1 << rng.randrange(32)
            elif roll < 0.35:
                crcs = None
            wargs = (off, rng.getrandbits(32), rng.getrandbits(64), rng.getrandbits(20), rng.getrandbits(64),
                     rng.getrandbits(64), pay, crcs, rng.getrandbits(8))
            outs = []
            for mod, buf in ((py, bufs[0]), (c, bufs[1])):
                try:
                    outs.append(mod.frame_write(buf, *wargs))
                except BlockCrcMismatch as e:
                    outs.append(("mismatch", e.index))
                except ValueError as e:
                    outs.append(type(e))
        assert outs[0] == outs[1], outs
        assert bufs[0] == bufs[1]
        if isinstance(outs[0], int):
            off = outs[0] + rng.choice([0, 0, 8, 1])
            if off > size - (48 + 1024 + 256 * BLOCK):
                off = rng.randrange(64)
