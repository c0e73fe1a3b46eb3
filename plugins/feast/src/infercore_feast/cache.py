"""A bounded LRU cache whose entries expire after a fixed time to live."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: What :meth:`TTLCache.get` returns for a key it does not hold (or holds expired).
MISSING = _Missing()


class TTLCache(Generic[V]):
    """Recent values by key: least recently used entries go first, every entry lives ``ttl_s``.

    An expired entry is kept ``stale_s`` longer for :meth:`get_stale` (a fallback when the
    source of the values fails); :meth:`get` never returns it. A ``ttl_s`` or ``max_entries``
    of 0 turns the cache off (every lookup misses). Not thread-safe: the feature source uses
    it from the event loop only.

    Attributes:
        clock: Monotonic seconds; tests may replace it.
    """

    __slots__ = ("_data", "clock", "max_entries", "stale_s", "ttl_s")

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        stale_s: float = 0.0,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.stale_s = stale_s
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> V | _Missing:
        """The value cached for ``key``, or :data:`MISSING`."""
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        expires_at, now = entry[0], self.clock()
        if expires_at <= now:
            if expires_at + self.stale_s <= now:
                del self._data[key]
            return MISSING
        self._data.move_to_end(key)
        return entry[1]

    def get_stale(self, key: str) -> V | _Missing:
        """The value cached for ``key`` even if it expired, up to ``stale_s`` ago; else
        :data:`MISSING`."""
        entry = self._data.get(key)
        if entry is None or entry[0] + self.stale_s <= self.clock():
            return MISSING
        return entry[1]

    def put(self, key: str, value: V) -> None:
        """Cache ``value`` for ``ttl_s``, evicting the least recently used entries when full."""
        if not self.enabled:
            return
        self._data[key] = (self.clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def discard_where(self, predicate: Callable[[V], bool]) -> int:
        """Drop every entry (expired ones too) whose value ``predicate`` holds for; how many."""
        data = self._data
        keys = [key for key, (_, held) in data.items() if predicate(held)]
        for key in keys:
            del data[key]
        return len(keys)

    def clear(self) -> None:
        self._data.clear()
