"""A replica under several served names (`--served-model-name a b`, as vLLM: the first is the
primary name, reported in answers) and the worker routes SGLang's model gateway reads
(`/server_info`, `/model_info`), with the unmodified openai SDK and plain HTTP."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from live_replica import API_KEY, LiveReplica, serve, wait_until

from fleet.control.keys import KeyStore
from fleet.embedded_redis import free_port

PRIMARY = "tiny-a"
ALIAS = "org/tiny-b"  # a Hugging Face style id: '/' in the route's path segment


@pytest.fixture(scope="module")
def named(tiny_model: Path) -> Iterator[LiveReplica]:
    server = {"served_model_name": PRIMARY, "served_model_aliases": [ALIAS]}
    with serve(tiny_model, api_key=API_KEY, server=server) as live:
        yield live


def test_models_lists_every_served_name_and_retrieve_takes_each(named: LiveReplica) -> None:
    client = named.openai()
    listing = client.models.list()
    alias = client.models.retrieve(ALIAS)
    assert [m.id for m in listing.data] == [PRIMARY, ALIAS]
    assert {m.model_extra["root"] for m in listing.data} == {str(named.runtime.settings.model)}
    assert alias.id == ALIAS and alias.model_extra["max_model_len"] == 512


def test_requests_may_name_any_served_name_and_answers_give_the_primary(
    named: LiveReplica,
) -> None:
    client = named.openai()
    messages = [{"role": "user", "content": "Say something."}]
    by_alias = client.chat.completions.create(
        model=ALIAS, messages=messages, max_tokens=6, temperature=0
    )
    by_primary = client.chat.completions.create(
        model=PRIMARY, messages=messages, max_tokens=6, temperature=0
    )
    completion = client.completions.create(model=ALIAS, prompt="Once", max_tokens=3)
    assert by_alias.model == by_primary.model == completion.model == PRIMARY
    assert by_alias.choices[0].message.content == by_primary.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="tiny-c", prompt="Once", max_tokens=3)
    assert ALIAS in unknown.value.message


def test_sglang_gateway_reads_server_info_and_model_info(named: LiveReplica) -> None:
    """The fields sgl-model-gateway's metadata discovery reads (worker registration): the
    served name is its model id; nothing secret (keys, Redis URL) is in either answer."""
    with named.http() as http:
        server = http.get("/server_info")
        model = http.get("/model_info")
        legacy = [http.get(path).json() for path in ("/get_server_info", "/get_model_info")]
    anonymous = httpx.get(named.url + "/server_info")
    info = server.json()
    assert server.status_code == 200 and model.status_code == 200
    assert info["served_model_name"] == PRIMARY
    assert info["model_path"] == str(named.runtime.settings.model)
    assert (info["tp_size"], info["dp_size"]) == (1, 1)
    load = named.runtime.load()
    assert info["max_total_tokens"] == load["kv_capacity_tokens"]
    assert info["max_running_requests"] == named.engine.args.max_num_seqs
    assert not {"model", "model_id"} & info.keys()  # the gateway reads either as one field
    assert model.json() == {
        "model_path": str(named.runtime.settings.model),
        "tokenizer_path": str(named.runtime.settings.model),
        "is_generation": True,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }
    assert legacy == [info, model.json()]
    assert anonymous.status_code == 401
    assert API_KEY not in server.text + model.text and "redis" not in server.text


def test_the_command_line_takes_several_names_after_one_flag(tiny_model: Path) -> None:
    """`python -m replica --served-model-name a b`, as vLLM's flag is spelled."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "replica", "--model", str(tiny_model), "--port", str(port),
        "--served-model-name", PRIMARY, ALIAS, "--kv-cache-tokens", "2048", "--dtype", "float32",
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        up = wait_until(lambda: process.poll() is not None or _healthy(url), timeout=120)
        assert up and process.poll() is None, process.stderr.read().decode()[-2000:]
        names = [card["id"] for card in httpx.get(url + "/v1/models").json()["data"]]
    finally:
        process.kill()
        process.wait()
    assert names == [PRIMARY, ALIAS]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def test_a_keys_model_list_applies_to_the_name_the_request_used(
    tiny_model: Path, redis_url: str
) -> None:
    """Direct fleet-key access, as through the router: a key for ALIAS only may use ALIAS."""
    prefix = f"names-{uuid.uuid4().hex[:8]}"
    store = KeyStore(redis_url, prefix=prefix)
    try:
        _, alias_only = await store.admin.create("alias-only", models=[ALIAS])
    finally:
        await store.close()
    server = {"served_model_name": PRIMARY, "served_model_aliases": [ALIAS], "redis_prefix": prefix}
    with serve(tiny_model, redis_url=redis_url, server=server) as live:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=alias_only, max_retries=0)
        allowed = await client.completions.create(model=ALIAS, prompt="Once", max_tokens=2)
        chat = await client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        with pytest.raises(openai.PermissionDeniedError):
            await client.completions.create(model=PRIMARY, prompt="Once", max_tokens=2)
    assert allowed.model == chat.model == PRIMARY
