"""llama.cpp peer: output parsing, command lines and the build cache, without llama.cpp.

The outputs below are verbatim from `llama-batched-bench --output-format jsonl` (llama.cpp
0c1e570, vendored in llama-cpp-python 0.3.36): SmolLM2-135M Q4_1, 2 threads, 2-core AMD EPYC
VM, -fa on. The tests need neither llama.cpp nor a model, and run in well under a second.
"""

# ruff: noqa: E501  (the captured output lines are kept verbatim)

from __future__ import annotations

import fcntl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ops.bench import _llamacpp as llamacpp
from ops.bench._llamacpp import (
    BINARIES,
    MARKER,
    batched_bench,
    batched_bench_cmd,
    ensure_llamacpp,
    is_built,
    llama_server,
    llama_server_cmd,
    parse_batched_bench_jsonl,
    prefill_bench,
)

# -npp 64 -ntg 64 -npl 1,8,32 -c 4096 -fa on (stdout)
BATCHED_JSONL = """\
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 64, "pl": 1, "n_kv": 128, "t_pp": 0.182667, "speed_pp": 350.364319, "t_tg": 0.490165, "speed_tg": 130.568283, "t": 0.672832, "speed": 190.240646}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 64, "pl": 8, "n_kv": 1024, "t_pp": 1.408766, "speed_pp": 363.438629, "t_tg": 2.113819, "speed_tg": 242.215637, "t": 3.522585, "speed": 290.695618}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 64, "pl": 32, "n_kv": 4096, "t_pp": 7.153093, "speed_pp": 286.309723, "t_tg": 7.241836, "speed_tg": 282.801208, "t": 14.394929, "speed": 284.544647}
"""

# -npp 2000,2000,2000 -ntg 1 -npl 1 -c 2001 -fa on (stdout)
PREFILL_JSONL = """\
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 2000, "tg": 1, "pl": 1, "n_kv": 2001, "t_pp": 7.567040, "speed_pp": 264.304138, "t_tg": 0.014076, "speed_tg": 71.042908, "t": 7.581116, "speed": 263.945312}
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 2000, "tg": 1, "pl": 1, "n_kv": 2001, "t_pp": 7.855117, "speed_pp": 254.611115, "t_tg": 0.014107, "speed_tg": 70.886795, "t": 7.869224, "speed": 254.281738}
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 2000, "tg": 1, "pl": 1, "n_kv": 2001, "t_pp": 8.140173, "speed_pp": 245.695023, "t_tg": 0.014230, "speed_tg": 70.274071, "t": 8.154403, "speed": 245.388916}
"""

# the one line that run wrote to stderr
STDERR_LINE = (
    "0.00.087.551 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 8192"
)
GGUF = Path("model.gguf")


def _fake_run(stdout: str, calls: list[list[str]]):
    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr=STDERR_LINE)

    return run


def _fake_binaries(bin_dir: Path, marker: bool = True) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        (bin_dir / name).write_text("#!/bin/sh\n")
    if marker:
        (bin_dir / MARKER).write_text("done\n")


def test_parses_every_batched_bench_row_in_our_names():
    rows = parse_batched_bench_jsonl(BATCHED_JSONL)
    assert [(r["batch"], r["prompt_tokens"], r["gen_tokens"]) for r in rows] == [
        (1, 64, 64),
        (8, 64, 64),
        (32, 64, 64),
    ]
    assert [r["prefill_tok_s"] for r in rows] == [350.364319, 363.438629, 286.309723]
    assert [r["decode_tok_s"] for r in rows] == [130.568283, 242.215637, 282.801208]
    assert rows[2]["num_kv_tokens"] == 4096 and rows[2]["flash_attn"] == 1


def test_rates_count_every_sequence():
    """prefill_tok_s and decode_tok_s are whole-batch rates (batch x tokens / seconds), the
    same unit as our engine bench, not per-sequence rates."""
    row = parse_batched_bench_jsonl(BATCHED_JSONL)[1]
    assert row["prefill_tok_s"] * row["prefill_s"] == pytest.approx(8 * 64, rel=1e-4)
    assert row["decode_tok_s"] * row["decode_s"] == pytest.approx(8 * 64, rel=1e-4)


def test_log_lines_mixed_into_the_output_are_skipped():
    text = STDERR_LINE + "\n" + BATCHED_JSONL + "\n\nllama_perf_context_print: load time\n"
    assert parse_batched_bench_jsonl(text) == parse_batched_bench_jsonl(BATCHED_JSONL)


