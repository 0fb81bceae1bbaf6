# The Disk port: the ONLY place the storage engine touches files and directories (LevelDB `Env`).
#
# Rule 1: the engine never calls os.* on its files; it calls a Disk / DiskFile. Tests swap in a
#         VolatileDisk (drops unsynced writes on a simulated power cut, optionally tearing them) or a
#         fault-injecting wrapper.
# Rule 2: errors from the OS are raised unchanged as OSError (ENOSPC stays errno.ENOSPC); the engine
#         decides what they mean.
# MemDisk keeps files in memory (unit tests of what sits on this port, without a file system).
# Rule 3: DiskFile methods may be called from two threads (pwrite/pread on the event loop, fdatasync on
#         a worker). OsFile relies on the kernel (pread/pwrite/fdatasync are thread-safe on one fd);
#         VolatileDisk guards its in-memory state with one lock.
#
# VolatileDisk metadata: creating, renaming and removing files and fallocate/truncate act on the
# real directory immediately (they are treated as durable at once). Only file *data* written by
# pwrite is held back until fdatasync. So a "power cut" (crash() or kill -9 of a process using it)
# loses exactly the unsynced data, plus, with tear=True, leaves a random-length prefix of every
# unsynced pwrite on disk.
from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "Disk",
    "DiskFile",
    "MemDisk",
    "MemFile",
    "OsDisk",
    "OsFile",
    "VolatileDisk",
    "VolatileFile",
    "make_disk",
]


