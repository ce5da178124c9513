"""The request flow's stored-KV read step: both sides read at once, the longest contiguous
prefix wins, and a side that fails is a miss (recompute) — or, with the `fail` policy, an
explicit 503, never partial KV."""

from __future__ import annotations

import asyncio

from app.kv_reads import read_stored_kv
from deployments.protocol import Plan


class Sides:
    """Backend.load per node: returns its blocks, a shorter list (a miss), or raises."""

    def __init__(self, **behaviour):
        self.behaviour = behaviour

    async def load(self, node, keys, request_id="", dram_only=False):
        what = self.behaviour[node]
        if isinstance(what, Exception):
            raise what
        return [f"{node}:{k}" for k in keys][: what if what is not None else len(keys)]


PLAN = Plan("r", "pe", "de", "pnode", "dnode", "split", num_hit_blocks=6, num_de_blocks=2)
KEYS = [f"k{i}" for i in range(8)]


def load(**behaviour):
    return asyncio.run(read_stored_kv(Sides(**behaviour), PLAN, KEYS))


def test_both_sides_joined_in_order():
    handles, num_de_blocks = load(dnode=None, pnode=None)
    assert handles == ["dnode:k0", "dnode:k1", "pnode:k2", "pnode:k3", "pnode:k4", "pnode:k5"]
    assert num_de_blocks == 2


def test_a_short_de_side_ends_the_prefix_there():
    assert load(dnode=1, pnode=None) == (["dnode:k0"], 1)


def test_a_short_pe_side_keeps_what_is_contiguous():
    handles, num_de_blocks = load(dnode=None, pnode=1)
    assert handles == ["dnode:k0", "dnode:k1", "pnode:k2"] and num_de_blocks == 2


def test_a_failing_side_is_a_miss_not_an_error():
    assert load(dnode=RuntimeError("TrafficManager restarting"), pnode=None) == ([], 0)
    handles, num_de_blocks = load(dnode=None, pnode=RuntimeError("SNIC closed"))
    assert handles == ["dnode:k0", "dnode:k1"] and num_de_blocks == 2


def test_fail_policy_raises_instead_of_recomputing():
    import pytest

    from app.api.errors import KVLoadFailed, to_api_error

    def strict(**behaviour):
        return asyncio.run(read_stored_kv(Sides(**behaviour), PLAN, KEYS, "fail"))

    assert strict(dnode=None, pnode=None)[1] == 2  # all there: served as usual
    for behaviour in (
        {"dnode": RuntimeError("TrafficManager restarting"), "pnode": None},
        {"dnode": None, "pnode": 3},  # a corrupt or missing block: the read comes back short
    ):
        with pytest.raises(KVLoadFailed) as err:
            strict(**behaviour)
        error = to_api_error(err.value)
        assert (error.status, error.code) == (503, "kv_load_failed")
        assert error.headers["Retry-After"] == "1"


class Pulls(Sides):
    """Also records which node each load asked, and whether it was a DRAM-only pull."""

    def __init__(self, **behaviour):
        super().__init__(**behaviour)
        self.calls: list[tuple[str, tuple[str, ...], bool]] = []

    async def load(self, node, keys, request_id="", dram_only=False):
        self.calls.append((node, tuple(keys), dram_only))
        return await super().load(node, keys, request_id, dram_only)


def test_pulled_runs_are_asked_of_their_source_node_and_joined_in_order():
    """Issue 24: blocks [1, 3) live only in dnode1's DRAM; they are pulled from there (no
    SNIC read) while each side reads the rest itself, and the handles keep prompt order."""
    plan = Plan("r", "pe", "de", "pnode", "dnode", "split", 6, 2, pulls=((1, 3, "dnode1"),))
    sides = Pulls(dnode=None, pnode=None, dnode1=None)
    handles, num_de = asyncio.run(read_stored_kv(sides, plan, KEYS))
    assert handles == ["dnode:k0", "dnode1:k1", "dnode1:k2", *(f"pnode:k{i}" for i in range(3, 6))]
    assert num_de == 2
    assert sorted(sides.calls) == [
        ("dnode", ("k0",), False),
        ("dnode1", ("k1",), True),  # the DE side's share of the run
        ("dnode1", ("k2",), True),  # the PE side's share
        ("pnode", ("k3", "k4", "k5"), False),
    ]


def test_a_pull_that_comes_back_short_ends_the_prefix():
    """The source node evicted (or lost) the block since the plan: recompute from there."""
    plan = Plan("r", "pe", "de", "pnode", "dnode", "pe", 6, 0, pulls=((2, 4, "dnode1"),))
    handles, num_de = asyncio.run(read_stored_kv(Pulls(pnode=None, dnode1=1), plan, KEYS))
    assert (handles, num_de) == (["pnode:k0", "pnode:k1", "dnode1:k2"], 0)
