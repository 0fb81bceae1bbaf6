# Small libnbd operations for the integration tests (run with /usr/bin/python3; see README.md).
#
#   write URI OFFSET INFILE [--fua]     write INFILE's bytes at OFFSET
#   read  URI OFFSET LENGTH OUTFILE     read into OUTFILE
#   sha256 URI [OFFSET LENGTH]          checksum of a range (default: the whole export)
#   info URI                            size, block sizes and can_* flags as libnbd sees them
# Prints one JSON object: {"ok": true, ...} or {"ok": false, "errno": "EIO", "errnum": 5, "message": ...}.
# An NBD error reply is a normal outcome (exit 0); only bad usage exits non-zero.
import hashlib
import json
import sys

import nbd

CHUNK = 4 << 20


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def main(argv):
    op, uri = argv[0], argv[1]
    out = {"ok": True}
    try:
        h = connect(uri)
        if op == "write":
            offset, path = int(argv[2]), argv[3]
            flags = nbd.CMD_FLAG_FUA if "--fua" in argv else 0
            with open(path, "rb") as f:
                data = f.read()
            for pos in range(0, len(data), CHUNK):
                h.pwrite(data[pos:pos + CHUNK], offset + pos, flags)
            out["written"] = len(data)
        elif op == "read":
            offset, length, path = int(argv[2]), int(argv[3]), argv[4]
            with open(path, "wb") as f:
                for pos in range(0, length, CHUNK):
                    f.write(h.pread(min(CHUNK, length - pos), offset + pos))
        elif op == "sha256":
            size = h.get_size()
            offset = int(argv[2]) if len(argv) > 2 else 0
            length = int(argv[3]) if len(argv) > 3 else size - offset
            s = hashlib.sha256()
            for pos in range(0, length, CHUNK):
                s.update(h.pread(min(CHUNK, length - pos), offset + pos))
            out["sha256"] = s.hexdigest()
        elif op == "info":
            out.update(
                size=h.get_size(),
                block_size_min=h.get_block_size(nbd.SIZE_MINIMUM),
                block_size_preferred=h.get_block_size(nbd.SIZE_PREFERRED),
                block_size_max=h.get_block_size(nbd.SIZE_MAXIMUM),
                can_flush=h.can_flush(), can_fua=h.can_fua(), can_trim=h.can_trim(), can_zero=h.can_zero(),
                can_fast_zero=h.can_fast_zero(), can_cache=h.can_cache(), can_multi_conn=h.can_multi_conn(),
                is_read_only=h.is_read_only(), is_rotational=h.is_rotational(),
                structured_replies=h.get_structured_replies_negotiated(),
                base_allocation=h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
            )
        else:
            print(f"unknown op {op}", file=sys.stderr)
            return 2
        h.shutdown()
    except nbd.Error as e:
        out = {"ok": False, "errno": e.errno, "errnum": e.errnum, "message": e.string}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
