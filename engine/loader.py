"""Load a Hugging Face safetensors checkpoint into our (fused) model parameters."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.config import EngineConfig
from engine.quant import Int4Codes, Int4Weight, Quantization, QuantWeight, quantize_weight


def load_weights(model: nn.Module, model_dir: Path, tied_embeddings: bool = False) -> None:
    """Copy every checkpoint tensor into `model`, fusing split projections and stacking
    per-expert MoE weights (`experts.{e}.gate_proj.weight` -> `experts.gate_up_proj[e]`).

    Raises:
        FileNotFoundError: no *.safetensors in `model_dir`.
        ValueError: a checkpoint tensor has no home, or a model parameter was not loaded.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters(remove_duplicate=False))
    fused: dict[str, tuple[str, int]] = getattr(model, "fused_shards", {})
    loaded: set[str] = set()
    # parameter -> {(expert index or -1, shard index): tensor}
    pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                ours = name.removeprefix("model.")
                parts = ours.split(".")
                target = next((p for p in parts if p in fused), None)
                shard = 0
                if target is not None:
                    fused_name, shard = fused[target]
                    ours = ours.replace(target, fused_name)
                expert = -1
                match = _EXPERT.fullmatch(ours)
                stacked = f"{match['prefix']}.{match['proj']}" if match else ""
                if match is not None and stacked in params:
                    ours, expert = stacked, int(match["expert"])
                if target is None and expert < 0:
                    if ours not in params:
                        raise ValueError(f"checkpoint tensor {name} has no matching parameter")
                    _copy(params[ours], f.get_tensor(name), name)
                    loaded.add(ours)
                    continue
                if ours not in params:
                    raise ValueError(f"checkpoint tensor {name} has no matching parameter")
                pieces.setdefault(ours, {})[(expert, shard)] = f.get_tensor(name)
    for ours, parts_by_key in pieces.items():
        experts = sorted({e for e, _ in parts_by_key})
        shards = {s for _, s in parts_by_key}
        if len(parts_by_key) != len(experts) * len(shards) or experts not in (
            [-1],
            list(range(len(experts))),
        ):
            raise ValueError(f"{ours}: checkpoint lacks some expert or shard tensors")
        rows = [
            torch.cat([parts_by_key[k] for k in sorted(k for k in parts_by_key if k[0] == e)])
            for e in experts
        ]
        tensor = rows[0] if experts == [-1] else torch.stack(rows)
        _copy(params[ours], tensor, ours)
        loaded.add(ours)
    if tied_embeddings and "lm_head.weight" not in loaded and "embed_tokens.weight" in loaded:
        loaded.add("lm_head.weight")  # the head *is* the embedding table
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"parameters missing from checkpoint: {sorted(missing)[:5]}")


# `layers.3.mlp.experts.7.gate_up_proj.weight` -> stacked `layers.3.mlp.experts.gate_up_proj`
_EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def model_fingerprint(model_dir: Path) -> str:
    """Model identity for block keys: dir name + hash of config and weight file sizes.

    Two different checkpoints that happen to share a directory name never share keys.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{model_dir.name}@{h.hexdigest()}"


def engine_model_id(config: EngineConfig) -> str:
    """The model identity in block keys: the checkpoint, plus how it is run when that
    changes the KV (quantisation and where its codes come from, activation and KV dtypes).
    Front end and engines compute it the same way."""
    from engine.gguf_weights import gguf_source

    fingerprint = model_fingerprint(config.model)
    weights = config.weights_id
    if config.quantization == "int4" and gguf_source(config.model) is not None:
        weights = weights.replace(f"int4-g{config.int4_group_size}", "int4-gguf", 1)
    return f"{fingerprint}#{weights}" if weights else fingerprint


def generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def quantize_linears(
    model: nn.Module,
    kind: Quantization,
    max_rows: int,
    dtype: torch.dtype,
    group_size: int = 32,
    gguf: Path | None = None,
    head: bool = False,
) -> dict[str, int]:
    """Give every Linear but the LM head (unless `head`) a weight-only `kind` quantised weight.

    int4 takes the GGUF's Q4_1 codes as they are when `gguf` holds them (fused projections
    are concatenated by rows, as the dense loader does); other weights are quantised from
    their dense copy (round-to-nearest, groupwise int4 or per-row int8).

    The LM head stays dense by default: one bf16 matmul over it is as fast as the int8
    kernel at one row and 3-4x faster at 8 (measured on the 49152x576 head). int4 is 1.5x
    faster than bf16 at one row, at a cost in logit precision (`engine.quant_head`).

    Returns:
        how many linears took each source: {"gguf": n, "quantised": n}.
    """
    from engine.layers.linear import Linear

    codes = _gguf_codes(model, gguf) if kind == "int4" and gguf is not None else {}
    counts = {"gguf": 0, "quantised": 0}
    lm_head = None if head else getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module is lm_head:
            continue
        from_file = codes.get(name)
        if from_file is not None and tuple(from_file.codes.shape) == tuple(module.weight.shape):
            quant: QuantWeight = Int4Weight(from_file)
            counts["gguf"] += 1
        else:
            quant = quantize_weight(module.weight.detach(), kind, group_size)
            counts["quantised"] += 1
        module.set_quant(quant, max_rows, dtype)
    return counts


def _gguf_codes(model: nn.Module, gguf: Path) -> dict[str, Int4Codes]:
    """Q4_1 codes of `gguf` keyed by our module names (fused shards concatenated)."""
    from engine.gguf_weights import read_q4_1

    cfg = model.config  # type: ignore[attr-defined]
    by_hf = read_q4_1(gguf, cfg.num_attention_heads, cfg.num_kv_heads)
    fused: dict[str, tuple[str, int]] = getattr(model, "fused_shards", {})
    shards: dict[str, dict[int, Int4Codes]] = {}
    for hf, value in by_hf.items():
        module = hf.removeprefix("model.").removesuffix(".weight")
        prefix, _, leaf = module.rpartition(".")
        target, shard = fused.get(leaf, (leaf, 0))
        shards.setdefault(f"{prefix}.{target}", {})[shard] = value
    out: dict[str, Int4Codes] = {}
    for name, parts in shards.items():
        ordered = [parts[i] for i in sorted(parts)]
        if sorted(parts) != list(range(len(parts))):
            continue  # a shard is not Q4_1: quantise the fused weight instead
        out[name] = Int4Codes(
            torch.cat([p.codes for p in ordered]),
            torch.cat([p.scale for p in ordered]),
            torch.cat([p.zero for p in ordered]),
            ordered[0].group_size,
        )
    return out
