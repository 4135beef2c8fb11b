"""Llama 3.1-3.3 JSON tool calling: the whole answer is the call(s), `{"name": ..., "parameters":
{...}}` objects separated by "; ", possibly after `<|python_tag|>`; any other answer is content."""

from __future__ import annotations

import json

from replica.http_api.tool_calls.events import Event, ToolCallParser, call_arguments
from replica.http_api.tool_calls.json_scan import JsonEndScanner

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = "start"  # then "calls" (the answer opened with a call) or "text"
        self._buf = ""  # text not yet judged
        self._scanner: JsonEndScanner | None = None
        self._scanned = 0  # of _buf, by the scanner
        self._need_separator = False
        self._prefix = ""  # leading space and tag: content again if no call follows

    def feed(self, text: str) -> list[Event]:
        if self._state == "text":
            return self._content(text)
        self._buf += text
        if self._state == "start":
            head = self._buf.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return []
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :]
            elif not head.startswith("{"):
                return self._to_text(self._buf)
            self._prefix = self._buf[: len(self._buf) - len(head)]
            self._buf, self._state = head, "calls"
        return self._scan()

    def _scan(self) -> list[Event]:
        out: list[Event] = []
        while True:
            if self._scanner is None:
                rest = self._buf.lstrip()
                if not rest:
                    return out
                if self._need_separator:
                    if rest[0] != ";":
                        return out + self._to_text(rest)
                    self._buf, self._need_separator = rest[1:], False
                    continue
                if rest[0] != "{":
                    return out + self._to_text(rest)
                self._buf, self._scanner, self._scanned = rest, JsonEndScanner(), 0
            end = self._scanner.feed(self._buf[self._scanned :])
            if end is None:
                self._scanned = len(self._buf)
                return out
            end += self._scanned
            obj, rest = self._buf[:end], self._buf[end:]
            self._scanner = None
            try:
                arguments = call_arguments(json.loads(obj), "parameters", "arguments")
            except (ValueError, RecursionError):
                arguments = None
            if arguments is None:
                return out + self._to_text(self._buf)
            out += self._call(json.loads(obj)["name"], arguments)
            self._buf, self._need_separator = rest, True

    def _to_text(self, text: str) -> list[Event]:
        """Not (or no longer) calls: this and all that follows is content."""
        self._state, self._buf, self._scanner = "text", "", None
        return self._raw_content(self._unused_prefix() + text)

    def _unused_prefix(self) -> str:
        prefix, self._prefix = self._prefix, ""
        return "" if self.calls else prefix

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._state == "start":
            out = self._content(self._buf)
        elif self._buf.strip() or (self._prefix and not self.calls):
            out = self._raw_content(self._unused_prefix() + self._buf)
        self._buf, self._scanner = "", None
        return out + self._end()
