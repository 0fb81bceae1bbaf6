"""Encryption at rest (raftblock/sealing.py, docs/encryption.md): the geometry, the sealer, the sealed ops of
wire/ops.py rule 7 and their apply (replication/apply.py rule 8) on a real engine, and the map's keys."""

from __future__ import annotations

import asyncio
import json
import struct
from collections import Counter
from pathlib import Path

import crc32c
import pytest

from raftblock import sealing
from raftblock.meta.state import (
    CreateVolume,
    InitCluster,
    MetaState,
    NextSealEpoch,
    RegisterNode,
    SetMasterKey,
)
from raftblock.replication.apply import apply_batch
from raftblock.replication.sessions import Sessions
from raftblock.storage.disk import OsDisk
from raftblock.storage.engine import Engine, EngineConfig
from raftblock.wire.ops import (
    AUX_BYTES,
    OP_FILL,
    OP_SNAP,
    OP_TRIM,
    OP_WRITE,
    BlockOp,
    decode_batch,
    encode_batch,
    entries_of,
    seal_blocks,
    write_spans,
)

B = 4096
E = 0x5_0000_0001  # group 5, extent 1
SEAL_AT = sealing.data_blocks(256)  # an extent of 256 blocks: 254 data blocks, entries in blocks 254-255


# -- geometry -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extent_blocks", [2, 129, 130, 256, 1000, 16384, 1 << 20])
def test_the_data_blocks_and_their_entries_fill_an_extent(extent_blocks: int) -> None:
    n = sealing.data_blocks(extent_blocks)
    meta = -(-n // 128)
    assert n + meta <= extent_blocks  # fits
    assert (n + 1) + -(-(n + 1) // 128) > extent_blocks  # and one more data block would not
    assert seal_blocks(n - 1, 1, n)[1] <= extent_blocks


def test_64_mib_extents_keep_99_2_percent_for_data() -> None:
    assert sealing.data_blocks(16384) == 16256


# -- the sealer ---------------------------------------------------------------------------------------------------
def _sealer(key: bytes = b"k" * 32, key_id: int = 77) -> tuple[sealing.Sealer, list[int]]:
    epochs: list[int] = []

    async def new_epoch() -> int:
        await asyncio.sleep(0)
        epochs.append(len(epochs) + 1)
        return epochs[-1]

    return sealing.Sealer(key, key_id, new_epoch), epochs


def test_blocks_seal_and_open_and_nonces_are_never_reused() -> None:
    s, epochs = _sealer()
    data = bytes(range(256)) * 16 * 3  # 3 blocks

    async def go() -> list[tuple[bytearray, bytes]]:
        return list(await asyncio.gather(*(s.seal(10, data) for _ in range(4))))

    out = asyncio.run(go())
    assert epochs == [1]  # one epoch for the process, taken once by concurrent first writers
    nonces = [e[i * AUX_BYTES : i * AUX_BYTES + 12] for _, e in out for i in range(3)]
    assert len(set(nonces)) == 12
    assert all(struct.unpack(">IQ", n)[0] == 1 for n in nonces)
    ct, entries = out[0]
    assert data[:B] not in ct  # ciphertext
    assert bytes(s.open(10, bytearray(ct), entries)) == data
    # a second process (another Sealer for the same key) takes the next epoch: its nonces differ too
    s2, _ = _sealer()
    s2._new_epoch = lambda: _const(2)  # type: ignore[method-assign]
    ct2, e2 = asyncio.run(s2.seal(10, data))
    assert e2[:12] != entries[:12] and ct2 != ct


async def _const(v: int) -> int:
    return v


def test_a_moved_tampered_or_foreign_block_does_not_decrypt() -> None:
    s, _ = _sealer()
    data = b"secret!!" * 512
    ct, entries = asyncio.run(s.seal(5, data))
    with pytest.raises(sealing.SealError, match="volume block 6"):
        s.open(6, bytearray(ct), entries)  # read at another address
    bad = bytearray(ct)
    bad[100] ^= 1
    with pytest.raises(sealing.SealError, match="does not decrypt"):
        s.open(5, bad, entries)
    other, _ = _sealer(key_id=78)  # same key, another key id (another volume): the associated data differs
    with pytest.raises(sealing.SealError):
        other.open(5, bytearray(ct), entries)
    # never written: zero data and a zero entry read as zeros; data without an entry is refused
    assert s.open(9, bytearray(B), bytes(AUX_BYTES)) == bytes(B)
    with pytest.raises(sealing.SealError, match="without its entry"):
        s.open(9, bytearray(ct), bytes(AUX_BYTES))


def test_keys_are_wrapped_and_a_wrong_secret_or_key_id_does_not_unwrap() -> None:
    secret = b"s" * 32
    master = sealing.new_data_key()
    wm = sealing.wrap_master_key(secret, 3, master)
    assert sealing.unwrap_master_key(secret, 3, wm) == master
    for bad in ((b"t" * 32, 3), (secret, 4)):
        with pytest.raises(ValueError, match="does not unwrap"):
            sealing.unwrap_master_key(bad[0], bad[1], wm)
    key = sealing.new_data_key()
    wk = sealing.wrap_volume_key(master, 99, key)
    assert sealing.unwrap_volume_key(master, 99, wk) == key
    with pytest.raises(ValueError, match="does not unwrap"):
        sealing.unwrap_volume_key(master, 98, wk)
    keys = sealing.VolumeKeys(secret, lambda _k: _const(1))
    keys.update({3: wm})
    ref = sealing.SealRef(99, 3, wk)
    assert keys.sealer(ref) is keys.sealer(ref)  # one per key id in a process
    with pytest.raises(ValueError, match="master key 4"):
        keys.sealer(sealing.SealRef(100, 4, wk))


# -- sealed ops (wire/ops.py rule 7) -----------------------------------------------------------------------
def _crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i : i + B]) for i in range(0, len(data), B)]


