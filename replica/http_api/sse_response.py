"""The streamed answer: server-sent event frames, ended by `[DONE]`, that stop the moment the client
leaves (see disconnect.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fleet.control.errors import APIError
from replica.http_api.disconnect import wait_for_disconnect

log = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class SSEResponse(Response):
    """Streams `data:` frames from `frames`; ends with `[DONE]` (the iterator does not send it).

    An exception after the 200 went out becomes one error frame and `[DONE]`. A disconnect cancels
    the iterator, so its cleanup (engine abort) runs immediately rather than at the next write.
    `on_close` runs once however the response ends, even if the iterator never started.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # Not Response.__init__: it would set a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.frames = frames
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not streaming.done():
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
            if self.on_close is not None:
                await self.on_close()
        if not streaming.cancelled():
            streaming.result()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            tail = DONE_FRAME
        except APIError as exc:
            tail = exc.sse_frames()
        except Exception:
            log.exception("stream failed after the response began")
            tail = APIError(500, "internal error while streaming").sse_frames()
        finally:
            await self.frames.aclose()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
