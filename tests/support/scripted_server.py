"""A scripted OpenAI-style streaming server: the load tests' peer when a test is about the client
(how streams, error frames and broken connections are measured), not about our serving stack.

The model name picks the script: "scripted" streams `max_tokens` tokens; "mixed" cycles through
four outcomes, request by request: a good stream, an error frame after two tokens, a connection
dropped after two tokens, and a 503 answer; any other name is a 404. Requests are kept in
`requests` so tests can check what the load test sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODELS = ("scripted", "mixed")
MIXED = ("ok", "error-frame", "broken", "http-503")


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(m["content"]) for m in body["messages"]) // 4
    return len(body["prompt"]) // 4


class ScriptedServer:
    def __init__(self, token_delay: float = 0.002) -> None:
        self.token_delay = token_delay
        self.requests: list[dict[str, Any]] = []
        app = Starlette(
            routes=[
                Route("/v1/models", self.models),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/v1/completions", self.generate, methods=["POST"]),
            ]
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def models(self, request: Request) -> JSONResponse:
        data = [{"id": name, "object": "model", "owned_by": "tests"} for name in MODELS]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(self, request: Request) -> JSONResponse:
        body = await request.json()
        count = len(body["prompt"]) // 4
        return JSONResponse({"count": count, "tokens": list(range(count)), "max_model_len": 4096})

    async def generate(self, request: Request) -> Any:
        body = await request.json()
        body["_path"] = request.url.path
        body["_authorization"] = request.headers.get("authorization")
        self.requests.append(body)
        script = MIXED[(len(self.requests) - 1) % len(MIXED)] if body["model"] == "mixed" else "ok"
        if script == "http-503":
            error = {"message": "overloaded", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=503)
        if body["model"] not in MODELS:
            error = {
                "message": f"model {body['model']!r} not found",
                "type": "NotFoundError",
                "param": "model",
                "code": None,
            }
            return JSONResponse({"error": error}, status_code=404)
        chat = request.url.path.endswith("chat/completions")
        return StreamingResponse(self._stream(body, chat, script), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], chat: bool, script: str) -> AsyncIterator[bytes]:
        def frame(obj: Any) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}
            choice = {"index": 0, "text": text, "finish_reason": finish}
            return {"id": "c1", "object": "text_completion", "choices": [choice]}

        if chat:
            yield frame(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(self.token_delay)
            if i == 2 and script == "error-frame":
                yield frame(
                    {
                        "error": {
                            "message": "replica lost",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                yield b"data: [DONE]\n\n"
                return
            if i == 2 and script == "broken":
                raise ConnectionResetError("scripted break")
            yield frame(chunk(f" t{i}", "length" if i == n - 1 else None))
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = _prompt_tokens(body)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": n,
                "total_tokens": prompt + n,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            yield frame(
                {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        yield b"data: [DONE]\n\n"
