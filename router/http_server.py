"""The router's HTTP/1.1 server: an asyncio protocol over httptools (llhttp) on uvloop.

Why not uvicorn: per request, an ASGI server builds a scope dict, a request-response cycle object,
`receive`/`send` message dicts and a flow-control gate; on the proxy's data path that cost more CPU
than the router's own work (measured: ~200 µs per proxied request under uvicorn, ~85 µs for a bare
protocol proxy). Here a request is parsed whole (the router needs the body before it can route),
handed to the handler as one `Request`, and answered through its `ClientConnection`. A handler either
answers later from callbacks (it returns None: the proxy's data path, which spends no task or
future per request) or returns an awaitable, which is run as a task (everything that waits on
Redis or on starlette):

- `respond(status, headers, body)`: a whole response in one `send`;
- `start_stream(status, headers)`, `send_chunk(data)`, `end_stream(tail)`: chunked transfer
  encoding; the head waits for the first chunk so both leave in one `send`;
- `writing_paused` and `on_writable`: backpressure from a slow client (a callable the handler
  sets, called once the client has read enough);
- `on_disconnect`: a callable the handler sets, called once if the client leaves mid-request.

Everything else (the starlette app for /health, /metrics, /v1/models, /admin) is reached through
`asgi_bridge`. Keep-alive, pipelined requests (answered in order), `Expect: 100-continue`, HEAD
(the head of the answer, never its body), malformed requests (400), idle connection reaping,
graceful shutdown, TLS (an `ssl.SSLContext`) and CORS (router.cors) are here, and so are the
limits that keep one client from taking the router's memory:

- the request head: counted as it arrives, so a head that never ends is cut at MAX_HEAD_BYTES
  (431), as is one with more than MAX_HEADERS headers;
- the body: a declared Content-Length over the limit is a 413 at once; a chunked body is counted;
- pipelined requests waiting behind the one being served: reading pauses once their bodies pass
  the body limit (or MAX_PIPELINED of them wait), and the next one is not served while the client
  has not read the previous answer (the write buffer pauses past WRITE_BUFFER_HIGH);
- a client that reads nothing for `send_timeout_s` while an answer waits for it is disconnected
  (nginx's `send_timeout`), which also ends its request upstream (`on_disconnect`);
- connections beyond `max_connections` get a 503 and are closed before anything is read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import httptools
import orjson

from fleet.control.errors import APIError
from router.cors import CorsPolicy

log = logging.getLogger("router.http")

MAX_PIPELINED = 16
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_CONNECTIONS = 10_000
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
LINGER_BYTES = 1024 * 1024
LINGER_S = 2.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}


@dataclass(slots=True, eq=False)
class Request:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes


Handler = Callable[[Request, "ClientConnection"], Awaitable[None] | None]


def _head(status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(framing)
    return b"".join(lines)


def _error_bytes(err: APIError) -> bytes:
    """A whole error response that closes the connection."""
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    framing = b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return _head(err.status, headers, framing) + body


def _head_too_large(what: str) -> APIError:
    return APIError(
        431, f"Request header fields too large: {what}.", type="invalid_request_error",
        code="request_header_fields_too_large",
    )  # fmt: skip


_TOO_MANY_CONNECTIONS = _error_bytes(
    APIError(
        503,
        "The router has too many open connections; retry shortly.",
        code="too_many_connections",
        headers={"Retry-After": "1"},
    )
)


class _Refused(asyncio.Protocol):
    """A connection over the limit: a prepared 503, then closed, nothing read or parsed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
        transport.close()


