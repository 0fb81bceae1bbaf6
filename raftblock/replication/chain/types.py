# Chain replication value types: configurations, records, snapshots, messages, the Ready batch.
#
# Rules:
# 1. Plain classes with __slots__ (the simulator creates many); treat an instance as immutable once it
#    has been handed to another component (a Record in a Ready also sits in the core's log).
# 2. Every message carries the group id and the sender's configuration `epoch`; a receiver refuses a
#    message whose epoch differs from its own (docs/chain.md, "epochs").
# 3. Node and group ids are the same NewTypes as Raft's: one cluster, one id space.
from __future__ import annotations

from enum import IntEnum

from raftblock.replication.raft.types import NO_NODE, GroupId, NodeId

__all__ = [
    "NO_NODE",
    "ChainConfig",
    "ChainMessage",
    "ChainReady",
    "ChainSnapshot",
    "GroupId",
    "MessageType",
    "NodeId",
    "Record",
]


class ChainConfig:
    """One configuration of a chain group, as the metadata group keeps it: head first, tail last."""

    __slots__ = ("epoch", "members")

    def __init__(self, epoch: int, members: tuple[NodeId, ...]) -> None:
        assert epoch >= 1, "epoch 0 means 'no configuration'"
        assert members and len(set(members)) == len(members) and NO_NODE not in members
        self.epoch = epoch
        self.members = members

    @property
    def head(self) -> NodeId:
        return self.members[0]

    @property
    def tail(self) -> NodeId:
        return self.members[-1]

    def neighbours(self, node: NodeId) -> tuple[NodeId, NodeId]:
        """(predecessor, successor) of `node`, NO_NODE at the ends; (NO_NODE, NO_NODE) if not a member."""
        if node not in self.members:
            return NO_NODE, NO_NODE
        i = self.members.index(node)
        pred = self.members[i - 1] if i > 0 else NO_NODE
        succ = self.members[i + 1] if i + 1 < len(self.members) else NO_NODE
        return pred, succ

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChainConfig) and self.epoch == other.epoch and self.members == other.members

    def __hash__(self) -> int:
        return hash((self.epoch, self.members))

    def __repr__(self) -> str:
        return f"ChainConfig(e={self.epoch}, {'->'.join(str(m) for m in self.members)})"


class Record:
    """One write in the chain's log: `seq` is assigned by the head, consecutive from 1; `epoch` is the
    configuration epoch its head proposed it in. (epoch, seq) names a record: one head per epoch assigns
    each seq once, so two records with the same name hold the same data (log matching, as Raft's
    (term, index))."""

    __slots__ = ("seq", "data", "epoch")

    def __init__(self, seq: int, data: bytes, epoch: int = 0) -> None:
        assert seq >= 1
        self.seq = seq
        self.data = data
        self.epoch = epoch

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Record) and self.seq == other.seq and self.data == other.data
                and self.epoch == other.epoch)

    def __hash__(self) -> int:
        return hash((self.seq, self.data))

    def __repr__(self) -> str:
        return f"Record({self.seq}@e{self.epoch}, {len(self.data)}B)"


class ChainSnapshot:
    """A state-machine image at applied seq `seq` (what a joining member starts from)."""

    __slots__ = ("seq", "image", "epoch")

    def __init__(self, seq: int, image: bytes, epoch: int = 0) -> None:
        self.seq = seq
        self.image = image
        self.epoch = epoch  # the epoch of the record at `seq` (log matching after the snapshot)

    def __repr__(self) -> str:
        return f"ChainSnapshot({self.seq}, {len(self.image)}B)"


class MessageType(IntEnum):
    WRITE = 1  # pred -> succ: `records` (maybe none: an answer to SYNC); `seq` = sender's last seq
    ACK = 2  # succ -> pred: everything <= `seq` is durable here and on every member after me
    SYNC = 3  # succ -> pred, on a new epoch: "my log ends at `seq` (its record's epoch: `log_epoch`)"
    SNAPSHOT = 4  # pred -> succ: state-machine image at `seq` (`log_epoch`) in `data`; WRITEs follow


class ChainMessage:
    __slots__ = ("type", "group", "src", "dst", "epoch", "seq", "records", "data", "log_epoch")

    def __init__(
        self,
        type: MessageType,
        group: GroupId,
        src: NodeId,
        dst: NodeId,
        epoch: int,
        seq: int = 0,
        records: tuple[Record, ...] = (),
        data: bytes = b"",
        log_epoch: int = 0,
    ) -> None:
        self.type = type
        self.group = group
        self.src = src
        self.dst = dst
        self.epoch = epoch
        self.seq = seq
        self.records = records
        self.data = data
        self.log_epoch = log_epoch  # SYNC, SNAPSHOT: the epoch of the record at `seq`

    def __repr__(self) -> str:
        extra = f", {len(self.records)} rec" if self.records else ""
        return f"{self.type.name}(e={self.epoch}, {self.src}->{self.dst}, seq={self.seq}{extra})"


class ChainReady:
    """One batch of work for the runtime; the contract is at the top of core.py."""

    __slots__ = ("messages_now", "snapshot", "records", "messages", "applies", "client_acks", "reads")

    def __init__(self) -> None:
        self.messages_now: list[ChainMessage] = []  # WRITE/SNAPSHOT/SYNC: may leave before persisting
        self.snapshot: ChainSnapshot | None = None  # persist (replacing the log), then install
        self.records: list[Record] = []  # persist in order, after `snapshot`
        self.messages: list[ChainMessage] = []  # ACKs: only after the persist above
        self.applies: list[Record] = []  # apply in order (after installing `snapshot`)
        self.client_acks: list[int] = []  # head only: answer the client that wrote these seqs
        self.reads: list[tuple[int, int]] = []  # (ctx, seq): answer once `applies` are applied
