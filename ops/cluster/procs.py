"""Finding a local cluster's processes and crashing process trees (psutil, no Ray)."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterable

import psutil


def running(p: psutil.Process) -> bool:
    """Alive, not a zombie waiting to be reaped."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(roots: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    tree: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                tree.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
    return tree


def _signal(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def kill_tree(roots: Iterable[psutil.Process], timeout_s: float = 10) -> list[psutil.Process]:
    """SIGKILL `roots` and all their descendants, as a crash would; returns those signalled.
    All are stopped (SIGSTOP) first, so none forks or respawns a child between listing the
    tree and killing it. Never signals this process or its ancestors."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    stopped = {pid: p for pid, p in _tree(roots).items() if pid not in spared}
    _signal(stopped.values(), signal.SIGSTOP)
    victims = [p for pid, p in _tree(stopped.values()).items() if pid not in spared]
    _signal(victims, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=timeout_s)
    return victims


def _names_dir(args: list[str], temp_dir: str) -> bool:
    return any(a == temp_dir or f"{temp_dir}/" in a or a.endswith(f"={temp_dir}") for a in args)


def _is_ray(args: list[str]) -> bool:
    """A Ray binary or Python, not e.g. someone's `tail -f` of a log in the temp dir."""
    return bool(args) and ("python" in args[0] or "/ray/" in args[0])


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The live processes naming the cluster's temp dir: GCS, raylets, dashboard, monitors,
    Ray workers. (The Ray client server names only the GCS address; `started_processes`
    catches it when the head starts.)"""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if _is_ray(args) and _names_dir(args, temp_dir) and running(p):
            found.append(p)
    return found


def started_processes(before: set[int], temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """What one `ray start` left besides its raylet's tree: processes new since `before`
    that name the temp dir or the GCS address (which this cluster's GCS holds, so they are
    ours) and descend from no raylet. The log monitor; on the head also GCS, dashboard,
    autoscaler monitor and Ray client server."""
    gcs_arg = re.compile(rf"^--(gcs-)?address=[\d.]+:{gcs_port}$")
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        args = p.info["cmdline"] or []
        ours = _names_dir(args, temp_dir) or any(gcs_arg.match(a) for a in args)
        if p.pid in before or not (ours and _is_ray(args)):
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            if not any(a.name() == "raylet" for a in [p, *p.parents()]):
                found.append(p)
    return found


def find_raylet(temp_dir: str, node_manager_port: int) -> psutil.Process | None:
    """The live raylet of the cluster in `temp_dir` listening on `node_manager_port`."""
    flag = f"--node_manager_port={node_manager_port}"
    for p in psutil.process_iter(["name", "cmdline"]):
        args = p.info["cmdline"] or []
        ours = flag in args and any(f"{temp_dir}/" in a for a in args)
        if p.info["name"] == "raylet" and ours and running(p):
            return p
    return None
