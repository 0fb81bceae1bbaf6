# Mutation test: plant each of four known Raft bugs in the core (RaftCore `_mutations`, set by tests only)
# and require the simulation to catch it within a bounded number of seeds. A mutation that survives
# means the simulator's fault model or checkers are too weak -- sharpen them, do not weaken the bug.
#   ack_before_persist  Ready contract: MsgAppResp sent before the entries are durable (thesis §10.2.1)
#   vote_twice          Raft paper §5.2: at most one vote per term
#   commit_old_term     Raft paper §5.4.2 / Figure 8: commit an earlier term's entry by counting replicas
#   skip_log_matching   Raft paper §5.3: accept AppendEntries without checking (prev index, prev term)
from __future__ import annotations

import pytest

from raftblock.replication.raft.core import MUTATIONS
from raftblock.testing.sim import SimFailure, run_seed

SEEDS_MAX = 200
STEPS = 2000


def seeds_to_catch(mutation: str) -> tuple[int, str]:
    """Seeds (each over a 3- and a 5-node group) run until the simulation fails; (count, failure)."""
    for seed in range(SEEDS_MAX):
        for nodes in (3, 5):
            try:
                run_seed(seed, nodes, STEPS, frozenset({mutation}))
            except SimFailure as e:
                return seed + 1, str(e).splitlines()[0]
    return 0, ""


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_simulation_catches_planted_bug(mutation: str) -> None:
    needed, failure = seeds_to_catch(mutation)
    print(f"\n{mutation}: caught after {needed} seed(s): {failure}")
    assert needed, f"{mutation} survived {SEEDS_MAX} seeds x {STEPS} steps"
    assert needed <= SEEDS_MAX
