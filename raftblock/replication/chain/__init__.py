"""Chain replication: a core without I/O (core.ChainCore) and its types.

The node runtime (later) drives ChainCore objects on one asyncio loop; the simulator
(raftblock.testing.chainsim) drives the same objects on virtual time. See docs/chain.md.
"""

from .core import COUNTERS, MUTATIONS, ChainCore
from .types import (
    NO_NODE,
    ChainConfig,
    ChainMessage,
    ChainReady,
    ChainSnapshot,
    GroupId,
    MessageType,
    NodeId,
    Record,
)

__all__ = [
    "COUNTERS",
    "MUTATIONS",
    "NO_NODE",
    "ChainConfig",
    "ChainCore",
    "ChainMessage",
    "ChainReady",
    "ChainSnapshot",
    "GroupId",
    "MessageType",
    "NodeId",
    "Record",
]
