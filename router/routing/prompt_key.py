"""The prompt as the replica will see it, in a form the router can hash without a tokenizer.

Chat messages become a canonical rendering (role and text of each message, in order, with
separators no text contains), which keeps the prefix property of a chat template: a conversation's
next turn starts with the rendering of everything before it. A request's `tools` come first, as
chat templates render them into the system prompt: they count towards the prompt's tokens and
requests with other tools share no prefix. Completions use the prompt text, or its token ids when
given as ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import orjson

Units = str | Sequence[int]


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            text
            for part in content
            if isinstance(part, dict) and isinstance(text := part.get("text"), str)
        )
    return ""


def _tools_text(tools: object) -> str:
    if not isinstance(tools, list) or not tools:
        return ""
    try:
        return orjson.dumps(tools).decode() + "\x1d"
    except orjson.JSONEncodeError:  # integers beyond 64 bits: the key goes without the tools
        return ""


def chat_units(messages: object, tools: object = None) -> str:
    if not isinstance(messages, list):
        return ""
    parts = [_tools_text(tools)]
    for m in messages:
        if isinstance(m, dict):
            content, role = m.get("content"), m.get("role")
            parts.append(role if isinstance(role, str) else "")
            parts.append("\x1f")
            parts.append(content if isinstance(content, str) else _text_of(content))
            parts.append("\x1e")
    return "".join(parts)


def completion_units(prompt: object) -> Units:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return prompt
        if isinstance(first, str):
            return "\x1e".join(p for p in prompt if isinstance(p, str))
        if isinstance(first, list):
            return [t for ids in prompt if isinstance(ids, list) for t in ids]
    return ""


def chunk_hashes(units: Units, chunk: int) -> list[int]:
    """Chained hashes of the full `chunk`-sized pieces: hash i identifies the whole prefix to i."""
    hashes: list[int] = []
    chain = 0
    if isinstance(units, str):
        for end in range(chunk, len(units) + 1, chunk):
            chain = hash((chain, units[end - chunk : end]))
            hashes.append(chain)
    else:
        for end in range(chunk, len(units) + 1, chunk):
            chain = hash((chain, *units[end - chunk : end]))
            hashes.append(chain)
    return hashes


def stable_anchor(units: Units, chunk: int) -> int:
    """A process-independent hash of the first chunk (0 when the prompt is shorter): every router
    instance breaks ties for a new prefix the same way, so they place it on the same replica."""
    if len(units) < chunk:
        return 0
    head = units[:chunk]
    data = head.encode() if isinstance(head, str) else repr(list(head)).encode()
    return (zlib.crc32(data) << 32 | zlib.adler32(data)) | 1
