"""The Scheduler's pure plan policy over hand-built engine and node states (no Ray, no clock).

Covers each of the paper's PE categories (overloaded / short read queue / long read queue),
the DE group choice and Z rule, and the read-side choice of every policy.
"""

from __future__ import annotations

import pytest

from deployments.protocol import LoadReport, NodeReport, PlanRequest
from deployments.scheduler.policy import NoEngineAvailable, PolicyConfig, plan, plan_and_note
from deployments.scheduler.view import ClusterView
from kvstore.index import IndexEvent

BLOCK = 64
TOKEN_BYTES = 1000  # KV bytes per token: one block = 64 kB


def engine(rid, role, node="n0", *, queued=0, context=0, running=0, free=100, rate=0.0, t=0.0):
    return LoadReport(
        replica_id=rid,
        role=role,
        node_id=node,
        num_queued_tokens=queued,
        num_running=running,
        num_waiting=0,
        num_free_blocks=free,
        num_total_blocks=100,
        block_size=BLOCK,
        max_num_seqs=64,
        timestamp_s=t,
        num_context_tokens=context,
        kv_bytes_per_token=TOKEN_BYTES,
        prefill_tokens_per_s=rate,
    )


def node(node_id, *, queue_bytes=0, bandwidth=1e6, events=()):
    return NodeReport(
        node_id=node_id,
        read_queue_bytes=queue_bytes,
        read_queue_tokens=queue_bytes // TOKEN_BYTES,
        write_queue_bytes=0,
        bandwidth_bytes_per_s=bandwidth,
        read_throughput_bytes_per_s=0.0,
        timestamp_s=0.0,
        events=tuple(events),
    )


def view_of(*reports, nodes=(), stored_keys=(), stale_after_s=10.0):
    view = ClusterView(stale_after_s)
    for r in reports:
        view.update(r)
    for n in nodes:
        view.update_node(n)
    view.index.apply(IndexEvent(k, "nvme", True, nbytes=BLOCK * TOKEN_BYTES) for k in stored_keys)
    return view


def keys(n, tag="k"):
    return tuple(f"{tag}{i:014d}".encode() for i in range(n))


def request(prompt=100, max_tokens=50, block_keys=()):
    return PlanRequest("r", prompt, max_tokens, tuple(block_keys))


# ---------------------------------------------------------------- prefill choice
def test_prefill_short_read_queue_category_beats_fewer_tokens_on_a_long_queue():
    view = view_of(
        engine("pe-busy-disk", "prefill", "a", queued=10),
        engine("pe-free-disk", "prefill", "b", queued=900),
        engine("de", "decode", "c"),
        nodes=[node("a", queue_bytes=5_000_000), node("b", queue_bytes=100_000), node("c")],
    )  # node a drains in 5 s > alpha 3 s: long queue; node b in 0.1 s: short
    assert plan(request(), view, 0.0).prefill_replica == "pe-free-disk"


def test_prefill_lowest_tokens_wins_inside_a_category():
    view = view_of(
        engine("pe0", "prefill", "a", queued=600),
        engine("pe1", "prefill", "a", queued=200),
        engine("pe2", "prefill", "b", queued=400),
        engine("de", "decode", "c"),
        nodes=[node("a"), node("b"), node("c")],
    )
    assert plan(request(), view, 0.0).prefill_replica == "pe1"


def test_overloaded_prefill_is_skipped_even_with_a_short_queue():
    # beta = 1000 tok/s x 5 s = 5000 tokens
    view = view_of(
        engine("pe-overloaded", "prefill", "a", queued=6000, rate=1000),
        engine("pe-long-queue", "prefill", "b", queued=3000, rate=1000),
        engine("de", "decode", "c"),
        nodes=[node("a"), node("b", queue_bytes=10_000_000), node("c")],
    )
    assert plan(request(), view, 0.0).prefill_replica == "pe-long-queue"


def test_all_prefills_overloaded_least_loaded_takes_it():
    view = view_of(
        engine("pe0", "prefill", queued=9000, rate=1000),
        engine("pe1", "prefill", queued=7000, rate=1000),
        engine("de", "decode"),
    )
    assert plan(request(), view, 0.0).prefill_replica == "pe1"


