"""POST /v1/embeddings on a replica started with task embed: the unmodified openai SDK (which asks
for base64 unless told otherwise) gets the engine's embeddings, every OpenAI input shape works,
`dimensions` truncates and renormalises, and bad input or the wrong task is a 400 naming why."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica, serve

from replica.engine.pooling import truncate

HIDDEN = 64  # the tiny model's hidden size


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> Iterator[LiveReplica]:
    with serve(
        tiny_model, api_key=API_KEY, task="embed", max_model_len=64,
        server={"max_seqs_per_request": 8},
    ) as live:  # fmt: skip
        yield live


def test_the_sdk_gets_float_and_base64_embeddings_of_every_input_shape(embedder) -> None:
    client = embedder.openai()
    text = "The quick brown fox"
    ids = embedder.engine.tokenizer.encode(text)
    as_float = client.embeddings.create(model=MODEL_NAME, input=text, encoding_format="float")
    by_default = client.embeddings.create(model=MODEL_NAME, input=text)  # the SDK asks for base64
    many = client.embeddings.create(
        model=MODEL_NAME, input=[text, "another one"], encoding_format="float"
    )
    from_ids = client.embeddings.create(model=MODEL_NAME, input=ids, encoding_format="float")
    from_id_lists = client.embeddings.create(
        model=MODEL_NAME, input=[ids, ids[:2]], encoding_format="float"
    )
    vector = as_float.data[0].embedding
    assert len(vector) == HIDDEN and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert by_default.data[0].embedding == pytest.approx(vector, abs=1e-7)
    assert many.data[0].embedding == pytest.approx(vector, abs=1e-6)
    assert [d.index for d in many.data] == [0, 1]
    assert from_ids.data[0].embedding == pytest.approx(vector, abs=1e-6)
    assert from_id_lists.data[0].embedding == pytest.approx(vector, abs=1e-6)
    assert as_float.object == "list" and as_float.data[0].object == "embedding"
    assert as_float.model == MODEL_NAME
    assert as_float.usage.prompt_tokens == len(ids) == as_float.usage.total_tokens
    assert from_id_lists.usage.prompt_tokens == len(ids) + 2


def test_base64_is_little_endian_float32_and_dimensions_renormalise(embedder) -> None:
    with embedder.http() as http:
        full = http.post(
            "/v1/embeddings", json={"model": MODEL_NAME, "input": "hello world"}
        ).json()["data"][0]["embedding"]
        packed = http.post(
            "/v1/embeddings",
            json={"model": MODEL_NAME, "input": "hello world", "encoding_format": "base64"},
        ).json()["data"][0]["embedding"]
        short = http.post(
            "/v1/embeddings", json={"model": MODEL_NAME, "input": "hello world", "dimensions": 8}
        ).json()["data"][0]["embedding"]
    unpacked = np.frombuffer(base64.b64decode(packed), dtype="<f4")
    assert unpacked.tolist() == pytest.approx(full, abs=1e-7)
    assert len(short) == 8 and short == pytest.approx(truncate(full, 8), abs=1e-6)
    assert abs(np.linalg.norm(short) - 1) < 1e-5


def test_bad_input_is_a_400_naming_the_field(embedder) -> None:
    cases = {
        "empty list": ({"input": []}, "input"),
        "no input": ({}, "input"),
        "nested garbage": ({"input": [[["a"]]]}, "input"),
        "mixed list": ({"input": ["a", 1]}, "input"),
        "too many inputs": ({"input": ["a"] * 9}, "input"),
        "too long": ({"input": [5] * 65}, "input"),
        "outside the vocabulary": ({"input": [5, 10**6]}, "input"),
        "empty text": ({"input": ""}, "input"),
        "dimensions 0": ({"input": "a", "dimensions": 0}, "dimensions"),
        "dimensions above hidden": ({"input": "a", "dimensions": HIDDEN + 1}, "dimensions"),
        "encoding": ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        "unknown model": ({"input": "a", "model": "nope"}, "model"),
    }
    with embedder.http() as http:
        answers = {
            name: http.post("/v1/embeddings", json={"model": MODEL_NAME, **body})
            for name, (body, _) in cases.items()
        }
        healthy = http.get("/health").status_code
    for name, (_, param) in cases.items():
        expected = 404 if name == "unknown model" else 400
        assert answers[name].status_code == expected, (name, answers[name].text)
        assert answers[name].json()["error"]["param"] == param, name
    assert answers["too long"].json()["error"]["code"] == "context_length_exceeded"
    assert healthy == 200
    assert embedder.runtime.inflight == 0
    assert embedder.engine.load()["free_blocks"] == embedder.engine.load()["num_blocks"]


def test_the_wrong_task_is_a_clear_400_both_ways(embedder, replica) -> None:
    with embedder.http() as http:
        chat = http.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]},
        )
        completion = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"})
    with replica.http() as http:
        embedding = http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": "hi"})
    for answer in (chat, completion, embedding):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "wrong_task"
    assert "/v1/embeddings" in chat.json()["error"]["message"]
    assert "--task embed" in embedding.json()["error"]["message"]


def test_load_and_models_report_the_task(embedder, replica) -> None:
    with embedder.http() as http:
        load = http.get("/load").json()
        card = http.get("/v1/models").json()["data"][0]
    with replica.http() as http:
        generate_card = http.get(f"/v1/models/{MODEL_NAME}").json()
    assert load["task"] == "embed" and card["task"] == "embed"
    assert generate_card["task"] == "generate"


def test_the_task_and_pooling_flags_reach_the_engine(tiny_model: Path) -> None:
    from replica.__main__ import engine_args, parse_args

    args = engine_args(
        parse_args(["--model", str(tiny_model), "--task", "embed", "--pooling", "mean"])
    )
    default = engine_args(parse_args(["--model", str(tiny_model)]))
    assert (args.task, args.pooling) == ("embed", "mean")
    assert (default.task, default.pooling) == ("generate", "last")
    with pytest.raises(ValueError, match="task"):
        engine_args(parse_args(["--model", str(tiny_model), "--task", "classify"]))


def test_answers_follow_the_openai_schema_and_the_openapi_document_lists_the_route(
    embedder,
) -> None:
    from openai_schema import assert_valid

    with embedder.http() as http:
        floats = http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": ["a", "b"]})
        packed = http.post(
            "/v1/embeddings",
            json={"model": MODEL_NAME, "input": "a", "encoding_format": "base64"},
        )
        doc = http.get("/openapi.json").json()
    operation = doc["paths"]["/v1/embeddings"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"input", "dimensions", "encoding_format"} <= set(schema["properties"])
    assert_valid("CreateEmbeddingResponse", floats.json())
    # The spec types `embedding` as an array only; base64 answers hold its string (as OpenAI's).
    assert isinstance(packed.json()["data"][0]["embedding"], str)
