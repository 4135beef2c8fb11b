"""One event-loop tick's admissions and settlements, sent to Redis as one EVALSHA.

Why: two EVALSHAs per request (admit, settle) cost the router more than the rest of a keyed
request's extra work; queued per tick they cost two per tick at most (one when a tick has both),
however many requests it carries. scripts/batch.lua applies them in the order they were queued,
each as one call of its own would (the same atomic checks inside Redis), so limits hold across
routers exactly as before, and each caller still gets its own answer. A settlement is never
waited for by anything but its own caller, and one Redis did not confirm is handed to
`settle_failed` (its ticket voided later, its usage counted locally).

Encoding is done here, once per operation, into RESP: a key's names are encoded once and cached,
an operation's arguments travel as one space-separated string, and so do the answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from fleet.control.keys.layout import KeyLayout
from fleet.control.keys.scripts import BATCH
from fleet.control.resp import Reply, RespClient

log = logging.getLogger("fleet.control.keys")

# An admission's answer: admit.lua's three integers, or the error that kept Redis from answering.
Admitted = Callable[["tuple[int, int, int] | BaseException"], None]
# What a settlement Redis did not confirm was: key id, ticket id, prompt and completion tokens.
Settlement = tuple[str, str, int, int]
# An admission: (its callback, None); a settlement: (its caller's future or None, what it was).
Op = tuple[Any, "Settlement | None"]


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


_EVALSHA = bulk(b"EVALSHA") + bulk(BATCH.sha.encode())
_EVAL = bulk(b"EVAL") + bulk(BATCH.source.encode())


class LimitBatcher:
    """Queues admissions and settlements until the loop's next round, then sends them as one."""

    def __init__(
        self,
        fast: RespClient,
        layout: KeyLayout,
        slot_ttl_ms: int,
        settle_failed: Callable[[str, str, int, int, BaseException], None],
    ) -> None:
        self.fast = fast
        self.layout = layout
        self.settle_failed = settle_failed
        self._ttl = bulk(b"%d" % slot_ttl_ms)
        self._names: dict[str, tuple[bytes, bytes]] = {}
        self._keys: list[bytes] = []
        self._args: list[bytes] = []
        self._ops: list[Op] = []
        self._key_count = 0

    def admit(
        self,
        key_id: str,
        ticket: str,
        rpm: int,
        tpm: int,
        max_concurrent: int,
        reserve: int,
        done: Admitted,
    ) -> None:
        """Queue an admission; `done` gets its answer from a callback."""
        names = self._names.get(key_id) or self._key_names(key_id)
        self._keys.append(names[0])
        self._key_count += 5
        arg = f"a {rpm} {tpm} {max_concurrent} {reserve} {ticket}"
        self._args.append(f"${len(arg)}\r\n{arg}\r\n".encode())
        self._queue((done, None))

    def settle(
        self,
        key_id: str,
        ticket: str,
        bucket: int,
        delta: int,
        prompt: int,
        completion: int,
        wait: bool,
    ) -> asyncio.Future[None] | None:
        """Queue a settlement; with `wait`, a future done (never failed) once it is settled or
        handed to `settle_failed`."""
        names = self._names.get(key_id) or self._key_names(key_id)
        self._keys.append(names[1])
        self._key_count += 3
        arg = f"s {ticket} {bucket} {delta} {prompt} {completion}"
        self._args.append(f"${len(arg)}\r\n{arg}\r\n".encode())
        waiter = asyncio.get_running_loop().create_future() if wait else None
        self._queue((waiter, (key_id, ticket, prompt, completion)))
        return waiter

    def _queue(self, op: Op) -> None:
        if not self._ops:  # the tick's first: asking for the loop costs a getpid() syscall
            asyncio.get_running_loop().call_soon(self._send)  # after the callbacks due now
        self._ops.append(op)

    def _key_names(self, key_id: str) -> tuple[bytes, bytes]:
        """An admission's five key names and a settlement's three, in RESP, cached."""
        rpm, tpm, slots, usage, voided = (bulk(n.encode()) for n in self.layout.limits(key_id))
        names = self._names[key_id] = (rpm + tpm + slots + usage + voided, tpm + slots + usage)
        return names

    def _send(self) -> None:
        ops, keys, args, key_count = self._ops, self._keys, self._args, self._key_count
        self._ops, self._keys, self._args, self._key_count = [], [], [], 0
        now = repr(time.time()).encode()
        tail = b"%b%b%b%b%b" % (
            bulk(b"%d" % key_count),
            b"".join(keys),
            bulk(now),
            self._ttl,
            b"".join(args),
        )
        head = b"*%d\r\n" % (3 + key_count + 2 + len(args))
        self._submit(ops, head, tail, _EVALSHA)

    def _submit(self, ops: list[Op], head: bytes, tail: bytes, command: bytes) -> None:
        reply = self.fast.submit(head + command + tail)
        reply.add_done_callback(functools.partial(self._answered, ops, head, tail, command))

    def _answered(
        self, ops: list[Op], head: bytes, tail: bytes, command: bytes, done: asyncio.Future[Reply]
    ) -> None:
        if done.cancelled():
            return self._failed(ops, RedisConnectionError("the Redis call was cancelled"))
        if (error := done.exception()) is not None:
            return self._failed(ops, error)
        reply = done.result()
        if isinstance(reply, ResponseError):
            if command is _EVALSHA and str(reply).startswith("NOSCRIPT"):
                return self._submit(ops, head, tail, _EVAL)  # Redis restarted: load it again
            return self._failed(ops, reply)
        if not isinstance(reply, bytes):
            return self._failed(ops, ResponseError(f"unexpected batch reply {reply!r:.100}"))
        answers = reply.split()
        at = 0
        for caller, settled in ops:
            if settled is None:
                _call(caller, (int(answers[at]), int(answers[at + 1]), int(answers[at + 2])))
                at += 3
            elif caller is not None and not caller.done():
                caller.set_result(None)
        return None

    def _failed(self, ops: list[Op], error: BaseException) -> None:
        """Redis did not answer: admissions' callers get the error, settlements go in doubt."""
        for caller, settled in ops:
            if settled is None:
                _call(caller, error)
                continue
            self.settle_failed(*settled, error)
            if caller is not None and not caller.done():
                caller.set_result(None)


def _call(done: Admitted, answer: tuple[int, int, int] | BaseException) -> None:
    """One caller's callback: its failure must not keep the batch's other callers waiting."""
    try:
        done(answer)
    except Exception:
        log.exception("an admission's callback failed")
