"""The fault scenarios, shared by tests/faults (short versions, `CI`) and
loadtests/fault_table.py (long versions, `LONG`, printed as a table).

Each scenario runs steady load from several fleet API keys (limits set, half the requests
streamed), injects its fault into real processes, undoes it, and returns a `Row`: requests sent,
failed (before / after the first byte, and why), what was left held (router slots, replica
requests, KV blocks, key concurrency slots) and the recovery time (fault undone -> fleet whole).

Three fleets serve them: `FakeFleet` (fake replicas behind one router: routing faults),
`RealFleet` (real tiny-model replicas joining through Redis, two routers: Redis, router and
engine faults) and `CliFleet` (`fleet up --detach`: rolling restart and scale down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fault_harness import (
    FleetKey,
    Leaks,
    Load,
    LoadSpec,
    Outcome,
    Proc,
    RedisProc,
    create_keys,
    fake_replica,
    key_usage,
    leaks,
    real_replica,
    routable,
    router,
    tally,
    wait_until,
)

from fleet.control.membership import list_replicas_sync

# Limits on every key: high enough to refuse nothing, set so every admission goes through
# Redis (rpm/tpm windows, a concurrency slot per request) and can leak.
KEY_LIMITS = {"rpm": 1_000_000, "tpm": 100_000_000, "max_concurrent": 16}


@dataclass(frozen=True)
class Scale:
    """How long each fault lasts; `CI` keeps the suite within minutes, `LONG` is the issue's."""

    name: str
    load_s: float  # load before the fault, during it, and after recovery
    stop_s: float  # a replica SIGSTOPped this long
    redis_down_s: float
    crash_loop_s: float
    disconnect_requests: int
    per_key: int = 2
    keys: int = 3


CI = Scale("ci", load_s=3.0, stop_s=3.0, redis_down_s=3.0, crash_loop_s=4.0,
           disconnect_requests=60)  # fmt: skip
LONG = Scale("long", load_s=5.0, stop_s=20.0, redis_down_s=30.0, crash_loop_s=20.0,
             disconnect_requests=1000, per_key=3)  # fmt: skip


@dataclass
class Row:
    scenario: str
    sent: int
    ok: int
    cut: int  # streams the client itself cut (disconnect scenario)
    failed_unstarted: int
    failed_started: int
    failures: str
    leaks: Leaks
    recovery_s: float
    note: str = ""
    problems: list[str] = field(default_factory=list)  # checks of the scenario's own that failed

    @property
    def clean(self) -> bool:
        """The target: no request failed before its first byte, nothing left held."""
        return self.failed_unstarted == 0 and self.leaks.total == 0 and not self.problems

    def cells(self) -> list[str]:
        return [
            self.scenario,
            str(self.sent),
            self.failures,
            str(self.leaks),
            f"{self.recovery_s:.1f} s",
            "; ".join([*self.problems, self.note]).strip("; "),
        ]


