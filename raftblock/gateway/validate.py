"""The one place NBD requests are checked (nbdkit server/protocol.c `validate_request` style).

Every request framed by the codec passes through `validate_request` before any backend runs; each
violation maps to one NBD error and a message for the log. Inner layers assert instead of checking.

Rules:
1. Command flags must be documented for the command and negotiated (proto.md "Command flags"):
   FUA on any command (SEND_FUA), DF on READ only and only with structured replies, NO_HOLE and
   FAST_ZERO on WRITE_ZEROES only, REQ_ONE on BLOCK_STATUS only. Anything else: EINVAL.
2. Ranges: offset + length must lie inside the export. Past the end, WRITE and WRITE_ZEROES get ENOSPC
   (proto.md: "SHOULD return ENOSPC ... beyond the size of the device"), the rest EINVAL.
3. Sizes: READ and WRITE carry a payload and are bounded by the advertised maximum block size
   (EOVERFLOW); TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS may be larger (a whole-device discard from
   mkfs must be served, not refused). A zero length is EINVAL except for FLUSH, whose offset and length
   must both be zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftblock.gateway import nbd
from raftblock.gateway.nbd import Cmd

_ALLOWED_FLAGS = {
    Cmd.READ: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_DF,
    Cmd.WRITE: nbd.CMD_FLAG_FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: nbd.CMD_FLAG_FUA,
    Cmd.TRIM: nbd.CMD_FLAG_FUA,
    Cmd.CACHE: nbd.CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_REQ_ONE,
}


@dataclass(frozen=True)
class Rejection:
    error: int  # NBD error value
    message: str


def validate_request(
    req: nbd.Request,
    export: nbd.ExportInfo,
    *,
    structured_replies: bool,
    meta_context_ids: tuple[int, ...],
) -> Rejection | None:
    cmd = req.cmd
    allowed = _ALLOWED_FLAGS.get(cmd)  # type: ignore[call-overload]
    if allowed is None:
        return Rejection(nbd.EINVAL, f"unknown command {cmd}")
    name = Cmd(cmd).name
    if req.flags & ~allowed:
        return Rejection(nbd.EINVAL, f"{name}: flags 0x{req.flags:x} not valid for this command")
    if req.flags & nbd.CMD_FLAG_DF and not structured_replies:
        return Rejection(nbd.EINVAL, "READ: DF flag needs structured replies")
    if cmd == Cmd.DISC:
        return None
    if cmd == Cmd.FLUSH:
        if req.offset or req.length:
            return Rejection(nbd.EINVAL, "FLUSH: offset and length must be zero")
        return None
    if req.length == 0:
        return Rejection(nbd.EINVAL, f"{name}: zero length")
    if cmd == Cmd.WRITE and req.oversized:
        return Rejection(nbd.EOVERFLOW, f"WRITE: {req.length} bytes exceed the maximum block size {export.max_block_bytes}")
    if cmd in (Cmd.READ, Cmd.WRITE) and req.length > export.max_block_bytes:
        return Rejection(nbd.EOVERFLOW, f"{name}: {req.length} bytes exceed the maximum block size {export.max_block_bytes}")
    if req.offset + req.length > export.size_bytes:
        err = nbd.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else nbd.EINVAL
        return Rejection(err, f"{name}: range {req.offset}+{req.length} is past the end ({export.size_bytes})")
    if cmd == Cmd.BLOCK_STATUS and not meta_context_ids:
        return Rejection(nbd.EINVAL, "BLOCK_STATUS: no meta context was negotiated")
    if cmd == Cmd.BLOCK_STATUS and not structured_replies:
        return Rejection(nbd.EINVAL, "BLOCK_STATUS: needs structured replies")
    if cmd == Cmd.WRITE_ZEROES and req.flags & nbd.CMD_FLAG_FAST_ZERO and req.flags & nbd.CMD_FLAG_NO_HOLE:
        # Zeroing without making a hole means writing zero blocks: not fast (proto.md NBD_CMD_FLAG_FAST_ZERO).
        return Rejection(nbd.ENOTSUP, "WRITE_ZEROES: NO_HOLE zeroing is not fast")
    return None
