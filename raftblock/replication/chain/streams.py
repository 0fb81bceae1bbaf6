"""A chain member's image streams: its SNAPSHOT to a successor going out in chunks, and the images
coming in from its predecessor, reassembled.

Rules (docs/chain.md):
1. A SNAPSHOT's image (the group's extent data, made when first sent) travels in chunks of
   SNAPSHOT_CHUNK_BYTES, paced by the peer connection's queue (STREAM_QUEUE_BYTES) and the node's repair
   budget (shared with Raft snapshot chunks). The messages the core sends the same successor behind it
   wait for the last chunk (up to HELD_BYTES_MAX; later ones are dropped: the core resends).
2. One stream per (group, successor): a resent SNAPSHOT of the same epoch while one is on its way is
   dropped. A new connection restarts the stream from its first chunk.
3. The receiver writes the chunks in order to a file (replication/image.py SpillImage, never whole in
   memory) and steps the core with the whole image; a chunk out of order or one that cannot be written
   (a full disk) ends that stream (the core resends). An image over IMAGE_BYTES_MAX is refused.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from raftblock.replication.chain.types import ChainMessage, MessageType
from raftblock.replication.image import ChunkedImage, SpillImage
from raftblock.wire.chaincodec import encode_chain, encode_snapshot_chunk

if TYPE_CHECKING:
    from raftblock.replication.replica import NodeContext

SNAPSHOT_CHUNK_BYTES = 1 << 20
STREAM_QUEUE_BYTES = 4 << 20  # a snapshot stream sends while the connection holds less than this unsent
HELD_BYTES_MAX = 16 << 20  # messages waiting behind a snapshot stream
IMAGE_BYTES_MAX = 1 << 30  # a received image larger than this is refused (a group holds at most 512 MiB)


class _Out:
    __slots__ = ("msg", "image", "offset", "conn", "held", "held_bytes", "started")

    def __init__(self, msg: ChainMessage, image: bytes | ChunkedImage) -> None:
        self.msg = msg
        self.image = image
        self.started = time.monotonic()
        self.offset = 0
        self.conn: object = None
        self.held: list[ChainMessage] = []
        self.held_bytes = 0


class _In:
    __slots__ = ("epoch", "seq", "total", "image")

    def __init__(self, epoch: int, seq: int, total: int, image: SpillImage) -> None:
        self.epoch = epoch
        self.seq = seq
        self.total = total
        self.image = image  # never whole in memory (replication/image.py rule 4)


class OutStreams:
    """Everything a member sends (rules 1, 2); `pump` is called by the host while `ctx.streams` has it."""

    def __init__(self, ctx: NodeContext, gid: int) -> None:
        self.ctx = ctx
        self.gid = gid
        self._out: dict[int, _Out] = {}  # successor -> stream

    def send(self, m: ChainMessage) -> None:
        ctx = self.ctx
        st = self._out.get(int(m.dst))
        if m.type == MessageType.SNAPSHOT:
            if st is not None and st.msg.epoch == m.epoch:
                ctx.counters["chain_snapshot_resend_skipped"] += 1
                return
            data = cast(object, m.data)
            image = data if isinstance(data, ChunkedImage) else bytes(m.data)
            ctx.counters["chain_images_sent"] += 1
            self._out[int(m.dst)] = _Out(m, image)
            ctx.streams.add(self.gid)
            self.pump()
            return
        if st is not None:
            size = sum(len(r.data) for r in m.records) + 64
            if st.held_bytes + size <= HELD_BYTES_MAX:
                st.held.append(m)
                st.held_bytes += size
            else:
                ctx.counters["chain_dropped_behind_snapshot"] += 1
            return
        ctx.links.send(m.dst, encode_chain(m))

    def pump(self) -> bool:
        """Send the next chunks the connections have room for; True while a stream is not finished."""
        links = self.ctx.links
        for dst in list(self._out):
            st = self._out[dst]
            conn = links.conns.get(dst)
            if conn is None:
                continue  # not connected: wait (the core resends after a while anyway)
            if st.conn is not conn:
                st.conn, st.offset = conn, 0  # a new connection: the receiver starts over
            total = len(st.image)
            while st.offset < total and conn.write_buffer_bytes() < STREAM_QUEUE_BYTES:
                chunk = st.image[st.offset : st.offset + SNAPSHOT_CHUNK_BYTES]
                if not self.ctx.repair_allow(len(chunk)):
                    break  # the repair budget is spent: the host pumps again soon
                if not links.send(dst, encode_snapshot_chunk(st.msg, st.offset, total, chunk)):
                    break
                st.offset += len(chunk)
            if total == 0 and st.offset == 0:
                m = st.msg
                links.send(dst, encode_chain(ChainMessage(m.type, m.group, m.src, m.dst, m.epoch, m.seq, (), b"",
                                                          m.log_epoch)))
                st.offset = -1
            if st.offset >= total or st.offset < 0:
                del self._out[dst]
                for m in st.held:
                    links.send(m.dst, encode_chain(m))
        return bool(self._out)

    def repair_info(self) -> dict[str, int]:
        """The image stream this member is sending its successor, if any: GroupInfo.repair_* fields."""
        for dst, st in self._out.items():
            return {"repair_node": dst, "repair_bytes_done": max(0, st.offset),
                    "repair_bytes_total": len(st.image),
                    "repair_elapsed_ms": int((time.monotonic() - st.started) * 1000)}
        return {}


class InStreams:
    """Rule 3: images being received, per predecessor."""

    def __init__(self, counters: Counter[str], sink: Callable[[], SpillImage]) -> None:
        self.counters = counters
        self._sink = sink
        self._in: dict[int, _In] = {}

    def receive(self, m: ChainMessage, offset: int, total: int) -> ChainMessage | None:
        """The whole SNAPSHOT message once its last chunk is in, else None."""
        key = int(m.src)
        if total > IMAGE_BYTES_MAX:
            self.counters["frames_malformed"] += 1
            return None
        ins = self._in.get(key)
        if offset == 0:
            self.drop(key)
            ins = self._in[key] = _In(m.epoch, m.seq, total, self._sink())
        elif ins is None or (ins.epoch, ins.seq, len(ins.image), ins.total) != (m.epoch, m.seq, offset, total):
            self.drop(key)
            self.counters["chain_image_chunk_out_of_order"] += 1
            return None
        if not ins.image.append(m.data):
            self.drop(key)  # a full disk: the core sends the SNAPSHOT again
            self.counters["chain_image_spill_failed"] += 1
            return None
        if len(ins.image) < total:
            return None
        del self._in[key]
        self.counters["chain_images_received"] += 1
        # The file-backed image itself: the install reads it a slice at a time, and the replica closes it
        # once the Ready that carries it is done.
        return ChainMessage(m.type, m.group, m.src, m.dst, m.epoch, m.seq, (), cast(bytes, ins.image), m.log_epoch)

    def drop(self, key: int) -> None:
        ins = self._in.pop(key, None)
        if ins is not None:
            ins.image.close()

    def close(self) -> None:
        for key in list(self._in):
            self.drop(key)
