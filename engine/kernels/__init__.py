"""Kernels: a torch reference per op (the spec, runs anywhere), CUDA sources for GPUs, and
the dispatch between them.

Reading path:
1. `sparse_attention.py` — block summaries, block ranking (`block_mass` over key summaries,
   `channel_mass` over a few key channels), top-k selection (sinks, window, per-layer
   budget), paged decode attention over the selected blocks (`sparse_paged_attention`).
2. `moe.py` — DeepSeek-style router (softmax/sigmoid, group-limited, normalised, scaled),
   routed SwiGLU experts by token permutation (`fused_moe`), shared experts.
3. `ops.py` — dispatch: the reference unless `$DUALPATH_KERNELS` asks for the extension.
4. `csrc/` + `build.py` — the CUDA kernels (`kernels.h` lists them), JIT-built and cached
   on a GPU host, compile-checked without one (tests/engine/test_kernels_build.py).
"""
