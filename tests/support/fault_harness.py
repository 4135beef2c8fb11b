"""Real processes for fault injection: Redis, replicas (real tiny-model engines or fake ones),
routers, a load generator that records every request's fate, and the leak checks.

Everything here is a separate OS process on loopback (signals reach it like they would in
production); only the load generator and the checks run in the caller's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from fleet.control.internal import INTERNAL_SECRET_ENV
from fleet.control.keys import KeyAdmin
from fleet.control.redis_conn import async_client
from fleet.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "support" / "fake_replica.py"
ADMIN_KEY = "sk-admin-faults"
INTERNAL_SECRET = "fleet-internal-secret-for-fault-tests"
INTERNAL_KEY = "sk-internal-faults"
MODEL = "faulty"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            value = predicate()
            if value:
                return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_ok(url: str, headers: dict | None = None) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, headers=headers, timeout=1.0).status_code == 200
    return False


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A server process we can kill, freeze, thaw and start again with the same command."""

    name: str
    cmd: list[str]
    port: int
    health: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 120.0) -> Proc:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        if self.log:
            out.close()
        if wait:
            self.wait_healthy(wait)
        return self

    def wait_healthy(self, timeout: float = 120.0) -> None:
        def up() -> bool:
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log}")
            return http_ok(self.url + self.health)

        wait_until(up, timeout, f"{self.name} to serve")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)
                self.popen.kill()
            self.popen.wait()

    def terminate(self, timeout: float = 60.0) -> None:
        if self.alive:
            self.popen.terminate()  # type: ignore[union-attr]
            try:
                self.popen.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill()


def fake_replica(name: str, log_dir: Path, *args: str) -> Proc:
    port = free_port()
    cmd = [sys.executable, str(FAKE), "--port", str(port), "--id", name, "--model", MODEL, *args]
    return Proc(name, cmd, port, log=log_dir / f"{name}.log")


def real_replica(name: str, model: Path, redis_url: str, log_dir: Path) -> Proc:
    """`python -m replica` on a tiny model, joining the fleet through Redis."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "replica", "--model", str(model), "--served-model-name", MODEL,
        "--port", str(port), "--redis-url", redis_url, "--replica-id", name,
        "--kv-cache-tokens", "4096", "--max-num-seqs", "32", "--dtype", "float32",
        "--drain-grace", "20", "--log-level", "warning", "--api-key", INTERNAL_KEY,
    ]  # fmt: skip
    env = {INTERNAL_SECRET_ENV: INTERNAL_SECRET}
    return Proc(name, cmd, port, env=env, log=log_dir / f"{name}.log")


def router(name: str, redis_url: str, log_dir: Path, *args: str) -> Proc:
    """`python -m router` with fleet keys in Redis and fast probes."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "router", "--port", str(port), "--redis-url", redis_url,
        "--admin-key", ADMIN_KEY, "--probe-interval", "0.3", "--load-interval", "0.3",
        "--ttfb-timeout", "60", "--idle-timeout", "30", "--log-level", "warning", *args,
    ]  # fmt: skip
    env = {INTERNAL_SECRET_ENV: INTERNAL_SECRET}
    return Proc(name, cmd, port, env=env, log=log_dir / f"{name}.log")


