"""Build the CUDA kernels in `csrc/` (JIT, cached by source hash) or just compile-check them.

`load_extension()` is what the engine calls: None without CUDA, else the compiled module
(`block_mass`, `sparse_paged_attention`, `update_summaries`, `fused_moe`), built once per
source hash under `~/.cache/dualpath-serve/kernels/<hash>` (`$DUALPATH_KERNEL_CACHE` moves it).

`compile_check()` is what CPU-only CI runs: every source compiled to an object file (nvcc for
the .cu files, the host compiler with torch's headers for bindings.cpp), nothing linked.

NOTE: no `--use_fast_math`. It would also flush denormals and approximate every division
and sqrt; the kernels call `__expf` explicitly where the fast exponential is wanted (softmax,
silu) and keep IEEE float32 elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch

from engine import env

log = logging.getLogger(__name__)

EXTENSION_NAME = "dualpath_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
CUDA_SOURCES = ("sparse_attention.cu", "moe.cu")
HOST_SOURCES = ("bindings.cpp",)
HEADERS = ("kernels.h",)
ARCH_FLAGS = ("-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80")
CUDA_FLAGS = ("-O3", "-std=c++17", "-lineinfo", *ARCH_FLAGS)
HOST_FLAGS = ("-O3", "-std=c++17")
_TAIL_CHARS = 6000


def source_hash() -> str:
    """Digest of the sources, the flags and the torch / CUDA versions they build against."""
    digest = hashlib.sha256()
    for name in (*CUDA_SOURCES, *HOST_SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    for part in (*CUDA_FLAGS, *HOST_FLAGS, torch.__version__, str(torch.version.cuda)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    root = env.kernel_cache_dir() or Path.home() / ".cache" / "dualpath-serve" / "kernels"
    return root / source_hash()


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


@functools.cache
def _load(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    cached = any(build_dir.glob(f"{EXTENSION_NAME}*.so"))
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(CSRC / s) for s in (*HOST_SOURCES, *CUDA_SOURCES)],
            extra_cflags=list(HOST_FLAGS),
            extra_cuda_cflags=list(CUDA_FLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            f"building the CUDA kernels ({EXTENSION_NAME}) in {build_dir} failed; "
            f"compiler output tail:\n{_tail(str(exc))}"
        ) from exc
    log.info(
        "cuda kernels loaded",
        extra={
            "event": "kernels_build",
            "extension": EXTENSION_NAME,
            "build_dir": str(build_dir),
            "cached": cached,
            "build_s": round(time.perf_counter() - start, 2),
        },
    )
    return module


def load_extension(verbose: bool = False) -> ModuleType | None:
    """The compiled kernels, or None when CUDA is unavailable (built on the first call)."""
    if not torch.cuda.is_available():
        return None
    return _load(verbose)


# ---- compile check (no GPU, no link) ---------------------------------------------------------


def _cuda_include(nvcc: str) -> Path:
    """The CUDA toolkit's include dir: $CUDA_HOME, nvcc's install prefix, or nvcc's own view."""
    for home in [*env.cuda_homes(), str(Path(nvcc).resolve().parent.parent)]:
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    # nvcc may be a wrapper script: ask it where its toolkit lives.
    out = subprocess.run(
        [nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            include = Path(line.removeprefix("#$ TOP=").strip()) / "include"
            if (include / "cuda_runtime.h").is_file():
                return include.resolve()
    raise RuntimeError(f"cannot find the CUDA include directory of {nvcc}; set $CUDA_HOME")


def _host_command(src: Path, obj: Path, cuda_include: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_include = Path(cpp_extension.include_paths()[0])
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    defines = [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    # NOTE: the CPU wheel ships c10/cuda headers but not the CMake-generated one they include.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cxx = env.host_compiler()
    # -O0: a check only needs the front end; the real build uses HOST_FLAGS.
    flags = ["-c", "-O0", "-std=c++17", "-fPIC", *defines]
    return [cxx, *flags, *(f"-isystem{p}" for p in includes), str(src), "-o", str(obj)]


def compile_check(out_dir: Path) -> list[Path]:
    """Compile every source to an object file under out_dir (sm_90 only), in parallel.

    Raises RuntimeError with the compiler output when one fails.
    """
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH: cannot compile-check the CUDA kernels")
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda_include = _cuda_include(nvcc)
    nvcc_flags = ["-c", "-O3", "-std=c++17", ARCH_FLAGS[0], *cpp_extension.COMMON_NVCC_FLAGS]
    jobs: list[tuple[Path, list[str]]] = []
    for name in CUDA_SOURCES:
        obj = out_dir / f"{Path(name).stem}.cuda.o"
        jobs.append((obj, [nvcc, *nvcc_flags, str(CSRC / name), "-o", str(obj)]))
    for name in HOST_SOURCES:
        obj = out_dir / f"{Path(name).stem}.o"
        jobs.append((obj, _host_command(CSRC / name, obj, cuda_include)))
    out, err = subprocess.PIPE, subprocess.STDOUT
    procs = [(cmd, subprocess.Popen(cmd, stdout=out, stderr=err, text=True)) for _, cmd in jobs]
    failures = []
    for cmd, proc in procs:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(cmd)}\n{_tail(output)}")
    if failures:
        raise RuntimeError("compile check failed:\n" + "\n\n".join(failures))
    return [obj for obj, _ in jobs]
