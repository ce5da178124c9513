"""Load a Hugging Face safetensors checkpoint into our (fused) model parameters."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


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


def generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
