"""Stop strings found by one Aho-Corasick automaton, so the work per generated character does not
grow with the number of stop strings (a loop over them ran inside the shared engine step, so a
request with thousands of stops slowed every other request).

The automaton is built once per request (off the step thread by the server) and shared by its `n`
sequences; each sequence keeps only its current state. That state also answers what streams must
hold back: its depth is the longest tail of the text that may still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

_ROOT = 0
_CODES = 0x110000  # one past the largest code point: transitions are keyed node * _CODES + ord


class StopMatcher:
    """The immutable automaton of a request's stop strings."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self.max_len = max((len(s) for s in self.stops), default=0)
        self._goto: dict[int, int] = {}
        self.depth = [0]
        self._fail = [_ROOT]
        self._longest = [0]  # per state: length of the longest stop ending there (0: none)
        parents, codes = [_ROOT], [0]
        for stop in self.stops:
            node = _ROOT
            for ch in stop:
                key = node * _CODES + ord(ch)
                child = self._goto.get(key)
                if child is None:
                    child = self._goto[key] = len(self.depth)
                    self.depth.append(self.depth[node] + 1)
                    self._fail.append(_ROOT)
                    self._longest.append(0)
                    parents.append(node)
                    codes.append(ord(ch))
                node = child
            self._longest[node] = len(stop)
        self._link(parents, codes)

    def _link(self, parents: list[int], codes: list[int]) -> None:
        """Failure links in breadth-first order (a node's parent is linked before it)."""
        for node in sorted(range(1, len(self.depth)), key=self.depth.__getitem__):
            parent = parents[node]
            if parent != _ROOT:
                self._fail[node] = self.step(self._fail[parent], codes[node])
            if not self._longest[node]:
                self._longest[node] = self._longest[self._fail[node]]

    def step(self, state: int, code: int) -> int:
        """The state after one more character (amortised O(1))."""
        goto = self._goto
        while True:
            child = goto.get(state * _CODES + code)
            if child is not None:
                return child
            if state == _ROOT:
                return _ROOT
            state = self._fail[state]

    def longest_ending(self, state: int) -> int:
        return self._longest[state]


class StopScanner:
    """One sequence's position in the automaton, fed the text as it is decoded."""

    def __init__(self, matcher: StopMatcher) -> None:
        self.matcher = matcher
        self.state = _ROOT

    def feed(self, text: str, offset: int) -> tuple[int, int] | None:
        """Advance over `text`, which starts at `offset` in the whole text. Returns (start, length)
        of the earliest-starting stop string that ends inside `text`, if any."""
        matcher, state = self.matcher, self.state
        best: tuple[int, int] | None = None
        for i, ch in enumerate(text):
            state = matcher.step(state, ord(ch))
            length = matcher.longest_ending(state)
            if length:
                start = offset + i + 1 - length
                if best is None or start < best[0]:
                    best = (start, length)
        self.state = state
        return best

    @property
    def held(self) -> int:
        """How many trailing characters may still begin a stop string."""
        return self.matcher.depth[self.state]
