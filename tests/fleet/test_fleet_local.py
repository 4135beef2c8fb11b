"""`fleet up --detach` with no model arguments, operated through the real CLI, then `fleet down`.

One fleet per module (the factory's tiny model, two CPU replicas, embedded Redis, API keys on);
the tests run in file order and the last one stops it and checks nothing is left behind. The
scenarios that restart replicas (each reload takes ~20 s on two busy cores) are marked slow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_harness import RunningFleet, fleet_env, pid_alive, run_cli, wait_for

from fleet.embedded_redis import free_port

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[RunningFleet]:
    run_dir = tmp_path_factory.mktemp("fleet-run")
    env = fleet_env(fleet_cache)
    began = time.monotonic()
    up = run_cli(
        "up",
        "--detach",
        "--port",
        str(free_port()),
        "--run-dir",
        str(run_dir),
        env=env,
        timeout=400,
    )
    print(f"fleet up --detach took {time.monotonic() - began:.1f}s")
    assert up.code == 0, up.text
    running = RunningFleet(run_dir, env, up)
    yield running
    if (run_dir / "state.json").exists():
        running.cli("down")


def test_up_prints_endpoint_keys_and_example(fleet: RunningFleet) -> None:
    out = fleet.up.out
    assert "fleet ready" in out and f"{fleet.router_url}/v1" in out
    assert fleet.state["admin_key"] in out and fleet.key in out
    assert "curl -s" in out and "/v1/chat/completions" in out
    assert fleet.state["phase"] == "ready"
    assert oct((fleet.run_dir / "state.json").stat().st_mode & 0o777) == "0o600"


def test_chat_completion_through_the_router(fleet: RunningFleet) -> None:
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{fleet.router_url}/v1", api_key=fleet.key)
    (model,) = [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{fleet.router_url}/v1", api_key="sk-wrong").models.list()


def test_status_json_shows_replicas_and_router_view(fleet: RunningFleet) -> None:
    status = fleet.status()
    rows = status["replicas"]
    assert len(rows) == 2 and {r["state"] for r in rows} == {"ready"}
    assert {r["device"] for r in rows} == {"cpu"} and all(r["pid"] for r in rows)
    assert {r["id"] for r in rows} == {r["name"] for r in rows}
    assert sum(r["requests_served"] for r in rows) >= 2  # the chats of the previous test
    for row in rows:  # direct access works, with the same keys as the router
        assert row["url"].startswith("http://127.0.0.1:")
        assert httpx.get(f"{row['url']}/v1/models").status_code == 401
        headers = {"Authorization": f"Bearer {fleet.key}"}
        assert httpx.get(f"{row['url']}/v1/models", headers=headers).status_code == 200
    view = status["router"]["view"]
    assert view["healthy"] and len(view["replicas"]["data"]) == 2
    assert all(entry["routable"] for entry in view["replicas"]["data"])
    table = fleet.cli("status")
    assert table.code == 0 and rows[0]["name"] in table.out and "router" in table.out


def test_logs_of_one_replica_and_unknown_name(fleet: RunningFleet) -> None:
    name = fleet.status()["replicas"][0]["name"]
    logs = fleet.cli("logs", name, "-n", "200")
    assert logs.code == 0 and "start: " in logs.out and "-m replica" in logs.out
    missing = fleet.cli("logs", "nope-7")
    assert missing.code == 1 and "no replica 'nope-7'" in missing.err


@pytest.mark.slow
def test_killed_replica_restarts_and_rejoins(fleet: RunningFleet) -> None:
    before = fleet.status()["replicas"][0]
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> dict | None:
        row = next(r for r in fleet.status()["replicas"] if r["name"] == before["name"])
        return row if row["state"] == "ready" and row["pid"] != before["pid"] else None

    after = wait_for(back, 240, "the killed replica to come back", every=1.0)
    assert after["restarts"] == 1 and after["id"] == before["id"]
    assert not pid_alive(before["pid"])
    assert fleet.chat()["usage"]["completion_tokens"] >= 1


async def _streaming_client_loop(
    url: str, key: str, model: str, stop: asyncio.Event, results: dict[str, int], errors: list[str]
) -> None:
    """Streams chat completions back to back until `stop`; any non-200 or broken stream fails."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me"}],
            "max_tokens": 24, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            try:
                async with client.stream(
                    "POST", f"{url}/v1/chat/completions", json=body, headers=headers
                ) as response:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                        continue
                    lines = [line async for line in response.aiter_lines() if line]
                if lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
                    errors.append(f"broken stream: {lines[-3:]}")
                else:
                    results["ok"] += 1
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_rolling_restart_under_streaming_load_has_zero_failures(fleet: RunningFleet) -> None:
    model = fleet.status()["replicas"][0]["model"]
    pids = {r["name"]: r["pid"] for r in fleet.status()["replicas"]}

    async def scenario() -> tuple[dict[str, int], list[str], str, float]:
        stop, results, errors = asyncio.Event(), {"ok": 0}, []
        clients = [
            asyncio.create_task(
                _streaming_client_loop(fleet.router_url, fleet.key, model, stop, results, errors)
            )
            for _ in range(4)
        ]
        await asyncio.sleep(2.0)
        began = time.monotonic()
        restart = await asyncio.to_thread(fleet.cli, "restart")
        took = time.monotonic() - began
        before_stop = results["ok"]
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*clients)
        assert results["ok"] > before_stop, "no request completed after the restart"
        return results, errors, restart.text, took

    results, errors, output, took = asyncio.run(scenario())
    print(f"rolling restart took {took:.1f}s; {results['ok']} streams ok, {len(errors)} failed")
    print(output)
    assert "restarted" in output, output
    assert errors == [], errors[:5]
    assert results["ok"] >= 10
    after = {r["name"]: r for r in fleet.status()["replicas"]}
    assert all(after[name]["pid"] != pid for name, pid in pids.items())  # each one was restarted
    assert {r["state"] for r in after.values()} == {"ready"}


@pytest.mark.slow
def test_scale_up_then_down(fleet: RunningFleet) -> None:
    model = fleet.status()["replicas"][0]["model"]
    up = fleet.cli("scale", model, "3")
    assert up.code == 0 and f"{model}: 3 replicas" in up.out, up.text
    rows = fleet.status()["replicas"]
    assert len(rows) == 3 and {r["state"] for r in rows} == {"ready"}
    newest = max(rows, key=lambda r: r["name"])
    down = fleet.cli("scale", model, "2")
    assert down.code == 0, down.text
    names = {r["name"] for r in fleet.status()["replicas"]}
    assert len(names) == 2 and newest["name"] not in names
    assert not pid_alive(newest["pid"])
    bad = fleet.cli("scale", "no-such-model", "1")
    assert bad.code == 1 and "no model named 'no-such-model'" in bad.err


def test_down_leaves_no_process_and_no_membership(fleet: RunningFleet) -> None:
    state = fleet.state
    pids = [state["manager_pid"], *(p["pid"] for p in state["processes"])]
    assert all(pid_alive(pid) for pid in pids)
    redis_port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])
    router_port = int(state["router_url"].rsplit(":", 1)[1])

    from fleet.control.membership import list_replicas_sync

    assert len(list_replicas_sync(state["redis_url"])) == 2
    down = fleet.cli("down")
    assert down.code == 0 and "fleet stopped" in down.out, down.text
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not (fleet.run_dir / "state.json").exists()
    assert not (fleet.run_dir / "control.sock").exists()
    for port in (redis_port, router_port):  # nothing listens where the fleet was
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    again = fleet.cli("status")
    assert again.code == 1 and "no fleet is running" in again.err
