"""The locustfile end to end, headless, against a scripted streaming server: locust's tables get
the four LLM metrics, failures are failures, and the records/summary/plot files are written."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from locust_runner import run_locust
from scripted_server import ScriptedServer


@pytest.mark.parametrize(
    ("api", "workload", "extra"),
    [
        ("chat", "random", ["--prompt-len", "40"]),
        ("completions", "shared-prefix", ["--num-tenants", "3", "--system-prompt-len", "100"]),
        ("chat", "multi-turn", ["--turns", "3", "--turn-len", "10"]),
    ],
)
def test_workloads_report_every_llm_metric(
    scripted_server: ScriptedServer, tmp_path: Path, api: str, workload: str, extra: list[str]
) -> None:
    scripted_server.requests.clear()
    run = run_locust(
        scripted_server.url,
        tmp_path,
        "--api",
        api,
        "--workload",
        workload,
        "--output-len",
        "6",
        *extra,
        api_key="sk-test",
        seconds=2,
    )
    assert run.returncode == 0, run.output
    assert run.failures() == 0
    name = f"{api} {workload}"
    requests = run.count("POST", f"/v1/{'chat/' if api == 'chat' else ''}completions")
    assert requests > 10
    for metric in ("TTFT", "TPOT", "E2E"):
        assert run.count(metric, name) == requests, metric
    assert run.count("ITL", name) == 5 * requests  # six tokens, five gaps
    assert len(run.records) == requests and all(r["error"] is None for r in run.records)
    assert all(r["output_tokens"] == 6 for r in run.records)
    assert run.summary["completed"] == requests and run.summary["model"] == "scripted"
    assert (tmp_path / "run.png").stat().st_size > 1000
    assert "Serving Benchmark Result" in run.output

    sent = scripted_server.requests
    assert all(r["model"] == "scripted" for r in sent)  # the first model /v1/models lists
    assert all(
        r["ignore_eos"] is True and r["min_tokens"] == 6 and r["max_tokens"] == 6 for r in sent
    )
    assert all(r["_authorization"] == "Bearer sk-test" for r in sent)
    if workload == "multi-turn":
        assert max(len(r["messages"]) for r in sent) == 5  # turn three: Q, A, Q, A, Q
        assert any(
            m["role"] == "assistant" and m["content"] == " t0 t1 t2 t3 t4 t5"
            for r in sent
            for m in r["messages"]
        )
    if workload == "shared-prefix":
        prefixes = {r["prompt"].split("\nuser:")[0] for r in sent}
        assert len(prefixes) == 3


def test_failures_are_counted_and_named(scripted_server: ScriptedServer, tmp_path: Path) -> None:
    """Error frames, dropped connections and HTTP errors are failures; only good streams feed the
    LLM metrics."""
    run = run_locust(
        scripted_server.url, tmp_path, "--model", "mixed", "--output-len", "8", seconds=2
    )
    assert run.returncode == 1  # locust's exit code when any request failed
    requests = run.count("POST", "/v1/chat/completions")
    errors = Counter(r["error"] for r in run.records)
    good = errors.pop(None)
    assert set(errors) == {
        "error frame: replica lost",
        "stream broken: HTTPParseError: Incomplete response.",
        "HTTP 503: overloaded",
    }
    assert requests == len(run.records) and run.failures() == sum(errors.values())
    assert good >= requests // 4 - 2
    assert all(run.count(metric, "chat random") == good for metric in ("TTFT", "TPOT", "E2E"))
    assert run.count("ITL", "chat random") == 7 * good
    assert run.summary["failed"] == sum(errors.values()) and run.summary["completed"] == good


def test_request_rate_mode_sends_poisson_arrivals(
    scripted_server: ScriptedServer, tmp_path: Path
) -> None:
    run = run_locust(
        scripted_server.url,
        tmp_path,
        "--request-rate",
        "40",
        "--output-len",
        "4",
        "--goodput",
        "ttft:1000",
        users=1,
        seconds=4,
    )
    assert run.returncode == 0, run.output
    starts = sorted(r["start"] for r in run.records)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    rate = len(gaps) / (starts[-1] - starts[0])
    assert 28 < rate < 55  # 40/s give or take Poisson noise and a busy machine
    # exponential gaps: the spread is about the mean (a fixed pace would have almost none)
    mean = sum(gaps) / len(gaps)
    spread = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert 0.6 < spread / mean < 1.5
    assert run.summary["good_requests"] == run.summary["completed"] > 0


def test_unreachable_endpoint_stops_with_a_clear_error(tmp_path: Path) -> None:
    run = run_locust("http://127.0.0.1:9", tmp_path, seconds=2)
    assert run.returncode == 2
    assert "cannot start the LLM load test against http://127.0.0.1:9" in run.output
    assert "Traceback" not in run.output


def test_max_concurrency_caps_requests_in_flight(
    scripted_server: ScriptedServer, tmp_path: Path
) -> None:
    """At 40 requests/s of about 100 ms each, about four would be in flight; the cap holds it at 2."""
    run = run_locust(
        scripted_server.url,
        tmp_path,
        "--request-rate",
        "40",
        "--max-concurrency",
        "2",
        "--output-len",
        "40",
        users=1,
        seconds=3,
    )
    assert run.returncode == 0, run.output
    events = sorted(
        [(r["start"], 1) for r in run.records]
        + [(r["start"] + r["e2e_ms"] / 1000, -1) for r in run.records],
        key=lambda e: (e[0], e[1]),
    )
    in_flight = list(itertools.accumulate(step for _, step in events))
    assert max(in_flight) == 2
