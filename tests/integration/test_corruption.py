# Bit rot on disk: flip one byte of a stored block in a segment file, restart, and check the server notices,
# names the right range, fails only that block with EIO and keeps serving everything else.
#
# Enforces: DESIGN "every byte on disk is framed and checksummed" / "CRC32C per 4 KiB block" (a flipped
# byte is detected at start-up, not returned as data), the serve contract events `engine.corruption`
# (segment, offset, extent_id, block_start, block_count, reason) and `volume.corruption` (volume,
# offset_bytes, length_bytes), and NBD proto.md "Error values": a read that cannot return correct data
# fails with NBD_EIO rather than returning wrong bytes; the server stays up.
from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from .helpers import (
    BLOCK,
    MiB,
    ServeFactory,
    find_on_disk,
    flip_byte,
    nbd_read,
    nbd_write,
    require_libnbd,
)

WRITE_A = MiB        # 16 blocks written in one request; one of them gets corrupted
WRITE_B = 2 * MiB    # 16 blocks in another request; must stay readable
NBLOCKS = 16
TARGET = 5           # block index inside WRITE_A
FLIP_AT = 1234       # byte inside the target block


def _names(ref: str, seg: Path, data_dir: Path) -> bool:
    """Does an event's `segment` field refer to this file (name, stem, path, or numeric id)?"""
    if ref in (seg.name, seg.stem, str(seg), str(seg.relative_to(data_dir))) or str(seg).endswith(ref):
        return True
    digits = "".join(c for c in seg.stem if c.isdigit())
    return ref.isdigit() and digits != "" and int(digits) == int(ref)


@pytest.mark.timeout(120)
def test_flipped_byte_is_reported_and_fails_only_its_block(serve_factory: ServeFactory, tmp_path: Path) -> None:
    require_libnbd()
    rng = random.Random(42)
    data_a = rng.randbytes(NBLOCKS * BLOCK)
    data_b = rng.randbytes(NBLOCKS * BLOCK)
    srv = serve_factory(["vol:64M"], log_format="json")
    uri = srv.uri("vol")
    nbd_write(uri, WRITE_A, data_a, tmp_path)
    nbd_write(uri, WRITE_B, data_b, tmp_path)
    assert srv.stop() == 0

    target_off = WRITE_A + TARGET * BLOCK
    target = data_a[TARGET * BLOCK:(TARGET + 1) * BLOCK]
    hits = find_on_disk(srv.data_dir, target)
    assert hits, (f"block {TARGET} of the pattern is not stored verbatim in any file under {srv.data_dir}; "
                  "the contract says written data can be found by scanning the segment files' bytes")
    for seg, pos in hits:  # every copy, so whichever one the index points at is damaged
        flip_byte(seg, pos + FLIP_AT)

    srv.restart()
    start = srv.starts
    eng = srv.wait_for_event("engine.corruption", timeout_s=30, since_start=start)
    vol = srv.wait_for_event("volume.corruption", timeout_s=30, since_start=start)

    missing = {"segment", "offset", "extent_id", "block_start", "block_count", "reason"} - set(eng)
    assert not missing, f"engine.corruption lacks {missing}: {eng}"
    flipped = {seg: pos + FLIP_AT for seg, pos in hits}
    named = [seg for seg in flipped if _names(str(eng["segment"]), seg, srv.data_dir)]
    assert named, f"engine.corruption names segment {eng['segment']!r}, the damaged file is one of {list(flipped)}"
    assert any(0 <= flipped[seg] - int(eng["offset"]) < NBLOCKS * BLOCK + BLOCK for seg in named), (
        f"engine.corruption offset {eng['offset']} is not just before the flipped byte at {flipped}")
    # DESIGN: extents are 64 MiB by default, so this 64 MiB volume is one extent and block numbers coincide.
    assert (eng["block_start"], eng["block_count"]) == (target_off // BLOCK, 1), (
        f"engine.corruption should name block {target_off // BLOCK} (count 1): {eng}")
    assert eng["reason"], eng

    assert vol.get("volume") == "vol", vol
    assert (vol.get("offset_bytes"), vol.get("length_bytes")) == (target_off, BLOCK), (
        f"volume.corruption should name exactly the damaged 4 KiB block [{target_off}, +{BLOCK}): {vol}")
    # Exactly one damaged range was made, so exactly one should be reported.
    reported = [e for e in srv.log_events(start) if e.get("event") == "volume.corruption"]
    assert len(reported) == 1, f"expected one volume.corruption event, got {reported}"

    bad = nbd_read(uri, target_off, BLOCK, tmp_path)
    assert not bad["ok"] and bad["errnum"] == errno.EIO, f"read of the corrupt block must fail with EIO: {bad}"
    # A read that merely overlaps the corrupt block fails too (no partial wrong data).
    overlap = nbd_read(uri, target_off - BLOCK, 3 * BLOCK, tmp_path)
    assert not overlap["ok"] and overlap["errnum"] == errno.EIO, overlap

    for i in range(NBLOCKS):
        if i == TARGET:
            continue
        r = nbd_read(uri, WRITE_A + i * BLOCK, BLOCK, tmp_path)
        assert r["ok"] and r["data"] == data_a[i * BLOCK:(i + 1) * BLOCK], f"healthy block {i} of write A: {r}"
    r = nbd_read(uri, WRITE_B, NBLOCKS * BLOCK, tmp_path)
    assert r["ok"] and r["data"] == data_b, "a different request's blocks must read back intact"
    assert srv.alive(), "the server must survive serving an EIO"

    # Overwriting the damaged block replaces it (a new version), so it reads again.
    fresh = rng.randbytes(BLOCK)
    nbd_write(uri, target_off, fresh, tmp_path)
    r = nbd_read(uri, target_off, BLOCK, tmp_path)
    assert r["ok"] and r["data"] == fresh, f"an overwritten corrupt block must read the new data: {r}"
