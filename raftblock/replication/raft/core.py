# RaftCore: one extent group's Raft state machine without I/O (etcd-io/raft's RawNode shape).
#
# The runtime drives it with `step(msg)`, `tick()`, `propose(data)`, `propose_conf_change(cc)`,
# `read_index(ctx)`, `transfer_leadership(to)`, `compact(index, data)`; then, while `has_ready()`,
# takes one `ready()`, handles it, and calls `advance(ready)`.
#
# The Ready contract (docs/raft.md), in this order:
#   1. `messages_now` may be sent at once, even before anything is persisted (leader appends,
#      heartbeats, snapshot chunks, pre-votes: thesis §10.2.1 lets a leader write its log in parallel).
#   2. Persist: `snapshot` (install), `entries` (replacing any durable suffix from entries[0].index),
#      `hard_state`, `compaction` -- in that order; a crash may keep only a prefix of it.
#   3. Only then send `messages`: acks (APP_RESP), vote grants and vote requests depend on step 2.
#   4. Apply `snapshot` (if any) to the state machine, then `committed_entries` in order; serve the
#      `read_states` once the state machine has applied their index.
#   5. `advance(ready)`. Only one Ready is outstanding at a time; step/tick/propose may be called
#      between ready() and advance().
#
# Rules:
# 1. No I/O, no clocks, no global randomness: time is `tick()`, randomness is the `rand(n) -> [0, n)`
#    callable given to the constructor. This module imports no asyncio, socket, time, random or os.
# 2. A leader commits only entries of its own term by counting replicas (§5.4.2); its own replica
#    counts only once durable (advance), because its appends may leave before its own write.
# 3. Configuration: single-server changes (thesis §4.1); a change takes effect when applied; a new one
#    is refused until the previous one is applied, and until the leader's first entry is (etcd's rule,
#    which closes the single-server-change bug the thesis errata describe).
# 4. `_mutations` plants known bugs for the mutation test only; production code never sets it.
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from .log import RaftLog
from .progress import NEVER, Progress, ProgressState
from .storage import Storage
from .types import (
    NO_NODE,
    PERSIST_FIRST,
    ChunkedBytes,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    GroupId,
    HardState,
    Message,
    MessageType,
    NodeId,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
)

MUTATIONS = frozenset({"ack_before_persist", "vote_twice", "commit_old_term", "skip_log_matching"})

_MT = MessageType


class RaftConfig:
    __slots__ = (
        "node_id",
        "group_id",
        "election_timeout_ticks",
        "heartbeat_interval_ticks",
        "lease_margin_ticks",
        "inflight_max",
        "append_bytes_max",
        "append_entries_max",
        "apply_entries_max",
        "uncommitted_entries_max",
        "snapshot_chunk_bytes",
        "snapshot_inflight_max",
        "snapshot_stall_heartbeats",
        "pre_vote",
        "check_quorum",
        "applied_index",
        "image_sink",
    )

    def __init__(
        self,
        node_id: NodeId,
        group_id: GroupId,
        *,
        election_timeout_ticks: int = 10,
        heartbeat_interval_ticks: int = 1,
        lease_margin_ticks: int = 2,
        inflight_max: int = 64,
        append_bytes_max: int = 1 << 20,
        append_entries_max: int = 256,
        apply_entries_max: int = 1024,
        uncommitted_entries_max: int = 4096,
        snapshot_chunk_bytes: int = 1 << 20,
        snapshot_inflight_max: int = 8,
        snapshot_stall_heartbeats: int = 0,
        pre_vote: bool = True,
        check_quorum: bool = True,
        applied_index: int | None = None,
        image_sink: Callable[[], ImageSink] | None = None,
    ) -> None:
        assert node_id != NO_NODE, "node ids start at 1"
        assert heartbeat_interval_ticks >= 1 and election_timeout_ticks > heartbeat_interval_ticks
        assert 0 <= lease_margin_ticks < election_timeout_ticks
        assert inflight_max >= 1 and append_entries_max >= 1 and append_bytes_max >= 1
        assert snapshot_chunk_bytes >= 1 and uncommitted_entries_max >= 1 and apply_entries_max >= 1
        self.node_id = node_id
        self.group_id = group_id
        self.election_timeout_ticks = election_timeout_ticks
        self.heartbeat_interval_ticks = heartbeat_interval_ticks
        # Lease = election timeout minus a margin for clock-rate drift between nodes (docs/raft.md).
        self.lease_margin_ticks = lease_margin_ticks
        self.inflight_max = inflight_max
        self.append_bytes_max = append_bytes_max
        self.append_entries_max = append_entries_max
        self.apply_entries_max = apply_entries_max
        self.uncommitted_entries_max = uncommitted_entries_max
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        # Snapshot chunks sent and not yet acknowledged (memory held per stream), and heartbeat intervals
        # without an acknowledgement before a stream restarts from the last acknowledged chunk (0: half an
        # election timeout; the runtime sets about 2 s, for a rate-limited sender and a busy receiver).
        self.snapshot_inflight_max = snapshot_inflight_max
        self.snapshot_stall_heartbeats = snapshot_stall_heartbeats
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        # On restart: what the (durable) state machine has applied; default: the snapshot's index.
        self.applied_index = applied_index
        # Where a received snapshot's chunks are kept until it is installed (None: in memory, ChunkedBytes).
        self.image_sink = image_sink


