"""`response_format` through the unmodified `openai` client against a live replica on a random tiny
model: every json_schema answer validates against its schema, json_object answers are objects, and
bad schemas are 400s naming the problem before any stream opens."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from live_replica import MODEL_NAME, LiveReplica

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "loadtests"))
from structured_schemas import MAX_TOKENS, SCHEMAS, response_format

NAMES = list(SCHEMAS)


def _ask(client: openai.OpenAI, i: int) -> tuple[str, str, str | None]:
    """Request `i`: chat or completions, greedy or seeded sampling, schema `i % 5`."""
    name = NAMES[i % len(NAMES)]
    sampling = {"temperature": 0.0} if i % 4 == 0 else {"temperature": 1.0, "seed": i}
    extra = {"response_format": response_format(name)}
    if i % 2:
        choice = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Give me a {name} as JSON ({i})"}],
            max_tokens=MAX_TOKENS - 40,
            extra_body=extra,
            **sampling,
        ).choices[0]
        return name, choice.message.content or "", choice.finish_reason
    completion = client.completions.create(
        model=MODEL_NAME,
        prompt=f"JSON {name} number {i}:",
        max_tokens=MAX_TOKENS - 20,
        extra_body=extra,
        **sampling,
    )
    return name, completion.choices[0].text, completion.choices[0].finish_reason


def test_hundred_concurrent_answers_are_all_valid(replica: LiveReplica) -> None:
    client = replica.openai(timeout=120)
    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(lambda i: _ask(client, i), range(100)))
    valid = 0
    for name, text, finish in answers:
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        valid += 1
    assert valid == 100


def test_streamed_answer_is_valid(replica: LiveReplica) -> None:
    stream = replica.openai().chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "weather please"}],
        max_tokens=MAX_TOKENS - 40,
        temperature=0.0,
        stream=True,
        response_format=response_format("weather"),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS["weather"])


def test_json_object_answer_is_an_object(replica: LiveReplica) -> None:
    tokenizer = replica.engine.tokenizer
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 8 for t in ('"', "}")}
    choice = (
        replica.openai()
        .chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "any JSON object"}],
            max_tokens=64,
            temperature=0.0,
            logit_bias=bias,
            response_format={"type": "json_object"},
        )
        .choices[0]
    )
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content or ""), dict)


def test_free_answers_do_not_change_beside_constrained_ones(replica: LiveReplica) -> None:
    client = replica.openai(timeout=60)

    def free(i: int) -> str:
        return (
            client.completions.create(
                model=MODEL_NAME, prompt=f"free text {i}", max_tokens=24, temperature=0.0
            )
            .choices[0]
            .text
        )

    alone = [free(i) for i in range(4)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        mixed = [pool.submit(_ask, client, i) for i in range(12)]
        beside = list(pool.map(free, range(4)))
        assert all(f.result()[2] == "stop" for f in mixed)
    assert beside == alone


@pytest.mark.parametrize(
    ("path", "response_format", "param", "fragment"),
    [
        ("/v1/chat/completions", {"type": "json_schema"}, "response_format.json_schema", "required"),
        ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"schema": {}}},
         "response_format.json_schema.name", "required"),
        ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
         "response_format.json_schema.schema", "object"),
        ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
         "response_format.json_schema.name", "name"),
        ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}},
         "response_format", "objec"),
        ("/v1/completions", {"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"properties": {"a": {"$ref": "#/$defs/gone"}}}}}, "response_format", "gone"),
        ("/v1/completions", {"type": "xml"}, "response_format.type", "json_schema"),
        ("/v1/completions", {"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"type": "string", "pattern": "(ab|c){0,99999}"}}}, "response_format", "unrolls"),
    ],
)  # fmt: skip
def test_bad_response_formats_are_400_naming_the_problem(
    replica: LiveReplica, path: str, response_format: dict, param: str, fragment: str
) -> None:
    body = {"model": MODEL_NAME, "response_format": response_format, "max_tokens": 4}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    for stream in (False, True):
        with replica.http() as http:
            response = http.post(path, json={**body, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert fragment in error["message"]
