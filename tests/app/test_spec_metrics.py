"""Speculative decoding in the request's meter, its metrics (per tenant) and the API field."""

from __future__ import annotations

from app.api.schemas import ChatCompletionRequest
from app.audit import AuditRecord
from app.outcome_metrics import observe_outcome
from app.request_meter import RequestMeter
from deployments.metrics import Metrics
from engine.output import RequestOutput


def output(n_out: int, drafted: int, accepted: int, steps: int, finished=False) -> RequestOutput:
    return RequestOutput(
        "r", [1], "x", finished, None, 5, 0, n_out,
        num_drafted_tokens=drafted, num_accepted_tokens=accepted, num_spec_steps=steps,
    )  # fmt: skip


def test_meter_sums_choices_and_engines_a_choice_moved_across():
    meter = RequestMeter(num_prompt_tokens=5, n=2)
    meter.note(0, output(3, 4, 2, 1))
    meter.note(0, output(9, 10, 7, 3))
    meter.note(1, output(4, 6, 3, 2))
    assert meter.spec_counts() == (16, 10, 5)
    meter.note(1, output(6, 2, 1, 1))  # moved to a fresh decode engine: counters restart
    meter.note(1, output(8, 5, 3, 2, finished=True))
    assert meter.totals(1) == (11, 6, 4)
    assert meter.spec_counts() == (21, 13, 7)


def test_outcome_metrics_count_speculation_per_tenant():
    metrics = Metrics("memory")
    for tenant, drafted in (("acme", 10), ("acme", 6), ("beta", 0)):
        meter = RequestMeter(num_prompt_tokens=5, n=1)
        meter.note(0, output(8, drafted, drafted // 2, 2, finished=True))
        record = AuditRecord(1.0, "r", tenant, "m", "/v1/chat/completions", "ok", 200)
        observe_outcome(metrics, record, meter)
    assert metrics.value("dualpath_spec_drafted_tokens_total", tenant="acme") == 16
    assert metrics.value("dualpath_spec_accepted_tokens_total", tenant="acme") == 8
    assert metrics.value("dualpath_spec_verify_steps_total", tenant="acme") == 4
    assert metrics.value("dualpath_spec_drafted_tokens_total", tenant="beta") == 0


def test_the_speculative_extension_field_reaches_the_engine_params():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate(body)._sampling(8, None, 0).speculative
    off = ChatCompletionRequest.model_validate({**body, "speculative": False})
    assert off._sampling(8, None, 0).speculative is False


def test_the_responses_api_passes_the_opt_out_on():
    from app.api.responses import ResponsesRequest
    from app.responses import to_chat

    request = ResponsesRequest.model_validate({"model": "m", "input": "hi", "speculative": False})
    chat, _ = to_chat(request, [])
    assert chat._sampling(8, None, 0).speculative is False
