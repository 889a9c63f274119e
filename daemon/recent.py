"""Recently seen keys, bounded by count and age: the dispatcher's one
de-duplicator (trade ids two sources both bring, publish idempotency keys).

Sans-IO: time is passed in (seconds, any clock). Keys are kept in insertion
order, so forgetting the oldest is O(1).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class Recent(Generic[V]):
    """The last ``size`` keys added, none older than ``max_age`` seconds, each
    with a value (what the first one was answered, for example)."""

    def __init__(self, size: int, max_age: float = math.inf) -> None:
        self.size = size
        self.max_age = max_age
        self._entries: dict[Hashable, tuple[V, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, oldest first."""
        return iter(self._entries)

    def get(self, key: Hashable, now: float) -> V | None:
        """The value of ``key`` if it was added within ``max_age`` of ``now``."""
        entry = self._entries.get(key)
        if entry is None or now - entry[1] > self.max_age:
            return None
        return entry[0]

    def add(self, key: Hashable, value: V, now: float) -> None:
        """Remember ``key`` with ``value`` at ``now``; forget the oldest keys beyond
        ``size`` or ``max_age``."""
        entries = self._entries
        entries.pop(key, None)  # added again (after its window): the newest, not in its old place
        entries[key] = (value, now)
        if len(entries) > self.size:
            del entries[next(iter(entries))]
        if self.max_age != math.inf:
            oldest = now - self.max_age
            while entries:
                first = next(iter(entries))
                if entries[first][1] >= oldest:
                    break
                del entries[first]
