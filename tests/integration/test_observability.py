"""Observability of the running app: one request id joins the `x-request-id` header, the
response id, the trace (spans from every deployment, in the files `ops trace` reads) and
the audit line; metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from ops.traceview import find_trace
from tests.integration.conftest import METRICS_PORT, MODEL, wait_for_trace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_streamed_request_is_one_trace_across_the_deployments(serve_app):
    client = OpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three rivers in Europe."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-client-request-id": "client-42"},
    )
    serve_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    (response_id,) = {c.id for c in chunks}
    usage = chunks[-1].usage

    spans = wait_for_trace(serve_app.traces, response_id, 4)
    trace_ids = {s["trace_id"] for s in spans}
    for other in (serve_id, "client-42"):  # Serve's id and the client's find it too
        assert {s["trace_id"] for s in find_trace(serve_app.traces, other)} == trace_ids
    assert len({s["trace_id"] for s in spans}) == 1
    assert {s["service"] for s in spans} == {
        "dualpath.ingress",
        "dualpath.scheduler",
        "dualpath.prefill.node0",
        "dualpath.decode.node0",
    }
    by_id = {s["span_id"]: s for s in spans}
    (root,) = [s for s in spans if s["parent_id"] not in by_id]
    assert root["name"] == "POST /v1/chat/completions"
    attrs = root["attributes"]
    assert response_id == f"chatcmpl-{attrs['dualpath.request_id']}"
    assert attrs["serve.request_id"] == serve_id
    assert attrs["client_request_id"] == "client-42"
    assert attrs["http.response.status_code"] == 200
    assert attrs["completion_tokens"] == usage.completion_tokens
    assert attrs["prompt_tokens"] == usage.prompt_tokens
    names = {s["name"] for s in spans}
    assert names >= {
        "admission",
        "choice",
        "schedule",
        "scheduler.plan",
        "prefill",
        "pe.prefill",
        "engine.chunk",
        "kv.send",
        "decode",
        "de.decode",
        "kv.receive",
    }
    de = next(s for s in spans if s["name"] == "de.decode")
    assert root["end_ns"] >= de["end_ns"]  # the root ends with the stream, not at its start

    out = subprocess.run(
        [sys.executable, "-m", "ops", "trace", serve_id, "--dir", str(serve_app.traces)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in ("POST /v1/chat/completions", "scheduler.plan", "pe.prefill", "de.decode"):
        assert name in out.stdout


def test_a_refused_request_is_traced_under_serves_request_id(serve_app):
    response = httpx.post(
        f"{serve_app.openai_url}/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 404
    rid = response.headers["x-request-id"]
    (root,) = wait_for_trace(serve_app.traces, rid, 1)
    assert root["attributes"]["http.response.status_code"] == 404
    assert root["status"] == "UNSET"  # a client error is not a server failure


def test_metrics_reach_rays_prometheus_endpoint(serve_app):
    client = OpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0)
    client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4)
    wanted = [
        "ray_dualpath_requests_total{",
        "ray_dualpath_ttft_seconds_bucket{",
        "ray_dualpath_prompt_tokens_total{",
        "ray_dualpath_read_path_total{",
        "ray_dualpath_engine_free_blocks{",
        "ray_dualpath_queue_depth{",
    ]
    deadline = time.time() + 30
    while True:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        missing = [w for w in wanted if w not in text]
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
    ok = [
        line
        for line in text.splitlines()
        if line.startswith("ray_dualpath_requests_total{") and 'status="ok"' in line
    ]
    assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) >= 1


def test_replaying_an_agentic_trace_reuses_each_sessions_context(serve_app, tmp_path):
    from ops.replay import load_trace, make_agentic, replay, summarize

    path = tmp_path / "agentic.jsonl"
    make_agentic(path, agents=2, turns=2, context=300, append=40, gen=8, rate=4.0, seed=1)
    url = f"{serve_app.openai_url}/completions"
    results, wall = asyncio.run(replay(url, MODEL, load_trace(path), 1.0, None, seed=0))
    assert [r.status for r in results] == [200] * 4 and not any(r.error for r in results)
    assert all(len(r.ids) >= 6 for r in results)  # 8 ± 20% forced tokens each
    by_session = {}
    for r in results:
        by_session.setdefault(r.session, []).append(r)
    for first, second in by_session.values():
        # turn 2 = turn 1's prompt + its reply + 30..50 new tokens (append 40 ± 25%)
        assert 30 <= second.prompt_tokens - first.prompt_tokens - len(first.ids) <= 50
        assert second.cached_tokens >= 256  # the agent's previous turn is reused
    assert summarize(results, wall)["tiers"]["default"]["statuses"] == {"200": 4}


def test_speculative_decoding_keeps_the_reply_and_is_traced_and_counted(serve_app, engine):
    """The decode engines draft (ngram): a reply that copies its prompt is the engine's own
    greedy reply with and without the request's opt-out; the decode span carries the
    request's acceptance and the per-tenant counters reach Prometheus."""
    from engine.sampling_params import SamplingParams

    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    msgs = [{"role": "user", "content": f"Repeat this code exactly:\n{text}"}]
    prompt = engine.tokenizer.encode_chat(msgs)
    (want,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=48))
    client = OpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0)
    replies = {}
    for speculative in (True, False):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=48,
            temperature=0,
            extra_body={"speculative": speculative},
        )
        assert reply.choices[0].message.content == want.text
        replies[speculative] = reply.id
    decode = {}
    for speculative, rid in replies.items():
        spans = wait_for_trace(serve_app.traces, rid, 4)
        (decode[speculative],) = [s for s in spans if s["name"] == "decode"]
    drafted = decode[True]["attributes"].get("spec.drafted_tokens", 0)
    assert drafted > 0, decode[True]["attributes"]
    assert 0 <= decode[True]["attributes"]["spec.acceptance_rate"] <= 1
    assert "spec.drafted_tokens" not in decode[False]["attributes"]
    deadline = time.time() + 30
    while True:
        metrics = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if "ray_dualpath_spec_drafted_tokens_total{" in metrics or time.time() > deadline:
            break
        time.sleep(1)
    assert "ray_dualpath_spec_accepted_tokens_total{" in metrics
