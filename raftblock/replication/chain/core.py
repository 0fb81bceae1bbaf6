# ChainCore: one member of one chain-replicated group, without I/O (the shape of raft/core.py).
#
# The runtime drives it with `set_config(cfg)` and `grant_lease(epoch, until)` (from the metadata group),
# `step(msg)`, `tick(now)`, `propose(data)` (head) and `read(ctx)` (tail); then, while `has_ready()`,
# takes one `ready()`, handles it, and calls `advance(ready)`.
#
# The Ready contract (docs/chain.md), in this order:
#   1. `messages_now` (WRITE, SNAPSHOT, SYNC) may be sent at once, before anything is persisted:
#      forwarding downstream is pipelined with the member's own write.
#   2. Persist `snapshot` (replacing the member's records), then `records`, in order. A crash may keep
#      a prefix of that sequence.
#   3. Only then send `messages` (ACKs) and answer `client_acks` (head): both promise durability.
#   4. Install `snapshot` into the state machine, apply `applies` in order, then answer `reads`.
#   5. `advance(ready)`. One Ready is outstanding at a time; step/tick/propose/read may be called
#      between ready() and advance().
#
# Rules:
# 1. No I/O, no clocks, no randomness: time is the `now` given to tick(); the state-machine image for a
#    joining successor comes from the `snapshot_fn` callable. No asyncio, socket, time, random or os.
# 2. Epoch fence: a message whose epoch differs from this member's is refused and counted (older: a
#    zombie; newer: the runtime has to fetch the map). Within one epoch only neighbours address me;
#    a message from anyone else is refused too. Without a configuration, or outside it, a member
#    never acks, never serves reads, never accepts proposals.
# 3. Persist before ack: ACK(seq) leaves only when seq is durable here (advanced) and, unless I am the
#    tail, my successor acked >= seq in my epoch. The head answers clients on the same condition.
#    The ack point is also the apply point: everything acked from downstream is committed.
# 4. Sync before forwarding: after a new epoch, a member forwards to its successor only after that
#    successor's SYNC, and answers a SYNC only once it is itself synced (head: at once), so a synced
#    tail implies the whole chain has left every older epoch.
# 5. Reads: the tail only, synced, holding an unexpired lease of its epoch (`now < until`).
# 6. `_mutations` plants known bugs for the mutation test only; production code never sets it.
from __future__ import annotations

from collections.abc import Callable

from .types import (
    NO_NODE,
    ChainConfig,
    ChainMessage,
    ChainReady,
    ChainSnapshot,
    GroupId,
    MessageType,
    NodeId,
    Record,
)

MUTATIONS = frozenset(
    {"ack_before_persist", "accept_stale_epoch", "tail_reads_without_lease", "skip_sync_resend"}
)

_MT = MessageType

COUNTERS = (
    "stale_epoch",  # refused: message from an older epoch (zombie)
    "future_epoch",  # refused: message from a newer epoch (config not learned yet)
    "no_config",  # refused: no configuration yet
    "not_member",  # refused: this member is not in its current configuration
    "not_neighbour",  # refused: sender is not the neighbour this message type comes from
    "wrong_group",
    "duplicate_records",  # WRITE records already held (resends)
    "gap",  # WRITE records after a missing seq (dropped; the predecessor resends)
    "ack_beyond_log",  # refused: ACK for a seq this member does not hold
    "sync_unsynced",  # SYNC postponed: this member is not synced itself yet
    "sync_ahead",  # SYNC from a successor whose log is longer than mine (answered with a snapshot)
    "sync_mismatch",  # SYNC whose (seq, epoch) is not in my log (answered with a snapshot)
    "sync_unmatched",  # unsynced: a WRITE that does not continue my log (a snapshot still to come)
    "snapshots_sent",
    "resends",
    "proposals_refused",
    "reads_refused",
    "leases_refused",
    "configs_ignored",
)


