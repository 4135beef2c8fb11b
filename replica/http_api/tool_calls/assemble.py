"""Events (events.py) into OpenAI's shapes: a whole answer's `message` fields, or one streamed
chunk's `delta` with `tool_calls` pieces that the SDK reassembles by index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replica.http_api.tool_calls.events import ContentDelta, Event, ToolCallDelta


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class AssembledMessage:
    content: str | None  # None when the answer is only calls, as OpenAI answers
    tool_calls: list[ToolCall]


def assemble(events: Sequence[Event]) -> AssembledMessage:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[ToolCallDelta]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            calls.setdefault(e.index, []).append(e)
    tool_calls = [
        ToolCall(
            index, pieces[0].id or "", pieces[0].name or "", "".join(p.arguments for p in pieces)
        )
        for index, pieces in sorted(calls.items())
    ]
    return AssembledMessage(content if content or not tool_calls else None, tool_calls)


def delta_fields(events: Sequence[Event]) -> dict:
    """One chunk's `delta`: content joined, each call's pieces merged (a first piece carries its
    id, type and name)."""
    delta: dict = {}
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if content:
        delta["content"] = content
    pieces: list[dict] = []
    for e in events:
        if not isinstance(e, ToolCallDelta):
            continue
        if pieces and pieces[-1]["index"] == e.index:
            pieces[-1]["function"]["arguments"] += e.arguments
        elif e.id is not None:
            function = {"name": e.name, "arguments": e.arguments}
            pieces.append({"index": e.index, "id": e.id, "type": "function", "function": function})
        else:
            pieces.append({"index": e.index, "function": {"arguments": e.arguments}})
    if pieces:
        delta["tool_calls"] = pieces
    return delta
