"""Backup chunk objects (docs/format/backup.md, "Chunk object"): sans-I/O encode and verified decode.

Rules:
1. A chunk object is named by the SHA-256 of its plaintext, so the same data is one object whatever the
   compression level or the volume it came from.
2. Decoding checks everything it can, in order (magic and kind, zstd frame, plaintext length, CRC32C, the
   name's hash) and raises ChunkError naming the object on the first mismatch: a restore never writes
   bytes it has not verified, and never allocates more than the header's plaintext length (at most
   PLAIN_BYTES_MAX), whatever the zstd frame claims.
3. A delta carries the blocks of one chunk that differ from a full base chunk (by the base's name) and a
   bitmap of which; applying one to anything but its base is refused.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import crc32c
import zstandard

MAGIC = b"RBCHUNK1"
KIND_FULL = 1
KIND_DELTA = 2
CODEC_ZSTD = 1
CHUNK_BYTES = 4 << 20
BLOCK_BYTES = 4096
ZSTD_LEVEL = 1
_HEAD = struct.Struct("<8sBBHII")  # magic, kind, codec, reserved, plain_len, plain_crc
_DELTA_HEAD = struct.Struct("<32sH")  # base sha256, block count
# an encrypted volume's chunk carries its blocks' 32-byte entries too (manifest.py rule 3): 1/128 more
_SEALED_CHUNK_BYTES = CHUNK_BYTES + CHUNK_BYTES // 128
PLAIN_BYTES_MAX = _SEALED_CHUNK_BYTES + _DELTA_HEAD.size + _SEALED_CHUNK_BYTES // BLOCK_BYTES // 8


class ChunkError(ValueError):
    """An object that is not the chunk its name says (tampered, truncated, another format)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"chunk {name}: {reason}")
        self.name = name
        self.reason = reason


def chunk_name(plain: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(plain).hexdigest()


def encode(plain: bytes | bytearray | memoryview, kind: int = KIND_FULL, level: int = ZSTD_LEVEL) -> tuple[str, bytes]:
    """(name, object bytes) of a chunk whose plaintext is `plain`."""
    if len(plain) > PLAIN_BYTES_MAX:
        raise ValueError(f"a chunk's plaintext is at most {PLAIN_BYTES_MAX} bytes, got {len(plain)}")
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(plain)
    head = _HEAD.pack(MAGIC, kind, CODEC_ZSTD, 0, len(plain), crc32c.crc32c(plain))
    return chunk_name(plain), head + body


def decode(name: str, obj: bytes | bytearray | memoryview, kind: int = KIND_FULL) -> bytes:
    """The verified plaintext of object `obj` stored as `name` (rule 2)."""
    if len(obj) < _HEAD.size:
        raise ChunkError(name, f"{len(obj)} bytes, shorter than a chunk header")
    magic, got_kind, codec, _res, plain_len, plain_crc = _HEAD.unpack_from(obj, 0)
    if magic != MAGIC:
        raise ChunkError(name, f"not a chunk of this format (magic {bytes(magic)!r})")
    if got_kind != kind:
        raise ChunkError(name, f"kind {got_kind}, expected {kind}")
    if codec != CODEC_ZSTD:
        raise ChunkError(name, f"unknown codec {codec}")
    if plain_len > PLAIN_BYTES_MAX:
        raise ChunkError(name, f"plaintext length {plain_len} is beyond any chunk")
    body = memoryview(obj)[_HEAD.size :]
    try:
        # The frame's own content size first: decompress() allocates what a frame declares, whatever
        # max_output_size says (that bounds only a frame without one, -1 here).
        framed = zstandard.frame_content_size(body)
        if framed > plain_len:
            raise ChunkError(name, f"compressed body holds {framed} bytes, the header says {plain_len}")
        plain = zstandard.ZstdDecompressor().decompress(body, max_output_size=plain_len)
    except zstandard.ZstdError as e:
        raise ChunkError(name, f"compressed body does not decode: {e}") from e
    if len(plain) != plain_len:
        raise ChunkError(name, f"plaintext is {len(plain)} bytes, the header says {plain_len}")
    if crc32c.crc32c(plain) != plain_crc:
        raise ChunkError(name, "plaintext CRC32C mismatch")
    if chunk_name(plain) != name:
        raise ChunkError(name, "content does not hash to the object's name")
    return plain


def changed_blocks(base: bytes | bytearray | memoryview, new: bytes | bytearray | memoryview) -> list[int]:
    """Indexes of the 4 KiB blocks in which `new` differs from `base` (same length)."""
    if len(base) != len(new):
        raise ValueError("a delta needs chunks of the same length")
    b, n = memoryview(base), memoryview(new)
    return [k for k in range(0, (len(new) + BLOCK_BYTES - 1) // BLOCK_BYTES)
            if b[k * BLOCK_BYTES : (k + 1) * BLOCK_BYTES] != n[k * BLOCK_BYTES : (k + 1) * BLOCK_BYTES]]


def delta_plain(base_name: str, new: bytes | bytearray | memoryview, blocks: Sequence[int]) -> bytes:
    """Rule 3: the plaintext of a delta taking the base named `base_name` to `new`."""
    count = (len(new) + BLOCK_BYTES - 1) // BLOCK_BYTES
    bitmap = bytearray((count + 7) // 8)
    parts: list[bytes | memoryview] = [_DELTA_HEAD.pack(bytes.fromhex(base_name), count), b""]
    view = memoryview(new)
    for k in blocks:
        bitmap[k >> 3] |= 1 << (k & 7)
        parts.append(view[k * BLOCK_BYTES : (k + 1) * BLOCK_BYTES])
    parts[1] = bytes(bitmap)
    return b"".join(parts)


def apply_delta(name: str, delta: bytes, base_name: str, base: bytes) -> bytes:
    """The chunk a verified delta plaintext makes of its verified base (rule 3)."""
    if len(delta) < _DELTA_HEAD.size:
        raise ChunkError(name, "delta shorter than its header")
    raw_base, count = _DELTA_HEAD.unpack_from(delta, 0)
    if raw_base.hex() != base_name:
        raise ChunkError(name, f"delta of {raw_base.hex()}, not of {base_name}")
    if count != (len(base) + BLOCK_BYTES - 1) // BLOCK_BYTES:
        raise ChunkError(name, f"delta of {count} blocks, the base has {len(base)} bytes")
    off = _DELTA_HEAD.size
    bitmap = delta[off : off + (count + 7) // 8]
    if len(bitmap) != (count + 7) // 8:
        raise ChunkError(name, "delta ends before its bitmap does")
    off += len(bitmap)
    out = bytearray(base)
    for k in range(count):
        if bitmap[k >> 3] >> (k & 7) & 1:
            end = min((k + 1) * BLOCK_BYTES, len(out))
            size = end - k * BLOCK_BYTES
            if off + size > len(delta):
                raise ChunkError(name, "delta ends before its blocks do")
            out[k * BLOCK_BYTES : end] = delta[off : off + size]
            off += size
    if off != len(delta):
        raise ChunkError(name, "delta has bytes after its blocks")
    return bytes(out)
