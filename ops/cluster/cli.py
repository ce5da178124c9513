"""`python -m ops cluster up | down | kill NAME | join NAME | status`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ops.cluster.local import LocalCluster
from ops.cluster.spec import HEAD, WorkerSpec, default_state_dir

DEFAULT_WORKERS = "pnode,dnode0,dnode1"  # the 1P2D layout of serve_config.cluster.yaml


def _state_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.state_dir) if args.state_dir else None


def _cmd_up(args: argparse.Namespace) -> int:
    from deployments.options import parse_bytes

    store = parse_bytes(args.object_store)
    workers = [WorkerSpec(n, args.worker_cpus, store) for n in args.workers.split(",") if n]
    cluster = LocalCluster(_state_dir(args), port=args.port, dashboard_port=args.dashboard_port)
    cluster.up(workers)
    if args.deploy:
        cluster.deploy(Path(args.deploy))
    Console().print(
        f"Ray cluster at [bold]{cluster.address}[/] ({len(workers) + 1} raylets), dashboard "
        f"{cluster.dashboard_url}\n  RAY_AUTH_MODE=token RAY_ADDRESS={cluster.address} "
        f".venv/bin/serve status -a {cluster.dashboard_url}"
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        cluster = LocalCluster.load(_state_dir(args))
    except FileNotFoundError:  # no state: still sweep a cluster left on the default port
        cluster = LocalCluster(_state_dir(args), port=args.port)
    cluster.down()
    return 0


def _cmd_kill(args: argparse.Namespace) -> int:
    LocalCluster.load(_state_dir(args)).kill(args.name)
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    LocalCluster.load(_state_dir(args)).join(args.name)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster.load(_state_dir(args))
    table = Table(title=f"Ray cluster {cluster.address} (dashboard {cluster.dashboard_url})")
    for col in ("name", "node id", "alive", "CPUs", "object store"):
        table.add_column(col, justify="right" if col in ("CPUs", "object store") else "left")
    for n in sorted(cluster.nodes(), key=lambda n: (n["name"] != HEAD, n["name"], n["alive"])):
        table.add_row(
            n["name"],
            n["ray_node_id"][:12],
            "yes" if n["alive"] else "[red]dead[/]",
            f"{n['resources'].get('CPU', 0):g}",
            f"{n['object_store_bytes'] / 2**20:.0f} MiB",
        )
    Console().print(table)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`cluster up | down | kill NAME | join NAME | status` under `python -m ops`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help=f"default: {default_state_dir()}")
    cluster = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine")
    cmds = cluster.add_subparsers(dest="cluster_cmd", required=True)

    up = cmds.add_parser("up", parents=[common], help="start head + worker nodes")
    up.add_argument("--workers", default=DEFAULT_WORKERS, help="comma-separated node names")
    up.add_argument("--worker-cpus", type=float, default=1.0)
    up.add_argument("--object-store", default="300MiB", help="per worker node")
    up.add_argument("--port", type=int, default=6390, help="GCS port")
    up.add_argument("--dashboard-port", type=int, default=None, help="default: a free port")
    up.add_argument("--deploy", help="then `serve deploy` this config and wait until RUNNING")
    up.set_defaults(func=_cmd_up)

    down = cmds.add_parser("down", parents=[common], help="kill every process of the cluster")
    down.add_argument("--port", type=int, default=6390, help="GCS port, if no state file")
    down.set_defaults(func=_cmd_down)
    for name, func, text in [
        ("kill", _cmd_kill, "crash a worker node (SIGKILL its raylet tree)"),
        ("join", _cmd_join, "restart a killed worker node"),
    ]:
        cmd = cmds.add_parser(name, parents=[common], help=text)
        cmd.add_argument("name")
        cmd.set_defaults(func=func)
    cmds.add_parser("status", parents=[common], help="the Ray nodes").set_defaults(func=_cmd_status)