class Ready:
    """One batch of work for the runtime; see the contract at the top of this module."""

    __slots__ = (
        "hard_state",
        "snapshot",
        "entries",
        "compaction",
        "committed_entries",
        "messages_now",
        "messages",
        "read_states",
        "reads_aborted",
        "leader",
        "role",
        "term",
    )

    def __init__(self) -> None:
        self.hard_state: HardState | None = None
        self.snapshot: Snapshot | None = None  # received from the leader: persist, then apply
        self.entries: list[Entry] = []
        self.compaction: Snapshot | None = None  # local image at an applied index: persist, drop entries
        self.committed_entries: list[Entry] = []
        self.messages_now: list[Message] = []
        self.messages: list[Message] = []
        self.read_states: list[ReadState] = []
        self.reads_aborted: list[int] = []
        self.leader: NodeId = NO_NODE
        self.role: Role = Role.FOLLOWER
        self.term = 0


class ImageSink(Protocol):
    """Where a received snapshot's chunks go (RaftConfig.image_sink): in memory (ChunkedBytes, the default)
    or a file (replication/image.py SpillImage). Read back like the image's bytes (len, slices)."""

    def append(self, chunk: bytes) -> bool: ...  # False: not stored (the sender resends it)

    def close(self) -> None: ...  # the stream is dropped or its image installed

    def __len__(self) -> int: ...

    def __getitem__(self, k: slice) -> bytes: ...


class _SnapRx:
    __slots__ = ("key", "meta", "total", "image", "count")

    def __init__(self, key: tuple[int, int, int, int], meta: SnapshotMeta, total: int, image: ImageSink) -> None:
        self.key = key
        self.meta = meta
        self.total = total
        self.image = image
        self.count = 0  # chunks stored


