"""A real multi-node Ray cluster on one machine, started the way users start one (`ray start`
per node), with worker nodes that can crash and rejoin.

    python -m ops cluster up [--workers pnode,dnode0,dnode1] [--deploy serve_config.cluster.yaml]
    python -m ops cluster kill NAME | join NAME | status | down

Each node is its own raylet (object store, node id) offering the custom resource {name: 1},
so deployments can be pinned to it. Every port is chosen explicitly (several raylets share
the host) and the head gets its own temp dir, /tmp/dps-<port> (short: Unix socket paths stop
at ~107 chars), which the worker nodes inherit. Every process of the cluster has that dir or
the GCS port in its command line, or descends from one that does: that is how `down` finds
them all without `ray stop`, which would take every other Ray session on the host with it.

Reading path: spec.py (nodes, ports, the `ray start` command lines, the state file) →
procs.py (finding and crashing process trees) → local.py (LocalCluster) → cli.py.
"""

from ops.cluster.cli import add_parsers
from ops.cluster.local import LocalCluster
from ops.cluster.procs import kill_tree
from ops.cluster.spec import (
    HEAD,
    ClusterState,
    NodePorts,
    NodeRecord,
    WorkerSpec,
    default_state_dir,
    head_command,
    worker_command,
)

__all__ = [
    "HEAD",
    "ClusterState",
    "LocalCluster",
    "NodePorts",
    "NodeRecord",
    "WorkerSpec",
    "add_parsers",
    "default_state_dir",
    "head_command",
    "kill_tree",
    "worker_command",
]
