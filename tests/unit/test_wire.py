"""Wire framing and codecs (docs/format/wire.md): round trips and the reader's cases."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from raftblock.wire.framing import (
    BIG_FRAME_BYTES,
    BIG_FRAME_BYTES_MAX,
    HEADER_SIZE,
    BadFrame,
    FatalFrameError,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_frame_bytes,
)
from raftblock.wire.ops import OP_TRIM, OP_WRITE, BlockOp, decode_batch, encode_batch
from raftblock.wire.raftcodec import decode_heartbeats, decode_raft, encode_heartbeats, encode_raft


def _frames(raw: bytes, step: int = 0) -> list[Frame | BadFrame]:
    dec = FrameDecoder()
    out: list[Frame | BadFrame] = []
    chunks = [raw] if step == 0 else [raw[i : i + step] for i in range(0, len(raw), step)]
    for c in chunks:
        dec.feed(c)
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    return out


@given(st.binary(max_size=300), st.binary(max_size=5000), st.integers(0, 2**64 - 1), st.integers(1, 97))
@settings(max_examples=60, deadline=None)
def test_round_trip_any_split(message: bytes, payload: bytes, group: int, step: int) -> None:
    raw = encode_frame_bytes(FrameType.RAFT, group, message, [payload[:7], payload[7:]])
    (f,) = _frames(raw, step)
    assert isinstance(f, Frame)
    assert (f.type, f.group, f.message, f.payload) == (FrameType.RAFT, group, message, payload)


def test_truncated_frame_waits_for_more() -> None:
    raw = encode_frame_bytes(FrameType.HELLO, 0, b"hello", [b"x" * 100])
    dec = FrameDecoder()
    dec.feed(raw[:-1])
    assert dec.next_event() is None
    dec.feed(raw[-1:])
    assert isinstance(dec.next_event(), Frame)


def test_bad_crc_drops_frame_and_stream_goes_on() -> None:
    bad = bytearray(encode_frame_bytes(FrameType.RAFT, 5, b"msg", [b"payload"]))
    bad[-1] ^= 0xFF  # flip a payload bit: the CRC covers the payload too
    good = encode_frame_bytes(FrameType.RAFT, 6, b"ok")
    evs = _frames(bytes(bad) + good)
    assert isinstance(evs[0], BadFrame) and evs[0].counter == "frames_bad_crc" and evs[0].group == 5
    assert isinstance(evs[1], Frame) and evs[1].group == 6


def test_bad_magic_and_version_are_fatal() -> None:
    raw = bytearray(encode_frame_bytes(FrameType.RAFT, 1, b"m"))
    raw[0:2] = b"XX"
    with pytest.raises(FatalFrameError) as e:
        _frames(bytes(raw))
    assert e.value.counter == "frames_bad_magic"
    raw = bytearray(encode_frame_bytes(FrameType.RAFT, 1, b"m"))
    raw[2] = 9
    with pytest.raises(FatalFrameError):
        _frames(bytes(raw))


def test_oversize_lengths_are_fatal() -> None:
    raw = bytearray(encode_frame_bytes(FrameType.RAFT, 1, b"m"))
    struct.pack_into("<I", raw, 20, 1 << 30)
    with pytest.raises(FatalFrameError) as e:
        _frames(bytes(raw))
    assert e.value.counter == "frames_too_large"


def test_unknown_type_is_delivered_for_the_caller_to_refuse() -> None:
    (f,) = _frames(encode_frame_bytes(200, 3, b"?"))
    assert isinstance(f, Frame) and f.type == 200


def test_payload_is_not_copied_into_message() -> None:
    parts = encode_frame(FrameType.CLIENT_REQ, 1, b"m", [memoryview(b"B" * 4096)])
    assert len(parts) == 3 and len(parts[0]) == HEADER_SIZE and isinstance(parts[2], memoryview)


def test_raft_message_round_trip_with_entries_and_snapshot_chunk() -> None:
    meta = SnapshotMeta(40, 3, ConfState(frozenset({NodeId(1), NodeId(2), NodeId(3)}), epoch=9))
    m = Message(
        MessageType.APP,
        GroupId(77),
        NodeId(1),
        NodeId(2),
        5,
        log_term=4,
        index=41,
        entries=[Entry(5, 42, EntryType.NORMAL, b"a" * 5000), Entry(5, 43, EntryType.NOOP, b"")],
        commit=40,
        lease_tick=-(1 << 62),
        snap_meta=meta,
        chunk_index=2,
        chunk_total=3,
        data=b"chunk",
        epoch=9,
    )
    (f,) = _frames(b"".join(bytes(p) for p in encode_raft(m)))
    assert isinstance(f, Frame) and f.group == 77
    d = decode_raft(f.group, f.message, f.payload)
    assert (d.type, d.group, d.src, d.dst, d.term, d.log_term, d.index, d.commit) == (
        MessageType.APP, 77, 1, 2, 5, 4, 41, 40)
    assert d.entries == m.entries and d.data == b"chunk" and d.epoch == 9 and d.lease_tick == -(1 << 62)
    assert d.snap_meta is not None and d.snap_meta.conf == meta.conf and d.snap_meta.index == 40


def test_raft_payload_length_mismatch_is_malformed() -> None:
    m = Message(MessageType.APP, GroupId(1), NodeId(1), NodeId(2), 1, entries=[Entry(1, 1, EntryType.NORMAL, b"xy")])
    parts = encode_raft(m)
    with pytest.raises(ValueError):
        decode_raft(1, bytes(parts[1]), b"x")


def test_heartbeat_batch_round_trip() -> None:
    msgs = [
        Message(MessageType.HEARTBEAT, GroupId(g), NodeId(1), NodeId(3), 7 + g, commit=g * 10, context=g,
                lease_tick=100 + g, epoch=2)
        for g in range(1, 101)
    ]
    (f,) = _frames(b"".join(bytes(p) for p in encode_heartbeats(NodeId(1), NodeId(3), msgs, False)))
    assert isinstance(f, Frame) and f.type == FrameType.HEARTBEATS
    out = decode_heartbeats(f.message)
    assert [(m.group, m.term, m.commit, m.context, m.lease_tick, m.type) for m in out] == [
        (m.group, m.term, m.commit, m.context, m.lease_tick, MessageType.HEARTBEAT) for m in msgs
    ]
    bad = pb.HeartbeatBatch(group=[1, 2], term=[1])
    with pytest.raises(ValueError):
        decode_heartbeats(bad.SerializeToString())


def test_ops_batch_round_trip() -> None:
    ops = [
        BlockOp(OP_WRITE, 5 << 32, 3, 2, [1, 2], b"x" * 8192),
        BlockOp(OP_TRIM, 5 << 32, 100, 50),
    ]
    back = decode_batch(encode_batch(ops))
    assert [(o.kind, o.extent_id, o.block, o.count, list(o.crcs), bytes(o.data)) for o in back] == [
        (o.kind, o.extent_id, o.block, o.count, list(o.crcs), bytes(o.data)) for o in ops
    ]
    with pytest.raises(ValueError):
        decode_batch(encode_batch(ops)[:-1])


def test_named_ops_carry_their_name_and_unnamed_ones_keep_the_old_format() -> None:
    """Ops with a gateway's name (exactly-once apply) round-trip it; unnamed ops encode exactly as before
    names existed (flags byte 0), so an old log still decodes; an unknown flag is a malformed batch."""
    named = [
        BlockOp(OP_WRITE, 5 << 32, 3, 1, [7], b"y" * 4096, client=0xABCDEF, wid=42, low=40),
        BlockOp(OP_TRIM, 5 << 32, 9, 4, client=0xABCDEF, wid=43, low=40),
        BlockOp(OP_WRITE, 5 << 32, 11, 1, [8], b"z" * 4096),
    ]
    raw = encode_batch(named)
    back = decode_batch(raw)
    assert [(o.client, o.wid, o.low) for o in back] == [(0xABCDEF, 42, 40), (0xABCDEF, 43, 40), (0, 0, 0)]
    assert [bytes(o.data) for o in back] == [b"y" * 4096, b"", b"z" * 4096]
    assert sum(o.encoded_size() for o in named) + 2 == len(raw)
    old = encode_batch([BlockOp(OP_TRIM, 5 << 32, 100, 50)])
    assert old == struct.pack("<HBBHIQII", 1, OP_TRIM, 0, 0, 50, 5 << 32, 100, 0)
    bad = bytearray(old)
    bad[3] = 0x80  # the first op's flags byte
    with pytest.raises(ValueError, match="flags"):
        decode_batch(bytes(bad))


def _frames_buffered(raw: bytes, rng: random.Random) -> list[Frame | BadFrame]:
    """As asyncio.BufferedProtocol drives the decoder: the 'kernel' copies at most what get_buffer offers."""
    dec = FrameDecoder()
    out: list[Frame | BadFrame] = []
    pos = 0
    while pos < len(raw):
        buf = dec.get_buffer(-1)
        n = min(len(buf), len(raw) - pos, rng.choice((1, 5, 28, 700, 4096, 70000, 1 << 20)))
        buf[:n] = raw[pos : pos + n]
        pos += n
        dec.buffer_updated(n)
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    assert dec.buffered_bytes() == 0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_big_and_small_frames_through_feed_and_buffered_reads(seed: int) -> None:
    """Frames past BIG_FRAME_BYTES are read into a buffer of their own (payload a view of it); every split
    point, both ways in, and a corrupt big frame between good ones."""
    rng = random.Random(seed)
    sent = []
    raw = bytearray()
    for i in range(30):
        size = rng.choice((0, 10, 4096, BIG_FRAME_BYTES - 40, BIG_FRAME_BYTES, 200_000, 1 << 20, 5 << 20))
        msg, pay = rng.randbytes(rng.randrange(0, 50)), rng.randbytes(size)
        frame = bytearray(encode_frame_bytes(FrameType.RAFT, i, msg, [pay]))
        corrupt = size >= BIG_FRAME_BYTES and rng.random() < 0.2
        if corrupt:
            frame[-1] ^= 0x40
        sent.append((i, msg, pay, corrupt))
        raw += frame
    step = rng.choice((1000, 65536, 300_001))
    for got in (_frames(bytes(raw), step), _frames_buffered(bytes(raw), rng)):
        assert len(got) == len(sent)
        for ev, (i, msg, pay, corrupt) in zip(got, sent, strict=True):
            if corrupt:
                assert isinstance(ev, BadFrame) and ev.group == i
            else:
                assert isinstance(ev, Frame) and (ev.group, ev.message, bytes(ev.payload)) == (i, msg, pay)


def test_a_forged_big_header_allocates_at_most_big_frame_bytes_max() -> None:
    """A header announcing a frame longer than BIG_FRAME_BYTES_MAX gets no buffer of its own: the bytes
    accumulate as they arrive (what a connection holds is what it was sent)."""
    dec = FrameDecoder()
    head = encode_frame_bytes(FrameType.RAFT, 1, b"m", [bytes(BIG_FRAME_BYTES_MAX + 1)])[:HEADER_SIZE]
    dec.feed(head)
    assert dec.next_event() is None
    assert len(dec.get_buffer(-1)) <= 256 << 10  # the receive scratch buffer, not a 4 MiB+ allocation
    assert dec.buffered_bytes() == HEADER_SIZE
