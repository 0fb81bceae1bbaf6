"""Export, restore, verify and collect backups (docs/format/backup.md), over any image source and store.

Rules:
1. Export reads the image chunk by chunk through `read(offset, length)` (a snapshot's reader) and never
   holds more than `parallel` chunks in flight: memory is bounded whatever the volume's size.
2. An object already in the store (HEAD) is not uploaded again: across snapshots, volumes and re-runs.
   The progress object (`uploads/<volume>/<snapshot>.json`) records the entries done every few chunks, so a
   killed export re-run with the same arguments skips them; the manifest is written last, read back and
   compared, and only then is the progress object removed.
3. Incremental (`since`): a chunk `changed(k)` says is unchanged keeps the older manifest's entry; a changed
   one is sent as a delta against the full chunk that entry is based on when at most half of its blocks
   differ, else full. All-zero chunks are entries, not objects.
4. Restore and verify fetch and verify every object (chunk.py rule 2) before a byte is written; the first bad
   or missing object stops a restore with its name (the caller marks the target failed). Verify reads
   everything and reports every bad object.
5. `collect` removes objects no manifest names, only when older than `min_age_s` (an export running
   meanwhile has uploaded objects its manifest does not name yet).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from raftblock.backup import chunk
from raftblock.backup.manifest import Entry, Manifest, ManifestError, check_name, manifest_key, progress_key
from raftblock.backup.store import NotFound, Store, StoreError

PROGRESS_EVERY = 16  # chunks between progress-object updates
Progress = Callable[[int, int, int], None]  # (chunks done, chunks total, bytes uploaded so far)


@dataclass
class ExportResult:
    manifest: Manifest
    uploaded_objects: int
    uploaded_bytes: int  # object bytes sent (compressed)
    reused_objects: int  # already in the store
    resumed_chunks: int  # entries taken from an interrupted run's progress
    changed_bytes: int  # plaintext bytes of the chunks read as changed (incremental: what `changed` said)


T = TypeVar("T")
R = TypeVar("R")


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], parallel: int, name: str) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) as each finishes, on `parallel` threads, never more than `parallel` in flight (rule 1);
    an error stops it and cancels what has not started."""
    n = max(1, parallel)
    with cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix=name) as pool:
        inflight: dict[cf.Future[R], T] = {}
        it = iter(items)
        try:
            while True:
                while len(inflight) < n:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    inflight[pool.submit(fn, nxt)] = nxt
                if not inflight:
                    return
                finished, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    yield inflight.pop(f), f.result()
        finally:
            for f in inflight:
                f.cancel()


def _zero(buf: bytes) -> bool:
    return not any(buf) if len(buf) < 64 else buf.count(0) == len(buf)


def load_manifest(store: Store, volume: str, snapshot: str) -> Manifest:
    key = manifest_key(check_name("volume", volume), check_name("snapshot", snapshot))
    try:
        raw = store.get(key)
    except NotFound as e:
        raise ManifestError(f"{store.url}: no backup of {volume}@{snapshot}") from e
    return Manifest.from_json(raw, f"{store.url}/{key}")


def list_manifests(store: Store, volume: str | None = None) -> Iterator[tuple[str, str]]:
    """(volume, snapshot) of every complete backup in the store."""
    prefix = f"manifests/{volume}/" if volume else "manifests/"
    for key, _size, _mtime in store.list(prefix):
        parts = key.split("/")
        if len(parts) == 3 and parts[2].endswith(".json"):
            yield parts[1], parts[2][: -len(".json")]


def _fetch(store: Store, entry: Entry) -> bytes:
    """The verified plaintext of one manifest entry's chunk (without zero entries)."""
    if entry[0] == "full":
        return chunk.decode(entry[1], store.get(f"chunks/{entry[1]}"))
    base = chunk.decode(entry[2], store.get(f"chunks/{entry[2]}"))
    delta = chunk.decode(entry[1], store.get(f"deltas/{entry[1]}"), kind=chunk.KIND_DELTA)
    return chunk.apply_delta(entry[1], delta, entry[2], base)


