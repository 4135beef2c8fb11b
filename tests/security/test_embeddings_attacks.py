"""Hostile /v1/embeddings bodies against a real embed replica (`--task embed`) and through the
router: each is refused cheaply with OpenAI-style error JSON (never a traceback, never an
out-of-memory), /health keeps answering meanwhile, and no KV block or in-flight slot is left."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica, serve
from openai_schema import assert_valid

HEALTH_BUDGET_S = 0.5
HUGE_TEXT = "hello world " * 400_000  # 4.8 MB: it can never fit, and must not be tokenized


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> Iterator[LiveReplica]:
    with serve(
        tiny_model, api_key=API_KEY, task="embed", server={"max_body_bytes": 8 * 1024 * 1024}
    ) as live:
        yield live


ATTACKS: dict[str, tuple[object, int, str | None]] = {
    # name: (body, or its JSON where orjson cannot write it, status, param)
    "a million inputs": ({"input": ["x"] * 1_000_000}, 400, "input"),
    "a million token-id lists": ({"input": [[1]] * 1_000_000}, 400, "input"),
    "a body over the limit": ({"input": ["x" * 100] * 100_000}, 413, None),
    "a huge string": ({"input": HUGE_TEXT}, 400, "input"),
    "a huge string in a list": ({"input": ["hi", HUGE_TEXT]}, 400, "input"),
    "a huge token list": ({"input": [7] * 200_000}, 400, "input"),
    "nested garbage": ({"input": [[["a", {"b": [1]}]]]}, 400, "input"),
    "deep nesting": ({"input": orjson.loads("[" * 200 + "]" * 200)}, 400, "input"),
    "objects": ({"input": {"text": "hi"}}, 400, "input"),
    "null": ({"input": None}, 400, "input"),
    "negative ids": ({"input": [-1, 2]}, 400, "input"),
    "ids past 64 bits": ('{"input": [1180591620717411303424]}', 400, "input"),
    "dimensions 0": ({"input": "hi", "dimensions": 0}, 400, "dimensions"),
    "dimensions negative": ({"input": "hi", "dimensions": -5}, 400, "dimensions"),
    "dimensions huge": ('{"input": "hi", "dimensions": 1180591620717411303424}', 400, "dimensions"),
    "dimensions above the hidden size": ({"input": "hi", "dimensions": 65}, 400, "dimensions"),
    "dimensions as text": ({"input": "hi", "dimensions": "8"}, 400, "dimensions"),
    "encoding_format unknown": ({"input": "hi", "encoding_format": "pickle"}, 400, None),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_is_refused_cheaply(embedder: LiveReplica, name: str) -> None:
    body, status, param = ATTACKS[name]
    if isinstance(body, str):
        payload = f'{{"model": "{MODEL_NAME}", {body[1:]}'.encode()
    else:
        payload = orjson.dumps({"model": MODEL_NAME, **body})  # type: ignore[dict-item]
    with embedder.http() as http:
        started = time.monotonic()
        answer = http.post(
            "/v1/embeddings", content=payload, headers={"Content-Type": "application/json"}
        )
        elapsed = time.monotonic() - started
        health = http.get("/health")
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()
    assert_valid("ErrorResponse", error)
    if param is not None:
        assert error["error"]["param"] == param
    # A million-element body is refused by its length once decoded (~0.1 s), not item by item.
    assert elapsed < 3.0, f"{name} took {elapsed:.1f} s to refuse"
    assert health.status_code == 200
    assert embedder.runtime.inflight == 0
    load = embedder.engine.load()
    assert load["free_blocks"] == load["num_blocks"] and load["running"] == load["waiting"] == 0


def test_huge_strings_never_stall_health(embedder: LiveReplica) -> None:
    """The size check runs before tokenizing, off the event loop: /health answers throughout."""
    refused: list[int] = []

    def attack() -> None:
        with embedder.http() as http:
            for _ in range(3):
                body = {"model": MODEL_NAME, "input": ["hi", HUGE_TEXT]}
                refused.append(http.post("/v1/embeddings", json=body).status_code)

    attacker = threading.Thread(target=attack)
    latencies = []
    with httpx.Client(base_url=embedder.url, timeout=30) as probe:
        attacker.start()
        while attacker.is_alive():
            started = time.monotonic()
            probe.get("/health")
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    attacker.join()
    assert refused == [400, 400, 400]
    assert latencies and max(latencies) < HEALTH_BUDGET_S


def test_the_router_refuses_what_it_cannot_plan() -> None:
    """Bodies the router reads itself (model, input units) fail there as 400s, not tracebacks."""
    from router.plan import Planner
    from router.routing.tokens import TokenEstimator

    class Pool:
        def __init__(self) -> None:
            self.by_model: dict = {}

        def only_model(self) -> None:
            return None

    planner = Planner(Pool(), TokenEstimator())  # type: ignore[arg-type]
    from fleet.control.errors import APIError

    for body in (b"[]", b"{", b'{"input": "x"}', b'{"model": 5, "input": "x"}'):
        with pytest.raises(APIError) as refused:
            planner.plan("embeddings", "/v1/embeddings", "POST", body, None, None, None)
        assert refused.value.status == 400
    with pytest.raises(APIError) as unknown:
        planner.plan(
            "embeddings",
            "/v1/embeddings",
            "POST",
            b'{"model": "m", "input": "x"}',
            None,
            None,
            None,
        )
    assert unknown.value.status == 404
