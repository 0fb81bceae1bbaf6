"""Identities of the data plane, in one place: an extent id names its extent group.

Rules:
1. An extent id is `group_id << 32 | extent_index`: the group that replicates an extent is read off its id,
   by the gateway (routing), the nodes (edge checks, images, scrub) and the CLI alike.
2. Node ids, group ids and volume ids are plain integers >= 1; node ids are not addresses.
"""

from __future__ import annotations

EXTENT_INDEX_BITS = 32


def extent_id(group_id: int, extent_index: int) -> int:
    return group_id << EXTENT_INDEX_BITS | extent_index


def group_of_extent(extent_id: int) -> int:
    return extent_id >> EXTENT_INDEX_BITS
