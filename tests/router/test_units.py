"""The router's pure parts: prompt keys, prefix index, policies, sticky sessions, circuit breaker,
SSE usage tap, load signal parsing."""

from __future__ import annotations

from typing import get_args

import orjson

from router.backends.backend import LoadReport, Replica
from router.backends.breaker import CircuitBreaker
from router.backends.load_signals import from_load_json, from_prometheus_text
from router.backends.retry_budget import RetryBudget
from router.routing.policies import (
    POLICIES,
    LeastLoadPolicy,
    PolicyName,
    PrefixPolicy,
    RoundRobinPolicy,
    RouteRequest,
)
from router.routing.prefix_index import PrefixIndex
from router.routing.prompt_key import chat_units, chunk_hashes, completion_units
from router.routing.sessions import sticky_replica
from router.usage_tap import UsageTap


def replicas(n: int = 3, capacity: int = 100_000) -> list[Replica]:
    return [
        Replica(f"r{i}", f"http://h{i}:1", model="m", kv_capacity_tokens=capacity) for i in range(n)
    ]


def request(units, prompt_tokens: int | None = None) -> RouteRequest:
    tokens = prompt_tokens if prompt_tokens is not None else len(units) // 4
    return RouteRequest("m", units, tokens, 4.0)


def test_chat_rendering_keeps_the_prefix_property() -> None:
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert chat_units(turn2).startswith(chat_units(turn1))
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert chat_units(parts) == chat_units([{"role": "user", "content": "ab"}])
    assert chat_units([{"role": "user", "content": "ab"}]) != chat_units(
        [{"role": "system", "content": "ab"}]
    )


def test_completion_units_for_text_ids_and_batches() -> None:
    assert completion_units("abc") == "abc"
    assert completion_units([1, 2, 3]) == [1, 2, 3]
    assert completion_units([[1, 2], [3]]) == [1, 2, 3]
    assert completion_units(["a", "b"]) == "a\x1eb"
    assert completion_units(None) == ""


def test_chunk_hashes_identify_whole_prefixes() -> None:
    a = chunk_hashes("x" * 300 + "tail-a", 100)
    b = chunk_hashes("x" * 300 + "tail-b", 100)
    assert len(a) == 3 and a == b  # partial last chunks are not hashed
    c = chunk_hashes("y" + "x" * 299, 100)
    assert not set(a) & set(c)  # a different first chunk changes every hash after it
    ids = chunk_hashes(list(range(70)), 32)
    assert len(ids) == 2 and ids == chunk_hashes(list(range(64)), 32)


def test_prefix_index_evicts_tails_before_heads() -> None:
    index = PrefixIndex(capacity_chunks=4)
    first = chunk_hashes("a" * 400, 100)  # 4 chunks
    index.insert(first)
    assert index.match(first) == 4
    index.insert(chunk_hashes("b" * 200, 100))  # 2 more: the 2 oldest (a's tail) go
    assert index.match(first) == 2
    assert len(index) == 4


def test_round_robin_and_least_load() -> None:
    pool = replicas()
    rr = RoundRobinPolicy()
    picks = [rr.choose(request("p"), pool).replica.id for _ in range(6)]
    assert sorted(picks) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 2
    assert LeastLoadPolicy().choose(request("p"), pool).replica.id == "r1"
    pool[1].load = LoadReport(running=5, waiting=4)  # another router's load shows in /load
    assert LeastLoadPolicy().choose(request("p"), pool).replica.id == "r2"


def test_prefix_policy_sticks_then_spreads_a_hot_prefix() -> None:
    pool = replicas()
    policy = PrefixPolicy(queue_weight=64)
    prompt = "S" * 6000 + "question"
    first = policy.choose(request(prompt), pool)
    assert first.outcome == "prefix_miss"
    home = first.replica
    again = policy.choose(request(prompt + " again"), pool)
    assert again.replica is home and again.outcome == "prefix_hit"
    assert again.cached_tokens >= 1400
    # Work piles up at home: once it costs more than prefilling elsewhere, a second replica
    # takes the prefix (and a third request stays with whichever is cheaper).
    home.in_flight = 30
    spread = policy.choose(request(prompt + " third"), pool)
    assert spread.replica is not home and spread.outcome == "load_fallback"
    spread.replica.in_flight = 1
    fourth = policy.choose(request(prompt + " fourth"), pool)
    assert fourth.replica is spread.replica and fourth.outcome == "prefix_hit"


def test_prefix_policy_without_matches_is_least_load() -> None:
    pool = replicas()
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 2, 0, 1
    decision = PrefixPolicy().choose(request("short"), pool)
    assert decision.replica.id == "r1" and decision.outcome == "prefix_miss"


def test_prefix_index_is_sized_from_kv_capacity() -> None:
    small = replicas(1, capacity=256)[0]  # 256 tokens = 1024 chars = 8 chunks of 128
    policy = PrefixPolicy()
    for tenant in range(5):
        policy.choose(request(f"{tenant}" * 1024), [small])
    assert policy.indexed_chunks(small.id) == 8


