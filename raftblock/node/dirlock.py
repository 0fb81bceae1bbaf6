"""One owner per data directory: an exclusive lock on `DIR/LOCK`, held for the process's lifetime.

Owns: the lock every process that owns a directory takes before it reads or writes anything there
(storage node: engine and WAL; metadata node: journal; `raftblock serve`; a gateway's run directory), and
the question "which process owns DIR?" that `cluster status|down|up` ask.

Rules:
1. `flock(LOCK_EX | LOCK_NB)` on `DIR/LOCK` (as etcd and LevelDB do), taken first and never released
   while the process lives; the kernel drops it when the process dies, kill -9 included, so a restart
   works at once. The file's content is the holder's pid, written by the holder after it has the lock.
2. A second process fails at once with `DirectoryInUse` ("data directory D is in use by pid N"), having
   touched nothing in D but opening LOCK.
3. "Who holds it" is read from /proc/locks (the kernel's own table: the inode, and the pid that took the
   lock), never by taking the lock: a check must not make a starting process fail. So a path of any
   spelling (relative, absolute, through a symlink) names the same owner, and a stale pid file cannot.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "LOCK"


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock."""


class DirLock:
    """The held lock (keep the object alive: closing its descriptor releases the lock)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_directory(directory: str | Path, what: str = "data directory") -> DirLock:
    """Create `directory` if needed and take its lock, or raise DirectoryInUse naming the holder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return lock_file(d / LOCK_NAME, f"{what} {os.path.abspath(d)}")


def lock_file(path: Path, what: str) -> DirLock:
    """Take the lock on the file `path` (created if needed) on behalf of what it guards (`what`, for the
    error: "data directory D", "gateway admin socket S")."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = file_lock_holder(path)
        who = f"pid {pid}" if pid is not None else "another process"
        raise DirectoryInUse(f"{what} is in use by {who}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DirLock(path, fd)


def lock_holder(directory: str | Path) -> int | None:
    """The pid of the live process holding `directory`'s lock, or None when nobody holds it."""
    return file_lock_holder(Path(directory) / LOCK_NAME)


def file_lock_holder(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _probe(path)
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:402116 0 EOF" (a blocked waiter's line has "->")
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            ino = int(inode)
        except ValueError:
            continue
        if ino == st.st_ino and dev == st.st_dev and _alive(pid):
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _probe(path: Path) -> int | None:
    """Without /proc/locks: try the lock shared, at once released (may, rarely, race a starting owner)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 32, 0).decode().strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None
