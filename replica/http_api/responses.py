"""OpenAI response bodies and stream chunks, built as plain dicts (serialised with orjson).

Shapes follow the official spec: keys the spec requires are always present (null where empty), the
streamed `usage` is null on every chunk but the final `choices: []` one when the client asked for it,
and logprobs never carry non-finite numbers (JSON has none; OpenAI uses -9999.0 for "very unlikely").
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from replica.engine.outputs import TokenLogprob
from replica.http_api.token_text import TokenTexts

VERY_UNLIKELY = -9999.0


def _finite(logprob: float | None) -> float | None:
    if logprob is None or math.isfinite(logprob):
        return logprob
    return VERY_UNLIKELY


@dataclass(frozen=True)
class ResponseHead:
    """The fields every chunk of one response repeats unchanged."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseHead:
        return cls(f"{prefix}-{uuid.uuid4().hex}", model)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _envelope(head: ResponseHead, obj: str, choices: list[dict]) -> dict:
    return {
        "id": head.id,
        "object": obj,
        "created": head.created,
        "model": head.model,
        "choices": choices,
    }


# --- /v1/completions -----------------------------------------------------------------------------


def completion_choice(
    index: int, text: str, logprobs: dict | None, finish_reason: str | None
) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(head: ResponseHead, choices: list[dict], usage_: dict) -> dict:
    body = _envelope(head, "text_completion", choices)
    body["usage"] = usage_
    return body


def completion_chunk(head: ResponseHead, choice: dict, include_usage: bool) -> dict:
    body = _envelope(head, "text_completion", [choice])
    if include_usage:
        body["usage"] = None
    return body


class CompletionLogprobs:
    """The completions-API logprobs object of one choice, built token by token.

    `text_offset` counts characters from the start of the choice's `text` (which begins with the
    prompt when echo is on), so it keeps running across streamed chunks.
    """

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.offset = 0

    def build(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None]) -> dict:
        """`logprobs[i]` belongs to `token_ids[i]`; None (a prompt's first token) gives nulls."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float | None] | None] = []
        text_offset: list[int] = []
        for token_id, lp in zip(token_ids, logprobs, strict=True):
            text = self.texts.text(token_id)
            tokens.append(text)
            if lp is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(_finite(lp.logprob))
                top = {self.texts.text(t): _finite(v) for t, v in lp.top}
                top[text] = _finite(lp.logprob)
                top_logprobs.append(top)
            text_offset.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


# --- /v1/chat/completions ------------------------------------------------------------------------


def chat_choice(
    index: int,
    content: str | None,
    logprobs: dict | None,
    finish_reason: str | None,
    tool_calls: list[dict] | None = None,
) -> dict:
    message: dict = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_response(head: ResponseHead, choices: list[dict], usage_: dict) -> dict:
    body = _envelope(head, "chat.completion", choices)
    body["usage"] = usage_
    return body


def chat_chunk(
    head: ResponseHead,
    index: int,
    delta: dict,
    logprobs: dict | None,
    finish_reason: str | None,
    include_usage: bool,
) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    body = _envelope(head, "chat.completion.chunk", [choice])
    if include_usage:
        body["usage"] = None
    return body


def chat_logprobs(
    logprobs: Sequence[TokenLogprob], texts: TokenTexts, top_n: int
) -> dict[str, list[dict] | None]:
    """`{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`."""
    content = []
    for lp in logprobs:
        text, raw = texts.get(lp.token_id)
        alternatives = []
        for alt_id, alt_lp in lp.top[:top_n]:
            alt_text, alt_raw = texts.get(alt_id)
            alternatives.append({"token": alt_text, "logprob": _finite(alt_lp), "bytes": alt_raw})
        content.append(
            {
                "token": text,
                "logprob": _finite(lp.logprob),
                "bytes": raw,
                "top_logprobs": alternatives,
            }
        )
    return {"content": content, "refusal": None}


def usage_chunk(head: ResponseHead, obj: str, usage_: dict) -> dict:
    """The last chunk before `[DONE]` when `stream_options.include_usage` is true."""
    body = _envelope(head, obj, [])
    body["usage"] = usage_
    return body
