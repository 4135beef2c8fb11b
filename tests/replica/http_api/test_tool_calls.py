"""Tool calling through the unmodified `openai` client against a live replica on a random tiny model
(whose ChatML template renders tools as Qwen2.5's does, so `auto` picks the Hermes parser):
"required" and named choices always come back as calls whose arguments validate against the tool's
schema, whole and streamed (the SDK's own stream reassembly); history with calls and tool results
renders; bad tools are 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import orjson
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica, serve
from openai_schema import assert_valid

from replica.http_api.prompts import render_chat

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}, "format": {"enum": ["12h", "24h"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} somewhere", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
MESSAGES = [{"role": "user", "content": "What's the weather and the time in Paris?"}]
MAX_TOKENS = 300  # both schemas are bounded: a call closes well within this even token by token


@pytest.fixture(scope="module")
def replica(tiny_model: Path) -> Iterator[LiveReplica]:
    """The tiny model's 512-token vocabulary spells the tools' prompt in ~730 tokens."""
    with serve(tiny_model, api_key=API_KEY, max_model_len=2048) as live:
        yield live


def _ask(client: openai.OpenAI, i: int, tool_choice: object) -> tuple[str | None, list]:
    """Request `i`: streamed (SDK reassembly) when odd, parallel calls allowed when i % 4 < 2."""
    kwargs = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=i % 4 < 2,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=i,
    )
    if i % 2:
        with client.chat.completions.stream(**kwargs) as stream:
            choice = stream.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
    return choice.finish_reason, choice.message.tool_calls or []


def _check_calls(answers: list[tuple[str | None, list]], names: set[str]) -> int:
    valid = 0
    for finish, calls in answers:
        assert finish == "tool_calls" and calls
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        valid += 1
    return valid


NAMED = {"type": "function", "function": {"name": "get_time"}}


def _answers(replica: LiveReplica, tool_choice: object, count: int) -> list:
    client = replica.openai(timeout=300)
    with ThreadPoolExecutor(max_workers=50) as pool:
        return list(pool.map(lambda i: _ask(client, i, tool_choice), range(count)))


def test_required_and_named_calls_whole_and_streamed(replica: LiveReplica) -> None:
    """A quick sample of the hundred-request tests below (each way of asking once)."""
    assert _check_calls(_answers(replica, "required", 4), set(SCHEMAS)) == 4
    assert _check_calls(_answers(replica, NAMED, 4), {"get_time"}) == 4


@pytest.mark.slow
def test_required_gives_a_hundred_valid_calls(replica: LiveReplica) -> None:
    answers = _answers(replica, "required", 100)
    assert _check_calls(answers, set(SCHEMAS)) == 100
    single = [len(calls) for i, (_, calls) in enumerate(answers) if i % 4 >= 2]
    assert set(single) == {1}  # parallel_tool_calls=false: one call each


@pytest.mark.slow
def test_named_function_gives_a_hundred_valid_calls(replica: LiveReplica) -> None:
    answers = _answers(replica, NAMED, 100)
    assert _check_calls(answers, {"get_time"}) == 100
    assert all(len(calls) == 1 for _, calls in answers)


def test_streamed_pieces_reassemble_into_the_whole_answer(replica: LiveReplica) -> None:
    """Raw chunks: the first piece of a call has its id and name, later ones argument text only;
    greedy, so the same request answered whole gives the same call."""
    client = replica.openai()
    kwargs = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message
    pieces = [
        c.choices[0].delta
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert len(pieces) > 3
    first = pieces[0].tool_calls[0]
    assert first.id and first.function.name and first.type == "function"
    assert all(p.tool_calls[0].id is None for p in pieces[1:] if p.tool_calls[0].index == 0)
    arguments = "".join(
        p.tool_calls[0].function.arguments or "" for p in pieces if p.tool_calls[0].index == 0
    )
    assert whole.tool_calls and whole.content is None
    assert (first.function.name, arguments) == (
        whole.tool_calls[0].function.name,
        whole.tool_calls[0].function.arguments,
    )


def test_answers_match_the_openai_schema(replica: LiveReplica) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": MAX_TOKENS, "temperature": 0.0}  # fmt: skip
    with replica.http() as http:
        whole = http.post("/v1/chat/completions", json={**body, "n": 2}).json()
        streamed = http.post("/v1/chat/completions", json={**body, "n": 2, "stream": True}).text
    assert_valid("CreateChatCompletionResponse", whole)
    assert [c["finish_reason"] for c in whole["choices"]] == ["tool_calls"] * 2
    assert all(c["message"]["tool_calls"] for c in whole["choices"])
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finished, called = {}, set()
    for event in events[:-1]:
        chunk = orjson.loads(event)
        assert_valid("CreateChatCompletionStreamResponse", chunk)
        choice = chunk["choices"][0]
        if choice["delta"].get("tool_calls"):
            called.add(choice["index"])
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert finished == {0: "tool_calls", 1: "tool_calls"} and called == {0, 1}


def test_auto_and_none_answer_with_content(replica: LiveReplica) -> None:
    """The random model writes no call: the answer is its text, as without tools."""
    client = replica.openai()
    for choice in ("auto", "none"):
        answer = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=20,
            temperature=0.0,
        ).choices[0]
        assert answer.finish_reason in ("stop", "length")
        assert answer.message.tool_calls is None and answer.message.content


def test_history_with_calls_and_tool_results(replica: LiveReplica) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "21 degrees, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
    ]
    text = render_chat(replica.engine.tokenizer, history, tools=[t for t in TOOLS])
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": '
        '"CET"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21 degrees, sunny\n'
        "</tool_response>\n<tool_response>\n14:05\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    ) in text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    answer = replica.openai().chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=8
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_plain_chats_render_as_before(replica: LiveReplica) -> None:
    """The tool-aware template writes a chat without tools exactly as plain ChatML."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(replica.engine.tokenizer, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


