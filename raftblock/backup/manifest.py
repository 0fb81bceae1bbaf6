"""Backup manifests (docs/format/backup.md, "Manifest"): one JSON object per backed-up snapshot.

Rules:
1. `Manifest.from_json` accepts only format "raftblock-backup" version 1 and checks every field's type and
   every chunk entry's shape before anything reads it; anything else is ManifestError, one line.
2. A manifest is complete by itself: entry k says how to get chunk k (`zero`, `full` NAME, or `delta` NAME
   BASE), whatever manifest an incremental was taken against (`parent` is for display).
3. An encrypted volume's backup (`sealed`: its key id, and its data key wrapped by the cluster's master key of
   version `master`) stores each chunk as the cluster stores it: the blocks' ciphertext, then their 32-byte
   entries, zero-padded to a whole block (`stored_length`); nothing in it is plaintext (docs/encryption.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from raftblock.backup.chunk import BLOCK_BYTES, CHUNK_BYTES

FORMAT = "raftblock-backup"
VERSION = 1
VERSION_SEALED = 2  # an encrypted volume's (rule 3): a reader of version 1 refuses it rather than restore ciphertext
_NAME = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through

Entry = tuple[str, ...]  # ("zero",) | ("full", name) | ("delta", name, base)


class ManifestError(ValueError):
    pass


ENTRY_BYTES = 32  # an encrypted block's entry (raftblock/sealing.py)


def sealed_entries_length(data_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """The entries of `data_bytes` of blocks, padded to whole blocks (rule 3)."""
    raw = data_bytes // block_bytes * ENTRY_BYTES
    return -(-raw // block_bytes) * block_bytes


def manifest_key(volume: str, snapshot: str) -> str:
    return f"manifests/{volume}/{snapshot}.json"


def progress_key(volume: str, snapshot: str) -> str:
    return f"uploads/{volume}/{snapshot}.json"


def check_name(what: str, name: str) -> str:
    """A volume or snapshot name as it may appear in an object key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ManifestError(f"{what} name {name!r}: letters, digits, '.', '_' and '-', at most 128")
    return name


@dataclass
class Manifest:
    volume: str
    snapshot: str
    size_bytes: int
    chunks: list[Entry]
    snap_id: int = 0
    created_ms: int = 0
    chunk_bytes: int = CHUNK_BYTES
    block_bytes: int = BLOCK_BYTES
    parent: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    sealed: dict[str, Any] | None = None  # rule 3: {"key_id": int, "master": int, "wrapped": str}

    def chunk_count(self) -> int:
        return (self.size_bytes + self.chunk_bytes - 1) // self.chunk_bytes

    def chunk_length(self, k: int) -> int:
        return min(self.chunk_bytes, self.size_bytes - k * self.chunk_bytes)

    def stored_length(self, k: int) -> int:
        """Bytes of chunk k's plaintext object: its volume bytes, or (rule 3) ciphertext and entries."""
        n = self.chunk_length(k)
        return n + sealed_entries_length(n, self.block_bytes) if self.sealed else n

    def objects(self) -> set[str]:
        """Keys of every object this manifest needs."""
        out = set()
        for e in self.chunks:
            if e[0] == "full":
                out.add(f"chunks/{e[1]}")
            elif e[0] == "delta":
                out.add(f"deltas/{e[1]}")
                out.add(f"chunks/{e[2]}")
        return out

    def to_json(self) -> bytes:
        d = {"format": FORMAT, "version": VERSION_SEALED if self.sealed is not None else VERSION, "volume": self.volume, "snapshot": self.snapshot,
             "snap_id": self.snap_id, "created_ms": self.created_ms, "size_bytes": self.size_bytes,
             "chunk_bytes": self.chunk_bytes, "block_bytes": self.block_bytes, "parent": self.parent,
             "chunks": [list(e) for e in self.chunks], "stats": self.stats}
        if self.sealed is not None:
            d["sealed"] = self.sealed
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
            raise ManifestError(f"{where}: not JSON ({e})") from e
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: not a manifest object")
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a raftblock backup manifest (format {d.get('format')!r})")
        if d.get("version") not in (VERSION, VERSION_SEALED):
            raise ManifestError(f"{where}: manifest version {d.get('version')!r}; this raftblock reads {VERSION} "
                                f"and {VERSION_SEALED}")
        if (d.get("version") == VERSION_SEALED) != ("sealed" in d):
            raise ManifestError(f"{where}: version {VERSION_SEALED} is an encrypted volume's manifest, with 'sealed'")

        def typed(key: str, typ: type, default: Any = None) -> Any:
            v = d.get(key, default)
            if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
                raise ManifestError(f"{where}: field {key!r} is {type(v).__name__}, expected {typ.__name__}")
            return v

        m = cls(volume=typed("volume", str), snapshot=typed("snapshot", str), size_bytes=typed("size_bytes", int),
                chunks=[], snap_id=typed("snap_id", int, 0), created_ms=typed("created_ms", int, 0),
                chunk_bytes=typed("chunk_bytes", int), block_bytes=typed("block_bytes", int),
                parent=d.get("parent"), stats=typed("stats", dict, {}))
        if m.parent is not None and not isinstance(m.parent, str):
            raise ManifestError(f"{where}: field 'parent' is not a string")
        for name, count in m.stats.items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise ManifestError(f"{where}: stats[{name!r}] is {type(count).__name__}, expected int")
        if m.chunk_bytes <= 0 or m.block_bytes <= 0 or m.chunk_bytes % m.block_bytes or m.size_bytes < 0:
            raise ManifestError(f"{where}: chunk_bytes {m.chunk_bytes}, block_bytes {m.block_bytes}, "
                                f"size_bytes {m.size_bytes} do not fit together")
        sealed = d.get("sealed")
        if sealed is not None:
            good = isinstance(sealed, dict) and set(sealed) == {"key_id", "master", "wrapped"} and \
                all(isinstance(sealed[k], int) and not isinstance(sealed[k], bool) and sealed[k] > 0
                    for k in ("key_id", "master")) and isinstance(sealed["wrapped"], str) and sealed["wrapped"]
            if not good:
                raise ManifestError(f"{where}: field 'sealed' is not {{key_id, master, wrapped}}")
            m.sealed = dict(sealed)
        raw_chunks = typed("chunks", list)
        if len(raw_chunks) != m.chunk_count():
            raise ManifestError(f"{where}: {len(raw_chunks)} chunk entries for {m.chunk_count()} chunks")
        for k, ent in enumerate(raw_chunks):
            ok = isinstance(ent, list) and ent and (
                (ent[0] == "zero" and len(ent) == 1)
                or (ent[0] == "full" and len(ent) == 2 and isinstance(ent[1], str) and _NAME.fullmatch(ent[1]))
                or (ent[0] == "delta" and len(ent) == 3
                    and all(isinstance(x, str) and _NAME.fullmatch(x) for x in ent[1:]))
            )
            if not ok:
                raise ManifestError(f"{where}: chunk entry {k} is malformed: {ent!r}")
            m.chunks.append(tuple(ent))
        return m
