"""EngineLoop: a real engine stepping on its own thread, driven from asyncio (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.engine_loop import EngineLoop, RequestAborted
from engine.errors import InvalidRequestError
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.helpers import chat, wait_for


@pytest.fixture
def engine(tiny_engine):
    """A fresh engine on the toy model for each test: nothing carries over between tests."""
    return tiny_engine


@pytest.fixture
def loop(engine):
    """A loop over the test's engine; tests start it after their own direct engine use."""
    engine_loop = EngineLoop(engine)
    yield engine_loop
    engine_loop.stop()
    assert not engine_loop.is_alive()


async def collect(stream):
    return [out async for out in stream]


def test_concurrent_requests_stream_the_same_tokens_as_generate(engine, loop):
    prompts = [chat(engine, q) for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.new_token_ids for o in engine.generate(prompts, params)]
    loop.start()

    async def main():
        streams = [
            loop.submit(
                f"r{i}", lambda e, i=i, p=p: e.add_request(EngineRequest(f"r{i}", p, params))
            )
            for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    for outs, want in zip(results, expected, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == want
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_add_errors_come_out_of_the_stream(engine, loop):
    loop.start()

    async def main():
        stream = loop.submit(
            "bad", lambda e: e.add_request(EngineRequest("bad", [], SamplingParams()))
        )
        return await collect(stream)

    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(main())


def test_leaving_the_stream_early_aborts_and_frees_blocks(engine, loop):
    prompt = chat(engine, "Write a long story about a lighthouse.")
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    loop.start()

    async def main():
        stream = loop.submit("gone", lambda e: e.add_request(EngineRequest("gone", prompt, params)))
        async for out in stream:
            if out.num_output_tokens >= 3:
                break  # the consumer leaves (client disconnect)
        await wait_for(
            lambda: loop.load["num_running"] == 0 and not engine.has_unfinished(),
            "the abandoned request is aborted",
        )

    asyncio.run(main())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_ready_gate_holds_admission_until_capacity(engine, loop):
    """A KV import waits (in order) while its ready() is false and requests are running."""
    prompt = chat(engine, "Count to five.")
    params = SamplingParams(temperature=0, max_tokens=8)
    gate = {"open": False}
    checks: list[bool] = []  # the gate as the loop found it, once per step

    def ready(engine) -> bool:
        checks.append(gate["open"])
        return gate["open"]

    loop.start()

    async def main():
        blocker = aiter(
            loop.submit(
                "blocker",
                lambda e: e.add_request(
                    EngineRequest(
                        "blocker",
                        prompt,
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                    )
                ),
            )
        )
        first = await anext(blocker)  # something runs, so a closed gate holds
        stream = loop.submit(
            "gated",
            lambda e: e.add_request(EngineRequest("gated", prompt, params)),
            ready=ready,
        )
        await wait_for(lambda: len(checks) >= 3, "the loop checks the closed gate three times")
        held = loop.load["num_waiting"]  # "gated" is still outside the engine
        gate["open"] = True
        outs = await collect(stream)
        await collect(blocker)
        return first, held, outs

    first, held, outs = asyncio.run(main())
    assert held == 1
    assert outs[-1].finished and outs[-1].num_output_tokens == 8


def test_abort_from_outside_ends_the_stream(engine, loop):
    prompt = chat(engine, "Describe a forest.")
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    loop.start()

    async def main():
        stream = aiter(
            loop.submit("ext", lambda e: e.add_request(EngineRequest("ext", prompt, params)))
        )
        await anext(stream)
        loop.abort("ext")  # e.g. an operator drain: the consumer must not hang
        with pytest.raises(RequestAborted):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_failing_step_fails_every_admitted_stream_and_the_loop_survives(engine, loop, monkeypatch):
    prompt = chat(engine, "Say something.")
    params = SamplingParams(temperature=0, max_tokens=6)
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:  # after the first token: outputs of this step are lost
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    loop.start()

    async def main():
        streams = [
            loop.submit(
                f"f{i}", lambda e, i=i: e.add_request(EngineRequest(f"f{i}", prompt, params))
            )
            for i in range(2)
        ]
        results = await asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
        after = await collect(
            loop.submit("ok", lambda e: e.add_request(EngineRequest("ok", prompt, params)))
        )
        return results, after

    results, after = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after[-1].finished and after[-1].finish_reason in ("stop", "length")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
