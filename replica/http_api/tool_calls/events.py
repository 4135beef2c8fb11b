"""What every tool-call parser yields, and the content handling they share.

A parser takes the model's text deltas and yields `ContentDelta`s (text for `content`) and
`ToolCallDelta`s (a call's first delta carries its id and name, later ones argument pieces), so the
streamed chunks and the whole answer are built from the same events (assemble.py)."""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` and 24 random letters and digits, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int  # of the call within its choice
    id: str | None  # set on a call's first delta only, with its name
    name: str | None
    arguments: str  # a piece of the arguments' JSON text


Event = ContentDelta | ToolCallDelta


def call_arguments(call: Any, *keys: str) -> str | None:
    """A parsed call object's name checked and its arguments as compact JSON text; None when it is
    not a call. Arguments may be an object or (as some fine-tunes write) an object's JSON text."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    key = next((k for k in keys if k in call), None)
    arguments = {} if key is None else call[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)


class ToolCallParser(ABC):
    """One choice's parser. Subclasses find calls; this class owns the content around them.

    Whitespace touching a call is dropped (models put newlines between calls); a parser emits
    whitespace only once text follows it, so it can still drop it, and emits it at the end of an
    answer without calls, so that plain answers come back exactly as generated."""

    def __init__(self) -> None:
        self.calls = 0
        self._held_space = ""
        self._after_call = False

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of generated text."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """Events for whatever was held back, at the end of the answer."""

    def _content(self, text: str) -> list[Event]:
        body = text.rstrip()
        if not body:
            if not self._after_call:
                self._held_space += text
            return []
        if self._after_call:
            body, self._after_call = body.lstrip(), False
        out = self._held_space + body
        self._held_space = text[len(text.rstrip()) :]
        return [ContentDelta(out)]

    def _raw_content(self, text: str) -> list[Event]:
        """Text that looked like a call but was not: all of it, with the space before it."""
        self._after_call = False
        return self._content(text)

    def _call(self, name: str, arguments: str) -> list[Event]:
        index, self.calls = self.calls, self.calls + 1
        self._held_space, self._after_call = "", True
        return [ToolCallDelta(index, new_call_id(), name, arguments)]

    def _end(self) -> list[Event]:
        space, self._held_space = self._held_space, ""
        return [ContentDelta(space)] if space and not self.calls else []
