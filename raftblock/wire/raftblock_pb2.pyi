# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("node_id", "role", "version", "nonce", "auth")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    role: int
    version: int
    nonce: bytes
    auth: int
    def __init__(self, node_id: _Optional[int] = ..., role: _Optional[int] = ..., version: _Optional[int] = ..., nonce: _Optional[bytes] = ..., auth: _Optional[int] = ...) -> None: ...

class EntryHeader(_message.Message):
    __slots__ = ("term", "index", "type", "data_len")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_LEN_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    type: int
    data_len: int
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., type: _Optional[int] = ..., data_len: _Optional[int] = ...) -> None: ...

class SnapMeta(_message.Message):
    __slots__ = ("index", "term", "voters", "epoch")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ...) -> None: ...

class RaftMsg(_message.Message):
    __slots__ = ("type", "src", "dst", "term", "log_term", "index", "commit", "reject", "reject_hint", "context", "lease_tick", "force", "snap_meta", "chunk_index", "chunk_total", "data_len", "epoch", "entries")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    REJECT_HINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TICK_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    SNAP_META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_LEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    type: int
    src: int
    dst: int
    term: int
    log_term: int
    index: int
    commit: int
    reject: bool
    reject_hint: int
    context: int
    lease_tick: int
    force: bool
    snap_meta: SnapMeta
    chunk_index: int
    chunk_total: int
    data_len: int
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[EntryHeader]
    def __init__(self, type: _Optional[int] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., term: _Optional[int] = ..., log_term: _Optional[int] = ..., index: _Optional[int] = ..., commit: _Optional[int] = ..., reject: _Optional[bool] = ..., reject_hint: _Optional[int] = ..., context: _Optional[int] = ..., lease_tick: _Optional[int] = ..., force: _Optional[bool] = ..., snap_meta: _Optional[_Union[SnapMeta, _Mapping]] = ..., chunk_index: _Optional[int] = ..., chunk_total: _Optional[int] = ..., data_len: _Optional[int] = ..., epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[EntryHeader, _Mapping]]] = ...) -> None: ...

