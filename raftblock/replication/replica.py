"""A replica: one node's copy of one extent group, of either kind (Raft or chain), as the node's host
(node/host.py) drives it, and the narrow context a replica may ask of its node.

The host knows replicas only through `Replica`; a replica knows its node only through `NodeContext`
(the WAL, the engine, the clock in ticks, the dirty set, group commit, the repair budget, the peers'
links). So `replication/` never imports `node/`, and a change to one kind touches one module.

What both kinds do the same way is written once here (`ReplicaBase`):
1. At most one Ready is outstanding per replica (`rd`). Persisting it appends to the WAL buffer; if it
   must be durable it joins the node's group commit (`wait_sync`, at most once: `waiting`), and the
   host calls `synced_messages` (acknowledgements leave first) then `synced` (apply, answer, advance)
   once the fdatasync covering `wait_pos` is done.
2. A Ready with a snapshot image installs it first (`install_then_persist`, async, through the node's
   `install_image`), the Ready staying outstanding meanwhile, then persists the rest as usual.
3. A write is queued for this loop turn (`add_pending`, bounded by `pending_writes_max` with the
   proposals in flight) and the turn's writes become as few entries or records as the bounds allow
   (`flush_proposals` with the kind's `propose`).
4. Applying an entry or record is `replication/apply.py`, the same for both kinds; a full disk blocks
   the replica's applies for a while (`NodeContext.block_apply`).
5. `fail_requests` answers everything waiting with one error, once (the replica lost its role, the node
   failed or stops).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, NamedTuple, Protocol

from raftblock.replication.apply import apply_batch
from raftblock.replication.image import ChunkedImage, SpillImage
from raftblock.replication.requests import Pending, Reply, RetryError, fail_requests, live_batches
from raftblock.replication.sessions import Sessions
from raftblock.replication.wal import Wal, WalStorage
from raftblock.storage.engine import Engine
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.framing import Buf
from raftblock.wire.ops import BlockOp, encode_batch


class ScrubView(NamedTuple):
    """What the scrub (control/scrub.py) needs of a replica."""

    applied: Callable[[], int]  # the applied index (Raft) or seq (chain), read now
    others: list[int]  # the other members, in the order to ask them
    compares: bool  # this member compares the replicas (a Raft leader under lease, a chain's head)
    repairs: bool  # a member that differs is told to copy from this one (Raft; a chain only reports)


class Settings(Protocol):
    """The node's settings a replica reads (node/config.py HostConfig has them all)."""

    tick_ms: int
    election_timeout_ticks: int
    heartbeat_interval_ticks: int
    lease_margin_ticks: int
    batch_bytes_max: int
    batch_writes_max: int
    pending_writes_max: int
    snapshot_chunk_bytes: int


class PeerConn(Protocol):
    def write_buffer_bytes(self) -> int: ...


class Links(Protocol):
    """The node's peer connections (node/transport.py Transport)."""

    @property
    def conns(self) -> Mapping[int, PeerConn]: ...

    def send(self, pid: int, parts: list[Buf]) -> bool: ...


class NodeContext(Protocol):
    """What a replica may ask of its node."""

    node_id: int
    wal: Wal
    engine: Engine
    counters: Counter[str]
    dirty: set[int]  # replicas with something to do this turn (the host looks for a Ready)
    propose_dirty: set[int]  # replicas with writes queued this turn (flush_proposals)
    streams: set[int]  # replicas with a snapshot stream to pump (chain)

    @property
    def cfg(self) -> Settings: ...

    @property
    def links(self) -> Links: ...

    @property
    def ticks(self) -> int: ...

    @property
    def failed(self) -> BaseException | None: ...

    @property
    def stopping(self) -> bool: ...

    def kick(self) -> None: ...

    def catch_up_ticks(self) -> None: ...

    def wait_sync(self, r: Replica) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def future(self) -> asyncio.Future[int]: ...

    def next_read_ctx(self) -> int: ...

    def block_apply(self, gid: int, ex: BaseException) -> None: ...

    def note_applied(self, nbytes: int) -> None: ...

    def image_of(self, gid: int, app: bytes) -> ChunkedImage: ...

    def image_sink(self) -> SpillImage: ...

    def install_image(self, gid: int, data: Any) -> Coroutine[Any, Any, bytes | None]: ...

    def repair_allow(self, nbytes: int) -> bool: ...

    def drop_replica(self, gid: int, deleted: bool) -> None: ...

    def syncing(self) -> bool: ...


class Replica(Protocol):
    """What the host drives (ReplicaBase holds the shared part; raft/replica.py, chain/replica.py)."""

    kind: ClassVar[str]
    id: int
    rd: Any
    wait_pos: int
    waiting: bool
    sessions: Sessions

    def has_ready(self) -> bool: ...

    def handle_ready(self) -> None: ...

    def flush_proposals(self) -> None: ...

    def synced_messages(self) -> bool: ...

    def synced(self) -> None: ...

    def tick(self, n: int, now: int) -> None: ...

    def configure(self, members: list[int], epoch: int) -> None: ...

    def can_drop(self, deleted: bool) -> bool: ...

    def fail_requests(self, exc: Exception) -> None: ...

    def check_writable(self) -> None: ...

    def add_pending(self, op: BlockOp, reply: Reply) -> None: ...

    def read_now(self) -> bool: ...

    async def read_barrier(self) -> int: ...

    def applied(self) -> int: ...

    def read_sources(self) -> list[int]: ...

    def scrub_view(self) -> ScrubView: ...

    def repair_refusal(self, source: int) -> str | None: ...

    def compaction_point(self) -> tuple[int, Sessions, bytes] | None: ...

    def compact(self, point: int, sess: Sessions, app: bytes) -> bool: ...

    def info(self, allocated_bytes: int) -> pb.GroupInfo: ...

    def counters(self) -> dict[str, int]: ...

    def pump(self) -> bool: ...


