"""Hermes-style calls (Qwen2.5, Qwen3, Hermes 2/3, many fine-tunes): each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, text may surround them."""

from __future__ import annotations

import json

from replica.http_api.tool_calls.events import Event, ToolCallParser, call_arguments
from replica.http_api.tool_calls.tags import split_at_marker

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolCallParser):
    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._in_call = False
        self._searched = 0  # of _buf, for the closing tag (so long calls are scanned once)

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while True:
            if not self._in_call:
                before, after = split_at_marker(self._buf, OPEN)
                out += self._content(before)
                if after is None:
                    self._buf = self._buf[len(before) :]
                    return out
                self._buf, self._in_call, self._searched = after, True, 0
                continue
            at = self._buf.find(CLOSE, self._searched)
            if at < 0:
                self._searched = max(0, len(self._buf) - len(CLOSE) + 1)
                return out
            body, self._buf, self._in_call = self._buf[:at], self._buf[at + len(CLOSE) :], False
            out += self._block(body, CLOSE)

    def finish(self) -> list[Event]:
        """A call the end of sequence cut before its closing tag still counts if its JSON is whole."""
        out = self._block(self._buf, "") if self._in_call else self._content(self._buf)
        self._buf, self._in_call = "", False
        return out + self._end()

    def _block(self, body: str, close: str) -> list[Event]:
        try:
            call = json.loads(body)
        except (ValueError, RecursionError):
            call = None
        arguments = call_arguments(call, "arguments", "parameters")
        if arguments is None:
            return self._raw_content(OPEN + body + close)
        return self._call(call["name"], arguments)