BAD = [
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
            ]
        },
        "tools.0.function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "bogus"}}},
                    },
                }
            ]
        },
        "tools.0.function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": 7}}]},
        "tools.0.function.parameters",
    ),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, None),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                }
            ]
        },
        "messages.0.tool_calls",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tools_are_400s_naming_the_field(
    replica: LiveReplica, extra: dict, param: str | None
) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **extra}
    with replica.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    if param is None:  # an empty list of calls is no call at all
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_replica_without_a_parser_refuses_demanded_calls(tiny_model: Path) -> None:
    with serve(
        tiny_model, api_key=API_KEY, max_model_len=2048, server={"tool_call_parser": "none"}
    ) as live:
        client = live.openai()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required"
            )
        assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
        answer = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4
        )
        assert answer.choices[0].message.tool_calls is None


def test_each_parameters_schema_is_checked_once() -> None:
    """Agents send the same tools every turn; the metaschema check (~1 s for the largest schema
    allowed) runs once per schema."""
    from replica.http_api.tool_calls.request import _schema_problem, tool_request

    before = _schema_problem.cache_info()
    for _ in range(3):
        tool_request(TOOLS, "auto", None)
    after = _schema_problem.cache_info()
    assert after.misses - before.misses <= len(TOOLS)
    assert after.hits - before.hits >= 2 * len(TOOLS)


def test_a_mistral_template_picks_the_mistral_parser(tiny_model: Path, tmp_path: Path) -> None:
    """`auto` reads the template: one that writes `[TOOL_CALLS]` gets Mistral's parser, whose
    special token stays in the text; demanded calls are enforced the same way for every family."""
    template = tmp_path / "mistral.jinja"
    template.write_text(
        "{%- for m in messages %}[INST]{{ m['content'] }}[/INST]{%- endfor %}"
        "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
        "{%- for m in messages if m['tool_calls'] %}[TOOL_CALLS]{%- endfor %}{%- endif %}"
    )
    with serve(
        tiny_model, api_key=API_KEY, max_model_len=2048, server={"chat_template": str(template)}
    ) as live:
        assert live.runtime.tool_parser == "mistral"
        client = live.openai()
        named = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=100
        ).choices[0]
        assert named.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments), TIME)
        auto = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0.0
        ).choices[0]
        assert auto.message.tool_calls is None and auto.message.content
