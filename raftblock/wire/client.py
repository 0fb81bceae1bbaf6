"""The client protocol's codes (docs/format/wire.md, "Client RPC"): what a data-plane client and a storage
node agree on, without either importing the other.

Rules:
1. Op and status codes are wire values: never renumbered, only added.
2. Clients (the gateway, the CLI, a member reading from another) import these; the node runtime serves them.
"""

from __future__ import annotations

# ClientRequest.op
OP_C_WRITE, OP_C_READ, OP_C_TRIM, OP_C_STATUS, OP_C_NODE_STATUS, OP_C_REPLICA_READ, OP_C_BLOCK_STATUS = range(1, 8)
OP_C_SCRUB_CRCS, OP_C_SCRUB_REPAIR = 8, 9  # member to member (control/scrub.py)
OP_C_SNAP, OP_C_UNSNAP = 10, 11  # pin / unpin snapshot `snap_id` in the group (docs/snapshots.md section 1)

# ClientResponse.status
ST_OK, ST_NOT_LEADER, ST_UNKNOWN_GROUP, ST_UNAVAILABLE, ST_BAD_REQUEST, ST_CORRUPT, ST_NO_SPACE, ST_STALE_EPOCH = range(8)

BLOCK_STATUS_BLOCKS_MAX = 1 << 16  # one BLOCK_STATUS request covers at most 256 MiB
