"""Every environment variable dualpath-serve reads, in one place (mini-sglang's `env.py`).

  DUALPATH_MODEL_CACHE    converted models' directory        engine/config.py
  DUALPATH_KV_DIR         default NVMe tier directory        deployments/options.py
  DUALPATH_KERNELS        kernels: reference / cuda / auto   engine/kernels/ops.py
  DUALPATH_KERNEL_CACHE   built CUDA extensions              engine/kernels/build.py
  CUDA_HOME, CUDA_PATH    CUDA toolkit (compile check)       engine/kernels/build.py
  CXX                     host compiler (compile check)      engine/kernels/build.py
  OMP_NUM_THREADS         torch threads (Ray sets it)        deployments/replica.py
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT
                          OTLP traces URL                    deployments/options.py (tracing)

Each accessor reads the environment when called (nothing is cached at import), so a test's
`monkeypatch.setenv` takes effect. An empty value counts as unset.

Not read here: `NIXL_LOG_LEVEL` is only given a default ("WARN") by
kvstore/transfer/nixl.py before it imports nixl (kvstore sits below engine and cannot import
this module). The API keys come from the variable the app config names (`auth.keys_env`),
read through `named`.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_CACHE = "DUALPATH_MODEL_CACHE"
KV_DIR = "DUALPATH_KV_DIR"
KERNELS = "DUALPATH_KERNELS"
KERNEL_CACHE = "DUALPATH_KERNEL_CACHE"
OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"


def _get(name: str) -> str | None:
    return os.environ.get(name) or None


def _path(name: str) -> Path | None:
    value = _get(name)
    return Path(value) if value else None


def named(name: str) -> str:
    """The variable a config field names (e.g. `auth.keys_env`); "" when unset."""
    return os.environ.get(name, "")


def model_cache_dir() -> Path | None:
    """`$DUALPATH_MODEL_CACHE`: where converted models live (None: the default)."""
    return _path(MODEL_CACHE)


def kvstore_dir() -> Path | None:
    """`$DUALPATH_KV_DIR`: the NVMe tier's default directory (None: the default)."""
    return _path(KV_DIR)


def kernel_backend() -> str:
    """`$DUALPATH_KERNELS`, unchecked (engine/kernels/ops.py validates it); "reference"
    when unset."""
    return os.environ.get(KERNELS, "reference")


def kernel_cache_dir() -> Path | None:
    """`$DUALPATH_KERNEL_CACHE`: where built CUDA extensions go (None: the default)."""
    return _path(KERNEL_CACHE)


def cuda_homes() -> list[str]:
    """`$CUDA_HOME`, then `$CUDA_PATH`: the CUDA toolkit directories named, in that order."""
    return [home for home in (_get("CUDA_HOME"), _get("CUDA_PATH")) if home]


def host_compiler() -> str:
    """`$CXX`, else `c++`."""
    return os.environ.get("CXX", "c++")


def omp_num_threads() -> int | None:
    """`$OMP_NUM_THREADS` (Ray sets it from a replica's num_cpus); None when unset or 0."""
    return int(os.environ.get("OMP_NUM_THREADS", "0")) or None


def otlp_traces_endpoint() -> str | None:
    """The OTLP traces URL the OpenTelemetry variables name (the traces one first)."""
    return _get(OTLP_TRACES_ENDPOINT) or _get(OTLP_ENDPOINT)
