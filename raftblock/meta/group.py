# The metadata group: MetaState replicated by pysyncobj (the only package importing it), and the asyncio
# face of it (MetaNode) that the rest of raftblock uses.
#
# Rules (each is a seam of pysyncobj 0.3.17 we harden; tests/unit/test_meta_group.py proves each):
# 1. Durable log and term/vote: the journal is ours (journal.DurableJournal, chosen through
#    pysyncobj.syncobj.createJournal by the JournalPath type), fsync'ed before pysyncobj goes on.
# 2. The snapshot (fullDumpFile) is written by our serializer as checksummed JSON, fsync'ed, and renamed in
#    with durable_replace (installed as pysyncobj.serializer.atomicReplace, which also covers snapshots
#    received from the leader); loading one never changes membership: the configured peers win
#    (dynamicMembershipChange is off, and the dump's member list is ignored).
# 3. The Raft port binds the node's own configured host, never 0.0.0.0 (pysyncobj's default).
# 4. Peers are authenticated before anything is unpickled: a cluster secret is required and becomes
#    pysyncobj's `password` (Fernet: HMAC-SHA256 checked before decrypt and unpickle). Before that, only the
#    4-byte length of a message is read, and it is bounded: a length over META_MESSAGE_MAX (or negative), or
#    more bytes than one such message buffered, disconnects the peer at once (pysyncobj would buffer up to 2 GiB
#    of an unauthenticated peer's bytes waiting for its message to complete).
# 5. Low write rate: heartbeats stay in the leader's memory (control/health.py); only transitions are
#    proposed. The command queue is bounded (`commands_queue_max`).
# 6. State is mutated only on pysyncobj's tick thread, under `_lock`; readers copy under the lock.
# 7. pysyncobj's callbacks run on its thread; results reach asyncio through loop.call_soon_threadsafe.
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import pysyncobj
import pysyncobj.serializer
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import structlog
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from raftblock.control.health import FailureDetector, HealthConfig
from raftblock.meta.journal import DurableJournal, JournalCorrupt, JournalPath, durable_replace
from raftblock.meta.state import (
    Command,
    InitCluster,
    MetaState,
    Noop,
    Result,
    SetNodeStates,
    StateChange,
    encode_command,
)
from raftblock.replication.raft.types import NodeId
from raftblock.wire.auth import new_data_key, wrap_key

log = structlog.get_logger(__name__)

PYSYNCOBJ_PINNED = "0.3.17"  # the seams below read pysyncobj internals of exactly this version
SECRET_BYTES_MIN = 16
SNAPSHOT_FORMAT = 1

# -- seams, installed once at import --------------------------------------------------------------------

_stock_create_journal = pysyncobj.syncobj.createJournal


def _create_journal(journal_file: Any = None) -> Any:
    if isinstance(journal_file, JournalPath):
        return DurableJournal(journal_file)
    return _stock_create_journal(journal_file)


pysyncobj.syncobj.createJournal = _create_journal
pysyncobj.serializer.atomicReplace = durable_replace

META_MESSAGE_MAX = 64 << 20  # rule 4: the largest message a metadata peer sends (a map snapshot chunk is far less)
refused_oversize = 0  # peers disconnected by rule 4 (exported by the metadata node)
_stock_process_read = pysyncobj.tcp_connection.TcpConnection._TcpConnection__processRead  # type: ignore[attr-defined]


def _bounded_process_read(self: Any) -> bool:
    """Rule 4: pysyncobj's read, then the bound on what an unauthenticated peer can make it buffer."""
    global refused_oversize
    more = bool(_stock_process_read(self))
    buf = self._TcpConnection__readBuffer
    if len(buf) >= 4:
        declared = int.from_bytes(buf[:4], "little", signed=True)
        if declared < 0 or declared > META_MESSAGE_MAX or len(buf) > META_MESSAGE_MAX + 4 + (1 << 20):
            refused_oversize += 1
            log.warning("meta_peer_refused", reason="oversize", declared=declared, buffered=len(buf))
            self.disconnect()
            return False
    return more


pysyncobj.tcp_connection.TcpConnection._TcpConnection__processRead = _bounded_process_read  # type: ignore[attr-defined]


