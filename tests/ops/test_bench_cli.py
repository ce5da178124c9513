"""`python -m ops bench <name> ...` runs ops/bench/<name>.py's main with the rest of argv
(`-` in a name is `_` in the module), nothing started here: each main is replaced."""

from __future__ import annotations

import importlib

import pytest

from ops.cli import BENCHMARKS, main


@pytest.mark.parametrize("name", BENCHMARKS)
def test_bench_name_runs_its_modules_main_with_the_rest_of_argv(name, monkeypatch):
    """Every listed benchmark resolves to a module whose main gets the arguments after the
    name, and its return code is the command's."""
    module = importlib.import_module(f"ops.bench.{name.replace('-', '_')}")
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 7)
    assert main(["bench", name, "--name", "t", "--seed", "3"]) == 7
    assert seen == [["--name", "t", "--seed", "3"]]
