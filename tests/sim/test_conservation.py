"""Conservation: the simulator loses and invents nothing (turns, bytes, blocks)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from ops.sim.config import Scenario
from ops.sim.runner import check_conservation, run_once
from ops.sim.traces import PAPER_TRACES, make_sim_agents

ONE_MACHINE = Path(__file__).parents[2] / "ops/sim/scenarios/one-machine.yaml"


@pytest.mark.parametrize("policy", ["single_path", "dualpath", "dualpath_split", "round_robin"])
def test_every_turn_finishes_exactly_once(scenario: Scenario, policy: str) -> None:
    """Each agent's turns all run, in order, each finishing once: no turn is dropped or
    replayed by the event plumbing, whichever side reads."""
    result = run_once(scenario, policy)
    agents = make_sim_agents(PAPER_TRACES["32k"], 24, 3, 3)
    assert Counter(r.agent_id for r in result.records) == {a.agent_id: a.num_turns for a in agents}
    assert all(r.num_finishes == 1 for r in result.records)
    for r in result.records:
        assert r.arrival_s <= r.planned_s <= r.read_done_s <= r.first_token_s <= r.finish_s
    by_agent: dict[int, list[float]] = {}
    for r in sorted(result.records, key=lambda r: r.turn):
        by_agent.setdefault(r.agent_id, []).append(r.arrival_s)
    assert all(times == sorted(times) for times in by_agent.values())


@pytest.mark.parametrize("policy", ["single_path", "dualpath", "dualpath_split"])
def test_bytes_read_are_the_hit_bytes_each_side_was_planned(scenario: Scenario, policy: str):
    """Storage reads = the hit KV the plans needed, and each node's SNIC read exactly the
    blocks of the side it served (PE node: hits - num_de_blocks, DE node: num_de_blocks)."""
    result = run_once(scenario, policy)
    block_bytes = result.extra["block_bytes"]
    expected: Counter[str] = Counter()
    for r in result.records:
        expected[r.prefill_replica.split("/")[0]] += (r.hit_blocks - r.num_de_blocks) * block_bytes
        expected[r.decode_replica.split("/")[0]] += r.num_de_blocks * block_bytes
    read = {n.node_id: n.bytes_read for n in result.nodes}
    assert read == {n: expected.get(n, 0) for n in read}
    assert sum(read.values()) == result.bytes_hit_needed > 0
    check_conservation(result)


def test_writes_store_each_new_block_once(scenario: Scenario) -> None:
    """Persistence writes every block a turn computed that was not stored, once: the bytes
    written equal the agents' final stored blocks less the ones stored before the window."""
    from ops.sim.runner import build_agents

    result = run_once(scenario, "dualpath")
    bs = result.extra["block_size"]
    total = 0
    for agent in build_agents(scenario):
        last = len(agent.appends) - 1
        final = (agent.prompt_len(last) + agent.gens[last] - 1) // bs
        before = 0
        if agent.first_turn:
            prev = agent.first_turn - 1
            before = (agent.prompt_len(prev) + agent.gens[prev] - 1) // bs
        total += final - before
    assert sum(n.bytes_written for n in result.nodes) == total * result.extra["block_bytes"]


def test_one_machine_benchmark_conserves_too() -> None:
    """The CPU path (host jobs, warm-up barrier, exact KVIndex) keeps the same invariants."""
    from ops.sim.config import load_scenarios

    one = load_scenarios(ONE_MACHINE)[0][0]
    result = run_once(one, "dualpath_split")
    check_conservation(result)
    assert len(result.records) == 24 and not math.isnan(result.jct_s)
    assert sum(1 for r in result.records if not r.timed) == 4  # the warm-up turns
