"""RaftOutbox: how a node's Raft replicas put their messages on the links, node-wide.

Rules:
1. Heartbeats and their responses of every group to one peer leave as one HEARTBEATS frame per turn
   (`flush`, called by the host at the end of each turn and after a group commit's acknowledgements).
2. Snapshot chunks (SNAP) spend the node's repair budget (`repair_allow`, shared with chain image
   streams). A chunk over budget waits here and is retried every 20 ms; the core waits for its ack, so
   nothing else is needed. A chunk already waiting is not queued twice (a stalled stream restarts from
   the last acknowledged chunk), and a waiting chunk the follower no longer needs is dropped.
3. Every other message leaves at once, encoded once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import structlog

from raftblock.replication.raft.types import Message, MessageType, NodeId
from raftblock.wire.framing import Buf
from raftblock.wire.raftcodec import HEARTBEAT_TYPES, encode_heartbeats, encode_raft

log = structlog.get_logger(__name__)

_MT = MessageType
HELD_RETRY_S = 0.02


class _Links(Protocol):
    def send(self, pid: int, parts: list[Buf]) -> bool: ...


class SnapSender(Protocol):
    """The sending replica, as far as snapshot pacing needs it (RaftReplica)."""

    repairs: dict[int, float]

    def chunk_stale(self, m: Message) -> bool: ...


class RaftOutbox:
    def __init__(self, node_id: int, links: _Links, counters: Counter[str], repair_allow: Callable[[int], bool],
                 sender: Callable[[int], SnapSender | None]) -> None:
        self.node_id = NodeId(node_id)
        self.links = links
        self.counters = counters
        self.repair_allow = repair_allow
        self.sender = sender  # group id -> its replica here, if it is a Raft one
        self._hb: dict[int, tuple[list[Message], list[Message]]] = {}
        # Keyed by (group, follower, snapshot index, chunk): rule 2.
        self._held: dict[tuple[int, int, int, int], Message] = {}
        self._drain: asyncio.TimerHandle | None = None
        self.stopped = False

    def send(self, m: Message) -> None:
        t = m.type
        if t in HEARTBEAT_TYPES:
            pair = self._hb.get(m.dst)
            if pair is None:
                pair = self._hb[m.dst] = ([], [])
            pair[1 if t == _MT.HEARTBEAT_RESP else 0].append(m)
            return
        if t == _MT.SNAP:
            self._snap(m)
            return
        self.links.send(m.dst, encode_raft(m))

    def _snap(self, m: Message) -> None:
        r = self.sender(int(m.group))
        if r is not None and int(m.dst) not in r.repairs:
            r.repairs[int(m.dst)] = time.monotonic()
            # The audit trail of a rebuild: its start here, its end and size where it is installed.
            log.info("raft.snapshot_send_started", group=int(m.group), to=int(m.dst), chunks=m.chunk_total,
                     index=m.snap_meta.index if m.snap_meta is not None else 0)
        if not self._held and self.repair_allow(len(m.data)):
            self.links.send(m.dst, encode_raft(m))
            return
        meta = m.snap_meta
        key = (int(m.group), int(m.dst), meta.index if meta is not None else 0, m.chunk_index)
        if key in self._held:
            self.counters["repair_chunks_resend_merged"] += 1
        self._held[key] = m
        if self._drain is None and not self.stopped:
            self._drain = asyncio.get_running_loop().call_later(HELD_RETRY_S, self._drain_held)

    def _drain_held(self) -> None:
        self._drain = None
        held = self._held
        while held:
            key = next(iter(held))
            m = held[key]
            r = self.sender(int(m.group))
            if r is None or r.chunk_stale(m):
                del held[key]
                self.counters["repair_chunks_dropped_stale"] += 1
                continue
            if not self.repair_allow(len(m.data)):
                break
            del held[key]
            self.links.send(m.dst, encode_raft(m))
        if held and not self.stopped:
            self._drain = asyncio.get_running_loop().call_later(HELD_RETRY_S, self._drain_held)

    def flush(self) -> None:
        """Rule 1."""
        if not self._hb:
            return
        me = self.node_id
        for dst, (hbs, resps) in self._hb.items():
            if hbs:
                self.links.send(dst, encode_heartbeats(me, NodeId(dst), hbs, False))
            if resps:
                self.links.send(dst, encode_heartbeats(me, NodeId(dst), resps, True))
        self._hb = {}

    def stop(self) -> None:
        self.stopped = True
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
