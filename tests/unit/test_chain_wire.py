"""CHAIN frames (raftblock/wire/chaincodec.py, docs/format/wire.md "CHAIN payload")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftblock.replication.chain.types import ChainMessage, MessageType, Record
from raftblock.replication.raft.types import GroupId, NodeId
from raftblock.wire import raftblock_pb2 as pb
from raftblock.wire.chaincodec import decode_chain, decode_chain_frame, encode_chain, encode_snapshot_chunk
from raftblock.wire.framing import Frame, FrameDecoder, FrameType


def _round_trip(m: ChainMessage) -> ChainMessage:
    dec = FrameDecoder()
    dec.feed(b"".join(bytes(p) for p in encode_chain(m)))
    f = dec.next_event()
    assert isinstance(f, Frame) and f.type == FrameType.CHAIN and f.group == m.group
    return decode_chain(f.group, f.message, f.payload)


@given(
    st.lists(st.binary(max_size=3000), max_size=8),
    st.integers(1, 2**40),
    st.integers(0, 2**63),
    st.integers(0, 2**64 - 1),
)
@settings(max_examples=60, deadline=None)
def test_write_round_trip(datas: list[bytes], first: int, epoch: int, group: int) -> None:
    recs = tuple(Record(first + i, d, epoch) for i, d in enumerate(datas))
    m = ChainMessage(MessageType.WRITE, GroupId(group), NodeId(1), NodeId(2), epoch, first + len(datas), recs)
    got = _round_trip(m)
    assert (got.type, got.group, got.src, got.dst, got.epoch, got.seq) == (
        MessageType.WRITE, group, 1, 2, epoch, first + len(datas))
    assert got.records == recs and got.data == b""


@pytest.mark.parametrize("mt", [MessageType.ACK, MessageType.SYNC])
def test_ack_and_sync_round_trip(mt: MessageType) -> None:
    got = _round_trip(ChainMessage(mt, GroupId(3), NodeId(3), NodeId(2), 7, 12345))
    assert (got.type, got.epoch, got.seq, got.records, got.data) == (mt, 7, 12345, (), b"")


def test_snapshot_round_trip() -> None:
    image = bytes(range(256)) * 300
    got = _round_trip(ChainMessage(MessageType.SNAPSHOT, GroupId(3), NodeId(2), NodeId(4), 9, 77, data=image))
    assert (got.type, got.seq, got.data) == (MessageType.SNAPSHOT, 77, image)


def _msg(**kw: object) -> bytes:
    return pb.ChainMsg(**kw).SerializeToString()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "payload", "why"),
    [
        (_msg(type=99), b"", "unknown type"),
        (_msg(type=1, records=[pb.ChainRecordHeader(seq=1, data_len=10)]), b"x" * 9, "record past the payload"),
        (_msg(type=1, records=[pb.ChainRecordHeader(seq=1, data_len=1)]), b"xy", "payload longer than announced"),
        (_msg(type=1, records=[pb.ChainRecordHeader(seq=0, data_len=0)]), b"", "seq 0"),
        (_msg(type=1, records=[pb.ChainRecordHeader(seq=5), pb.ChainRecordHeader(seq=7)]), b"", "gap in seqs"),
        (_msg(type=2, records=[pb.ChainRecordHeader(seq=1, data_len=1)]), b"x", "an ACK with records"),
        (_msg(type=1, data_len=4), b"abcd", "an image on a WRITE"),
        (_msg(type=4, data_len=5), b"abcd", "image past the payload"),
    ],
)
def test_malformed_chain_messages_raise_value_error(message: bytes, payload: bytes, why: str) -> None:
    with pytest.raises(ValueError):
        decode_chain(1, message, payload)


def _frame(parts: list[bytes]) -> Frame:
    dec = FrameDecoder()
    dec.feed(b"".join(bytes(p) for p in parts))
    f = dec.next_event()
    assert isinstance(f, Frame)
    return f


def test_sync_and_snapshot_carry_the_epoch_of_the_record_at_seq() -> None:
    m = ChainMessage(MessageType.SYNC, GroupId(4), NodeId(3), NodeId(2), 9, seq=77, log_epoch=6)
    got = _round_trip(m)
    assert (got.seq, got.log_epoch, got.epoch) == (77, 6, 9)


def test_snapshot_image_chunks_round_trip_and_chunks_beyond_the_image_are_refused() -> None:
    image = bytes(range(256)) * 40
    m = ChainMessage(MessageType.SNAPSHOT, GroupId(4), NodeId(1), NodeId(2), 3, seq=50, log_epoch=2)
    out = bytearray()
    for off in range(0, len(image), 4096):
        f = _frame(encode_snapshot_chunk(m, off, len(image), image[off:off + 4096]))
        got, o, total = decode_chain_frame(f.group, f.message, f.payload)
        assert (o, total, got.seq, got.log_epoch, got.type) == (off, len(image), 50, 2, MessageType.SNAPSHOT)
        out += got.data
    assert bytes(out) == image
    # a plain message is not a chunk
    assert decode_chain_frame(4, *_parts(encode_chain(m)))[2] == 0
    bad = _frame(encode_snapshot_chunk(m, len(image) - 10, len(image), image[:4096]))
    with pytest.raises(ValueError, match="beyond its image"):
        decode_chain_frame(bad.group, bad.message, bad.payload)
    w = ChainMessage(MessageType.WRITE, GroupId(4), NodeId(1), NodeId(2), 3, seq=1)
    notsnap = _frame(encode_snapshot_chunk(w, 0, 100, b"x" * 10))
    with pytest.raises(ValueError):
        decode_chain_frame(notsnap.group, notsnap.message, notsnap.payload)


def _parts(parts: list[bytes]) -> tuple[bytes, bytes | memoryview]:
    f = _frame(parts)
    return f.message, f.payload
