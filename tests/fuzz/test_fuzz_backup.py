"""Fuzz properties of the backup decoders (backup/chunk.py verified decode and deltas, backup/manifest.py):
round trips, ChunkError / ManifestError as the only failures, and no allocation a header only announces."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import zstandard
from fuzz_strategies import fuzz, mutated
from fuzz_targets import corpus, delta_roundtrip, target_chunk, target_manifest
from hypothesis import given
from hypothesis import strategies as st

from raftblock.backup import chunk
from raftblock.backup.manifest import Manifest, ManifestError

NAMES = st.text("0123456789abcdef", min_size=64, max_size=64)


@fuzz(150)
@given(st.binary(max_size=20000), st.sampled_from([chunk.KIND_FULL, chunk.KIND_DELTA]), st.integers(1, 3))
def test_chunks_round_trip(plain: bytes, kind: int, level: int) -> None:
    name, obj = chunk.encode(plain, kind, level)
    assert chunk.decode(name, obj, kind) == plain


@fuzz(60)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.binary(min_size=n * 512, max_size=n * 512),
                                                      st.lists(st.tuples(st.integers(0, n * 512 - 1),
                                                                         st.integers(0, 255)), max_size=6))))
def test_deltas_round_trip(case: tuple[bytes, list[tuple[int, int]]]) -> None:
    base, edits = case
    new = bytearray(base)
    for at, v in edits:
        new[at] = v
    delta_roundtrip(base, bytes(new))


@fuzz(300)
@given(st.binary(max_size=4096))
def test_chunk_decode_takes_arbitrary_objects(traced: None, data: bytes) -> None:
    target_chunk(data)


@fuzz(400)
@given(mutated(corpus("chunk")))
def test_chunk_decode_takes_mutated_objects(traced: None, data: bytes) -> None:
    target_chunk(data)


def _bomb(content_size: int, declared: int) -> bytes:
    """A chunk object whose zstd frame says it holds `content_size` bytes (zeros: a few KiB compressed) and
    whose header says `declared`."""
    body = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(content_size))
    return struct.pack("<8sBBHII", chunk.MAGIC, chunk.KIND_FULL, chunk.CODEC_ZSTD, 0, declared, 0) + body


@pytest.mark.parametrize("declared", [0, 10, chunk.PLAIN_BYTES_MAX])
def test_a_frame_claiming_more_than_the_header_is_refused_before_it_is_decompressed(declared: int,
                                                                                    traced: None) -> None:
    """Rule 2: the zstd frame's content size is checked against the header's plaintext length first;
    python-zstandard's max_output_size does not bound a frame that declares its size (regression:
    corpus/regressions/chunk)."""
    obj = _bomb(64 << 20, declared)
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    with pytest.raises(chunk.ChunkError):
        chunk.decode("0" * 64, obj)
    assert tracemalloc.get_traced_memory()[1] - base < 2 * chunk.PLAIN_BYTES_MAX


def test_a_frame_claiming_an_impossible_size_is_a_chunk_error() -> None:
    body = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(b"abc"))
    fhd = body[4]
    assert fhd >> 6 == 0 and fhd & 0x20  # single segment, a 1-byte content size: make it 8 bytes of 2^60
    body[4] = (fhd & 0x3F) | 0xC0
    body[5:6] = (1 << 60).to_bytes(8, "little")
    obj = struct.pack("<8sBBHII", chunk.MAGIC, chunk.KIND_FULL, chunk.CODEC_ZSTD, 0, 3, 0) + bytes(body)
    with pytest.raises(chunk.ChunkError):
        chunk.decode("0" * 64, obj)


def test_a_delta_shorter_than_its_bitmap_is_a_chunk_error() -> None:
    base = bytes(4 * chunk.BLOCK_BYTES * 8 * 3)  # 96 blocks: a 12-byte bitmap
    delta = bytes.fromhex(chunk.chunk_name(base)) + struct.pack("<H", 96) + b"\x01"
    with pytest.raises(chunk.ChunkError):
        chunk.apply_delta("d" * 64, delta, chunk.chunk_name(base), base)


# --- manifests ---------------------------------------------------------------------------------------
@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    chunk_bytes = draw(st.sampled_from([4096, 8192, chunk.CHUNK_BYTES]))
    size = draw(st.integers(0, 6 * chunk_bytes))
    n = (size + chunk_bytes - 1) // chunk_bytes
    entries = draw(st.lists(st.one_of(st.just(("zero",)), st.tuples(st.just("full"), NAMES),
                                      st.tuples(st.just("delta"), NAMES, NAMES)), min_size=n, max_size=n))
    return Manifest(draw(st.text(max_size=20)), draw(st.text(max_size=20)), size, entries,
                    snap_id=draw(st.integers(0, 1 << 64)), created_ms=draw(st.integers(0, 1 << 45)),
                    chunk_bytes=chunk_bytes, block_bytes=4096, parent=draw(st.none() | st.text(max_size=10)),
                    stats=draw(st.dictionaries(st.text(max_size=8), st.integers(0, 1 << 40), max_size=3)))


@fuzz(200)
@given(manifests())
def test_manifests_round_trip(m: Manifest) -> None:
    assert Manifest.from_json(m.to_json()) == m
    target_manifest(m.to_json())


@fuzz(400)
@given(st.binary(max_size=2048))
def test_manifest_parser_takes_arbitrary_bytes(data: bytes) -> None:
    target_manifest(data)


@fuzz(600)
@given(mutated(corpus("manifest")))
def test_manifest_parser_takes_mutated_manifests(data: bytes) -> None:
    target_manifest(data)


JSONS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                     max_leaves=20)


@fuzz(300)
@given(manifests(), st.sampled_from(["volume", "snapshot", "size_bytes", "chunk_bytes", "block_bytes", "parent",
                                     "chunks", "stats", "snap_id", "created_ms", "format", "version"]), JSONS)
def test_manifest_fields_of_any_type(m: Manifest, key: str, value: object) -> None:
    """Rule 1: every field's type is checked (a wrong one is ManifestError, never another exception)."""
    d = json.loads(m.to_json())
    d[key] = value
    target_manifest(json.dumps(d).encode())


@pytest.mark.parametrize("raw", [b"[" * 100000, b'{"a":' * 100000, b'{"format": "raftblock-backup", "version": 1,'
                                 b' "stats": ' + b"[" * 50000 + b"]" * 50000 + b"}"])
def test_deeply_nested_json_is_a_manifest_error(raw: bytes) -> None:
    """Rule 1: anything else is ManifestError (json's RecursionError included; regression:
    corpus/regressions/manifest)."""
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def test_chunk_names_must_be_64_hex_digits_exactly() -> None:
    m = json.loads(Manifest("v", "s", 4096, [("full", "ab" * 32)], chunk_bytes=4096).to_json())
    for bad in ["ab" * 32 + "\n", "AB" * 32, "ab" * 31, "ab" * 33]:
        m["chunks"] = [["full", bad]]
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(m))


def test_stats_hold_integers_only() -> None:
    m = json.loads(Manifest("v", "s", 0, []).to_json())
    for bad in [{"a": 1.5}, {"a": [1]}, {"a": True}, {"a": float("nan")}]:
        m["stats"] = bad
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(m))
