"""Shared per-key limits: admit a request (rpm, tpm, concurrency), then settle its real usage.

`admit` checks and takes rpm, tpm and concurrency together in Redis (429 with Retry-After naming
the limit); `settle` charges what was used. Both are queued per event-loop tick and sent as one
EVALSHA (fleet.control.keys.batch, on the pipelined `fleet.control.resp` client); callers on
callbacks use `admit_soon` and `settle_soon` (the router: no task or future per request). A key
with no limits costs no round trip at all (its usage is written back in batches every second).
Leaving `admitted` without `settle` (error, client disconnect, cancellation) refunds the reserved
tokens and frees the slot; both are idempotent; an admission whose caller left before Redis
answered is given back as soon as it does. A concurrency slot is an entry with a deadline that
live tickets keep extending, so a crashed router's slots expire by themselves (after `slot_ttl`).
A ticket whose admission or settlement went unconfirmed (timeout in a stall, outage) is voided
once Redis answers again: its slot is freed and an admission still queued in Redis takes nothing,
so a stall leaves no phantom slot behind. While Redis is down, fleet.control.keys.local decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from fleet.control.errors import APIError
from fleet.control.health import RedisHealth
from fleet.control.keys.batch import LimitBatcher
from fleet.control.keys.layout import KeyLayout
from fleet.control.keys.local import LOCAL_ADMISSIONS, LocalKeyState
from fleet.control.keys.records import KeyRecord, Ticket
from fleet.control.keys.refusals import CONCURRENCY, RPM, TPM, rate_limited
from fleet.control.keys.scripts import VOID
from fleet.control.redis_conn import REDIS_DOWN_ERRORS
from fleet.control.resp import RespClient

# Tickets in doubt kept for voiding; beyond this their slots are left to expire (slot_ttl).
MAX_IN_DOUBT = 10_000


class TicketIds:
    """Ticket ids, unique across processes by a random prefix (drawn again in a forked child,
    e.g. a router worker) and within one by a counter: no urandom call per request."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.numbers = itertools.count()


TICKET_IDS = TicketIds()
os.register_at_fork(after_in_child=TICKET_IDS.renew)


