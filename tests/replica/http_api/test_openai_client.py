"""The official `openai` client, unmodified, against a live replica on a tiny model; every body is
also checked against the official OpenAI schema for its type."""

from __future__ import annotations

import json

import openai
import pytest
from live_replica import MODEL_NAME, LiveReplica
from openai_schema import assert_valid

GREEDY = {"temperature": 0.0}


def test_models_list(replica: LiveReplica) -> None:
    client = replica.openai()
    raw = client.models.with_raw_response.list()
    body = raw.http_response.json()
    assert_valid("ListModelsResponse", body)
    assert [m.id for m in raw.parse()] == [MODEL_NAME]
    assert body["data"][0]["max_model_len"] == replica.engine.max_model_len == 512
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_plain(replica: LiveReplica) -> None:
    raw = replica.openai().completions.with_raw_response.create(
        model=MODEL_NAME, prompt="The quick brown fox", max_tokens=8, **GREEDY
    )
    body = raw.http_response.json()
    assert_valid("CreateCompletionResponse", body)
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.model == MODEL_NAME
    [choice] = completion.choices
    assert choice.finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= 8
    prompt_ids = replica.engine.tokenizer.encode("The quick brown fox")
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.total_tokens == len(prompt_ids) + completion.usage.completion_tokens
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] % 16 == 0


def test_completion_echo_with_logprobs(replica: LiveReplica) -> None:
    prompt = "Serving large language models"
    n_prompt = len(replica.engine.tokenizer.encode(prompt))
    raw = replica.openai().completions.with_raw_response.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=5, echo=True, logprobs=2, **GREEDY
    )
    body = raw.http_response.json()
    [choice] = body["choices"]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt + 5
    assert all(
        len(lp[k]) == n_prompt + 5 for k in ("token_logprobs", "top_logprobs", "text_offset")
    )
    # The first prompt token has nothing before it to be predicted from.
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    # Each entry lists the top 2 plus the chosen token (when it is not among them).
    assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # Greedy: each generated token is the most likely one.
    for token, logprob, top in zip(
        lp["tokens"][n_prompt:],
        lp["token_logprobs"][n_prompt:],
        lp["top_logprobs"][n_prompt:],
        strict=True,
    ):
        assert top[token] == logprob == max(top.values())
    # The spec types token_logprobs as numbers only, though OpenAI itself returns null for an
    # echoed first token (as we do): validate everything else.
    for key in ("token_logprobs", "top_logprobs"):
        lp[key] = lp[key][1:]
    assert_valid("CreateCompletionResponse", body)


def test_completion_n2_over_two_prompts(replica: LiveReplica) -> None:
    raw = replica.openai().completions.with_raw_response.create(
        model=MODEL_NAME, prompt=["Once upon a time", "SELECT name"], n=2, max_tokens=6,
        temperature=1.0, seed=7,
    )  # fmt: skip
    body = raw.http_response.json()
    assert_valid("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    tok = replica.engine.tokenizer
    n_prompt = len(tok.encode("Once upon a time")) + len(tok.encode("SELECT name"))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] <= 4 * 6


def test_completion_stop_string(replica: LiveReplica) -> None:
    client = replica.openai()
    args = dict(model=MODEL_NAME, prompt="A journey of a thousand", max_tokens=24, **GREEDY)
    full = client.completions.create(**args).choices[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    cut = client.completions.create(**args, stop=[stop, "zzzz-never"]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_completion_stream_with_usage(replica: LiveReplica) -> None:
    client = replica.openai()
    args = dict(model=MODEL_NAME, prompt="Numbers: 0 1 2", max_tokens=12, **GREEDY)
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == whole.choices[0].finish_reason


def test_completion_stream_without_usage_option(replica: LiveReplica) -> None:
    with replica.http() as http:
        frames = _sse(http, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_chat_plain(replica: LiveReplica) -> None:
    raw = replica.openai().chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, **GREEDY
    )
    body = raw.http_response.json()
    assert_valid("CreateChatCompletionResponse", body)
    chat = raw.parse()
    assert chat.object == "chat.completion"
    [choice] = chat.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert body["choices"][0]["message"]["refusal"] is None
    assert body["choices"][0]["logprobs"] is None
    rendered = replica.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(replica.engine.tokenizer.encode(rendered, add_special_tokens=False))
    assert chat.usage.prompt_tokens == n_prompt


def test_chat_stream_with_usage(replica: LiveReplica) -> None:
    client = replica.openai()
    args = dict(
        model=MODEL_NAME,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=10,
        **GREEDY,
    )
    whole = client.chat.completions.create(**args)
    with replica.http() as http:
        frames = _sse(http, "/v1/chat/completions",
                      {**args, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    *content, last = chunks
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert last["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [last["usage"][k] for k in counts] == [getattr(whole.usage, k) for k in counts]
    # The same prompt again: its full blocks come from the prefix cache.
    cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= whole.usage.prompt_tokens and cached % 16 == 0
    assert all(c["usage"] is None for c in content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == whole.choices[0].message.content
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    # The client's own stream parser agrees.
    *streamed, usage_chunk = client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs(replica: LiveReplica) -> None:
    raw = replica.openai().chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Emoji: "}], max_tokens=6,
        logprobs=True, top_logprobs=3, **GREEDY,
    )  # fmt: skip
    body = raw.http_response.json()
    assert_valid("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the best alternative.
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == entry["top_logprobs"][0]["bytes"]
    joined = b"".join(bytes(e["bytes"]) for e in content)
    assert joined.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]


def test_chat_n2_stream_indices(replica: LiveReplica) -> None:
    with replica.http() as http:
        frames = _sse(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4,
            "stream": True, "seed": 3,
        })  # fmt: skip
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}


def test_error_classes(replica: LiveReplica) -> None:
    client = replica.openai()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert bad.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        replica.openai(api_key="sk-wrong").models.list()
    for exc in (not_found.value, bad.value):
        assert_valid("ErrorResponse", exc.response.json())


def _sse(http, path: str, body: dict) -> list[str]:
    """The `data:` payloads of one SSE response, in order."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    return [f.removeprefix("data: ") for f in frames]
