"""The replica's side of resuming a stream (replica/http_api/resume.py): token ids on chunks for a
router that asks, and a continuation that carries on the original response exactly."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica

from fleet.control.keys import KeyAdmin
from fleet.control.redis_conn import async_client

IDS = {"X-Fleet-Token-Ids": "1"}


def _frames(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    data = [f.removeprefix(b"data: ") for f in response.content.split(b"\n\n") if f]
    assert data[-1] == b"[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


def _text(route: str, chunks: list[dict]) -> str:
    key = "text" if route == "completions" else None
    out = ""
    for chunk in chunks:
        for choice in chunk["choices"]:
            out += choice[key] if key else choice["delta"].get("content", "")
    return out


def _body(route: str, **extra) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "Tell me a story about a fox."}]
    else:
        body["prompt"] = "Once upon a time, a fox"
    return body


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 77}])
def test_a_continuation_carries_on_the_original_stream(
    replica: LiveReplica, route: str, sampling: dict
) -> None:
    path = f"/v1/{route}" if route == "completions" else "/v1/chat/completions"
    with replica.http() as http:
        whole = _frames(http.post(path, json=_body(route, **sampling), headers=IDS))
        ids = [t for c in whole for t in c.get("fleet_token_ids", [])]
        usage = whole[-1]["usage"]
        assert usage["completion_tokens"] == len(ids) == 40
        assert "fleet_token_ids" not in whole[-1]  # the usage chunk covers no tokens
        plain = _frames(http.post(path, json=_body(route, **sampling)))
        assert all("fleet_token_ids" not in c for c in plain)  # only when asked
        assert _text(route, plain) == _text(route, whole)

        content = [c for c in whole if c["choices"] and c.get("fleet_token_ids")]
        cut = len(content) // 2
        sent = [t for c in whole[: whole.index(content[cut])] for t in c["fleet_token_ids"]]
        resume = {"token_ids": sent, "id": whole[0]["id"], "created": whole[0]["created"]}
        rest = _frames(
            http.post(path, json=_body(route, **sampling, fleet_resume=resume), headers=IDS)
        )
    before = _text(route, whole[: whole.index(content[cut])])
    assert before + _text(route, rest) == _text(route, whole)
    assert sent + [t for c in rest for t in c.get("fleet_token_ids", [])] == ids
    assert {c["id"] for c in rest} == {whole[0]["id"]}
    assert {c["created"] for c in rest} == {whole[0]["created"]}
    if route == "chat":
        assert all("role" not in c["choices"][0]["delta"] for c in rest if c["choices"])
    assert rest[-1]["usage"]["completion_tokens"] == 40
    assert rest[-1]["usage"]["prompt_tokens"] == usage["prompt_tokens"]


def test_bad_continuations_are_400s(replica: LiveReplica) -> None:
    with replica.http() as http:
        for extra in (
            {"fleet_resume": {"token_ids": [5] * 40}},  # nothing left to generate
            {"fleet_resume": {"token_ids": [5]}, "n": 2},
            {"fleet_resume": {"token_ids": [5]}, "stream": False, "stream_options": None},
            {"fleet_resume": {"token_ids": [-1]}},
            {"fleet_resume": {"token_ids": [5], "id": "bad id\n"}},
        ):
            response = http.post("/v1/completions", json=_body("completions", **extra))
            assert response.status_code == 400, extra
            assert response.json()["error"]["param"].startswith("fleet_resume"), extra


async def test_fleet_user_keys_cannot_use_the_extensions(tiny_model: Path, redis_url: str) -> None:
    from live_replica import serve

    admin_client = async_client(redis_url)
    _, user_key = await KeyAdmin(admin_client).create("user")
    await admin_client.aclose()
    with serve(tiny_model, api_key=API_KEY, redis_url=redis_url) as live:
        headers = {"Authorization": f"Bearer {user_key}", **IDS}
        body = _body("completions", max_tokens=5)
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as http:
            streamed = await http.post("/v1/completions", json=body)
            assert all("fleet_token_ids" not in c for c in _frames(streamed))
            body["fleet_resume"] = {"token_ids": [5]}
            refused = await http.post("/v1/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "fleet_resume"