class KeyLimits:
    """One process's side of the shared limits: its live tickets, outage counters, usage to write."""

    def __init__(
        self,
        client: aioredis.Redis,
        fast: RespClient,
        layout: KeyLayout,
        health: RedisHealth,
        slot_ttl: float,
    ) -> None:
        self.client = client
        self.fast = fast
        self.layout = layout
        self.health = health
        self.slot_ttl = slot_ttl
        self._live: weakref.WeakValueDictionary[str, Ticket] = weakref.WeakValueDictionary()
        self._local: dict[str, LocalKeyState] = {}
        self._pending: dict[str, list[int]] = {}  # key id -> [requests, prompt, completion]
        self._in_doubt: dict[str, str] = {}  # ticket id -> key id, to void once Redis answers
        self._slot_ttl_ms = int(slot_ttl * 1000)
        self.batcher = LimitBatcher(fast, layout, self._slot_ttl_ms, self._settle_failed)

    async def admit(self, record: KeyRecord, reserve_tokens: int = 0) -> Ticket:
        """Take one request (and `reserve_tokens` of the tpm budget, plus a concurrency slot).

        Queued with the tick's other admissions and settlements (one EVALSHA); during an
        outage, local counters decide. Raises APIError 429.
        """
        answer: asyncio.Future[Ticket | APIError] = asyncio.get_running_loop().create_future()
        self.admit_soon(record, reserve_tokens, functools.partial(self._answer, answer))
        result = await answer
        if isinstance(result, APIError):
            raise result
        return result

    def _answer(self, answer: asyncio.Future[Ticket | APIError], result: Ticket | APIError) -> None:
        if not answer.done():
            answer.set_result(result)
        elif isinstance(result, Ticket):
            self.settle_soon(result)  # its caller gave up waiting: give the hold back

    def admit_soon(
        self, record: KeyRecord, reserve_tokens: int, done: Callable[[Ticket | APIError], None]
    ) -> None:
        """`admit` for callers on callbacks: `done` gets the ticket or the 429, at once (a key
        without limits, an outage) or once Redis answers (a caller gone by then releases it)."""
        ids = TICKET_IDS
        ticket_id = f"{ids.prefix}{next(ids.numbers):x}"
        if not (record.rpm or record.tpm or record.max_concurrent):
            # Nothing to enforce: count the request, written back in batches (no round trip).
            self._count_pending(record.id, 1, 0, 0)
            done(Ticket(record.id, ticket_id, 0, 0, unlimited=True))
            return
        reserve = max(0, int(reserve_tokens))
        if not self.health.up:
            done(self._admit_locally(record, ticket_id, reserve))
            return
        self.batcher.admit(
            record.id,
            ticket_id,
            record.rpm or 0,
            record.tpm or 0,
            record.max_concurrent or 0,
            reserve,
            functools.partial(self._admitted, record, ticket_id, reserve, done),
        )

    def _admitted(
        self,
        record: KeyRecord,
        ticket_id: str,
        reserve: int,
        done: Callable[[Ticket | APIError], None],
        reply: tuple[int, int, int] | BaseException,
    ) -> None:
        if isinstance(reply, BaseException):
            self._doubt(record.id, ticket_id)  # it may have run, or still run, in Redis
            self.health.failed(reply)
            done(self._admit_locally(record, ticket_id, reserve))
            return
        code, a, b = reply
        if code:
            done(rate_limited(record.name, record.id, code, a, b))
            return
        ticket = Ticket(record.id, ticket_id, b, a, counts_slot=bool(record.max_concurrent))
        if ticket.counts_slot:
            self._live[ticket_id] = ticket
        done(ticket)

    def _admit_locally(self, record: KeyRecord, ticket_id: str, reserve: int) -> Ticket | APIError:
        state = self._local.get(record.id)
        if state is None:
            state = self._local[record.id] = LocalKeyState()
        now = time.time()
        if record.tpm and reserve > record.tpm:
            reserve = record.tpm
        if record.rpm and (wait := state.rpm.wait_ms(now, record.rpm, 1)):
            return rate_limited(record.name, record.id, RPM, wait, record.rpm)
        if record.tpm and (wait := state.tpm.wait_ms(now, record.tpm, reserve)):
            return rate_limited(record.name, record.id, TPM, wait, record.tpm)
        if record.max_concurrent and len(state.live) >= record.max_concurrent:
            return rate_limited(record.name, record.id, CONCURRENCY, 1000, record.max_concurrent)
        sec = int(now)
        state.rpm.add(sec, 1)
        if record.tpm:
            state.tpm.add(sec, reserve)
        ticket = Ticket(record.id, ticket_id, reserve, sec, local=True, counts_slot=True)
        state.live.add(ticket)
        self._count_pending(record.id, 1, 0, 0)
        LOCAL_ADMISSIONS.inc()
        return ticket

    async def settle(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """Charge the real usage, return unused reserved tokens, free the slot. Never raises;
        returns once Redis has it (or, if Redis failed, once it is counted here instead)."""
        waiter = self._settle(ticket, prompt_tokens, completion_tokens, True)
        if waiter is not None:
            await waiter

    def settle_soon(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """`settle` for callers with nothing left to do: queued with the tick's other calls,
        not waited for (a failure is handled all the same)."""
        self._settle(ticket, prompt_tokens, completion_tokens, False)

    def _settle(
        self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, wait: bool
    ) -> asyncio.Future[None] | None:
        if ticket.done:
            return None
        ticket.done = True
        if ticket.counts_slot:
            self._live.pop(ticket.id, None)
        prompt, completion = max(0, int(prompt_tokens)), max(0, int(completion_tokens))
        delta = prompt + completion - ticket.reserved_tokens  # usage counts, reserved or not
        if ticket.local or ticket.unlimited:
            state = self._local.get(ticket.key_id)
            if state is not None:
                state.live.discard(ticket)
                state.tpm.adjust(ticket.bucket, delta)
            self._count_pending(ticket.key_id, 0, prompt, completion)
            return None
        if not self.health.up:
            self._doubt(ticket.key_id, ticket.id)  # its slot is in Redis: free it when back
            self._count_pending(ticket.key_id, 0, prompt, completion)
            return None
        return self.batcher.settle(
            ticket.key_id, ticket.id, ticket.bucket, delta, prompt, completion, wait
        )

    def _settle_failed(
        self, key_id: str, ticket_id: str, prompt: int, completion: int, exc: BaseException
    ) -> None:
        """A settlement Redis did not confirm: void its ticket when Redis is back, count its
        usage here (written back then)."""
        self._doubt(key_id, ticket_id)
        self.health.failed(exc)
        self._count_pending(key_id, 0, prompt, completion)

    async def release(self, ticket: Ticket) -> None:
        """Failure path: refund the reservation and free the slot (no-op after `settle`)."""
        await self.settle(ticket, 0, 0)

    @contextlib.asynccontextmanager
    async def admitted(self, record: KeyRecord, reserve_tokens: int = 0) -> AsyncIterator[Ticket]:
        """`admit` now, `release` on the way out unless the body settled (errors, cancellation)."""
        ticket = await self.admit(record, reserve_tokens)
        try:
            yield ticket
        finally:
            await self.release(ticket)

    # -- upkeep, run by the store's background task while Redis answers

    @property
    def in_doubt(self) -> bool:
        return bool(self._in_doubt)

    def _doubt(self, key_id: str, ticket_id: str) -> None:
        """Remember a ticket Redis may hold without anyone settling it (see `void_in_doubt`)."""
        if len(self._in_doubt) < MAX_IN_DOUBT:
            self._in_doubt[ticket_id] = key_id

    async def void_in_doubt(self) -> None:
        """Free the slots of tickets in doubt and void them (idempotent), so an admission that
        timed out here but ran in Redis later leaves no phantom slot behind."""
        batch = list(self._in_doubt.items())
        ttl_ms = int(self.slot_ttl * 1000)
        await asyncio.gather(
            *(
                self.fast.evalsha(
                    VOID,
                    [self.layout.limits(key_id).slots, self.layout.limits(key_id).voided],
                    [ticket_id, ttl_ms],
                )
                for ticket_id, key_id in batch
            )
        )
        for ticket_id, _ in batch:
            self._in_doubt.pop(ticket_id, None)

    def _count_pending(self, key_id: str, requests: int, prompt: int, completion: int) -> None:
        counts = self._pending.setdefault(key_id, [0, 0, 0])
        counts[0] += requests
        counts[1] += max(0, int(prompt))
        counts[2] += max(0, int(completion))

    async def flush_pending(self) -> None:
        """Write usage counted in this process (unlimited keys, outages) back to Redis."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        pipe = self.client.pipeline(transaction=False)
        for key_id, (requests, prompt, completion) in pending.items():
            usage_key = self.layout.limits(key_id).usage
            for name, value in (
                ("requests", requests),
                ("prompt_tokens", prompt),
                ("completion_tokens", completion),
            ):
                if value:
                    pipe.hincrby(usage_key, name, value)
            if prompt or completion:
                pipe.hset(usage_key, "last_used_at", repr(time.time()))
        try:
            await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            self.health.failed(exc)
            for key_id, counts in pending.items():
                self._count_pending(key_id, *counts)

    async def refresh_slots(self) -> None:
        """Extend the deadline of every live ticket's concurrency slot."""
        tickets = [t for t in list(self._live.values()) if not t.done]
        if not tickets:
            return
        sec, usec = await self.client.time()
        deadline = sec * 1000 + usec // 1000 + int(self.slot_ttl * 1000)
        pipe = self.client.pipeline(transaction=False)
        for t in tickets:
            pipe.zadd(self.layout.limits(t.key_id).slots, {t.id: deadline}, xx=True)
        await pipe.execute()