def _sw(block: int, data: bytes, aux: bytes, wid: int = 0, kind: int = OP_WRITE) -> BlockOp:
    n = len(data) // B
    return BlockOp(kind, E, block, n, _crcs(data), data, 9 if wid else 0, wid, 0, SEAL_AT, aux)


def test_sealed_ops_round_trip_and_bad_ones_are_refused() -> None:
    data = b"\x01" * (3 * B)
    aux = bytes(range(96))
    ops = [_sw(126, data, aux, wid=4), BlockOp(OP_TRIM, E, 0, 10, seal_at=SEAL_AT), _sw(0, b"p" * B, b"")]
    ops[2].seal_at = 0  # a plain write in the same batch
    raw = encode_batch(ops)
    got = decode_batch(raw)
    assert [(o.kind, o.block, o.count, o.seal_at, o.wid) for o in got] == \
        [(OP_WRITE, 126, 3, SEAL_AT, 4), (OP_TRIM, 0, 10, SEAL_AT, 0), (OP_WRITE, 0, 1, 0, 0)]
    assert bytes(got[0].data) == data and bytes(got[0].aux) == aux
    # the write-once spans point at the data, not at the entries after it
    spans = write_spans(raw, B)
    assert [bytes(raw[o : o + n]) for o, n in spans] == [data, b"p" * B]
    with pytest.raises(ValueError, match="metadata region"):
        encode_batch([_sw(SEAL_AT - 1, b"x" * (2 * B), bytes(64))])  # the data would reach the entries
    with pytest.raises(ValueError, match="one 32-byte entry per block"):
        encode_batch([_sw(0, b"x" * B, bytes(31))])
    with pytest.raises(ValueError, match="not sealed"):
        encode_batch([BlockOp(OP_SNAP, 3, 0, 0, seal_at=SEAL_AT)])
    cut = raw[: len(raw) - 200]
    with pytest.raises(ValueError):
        decode_batch(cut)


# -- apply (replication/apply.py rule 8) on a real engine ----------------------------------------------------
class _Replica:
    def __init__(self, root: Path) -> None:
        self.engine = Engine.open(OsDisk(), str(root), b"c" * 16, EngineConfig(segment_size_bytes=1 << 20,
                                                                              preallocate=False))
        self.sessions = Sessions()
        self.counters: Counter[str] = Counter()
        self.index = 0

    def apply(self, *ops: BlockOp) -> None:
        self.index += 1
        apply_batch(self.engine, self.sessions, 5, self.index, encode_batch(list(ops)), self.counters)

    def entries(self, block: int, n: int) -> bytes:
        first, end = seal_blocks(block, n, SEAL_AT)
        return entries_of(self.engine.read(E, first, end - first)[0], block, n)


