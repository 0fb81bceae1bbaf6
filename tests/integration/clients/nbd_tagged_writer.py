# Power-cut load: tagged 4 KiB blocks with a journal of what was acknowledged (run with /usr/bin/python3).
#
#   nbd_tagged_writer.py URI JOURNAL NBLOCKS SEED FIRST_SEQ QD MAX_OPS [TIMES [SECONDS]]
#
# Writes 1..8-block requests at random block-aligned offsets in [0, NBLOCKS), up to QD in flight, never two
# in flight on the same block (so "the newest acknowledged write of a block" is well defined), some with
# NBD_CMD_FLAG_FUA, and an NBD_CMD_FLUSH now and then. Every 4 KiB block of a write with sequence number
# SEQ holds the 32-byte record (b"PWRCUT01", SEQ, block, SEQ ^ block ^ CHECK) repeated 128 times.
#
# Journal (appended, one line per event):
#   S W seq first_block nblocks fua     before the request is sent (written to the OS, not fsynced)
#   S F seq                             before a flush is sent
#   A seq                               after the server acknowledged request seq (fsynced per batch)
#   X seq errno                         the request failed
#   END reason
# TIMES (optional): a file of "CLOCK_MONOTONIC_NS COMPLETIONS" lines, one per batch of completions (the bench's
# pause measurement around a kill); SECONDS (optional): stop submitting after that long.
# Runs until MAX_OPS requests or until the connection fails (the server was killed), then prints
# {"submitted": n, "acked": n, "failed": n, "end": reason}.
import json
import os
import random
import struct
import sys
import time

import nbd

BLOCK = 4096
CHECK = 0x5A5A5A5A5A5A5A5A


def block_bytes(seq, block):
    return struct.pack(">8sQQQ", b"PWRCUT01", seq, block, seq ^ block ^ CHECK) * (BLOCK // 32)


def main(argv):
    uri, journal_path = argv[0], argv[1]
    nblocks, seed, seq, qd, max_ops = map(int, argv[2:7])
    times = open(argv[7], "a", buffering=1 << 16) if len(argv) > 7 else None
    stop_at = time.monotonic() + float(argv[8]) if len(argv) > 8 else float("inf")
    rng = random.Random(seed)
    journal = open(journal_path, "a", buffering=1 << 16)
    submitted = acked = failed = 0
    end = "max_ops"
    pending = {}  # cookie -> (seq, blocks, buffer)
    busy = set()
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        while submitted < max_ops or pending:
            if time.monotonic() >= stop_at:
                max_ops = submitted  # drain what is in flight, submit nothing more
            while submitted < max_ops and len(pending) < qd:
                if rng.random() < 0.04:
                    journal.write(f"S F {seq}\n")
                    journal.flush()
                    cookie = h.aio_flush()
                    pending[cookie] = (seq, (), None)
                else:
                    n = rng.choice((1, 1, 1, 2, 3, 4, 8))
                    for _ in range(20):
                        first = rng.randrange(0, nblocks - n + 1)
                        blocks = range(first, first + n)
                        if busy.isdisjoint(blocks):
                            break
                    else:
                        break  # all candidates busy: wait for completions
                    fua = rng.random() < 0.2
                    buf = nbd.Buffer.from_bytearray(bytearray(b"".join(block_bytes(seq, b) for b in blocks)))
                    journal.write(f"S W {seq} {first} {n} {int(fua)}\n")
                    journal.flush()
                    cookie = h.aio_pwrite(buf, first * BLOCK, flags=nbd.CMD_FLAG_FUA if fua else 0)
                    pending[cookie] = (seq, blocks, buf)
                    busy.update(blocks)
                seq += 1
                submitted += 1
            h.poll(-1)
            batch = []
            for cookie in list(pending):
                try:
                    done = h.aio_command_completed(cookie)
                    ok = True
                except nbd.Error as e:
                    done, ok = True, False
                    err = e.errno or str(e.errnum)
                if done:
                    s, blocks, _ = pending.pop(cookie)
                    busy.difference_update(blocks)
                    if ok:
                        batch.append(f"A {s}\n")
                        acked += 1
                    else:
                        batch.append(f"X {s} {err}\n")
                        failed += 1
            if batch and times is not None:
                times.write(f"{time.monotonic_ns()} {len(batch)}\n")
            if batch:
                journal.write("".join(batch))
                journal.flush()
                os.fsync(journal.fileno())
            if failed:
                end = "request failed"
                break
    except nbd.Error as e:
        end = f"nbd error: {e}"
        # replies that arrived before the connection died still count as acknowledged
        for cookie, (s, _, _) in list(pending.items()):
            try:
                if h.aio_command_completed(cookie):
                    journal.write(f"A {s}\n")
                    acked += 1
            except nbd.Error:
                pass
    if times is not None:
        times.close()
    journal.write(f"END {end}\n")
    journal.flush()
    os.fsync(journal.fileno())
    print(json.dumps({"submitted": submitted, "acked": acked, "failed": failed, "end": end}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
