"""Encryption at rest (docs/encryption.md): AES-256-GCM of an encrypted volume's blocks, at its gateway.

Rules:
1. Geometry: an encrypted volume's extent of E blocks holds L = E - ceil(E / 129) data blocks, then its
   metadata region from block L (`seal_at`): one 32-byte entry per data block (entry k of block b: block
   L + b // 128, bytes 32 * (b % 128)). A volume block v is extent v // L, block v % L. An entry is
   nonce (12) | tag (16) | key version (u32 little-endian); all zeros: the block was never written (or was
   trimmed) and reads as zeros without decryption.
2. Data and entries travel and are applied together (wire/ops.py rule 7): one op of one log entry, so a crash
   never leaves a block with another block's tag. Nodes, WAL, segments, rebuild images, scrub and snapshots
   only ever hold ciphertext and entries: nothing below the gateway has the key.
3. Nonces are never reused under a key (NIST SP 800-38D 8.2.1, deterministic construction): nonce =
   epoch (u32 big-endian) | counter (u64 big-endian). The epoch is the key's next one, taken from the
   metadata group (NextSealEpoch) by each process before its first write with the key; the counter counts
   that process's blocks. A restarted gateway, a second writer, a flatten: each a new epoch.
4. The associated data binds a block to its place: key id (the volume whose creation made the key; a clone
   shares its parent's key and id) | volume block number. A ciphertext moved to another block, or to another
   volume, fails its tag: the read is an EIO, never another block's data.
5. Keys: a volume's data key (32 random bytes) is wrapped (AES-256-GCM) by the cluster master key of a
   version, the master keys by a key derived from the cluster secret; the map holds only wrapped keys.
   Rotating the master key rewraps every data key (no data is rewritten).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from raftblock.wire.auth import KEY_BYTES, kek
from raftblock.wire.ops import AUX_BYTES, AUX_PER_BLOCK, BLOCK_SIZE

ENTRY_BYTES = AUX_BYTES
_NONCE = struct.Struct(">IQ")
_AAD = struct.Struct("<QQ")
_VERSION = struct.Struct("<I")
_ZERO_ENTRY = bytes(ENTRY_BYTES)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
KEY_VERSION = 1  # of a volume's data key, in every entry (a data-key rotation would raise it)
EPOCH_MAX = (1 << 32) - 1
COUNTER_MAX = (1 << 64) - 1


def data_blocks(extent_blocks: int) -> int:
    """L of rule 1: the data blocks of an encrypted extent (its metadata region starts there)."""
    return extent_blocks - -(-extent_blocks // (AUX_PER_BLOCK + 1))


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _gcm(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _wrap(kek_: bytes, key: bytes, what: bytes) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + _gcm(kek_).encrypt(nonce, key, what)).decode()


def _unwrap(kek_: bytes, wrapped: str, what: bytes, name: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        raw = base64.b64decode(wrapped, validate=True)
        key = bytes(_gcm(kek_).decrypt(raw[:12], raw[12:], what))
    except (InvalidTag, ValueError) as e:
        raise ValueError(f"{name} does not unwrap") from e
    if len(key) != KEY_BYTES:
        raise ValueError(f"{name}: {len(key)} bytes")
    return key


def wrap_master_key(secret: bytes, version: int, key: bytes) -> str:
    return _wrap(kek(secret), key, b"raftblock master key %d" % version)


def unwrap_master_key(secret: bytes, version: int, wrapped: str) -> bytes:
    return _unwrap(kek(secret), wrapped, b"raftblock master key %d" % version,
                   f"master key {version} (with this cluster secret)")


def wrap_volume_key(master: bytes, key_id: int, key: bytes) -> str:
    return _wrap(master, key, b"raftblock volume key %d" % key_id)


def unwrap_volume_key(master: bytes, key_id: int, wrapped: str) -> bytes:
    return _unwrap(master, wrapped, b"raftblock volume key %d" % key_id, f"the data key of key id {key_id}")


@dataclass(frozen=True)
class SealRef:
    """An encrypted volume's key as the map names it (VolumeInfo.seal): no secret in it."""

    key_id: int
    master_version: int
    wrapped: str


class SealError(Exception):
    """A block that does not decrypt (tampered, moved, or its entry lost): `block` is the volume block."""

    def __init__(self, block: int, reason: str) -> None:
        super().__init__(f"volume block {block}: {reason}")
        self.block = block
        self.reason = reason