def test_context_fits_the_largest_batch():
    """batched-bench silently drops a configuration whose KV does not fit in -c."""
    cmd = batched_bench_cmd(Path("bin"), GGUF, 2, [64], 64, [1, 8, 32])
    assert cmd[cmd.index("-c") + 1] == str(32 * (64 + 64))
    assert cmd[cmd.index("-npl") + 1] == "1,8,32"
    assert cmd[-2:] == ["--output-format", "jsonl"]


def test_batched_bench_returns_the_parsed_rows(monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(llamacpp.subprocess, "run", _fake_run(BATCHED_JSONL, calls))
    rows = batched_bench(Path("bin"), GGUF, 2, 64, 64, [1, 8, 32])
    assert [r["batch"] for r in rows] == [1, 8, 32]
    assert rows[0]["other_cores_busy"] is None  # a run under a second is too short to tell
    assert calls[0][0] == str(Path("bin") / "llama-batched-bench")


def test_a_skipped_configuration_is_an_error(monkeypatch):
    two_rows = "\n".join(BATCHED_JSONL.splitlines()[:2])
    monkeypatch.setattr(llamacpp.subprocess, "run", _fake_run(two_rows, []))
    with pytest.raises(RuntimeError, match="2/3 rows"):
        batched_bench(Path("bin"), GGUF, 2, 64, 64, [1, 8, 32])


def test_prefill_bench_reports_the_median_of_its_repeats(monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(llamacpp.subprocess, "run", _fake_run(PREFILL_JSONL, calls))
    row = prefill_bench(Path("bin"), GGUF, 2, prompt_tokens=2000, repeats=3)
    assert row["prefill_tok_s"] == 254.611115
    assert row["prefill_tok_s_runs"] == [245.695023, 254.611115, 264.304138]
    cmd = calls[0]
    assert cmd[cmd.index("-npp") + 1] == "2000,2000,2000"
    assert (cmd[cmd.index("-ntg") + 1], cmd[cmd.index("-npl") + 1]) == ("1", "1")


def test_server_context_is_per_slot_times_slots():
    cmd = llama_server_cmd(Path("bin"), GGUF, 2, parallel=32, ctx_per_slot=2048, port=8080)
    assert cmd[cmd.index("-np") + 1] == "32"
    assert cmd[cmd.index("-c") + 1] == str(32 * 2048)
    assert cmd[cmd.index("--host") + 1 :][:3] == ["127.0.0.1", "--port", "8080"]


def test_server_that_dies_raises_with_its_log_tail(tmp_path):
    """A server that exits during start-up is reported at once, with why, not as a timeout."""
    _fake_binaries(tmp_path)
    server = tmp_path / "llama-server"
    server.write_text("#!/bin/sh\necho 'error: failed to load model'\nexit 1\n")
    server.chmod(0o755)
    with (
        pytest.raises(RuntimeError, match="failed to load model"),
        llama_server(tmp_path, GGUF, 2, startup_timeout_s=5),
    ):
        pass


def test_built_cache_returns_without_building(tmp_path, monkeypatch):
    _fake_binaries(tmp_path / "bin")
    monkeypatch.setattr(llamacpp, "_build", pytest.fail)
    assert ensure_llamacpp(tmp_path) == tmp_path / "bin"


def test_binaries_without_the_marker_are_rebuilt(tmp_path, monkeypatch):
    """The marker is written last, so binaries without it may be half-copied."""
    _fake_binaries(tmp_path / "bin", marker=False)
    built: list[Path] = []
    monkeypatch.setattr(llamacpp, "_build", lambda cache, bin_dir: built.append(cache))
    ensure_llamacpp(tmp_path)
    assert built == [tmp_path]


def test_env_var_picks_the_cache(tmp_path, monkeypatch):
    _fake_binaries(tmp_path / "bin")
    monkeypatch.setenv("DUALPATH_LLAMACPP_DIR", str(tmp_path))
    monkeypatch.setattr(llamacpp, "_build", pytest.fail)
    assert ensure_llamacpp() == tmp_path / "bin"


def test_a_caller_waiting_on_the_lock_uses_the_build_it_waited_for(tmp_path, monkeypatch, caplog):
    """Two callers at once build once: the second blocks on the lock, then finds the marker."""
    monkeypatch.setattr(llamacpp, "_build", pytest.fail)
    result: list[Path] = []
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the "first caller", mid-build
        waiter = threading.Thread(target=lambda: result.append(ensure_llamacpp(tmp_path)))
        with caplog.at_level("INFO", logger=llamacpp.__name__):
            waiter.start()
            deadline = time.monotonic() + 2
            while "waiting" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.005)
        assert "waiting" in caplog.text and not result
        _fake_binaries(tmp_path / "bin")
        assert is_built(tmp_path)
    waiter.join(timeout=2)
    assert result == [tmp_path / "bin"]
