"""Small scenarios the simulator tests share: fast (well under a second each)."""

from __future__ import annotations

import pytest

from ops.sim.config import ClusterConfig, Scenario, TraceConfig


def small_scenario(**cluster: object) -> Scenario:
    """DS 27B on 1 prefill + 2 decode nodes of 2 GPUs, 24 agents x 3 turns of the 32K trace:
    small enough for a unit test, big enough that every read path occurs."""
    return Scenario(
        name="small",
        model="ds-27b",
        device="hopper",
        cluster=ClusterConfig(prefill_nodes=1, decode_nodes=2, gpus_per_node=2, **cluster),
        trace=TraceConfig(preset="32k", agents=24, window_turns=3, seed=3),
    )


@pytest.fixture
def scenario() -> Scenario:
    return small_scenario(snic_gbps=10.0)
