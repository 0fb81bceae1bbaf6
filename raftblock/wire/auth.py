"""Authenticated frames on the data port (docs/format/wire.md, "Authentication"): HMAC-SHA256 over every frame
with a key from the metadata group, a sequence number per connection and direction against replay.

Keys: the cluster's data keys live in the metadata map, wrapped (AES-256-GCM) under a key derived from the
cluster secret, by version (`DataKeys`); a storage node, a gateway or the CLI unwraps them with the secret it
already holds for the metadata admin port (`KeyRing.from_map`). A volume's key is derived from a cluster key
and the volume id (`KeyRing.volume_key`): a client's block request to a group of volume V is signed with V's
key, and a node refuses one signed with another volume's.

Rules:
1. After HELLO (unauthenticated, carrying a 16-byte random nonce each way), the next frame in each direction
   is AUTH (type 7, empty); every frame after HELLO ends with a 44-byte trailer counted in its payload:
   u16 key version, u16 scope (0 cluster, 1 volume), u64 volume id, 32-byte HMAC-SHA256 tag. The tag covers
   the session id (SHA-256 of both nonces, the dialer's first), the direction, the frame's sequence number in
   that direction (0 = AUTH; never sent: both ends count), the header's first 24 bytes, the message, the
   payload and the trailer's first 12 bytes. The frame CRC covers the trailer too (the decoder is unchanged).
2. The receiver checks the key version is in its ring (the active one or one not retired), the scope is one
   the frame may carry (peers: cluster; a client's CLIENT_REQ to a volume's group: that volume's key or the
   cluster key) and the tag (constant-time compare). Any failure is `AuthError(reason)`: the caller counts it,
   logs it once per peer per minute, and closes the connection. Nothing else of the frame is looked at first.
3. Key rotation: a new version is added to the map (accepted everywhere once every node has polled it), then
   made active (used for sending), then the old one retired (`raftblock cluster rotate-key` does the three
   steps, each after every node reports having the previous one).
4. No I/O, no clock. `cryptography` for the key wrap only; the tags are the standard library's hmac.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import crc32c

from raftblock.wire.framing import HEADER, HEADER_SIZE, Buf, Frame

FRAME_AUTH = 7  # FrameType: the first frame after HELLO in each direction, empty but for its trailer
NONCE_BYTES = 16
TRAILER = struct.Struct("<HHQ")
TAG_BYTES = 32
TRAILER_BYTES = TRAILER.size + TAG_BYTES  # 44
SCOPE_CLUSTER = 0
SCOPE_VOLUME = 1
KEY_BYTES = 32
_WRAP_INFO = b"raftblock data-key wrap v1"
_VOLUME_INFO = b"raftblock volume key v1"


class AuthError(Exception):
    """A frame that fails authentication; `reason` is the metric label: no_trailer, unknown_key, bad_scope,
    wrong_volume, bad_tag (forged, replayed, reordered or unsigned)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- keys -------------------------------------------------------------------------------------------------------
