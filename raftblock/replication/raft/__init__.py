"""Extent-group Raft: a core without I/O (core.RaftCore), its log, storage interface and types.

The node runtime (later) drives many RaftCore objects on one asyncio loop; the simulator
(raftblock.testing.sim) drives the same objects on virtual time. See docs/raft.md.
"""

from .core import MUTATIONS, RaftConfig, RaftCore, Ready
from .storage import MemoryStorage, Storage, bootstrap_snapshot
from .types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    GroupId,
    HardState,
    Message,
    MessageType,
    NodeId,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
)

__all__ = [
    "MUTATIONS",
    "NO_NODE",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "GroupId",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NodeId",
    "RaftConfig",
    "RaftCore",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "Storage",
    "bootstrap_snapshot",
]
