"""A quantised engine (bf16 activations, int4/int8 linears) on the tiny model: greedy output
must not depend on how the KV arrived (PD handoff, prefix cache, the KV store's block format,
recompute after preemption), and the KV cache is held in kv_dtype.

NOTE: a quantised Linear runs the weight-only kernel for calls of at most quant_max_rows
rows and the dense bf16 copy above (engine/layers/linear.py), so a token's numerics depend
on how many rows share its step; in bf16 a one-ulp change can flip a greedy token. Where the
two sides of a comparison put a token through different paths, the test is marked xfail
with what differs; the rest are exact (logits bit for bit where they are compared)."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, EngineCore, EngineRequest, InvalidRequestError, SamplingParams
from engine.config import SparseAttentionConfig
from engine.kv_import import PrefixKV
from engine.quant import Int4Weight, Int8Weight
from kvstore.block import decode_block, encode_block
from tests.helpers import chat

U = 2.0**-8  # bfloat16 unit roundoff
SYSTEM = (
    "You are a careful assistant for a team of site reliability engineers. Answer briefly, "
    "cite the command you would run, and never invent flags that do not exist. " * 7
)
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
MODES = {
    "int4": {"dtype": "bfloat16", "quantization": "int4"},
    "int4-kv-bf16": {"dtype": "bfloat16", "quantization": "int4", "kv_dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
}
MAX_ROWS = EngineConfig.model_fields["quant_max_rows"].default


def build(model_dir, **knobs) -> EngineCore:
    """A fresh engine on the tiny model: 16-token blocks, 256 of them, one thread."""
    base = {"model": model_dir, "num_threads": 1, "block_size": 16, "num_kv_blocks": 256}
    return EngineCore(EngineConfig(**(base | knobs)))


def run(engine: EngineCore, request: EngineRequest) -> tuple[list[int], object]:
    """Add `request` and step until the engine is idle: (its tokens, its last output)."""
    engine.add_request(request)
    tokens, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request.request_id:
                tokens.extend(out.new_token_ids)
                last = out
    return tokens, last


def first_logits(engine: EngineCore, request: EngineRequest):
    """Run `request` alone: (the logits its first token was sampled from, its tokens, its
    last output)."""
    seen: list[torch.Tensor] = []
    real = engine.runner.sampler
    engine.runner.sampler = lambda logits, seqs: (
        seen.append(logits[0].clone()) or real(logits, seqs)
    )
    try:
        tokens, last = run(engine, request)
    finally:
        engine.runner.sampler = real
    return seen[0], tokens, last


def prefill(engine: EngineCore, request: EngineRequest):
    """The PE side: prefill and sample the first token; returns that output (with `kv`)."""
    engine.add_prefill(request)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    (first,) = outs
    assert first.kv is not None
    return first


@pytest.fixture(params=list(MODES))
def mode(request) -> dict:
    return MODES[request.param]


@pytest.fixture
def kernel_rows(monkeypatch) -> list[int]:
    """Rows of every weight-only kernel call in this test (proof the kernel path ran)."""
    rows: list[int] = []
    for cls in (Int4Weight, Int8Weight):
        real = cls.mm
        monkeypatch.setattr(
            cls, "mm", lambda self, x, real=real: rows.append(x.shape[0]) or real(self, x)
        )
    return rows


def test_pd_handoff_equals_one_engine(tiny_model_dir, mode, kernel_rows):
    """PE prefills and samples the first token, DE imports the bf16 KV and decodes: the same
    tokens as one engine, whose decode steps ran through the quantised kernel."""
    alone = build(tiny_model_dir, **mode)
    prompt = chat(alone, "Name three uses of a hash table.", system=SYSTEM)
    expected, _ = run(alone, EngineRequest("alone", prompt, GREEDY))
    assert kernel_rows and max(kernel_rows) == 1  # every decode step: one row, the kernel
    pe, de = build(tiny_model_dir, **mode), build(tiny_model_dir, **mode)
    first = prefill(pe, EngineRequest("pd-p", prompt, GREEDY))
    assert first.kv.data.dtype == torch.bfloat16
    assert len(first.kv.block_keys) == len(prompt) // 16
    rest, last = run(de, EngineRequest("pd", prompt, GREEDY, kv=first.kv))
    assert first.new_token_ids + rest == expected
    assert last.finished and last.num_output_tokens == GREEDY.max_tokens


KERNEL_TAIL = pytest.mark.xfail(
    strict=True,
    reason="the 2 uncached tokens take the weight-only kernel (<= quant_max_rows rows), the "
    "fresh engine's 562-row prefill the dense bf16 copy: first-token logits differ by 0.11 "
    "(int4) / 0.17 (int8), and int8's reply diverges at output token 6",
)
TAIL = "same-prompt-2-token-tail"
PREFIX_CASES = [
    *(pytest.param(m, "new-question", MAX_ROWS, id=f"{m}-new-question") for m in MODES),
    *(pytest.param(m, TAIL, r, id=f"{m}-{TAIL}-max-rows-{r}") for m in MODES for r in (0, 10**6)),
    *(pytest.param(m, TAIL, MAX_ROWS, id=f"{m}-{TAIL}", marks=KERNEL_TAIL) for m in MODES),
]


@pytest.mark.parametrize(("mode_name", "second", "max_rows"), PREFIX_CASES)
def test_prefix_cache_hit_equals_a_fresh_engine(tiny_model_dir, mode_name, second, max_rows):
    """A request whose long prefix is in the prefix cache samples from bit-identical logits,
    and replies, as an engine that computed all of it, when both put the uncached tokens
    through the same matmul path: new-question leaves 27 (> quant_max_rows) uncached;
    quant_max_rows 0 / 10^6 send every call to the dense copy / the kernel."""
    knobs = MODES[mode_name] | {"quant_max_rows": max_rows}
    warm = build(tiny_model_dir, **knobs)
    first = chat(warm, "Which command shows disk usage?", system=SYSTEM)
    run(warm, EngineRequest("first", first, GREEDY))
    if second == "new-question":
        prompt = chat(warm, "Which command lists open ports?", system=SYSTEM)
    else:
        prompt = first[: len(first) // 16 * 16 + 2]
    logits, tokens, last = first_logits(warm, EngineRequest("second", prompt, GREEDY))
    uncached = len(prompt) - last.num_cached_tokens
    assert uncached > MAX_ROWS if second == "new-question" else uncached == 2
    fresh_logits, fresh, _ = first_logits(
        build(tiny_model_dir, **knobs), EngineRequest("fresh", prompt, GREEDY)
    )
    assert torch.equal(logits, fresh_logits)
    assert tokens == fresh


STEP_COMPOSITION = (
    "bf16 engines, quantised or not, are not step-composition invariant: the tight engine "
    "prefills prompts in chunks (28+8 rows, not 36), runs first decodes in 32-row mixed steps "
    "(dense copy; the roomy engine's 4-row decodes use the kernel) and recomputes a preempted "
    "reply as prefill; logits move by 1 bf16 ulp (0.06-0.13) and greedy replies diverge"
)


def test_preemption_equals_an_unconstrained_engine(tiny_model_dir, mode):
    """A 24-block pool and a 32-token step budget chunk and preempt, yet the four greedy
    replies equal a roomy engine's. Known to differ (xfail, with where): STEP_COMPOSITION."""
    roomy = build(tiny_model_dir, **mode)
    tight = build(
        tiny_model_dir, **mode, num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=8
    )
    prompts = [
        chat(roomy, f"Describe a {animal} in one sentence.")
        for animal in ("cat", "dog", "fish", "bird")
    ]
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    expected = [o.new_token_ids for o in roomy.generate(prompts, params)]
    got = [o.new_token_ids for o in tight.generate(prompts, params)]
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks
    if got != expected:
        first_diff = [
            next((i for i, (a, b) in enumerate(zip(g, e, strict=True)) if a != b), None)
            for g, e in zip(got, expected, strict=True)
        ]
        pytest.xfail(f"{STEP_COMPOSITION}; first differing token per reply: {first_diff}")


