"""One client connection to the router: an asyncio protocol over httptools (llhttp) that parses
requests, serves them one at a time in order, and carries the answer of the one being served.

Why not uvicorn: README, "Why our own HTTP server and clients" (loadtests/bare_proxy.py).

Its response API is what handlers (router.app) and exchanges (router.exchange) answer through:

- `respond(status, headers, body)`: a whole response in one `send`;
- `start_stream(status, headers)`, `send_chunk(data)`, `end_stream(tail)`: chunked transfer
  encoding; the head waits for the first chunk so both leave in one `send`;
- `writing_paused` and `on_writable`: backpressure from a slow client (a callable the handler
  sets, called once the client has read enough);
- `on_disconnect`: a callable the handler sets, called once if the client leaves mid-request.

The per-connection limits (head size and header count, body size, pipelining, lingering close
after a refusal) are enforced here; see router.http.server for the whole list and why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, cast

import httptools
import orjson

from fleet.control.errors import APIError
from fleet.request_id import request_id_for
from router.http.messages import Request, error_bytes, response_head

if TYPE_CHECKING:
    from router.http.server import HttpServer

log = logging.getLogger("router.http")

MAX_PIPELINED = 16
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
LINGER_BYTES = 1024 * 1024
LINGER_S = 2.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}


def _head_too_large(what: str) -> APIError:
    return APIError(
        431, f"Request header fields too large: {what}.", type="invalid_request_error",
        code="request_header_fields_too_large",
    )  # fmt: skip


class _Reader(Protocol):
    """What a connection feeds the bytes it reads to: the request parser, or a `_Discard`."""

    def feed_data(self, data: bytes) -> None: ...


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
        self.http = httptools.HttpRequestParser(self)  # method, version, keep-alive of a request
        self.parser: _Reader = self.http  # becomes a `_Discard` once nothing more is read
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.in_head = True  # between requests, or reading a request's head
        self.head_bytes = 0  # bytes read since the head began (counted per read)
        self.content_length: bytes | None = None
        self.given_id: bytes | None = None  # the request's X-Request-Id, as the client sent it
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
        self.transport = cast(asyncio.Transport, transport)  # a stream server's are Transports
        self.transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
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
        self.given_id = None
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
        elif name == b"x-request-id":
            self.given_id = value

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
        method = self.http.get_method()
        request = Request(
            _METHODS.get(method) or method.decode(),
            path.partition(b"#")[0].decode("latin-1"),
            query,
            self.headers,
            body,
            request_id_for(self.given_id),
        )
        item: tuple[Request, bool, APIError | None]
        if self.too_large:
            item = (request, False, self._body_too_large())
        else:
            item = (request, self.http.should_keep_alive(), None)
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

    async def _serve(self, request: Request, pending: Awaitable[bool | None]) -> None:
        """Run a handler that waits on something; it must answer before it returns, or return
        True when callbacks answer for it."""
        handed_over = False
        try:
            handed_over = bool(await pending)
        except Exception:
            self._handler_failed(request)
        if not handed_over and self._answering(request):  # it returned without answering
            self.close()
            self._finished()

    def _answering(self, request: Request) -> bool:
        """Still answering `request` (a task may outlive its answer: the next one may be on)."""
        return self.active and self.current is request

    def _handler_failed(self, request: Request) -> None:
        log.exception(
            "unhandled error serving %s %s (request %s)",
            request.method, request.path, request.request_id.decode("latin-1"),
        )  # fmt: skip
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

    @property
    def request_id(self) -> bytes:
        """The X-Request-Id of the request being answered (fleet.request_id)."""
        return self.current.request_id if self.current is not None else b"-"

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response, head and body in one write. `headers` excludes content-length; the
        request's X-Request-Id is added here, as on every answer."""
        if self.cors:
            headers = headers + self.cors
        framing = b"content-length: %d\r\nx-request-id: %s\r\n%s\r\n" % (
            len(body),
            self.request_id,
            b"" if self.keep_alive else b"connection: close\r\n",
        )
        head = response_head(status, headers, framing)
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
        self._raw = self.http.get_http_version() == "1.0"
        if self._raw:
            self.keep_alive = False
            framing = b"x-request-id: %s\r\nconnection: close\r\n\r\n" % self.request_id
        else:
            framing = b"transfer-encoding: chunked\r\nx-request-id: %s\r\n%s\r\n" % (
                self.request_id,
                b"" if self.keep_alive else b"connection: close\r\n",
            )
        self._held = response_head(status, headers, framing)
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
        self._write(error_bytes(err))
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