class ChainCore:
    __slots__ = (
        "id",
        "group",
        "counters",
        "config",
        "epoch",
        "pred",
        "succ",
        "now",
        "_snapshot_fn",
        "_mutations",
        "_inflight_max",
        "_batch_max",
        "_uncommitted_max",
        "_retry_interval",
        "_log",
        "_base",
        "_base_epoch",
        "_gen",
        "_out_gen",
        "_last",
        "_persist_out",
        "_durable",
        "_apply_out",
        "_applied",
        "_client_acked",
        "_pred_synced",
        "_complete",
        "_postponed_sync",
        "_postponed_epoch",
        "_read_floor",
        "_sync_sent_at",
        "_acked_up",
        "_ack_due",
        "_succ_synced",
        "_succ_acked",
        "_succ_have",
        "_next_send",
        "_progress_at",
        "_lease_until",
        "_msgs_now",
        "_msgs_after",
        "_snap_pending",
        "_applies",
        "_client_acks",
        "_reads",
        "_outstanding",
        "_out_durable",
        "_out_applied",
    )

    def __init__(
        self,
        node_id: NodeId,
        group_id: GroupId,
        snapshot_fn: Callable[[], ChainSnapshot],
        *,
        inflight_max: int = 256,
        batch_max: int = 64,
        uncommitted_max: int = 4096,
        retry_interval: int = 10,
        mutations: frozenset[str] = frozenset(),
    ) -> None:
        assert node_id != NO_NODE, "node ids start at 1"
        assert inflight_max >= 1 and batch_max >= 1 and uncommitted_max >= 1 and retry_interval >= 1
        assert mutations <= MUTATIONS, mutations - MUTATIONS
        self.id = node_id
        self.group = group_id
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.config: ChainConfig | None = None
        self.epoch = 0
        self.pred = NO_NODE
        self.succ = NO_NODE
        self.now = 0
        self._snapshot_fn = snapshot_fn
        self._mutations = mutations
        self._inflight_max = inflight_max
        self._batch_max = batch_max
        self._uncommitted_max = uncommitted_max
        self._retry_interval = retry_interval
        # The log holds records _base+1 .. _last (consecutive); records <= _base are in the state machine.
        # A member starts empty: a (re)joining member is always treated as empty (docs/chain.md).
        self._log: list[Record] = []
        self._base = 0
        self._base_epoch = 0  # the epoch of the record at _base (log matching)
        self._gen = 0  # bumped when a snapshot replaces the log: an older outstanding Ready is void
        self._out_gen = 0
        self._last = 0
        self._persist_out = 0  # records <= this have been handed to a Ready for persisting
        self._durable = 0  # records <= this are durable (advanced)
        self._apply_out = 0  # handed to a Ready for applying
        self._applied = 0  # applied (advanced)
        self._client_acked = 0  # head: client acks reported up to here
        # Upstream side (toward the head).
        self._pred_synced = True
        self._complete = False  # known to hold every write that may have been acknowledged (caught_up)
        self._postponed_sync = -1  # a successor's SYNC seq that arrived before I was synced
        self._postponed_epoch = 0
        self._read_floor = 0  # tail: predecessor's last seq when it answered my SYNC
        self._sync_sent_at = 0
        self._acked_up = 0  # highest ACK sent to the predecessor in this epoch
        self._ack_due = False  # a WRITE arrived: answer with an ACK even if unchanged (lost ACKs)
        # Downstream side (toward the tail).
        self._succ_synced = False
        self._succ_acked = 0  # successor's ACK in this epoch
        self._succ_have = 0  # successor durably holds <= this (max of its SYNC and its ACK)
        self._next_send = 1
        self._progress_at = 0
        self._lease_until = -1
        # Pending output.
        self._msgs_now: list[ChainMessage] = []
        self._msgs_after: list[ChainMessage] = []
        self._snap_pending: ChainSnapshot | None = None
        self._applies: list[Record] = []
        self._client_acks: list[int] = []
        self._reads: list[tuple[int, int]] = []
        self._outstanding: ChainReady | None = None
        self._out_durable = 0
        self._out_applied = 0

    # == inspection ============================================================================================
    @property
    def is_member(self) -> bool:
        return self.config is not None and self.id in self.config.members

    @property
    def is_head(self) -> bool:
        return self.is_member and self.pred == NO_NODE

    @property
    def is_tail(self) -> bool:
        return self.is_member and self.succ == NO_NODE

    @property
    def synced(self) -> bool:
        """In the current epoch, my predecessor answered my SYNC (the head is synced at once)."""
        return self.is_member and self._pred_synced

    @property
    def last_seq(self) -> int:
        return self._last

    @property
    def durable_seq(self) -> int:
        return self._durable

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def ack_point(self) -> int:
        return self._ack_point()

    def lease_valid(self) -> bool:
        return self.now < self._lease_until

    @property
    def caught_up(self) -> bool:
        """Synced in this epoch and applied what the predecessor held when it answered the SYNC; or known
        to hold every write that may have been acknowledged, even before it syncs in this epoch: the head,
        or a member that caught up right behind the head in the epoch before and is a member of this one
        (every ack since needed its ACK). The metadata group makes only a member that reports this head,
        so a head that fails right after a change (a join, a bump) can still be replaced by its successor
        (docs/chain.md, "What the metadata group must guarantee")."""
        return self.is_member and (self._complete or self._synced_up())

    def _synced_up(self) -> bool:
        return self._pred_synced and self._applied >= self._read_floor

    def read_now(self) -> bool:
        """Tail only: a read may be served from the state machine right now, without a Ready (the same
        conditions as read(), and nothing waits to be applied or installed)."""
        return (
            self.is_tail
            and self._pred_synced
            and self._applied >= self._read_floor
            and self._applied == self._apply_out
            and self._snap_pending is None
            and (self._outstanding is None or self._outstanding.snapshot is None)
            and self.now < self._lease_until
        )

    def epoch_at(self, seq: int) -> int:
        """The epoch of the record at `seq` (0 for seq 0); -1 if this member no longer or not yet knows."""
        if seq == self._base:
            return self._base_epoch
        if self._base < seq <= self._last:
            return self._log[seq - self._base - 1].epoch
        return -1

    # == restart ===============================================================================================
    def restore(self, base: int, base_epoch: int, records: list[Record], epoch: int) -> None:
        """Start from what a previous incarnation left durable: the state machine at `base` (the runtime
        re-applies nothing below it), `records` after it, and the last epoch this member adopted. The
        member then waits for a configuration with a newer epoch (its place in `epoch` is lost: it may
        have sent records it never persisted) and SYNCs with its log's end; a predecessor whose log does
        not match there replaces the member's log by a snapshot (docs/chain.md, "restart")."""
        assert self.config is None and self._last == 0, "restore() a fresh core only"
        assert all(r.seq == base + 1 + i for i, r in enumerate(records)), "records must follow base"
        self._log = list(records)
        self._base = self._applied = self._apply_out = base
        self._base_epoch = base_epoch
        self._last = self._persist_out = self._durable = base + len(records)
        self._client_acked = base
        self.epoch = epoch

    # == inputs from the metadata group ========================================================================
    def set_config(self, cfg: ChainConfig) -> None:
        """Adopt a configuration; an older or equal epoch is ignored (configs only move forward)."""
        if cfg.epoch <= self.epoch:
            self.counters["configs_ignored"] += 1
            return
        # Known to hold every acknowledged write: the head (only such a member is made head), or a member
        # that was so in the epoch before, or caught up right behind its head then (every ack since needed
        # my ACK). An epoch skipped (removed meanwhile, maybe) or a removal loses it.
        old = self.config
        keep = (
            old is not None
            and self.id in old.members
            and cfg.epoch == self.epoch + 1
            and (self._complete or (self._synced_up() and self.pred == old.head))
        )
        self.config = cfg
        self.epoch = cfg.epoch
        self.pred, self.succ = cfg.neighbours(self.id)
        member = self.id in cfg.members
        self._complete = member and (keep or self.pred == NO_NODE)
        self._pred_synced = self.pred == NO_NODE
        self._postponed_sync = -1
        self._read_floor = 0
        self._acked_up = 0
        self._ack_due = False
        self._succ_synced = False
        self._succ_acked = 0
        self._succ_have = 0
        self._next_send = self._last + 1
        self._progress_at = self.now
        self._lease_until = -1
        if not member:
            return
        if self.pred != NO_NODE:
            self._send_sync()
        else:
            # Records already acked to an earlier head were answered there.
            self._client_acked = max(self._client_acked, self._apply_out)
        # A new tail acks everything it holds durably: it is now committed.
        self._progress()

    def grant_lease(self, epoch: int, until: int) -> None:
        """The metadata group promises not to install a configuration without me before `until`."""
        if self.config is None or epoch != self.epoch:
            self.counters["leases_refused"] += 1
            return
        self._lease_until = max(self._lease_until, until)

    # == inputs from the runtime ===============================================================================
    def tick(self, now: int) -> None:
        assert now >= self.now, "time goes forward"
        self.now = now
        if not self.is_member:
            return
        if not self._pred_synced and now - self._sync_sent_at >= self._retry_interval:
            self._send_sync()
        if (
            self._succ_synced
            and self._succ_acked < self._last
            and now - self._progress_at >= self._retry_interval
        ):
            # No ACK progress: go back to what the successor surely holds and resend (lost WRITEs/ACKs).
            self.counters["resends"] += 1
            self._progress_at = now
            self._send_from(self._succ_have, reply=True)

    def propose(self, data: bytes) -> int:
        """Head only: append a write; returns its seq, or 0 when refused."""
        if not self.is_head or self._last - self._ack_point() >= self._uncommitted_max:
            self.counters["proposals_refused"] += 1
            return 0
        seq = self._last + 1
        self._log.append(Record(seq, data, self.epoch))
        self._last = seq
        self._flush(reply=False)
        return seq

    def read(self, ctx: int) -> bool:
        """Tail only: serve a read at the applied seq; (ctx, seq) comes out in the next Ready."""
        if (
            not self.is_tail
            or not self._pred_synced
            or self._apply_out < self._read_floor
            or (self.now >= self._lease_until and "tail_reads_without_lease" not in self._mutations)
        ):
            self.counters["reads_refused"] += 1
            return False
        self._reads.append((ctx, self._apply_out))
        return True

    def step(self, m: ChainMessage) -> None:
        c = self.counters
        if m.group != self.group:
            c["wrong_group"] += 1
            return
        if self.config is None:
            c["no_config"] += 1
            return
        trust = False
        if m.epoch != self.epoch:
            if "accept_stale_epoch" not in self._mutations or m.epoch > self.epoch:
                c["stale_epoch" if m.epoch < self.epoch else "future_epoch"] += 1
                return
            trust = True  # the planted bug: an old epoch's message taken as if from my neighbour now
        if not self.is_member:
            c["not_member"] += 1
            return
        t = m.type
        if t == _MT.WRITE or t == _MT.SNAPSHOT:
            if m.src != self.pred and not (trust and self.pred != NO_NODE):
                c["not_neighbour"] += 1
                return
            if t == _MT.WRITE:
                self._on_write(m)
            else:
                self._on_snapshot(m)
        elif t == _MT.ACK or t == _MT.SYNC:
            if m.src != self.succ and not (trust and self.succ != NO_NODE):
                c["not_neighbour"] += 1
                return
            if t == _MT.ACK:
                self._on_ack(m)
            else:
                self._on_sync(m)

    # == Ready =================================================================================================
    def has_ready(self) -> bool:
        return self._outstanding is None and bool(
            self._msgs_now
            or self._msgs_after
            or self._snap_pending is not None
            or self._persist_out < self._last
            or self._applies
            or self._client_acks
            or self._reads
        )

    def ready(self) -> ChainReady:
        assert self._outstanding is None, "advance() the previous Ready first"
        rd = ChainReady()
        rd.messages_now, self._msgs_now = self._msgs_now, []
        rd.messages, self._msgs_after = self._msgs_after, []
        rd.snapshot, self._snap_pending = self._snap_pending, None
        if self._persist_out < self._last:
            rd.records = self._log[self._persist_out - self._base :]
            self._persist_out = self._last
        self._out_gen = self._gen
        rd.applies, self._applies = self._applies, []
        rd.client_acks, self._client_acks = self._client_acks, []
        rd.reads, self._reads = self._reads, []
        self._outstanding = rd
        self._out_durable = self._persist_out
        self._out_applied = self._apply_out
        return rd

    def requeue_applies(self, seq: int) -> None:
        """The runtime could not apply the outstanding Ready's records from `seq` on (its disk is full):
        they count as not applied, stay in the log, and are emitted again by a later Ready."""
        assert self._outstanding is not None, "only while a Ready is outstanding"
        self._out_applied = min(self._out_applied, seq - 1)
        self._apply_out = min(self._apply_out, seq - 1)

    def advance(self, rd: ChainReady) -> None:
        assert rd is self._outstanding, "advance() the Ready last returned by ready()"
        self._outstanding = None
        if self._out_gen == self._gen:
            self._durable = max(self._durable, min(self._out_durable, self._last))
            self._applied = max(self._applied, self._out_applied)
        # else: a snapshot replaced the log after ready(); what this Ready persisted or applied is void
        # (_on_snapshot set _durable and _applied), the snapshot's own Ready makes them durable.
        drop = min(self._applied, self._durable) - self._base
        if drop > 0:
            self._base_epoch = self._log[drop - 1].epoch
            del self._log[:drop]
            self._base += drop
        if self.pred == NO_NODE:
            self._flush(reply=False)  # the head: what just became durable may go downstream
        self._progress()

    # == internals =============================================================================================
    def _ack_point(self) -> int:
        held = self._last if "ack_before_persist" in self._mutations else self._durable
        if not self.is_member:
            return 0
        ap = held if self.succ == NO_NODE else min(held, self._succ_acked)
        if not self._pred_synced:
            # Not synced in this epoch: my log may end in records that are not the chain's (a restarted
            # or re-added member); nothing more is applied until my predecessor has matched it, and no
            # ACK leaves (_progress).
            return min(ap, self._apply_out)
        return ap

    def _progress(self) -> None:
        """Emit what the ack point allows: an ACK upstream (or client acks at the head), and applies."""
        if not self.is_member:
            return
        ap = self._ack_point()
        if self.pred != NO_NODE:
            if ap > 0 and self._pred_synced and (ap > self._acked_up or self._ack_due):
                early = "ack_before_persist" in self._mutations  # the planted bug: ACK with the forwards
                (self._msgs_now if early else self._msgs_after).append(
                    ChainMessage(_MT.ACK, self.group, self.id, self.pred, self.epoch, seq=ap)
                )
                self._acked_up = max(self._acked_up, ap)
            self._ack_due = False
        elif ap > self._client_acked:
            self._client_acks.extend(range(self._client_acked + 1, ap + 1))
            self._client_acked = ap
        if ap > self._apply_out:
            lo = self._apply_out - self._base
            assert lo >= 0, (self._apply_out, self._base)
            self._applies.extend(self._log[lo : ap - self._base])
            self._apply_out = ap

    def _send_sync(self) -> None:
        # The end of my log, durable or not: records past it from an old predecessor are in flight to
        # my disk, and must match too (a member that crashes meanwhile restarts in a newer epoch).
        self._sync_sent_at = self.now
        self._msgs_now.append(
            ChainMessage(_MT.SYNC, self.group, self.id, self.pred, self.epoch, seq=self._last,
                         log_epoch=self.epoch_at(self._last))
        )

    def _on_write(self, m: ChainMessage) -> None:
        postponed = -1
        postponed_epoch = 0
        if not self._pred_synced:
            # The answer to my SYNC only if it continues my log: it starts right after my last record and
            # the sender holds that record with the same epoch. Else it follows a SNAPSHOT I have not
            # installed yet (lost or overtaken), or answers an older SYNC: drop it (SYNC is retried).
            prev = m.records[0].seq - 1 if m.records else m.seq
            if prev != self._last or self.epoch_at(prev) != m.log_epoch:
                self.counters["sync_unmatched"] += 1
                return
            self._pred_synced = True
            self._read_floor = max(self._read_floor, m.seq)
            postponed, self._postponed_sync = self._postponed_sync, -1
            postponed_epoch = self._postponed_epoch
        for r in m.records:
            if r.seq <= self._last:
                self.counters["duplicate_records"] += 1
            elif r.seq == self._last + 1:
                self._log.append(r)
                self._last = r.seq
            else:
                self.counters["gap"] += 1
                break
        self._ack_due = True
        if postponed >= 0:
            self._answer_sync(postponed, postponed_epoch)
        else:
            self._flush(reply=False)
        self._progress()

    def _on_snapshot(self, m: ChainMessage) -> None:
        if self._pred_synced and m.seq <= self._last:
            return  # synced (my log matches), and I hold everything it covers: a resent snapshot
        # The answer to my SYNC (my log did not match, or is too old), or a resend ahead of my log: the
        # image replaces my log and my state machine; records after it follow.
        self._gen += 1
        self._complete = False  # the image may be below acknowledged writes until the records after it come
        self._log = []
        self._base = self._last = self._persist_out = m.seq
        self._base_epoch = m.log_epoch
        self._durable = min(self._durable, m.seq)
        self._applied = min(self._applied, m.seq)
        self._snap_pending = ChainSnapshot(m.seq, m.data, m.log_epoch)
        # Reads wait until I have applied again what I had applied: a write acknowledged before now may
        # be above my predecessor's last seq (its own log was just replaced by a snapshot too).
        self._read_floor = max(self._read_floor, self._apply_out)
        self._apply_out = m.seq  # installing the image applies it (and undoes anything applied after it)
        self._applies = []
        self._next_send = m.seq + 1

    def _on_ack(self, m: ChainMessage) -> None:
        if m.seq > self._last:
            self.counters["ack_beyond_log"] += 1
            return
        if m.seq > self._succ_acked:
            self._succ_acked = m.seq
            self._progress_at = self.now
        # Even an ACK that acknowledges nothing new: a late SYNC answered with a snapshot reset _succ_have.
        self._succ_have = max(self._succ_have, m.seq)
        self._flush(reply=False)
        self._progress()

    def _on_sync(self, m: ChainMessage) -> None:
        if not self._pred_synced:
            self.counters["sync_unsynced"] += 1  # answered once I am synced (and the successor retries)
            self._postponed_sync = m.seq
            self._postponed_epoch = m.log_epoch
            return
        self._answer_sync(m.seq, m.log_epoch)

    def _answer_sync(self, seq: int, log_epoch: int) -> None:
        self._succ_synced = True
        self._progress_at = self.now
        if seq > self._last or (seq > 0 and (seq < self._base or self.epoch_at(seq) != log_epoch)):
            # The successor's log does not end in mine: it holds records beyond mine (never acked:
            # I hold every acked write) or a record of another history at `seq`, or I cannot check.
            # A snapshot replaces its log; my records after the snapshot follow.
            self.counters["sync_ahead" if seq > self._last else "sync_mismatch"] += 1
            self._succ_have = 0
            self._send_from(-1, reply=True)
            return
        self._succ_have = max(self._succ_have, seq)
        if "skip_sync_resend" in self._mutations:
            # The planted bug: take the successor as holding all I hold; only new records go downstream.
            self._succ_have = self._next_send = self._last
            self._next_send += 1
            self._flush(reply=True)
            return
        self._send_from(seq, reply=True)

    def _send_from(self, have: int, reply: bool) -> None:
        """Resend everything after `have` (with a snapshot first if my log no longer holds it; -1: a
        snapshot in any case)."""
        if have < self._base or have < 0:
            snap = self._snapshot_fn()
            assert self._base <= snap.seq <= self._last, (snap.seq, self._base, self._last)
            self.counters["snapshots_sent"] += 1
            self._msgs_now.append(
                ChainMessage(
                    _MT.SNAPSHOT, self.group, self.id, self.succ, self.epoch, seq=snap.seq, data=snap.image,
                    log_epoch=self.epoch_at(snap.seq),
                )
            )
            have = snap.seq
        self._next_send = have + 1
        self._flush(reply=reply, have=have)

    def _flush(self, reply: bool, have: int = 0) -> None:
        """Forward records from _next_send within the in-flight window (counted from what the successor
        holds, or from `have`, where a resend starts: after a snapshot); `reply`: send even if empty."""
        if self.succ == NO_NODE or not self._succ_synced or not self.is_member:
            return
        if self._next_send <= self._base:
            # What comes next has left my log since (a Ready outstanding when I answered the SYNC applied
            # it, and advance() dropped it): a snapshot first.
            self._send_from(self._succ_have, reply)
            return
        # The head forwards only what is durable on it: a record it could lose in a crash must not reach
        # (and be applied at) the tail, since nobody upstream could give it back after its restart.
        last = self._durable if self.pred == NO_NODE else self._last
        hi = min(last, max(self._succ_have, have) + self._inflight_max)
        batch: list[Record] = []
        while self._next_send <= hi:
            batch.append(self._log[self._next_send - self._base - 1])
            self._next_send += 1
            if len(batch) == self._batch_max:
                self._write(tuple(batch))
                batch = []
                reply = False
        if batch or reply:
            self._write(tuple(batch))

    def _write(self, records: tuple[Record, ...]) -> None:
        # log_epoch: the epoch of my record just before `records` (at my last seq if none), so that an
        # unsynced successor can tell whether this WRITE continues its log.
        prev = records[0].seq - 1 if records else self._last
        self._msgs_now.append(
            ChainMessage(
                _MT.WRITE, self.group, self.id, self.succ, self.epoch, seq=self._last, records=records,
                log_epoch=self.epoch_at(prev),
            )
        )
