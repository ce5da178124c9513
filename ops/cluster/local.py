"""LocalCluster: start, crash, rejoin and stop the nodes of a one-host Ray cluster."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from ops.cluster.procs import cluster_processes, find_raylet, kill_tree, started_processes
from ops.cluster.spec import (
    BIN,
    HEAD,
    ClusterState,
    NodePorts,
    NodeRecord,
    WorkerSpec,
    default_state_dir,
    free_ports,
    head_command,
    port_free,
    worker_command,
)

log = logging.getLogger(__name__)

_NODES_PROBE = """
import json, sys
from ray._raylet import GcsClient
infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
print(json.dumps([{"ray_node_id": i.hex(), "alive": n.state == n.ALIVE,
                   "resources": dict(n.resources_total)} for i, n in infos.items()]))
"""


class LocalCluster:
    """A head and named worker nodes on this host, each a separate `ray start` raylet.

    Usage: `with LocalCluster() as c: c.up([WorkerSpec("a")]); c.kill("a"); c.join("a")`.
    Nothing here calls `ray.init`: GCS is asked from a short-lived subprocess, so the caller
    stays free to connect as a driver itself.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        port: int | None = None,
        head_num_cpus: float = 0.0,
        head_object_store_bytes: int = 300 * 2**20,
        dashboard_port: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir or default_state_dir())
        port, client_port, default_dashboard = (
            free_ports(3) if port is None else [port, *free_ports(2)]
        )
        head = WorkerSpec(HEAD, head_num_cpus, head_object_store_bytes)
        self.state = ClusterState(
            port=port,
            dashboard_port=dashboard_port or default_dashboard,
            client_server_port=client_port,
            temp_dir=f"/tmp/dps-{port}",
            head=NodeRecord(spec=head, ports=NodePorts.free()),
        )

    @classmethod
    def load(cls, state_dir: Path | None = None) -> LocalCluster:
        """The cluster whose state file is in `state_dir` (started by any process)."""
        path = Path(state_dir or default_state_dir()) / "cluster.json"
        if not path.exists():
            raise FileNotFoundError(f"no cluster state at {path} (`python -m ops cluster up`)")
        cluster = cls.__new__(cls)
        cluster.state_dir = path.parent
        cluster.state = ClusterState.model_validate_json(path.read_text())
        return cluster

    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.state.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.state.dashboard_port}"

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def env(self) -> dict[str, str]:
        """For subprocesses such as `serve deploy`: token auth on, RAY_ADDRESS set."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address}

    def save(self) -> None:
        """Write the state file atomically (a reader never sees half of it)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(self.state.model_dump_json(indent=2))
        tmp.replace(self.state_file)

    def up(self, workers: Sequence[WorkerSpec], timeout_s: float = 120) -> None:
        """Start the head and every worker; return once GCS lists them all alive. On any
        failure whatever was started is stopped again."""
        names = [w.name for w in workers]
        if len(set(names)) != len(names) or HEAD in names:
            raise ValueError(f"worker names must be distinct and not {HEAD!r}: {names}")
        if self.state_file.exists():
            raise RuntimeError(f"{self.state_file} exists: `python -m ops cluster down` first")
        if not port_free(self.state.port):
            raise RuntimeError(f"port {self.state.port} is taken (another Ray cluster?)")
        deadline = time.monotonic() + timeout_s
        try:
            self.save()  # first, so `down` can clean up after a failed start
            self._ray_start(HEAD, head_command(self.state), deadline)
            for spec in workers:
                self.state.workers[spec.name] = NodeRecord(spec=spec, ports=NodePorts.free())
                self.save()
                self._start_worker(spec.name, deadline)
            self._wait(lambda ns: all(self._alive(ns, n) for n in [HEAD, *names]), deadline)
        except BaseException:
            self.down()
            raise
        log.info("cluster up", extra={"address": self.address, "dashboard": self.dashboard_url})

    def join(self, name: str, timeout_s: float = 60) -> None:
        """(Re)start worker `name` with its recorded spec on fresh ports; wait until alive."""
        record = self._record(name)
        if self._raylet(record) is not None:
            raise RuntimeError(f"node {name!r} is already running")
        deadline = time.monotonic() + timeout_s
        self.state.workers[name] = NodeRecord(spec=record.spec, ports=NodePorts.free())
        self.save()
        self._start_worker(name, deadline)
        self._wait(lambda ns: self._alive(ns, name), deadline)

    def kill(self, name: str, timeout_s: float = 60) -> None:
        """Crash worker `name`: SIGKILL its raylet and every descendant (agents, workers,
        actors) and its log monitor; wait until GCS marks it dead."""
        record = self._record(name)
        deadline = time.monotonic() + timeout_s
        ids = {n["ray_node_id"] for n in self.nodes() if n["name"] == name and n["alive"]}
        raylet = self._raylet(record)
        victims = kill_tree([raylet, *self._extra(record)] if raylet else self._extra(record))
        log.info("node killed", extra={"node": name, "processes": len(victims)})
        self._wait(lambda ns: not any(n["ray_node_id"] in ids and n["alive"] for n in ns), deadline)

    def down(self) -> None:
        """Kill every process of this cluster and remove the state file (idempotent). The
        temp dir stays: its session logs are what explains a failed run."""
        roots = cluster_processes(self.state.temp_dir)
        for record in [self.state.head, *self.state.workers.values()]:
            roots += self._extra(record)
        victims = kill_tree(roots)
        self.state_file.unlink(missing_ok=True)
        log.info("cluster down", extra={"address": self.address, "processes": len(victims)})

    def nodes(self) -> list[dict[str, Any]]:
        """Every node GCS knows, dead ones included: name (the custom resource; "head"),
        ray_node_id, alive, resources (total), object_store_bytes."""
        out = subprocess.run(
            [sys.executable, "-c", _NODES_PROBE, self.address],
            env=self.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"GCS at {self.address} did not answer: {out.stderr[-2000:]}")
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        known = [HEAD, *self.state.workers]
        for n in nodes:
            n["name"] = next((k for k in known if k in n["resources"]), "?")
            n["object_store_bytes"] = int(n["resources"].get("object_store_memory", 0))
        return nodes

    def deploy(self, config: Path, timeout_s: float = 600) -> None:
        """`serve deploy` the config, then wait until every application is RUNNING.

        Raises:
            RuntimeError: an application is DEPLOY_FAILED, or not RUNNING in time (the
                `serve status` text is in the message).
        """
        deadline = time.monotonic() + timeout_s
        serve = [str(BIN / "serve")]
        subprocess.run(
            [*serve, "deploy", str(config), "-a", self.dashboard_url], env=self.env(), check=True
        )
        while True:
            out = subprocess.run(
                [*serve, "status", "-a", self.dashboard_url],
                env=self.env(), capture_output=True, text=True,
            )  # fmt: skip
            apps = ((yaml.safe_load(out.stdout) if out.returncode == 0 else None) or {}).get(
                "applications"
            ) or {}
            states = {name: app.get("status") for name, app in apps.items()}
            if "DEPLOY_FAILED" in states.values():
                raise RuntimeError(f"deploy failed:\n{out.stdout}")
            if states and set(states.values()) == {"RUNNING"}:
                log.info("deployed", extra={"config": str(config), "apps": sorted(states)})
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not RUNNING after {timeout_s} s:\n{out.stdout}{out.stderr}")
            time.sleep(2)

    def _record(self, name: str) -> NodeRecord:
        if name not in self.state.workers:
            raise KeyError(f"no worker node {name!r} (known: {sorted(self.state.workers)})")
        return self.state.workers[name]

    @staticmethod
    def _alive(nodes: list[dict[str, Any]], name: str) -> bool:
        return any(n["name"] == name and n["alive"] for n in nodes)

    def _ray_start(self, name: str, cmd: list[str], deadline: float) -> None:
        """Run one `ray start`; record the processes it left outside its raylet's tree."""
        env = {k: v for k, v in self.env().items() if k != "RAY_ADDRESS"}
        before = {p.pid for p in psutil.process_iter()}
        t0 = time.monotonic()
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=max(1, deadline - t0)
        )
        record = self.state.head if name == HEAD else self.state.workers[name]
        started = started_processes(before, self.state.temp_dir, self.state.port)
        record.extra_pids = [(p.pid, p.create_time()) for p in started]
        self.save()  # also after a failed start: `down` stops what it left
        if out.returncode != 0:
            raise RuntimeError(f"`ray start` for {name} failed:\n{out.stdout[-3000:]}{out.stderr}")
        log.info("node started", extra={"node": name, "seconds": round(time.monotonic() - t0, 1)})

    def _start_worker(self, name: str, deadline: float) -> None:
        self._ray_start(name, worker_command(self.address, self.state.workers[name]), deadline)

    def _raylet(self, record: NodeRecord) -> psutil.Process | None:
        return find_raylet(self.state.temp_dir, record.ports.node_manager)

    @staticmethod
    def _extra(record: NodeRecord) -> list[psutil.Process]:
        procs = []
        for pid, created in record.extra_pids:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:  # not a recycled pid
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
        return procs

    def _wait(self, done: Callable[[list[dict[str, Any]]], bool], deadline: float) -> None:
        """Poll GCS until `done(nodes)`."""
        nodes: list[dict[str, Any]] | str = []
        while True:
            try:
                nodes = self.nodes()
                if done(nodes):
                    return
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                nodes = str(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {self.address} not as expected in time: {nodes}")
            time.sleep(0.5)
