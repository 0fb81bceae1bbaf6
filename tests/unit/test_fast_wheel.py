"""Packaging: a wheel built from this tree carries the compiled extensions, and in a fresh venv holding
only that wheel and `crc32c`, `raftblock._fast` selects the Cython modules (nothing else of the
package's dependencies is needed to import it: raftblock/_fast/__init__.py Rule 4).

Offline by construction: the wheel is built with --no-build-isolation --no-index (setuptools, wheel and
Cython come from this venv), installed with --no-deps --no-index, and crc32c is lent to the fresh venv
from this one through a .pth file instead of being downloaded. The test is skipped only when that
cannot work: no C compiler, or no setuptools/wheel/Cython to build with. The source is copied to a
temp directory first, so the build leaves nothing in the working tree.
Reference value: RFC 3720 B.4, crc32c(32 zero bytes) == 0x8A9136AA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_COMPILER = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
HAVE_BUILD_DEPS = all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel", "Cython", "pip"))

pytestmark = [
    pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: a wheel would hold only the pure twins"),
    pytest.mark.skipif(not HAVE_BUILD_DEPS, reason="setuptools/wheel/Cython/pip missing: cannot build offline"),
    pytest.mark.timeout(240),
]

_CHECK = r"""
import importlib.util, json, sys
import raftblock._fast as fast
from raftblock._fast import _segwriter_py
out = {name: getattr(fast, name).IMPLEMENTATION for name in ("blockcrc", "bitmap", "segwriter")}
out["file"] = fast.__file__
out["crc_zero32"] = fast.blockcrc.block_crcs_any(bytes(32)) if hasattr(fast.blockcrc, "block_crcs_any") else None
out["crc_block"] = fast.blockcrc.block_crcs(bytes(4096))
b = fast.bitmap.Bitmap(1 << 12)
b.set_range(5, 100)
out["runs"] = list(b.runs())
buf_c, buf_py = bytearray(48 + 8 + 4096), bytearray(48 + 8 + 4096)
fast.segwriter.frame_write(buf_c, 0, 1, 2, 3, 4, 5, bytes(4096))
_segwriter_py.frame_write(buf_py, 0, 1, 2, 3, 4, 5, bytes(4096))
out["segwriter_same"] = buf_c == buf_py
out["others"] = [m for m in ("structlog", "uvloop", "pysyncobj", "Cython") if importlib.util.find_spec(m)]
print(json.dumps(out))
"""


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_installs_compiled_fast_modules(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAFTBLOCK_NO_EXTENSIONS" and not k.startswith("PYTHON")}
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "raftblock", src / "raftblock",
        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info", "*.pyc"),
    )
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(wheels)], tmp_path, env)
    (whl,) = wheels.glob("raftblock-*.whl")
    assert not whl.name.endswith("-none-any.whl"), f"{whl.name} is a pure wheel: no extension was built"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(whl)],
         tmp_path, env)
    # crc32c (the one dependency of raftblock._fast), lent from this venv: the package and its metadata
    import crc32c

    site = Path(crc32c.__file__).resolve().parent.parent
    deps = tmp_path / "deps"
    deps.mkdir()
    for item in [site / "crc32c", *site.glob("crc32c-*.dist-info")]:
        (deps / item.name).symlink_to(item)
    (purelib,) = venv.glob("lib/python3.*/site-packages")
    (purelib / "_raftblock_test_deps.pth").write_text(f"{deps}\n")

    out = json.loads(_run([str(py), "-I", "-c", _CHECK], tmp_path, env))
    assert out["file"].startswith(str(venv)), out["file"]
    assert (out["blockcrc"], out["bitmap"], out["segwriter"]) == ("cython", "cython", "cython"), out
    assert out["crc_zero32"] == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert out["crc_block"] == [crc32c.crc32c(bytes(4096))]
    assert out["runs"] == [[5, 100]]
    assert out["segwriter_same"] is True
    assert out["others"] == [], f"the fresh venv sees other packages: {out['others']}"
