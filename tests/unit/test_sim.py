# The deterministic simulation (raftblock.testing.sim) over the real RaftCore: 200 seeds x 2,000 steps for
# 3-node and for 5-node groups, every checker on (one leader per term, leader completeness §5.4,
# committed entries never change, identical apply sequences, persist-before-ack, linearizable reads,
# liveness once the faults stop). A failing seed names itself and its replay command.
from __future__ import annotations

import pytest

from raftblock.testing.sim import SimFailure, SimStats, Simulation, main, run_seed

SEEDS = 200
STEPS = 2000


def _run_all(nodes: int) -> SimStats:
    total = SimStats()
    for seed in range(SEEDS):
        # Raises SimFailure naming "seed=.. nodes=.. step=.." and the replay command.
        st = run_seed(seed, nodes, STEPS)
        for k in SimStats.__slots__:
            setattr(total, k, getattr(total, k) + getattr(st, k))
    return total


@pytest.mark.parametrize("nodes", [3, pytest.param(5, marks=pytest.mark.slow)])  # 5 nodes: make test-slow (29 s)
def test_simulation_default_seeds(nodes: int) -> None:
    total = _run_all(nodes)
    assert total.steps == SEEDS * STEPS
    # The run is not vacuous: every fault and feature happened many times.
    assert total.committed > 20 * SEEDS
    assert total.leaders > 5 * SEEDS
    for k in (
        "crashes",
        "torn_writes",
        "restarts",
        "snapshots_installed",
        "compactions",
        "reads_served",
        "transfers",
        "conf_changes",
    ):
        assert getattr(total, k) > SEEDS // 4, (k, total.as_dict())


def test_simulation_is_deterministic() -> None:
    a = run_seed(11, 5, 600).as_dict()
    b = run_seed(11, 5, 600).as_dict()
    assert a == b


def test_failure_names_seed_and_replay_command() -> None:
    with pytest.raises(SimFailure) as info:
        Simulation(3, 3, 2000, frozenset({"ack_before_persist"})).run()
    text = str(info.value)
    assert "seed=3 nodes=3 step=" in text
    assert (
        "python -m raftblock.testing.sim --seed 3 --nodes 3 --steps 2000 --mutation ack_before_persist"
        in text
    )


def test_cli_replays_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--nodes", "3", "--steps", "300"]) == 0
    assert "ok: seeds 5..5" in capsys.readouterr().out
    assert (
        main(["--seed", "0", "--nodes", "3", "--steps", "2000", "--mutation", "vote_twice", "--seeds", "20"])
        == 1
    )
    assert "replay: python -m raftblock.testing.sim" in capsys.readouterr().err
