"""The real converted model (SmolLM2-135M-Instruct, float32, CPU): it knows things, and our
model equals Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from engine.batch_scheduler import ScheduledChunk, StepPlan
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvstore.keys import root_key
from tests.helpers import GREEDY, chat

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
    "List three prime numbers.",
]
LOGITS_ATOL = 1e-3  # measured max |diff| 6.1e-5 on these prompts (fp32, 2 threads)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _our_prompt_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, through the real paged-cache path."""
    seq = Sequence("logits", list(token_ids), SamplingParams(), root_key("test-logits"))
    engine.block_manager.ensure_slots(seq, seq.num_tokens)
    try:
        plan = StepPlan([ScheduledChunk(seq, 0, seq.num_tokens)])
        input_ids, ctx, _, _ = engine.runner._prepare(plan)
        with torch.inference_mode():
            model = engine.runner.model
            return model.compute_logits(model(input_ids, ctx))
    finally:
        engine.block_manager.free(seq)


def test_real_model_answers_paris(engine):
    """This is a real model: greedy decoding knows the capital of France."""
    out = engine.generate([chat(engine, "What is the capital of France?")], GREEDY)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_prompt_logits_match_transformers(engine, hf_model, prompt):
    ids = chat(engine, prompt)
    ours = _our_prompt_logits(engine, ids)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


def test_greedy_generations_are_token_identical_to_transformers(engine, hf_model):
    prompts = [chat(engine, p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=48)
    ours = engine.generate(prompts, params)
    for ids, out in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[
                0, len(ids) :
            ].tolist()
        assert out.new_token_ids == ref  # both include the final <|im_end|> when they stop


def test_decode_logprobs_match_transformers_teacher_forced(engine, hf_model):
    """Every decode step's distribution (paged decode path) matches a full HF forward."""
    ids = chat(engine, PROMPTS[1])
    out = engine.generate(
        [ids], SamplingParams(temperature=0, max_tokens=80, logprobs=5, ignore_eos=True)
    )[0]
    full = ids + out.new_token_ids
    engine_seq_logprobs = [lp for lp in _collect_logprobs(engine, ids, 80)]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([full])).logits[0].float(), -1)
    for step, lp in enumerate(engine_seq_logprobs):
        row = ref[len(ids) - 1 + step]
        for token_id, value in lp.top:
            assert abs(value - row[token_id].item()) < LOGITS_ATOL


def _collect_logprobs(engine, ids: list[int], n: int):
    engine.add_request(
        EngineRequest(
            "lp", ids, SamplingParams(temperature=0, max_tokens=n, logprobs=5, ignore_eos=True)
        )
    )
    logprobs = []
    while engine.has_unfinished():
        for out in engine.step():
            logprobs.extend(out.new_logprobs)
    assert len(logprobs) == n
    return logprobs
