"""Which prompt prefixes a replica was recently sent, as chunk hashes, bounded like its KV cache.

LRU over chunk hashes. A request's chunks are touched from the last to the first so that the
first chunks are the most recent: eviction then drops a prefix's tail before its head, as a real
prefix cache does, and `match` (leading chunks present) stays meaningful.

It also keeps the live prefixes' claims on the cache: for each prompt's first chunk (its anchor),
how many chunks that prefix holds - the whole prompt when first sent, then the part that the next
prompt with the same anchor shared (a tenant's system prompt, not each question after it). A claim
lives as long as its anchor does, so prefixes nobody sends any more age out with the LRU, and
`claimed` is what capacity-aware placement weighs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class PrefixIndex:
    def __init__(self, capacity_chunks: int) -> None:
        self.capacity = max(capacity_chunks, 1)
        self._chunks: OrderedDict[int, None] = OrderedDict()
        self._claims: dict[int, int] = {}
        self.claimed = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, chunk: int) -> bool:
        return chunk in self._chunks

    def anchors(self) -> Iterable[int]:
        return self._claims.keys()

    def match(self, hashes: list[int]) -> int:
        """How many leading chunks of the prompt this replica should still have cached."""
        chunks = self._chunks
        matched = 0
        for h in hashes:
            if h not in chunks:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[int], matched: int | None = None) -> list[int]:
        """Record a prompt sent here (`matched`: its leading chunks already here, if known);
        returns the anchors evicted to make room."""
        if not hashes:
            return []
        anchor = hashes[0]
        old = self._claims.get(anchor)
        if old is None:
            claim = min(len(hashes), self.capacity)
        else:
            claim = max(self.match(hashes) if matched is None else matched, 1)
        self._claims[anchor] = claim
        self.claimed += claim - (old or 0)
        chunks = self._chunks
        for h in reversed(hashes):
            if h in chunks:
                chunks.move_to_end(h)
            else:
                chunks[h] = None
        return self._evict()

    def resize(self, capacity_chunks: int) -> list[int]:
        self.capacity = max(capacity_chunks, 1)
        return self._evict()

    def _evict(self) -> list[int]:
        chunks, claims = self._chunks, self._claims
        evicted = []
        for _ in range(len(chunks) - self.capacity):
            h, _ = chunks.popitem(last=False)
            claim = claims.pop(h, None)
            if claim is not None:
                self.claimed -= claim
                evicted.append(h)
        return evicted
