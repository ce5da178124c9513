"""The engine on CUDA produces what it produces on CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, EngineCore, SamplingParams
from tests.helpers import chat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.model,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_float32_greedy_matches_cpu(engine, model_dir):
    gpu = EngineCore(EngineConfig(model=model_dir, device="cuda", kv_cache_bytes=256 << 20))
    prompts = [chat(engine, q) for q in ("What is the capital of France?", "Name a colour.")]
    params = SamplingParams(temperature=0, max_tokens=24)
    cpu_out = [o.new_token_ids for o in engine.generate(prompts, params)]
    gpu_out = [o.new_token_ids for o in gpu.generate(prompts, params)]
    assert gpu_out == cpu_out


def test_cuda_bfloat16_answers_paris(model_dir):
    gpu = EngineCore(EngineConfig(model=model_dir, device="cuda", dtype="bfloat16"))
    ids = gpu.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = gpu.generate([ids], SamplingParams(temperature=0, max_tokens=16))[0]
    assert "Paris" in out.text
