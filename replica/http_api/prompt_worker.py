"""Prompt preparation (chat templates, tokenization, stop-string automata) off the event loop.

A chat template is a program and a prompt may be megabytes: run on the event loop, either stalled
/health, /load and the membership heartbeat for seconds, and the replica fell out of the fleet.

Why a dedicated thread pool with a deadline and a bound: a thread cannot be killed, so a render
past its deadline gets a 400 at once but keeps its thread until it ends. A pool of its own keeps
such renders from taking the threads anything else uses (asyncio's default executor); having
several threads lets other requests go on while a few are held by abandoned renders; the bound on
jobs held (running, queued or abandoned) turns a pile-up into quick 503s instead of an
ever-growing queue. Threads share the GIL with the event loop, but the interpreter switches every
few milliseconds, so the loop keeps answering. (A process pool could kill a runaway render, but
would pay for copying the tokenizer and every prompt across processes.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from fleet.control.errors import APIError

T = TypeVar("T")


class PromptWorker:
    def __init__(self, workers: int, timeout_s: float, max_jobs: int) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="prompt")
        self._slots = threading.BoundedSemaphore(max(1, max_jobs))

    async def run(self, work: Callable[[], T], param: str | None) -> T:
        """`work()` on a worker thread; a 400 naming `param` when it takes longer than the budget
        (waiting for a thread included), a 503 when too many jobs are held already."""
        if not self._slots.acquire(blocking=False):
            raise APIError(
                503,
                "replica is busy preparing other prompts; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        try:
            future = self._pool.submit(work)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                400,
                f"preparing the prompt took longer than {self.timeout_s:g} s (the limit of this "
                "replica); shorten the input",
                param,
                code="prompt_too_slow",
            ) from None

    def _release(self, future: Future) -> None:
        self._slots.release()

    def shutdown(self) -> None:
        """Queued jobs are dropped; a running one finishes on its own (threads cannot be stopped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
