# Fixtures shared by every test directory (unit, integration, faults).
from __future__ import annotations

import pytest

from raftblock.testing.serve import free_port as _free_port


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel's choice for port 0).

    Another process can still take it before the test binds it; code that starts servers should retry on
    "address in use" (raftblock.testing.serve.ServeProcess does).
    """
    return _free_port("127.0.0.1")
