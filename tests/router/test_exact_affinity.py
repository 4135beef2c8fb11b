"""Exact prefix affinity from the replicas' KV events, with real tiny-model replicas and Redis.

The key check: the block hashes a router computes for a chat request (template, tools and all)
are the ones the replica caches for it. Then: the router's index follows the replica's cache
through evictions, and a router with events routes to where a prefix really is, which its
estimate cannot know."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from live_replica import MODEL_NAME, serve
from router_harness import run_router

from fleet.chat_prompt import template_inputs
from fleet.control.kv_events import block_keys, key_of
from fleet.control.kv_reader import KVEventReader
from fleet.control.membership import MembershipEvent, MembershipWatcher
from fleet.control.redis_conn import async_client
from replica.http_api.protocol import ChatCompletionRequest, parse_body, plain_messages
from replica.http_api.tool_calls.request import tool_request
from router.backends.pool import PoolSettings
from router.config import RouterConfig
from router.routing.exact import ExactAffinity, Recipe, _load

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
NOTE = {"type": "function", "function": {"name": "note"}}  # no description, no parameters
CHAT_WITH_TOOLS = {
    "model": MODEL_NAME,
    "messages": [
        {"role": "system", "content": "You answer questions about the weather. " * 2},
        {"role": "user", "content": [{"type": "text", "text": "Is it warm"},
                                     {"type": "text", "text": "in Paris today?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 21}"},
        {"role": "user", "name": "ann", "content": "And is that warm for Paris in June?"},
    ],
    "tools": [WEATHER, NOTE],
    "tool_choice": "auto",
    "max_tokens": 2,
    "temperature": 0,
}  # fmt: skip


def test_router_template_inputs_equal_the_replicas() -> None:
    body = parse_body(
        ChatCompletionRequest, httpx.Request("POST", "/", json=CHAT_WITH_TOOLS).read()
    )
    tools = tool_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    assert tools is not None
    inputs = template_inputs(CHAT_WITH_TOOLS)
    assert inputs.messages == plain_messages(body.messages)
    assert inputs.tools == [t.for_template() for t in tools.tools]
    assert (inputs.add_generation_prompt, inputs.continue_final_message) == (True, False)


def _cached_keys(replica) -> set[int]:
    return {key_of(d) for d in replica.engine.core.blocks.cached_digests()}


async def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


@pytest.fixture
def prefix() -> str:
    return f"kv-{uuid.uuid4().hex[:10]}"


async def test_router_hashes_equal_replica_blocks_and_follow_evictions(
    tiny_model, redis_url: str, prefix: str
) -> None:
    server = {"redis_prefix": prefix, "fleet_keys": False}
    with serve(
        tiny_model, redis_url=redis_url, server=server, kv_cache_tokens=1024, max_model_len=1024
    ) as replica:
        client = async_client(redis_url)
        watcher = MembershipWatcher(client=client, prefix=prefix)
        reader = KVEventReader(client, prefix, block_ms=20, resync_s=0.05)
        exact = ExactAffinity(reader)
        watcher.add_listener(exact.on_membership)
        exact.start()
        await watcher.start()
        try:
            assert await _until(lambda: len(watcher.replicas) == 1)
            [info] = watcher.replicas.values()
            assert info.kv_events is not None and info.kv_events["block_size"] == 16
            assert await _until(lambda: reader.index(info.id) is not None)
            recipe = Recipe(info.tokenizer or "", info.chat_template)
            renderer = await asyncio.to_thread(_load, recipe)

            async with httpx.AsyncClient(base_url=replica.url, timeout=60) as http:
                answer = await http.post("/v1/chat/completions", json=CHAT_WITH_TOOLS)
                assert answer.status_code == 200, answer.text
                ids = renderer.token_ids("chat", CHAT_WITH_TOOLS)
                assert ids is not None
                assert answer.json()["usage"]["prompt_tokens"] == len(ids)
                keys = block_keys(ids, 16)
                assert len(keys) >= 8
                # The key check: every block the router computes is one the replica cached.
                assert set(keys) <= _cached_keys(replica)
                assert await _until(lambda: (i := reader.index(info.id)) is not None
                                    and i.blocks == _cached_keys(replica))  # fmt: skip
                index = reader.index(info.id)
                assert index is not None
                assert index.match(keys, len(keys)) == len(keys)

                # Other prompts push it out of the 64-block cache: the index drops it too.
                for n in range(8):
                    other = {"model": MODEL_NAME, "prompt": f"{n} other text " * 40,
                             "max_tokens": 1}  # fmt: skip
                    assert (await http.post("/v1/completions", json=other)).status_code == 200
            assert await _until(lambda: (i := reader.index(info.id)) is not None
                                and i.blocks == _cached_keys(replica))  # fmt: skip
            index = reader.index(info.id)
            assert index is not None and index.match(keys, len(keys)) == 0
            assert not set(keys) & index.blocks
        finally:
            await watcher.stop()
            await exact.stop()
            await client.aclose()


async def test_router_follows_the_real_cache_not_its_estimate(
    tiny_model, redis_url: str, prefix: str
) -> None:
    """A prompt prefilled on one replica behind the router's back (directly): with events the
    router sends the next request with that prefix there; its estimate could not know. Requests
    alternate between a static key and a fleet key (two paths to the exchange)."""
    from fleet.control.keys import KeyStore

    store = KeyStore(redis_url, prefix=prefix)
    _, secret = await store.admin.create("exact")
    auth = [{"Authorization": "Bearer sk-static"}, {"Authorization": f"Bearer {secret}"}]
    server = {"redis_prefix": prefix, "fleet_keys": False}
    with (
        serve(tiny_model, redis_url=redis_url, server=server, kv_cache_tokens=2048) as one,
        serve(tiny_model, redis_url=redis_url, server=server, kv_cache_tokens=2048) as two,
    ):
        config = RouterConfig(
            redis_url=redis_url, redis_prefix=prefix, api_keys=["sk-static"], policy="prefix",
            pool=PoolSettings(probe_interval_s=0.3, load_interval_s=0.3, probe_timeout_s=1.0),
        )  # fmt: skip
        async with run_router(config, key_store=store) as router:
            app = router.app
            assert app.exact is not None
            assert await _until(lambda: len(app.pool.by_model.get(MODEL_NAME, ())) == 2)
            ids = {r.url: r.id for r in app.pool.replicas.values()}
            assert await _until(lambda: all(app.exact.reader.index(i) for i in ids.values()))
            replicas = app.pool.by_model[MODEL_NAME]
            assert await _until(lambda: app.exact.recipe_for(replicas) is not None, 60)
            hits = 0
            for n in range(4):
                system = f"Tenant {n} has its own long instructions. " * 6
                body = {"model": MODEL_NAME, "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": "first"}]}  # fmt: skip
                warm = one if n % 2 else two
                async with httpx.AsyncClient(base_url=warm.url, timeout=60) as http:
                    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
                keys = set(_cached_keys(warm))
                assert await _until(lambda w=warm, k=keys: (i := app.exact.reader.index(ids[w.url]))
                                    is not None and k <= i.blocks)  # fmt: skip
                body["messages"][1]["content"] = "second"
                answer = await router.client.post(
                    "/v1/chat/completions", json=body, headers=auth[n % 2]
                )
                assert answer.status_code == 200, answer.text
                hits += answer.headers["x-fleet-replica"] == ids[warm.url]
            assert hits == 4
            assert app.exact.stats.prepared == 4 and app.exact.stats.unusable == 0
            stats = app.exact.describe()
            assert stats["tracked"] == stats["synced"] == 2 and stats["batches"] > 0


def test_membership_without_events_is_not_tracked() -> None:
    """vLLM and SGLang replicas publish nothing: the router keeps estimating for them."""
    from fleet.control.membership import ReplicaInfo

    class _Reader:
        def __init__(self) -> None:
            self.tracked: set[str] = set()

        def track(self, replica_id: str, block_size: int) -> None:
            self.tracked.add(replica_id)

        def untrack(self, replica_id: str) -> None:
            self.tracked.discard(replica_id)

    reader = _Reader()
    exact = ExactAffinity(reader)  # type: ignore[arg-type]
    vllm = ReplicaInfo(id="v1", url="http://v", model="m", engine="vllm", managed="external")
    exact.on_membership(MembershipEvent("join", vllm))
    assert not reader.tracked and not exact.active
    ours = ReplicaInfo(id="f1", url="http://f", model="m", tokenizer="/t",
                       kv_events={"scheme": "sha256-chain/v1", "block_size": 16, "key_bits": 64,
                                  "salt": "none"})  # fmt: skip
    exact.on_membership(MembershipEvent("join", ours))
    assert reader.tracked == {"f1"} and exact.active
    exact.on_membership(MembershipEvent("leave", ours))
    assert not reader.tracked and not exact.active


def test_a_prefix_just_sent_is_not_scattered_while_its_events_lag() -> None:
    """Until the replica publishes a prompt's blocks, the index says no replica has them; the
    policy keeps a burst of that prefix together on the replica it just sent it to."""
    from fleet.control.kv_events import ExactIndex, Snapshot
    from router.backends.backend import Replica
    from router.routing.policies.base import RouteRequest
    from router.routing.policies.prefix import PrefixPolicy

    empty = {}
    for rid in ("a", "b", "c"):
        empty[rid] = ExactIndex(block_size=16)
        empty[rid].load(Snapshot(b"e", 0, []))
    policy = PrefixPolicy()
    policy.exact = lambda replica_id, recipe: empty[replica_id]
    replicas = [Replica(rid, f"http://{rid}:1") for rid in ("a", "b", "c")]
    text = "a tenant's system prompt, the same for the whole burst. " * 40
    ids = list(range(600))

    def request() -> RouteRequest:
        req = RouteRequest("m", text + "question?", 600)
        req.blocks, req.recipe, req.block_tokens = {16: block_keys(ids, 16)}, "r", 600
        return req

    first = policy.choose(request(), replicas).replica
    for replica in replicas:  # the first one's prefill is queued there, as a load poll says
        replica.in_flight = 1 if replica is first else 0
    assert {policy.choose(request(), replicas).replica.id for _ in range(3)} == {first.id}
