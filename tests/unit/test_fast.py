"""`raftblock/_fast`: every hot loop against its pure-Python twin (STYLE.md: differential tests), the
selection rules of raftblock/_fast/__init__.py, and a guard that a broken build cannot hide behind the
twins. Per-module cases: test_fast_bitmap.py, test_fast_segwriter.py; packaging: test_fast_wheel.py.
Reference values: RFC 3720 B.4 CRC32C test vectors (32 bytes of zeros -> 0x8A9136AA)."""

from __future__ import annotations

import ctypes
import importlib
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from raftblock import _fast

FAST_DIR = Path(_fast.__file__).resolve().parent
MODULES = sorted(p.stem[1:-2] for p in FAST_DIR.glob("_*_c.pyx"))  # "_bitmap_c.pyx" -> "bitmap"
HAVE_COMPILER = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


def load_impl(name: str, impl: str) -> ModuleType:
    """The twin, or the Cython module (skipping, with the reason, when it is not built)."""
    if impl == "python":
        return importlib.import_module(f"raftblock._fast._{name}_py")
    try:
        return importlib.import_module(f"raftblock._fast._{name}_c")
    except ImportError as e:
        pytest.skip(f"raftblock._fast._{name}_c is not built ({e}); `make compile` builds it in place")


@pytest.fixture(scope="module", params=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("blockcrc", request.param)


def test_crc32c_rfc3720_vectors() -> None:
    # RFC 3720 B.4: 32 bytes of zeros, 32 bytes of 0xff, 32 incrementing bytes
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


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


def test_block_crcs_rejects_partial_block(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.block_crcs(bytes(4097))
    with pytest.raises(ValueError):
        impl.first_mismatch(bytes(4096), [0, 0])


def test_crc_routine_is_crc32c_own_and_checked() -> None:
    # _crc32c_ptr hands the Cython modules an address inside crc32c's extension (never our own CRC)
    from raftblock._fast._crc32c_ptr import routine_address

    fn = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_ulong)(routine_address())
    assert fn(0xFFFFFFFF, bytes(32), 32) ^ 0xFFFFFFFF == 0x8A9136AA  # RFC 3720 B.4


@pytest.mark.parametrize("name", MODULES)
def test_selection_honours_no_extensions(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(_fast, "NO_EXTENSIONS", True)
    assert _fast._select(name).IMPLEMENTATION == "python"


@pytest.mark.parametrize("name", MODULES)
def test_every_extension_has_a_twin_and_is_exported(name: str) -> None:
    # Rules 2 and 3 of raftblock/_fast/__init__.py
    assert (FAST_DIR / f"_{name}_py.py").exists()
    assert getattr(_fast, name).IMPLEMENTATION in ("python", "cython")


def test_module_list() -> None:
    # the glob above drives the parametrised guards: an empty or short list would skip them silently
    assert MODULES == ["bitmap", "blockcrc", "segwriter"]


@pytest.mark.skipif(_fast.NO_EXTENSIONS, reason="RAFTBLOCK_NO_EXTENSIONS=1 forces the twins")
@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine: the twins are the build")
@pytest.mark.parametrize("name", MODULES)
def test_extension_is_built_and_selected(name: str) -> None:
    """With a compiler and without RAFTBLOCK_NO_EXTENSIONS, a missing, failing or stale extension is a
    failure, not a silent fall-back to the twin (setup.py builds them optional=True)."""
    try:
        mod = importlib.import_module(f"raftblock._fast._{name}_c")
    except ImportError as e:
        pytest.fail(f"raftblock._fast._{name}_c does not import ({e}); run `make compile`")
    assert getattr(_fast, name) is mod
    assert mod.IMPLEMENTATION == "cython"
    pyx = FAST_DIR / f"_{name}_c.pyx"
    so = Path(mod.__file__ or "")
    if so.parent == FAST_DIR:  # built in place (not a wheel's copy)
        assert so.stat().st_mtime >= pyx.stat().st_mtime, f"{so.name} is older than {pyx.name}: run `make compile`"
