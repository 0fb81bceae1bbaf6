# Raft messages <-> RAFT / HEARTBEATS frames (docs/format/wire.md).
#
# Rules:
# 1. Entry data and snapshot chunks go to the frame payload, never into the protobuf message.
# 2. HEARTBEAT and HEARTBEAT_RESP messages are not encoded one by one: `encode_heartbeats` packs the
#    ones due to one peer in one loop turn into a single HeartbeatBatch (coalesced per node pair).
# 3. Decoding validates lengths and enum values and raises ValueError on anything malformed (protobuf's
#    DecodeError included: it is not a ValueError); the caller drops the frame and counts it.
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from google.protobuf.message import DecodeError

from raftblock.replication.raft.types import (
    ConfState,
    Entry,
    EntryType,
    GroupId,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.framing import Buf, FrameType, encode_frame

_MT = MessageType
HEARTBEAT_TYPES = (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP)


def encode_raft(m: Message) -> list[Buf]:
    pm = pb.RaftMsg(
        type=int(m.type),
        src=m.src,
        dst=m.dst,
        term=m.term,
        log_term=m.log_term,
        index=m.index,
        commit=m.commit,
        reject=m.reject,
        reject_hint=m.reject_hint,
        context=m.context,
        lease_tick=m.lease_tick,
        force=m.force,
        chunk_index=m.chunk_index,
        chunk_total=m.chunk_total,
        data_len=len(m.data),
        epoch=m.epoch,
    )
    payload: list[Buf] = []
    if m.entries:
        hdrs = pm.entries
        for e in m.entries:
            hdrs.add(term=e.term, index=e.index, type=int(e.type), data_len=len(e.data))
            if e.data:
                payload.append(e.data)
    if m.snap_meta is not None:
        sm = m.snap_meta
        pm.snap_meta.index = sm.index
        pm.snap_meta.term = sm.term
        pm.snap_meta.voters.extend(sorted(sm.conf.voters))
        pm.snap_meta.epoch = sm.conf.epoch
    if m.data:
        payload.append(m.data)
    return encode_frame(FrameType.RAFT, m.group, pm.SerializeToString(), payload)


def decode_raft(group: int, message: bytes, payload: bytes | memoryview) -> Message:
    try:
        pm = pb.RaftMsg.FromString(message)
    except DecodeError as e:
        raise ValueError(f"malformed RaftMsg: {e}") from None
    mt = MessageType(pm.type)  # ValueError on an unknown type
    off = 0
    view = memoryview(payload)
    entries: list[Entry] = []
    for h in pm.entries:
        end = off + h.data_len
        if end > len(view):
            raise ValueError("entry data beyond the payload")
        # A view, not a copy: the frame's payload is a buffer of its own (bytes, or a big frame's own
        # bytearray, never reused by the decoder), so the entries keep it alive and nothing else writes it.
        entries.append(Entry(h.term, h.index, EntryType(h.type), cast(bytes, view[off:end])))
        off = end
    data = b""
    if pm.data_len:
        end = off + pm.data_len
        if end > len(view):
            raise ValueError("snapshot chunk beyond the payload")
        data = bytes(view[off:end])
        off = end
    if off != len(view):
        raise ValueError("payload length does not match the message")
    snap_meta = None
    if pm.HasField("snap_meta"):
        sm = pm.snap_meta
        snap_meta = SnapshotMeta(sm.index, sm.term, ConfState(frozenset(NodeId(v) for v in sm.voters), sm.epoch))
    return Message(
        mt,
        GroupId(group),
        NodeId(pm.src),
        NodeId(pm.dst),
        pm.term,
        log_term=pm.log_term,
        index=pm.index,
        entries=entries,
        commit=pm.commit,
        reject=pm.reject,
        reject_hint=pm.reject_hint,
        context=pm.context,
        lease_tick=pm.lease_tick,
        force=pm.force,
        snap_meta=snap_meta,
        chunk_index=pm.chunk_index,
        chunk_total=pm.chunk_total,
        data=data,
        epoch=pm.epoch,
    )


def encode_heartbeats(src: NodeId, dst: NodeId, msgs: Sequence[Message], response: bool) -> list[Buf]:
    hb = pb.HeartbeatBatch(src=src, dst=dst, response=response)
    hb.group.extend([m.group for m in msgs])
    hb.term.extend([m.term for m in msgs])
    hb.commit.extend([m.commit for m in msgs])
    hb.context.extend([m.context for m in msgs])
    hb.lease_tick.extend([m.lease_tick for m in msgs])
    hb.epoch.extend([m.epoch for m in msgs])
    return encode_frame(FrameType.HEARTBEATS, 0, hb.SerializeToString())


def decode_heartbeats(message: bytes) -> list[Message]:
    try:
        hb = pb.HeartbeatBatch.FromString(message)
    except DecodeError as e:
        raise ValueError(f"malformed HeartbeatBatch: {e}") from None
    n = len(hb.group)
    if not (len(hb.term) == len(hb.commit) == len(hb.context) == len(hb.lease_tick) == len(hb.epoch) == n):
        raise ValueError("heartbeat batch arrays differ in length")
    mt = _MT.HEARTBEAT_RESP if hb.response else _MT.HEARTBEAT
    src, dst = NodeId(hb.src), NodeId(hb.dst)
    return [
        Message(
            mt,
            GroupId(g),
            src,
            dst,
            t,
            commit=c,
            context=ctx,
            lease_tick=lt,
            epoch=ep,
        )
        for g, t, c, ctx, lt, ep in zip(hb.group, hb.term, hb.commit, hb.context, hb.lease_tick, hb.epoch, strict=True)
    ]
