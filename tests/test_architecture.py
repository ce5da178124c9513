"""Layout rules from ../shared/STYLE.md, checked: import direction, Ray confinement, sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["app", "deployments", "engine", "kvstore", "ops"]
# package -> packages it must never import
FORBIDDEN = {
    "engine": {"app", "deployments", "ops"},
    "kvstore": {"app", "deployments", "ops", "engine"},
    "deployments": {"app", "ops"},
    "app": {"ops"},
}
MAX_LINES = 400


def _py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = {
        str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package])
        for f in _py_files(package)
        if _imports(f) & FORBIDDEN[package]
    }
    assert not bad


# STYLE.md's [ray] files: the only ones in engine/ and kvstore/ allowed to import ray.
RAY_FILES = {"kvstore/transfer/object_store.py", "kvstore/tiers/object_store.py"}


def test_engine_and_kvstore_core_do_not_import_ray():
    offenders = [
        str(f.relative_to(ROOT))
        for pkg in ("engine", "kvstore")
        for f in _py_files(pkg)
        if "ray" in _imports(f) and str(f.relative_to(ROOT)) not in RAY_FILES
    ]
    assert not offenders


def test_files_stay_small():
    big = {
        str(f.relative_to(ROOT)): n
        for pkg in PACKAGES
        for f in _py_files(pkg)
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not big
