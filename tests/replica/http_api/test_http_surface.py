"""Every route and every failure over real HTTP: OpenAI error JSON with the right status, open probe
routes, the tokenizer routes, metrics under our names and vLLM's, and the OpenAPI document."""

from __future__ import annotations

import httpx
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica
from openai_schema import assert_valid


@pytest.fixture(scope="module")
def http(replica: LiveReplica) -> httpx.Client:
    with replica.http() as client:
        yield client


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_valid("ErrorResponse", body)
    assert body["error"]["param"] == param
    return body["error"]


def test_unknown_path_and_wrong_method(http: httpx.Client) -> None:
    assert "no route" in _error(http.get("/v1/nothing"), 404)["message"]
    assert "not allowed" in _error(http.get("/v1/completions"), 405)["message"]
    assert "not allowed" in _error(http.delete("/v1/models"), 405)["message"]


def test_malformed_and_non_object_bodies(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b"", b'"text"'):
        error = _error(http.post("/v1/completions", content=raw, headers=headers), 400)
        assert "JSON" in error["message"]


def test_body_over_the_limit_is_413(http: httpx.Client, replica: LiveReplica) -> None:
    limit = replica.runtime.settings.max_body_bytes
    big = {"prompt": "a" * (limit + 10), "max_tokens": 1}
    assert "larger than the limit" in _error(http.post("/v1/completions", json=big), 413)["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
         "stream_options", "stream"),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, "prompt", "99999"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "99999"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
         "response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
         "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages", "valid array"),
    ],
)  # fmt: skip
def test_invalid_fields_are_400_naming_the_field(
    http: httpx.Client, path: str, body: dict, param: str, fragment: str
) -> None:
    assert (
        fragment
        in _error(http.post(path, json={"model": MODEL_NAME, **body}), 400, param)["message"]
    )


def test_context_overflow_gives_the_numbers(http: httpx.Client, replica: LiveReplica) -> None:
    prompt = [5] * 500
    error = _error(
        http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20}), 400, "max_tokens"
    )
    assert error["code"] == "context_length_exceeded"
    for number in ("512", "520", "500 in the prompt", "20 for the completion"):
        assert number in error["message"]
    # Chat without a limit takes the rest of the context; a prompt that fills it is refused.
    long_chat = {"messages": [{"role": "user", "content": "word " * 600}]}
    assert (
        "512"
        in _error(http.post("/v1/chat/completions", json=long_chat), 400, "max_tokens")["message"]
    )


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    body = {"prompt": "x", "max_tokens": 2, "store": True, "metadata": {"k": "v"}, "zzz": 1}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_echo_with_zero_max_tokens_returns_the_prompt(http: httpx.Client) -> None:
    body = {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 0}
    out = http.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == "Hello there" and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == out["usage"]["prompt_tokens"]


def test_auth_guards_api_routes_but_not_probes(replica: LiveReplica) -> None:
    with httpx.Client(base_url=replica.url) as anonymous:
        for path in ("/health", "/metrics", "/load", "/version", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        error = _error(anonymous.get("/v1/models"), 401)
        assert "Missing API key" in error["message"]
        wrong = {"Authorization": "Bearer sk-nope"}
        _error(anonymous.post("/v1/completions", json={"prompt": "x"}, headers=wrong), 401)
        _error(anonymous.post("/tokenize", json={"prompt": "x"}), 401)
        right = {"Authorization": f"Bearer {API_KEY}"}
        assert anonymous.get("/v1/models", headers=right).status_code == 200


def test_health_version_load(http: httpx.Client, replica: LiveReplica) -> None:
    assert http.get("/health").json() == {"status": "ready"}
    assert http.get("/version").json()["version"]
    load = http.get("/load").json()
    for key in ("running", "waiting", "kv_usage", "block_size", "num_blocks", "free_blocks",
                "prefix_cache_queries", "prefix_cache_hits"):  # fmt: skip
        assert key in load
    assert load["block_size"] == 16 and load["num_blocks"] == 512
    assert load["kv_capacity_tokens"] == 8192
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert http.get("/load").json()["generation_tokens"] == load["generation_tokens"] + 3


def test_tokenize_and_detokenize_round_trip(http: httpx.Client, replica: LiveReplica) -> None:
    out = http.post("/tokenize", json={"prompt": "Hello, world"}).json()
    assert out["tokens"] == replica.engine.tokenizer.encode("Hello, world")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": out["tokens"]}).json() == {
        "prompt": "Hello, world"
    }
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    text = replica.engine.tokenizer.decode(chat["tokens"])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    _error(http.post("/tokenize", json={}), 400, "prompt")
    _error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")


def test_metrics_under_our_names_and_vllms(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": "count me", "max_tokens": 3})
    text = http.get("/metrics").text
    for name in (
        'fleetserve_requests_total{route="/v1/completions",status="200"}',
        "fleetserve_time_to_first_token_seconds_bucket",
        "fleetserve_inter_token_latency_seconds_bucket",
        "fleetserve_e2e_request_latency_seconds_bucket",
        "fleetserve_request_queue_time_seconds_bucket",
        "fleetserve_prompt_tokens_total",
        "fleetserve_generation_tokens_total",
        "fleetserve_num_requests_running",
        "fleetserve_num_requests_waiting",
        "fleetserve_kv_cache_usage_ratio",
        "fleetserve_prefix_cache_queries_total",
        "fleetserve_prefix_cache_hits_total",
        f'vllm:num_requests_running{{model_name="{MODEL_NAME}"}}',
        f'vllm:num_requests_waiting{{model_name="{MODEL_NAME}"}}',
        f'vllm:kv_cache_usage_perc{{model_name="{MODEL_NAME}"}}',
        f'vllm:prefix_cache_queries_total{{model_name="{MODEL_NAME}"}}',
        f'vllm:prefix_cache_hits_total{{model_name="{MODEL_NAME}"}}',
    ):
        assert name in text, name
    generated = _sample(text, "fleetserve_generation_tokens_total")
    assert generated >= 3


def test_openapi_document_lists_every_route(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path, method in (
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/health", "get"),
        ("/load", "get"),
        ("/metrics", "get"),
        ("/version", "get"),
    ):
        assert method in paths[path], path
    ref = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    assert {"prompt", "max_tokens", "top_k", "min_p", "ignore_eos"} <= set(schema["properties"])


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])
