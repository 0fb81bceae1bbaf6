"""Logging setup: structlog, JSON lines in production, key=value on a terminal.

Rule 1: every process calls `configure()` once, at its composition root, before logging.
Rule 2: logs go to stderr; stdout is reserved for machine-readable lines (e.g. READY).
Rule 3: a process names itself once (`set_process(node=3, rack="r1")`): every event it logs, from any
thread, carries those fields (an event's own fields win), so journald's lines of a rack say whose they are.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["json", "console", "auto"]

_PROCESS: dict[str, object] = {}


def set_process(**fields: object) -> None:
    """Rule 3."""
    _PROCESS.update(fields)


def _add_process(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in _PROCESS.items():
        event.setdefault(k, v)
    return event


def configure(fmt: LogFormat = "auto", level: str = "info") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
