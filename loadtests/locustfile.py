r"""Locust load test for any OpenAI-compatible endpoint (our router, a replica, vLLM, SGLang, ...).

Each streamed request is reported to locust as the HTTP request itself (`POST /v1/...`, timed to
the end of the stream, failures included) plus four custom metrics per successful request: `TTFT`,
`ITL` (one entry per gap between text chunks), `TPOT` and `E2E`, named "<api> <workload>". They
show up in locust's tables, web UI and CSVs. At the end a summary in vLLM `bench serve` terms is
printed and saved with the raw per-request records (JSON lines) and a PNG plot.

    OPENAI_API_KEY=sk-... locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 16 -r 16 -t 2m --workload shared-prefix --output-len 128 --goodput ttft:500,tpot:50

Modes: fixed concurrency (`-u N` users, each sending its next request when the last one ends) or
fixed request rate (`--request-rate R`: Poisson arrivals at R requests/s in total, spread over the
users and not waiting for responses; `--max-concurrency` caps requests in flight).
Every option (llm_options.py; `python loadtests/run_bench.py --help` lists them) can also be set
through its environment variable, LOCUST_<OPTION>, as locust's own options can.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import gevent
from gevent.lock import BoundedSemaphore, DummySemaphore
from gevent.pool import Group
from llm_options import add_options
from llm_plot import plot_records
from llm_stream import API_PATHS, RequestRecord, read_stream, request_body
from llm_summary import format_summary, parse_goodput, summarize
from llm_workloads import (
    DEFAULT_CHARS_PER_TOKEN,
    RandomText,
    Workload,
    make_workload,
    measure_chars_per_token,
    render_completion_prompt,
)
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("llm-loadtest")


events.init_command_line_parser.add_listener(add_options)


@events.init.add_listener
def refresh_event_loop_clock(environment: Environment, **_: Any) -> None:
    """libev keeps a cached "now" that has not moved while locust and this file were imported (a
    second or more), and locust's `--run-time` timer is created right after this event: without a
    refresh the run ends that much early."""
    gevent.get_hub().loop.update_now()


@dataclass
class Run:
    """What one test run shares across its users: options, workload and the records so far."""

    options: Any
    model: str
    workload: Workload
    slos: dict[str, float]
    stem: Path
    sink: IO[str]
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: BoundedSemaphore | DummySemaphore = field(default_factory=DummySemaphore)

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.sink.write(json.dumps(record.to_json()) + "\n")


RUN: Run | None = None


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **_auth_headers()}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _first_model(host: str) -> str:
    models = _http_json(f"{host}/v1/models").get("data") or []
    if not models:
        raise RuntimeError(f"{host}/v1/models lists no model")
    return models[0]["id"]


def _chars_per_token(options: Any, host: str, model: str) -> float:
    """Measure how long our random text is in the served model's tokens: a local tokenizer when
    given, else the server's /tokenize (vLLM's and ours), else a common rule of thumb."""
    if options.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
        return measure_chars_per_token(
            lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        )
    try:
        return measure_chars_per_token(
            lambda text: len(
                _http_json(f"{host}/tokenize", {"model": model, "prompt": text})["tokens"]
            )
        )
    except Exception as exc:
        log.warning(
            "could not size prompts with %s/tokenize (%s); assuming 4 characters per token",
            host,
            exc,
        )
        return DEFAULT_CHARS_PER_TOKEN


def _start_run(environment: Environment) -> Run:
    options = environment.parsed_options
    host = (environment.host or "").rstrip("/")
    model = options.model or _first_model(host)
    chars_per_token = _chars_per_token(options, host, model)
    # Worker processes draw different requests but share the tenants' system prompts.
    worker = getattr(environment.runner, "worker_index", 0)
    text = RandomText(random.Random(f"{options.seed}-{worker}"), chars_per_token)
    workload = make_workload(
        options.workload,
        text,
        shared_text=RandomText(random.Random(options.seed), chars_per_token),
        prompt_len=options.prompt_len,
        num_tenants=options.num_tenants,
        system_prompt_len=options.system_prompt_len,
        question_len=options.question_len,
        turns=options.turns,
        turn_len=options.turn_len,
    )
    stem_name = options.run_name or f"{options.workload}-{options.api}"
    if isinstance(environment.runner, WorkerRunner):
        stem_name += f"-worker{worker}"
    stem = Path(options.results_dir) / stem_name
    stem.parent.mkdir(parents=True, exist_ok=True)
    run = Run(
        options=options,
        model=model,
        workload=workload,
        slos=parse_goodput(options.goodput),
        stem=stem,
        sink=open(f"{stem}.records.jsonl", "w", buffering=1),  # noqa: SIM115 (closed at test_stop)
    )
    if options.request_rate > 0 and options.max_concurrency > 0:
        run.in_flight = BoundedSemaphore(options.max_concurrency)
    log.info(
        "model %s, workload %s, %.2f chars/token, records in %s.records.jsonl",
        model,
        workload.name,
        text.chars_per_token,
        stem,
    )
    return run


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    global RUN
    if isinstance(environment.runner, MasterRunner):
        log.info(
            "each worker writes its own records and summary (<run-name>-worker<N>.*); "
            "python loadtests/llm_summary.py FILE... summarizes them together"
        )
        return
    try:
        RUN = _start_run(environment)
    except Exception as exc:
        log.error("cannot start the LLM load test against %s: %s", environment.host, exc)
        environment.process_exit_code = 2
        gevent.spawn(environment.runner.quit)


_CONFIG_OPTIONS = (
    "num_users", "request_rate", "max_concurrency", "output_len", "no_ignore_eos", "temperature",
    "prompt_len", "num_tenants", "system_prompt_len", "question_len", "turns", "turn_len", "seed",
)  # fmt: skip


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_: Any) -> None:
    global RUN
    run, RUN = RUN, None
    if run is None:
        return
    run.sink.close()
    rows = [record.to_json() for record in run.records]
    summary = summarize(rows, run.slos)
    summary.update(
        model=run.model,
        workload=run.workload.name,
        api=run.options.api,
        host=environment.host,
        config={name: getattr(run.options, name, None) for name in _CONFIG_OPTIONS},
    )
    title = f"{run.workload.name} / {run.options.api} / {run.model} @ {environment.host}"
    text = f"{title}\n{format_summary(summary)}"
    Path(f"{run.stem}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(f"{run.stem}.summary.txt").write_text(text + "\n")
    if rows:
        plot_records(rows, Path(f"{run.stem}.png"), title=title)
    print(f"\n{text}\nrecords, summary and plot: {run.stem}.*", flush=True)


def _iter_lines(response: Any) -> Iterator[bytes]:
    """SSE lines as they arrive. geventhttpclient's public `readline` splits on CRLF and
    `iter_content` waits for whole blocks (which would delay TTFT), so read the raw response."""
    raw = response._response
    while line := raw.readline(b"\n"):
        yield line


def _http_error(response: Any) -> str:
    if response.status_code == 0:
        return f"connection failed: {getattr(response, 'error', 'no response')}"
    try:
        message = json.loads(response.content)["error"]["message"]
    except Exception:
        message = (response.content or b"")[:200].decode(errors="replace")
    return f"HTTP {response.status_code}: {message}"


_user_ids = itertools.count()


class OpenAIStreamUser(FastHttpUser):
    """Sends streaming chat or completion requests from the run's workload and measures them."""

    concurrency = 1024  # connections per user; only rate mode has more than one in flight

    def __init__(self, environment: Environment) -> None:
        self.network_timeout = environment.parsed_options.request_timeout
        self.default_headers = {"Accept-Encoding": "identity", **_auth_headers()}
        super().__init__(environment)
        self.rng = random.Random(environment.parsed_options.seed * 7919 + next(_user_ids))
        self.spawned = Group()
        self.next_arrival = time.monotonic()

    def wait_time(self) -> float:
        return 0.0

    @task
    def next_request(self) -> None:
        run = RUN
        if run is None:
            gevent.sleep(0.1)
            return
        rate = run.options.request_rate
        if rate <= 0:
            self.send(run)
            return
        users = max(1, self.environment.parsed_options.num_users or 1)
        # Each user is a Poisson process of rate/users (they add up to one of `rate`); arrival times
        # are kept on an absolute timeline so that scheduling delays do not lower the rate.
        now = time.monotonic()
        self.next_arrival = max(self.next_arrival, now - 1.0) + self.rng.expovariate(rate / users)
        gevent.sleep(max(0.0, self.next_arrival - now))
        self.spawned.spawn(self.send, run)

    def on_stop(self) -> None:
        self.spawned.join(timeout=self.environment.parsed_options.stop_timeout or 0)
        self.spawned.kill(block=False)

    def send(self, run: Run) -> None:
        with run.in_flight:
            self._send(run)

    def _send(self, run: Run) -> None:
        options = run.options
        prompt = run.workload.next()
        payload = (
            prompt.messages if options.api == "chat" else render_completion_prompt(prompt.messages)
        )
        body = request_body(
            options.api,
            run.model,
            payload,
            options.output_len,
            force_length=not options.no_ignore_eos,
            temperature=options.temperature,
        )
        path = API_PATHS[options.api]
        record = RequestRecord(api=options.api, workload=run.workload.name, start=time.time())
        sent_at = time.perf_counter()
        with self.client.post(path, json=body, stream=True, catch_response=True) as response:
            if response.status_code == 200:
                read_stream(_iter_lines(response), record, sent_at)
                if record.error:
                    response._response.release()  # unread rest: the connection is dropped, not reused
            else:
                record.error = _http_error(response)
                record.e2e_ms = (time.perf_counter() - sent_at) * 1000.0
            response.request_meta["response_time"] = record.e2e_ms
            response.request_meta["response_length"] = record.output_tokens
            if record.error:
                response.failure(record.error)
            else:
                response.success()
        run.workload.done(prompt, record.text if record.ok else None)
        if record.ok:
            self._report_metrics(f"{options.api} {run.workload.name}", record)
        run.add(record)

    def _report_metrics(self, name: str, record: RequestRecord) -> None:
        fire = self.environment.events.request.fire

        def report(metric: str, ms: float, length: int = 0) -> None:
            fire(
                request_type=metric,
                name=name,
                response_time=ms,
                response_length=length,
                exception=None,
                context={},
            )

        if record.ttft_ms is not None:
            report("TTFT", record.ttft_ms, record.prompt_tokens or 0)
        for gap in record.itl_ms:
            report("ITL", gap)
        if record.tpot_ms is not None:
            report("TPOT", record.tpot_ms)
        report("E2E", record.e2e_ms, record.output_tokens)
