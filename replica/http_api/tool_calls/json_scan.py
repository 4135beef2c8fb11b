"""Where a JSON object or array ends in text that arrives in pieces, in one pass over each piece.

Only brackets and strings are tracked: whether the value is valid is json.loads' job once it ends.
"""

from __future__ import annotations

_OPEN, _CLOSE = "{[", "}]"


class JsonEndScanner:
    """Fed the text of one value from its opening bracket on; `feed` returns the offset just past
    its closing bracket within the piece that holds it, else None."""

    def __init__(self) -> None:
        self.depth = 0
        self._in_string = False
        self._escaped = False
        self.done = False

    def feed(self, text: str) -> int | None:
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in _OPEN:
                self.depth += 1
            elif ch in _CLOSE:
                self.depth -= 1
                if self.depth <= 0:
                    self.done = True
                    return i + 1
        return None
