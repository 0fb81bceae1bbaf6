# Concurrent 512-byte writers into shared 4 KiB blocks (run with /usr/bin/python3; see README.md).
#
#   nbd_sector_writers.py URI NCONN NBLOCKS ROUNDS SEED QD
#
# NCONN processes, one libnbd connection each, start together (a barrier). Sector s of block b belongs to
# connection (b + s) % NCONN, so every 4 KiB block has sectors from every connection. In each round a
# connection writes all its sectors in a shuffled order with up to QD requests in flight, then waits for
# all of them before the next round; so each sector's final content is the last round's, while the
# sectors of one block are written concurrently by several connections and several in-flight requests.
# Sector content: the 16-byte record (b"SECT", round, block, sector) repeated, XORed with nothing else.
# Prints {"ok": bool, "writes": n, "errors": [...]}. Reading back and judging is the test's job.
import json
import multiprocessing as mp
import random
import struct
import sys

import nbd

SECTOR = 512
SECTORS_PER_BLOCK = 8


def sector_bytes(rnd, block, sector):
    return struct.pack(">4sIII", b"SECT", rnd, block, sector) * (SECTOR // 16)


def writer(uri, conn, nconn, nblocks, rounds, seed, qd, barrier, results):
    errors = []
    writes = 0
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        mine = [(b, s) for b in range(nblocks) for s in range(SECTORS_PER_BLOCK) if (b + s) % nconn == conn]
        rng = random.Random(seed * 1000 + conn)
        barrier.wait(timeout=60)
        for rnd in range(rounds):
            rng.shuffle(mine)
            pending = {}
            todo = list(mine)
            while todo or pending:
                while todo and len(pending) < qd:
                    b, s = todo.pop()
                    buf = nbd.Buffer.from_bytearray(bytearray(sector_bytes(rnd, b, s)))
                    cookie = h.aio_pwrite(buf, (b * SECTORS_PER_BLOCK + s) * SECTOR)
                    pending[cookie] = buf
                    writes += 1
                h.poll(-1)
                for cookie in list(pending):
                    try:
                        done = h.aio_command_completed(cookie)
                    except nbd.Error as e:
                        errors.append(f"conn {conn} round {rnd}: {e}")
                        done = True
                    if done:
                        del pending[cookie]
        h.shutdown()
    except Exception as e:  # report, don't hang the barrier
        errors.append(f"conn {conn}: {type(e).__name__}: {e}")
        barrier.abort()
    results.put((conn, writes, errors))


def main(argv):
    uri, nconn, nblocks, rounds, seed, qd = argv[0], *map(int, argv[1:6])
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(nconn)
    results = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, c, nconn, nblocks, rounds, seed, qd, barrier, results))
             for c in range(nconn)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [e for _, _, errs in outcomes for e in errs]
    print(json.dumps({"ok": not errors, "writes": sum(w for _, w, _ in outcomes), "errors": errors[:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
