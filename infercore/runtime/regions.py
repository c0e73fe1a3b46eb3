"""Where each canary's sticky keys fall: a region of the hash space ``[0, 100)`` per canary.

A sticky router hashes a key to a share in ``[0, 100)`` and the routing table maps shares to
versions. Laying the slices end to end would move a canary's slice whenever a slice before it
changed size, and with it every key of a canary whose weight did not change. Here each canary
holds its own region, which grows and shrinks in place; the primary takes the rest. So a key
stays on its canary while that canary's weight stays put or grows, whatever the other canaries'
weights do, and a canary that shrinks and grows back gets its keys back.

The layout lives in the process: a fresh process lays the configured weights out the same way
every time (canaries by name, from the top of the space down, the primary below them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

Interval = tuple[float, float]

#: Slivers left by float rounding are dropped.
_EPS = 1e-9


class CanaryRegions:
    """The region each canary holds; :meth:`update` resizes them, :meth:`split` routes."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, list[Interval]] = {}

    def held(self, version: str) -> tuple[Interval, ...]:
        """The intervals ``version`` holds, lowest first."""
        return tuple(self._held.get(version, ()))

    def update(self, weights: Mapping[str, float]) -> None:
        """Resize the regions to ``weights`` (percent; versions left out hold none).

        Shrinking comes first, so that space freed in the same change can be taken; a region
        shrinks from its bottom and grows there first, next to its own keys.
        """
        held = self._held
        for version in [v for v in held if weights.get(v, 0.0) <= 0.0]:
            del held[version]
        for version, weight in weights.items():
            have = _measure(held.get(version, ()))
            if have > weight + _EPS:
                held[version] = _shrink(held[version], have - weight)
        # New regions are taken from the top down, so that a fresh layout of canaries sorted by
        # name puts them end to end below 100, above the primary.
        for version in sorted(weights, reverse=True):
            want = weights[version] - _measure(held.get(version, ()))
            if want > _EPS:
                held[version] = self._grow(version, want)

    def split(self, primary: str, active: Collection[str]) -> tuple[tuple[str, float], ...]:
        """The ``RoutingTable.split`` of ``active`` canaries' regions, the primary in the gaps.

        A region of a canary that is not active (not ready) routes to the primary. Empty when
        no active canary holds any space.
        """
        owned = sorted(
            (lo, hi, version)
            for version, intervals in self._held.items()
            if version in active
            for lo, hi in intervals
        )
        if not owned:
            return ()
        entries: list[tuple[str, float]] = []
        at = 0.0
        for lo, hi, version in owned:
            if lo > at + _EPS:
                _append(entries, primary, lo)
            _append(entries, version, hi)
            at = hi
        if at < 100.0 - _EPS:
            _append(entries, primary, 100.0)
        # The last slice reaches past 100, so that rounding can never fall off the end.
        entries[-1] = (entries[-1][0], math.inf)
        return tuple(entries)

    def _free(self) -> list[Interval]:
        taken = sorted(iv for intervals in self._held.values() for iv in intervals)
        free: list[Interval] = []
        at = 0.0
        for lo, hi in taken:
            if lo > at + _EPS:
                free.append((at, lo))
            at = max(at, hi)
        if at < 100.0 - _EPS:
            free.append((at, 100.0))
        return free

    def _grow(self, version: str, want: float) -> list[Interval]:
        mine = list(self._held.get(version, ()))
        free = self._free()
        if mine:
            bottom, top = mine[0][0], mine[-1][1]
            below = next((f for f in free if abs(f[1] - bottom) <= _EPS), None)
            if below is not None:
                take = min(want, below[1] - below[0])
                mine.append((bottom - take, bottom))
                want -= take
                free.remove(below)
            above = next((f for f in free if abs(f[0] - top) <= _EPS), None)
            if above is not None and want > _EPS:
                take = min(want, above[1] - above[0])
                mine.append((top, top + take))
                want -= take
                free.remove(above)
        for lo, hi in reversed(free):
            if want <= _EPS:
                break
            take = min(want, hi - lo)
            mine.append((hi - take, hi))
            want -= take
        return _merge(mine)


def _measure(intervals: Collection[Interval]) -> float:
    return math.fsum(hi - lo for lo, hi in intervals)


def _shrink(intervals: list[Interval], by: float) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in intervals:  # lowest first: the bottom goes
        if by > _EPS:
            cut = min(by, hi - lo)
            lo += cut
            by -= cut
        if hi - lo > _EPS:
            out.append((lo, hi))
    return out


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in sorted(intervals):
        if hi - lo <= _EPS:
            continue
        if out and lo <= out[-1][1] + _EPS:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _append(entries: list[tuple[str, float]], version: str, bound: float) -> None:
    if entries and entries[-1][0] == version:
        entries[-1] = (version, bound)
    else:
        entries.append((version, bound))
