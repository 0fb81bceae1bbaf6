# Raft value types: ids, entries, hard state, configurations, snapshots, messages, read states.
#
# Rules:
# 1. Plain classes with __slots__: the simulator creates millions of these, so no dataclass machinery,
#    no deep copies. Treat every instance as immutable once it has been handed to another component
#    (an Entry in a Ready may also sit in the core's in-memory log).
# 2. Every message carries the group id and the sender's term; config entries and messages carry the
#    configuration `epoch` (kept by the metadata group later) as an opaque u64.
# 3. Nothing here does I/O; encoding is struct-based and explicit (no pickle, DESIGN principle 4).
from __future__ import annotations

import bisect
import struct
from enum import IntEnum
from typing import NewType

NodeId = NewType("NodeId", int)
GroupId = NewType("GroupId", int)

NO_NODE = NodeId(0)  # node ids start at 1; 0 means "nobody" (no vote, no known leader)


class EntryType(IntEnum):
    NORMAL = 0
    CONFIG = 1
    NOOP = 2


class Entry:
    __slots__ = ("term", "index", "type", "data")

    def __init__(self, term: int, index: int, type: EntryType = EntryType.NORMAL, data: bytes = b"") -> None:
        self.term = term
        self.index = index
        self.type = type
        self.data = data

    def size_bytes(self) -> int:
        return len(self.data) + 24  # fixed header (term, index, type) as a WAL record would carry it

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Entry)
            and self.term == other.term
            and self.index == other.index
            and self.type == other.type
            and self.data == other.data
        )

    def __hash__(self) -> int:
        return hash((self.term, self.index, self.type, self.data))

    def __repr__(self) -> str:
        return f"Entry(t={self.term}, i={self.index}, {self.type.name}, {len(self.data)}B)"


class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    __slots__ = ("term", "vote", "commit")

    def __init__(self, term: int = 0, vote: NodeId = NO_NODE, commit: int = 0) -> None:
        self.term = term
        self.vote = vote
        self.commit = commit

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, HardState)
            and self.term == other.term
            and self.vote == other.vote
            and self.commit == other.commit
        )

    def __hash__(self) -> int:
        return hash((self.term, self.vote, self.commit))

    def __repr__(self) -> str:
        return f"HardState(term={self.term}, vote={self.vote}, commit={self.commit})"


class ConfState:
    """A configuration: the voters and the epoch (configuration version) it was made at."""

    __slots__ = ("voters", "epoch")

    def __init__(self, voters: frozenset[NodeId], epoch: int = 0) -> None:
        self.voters = voters
        self.epoch = epoch

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfState) and self.voters == other.voters and self.epoch == other.epoch

    def __hash__(self) -> int:
        return hash((self.voters, self.epoch))

    def __repr__(self) -> str:
        return f"ConfState(voters={sorted(self.voters)}, epoch={self.epoch})"


class ConfChangeType(IntEnum):
    ADD_VOTER = 0
    REMOVE_VOTER = 1


_CC_HEAD = struct.Struct("<BQQH")
_U64 = struct.Struct("<Q")


class ConfChange:
    """One single-server change (Raft thesis §4.1) and the whole configuration it produces.

    The config entry carries the full resulting voter set, so a node that joins with an empty log learns
    the configuration from the entry alone (no deltas to replay from a state it never had).
    """

    __slots__ = ("type", "node_id", "epoch", "voters")

    def __init__(
        self, type: ConfChangeType, node_id: NodeId, epoch: int, voters: frozenset[NodeId] = frozenset()
    ) -> None:
        self.type = type
        self.node_id = node_id
        self.epoch = epoch
        self.voters = voters  # the configuration after the change; filled in by the leader

    def encode(self) -> bytes:
        voters = sorted(self.voters)
        return _CC_HEAD.pack(int(self.type), self.node_id, self.epoch, len(voters)) + b"".join(
            _U64.pack(v) for v in voters
        )

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        t, node, epoch, n = _CC_HEAD.unpack_from(data, 0)
        off = _CC_HEAD.size
        voters = frozenset(NodeId(_U64.unpack_from(data, off + 8 * k)[0]) for k in range(n))
        return cls(ConfChangeType(t), NodeId(node), epoch, voters)

    def conf_state(self) -> ConfState:
        return ConfState(self.voters, self.epoch)

    def __repr__(self) -> str:
        return f"ConfChange({self.type.name} {self.node_id}, epoch={self.epoch}, -> {sorted(self.voters)})"


class SnapshotMeta:
    __slots__ = ("index", "term", "conf", "app")

    def __init__(self, index: int, term: int, conf: ConfState, app: bytes = b"") -> None:
        self.index = index
        self.term = term
        self.conf = conf
        # Opaque state-machine state exactly at `index` that the engine does not hold (the block store:
        # the client session table, replication/sessions.py); durable with the meta in the WAL.
        self.app = app

    def __repr__(self) -> str:
        return f"SnapshotMeta(i={self.index}, t={self.term}, {self.conf})"


