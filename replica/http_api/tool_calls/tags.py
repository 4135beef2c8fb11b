"""Finding a marker (`<tool_call>`, `[TOOL_CALLS]`) in streamed text without missing one that
arrives split across deltas."""

from __future__ import annotations


def split_at_marker(text: str, marker: str) -> tuple[str, str | None]:
    """(text before the marker, text after it) when `text` holds the marker; else (the text that
    can be let go, None): all but a tail that may be the marker's beginning."""
    at = text.find(marker)
    if at >= 0:
        return text[:at], text[at + len(marker) :]
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size], None
    return text, None


def held_tail(text: str, marker: str) -> str:
    """The tail of `text` that `split_at_marker` keeps back."""
    free, _ = split_at_marker(text, marker)
    return text[len(free) :]
