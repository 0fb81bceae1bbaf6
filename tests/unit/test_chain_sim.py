# The deterministic chain simulation (raftblock.testing.chainsim) over the real ChainCore, its
# configuration changes decided by the real planner (control/chainrepair.plan_chain_changes) over a real
# MetaState and failure detector, with every checker on (docs/chain.md: no acked write lost, the head of
# every configuration holds every acked write, applied histories are prefixes, reads not stale, no ACK
# before persist, client acks only from the head of their epoch with every member durable, liveness
# once the faults stop), with crashed members restarting from their durable log or blank, plus the
# mutation test: each planted bug (in the core, or in what a runtime reports) must be caught within a
# few seeds.
from __future__ import annotations

import pytest

from raftblock.replication.chain.core import MUTATIONS
from raftblock.testing.chainsim import SIM_MUTATIONS, SimFailure, SimStats, Simulation, main, run_seed

SEEDS = 120
STEPS = 2000
MUTATION_SEEDS_MAX = 40


def test_simulation_default_seeds() -> None:
    total = SimStats()
    for seed in range(SEEDS):
        total.add(run_seed(seed, STEPS))  # raises SimFailure naming the seed and the replay command
    assert total.steps == SEEDS * STEPS
    # Not vacuous: every fault and feature happened many times.
    assert total.writes_acked > 200 * SEEDS
    for k in ("reconfigs", "joins", "snapshots_installed", "crashes", "isolations", "oracle_cuts"):
        assert getattr(total, k) > SEEDS, (k, total.as_dict())
    for k in ("reads_served", "stale_refused", "ghosts", "torn_writes", "stale_client_ops"):
        assert getattr(total, k) > SEEDS // 2, (k, total.as_dict())
    # Restarts from the durable log: in place (an epoch bump, same members) and as a rejoin at the tail,
    # and SYNCs whose (seq, epoch) the predecessor's log does not hold, answered with a snapshot.
    for k in ("restarts_with_log", "restarts_blank", "epoch_bumps", "slow_writes"):
        assert getattr(total, k) > SEEDS, (k, total.as_dict())
    for k in ("rejoins_with_log", "checkpoints"):
        assert getattr(total, k) > SEEDS // 2, (k, total.as_dict())
    assert total.sync_mismatch + total.sync_ahead > SEEDS // 2, total.as_dict()
    assert total.sync_mismatch >= 1 and total.sync_ahead >= 1, total.as_dict()
    # The planner's rules at work: removals, fresh nodes when no spare is up, a failure while a member
    # catches up, and its looser cases (a bump while another member is not settled; a removal while a
    # survivor after the next head still catches up).
    for k in ("removals", "fresh_nodes", "faults_catching_up"):
        assert getattr(total, k) > SEEDS // 2, (k, total.as_dict())
    assert total.bumps_unsettled >= SEEDS // 12 and total.removals_unsettled >= SEEDS // 4, total.as_dict()


def test_simulation_is_deterministic() -> None:
    assert run_seed(11, 800).as_dict() == run_seed(11, 800).as_dict()


def seeds_to_catch(mutation: str) -> tuple[int, str]:
    for seed in range(MUTATION_SEEDS_MAX):
        try:
            run_seed(seed, STEPS, frozenset({mutation}))
        except SimFailure as e:
            return seed + 1, str(e).splitlines()[0]
    return 0, ""


@pytest.mark.parametrize("mutation", sorted(MUTATIONS | SIM_MUTATIONS))
def test_simulation_catches_planted_bug(mutation: str) -> None:
    """A surviving mutation means the fault model or the checkers are too weak: sharpen them."""
    needed, failure = seeds_to_catch(mutation)
    print(f"\n{mutation}: caught after {needed} seed(s): {failure}")
    assert needed, f"{mutation} survived {MUTATION_SEEDS_MAX} seeds x {STEPS} steps"


def test_failure_names_seed_and_replay_command() -> None:
    with pytest.raises(SimFailure) as info:
        Simulation(0, 2000, frozenset({"ack_before_persist"})).run()
    text = str(info.value)
    assert "seed=0 step=" in text
    assert "python -m raftblock.testing.chainsim --seed 0 --steps 2000 --mutation ack_before_persist" in text


def test_cli_replays_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--steps", "300"]) == 0
    assert "ok: seeds 5..5" in capsys.readouterr().out
    assert main(["--seed", "0", "--steps", "2000", "--mutation", "skip_sync_resend"]) == 1
    assert "replay: python -m raftblock.testing.chainsim" in capsys.readouterr().err
