"""raftblock: a distributed block store. Volumes are cut into extents; extents live in extent groups,
each replicated by Raft or a chain across three racks; a gateway exports volumes over NBD."""

__version__ = "0.1.0"
