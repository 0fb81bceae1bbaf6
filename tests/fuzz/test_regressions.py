"""Every input under tests/fuzz/corpus/regressions/<target>/ (a crash, hang or unbounded allocation that
fuzzing found, or one found by review and kept the same way), replayed through its target: each must now
be handled (tests/fuzz/README.md, "Findings")."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from fuzz_targets import TARGETS, TRACED

REGRESSIONS = Path(__file__).resolve().parent / "corpus" / "regressions"
CASES = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


def test_every_regression_names_a_target() -> None:
    assert CASES, "no regression inputs"
    assert {p.parent.name for p in CASES} <= set(TARGETS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_regression_input_is_handled(path: Path) -> None:
    target = path.parent.name
    tracing = target in TRACED and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()  # the allocation bounds are checked while tracing
    try:
        TARGETS[target](path.read_bytes())
    finally:
        if tracing:
            tracemalloc.stop()


CORPUS = Path(__file__).resolve().parent / "corpus"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_committed_corpus_is_handled(target: str) -> None:
    """The committed corpus (seeds and what fuzzing kept) replays cleanly: what a fuzz run starts from."""
    files = sorted(p for p in (CORPUS / target).glob("*") if p.is_file())
    assert files, f"no corpus for {target}"
    tracing = target in TRACED and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        for p in files:
            TARGETS[target](p.read_bytes())
    finally:
        if tracing:
            tracemalloc.stop()
