"""`ops status` names the Ray node each replica runs on (issue 24): replicas of the app only,
live ones only, each node named by the custom resource it offers (what `ray_resources` pins
logical nodes to), else its short id. Pure: no Ray."""

from __future__ import annotations

from rich.console import Console

from ops.status import placement, ray_node_label, render

NODES = [
    {"NodeID": "aa" * 14, "Alive": True, "Resources": {"CPU": 0.0, "head": 1.0, "node:1": 1}},
    {"NodeID": "bb" * 14, "Alive": True, "Resources": {"CPU": 1.0, "pnode": 1.0}},
    {"NodeID": "cc" * 14, "Alive": False, "Resources": {"CPU": 1.0}},
]


def actor(name: str, node: str, state: str = "ALIVE") -> dict:
    return {"name": name, "node_id": node, "state": state}


def test_each_live_replica_of_the_app_gets_its_ray_node():
    actors = [
        actor("SERVE_REPLICA::dualpath#Ingress#i1", "aa" * 14),
        actor("SERVE_REPLICA::dualpath#PrefillEngine-pnode#p1", "bb" * 14),
        actor("SERVE_REPLICA::dualpath#DecodeEngine-dnode0#d1", "cc" * 14),
        actor("SERVE_REPLICA::dualpath#DecodeEngine-dnode0#d0", "bb" * 14, "DEAD"),
        actor("SERVE_REPLICA::other#Ingress#x", "aa" * 14),
        actor("SERVE_CONTROLLER_ACTOR", "aa" * 14),
    ]
    rows = placement("dualpath", actors, NODES)
    assert [(r["deployment"], r["replica"], r["ray_node"]) for r in rows] == [
        ("DecodeEngine-dnode0", "d1", "cccccccc"),  # no custom resource: its short id
        ("Ingress", "i1", "head"),
        ("PrefillEngine-pnode", "p1", "pnode"),
    ]
    assert rows[0]["node_alive"] == "false"


def test_labels_skip_ray_s_own_resources():
    assert ray_node_label({"CPU": 2, "memory": 1, "node:10.0.0.5": 1, "dnode1": 1}, "x") == "dnode1"
    assert ray_node_label({"CPU": 2, "accelerator_type:H100": 1}, "0123456789") == "01234567"


def test_render_shows_the_placement_table():
    data = {
        "app": "dualpath",
        "status": "RUNNING",
        "deployments": {"Ingress": "HEALTHY"},
        "replicas": placement(
            "dualpath", [actor("SERVE_REPLICA::dualpath#Ingress#i1", "aa" * 14)], NODES
        ),
        "scheduler": {"policy": "dualpath", "read_paths": {}},
        "engines": [],
        "nodes": {},
        "admission": {
            "open": True,
            "window": "normal",
            "queued": 0,
            "counts": {},
            "in_flight": {"requests": 0, "prefill_tokens": 0},
        },
    }
    console = Console(record=True, width=160)
    render(data, console)
    text = console.export_text()
    assert "the Ray node each runs on" in text and "head" in text
