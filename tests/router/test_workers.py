"""`fleet router --workers 2` as real processes on one port: the kernel spreads connections over
the workers, an admin drain reaches every worker, a prefix goes to one replica whichever worker
takes it, SIGTERM drains every worker and the parent exits 0, a killed worker comes back, and a
router that cannot start says why in one line."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psutil
import pytest
from router_harness import MODEL, FakeReplica, chat, wait_http

from fleet.embedded_redis import free_port
from router.metrics import RouterMetrics
from router.workers.placements import SharedPlacements
from router.workers.supervisor import share

ADMIN = "adm-workers"
SETTLE_S = 1.5  # the workers write their shared files every second


@dataclass
class Workers:
    url: str
    process: subprocess.Popen[str]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def per_worker(self, name: str) -> dict[str, float]:
        pattern = rf'fleet_router_worker_{name}\{{worker="(\d+)"\}} ([\d.e+]+)'
        return {w: float(v) for w, v in re.findall(pattern, self.metrics())}


def router_cmd(port: int, replicas: list[FakeReplica], *extra: str) -> list[str]:
    specs = [arg for r in replicas for arg in ("--replica", r.spec)]
    return [sys.executable, "-m", "router", "--port", str(port), "--log-level", "warning",
            "--admin-key", ADMIN, *specs, *extra]  # fmt: skip


@contextlib.contextmanager
def started_workers(replicas: list[FakeReplica]) -> Iterator[Workers]:
    port = free_port()
    cmd = router_cmd(port, replicas, "--workers", "2")
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
        deadline = time.monotonic() + 30
        running = Workers(url, process)
        # Both listen once both have taken a connection (each scrape is a new one).
        while len([n for n in running.per_worker("connections_total").values() if n]) < 2:
            assert time.monotonic() < deadline, "the workers did not both start listening"
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(40)


@pytest.fixture(scope="module")
def shared_workers(fakes: list[FakeReplica]) -> Iterator[Workers]:
    """One 2-worker router for the tests that leave it running."""
    with started_workers(fakes) as running:
        yield running


@pytest.fixture
def workers(replicas: list[FakeReplica]) -> Iterator[Workers]:
    """A 2-worker router of the test's own, for the tests that stop or kill it."""
    with started_workers(replicas) as running:
        yield running


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str


def fresh_connection_post(url: str, body: dict) -> Answer:
    """One request on a connection of its own, so the kernel places each one anew (http.client:
    an httpx client per request costs ~20 ms of TLS setup it never uses)."""
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body),
                           {"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        text = response.read().decode()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Answer(response.status, headers, text)
    finally:
        connection.close()


def test_connections_spread_evenly_over_the_workers(
    replicas: list[FakeReplica], shared_workers: Workers
) -> None:
    time.sleep(SETTLE_S)
    before = shared_workers.per_worker("connections_total")
    served_before = sum(shared_workers.per_worker("requests_total").values())
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: fresh_connection_post(shared_workers.url, chat()), range(600))
        )
    assert all(a.status_code == 200 for a in answers)
    time.sleep(SETTLE_S)
    after = shared_workers.per_worker("connections_total")
    counts = [after[w] - before.get(w, 0) for w in ("0", "1")]
    # 600 connections hashed over 2 sockets: one standard deviation is ~2% of an even share.
    assert all(abs(c / 300 - 1) <= 0.15 for c in counts), counts
    served = sum(shared_workers.per_worker("requests_total").values())
    assert served - served_before == 600
    totals = re.findall(
        r"^fleet_router_requests_total\{.*\} ([\d.e+]+)$", shared_workers.metrics(), re.M
    )
    assert sum(float(v) for v in totals) == served  # one router's, whichever worker answers


def test_a_drain_reaches_every_worker(replicas: list[FakeReplica], shared_workers: Workers) -> None:
    drained = replicas[0].id
    answer = httpx.post(
        f"{shared_workers.url}/admin/replicas/{drained}/drain",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert answer.status_code == 200 and answer.json()["scope"] == "router"
    time.sleep(SETTLE_S)
    before = shared_workers.per_worker("requests_total")
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: fresh_connection_post(shared_workers.url, chat(f"q{i}")), range(200))
        )
    assert {a.status_code for a in answers} == {200}
    assert drained not in {a.headers["x-fleet-replica"] for a in answers}
    time.sleep(SETTLE_S)
    after = shared_workers.per_worker("requests_total")
    assert all(after[w] > before[w] for w in ("0", "1"))  # both workers served, neither sent there
    httpx.post(
        f"{shared_workers.url}/admin/replicas/{drained}/undrain",
        headers={"Authorization": f"Bearer {ADMIN}"},
    ).raise_for_status()
    time.sleep(SETTLE_S)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: fresh_connection_post(shared_workers.url, chat(f"u{i}")), range(60))
        )
    assert drained in {a.headers["x-fleet-replica"] for a in answers}


