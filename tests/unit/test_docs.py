"""The documentation a clone has: every relative link in README.md and docs/ names a file of the
repository (none points outside it, as links to ../shared/DESIGN.md did), and the package metadata
claims no protocol the code does not have (issue 14, item 9)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _docs() -> list[Path]:
    return [REPO / "README.md", REPO / "THREAT_MODEL.md", *sorted((REPO / "docs").rglob("*.md")),
            *sorted(REPO.glob("*/README.md"))]


def test_every_relative_link_resolves_inside_the_repository() -> None:
    bad = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path = (doc.parent / target).resolve()
            if not path.exists() or REPO not in path.parents and path != REPO:
                bad.append(f"{doc.relative_to(REPO)}: {target}")
    assert not bad, bad


def test_no_doc_points_at_the_design_notes_outside_the_repository() -> None:
    hits = [str(d.relative_to(REPO)) for d in _docs() if "../shared/" in d.read_text()]
    assert not hits, hits


def test_the_package_claims_only_what_it_has() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    has_iscsi = any("iscsi" in p.name.lower() for p in (REPO / "raftblock").rglob("*.py"))
    assert has_iscsi or "iscsi" not in meta["description"].lower(), meta["description"]
    for pkg in (REPO / "raftblock").iterdir():  # no empty package promising a feature
        if pkg.is_dir() and (pkg / "__init__.py").exists():
            assert [p for p in pkg.rglob("*.py") if p.name != "__init__.py"] or \
                (pkg / "__init__.py").read_text().strip(), f"{pkg.name} is an empty package"