class ChunkedBytes:
    """A received snapshot image as the chunks it came in, never joined: joining a 512 MiB image is a
    memcpy into fresh pages that holds the event loop (and the GIL) for most of a second and doubles the
    memory. Behaves like the image's bytes for len(), slicing (a copy of that range only), bytes() and ==;
    that is all the core and the runtime do with an image."""

    __slots__ = ("_chunks", "_starts", "_total")

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._total = 0
        for c in chunks or ():
            self.append(c)

    def append(self, chunk: bytes) -> bool:
        """The next chunk of a stream being received (ImageSink); always True (held in memory)."""
        self._starts.append(self._total)
        self._chunks.append(chunk)
        self._total += len(chunk)
        return True

    def close(self) -> None:
        """Nothing to release but the chunks (ImageSink)."""

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, k: slice) -> bytes:
        a, b, step = k.indices(self._total)
        assert step == 1
        if a >= b:
            return b""
        i = max(0, bisect.bisect_right(self._starts, a) - 1)
        parts = []
        while i < len(self._chunks) and self._starts[i] < b:
            start, c = self._starts[i], self._chunks[i]
            parts.append(c[max(a, start) - start : min(b, start + len(c)) - start])
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __bytes__(self) -> bytes:
        return b"".join(self._chunks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkedBytes):
            other = bytes(other)
        if not isinstance(other, bytes | bytearray | memoryview):
            return NotImplemented
        view = memoryview(other)
        if len(view) != self._total:
            return False
        return all(view[s : s + len(c)] == c for s, c in zip(self._starts, self._chunks, strict=True))

    __hash__ = None  # type: ignore[assignment]


class Snapshot:
    """The group's state-machine image at `meta.index` (for the block store: the extent data). `data` is
    bytes, or bytes-like (an engine-backed ChunkedImage on a leader, a ChunkedBytes on a receiver)."""

    __slots__ = ("meta", "data")

    def __init__(self, meta: SnapshotMeta, data: bytes) -> None:
        self.meta = meta
        self.data = data

    def chunk_count(self, chunk_bytes: int) -> int:
        return max(1, -(-len(self.data) // chunk_bytes))

    def __repr__(self) -> str:
        return f"Snapshot({self.meta}, {len(self.data)}B)"


class MessageType(IntEnum):
    APP = 0  # AppendEntries (§5.3)
    APP_RESP = 1
    VOTE = 2  # RequestVote (§5.2)
    VOTE_RESP = 3
    PRE_VOTE = 4  # thesis §9.6
    PRE_VOTE_RESP = 5
    HEARTBEAT = 6  # empty AppendEntries that also carries the lease/read-index round (thesis §6.4)
    HEARTBEAT_RESP = 7
    SNAP = 8  # one chunk of InstallSnapshot (§7)
    SNAP_RESP = 9  # chunk acknowledgement (volatile: says nothing about durability)
    TIMEOUT_NOW = 10  # leadership transfer (thesis §3.10)


# Messages whose meaning depends on state that must be durable first: an AppendEntries ack says "I hold
# these entries", a vote grant says "I will not vote for anyone else in this term", a candidate's vote
# request implies its own durable self-vote. They go in Ready.messages (sent after persisting).
PERSIST_FIRST = frozenset({MessageType.APP_RESP, MessageType.VOTE_RESP, MessageType.VOTE})


class Message:
    __slots__ = (
        "type",
        "group",
        "src",
        "dst",
        "term",
        "log_term",
        "index",
        "entries",
        "commit",
        "reject",
        "reject_hint",
        "context",
        "lease_tick",
        "force",
        "snap_meta",
        "chunk_index",
        "chunk_total",
        "data",
        "epoch",
    )

    def __init__(
        self,
        type: MessageType,
        group: GroupId,
        src: NodeId,
        dst: NodeId,
        term: int,
        log_term: int = 0,
        index: int = 0,
        entries: list[Entry] | None = None,
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        context: int = 0,
        lease_tick: int = 0,
        force: bool = False,
        snap_meta: SnapshotMeta | None = None,
        chunk_index: int = 0,
        chunk_total: int = 0,
        data: bytes = b"",
        epoch: int = 0,
    ) -> None:
        self.type = type
        self.group = group
        self.src = src
        self.dst = dst
        self.term = term
        self.log_term = log_term
        self.index = index
        self.entries: list[Entry] = entries if entries is not None else []
        self.commit = commit
        self.reject = reject
        self.reject_hint = reject_hint
        self.context = context  # heartbeat round (read-index) echoed back by the follower
        self.lease_tick = lease_tick  # leader's tick when the heartbeat left; echoed back (lease)
        self.force = force  # vote request from a leadership transfer: ignore the leader lease
        self.snap_meta = snap_meta
        self.chunk_index = chunk_index
        self.chunk_total = chunk_total
        self.data = data
        self.epoch = epoch

    def __repr__(self) -> str:
        extra = ""
        if self.type in (MessageType.APP, MessageType.APP_RESP):
            extra = (
                f" i={self.index} lt={self.log_term} n={len(self.entries)} c={self.commit} rej={self.reject}"
            )
        elif self.type in (MessageType.VOTE_RESP, MessageType.PRE_VOTE_RESP):
            extra = f" rej={self.reject}"
        elif self.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            extra = f" i={self.index} lt={self.log_term} force={self.force}"
        elif self.type in (MessageType.SNAP, MessageType.SNAP_RESP):
            extra = f" {self.snap_meta} chunk={self.chunk_index}/{self.chunk_total}"
        return f"Msg({self.type.name} g={self.group} {self.src}->{self.dst} t={self.term}{extra})"


class ReadState:
    """A read request `ctx` may be served once the state machine has applied `index`."""

    __slots__ = ("ctx", "index")

    def __init__(self, ctx: int, index: int) -> None:
        self.ctx = ctx
        self.index = index

    def __repr__(self) -> str:
        return f"ReadState(ctx={self.ctx}, index={self.index})"


class Role(IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3