@dataclass
class RedisProc:
    """A redis-server on a fixed port that can be killed and started again, with or without
    its data (a snapshot is written just before a kill that keeps it)."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    server: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        self.server = EmbeddedRedis(port=self.port, data_dir=self.data_dir).start()
        return self

    def kill(self, keep_data: bool) -> None:
        """SIGKILL; with `keep_data` a snapshot is saved first (what persistence would keep)."""
        assert self.server is not None and self.server.process is not None
        if keep_data:
            import redis

            redis.Redis.from_url(self.url).save()
        else:
            (self.data_dir / "dump.rdb").unlink(missing_ok=True)
        self.server.process.kill()
        self.server.process.wait()
        if not keep_data:
            (self.data_dir / "dump.rdb").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# ----------------------------------------------------------------------------- keys


@dataclass
class FleetKey:
    id: str
    secret: str
    name: str


async def create_keys(redis_url: str, count: int, **limits: int) -> list[FleetKey]:
    client = async_client(redis_url)
    try:
        admin = KeyAdmin(client)
        made = [await admin.create(f"tenant-{i}", **limits) for i in range(count)]
    finally:
        await client.aclose()
    return [FleetKey(record.id, secret, record.name) for record, secret in made]


@dataclass
class KeyCheck:
    concurrent: int
    completion_tokens: int
    window_requests: int


async def key_usage(redis_url: str, keys: list[FleetKey]) -> dict[str, KeyCheck]:
    """Each key's live concurrency slots and counters, read from its limit keys in Redis (they
    exist whether or not the key's record does, e.g. after Redis lost its data)."""
    client = async_client(redis_url)
    layout = KeyAdmin(client).layout
    out: dict[str, KeyCheck] = {}
    try:
        sec, usec = await client.time()
        for key in keys:
            names = layout.limits(key.id)
            rpm, slots, usage = names.rpm, names.slots, names.usage
            pipe = client.pipeline(transaction=False)
            pipe.zcount(slots, sec * 1000 + usec // 1000, "+inf")
            pipe.hget(usage, "completion_tokens")
            pipe.hgetall(rpm)
            concurrent, completion, buckets = await pipe.execute()
            window = sum(int(v) for s, v in buckets.items() if int(s) > sec - 60)
            out[key.id] = KeyCheck(int(concurrent), int(completion or 0), window)
    finally:
        await client.aclose()
    return out


# ----------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """One request's fate as its client saw it."""

    key: str
    stream: bool
    status: int = 0
    started: bool = False  # a byte of the answer (head of a 200 stream) reached the client
    ok: bool = False
    reason: str = ""
    tokens: int = 0  # content chunks (stream) or usage.completion_tokens (whole answer)
    cut: bool = False  # the client disconnected on purpose mid-stream
    router: str = ""  # the router that had the request last
    began: float = 0.0
    ended: float = 0.0


@dataclass
class LoadSpec:
    """Steady load: `per_key` clients per key, back to back; half the requests streamed."""

    keys: list[FleetKey]
    per_key: int = 2
    max_tokens: int = 8
    streamed: float = 0.5  # fraction of requests streamed
    disconnect: float = 0.0  # fraction of streams the client cuts after its first chunks
    requests: int | None = None  # stop after this many in all (else at stop())
    model: str = MODEL
    timeout_s: float = 90.0


class Load:
    """Clients of several API keys against one or more routers; `urls` may change under load
    (a client that cannot connect to a router tries the next one, as a load balancer would)."""

    def __init__(self, urls: list[str], spec: LoadSpec, seed: int = 0) -> None:
        self.urls = urls
        self.spec = spec
        self.outcomes: list[Outcome] = []
        self.rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._issued = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        for key in self.spec.keys:
            for n in range(self.spec.per_key):
                self._tasks.append(asyncio.create_task(self._client(key, n)))

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    async def finished(self) -> list[Outcome]:
        await asyncio.gather(*self._tasks)
        return self.outcomes

    async def _client(self, key: FleetKey, n: int) -> None:
        headers = {"Authorization": f"Bearer {key.secret}"}
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        async with httpx.AsyncClient(timeout=self.spec.timeout_s, limits=limits) as client:
            while not self._stop.is_set():
                if self.spec.requests is not None and self._issued >= self.spec.requests:
                    return
                i = self._issued
                self._issued += 1
                stream = self.rng.random() < self.spec.streamed
                outcome = Outcome(key.id, stream=stream, began=time.monotonic())
                cut_after = 0
                if outcome.stream and self.rng.random() < self.spec.disconnect:
                    cut_after = self.rng.randint(1, max(1, self.spec.max_tokens - 2))
                body = {
                    "model": self.spec.model,
                    "messages": [{"role": "user", "content": f"Tell {key.name} story {i}."}],
                    "max_tokens": self.spec.max_tokens,
                    "stream": outcome.stream,
                }
                await self._send(client, headers, body, outcome, cut_after, i)
                outcome.ended = time.monotonic()
                self.outcomes.append(outcome)

    async def _send(
        self,
        client: httpx.AsyncClient,
        headers: dict,
        body: dict,
        out: Outcome,
        cut_after: int,
        i: int,
    ) -> None:
        """One request; on a refused connection (nothing sent) the next router gets it."""
        for attempt in range(len(self.urls)):
            url = out.router = self.urls[(i + attempt) % len(self.urls)]
            try:
                if out.stream:
                    await self._stream(client, url, headers, body, out, cut_after)
                else:
                    await self._whole(client, url, headers, body, out)
                return
            except httpx.ConnectError as exc:
                out.reason = f"connect: {exc.__class__.__name__}"
            except httpx.HTTPError as exc:
                out.reason = f"{exc.__class__.__name__}{' after first byte' if out.started else ''}"
                return

    async def _whole(
        self, client: httpx.AsyncClient, url: str, headers: dict, body: dict, out: Outcome
    ) -> None:
        response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        out.status = response.status_code
        if response.status_code != 200:
            out.reason = f"{response.status_code} {_error_code(response.content)}"
            return
        out.started = out.ok = True
        out.tokens = response.json()["usage"]["completion_tokens"]

    async def _stream(
        self,
        client: httpx.AsyncClient,
        url: str,
        headers: dict,
        body: dict,
        out: Outcome,
        cut_after: int,
    ) -> None:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.reason = f"{response.status_code} {_error_code(await response.aread())}"
                return
            out.started = True
            pending = b""
            async for data in response.aiter_bytes():
                # Frames end at a blank line; generated text may hold U+2028 and the like,
                # which line splitters such as httpx's aiter_lines() wrongly break on.
                *frames, pending = (pending + data).split(b"\n\n")
                for frame in frames:
                    if self._frame(frame, out, cut_after):
                        return  # [DONE], an error event, or the client cuts the stream here
            out.reason = "torn SSE frame" if pending.strip() else "stream ended without [DONE]"

    @staticmethod
    def _frame(frame: bytes, out: Outcome, cut_after: int) -> bool:
        """Account one SSE frame; True when the stream is over for this client."""
        if not frame.startswith(b"data: "):
            return False
        data = frame[len(b"data: ") :]
        if data == b"[DONE]":
            out.ok = True
            return True
        chunk = orjson.loads(data)
        if "error" in chunk:
            out.reason = f"error event: {chunk['error'].get('code')}"
            return True
        for choice in chunk.get("choices", ()):
            if choice.get("delta", {}).get("content"):
                out.tokens += 1
        out.cut = bool(cut_after) and out.tokens >= cut_after
        return out.cut  # leaving the `stream` block closes the connection mid-stream


def _error_code(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = orjson.loads(body)["error"]
        return str(error.get("code") or error.get("type"))
    return body[:60].decode(errors="replace")


@dataclass
class Tally:
    sent: int
    ok: int
    cut: int
    failed_unstarted: int
    failed_started: int
    reasons: Counter

    @property
    def failures(self) -> str:
        if not self.reasons:
            return "0"
        parts = ", ".join(f"{n}x {why}" for why, n in self.reasons.most_common(3))
        return f"{self.failed_unstarted}+{self.failed_started} ({parts})"


def tally(outcomes: list[Outcome]) -> Tally:
    failed = [o for o in outcomes if not o.ok and not o.cut]
    return Tally(
        sent=len(outcomes),
        ok=sum(o.ok for o in outcomes),
        cut=sum(o.cut for o in outcomes),
        failed_unstarted=sum(not o.started for o in failed),
        failed_started=sum(o.started for o in failed),
        reasons=Counter(o.reason for o in failed),
    )


# ----------------------------------------------------------------------------- leaks


def admin_stats(url: str, admin_key: str = ADMIN_KEY) -> dict:
    headers = {"Authorization": f"Bearer {admin_key}"}
    return httpx.get(f"{url}/admin/stats", headers=headers, timeout=5).json()


def routable(url: str, admin_key: str = ADMIN_KEY) -> int:
    return int(admin_stats(url, admin_key)["routable"])


def replica_busy(url: str, fake: bool) -> tuple[int, int]:
    """What a replica still holds: (running + waiting requests, KV blocks not free). A real
    replica's free list includes the prefix cache's unreferenced blocks; a fake has no KV."""
    if fake:
        return httpx.get(url + "/fake/stats", timeout=5).json()["active"], 0
    headers = {"Authorization": f"Bearer {INTERNAL_KEY}"}
    load = httpx.get(url + "/load", headers=headers, timeout=5).json()
    return load["running"] + load["waiting"], load["num_blocks"] - load["free_blocks"]


@dataclass
class Leaks:
    router_slots: int = 0
    replica_requests: int = 0
    kv_blocks: int = 0
    key_slots: int = 0
    cleared_s: float = 0.0  # how long after the load ended the last held item was let go

    @property
    def total(self) -> int:
        return self.router_slots + self.replica_requests + self.kv_blocks + self.key_slots

    def __str__(self) -> str:
        return f"{self.router_slots}/{self.replica_requests}/{self.kv_blocks}/{self.key_slots}"


async def leaks(
    router_urls: list[str],
    replicas: list[tuple[str, bool]],
    redis_url: str,
    keys: list[FleetKey],
    settle: float = 10.0,
    admin_key: str = ADMIN_KEY,
) -> Leaks:
    """What is still held once the fleet had up to `settle` s to let go: router in-flight
    counts, replica requests and KV blocks (`replicas`: (url, is_fake) of live ones), key
    concurrency slots in Redis."""
    began = time.monotonic()
    while True:
        found = await asyncio.to_thread(_held_by_servers, router_urls, replicas, admin_key)
        usage = await key_usage(redis_url, keys)
        found.key_slots = sum(u.concurrent for u in usage.values())
        found.cleared_s = time.monotonic() - began
        if found.total == 0 or found.cleared_s > settle:
            return found
        await asyncio.sleep(0.2)


def _held_by_servers(
    router_urls: list[str], replicas: list[tuple[str, bool]], admin_key: str
) -> Leaks:
    found = Leaks()
    for url in router_urls:
        found.router_slots += int(admin_stats(url, admin_key)["in_flight"])
    for url, fake in replicas:
        running, blocks = replica_busy(url, fake)
        found.replica_requests += running
        found.kv_blocks += blocks
    return found


@contextlib.contextmanager
def processes(*procs: Proc) -> Iterator[None]:
    """Kill every process on the way out, whatever state a scenario left it in."""
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
