"""Tool calling on the chat route (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).

request.py    the request's tools and choice checked (400s naming the field)
schema.py     the JSON schema a "required" or named choice constrains the answer to
events.py     what parsers yield (content and call deltas) and the content rules they share
hermes.py, llama3.py, mistral.py   one parser per model family's call format
forced.py     the parsers of constrained answers
registry.py   parsers by `--tool-call-parser` name; `auto` from the chat template
assemble.py   events into a whole `message` or a streamed `delta`
"""

from replica.http_api.tool_calls.assemble import AssembledMessage, ToolCall, assemble, delta_fields
from replica.http_api.tool_calls.events import ContentDelta, Event, ToolCallDelta, ToolCallParser
from replica.http_api.tool_calls.registry import (
    PARSER_NAMES,
    detect_parser,
    forced_parser,
    keeps_special_tokens,
    make_parser,
    resolve_parser,
)

__all__ = [
    "PARSER_NAMES",
    "AssembledMessage",
    "ContentDelta",
    "Event",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "assemble",
    "delta_fields",
    "detect_parser",
    "forced_parser",
    "keeps_special_tokens",
    "make_parser",
    "resolve_parser",
]
