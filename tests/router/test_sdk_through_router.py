"""The unmodified `openai` SDK through a real router in front of a real replica (`python -m replica`
on a random tiny model): "required" and named tool calls whose arguments validate against the
tool's schema, and `json_schema` answers valid against their schemas (five schemas: nested
objects, arrays, enums, numbers), whole and streamed (the SDK's stream reassembly); and the
router's prompt key counts the tools the replica renders into the prompt."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from router_harness import FAST_POOL, RunningRouter, run_router, wait_http

from fleet.embedded_redis import free_port
from router.config import RouterConfig
from router.routing.prompt_key import chat_units

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from structured_schemas import MAX_TOKENS, response_format
from structured_schemas import SCHEMAS as JSON_SCHEMAS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("replica.__main__") is None,
    reason="needs the replica server (`python -m replica`), not in this checkout",
)

SERVED = "tiny-tools"
REPLICA_KEY = "sk-replica-key"
CLIENT_KEY = "sk-client-key"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: Any = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
MESSAGES: Any = [{"role": "user", "content": "Weather and time in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def replica_url(model_factory) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "replica", "--model", str(model_factory("llama", "tiny", seed=0)),
        "--served-model-name", SERVED, "--port", str(port), "--api-key", REPLICA_KEY,
        "--max-model-len", "2048", "--kv-cache-tokens", "16384", "--dtype", "float32",
        "--tool-call-parser", "auto", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=120)
        yield url
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def router(replica_url: str) -> AsyncIterator[RunningRouter]:
    config = RouterConfig(
        replicas=[f"tools={replica_url}"],
        api_keys=[CLIENT_KEY],
        upstream_api_key=REPLICA_KEY,
        pool=FAST_POOL,
        port=0,
    )
    async with run_router(config) as running:
        for _ in range(100):
            if running.app.pool.by_model.get(SERVED):
                break
            await asyncio.sleep(0.05)
        yield running


async def _ask(client: openai.AsyncOpenAI, i: int, tool_choice: Any) -> tuple[str | None, list]:
    """Streamed through the SDK's reassembly when i is odd; one call only when i % 4 >= 2."""
    kwargs: Any = dict(
        model=SERVED, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
        parallel_tool_calls=i % 4 < 2, max_tokens=200, temperature=1.0, seed=i,
    )  # fmt: skip
    if i % 2:
        async with client.chat.completions.stream(**kwargs) as stream:
            choice = (await stream.get_final_completion()).choices[0]
    else:
        choice = (await client.chat.completions.create(**kwargs)).choices[0]
    return choice.finish_reason, choice.message.tool_calls or []


async def _valid_calls(router: RunningRouter, tool_choice: Any, count: int) -> int:
    client = openai.AsyncOpenAI(
        base_url=router.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=300
    )
    answers = await asyncio.gather(*(_ask(client, i, tool_choice) for i in range(count)))
    await client.close()
    valid = 0
    for finish, calls in answers:
        assert finish == "tool_calls" and calls
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        if tool_choice is NAMED:
            assert [c.function.name for c in calls] == ["get_weather"]
        valid += 1
    return valid


async def test_calls_through_the_router(router: RunningRouter) -> None:
    """A quick sample of the hundred-request test below: each way of asking once per choice."""
    assert await _valid_calls(router, "required", 4) == 4
    assert await _valid_calls(router, NAMED, 4) == 4


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
async def test_a_hundred_valid_calls_through_the_router(
    router: RunningRouter, tool_choice: Any
) -> None:
    assert await _valid_calls(router, tool_choice, 100) == 100


def test_prompt_key_counts_the_tools() -> None:
    """The replica renders the tools into the prompt's start: the key (and the token estimate)
    must see them, and a later turn with the same tools still extends the earlier one."""
    plain = chat_units(MESSAGES)
    with_tools = chat_units(MESSAGES, TOOLS)
    assert len(with_tools) > len(plain) + 100
    assert chat_units(MESSAGES, TOOLS[:1]) != with_tools
    later = [*MESSAGES, {"role": "assistant", "content": None}, {"role": "tool", "content": "x"}]
    assert chat_units(later, TOOLS).startswith(with_tools)
    assert chat_units(MESSAGES, "not a list") == chat_units(MESSAGES, [{"x": 2**70}]) == plain


async def _structured(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, str | None]:
    """Request `i`: schema `i % 5`; chat (streamed when i % 4 == 1) or completions; greedy or
    seeded sampling."""
    name = list(JSON_SCHEMAS)[i % len(JSON_SCHEMAS)]
    sampling: Any = {"temperature": 0.0} if i % 4 == 0 else {"temperature": 1.0, "seed": i}
    extra: Any = {"response_format": response_format(name)}
    if i % 2 == 0:
        completion = await client.completions.create(
            model=SERVED, prompt=f"JSON {name} number {i}:", max_tokens=MAX_TOKENS - 20,
            extra_body=extra, **sampling,
        )  # fmt: skip
        return name, completion.choices[0].text, completion.choices[0].finish_reason
    kwargs: Any = dict(
        model=SERVED, messages=[{"role": "user", "content": f"A {name} as JSON ({i})"}],
        max_tokens=MAX_TOKENS - 40, extra_body=extra, **sampling,
    )  # fmt: skip
    if i % 4 == 1:
        text, finish = "", None
        async for chunk in await client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return name, text, finish
    choice = (await client.chat.completions.create(**kwargs)).choices[0]
    return name, choice.message.content or "", choice.finish_reason


async def _valid_json(router: RunningRouter, count: int) -> int:
    client = openai.AsyncOpenAI(
        base_url=router.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=300
    )
    answers = await asyncio.gather(*(_structured(client, i) for i in range(count)))
    await client.close()
    valid = 0
    for name, text, finish in answers:
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), JSON_SCHEMAS[name])
        valid += 1
    return valid


async def test_json_schema_answers_through_the_router(router: RunningRouter) -> None:
    """A quick sample of the hundred-request test below: each schema and way of asking."""
    assert await _valid_json(router, 10) == 10


@pytest.mark.slow
async def test_a_hundred_valid_json_schema_answers_through_the_router(
    router: RunningRouter,
) -> None:
    assert await _valid_json(router, 100) == 100
