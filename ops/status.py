"""`python -m ops status`: one screen on a running app — deployments, the Ray node each replica
runs on, engines and their load, each node's storage NIC and KV tiers, the admission queue.

    python -m ops status [--app dualpath] [--address auto] [--json]

Connects to the Ray cluster (token auth: reads ~/.ray/auth_token) and asks the app's own
deployments through Serve handles; it changes nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def collect(app: str) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the caller is connected to Ray)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        raise SystemExit(f"no Serve application named {app!r} (see `serve status`)")
    deployments = {name: d.status.value for name, d in status.deployments.items()}
    scheduler = serve.get_deployment_handle("Scheduler", app)
    sched = scheduler.stats.remote().result()
    engines = [
        {
            "replica": r.replica_id,
            "role": r.role,
            "node": r.node_id,
            "running": r.num_running,
            "waiting": r.num_waiting,
            "queued_tokens": r.num_queued_tokens,
            "free_blocks": r.num_free_blocks,
            "total_blocks": r.num_total_blocks,
            "prefill_tokens_per_s": round(r.prefill_tokens_per_s, 1),
        }
        for r in scheduler.engines.remote().result()
    ]
    nodes = {}
    for name in deployments:
        if name.startswith("TrafficManager-"):
            node = name.removeprefix("TrafficManager-")
            nodes[node] = serve.get_deployment_handle(name, app).stats.remote().result()
    admission = serve.get_app_handle(app).admission_stats.remote().result()
    return {
        "replicas": _replica_placement(app),
        "app": app,
        "status": status.status.value,
        "deployments": deployments,
        "scheduler": sched,
        "engines": engines,
        "nodes": nodes,
        "admission": admission,
    }


_STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "TPU")


def ray_node_label(resources: dict[str, float], node_id: str) -> str:
    """How a Ray node is named on screen: the custom resources it offers (what `ray_resources`
    pins logical nodes to, e.g. `pnode`; `head` for the head), else its short id."""
    custom = sorted(
        r
        for r in resources
        if r not in _STANDARD_RESOURCES and not r.startswith(("node:", "accelerator_type:"))
    )
    return ",".join(custom) or node_id[:8]


def placement(
    app: str, actors: list[dict[str, Any]], nodes: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """Each live replica of `app` with its Ray node: `actors` as `ray.util.state.list_actors`
    gives them (name, node_id, state), `nodes` as `ray.nodes()`."""
    labels = {n["NodeID"]: ray_node_label(n.get("Resources", {}), n["NodeID"]) for n in nodes}
    alive = {n["NodeID"]: n.get("Alive", False) for n in nodes}
    prefix = f"SERVE_REPLICA::{app}#"
    rows = []
    for actor in actors:
        name = actor.get("name") or ""
        if not name.startswith(prefix) or actor.get("state") != "ALIVE":
            continue
        deployment, _, replica = name.removeprefix(prefix).partition("#")
        node_id = actor.get("node_id") or ""
        rows.append(
            {
                "deployment": deployment,
                "replica": replica,
                "ray_node": labels.get(node_id, node_id[:8]),
                "ray_node_id": node_id,
                "node_alive": str(alive.get(node_id, False)).lower(),
            }
        )
    return sorted(rows, key=lambda r: (r["deployment"], r["replica"]))


def _replica_placement(app: str) -> list[dict[str, str]]:
    """`placement` of the running app; empty if the state API (the dashboard) is not up."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=False)
    except Exception:  # no dashboard on this cluster: the table is left out
        return []
    rows = [{"name": a.name, "node_id": a.node_id, "state": a.state} for a in actors]
    return placement(app, rows, ray.nodes())


def render(data: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{data['app']}[/bold]: {data['status']}")
    table = Table(title="deployments")
    table.add_column("deployment")
    table.add_column("status")
    for name, state in sorted(data["deployments"].items()):
        table.add_row(name, state)
    console.print(table)

    if data.get("replicas"):
        table = Table(title="replicas: the Ray node each runs on")
        for col in ("deployment", "replica", "ray node", "ray node id"):
            table.add_column(col)
        for r in data["replicas"]:
            table.add_row(r["deployment"], r["replica"], r["ray_node"], r["ray_node_id"][:12])
        console.print(table)

    table = Table(title=f"engines (policy {data['scheduler'].get('policy')})")
    for col in (
        "replica",
        "role",
        "node",
        "running",
        "waiting",
        "queued tok",
        "free blocks",
        "prefill tok/s",
    ):
        table.add_column(col, justify="left" if col in ("replica", "role", "node") else "right")
    for e in sorted(data["engines"], key=lambda e: (e["role"], e["replica"])):
        table.add_row(
            e["replica"][-12:],
            e["role"],
            e["node"],
            str(e["running"]),
            str(e["waiting"]),
            str(e["queued_tokens"]),
            f"{e['free_blocks']}/{e['total_blocks']}",
            str(e["prefill_tokens_per_s"]),
        )
    console.print(table)

    table = Table(title="nodes: storage NIC and KV tiers")
    for col in (
        "node",
        "SNIC read queue",
        "SNIC write queue",
        "read MB",
        "written MB",
        "DRAM blocks",
        "NVMe blocks",
        "pending writes",
    ):
        table.add_column(col, justify="left" if col == "node" else "right")
    for node, stats in sorted(data["nodes"].items()):
        snic, kv = stats.get("snic") or {}, stats.get("kvstore") or {}
        dram, nvme = kv.get("dram") or {}, kv.get("nvme") or {}
        table.add_row(
            node,
            _bytes(snic.get("read_queue_bytes")),
            _bytes(snic.get("write_queue_bytes")),
            _mb(snic.get("bytes_read_total")),
            _mb(snic.get("bytes_written_total")),
            str(dram.get("blocks", "-")),
            str(nvme.get("num_blocks", "-")),
            str(kv.get("pending_writes", "-")),
        )
    console.print(table)
    console.print(f"read paths: {data['scheduler'].get('read_paths')}")

    adm = data["admission"]
    flight = adm["in_flight"]
    console.print(
        f"admission ({'open' if adm['open'] else 'API keys'}; billing window {adm['window']}): "
        f"queued {adm['queued']}, in flight {flight['requests']} requests / "
        f"{flight['prefill_tokens']} prefill tokens, outcomes {adm['counts']}"
    )


def _bytes(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    data = collect(args.app)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        render(data, Console(width=160))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="deployments, engines, SNIC queues, KV tiers, queue")
    status.add_argument("--app", default="dualpath")
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def cmd_drain(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    scheduler = serve.get_deployment_handle("Scheduler", args.app)
    drained = scheduler.drain.remote(args.replica, args.drain).result()
    Console().print(f"drained replicas: {drained or 'none'}")
    return 0


def add_drain_parsers(sub: argparse._SubParsersAction) -> None:
    for name, drain, text in (
        ("drain", True, "plan no new requests on an engine replica (running ones finish)"),
        ("undrain", False, "plan requests on a drained engine replica again"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("replica", help="the replica id, or a unique suffix of it")
        p.add_argument("--app", default="dualpath")
        p.add_argument("--address", default="auto")
        p.set_defaults(func=cmd_drain, drain=drain)