def export_image(store: Store, volume: str, snapshot: str, size_bytes: int,
                 read: Callable[[int, int], bytes], *, snap_id: int = 0, since: Manifest | None = None,
                 changed: Callable[[int], bool] | None = None, parallel: int = 4,
                 progress: Progress | None = None, created_ms: int | None = None,
                 sealed: dict[str, Any] | None = None) -> ExportResult:
    """`read(offset, length)`: the image's bytes, or with `sealed` (an encrypted volume, manifest.py rule 3)
    the stored form of that range (ciphertext, entries, padding: `Manifest.stored_length`)."""
    check_name("volume", volume)
    check_name("snapshot", snapshot)
    man = Manifest(volume=volume, snapshot=snapshot, size_bytes=size_bytes, chunks=[], snap_id=snap_id,
                   created_ms=created_ms if created_ms is not None else int(time.time() * 1000),
                   parent=since.snapshot if since is not None else None, sealed=sealed)
    total = man.chunk_count()
    if since is not None and (since.size_bytes != size_bytes or since.chunk_bytes != man.chunk_bytes):
        raise ManifestError(f"--since {since.snapshot}: {since.size_bytes} bytes in chunks of "
                            f"{since.chunk_bytes}; this image is {size_bytes} in {man.chunk_bytes}")
    if since is not None and (since.sealed or {}).get("key_id") != (sealed or {}).get("key_id"):
        raise ManifestError(f"--since {since.snapshot}: a backup under another key (or not encrypted alike)")
    entries: list[Entry | None] = [None] * total
    resumed = 0
    pkey = progress_key(volume, snapshot)
    try:
        prev = json.loads(store.get(pkey))
        if prev.get("size_bytes") == size_bytes and prev.get("snap_id") == snap_id and \
                prev.get("parent") == man.parent and len(prev.get("chunks", [])) == total:
            for k, e in enumerate(prev["chunks"]):
                if e:
                    entries[k] = tuple(e)
                    resumed += 1
    except NotFound:
        pass
    except (ValueError, TypeError, AttributeError):
        pass  # a progress object we cannot read: start over (objects already sent are found by HEAD)
    stats = {"uploaded_objects": 0, "uploaded_bytes": 0, "reused_objects": 0, "changed_bytes": 0}

    def send(key: str, obj: bytes) -> None:
        if store.exists(key):
            stats["reused_objects"] += 1
            return
        store.put(key, obj)
        stats["uploaded_objects"] += 1
        stats["uploaded_bytes"] += len(obj)

    def one(k: int) -> Entry:
        old = since.chunks[k] if since is not None else None
        if old is not None and changed is not None and not changed(k):
            return old
        length = man.stored_length(k)
        plain = read(k * man.chunk_bytes, man.chunk_length(k))
        if len(plain) != length:
            raise StoreError(f"image read of chunk {k} returned {len(plain)} bytes, expected {length}")
        stats["changed_bytes"] += length
        if _zero(plain):
            return ("zero",)
        if old is not None and old[0] != "zero":
            base_name = old[1] if old[0] == "full" else old[2]
            base = chunk.decode(base_name, store.get(f"chunks/{base_name}"))
            if len(base) == length:
                blocks = chunk.changed_blocks(base, plain)
                if not blocks:
                    return ("full", base_name)
                if len(blocks) * 2 <= (length + chunk.BLOCK_BYTES - 1) // chunk.BLOCK_BYTES:
                    dname, dobj = chunk.encode(chunk.delta_plain(base_name, plain, blocks), kind=chunk.KIND_DELTA)
                    send(f"deltas/{dname}", dobj)
                    return ("delta", dname, base_name)
        name, obj = chunk.encode(plain)
        send(f"chunks/{name}", obj)
        return ("full", name)

    def save_progress() -> None:
        store.put(pkey, json.dumps({"size_bytes": size_bytes, "snap_id": snap_id, "parent": man.parent,
                                    "chunks": [list(e) if e else None for e in entries]}).encode())

    todo = [k for k in range(total) if entries[k] is None]
    done = total - len(todo)
    since_save = 0
    try:
        for k, entry in _bounded_map(one, todo, parallel, "backup"):
            entries[k] = entry
            done += 1
            since_save += 1
            if since_save >= PROGRESS_EVERY:
                save_progress()
                since_save = 0
            if progress is not None:
                progress(done, total, stats["uploaded_bytes"])
    except BaseException:
        try:
            save_progress()
        except StoreError:
            pass
        raise
    man.chunks = [e for e in entries if e is not None]
    assert len(man.chunks) == total
    man.stats = {"chunks": total, "zero": sum(1 for e in man.chunks if e[0] == "zero"),
                 "deltas": sum(1 for e in man.chunks if e[0] == "delta"), **stats}
    raw = man.to_json()
    mkey = manifest_key(volume, snapshot)
    store.put(mkey, raw)
    if Manifest.from_json(store.get(mkey), mkey) != man:
        raise StoreError(f"{store.url}/{mkey}: the manifest read back differs from the one written")
    store.delete(pkey)
    return ExportResult(man, stats["uploaded_objects"], stats["uploaded_bytes"], stats["reused_objects"], resumed,
                        stats["changed_bytes"])


