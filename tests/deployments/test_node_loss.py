"""A whole Ray node lost (issue 24), in the Scheduler's pure view: its engines and its
logical node's DRAM tier leave at once, NVMe blocks on the shared directory stay hits, a
DE lost mid-decode is replaced on another node, and the node's return is a full resync.
No Ray: the live test is tests/cluster/test_node_kill.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deployments.scheduler.policy import NoEngineAvailable, plan, replace_decode
from deployments.scheduler.view import ClusterView
from kvstore.index import IndexEvent, TierName
from tests.deployments.test_scheduler_policy import BLOCK, TOKEN_BYTES, engine, keys, node, request

NBYTES = BLOCK * TOKEN_BYTES


def cluster_view() -> ClusterView:
    """Ray nodes A (pnode: a PE), B (dnode0: a DE), C (dnode1: a DE); blocks k0..k3 on the
    shared NVMe, k4..k5 only in dnode0's DRAM."""
    view = ClusterView()
    for rid, role, logical, ray_node in (
        ("pe", "prefill", "pnode", "A"),
        ("de0", "decode", "dnode0", "B"),
        ("de1", "decode", "dnode1", "C"),
    ):
        view.update(replace(engine(rid, role, logical), ray_node_id=ray_node))
    for logical, ray_node in (("pnode", "A"), ("dnode0", "B"), ("dnode1", "C")):
        view.update_node(replace(node(logical), ray_node_id=ray_node, full_sync=True))
    ks = keys(6)
    view.index.apply(IndexEvent(k, TierName.NVME, True, nbytes=NBYTES) for k in ks[:4])
    view.index.apply(IndexEvent(k, TierName.DRAM, True, "dnode0", NBYTES) for k in ks[4:])
    return view


def test_a_dead_ray_node_takes_its_engines_and_dram_tier_along():
    view = cluster_view()
    ks = keys(6)
    assert view.index.longest_prefix(ks) == 6
    replicas, nodes = view.drop_ray_nodes({"B"})
    assert (replicas, nodes) == (["de0"], ["dnode0"])
    assert set(view.engines) == {"pe", "de1"} and set(view.nodes) == {"pnode", "dnode1"}
    assert view.index.longest_prefix(ks) == 4  # DRAM-only blocks are misses, NVMe stays
    assert view.drop_ray_nodes({"B"}) == ([], [])  # idempotent: the dead set only grows
    p = plan(request(prompt=7 * BLOCK, block_keys=ks), view, 0.0)
    assert (p.decode_replica, p.num_hit_blocks) == ("de1", 4)


def test_unknown_or_empty_ray_node_ids_are_never_dropped():
    view = cluster_view()
    view.update(engine("local-de", "decode", "dnode1"))  # outside Ray: ray_node_id ""
    assert view.drop_ray_nodes({"Z"}) == ([], [])
    assert "local-de" in view.engines


def test_a_lost_decode_replica_is_replaced_on_another_node_and_charged():
    view = cluster_view()
    de = replace_decode("r1", "de0", 500, view, 0.0)
    assert (de.report.replica_id, de.node_id) == ("de1", "dnode1")
    assert "de0" not in view.engines
    assert view.engines["de1"].planned_tokens == 500
    with pytest.raises(NoEngineAvailable):
        replace_decode("r1", "de1", 500, view, 0.0)


def test_a_rejoined_node_resyncs_and_is_planned_onto_again():
    view = cluster_view()
    view.drop_ray_nodes({"B"})
    ks = keys(6)
    # the node comes back as a new Ray node; its TrafficManager's first report is a full sync
    back = replace(node("dnode0"), ray_node_id="B2", full_sync=True)
    back = replace(back, events=(IndexEvent(ks[4], TierName.DRAM, True, "dnode0", NBYTES),))
    assert view.update_node(back, 1.0) is False  # a full sync needs no second one
    view.update(replace(engine("de0b", "decode", "dnode0", t=1.0), ray_node_id="B2"))
    assert view.index.longest_prefix(ks) == 5
    assert {e.report.replica_id for e in view.live("decode", 1.0)} == {"de0b", "de1"}
