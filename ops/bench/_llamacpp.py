"""llama.cpp as an opt-in peer for the CPU benchmarks: build it once, run its tools.

Reading path:
1. `ensure_llamacpp` builds `llama-batched-bench` and `llama-server` from the llama.cpp tree
   vendored in the pinned `llama-cpp-python` sdist, once per machine, into a cache outside
   the repo (`~/.cache/dualpath-serve/llamacpp/<version>/bin`, or `$DUALPATH_LLAMACPP_DIR`).
2. `batched_bench` / `prefill_bench` run `llama-batched-bench` and return its rows, parsed by
   the pure `parse_batched_bench_jsonl`.
3. `llama_server` runs `llama-server` for the lifetime of a `with` block.

Nothing here runs unless a benchmark asks for it; the build needs cmake and a C++ compiler.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ops.bench._serve import free_port

logger = logging.getLogger(__name__)

LLAMACPP_PY_VERSION = "0.3.36"  # llama-cpp-python on PyPI; its sdist vendors llama.cpp
BINARIES = ("llama-batched-bench", "llama-server")
MARKER = "BUILT"  # written last: its presence means every binary in bin/ is complete
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    # NOTE: static, so the two binaries can be copied out of the build tree and the
    # source + build (~hundreds of MB) deleted; shared builds rpath into the build dir.
    "-DBUILD_SHARED_LIBS=OFF",
)
BUILD_JOBS = 2  # ~7 min on 2 cores; more jobs mostly add memory pressure on small VMs
_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


def default_cache_dir() -> Path:
    """Where the build for the pinned version lives (`$DUALPATH_LLAMACPP_DIR` wins)."""
    override = os.environ.get("DUALPATH_LLAMACPP_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "dualpath-serve" / "llamacpp" / LLAMACPP_PY_VERSION


def is_built(cache_dir: Path) -> bool:
    """True when the marker and every binary are in `cache_dir/bin`."""
    bin_dir = cache_dir / "bin"
    return (bin_dir / MARKER).is_file() and all((bin_dir / b).is_file() for b in BINARIES)


def ensure_llamacpp(cache_dir: Path | None = None) -> Path:
    """Build llama.cpp's bench and server binaries once; return the directory holding them.

    Concurrent callers serialise on an fcntl lock in `cache_dir`; the one that gets it second
    finds the marker and returns without building.

    Args:
        cache_dir: build cache for this version; default `default_cache_dir()`.

    Returns:
        `cache_dir/bin`, holding `llama-batched-bench` and `llama-server`.

    Raises:
        RuntimeError: cmake or the compiler is missing, or a step of the build failed.
    """
    cache_dir = cache_dir or default_cache_dir()
    bin_dir = cache_dir / "bin"
    if is_built(cache_dir):
        return bin_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("llama.cpp build lock held; waiting", extra={"cache_dir": str(cache_dir)})
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(cache_dir):  # another caller built it while we waited
            return bin_dir
        for stale in cache_dir.glob("build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        _build(cache_dir, bin_dir)
    return bin_dir


def _build(cache_dir: Path, bin_dir: Path) -> None:
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama.cpp needs cmake (and a C++ compiler) on PATH")
    t0 = time.monotonic()
    log = {"version": LLAMACPP_PY_VERSION, "cache_dir": str(cache_dir)}
    logger.info("building llama.cpp (one-off, several minutes)", extra=log)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as tmp:
        work = Path(tmp)
        spec = f"llama-cpp-python=={LLAMACPP_PY_VERSION}"
        _run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            + ["-d", str(work), spec],
            cwd=work,
            step="download",
        )
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (src,) = work.glob("llama_cpp_python-*/vendor/llama.cpp")
        _run(["cmake", "-S", ".", "-B", "build", *CMAKE_FLAGS], cwd=src, step="configure")
        _run(
            ["cmake", "--build", "build", "-j", str(BUILD_JOBS), "--target", *BINARIES],
            cwd=src,
            step="compile",
        )
        staged = cache_dir / "bin.partial"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        for name in BINARIES:
            shutil.copy2(src / "build" / "bin" / name, staged / name)
        shutil.rmtree(bin_dir, ignore_errors=True)
        staged.rename(bin_dir)
        (bin_dir / MARKER).write_text(f"llama-cpp-python {LLAMACPP_PY_VERSION}\n")
    log["build_s"] = round(time.monotonic() - t0, 1)
    logger.info("llama.cpp built", extra=log)


def _run(cmd: list[str], cwd: Path, step: str) -> None:
    """Run one build step, streaming its lines to debug and each 10% of progress to info."""
    logger.info("llama.cpp build step", extra={"step": step, "cmd": " ".join(cmd)})
    if shutil.which("nice"):  # a one-off build should not slow down whatever else runs
        cmd = ["nice", "-n", "10", *cmd]
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    shown = -10
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        logger.debug(line, extra={"step": step})
        m = _PROGRESS.match(line)
        if m and int(m.group(1)) >= shown + 10:
            shown = int(m.group(1))
            logger.info("llama.cpp build progress", extra={"step": step, "percent": shown})
    if proc.wait() != 0:
        raise RuntimeError(f"llama.cpp {step} failed ({proc.returncode}):\n" + "\n".join(tail))


def parse_batched_bench_jsonl(text: str) -> list[dict[str, Any]]:
    """Rows of `llama-batched-bench --output-format jsonl` output, in our column names.

    Lines that are not a result object (logs, the perf summary) are skipped.
    `prefill_tok_s` counts every sequence's prompt (`batch * prompt_tokens / prefill_s`);
    `decode_tok_s` is `batch * gen_tokens / decode_s`.
    """
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        raw = json.loads(line)
        if "speed_pp" not in raw:
            continue
        rows.append(
            {
                "batch": raw["pl"],
                "prompt_tokens": raw["pp"],
                "gen_tokens": raw["tg"],
                "prefill_tok_s": raw["speed_pp"],
                "decode_tok_s": raw["speed_tg"],
                "total_tok_s": raw["speed"],
                "prefill_s": raw["t_pp"],
                "decode_s": raw["t_tg"],
                "num_kv_tokens": raw["n_kv"],
                "threads": raw["n_threads"],
                "threads_batch": raw["n_threads_batch"],
                "n_batch": raw["n_batch"],
                "n_ubatch": raw["n_ubatch"],
                "flash_attn": raw["flash_attn"],  # -1 auto, 0 off, 1 on (as requested)
            }
        )
    return rows


def batched_bench_cmd(
    bin_dir: Path,
    gguf: Path,
    threads: int,
    prompt_tokens: list[int],
    gen_tokens: int,
    batches: list[int],
    flash_attn: str = "on",
) -> list[str]:
    """The `llama-batched-bench` command line; the context fits the largest configuration.

    The KV cache is per sequence (not unified), `ctx / max(batches)` tokens each, and
    batched-bench silently skips a configuration that does not fit, hence the sizing here.
    """
    num_ctx = max(batches) * (max(prompt_tokens) + gen_tokens)
    return [
        str(bin_dir / "llama-batched-bench"),
        *("-m", str(gguf), "-t", str(threads), "-tb", str(threads)),
        *("-c", str(num_ctx), "-b", "2048", "-ub", "512", "-fa", flash_attn),
        *("-npp", ",".join(map(str, prompt_tokens)), "-ntg", str(gen_tokens)),
        *("-npl", ",".join(map(str, batches)), "--output-format", "jsonl"),
    ]


def _all_cpus_busy_s() -> float | None:
    """CPU-seconds all cores have spent busy since boot (Linux /proc/stat; else None)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def _run_bench(cmd: list[str], expected_rows: int, timeout_s: float) -> list[dict[str, Any]]:
    logger.info("llama-batched-bench", extra={"cmd": " ".join(cmd)})
    busy0, own0, t0 = _all_cpus_busy_s(), os.times(), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    busy1, own1, wall_s = _all_cpus_busy_s(), os.times(), time.monotonic() - t0
    # Cores kept busy by other processes during the run. NOTE: ggml's worker threads spin at
    # barriers, so sharing cores makes a run many times slower, not proportionally slower.
    other_cores = None
    if busy0 is not None and busy1 is not None and wall_s > 1:  # ticks are 10 ms
        own_s = sum(own1[:4]) - sum(own0[:4])  # this process and its finished children
        other_cores = round(max(busy1 - busy0 - own_s, 0.0) / wall_s, 2)
        if other_cores > 0.2:
            logger.warning("CPU shared during the run", extra={"other_cores": other_cores})
    rows = parse_batched_bench_jsonl(proc.stdout)
    if proc.returncode != 0 or len(rows) != expected_rows:
        raise RuntimeError(
            f"llama-batched-bench exited {proc.returncode} with {len(rows)}/{expected_rows} rows:"
            f"\n{proc.stderr[-3000:]}"
        )
    return [row | {"other_cores_busy": other_cores} for row in rows]


