# One client of a linearizability check (run with /usr/bin/python3: it needs libnbd).
#
#   nbd_history_client.py REPO URI HISTORY CLIENT NBLOCKS SEED SECONDS
#
# One request at a time on one connection: a write of a whole 4 KiB block tagged (CLIENT, seq), or a read
# of a block, on blocks [0, NBLOCKS) picked at random. Every request is recorded in HISTORY (JSONL, streamed)
# with raftblock.testing.linearizability.History (imported from REPO): invoke before sending, then ok (with
# the data read) or timeout (an NBD error or a dropped connection: indeterminate). A dropped connection is
# reopened. Prints {"ops": n, "ok": n, "indeterminate": n}.
import json
import random
import struct
import sys
import time

import nbd


def main(argv):
    repo, uri, path = argv[0], argv[1], argv[2]
    client, nblocks, seed = int(argv[3]), int(argv[4]), int(argv[5])
    seconds = float(argv[6])
    sys.path.insert(0, repo)
    from raftblock.testing.linearizability import History  # noqa: PLC0415 (stdlib-only module)

    rng = random.Random(seed)
    h = History(path)
    counts = {"ops": 0, "ok": 0, "indeterminate": 0}
    end = time.monotonic() + seconds
    conn = None
    seq = 0
    while time.monotonic() < end:
        if conn is None:
            try:
                conn = nbd.NBD()
                conn.connect_uri(uri)
            except nbd.Error:
                conn = None
                time.sleep(0.1)
                continue
        block = rng.randrange(nblocks)
        counts["ops"] += 1
        if rng.random() < 0.5:
            seq += 1
            data = struct.pack(">QQ", client, seq) * 256
            op = h.invoke(client, "w", block, data)
            try:
                conn.pwrite(data, block * 4096)
                h.ok(op)
                counts["ok"] += 1
            except nbd.Error:
                h.timeout(op)
                counts["indeterminate"] += 1
                conn = None
        else:
            op = h.invoke(client, "r", block)
            try:
                got = conn.pread(4096, block * 4096)
                h.ok(op, bytes(got))
                counts["ok"] += 1
            except nbd.Error:
                h.timeout(op)
                counts["indeterminate"] += 1
                conn = None
    h.close()
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
