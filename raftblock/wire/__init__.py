"""The wire: protobuf messages (raftblock.proto, generated raftblock_pb2) and the frame codec.

Format: docs/format/wire.md. Nothing here does I/O; nothing here pickles.
"""
