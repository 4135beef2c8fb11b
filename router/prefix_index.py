"""Which prompt prefixes a replica was recently sent, as chunk hashes, bounded like its KV cache.

LRU over chunk hashes. A request's chunks are touched from the last to the first so that the
first chunks are the most recent: eviction then drops a prefix's tail before its head, as a real
prefix cache does, and `match` (leading chunks present) stays meaningful.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, capacity_chunks: int) -> None:
        self.capacity = max(capacity_chunks, 1)
        self._chunks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def match(self, hashes: list[int]) -> int:
        """How many leading chunks of the prompt this replica should still have cached."""
        chunks = self._chunks
        matched = 0
        for h in hashes:
            if h not in chunks:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[int]) -> None:
        chunks = self._chunks
        for h in reversed(hashes):
            if h in chunks:
                chunks.move_to_end(h)
            else:
                chunks[h] = None
        overflow = len(chunks) - self.capacity
        for _ in range(overflow):
            chunks.popitem(last=False)

    def resize(self, capacity_chunks: int) -> None:
        self.capacity = max(capacity_chunks, 1)
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
