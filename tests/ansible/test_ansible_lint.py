"""ansible/ is ansible-lint clean under the production profile (ansible/.ansible-lint asks for it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def test_ansible_lint_production_profile_passes() -> None:
    lint = Path(sys.executable).parent / "ansible-lint"
    if not lint.exists() and shutil.which("ansible-lint") is None:
        pytest.skip("ansible-lint is not installed (pip install -e '.[deploy]')")
    r = subprocess.run([str(lint) if lint.exists() else "ansible-lint", "--nocolor"], cwd=ANSIBLE,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Profile 'production' was required, and it passed" in out, out[-4000:]