def restore_image(store: Store, man: Manifest, write: Callable[[int, bytes], None], *, parallel: int = 4,
                  write_zeros: bool = False, progress: Progress | None = None) -> int:
    """Write every chunk of `man` through `write(offset, data)`, each verified first (rule 4). Zero chunks are
    written only with `write_zeros` (a new thin volume reads zeros already). Returns the bytes written."""
    written = 0
    total = man.chunk_count()

    def one(k: int) -> bytes | None:
        data = fetch_chunk(store, man, k)
        if data is None and write_zeros:
            return bytes(man.stored_length(k))
        return data

    done = 0
    for k, data in _bounded_map(one, range(total), parallel, "restore"):
        if data is not None:
            write(k * man.chunk_bytes, data)
            written += len(data)
        done += 1
        if progress is not None:
            progress(done, total, written)
    return written


def fetch_chunk(store: Store, man: Manifest, k: int) -> bytes | None:
    """Chunk `k` of `man`, fetched and verified (rule 4); None for a zero chunk."""
    e = man.chunks[k]
    if e[0] == "zero":
        return None
    try:
        data = _fetch(store, e)
    except NotFound as ex:
        raise chunk.ChunkError(e[1], f"missing from {store.url} (chunk {k} of {man.volume}@{man.snapshot})") from ex
    if len(data) != man.stored_length(k):
        raise chunk.ChunkError(e[1], f"{len(data)} bytes for chunk {k}, expected {man.stored_length(k)}")
    return data


def restore_bytes(store: Store, man: Manifest) -> bytearray:
    """The whole image in memory (small images: tests, tools); not an encrypted volume's (its chunks are
    ciphertext: the cluster restores them)."""
    if man.sealed:
        raise ManifestError(f"{man.volume}@{man.snapshot} is an encrypted volume's backup: restore it into a cluster")
    out = bytearray(man.size_bytes)

    def write(off: int, data: bytes) -> None:
        out[off : off + len(data)] = data

    restore_image(store, man, write)
    return out


def verify(store: Store, man: Manifest, parallel: int = 4) -> list[str]:
    """Rule 4: every object the manifest needs, fetched and checked; the list of problems (empty: sound)."""
    problems: list[str] = []

    def one(e: Entry) -> str | None:
        try:
            _fetch(store, e)
            return None
        except chunk.ChunkError as ex:
            return str(ex)
        except NotFound:
            return f"chunk {e[1]}: missing"

    distinct = sorted({e for e in man.chunks if e[0] != "zero"})
    with cf.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for p in pool.map(one, distinct):
            if p is not None:
                problems.append(p)
    return problems


def delete_backup(store: Store, volume: str, snapshot: str) -> None:
    load_manifest(store, volume, snapshot)  # a clear error when there is no such backup
    store.delete(manifest_key(volume, snapshot))


def collect(store: Store, min_age_s: float = 3600.0, now: float | None = None) -> tuple[int, int]:
    """Rule 5: remove chunk and delta objects no manifest names. Returns (objects, bytes) removed."""
    keep: set[str] = set()
    for vol, snap in list(list_manifests(store)):
        keep |= load_manifest(store, vol, snap).objects()
    t = time.time() if now is None else now
    removed = freed = 0
    for prefix in ("chunks/", "deltas/"):
        for key, size, mtime in list(store.list(prefix)):
            if key not in keep and t - mtime >= min_age_s:
                store.delete(key)
                removed += 1
                freed += size
    return removed, freed