class Sealer:
    """One data key in one process (rule 3: one epoch and counter for every volume object using the key)."""

    def __init__(self, key: bytes, key_id: int, new_epoch: Callable[[], Awaitable[int]]) -> None:
        self._gcm = _gcm(key)
        self.key_id = key_id
        self._new_epoch = new_epoch
        self._epoch = 0
        self._counter = 0
        self._taking: asyncio.Future[None] | None = None
        self.blocks_sealed = 0
        self.blocks_opened = 0

    async def _ensure_epoch(self, n: int) -> None:
        while not self._epoch or self._counter + n > COUNTER_MAX:
            if self._taking is not None:
                await asyncio.shield(self._taking)
                continue
            self._taking = asyncio.get_running_loop().create_future()
            try:
                epoch = await self._new_epoch()
                if not 0 < epoch <= EPOCH_MAX:
                    raise ValueError(f"nonce epoch {epoch} out of range for key id {self.key_id}")
                self._epoch, self._counter = epoch, 0
                self._taking.set_result(None)
            except BaseException as e:
                self._taking.set_exception(e)
                self._taking.exception()
                raise
            finally:
                self._taking = None

    async def seal(self, first: int, data: memoryview | bytes | bytearray) -> tuple[bytearray, bytes]:
        """Volume blocks [first, first + len/4096) of plaintext -> (ciphertext, their entries)."""
        n = len(data) // BLOCK_SIZE
        if not self._epoch or self._counter + n > COUNTER_MAX:
            await self._ensure_epoch(n)
        epoch, counter = self._epoch, self._counter
        self._counter = counter + n  # taken before anything else can run: never handed out twice
        view = memoryview(data)
        out = bytearray(n * BLOCK_SIZE)
        entries = bytearray(n * ENTRY_BYTES)
        enc = self._gcm.encrypt
        version = _VERSION.pack(KEY_VERSION)
        for i in range(n):
            nonce = _NONCE.pack(epoch, counter + i)
            ct = memoryview(enc(nonce, view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], _AAD.pack(self.key_id, first + i)))
            out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = ct[:BLOCK_SIZE]
            entries[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES] = nonce + ct[BLOCK_SIZE:] + version
        self.blocks_sealed += n
        return out, bytes(entries)

    def open(self, first: int, data: bytearray, entries: bytes) -> bytearray:
        """Ciphertext of volume blocks [first, ...) and their entries -> plaintext, in place; SealError if a
        block fails its tag (rule 4) or has data but no entry."""
        from cryptography.exceptions import InvalidTag

        n = len(data) // BLOCK_SIZE
        if entries == bytes(len(entries)) and data == bytes(len(data)):  # a hole (memcmp): zeros, nothing to open
            self.blocks_opened += n
            return data
        dec = self._gcm.decrypt
        view = memoryview(data)
        for i in range(n):
            e = entries[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES]
            blk = view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            if e == _ZERO_ENTRY:
                if blk != _ZERO_BLOCK:  # a block with data and no entry: not something this store ever writes
                    raise SealError(first + i, "data without its entry")
                continue
            (version,) = _VERSION.unpack_from(e, 28)
            if version != KEY_VERSION:
                raise SealError(first + i, f"entry of key version {version}, this volume's key is {KEY_VERSION}")
            try:
                blk[:] = dec(e[:12], bytes(blk) + e[12:28], _AAD.pack(self.key_id, first + i))
            except InvalidTag:
                raise SealError(first + i, "does not decrypt (tampered, moved, or not this volume's)") from None
        self.blocks_opened += n
        return data


class VolumeKeys:
    """A process's encrypted volumes' keys: unwraps with the cluster secret and the map's master keys; one
    Sealer per key id for the process's life (rule 3). `new_epoch(key_id)` asks the metadata group."""

    def __init__(self, secret: bytes | None, new_epoch: Callable[[int], Awaitable[int]]) -> None:
        self._secret = secret
        self._new_epoch = new_epoch
        self._masters: dict[int, str] = {}
        self._sealers: dict[int, Sealer] = {}

    def update(self, master_keys: Mapping[int, str]) -> None:
        self._masters = dict(master_keys)

    def sealer(self, ref: SealRef) -> Sealer:
        s = self._sealers.get(ref.key_id)
        if s is None:
            if self._secret is None:
                raise ValueError("an encrypted volume needs the cluster secret to unwrap its key")
            wrapped_master = self._masters.get(ref.master_version)
            if wrapped_master is None:
                raise ValueError(f"master key {ref.master_version} is not in the map")
            master = unwrap_master_key(self._secret, ref.master_version, wrapped_master)
            key = unwrap_volume_key(master, ref.key_id, ref.wrapped)
            s = self._sealers[ref.key_id] = Sealer(key, ref.key_id, lambda: self._new_epoch(ref.key_id))
        return s

    def stats(self) -> tuple[int, int]:
        """Blocks sealed and opened by this process."""
        return (sum(s.blocks_sealed for s in self._sealers.values()),
                sum(s.blocks_opened for s in self._sealers.values()))
