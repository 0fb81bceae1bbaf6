"""Fuzz properties of the wire codecs (wire/framing.py, ops.py, raftcodec.py, chaincodec.py, raftblock_pb2):
round trips, arbitrary and mutated inputs refused only with the documented errors (FatalFrameError / BadFrame;
ValueError; DecodeError), and no allocation from a length field before the bytes it announces arrive."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from fuzz_strategies import fuzz, mutated
from fuzz_targets import (
    chain_roundtrip,
    corpus,
    frame_roundtrip,
    raft_roundtrip,
    target_frame,
    target_ops,
    target_proto,
    target_raftmsg,
)
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from raftblock.replication.chain.types import ChainMessage, Record
from raftblock.replication.chain.types import MessageType as ChainType
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
from raftblock.wire import chaincodec, framing, ops, raftcodec
from raftblock.wire import raftblock_pb2 as pb

U32 = st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)


# --- framing ----------------------------------------------------------------------------------------
@fuzz(200)
@given(st.lists(st.tuples(st.integers(1, 6), U32, st.binary(max_size=300),
                          st.lists(st.binary(max_size=5000), max_size=3)), max_size=4),
       st.integers(0, 255), st.booleans())
def test_frames_round_trip_whatever_the_cut(frames: list[tuple[int, int, bytes, list[bytes]]], cut: int,
                                            buffered: bool) -> None:
    frame_roundtrip(frames, cut, buffered)


def test_a_big_frame_round_trips_through_its_own_buffer() -> None:
    frame_roundtrip([(2, 7, b"m", [bytes(range(256)) * 200]), (4, 1, b"", [])], 5, True)
    frame_roundtrip([(2, 7, b"m", [bytes(range(256)) * 200])], 0, False)


@fuzz(500)
@given(st.binary(max_size=4096))
def test_frame_decoder_takes_arbitrary_bytes(data: bytes) -> None:
    target_frame(data)


@fuzz(800)
@given(mutated(corpus("frame")))
def test_frame_decoder_takes_mutated_streams(data: bytes) -> None:
    target_frame(data)


@pytest.mark.parametrize("plen", [framing.BIG_FRAME_BYTES, framing.BIG_FRAME_BYTES_MAX,
                                  framing.BIG_FRAME_BYTES_MAX + 1, framing.PAYLOAD_LEN_MAX])
def test_a_header_alone_allocates_at_most_the_big_frame_bound(plen: int, traced: None) -> None:
    """Rule 3 and BIG_FRAME_BYTES_MAX: a forged header announcing up to PAYLOAD_LEN_MAX makes the decoder
    allocate at most BIG_FRAME_BYTES_MAX before the bytes arrive."""
    head = framing.HEADER.pack(framing.MAGIC, framing.VERSION, 2, 0, 0, 1, 0, plen, 0)
    dec = framing.FrameDecoder()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    dec.feed(head + bytes(100))
    assert dec.next_event() is None
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak <= framing.BIG_FRAME_BYTES_MAX + (64 << 10), peak
    assert dec.buffered_bytes() <= len(head) + 100
    too_big = framing.HEADER.pack(framing.MAGIC, framing.VERSION, 2, 0, 0, 1, 0, framing.PAYLOAD_LEN_MAX + 1, 0)
    dec = framing.FrameDecoder()
    dec.feed(too_big)
    with pytest.raises(framing.FatalFrameError):
        dec.next_event()


# --- op batches -------------------------------------------------------------------------------------
@st.composite
def block_ops(draw: st.DrawFn) -> ops.BlockOp:
    kind = draw(st.sampled_from([ops.OP_WRITE, ops.OP_TRIM, ops.OP_SNAP, ops.OP_UNSNAP, ops.OP_FILL]))
    client = draw(st.sampled_from([0, 0, 1, (1 << 64) - 1]))
    wid, low = (draw(U64), draw(U64)) if client else (0, 0)
    sealed = kind != ops.OP_SNAP and kind != ops.OP_UNSNAP and draw(st.booleans())  # rule 7
    if kind in (ops.OP_WRITE, ops.OP_FILL):
        n = draw(st.integers(0, 3))
        data = draw(st.binary(min_size=16, max_size=16)) * 256 * n
        block = draw(st.integers(0, 1 << 20) if sealed else U32)
        seal_at, aux = (block + n + draw(st.integers(0 if n else 1, 300)), draw(st.binary(min_size=32 * n,
                                                                                          max_size=32 * n))) \
            if sealed else (0, b"")
        return ops.BlockOp(kind, draw(U64), block, n, [draw(U32) for _ in range(n)], data, client, wid, low,
                           seal_at, aux)
    if kind == ops.OP_TRIM:
        block, count = (draw(st.integers(0, 1 << 20)), draw(st.integers(0, 1 << 16))) if sealed \
            else (draw(U32), draw(U32))
        return ops.BlockOp(kind, draw(U64), block, count, client=client, wid=wid, low=low,
                           seal_at=block + count + 1 if sealed else 0)
    return ops.BlockOp(kind, draw(U64), 0, 0, client=client, wid=wid, low=low)


def _op(o: ops.BlockOp) -> tuple[object, ...]:
    return (o.kind, o.extent_id, o.block, o.count, tuple(o.crcs), bytes(o.data), o.client, o.wid, o.low, o.seal_at,
            bytes(o.aux))


@fuzz(200)
@given(st.lists(block_ops(), min_size=1, max_size=6), st.sampled_from([0, 4096, 8192]))
def test_op_batches_round_trip(batch: list[ops.BlockOp], min_bytes: int) -> None:
    raw = ops.encode_batch(batch)
    assert [_op(o) for o in ops.decode_batch(raw)] == [_op(o) for o in batch]
    target_ops(bytes([min_bytes // 4096]) + raw)  # write_spans agrees with the decoder


@fuzz(500)
@given(st.binary(max_size=2048))
def test_op_batch_decoder_takes_arbitrary_bytes(data: bytes) -> None:
    target_ops(data)


@fuzz(600)
@given(mutated(corpus("ops")))
def test_op_batch_decoder_takes_mutated_batches(data: bytes) -> None:
    target_ops(data)


def test_an_op_count_of_four_billion_allocates_nothing(traced: None) -> None:
    raw = struct.pack("<H", 1) + struct.pack("<BBHIQII", ops.OP_WRITE, 0, 0, 0xFFFFFFFF, 1, 0, 0) + bytes(64)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with pytest.raises(ValueError):
        ops.decode_batch(raw)
    assert tracemalloc.get_traced_memory()[1] - base < 1 << 20
    assert ops.write_spans(raw, 0) == []


# --- Raft and chain messages --------------------------------------------------------------------------
@st.composite
def raft_messages(draw: st.DrawFn) -> Message:
    mt = draw(st.sampled_from(list(MessageType)))
    entries = [Entry(draw(U64), draw(U64), draw(st.sampled_from(list(EntryType))), draw(st.binary(max_size=40)))
               for _ in range(draw(st.integers(0, 3)))]
    snap = None
    if draw(st.booleans()):
        voters = frozenset(NodeId(v) for v in draw(st.lists(U64, max_size=4)))
        snap = SnapshotMeta(draw(U64), draw(U64), ConfState(voters, draw(U64)))
    return Message(mt, GroupId(draw(U32)), NodeId(draw(U64)), NodeId(draw(U64)), draw(U64),
                   log_term=draw(U64), index=draw(U64), entries=entries, commit=draw(U64), reject=draw(st.booleans()),
                   reject_hint=draw(U64), context=draw(U64), lease_tick=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
                   force=draw(st.booleans()), snap_meta=snap, chunk_index=draw(U32), chunk_total=draw(U32),
                   data=draw(st.binary(max_size=64)), epoch=draw(U64))


@fuzz(200)
@given(raft_messages())
def test_raft_messages_round_trip(m: Message) -> None:
    raft_roundtrip(m)


@fuzz(100)
@given(st.lists(st.tuples(U32, U64, U64, U64, st.integers(-(1 << 63), (1 << 63) - 1), U64), max_size=5),
       st.booleans())
def test_heartbeat_batches_round_trip(slots: list[tuple[int, int, int, int, int, int]], response: bool) -> None:
    mt = MessageType.HEARTBEAT_RESP if response else MessageType.HEARTBEAT
    msgs = [Message(mt, GroupId(g), NodeId(1), NodeId(2), t, commit=c, context=x, lease_tick=lt, epoch=e)
            for g, t, c, x, lt, e in slots]
    parts = raftcodec.encode_heartbeats(NodeId(1), NodeId(2), msgs, response)
    got = raftcodec.decode_heartbeats(bytes(parts[1]))
    assert [(m.type, m.group, m.term, m.commit, m.context, m.lease_tick, m.epoch) for m in got] == \
        [(m.type, m.group, m.term, m.commit, m.context, m.lease_tick, m.epoch) for m in msgs]


@st.composite
def chain_messages(draw: st.DrawFn) -> tuple[ChainMessage, int, int]:
    mt = draw(st.sampled_from(list(ChainType)))
    records: tuple[Record, ...] = ()
    if mt == ChainType.WRITE:
        first = draw(st.integers(1, 1 << 40))
        records = tuple(Record(first + k, draw(st.binary(max_size=40)), draw(U64)) for k in range(draw(st.integers(0, 3))))
    data = draw(st.binary(max_size=64)) if mt == ChainType.SNAPSHOT else b""
    m = ChainMessage(mt, GroupId(draw(U32)), NodeId(draw(U64)), NodeId(draw(U64)), draw(U64), draw(U64), records,
                     data, draw(U64))
    if mt == ChainType.SNAPSHOT and draw(st.booleans()):
        offset = draw(st.integers(0, 1 << 40))
        return m, offset, offset + len(data) + draw(st.integers(0 if data else 1, 1 << 20))
    return m, 0, 0


@fuzz(200)
@given(chain_messages())
def test_chain_messages_round_trip(case: tuple[ChainMessage, int, int]) -> None:
    chain_roundtrip(*case)


@fuzz(500)
@given(st.binary(max_size=1024))
def test_raft_and_chain_decoders_take_arbitrary_bytes(data: bytes) -> None:
    target_raftmsg(data)


@fuzz(800)
@given(mutated(corpus("raftmsg")))
def test_raft_and_chain_decoders_take_mutated_messages(data: bytes) -> None:
    target_raftmsg(data)


def test_a_corrupt_protobuf_message_is_a_value_error() -> None:
    """raftcodec rule 3, chaincodec rule 2: ValueError for anything malformed, protobuf's DecodeError
    included (the chain replica counts ValueError only; regression: corpus/regressions/raftmsg)."""
    for decode in (lambda: raftcodec.decode_raft(1, b"\xff", b""), lambda: raftcodec.decode_heartbeats(b"\xff"),
                   lambda: chaincodec.decode_chain_frame(1, b"\xff", b"")):
        with pytest.raises(ValueError):
            decode()


# --- protobuf ----------------------------------------------------------------------------------------
@fuzz(100)
@given(st.builds(pb.ClientRequest, request_id=U64, op=U32, extent_id=U64, block=U64, count=U32,
                 crcs=st.lists(U32, max_size=4), epoch=U64, client_id=U64, snap_id=U64, fill=st.booleans()))
def test_client_requests_round_trip(m: pb.ClientRequest) -> None:
    assert pb.ClientRequest.FromString(m.SerializeToString()) == m


@fuzz(500)
@given(st.binary(max_size=512))
def test_protobuf_messages_take_arbitrary_bytes(data: bytes) -> None:
    target_proto(data)


@fuzz(500)
@given(mutated(corpus("proto")))
def test_protobuf_messages_take_mutated_bytes(data: bytes) -> None:
    target_proto(data)


def test_protobuf_nesting_and_length_fields_are_decode_errors() -> None:
    deep = b"\x9a\x01\x7f" * 200  # field 19 (GroupInfo list) nested far beyond the recursion limit
    for raw in (b"\x0a\xff\xff\xff\xff\x0f", deep, b"\x3a" + b"\xff" * 10):
        with pytest.raises(DecodeError):
            pb.ClientResponse.FromString(raw)
