"""`raftblock/_fast`: every hot loop against its pure-Python twin (STYLE.md: differential tests).
Reference values: RFC 3720 B.4 CRC32C test vectors (32 bytes of zeros -> 0x8A9136AA)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from raftblock import _fast


def _impls() -> list[ModuleType]:
    mods = [importlib.import_module("raftblock._fast._blockcrc_py")]
    try:
        mods.append(importlib.import_module("raftblock._fast._blockcrc_c"))
    except ImportError:
        pass
    return mods


IMPLS = _impls()


def test_crc32c_rfc3720_vectors() -> None:
    # RFC 3720 B.4: 32 bytes of zeros, 32 bytes of 0xff, 32 incrementing bytes
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.IMPLEMENTATION)
@settings(max_examples=50, deadline=None)
@given(blocks=st.integers(1, 8), seed=st.binary(min_size=1, max_size=64))
def test_block_crcs_match_per_block_crc32c(impl: ModuleType, blocks: int, seed: bytes) -> None:
    data = (seed * (blocks * 4096 // len(seed) + 1))[: blocks * 4096]
    want = [crc32c(data[i : i + 4096]) for i in range(0, len(data), 4096)]
    assert impl.block_crcs(data) == want
    assert impl.first_mismatch(data, want) == -1
    bad = list(want)
    bad[blocks - 1] ^= 1
    assert impl.first_mismatch(data, bad) == blocks - 1


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.IMPLEMENTATION)
def test_block_crcs_rejects_partial_block(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.block_crcs(bytes(4097))
    with pytest.raises(ValueError):
        impl.first_mismatch(bytes(4096), [0, 0])


def test_selection_honours_no_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fast, "NO_EXTENSIONS", True)
    assert _fast._select("blockcrc").IMPLEMENTATION == "python"
