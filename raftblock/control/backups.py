# Backups of snapshots to an object store, from a running cluster: `raftblock snapshot export|restore` and
# `raftblock backup list|verify|delete` (docs/snapshots.md section 5; the format is docs/format/backup.md, the
# store-side rules are raftblock/backup/transfer.py).
#
# Owns: reading a snapshot's image out of the cluster for the exporter, the changed-chunk map of an incremental
# export, and the restore target's life in the metadata map.
#
# Rules:
# 1. The backup library is synchronous (its uploads run in threads); the cluster's client is asyncio. One
#    event loop runs in a thread of its own (`LoopThread`) and the exporter's threads call into it: memory
#    stays bounded by the exporter's `parallel` chunks in flight.
# 2. A chunk with no block allocated in the snapshot is zeros: not read. An incremental export (`--since S`) reads only the chunks that hold a block whose version in the new
#    snapshot differs from its version in S, as the groups' indexes say (BLOCK_STATUS with since_snap_id: no
#    data read); S must be in the store (its manifest) and, for the fast path, still in the cluster. If S was
#    deleted from the cluster, every chunk is read and compared with S's backup (block deltas still apply).
# 3. A restore creates its volume `restoring` (not served: volume_infos) with `origin` = the backup it comes
#    from; every chunk is verified before it is written; success makes it `ready`, a bad or missing chunk makes
#    it `failed` (not served) and the error names the chunk. Re-running the same restore into a `restoring` or
#    `failed` volume of the same origin starts it again (writes are idempotent); anything else of that name
#    is refused.
# 4. A lazy restore (`--lazy`) creates the volume `ready` with `lazy_source` = its origin: the gateways serve it
#    at once and fetch a chunk before a read touches it (client/lazy.py); this command meanwhile writes every
#    chunk with FILL writes (a block the host wrote is kept) and then clears `lazy_source`. Killed or failed,
#    the volume stays served (reads still fetch); the same command again finishes the fill.
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from raftblock.backup.chunk import CHUNK_BYTES, ChunkError
from raftblock.backup.manifest import Manifest, ManifestError, sealed_entries_length
from raftblock.backup.store import Store, StoreError
from raftblock.backup.transfer import ExportResult, export_image, list_manifests, load_manifest, restore_image
from raftblock.control.snapshots import ClusterIO
from raftblock.meta.rpc import MetaClient
from raftblock.replication.group import GroupError

T = TypeVar("T")
BLOCK = 4096


class BackupError(Exception):
    """One line for the operator."""


