# Chain-replication messages <-> CHAIN frames (docs/format/wire.md, "CHAIN payload"; protocol: docs/chain.md).
#
# Rules:
# 1. Record data and the snapshot image go to the frame payload, never into the protobuf message (the
#    same rule as RAFT frames): records' data in order, then `ChainMsg.data_len` bytes of image.
# 2. Decoding validates the type, record seqs (>= 1, consecutive) and every length, and raises ValueError
#    on anything malformed (protobuf's DecodeError included: it is not a ValueError): the caller drops the
#    frame and counts it. Fencing by epoch is the core's job.
from __future__ import annotations

from google.protobuf.message import DecodeError

from raftblock.replication.chain.types import ChainMessage, MessageType, Record
from raftblock.replication.raft.types import GroupId, NodeId
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.framing import Buf, FrameType, encode_frame


def encode_chain(m: ChainMessage) -> list[Buf]:
    pm = pb.ChainMsg(type=int(m.type), src=m.src, dst=m.dst, epoch=m.epoch, seq=m.seq, data_len=len(m.data),
                     log_epoch=m.log_epoch)
    payload: list[Buf] = []
    for r in m.records:
        pm.records.add(seq=r.seq, data_len=len(r.data), epoch=r.epoch)
        if r.data:
            payload.append(r.data)
    if m.data:
        payload.append(m.data)
    return encode_frame(FrameType.CHAIN, m.group, pm.SerializeToString(), payload)


def encode_snapshot_chunk(m: ChainMessage, offset: int, total: int, chunk: Buf) -> list[Buf]:
    """One chunk of a SNAPSHOT's image (the message's other fields repeated in every chunk)."""
    pm = pb.ChainMsg(type=int(m.type), src=m.src, dst=m.dst, epoch=m.epoch, seq=m.seq, data_len=len(chunk),
                     log_epoch=m.log_epoch, image_offset=offset, image_total=total)
    return encode_frame(FrameType.CHAIN, m.group, pm.SerializeToString(), [chunk] if len(chunk) else [])


def decode_chain(group: int, message: bytes, payload: bytes | memoryview) -> ChainMessage:
    return decode_chain_frame(group, message, payload)[0]


def decode_chain_frame(group: int, message: bytes, payload: bytes | memoryview) -> tuple[ChainMessage, int, int]:
    """(message, image_offset, image_total): a SNAPSHOT chunk carries its piece of the image in `data`
    (image_total > 0); anything else has image_total 0."""
    try:
        pm = pb.ChainMsg.FromString(message)
    except DecodeError as e:
        raise ValueError(f"malformed ChainMsg: {e}") from None
    mt = MessageType(pm.type)  # ValueError on an unknown type
    view = memoryview(payload)
    off = 0
    records: list[Record] = []
    prev = 0
    for h in pm.records:
        if h.seq < 1 or (prev and h.seq != prev + 1):
            raise ValueError(f"record seqs must be consecutive from 1, got {h.seq} after {prev}")
        end = off + h.data_len
        if end > len(view):
            raise ValueError("record data beyond the payload")
        records.append(Record(h.seq, bytes(view[off:end]), h.epoch))
        prev = h.seq
        off = end
    if records and mt != MessageType.WRITE:
        raise ValueError(f"{mt.name} carries no records")
    data = b""
    if pm.data_len:
        if mt != MessageType.SNAPSHOT:
            raise ValueError(f"{mt.name} carries no image")
        end = off + pm.data_len
        if end > len(view):
            raise ValueError("snapshot image beyond the payload")
        data = bytes(view[off:end])
        off = end
    if off != len(view):
        raise ValueError("payload length does not match the message")
    if pm.image_total and (mt != MessageType.SNAPSHOT or pm.image_offset + pm.data_len > pm.image_total):
        raise ValueError("an image chunk beyond its image, or on a message that is not a SNAPSHOT")
    msg = ChainMessage(mt, GroupId(group), NodeId(pm.src), NodeId(pm.dst), pm.epoch, pm.seq, tuple(records), data,
                       pm.log_epoch)
    return msg, pm.image_offset, pm.image_total