HEADER = [
    "scenario",
    "requests",
    "failed: before+after 1st byte (why)",
    "leaked: router slots / replica reqs / KV blocks / key slots",
    "recovery",
    "notes",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def row(
    name: str,
    outcomes: list[Outcome],
    found: Leaks,
    recovery: float,
    note: str = "",
    problems: list[str] | None = None,
) -> Row:
    t = tally(outcomes)
    if found.total == 0 and found.cleared_s > 2:
        note = f"{note}; held items let go after {found.cleared_s:.0f} s".strip("; ")
    return Row(
        name, t.sent, t.ok, t.cut, t.failed_unstarted, t.failed_started, t.failures, found,
        recovery, note, problems or [],
    )  # fmt: skip


async def timed(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until `predicate` (blocking, polled in a thread) holds."""
    began = time.monotonic()
    await asyncio.to_thread(wait_until, predicate, timeout, what)
    return time.monotonic() - began


# ----------------------------------------------------------------------------- fleets


@dataclass
class FakeFleet:
    """Three fake replicas (`--replica` URLs) behind one router that checks fleet keys."""

    redis: RedisProc
    replicas: list[Proc]
    router: Proc

    @property
    def servers(self) -> list[tuple[str, bool]]:
        return [(r.url, True) for r in self.replicas if r.alive]

    def whole(self) -> bool:
        return routable(self.router.url) == len(self.replicas)


FAKE_ARGS = ("--delay", "0.05", "--chunks", "8", "--chunk-delay", "0.02")


@contextlib.contextmanager
def fake_fleet(work: Path) -> Iterator[FakeFleet]:
    redis = RedisProc(work / "redis-fake").start()
    replicas = [fake_replica(f"fake-{i}", work, *FAKE_ARGS) for i in range(3)]
    try:
        for replica in replicas:
            replica.start()
        specs = [f"--replica={r.name}={r.url}" for r in replicas]
        front = router("router-fake", redis.url, work, "--policy", "least-load", *specs)
        front.start()
        try:
            yield FakeFleet(redis, replicas, front)
        finally:
            front.kill()
    finally:
        for replica in replicas:
            replica.kill()
        redis.stop()


@dataclass
class RealFleet:
    """Two real tiny-model replicas joining through Redis, two routers reading membership."""

    redis: RedisProc
    replicas: list[Proc]
    routers: list[Proc]

    @property
    def servers(self) -> list[tuple[str, bool]]:
        return [(r.url, False) for r in self.replicas if r.alive]

    @property
    def router_urls(self) -> list[str]:
        return [r.url for r in self.routers if r.alive]

    def whole(self) -> bool:
        members = list_replicas_sync(self.redis.url)
        return len(members) == len(self.replicas) and all(
            routable(url) == len(self.replicas) for url in self.router_urls
        )


@contextlib.contextmanager
def real_fleet(work: Path, model: Path) -> Iterator[RealFleet]:
    redis = RedisProc(work / "redis-real").start()
    replicas = [real_replica(f"real-{i}", model, redis.url, work) for i in range(2)]
    routers = [router(f"router-{i}", redis.url, work, "--policy", "prefix") for i in range(2)]
    try:
        for replica in replicas:
            replica.start(wait=0)
        for replica in replicas:
            replica.wait_healthy(240)
        for front in routers:
            front.start()
        fleet = RealFleet(redis, replicas, routers)
        wait_until(fleet.whole, 60, "both routers to see both replicas")
        yield fleet
    finally:
        for proc in [*routers, *replicas]:
            proc.kill()
        redis.stop()


@dataclass
class CliFleet:
    """`fleet up --detach` (two replicas of the factory's tiny model, embedded Redis)."""

    run_dir: Path
    env: dict[str, str]
    state: dict = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fleet", *args, "--run-dir", str(self.run_dir)],
            capture_output=True, text=True, env=self.env, timeout=timeout,
        )  # fmt: skip

    def refresh(self) -> dict:
        self.state = json.loads((self.run_dir / "state.json").read_text())
        return self.state

    def status(self) -> dict:
        done = self.cli("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    @property
    def servers(self) -> list[tuple[str, bool]]:
        return [(r["url"], False) for r in self.status()["replicas"]]

    @property
    def model(self) -> str:
        return self.status()["replicas"][0]["model"]


@contextlib.contextmanager
def cli_fleet(work: Path, cache: Path) -> Iterator[CliFleet]:
    from fleet.embedded_redis import free_port

    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "200", "FLEET_HOME": ""}
    fleet = CliFleet(work / "fleet-run", env)
    up = fleet.cli("up", "--detach", "--port", str(free_port()))
    assert up.returncode == 0, up.stdout + up.stderr
    fleet.refresh()
    try:
        yield fleet
    finally:
        if (fleet.run_dir / "state.json").exists():
            fleet.cli("down")


# ----------------------------------------------------------------------------- helpers


async def under_load(
    urls: list[str],
    keys: list[FleetKey],
    scale: Scale,
    fault: Callable[[], Awaitable[float]],
    **spec: object,
) -> tuple[list[Outcome], float]:
    """Load for `load_s`, then the fault (which returns its recovery time), `load_s` more."""
    load = Load(urls, LoadSpec(keys, per_key=scale.per_key, **spec))  # type: ignore[arg-type]
    load.start()
    try:
        await asyncio.sleep(scale.load_s)
        recovery = await fault()
        await asyncio.sleep(scale.load_s)
    finally:
        outcomes = await load.stop()
    return outcomes, recovery


async def fresh_keys(redis_url: str, scale: Scale) -> list[FleetKey]:
    keys = await create_keys(redis_url, scale.keys, **KEY_LIMITS)
    await asyncio.sleep(0.2)  # routers learn of new keys on first use anyway; keep it steady
    return keys


# ----------------------------------------------------------------------------- fake fleet


async def replica_sigkill(fleet: FakeFleet, scale: Scale) -> Row:
    """A replica SIGKILLed under load, started again after `load_s`."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.replicas[0]

    async def fault() -> float:
        victim.kill()
        await asyncio.sleep(scale.load_s)
        victim.start()
        return await timed(fleet.whole, 30, "the router to route to the restarted replica")

    outcomes, recovery = await under_load([fleet.router.url], keys, scale, fault)
    found = await leaks([fleet.router.url], fleet.servers, fleet.redis.url, keys)
    return row("replica SIGKILLed, restarted", outcomes, found, recovery)


async def replica_sigstop(fleet: FakeFleet, scale: Scale) -> Row:
    """A replica frozen (SIGSTOP) for `stop_s`, then thawed: its requests finish late."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.replicas[0]

    async def fault() -> float:
        victim.signal(signal.SIGSTOP)
        await asyncio.sleep(scale.stop_s)
        victim.signal(signal.SIGCONT)
        return await timed(fleet.whole, 30, "the thawed replica to be routable")

    outcomes, recovery = await under_load([fleet.router.url], keys, scale, fault)
    found = await leaks([fleet.router.url], fleet.servers, fleet.redis.url, keys)
    slowest = max((o.ended - o.began for o in outcomes), default=0.0)
    return row(f"replica SIGSTOPped {scale.stop_s:g} s", outcomes, found, recovery,
               f"slowest request {slowest:.1f} s")  # fmt: skip


async def replica_500s(fleet: FakeFleet, scale: Scale) -> Row:
    """A replica answering every generation request with a 500 for a while."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.replicas[0]

    async def fault() -> float:
        await asyncio.to_thread(_configure, victim, status=500)
        await asyncio.sleep(scale.load_s * 2)
        await asyncio.to_thread(_configure, victim, status=0)
        return await timed(fleet.whole, 60, "the healed replica to be routable")

    outcomes, recovery = await under_load([fleet.router.url], keys, scale, fault)
    found = await leaks([fleet.router.url], fleet.servers, fleet.redis.url, keys)
    return row("replica answering 500", outcomes, found, recovery)


async def replica_slow_first_token(fleet: FakeFleet, scale: Scale) -> Row:
    """One replica's first token takes 10x the others' (0.5 s against 0.05 s)."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.replicas[0]

    async def fault() -> float:
        await asyncio.to_thread(_configure, victim, delay=0.5)
        await asyncio.sleep(scale.load_s * 2)
        await asyncio.to_thread(_configure, victim, delay=0.05)
        return 0.0

    outcomes, recovery = await under_load([fleet.router.url], keys, scale, fault)
    found = await leaks([fleet.router.url], fleet.servers, fleet.redis.url, keys)
    waits = sorted(o.ended - o.began for o in outcomes if o.ok)
    p99 = waits[int(len(waits) * 0.99) - 1] if waits else 0.0
    return row("replica with 10x first-token time", outcomes, found, recovery,
               f"p99 latency {p99:.2f} s")  # fmt: skip


async def replica_crash_loop(fleet: FakeFleet, scale: Scale) -> Row:
    """A replica that dies about a second after every start, for `crash_loop_s`."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.replicas[0]
    crashes = 0

    async def fault() -> float:
        nonlocal crashes
        until = time.monotonic() + scale.crash_loop_s
        while time.monotonic() < until:
            await asyncio.sleep(0.8)
            victim.kill()
            crashes += 1
            await asyncio.sleep(0.2)
            await asyncio.to_thread(victim.start)
        return await timed(fleet.whole, 60, "the replica to be routable after its crash loop")

    outcomes, recovery = await under_load([fleet.router.url], keys, scale, fault)
    found = await leaks([fleet.router.url], fleet.servers, fleet.redis.url, keys)
    return row("replica in a crash loop", outcomes, found, recovery, f"{crashes} crashes")


def _configure(proc: Proc, **changes: object) -> None:
    httpx.post(proc.url + "/fake/config", json=changes, timeout=5).raise_for_status()


FAKE_SCENARIOS = [
    replica_sigkill,
    replica_sigstop,
    replica_500s,
    replica_slow_first_token,
    replica_crash_loop,
]


# ----------------------------------------------------------------------------- real fleet


async def router_killed(fleet: RealFleet, scale: Scale) -> Row:
    """One of two routers SIGKILLed and restarted: the other serves (clients whose connection
    is refused go to it, as behind a load balancer); the restarted one rebuilds its view."""
    keys = await fresh_keys(fleet.redis.url, scale)
    victim = fleet.routers[0]
    killed_at = 0.0

    async def fault() -> float:
        nonlocal killed_at
        killed_at = time.monotonic()
        victim.kill()
        await asyncio.sleep(scale.load_s)
        await asyncio.to_thread(victim.start)
        return await timed(fleet.whole, 30, "the restarted router to see every replica")

    urls = [r.url for r in fleet.routers]
    outcomes, recovery = await under_load(urls, keys, scale, fault)
    lost = [o for o in outcomes if o.router == victim.url and o.began < killed_at <= o.ended]
    kept = [o for o in outcomes if o not in lost]
    found = await leaks(fleet.router_urls, fleet.servers, fleet.redis.url, keys, settle=70)
    note = f"{sum(not o.ok for o in lost)} in flight in the killed router lost (not counted)"
    return row("one of two routers SIGKILLed", kept, found, recovery, note)


async def _redis_outage(fleet: RealFleet, scale: Scale, keep_data: bool) -> Row:
    keys = await fresh_keys(fleet.redis.url, scale)
    problems: list[str] = []

    async def fault() -> float:
        fleet.redis.kill(keep_data=keep_data)
        await asyncio.sleep(scale.redis_down_s)
        fleet.redis.start()
        recovery = await timed(fleet.whole, 60, "membership rebuilt and seen by both routers")
        before = await key_usage(fleet.redis.url, keys)

        async def counted() -> bool:
            now = await key_usage(fleet.redis.url, keys)
            return all(now[k.id].window_requests > before[k.id].window_requests for k in keys)

        began = time.monotonic()
        while not await counted():
            if time.monotonic() - began > 30:
                problems.append("limits not counted in Redis again")
                break
            await asyncio.sleep(0.1)
        return recovery + (time.monotonic() - began)

    urls = fleet.router_urls
    outcomes, recovery = await under_load(urls, keys, scale, fault)
    # A slot taken before the snapshot and freed after it comes back with the data; like the
    # slots of a crashed router, it expires by its deadline (the keys' slot TTL, 60 s).
    found = await leaks(urls, fleet.servers, fleet.redis.url, keys, settle=70)
    name = "Redis killed, restarted " + ("with its data" if keep_data else "empty (data lost)")
    note = "" if problems else "membership rebuilt, limits counted in Redis again"
    return row(f"{name}, down {scale.redis_down_s:g} s", outcomes, found, recovery, note,
               problems)  # fmt: skip


async def redis_restarted(fleet: RealFleet, scale: Scale) -> Row:
    return await _redis_outage(fleet, scale, keep_data=True)


async def redis_data_lost(fleet: RealFleet, scale: Scale) -> Row:
    return await _redis_outage(fleet, scale, keep_data=False)


async def disconnects(fleet: RealFleet, scale: Scale) -> Row:
    """Streaming requests only, a random third cut by their client mid-stream: nothing stays
    held anywhere, and each key is charged at least what its clients received."""
    keys = await fresh_keys(fleet.redis.url, scale)
    max_tokens = 16
    spec = LoadSpec(keys, per_key=4, max_tokens=max_tokens, streamed=1.0, disconnect=1 / 3,
                    requests=scale.disconnect_requests)  # fmt: skip
    load = Load(fleet.router_urls, spec, seed=7)
    load.start()
    outcomes = await load.finished()
    found = await leaks(fleet.router_urls, fleet.servers, fleet.redis.url, keys)
    await asyncio.sleep(1.5)  # usage of unlimited-path counters is flushed every second
    usage = await key_usage(fleet.redis.url, keys)
    charged = sum(u.completion_tokens for u in usage.values())
    seen = sum(o.tokens for o in outcomes)
    ceiling = sum(max_tokens + 1 for o in outcomes if o.started)
    note = (f"{sum(o.cut for o in outcomes)} cut by their client; charged {charged} tokens, "
            f"clients received {seen}")  # fmt: skip
    problems = [] if seen <= charged <= ceiling else [f"usage outside [{seen}, {ceiling}]"]
    name = f"{len(outcomes)} streams, a third cut mid-stream"
    return row(name, outcomes, found, 0.0, note, problems)


REAL_SCENARIOS = [disconnects, router_killed, redis_restarted, redis_data_lost]


# ----------------------------------------------------------------------------- fleet CLI


async def rolling_restart(fleet: CliFleet, scale: Scale) -> Row:
    """`fleet restart` (every replica, one at a time) under load."""
    state = fleet.refresh()
    keys = await create_keys(state["redis_url"], scale.keys, **KEY_LIMITS)
    done: list[subprocess.CompletedProcess] = []

    async def fault() -> float:
        began = time.monotonic()
        done.append(await asyncio.to_thread(fleet.cli, "restart"))
        return time.monotonic() - began

    outcomes, took = await under_load([state["router_url"]], keys, scale, fault, model=fleet.model)
    servers = await asyncio.to_thread(lambda: fleet.servers)
    found = await leaks([state["router_url"]], servers, state["redis_url"], keys,
                        admin_key=state["admin_key"])  # fmt: skip
    problems = [] if done and done[0].returncode == 0 else [f"restart failed: {_said(done)}"]
    return row("rolling restart (fleet restart)", outcomes, found, took,
               "recovery: the whole restart", problems)  # fmt: skip


async def scale_down(fleet: CliFleet, scale: Scale) -> Row:
    """`fleet scale MODEL 1` from two replicas under load."""
    state = fleet.refresh()
    keys = await create_keys(state["redis_url"], scale.keys, **KEY_LIMITS)
    model = fleet.model
    done: list[subprocess.CompletedProcess] = []

    async def fault() -> float:
        began = time.monotonic()
        done.append(await asyncio.to_thread(fleet.cli, "scale", model, "1"))
        return time.monotonic() - began

    outcomes, took = await under_load([state["router_url"]], keys, scale, fault, model=model)
    servers = await asyncio.to_thread(lambda: fleet.servers)
    found = await leaks([state["router_url"]], servers, state["redis_url"], keys,
                        admin_key=state["admin_key"])  # fmt: skip
    ok = done and done[0].returncode == 0 and len(servers) == 1
    problems = [] if ok else [f"scale failed: {_said(done)}"]
    return row("fleet scale 2 -> 1", outcomes, found, took, "recovery: the scale command",
               problems)  # fmt: skip


def _said(done: list[subprocess.CompletedProcess]) -> str:
    return (done[0].stdout + done[0].stderr)[-300:] if done else "did not run"


CLI_SCENARIOS = [rolling_restart, scale_down]
