"""Keep one server process alive: restart it with backoff when it crashes, give up on a crash loop.

A crash is any exit we did not ask for, or a server that never becomes healthy. Restarts back off
exponentially (tenacity); a run that stayed up for `stable_after_s` forgives earlier crashes, and
`max_restarts` quick crashes in a row end supervision with a report carrying the log's last lines,
because retrying a broken model path or an out-of-memory start forever only hides the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from fleet.launch.process import ChildProcess, ProcessSpec

log = logging.getLogger("fleet.supervisor")

State = Literal["starting", "ready", "backoff", "stopping", "stopped", "failed"]


@dataclass
class RestartPolicy:
    max_restarts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0
    ready_timeout_s: float = 600.0
    drain_timeout_s: float = 60.0


@dataclass
class CrashReport:
    """Why supervision gave up: the last exit and what the server printed before it."""

    name: str
    exit_code: int | None
    crashes: int
    reason: str
    log_tail: str

    def render(self) -> str:
        return (
            f"{self.name} crashed {self.crashes} times in a row ({self.reason}); "
            f"not restarting it again. Last lines of its log:\n{self.log_tail.rstrip()}"
        )


@dataclass
class SupervisorEvent:
    name: str
    kind: Literal["started", "ready", "crashed", "gave_up", "stopped"]
    detail: str = ""
    at: float = field(default_factory=time.time)


class ChildCrashed(Exception):
    def __init__(self, exit_code: int | None, reason: str, log_tail: str) -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason
        self.log_tail = log_tail


class Supervisor:
    """Runs `spec` until `stop()`; `restart()` is a planned drain-and-start that counts no crash."""

    def __init__(
        self,
        name: str,
        spec: ProcessSpec,
        policy: RestartPolicy | None = None,
        health_url: str | None = None,
        on_event: Callable[[SupervisorEvent], None] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.policy = policy or RestartPolicy()
        self.health_url = health_url
        self.on_event = on_event or (lambda event: None)
        self.state: State = "stopped"
        self.child: ChildProcess | None = None
        self.restarts = 0
        self.crash_report: CrashReport | None = None
        self._quick_crashes = 0
        self._stopping = False
        self._planned = False
        self._task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and self.child.returncode is None else None

    def start(self) -> asyncio.Task:
        """Begin supervising (again, after a give-up); returns the task that runs until stopped."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._quick_crashes = 0
            self.crash_report = None
            self.state = "starting"
            self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")
        return self._task

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once healthy; False if supervision gave up or stopped first (or on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state != "ready":
            if self.state in ("failed", "stopped") or (deadline and time.monotonic() > deadline):
                return False
            await asyncio.sleep(0.05)
        return True

    def _grace(self) -> float:
        """A ready server gets the drain timeout; one still loading has nothing in flight to finish."""
        return (
            self.policy.drain_timeout_s
            if self.state == "ready"
            else min(5.0, self.policy.drain_timeout_s)
        )

    async def stop(self) -> None:
        """Drain and stop the server (SIGTERM, then SIGKILL after the drain timeout)."""
        self._stopping = True
        waiting_to_restart = self.state == "backoff"
        grace = self._grace()
        if self.state not in ("failed", "stopped"):
            self.state = "stopping"
        if self.child is not None:
            await self.child.stop(grace)
        if self._task is not None:
            if waiting_to_restart:
                self._task.cancel()  # nothing runs while it waits to restart: skip the wait
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "failed" if self.crash_report else "stopped"

    async def restart(self, timeout: float | None = None) -> bool:
        """Planned restart: drain the running server, start a fresh one, return once it is ready."""
        if self._task is None or self._task.done():
            self.start()
        elif self.child is not None:
            self._planned = True
            grace = self._grace()
            self.state = "stopping"
            await self.child.stop(grace)
            while self._planned and not self._task.done():
                await asyncio.sleep(0.02)
        return await self.wait_ready(timeout or self.policy.ready_timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        return self.child.log_tail(lines) if self.child else ""

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "uptime_s": round(self.child.uptime(), 1) if self.pid and self.child else 0.0,
            "log": str(self.spec.log_path),
            "crash_report": self.crash_report.render() if self.crash_report else None,
        }

    async def _supervise(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ChildCrashed),
            wait=self._backoff,
            stop=self._give_up,
            before_sleep=self._before_restart,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    while not self._stopping:
                        await self._run_once()
        except ChildCrashed as crash:
            self.crash_report = CrashReport(
                self.name, crash.exit_code, self._quick_crashes, crash.reason, crash.log_tail
            )
            self.state = "failed"
            log.error("%s", self.crash_report.render())
            self.on_event(SupervisorEvent(self.name, "gave_up", self.crash_report.render()))
            return
        self.state = "stopped"
        self.on_event(SupervisorEvent(self.name, "stopped"))

    async def _run_once(self) -> None:
        """One life of the server; returns on a stop or planned restart, raises on a crash."""
        self.child = child = ChildProcess(self.spec)
        self._planned = False
        self.state = "starting"
        await child.start()
        if self._stopping:  # stop() came while the process was being spawned
            await child.stop(self.policy.drain_timeout_s)
        self.on_event(SupervisorEvent(self.name, "started", f"pid {child.pid}"))
        readiness = asyncio.create_task(self._watch_ready(child))
        try:
            exit_code = await child.wait()
        finally:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
        if self._stopping or self._planned:
            self._planned = False
            return
        reason = child.failure_reason or f"exit code {exit_code}"
        if child.uptime() >= self.policy.stable_after_s:
            self._quick_crashes = 0
        self._quick_crashes += 1
        self.on_event(SupervisorEvent(self.name, "crashed", reason))
        raise ChildCrashed(exit_code, reason, child.log_tail())

    async def _watch_ready(self, child: ChildProcess) -> None:
        if self.health_url is None:
            self.state = "ready"
            self.on_event(SupervisorEvent(self.name, "ready"))
            return
        deadline = time.monotonic() + self.policy.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.health_url)).status_code == 200:
                        if not (self._stopping or self._planned):
                            self.state = "ready"
                        self.on_event(SupervisorEvent(self.name, "ready"))
                        return
                await asyncio.sleep(0.1)
        child.failure_reason = f"not healthy within {self.policy.ready_timeout_s:g}s"
        await child.stop(self.policy.drain_timeout_s)

    def _backoff(self, retry_state: RetryCallState) -> float:
        steps = max(self._quick_crashes - 1, 0)
        return min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2**steps)

    def _give_up(self, retry_state: RetryCallState) -> bool:
        return self._stopping or self._quick_crashes > self.policy.max_restarts

    async def _before_restart(self, retry_state: RetryCallState) -> None:
        self.restarts += 1
        self.state = "backoff"
        delay = retry_state.upcoming_sleep
        log.warning("%s crashed; restart %d in %.1fs", self.name, self.restarts, delay)