class LoopThread:
    """Rule 1: an event loop in a thread; `run(coro)` from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="raftblock-io", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Exported:
    result: ExportResult
    volume: str
    snapshot: str
    url: str
    incremental_from: str | None
    changed_chunks: int | None  # from the groups' indexes (rule 2); None: not known, every chunk was read


def _meta_call(lt: LoopThread, meta: Callable[[], MetaClient], call: Callable[[MetaClient], Awaitable[T]]) -> T:
    async def go() -> T:
        return await call(meta())

    return lt.run(go())


async def _changed_chunks(io: ClusterIO, volume: str, snap_id: int, since_snap_id: int, chunk_bytes: int) -> set[int]:
    """Rule 2: indexes of the chunks holding a block whose version differs between the two snapshots."""
    v = io.volume(volume)
    out: set[int] = set()
    per_chunk = chunk_bytes // BLOCK
    for eid, blk, n, vb in v._pieces(0, v.info.size_bytes // BLOCK):  # one extent at most: one request
        pos = 0
        for run, changed in await v._group_for(eid).block_status(eid, blk, n, snap_id=snap_id,
                                                                 since_snap_id=since_snap_id):
            if changed:
                out.update(range((vb + pos) // per_chunk, (vb + pos + run - 1) // per_chunk + 1))
            pos += run
    return out


def export(meta: Callable[[], MetaClient], peers: dict[int, tuple[str, int]], store: Store, volume: str,
           snapshot: str, since: str | None = None, parallel: int = 4,
           progress: Callable[[int, int, int], None] | None = None) -> Exported:
    with LoopThread() as lt:
        st = _meta_call(lt, meta, lambda c: c.state(barrier=True))
        if volume not in st.volumes:
            raise BackupError(f"no volume {volume}")
        vrec = st.volumes[volume]
        # An encrypted volume's chunks leave as stored: ciphertext and entries, its key wrapped in the manifest
        # (backup/manifest.py rule 3; docs/encryption.md "Backups")
        sealed = {"key_id": vrec.enc_key_id, "master": vrec.enc_master, "wrapped": vrec.enc_key} \
            if vrec.enc_key_id else None
        if sealed is not None and vrec.parent_volume_id:
            raise BackupError(f"volume {volume} is an encrypted clone: flatten it first (raftblock volume flatten "
                              f"{volume}), then export its snapshots")
        rec = st.snapshot_of(volume, snapshot)
        if rec is None or rec.state != "ready":
            raise BackupError(f"volume {volume} has no snapshot {snapshot}" if rec is None
                              else f"snapshot {volume}@{snapshot} is {rec.state}, not ready")
        base: Manifest | None = None
        changed: set[int] | None = None
        io = lt.run(_io(st, peers, meta().secret))
        try:
            if since is not None:
                try:
                    base = load_manifest(store, volume, since)
                except ManifestError as e:
                    raise BackupError(f"--since {since}: {e} (export it first)") from e
                old = st.snapshot_of(volume, since)
                if old is not None and old.state == "ready" and old.snap_id == base.snap_id:
                    changed = lt.run(_changed_chunks(io, volume, rec.snap_id, old.snap_id, base.chunk_bytes))
            vol = io.volume(volume)
            size = rec.size_bytes or vol.info.size_bytes
            # chunks with a block allocated in the snapshot: the others are zeros, not read (a clone's holes
            # read through to its parent, so a clone reads every chunk)
            allocated = lt.run(_changed_chunks(io, volume, rec.snap_id, 0, CHUNK_BYTES)) \
                if vol.info.parent is None else None

            def read(offset: int, length: int) -> bytes:
                if allocated is not None and offset // CHUNK_BYTES not in allocated:
                    return bytes(length + (sealed_entries_length(length) if sealed else 0))
                if sealed:
                    return lt.run(vol.read_stored(rec.snap_id, offset, length))
                return lt.run(vol.read_snapshot(rec.snap_id, offset, length))

            try:
                res = export_image(store, volume, snapshot, size, read, snap_id=rec.snap_id, since=base,
                                   changed=(lambda k: k in changed) if changed is not None else None,
                                   parallel=parallel, progress=progress, created_ms=rec.created_ms, sealed=sealed)
            except GroupError as e:
                raise BackupError(f"reading {volume}@{snapshot} from the cluster failed: {e} (run the export again: "
                                  f"what is uploaded stays)") from e
        finally:
            lt.run(io.close())
    return Exported(res, volume, snapshot, store.url, since, len(changed) if changed is not None else None)


async def _io(st: Any, peers: dict[int, tuple[str, int]], secret: bytes) -> ClusterIO:
    return ClusterIO(st, peers, secret=secret)


def pick_manifest(store: Store, volume: str | None, snapshot: str | None) -> Manifest:
    """The backup a restore means: `volume`@`snapshot`, else the newest of `volume` (or of the only volume in
    the store)."""
    if volume and snapshot:
        return load_manifest(store, volume, snapshot)
    found = list(list_manifests(store, volume))
    if snapshot:
        found = [(v, s) for v, s in found if s == snapshot]
    vols = sorted({v for v, _ in found})
    if not found:
        raise BackupError(f"{store.url}: no backup" + (f" of volume {volume}" if volume else "")
                          + (f" named {snapshot}" if snapshot else ""))
    if len(vols) > 1:
        raise BackupError(f"{store.url} holds backups of {len(vols)} volumes ({', '.join(vols[:5])}): "
                          f"name one with --from-volume")
    mans = [load_manifest(store, v, s) for v, s in found]
    return max(mans, key=lambda m: (m.created_ms, m.snapshot))


@dataclass
class Restored:
    volume: str
    source: str
    size_bytes: int
    written_bytes: int
    resumed: bool


def restore(meta: Callable[[], MetaClient], peers: dict[int, tuple[str, int]], store: Store, man: Manifest,
            name: str, mode: str, create: Callable[[str, int, str, str, bool], None], parallel: int = 4,
            progress: Callable[[int, int, int], None] | None = None, lazy: bool = False) -> Restored:
    """Rule 3 (rule 4 with `lazy`). `create(name, size, mode, origin, lazy)` makes the volume, `restoring` (or,
    lazy, ready with its source) and waits for its groups."""
    origin = f"{store.url}#{man.volume}@{man.snapshot}"
    if man.sealed and lazy:
        raise BackupError(f"{man.volume}@{man.snapshot} is an encrypted volume's backup: restore it without --lazy "
                          f"(a lazy restore's gateway would fetch ciphertext chunks)")
    with LoopThread() as lt:
        st = _meta_call(lt, meta, lambda c: c.state(barrier=True))
        resumed = False
        v = st.volumes.get(name)
        if v is not None and lazy:
            if v.lazy_source != origin:
                raise BackupError(f"volume {name} exists" + (f" (restored from {v.origin})" if v.origin else "")
                                  + ": choose another name, or delete it first")
            resumed = True
        elif v is not None:
            if v.state not in ("restoring", "failed") or v.origin != origin:
                raise BackupError(f"volume {name} exists" + (f" (restored from {v.origin})" if v.origin else "")
                                  + ": choose another name, or delete it first")
            if v.size_bytes != man.size_bytes:
                raise BackupError(f"volume {name} is {v.size_bytes} bytes, the backup {man.size_bytes}")
            _ok(_meta_call(lt, meta, lambda c: c.set_volume_state(name, "restoring")))
            resumed = True
        else:
            create(name, man.size_bytes, mode, origin, lazy)
        st = _meta_call(lt, meta, lambda c: c.state(barrier=True))
        if man.sealed and (st.volumes[name].enc_key_id != man.sealed["key_id"]):
            raise BackupError(f"volume {name} is not under the key of the backup {man.volume}@{man.snapshot}")
        io = lt.run(_io(st, peers, meta().secret))
        try:
            vol = io.volume(name)

            def write(offset: int, data: bytes) -> None:
                if man.sealed:  # the stored form back where it was, under the same key (manifest.py rule 3)
                    lt.run(vol.write_stored(offset, man.chunk_length(offset // man.chunk_bytes), data))
                else:
                    lt.run(vol.fill(offset, data) if lazy else vol.write(offset, data))

            try:
                written = restore_image(store, man, write, parallel=parallel, progress=progress)
            except (ChunkError, StoreError, GroupError, ManifestError) as e:
                if lazy:  # the volume is served: reads fetch what they need; a re-run finishes the fill
                    raise BackupError(f"lazy restore of {man.volume}@{man.snapshot} into {name} stopped: {e}; the "
                                      f"volume stays served (reads fetch what they need): run the restore again "
                                      f"to finish it") from e
                _meta_call(lt, meta, lambda c: c.set_volume_state(name, "failed", expected="restoring"))
                raise BackupError(f"restore of {man.volume}@{man.snapshot} into {name} failed: {e}; volume {name} is "
                                  f"left `failed` (not served): run the restore again, or raftblock volume delete "
                                  f"{name}") from e
        finally:
            lt.run(io.close())
        if lazy:
            _ok(_meta_call(lt, meta, lambda c: c.set_volume_state(name, lazy_done=True)))
        else:
            _ok(_meta_call(lt, meta, lambda c: c.set_volume_state(name, "ready", expected="restoring")))
    return Restored(name, f"{man.volume}@{man.snapshot}", man.size_bytes, written, resumed)


def _ok(res: Any) -> dict[str, Any]:
    if not res.ok:
        raise BackupError(res.message or res.error)
    return dict(res.value or {})