def batched_bench(
    bin_dir: Path,
    gguf: Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    batches: list[int],
    flash_attn: str = "on",
    timeout_s: float = 600,
) -> list[dict[str, Any]]:
    """Prefill and decode throughput at each batch size, one llama-batched-bench run.

    Each configuration prefills `batch` distinct random prompts of `prompt_tokens` (one
    logical batch, 512-token ubatches), then decodes `gen_tokens` steps of `batch` tokens.

    Args:
        bin_dir: from `ensure_llamacpp`.
        gguf: model file.
        threads: CPU threads for decode and for prefill (`-t`, `-tb`).
        prompt_tokens: prompt length per sequence.
        gen_tokens: decode steps per configuration.
        batches: parallel sequences, one row each.
        flash_attn: llama.cpp's `-fa` (`on`, `off`, `auto`).
        timeout_s: wall-clock limit for the run.

    Returns:
        One row per batch size (see `parse_batched_bench_jsonl`).

    Raises:
        RuntimeError: the binary failed or skipped a configuration.
    """
    cmd = batched_bench_cmd(
        bin_dir, gguf, threads, [prompt_tokens], gen_tokens, batches, flash_attn
    )
    return _run_bench(cmd, len(batches), timeout_s)


def prefill_bench(
    bin_dir: Path,
    gguf: Path,
    threads: int,
    prompt_tokens: int = 2000,
    repeats: int = 3,
    flash_attn: str = "on",
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Prefill rate of one `prompt_tokens` prompt: the median of `repeats` runs.

    One sequence, one decode step (`-ntg 1`) to keep the run short; `prefill_tok_s` is
    `prompt_tokens / prefill_s`, the prompt's forward pass alone (512-token ubatches).

    Returns:
        The median row, plus `prefill_tok_s_runs` with every run's rate.
    """
    cmd = batched_bench_cmd(bin_dir, gguf, threads, [prompt_tokens] * repeats, 1, [1], flash_attn)
    rows = sorted(_run_bench(cmd, repeats, timeout_s), key=lambda r: r["prefill_tok_s"])
    return rows[len(rows) // 2] | {"prefill_tok_s_runs": [r["prefill_tok_s"] for r in rows]}


def llama_server_cmd(
    bin_dir: Path,
    gguf: Path,
    threads: int,
    parallel: int,
    ctx_per_slot: int,
    port: int,
    flash_attn: str = "on",
) -> list[str]:
    """The `llama-server` command line: `parallel` slots of `ctx_per_slot` tokens each."""
    return [
        str(bin_dir / "llama-server"),
        *("-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-fa", flash_attn),
        *("-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--cont-batching"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def log_tail(path: Path, num_lines: int = 30) -> str:
    """The last `num_lines` lines of a log file ('' when it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


@contextmanager
def llama_server(
    bin_dir: Path,
    gguf: Path,
    threads: int,
    parallel: int = 32,
    ctx_per_slot: int = 2048,
    port: int | None = None,
    flash_attn: str = "on",
    extra_args: tuple[str, ...] = (),
    startup_timeout_s: float = 120,
) -> Iterator[str]:
    """`llama-server` running for the `with` block; yields its base URL once /health is ok.

    Continuous batching is on; each of the `parallel` slots has its own `ctx_per_slot` KV.
    Prompt caching keeps llama-server's defaults: `extra_args=("--cache-ram", "0")` drops the
    RAM prompt cache; a slot still reuses its last prompt unless a request sends
    `"cache_prompt": false`.

    Raises:
        RuntimeError: the server exited or was not healthy within `startup_timeout_s`;
            the message ends with its log tail.
    """
    port = port or free_port()
    cmd = llama_server_cmd(bin_dir, gguf, threads, parallel, ctx_per_slot, port, flash_attn)
    cmd += list(extra_args)
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log_file:
            logger.info("starting llama-server", extra={"cmd": " ".join(cmd)})
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base_url, log_path, startup_timeout_s)
            logger.info("llama-server ready", extra={"url": base_url, "pid": proc.pid})
            yield base_url
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}):\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"llama-server not healthy after {timeout_s}s:\n{log_tail(log)}")


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
