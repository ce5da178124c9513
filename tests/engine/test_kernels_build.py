"""The CUDA kernels compile (no GPU needed): every source builds to a non-empty object file.

Runs where `nvcc` is on PATH (CI has it); the GPU tests themselves are in
test_kernels_gpu_ext.py. 12-30 s on a busy 2-core machine: the three compiles run in parallel
and the torch-header binding compile (~12 s alone) is the longest; the .cu files take ~6 s
(sparse_attention) and ~4 s (moe).
"""

from __future__ import annotations

import shutil

import pytest

from engine.kernels.build import compile_check


@pytest.mark.slow
def test_kernel_sources_compile(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: cannot compile the CUDA kernels")
    objects = compile_check(tmp_path)
    assert [o.name for o in objects] == ["sparse_attention.cuda.o", "moe.cuda.o", "bindings.o"]
    for obj in objects:
        assert obj.is_file() and obj.stat().st_size > 0, obj