TEXT = "Review a retry loop, a config cache and a queue-depth metric; list risks and tests. " * 6


def test_bf16_blocks_cross_the_store_format_bit_for_bit_and_import_identically(
    tiny_model_dir, mode
):
    """Blocks of a bf16-KV engine stay bfloat16 through encode_block/decode_block, bit for
    bit, and a second engine importing them replies as it does computing them itself."""
    sender = build(tiny_model_dir, **mode)
    receiver = build(tiny_model_dir, **mode, enable_prefix_caching=False)
    prompt = chat(sender, TEXT)
    kv = prefill(sender, EngineRequest("src", prompt, GREEDY)).kv
    keys, blocks = kv.block_keys, list(kv.data[: len(kv.block_keys)].unbind(0))
    assert len(keys) >= 4
    decoded = []
    for key, block in zip(keys, blocks, strict=True):
        assert block.dtype == torch.bfloat16
        header, payload = encode_block(key, block)
        back = decode_block(header + bytes(payload), expect_key=key)
        assert back.dtype == torch.bfloat16 and back.shape == block.shape
        assert torch.equal(back.view(torch.int16), block.view(torch.int16))
        decoded.append(back)
    expected, _ = run(receiver, EngineRequest("scratch", prompt, GREEDY))
    n = len(keys) - 1
    prefix = PrefixKV(keys[:n], decoded[:n])
    tokens, last = run(receiver, EngineRequest("stored", prompt, GREEDY, prefix=prefix))
    assert tokens == expected
    assert last.num_cached_tokens == n * 16 and receiver.import_totals.num_blocks == n


