"""Client session tables (raftblock/replication/sessions.py): exactly-once apply of named writes."""

from __future__ import annotations

import random

import pytest

from raftblock.replication.sessions import CLIENTS_MAX, Sessions


def test_a_retry_of_an_applied_write_is_skipped_and_a_new_one_is_not() -> None:
    s = Sessions()
    assert s.admit(7, 1, 1, pos=10)
    assert s.admit(7, 2, 1, pos=11)
    assert not s.admit(7, 1, 1, pos=12)  # the retry of write 1, its first attempt applied at 10
    assert s.admit(7, 3, 1, pos=13)
    assert s.admit(9, 1, 1, pos=14)  # another client's write 1 is another write
    assert s.duplicates == 1


def test_an_attempt_below_the_low_water_mark_is_skipped_even_if_it_never_applied() -> None:
    """The gateway gave up on write 5 (answered it failed) and moved on: a late attempt of it, still in a
    paused old leader's socket, must not apply over what came after."""
    s = Sessions()
    assert s.admit(7, 6, 5, pos=1)
    assert s.admit(7, 7, 7, pos=2)
    assert not s.admit(7, 5, 5, pos=3)
    assert s.admit(0, 5, 0, pos=4) and s.admit(0, 5, 0, pos=5)  # unnamed ops always apply


def test_the_table_survives_encoding_and_prunes_below_the_low_water_mark() -> None:
    s = Sessions()
    for w in range(1, 200):
        assert s.admit(3, w, max(1, w - 8), pos=w)
    data = s.encode()
    back = Sessions.decode(data)
    assert back == s
    assert len(back.clients[3].applied) <= 9  # only ids at or above the mark are kept
    for w in range(1, 200):
        assert not back.admit(3, w, 1, pos=300)
    assert back.admit(3, 200, 191, pos=301)
    assert Sessions.decode(b"") == Sessions()


def test_malformed_tables_are_refused() -> None:
    data = Sessions().encode()
    s = Sessions()
    s.admit(1, 1, 1, 1)
    full = s.encode()
    for bad in (full[:-1], full + b"\0", b"\1\0\0"):
        with pytest.raises(ValueError):
            Sessions.decode(bad)
    assert Sessions.decode(data) == Sessions()


def test_forgetting_clients_is_deterministic_and_bounded() -> None:
    """Two replicas that apply the same named ops in the same order make the same decisions and hold the
    same table, also when clients are forgotten (the one seen longest ago first)."""
    rng = random.Random(5)
    a, b = Sessions(), Sessions()
    decisions_a, decisions_b = [], []
    for pos in range(1, 6000):
        client = rng.randrange(1, CLIENTS_MAX + 200)
        wid = rng.randrange(1, 30)
        low = max(1, wid - rng.randrange(0, 5))
        decisions_a.append(a.admit(client, wid, low, pos))
        decisions_b.append(b.admit(client, wid, low, pos))
        if pos == 3000:
            b = Sessions.decode(b.encode())  # a restart from a compaction point halfway
    assert decisions_a == decisions_b
    assert a == b
    assert len(a.clients) <= CLIENTS_MAX
    assert False in decisions_a and True in decisions_a
