"""Incremental detokenization and stop-string handling for one sequence.

Byte-level BPE tokens can end inside a UTF-8 character, so text is only released once the decoded
window stops ending in U+FFFD (the classic prefix/read offset scheme). Stop strings are searched in
the new text plus the tail that could complete one; the tail that could still grow into a stop string
is held back from streams until it is resolved.
"""

from __future__ import annotations

from collections.abc import Callable

# Tokens of prompt context decoded along with the first output tokens, so that tokenizers whose
# decoders treat a leading token specially (e.g. SentencePiece's leading space) decode correctly.
_PROMPT_CONTEXT = 5

Decode = Callable[[list[int], bool], str]


class IncrementalDetokenizer:
    def __init__(
        self,
        decode: Decode,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.decode = decode
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Decode one more token; returns the stop string if the text now contains one.

        The text is then cut right before the stop string (or right after it when it is to be
        included). With `check_stop` false (min_tokens not reached yet) stop strings are ignored.
        """
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = self.decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new_text
        return self._find_stop(len(new_text)) if self.stop and check_stop else None

    def flush(self) -> None:
        """At the end, release bytes still waiting for a character to complete (as U+FFFD)."""
        if self.read_offset < len(self.ids):
            prefix = self.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
            full = self.decode(self.ids[self.prefix_offset :], self.skip_special)
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)

    def _find_stop(self, new_chars: int) -> str | None:
        start = max(0, len(self.text) - new_chars - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop) if self.include_stop else at]
        return stop

    def safe_length(self) -> int:
        """How much of the text can be shown: all but a tail that may begin a stop string."""
        text = self.text
        for held in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-held:]
            if any(stop.startswith(tail) for stop in self.stop):
                return len(text) - held
        return len(text)
