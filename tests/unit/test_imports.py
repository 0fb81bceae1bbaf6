"""The import graph of raftblock/ (issue 15): every import, module-level, function-local and under
TYPE_CHECKING alike, read with ast. Enforced now:

1. The sans-I/O cores (Raft core, chain core, the NBD codec, the engine's formats) import no I/O layer.
2. `replication/` does not import `node/`, `gateway/` or `meta/`.
3. The client side (`client/`, with the data-plane client `client/router.py`, and `gateway/`) imports no
   server module (the node host, a replica, the WAL, the engine).

A cycle between modules fails the test, except the ones listed in KNOWN_CYCLES: issue 15 is taking them
apart (the segment cleaner reads Engine privates). That list may only shrink: a listed cycle that
is gone fails the test too, so it is struck from the list in the change that removes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "raftblock"

CORES = ("raftblock.replication.raft.core", "raftblock.replication.raft.log", "raftblock.replication.raft.progress",
         "raftblock.replication.chain.core", "raftblock.gateway.nbd", "raftblock.wire.framing", "raftblock.qos")
IO_LAYERS = ("raftblock.node", "raftblock.meta", "raftblock.gateway.nbd_server", "raftblock.replication.replica",
             "raftblock.replication.raft.replica", "raftblock.replication.chain.replica", "raftblock.replication.wal",
             "raftblock.storage.disk", "asyncio", "socket", "uvloop")
CLIENT_SIDE = ("raftblock.client", "raftblock.gateway")
SERVER = ("raftblock.node.host", "raftblock.replication.replica", "raftblock.replication.raft.replica",
          "raftblock.replication.chain.replica", "raftblock.replication.wal", "raftblock.storage",
          "raftblock.node.raftnode", "raftblock.node.serve", "raftblock.replication.local")
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods)
        out[name] = {d for d in deps if d in mods or not d.startswith("raftblock")}
    return out


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _closure(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in g.get(m, ()):
            if d not in seen and d.startswith("raftblock"):
                seen.add(d)
                todo.append(d)
    return seen


def test_the_cores_import_no_io() -> None:
    g = graph()
    bad = {c: sorted(d for d in g[c] if _under(d, IO_LAYERS)) for c in CORES}
    assert not {c: d for c, d in bad.items() if d}, bad


def test_replication_imports_no_node_gateway_or_meta() -> None:
    g = graph()
    bad = {m: sorted(d for d in deps if _under(d, ("raftblock.node", "raftblock.gateway", "raftblock.meta")))
           for m, deps in g.items() if _under(m, ("raftblock.replication",))}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_the_client_side_reaches_no_server_module() -> None:
    g = graph()
    bad = {m: sorted(d for d in _closure(g, m) if _under(d, SERVER)) for m in g if _under(m, CLIENT_SIDE)}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_import_cycle_but_the_known_ones() -> None:
    g = graph()
    internal = {m: {d for d in deps if d in g and d != m} for m, deps in g.items()}
    # Tarjan's strongly connected components: every component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(internal[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(frozenset(comp))

    for v in sorted(internal):
        if v not in index:
            visit(v)
    found = set(comps)
    assert found <= KNOWN_CYCLES, f"new import cycles: {[sorted(c) for c in found - KNOWN_CYCLES]}"
    assert KNOWN_CYCLES <= found, f"gone, strike from KNOWN_CYCLES: {[sorted(c) for c in KNOWN_CYCLES - found]}"