class ReplicaBase:
    """The lifecycle both kinds share (the module's rules). Subclasses set `kind` and implement the core
    calls: `propose`, `persist`, `installed` and `finish` of a Ready, `send`."""

    kind: ClassVar[str] = ""
    has_ready: Callable[[], bool]  # the kind's core's own has_ready, bound once (asked every turn)

    def __init__(self, ctx: NodeContext, gid: int, storage: WalStorage, sessions: Sessions) -> None:
        self.ctx = ctx
        self.id = gid
        self.storage = storage
        self.sessions = sessions
        self.rd: Any = None
        self.wait_pos = 0
        self.waiting = False  # in the node's group-commit waiters
        self.installing = False  # the outstanding Ready's image is being installed (rule 2)
        self.pending: list[Pending] = []
        self.pending_bytes = 0
        self.proposals: dict[int, Any] = {}
        self.reads: dict[int, asyncio.Future[int]] = {}  # read ctx -> waiting for the core's answer

    # == rule 1 ==================================================================================================
    def wait_sync(self) -> None:
        self.wait_pos = max(self.wait_pos, self.storage.last_pos)
        if not self.waiting:
            self.waiting = True
            self.ctx.wait_sync(self)  # type: ignore[arg-type]

    # == rule 2 ==================================================================================================
    def start_install(self, rd: Any, image: Any) -> None:
        """While the image installs, the Ready's messages and finish wait, even if a group commit this
        replica joined for another reason (a chain configuration) completes meanwhile."""
        self.installing = True
        self.ctx.spawn(self._install_then_persist(rd, self.ctx.install_image(self.id, image)))

    async def _install_then_persist(self, rd: Any, install: Coroutine[Any, Any, bytes | None]) -> None:
        app = await install
        if app is None:
            return
        self.installing = False
        self.installed(rd, app)
        self.persist(rd, True)
        self.ctx.dirty.add(self.id)
        self.ctx.kick()

    def installed(self, rd: Any, app: bytes) -> None:
        raise NotImplementedError

    def persist(self, rd: Any, must_sync: bool) -> None:
        raise NotImplementedError

    def persisted(self, must_sync: bool) -> None:
        """The Ready is in the WAL buffer: wait for the group commit, or finish it now."""
        if must_sync:
            self.wait_sync()
        else:
            self.finish()

    def finish(self) -> None:
        raise NotImplementedError

    def synced_messages(self) -> bool:
        """The group commit covering the outstanding Ready is done: the messages it held back (a
        follower's acknowledgements) leave now, before anything is applied."""
        self.waiting = False
        rd = self.rd
        if rd is None or self.installing or not rd.messages:
            return False
        send = self.send
        for m in rd.messages:
            send(m)
        rd.messages = []
        return True

    def send(self, m: Any) -> None:
        raise NotImplementedError

    # == rule 3 ==================================================================================================
    def add_pending(self, op: BlockOp, reply: Reply) -> None:
        ctx = self.ctx
        if len(self.pending) + len(self.proposals) >= ctx.cfg.pending_writes_max:
            ctx.counters["client_overloaded"] += 1
            raise RetryError("too many writes in flight for this group")
        self.pending.append(Pending(op, reply))
        self.pending_bytes += op.encoded_size()
        ctx.propose_dirty.add(self.id)
        ctx.kick()

    def flush_proposals(self) -> None:
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        cfg = self.ctx.cfg
        for live in live_batches(pending, cfg.batch_writes_max, cfg.batch_bytes_max):
            self.propose([p.fut for p in live], encode_batch([p.op for p in live]))
        self.ctx.dirty.add(self.id)

    def propose(self, replies: list[Reply], data: bytes) -> None:
        raise NotImplementedError

    # == rule 4 ==================================================================================================
    def apply_data(self, index: int, data: bytes, term: int) -> None:
        ctx = self.ctx
        link = ctx.wal.take_link(self.id, index, term) if ctx.wal.write_once_min_bytes else None
        apply_batch(ctx.engine, self.sessions, self.id, index, data, ctx.counters, link)
        ctx.note_applied(len(data))

    # == rule 5 ==================================================================================================
    def fail_requests(self, exc: Exception) -> None:
        fail_requests(self.proposal_replies(), self.pending, self.reads.values(), exc)
        self.proposals.clear()
        self.pending = []
        self.pending_bytes = 0
        self.reads.clear()

    def proposal_replies(self) -> list[list[Reply]]:
        return list(self.proposals.values())

    # == shared helpers ==========================================================================================
    async def wait_read(self, ctx_id: int) -> int:
        fut = self.ctx.future()
        self.reads[ctx_id] = fut
        self.ctx.dirty.add(self.id)
        self.ctx.kick()
        return await fut
