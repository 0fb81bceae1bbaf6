#!/usr/bin/env python3
"""What authenticating the data port costs per frame (raftblock/wire/auth.py): seal (sender) and open (receiver)
of one frame carrying a 4 KiB, 64 KiB and 1 MiB payload, next to the baseline every frame pays anyway (encoding
it and checking its CRC32C in the decoder). Medians of `--rounds`; µs per frame; the ratio to the baseline.

    .venv/bin/python bench/micro_auth.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from raftblock.wire.auth import KeyRing, Session, head24_of, session_id
from raftblock.wire.framing import FrameDecoder, FrameType, encode_frame


def _per_frame(fn: object, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t) / n * 1e6


def _plain(message: bytes, payload: bytes) -> None:
    dec = FrameDecoder()
    for p in encode_frame(FrameType.RAFT, 1, message, [payload]):
        dec.feed(p)
    dec.next_event()


def _signed(message: bytes, payload: bytes, tx: Session, rx: Session) -> None:
    dec = FrameDecoder()
    for p in tx.seal(encode_frame(FrameType.RAFT, 1, message, [payload])):
        dec.feed(p)
    f = dec.next_event()
    rx.open(f, head24_of(f), allow_volume=False)  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ring = KeyRing({1: bytes(range(32))}, 1)
    sid = session_id(b"a" * 16, b"b" * 16)
    rows = []
    for size in (4096, 65536, 1 << 20):
        payload = bytes(size)
        message = b"m" * 40
        n = max(50, 20_000_000 // (size + 2000))
        base, auth = [], []
        for _ in range(args.rounds):
            tx, rx = Session(ring, sid, True), Session(ring, sid, False)
            base.append(_per_frame(lambda m=message, p=payload: _plain(m, p), n))
            auth.append(_per_frame(lambda m=message, p=payload, t=tx, r=rx: _signed(m, p, t, r), n))
        b, a = statistics.median(base), statistics.median(auth)
        rows.append((size, b, a))
    print("| payload | frame without auth (µs) | with HMAC-SHA256 seal + open (µs) | added (µs) | ratio |")
    print("|---|---|---|---|---|")
    for size, b, a in rows:
        print(f"| {size // 1024} KiB | {b:.1f} | {a:.1f} | {a - b:.1f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
