"""Interop (issue #19 item 6): the router in front of engines that are not ours. Fake replicas speak
vLLM's and SGLang's dialects (no `/load`; load only from their own Prometheus names; SGLang's
`/server_info` and `/model_info`), and chat and streamed completions go through the router to
both with the unmodified openai SDK, weighed by the load each one reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from router_harness import MODEL, FakeReplica, fake_replicas, fresh, router_config, run_router

from router.backends.load_signals import from_prometheus_text


@pytest.fixture(scope="module")
def engines() -> Iterator[list[FakeReplica]]:
    """[vLLM, SGLang] fakes of one model."""
    with (
        fake_replicas(1, "--model", MODEL, "--engine", "vllm") as vllm,
        fake_replicas(1, "--model", MODEL, "--engine", "sglang") as sglang,
    ):
        yield [*vllm, *sglang]


@pytest.fixture
def both(engines: list[FakeReplica]) -> list[FakeReplica]:
    return fresh(engines)


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return condition()


async def test_chat_and_streamed_completions_reach_vllm_and_sglang(both) -> None:
    async with run_router(router_config(both, policy="round-robin")) as router:
        client = sdk(router.url)
        chats = [
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}]
            )
            for i in range(4)
        ]
        streamed = []
        for i in range(4):
            stream = await client.completions.create(
                model=MODEL, prompt=f"once upon {i}", stream=True, max_tokens=5
            )
            streamed.append("".join([c.choices[0].text async for c in stream if c.choices]))
    assert [c.choices[0].message.content for c in chats] == ["t0 t1 t2 t3 t4 t5 t6 t7 "] * 4
    assert streamed == ["t0 t1 t2 t3 t4 "] * 4
    assert [fake.stats()["requests"] for fake in both] == [4, 4]


async def test_the_router_reads_each_engines_own_load_metrics(both) -> None:
    vllm, sglang = both
    vllm.configure(waiting=7, kv_usage=0.25)
    sglang.configure(waiting=3, kv_usage=0.5)
    async with run_router(router_config(both)) as router:
        seen = await wait_for(
            lambda: (
                (router.replica(vllm.id).load.waiting, router.replica(sglang.id).load.waiting)
                == (7, 3)
            )
        )
        loads = [router.replica(fake.id).load for fake in both]
    assert seen
    assert [load.kv_usage for load in loads] == [0.25, 0.5]
    assert [fake.stats()["by_path"].get("/load", 0) for fake in both] == [1, 1]  # then /metrics


async def test_least_load_steers_away_from_the_engine_whose_metrics_say_busy(both) -> None:
    vllm, sglang = both
    async with run_router(router_config(both, policy="least-load")) as router:
        for busy, idle in ((sglang, vllm), (vllm, sglang)):
            busy.configure(waiting=20)
            idle.configure(waiting=0)
            assert await wait_for(lambda b=busy: router.replica(b.id).load.waiting == 20)
            assert await wait_for(lambda i=idle: router.replica(i.id).load.waiting == 0)
            before = idle.stats()["requests"]
            for i in range(5):
                answer = await router.client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": f"x{i}"}]},
                )
                assert answer.headers["x-fleet-replica"] == idle.id
            assert idle.stats()["requests"] - before == 5


def test_the_sglang_fake_answers_what_sglangs_gateway_probes(engines) -> None:
    sglang = engines[1]
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        assert httpx.get(sglang.url + path).status_code == 200, path
    assert httpx.get(sglang.url + "/server_info").json()["served_model_name"] == MODEL
    assert httpx.get(sglang.url + "/model_info").json()["is_generation"] is True


def test_sglang_metrics_are_read_per_dp_rank() -> None:
    """Counts add up over data-parallel ranks; KV usage is a fraction, so it is their mean.
    SGLang's prompt and cached token counters are its prefix-cache queries and hits."""
    labels = 'model_name="m",engine_type="unified",tp_rank="0",pp_rank="0"'
    text = "\n".join(
        [
            "# TYPE sglang:num_running_reqs gauge",
            f'sglang:num_running_reqs{{{labels},dp_rank="0"}} 3.0',
            f'sglang:num_running_reqs{{{labels},dp_rank="1"}} 2.0',
            f'sglang:num_queue_reqs{{{labels},dp_rank="0"}} 4.0',
            f'sglang:num_queue_reqs{{{labels},dp_rank="1"}} 1.0',
            f'sglang:token_usage{{{labels},dp_rank="0"}} 0.5',
            f'sglang:token_usage{{{labels},dp_rank="1"}} 0.25',
            f"sglang:prompt_tokens_total{{{labels}}} 1000.0",
            f'sglang:cached_tokens_total{{{labels},cache_source="device"}} 300.0',
            f'sglang:cached_tokens_total{{{labels},cache_source="host"}} 100.0',
            f"sglang:cached_tokens_created{{{labels}}} 1.7e9",
        ]
    )
    load = from_prometheus_text(text)
    assert (load.running, load.waiting, load.kv_usage) == (5, 5, 0.375)
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (1000, 400)


def test_vllm_kv_usage_of_several_engines_is_their_mean() -> None:
    text = "\n".join(
        [
            'vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.75',
            'vllm:kv_cache_usage_perc{model_name="m",engine="1"} 0.25',
        ]
    )
    assert from_prometheus_text(text).kv_usage == 0.5
