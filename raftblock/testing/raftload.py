# In-tree writer and verifier for Raft extent groups (the process test and the bench).
#
# Owns: tagged block contents, the ack journal, the write load and the read-back check.
#
# Rules:
#   1. Every written block carries a tag (client, group, extent, block, seq) in its first bytes, so a
#      block read back names the write it came from (STYLE: "put a unique tag inside every written block").
#   2. Each key (group, block) is written by one worker at a time, so per key the acknowledged sequence
#      numbers only grow; a write that failed or timed out stays "open" (it may or may not have landed).
#   3. An ack counts only once it is in the journal and the journal is fdatasynced (one fdatasync covers
#      every ack appended before it).
#   4. The verifier accepts, per key, the last acked seq or any later attempted seq; zeros only if
#      nothing was ever acked there.
from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from raftblock._fast import blockcrc
from raftblock.client.router import GroupClient, NodeClient
from raftblock.replication.group import GroupError

BLOCK_SIZE = 4096
TAG = struct.Struct("<8sIIQQQ")
TAG_MAGIC = b"RBTAG001"

Key = tuple[int, int]  # (group, block)


def extent_of(group: int) -> int:
    return group << 32


def tagged_block(client: int, group: int, block: int, seq: int) -> bytes:
    head = TAG.pack(TAG_MAGIC, client, group, extent_of(group), block, seq)
    fill = struct.pack("<Q", (client << 48) ^ (group << 32) ^ (block << 16) ^ seq) * ((BLOCK_SIZE - len(head)) // 8)
    return (head + fill).ljust(BLOCK_SIZE, b"\0")


def read_tag(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int] | None:
    """(client, group, block, seq) of a tagged block; None for a never-written (zero) block."""
    if not any(bytes(buf[: TAG.size])):
        return None
    magic, client, group, _extent, block, seq = TAG.unpack_from(buf, 0)
    if magic != TAG_MAGIC:
        raise ValueError("block does not carry a writer tag")
    if bytes(buf) != tagged_block(client, group, block, seq):
        raise ValueError(f"block body does not match its tag (client {client} seq {seq})")
    return client, group, block, seq


class AckJournal:
    """Append-only `group block seq` lines; `record` returns once the line is fdatasynced."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lines: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._running = False

    async def record(self, group: int, block: int, seq: int) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._lines.append(f"{group} {block} {seq}\n".encode())
        self._waiters.append(fut)
        if not self._running:
            self._running = True
            loop.create_task(self._sync_loop())
        await fut

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                lines, self._lines = self._lines, []
                waiters, self._waiters = self._waiters, []
                data = b"".join(lines)
                await loop.run_in_executor(None, self._write_sync, data)
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._running = False

    def _write_sync(self, data: bytes) -> None:
        os.write(self._fd, data)
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    @staticmethod
    def load(path: Path | str) -> dict[Key, int]:
        acked: dict[Key, int] = {}
        for line in Path(path).read_text().splitlines():
            g, b, s = (int(x) for x in line.split())
            if s > acked.get((g, b), -1):
                acked[(g, b)] = s
        return acked


class Writer:
    def __init__(
        self,
        client: NodeClient,
        client_id: int,
        groups: Sequence[int],
        blocks_per_group: int,
        workers: int,
        journal: AckJournal,
        write_deadline_s: float = 5.0,
        seed: int = 1,
    ) -> None:
        self.client = client
        self.client_id = client_id
        self.keys = [(g, b) for g in groups for b in range(blocks_per_group)]
        self.workers = workers
        self.journal = journal
        self.write_deadline_s = write_deadline_s
        self.rng = random.Random(seed)
        self.acked: dict[Key, int] = {}
        self.attempted: dict[Key, set[int]] = {}
        self._seq = 0
        self.acks = 0
        self.failures = 0
        self.latencies_s: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._worker(w, stop) for w in range(self.workers)))

    async def _worker(self, w: int, stop: asyncio.Event) -> None:
        mine = self.keys[w :: self.workers]
        rng = random.Random(self.rng.getrandbits(32) + w)
        while not stop.is_set() and mine:
            g, b = mine[rng.randrange(len(mine))]
            self._seq += 1
            seq = self._seq
            self.attempted.setdefault((g, b), set()).add(seq)
            data = tagged_block(self.client_id, g, b, seq)
            t0 = time.monotonic()
            try:
                await GroupClient(self.client, g, self.write_deadline_s).write(
                    extent_of(g), b, data, blockcrc.block_crcs(data)
                )
            except GroupError:
                self.failures += 1
                continue
            self.latencies_s.append(time.monotonic() - t0)
            await self.journal.record(g, b, seq)
            self.acked[(g, b)] = seq
            self.acks += 1


async def verify(
    client: NodeClient,
    acked: dict[Key, int],
    attempted: dict[Key, set[int]],
    client_id: int,
    concurrency: int = 32,
    deadline_s: float = 10.0,
) -> list[str]:
    """Read every attempted key back through the leaders; returns the problems found."""
    problems: list[str] = []
    keys = sorted(set(acked) | set(attempted))
    sem = asyncio.Semaphore(concurrency)

    async def one(key: Key) -> None:
        g, b = key
        async with sem:
            try:
                data, crcs = await GroupClient(client, g, deadline_s).read(extent_of(g), b, 1)
            except GroupError as e:
                problems.append(f"{key}: read failed: {e}")
                return
        if blockcrc.block_crcs(bytes(data)) != list(crcs):
            problems.append(f"{key}: CRCs do not match the data")
            return
        try:
            tag = read_tag(data)
        except ValueError as e:
            problems.append(f"{key}: {e}")
            return
        want = acked.get(key)
        if tag is None:
            if want is not None:
                problems.append(f"{key}: acked seq {want} lost (block reads as zeros)")
            return
        c, tg, tb, seq = tag
        if (c, tg, tb) != (client_id, g, b):
            problems.append(f"{key}: holds a block tagged for {(c, tg, tb)}")
        elif want is not None and seq < want:
            problems.append(f"{key}: acked seq {want} lost (reads older seq {seq})")
        elif seq not in attempted.get(key, set()):
            problems.append(f"{key}: reads seq {seq} that was never written there")

    await asyncio.gather(*(one(k) for k in keys))
    return problems
