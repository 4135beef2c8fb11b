"""Per-key FIFO sub-queues served round-robin: one key's burst waits behind its own requests, not
in front of everyone else's (fair queuing with equal weights, as a deficit round-robin whose every
request costs one).

Every operation is O(1): the keys are an OrderedDict rotated with `move_to_end`, and each key's
items an OrderedDict, so an item can leave from anywhere (a client that disconnects, a deadline)
without a scan.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class FairQueue(Generic[T]):
    """The key whose turn it is sits first in `_keys`; `pop` serves its oldest item and passes the
    turn on. A key with nothing queued leaves the rotation, and rejoins it at the back."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, OrderedDict[T, None]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def keys(self) -> int:
        """Keys with something queued."""
        return len(self._keys)

    def count(self, key: str) -> int:
        items = self._keys.get(key)
        return len(items) if items is not None else 0

    def push(self, key: str, item: T) -> None:
        items = self._keys.get(key)
        if items is None:
            items = self._keys[key] = OrderedDict()
        items[item] = None
        self._size += 1

    def peek(self) -> T:
        """The oldest item of the key whose turn it is (the queue must not be empty)."""
        items = next(iter(self._keys.values()))
        return next(iter(items))

    def pop(self) -> T:
        """Take `peek()`'s item and pass the turn to the next key."""
        key, items = next(iter(self._keys.items()))
        item, _ = items.popitem(last=False)
        self._size -= 1
        if items:
            self._keys.move_to_end(key)
        else:
            del self._keys[key]
        return item

    def skip(self) -> None:
        """Pass the turn on without serving this key (its head cannot be served now)."""
        self._keys.move_to_end(next(iter(self._keys)))

    def remove(self, key: str, item: T) -> bool:
        """Take `item` out wherever it is; False when it was not queued under `key`."""
        items = self._keys.get(key)
        if items is None or item not in items:
            return False
        del items[item]
        self._size -= 1
        if not items:
            del self._keys[key]
        return True