def kek(secret: bytes) -> bytes:
    return hmac.new(secret, _WRAP_INFO, hashlib.sha256).digest()


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def wrap_key(secret: bytes, version: int, key: bytes) -> str:
    """A data key as the map keeps it: AES-256-GCM under a key derived from the cluster secret, the version in
    the associated data (a wrapped key moved to another version does not unwrap). Base64 text."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    ct = AESGCM(kek(secret)).encrypt(nonce, key, b"raftblock data key %d" % version)
    return base64.b64encode(nonce + ct).decode()


def unwrap_key(secret: bytes, version: int, wrapped: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = base64.b64decode(wrapped)
    try:
        key = AESGCM(kek(secret)).decrypt(raw[:12], raw[12:], b"raftblock data key %d" % version)
    except InvalidTag as e:
        raise ValueError(f"data key {version} does not unwrap with this cluster secret") from e
    if len(key) != KEY_BYTES:
        raise ValueError(f"data key {version}: {len(key)} bytes")
    return key


@dataclass(frozen=True)
class DataKeys:
    """The map's data keys: version -> wrapped key, the active version (used for sending; 0 = no keys: the
    cluster predates authentication and its data port is not authenticated)."""

    wrapped: Mapping[int, str]
    active: int


class KeyRing:
    """Unwrapped cluster keys by version, and the volume keys derived from them (cached)."""

    def __init__(self, keys: Mapping[int, bytes], active: int) -> None:
        if active not in keys:
            raise ValueError(f"the active data key {active} is not in the ring")
        self.keys = dict(keys)
        self.active = active
        self._volume: dict[tuple[int, int], bytes] = {}

    @classmethod
    def from_map(cls, secret: bytes, dk: DataKeys) -> KeyRing | None:
        if not dk.active:
            return None
        return cls({v: unwrap_key(secret, v, w) for v, w in dk.wrapped.items()}, dk.active)

    def key(self, version: int, scope: int, vid: int) -> bytes:
        k = self.keys.get(version)
        if k is None:
            raise AuthError("unknown_key", f"key version {version} (known: {sorted(self.keys)})")
        if scope == SCOPE_CLUSTER:
            return k
        vk = self._volume.get((version, vid))
        if vk is None:
            vk = self._volume[(version, vid)] = self.volume_key(k, vid)
        return vk

    @staticmethod
    def volume_key(cluster_key: bytes, vid: int) -> bytes:
        return hmac.new(cluster_key, _VOLUME_INFO + vid.to_bytes(8, "little"), hashlib.sha256).digest()


def session_id(dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    return hashlib.sha256(b"raftblock session v1" + dialer_nonce + acceptor_nonce).digest()


# -- frames -------------------------------------------------------------------------------------------------------
class Session:
    """One connection's authentication state: its id, the sequence numbers both ways, and the ring (replaced
    when the map's keys change: `ring` is read at every frame)."""

    __slots__ = ("_recv_dir", "_send_dir", "recv_seq", "ring", "send_seq", "sid")

    def __init__(self, ring: KeyRing, sid: bytes, dialer: bool) -> None:
        self.ring = ring
        self.sid = sid
        self._send_dir = b"\x00" if dialer else b"\x01"
        self._recv_dir = b"\x01" if dialer else b"\x00"
        self.send_seq = 0
        self.recv_seq = 0

    def _tag(self, key: bytes, direction: bytes, seq: int, head24: Buf, message: Buf, payload: Sequence[Buf],
             prefix: bytes) -> bytes:
        h = hmac.new(key, self.sid, hashlib.sha256)
        h.update(direction + seq.to_bytes(8, "little"))
        h.update(head24)
        h.update(message)
        for p in payload:
            h.update(p)
        h.update(prefix)
        return h.digest()

    def seal(self, parts: Sequence[Buf], vid: int = 0) -> list[Buf]:
        """`parts`: whole frames as encode_frame made them (header, message, payload parts; several frames may
        follow each other). Each gets its trailer (the volume key of `vid` when not 0, else the active cluster
        key), a header with the longer payload and a new CRC."""
        out: list[Buf] = []
        i = 0
        n = len(parts)
        ring = self.ring
        version = ring.active
        scope = SCOPE_VOLUME if vid else SCOPE_CLUSTER
        key = ring.key(version, scope, vid)
        prefix = TRAILER.pack(version, scope, vid)
        while i < n:
            head = parts[i]
            magic, ver, ftype, flags, res, group, mlen, plen, _crc = HEADER.unpack_from(head, 0)
            message = parts[i + 1]
            i += 2
            payload: list[Buf] = []
            got = 0
            while got < plen:
                p = parts[i]
                payload.append(p)
                got += len(p)
                i += 1
            new_head = bytearray(HEADER.pack(magic, ver, ftype, flags, res, group, mlen, plen + TRAILER_BYTES, 0))
            head24 = memoryview(new_head)[:24]
            tag = self._tag(key, self._send_dir, self.send_seq, head24, message, payload, prefix)
            self.send_seq += 1
            trailer = prefix + tag
            crc = crc32c.crc32c(head24, 0)
            crc = crc32c.crc32c(message, crc)
            for p in payload:
                crc = crc32c.crc32c(p, crc)
            crc = crc32c.crc32c(trailer, crc)
            struct.pack_into("<I", new_head, 24, crc)
            out.append(bytes(new_head))
            out.append(message)
            out.extend(payload)
            out.append(trailer)
        return out

    def open(self, frame: Frame, head24: bytes, allow_volume: bool) -> int:
        """Check `frame` (its header's first 24 bytes as received: `head24`); strip its trailer from
        `frame.payload`. Returns the volume id it was signed for (0: the cluster key). AuthError otherwise."""
        seq = self.recv_seq
        self.recv_seq += 1  # a frame that fails closes the connection: the count never needs to go back
        payload = frame.payload
        if len(payload) < TRAILER_BYTES:
            raise AuthError("no_trailer", f"frame type {frame.type}: {len(payload)} payload bytes")
        view = memoryview(payload)
        body, trailer = view[:-TRAILER_BYTES], bytes(view[-TRAILER_BYTES:])
        version, scope, vid = TRAILER.unpack_from(trailer, 0)
        if scope == SCOPE_VOLUME and not allow_volume:
            raise AuthError("bad_scope", f"a volume key on frame type {frame.type}")
        if scope not in (SCOPE_CLUSTER, SCOPE_VOLUME) or (scope == SCOPE_CLUSTER and vid):
            raise AuthError("bad_scope", f"scope {scope}")
        key = self.ring.key(version, scope, vid)
        want = self._tag(key, self._recv_dir, seq, head24, frame.message, (body,), trailer[:TRAILER.size])
        if not hmac.compare_digest(want, trailer[TRAILER.size:]):
            raise AuthError("bad_tag", f"frame type {frame.type}, sequence {seq}")
        frame.payload = body if len(body) > 0 else b""
        return int(vid) if scope == SCOPE_VOLUME else 0


def head24_of(frame: Frame) -> bytes:
    """The first 24 bytes of a received frame's header, rebuilt from its fields (the decoder keeps none):
    the frame's CRC already proved them."""
    return HEADER.pack(b"RB", 1, frame.type, frame.flags, 0, frame.group, len(frame.message), len(frame.payload),
                       0)[:24]


__all__ = ["FRAME_AUTH", "HEADER_SIZE", "NONCE_BYTES", "AuthError", "DataKeys", "KeyRing", "Session",
           "head24_of", "new_data_key", "session_id", "unwrap_key", "wrap_key"]