class DiskFile(Protocol):
    def pread(self, n: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...
    def fdatasync(self) -> None: ...
    def fallocate(self, offset: int, length: int) -> None: ...
    def truncate(self, length: int) -> None: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


class Disk(Protocol):
    def open_file(self, path: str, create: bool) -> DiskFile: ...
    def listdir(self, path: str) -> list[str]: ...
    def remove(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def exists(self, path: str) -> bool: ...
    def makedirs(self, path: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...


# --- real OS -----------------------------------------------------------------------------------
_IOV_MAX = 1024  # buffers per pwritev(2) call (Linux IOV_MAX)


def write_parts(f: DiskFile, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
    """Write `parts` contiguously at `offset`: pwritev where the file has it (OsFile), else one joined
    pwrite (the test disks)."""
    if type(f) is OsFile:  # exactly: a wrapper (fault injection, power cuts) sees one pwrite
        f.pwritev(parts, offset)
    else:
        f.pwrite(b"".join(parts), offset)



class OsFile:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pread(self, n: int, offset: int) -> bytes:
        # os.pread may return short reads only at EOF for regular files; loop anyway.
        out = os.pread(self._fd, n, offset)
        if len(out) == n or not out:
            return out
        parts = [out]
        got = len(out)
        while got < n:
            more = os.pread(self._fd, n - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def pwritev(self, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """The parts written one after the other at `offset` with pwritev(2), without joining them (a join
        is a fresh buffer of their size per call: page faults and a copy); short writes are continued."""
        if not parts:
            return
        written = 0
        if len(parts) <= _IOV_MAX:
            # The common case, one call with the parts as they are (a view per part cost a tenth of a
            # follower's loop time at 4 KiB QD32); anything short of all of them continues below.
            written = os.pwritev(self._fd, parts, offset)
            if written == sum(map(len, parts)):  # len() counts bytes for bytes/bytearray/byte views
                return
            offset += written
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while written and views:  # drop what the first call wrote
            v = views[0]
            if written >= len(v):
                written -= len(v)
                views.pop(0)
            else:
                views[0] = v[written:]
                written = 0
        i = 0
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            n = os.pwritev(self._fd, batch, offset)
            offset += n
            for v in batch:  # drop what was written; a partly written view continues from where it stopped
                if n >= len(v):
                    n -= len(v)
                    i += 1
                    continue
                views[i] = v[n:]
                break

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def fallocate(self, offset: int, length: int) -> None:
        os.posix_fallocate(self._fd, offset, length)

    def truncate(self, length: int) -> None:
        os.ftruncate(self._fd, length)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsDisk:
    def open_file(self, path: str, create: bool) -> DiskFile:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT
        return OsFile(os.open(path, flags, 0o644))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def remove(self, path: str) -> None:
        os.remove(path)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- volatile (power-cut simulating) -------------------------------------------------------------


class _Pending:
    """Unsynced writes of one path, in issue order (later ones win on overlap)."""

    __slots__ = ("writes",)

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def end(self) -> int:
        return max((off + len(d) for off, d in self.writes), default=0)


class VolatileFile:
    def __init__(self, disk: VolatileDisk, path: str, fd: int) -> None:
        self._disk = disk
        self._path = path
        self._fd = fd

    def _check(self) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, "file closed (or the simulated machine crashed)")

    def pread(self, n: int, offset: int) -> bytes:
        with self._disk._lock:
            self._check()
            real_size = os.fstat(self._fd).st_size
            pend = self._disk._pending.get(self._path)
            end = max(real_size, pend.end() if pend else 0)
            n = max(0, min(n, end - offset))
            if n == 0:
                return b""
            buf = bytearray(os.pread(self._fd, n, offset))
            if len(buf) < n:
                buf.extend(bytes(n - len(buf)))
            if pend:
                stop = offset + n
                for woff, data in pend.writes:
                    lo = max(woff, offset)
                    hi = min(woff + len(data), stop)
                    if lo < hi:
                        buf[lo - offset : hi - offset] = data[lo - woff : hi - woff]
            return bytes(buf)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        blob = bytes(data)
        with self._disk._lock:
            self._check()
            if self._disk.tear and blob:
                cut = self._disk.rng.randint(0, len(blob))
                if cut:
                    _os_pwrite_all(self._fd, blob[:cut], offset)
            self._disk._pending.setdefault(self._path, _Pending()).writes.append((offset, blob))

    def fdatasync(self) -> None:
        with self._disk._lock:
            self._check()
            pend = self._disk._pending.pop(self._path, None)
            if pend:
                for woff, data in pend.writes:
                    _os_pwrite_all(self._fd, data, woff)
            fd = self._fd
        os.fdatasync(fd)

    def fallocate(self, offset: int, length: int) -> None:
        with self._disk._lock:
            self._check()
            os.posix_fallocate(self._fd, offset, length)

    def truncate(self, length: int) -> None:
        with self._disk._lock:
            self._check()
            os.ftruncate(self._fd, length)
            pend = self._disk._pending.get(self._path)
            if pend:
                kept: list[tuple[int, bytes]] = []
                for woff, data in pend.writes:
                    if woff < length:
                        kept.append((woff, data[: length - woff]))
                pend.writes = kept

    def size(self) -> int:
        with self._disk._lock:
            self._check()
            pend = self._disk._pending.get(self._path)
            return max(os.fstat(self._fd).st_size, pend.end() if pend else 0)

    def close(self) -> None:
        # Like the page cache, pending data outlives close(); only crash() drops it.
        with self._disk._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self._disk._files.discard(self)


def _os_pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class VolatileDisk(OsDisk):
    """A Disk whose unsynced file data lives in process memory until fdatasync.

    `crash()` (or the death of the process) loses it, like a power cut. With `tear=True` every pwrite
    also writes a random-length prefix of its data to the real file at once (seeded by `rng`), so a
    crash leaves torn partial writes behind.
    """

    def __init__(self, tear: bool = False, rng: random.Random | None = None) -> None:
        self.tear = tear
        self.rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._files: set[VolatileFile] = set()

    def open_file(self, path: str, create: bool) -> DiskFile:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT
        fd = os.open(path, flags, 0o644)
        f = VolatileFile(self, os.path.abspath(path), fd)
        with self._lock:
            self._files.add(f)
        return f

    def remove(self, path: str) -> None:
        with self._lock:
            os.remove(path)
            self._pending.pop(os.path.abspath(path), None)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            os.replace(src, dst)
            s, d = os.path.abspath(src), os.path.abspath(dst)
            self._pending.pop(d, None)
            pend = self._pending.pop(s, None)
            if pend is not None:
                self._pending[d] = pend
            for f in self._files:
                if f._path == s:
                    f._path = d

    def pending_bytes(self) -> int:
        with self._lock:
            return sum(len(d) for p in self._pending.values() for _, d in p.writes)

    def crash(self) -> None:
        """Simulated power cut: drop every unsynced write and invalidate every open file."""
        with self._lock:
            self._pending.clear()
            for f in list(self._files):
                if f._fd >= 0:
                    os.close(f._fd)
                    f._fd = -1
            self._files.clear()


def make_disk(mode: str, seed: int | None = None) -> Disk:
    """`mode` is "os" | "volatile" | "volatile-tear" (the server's --disk flag)."""
    if mode == "os":
        return OsDisk()
    if mode == "volatile":
        return VolatileDisk()
    if mode == "volatile-tear":
        return VolatileDisk(tear=True, rng=random.Random(seed))
    raise ValueError(f"unknown disk mode {mode!r} (expected 'os', 'volatile' or 'volatile-tear')")


# --- in memory (unit tests of what sits on the Disk port) -----------------------------------------


class MemFile:
    """One file of a MemDisk: its bytes; `fdatasync` counts (nothing is lost: see MemDisk)."""

    def __init__(self, disk: MemDisk, data: bytearray) -> None:
        self._disk = disk
        self._data = data
        self.closed = False

    def pread(self, n: int, offset: int) -> bytes:
        return bytes(self._data[offset : offset + n])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if self._disk.space_bytes is not None and end > len(self._data) and \
                self._disk.used() + end - len(self._data) > self._disk.space_bytes:
            raise OSError(errno.ENOSPC, "no space left on device (MemDisk)")
        if end > len(self._data):
            self._data.extend(bytes(end - len(self._data)))
        self._data[offset:end] = view

    def fdatasync(self) -> None:
        if self._disk.sync_error is not None:
            raise self._disk.sync_error
        self._disk.syncs += 1

    def fallocate(self, offset: int, length: int) -> None:
        if offset + length > len(self._data):
            self.pwrite(bytes(offset + length - len(self._data)), len(self._data))

    def truncate(self, length: int) -> None:
        del self._data[length:]
        if length > len(self._data):
            self._data.extend(bytes(length - len(self._data)))

    def size(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self.closed = True


class MemDisk:
    """A Disk held in memory: files are bytearrays keyed by path, directories a set. Nothing is ever lost
    (use VolatileDisk for power cuts); `syncs` counts fdatasyncs, `space_bytes` (None = unbounded) makes a
    write that would grow the files past it fail with ENOSPC, and every fdatasync raises `sync_error` once
    it is set (a failing disk)."""

    def __init__(self, space_bytes: int | None = None) -> None:
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = set()
        self.syncs = 0
        self.space_bytes = space_bytes
        self.sync_error: OSError | None = None
        self._lock = threading.Lock()

    def used(self) -> int:
        return sum(len(b) for b in self.files.values())

    def open_file(self, path: str, create: bool) -> DiskFile:
        path = os.path.normpath(path)
        with self._lock:
            data = self.files.get(path)
            if data is None:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such file (MemDisk)", path)
                if os.path.dirname(path) not in self.dirs:
                    raise FileNotFoundError(errno.ENOENT, "no such directory (MemDisk)", os.path.dirname(path))
                data = self.files[path] = bytearray()
            return MemFile(self, data)

    def listdir(self, path: str) -> list[str]:
        path = os.path.normpath(path)
        if path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory (MemDisk)", path)
        names = {os.path.basename(p) for p in self.files if os.path.dirname(p) == path}
        names |= {os.path.basename(d) for d in self.dirs if os.path.dirname(d) == path and d != path}
        return sorted(names)

    def remove(self, path: str) -> None:
        path = os.path.normpath(path)
        with self._lock:
            if self.files.pop(path, None) is None:
                raise FileNotFoundError(errno.ENOENT, "no such file (MemDisk)", path)

    def rename(self, src: str, dst: str) -> None:
        src, dst = os.path.normpath(src), os.path.normpath(dst)
        with self._lock:
            if src not in self.files:
                raise FileNotFoundError(errno.ENOENT, "no such file (MemDisk)", src)
            self.files[dst] = self.files.pop(src)

    def exists(self, path: str) -> bool:
        path = os.path.normpath(path)
        return path in self.files or path in self.dirs

    def makedirs(self, path: str) -> None:
        path = os.path.normpath(path)
        while path not in ("/", "", "."):
            self.dirs.add(path)
            path = os.path.dirname(path)

    def fsync_dir(self, path: str) -> None:
        if os.path.normpath(path) not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory (MemDisk)", path)