class RaftCore:
    __slots__ = (
        "cfg",
        "id",
        "group",
        "_storage",
        "_rand",
        "_mutations",
        "term",
        "vote",
        "lead",
        "role",
        "log",
        "conf",
        "prs",
        "_votes",
        "now_ticks",
        "_election_elapsed",
        "_heartbeat_elapsed",
        "_randomized_timeout",
        "_transferee",
        "_transfer_elapsed",
        "_lease_revoked",
        "_pending_conf_index",
        "_term_start_index",
        "_msgs_now",
        "_msgs_after",
        "_read_states",
        "_reads_aborted",
        "_pending_reads",
        "_hb_seq",
        "_snapshot",
        "_pending_install",
        "_pending_compaction",
        "_snap_rx",
        "_prev_hs",
        "_outstanding",
    )

    def __init__(
        self,
        cfg: RaftConfig,
        storage: Storage,
        rand: Callable[[int], int],
        _mutations: frozenset[str] = frozenset(),
    ) -> None:
        assert _mutations <= MUTATIONS, f"unknown mutations {_mutations - MUTATIONS}"
        self.cfg = cfg
        self.id = cfg.node_id
        self.group = cfg.group_id
        self._storage = storage
        self._rand = rand
        self._mutations = _mutations
        hs, snap, ents = storage.load()
        self._snapshot = snap
        applied = snap.meta.index if cfg.applied_index is None else cfg.applied_index
        assert snap.meta.index <= applied <= max(hs.commit, snap.meta.index), "applied beyond durable commit"
        self.log = RaftLog(snap.meta.index, snap.meta.term, ents, hs.commit, applied)
        conf = snap.meta.conf
        for i in range(snap.meta.index + 1, applied + 1):
            e = self.log.entry(i)
            if e.type == EntryType.CONFIG:
                conf = ConfChange.decode(e.data).conf_state()
        self.conf: ConfState = conf
        self.term = hs.term
        self.vote = hs.vote
        self._prev_hs = hs
        self.lead = NO_NODE
        self.role = Role.FOLLOWER
        self.prs: dict[NodeId, Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        # Volatile local clock. A restarted node counts from 0 and, until one election timeout has
        # passed, refuses to vote: it may have acknowledged a leader's lease just before it crashed.
        self.now_ticks = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = cfg.election_timeout_ticks
        self._transferee = NO_NODE
        self._transfer_elapsed = 0
        self._lease_revoked = False
        self._pending_conf_index = 0
        self._term_start_index = 0
        self._msgs_now: list[Message] = []
        self._msgs_after: list[Message] = []
        self._read_states: list[ReadState] = []
        self._reads_aborted: list[int] = []
        self._pending_reads: deque[tuple[int, int, int]] = deque()  # (heartbeat seq, ctx, read index)
        self._hb_seq = 0
        self._pending_install: Snapshot | None = None
        self._pending_compaction: Snapshot | None = None
        self._snap_rx: _SnapRx | None = None
        self._outstanding: Ready | None = None
        self._become_follower(self.term, NO_NODE)

    # == public API ==========================================================================================
    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    def last_index(self) -> int:
        return self.log.last_index()

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    def tick(self) -> None:
        self.now_ticks += 1
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._election_elapsed >= self._randomized_timeout and self.promotable():
                self._election_elapsed = 0
                self._campaign(pre=self.cfg.pre_vote, force=False)

    def propose(self, data: bytes) -> int:
        """Append a normal entry; returns its index, or 0 if refused (not leader, transferring, full)."""
        return self._propose(EntryType.NORMAL, data)

    def propose_conf_change(self, change_type: ConfChangeType, node_id: NodeId, epoch: int) -> int:
        """Single-server change (thesis §4.1); returns the entry index or 0 if refused."""
        if self.role != Role.LEADER or self._pending_conf_index > self.log.applied:
            return 0
        voters = set(self.conf.voters)
        if change_type == ConfChangeType.ADD_VOTER:
            if node_id in voters:
                return 0
            voters.add(node_id)
        else:
            if node_id not in voters or len(voters) == 1:
                return 0
            voters.discard(node_id)
        cc = ConfChange(change_type, node_id, epoch, frozenset(voters))
        index = self._propose(EntryType.CONFIG, cc.encode())
        if index:
            self._pending_conf_index = index
        return index

    def read_index(self, ctx: int, lease: bool = False) -> bool:
        """Start a linearizable read (thesis §6.4). The ReadState(ctx, index) comes in a later Ready.

        With `lease=True` and a valid lease the read is confirmed at once (§6.4.1); otherwise a heartbeat
        round confirms leadership first. Refused (False) unless this node is leader and has committed an
        entry of its term (only then is its commit index at least every acknowledged write).
        """
        if self.role != Role.LEADER or self._transferee != NO_NODE:
            return False
        if self.log.committed < self._term_start_index:
            return False
        if len(self.conf.voters) == 1 or (lease and self.lease_valid()):
            self._read_states.append(ReadState(ctx, self.log.committed))
            return True
        self._bcast_heartbeat()
        self._pending_reads.append((self._hb_seq, ctx, self.log.committed))
        return True

    def lease_read_now(self) -> int:
        """The read index a lease read gets at once (§6.4.1: no message, no Ready), or -1 when the read
        must go through read_index() (no valid lease, or a leadership transfer under way)."""
        if self._transferee != NO_NODE or not self.lease_valid():
            return -1
        return self.log.committed

    def lease_valid(self) -> bool:
        """Leader lease: a quorum acknowledged a heartbeat sent at tick t, and now < t + lease length."""
        if self.role != Role.LEADER or self._lease_revoked or not self.cfg.check_quorum:
            return False
        if self.log.committed < self._term_start_index:
            return False
        ticks = sorted(
            (self.now_ticks if v == self.id else self.prs[v].lease_ack_tick for v in self.conf.voters),
            reverse=True,
        )
        lease_ticks = self.cfg.election_timeout_ticks - self.cfg.lease_margin_ticks
        return self.now_ticks < ticks[self.conf.quorum() - 1] + lease_ticks

    def transfer_leadership(self, to: NodeId) -> bool:
        """Thesis §3.10: bring `to` up to date, then tell it to campaign at once (TimeoutNow)."""
        if self.role != Role.LEADER or to == self.id or to not in self.conf.voters:
            return False
        self._transferee = to
        self._transfer_elapsed = 0
        pr = self.prs[to]
        if pr.match == self.log.last_index():
            self._send_timeout_now(to)
        else:
            self._send_append(to, True)
        return True

    def compact(self, index: int, data: bytes, app: bytes = b"") -> bool:
        """Take a local snapshot at an applied index (data: the state machine image there, or a newer
        one: entries are idempotent block writes, so replaying the suffix after `index` converges;
        app: SnapshotMeta.app, state exactly at `index`)."""
        if index > self.log.applied or index <= self.log.snap_index:
            return False
        t = self.log.term(index)
        assert t is not None
        snap = Snapshot(SnapshotMeta(index, t, self.conf, app), data)
        self.log.compact(index)
        self._snapshot = snap
        self._pending_compaction = snap
        return True

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        lg = self.log
        if self._msgs_now or self._msgs_after or lg.unstable_from <= lg.last_index():
            return True
        if self._pending_install is not None or self._pending_compaction is not None:
            return True
        if lg.applied < lg.committed or self._read_states or self._reads_aborted:
            return True
        hs = self._prev_hs
        return hs.term != self.term or hs.vote != self.vote or hs.commit != lg.committed

    def ready(self) -> Ready:
        assert self._outstanding is None, "advance() the previous Ready first"
        lg = self.log
        rd = Ready()
        hs = self._prev_hs
        if hs.term != self.term or hs.vote != self.vote or hs.commit != lg.committed:
            rd.hard_state = HardState(self.term, self.vote, lg.committed)
        rd.snapshot = self._pending_install
        self._pending_install = None
        rd.entries = lg.unstable_entries()
        rd.compaction = self._pending_compaction
        self._pending_compaction = None
        if rd.snapshot is None and lg.applied < lg.committed:
            hi = min(lg.committed, lg.applied + self.cfg.apply_entries_max)
            rd.committed_entries = lg.slice(lg.applied + 1, hi + 1)
        rd.messages_now = self._msgs_now
        rd.messages = self._msgs_after
        self._msgs_now = []
        self._msgs_after = []
        rd.read_states = self._read_states
        rd.reads_aborted = self._reads_aborted
        self._read_states = []
        self._reads_aborted = []
        rd.leader = self.lead
        rd.role = self.role
        rd.term = self.term
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        assert rd is self._outstanding, "advance() takes the outstanding Ready"
        self._outstanding = None
        lg = self.log
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None:
            if rd.snapshot.meta.index > lg.applied:
                lg.applied = rd.snapshot.meta.index
            if self._snapshot is rd.snapshot:
                # Installed and persisted: from now on the snapshot is the storage's (the node runtime's is
                # read from the engine on demand), so the received image is not kept in memory.
                self._snapshot = self._storage.snapshot()
        if rd.entries:
            last = rd.entries[-1]
            lg.stable_to(last.index, last.term)
        if rd.committed_entries:
            for e in rd.committed_entries:
                if e.type == EntryType.CONFIG and e.index > lg.snap_index:  # not behind a newer install
                    lg.applied = e.index
                    self._apply_conf(ConfChange.decode(e.data).conf_state())
            if rd.committed_entries[-1].index > lg.applied:
                lg.applied = rd.committed_entries[-1].index
        if self.role == Role.LEADER:
            me = self.prs.get(self.id)
            if me is not None and me.maybe_update(lg.stable_last()) and self._maybe_commit():
                self._bcast_append()

    def step(self, m: Message) -> None:
        if m.group != self.group:
            return
        if m.term > self.term:
            if m.type == _MT.VOTE or m.type == _MT.PRE_VOTE:
                if not m.force and self._in_lease():
                    return  # §6 / thesis §4.2.3: a live leader's followers ignore disruptive candidates
            if m.type == _MT.PRE_VOTE or (m.type == _MT.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change the term (thesis §9.6)
            elif m.type == _MT.APP or m.type == _MT.HEARTBEAT or m.type == _MT.SNAP:
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, NO_NODE)
        elif m.term < self.term:
            if m.type == _MT.APP or m.type == _MT.HEARTBEAT:
                # Tell a stale leader about the newer term (it may be partitioned away from everyone
                # else and, with pre-vote, would otherwise never hear of it).
                self._send(Message(_MT.APP_RESP, self.group, self.id, m.src, self.term))
            elif m.type == _MT.PRE_VOTE:
                self._send(Message(_MT.PRE_VOTE_RESP, self.group, self.id, m.src, self.term, reject=True))
            return

        t = m.type
        if t == _MT.VOTE or t == _MT.PRE_VOTE:
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # == roles ===============================================================================================
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NO_NODE
        self.lead = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        et = self.cfg.election_timeout_ticks
        self._randomized_timeout = et + self._rand(et)  # §5.2 randomized election timeout
        self._transferee = NO_NODE
        self._lease_revoked = False
        self._votes = {}
        if self._pending_reads:
            self._reads_aborted.extend(ctx for _, ctx, _ in self._pending_reads)
            self._pending_reads.clear()
        self.prs = {}

    def _become_follower(self, term: int, lead: NodeId) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def _become_leader(self) -> None:
        assert self.role == Role.CANDIDATE or len(self.conf.voters) == 1
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        nxt = self.log.last_index() + 1
        for v in self.conf.voters:
            pr = Progress(nxt)
            pr.recent_active = True
            self.prs[v] = pr
        me = self.prs.get(self.id)
        if me is not None:
            me.match = self.log.stable_last()
            me.become_replicate()
        # No config change until everything before our first entry is applied (etcd's rule).
        self._pending_conf_index = self.log.last_index()
        noop = Entry(self.term, nxt, EntryType.NOOP, b"")
        self.log.append([noop])
        self._term_start_index = nxt
        self._hb_seq = 0
        self._bcast_append()

    def _campaign(self, pre: bool, force: bool) -> None:
        if pre:
            self.role = Role.PRE_CANDIDATE
            self.lead = NO_NODE
            self._votes = {self.id: True}
            vote_term = self.term + 1
            mt = _MT.PRE_VOTE
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            self._votes = {self.id: True}
            vote_term = self.term
            mt = _MT.VOTE
        if self._tally()[0] >= self.conf.quorum():
            if pre:
                self._campaign(False, force)
            else:
                self._become_leader()
            return
        li, lt = self.log.last_index(), self.log.last_term()
        for v in self.conf.voters:
            if v != self.id:
                self._send(Message(mt, self.group, self.id, v, vote_term, log_term=lt, index=li, force=force))

    def _tally(self) -> tuple[int, int]:
        granted = rejected = 0
        voters = self.conf.voters
        for v, ok in self._votes.items():
            if v in voters:
                if ok:
                    granted += 1
                else:
                    rejected += 1
        return granted, rejected

    def _in_lease(self) -> bool:
        if not self.cfg.check_quorum:
            return False
        et = self.cfg.election_timeout_ticks
        return (self.lead != NO_NODE and self._election_elapsed < et) or self.now_ticks < et

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == _MT.PRE_VOTE
        resp_t = _MT.PRE_VOTE_RESP if pre else _MT.VOTE_RESP
        can_vote = (
            self.vote == m.src
            or (self.vote == NO_NODE and self.lead == NO_NODE)
            or (pre and m.term > self.term)
        )
        if not pre and "vote_twice" in self._mutations:
            can_vote = True
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):  # §5.4.1 election restriction
            self._send(Message(resp_t, self.group, self.id, m.src, m.term))
            if not pre:
                self._election_elapsed = 0
                self.vote = m.src
        else:
            self._send(Message(resp_t, self.group, self.id, m.src, self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t == _MT.APP:
            self._become_follower(m.term, m.src)
            self._handle_append(m)
        elif t == _MT.HEARTBEAT:
            self._become_follower(m.term, m.src)
            self._handle_heartbeat(m)
        elif t == _MT.SNAP:
            self._become_follower(m.term, m.src)
            self._handle_snap_chunk(m)
        elif t == (_MT.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else _MT.VOTE_RESP):
            self._votes.setdefault(m.src, not m.reject)
            granted, rejected = self._tally()
            q = self.conf.quorum()
            if granted >= q:
                if self.role == Role.PRE_CANDIDATE:
                    self._campaign(False, False)
                else:
                    self._become_leader()
            elif rejected > len(self.conf.voters) - q:
                self._become_follower(self.term, NO_NODE)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == _MT.APP:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_append(m)
        elif t == _MT.HEARTBEAT:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_heartbeat(m)
        elif t == _MT.SNAP:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_snap_chunk(m)
        elif t == _MT.TIMEOUT_NOW:
            if self.promotable():
                self._campaign(pre=False, force=True)  # thesis §3.10: skip pre-vote, override leases

    # == follower side ======================================================================================
    def _handle_append(self, m: Message) -> None:
        lg = self.log
        if m.index < lg.committed:
            self._send(Message(_MT.APP_RESP, self.group, self.id, m.src, self.term, index=lg.committed))
            return
        check = "skip_log_matching" not in self._mutations
        last_new = lg.maybe_append(m.index, m.log_term, m.commit, m.entries, check)  # §5.3 log matching
        if last_new >= 0:
            self._send(Message(_MT.APP_RESP, self.group, self.id, m.src, self.term, index=last_new))
            return
        # Hint: the last index at or below the probe whose term is <= the leader's term there, so the
        # leader can skip a whole divergent term in one round trip.
        hint = min(m.index, lg.last_index())
        while hint > lg.snap_index:
            ht = lg.term(hint)
            if ht is not None and ht <= m.log_term:
                break
            hint -= 1
        self._send(
            Message(
                _MT.APP_RESP,
                self.group,
                self.id,
                m.src,
                self.term,
                index=m.index,
                reject=True,
                reject_hint=hint,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(m.commit)
        self._send(
            Message(
                _MT.HEARTBEAT_RESP,
                self.group,
                self.id,
                m.src,
                self.term,
                context=m.context,
                lease_tick=m.lease_tick,
            )
        )

    def _handle_snap_chunk(self, m: Message) -> None:
        meta = m.snap_meta
        assert meta is not None
        lg = self.log
        if meta.index <= lg.committed:
            self._drop_snap_rx()
            self._send(Message(_MT.APP_RESP, self.group, self.id, m.src, self.term, index=lg.committed))
            return
        key = (int(m.src), m.term, meta.index, meta.term)
        rx = self._snap_rx
        if rx is None or rx.key != key:
            if m.chunk_index != 0:
                self._send_snap_ack(m, 0)
                return
            self._drop_snap_rx()
            sink = self.cfg.image_sink
            rx = self._snap_rx = _SnapRx(key, meta, m.chunk_total, sink() if sink is not None else ChunkedBytes())
        if m.chunk_index == rx.count and rx.image.append(m.data):
            rx.count += 1
        self._send_snap_ack(m, rx.count)
        if rx.count == rx.total:
            self._snap_rx = None
            # The chunks as they came, never joined: the host installs the image batch by batch, and
            # closes it once the Ready that carries it is done.
            self._restore(m.src, Snapshot(meta, cast(bytes, rx.image)))

    def _drop_snap_rx(self) -> None:
        rx = self._snap_rx
        if rx is not None:
            self._snap_rx = None
            rx.image.close()

    def _send_snap_ack(self, m: Message, next_chunk: int) -> None:
        self._send(
            Message(
                _MT.SNAP_RESP,
                self.group,
                self.id,
                m.src,
                self.term,
                snap_meta=m.snap_meta,
                chunk_index=next_chunk,
                chunk_total=m.chunk_total,
            )
        )

    def _restore(self, leader: NodeId, snap: Snapshot) -> None:
        lg = self.log
        meta = snap.meta
        if lg.match_term(meta.index, meta.term):
            # We already hold that prefix: fast-forward. Only the prefix is known to match the leader,
            # so the ack says `committed`, not our last index.
            lg.commit_to(meta.index)
            self._send(Message(_MT.APP_RESP, self.group, self.id, leader, self.term, index=lg.committed))
            return
        lg.restore(meta)
        self.conf = meta.conf
        self._pending_install = snap
        self._snapshot = snap
        self._send(Message(_MT.APP_RESP, self.group, self.id, leader, self.term, index=lg.last_index()))

    # == leader side ========================================================================================
    def _propose(self, et: EntryType, data: bytes) -> int:
        if self.role != Role.LEADER or self._transferee != NO_NODE:
            return 0
        lg = self.log
        if lg.last_index() - lg.committed >= self.cfg.uncommitted_entries_max:
            return 0
        index = lg.last_index() + 1
        lg.append([Entry(self.term, index, et, data)])
        self._bcast_append()
        return index

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        et = self.cfg.election_timeout_ticks
        if self._election_elapsed >= et:
            self._election_elapsed = 0
            if self.cfg.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self.term, NO_NODE)
                    return
                for v, pr in self.prs.items():
                    if v != self.id:
                        pr.recent_active = False
        if self._transferee != NO_NODE:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= et:
                self._transferee = NO_NODE  # abort: the target did not take over in time
        if self._heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()
            stall_max = max(2, et // 2, self.cfg.snapshot_stall_heartbeats)
            for v, pr in self.prs.items():
                if pr.state == ProgressState.SNAPSHOT and pr.snap is not None:
                    pr.snap_stall_ticks += 1
                    if pr.snap_stall_ticks >= stall_max:
                        total = pr.snap.chunk_count(self.cfg.snapshot_chunk_bytes)
                        pr.snap_acked = pr.snap_sent = min(pr.snap_acked, total - 1)
                        pr.snap_stall_ticks = 0
                        self._send_snap_chunks(v, pr)

    def _quorum_active(self) -> bool:
        n = 0
        for v in self.conf.voters:
            pr = self.prs.get(v)
            if v == self.id or (pr is not None and pr.recent_active):
                n += 1
        return n >= self.conf.quorum()

    def _bcast_heartbeat(self) -> None:
        self._hb_seq += 1
        committed = self.log.committed
        for v, pr in self.prs.items():
            if v != self.id:
                self._send(
                    Message(
                        _MT.HEARTBEAT,
                        self.group,
                        self.id,
                        v,
                        self.term,
                        commit=min(pr.match, committed),
                        context=self._hb_seq,
                        lease_tick=self.now_ticks,
                    )
                )

    def _bcast_append(self) -> None:
        for v in self.prs:
            if v != self.id:
                self._send_append(v, True)

    def _send_append(self, to: NodeId, send_if_empty: bool) -> bool:
        pr = self.prs[to]
        cfg = self.cfg
        if pr.is_paused(cfg.inflight_max):
            return False
        lg = self.log
        prev = pr.next - 1
        prev_term = lg.term(prev)
        if prev_term is None:
            if not pr.recent_active:
                return False
            pr.become_snapshot(self._snapshot)
            self._send_snap_chunks(to, pr)
            return True
        ents = lg.slice_bounded(pr.next, cfg.append_bytes_max, cfg.append_entries_max)
        if not ents and not send_if_empty:
            return False
        self._send(
            Message(
                _MT.APP,
                self.group,
                self.id,
                to,
                self.term,
                log_term=prev_term,
                index=prev,
                entries=ents,
                commit=lg.committed,
            )
        )
        if ents:
            if pr.state == ProgressState.REPLICATE:
                last = ents[-1].index
                pr.next = last + 1
                pr.inflight.append(last)
            else:
                pr.probe_sent = True
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snap_chunks(self, to: NodeId, pr: Progress) -> None:
        snap = pr.snap
        assert snap is not None
        cb = self.cfg.snapshot_chunk_bytes
        total = snap.chunk_count(cb)
        while pr.snap_sent < total and pr.snap_sent - pr.snap_acked < self.cfg.snapshot_inflight_max:
            k = pr.snap_sent
            self._send(
                Message(
                    _MT.SNAP,
                    self.group,
                    self.id,
                    to,
                    self.term,
                    snap_meta=snap.meta,
                    chunk_index=k,
                    chunk_total=total,
                    data=snap.data[k * cb : (k + 1) * cb],
                )
            )
            pr.snap_sent = k + 1

    def _send_timeout_now(self, to: NodeId) -> None:
        # The target will campaign with `force`, which voters honour even inside our lease; a TimeoutNow
        # may arrive late, so no lease read for the rest of this term.
        self._lease_revoked = True
        self._send(Message(_MT.TIMEOUT_NOW, self.group, self.id, to, self.term))

    def _maybe_commit(self) -> bool:
        """§5.4.2: commit the highest index a quorum holds, only if it is of the current term."""
        matches = sorted((self.prs[v].match if v in self.prs else 0 for v in self.conf.voters), reverse=True)
        index = matches[self.conf.quorum() - 1]
        lg = self.log
        if index <= lg.committed:
            return False
        if lg.term(index) != self.term and "commit_old_term" not in self._mutations:
            return False
        lg.commit_to(index)
        return True

    def _step_leader(self, m: Message) -> None:
        pr = self.prs.get(m.src)
        if pr is None:
            return
        t = m.type
        if t == _MT.APP_RESP:
            pr.recent_active = True
            if m.reject:
                if pr.maybe_decr_to(m.index, m.reject_hint):
                    if pr.state == ProgressState.REPLICATE:
                        pr.become_probe()
                    self._send_append(m.src, True)
                return
            was_paused = pr.is_paused(self.cfg.inflight_max)
            if pr.maybe_update(m.index):
                if pr.state == ProgressState.PROBE:
                    pr.become_replicate()
                elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                    pr.become_probe()
                    pr.become_replicate()
                elif pr.state == ProgressState.REPLICATE:
                    pr.free_inflight_to(m.index)
                # A new commit index is not broadcast in appends of its own: followers learn it from the
                # next append or heartbeat (it only drives their apply; safety does not depend on it), which
                # spares two messages, two follower wake-ups and two acknowledgements per commit.
                self._maybe_commit()
                if was_paused:
                    self._send_append(m.src, False)
                while self._send_append(m.src, False):  # pipelining: fill the in-flight window
                    pass
                if m.src == self._transferee and pr.match == self.log.last_index():
                    self._send_timeout_now(m.src)
        elif t == _MT.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if m.lease_tick > pr.lease_ack_tick:
                pr.lease_ack_tick = m.lease_tick
            if m.context > pr.read_ack_seq:
                pr.read_ack_seq = m.context
            if pr.state == ProgressState.REPLICATE and len(pr.inflight) >= self.cfg.inflight_max:
                pr.inflight.popleft()  # an append may be lost: let one more through to find out
            if pr.match < self.log.last_index():
                # Even an empty append: if earlier appends were lost, the follower's rejection is
                # what moves it back to probing.
                self._send_append(m.src, True)
            if self._pending_reads:
                self._release_reads()
        elif t == _MT.SNAP_RESP:
            meta = m.snap_meta
            snap = pr.snap
            if pr.state != ProgressState.SNAPSHOT or snap is None or meta is None:
                return
            if meta.index != snap.meta.index or meta.term != snap.meta.term:
                return
            pr.recent_active = True
            pr.snap_stall_ticks = 0
            nxt = m.chunk_index
            if nxt == 0 and pr.snap_acked > 0:
                pr.snap_acked = pr.snap_sent = 0  # the follower lost its partial copy (restart)
            elif nxt > pr.snap_acked:
                pr.snap_acked = nxt
                if pr.snap_sent < nxt:
                    pr.snap_sent = nxt
            self._send_snap_chunks(m.src, pr)

    def _release_reads(self) -> None:
        big = self._hb_seq + 1
        acks = sorted(
            (
                big if v == self.id else (self.prs[v].read_ack_seq if v in self.prs else 0)
                for v in self.conf.voters
            ),
            reverse=True,
        )
        confirmed = acks[self.conf.quorum() - 1]
        q = self._pending_reads
        while q and q[0][0] <= confirmed:
            _, ctx, index = q.popleft()
            self._read_states.append(ReadState(ctx, index))

    def _apply_conf(self, cs: ConfState) -> None:
        self.conf = cs
        if self.role == Role.LEADER:
            if self.id not in cs.voters:
                self._become_follower(self.term, NO_NODE)  # removed: stop leading (thesis §4.2.2)
                return
            nxt = self.log.last_index() + 1
            for v in cs.voters:
                if v not in self.prs:
                    pr = Progress(nxt)
                    pr.recent_active = True
                    self.prs[v] = pr
            for v in list(self.prs):
                if v not in cs.voters:
                    del self.prs[v]
            for pr in self.prs.values():
                pr.lease_ack_tick = NEVER  # a lease proven under the old configuration is dropped
            if self._transferee not in cs.voters:
                self._transferee = NO_NODE
            if self._maybe_commit():
                self._bcast_append()
            else:
                for v in cs.voters:
                    if v != self.id:
                        self._send_append(v, False)
            if self._pending_reads:
                self._release_reads()
        elif self.role != Role.FOLLOWER and self.id not in cs.voters:
            self._become_follower(self.term, NO_NODE)

    # == output ==============================================================================================
    def _send(self, m: Message) -> None:
        m.epoch = self.conf.epoch
        if m.type in PERSIST_FIRST and not (
            m.type == _MT.APP_RESP and "ack_before_persist" in self._mutations
        ):
            self._msgs_after.append(m)
        else:
            self._msgs_now.append(m)
