"""Incremental detokenization and stop-string handling for one sequence.

Byte-level BPE tokens can end inside a UTF-8 character, so text is only released once the decoded
window stops ending in U+FFFD (the classic prefix/read offset scheme). Stop strings are found by an
automaton fed only the new text (see stop_matcher.py); the tail that could still grow into a stop
string is held back from streams until it is resolved.
"""

from __future__ import annotations

from collections.abc import Callable

from replica.engine.stop_matcher import StopMatcher, StopScanner

# Tokens of prompt context decoded along with the first output tokens, so that tokenizers whose
# decoders treat a leading token specially (e.g. SentencePiece's leading space) decode correctly.
_PROMPT_CONTEXT = 5

Decode = Callable[[list[int], bool], str]


class IncrementalDetokenizer:
    def __init__(
        self,
        decode: Decode,
        prompt_token_ids: list[int],
        stop: StopMatcher | list[str],
        include_stop: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.decode = decode
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        matcher = stop if isinstance(stop, StopMatcher) else StopMatcher(stop)
        self.stop = matcher.stops
        self.include_stop = include_stop
        self.scanner = StopScanner(matcher) if matcher.stops else None

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
        return self._append(new_text, check_stop)

    def flush(self) -> None:
        """At the end, release bytes still waiting for a character to complete (as U+FFFD)."""
        if self.read_offset < len(self.ids):
            prefix = self.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
            full = self.decode(self.ids[self.prefix_offset :], self.skip_special)
            self._append(full[len(prefix) :], check_stop=False)
            self.read_offset = len(self.ids)

    def _append(self, new_text: str, check_stop: bool) -> str | None:
        """Add decoded text; cut it at the earliest stop string that ends in it, if checking."""
        offset = len(self.text)
        self.text += new_text
        if self.scanner is None:
            return None
        found = self.scanner.feed(new_text, offset)
        if found is None or not check_stop:
            return None
        at, length = found
        stop = self.text[at : at + length]
        self.text = self.text[: at + length if self.include_stop else at]
        return stop

    def safe_length(self) -> int:
        """How much of the text can be shown: all but a tail that may begin a stop string."""
        held = 0 if self.scanner is None else self.scanner.held
        return len(self.text) - min(held, len(self.text))
