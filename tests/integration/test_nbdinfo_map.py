# nbdinfo and qemu-img map against `raftblock serve`: advertised capabilities, export list, allocation map.
#
# Enforces: NBD proto.md "Transmission flags" (SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES,
# SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN; not READ_ONLY, not ROTATIONAL), NBD_INFO_BLOCK_SIZE
# (512 / 4096 / 32 MiB), NBD_OPT_LIST, and "Metadata querying" base:allocation: NBD_STATE_HOLE and
# NBD_STATE_ZERO for never-written ranges, data where written, and a hole again after NBD_CMD_TRIM and
# NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE (the serve contract; proto.md allows, raftblock promises).
from __future__ import annotations

import json
from typing import Any

from raftblock.testing.serve import ServeProcess

from .helpers import MiB, ServeFactory, require_tools, run

KiB = 1024


def _nbdinfo_json(*args: str) -> dict[str, Any]:
    cp = run(["nbdinfo", "--json", *args], timeout_s=30)
    out: dict[str, Any] = json.loads(cp.stdout)
    return out


def test_nbdinfo_advertises_the_contract(serve_factory: ServeFactory) -> None:
    require_tools("nbdinfo")
    srv = serve_factory(["vol:64M", "big:1G", "small:1048576"])
    info = _nbdinfo_json(srv.uri("vol"))
    assert info["protocol"] == "newstyle-fixed", info
    assert info["structured"] is True, "NBD_OPT_STRUCTURED_REPLY must be accepted"
    (e,) = info["exports"]
    expected = {
        "export-size": 64 * MiB,
        "block_size_minimum": 512,
        "block_size_preferred": 4096,
        "block_size_maximum": 32 * MiB,
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
        "can_fast_zero": True,
        "can_cache": True,
        "can_multi_conn": True,
        "is_read_only": False,
        "is_rotational": False,
    }
    wrong = {k: f"got {e.get(k)!r}, want {v!r}" for k, v in expected.items() if e.get(k) != v}
    assert not wrong, f"nbdinfo --json differs from the contract: {wrong}"
    assert "base:allocation" in e.get("contexts", []), e

    listing = _nbdinfo_json("--list", srv.uri(""))
    sizes = {x["export-name"]: x.get("export-size") for x in listing["exports"]}
    assert sizes == {"vol": 64 * MiB, "big": 1 << 30, "small": MiB}, f"NBD_OPT_LIST: {sizes}"


# -- allocation map -------------------------------------------------------------------------------------

def _qemu_map(uri: str) -> list[dict[str, Any]]:
    cp = run(["qemu-img", "map", "--output=json", "-f", "raw", uri], timeout_s=30)
    entries: list[dict[str, Any]] = json.loads(cp.stdout)
    return entries


def _nbdinfo_map(uri: str) -> list[dict[str, Any]]:
    cp = run(["nbdinfo", "--map", "--json", uri], timeout_s=30)
    entries: list[dict[str, Any]] = json.loads(cp.stdout)
    return entries


def _status(entries: list[dict[str, Any]], size: int, start_key: str) -> list[tuple[int, int, bool, bool]]:
    """(start, end, data, zero) ranges, checked to tile [0, size) exactly."""
    out = []
    pos = 0
    for e in entries:
        start = e[start_key]
        assert start == pos, f"map not contiguous at {pos}: {entries}"
        if start_key == "start":  # qemu-img map
            data, zero = bool(e["data"]), bool(e["zero"])
        else:  # nbdinfo --map: type bit 0 = NBD_STATE_HOLE, bit 1 = NBD_STATE_ZERO
            data, zero = not (e["type"] & 1), bool(e["type"] & 2)
        out.append((start, start + e["length"], data, zero))
        pos = start + e["length"]
    assert pos == size, f"map covers {pos} of {size} bytes"
    return out


def _at(ranges: list[tuple[int, int, bool, bool]], offset: int) -> tuple[bool, bool]:
    for start, end, data, zero in ranges:
        if start <= offset < end:
            return data, zero
    raise AssertionError(f"offset {offset} not in map")


def _check_map(uri: str, size: int, expect: dict[int, str], when: str) -> None:
    """expect: offset of a 4 KiB block -> "data" (allocated, not known zero) or "hole" (hole and zero)."""
    for name, ranges in (("qemu-img map", _status(_qemu_map(uri), size, "start")),
                         ("nbdinfo --map", _status(_nbdinfo_map(uri), size, "offset"))):
        for offset, kind in sorted(expect.items()):
            data, zero = _at(ranges, offset)
            if kind == "data":
                assert data and not zero, f"{when}: {name} says block at {offset} is data={data} zero={zero}"
            else:
                assert not data and zero, (f"{when}: {name} says block at {offset} is data={data} zero={zero}, "
                                           f"expected a hole that reads as zeroes\n{ranges}")


def _blocks(start: int, length: int) -> list[int]:
    return list(range(start, start + length, 4 * KiB))


def test_allocation_map_holes_data_trim_and_zero(server: ServeProcess) -> None:
    require_tools("qemu-img", "qemu-io", "nbdinfo")
    uri = server.uri("vol")
    size = 64 * MiB
    base = MiB
    every = {o: "hole" for o in [0, 4 * KiB, base - 4 * KiB, base + 64 * KiB, size - 4 * KiB]}

    # A fresh thin volume is one hole that reads as zero.
    _check_map(uri, size, every, "fresh volume")

    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P 0x5a {base} 64k"], timeout_s=30)
    expect = dict(every)
    expect.update({o: "data" for o in _blocks(base, 64 * KiB)})
    _check_map(uri, size, expect, "after a 64 KiB write")

    # NBD_CMD_TRIM (qemu-io discard) and NBD_CMD_WRITE_ZEROES without NO_HOLE (write -z -u) punch holes;
    # WRITE_ZEROES with NO_HOLE (write -z) must read back as zeroes, whatever the map says.
    run(["qemu-io", "-f", "raw", uri,
         "-c", f"discard {base + 16 * KiB} 16k",
         "-c", f"write -z -u {base + 32 * KiB} 16k",
         "-c", f"write -z {base + 48 * KiB} 8k"], timeout_s=30)
    expect.update({o: "hole" for o in _blocks(base + 16 * KiB, 16 * KiB)})
    expect.update({o: "hole" for o in _blocks(base + 32 * KiB, 16 * KiB)})
    for o in _blocks(base + 48 * KiB, 8 * KiB):
        expect.pop(o)
    _check_map(uri, size, expect, "after TRIM and WRITE_ZEROES")

    cp = run(["qemu-io", "-f", "raw", uri,
              "-c", f"read -P 0x5a {base} 16k",
              "-c", f"read -P 0 {base + 16 * KiB} 40k",
              "-c", f"read -P 0x5a {base + 56 * KiB} 8k"], timeout_s=30, check=False)
    assert cp.returncode == 0 and "verification failed" not in cp.stdout, cp.stdout + cp.stderr