def test_float32_kv_is_refused_by_a_bf16_engine(tiny_model_dir):
    """A stored float32 block under the right key names both dtypes; a float32 engine's PD
    handoff carries another model id in its keys (weights_id) and is refused by key."""
    engine = build(tiny_model_dir, **MODES["int4"])
    prompt = chat(engine, TEXT)
    kv = prefill(engine, EngineRequest("src", prompt, GREEDY)).kv
    as_f32 = [kv.data[0].float()]
    with pytest.raises(InvalidRequestError, match="float32.*bfloat16"):
        engine.add_request(
            EngineRequest("bad", prompt, GREEDY, prefix=PrefixKV(kv.block_keys[:1], as_f32))
        )
    f32_kv = prefill(build(tiny_model_dir), EngineRequest("f32", prompt, GREEDY)).kv
    assert f32_kv.data.dtype == torch.float32
    with pytest.raises(InvalidRequestError, match="keys"):
        engine.add_request(EngineRequest("bad", prompt, GREEDY, kv=f32_kv))
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_handoff_kv_of_another_dtype_is_refused(tiny_model_dir):
    engine = build(tiny_model_dir, **MODES["int4"])
    prompt = chat(engine, TEXT)
    kv = prefill(engine, EngineRequest("src", prompt, GREEDY)).kv
    kv.data = kv.data.float()
    with pytest.raises(InvalidRequestError, match="float32"):
        engine.add_request(EngineRequest("bad", prompt, GREEDY, kv=kv))


@pytest.mark.parametrize(
    ("kv_dtype", "expected"),
    [(None, torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
def test_kv_cache_is_held_in_kv_dtype(tiny_model_dir, kv_dtype, expected):
    engine = build(tiny_model_dir, **MODES["int4"], kv_dtype=kv_dtype)
    assert engine.runner.kv_cache.tensor.dtype == expected
    kv = prefill(engine, EngineRequest("src", chat(engine, TEXT), GREEDY)).kv
    assert kv.data.dtype == expected


def test_bf16_kv_halves_the_bytes_per_block(tiny_model_dir):
    """The same KV byte budget holds twice the blocks in bf16."""
    pool_bytes = 1 << 20
    f32, bf16 = (
        build(
            tiny_model_dir,
            dtype="bfloat16",
            kv_dtype=kv,
            num_kv_blocks=None,
            kv_cache_bytes=pool_bytes,
        )
        for kv in ("float32", "bfloat16")
    )
    f32_block = f32.config.kv_bytes_per_block(f32.model_config)
    assert f32_block == 2 * bf16.config.kv_bytes_per_block(bf16.model_config)
    assert f32.block_manager.num_blocks == pool_bytes // f32_block
    assert bf16.block_manager.num_blocks == 2 * f32.block_manager.num_blocks
    assert f32.runner.kv_cache.tensor.nbytes == bf16.runner.kv_cache.tensor.nbytes == pool_bytes


@pytest.mark.parametrize(
    ("knobs", "reference"),
    [
        ({"dtype": "bfloat16", "kv_dtype": "float32"}, {"dtype": "float32"}),
        (MODES["int4"] | {"kv_dtype": "float32"}, MODES["int4"]),
        (MODES["int8"] | {"kv_dtype": "float32"}, MODES["int8"]),
    ],
    ids=["bf16-vs-float32", "int4-kv-f32-vs-bf16", "int8-kv-f32-vs-bf16"],
)
def test_float32_kv_under_bf16_matmuls_gives_sensible_logits(tiny_model_dir, knobs, reference):
    """bf16 matmuls over a float32 KV cache: first-token logits within 8 U of the largest
    logit of an engine differing only in precision (bf16 roundings of weights, activations
    and KV through 2 layers and the head; measured 1.5-4.5 U), hence the same greedy token."""
    engine, ref_engine = build(tiny_model_dir, **knobs), build(tiny_model_dir, **reference)
    assert engine.runner.kv_cache.tensor.dtype == torch.float32
    prompt = chat(engine, "Write a short story about a lighthouse.")
    got, *_ = first_logits(engine, EngineRequest("got", prompt, GREEDY))
    ref, *_ = first_logits(ref_engine, EngineRequest("ref", prompt, GREEDY))
    tolerance = 8 * U * ref.abs().max()
    assert (got - ref).abs().max() <= tolerance
    top2 = ref.topk(2).values
    assert top2[0] - top2[1] > 2 * tolerance  # the greedy token is decided beyond the noise
    assert got.argmax() == ref.argmax()


def test_sparse_decode_attention_runs_over_bf16_kv(tiny_model_dir):
    """Sparse attention's summaries follow the KV dtype, and a sparse int4 engine reads a
    budget of its context while producing every token."""
    sparse = SparseAttentionConfig(
        num_sink_tokens=16, window_tokens=16, shallow_fraction=0.3, deep_fraction=0.3
    )
    engine = build(tiny_model_dir, **MODES["int4"], attention="sparse", sparse=sparse)
    assert engine.runner.kv_cache.summaries.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens, _ = run(engine, EngineRequest("sparse", list(range(3, 200)), params))
    assert len(tokens) == 24
    stats = engine.runner.sparse_stats
    assert 0 < stats.tokens_read.sum() < stats.tokens_context.sum()