def test_each_prefix_goes_to_one_replica_whichever_worker_takes_it(
    replicas: list[FakeReplica], shared_workers: Workers
) -> None:
    tenants = [f"Tenant {t} has a long and particular system prompt. " * 12 for t in range(8)]
    homes: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for i in range(160):
        t = i % len(tenants)
        body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": tenants[t]},
                {"role": "user", "content": f"question {i}"},
            ],
        }
        answer = fresh_connection_post(shared_workers.url, body)
        assert answer.status_code == 200
        homes[t][answer.headers["x-fleet-replica"]] += 1
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 2
    time.sleep(SETTLE_S)
    assert min(shared_workers.per_worker("requests_total").values()) > 0  # both workers took some


def test_sigterm_drains_every_worker_and_the_parent_exits_0(
    workers: Workers, replicas: list[FakeReplica]
) -> None:
    for fake in replicas:
        fake.configure(chunk_delay=0.1)
    pids = [int(p) for p in workers.per_worker("pid").values()]

    def stream(i: int) -> str:
        with httpx.Client(timeout=30) as client:
            answer = client.post(
                workers.url + "/v1/chat/completions", json=chat(f"s{i}", stream=True)
            )
            return answer.text

    with ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(stream, i) for i in range(12)]
        deadline = time.monotonic() + 20
        while sum(fake.stats()["active"] for fake in replicas) < 12:  # all under way (8 chunks
            assert time.monotonic() < deadline  # 0.1 s apart): new ones would be refused now
            time.sleep(0.02)
        workers.process.send_signal(signal.SIGTERM)
        texts = [s.result() for s in streams]
    assert all(t.rstrip().endswith("data: [DONE]") for t in texts)
    assert workers.process.wait(40) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_a_killed_worker_is_restarted(workers: Workers) -> None:
    pids = workers.per_worker("pid")
    victim = psutil.Process(int(pids["1"]))
    victim.kill()
    # Its socket is closed once all its threads are gone, which is when the parent can reap it
    # (a connection hashed to it in between is reset: the cost of a socket per worker).
    with contextlib.suppress(psutil.NoSuchProcess):
        while True:
            victim.status()
            time.sleep(0.01)
    answers = [fresh_connection_post(workers.url, chat(f"k{i}")) for i in range(40)]
    assert {a.status_code for a in answers} == {200}  # the live worker took every connection
    deadline = time.monotonic() + 20
    while workers.per_worker("pid").get("1") in (None, pids["1"]):
        assert time.monotonic() < deadline, "worker 1 was not restarted"
        time.sleep(0.2)
    assert workers.per_worker("pid")["0"] == pids["0"]
    assert workers.process.poll() is None


def test_a_port_in_use_is_one_line(replicas: list[FakeReplica]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            router_cmd(port, replicas, "--workers", "2"), capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fleet router: --port {port}: cannot listen on 127.0.0.1 port {port}: address already "
        "in use (in use? pick another --port)"
    ]


def test_workers_that_cannot_start_stop_the_router_with_one_line(
    replicas: list[FakeReplica], tmp_path
) -> None:
    missing = str(tmp_path / "missing.pem")
    cmd = router_cmd(free_port(), replicas, "--workers", "2", "--ssl-certfile", missing,
                     "--ssl-keyfile", missing)  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"fleet router: worker \d exited with status 1 before it was listening on "
                        r"127\.0\.0\.1:\d+ \(its output is above\); stopping", last), last  # fmt: skip


def test_a_cap_on_the_router_is_divided_among_its_workers() -> None:
    assert [share(5, i, 2) for i in range(2)] == [3, 2]
    assert [share(1, i, 2) for i in range(2)] == [1, 1]  # a cap never becomes "no cap"
    assert [share(0, i, 3) for i in range(3)] == [0, 0, 0]


def test_placements_table_round_trip(tmp_path) -> None:
    table = SharedPlacements(tmp_path)
    other = SharedPlacements(tmp_path)  # another worker's mapping of the same file
    assert table.get(12345) is None
    table.put(12345, 777)
    assert other.get(12345) == 777
    other.put(12345, 888)
    assert table.get(12345) == 888


def test_merged_metrics_add_counters_and_gauges() -> None:
    one = RouterMetrics(lambda: [("a", 2, True)], lambda: 1)
    two = RouterMetrics(lambda: [("a", 3, False), ("b", 1, False)], lambda: 4)
    for metrics, status in ((one, "200"), (two, "200"), (two, "500")):
        metrics.request_done("chat", MODEL, "a", status, 0.01)
        metrics.first_byte("chat", MODEL, 0.002)
    merged = RouterMetrics.merged([one.state(), two.state()])
    snapshot = merged.snapshot()
    assert snapshot["requests_by_status"] == {"200": 2, "500": 1}
    assert snapshot["queue"]["depth"] == 5
    assert sum(merged.ttft[("chat", MODEL)].counts) == 3
    text = merged.exposition().decode()
    assert 'fleet_router_replica_in_flight{replica="a"} 5.0' in text
    assert 'fleet_router_replica_routable{replica="b"} 0.0' in text
