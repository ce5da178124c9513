"""One accelerator's compute: model, paged KV cache, continuous batching (no Ray).

Files:
  core.py           — EngineCore: add_request / add_prefill / step / abort; composes the rest
  request.py        — EngineRequest: what add_request / add_prefill take
  sequence.py       — Sequence: tokens, block table, counters; SequenceStatus, FinishReason
  batch_scheduler.py — which tokens of which sequences run next (a StepPlan); cost_model.py
                      predicts a prefill chunk's time for its compute quota
  block_manager.py  — paged blocks, ref counts, LRU free queue, hash-chained prefix reuse
  kv_cache.py       — the KV cache tensor; block export / import
  kv_port.py        — KVPort: KV in and out of an EngineCore (PD handoff, stored prefixes,
                      persistence of full blocks)
  kv_import.py      — PrefixKV: stored KV copied in layer by layer during the prefill
  runner.py         — ModelRunner: StepPlan -> tensors -> model -> sampler
  forward_context.py — per-step attention inputs, passed explicitly to the layers
  layers/, models/  — RMSNorm, RoPE, linear, paged attention; the Llama-family and MoE
                      decoders (models/registry.py maps architecture names to classes)
  kernels/          — torch references (the spec), CUDA sources, the dispatch between them
  sampler.py, sampling_params.py, output.py, tokenizer.py — sampling, stop handling,
                      detokenisation
  config.py, loader.py — EngineConfig / ModelConfig; safetensors into our parameters
  env.py            — every environment variable the code reads
  errors.py         — InvalidRequestError (HTTP 400 at the ingress)

Reading path: 1. core.py  2. batch_scheduler.py  3. block_manager.py  4. runner.py
5. layers/, models/, kernels/  6. kv_port.py, kv_import.py  7. sampler.py, output.py.
"""

from engine.config import EngineConfig, ModelConfig
from engine.core import EngineCore
from engine.errors import InvalidRequestError
from engine.output import RequestOutput, SequenceKV
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

__all__ = [
    "EngineConfig",
    "EngineCore",
    "EngineRequest",
    "InvalidRequestError",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SequenceKV",
    "Tokenizer",
]
