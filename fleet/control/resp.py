"""A small pipelined Redis client for the request hot path (admission and settlement).

Why not redis-py's asyncio client: README, "Why our own HTTP server and clients" (bench_keys.py).
This client keeps one connection, writes each event-loop tick's commands in one syscall and
matches replies to callers in order. A cancelled caller just stops waiting (its reply is read and
dropped), so cancellation never corrupts the connection. A command unanswered after `timeout`
closes the connection and fails everything in flight, so nothing waits on a stalled Redis.

Errors use redis-py's exception classes, so `REDIS_DOWN_ERRORS` covers both clients. Only what
the hot path needs is here: RESP2 replies, AUTH, SELECT, EVALSHA with an EVAL fallback, and TLS
for `rediss://` URLs with redis-py's query parameters (`ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`), so one URL serves both clients.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl as ssl_module
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias
from urllib.parse import parse_qs, unquote, urlparse

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fleet.control.redis_conn import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, resolve_redis_url

# A decoded RESP reply; arrays nest (EVAL of a script returning a table).
Reply: TypeAlias = "int | bytes | list[Reply] | ResponseError | None"


@dataclass(frozen=True)
class LuaScript:
    source: str
    sha: str = field(init=False)  # hashed once: EVALSHA sends it with every call

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


_CERT_REQS = {"none": ssl_module.CERT_NONE, "optional": ssl_module.CERT_OPTIONAL,
              "required": ssl_module.CERT_REQUIRED}  # fmt: skip


def tls_context(query: str) -> ssl_module.SSLContext:
    """A client TLS context from a `rediss://` URL's query, read the way redis-py reads it."""
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    context = ssl_module.create_default_context(cafile=params.get("ssl_ca_certs"))
    reqs = _CERT_REQS.get(params.get("ssl_cert_reqs", "required").lower())
    if reqs is None:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    check = params.get("ssl_check_hostname", "true").lower() not in ("0", "false", "no", "off")
    context.check_hostname = check and reqs != ssl_module.CERT_NONE
    context.verify_mode = reqs
    if params.get("ssl_certfile"):
        context.load_cert_chain(params["ssl_certfile"], params.get("ssl_keyfile"))
    return context


def _encode(args: tuple[object, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            data = b"1" if arg else b"0"
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
    pos = end + 2
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return buf[pos : pos + size], pos + size + 2
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return ResponseError(line.decode(errors="replace")), pos
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items: list[Reply] = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise RedisConnectionError(f"unexpected reply type {kind!r} from Redis")


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Reply], float]] = collections.deque()
        self.buf = b""
        self.out: list[bytes] = []
        self.closed: BaseException | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        if self.closed is not None:
            raise self.closed
        future: asyncio.Future[Reply] = self.loop.create_future()
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(data)
        self.pending.append((future, self.loop.time() + self.timeout))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.timeout, self._check)
        return future

    def _flush(self) -> None:
        if self.out and self.transport is not None and self.closed is None:
            self.transport.write(b"".join(self.out))
        self.out = []

    def _check(self) -> None:
        self._watchdog = None
        if not self.pending:
            return
        deadline = self.pending[0][1]
        if self.loop.time() >= deadline:
            self.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
        else:
            self._watchdog = self.loop.call_at(deadline, self._check)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while pos < len(self.buf):
                reply, pos = _parse(self.buf, pos)
                if not self.pending:
                    raise RedisConnectionError("reply from Redis with no request waiting")
                future, _ = self.pending.popleft()
                if not future.done():
                    future.set_result(reply)
        except _Incomplete:
            pass
        except (RedisConnectionError, ValueError) as exc:
            self.fail(RedisConnectionError(f"bad reply from Redis: {exc}"))
            return
        self.buf = self.buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail every request in flight (callers fall back)."""
        if self.closed is None:
            self.closed = exc
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """One pipelined connection to Redis, (re)opened on demand."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = SOCKET_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        parsed = urlparse(resolve_redis_url(url))
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme: {parsed.scheme!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.path = parsed.path
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
        self.db = int(db) if db.isdigit() else 0
        self.tls = tls_context(parsed.query) if parsed.scheme == "rediss" else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def execute(self, *args: object) -> Reply:
        """Send one command; its reply, raising ResponseError for an error reply."""
        protocol = self._protocol
        if protocol is None or protocol.closed is not None:
            protocol = await self._connect()
        reply = await protocol.send(_encode(args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def submit(self, data: bytes) -> asyncio.Future[Reply]:
        """Send one command already encoded in RESP, from a callback: a future of its reply
        (error replies included, not raised), opening the connection first if need be."""
        protocol = self._protocol
        if protocol is not None and protocol.closed is None:
            return protocol.send(data)
        return asyncio.ensure_future(self._send_connected(data))

    async def _send_connected(self, data: bytes) -> Reply:
        return await (await self._connect()).send(data)

    async def evalsha(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[object]
    ) -> Reply:
        """EVALSHA, falling back to EVAL (which caches the script) after a Redis restart."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("client closed"))
            self._protocol = None

    async def _connect(self) -> _Protocol:
        """Open the connection once for all concurrent callers (a cancelled caller leaves it be)."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            if self.scheme == "unix":
                coro = loop.create_unix_connection(lambda: _Protocol(self.timeout), self.path)
            else:
                coro = loop.create_connection(
                    lambda: _Protocol(self.timeout), self.host, self.port, ssl=self.tls
                )
            _, protocol = await asyncio.wait_for(coro, self.connect_timeout)
        except asyncio.TimeoutError:
            raise RedisTimeoutError(
                f"Timeout connecting to Redis at {self.host}:{self.port}"
            ) from None
        except OSError as exc:
            raise RedisConnectionError(
                f"Cannot connect to Redis at {self.host}:{self.port}: {exc}"
            ) from None
        handshake = []
        if self.password:
            auth = (
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
            handshake.append(protocol.send(_encode(auth)))
        if self.db:
            handshake.append(protocol.send(_encode(("SELECT", self.db))))
        for reply in await asyncio.gather(*handshake):
            if isinstance(reply, ResponseError):
                protocol.fail(RedisConnectionError(f"Redis refused the connection: {reply}"))
                raise protocol.closed  # type: ignore[misc]
        self._protocol = protocol
        return protocol
