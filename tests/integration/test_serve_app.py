"""End to end: the real Serve app (Ingress → Scheduler → PE → KV transfer → DE) over HTTP
with the official openai client and httpx, for each KV transport."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from engine.sampling_params import SamplingParams
from kvstore.keys import chain_keys, root_key
from tests.helpers import wait_until
from tests.integration.conftest import APP, MODEL, engines, traffic_stats

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = (
    "You are a careful assistant for systems engineers. Answer briefly and precisely, prefer "
    "concrete numbers, name units, and say when you are unsure. Never invent citations. When "
    "a question is ambiguous, state the interpretation you chose before answering it."
)


def client(app) -> OpenAI:
    return OpenAI(base_url=app.openai_url, api_key="unused", max_retries=0)


def messages(text: str, system: str | None = SYSTEM) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": text}]


def alone(engine, msgs, max_tokens=24):
    """The engine core run alone (in this process) on the same prompt: the reference."""
    prompt = engine.tokenizer.encode_chat(msgs)
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
    return out, len(prompt)


def test_models_and_health(serve_app):
    models = client(serve_app).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(f"{serve_app.base_url}/health").json()
    assert health["status"] == "ok"
    from ray import serve

    status = serve.status().applications[APP]
    assert {name: d.status for name, d in status.deployments.items()} == {
        name: "HEALTHY"
        for name in (
            "Ingress",
            "Scheduler",
            "PrefillEngine-node0",
            "DecodeEngine-node0",
            "TrafficManager-node0",
        )
    }


@pytest.mark.parametrize(
    "question", ["What is the capital of France?", "Give one reason to use TCP.", "Say hi."]
)
def test_greedy_chat_through_pd_equals_engine_alone(serve_app, engine, question):
    msgs = messages(question)
    want, num_prompt = alone(engine, msgs)
    reply = client(serve_app).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == num_prompt
    assert reply.usage.completion_tokens == want.num_output_tokens


def test_streaming_matches_non_streaming_and_reports_usage(serve_app):
    msgs = messages("Name two prime numbers.")
    api = client(serve_app)
    full = api.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    stream = api.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_endpoint_and_n_choices_with_seed(serve_app):
    api = client(serve_app)
    reply = api.completions.create(
        model=MODEL,
        prompt="The three primary colors are",
        max_tokens=12,
        n=2,
        seed=11,
        temperature=0.9,
    )
    again = api.completions.create(
        model=MODEL,
        prompt="The three primary colors are",
        max_tokens=12,
        n=2,
        seed=11,
        temperature=0.9,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [c.text for c in again.choices]
    assert reply.choices[0].text != reply.choices[1].text  # seed + index per choice
    assert 2 <= reply.usage.completion_tokens <= 2 * 12


def test_logprobs_and_stop(serve_app):
    reply = client(serve_app).chat.completions.create(
        model=MODEL,
        messages=messages("Count from 1 to 10, separated by commas."),
        max_tokens=40,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stop=["5"],
    )
    choice = reply.choices[0]
    assert "5" not in choice.message.content and choice.finish_reason == "stop"
    content = choice.logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


FOLLOW_UPS = [
    "Thanks. Now explain, in two short sentences, why that name suits a slow and patient "
    "animal that lives for decades, and mention one famous turtle from a story or a film.",
    "Good. Next, suggest a second name that would suit a turtle living in a garden pond with "
    "goldfish and water lilies, and explain your choice in one sentence for a child.",
    "Finally, compare the two names you gave: which one is easier to call out loud across a "
    "garden, which one is more memorable, and which one would you pick, and why?",
]


def test_multi_turn_reports_growing_cached_tokens(serve_app):
    api = client(serve_app)
    history = messages("Suggest a name for a pet turtle.")
    cached, prompt_tokens = [], []
    tail = (
        " Please keep the answer short, friendly and free of jargon, do not repeat my question "
        "back to me, and do not add any disclaimers or follow-up questions at the end."
    )
    for follow_up in [*(f + tail for f in FOLLOW_UPS), None]:
        reply = api.chat.completions.create(
            model=MODEL, messages=history, max_tokens=24, temperature=0
        )
        usage = reply.usage
        cached.append(usage.prompt_tokens_details.cached_tokens)
        prompt_tokens.append(usage.prompt_tokens)
        assert usage.prompt_cache_hit_tokens == cached[-1]
        assert usage.prompt_cache_miss_tokens == usage.prompt_tokens - cached[-1]
        if follow_up:
            history += [
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": follow_up},
            ]
    # Each turn adds > 64 tokens, so each re-reads at least one more whole block of the
    # previous turn's prompt (hits are whole 64-token blocks of what the PE computed).
    assert all(b - a > 64 for a, b in pairwise(prompt_tokens))
    assert all(c % 64 == 0 for c in cached)
    assert all(b > a for a, b in pairwise(cached[1:])) and cached[1] > 0
    # everything but the last partial block of the previous prompt is a hit
    for prev, hit in zip(prompt_tokens[:-1], cached[1:], strict=True):
        assert hit >= (prev - 1) // 64 * 64


def test_agent_turn_reads_the_previous_turn_from_the_kv_store(serve_app, engine):
    """Turn 2 = turn 1's prompt + its exact generated tokens (`return_token_ids`) + a tool
    result: the blocks the DE persisted (prompt and reply) are read back from the KV store,
    and greedy output equals one engine computing everything."""
    api = client(serve_app)
    from pydoc_data.topics import topics

    ids = engine.tokenizer.encode(topics["exceptions"] + topics["for"])
    turn1, tool = ids[:400], ids[400:480]
    first = api.completions.create(
        model=MODEL,
        prompt=turn1,
        max_tokens=70,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    reply = first.choices[0].model_extra["token_ids"]
    assert len(reply) == 70
    turn2 = turn1 + reply + tool
    deadline = time.time() + 10
    while time.time() < deadline:  # persistence and index updates are asynchronous
        stats = traffic_stats()["kvstore"]
        if stats["persisted"] >= len(turn1 + reply) // 64 and not stats["pending_writes"]:
            break
        time.sleep(0.2)
    from ray import serve

    # the KV of turn 1's last token is never computed: its full blocks end one token early
    keys = tuple(chain_keys(root_key(engine.model_id), (turn1 + reply)[:-1], 64))
    scheduler = serve.get_deployment_handle("Scheduler", APP)
    wait_until(  # a node report carries the last index events
        lambda: scheduler.lookup.remote(keys).result().num_blocks == len(keys),
        "the Scheduler's index holds every full block of turn 1",
    )
    second = api.completions.create(model=MODEL, prompt=turn2, max_tokens=16, temperature=0)
    (want,) = engine.generate([turn2], SamplingParams(temperature=0, max_tokens=16))
    assert second.choices[0].text == want.text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= (len(turn1 + reply) - 1) // 64 * 64 - 64
    timings = second.model_extra["timings"]
    assert timings["kv_read_ms"] is not None and timings["schedule_ms"] is not None
    sched = scheduler.stats.remote().result()
    assert sched["index"]["nvme_blocks"] >= len(turn1 + reply) // 64
    assert sum(n for path, n in sched["read_paths"].items() if path != "none") >= 1


def test_sixteen_concurrent_streams_all_complete_with_correct_usage(serve_app, engine):
    questions = [f"Write one sentence about the number {i}." for i in range(16)]

    async def one(api: AsyncOpenAI, question: str):
        stream = await api.chat.completions.create(
            model=MODEL,
            messages=messages(question, system=None),
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, usage, finish

    async def main():
        api = AsyncOpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(api, q) for q in questions))

    results = asyncio.run(main())
    for question, (text, usage, finish) in zip(questions, results, strict=True):
        want, num_prompt = alone(engine, messages(question, system=None), max_tokens=16)
        assert finish == want.finish_reason
        assert usage.prompt_tokens == num_prompt
        assert usage.completion_tokens == want.num_output_tokens
        assert text == want.text


def test_kv_moved_through_the_configured_transport(serve_app):
    client(serve_app).chat.completions.create(
        model=MODEL, messages=messages("One more question."), max_tokens=4, temperature=0
    )

    # NOTE: each engine reports its transfer counters to the TrafficManager on its own
    # schedule, so the PE's "sent" can be counted a report before the DE's "received".
    def settled() -> bool:
        stats = traffic_stats()
        moved = stats["bytes_by_transport"].get(serve_app.transport, 0) > 0
        return moved and stats["bytes_received"] == stats["bytes_sent"]

    wait_until(settled, "the KV moved and every byte sent was received", timeout_s=10.0)
    stats = traffic_stats()
    assert stats["num_fallbacks"] == 0
    assert stats["bytes_received"] == stats["bytes_sent"] > 0


def test_client_disconnect_aborts_and_frees_blocks(serve_app):
    body = {
        "model": MODEL,
        "messages": messages("Write a very long story about lighthouses."),
        "max_tokens": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    url = f"{serve_app.base_url}/v1/chat/completions"
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break  # leave mid-stream: the connection closes here
    deadline = time.time() + 30
    while time.time() < deadline:
        (de,) = engines("decode")
        (pe,) = engines("prefill")
        if de.num_running == 0 and de.num_free_blocks == de.num_total_blocks:
            break
        time.sleep(0.2)
    assert de.num_running == 0 and de.num_waiting == 0
    assert de.num_free_blocks == de.num_total_blocks
    assert pe.num_free_blocks == pe.num_total_blocks


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 9000}]},
            400,
            "messages",
        ),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
    ],
    ids=[
        "unknown-model",
        "no-messages",
        "temperature",
        "n",
        "max_tokens",
        "too-long",
        "bad-role",
        "bad-token-id",
    ],
)
def test_bad_inputs_get_openai_errors(serve_app, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(f"{serve_app.base_url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_and_oversized_bodies(serve_app):
    url = f"{serve_app.base_url}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b"x" * (5 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(f"{serve_app.base_url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


DRIVER = """
import json, ray
ray.init(address="auto", log_to_driver=False)
from app.api.schemas import ChatCompletionRequest
from app.client import DualPathClient
client = DualPathClient("dualpath")
request = ChatCompletionRequest(model="{model}", max_tokens=8, temperature=0,
                                messages=[{{"role": "user", "content": "Say hello."}}])
reply = client.chat_sync(request)
chunks = client.chat_stream_sync(request.model_copy(update={{"stream": True}}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print(json.dumps({{"reply": reply.choices[0].message.content, "stream": text,
                  "usage": reply.usage.completion_tokens}}))
"""


def test_ray_handle_from_a_separate_driver(serve_app):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER.format(model=MODEL)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["reply"] and out["reply"] == out["stream"] and out["usage"] > 0
