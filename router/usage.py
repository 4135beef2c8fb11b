"""The `usage` of a whole (non-streamed) answer, found without parsing the answer.

A key is settled from the replica's own usage; parsing a whole answer for it costs memory and CPU
in proportion to the answer (a 9 MB answer took 91 MB to parse). The usage object sits at the
answer's top level and holds no strings, so the last `"usage":` key names it (a `"usage"` inside
generated text is escaped as `\\"usage\\"` and cannot match); only that object is parsed.
"""

from __future__ import annotations

from typing import TypedDict, cast

import orjson

_KEY = b'"usage"'
_MAX_NESTING = 4  # usage holds at most one nested object (prompt_tokens_details) today


class Usage(TypedDict, total=False):
    """OpenAI's `usage` object, the fields the router reads. It comes from a replica unchecked,
    so readers still treat a missing or null field as 0 and check a count is an int."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage_of_answer(body: bytes) -> Usage | None:
    at = body.rfind(_KEY)
    if at < 0:
        return None
    start = body.find(b"{", at + len(_KEY), at + len(_KEY) + 8)
    if start < 0:
        return None
    end = start
    for _ in range(_MAX_NESTING):
        end = body.find(b"}", end + 1)
        if end < 0:
            return None
        if body.count(b"{", start, end) == body.count(b"}", start, end + 1):  # balanced
            try:
                usage = orjson.loads(body[start : end + 1])
            except orjson.JSONDecodeError:
                return None
            return cast(Usage, usage) if isinstance(usage, dict) else None
    return None
