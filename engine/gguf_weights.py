"""Read a llama-architecture GGUF's names and its Q4_1 codes as they are (no dequantising).

`ops model fetch` converts the GGUF once into a Hugging Face-style directory (dequantised
float32 safetensors, the model every engine can load). An engine with
`quantization: int4` reads the 4-bit codes of the same file instead, so it runs the exact
weights llama.cpp runs rather than a re-quantisation of their dequantised copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from engine.quant import Int4Codes, from_q4_1

logger = logging.getLogger(__name__)

MARKER = ".dualpath-model"  # written last by `ops model fetch`; {"source": "<the GGUF>"}

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of 32 nibbles


def hf_name(gguf_name: str) -> str:
    name = TOP_NAMES.get(gguf_name)
    if name is not None:
        return name
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (plain Llama layouts only)")


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout).

    Rows only move, so this works on a dense [N, K] weight and on per-row codes and scales.
    """
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF a model directory was converted from, when it is still on disk."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        source = json.loads(marker.read_text()).get("source")
    except (json.JSONDecodeError, AttributeError):
        return None
    path = Path(source) if isinstance(source, str) else None
    return path if path is not None and path.suffix == ".gguf" and path.is_file() else None


def unpack_q4_1(raw: np.ndarray, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_1 tensor's bytes -> (codes uint8 [N, K], d [N, K/32], m [N, K/32]) float32.

    Within a block the low nibbles hold values 0..15 and the high nibbles 16..31.
    """
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def read_q4_1(gguf_path: Path, num_heads: int, num_kv_heads: int) -> dict[str, Int4Codes]:
    """Every Q4_1 weight of the file, by Hugging Face name, in the HF row layout.

    Tensors of other types (F32 norms, the Q8_0 embedding) are left to the dense loader.
    """
    import gguf  # only needed here

    reader = gguf.GGUFReader(str(gguf_path))
    out: dict[str, Int4Codes] = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        name = hf_name(t.name)
        rows = int(t.shape[-1])  # GGUF shapes are reversed: [K, N]
        codes, d, m = unpack_q4_1(np.asarray(t.data), rows)
        heads = num_heads if "q_proj" in name else num_kv_heads if "k_proj" in name else 0
        if heads:
            codes, d, m = (
                torch.from_numpy(np.ascontiguousarray(reverse_permute(x.numpy(), heads)))
                for x in (codes, d, m)
            )
        out[name] = from_q4_1(codes, d, m)
    logger.info("read Q4_1 codes", extra={"gguf": str(gguf_path), "tensors": len(out)})
    return out
