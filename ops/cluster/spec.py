"""What a local cluster is made of, as plain data: the nodes, their ports, the `ray start`
command lines that start them, and the state file that lets another process find them."""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

HEAD = "head"
# GCS declares a node dead after this many missed health checks (Ray: 3 s x 5); a crashed
# raylet refuses the check at once, so this is the detection time. A slow but live raylet
# still gets the full per-check timeout (10 s) each time, so false deaths stay as unlikely.
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}  # Ray's own resources
BIN = Path(sys.executable).parent  # `ray` and `serve` of this environment


def default_state_dir() -> Path:
    return Path.home() / ".cache" / "dualpath-serve" / "cluster"


@dataclass(frozen=True)
class WorkerSpec:
    """One worker node; `name` is also the custom resource {name: 1} it offers."""

    name: str
    num_cpus: float = 1.0
    object_store_bytes: int = 300 * 2**20

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name in _RESERVED:
            raise ValueError(f"bad node name {self.name!r} (letters, digits, _ and -)")
        if self.num_cpus < 0 or self.num_cpus != int(self.num_cpus):
            raise ValueError(f"num_cpus must be a whole number >= 0 (`ray start`): {self.num_cpus}")


@dataclass(frozen=True)
class NodePorts:
    """A raylet's own ports; the defaults (e.g. the agent's 52365) collide between nodes."""

    node_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int

    @classmethod
    def free(cls) -> NodePorts:
        return cls(*free_ports(5))

    def args(self) -> list[str]:
        return [
            f"--node-manager-port={self.node_manager}",
            f"--metrics-export-port={self.metrics_export}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
        ]


class NodeRecord(BaseModel):
    spec: WorkerSpec
    ports: NodePorts
    # (pid, create time) of what its `ray start` left outside the raylet's tree (the log monitor)
    extra_pids: list[tuple[int, float]] = []


class ClusterState(BaseModel):
    """cluster.json: what another process needs to kill, join or stop this cluster."""

    port: int
    dashboard_port: int
    client_server_port: int
    temp_dir: str
    head: NodeRecord
    workers: dict[str, NodeRecord] = {}


def free_ports(n: int) -> list[int]:
    """`n` distinct ports the kernel has free now (ephemeral range, clear of Ray's worker
    ports 10002-19999); held open together so none repeats."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def head_command(state: ClusterState) -> list[str]:
    """`ray start --head`: resource {"head": 1}, dashboard on (`serve deploy` talks to it)."""
    spec = state.head.spec
    return [
        str(BIN / "ray"), "start", "--head", f"--port={state.port}",
        f"--num-cpus={int(spec.num_cpus)}", "--resources", json.dumps({HEAD: 1}),
        f"--object-store-memory={spec.object_store_bytes}", "--disable-usage-stats",
        f"--temp-dir={state.temp_dir}", "--include-dashboard=true",
        f"--dashboard-port={state.dashboard_port}",
        f"--ray-client-server-port={state.client_server_port}",
        "--system-config", json.dumps(HEALTH_CHECK), *state.head.ports.args(),
    ]  # fmt: skip


def worker_command(address: str, record: NodeRecord) -> list[str]:
    """`ray start --address`: resource {name: 1}; the temp dir comes from the head."""
    spec = record.spec
    return [
        str(BIN / "ray"), "start", f"--address={address}", f"--num-cpus={int(spec.num_cpus)}",
        "--resources", json.dumps({spec.name: 1}),
        f"--object-store-memory={spec.object_store_bytes}", "--disable-usage-stats",
        *record.ports.args(),
    ]  # fmt: skip
