"""Hostile request shapes against the replica (security issue #14, replica side).

Each attack is replayed against a real replica server (uvicorn + AsyncEngine on a tiny model): it
must be refused cheaply, or served without hurting other users, and /health must keep answering
meanwhile (a replica whose event loop stalls misses its membership heartbeats and leaves the fleet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica, serve, wait_until
from openai_schema import assert_valid

from fleet.control.keys import KeyAdmin
from fleet.control.redis_conn import async_client
from replica.engine.detokenizer import IncrementalDetokenizer
from replica.http_api import protocol
from replica.http_api.runtime import ReplicaSettings

# An operator's template file: ChatML-like, plus two hooks that let a test make rendering slow
# (`spin`: a loop over a plain variable) or fail with a long message (`boom`).
OPERATOR_TEMPLATE = (
    "{% if spin is defined %}{% for i in range(spin) %}{% for j in range(spin) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if boom is defined %}{{ raise_exception(boom) }}{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
HEALTH_BUDGET_S = 0.5
HUGE_TEXT = "hello world " * 400_000  # 4.8 MB: seconds to tokenize, and it can never fit


@pytest.fixture(scope="module")
def replica(tiny_model: Path) -> Iterator[LiveReplica]:
    with serve(tiny_model, api_key=API_KEY) as live:
        yield live


@pytest.fixture(scope="module")
def templated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveReplica]:
    """A replica started with the operator's --chat-template file and a short --prompt-timeout."""
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(OPERATOR_TEMPLATE)
    server = {"chat_template": str(path), "prompt_timeout_s": 0.5}
    with serve(tiny_model, api_key=API_KEY, server=server) as live:
        yield live


@contextlib.contextmanager
def health_probe(url: str) -> Iterator[list[float]]:
    """Time /health again and again (in a thread) while the block runs; yields the latencies."""
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not done.is_set():
                start = time.monotonic()
                client.get("/health")
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.1)
    try:
        yield latencies
    finally:
        done.set()
        thread.join(timeout=60)


