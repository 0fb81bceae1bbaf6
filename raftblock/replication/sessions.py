# Client sessions of an extent group: which client writes have been applied (exactly-once writes).
#
# A gateway names every write and trim (client id = its incarnation, write id = a counter), keeps the
# name across its retries, and sends with it the lowest write id it still has outstanding (its low-water
# mark). A retry can reach the log twice (the first attempt committed at a leader or head that died
# before it answered); applying it twice would bring an old value back over a newer write of another
# client. So every replica, when it applies an op that carries a name, asks `admit`: an op whose id is
# already applied, or below its client's low-water mark (an attempt the gateway has given up on or that
# already answered), is skipped.
#
# Rules:
# 1. The table is replicated state: every replica derives it from the same log, in the same order, so
#    every replica skips the same ops. It is captured exactly at a compaction point (SnapshotMeta.app,
#    durable in the WAL) and travels with a snapshot image (its first section), so a restart or an
#    installed image replays the suffix with the same decisions.
# 2. Bounded: per client only ids at or above its low-water mark are kept; at most CLIENTS_MAX clients,
#    the one seen longest ago (by log position, a deterministic order) is forgotten first. A gateway that
#    was forgotten and retries gets the old at-least-once behaviour; with CLIENTS_MAX gateways writing to
#    one group within a retry deadline that does not happen.
# 3. Ops without a name (client 0: tools, old gateways) are always applied.
from __future__ import annotations

import struct

CLIENTS_MAX = 1024
_PRUNE_AT = 64  # prune a client's applied ids below its low-water mark once it holds this many
_HEAD = struct.Struct("<I")
_CLIENT = struct.Struct("<QQQI")  # client id, low-water mark, last log position seen, id count
_U64 = struct.Struct("<Q")
# A snapshot image is (u32 length, ops batch)*; a first section with this length is the session table.
IMAGE_SESSIONS_MARK = 0xFFFFFFFF


class _Client:
    __slots__ = ("low", "applied", "last")

    def __init__(self, low: int, last: int) -> None:
        self.low = low
        self.applied: set[int] = set()
        self.last = last


class Sessions:
    __slots__ = ("clients", "duplicates")

    def __init__(self) -> None:
        self.clients: dict[int, _Client] = {}
        self.duplicates = 0  # ops skipped since this process started (a counter, not state)

    def admit(self, client: int, wid: int, low: int, pos: int) -> bool:
        """Called for every named op as it applies, at log position `pos` (Raft index, chain seq).
        True: apply it (and remember it); False: skip it (already applied, or given up on)."""
        if client == 0:
            return True
        c = self.clients.get(client)
        if c is None:
            if len(self.clients) >= CLIENTS_MAX:
                old = min(self.clients.items(), key=lambda kv: (kv[1].last, kv[0]))[0]
                del self.clients[old]
            c = self.clients[client] = _Client(low, pos)
        c.last = pos
        if low > c.low:
            c.low = low
            if len(c.applied) >= _PRUNE_AT:
                c.applied = {w for w in c.applied if w >= low}
        if wid < c.low or wid in c.applied:
            self.duplicates += 1
            return False
        c.applied.add(wid)
        return True

    def forget(self, client: int, wid: int) -> None:
        """Undo an admit whose op could not be applied after all (the disk was full): the entry is applied
        again later, and must be admitted again then. The low-water mark stays (it only says which ids
        the client has finished with)."""
        c = self.clients.get(client)
        if c is not None:
            c.applied.discard(wid)

    def encode(self) -> bytes:
        parts = [_HEAD.pack(len(self.clients))]
        for cid in sorted(self.clients):
            c = self.clients[cid]
            ids = sorted(w for w in c.applied if w >= c.low)
            parts.append(_CLIENT.pack(cid, c.low, c.last, len(ids)))
            parts.extend(_U64.pack(w) for w in ids)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Sessions:
        """Raises ValueError on a malformed table. b"" is the empty table."""
        s = cls()
        if not len(data):
            return s
        view = memoryview(data)
        try:
            (n,) = _HEAD.unpack_from(view, 0)
            off = _HEAD.size
            for _ in range(n):
                cid, low, last, k = _CLIENT.unpack_from(view, off)
                off += _CLIENT.size
                if off + 8 * k > len(view):
                    raise ValueError("session table truncated")
                c = s.clients[cid] = _Client(low, last)
                c.applied = set(struct.unpack_from(f"<{k}Q", view, off))
                off += 8 * k
        except struct.error as e:
            raise ValueError(f"malformed session table: {e}") from e
        if off != len(view):
            raise ValueError("trailing bytes after the session table")
        return s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sessions) and self.encode() == other.encode()

    def __repr__(self) -> str:
        return f"Sessions({len(self.clients)} clients)"


def image_prefix(app: bytes) -> bytes:
    """The first section of a snapshot image: the session table at the image's log position."""
    return _HEAD.pack(IMAGE_SESSIONS_MARK) + _HEAD.pack(len(app)) + app
