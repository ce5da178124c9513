"""ops.cluster: the `ray start` command lines, the state file, crashing process trees, and
one real multi-raylet cluster on this host (integration)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import psutil
import pytest

from ops.cli import build_parser
from ops.cluster import (
    ClusterState,
    LocalCluster,
    NodePorts,
    NodeRecord,
    WorkerSpec,
    head_command,
    kill_tree,
    worker_command,
)
from ops.cluster.procs import cluster_processes, find_raylet, running, started_processes
from tests.helpers import wait_until

PORTS = NodePorts(41001, 41002, 41003, 41004, 41005)


def _state() -> ClusterState:
    return ClusterState(
        port=6390,
        dashboard_port=8266,
        client_server_port=41000,
        temp_dir="/tmp/dps-6390",
        head=NodeRecord(spec=WorkerSpec("head", 0, 200 * 2**20), ports=PORTS),
    )


def _value(cmd: list[str], flag: str) -> str:
    """The value of `--flag=value` or `--flag value` in a command line."""
    for i, arg in enumerate(cmd):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return cmd[i + 1]
    raise AssertionError(f"{flag} not in {cmd}")


def _ports_in(cmd: list[str], ports: NodePorts) -> None:
    assert _value(cmd, "--node-manager-port") == str(ports.node_manager)
    assert _value(cmd, "--metrics-export-port") == str(ports.metrics_export)
    assert _value(cmd, "--dashboard-agent-listen-port") == str(ports.dashboard_agent_listen)
    assert _value(cmd, "--dashboard-agent-grpc-port") == str(ports.dashboard_agent_grpc)
    assert _value(cmd, "--runtime-env-agent-port") == str(ports.runtime_env_agent)


def test_head_command_offers_the_head_resource_with_dashboard_and_its_own_ports():
    cmd = head_command(_state())
    assert cmd[0].endswith("/ray") and cmd[1:3] == ["start", "--head"]
    assert _value(cmd, "--port") == "6390"
    assert _value(cmd, "--num-cpus") == "0"
    assert json.loads(_value(cmd, "--resources")) == {"head": 1}
    assert _value(cmd, "--object-store-memory") == str(200 * 2**20)
    assert _value(cmd, "--temp-dir") == "/tmp/dps-6390"
    assert _value(cmd, "--include-dashboard") == "true"
    assert _value(cmd, "--dashboard-port") == "8266"
    assert _value(cmd, "--ray-client-server-port") == "41000"
    assert "health_check_period_ms" in json.loads(_value(cmd, "--system-config"))
    assert "--disable-usage-stats" in cmd
    _ports_in(cmd, PORTS)


def test_worker_command_offers_its_name_as_a_resource_and_inherits_the_temp_dir():
    record = NodeRecord(spec=WorkerSpec("dnode0", 2, 100 * 2**20), ports=PORTS)
    cmd = worker_command("127.0.0.1:6390", record)
    assert cmd[1] == "start" and "--head" not in cmd
    assert _value(cmd, "--address") == "127.0.0.1:6390"
    assert _value(cmd, "--num-cpus") == "2"
    assert json.loads(_value(cmd, "--resources")) == {"dnode0": 1}
    assert _value(cmd, "--object-store-memory") == str(100 * 2**20)
    assert not any(a.startswith("--temp-dir") for a in cmd)
    _ports_in(cmd, PORTS)


@pytest.mark.parametrize(
    "bad", [dict(name="a b"), dict(name=""), dict(name="CPU"), dict(name="a", num_cpus=0.5)]
)
def test_worker_spec_refuses_what_ray_start_cannot_express(bad):
    with pytest.raises(ValueError):
        WorkerSpec(**bad)


def test_each_node_gets_distinct_free_ports():
    ports = [p for _ in range(3) for p in vars(NodePorts.free()).values()]
    assert len(set(ports)) >= len(ports) - 1  # two draws may rarely reuse a released port
    assert all(p > 19999 or p < 10002 for p in ports)  # clear of Ray's worker ports


def test_state_file_round_trip(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path, port=6399, head_num_cpus=1, dashboard_port=8299)
    cluster.state.workers["a"] = NodeRecord(
        spec=WorkerSpec("a"), ports=PORTS, extra_pids=[(123, 1.5)]
    )
    cluster.save()
    loaded = LocalCluster.load(tmp_path)
    assert loaded.state == cluster.state
    assert loaded.state.workers["a"].spec == WorkerSpec("a")
    assert loaded.address == "127.0.0.1:6399"
    assert loaded.dashboard_url == "http://127.0.0.1:8299"
    assert loaded.state.temp_dir == "/tmp/dps-6399"
    env = loaded.env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"] == "127.0.0.1:6399"


def test_load_without_a_state_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="cluster up"):
        LocalCluster.load(tmp_path)


def test_kill_tree_kills_a_parent_and_all_descendants():
    shell = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60 & wait' & sleep 60 & wait"])
    root = psutil.Process(shell.pid)
    wait_until(lambda: len(root.children(recursive=True)) == 3, "the tree is spawned")
    tree = [root, *root.children(recursive=True)]
    victims = kill_tree([root])
    assert {p.pid for p in victims} == {p.pid for p in tree}
    shell.wait(timeout=10)
    wait_until(lambda: not any(running(p) for p in tree), "the whole tree is gone")
    assert running(psutil.Process())


def _sleepers(*argvs: list[str]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen(argv) for argv in argvs]
    wait_until(lambda: all(psutil.Process(p.pid).cmdline() for p in procs), "all started")
    return procs


def test_cluster_processes_name_the_temp_dir_and_are_ray_or_python(tmp_path):
    temp = str(tmp_path / "dps-1")
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = _sleepers(
        [*sleep, f"--temp-dir={temp}"],
        [*sleep, f"--log-dir={temp}/session_1/logs"],
        [*sleep, f"--temp-dir={temp}-other"],
        ["sh", "-c", "sleep 60", f"{temp}/session_1/logs/raylet.out"],  # someone's tail -f
    )
    try:
        found = {p.pid for p in cluster_processes(temp)} & {p.pid for p in procs}
        assert found == {procs[0].pid, procs[1].pid}
        assert find_raylet(temp, 7777) is None
    finally:
        kill_tree([psutil.Process(p.pid) for p in procs])


def test_started_processes_are_the_new_ones_naming_the_temp_dir_or_gcs_port(tmp_path):
    temp = str(tmp_path / "dps-1")
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    (old,) = _sleepers([*sleep, f"--temp-dir={temp}"])
    before = {p.pid for p in psutil.process_iter()}
    procs = _sleepers(
        [*sleep, f"--temp-dir={temp}"],
        [*sleep, "--address=10.0.0.1:7777"],  # the Ray client server names only GCS
        [*sleep, "--address=10.0.0.1:77777"],
        [*sleep, "--address=10.0.0.1:7778"],
    )
    try:
        found = {p.pid for p in started_processes(before, temp, 7777)}
        assert found == {procs[0].pid, procs[1].pid}
    finally:
        kill_tree([psutil.Process(p.pid) for p in [old, *procs]])


def test_cli_defaults_to_the_1p2d_layout():
    args = build_parser().parse_args(["cluster", "up"])
    assert args.workers == "pnode,dnode0,dnode1"
    assert args.port == 6390 and args.object_store == "300MiB" and args.deploy is None
    assert build_parser().parse_args(["cluster", "kill", "dnode1"]).name == "dnode1"


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_cluster_loses_a_node_and_gets_it_back(tmp_path):
    """Three raylets; b crashes (GCS marks it dead), rejoins as a new node, and `down` leaves
    no process of this cluster behind."""
    cluster = LocalCluster(state_dir=tmp_path)
    temp_dir = cluster.state.temp_dir
    try:
        with cluster:
            cluster.up([WorkerSpec("a"), WorkerSpec("b")], timeout_s=60)
            nodes = {n["name"]: n for n in cluster.nodes()}
            assert set(nodes) == {"head", "a", "b"} and all(n["alive"] for n in nodes.values())
            assert nodes["head"]["resources"]["head"] == 1
            assert "CPU" not in nodes["head"]["resources"]
            for name in ("a", "b"):
                assert nodes[name]["resources"][name] == 1
                assert nodes[name]["resources"]["CPU"] == 1
                assert nodes[name]["object_store_bytes"] == 300 * 2**20
            assert len({n["ray_node_id"] for n in nodes.values()}) == 3

            cluster.kill("b", timeout_s=30)
            after = cluster.nodes()
            assert not any(n["alive"] for n in after if n["name"] == "b")
            assert all(n["alive"] for n in after if n["name"] in ("head", "a"))
            assert find_raylet(temp_dir, cluster.state.workers["b"].ports.node_manager) is None

            cluster.join("b", timeout_s=30)
            b = [n for n in cluster.nodes() if n["name"] == "b"]
            assert [n["alive"] for n in b if n["ray_node_id"] == nodes["b"]["ray_node_id"]] == [
                False
            ]
            assert sum(n["alive"] for n in b) == 1
            head_extras = [psutil.Process(pid) for pid, _ in cluster.state.head.extra_pids]
            assert any("ray.util.client.server" in p.cmdline() for p in head_extras)
            everything = cluster_processes(temp_dir) + head_extras
        assert not cluster_processes(temp_dir)
        assert not [p for p in everything if running(p)]
        assert not any(
            p.info["name"] == "raylet" and temp_dir in " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["name", "cmdline"])
            if running(p)
        )
        assert not cluster.state_file.exists()
    finally:
        cluster.down()
        shutil.rmtree(temp_dir, ignore_errors=True)
