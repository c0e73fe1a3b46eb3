"""A bounded LRU cache whose entries expire after a fixed time to live."""

from __future__ import annotations

import math
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

#: What an entry costs besides its key's characters and the size its value is put with:
#: the ``OrderedDict``'s slots and linked-list node, the ``(expires_at, value, nbytes)``
#: tuple, its float and int, and the key's ``str`` header (CPython 3.11, 64 bits: 260 bytes
#: measured with tracemalloc, ``benchmarks/bench_cache.py``).
ENTRY_BYTES = 260

#: Expired entries :meth:`TTLCache.put` drops from the least recently used end, at most, on
#: each put: more than the one entry a put adds, so a backlog of expired entries (a burst of
#: keys never asked for again) drains while the cache is used, in O(1) per put.
SWEEP_PER_PUT = 4


class TTLCache(Generic[V]):
    """Recent values by key: least recently used entries go first, every entry lives ``ttl_s``.

    An expired entry is kept ``stale_s`` longer for :meth:`get_stale` (a fallback when the
    source of the values fails); :meth:`get` never returns it. Entries past that are dropped
    when looked up, and a few at a time from the least recently used end by each
    :meth:`put` (:data:`SWEEP_PER_PUT`), so keys never asked for again do not stay until
    pushed out.

    Bounded by entries (``max_entries``) and by approximate bytes (``max_bytes``): an entry
    counts :data:`ENTRY_BYTES`, its key's length and the ``nbytes`` its value is put with;
    least recently used entries are evicted until both bounds hold. A ``ttl_s``,
    ``max_entries`` or ``max_bytes`` of 0 turns the cache off (every lookup misses). Not
    thread-safe: the feature source uses it from the event loop only.

    Attributes:
        clock: Monotonic seconds; tests may replace it (before the first put: it times the
            sweeps too).
        nbytes: The approximate bytes held (what ``max_bytes`` bounds).
    """

    __slots__ = (
        "_data",
        "_sweep_at",
        "clock",
        "max_bytes",
        "max_entries",
        "nbytes",
        "stale_s",
        "ttl_s",
    )

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        stale_s: float = 0.0,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.stale_s = stale_s
        self.nbytes = 0
        self._data: OrderedDict[str, tuple[float, V, int]] = OrderedDict()
        #: When the oldest entry last looked at is past ``stale_s``: no sweep before then.
        self._sweep_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0 and self.max_bytes > 0

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
                self.nbytes -= entry[2]
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

    def put(self, key: str, value: V, nbytes: int = 0) -> None:
        """Cache ``value`` for ``ttl_s``; drop a few entries expired past ``stale_s`` and the
        least recently used ones while either bound is exceeded.

        Args:
            key: The entity key.
            value: What :meth:`get` answers for it.
            nbytes: About how many bytes ``value`` holds that no other entry shares (0 for a
                value shared by many keys).
        """
        if not self.enabled:
            return
        data = self._data
        old = data.pop(key, None)
        if old is not None:
            self.nbytes -= old[2]
        size = ENTRY_BYTES + len(key) + nbytes
        if size > self.max_bytes:
            return  # it would push out every other entry, then itself
        now = self.clock()
        data[key] = (now + self.ttl_s, value, size)
        self.nbytes += size
        if now >= self._sweep_at:
            self._sweep(now)
        while len(data) > self.max_entries or self.nbytes > self.max_bytes:
            self.nbytes -= data.popitem(last=False)[1][2]

    def _sweep(self, now: float) -> None:
        """Drop up to :data:`SWEEP_PER_PUT` entries expired past ``stale_s`` from the least
        recently used end; stop at the first live one, and look again when it is past.

        That end holds the entries put or hit longest ago, the first to expire. An entry put
        earlier but hit since sits further in: it waits until the sweep gets past the live
        one it stopped at (``ttl_s`` + ``stale_s`` later at most), or until evicted.
        """
        data, stale_s = self._data, self.stale_s
        for _ in range(SWEEP_PER_PUT):
            oldest = next(iter(data))  # never empty: put has just added an entry
            entry = data[oldest]
            if entry[0] + stale_s > now:
                self._sweep_at = entry[0] + stale_s
                return
            del data[oldest]
            self.nbytes -= entry[2]

    def discard_where(self, predicate: Callable[[V], bool]) -> int:
        """Drop every entry (expired ones too) whose value ``predicate`` holds for; how many."""
        data = self._data
        keys = [key for key, (_, held, _) in data.items() if predicate(held)]
        for key in keys:
            self.nbytes -= data.pop(key)[2]
        return len(keys)

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0
        self._sweep_at = -math.inf