def _aux(tag: int, n: int) -> bytes:
    return bytes([tag]) * (AUX_BYTES * n)


def test_a_sealed_write_patches_its_entries_and_a_retry_patches_nothing(tmp_path: Path) -> None:
    r = _Replica(tmp_path)
    r.apply(_sw(120, b"a" * (10 * B), _aux(0xA1, 10), wid=1))  # blocks 120-129: two metadata blocks
    assert r.entries(120, 10) == _aux(0xA1, 10)
    assert r.entries(119, 1) == bytes(AUX_BYTES) and r.entries(130, 1) == bytes(AUX_BYTES)
    r.apply(_sw(125, b"b" * B, _aux(0xB2, 1), wid=2), _sw(126, b"c" * B, _aux(0xC3, 1), wid=3))  # one entry, 2 ops
    assert r.entries(124, 4) == _aux(0xA1, 1) + _aux(0xB2, 1) + _aux(0xC3, 1) + _aux(0xA1, 1)
    r.apply(_sw(125, b"b" * B, _aux(0xA1, 1), wid=2))  # a retry of write 2 (its old entry): skipped whole
    assert r.counters["writes_deduplicated"] == 1 and r.entries(125, 1) == _aux(0xB2, 1)
    assert bytes(r.engine.read(E, 125, 1)[0]) == b"b" * B
    # the metadata blocks are ordinary blocks with their CRC: read back whole after a reopen
    r.engine.close()
    r2 = _Replica(tmp_path)
    assert r2.entries(120, 10) == _aux(0xA1, 5) + _aux(0xB2, 1) + _aux(0xC3, 1) + _aux(0xA1, 3)


def test_a_plain_write_into_the_metadata_region_earlier_in_the_entry_is_patched_not_lost(tmp_path: Path) -> None:
    r = _Replica(tmp_path)
    junk = b"j" * B
    r.apply(BlockOp(OP_WRITE, E, SEAL_AT, 1, _crcs(junk), junk), _sw(0, b"a" * B, _aux(3, 1)))
    assert bytes(r.engine.read(E, SEAL_AT, 1)[0]) == _aux(3, 1) + junk[AUX_BYTES:]


def test_a_sealed_trim_zeroes_entries_and_drops_an_empty_metadata_block(tmp_path: Path) -> None:
    r = _Replica(tmp_path)
    r.apply(_sw(0, b"a" * (4 * B), _aux(1, 4)), _sw(200, b"z" * B, _aux(2, 1)))
    r.apply(BlockOp(OP_TRIM, E, 1, 2, seal_at=SEAL_AT))
    assert r.entries(0, 4) == _aux(1, 1) + bytes(2 * AUX_BYTES) + _aux(1, 1)
    assert r.engine.block_status(E, 0, 4) == [(1, True), (2, False), (1, True)]
    r.apply(BlockOp(OP_TRIM, E, 0, 128, seal_at=SEAL_AT))  # every entry of the first metadata block
    assert r.engine.block_status(E, SEAL_AT, 2) == [(1, False), (1, True)]  # dropped; the second is kept
    r.apply(BlockOp(OP_TRIM, E, 10, 5, seal_at=SEAL_AT))  # entries already zero: nothing written
    assert r.engine.block_status(E, SEAL_AT, 1) == [(1, False)]


def test_a_sealed_fill_patches_only_the_blocks_it_fills(tmp_path: Path) -> None:
    r = _Replica(tmp_path)
    r.apply(_sw(3, b"h" * B, _aux(7, 1)))  # the host's write, before the fill
    r.apply(_sw(2, b"f" * (3 * B), _aux(9, 3), kind=OP_FILL))
    assert bytes(r.engine.read(E, 3, 1)[0]) == b"h" * B
    assert r.entries(2, 3) == _aux(9, 1) + _aux(7, 1) + _aux(9, 1)


# -- the map's keys ------------------------------------------------------------------------------------------
def _cluster() -> MetaState:
    s = MetaState()
    assert s.apply(InitCluster("c")).ok
    for n in (1, 2, 3):
        assert s.apply(RegisterNode(n, f"r{n}", f"h:{n}", 1 << 40, 1)).ok
    return s


