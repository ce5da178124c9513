"""Layout rules from ../shared/STYLE.md, checked: import direction, Ray confinement, sizes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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
    """Source and test files alike: one owner per file, split where the concept splits."""
    big = {
        str(f.relative_to(ROOT)): n
        for pkg in [*PACKAGES, "tests"]
        for f in _py_files(pkg)
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not big


# Policy modules: decisions as plain functions and data, so ops/sim and unit tests run them
# as they are. Not listed, though their own code is pure: app/admission/{queues,ratelimit,
# section}.py and app/pricing.py, whose config sections reach torch through
# deployments.options -> engine.config.
PURE_MODULES = [
    "app/admission/fair.py",
    "app/admission/capacity.py",
    "deployments/scheduler/policy.py",
    "deployments/scheduler/view.py",
]


@pytest.mark.parametrize("path", PURE_MODULES)
def test_pure_policy_modules_import_neither_ray_nor_torch(path):
    """Checked in a fresh interpreter, so what the module imports indirectly counts too."""
    module = path.removesuffix(".py").replace("/", ".")
    probe = f"import sys, {module}; print(sorted({{'ray', 'torch'}} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"{path} imports {out.stdout.strip()}"


# Serve shells: a deployment class that wraps a plain class (STYLE.md rule 3).
MAX_SHELL_LINES = 150
SHELLS = sorted(ROOT.glob("deployments/*/deployment.py")) + [ROOT / "app" / "ingress.py"]


@pytest.mark.parametrize("path", SHELLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_serve_shells_stay_thin(path):
    assert len(path.read_text().splitlines()) <= MAX_SHELL_LINES


KERNELS = ROOT / "engine" / "kernels"
# A .cu file's ops are its launchers: `cudaError_t <op>(DType dtype, ...)`.
_CUDA_OP = re.compile(r"^cudaError_t (\w+)\(DType dtype", re.MULTILINE)
CUDA_OPS = [
    (cu.stem, op)
    for cu in sorted((KERNELS / "csrc").glob("*.cu"))
    for op in _CUDA_OP.findall(cu.read_text())
]


def test_cuda_sources_define_ops():
    assert CUDA_OPS  # the op pattern still matches the sources


@pytest.mark.parametrize(("source", "op"), CUDA_OPS, ids=[op for _, op in CUDA_OPS])
def test_every_cuda_op_has_a_torch_reference_and_a_test(source, op):
    """The torch reference lives next to the .cu file, in the module of the same name, and
    some test names the op."""
    reference = KERNELS / f"{source}.py"
    functions = {
        node.name
        for node in ast.parse(reference.read_text()).body
        if isinstance(node, ast.FunctionDef)
    }
    assert op in functions, f"{reference.relative_to(ROOT)} has no reference {op}()"
    word = re.compile(rf"\b{op}\b")
    tests = [
        f
        for f in sorted((ROOT / "tests").rglob("test_*.py"))
        if f.name != "test_architecture.py" and word.search(f.read_text())
    ]
    assert tests, f"no test mentions {op}"


def _sleep_calls(tree: ast.Module) -> list[int]:
    """Lines of `time.sleep(x)` / `await asyncio.sleep(x)` statements (x not literal 0) that
    are neither a poll (inside a `while`) nor a fake's simulated work (inside a class)."""
    lines: list[int] = []

    def is_sleep(stmt: ast.stmt) -> bool:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        call = call.value if isinstance(call, ast.Await) else call
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
            return False
        owner = call.func.value
        named = isinstance(owner, ast.Name) and owner.id in ("time", "asyncio")
        zero = bool(call.args) and isinstance(call.args[0], ast.Constant) and not call.args[0].value
        return call.func.attr == "sleep" and named and not zero

    def visit(node: ast.AST, in_function: bool, in_while: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                continue
            is_def = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.stmt) and in_function and not in_while and is_sleep(child):
                lines.append(child.lineno)
            visit(
                child,
                in_function or is_def,
                in_while and not is_def or isinstance(child, ast.While),
            )

    visit(tree, False, False)
    return lines


def test_tests_wait_on_conditions_not_fixed_sleeps():
    """A fixed sleep before an assert is too short on a loaded machine and too long on an idle
    one: wait on the condition instead (tests/helpers.py wait_until / wait_for)."""
    found = {
        f"{f.relative_to(ROOT)}:{line}"
        for f in sorted((ROOT / "tests").rglob("*.py"))
        for line in _sleep_calls(ast.parse(f.read_text()))
    }
    assert not found
