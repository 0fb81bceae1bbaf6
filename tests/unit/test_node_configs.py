"""The example configs in nodes/ parse as the processes parse them (a stale example is a bug)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from raftblock.node.raftnode import NodeConfig

NODES = Path(__file__).resolve().parents[2] / "nodes"


@pytest.mark.parametrize("path", sorted(NODES.rglob("*.toml")), ids=lambda p: str(p.relative_to(NODES)))
def test_example_config_parses(path: Path) -> None:
    raw = tomllib.loads(path.read_text())
    if "listen" in raw:  # a storage node
        cfg = NodeConfig(raw)
        assert cfg.meta_admin and cfg.rack and cfg.node_id in cfg.peers
        if cfg.gateway is not None:  # a node that serves NBD
            assert int(cfg.gateway["port"]) > 0 and cfg.gateway["admin_socket"]
    elif "members" in raw:  # a metadata node
        assert raw["node_id"] in [m["id"] for m in raw["members"]]
    else:  # a gateway
        assert raw["gateway_id"] and raw["meta"]["admin"] and raw["meta"]["secret_file"]


def test_cluster_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    """node/layout.py free_port: a stopped cluster's ports must not be taken by outgoing connections (their
    source ports come from the kernel's ephemeral range) before its next `cluster up`."""
    import socket

    from raftblock.node.layout import _ephemeral_low, free_port

    ports = [free_port("127.0.0.1") for _ in range(30)]
    assert len(set(ports)) == 30
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free when handed out
