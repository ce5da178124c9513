"""One accelerator's compute: model, paged KV cache, continuous batching (no Ray).

Reading path:
  1. core.py            — EngineCore: add_request / step / abort; export/import KV
  2. batch_scheduler.py — which tokens of which sequences run next (StepPlan)
  3. block_manager.py   — paged blocks, ref counts, LRU free queue, hash-chained prefix reuse
  4. runner.py          — StepPlan -> tensors -> model -> sampler
  5. layers/, models/   — RMSNorm, RoPE, paged attention; the Llama-family decoder
  6. sampler.py, output.py, tokenizer.py — sampling, stop handling, detokenisation
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