class _Discard:
    """The parser of a refused connection that lingers: drops what the client still sends, and
    aborts past LINGER_BYTES."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.left = LINGER_BYTES

    def feed_data(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.conn.abort()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and carries the answer of the one being served."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | _Discard = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.in_head = True  # between requests, or reading a request's head
        self.head_bytes = 0  # bytes read since the head began (counted per read)
        self.content_length: bytes | None = None
        self.too_large = False
        self.expects_continue = False
        self.continue_due = False  # a `100 Continue` waits for its request's turn
        self.queue: deque[tuple[Request, bool, APIError | None]] = deque()
        self.queued_bytes = 0
        self.reading_paused = False
        self.active = False  # a request is being answered (`current`)
        self.keep_alive = True
        self.last_request = False  # nothing more is read: close once the queue is answered
        self.head_only = False  # answering a HEAD request
        self.cors: list[tuple[bytes, bytes]] = []  # CORS headers for the current answer
        self.closed = False
        self.idle_since = time.monotonic()
        self.on_disconnect: Callable[[], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self.writing_paused = False
        self.paused_since = 0.0  # when writing last paused (the send timeout counts from it)
        self._held = b""
        self._chunked = False  # a streamed response is under way
        self._raw = False  # ... to an HTTP/1.0 client: no chunked framing, ends with the connection
        self.current: Request | None = None  # the request being answered, or last answered

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.active or self.queue:  # answer the request, ignore its Upgrade, then close
                self._read_no_more()
            else:
                self._refuse_and_close(APIError(400, "Protocol upgrades are not supported."))
            return
        except httptools.HttpParserError as exc:
            refusal = exc.__context__  # raised by a callback below
            if not isinstance(refusal, APIError):
                refusal = APIError(400, f"Malformed HTTP request: {exc}.")
            self._refuse_and_close(refusal)
            return
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES:
            self._refuse_and_close(_head_too_large(f"more than {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.queue.clear()
        self.on_writable = None
        if self.active and self.on_disconnect is not None:
            hook, self.on_disconnect = self.on_disconnect, None
            hook()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.on_writable is not None:
            hook, self.on_writable = self.on_writable, None
            hook()
        elif self.queue and not self.active:  # the next request waited for this
            self.loop.call_soon(self._next)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0
        self.content_length = None
        self.too_large = False
        self.expects_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            self.content_length = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expects_continue = True

    def on_headers_complete(self) -> None:
        """Limits that need the whole head; raising here refuses the request (431, 413)."""
        self.in_head = False
        if self.head_bytes > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            self._check_head()
        declared = self.content_length
        if declared is not None and int(declared) > self.server.max_body_bytes:
            raise self._body_too_large()
        if self.expects_continue:
            if self.active or self.queue:
                self.continue_due = True  # not into the middle of another answer
            else:
                self._write(_CONTINUE)

    def _check_head(self) -> None:
        """The exact head size, needed only when a read held more than the limit."""
        if len(self.headers) > MAX_HEADERS:
            raise _head_too_large(f"more than {MAX_HEADERS} headers")
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            raise _head_too_large(f"more than {MAX_HEAD_BYTES} bytes")

    def _body_too_large(self) -> APIError:
        limit = self.server.max_body_bytes
        return APIError(413, f"The request body is larger than {limit} bytes.")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body_bytes:
            self.too_large = True
            self.body = []
        elif not self.too_large:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.continue_due = False  # the body came without it
        path, _, query = self.url.partition(b"?")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        method = self.parser.get_method()
        request = Request(
            _METHODS.get(method) or method.decode(),
            path.partition(b"#")[0].decode("latin-1"),
            query,
            self.headers,
            body,
        )
        if self.too_large:
            item = (request, False, self._body_too_large())
        else:
            item = (request, self.parser.should_keep_alive(), None)
        if not self.active and not self.queue and not self.writing_paused and not self.closed:
            self._serve_now(*item)
            return
        self.queue.append(item)
        self.queued_bytes += len(body)
        if self.queued_bytes > self.server.max_body_bytes or len(self.queue) > MAX_PIPELINED:
            self._pause_reading()

    # -- serving requests one at a time

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _next(self) -> None:
        if not self.queue or self.active or self.closed:
            return
        item = self.queue.popleft()
        self.queued_bytes -= len(item[0].body)
        if self.reading_paused and self.queued_bytes <= self.server.max_body_bytes:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._serve_now(*item)

    def _serve_now(self, request: Request, keep_alive: bool, error: APIError | None) -> None:
        self.keep_alive = keep_alive
        if self.server.stopping:
            self.keep_alive = False
        self.current = request
        self.active = True
        self.on_disconnect = None
        self.on_writable = None
        self.head_only = request.method == "HEAD"
        if self.server.cors is not None and self._cors(request):
            return
        if error is not None:
            self.respond_error(error)
            return
        try:
            pending = self.server.handler(request, self)
        except Exception:
            self._handler_failed(request)
            return
        if pending is not None:
            task = self.loop.create_task(self._serve(request, pending))
            self.server.tasks.add(task)  # a strong reference until it is done
            task.add_done_callback(self.server.tasks.discard)

    def _cors(self, request: Request) -> bool:
        """CORS headers for this request's answer; True if it was a preflight, answered here."""
        cors = self.server.cors
        assert cors is not None
        self.cors = cors.answer_headers(request.headers)
        preflight = cors.preflight(request)
        if preflight is None:
            return False
        status, headers, body = preflight
        self.cors = []
        self.respond(status, headers, body)
        return True

    async def _serve(self, request: Request, pending: Awaitable[None]) -> None:
        """Run a handler that waits on something; it must answer before it returns."""
        try:
            await pending
        except Exception:
            self._handler_failed(request)
        if self._answering(request):  # it returned without answering
            self.close()
            self._finished()

    def _answering(self, request: Request) -> bool:
        """Still answering `request` (a task may outlive its answer: the next one may be on)."""
        return self.active and self.current is request

    def _handler_failed(self, request: Request) -> None:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        if not self._answering(request):
            return
        if self._chunked:
            self.close()
            self._finished()
        else:
            self.respond_error(APIError(500, "The router failed to serve this request."))

    def _finished(self) -> None:
        """The answer is out: the next pipelined request may start, once the client has read
        enough of this one (resume_writing)."""
        self.active = False
        self.on_disconnect = None
        self.on_writable = None
        self.idle_since = time.monotonic()
        if self.closed:
            return
        if self.last_request and not self.queue:
            self._linger()
            return
        if not self.keep_alive:
            self.close()
            return
        if self.continue_due and not self.queue:
            self.continue_due = False
            self._write(_CONTINUE)
        if self.queue and not self.writing_paused:
            self.loop.call_soon(self._next)

    # -- the response API

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response, head and body in one write. `headers` excludes content-length."""
        if self.cors:
            headers = headers + self.cors
        framing = b"content-length: %d\r\n%s\r\n" % (
            len(body),
            b"" if self.keep_alive else b"connection: close\r\n",
        )
        head = _head(status, headers, framing)
        self._write(head if self.head_only else head + body)
        self._finished()

    def respond_error(self, err: APIError) -> None:
        """The OpenAI-style error body, with the error's status and headers (Retry-After...)."""
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        self.respond(err.status, headers, orjson.dumps(err.body()))

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A streamed response: the head is held until the first chunk (or the end)."""
        if self.cors:
            headers = headers + self.cors
        self._raw = self.parser.get_http_version() == "1.0"
        if self._raw:
            self.keep_alive = False
            framing = b"connection: close\r\n\r\n"
        else:
            framing = b"transfer-encoding: chunked\r\n%s\r\n" % (
                b"" if self.keep_alive else b"connection: close\r\n"
            )
        self._held = _head(status, headers, framing)
        self._chunked = True

    def send_chunk(self, data: bytes) -> None:
        if not data or self.head_only:
            return
        frame = data if self._raw else b"%x\r\n%s\r\n" % (len(data), data)
        if self._held:
            frame, self._held = self._held + frame, b""
        self._write(frame)

    def end_stream(self, tail: bytes = b"") -> None:
        if self.head_only:
            frame = b""
        elif self._raw:
            frame = tail
        else:
            frame = b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail) if tail else b"0\r\n\r\n"
        if self._held:
            frame, self._held = self._held + frame, b""
        self._chunked = False
        self._write(frame)
        self._finished()

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close without flushing what the client has not read."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _refuse_and_close(self, err: APIError) -> None:
        """Refuse what the client sent and close; requests that came before it are answered
        first, in order (a valid request followed by junk still gets its answer)."""
        if self.active or self.queue:
            self._read_no_more()
            self.queue.append((Request("GET", "/", b"", [], b""), False, err))
            return
        self._write(_error_bytes(err))
        self._linger()

    def _read_no_more(self) -> None:
        """Drop whatever the client sends from now on; close once the queue is answered."""
        self.last_request = True
        self.in_head = False
        self.parser = _Discard(self)

    def _linger(self) -> None:
        """Close after a refusal without losing it, as nginx's lingering close does: send our
        FIN, then read and drop what the client still sends (LINGER_BYTES, LINGER_S at most).
        Closing with its bytes unread would make the kernel answer with a reset, which can
        destroy the refusal before the client reads it."""
        transport = self.transport
        if self.closed or transport is None:
            return
        if not transport.can_write_eof():
            self.close()
            return
        self.closed = True
        self.keep_alive = False
        self.in_head = False
        self.parser = _Discard(self)
        transport.write_eof()
        if self.reading_paused:
            transport.resume_reading()
        self.loop.call_later(LINGER_S, self.abort)


class HttpServer:
    """Listens, serves, reaps idle keep-alive connections and clients that stopped reading, and
    stops gracefully."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        max_body_bytes: int,
        keep_alive_s: float = 60.0,
        send_timeout_s: float = 60.0,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = 4096,
        tls: ssl.SSLContext | None = None,
        cors: CorsPolicy | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.keep_alive_s = keep_alive_s
        self.send_timeout_s = send_timeout_s
        self.max_connections = max_connections
        self.backlog = backlog
        self.tls = tls
        self.cors = cors
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            self._protocol, self.host, self.port, backlog=self.backlog, ssl=self.tls
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._reaper = self.loop.create_task(self._reap_idle())

    def _protocol(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            return _Refused()
        return ClientConnection(self)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish (up to
        `grace_s`), then close the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        deadline = time.monotonic() + grace_s
        while True:
            for conn in list(self.connections):
                if not conn.active:
                    conn.close()
            if not self.connections or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.keep_alive_s / 4, self.send_timeout_s / 4, 5.0))
            now = time.monotonic()
            idle_cutoff = now - self.keep_alive_s
            send_cutoff = now - self.send_timeout_s
            for conn in list(self.connections):
                if conn.writing_paused and conn.paused_since < send_cutoff:
                    conn.abort()  # the client read nothing for send_timeout_s
                elif not conn.active and conn.idle_since < idle_cutoff:
                    conn.close()


async def run_until_signalled(
    server: HttpServer,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    grace_s: float = 30.0,
) -> None:
    """Start the app and the server, serve until SIGTERM or SIGINT, then stop both gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await startup()
    try:
        await server.start()
        log.info("listening on %s://%s:%d", server.scheme, server.host, server.port)
        await stop.wait()
        log.info("shutting down: finishing requests in flight (up to %g s)", grace_s)
        await server.stop(grace_s)
    finally:
        await shutdown()


async def asgi_bridge(app: Callable, request: Request, conn: ClientConnection) -> None:
    """Serve `request` with an ASGI application (the router's starlette app for its local
    routes); the response is collected and sent whole."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": conn.server.scheme,
        "path": unquote(request.path),
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": conn.transport.get_extra_info("peername") if conn.transport else None,
        "server": (conn.server.host, conn.server.port),
    }
    delivered = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        gone = conn.loop.create_future()
        conn.on_disconnect = lambda: gone.done() or gone.set_result(None)
        await gone
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"content-length"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                conn.respond(status, headers, b"".join(parts))

    await app(scope, receive, send)
