"""Build script: the package metadata lives in pyproject.toml; this file only adds the Cython
extensions under raftblock/_fast. Every extension has a pure-Python twin, so a build without a
compiler (or RAFTBLOCK_NO_EXTENSIONS=1 at build time) still yields a working package."""

import os
from pathlib import Path

from setuptools import Extension, setup


def _extensions() -> list[Extension]:
    if os.environ.get("RAFTBLOCK_NO_EXTENSIONS") == "1":
        return []
    sources = sorted(Path("raftblock/_fast").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize

    # optional=True: a machine without a C compiler still gets a working package (the pure twins).
    exts = [
        Extension(f"raftblock._fast.{p.stem}", [str(p)], extra_compile_args=["-O2"], optional=True)
        for p in sources
    ]
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(ext_modules=_extensions())
