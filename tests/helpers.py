"""Small builders shared by unit tests."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvstore.keys import root_key

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_seq(token_ids: list[int], rid: str = "r", salt: bytes = b"", **params) -> Sequence:
    return Sequence(
        request_id=rid,
        token_ids=list(token_ids),
        params=SamplingParams(**params),
        root_key=root_key("toy-model", salt),
    )


def chat(engine, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.tokenizer.encode_chat([*messages, {"role": "user", "content": text}])


# ChatML, as SmolLM2's template (without its default system prompt)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_CORPUS = (
    "You are a careful assistant for a team of engineers. Answer briefly and cite the command "
    "you would run. What is the capital of France? Paris is the capital of France. Write a "
    "short story about a lighthouse. Count to five. Name a colour. The quick brown fox jumps "
    "over the lazy dog. Which command shows disk usage? Tell me about the ocean."
)


def write_tiny_tokenizer(out: Path) -> int:
    """A byte-level BPE tokenizer (a few hundred tokens, ChatML special tokens and template)
    trained here on a short corpus: any text encodes. Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (out / "tokenizer_config.json").write_text(
        json.dumps(config | {"chat_template": TINY_CHAT_TEMPLATE})
    )
    return tok.get_vocab_size()


def write_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random-weight Llama checkpoint at toy sizes (2 layers, hidden 64, GQA 4:2) with the
    tiny tokenizer: config.json + model.safetensors under Hugging Face names. Returns `out`."""
    vocab = write_tiny_tokenizer(out)
    hidden, layers, heads, kv_heads, inter = 64, 2, 4, 2, 128
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    t = {
        "model.embed_tokens.weight": rand(vocab, hidden, scale=1.0),
        "lm_head.weight": rand(vocab, hidden, scale=0.5),
        "model.norm.weight": 1 + rand(hidden, scale=0.1),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            t[p + f"self_attn.{name}_proj.weight"] = rand(rows * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        t[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        t[p + "mlp.down_proj.weight"] = rand(hidden, inter)
    (out / "config.json").write_text(json.dumps(config))
    save_file(t, str(out / "model.safetensors"))
    return out


def wait_until(
    predicate: Callable[[], object], what: str, timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll `predicate` until it is truthy: the wait for an asynchronous effect (a thread, a
    process, a report), never a fixed sleep that is too short on a loaded machine.

    Raises:
        AssertionError: `what` did not happen within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        time.sleep(interval_s)


async def wait_for(
    predicate: Callable[[], object], what: str, timeout_s: float = 10.0, interval_s: float = 0.005
) -> None:
    """`wait_until` on an event loop: polls between turns of the loop, so the tasks whose
    effect `predicate` checks keep running. `predicate` may be a coroutine function.

    Raises:
        AssertionError: `what` did not happen within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not await _truth(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        await asyncio.sleep(interval_s)


async def _truth(value: object) -> bool:
    return bool(await value if inspect.isawaitable(value) else value)
