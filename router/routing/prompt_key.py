"""The prompt as the replica will see it, in a form the router can hash without a tokenizer.

Chat messages become a canonical rendering (role and text of each message, in order, with
separators no text contains), which keeps the prefix property of a chat template: a conversation's
next turn starts with the rendering of everything before it. A request's `tools` come first, as
chat templates render them into the system prompt: they count towards the prompt's tokens and
requests with other tools share no prefix. Completions use the prompt text, or its token ids when
given as ids.

A key stops at MAX_KEY_CHARS characters or MAX_KEY_IDS token ids (~250k tokens, beyond nearly
every model's context): building and hashing all of an 8 MiB body of a million one-token prompts
held the router's event loop for most of a second, and what lies that deep in a prompt cannot
change where it goes. Token estimates of longer prompts stop there too, so they are not learned
from (routing/tokens.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import orjson

Units = str | Sequence[int]
MAX_KEY_CHARS = 1 << 20
MAX_KEY_IDS = 1 << 18


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
    size = len(parts[0])
    for m in messages:
        if isinstance(m, dict):
            content, role = m.get("content"), m.get("role")
            text = content if isinstance(content, str) else _text_of(content)
            name = role if isinstance(role, str) else ""
            parts += (name, "\x1f", text, "\x1e")
            size += len(name) + len(text) + 2
            if size >= MAX_KEY_CHARS:
                break
    return "".join(parts)[:MAX_KEY_CHARS]


def completion_units(prompt: object) -> Units:
    if isinstance(prompt, str):
        return prompt[:MAX_KEY_CHARS]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return prompt[:MAX_KEY_IDS]
        if isinstance(first, str):
            return _joined_texts(prompt)
        if isinstance(first, list):
            return _joined_ids(prompt)
    return ""


def _joined_texts(prompts: list[object]) -> str:
    texts: list[str] = []
    size = 0
    for p in prompts:
        if isinstance(p, str):
            texts.append(p)
            size += len(p) + 1
            if size >= MAX_KEY_CHARS:
                break
    return "\x1e".join(texts)[:MAX_KEY_CHARS]


def _joined_ids(prompts: list[object]) -> list[int]:
    ids: list[int] = []
    for p in prompts:
        if isinstance(p, list):
            ids += p
            if len(ids) >= MAX_KEY_IDS:
                return ids[:MAX_KEY_IDS]
    return ids


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