def check_pysyncobj_version() -> None:
    if PYSYNCOBJ_VERSION != PYSYNCOBJ_PINNED:
        raise RuntimeError(f"raftblock.meta hardens pysyncobj=={PYSYNCOBJ_PINNED} at its internals; "
                           f"found {PYSYNCOBJ_VERSION}: re-check every seam in raftblock/meta/group.py")


check_pysyncobj_version()


class MetaUnavailable(Exception):
    """The metadata group did not commit the command (no leader, leader changed, queue full, timeout).

    The outcome may be unknown (`outcome_unknown`): retry; commands are safe to retry (a retried create
    answers `exists`, a retried attach by the same gateway returns the same attach epoch)."""

    def __init__(self, reason: str, outcome_unknown: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome_unknown = outcome_unknown


class NotLeader(Exception):
    def __init__(self, leader: NodeId | None) -> None:
        super().__init__(f"not the metadata leader; leader is {leader}")
        self.leader = leader


_FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
_UNKNOWN_OUTCOME = {FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME, FAIL_REASON.NOT_LEADER,
                    FAIL_REASON.DISCARDED}


@dataclass(frozen=True)
class Timings:
    """pysyncobj's clocks, in our units. Defaults suit a LAN; tests shorten nothing but retry times."""

    election_timeout_ms_min: int = 1000
    election_timeout_ms_max: int = 2000
    append_entries_interval_ms: int = 100
    connection_timeout_ms: int = 3500
    connection_retry_ms: int = 500
    leader_fallback_ms: int = 3000  # a leader without a majority's replies steps down after this
    log_compaction_entries_min: int = 5000
    log_compaction_interval_s: int = 300


@dataclass(frozen=True)
class MetaConfig:
    """One metadata node. `members` maps every member's id (this one included) to its Raft host:port."""

    node_id: NodeId
    members: dict[NodeId, str]
    data_dir: Path
    secret: bytes
    cluster_id: str = ""
    timings: Timings = field(default_factory=Timings)
    commands_queue_max: int = 1024

    def __post_init__(self) -> None:
        if self.node_id not in self.members:
            raise ValueError(f"node {self.node_id} is not in members {sorted(self.members)}")
        if len(self.secret) < SECRET_BYTES_MIN:
            raise ValueError(f"the cluster secret must be at least {SECRET_BYTES_MIN} bytes: peers are "
                             "authenticated with it before pysyncobj unpickles anything")
        if len(set(self.members.values())) != len(self.members):
            raise ValueError("two members share a Raft address")

    @property
    def address(self) -> str:
        return self.members[self.node_id]

    @property
    def peers(self) -> list[str]:
        return [a for n, a in sorted(self.members.items()) if n != self.node_id]

    def id_of(self, address: str) -> NodeId | None:
        for n, a in self.members.items():
            if a == address:
                return n
        return None


def _entry_to_json(e: Any) -> list[Any]:
    cmd, idx, term = e
    cmd = cmd if isinstance(cmd, bytes) else str(cmd).encode()
    return [idx, term, base64.b64encode(cmd).decode()]


def _entry_from_json(j: list[Any]) -> tuple[bytes, int, int]:
    return (base64.b64decode(j[2]), int(j[0]), int(j[1]))


class MetaGroup(SyncObj):  # type: ignore[misc]
    """pysyncobj's SyncObj replicating one MetaState. Its methods run on pysyncobj's tick thread."""

    def __init__(self, config: MetaConfig, transport: Any = None) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._state = MetaState()
        self._applied_event: Callable[[], None] | None = None
        t = config.timings
        conf = SyncObjConf(
            password=config.secret,
            bindAddress=config.address,
            journalFile=JournalPath(config.data_dir / "raft.log"),
            fullDumpFile=str(config.data_dir / "snapshot.json"),
            serializer=self._dump,
            deserializer=self._load,
            dynamicMembershipChange=False,
            useFork=False,
            autoTick=transport is None,
            commandsQueueSize=config.commands_queue_max,
            raftMinTimeout=t.election_timeout_ms_min / 1000,
            raftMaxTimeout=t.election_timeout_ms_max / 1000,
            appendEntriesPeriod=t.append_entries_interval_ms / 1000,
            # A new command goes to the followers at once, not at the next heartbeat: a proposal commits in
            # about one round trip and a fsync instead of up to two heartbeat periods (~200 ms measured).
            appendEntriesUseBatch=False,
            connectionTimeout=t.connection_timeout_ms / 1000,
            connectionRetryTime=t.connection_retry_ms / 1000,
            leaderFallbackTimeout=t.leader_fallback_ms / 1000,
            logCompactionMinEntries=t.log_compaction_entries_min,
            logCompactionMinTime=t.log_compaction_interval_s,
        )
        kwargs: dict[str, Any] = {"conf": conf}
        if transport is not None:
            kwargs["transport"] = transport
        super().__init__(config.address, config.peers, **kwargs)

    # -- the replicated command -------------------------------------------------------------------------

    @replicated
    def _apply(self, command_json: str) -> dict[str, Any]:
        with self._lock:
            result = self._state.apply_encoded(command_json)
        return result.to_json()

    # -- snapshot seam (pysyncobj conf.serializer / conf.deserializer) ----------------------------------

    def _dump(self, file_name: str, data: Any) -> None:
        """Called on the tick thread right after the entries up to `last` were applied."""
        last, prev, _cluster = data
        with self._lock:
            state = self._state.to_dict()
        body = {"format": SNAPSHOT_FORMAT, "state": state, "last": _entry_to_json(last),
                "prev": _entry_to_json(prev)}
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        doc = json.dumps({"crc32c": crc32c.crc32c(raw), "body": body}, sort_keys=True).encode()
        with open(file_name, "wb") as f:
            f.write(doc)
            f.flush()
        # pysyncobj renames it into place with atomicReplace = durable_replace (fsync file, rename, fsync dir)

    def _load(self, file_name: str) -> tuple[Any, Any, Any]:
        """Returns (last, prev, cluster) as pysyncobj expects; the cluster is always the configured one."""
        doc = json.loads(Path(file_name).read_bytes())
        body = doc["body"]
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if crc32c.crc32c(raw) != doc["crc32c"] or body.get("format") != SNAPSHOT_FORMAT:
            raise JournalCorrupt(f"{file_name}: snapshot checksum or format mismatch")
        state = MetaState.from_dict(body["state"])
        with self._lock:
            self._state = state
        log.info("meta_snapshot_loaded", path=file_name, last_index=body["last"][0])
        cluster = [self.config.address, *self.config.peers]
        return _entry_from_json(body["last"]), _entry_from_json(body["prev"]), cluster

    # -- reads (any thread) ------------------------------------------------------------------------------

    def state_json(self) -> str:
        with self._lock:
            return self._state.to_json()

    def node_states(self) -> dict[NodeId, str]:
        with self._lock:
            return {n: r.state for n, r in self._state.nodes.items()}

    def chain_view(self, node_id: NodeId) -> tuple[str, dict[int, int]]:
        """(the node's committed state, {chain group it is a member of: epoch}) as applied here."""
        with self._lock:
            n = self._state.nodes.get(node_id)
            epochs = {int(gid): g.epoch for gid, g in self._state.groups.items()
                      if g.mode == "chain" and node_id in g.members}
            return (n.state if n is not None else ""), epochs

    def cluster_id(self) -> str:
        with self._lock:
            return self._state.cluster_id

    def leader_id(self) -> NodeId | None:
        leader = self._getLeader()
        return None if leader is None else self.config.id_of(leader.address)

    def is_leader(self) -> bool:
        return bool(self._isLeader())

    def status(self) -> dict[str, Any]:
        s = self.getStatus()
        return {"node_id": self.config.node_id, "leader": self.leader_id(), "is_leader": self.is_leader(),
                "term": s["raft_term"], "commit_index": s["commit_idx"], "last_applied": s["last_applied"],
                "log_entries": s["log_len"], "has_quorum": s["has_quorum"], "ready": self.isReady()}


class MetaNode:
    """The asyncio face of one metadata node: propose commands, read the map, take node heartbeats.

    Create and use it on one event loop. On the leader it runs the failure detector: heartbeats are kept
    in memory, transitions are proposed."""

    def __init__(self, config: MetaConfig, health: HealthConfig | None = None,
                 clock_ms: Callable[[], int] | None = None, wall_ms: Callable[[], int] | None = None,
                 transport: Any = None) -> None:
        self.config = config
        self.health_config = health or HealthConfig()
        # the detector measures silences on a monotonic clock; records carry wall-clock ms
        self._clock_ms = clock_ms or (lambda: int(time.monotonic() * 1000))
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport = transport
        self.group: MetaGroup | None = None
        self.detector: FailureDetector | None = None
        # Chain members' reports (ChainHost.report), from their heartbeats: leader memory only, like the
        # heartbeat times (control/chainrepair.py reads them).
        self.chain_reports: dict[NodeId, dict[int, list[int]]] = {}
        self.chain_changes = 0
        # Per node: the Raft groups it leads, [configuration epoch, voters...] (control/raftrepair.py).
        self.raft_reports: dict[NodeId, dict[int, list[int]]] = {}
        self.raft_changes = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.proposals = 0  # commands proposed through this node (metric; low write rate is tested on it)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.group = await asyncio.to_thread(MetaGroup, self.config, self._transport)
        self._task = asyncio.create_task(self._leader_duties(), name="meta-leader-duties")
        log.info("meta_node_started", node_id=self.config.node_id, address=self.config.address)

    async def close(self) -> None:
        # The flag, not only the cancel: on Python 3.11 asyncio.wait_for swallows a cancellation that
        # arrives in the same loop turn as its future's result (CPython gh-86296, fixed in 3.12), and
        # the leader-duties loop would then run on and this await would never end.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.group is not None:
            g = self.group
            self.group = None
            if self._transport is None:
                await asyncio.to_thread(g.destroy_synchronous)
            else:
                g.destroy()

    def _g(self) -> MetaGroup:
        if self.group is None:
            raise RuntimeError("MetaNode is not started")
        return self.group

    # -- writes ----------------------------------------------------------------------------------------

    async def propose(self, cmd: Command, timeout_s: float = 10.0) -> Result:
        """Commit `cmd` in the metadata group (forwarded to the leader by pysyncobj) and return its result.

        Raises MetaUnavailable when the group did not commit it in time or could not say."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Result] = loop.create_future()

        def on_done(res: Any, err: int) -> None:  # pysyncobj's thread
            def settle() -> None:
                if fut.done():
                    return
                if err == FAIL_REASON.SUCCESS:
                    fut.set_result(Result.from_json(res))
                else:
                    fut.set_exception(MetaUnavailable(_FAIL_NAMES.get(err, str(err)), err in _UNKNOWN_OUTCOME))
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        self.proposals += 1
        self._g()._apply(encode_command(cmd), callback=on_done)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise MetaUnavailable("timeout", True) from None

    # -- reads -----------------------------------------------------------------------------------------

    def state(self) -> MetaState:
        """This node's applied map (a copy). On a follower or a deposed leader it may be behind; use
        `read()` for a linearizable one."""
        return MetaState.from_json(self._g().state_json())

    async def read(self, timeout_s: float = 10.0) -> MetaState:
        """A linearizable read: commits a no-op through the leader, then reads the local applied map."""
        await self.propose(Noop(), timeout_s)
        return self.state()

    def is_leader(self) -> bool:
        return self._g().is_leader()

    def leader_id(self) -> NodeId | None:
        return self._g().leader_id()

    def status(self) -> dict[str, Any]:
        return self._g().status()

    # -- liveness --------------------------------------------------------------------------------------

    def heartbeat(self, node_id: NodeId, used_bytes: int | None = None,
                  chains: dict[int, list[int]] | None = None,
                  raft: dict[int, list[int]] | None = None) -> tuple[int, dict[int, int]]:
        """A storage node's heartbeat: memory only. Raises NotLeader with the leader to send it to.

        Returns the chain lease: (ms from when the node sent the heartbeat, {chain group: epoch}). The node
        may let its tails serve reads for that long in those epochs only: this leader removes a member
        from a chain only after a longer silence (it is `suspect` first), and a removal already decided
        is in the epochs given (the node's state becomes `up` again only by a proposal after that
        removal's, so while it is not `up` there is no lease at all)."""
        det = self.detector
        if det is None or not self.is_leader():
            raise NotLeader(self.leader_id())
        det.heartbeat(node_id, self._clock_ms(), used_bytes)
        if chains is not None:
            self.chain_reports[node_id] = chains
        if raft is not None:
            self.raft_reports[node_id] = raft
        state, epochs = self._g().chain_view(node_id)
        if state != "up":
            return 0, {}
        return self.chain_lease_ms(), epochs

    def chain_lease_ms(self) -> int:
        return self.health_config.suspect_after_ms * 2 // 3

    async def _leader_duties(self) -> None:
        """While leader: initialise the cluster id, run the failure detector, propose its transitions."""
        interval_s = max(self.health_config.heartbeat_interval_ms / 4000, 0.05)
        while not self._closing:
            await asyncio.sleep(interval_s)
            g = self.group
            if g is None or self._closing:
                return
            if not g.is_leader():
                self.detector = None
                self.chain_reports = {}
                self.raft_reports = {}
                continue
            now = self._clock_ms()
            if self.detector is None:
                self.detector = FailureDetector(self.health_config, now)
                log.info("meta_became_leader", node_id=self.config.node_id, term=g.raftCurrentTerm)
            try:
                if self.config.cluster_id and not g.cluster_id():
                    # the first data key: the data port is authenticated from the start (raftblock/wire/auth.py)
                    key = wrap_key(self.config.secret, 1, new_data_key())
                    res = await self.propose(InitCluster(self.config.cluster_id, data_key=key))
                    if not res.ok:
                        log.error("meta_cluster_id_conflict", message=res.message)
                det = self.detector
                changes = det.tick(now, g.node_states())
                if changes:
                    wall = self._wall_ms()
                    try:
                        res = await self.propose(SetNodeStates(tuple(
                            StateChange(int(c.node_id), c.state,
                                        wall - (now - c.last_heartbeat_ms) if c.last_heartbeat_ms else 0)
                            for c in changes), wall))
                        # A node lost (suspect, down) is a warning an operator should see; one back is news.
                        lost = any(c.state != "up" for c in changes)
                        (log.warning if lost else log.info)(
                            "meta_node_states", changes=[(int(c.node_id), c.state) for c in changes], ok=res.ok)
                    finally:
                        det.done()
                await self._repair_chains(g)
                await self._repair_raft(g)
            except MetaUnavailable as e:
                log.warning("meta_leader_duty_failed", reason=e.reason)


    async def _repair_chains(self, g: MetaGroup) -> None:
        """Chain configuration changes (control/chainrepair.py), proposed one per group."""
        text = g.state_json()
        if '"chain"' not in text:
            return
        from raftblock.control.chainrepair import plan_chain_changes

        for cmd, reason in plan_chain_changes(MetaState.from_json(text), self.chain_reports):
            res = await self.propose(cmd)
            self.chain_changes += 1
            log.info("meta_chain_change", group=cmd.group_id, members=list(cmd.members),
                     expected_epoch=cmd.expected_epoch, reason=reason, ok=res.ok, error=res.error)


    async def _repair_raft(self, g: MetaGroup) -> None:
        """Raft membership changes (control/raftrepair.py), proposed one per group; the group's leader
        carries each out as a single-server configuration change."""
        if not self.raft_reports:
            return
        from raftblock.control.raftrepair import plan_raft_changes

        for cmd, reason in plan_raft_changes(MetaState.from_json(g.state_json()), self.raft_reports):
            res = await self.propose(cmd)
            self.raft_changes += 1
            log.info("meta_raft_change", group=cmd.group_id, members=list(cmd.members),
                     expected_epoch=cmd.expected_epoch, reason=reason, ok=res.ok, error=res.error)


def pysyncobj_version() -> str:
    return str(getattr(pysyncobj, "__version__", PYSYNCOBJ_VERSION))
