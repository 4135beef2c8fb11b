"""Read one OpenAI streaming response (SSE) into a timed record: the numbers LLM serving is judged by.

Kept free of locust and of any HTTP client (it reads lines from an iterator and time from a clock)
so the same code measures real traffic and can be tested with scripted streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are milliseconds; `start` is wall-clock seconds."""

    api: str
    workload: str
    start: float
    e2e_ms: float = 0.0
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first, vLLM's definition: (E2E - TTFT) / (tokens - 1)."""
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines row; the generated text stays out (it is only needed for multi-turn)."""
        row = asdict(self)
        del row["text"]
        row["tpot_ms"] = self.tpot_ms
        return row


def _chunk_text(api: str, choice: dict[str, Any]) -> str:
    if api == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error if error is not None else body)


def read_stream(
    lines: Iterable[bytes],
    record: RequestRecord,
    sent_at: float,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Fill `record` from the SSE lines of one response; `sent_at` is `clock()` when it was sent.

    A chunk with text is one token event (servers may pack several tokens in one chunk, as vLLM's
    benchmark also assumes); the token count comes from the usage chunk when the server sends one.
    Tokens without text (a random model's special tokens) leave TTFT unmeasured, not the request
    failed: only a stream with no tokens at all is.
    An error frame, a malformed frame or a stream that ends without `[DONE]` makes the record a
    failure. Reading stops at the first failure (the caller then drops the connection); after
    `[DONE]` it reads on to the end of the body so the connection can be reused.
    """
    last_token_at: float | None = None
    chunks_with_text = 0
    texts: list[str] = []
    done = False
    try:
        for raw in lines:
            line = raw.strip()
            if done or not line.startswith(b"data:"):
                continue  # comments, other SSE fields, and the end of the body after [DONE]
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            now = clock()
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                record.error = f"malformed stream frame: {payload[:200]!r}"
                break
            if not isinstance(chunk, dict) or "error" in chunk:
                record.error = f"error frame: {_error_message(chunk)}"
                break
            for choice in chunk.get("choices") or ():
                text = _chunk_text(record.api, choice)
                if text:
                    if last_token_at is None:
                        record.ttft_ms = (now - sent_at) * 1000.0
                    else:
                        record.itl_ms.append((now - last_token_at) * 1000.0)
                    last_token_at = now
                    chunks_with_text += 1
                    texts.append(text)
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            usage = chunk.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = usage.get("completion_tokens") or 0
                details = usage.get("prompt_tokens_details") or {}
                record.cached_tokens = details.get("cached_tokens")
    except Exception as exc:  # the transport broke mid-stream: that is what we measure, not a bug
        record.error = f"stream broken: {type(exc).__name__}: {exc}"
    record.e2e_ms = (clock() - sent_at) * 1000.0
    record.text = "".join(texts)
    if record.error is None and not done:
        record.error = "stream ended without [DONE]"
    if not record.output_tokens:
        record.output_tokens = chunks_with_text
    if record.error is None and record.output_tokens == 0:
        record.error = "stream carried no tokens"


def request_body(
    api: str,
    model: str,
    prompt: list[dict[str, str]] | str,
    output_len: int,
    *,
    force_length: bool = True,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """A streaming request asking for usage; `force_length` adds vLLM's `ignore_eos`/`min_tokens`
    (servers that do not know them ignore unknown fields, as the OpenAI wire format expects)."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": output_len,
        "temperature": temperature,
    }
    body["messages" if api == "chat" else "prompt"] = prompt
    if force_length:
        body["ignore_eos"] = True
        body["min_tokens"] = output_len
    return body