# ---------------------------------------------------------------- decode choice
def test_decode_group_with_fewest_tokens_then_z_rule_prefers_fewest_requests():
    view = view_of(
        engine("pe", "prefill", "p"),
        engine("de-a0", "decode", "a", context=100, running=1),
        engine("de-a1", "decode", "a", context=100, running=1),  # group a: 200 tokens
        engine("de-b0", "decode", "b", context=1000, running=9),  # low tokens, many requests
        engine("de-b1", "decode", "b", context=2000, running=1),  # high tokens, few requests
        engine("de-b2", "decode", "b", context=1050, running=2),
    )
    assert plan(request(), view, 0.0).decode_replica == "de-a0"  # group a, tie -> id order
    view.remove("de-a0")
    view.remove("de-a1")
    # group b: Z = 1.05 * (150 + 4050) / 3 = 1470; de-b1 would exceed it; of the others
    # de-b2 has fewer running requests than de-b0 even though it holds more tokens.
    assert plan(request(), view, 0.0).decode_replica == "de-b2"


def test_decode_all_high_token_falls_back_to_fewest_tokens():
    view = view_of(
        engine("pe", "prefill"),
        engine("de0", "decode", context=5000, running=1),
        engine("de1", "decode", context=4000, running=7),
    )
    # Z = 1.05 * (9000 + 5000 + 4000) / 2 = 9450: both exceed it with a 9000-token request
    big = request(prompt=8000, max_tokens=1000)
    view.engines["de0"].report = engine("de0", "decode", context=5000, running=1, free=200)
    view.engines["de1"].report = engine("de1", "decode", context=4000, running=7, free=200)
    assert plan(big, view, 0.0).decode_replica == "de1"


def test_decode_needs_room_for_prompt_plus_max_tokens():
    view = view_of(
        engine("pe0", "prefill"),
        engine("de-small", "decode", "a", free=2),  # 128 tokens of room
        engine("de-big", "decode", "b", context=5000, running=5, free=50),
    )
    assert plan(request(100, 100), view, 0.0).decode_replica == "de-big"
    assert plan(request(10, 10), view, 0.0).decode_replica == "de-small"


def test_when_no_decode_has_room_the_one_holding_fewest_tokens_queues_it():
    """Not the one with most free blocks: that one's report may lag (or its blocks be
    small), and it collected the overflow in the simulator (-14 % / -6 % JCT)."""
    view = view_of(
        engine("pe0", "prefill"),
        engine("de0", "decode", "a", free=3, context=100),
        engine("de1", "decode", "b", free=5, context=900),
    )
    assert plan(request(5000, 100), view, 0.0).decode_replica == "de0"


def test_no_engines_raise_no_engine_available():
    with pytest.raises(NoEngineAvailable):
        plan(request(), view_of(engine("de", "decode")), 0.0)
    with pytest.raises(NoEngineAvailable):
        plan(request(), view_of(engine("pe", "prefill")), 0.0)


def test_stale_reports_are_not_live():
    view = view_of(
        engine("pe", "prefill", t=0.0), engine("de", "decode", t=100.0), stale_after_s=10
    )
    with pytest.raises(NoEngineAvailable):
        plan(request(), view, now=100.0)


# ---------------------------------------------------------------- hits and read side
def two_node_view(pe_queue=0, de_queue=0, stored=8, de_bandwidth=1e6):
    return view_of(
        engine("pe", "prefill", "pnode"),
        engine("de", "decode", "dnode"),
        nodes=[
            node("pnode", queue_bytes=pe_queue),
            node("dnode", queue_bytes=de_queue, bandwidth=de_bandwidth),
        ],
        stored_keys=keys(stored),
    )


def test_hits_are_the_longest_stored_prefix_and_leave_one_token_to_compute():
    view = two_node_view(stored=8)
    p = plan(request(prompt=10 * BLOCK + 5, block_keys=keys(10)), view, 0.0)
    assert p.num_hit_blocks == 8
    # a prompt of exactly 8 blocks keeps its last block to compute
    p = plan(request(prompt=8 * BLOCK, block_keys=keys(8)), view, 0.0)
    assert p.num_hit_blocks == 7
    # a gap ends the prefix even if later keys are stored
    gap = (b"x" * 16, *keys(8)[1:])
    assert plan(request(prompt=9 * BLOCK, block_keys=gap), view, 0.0).read_path == "none"


@pytest.mark.parametrize(
    ("policy", "pe_queue", "de_queue", "expect"),
    [
        ("dualpath", 2_000_000, 0, "de"),
        ("dualpath", 0, 2_000_000, "pe"),
        ("dualpath", 0, 0, "pe"),  # the first tie goes to the PE side; the next ones alternate
        ("single_path", 2_000_000, 0, "pe"),
    ],
)
def test_read_side_is_the_shorter_queue(policy, pe_queue, de_queue, expect):
    view = two_node_view(pe_queue, de_queue)
    p = plan(request(9 * BLOCK, block_keys=keys(9)), view, 0.0, PolicyConfig(name=policy))
    assert p.read_path == expect
    assert p.num_de_blocks == (8 if expect == "de" else 0)