def test_sticky_sessions_agree_across_routers_and_move_little() -> None:
    pool = replicas(4)
    homes = {s: sticky_replica(f"session-{s}", pool).id for s in range(200)}
    assert homes == {s: sticky_replica(f"session-{s}", list(reversed(pool))).id for s in range(200)}
    assert len(set(homes.values())) == 4
    without_r3 = [r for r in pool if r.id != "r3"]
    moved = [s for s in homes if sticky_replica(f"session-{s}", without_r3).id != homes[s]]
    assert all(homes[s] == "r3" for s in moved)


def test_breaker_ejects_half_opens_and_doubles() -> None:
    breaker = CircuitBreaker(threshold=3, base_s=1.0, max_s=3.0)
    assert not breaker.failed(now=0) and not breaker.failed(now=0)
    assert breaker.failed(now=0) and breaker.state == "open"
    assert not breaker.admits(0.5) and breaker.admits(1.01)
    breaker.dispatched()
    assert breaker.state == "half_open" and not breaker.admits(1.02)  # one trial only
    assert breaker.failed(now=1.1) and breaker.open_until == 1.1 + 2.0
    breaker.dispatched()
    breaker.failed(now=3.2)
    assert breaker.open_until == 3.2 + 3.0  # capped at max_s
    breaker.dispatched()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.admits(0) and breaker.ejections == 0


def test_breaker_trial_released_without_a_verdict() -> None:
    breaker = CircuitBreaker(threshold=1, base_s=1.0)
    breaker.failed(now=0)
    breaker.dispatched()
    assert not breaker.admits(2.0)
    breaker.released()
    assert breaker.admits(2.0)


def _frame(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


STREAM = (
    _frame({"id": "1", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": None})
    + _frame({"id": "1", "choices": [{"index": 0, "delta": {"content": "b"}}], "usage": None})
    + _frame({"id": "1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    + b"data: [DONE]\n\n"
)


def _through(tap: UsageTap, data: bytes, step: int) -> bytes:
    out = b"".join(tap.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + tap.flush()


def test_usage_tap_strips_unasked_usage_across_split_reads() -> None:
    for step in (1, 7, 64, len(STREAM)):
        tap = UsageTap(strip=True)
        out = _through(tap, STREAM, step)
        assert tap.usage == {"prompt_tokens": 5, "completion_tokens": 2}
        assert b"usage" not in out
        frames = out.split(b"\n\n")
        assert len(frames) == 4 and frames[-2] == b"data: [DONE]"


def test_usage_tap_keeps_asked_usage_and_crlf_streams() -> None:
    tap = UsageTap(strip=False)
    assert _through(tap, STREAM, 10) == STREAM
    assert tap.usage["completion_tokens"] == 2
    crlf = STREAM.replace(b"\n\n", b"\r\n\r\n")
    tap = UsageTap(strip=True)
    out = _through(tap, crlf, 9)
    assert tap.usage["prompt_tokens"] == 5 and b"usage" not in out


def test_usage_on_a_frame_with_choices_is_removed_from_that_frame() -> None:
    last = _frame(
        {"id": "1", "choices": [{"index": 0, "delta": {}}], "usage": {"prompt_tokens": 1}}
    )
    tap = UsageTap(strip=True)
    out = tap.feed(last)
    assert tap.usage == {"prompt_tokens": 1}
    assert orjson.loads(out[6:-2]) == {"id": "1", "choices": [{"index": 0, "delta": {}}]}


def test_load_json_and_vllm_metrics() -> None:
    load = from_load_json(
        {
            "running": 2,
            "waiting": 1,
            "kv_usage": 0.5,
            "num_blocks": 100,
            "block_size": 16,
            "prefix_cache_queries": 900,
            "prefix_cache_hits": 450,
        }
    )
    assert (load.running, load.waiting, load.kv_capacity_tokens, load.prefix_cache_hits) == (
        2,
        1,
        1600,
        450,
    )
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running x",
            'vllm:num_requests_running{model_name="a",engine="0"} 3.0',
            'vllm:num_requests_running{model_name="a",engine="1"} 1.0',
            'vllm:num_requests_waiting{model_name="a"} 2.0 1700000000000',
            'vllm:kv_cache_usage_perc{model_name="a"} 0.25',
            'vllm:prefix_cache_hits_total{model_name="a"} 40.0',
            "unrelated_metric 5",
        ]
    )
    parsed = from_prometheus_text(text)
    assert (parsed.running, parsed.waiting, parsed.kv_usage, parsed.prefix_cache_hits) == (
        4,
        2,
        0.25,
        40,
    )


def test_retry_budget_earns_a_fraction_of_the_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, burst=3.0)
    assert [budget.withdraw() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.deposit()
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    for _ in range(100):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(10)) == 3  # never more than the burst


def test_policy_choices_name_every_policy():
    """`--policy` takes a static Literal (so mypy checks the CLI); it must match POLICIES."""
    assert get_args(PolicyName) == tuple(POLICIES)
