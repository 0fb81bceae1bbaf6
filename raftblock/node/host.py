"""NodeHost: one storage node's replicas (Raft and chain, replication/replica.py) on one asyncio loop, over
one WAL, one engine and one transport. It is the NodeContext the replicas see.

Owns: the replica table, the dirty sets, the turn loop, hosting and dropping replicas, peer frames. Its
parts, one module each: group commit (group_commit.py), ticks (ticker.py), compaction and the engine's
trickle sync (compactor.py), the client data plane (dataplane.py), repair from peers and the repair
budget (repair.py), the links (transport.py).

Rules:
1. A turn (`_process`, scheduled by `kick`, at most one pending): the writes queued this turn become
   proposals, then every dirty replica without an outstanding Ready and not blocked hands its Ready over
   (messages_now leave, the rest goes to the WAL buffer), repeated while replicas turn dirty; then the
   coalesced heartbeats, image-stream chunks and all queued frames leave, and the WAL buffer is written.
   Only then the group commit runs (inline fdatasync, or on its thread), so every peer already has this
   turn's messages while this node syncs.
2. One dirty set for both kinds; the host never branches on a replica's kind on the data path, except to
   hand a peer frame to the kind it is for.
3. A failed node (an fdatasync or apply error: `fail`) stops turning; every waiting request is answered
   UNAVAILABLE, and the process must be restarted (fsync errors cannot be retried honestly).
4. A replica is dropped (`discard`, `delete_group`) only with no Ready outstanding and no WAL sync
   running: the WAL records it empty (or forgets it) and syncs, then the engine drops its extents.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import structlog

from raftblock.node.compactor import Compactor
from raftblock.node.config import HostConfig
from raftblock.node.dataplane import DataPlane
from raftblock.node.group_commit import APPLY_RETRY_S, GroupCommit
from raftblock.node.inproc import InProcLinks
from raftblock.node.repair import PeerRepair
from raftblock.node.ticker import Ticker
from raftblock.node.transport import Transport
from raftblock.obs.memory import trim_heap
from raftblock.replication.chain.replica import ChainLease, ChainReplica
from raftblock.replication.image import ChunkedImage, SpillImage, group_extents, install_image
from raftblock.replication.raft.outbox import RaftOutbox
from raftblock.replication.raft.replica import RaftReplica
from raftblock.replication.raft.storage import bootstrap_snapshot
from raftblock.replication.raft.types import NO_NODE, Message, Role
from raftblock.replication.replica import Replica, ScrubView
from raftblock.replication.requests import NotLeaderError, RetryError
from raftblock.replication.wal import GroupDurable, Wal
from raftblock.storage.engine import Engine
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.framing import Frame, FrameType
from raftblock.wire.raftcodec import decode_heartbeats, decode_raft

log = structlog.get_logger(__name__)

STREAM_PUMP_S = 0.002  # image streams with more to send are pumped again this much later


class NodeHost:
    def __init__(self, cfg: HostConfig, engine: Engine, wal: Wal, recovered: dict[int, GroupDurable],
                 groups: dict[int, list[int]], peers: dict[int, tuple[str, int]], seed: int | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.engine = engine
        self.wal = wal
        # Write-once: the engine reads linked blocks from the WAL, the WAL keeps what the engine links into
        # (always wired: links made under an earlier setting still hold segments).
        engine.attach_wal(wal)
        wal.link_holder = engine.wal_refs
        wal.write_once_min_bytes = cfg.write_once_min_bytes
        self.peers = peers
        self.counters: Counter[str] = Counter()
        self.client_ops: Counter[int] = Counter()  # client requests by wire op (metrics)
        self.on_failed: Callable[[], None] | None = None  # the process's exit (node/raftnode.py), once failed
        self.data = DataPlane(self)
        self.links = Transport(cfg.node_id, peers, self, self.counters,
                               send_buffer_bytes_max=cfg.peer_send_buffer_bytes_max)
        self.client_links = InProcLinks(self)  # a gateway in this process reaches the groups through these
        self._rng = random.Random(seed if seed is not None else cfg.node_id * 7919 + int(time.time_ns()))
        self.replicas: dict[int, Replica] = {}
        self.recovered = recovered  # WAL state of groups the map has not named yet (host_replica uses it)
        self.dirty: set[int] = set()
        self.propose_dirty: set[int] = set()
        self.streams: set[int] = set()
        self.blocked: set[int] = set()  # replicas whose apply hit a full disk (retried every APPLY_RETRY_S)
        self._kicked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._failed: BaseException | None = None
        self._read_ctx = 0
        self._installing = 0
        self.commits = 0
        self.port = 0
        # False until the fences are known (a node under a metadata group: after its first map read), so a
        # restarted node cannot take a write from a gateway that was fenced while it was down.
        self.fences_known = True
        self.repair = PeerRepair(self)
        self.links.volume_of = self.data.admission.volume_of
        self.raft_out = RaftOutbox(cfg.node_id, self.links, self.counters, self.repair.allow, self._raft_replica)
        self.chain_lease = ChainLease()
        self.commit = GroupCommit(self)
        self.ticker = Ticker(self)
        # The engine's fdatasyncs (trickle, compaction, image installs) run on their own thread, so WAL
        # group commits never queue behind them.
        self.engine_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-sync")
        self.compactor = Compactor(self)
        # Received snapshot images are staged in files here (replication/image.py rule 4); what a process
        # that is gone left behind is removed now.
        self._images = os.path.join(os.path.dirname(engine.directory.rstrip("/")), "images")
        self._image_seq = 0
        engine.disk.makedirs(self._images)
        for name in engine.disk.listdir(self._images):
            engine.disk.remove(os.path.join(self._images, name))
        # Static groups (`[groups]` in the node's TOML, the Raft benches and tests): founding voters, no map,
        # so no preferred leader and no membership target; leaders stay where elections put them.
        for gid, members in sorted(groups.items()):
            self.replicas[gid] = self._raft(gid, members, recovered.get(gid), 1)

    # == NodeContext =============================================================================================
    @property
    def ticks(self) -> int:
        return self.ticker.done

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    @property
    def stopping(self) -> bool:
        return self._stopping

    def kick(self) -> None:
        if not self._kicked and self._loop is not None:
            self._kicked = True
            self._loop.call_soon(self.turn)

    def catch_up_ticks(self) -> None:
        self.ticker.catch_up()

    def wait_sync(self, r: Replica) -> None:
        self.commit.waiters.append(r)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        self._loop.create_task(coro)

    def future(self) -> asyncio.Future[int]:
        assert self._loop is not None
        return self._loop.create_future()

    def next_read_ctx(self) -> int:
        self._read_ctx += 1
        return self._read_ctx

    def block_apply(self, gid: int, ex: BaseException) -> None:
        if gid not in self.blocked:
            self.blocked.add(gid)
            self.counters["apply_blocked_no_space"] += 1
            log.warning("replica.apply_blocked", group=gid, error=str(ex), retry_s=APPLY_RETRY_S)
            assert self._loop is not None
            self._loop.call_later(APPLY_RETRY_S, self._unblock, gid)

    def _unblock(self, gid: int) -> None:
        self.blocked.discard(gid)
        if gid in self.replicas:
            self.dirty.add(gid)
        self.kick()

    def note_applied(self, nbytes: int) -> None:
        self.commits += 1
        self.compactor.applied(nbytes)

    def image_of(self, gid: int, app: bytes) -> ChunkedImage:
        """Group `gid`'s snapshot image with the session table `app` (replication/image.py): laid out when
        first used, its data read a chunk at a time."""
        return ChunkedImage(self.engine, lambda: group_extents(self.engine, gid), app, self._image_made, gid)

    def image_sink(self) -> SpillImage:
        self._image_seq += 1
        return SpillImage(self.engine.disk, os.path.join(self._images, f"image-{self._image_seq}.tmp"))

    def trim_heap_soon(self) -> None:
        """Give memory a large release freed back to the OS (obs/memory.py), on the engine thread."""
        if self._loop is not None and not self._stopping:
            self._loop.run_in_executor(self.engine_executor, trim_heap)

    def _image_made(self) -> None:
        self.counters["snapshot_images_made"] += 1

    def install_image(self, gid: int, data: Any) -> Coroutine[Any, Any, bytes | None]:
        """Install a received image for a Ready that stays outstanding meanwhile (replication/image.py rule
        3); counted from this call (before the task that awaits it runs), so `stop` waits for it. Its
        result: the session table for the WAL's snapshot record, or None when the node stops or failed
        (then `fail` was called)."""
        self._installing += 1
        return self._install(gid, data)

    async def _install(self, gid: int, data: Any) -> bytes | None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()

        async def engine_sync() -> None:
            await loop.run_in_executor(self.engine_executor, self.engine.sync)

        try:
            got = await install_image(self.engine, gid, data, engine_sync,
                                      lambda: self._stopping or self._failed is not None)
        except Exception as e:
            self.fail(e)
            return None
        finally:
            self._installing -= 1
        if got is None:
            return None
        r = self.replicas.get(gid)
        if r is None:
            return None
        app, sessions = got
        r.sessions = sessions
        log.info("replica.image_installed", group=gid, kind=r.kind, bytes=len(data),
                 took_s=round(time.monotonic() - t0, 2))
        self.trim_heap_soon()
        return app

    def repair_allow(self, nbytes: int) -> bool:
        return self.repair.allow(nbytes)

    def set_auth(self, auth: str, ring: Any) -> None:
        """The data port's authentication (node/transport.py rule 4): "on" with the map's key ring, "off" (a
        cluster without data keys), "unknown" (not read yet). The repair client signs with the same ring."""
        self.links.set_auth(auth, ring)
        self.repair.set_ring(ring)
        self.counters["auth_key_max"] = max(ring.keys) if ring is not None else 0
        self.counters["auth_key_active"] = ring.active if ring is not None else 0

    def qos_poll(self, key: str, nbytes: int) -> bool:
        return self.data.admission.poll(key, nbytes)

    async def qos_admit(self, key: str, nbytes: int) -> Any:
        return await self.data.admission.admit_internal(key, nbytes)

    def qos_done(self, slot: Any) -> None:
        self.data.admission.done(slot)

    def syncing(self) -> bool:
        return self.commit.syncing

    # == hosting =================================================================================================
    def kind_of(self, gid: int) -> str | None:
        r = self.replicas.get(gid)
        return r.kind if r is not None else None

    def host_replica(self, gid: int, kind: str, members: list[int], epoch: int) -> bool:
        """Host a replica of group `gid` of `kind` ("raft" or "chain"; the metadata map named this node a
        member at `epoch`, members[0] the preferred leader or the head); its durable state comes from the
        WAL if it had any. Returns True when it was not hosted before."""
        r = self.replicas.get(gid)
        new = r is None
        if r is None:
            rec = self.recovered.pop(gid, None)
            if kind == "chain":
                r = ChainReplica(self, self.chain_lease, gid, rec)
                log.info("chain.group_hosted", group=gid, members=members, epoch=epoch)
            else:
                r = self._raft(gid, members, rec, epoch)
                log.info("raft.group_hosted", group=gid, members=members, epoch=epoch, joiner=not r.core.conf.voters)
            self.replicas[gid] = r
            if self._loop is not None:
                self.dirty.add(gid)
                self.kick()
        elif r.kind != kind:
            log.error("replica.kind_mismatch", group=gid, hosted=r.kind, asked=kind)
            return False
        r.configure(members, epoch)
        return new

    def _raft(self, gid: int, members: list[int], rec: GroupDurable | None, epoch: int) -> RaftReplica:
        return RaftReplica(self, self.raft_out, gid, members, rec, epoch, random.Random(self._rng.getrandbits(64)))

    def configure(self, gid: int, members: list[int], epoch: int) -> None:
        """The map's membership of a hosted group (also one that no longer names this node)."""
        r = self.replicas.get(gid)
        if r is not None:
            r.configure(members, epoch)

    def discard(self, gid: int, deleted: bool = False) -> bool:
        """This node was replaced in group `gid` (the map has it whole without this node): drop its stale
        replica, hosted or only recovered from the WAL (rule 4). `deleted`: the group is gone from the map
        (its volume was deleted): a leader or member drops its copy too, and the WAL forgets the group.
        Returns False when it must be tried again (a Ready outstanding, a leader still to hand over, a
        WAL sync running)."""
        r = self.replicas.get(gid)
        if r is None and gid not in self.recovered:
            return False
        if self.commit.syncing or (r is not None and not r.can_drop(deleted)):
            return False
        kind = r.kind if r is not None else "raft"
        if r is not None:
            r.fail_requests(NotLeaderError(NO_NODE))
            del self.replicas[gid]
        self.recovered.pop(gid, None)
        self.drop_replica(gid, deleted)
        for s in (self.dirty, self.propose_dirty, self.streams):
            s.discard(gid)
        what = "replicas_discarded" if kind == "raft" else "chain_replicas_discarded"
        self.counters["groups_deleted" if deleted else what] += 1
        log.info(f"{kind}.group_deleted" if deleted else f"{kind}.replica_discarded", group=gid,
                 hosted=r is not None)
        return True

    def delete_group(self, gid: int) -> bool:
        """Group `gid` is gone from the map (its volume was deleted): drop this node's replica, so it holds
        neither engine space nor WAL segments."""
        return self.discard(gid, deleted=True)

    def drop_replica(self, gid: int, deleted: bool) -> None:
        """The WAL records group `gid` empty (synced; forgotten when `deleted`), then the engine drops its
        extents; its WAL segments are released once nothing else pins them."""
        if deleted:
            self.wal.forget(gid)
        else:
            self.wal.install_snapshot(gid, bootstrap_snapshot(frozenset()).meta)
        self.wal.settle(remove=False)  # rare: once per dropped replica
        for g, snap in [k for k in self.engine.snapshots() if k[0] == gid]:
            self.engine.unpin_snapshot(g, snap)  # its snapshots go with it (else they would hold its blocks)
        for ext in group_extents(self.engine, gid):
            self.engine.drop_extent(ext)
        self.commit.collect()

    def add_peer(self, pid: int, host: str, port: int) -> None:
        """A storage node that registered after this one started (rebalancing moves replicas to it)."""
        if pid == self.node_id or pid in self.peers:
            return
        self.peers[pid] = (host, port)
        self.links.add_peer(pid, host, port)
        self.repair.add_peer(pid, host, port)

    def report(self) -> tuple[dict[int, list[int]] | None, dict[int, list[int]]]:
        """For the metadata leader (the heartbeat's report): per chain replica [epoch, configured, caught
        up] (None without chain replicas), per Raft group this node leads [epoch, caught-up mask, voters...]
        (control/raftrepair.py)."""
        chains: dict[int, list[int]] = {}
        raft: dict[int, list[int]] = {}
        for gid, r in self.replicas.items():
            if isinstance(r, ChainReplica):
                chains[gid] = r.report()
            elif isinstance(r, RaftReplica) and (rep := r.report()) is not None:
                raft[gid] = rep
        return (chains or None), raft

    def grant_chain_lease(self, until_monotonic: float, epochs: dict[int, int]) -> None:
        """The node's chain lease from the metadata leader (chain/replica.py rule 5), for the groups'
        epochs it named."""
        lease = self.chain_lease
        lease.until_tick = max(lease.until_tick, self.ticker.tick_at(until_monotonic))
        lease.epochs = dict(epochs)
        for gid, epoch in epochs.items():
            r = self.replicas.get(gid)
            if isinstance(r, ChainReplica):
                r.take_lease(epoch)
        self.kick()

    def raise_fence(self, gid: int, epoch: int) -> None:
        self.data.raise_fence(gid, epoch)

    def _raft_replica(self, gid: int) -> RaftReplica | None:
        r = self.replicas.get(gid)
        return r if isinstance(r, RaftReplica) else None

    def leader_count(self) -> int:
        return sum(1 for r in self.replicas.values() if isinstance(r, RaftReplica) and r.core.role == Role.LEADER)

    # == lifecycle ===============================================================================================
    def begin(self) -> None:
        """Start turning on the running loop (ticks, the first turn), without listening (unit tests)."""
        self._loop = asyncio.get_running_loop()
        self.ticker.start()
        self.dirty.update(self.replicas)
        self.kick()

    async def start(self, host: str, port: int) -> int:
        self.begin()
        self.port = await self.links.start(host, port)
        log.info("node.host_started", node=self.node_id, port=self.port, groups=len(self.replicas))
        return self.port

    async def stop(self) -> None:
        self._stopping = True  # no new work for the engine thread
        self.ticker.stop()
        self.raft_out.stop()
        await self.links.stop()
        await self.repair.close()
        for r in self.replicas.values():
            r.fail_requests(NotLeaderError(NO_NODE))
        while self.commit.syncing:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        while self.compactor.running or self._installing:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, self.engine_executor.shutdown)  # pending WAL reaps finish first
        await loop.run_in_executor(self.commit.executor, self._close_storage)
        self.commit.executor.shutdown(wait=True)

    def _close_storage(self) -> None:
        self.wal.close()
        self.engine.close()

    def fail(self, e: BaseException) -> None:
        """Rule 3."""
        log.error("node.host_failed", error=repr(e), exc_info=e)
        self._failed = e
        if self.on_failed is not None:
            self.on_failed()
        for r in self.replicas.values():
            r.fail_requests(RetryError(f"node failed: {e!r}"))

    # == the turn (rule 1) =======================================================================================
    def turn(self) -> None:
        self._kicked = False
        if self._failed is not None:
            return
        replicas = self.replicas
        try:
            if self.propose_dirty:
                pd, self.propose_dirty = self.propose_dirty, set()
                for gid in pd:
                    r = replicas.get(gid)
                    if r is not None:
                        r.flush_proposals()
            blocked = self.blocked
            while self.dirty:
                dirty, self.dirty = self.dirty, set()
                for gid in dirty:
                    r = replicas.get(gid)
                    if r is not None and r.rd is None and gid not in blocked and r.has_ready():
                        r.handle_ready()
            self.raft_out.flush()
            if self.streams:
                self._pump_streams()
            self.links.flush()
            self.commit.flush_wal()
        except Exception as e:
            self.fail(e)
            return
        self.commit.after_turn()

    def send_acks(self) -> None:
        """What a group commit released (acknowledgements, GroupCommit rule 3) leaves now."""
        self.raft_out.flush()
        self.links.flush()

    def after_sync(self) -> None:
        self.compactor.maybe_start()

    def every_second(self) -> None:
        """Ticker rule 2."""
        for r in self.replicas.values():
            if isinstance(r, RaftReplica):
                r.balance()
                r.reconfigure()
        self.compactor.maybe_start()
        self.compactor.every_second()
        self.data.admission.every_second()
        self.commit.sync_idle()
        if self.wal.held_segments():
            self.commit.collect(held=True)  # WAL segments the engine no longer links into go (write-once)

    def _pump_streams(self) -> None:
        for gid in list(self.streams):
            r = self.replicas.get(gid)
            if r is None or not r.pump():
                self.streams.discard(gid)
        if self.streams:
            assert self._loop is not None
            self._loop.call_later(STREAM_PUMP_S, self.kick)  # more chunks once the sockets drain

    # == peer frames (rule 2) ====================================================================================
    def on_peer_up(self, peer_id: int) -> None:
        pass

    def on_peer_down(self, peer_id: int) -> None:
        self.client_links.peer_down(peer_id)

    def on_peer_frame(self, peer_id: int, frame: Frame) -> None:
        t = frame.type
        if t == FrameType.CLIENT_REQ:  # forwarded by the gateway of that node (node/inproc.py rule 2)
            conn = self.links.conns.get(peer_id)
            if conn is not None:
                self.data.on_frame(conn, frame)
            return
        if t == FrameType.CLIENT_RESP:
            self.client_links.on_reply(peer_id, frame)
            return
        if t == FrameType.RAFT:
            self._step(decode_raft(frame.group, frame.message, frame.payload))
        elif t == FrameType.HEARTBEATS:
            for m in decode_heartbeats(frame.message):
                self._step(m)
        elif t == FrameType.CHAIN:
            r = self.replicas.get(frame.group)
            if isinstance(r, ChainReplica):
                r.on_frame(frame.message, frame.payload)
            else:
                self.counters["chain_unknown_group"] += 1
        else:
            self.counters["frames_malformed"] += 1
            return
        self.kick()

    def _step(self, m: Message) -> None:
        r = self.replicas.get(m.group)
        if isinstance(r, RaftReplica):
            r.step(m)
        else:
            self.counters["raft_unknown_group"] += 1

    def on_client_frame(self, conn: Any, frame: Frame) -> None:
        self.data.on_frame(conn, frame)

    # == for the scrub (control/scrub.py ScrubNode) ===============================================================
    def scrub_groups(self) -> list[int]:
        return sorted(self.replicas)

    def scrub_view(self, gid: int) -> ScrubView | None:
        r = self.replicas.get(gid)
        return r.scrub_view() if r is not None else None

    async def read_repair(self, gid: int, others: list[int], extent_id: int, block: int, n: int,
                          applied: int) -> tuple[bytearray, list[int]]:
        return await self.repair.read_repair(gid, others, extent_id, block, n, applied)

    async def call_peer(self, peer: int, gid: int, req: pb.ClientRequest) -> tuple[pb.ClientResponse, Any]:
        return cast(tuple[pb.ClientResponse, Any], await self.repair.peer().call_node(peer, gid, req))

