"""`python -m router` / `fleet router` as real processes: the CLI, and two independent router
instances (different hash seeds, no shared state) placing each tenant's prefix on the same replica,
as they would behind a plain TCP balancer."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from router_harness import MODEL, wait_http

from fleet.embedded_redis import free_port


@pytest.fixture
def router_processes(replicas) -> Iterator[list[str]]:
    urls, processes = [], []
    try:
        for seed in ("1", "2"):
            port = free_port()
            cmd = [sys.executable, "-m", "router", "--port", str(port), "--policy", "prefix",
                   "--log-level", "warning", *(arg for r in replicas for arg in ("--replica", r.spec))]  # fmt: skip
            env = {**os.environ, "PYTHONHASHSEED": seed}
            processes.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_http(url + "/health")
        yield urls
    finally:
        for process in processes:
            process.terminate()
            assert process.wait(15) == 0  # a graceful shutdown


def test_help_lists_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "router", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--redis-url", "--policy", "--replica", "--admin-key", "--upstream-api-key"):
        assert option in result.stdout
    missing = subprocess.run([sys.executable, "-m", "router"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--replica" in missing.stderr


def test_two_router_processes_agree_on_prefix_placement(router_processes, replicas) -> None:
    tenants = [f"Tenant {t} has a long and particular system prompt. " * 12 for t in range(8)]
    homes: dict[int, set[str]] = collections.defaultdict(set)
    with httpx.Client(timeout=30) as client:
        for round_ in range(4):
            for t, system in enumerate(tenants):
                url = router_processes[(round_ + t) % 2]
                body = {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question {round_}"},
                    ],
                }
                response = client.post(url + "/v1/chat/completions", json=body)
                assert response.status_code == 200
                homes[t].add(response.headers["x-fleet-replica"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 2


def test_limit_flags_reach_the_config() -> None:
    from router.__main__ import config_from_args, parse_args

    args = ["--replica", "http://r:1", "--max-body-bytes", "1024", "--max-answer-bytes", "2048"]
    config = config_from_args(parse_args([*args, "--metrics-key", "scrape"]))
    assert (config.max_body_bytes, config.max_answer_bytes) == (1024, 2048)
    assert config.metrics_key == "scrape"
