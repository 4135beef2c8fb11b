"""Mistral's calls after the `[TOOL_CALLS]` control token: a JSON list of `{"name", "arguments"}`
objects (v3 tokenizers: Mistral 7B v0.3, Mixtral 8x22B, Nemo) or `name[ARGS]{...}` (v11+: Small 3,
Large 2411), optionally `name[CALL_ID]id[ARGS]{...}`; text before the token is content.

The token is a special one: the chat route keeps special tokens in the text for this parser."""

from __future__ import annotations

import json
import re
from typing import Any

from replica.http_api.tool_calls.events import Event, ToolCallParser, call_arguments
from replica.http_api.tool_calls.json_scan import JsonEndScanner
from replica.http_api.tool_calls.tags import split_at_marker

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_HEADER = re.compile(r"([A-Za-z0-9_.-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?")
_HEADER_CHARS = re.compile(r"[A-Za-z0-9_.\-\[\]]*")


class MistralParser(ToolCallParser):
    keeps_special_tokens = True

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._in_calls = False
        self._scanner: JsonEndScanner | None = None
        self._scanned = 0
        self._start = 0  # where the JSON being scanned starts in _buf

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while True:
            if not self._in_calls:
                before, after = split_at_marker(self._buf, MARKER)
                out += self._content(before)
                if after is None:
                    self._buf = self._buf[len(before) :]
                    return out
                self._buf, self._in_calls = after.lstrip(), True
                continue
            step = self._step()
            if step is None:
                return out
            out += step

    def _step(self) -> list[Event] | None:
        """Events once the call(s) after a marker are judged, the rest left in _buf; None to wait."""
        if self._scanner is None:
            start = self._json_start()
            if start is None or isinstance(start, list):
                return start
            self._scanner, self._scanned, self._start = JsonEndScanner(), start, start
        end = self._scanner.feed(self._buf[self._scanned :])
        if end is None:
            self._scanned = len(self._buf)
            return None
        end += self._scanned
        head, value, rest = self._buf[: self._start], self._buf[self._start : end], self._buf[end:]
        self._scanner, self._in_calls = None, False
        calls = self._calls(head, value)
        if calls is None:
            self._buf = ""
            return self._raw_content(MARKER + head + value + rest)
        self._buf = rest
        return [e for name, arguments in calls for e in self._call(name, arguments)]

    def _json_start(self) -> int | list[Event] | None:
        """Where the JSON after the marker (and a `name[ARGS]` header) starts; events when what
        follows the marker is no call; None while that cannot be told yet."""
        if self._buf.startswith("["):
            return 0
        at = self._buf.find(ARGS)
        if at < 0:
            if _HEADER_CHARS.fullmatch(self._buf) and len(self._buf) <= 256:
                return None
            return self._not_calls()
        start = at + len(ARGS)
        if start >= len(self._buf):
            return None
        if self._buf[start] != "{" or not _HEADER.fullmatch(self._buf[:at]):
            return self._not_calls()
        return start

    def _not_calls(self) -> list[Event]:
        text, self._buf, self._in_calls = self._buf, "", False
        return self._raw_content(MARKER + text)

    @staticmethod
    def _calls(head: str, value: str) -> list[tuple[str, str]] | None:
        try:
            parsed: Any = json.loads(value)
        except (ValueError, RecursionError):
            return None
        if head:
            header = _HEADER.fullmatch(head[: -len(ARGS)])
            assert header is not None
            parsed = [{"name": header.group(1), "arguments": parsed}]
        if not isinstance(parsed, list) or not parsed:
            return None
        calls = []
        for call in parsed:
            arguments = call_arguments(call, "arguments")
            if arguments is None:
                return None
            calls.append((call["name"], arguments))
        return calls

    def finish(self) -> list[Event]:
        text = MARKER + self._buf if self._in_calls else self._buf
        out = self._raw_content(text) if self._in_calls else self._content(text)
        self._buf, self._in_calls, self._scanner = "", False, None
        return out + self._end()
