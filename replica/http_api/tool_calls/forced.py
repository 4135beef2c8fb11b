"""Parsers of constrained answers (`tool_choice` "required" or a named function, see schema.py):
the grammar guarantees the JSON, so argument pieces leave as soon as they are generated.

Named function: the answer is the arguments object itself. "required": `{"name": ..., "arguments":
{...}}`, or a list of them with parallel calls, written without free whitespace, name first."""

from __future__ import annotations

import re

from replica.http_api.tool_calls.events import Event, ToolCallDelta, ToolCallParser
from replica.http_api.tool_calls.json_scan import JsonEndScanner

_ARGUMENTS_KEY = '"arguments": '
_NAME = re.compile(r'"name": "([^"]*)"')


class NamedCallParser(ToolCallParser):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[Event]:
        out = [] if self.calls else self._call(self.name, "")
        if text:
            out.append(ToolCallDelta(0, None, None, text))
        return out

    def finish(self) -> list[Event]:
        return [] if self.calls else self._call(self.name, "")


class ChosenCallsParser(ToolCallParser):
    def __init__(self) -> None:
        super().__init__()
        self._state = "between"  # then "header" (`{"name": ...`), "arguments", "tail" (its `}`)
        self._header = ""
        self._scanner = JsonEndScanner()

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        i = 0
        while i < len(text):
            if self._state == "arguments":
                end = self._scanner.feed(text[i:])
                stop = len(text) if end is None else i + end
                out.append(ToolCallDelta(self.calls - 1, None, None, text[i:stop]))
                i = stop
                if end is not None:
                    self._state = "tail"
                continue
            ch = text[i]
            i += 1
            if self._state == "between" and ch == "{":
                self._state, self._header = "header", ch
            elif self._state == "header":
                self._header += ch
                if self._header.endswith(_ARGUMENTS_KEY):
                    name = _NAME.search(self._header)
                    out += self._call(name.group(1) if name else "", "")
                    self._state, self._scanner = "arguments", JsonEndScanner()
            elif self._state == "tail" and ch == "}":
                self._state = "between"
        return out

    def finish(self) -> list[Event]:
        return []