def test_split_balances_finish_times_across_both_snics():
    # equal rates, PE queue 4 blocks longer: of 12 blocks the DE takes 8, the PE 4
    view = two_node_view(pe_queue=4 * BLOCK * TOKEN_BYTES, stored=12)
    p = plan(request(13 * BLOCK, block_keys=keys(13)), view, 0.0, PolicyConfig("dualpath_split"))
    assert (p.read_path, p.num_de_blocks, p.pe_read_blocks) == ("split", 8, 4)
    # a DE SNIC 3x faster takes 3/4 of an even split
    view = two_node_view(stored=12, de_bandwidth=3e6)
    p = plan(request(13 * BLOCK, block_keys=keys(13)), view, 0.0, PolicyConfig("dualpath_split"))
    assert p.num_de_blocks == 9


def test_same_node_reads_on_that_node():
    view = view_of(
        engine("pe", "prefill", "n"),
        engine("de", "decode", "n"),
        nodes=[node("n")],
        stored_keys=keys(4),
    )
    p = plan(request(5 * BLOCK, block_keys=keys(5)), view, 0.0)
    assert (p.read_path, p.num_de_blocks) == ("pe", 0)


def test_plan_and_note_charges_read_queues_so_a_burst_spreads_over_sides():
    view = two_node_view(stored=8)
    sides = [
        plan_and_note(
            PlanRequest(f"r{i}", 9 * BLOCK, 10, keys(9)), view, 0.0, PolicyConfig("dualpath")
        ).read_path
        for i in range(4)
    ]
    # a tie (PE), the DE is then freer, a tie again (now DE), the PE is then freer
    assert sides == ["pe", "de", "de", "pe"]
    single = two_node_view(stored=8)
    sides = [
        plan_and_note(
            PlanRequest(f"r{i}", 9 * BLOCK, 10, keys(9)), single, 0.0, PolicyConfig("single_path")
        ).read_path
        for i in range(4)
    ]
    assert sides == ["pe"] * 4


def test_round_robin_ignores_load():
    view = view_of(
        engine("pe0", "prefill", "a", queued=0),
        engine("pe1", "prefill", "b", queued=10_000),
        engine("de0", "decode", "c"),
        engine("de1", "decode", "d"),
        nodes=[node(n) for n in "abcd"],
    )
    picks = [
        plan_and_note(PlanRequest(f"r{i}", 100, 10), view, 0.0, PolicyConfig("round_robin"))
        for i in range(4)
    ]
    assert [p.prefill_replica for p in picks] == ["pe0", "pe1", "pe0", "pe1"]
    assert [p.decode_replica for p in picks] == ["de0", "de1", "de0", "de1"]


def test_node_resync_requested_once_for_an_unknown_node():
    view = ClusterView()
    assert view.update_node(node("a")) is True
    assert view.update_node(node("a")) is False
    full = NodeReport("b", 0, 0, 0, None, 0.0, 0.0, events=(), full_sync=True)
    assert view.update_node(full) is False


def test_drained_engines_get_no_new_requests():
    view = view_of(
        engine("pe0", "prefill", "a", queued=0),
        engine("pe1", "prefill", "a", queued=900),
        engine("de0", "decode", "a"),
        engine("de1", "decode", "a", running=30),
        nodes=[node("a")],
    )
    first = plan(request(), view, 0.0)
    assert (first.prefill_replica, first.decode_replica) == ("pe0", "de0")
    view.drained |= {"pe0", "de0"}
    drained = plan(request(), view, 0.0)
    assert (drained.prefill_replica, drained.decode_replica) == ("pe1", "de1")
    view.drained |= {"pe1"}
    with pytest.raises(NoEngineAvailable):
        plan(request(), view, 0.0)


async def _drain(scheduler, rid, on=True):
    return await scheduler.drain(rid, on)


def test_scheduler_drain_matches_a_unique_suffix():
    import asyncio

    from deployments.scheduler.deployment import Scheduler

    scheduler = Scheduler()
    for r in (
        engine("app#PrefillEngine#abc1", "prefill"),
        engine("app#DecodeEngine#xyz2", "decode"),
    ):
        scheduler.view.update(r)
    assert asyncio.run(_drain(scheduler, "abc1")) == ["app#PrefillEngine#abc1"]
    with pytest.raises(ValueError):
        asyncio.run(_drain(scheduler, "nope"))
    assert asyncio.run(_drain(scheduler, "abc1", False)) == []