def chat(messages: list[dict] | None = None, **fields) -> dict:
    messages = messages or [{"role": "user", "content": "hi"}]
    return {"model": MODEL_NAME, "messages": messages, "max_tokens": 2, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert_valid("ErrorResponse", body)
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


# -- 1. caller-supplied chat templates --------------------------------------------------------

REFUSED_KWARGS = [
    "chat_template",
    "tools",
    "documents",
    "tokenize",
    "return_dict",
    "tokenizer_kwargs",
    "padding",
    "return_tensors",
    "messages",
    "add_generation_prompt",
    "not-an-identifier",
]


@pytest.mark.parametrize("key", REFUSED_KWARGS)
def test_chat_template_kwargs_cannot_steer_the_renderer(replica: LiveReplica, key: str) -> None:
    evil = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    value = evil if key == "chat_template" else True
    with replica.http() as http:
        response = http.post("/v1/chat/completions", json=chat(chat_template_kwargs={key: value}))
    error = assert_error(response, 400, f"chat_template_kwargs.{key}")
    assert key in error["message"]


def test_chat_template_kwargs_values_are_bounded(replica: LiveReplica) -> None:
    with replica.http() as http:
        big = http.post(
            "/v1/chat/completions", json=chat(chat_template_kwargs={"notes": "x" * 100_000})
        )
        plain = http.post(
            "/v1/chat/completions", json=chat(chat_template_kwargs={"enable_thinking": False})
        )
    assert_error(big, 400, "chat_template_kwargs.notes")
    assert plain.status_code == 200, plain.text


def test_operator_chat_template_file_replaces_the_tokenizer_template(
    templated: LiveReplica,
) -> None:
    with templated.http() as http:
        rendered = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        expected = http.post("/tokenize", json={"prompt": "<user>hi</user><assistant>"})
    assert rendered.status_code == 200, rendered.text
    assert rendered.json()["tokens"] == expected.json()["tokens"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_slow_render_times_out_off_the_event_loop(templated: LiveReplica, route: str) -> None:
    body = chat(chat_template_kwargs={"spin": 8000})  # 64M loop turns: seconds of Jinja
    if route == "/tokenize":
        body = {"messages": body["messages"], "chat_template_kwargs": {"spin": 8000}}
    with templated.http() as http, health_probe(templated.url) as latencies:
        started = time.monotonic()
        response = http.post(route, json=body)
        elapsed = time.monotonic() - started
    error = assert_error(response, 400, "messages")
    assert "took longer than 0.5 s" in error["message"]
    assert elapsed < 1.5
    assert latencies and max(latencies) < HEALTH_BUDGET_S, max(latencies)
    # The abandoned render still holds one worker until it ends; the replica keeps serving.
    with templated.http() as http:
        ok = http.post("/v1/chat/completions", json=chat())
    assert ok.status_code == 200, ok.text


# -- 2. stop strings --------------------------------------------------------------------------


def test_stop_string_count_and_length_are_capped(replica: LiveReplica) -> None:
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    with replica.http() as http:
        many = http.post("/v1/completions", json={**body, "stop": [f"s{i}" for i in range(65)]})
        long = http.post("/v1/completions", json={**body, "stop": ["x" * 1025]})
        at_limits = http.post(
            "/v1/completions", json={**body, "stop": [f"{i:04d}" * 256 for i in range(64)]}
        )
    assert "64" in assert_error(many, 400, "stop")["message"]
    assert "1024" in assert_error(long, 400, "stop")["message"]
    assert at_limits.status_code == 200, at_limits.text


def _greedy(http: httpx.Client, stream: bool = False, **fields) -> tuple[str, str | None]:
    body = {
        "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
        "ignore_eos": True, "stream": stream, **fields,
    }  # fmt: skip
    if not stream:
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, finish = "", None
    with http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_text_is_cut_at_the_earliest_stop_among_many(
    replica: LiveReplica, stream: bool, include: bool
) -> None:
    with replica.http() as http:
        full, _ = _greedy(http)
        # Two stops from the generated text, the later one listed first, among 62 long ones
        # that never occur: the cut is at the stop that occurs first.
        early, late = full[8:11], full[20:23]
        at = min(full.find(early), full.find(late))
        stop = early if full.find(early) == at else late
        fillers = [f"#{i:03d}" + "~" * 1000 for i in range(62)]
        text, finish = _greedy(
            http, stream, stop=[late, *fillers, early], include_stop_str_in_output=include
        )
    assert finish == "stop"
    assert text == full[: at + len(stop) if include else at]


def _longest_token(replica: LiveReplica) -> int:
    """The plain-text token with the longest text: forcing it makes long outputs in few steps."""
    tokenizer = replica.engine.tokenizer
    added = set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(len(tokenizer)) if i not in added]
    return max(ids, key=lambda i: len(tokenizer.decode([i])))


def _neighbour_time(replica: LiveReplica, stop: list[str]) -> float:
    """How long a 32-token request takes next to a 32-choice request with `stop` that has written
    about 50 tokens (450 characters) in every choice: the stop search looks back that far."""
    attacker = {
        "model": MODEL_NAME, "prompt": "x", "n": 32, "max_tokens": 400, "ignore_eos": True,
        "temperature": 0, "stream": True, "stop": stop,
        "logit_bias": {str(_longest_token(replica)): 100},
    }  # fmt: skip
    neighbour = {
        "model": MODEL_NAME, "prompt": "hello", "max_tokens": 32, "ignore_eos": True,
        "temperature": 0,
    }  # fmt: skip
    with replica.http() as http, http.stream("POST", "/v1/completions", json=attacker) as attack:
        assert attack.status_code == 200
        frames = 0
        for line in attack.iter_lines():
            frames += line.startswith("data: {")
            if frames >= 32 * 50:
                break
        started = time.monotonic()
        response = http.post("/v1/completions", json=neighbour)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 32
    return elapsed


MAX_STOPS = [f"\x01{i:02d}" + "z" * 1021 for i in range(64)]  # the most allowed; never occur


def test_maximal_stop_strings_do_not_slow_a_neighbour(replica: LiveReplica) -> None:
    plain = _neighbour_time(replica, [])
    hostile = _neighbour_time(replica, MAX_STOPS)
    assert hostile < 2 * plain + 1.0, (plain, hostile)


def test_stop_search_cost_does_not_grow_with_the_stops(replica: LiveReplica) -> None:
    """The detokenizer's CPU time per token (stop search and hold-back) with the most stop strings
    allowed stays close to that with one stop string (thread CPU time: immune to a busy machine)."""
    tokenizer = replica.engine.tokenizer
    backend = tokenizer.backend_tokenizer
    token = _longest_token(replica)

    def cpu_seconds(stop: list[str]) -> float:
        detok = IncrementalDetokenizer(
            lambda ids, skip: backend.decode(ids, skip_special_tokens=skip), [], stop, False, True
        )
        started = time.thread_time()
        for _ in range(300):
            assert detok.add_token(token) is None
            detok.safe_length()
        return time.thread_time() - started

    one = min(cpu_seconds(MAX_STOPS[:1]) for _ in range(3))
    most = min(cpu_seconds(MAX_STOPS) for _ in range(3))
    assert most < 3 * one + 0.01, (one, most)


# -- 3. big prompts ---------------------------------------------------------------------------

BIG_PROMPTS = {
    "chat": ("/v1/chat/completions", chat([{"role": "user", "content": HUGE_TEXT}]), "messages"),
    "completion": ("/v1/completions", {"prompt": HUGE_TEXT, "max_tokens": 2}, "prompt"),
    "completion list": ("/v1/completions", {"prompt": ["hi", HUGE_TEXT], "max_tokens": 2}, "prompt"),
    "tokenize": ("/tokenize", {"prompt": HUGE_TEXT}, "prompt"),
    "tokenize chat": ("/tokenize", {"messages": [{"role": "user", "content": HUGE_TEXT}]}, "messages"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BIG_PROMPTS))
def test_prompt_that_cannot_fit_is_refused_before_tokenizing(
    replica: LiveReplica, case: str
) -> None:
    route, body, param = BIG_PROMPTS[case]
    with replica.http() as http, health_probe(replica.url) as latencies:
        started = time.monotonic()
        response = http.post(route, json=body)
        elapsed = time.monotonic() - started
    error = assert_error(response, 400, param)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in error["message"]
    assert elapsed < 1.0
    assert latencies and max(latencies) < HEALTH_BUDGET_S, max(latencies)


# -- 4. fan-out -------------------------------------------------------------------------------


def test_prompts_times_n_is_capped(replica: LiveReplica) -> None:
    body = {"model": MODEL_NAME, "prompt": ["a"] * 8, "n": 64, "max_tokens": 1}
    with replica.http() as http:
        response = http.post("/v1/completions", json=body)
        at_limit = http.post("/v1/completions", json={**body, "n": 32})
    assert "256" in assert_error(response, 400, "n")["message"]
    assert at_limit.status_code == 200, at_limit.text


# A body's size is bounded (413), but within it a million small items once took 3-13 s of the
# event loop before their 400: pydantic tried each shape of the prompt union on every item and
# kept an error per item. Each is now refused by its length or its first bad item.
MILLION_ITEMS = {
    "one-token prompts": ("/v1/completions", {"prompt": [[1]] * 1_000_000}, "prompt"),
    "negative ids": ("/v1/completions", {"prompt": [-1] * 1_000_000}, "prompt"),
    "text prompts": ("/v1/completions", {"prompt": ["a"] * 1_000_000}, "prompt"),
    "ids then a word": ("/v1/completions", {"prompt": [[1]] * 500_000 + ["x"]}, "prompt"),
    "messages": ("/v1/chat/completions", {"messages": [{"role": "user"}] * 300_000}, "messages"),
    "stop ids": (
        "/v1/completions",
        {"prompt": "hi", "stop_token_ids": [1] * 999_999 + [-1]},
        "stop_token_ids.999999",
    ),
    "detokenize ids": ("/detokenize", {"tokens": [1] * 1_000_000}, "tokens"),
}


@pytest.mark.parametrize("case", list(MILLION_ITEMS))
def test_a_million_small_items_are_refused_without_stalling(
    replica: LiveReplica, case: str
) -> None:
    route, body, param = MILLION_ITEMS[case]
    with replica.http() as http, health_probe(replica.url) as latencies:
        started = time.monotonic()
        response = http.post(route, json={"model": MODEL_NAME, **body})
        elapsed = time.monotonic() - started
    assert_error(response, 400, param)
    assert elapsed < 3.0, f"{case} took {elapsed:.1f} s to refuse"
    # Decoding a few MB of JSON holds the event loop for ~0.1 s; twice the usual budget leaves
    # room for a loaded CI machine, and is an order below what these bodies cost before.
    assert latencies and max(latencies) < 2 * HEALTH_BUDGET_S, max(latencies)
    assert replica.runtime.inflight == 0


def test_waiting_queue_has_a_default_limit() -> None:
    assert ReplicaSettings(model="m", served_model_name="m").max_waiting is not None


def test_waiting_queue_counts_sequences(tiny_model: Path) -> None:
    long = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
    with (
        serve(tiny_model, max_waiting=4, max_num_seqs=1) as replica,
        httpx.Client(base_url=replica.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json={**long, "n": 5, "stream": True}) as first,
    ):
        assert first.status_code == 200
        # One sequence runs and four wait: the queue is full, though it holds one request.
        refused = http.post("/v1/completions", json={**long, "max_tokens": 1})
    error = assert_error(refused, 503)
    assert error["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"


# -- 5. streams cut by the client are charged --------------------------------------------------


async def test_stream_cut_by_the_client_is_charged(tiny_model: Path, redis_url: str) -> None:
    admin_client = async_client(redis_url)
    admin = KeyAdmin(admin_client)
    record, key = await admin.create("cut-stream", tpm=10_000_000)
    body = {
        "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
        "stream": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with serve(tiny_model, redis_url=redis_url) as replica:
            prompt_tokens = len(replica.engine.tokenizer.encode(body["prompt"]))
            delivered = 0
            async with (
                httpx.AsyncClient(base_url=replica.url, headers=headers, timeout=60) as http,
                http.stream("POST", "/v1/completions", json=body) as response,
            ):
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    delivered += line.startswith("data: {")
                    if delivered == 100:
                        break
            usage = None
            for _ in range(200):
                usage = await admin.usage(record.id)
                if usage.prompt_tokens:
                    break
                await asyncio.sleep(0.02)
            assert usage is not None and usage.requests == 1
            assert usage.prompt_tokens == prompt_tokens
            assert 100 <= usage.completion_tokens < 400
    finally:
        await admin_client.aclose()


# -- 6. logs, error bodies, declared sizes -----------------------------------------------------


def test_unknown_fields_are_remembered_and_logged_within_bounds(
    replica: LiveReplica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=protocol.__name__)
    with replica.http() as http:
        for batch in range(2):
            extra = {f"{batch}-{i}-" + "u" * 20_000: 1 for i in range(300)}
            response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, **extra})
            assert response.status_code == 200
    assert sum(len(name) for name in protocol._logged_unknown) <= 64 * 1024
    logged = [r.getMessage() for r in caplog.records if r.name == protocol.__name__]
    assert sum(len(m) for m in logged) <= 64 * 1024


def test_template_errors_are_bounded_and_name_no_exception_class(templated: LiveReplica) -> None:
    with templated.http() as http:
        response = http.post(
            "/v1/chat/completions", json=chat(chat_template_kwargs={"boom": "B" * 3000})
        )
    error = assert_error(response, 400, "messages")
    assert len(error["message"]) < 600
    assert "Error" not in error["message"] and "Exception" not in error["message"]


def test_declared_huge_body_is_413_at_once(replica: LiveReplica) -> None:
    host, port = replica.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Length: 1000000000000\r\n\r\n{"
        )
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert wait_until(lambda: replica.runtime.inflight == 0, 1)
