# The fuzz properties (tests/fuzz/README.md): the parsers' corruption and refusal logs are not wanted on
# stdout for thousands of examples, and a test may ask for tracemalloc (the allocation bounds).
from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    old = structlog.get_config()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    try:
        yield
    finally:
        structlog.configure(**old)


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on for the test: fuzz_targets.alloc_bound checks its bounds only while tracing."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        yield
    finally:
        if not was:
            tracemalloc.stop()
