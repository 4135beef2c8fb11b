"""The asyncio front: streaming, abort, load, errors, and no leaked blocks."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import random_prompts

from replica import SamplingParams, SamplingParamsError
from replica.engine.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def engine(llama_path):
    engine = AsyncEngine(str(llama_path), kv_cache_tokens=1024, max_model_len=256, max_num_seqs=8)
    yield engine
    engine.shutdown()


async def _wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> dict:
    for _ in range(int(timeout / 0.01)):
        load = engine.load()
        if load["running"] == load["waiting"] == 0 and load["free_blocks"] == load["num_blocks"]:
            return load
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.load()}")


async def _collect(engine, request_id, prompt, params):
    outs = [out async for out in engine.generate(request_id, prompt, params)]
    return outs


async def test_streams_match_the_offline_result(engine, llama_llm) -> None:
    prompts = random_prompts([3, 18, 40, 7], seed=30)
    params = SamplingParams(temperature=0, max_tokens=15, n=2, seed=1)
    streams = await asyncio.gather(
        *[_collect(engine, f"s{i}", p, params) for i, p in enumerate(prompts)]
    )
    offline = llama_llm.generate(prompts, params)
    for outs, want in zip(streams, offline, strict=True):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        for index in range(2):
            assert "".join(o.outputs[index].delta_text for o in outs) == want.outputs[index].text
            ids = [t for o in outs for t in o.outputs[index].delta_token_ids]
            assert ids == want.outputs[index].token_ids == outs[-1].outputs[index].token_ids
        metrics = outs[-1].metrics
        assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time
        assert metrics.first_token_time <= metrics.finished_time
    await _wait_idle(engine)


async def test_text_prompt_is_tokenized_and_kept(engine) -> None:
    outs = await _collect(
        engine, "text", "Hello fleet", SamplingParams(temperature=0, max_tokens=3)
    )
    assert outs[-1].prompt == "Hello fleet"
    assert outs[-1].prompt_token_ids == engine.tokenizer.encode("Hello fleet")


async def test_leaving_a_stream_aborts_and_frees_blocks(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    agen = engine.generate("leave", random_prompts([50], seed=31)[0], params)
    async for _ in agen:
        break
    assert engine.load()["free_blocks"] < engine.load()["num_blocks"]
    await agen.aclose()
    await _wait_idle(engine, timeout=1.0)


async def test_abort_by_id_ends_the_stream(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    seen = []

    async def consume():
        async for out in engine.generate("victim", random_prompts([20], seed=32)[0], params):
            seen.append(out)

    task = asyncio.create_task(consume())
    while not seen:
        await asyncio.sleep(0.005)
    engine.abort("victim")
    await asyncio.wait_for(task, timeout=2)
    assert not seen[-1].finished
    await _wait_idle(engine, timeout=1.0)


async def test_bad_requests_raise_before_streaming(engine) -> None:
    with pytest.raises(SamplingParamsError) as err:
        await _collect(engine, "too-long", [5] * 250, SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"
    with pytest.raises(SamplingParamsError):
        await _collect(engine, "empty", [], SamplingParams())
    await _wait_idle(engine)


async def test_no_leak_after_finished_aborted_and_preempted_mix(engine) -> None:
    """64 blocks for 8 long requests force preemption; a third are abandoned midway."""
    prompts = random_prompts([30, 60, 90, 45, 70, 20, 100, 55, 80, 35, 65, 25], seed=33)

    async def run(i: int, prompt: list[int]) -> None:
        params = SamplingParams(temperature=0.7, seed=i, max_tokens=100, ignore_eos=True)
        count = 0
        async for _ in engine.generate(f"mix{i}", prompt, params):
            count += 1
            if i % 3 == 0 and count == 5:
                return

    before = engine.load()["num_preemptions"]
    await asyncio.gather(*[run(i, p) for i, p in enumerate(prompts)])
    load = await _wait_idle(engine, timeout=2.0)
    assert load["num_preemptions"] > before
    assert load["kv_usage"] == 0.0