class ChainRecordHeader(_message.Message):
    __slots__ = ("seq", "data_len", "epoch")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_LEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    data_len: int
    epoch: int
    def __init__(self, seq: _Optional[int] = ..., data_len: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ChainMsg(_message.Message):
    __slots__ = ("type", "src", "dst", "epoch", "seq", "records", "data_len", "log_epoch", "image_offset", "image_total")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DATA_LEN_FIELD_NUMBER: _ClassVar[int]
    LOG_EPOCH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    type: int
    src: int
    dst: int
    epoch: int
    seq: int
    records: _containers.RepeatedCompositeFieldContainer[ChainRecordHeader]
    data_len: int
    log_epoch: int
    image_offset: int
    image_total: int
    def __init__(self, type: _Optional[int] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., records: _Optional[_Iterable[_Union[ChainRecordHeader, _Mapping]]] = ..., data_len: _Optional[int] = ..., log_epoch: _Optional[int] = ..., image_offset: _Optional[int] = ..., image_total: _Optional[int] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("src", "dst", "response", "group", "term", "commit", "context", "lease_tick", "epoch")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TICK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    src: int
    dst: int
    response: bool
    group: _containers.RepeatedScalarFieldContainer[int]
    term: _containers.RepeatedScalarFieldContainer[int]
    commit: _containers.RepeatedScalarFieldContainer[int]
    context: _containers.RepeatedScalarFieldContainer[int]
    lease_tick: _containers.RepeatedScalarFieldContainer[int]
    epoch: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, src: _Optional[int] = ..., dst: _Optional[int] = ..., response: _Optional[bool] = ..., group: _Optional[_Iterable[int]] = ..., term: _Optional[_Iterable[int]] = ..., commit: _Optional[_Iterable[int]] = ..., context: _Optional[_Iterable[int]] = ..., lease_tick: _Optional[_Iterable[int]] = ..., epoch: _Optional[_Iterable[int]] = ...) -> None: ...

class ClientRequest(_message.Message):
    __slots__ = ("request_id", "op", "extent_id", "block", "count", "crcs", "epoch", "min_applied", "client_id", "write_id", "low_water", "source_node", "snap_id", "since_snap_id", "snap_stats", "fill", "seal_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    EXTENT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CRCS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MIN_APPLIED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    LOW_WATER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    SNAP_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_SNAP_ID_FIELD_NUMBER: _ClassVar[int]
    SNAP_STATS_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    SEAL_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    op: int
    extent_id: int
    block: int
    count: int
    crcs: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    min_applied: int
    client_id: int
    write_id: int
    low_water: int
    source_node: int
    snap_id: int
    since_snap_id: int
    snap_stats: bool
    fill: bool
    seal_at: int
    def __init__(self, request_id: _Optional[int] = ..., op: _Optional[int] = ..., extent_id: _Optional[int] = ..., block: _Optional[int] = ..., count: _Optional[int] = ..., crcs: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., min_applied: _Optional[int] = ..., client_id: _Optional[int] = ..., write_id: _Optional[int] = ..., low_water: _Optional[int] = ..., source_node: _Optional[int] = ..., snap_id: _Optional[int] = ..., since_snap_id: _Optional[int] = ..., snap_stats: _Optional[bool] = ..., fill: _Optional[bool] = ..., seal_at: _Optional[int] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("group", "role", "term", "leader", "commit", "applied", "last_index", "snap_index", "lease", "allocated_bytes", "mode", "tail", "synced", "repair_node", "repair_bytes_done", "repair_bytes_total", "repair_elapsed_ms", "snap_ids", "snap_unique_blocks")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAP_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    REPAIR_NODE_FIELD_NUMBER: _ClassVar[int]
    REPAIR_BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    REPAIR_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPAIR_ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    SNAP_IDS_FIELD_NUMBER: _ClassVar[int]
    SNAP_UNIQUE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    group: int
    role: int
    term: int
    leader: int
    commit: int
    applied: int
    last_index: int
    snap_index: int
    lease: bool
    allocated_bytes: int
    mode: str
    tail: int
    synced: bool
    repair_node: int
    repair_bytes_done: int
    repair_bytes_total: int
    repair_elapsed_ms: int
    snap_ids: _containers.RepeatedScalarFieldContainer[int]
    snap_unique_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group: _Optional[int] = ..., role: _Optional[int] = ..., term: _Optional[int] = ..., leader: _Optional[int] = ..., commit: _Optional[int] = ..., applied: _Optional[int] = ..., last_index: _Optional[int] = ..., snap_index: _Optional[int] = ..., lease: _Optional[bool] = ..., allocated_bytes: _Optional[int] = ..., mode: _Optional[str] = ..., tail: _Optional[int] = ..., synced: _Optional[bool] = ..., repair_node: _Optional[int] = ..., repair_bytes_done: _Optional[int] = ..., repair_bytes_total: _Optional[int] = ..., repair_elapsed_ms: _Optional[int] = ..., snap_ids: _Optional[_Iterable[int]] = ..., snap_unique_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class ClientResponse(_message.Message):
    __slots__ = ("request_id", "status", "leader_hint", "leader_address", "error", "crcs", "groups", "counters", "node_id", "runs", "applied")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LEADER_HINT_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CRCS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    status: int
    leader_hint: int
    leader_address: str
    error: str
    crcs: _containers.RepeatedScalarFieldContainer[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    counters: _containers.ScalarMap[str, int]
    node_id: int
    runs: _containers.RepeatedScalarFieldContainer[int]
    applied: int
    def __init__(self, request_id: _Optional[int] = ..., status: _Optional[int] = ..., leader_hint: _Optional[int] = ..., leader_address: _Optional[str] = ..., error: _Optional[str] = ..., crcs: _Optional[_Iterable[int]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., node_id: _Optional[int] = ..., runs: _Optional[_Iterable[int]] = ..., applied: _Optional[int] = ...) -> None: ...