def test_an_encrypted_volume_needs_the_active_master_key_and_has_fewer_bytes_per_extent() -> None:
    s = _cluster()
    size = 2 * s.extent_size_bytes  # two extents of data: three extents once 0.8 % of each holds entries
    assert s.apply(CreateVolume("e", size, 1, encrypt_key="w", encrypt_master=1, encrypt_key_id=5)).error \
        == "stale_master"
    assert s.apply(SetMasterKey(0, 1, "m1")).ok
    assert s.apply(CreateVolume("e", size, 1, encrypt_key="w", encrypt_master=1, encrypt_key_id=5)).ok
    assert s.apply(CreateVolume("p", size, 1)).ok
    e, p = s.volumes["e"], s.volumes["p"]
    assert (len(e.extent_groups), len(p.extent_groups)) == (3, 2)
    assert e.seal() == sealing.SealRef(5, 1, "w") and p.seal() is None
    assert s.apply(CreateVolume("f", B, 1, encrypt_key="w", encrypt_master=1, encrypt_key_id=0)).error == "invalid"
    # the same key id again: a restored backup of "e", under its key (the nonce epochs stay per key id)
    assert s.apply(CreateVolume("f", B, 1, encrypt_key="w", encrypt_master=1, encrypt_key_id=5)).ok
    # nonce epochs: one after the other, per key id; unknown key ids are refused
    assert [s.apply(NextSealEpoch(5)).value["epoch"] for _ in range(3)] == [1, 2, 3]
    assert s.apply(NextSealEpoch(6)).error == "unknown_key"
    # a master rotation rewraps exactly the encrypted volumes' keys, or nothing
    assert s.apply(SetMasterKey(1, 2, "m2", "{}")).error == "stale_master"
    f = s.volumes["f"]
    assert s.apply(SetMasterKey(0, 2, "m2", json.dumps({str(e.volume_id): "w2"}))).error == "stale_master"
    assert s.apply(SetMasterKey(1, 2, "m2", json.dumps({str(e.volume_id): "w2"}))).error == "stale_master"  # f too
    assert s.apply(SetMasterKey(1, 2, "m2", json.dumps({str(e.volume_id): "w2", str(f.volume_id): "w3"}))).ok
    assert s.volumes["e"].seal() == sealing.SealRef(5, 2, "w2") and s.master_keys == {1: "m1", 2: "m2"}
    back = MetaState.from_json(s.to_json())
    assert back.volumes["e"].seal() == sealing.SealRef(5, 2, "w2") and back.seal_epochs == {5: 3}
    assert back.master_key_active == 2


# -- backups of an encrypted volume (backup/manifest.py rule 3) --------------------------------------------
def test_an_encrypted_backups_manifest_names_its_key_and_sizes_its_chunks_with_their_entries() -> None:
    from raftblock.backup.manifest import Manifest, ManifestError

    m = Manifest("v", "s", 9 * (1 << 20) + 4096, [("zero",)] * 3, sealed={"key_id": 5, "master": 2, "wrapped": "w"})
    assert [m.stored_length(k) for k in range(3)] == [(4 << 20) + (32 << 10), (4 << 20) + (32 << 10),
                                                      (1 << 20) + 4096 + 3 * 4096]  # 257 entries: 3 blocks
    back = Manifest.from_json(m.to_json())
    assert back == m and back.sealed == {"key_id": 5, "master": 2, "wrapped": "w"}
    plain = Manifest("v", "s", 4096, [("zero",)])
    assert b"sealed" not in plain.to_json() and plain.stored_length(0) == 4096  # older readers see no change
    raw = json.loads(m.to_json())
    assert raw["version"] == 2 and json.loads(plain.to_json())["version"] == 1
    for bad_version in ({**raw, "version": 1}, {k: v for k, v in raw.items() if k != "sealed"}):
        with pytest.raises(ManifestError, match="version 2"):
            Manifest.from_json(json.dumps(bad_version))
    for bad in ({"key_id": 5}, {"key_id": 0, "master": 2, "wrapped": "w"}, {"key_id": 5, "master": True,
                                                                               "wrapped": "w"}, "x"):
        raw["sealed"] = bad
        with pytest.raises(ManifestError, match="sealed"):
            Manifest.from_json(json.dumps(raw))
