"""`raftblock logs`: the logs of a local cluster's processes (DIR/logs/NAME.log), merged in time order.

Owns: reading the JSON log lines every process writes (obs/log.py: one object per line with `timestamp`,
`level`, `event`), filtering and printing them, and following the files as they grow.

Rules:
1. Lines are ordered by their timestamp across files; a line that is not a JSON event (a process's own
   one-line error, a traceback) keeps the time of the event before it in its file.
2. Filters: processes (`n1`, `m2`, `gateway`, or a bare node id), a minimum level, the last N seconds,
   the last N lines. A level filter keeps non-JSON lines (they are what a process said as it died).
3. `--follow` polls the files every FOLLOW_POLL_S and prints what was appended, in time order within each
   poll; files that appear later (a node added) are followed too.
4. Output: `time process level event key=value ...` on a terminal or a pipe; `--json`: the event object
   with `process` added, one per line.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

FOLLOW_POLL_S = 0.2
LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _Source:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.offset = 0
        self.partial = b""
        self.last_ts = 0.0

    def read_new(self) -> list[tuple[float, str, dict[str, Any] | None, str]]:
        """(time, process, event or None, raw line) for every whole line appended since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for raw in lines:
            text = raw.decode(errors="replace").rstrip()
            if not text:
                continue
            ev = _event(text)
            if ev is not None:
                self.last_ts = _ts(ev.get("timestamp"), self.last_ts)
            out.append((self.last_ts, self.name, ev, text))
        return out


def _event(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        ev = json.loads(text)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


def _ts(value: Any, default: float) -> float:
    if not isinstance(value, str):
        return default
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def _wanted(name: str, names: list[str]) -> bool:
    if not names:
        return True
    return any(name == n or (n.isdigit() and name == f"n{n}") for n in names)


def _format(ts: float, name: str, ev: dict[str, Any] | None, raw: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"process": name, **(ev if ev is not None else {"event": "output", "line": raw})},
                          sort_keys=True)
    when = datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "--:--:--.---"
    if ev is None:
        return f"{when} {name:<8} {'':<7} {raw}"
    rest = " ".join(f"{k}={_short(v)}" for k, v in ev.items() if k not in ("timestamp", "level", "event"))
    return f"{when} {name:<8} {str(ev.get('level', '')):<7} {ev.get('event', '')} {rest}".rstrip()


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if " " not in s else json.dumps(s)


def follow_logs(root: Path, names: list[str] | None = None, level: str = "debug", since_s: float | None = None,
                lines: int = 0, follow: bool = False, as_json: bool = False) -> int:
    logs = root / "logs"
    if not logs.is_dir():
        print(f"raftblock logs: no logs in {root} (no cluster was started there)", file=sys.stderr)
        return 1
    names = names or []
    have = sorted(p.stem for p in logs.glob("*.log"))
    unknown = [n for n in names if not any(_wanted(h, [n]) for h in have)]
    if unknown and not follow:
        print(f"raftblock logs: no process {', '.join(unknown)} in {root} (its processes: {', '.join(have)})",
              file=sys.stderr)
        return 1
    floor = LEVELS.get(level, 0)
    sources: dict[Path, _Source] = {}

    def poll() -> list[tuple[float, str, dict[str, Any] | None, str]]:
        for p in sorted(logs.glob("*.log")):
            if p not in sources and _wanted(p.stem, names):
                sources[p] = _Source(p.stem, p)
        batch = [r for src in sources.values() for r in src.read_new()]
        batch.sort(key=lambda r: r[0])  # stable: a file's own order among equal times
        keep = []
        for r in batch:
            ev = r[2]
            if ev is not None and LEVELS.get(str(ev.get("level", "info")), 20) < floor:
                continue
            keep.append(r)
        return keep

    first = poll()
    if since_s is not None:
        cut = time.time() - since_s
        first = [r for r in first if r[0] >= cut]
    if lines > 0:
        first = first[-lines:]
    out = sys.stdout
    for r in first:
        print(_format(*r, as_json), file=out)
    out.flush()
    if not follow:
        return 0
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            for r in poll():
                print(_format(*r, as_json), file=out)
            out.flush()
    except KeyboardInterrupt:
        return 0
