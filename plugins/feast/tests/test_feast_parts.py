"""The parts of the ``feast`` source that need no feature store: cache, breaker, merger,
redis URLs, plugin registration and the lazy ``feast`` import."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from feast_test_support import run
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.errors import ConfigError, InvalidInput
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry
from infercore_feast.breaker import CircuitBreaker
from infercore_feast.cache import ENTRY_BYTES, MISSING, SWEEP_PER_PUT, TTLCache
from infercore_feast.config import redis_connection_string
from infercore_feast.merging import ReadFailed, ReadMerger
from infercore_feast.source import _check_range

# -- cache ---------------------------------------------------------------------------------


def test_cache_expires_after_its_ttl() -> None:
    now = [0.0]
    cache: TTLCache[int | None] = TTLCache(2.0, 10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("gone", None)  # unknown entities are cached too
    now[0] = 1.9
    assert cache.get("a") == 1 and cache.get("gone") is None
    now[0] = 2.0
    assert cache.get("a") is MISSING and cache.get("gone") is MISSING
    assert len(cache) == 0


def test_cache_keeps_an_expired_entry_stale_s_longer_for_get_stale_only() -> None:
    now = [0.0]
    cache: TTLCache[int] = TTLCache(2.0, 10, clock=lambda: now[0], stale_s=3.0)
    cache.put("a", 1)
    assert cache.get_stale("a") == 1 and cache.get_stale("b") is MISSING
    now[0] = 2.0
    assert cache.get("a") is MISSING  # expired for get, every time it is asked
    assert cache.get("a") is MISSING
    assert cache.get_stale("a") == 1 and len(cache) == 1
    now[0] = 4.99
    assert cache.get_stale("a") == 1
    now[0] = 5.0
    assert cache.get_stale("a") is MISSING
    assert cache.get("a") is MISSING and len(cache) == 0  # dropped once past both
    assert cache.nbytes == 0
    cache.put("a", 2)  # a fresh read replaces it
    assert cache.get("a") == 2


def test_cache_evicts_the_least_recently_used() -> None:
    cache: TTLCache[int] = TTLCache(60.0, 2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is MISSING and cache.get("a") == 1 and cache.get("c") == 3


@pytest.mark.parametrize(
    ("ttl", "size", "max_bytes"), [(0.0, 10, 10**6), (5.0, 0, 10**6), (5.0, 10, 0)]
)
def test_cache_can_be_turned_off(ttl: float, size: int, max_bytes: int) -> None:
    cache: TTLCache[int] = TTLCache(ttl, size, max_bytes=max_bytes)
    cache.put("a", 1)
    assert cache.get("a") is MISSING and cache.nbytes == 0


def test_cache_put_sweeps_a_few_expired_entries_from_the_old_end() -> None:
    """Keys never asked for again go when later puts come, a bounded number per put (no scan
    of the whole cache on the request path); rows kept for ``get_stale`` stay their time."""
    now = [0.0]
    cache: TTLCache[int] = TTLCache(2.0, 100, clock=lambda: now[0], stale_s=1.0)
    for i in range(5):
        cache.put(f"old{i}", i)  # expired at 2, gone at 3
    now[0] = 0.5
    for i in range(5):
        cache.put(f"mid{i}", i)  # expired at 2.5, kept for get_stale until 3.5
    now[0] = 3.2
    cache.put("a", 1)
    assert len(cache) == 10 - SWEEP_PER_PUT + 1
    cache.put("b", 2)
    assert len(cache) == 5 + 2  # the last old one swept; the mid ones kept for get_stale
    assert all(cache.get_stale(f"mid{i}") == i for i in range(5))
    now[0] = 3.6
    cache.put("c", 3)
    cache.put("d", 4)
    assert len(cache) == 4  # the mid ones swept too; the four new ones live
    assert cache.nbytes == sum(ENTRY_BYTES + len(k) for k in "abcd")
    assert [cache.get(k) for k in "abcd"] == [1, 2, 3, 4]


def test_cache_sweep_stops_at_the_first_live_entry() -> None:
    now = [0.0]
    cache: TTLCache[int] = TTLCache(2.0, 100, clock=lambda: now[0])
    cache.put("old", 0)
    now[0] = 1.0
    cache.put("live", 1)
    now[0] = 2.5  # "old" expired, "live" not
    cache.put("new", 2)
    assert len(cache) == 2 and cache.get("live") == 1 and cache.get("new") == 2


def test_cache_is_bounded_by_bytes() -> None:
    """Each entry counts ENTRY_BYTES, its key and the size it was put with; the least
    recently used go until the bytes fit; an entry bigger than the bound is not cached."""
    entry = ENTRY_BYTES + 1 + 100  # a one-character key, a 100-byte value
    cache: TTLCache[str] = TTLCache(60.0, 1000, max_bytes=3 * entry)
    for key in "abc":
        cache.put(key, key, 100)
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    assert cache.get("a") == "a"  # now the most recent
    cache.put("d", "d", 100)
    assert cache.get("b") is MISSING and len(cache) == 3 and cache.nbytes == 3 * entry
    cache.put("a", "a2", 100)  # replacing an entry counts it once
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    cache.put("e", "e", 50)
    cache.put("f", "f", 50)  # two smaller entries take the room of one and a half
    assert cache.get("c") is MISSING and cache.nbytes <= 3 * entry
    held = len(cache)
    cache.put("huge", "huge", 3 * entry)  # larger than the whole bound
    assert cache.get("huge") is MISSING and len(cache) == held
    assert cache.discard_where(lambda v: v == "e") == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "put", "get", "get", "stale", "tick", "discard"]),
            st.integers(0, 12),
            st.integers(0, 300),
        ),
        max_size=60,
    )
)
def test_cache_counts_its_bytes_and_keeps_its_bounds(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the puts, lookups, expiries and discards: the count is the sum of what the
    entries held were put with, both bounds hold, and get never answers an expired entry."""
    now = [0.0]
    bound = 4 * ENTRY_BYTES + 400
    cache: TTLCache[int] = TTLCache(3.0, 6, clock=lambda: now[0], stale_s=2.0, max_bytes=bound)
    sizes: dict[str, int] = {}
    put: dict[str, tuple[int, float]] = {}
    for op, n, size in ops:
        key = "k" * (n % 8 + 1)
        if op == "put":
            cache.put(key, n, size)
            sizes[key], put[key] = ENTRY_BYTES + len(key) + size, (n, now[0])
        elif op == "get":
            value = cache.get(key)
            assert value is MISSING or (value, True) == (put[key][0], now[0] < put[key][1] + 3)
        elif op == "stale":
            cache.get_stale(key)
        elif op == "tick":
            now[0] += n / 2
        else:
            cache.discard_where(n.__eq__)
        held = list(cache._data)
        assert cache.nbytes == sum(sizes[k] for k in held)
        assert len(held) <= 6 and cache.nbytes <= bound


# -- breaker -------------------------------------------------------------------------------


def test_breaker_counts_consecutive_failures_only() -> None:
    now = [0.0]
    changes: list[str] = []
    b = CircuitBreaker(3, 10.0, clock=lambda: now[0], on_change=changes.append)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the count
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 9.99
    assert not b.allow()
    now[0] = 10.0
    assert b.state == "half_open" and b.allow()
    b.on_dispatch()
    assert not b.allow()  # one probe at a time
    b.record_success()
    assert b.state == "closed" and b.allow()
    assert changes == ["open", "half_open", "closed"]


def test_breaker_opens_only_once_failures_have_lasted_failing_s() -> None:
    """A blip of failures (a stalled disk, a starved core) leaves it closed; failing on for
    ``failing_s`` opens it, and a success in between starts the time again."""
    now = [0.0]
    b = CircuitBreaker(3, 5.0, failing_s=1.0, clock=lambda: now[0])
    for t in (0.0, 0.05, 0.1, 0.15, 0.2, 0.9):
        now[0] = t
        b.record_failure()
    assert b.state == "closed" and b.allow()
    now[0] = 0.95
    b.record_success()
    for t in (1.0, 1.5, 1.99):  # three failures, but 0.99 s from the first of them
        now[0] = t
        b.record_failure()
    assert b.state == "closed"
    now[0] = 2.0
    b.record_failure()
    assert b.state == "open" and not b.allow()
    # The probe comes reset_s after the first failure (1.0), where a count alone would put it.
    assert b.open_for_s == pytest.approx(4.0)
    now[0] = 5.99
    assert not b.allow()
    now[0] = 6.0
    assert b.state == "half_open" and b.allow() and b.open_for_s == 0.0
    # A failed probe opens it again, for reset_s from then.
    b.on_dispatch()
    b.record_failure()
    assert b.state == "open" and b.open_for_s == pytest.approx(5.0)
    now[0] = 10.99
    assert not b.allow()
    now[0] = 11.0
    assert b.allow()


def test_breaker_reopens_when_the_probe_fails() -> None:
    now = [0.0]
    b = CircuitBreaker(1, 5.0, clock=lambda: now[0])
    b.record_failure()
    now[0] = 5.0
    assert b.allow()
    b.on_dispatch()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 9.9
    assert not b.allow()
    now[0] = 10.0
    assert b.allow()


# -- merger --------------------------------------------------------------------------------


class FakeReads:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()

        self.active = 0
        self.most_active = 0

    async def __call__(self, keys: list[str]) -> list[str]:
        self.calls.append(keys)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.gate.wait()
        finally:
            self.active -= 1
        if self.fail is not None:
            raise self.fail
        return [k.upper() for k in keys]


def test_merger_batches_a_window_and_dedupes() -> None:
    async def main() -> FakeReads:
        reads = FakeReads()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=0.01, max_keys=100)
        futures = [merger.submit(k) for k in ["a", "b", "a", "c"]]
        assert futures[0] is futures[2]
        assert [await f for f in futures] == ["A", "B", "A", "C"]
        assert merger.waiting == 0
        return reads

    assert run(main(), timeout=10).calls == [["a", "b", "c"]]


async def read_of_a_in_flight(
    window_s: float,
) -> tuple[FakeReads, ReadMerger[str], asyncio.Future[str]]:
    """A merger whose read of "a" has started and is held at the reads' gate."""
    reads = FakeReads()
    reads.gate.clear()
    merger: ReadMerger[str] = ReadMerger(reads, window_s=window_s, max_keys=100)
    first = merger.submit("a")
    await asyncio.sleep(0.01)
    assert reads.calls == [["a"]]  # in flight
    return reads, merger, first


def test_merger_joins_a_read_in_flight() -> None:
    async def main() -> FakeReads:
        reads, merger, first = await read_of_a_in_flight(window_s=0)
        second = merger.submit("a")
        assert second is first
        reads.gate.set()
        assert await second == "A"
        return reads

    assert run(main(), timeout=10).calls == [["a"]]


def test_merger_reads_a_lone_key_at_once() -> None:
    """No read in flight: nothing to merge with, so no window to wait for."""

    async def main() -> FakeReads:
        reads = FakeReads()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=60, max_keys=100)
        assert await asyncio.wait_for(merger.submit("a"), 5) == "A"
        await asyncio.sleep(0)
        assert await asyncio.wait_for(merger.submit("b"), 5) == "B"  # and again, once idle
        return reads

    assert run(main(), timeout=10).calls == [["a"], ["b"]]


def test_merger_gathers_keys_while_a_read_is_in_flight() -> None:
    """Keys that arrive during a read go together once it ends (the 60 s window aside)."""

    async def main() -> FakeReads:
        reads, merger, first = await read_of_a_in_flight(window_s=60)
        later = [merger.submit("b")]
        await asyncio.sleep(0.01)
        later.append(merger.submit("c"))  # another turn of the loop
        await asyncio.sleep(0.01)
        assert reads.calls == [["a"]]  # waiting for the read, not read one by one
        reads.gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *later), 5) == ["A", "B", "C"]
        return reads

    assert run(main(), timeout=10).calls == [["a"], ["b", "c"]]


def test_merger_flushes_when_full() -> None:
    async def main() -> FakeReads:
        reads = FakeReads()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=60, max_keys=2)
        futures = [merger.submit(k) for k in "abcd"]
        # The 60 s window never fires within the bound: both full batches were read.
        await asyncio.wait_for(asyncio.gather(*futures), 5)
        return reads

    assert run(main(), timeout=10).calls == [["a", "b"], ["c", "d"]]


def test_merger_keeps_at_most_max_in_flight_reads() -> None:
    """At the limit, keys wait for a slot (no window) and gather into full batches, read
    oldest first, one as each read ends."""

    async def main() -> FakeReads:
        reads = FakeReads()
        reads.gate.clear()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=0, max_keys=2, max_in_flight=1)
        futures = [merger.submit("a")]
        await asyncio.sleep(0.01)
        for key in "bcdef":
            futures.append(merger.submit(key))
            await asyncio.sleep(0.01)  # without the limit, window 0 reads each at once
        assert reads.calls == [["a"]]
        reads.gate.set()
        assert await asyncio.wait_for(asyncio.gather(*futures), 5) == list("ABCDEF")
        return reads

    reads = run(main(), timeout=10)
    assert reads.calls == [["a"], ["b", "c"], ["d", "e"], ["f"]]
    assert reads.most_active == 1


def test_merger_close_fails_batches_waiting_for_a_slot() -> None:
    async def main() -> list[Any]:
        reads = FakeReads()
        reads.gate.clear()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=0, max_keys=1, max_in_flight=1)
        futures = [merger.submit(k) for k in "abc"]  # a is read; b and c wait, full
        await asyncio.sleep(0.01)
        assert reads.calls == [["a"]]
        await merger.close()
        return [f.exception() for f in futures]

    excs = run(main(), timeout=10)
    assert all(isinstance(e, ReadFailed) and e.reason == "cancelled" for e in excs)


@pytest.mark.parametrize(
    ("fail", "reason"), [(ReadFailed("timeout"), "timeout"), (OSError("x"), "error")]
)
def test_merger_fails_every_waiter_of_a_failed_read(fail: BaseException, reason: str) -> None:
    async def main() -> list[str]:
        merger: ReadMerger[str] = ReadMerger(FakeReads(fail), window_s=0, max_keys=100)
        futures = [merger.submit(k) for k in "ab"]
        await asyncio.wait(futures, timeout=5)
        out = []
        for f in futures:
            exc = f.exception()
            assert isinstance(exc, ReadFailed)
            out.append(exc.reason)
        return out

    assert run(main(), timeout=10) == [reason, reason]


def test_merger_close_fails_waiters_and_cancels_reads() -> None:
    async def main() -> list[Any]:
        reads = FakeReads()
        reads.gate.clear()
        merger: ReadMerger[str] = ReadMerger(reads, window_s=0, max_keys=100)
        in_flight = merger.submit("a")
        await asyncio.sleep(0.01)
        merger.window_s = 60
        queued = merger.submit("b")
        await merger.close()
        late = merger.submit("c")
        return [f.exception() for f in (in_flight, queued, late)]

    excs = run(main(), timeout=10)
    assert all(isinstance(e, ReadFailed) and e.reason == "cancelled" for e in excs)


# -- redis URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379", "127.0.0.1:6379,db=0"),
        ("redis://cache.internal:6380/3", "cache.internal:6380,db=3"),
        ("redis://cache", "cache:6379,db=0"),
        ("redis://:s3cr%40t@cache:6379/1", "cache:6379,db=1,password=s3cr@t"),
        ("redis://user:pw@cache:6379/0", "cache:6379,db=0,username=user,password=pw"),
        ("rediss://cache:6379/0", "cache:6379,db=0,ssl=true"),
    ],
)
def test_redis_url_to_feast_connection_string(url: str, expected: str) -> None:
    assert redis_connection_string(url, path="features.redis_url") == expected


def test_redis_connection_string_with_socket_timeouts() -> None:
    assert redis_connection_string("redis://h:1/0", path="p", socket_timeout_s=0.5) == (
        "h:1,db=0,socket_timeout=0.5,socket_connect_timeout=0.5"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://cache:6379/0",
        "redis://cache:6379/x",
        "redis://cache:99999/0",
        "redis://:a,b@cache:6379/0",
        "redis://cache:6379/0?ssl=1",
    ],
)
def test_bad_redis_urls_fail_without_showing_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"features\.redis_url") as info:
        redis_connection_string(url, path="features.redis_url")
    assert "a,b" not in str(info.value)


# -- registration and the lazy import ------------------------------------------------------


def test_the_plugin_registers_kind_feast_through_its_entry_point() -> None:
    pm, plugins = make_plugin_manager()
    registry = Registry(pm)
    assert registry.kinds("feature_source")["feast"].plugin == "feast"
    assert "feast" in plugins


def test_importing_the_plugin_does_not_import_feast() -> None:
    code = (
        "import sys, infercore_feast\n"
        "from infercore.plugin_manager import make_plugin_manager\n"
        "from infercore.registry import Registry\n"
        "Registry(make_plugin_manager()[0])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('feast', 'pyarrow'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- request value checks ----------------------------------------------------------------------


def _numpy_range_check(value: np.ndarray, low: float | None, high: float | None) -> str | None:
    """The rule as numpy reductions state it (what the checks did for every size)."""
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        return "finite"
    if low is not None and np.any(value < low):
        return "at least"
    if high is not None and np.any(value > high):
        return "at most"
    return None


def _outcome(value: np.ndarray, low: float | None, high: float | None) -> str | None:
    try:
        _check_range("x", value, low, high)
    except InvalidInput as exc:
        for what in ("finite", "at least", "at most"):
            if what in str(exc):
                return what
        raise
    return None


_EDGES = [0.01, 0.0099999998, 0.010000001, 0.0, -0.0, 23.0, 23.000001, 1.0, 1e39, -1e39]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("low,high", [(0.01, None), (0.0, 23.0), (None, 1.0), (1e-50, 1e39)])
def test_range_check_of_a_few_values_answers_as_numpy_does(
    dtype: Any, low: float | None, high: float | None
) -> None:
    # Bounds rounded to float32 (0.01 is 0.0099999998 there): a value that numpy accepts
    # must not be refused, nor the other way round; NaN and infinities always fail.
    specials = [] if dtype is np.int64 else [np.nan, np.inf, -np.inf]
    values = [*_EDGES, *specials] if dtype is not np.int64 else [0, 1, 23, 24, -1]
    for v in values:
        with np.errstate(over="ignore"):
            arr = np.array([v]).astype(dtype)
        assert _outcome(arr, low, high) == _numpy_range_check(arr, low, high), (dtype, v)
    with np.errstate(over="ignore"):
        many = np.array(values[:8]).astype(dtype)
    assert _outcome(many, low, high) == _numpy_range_check(many, low, high)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(width=32), min_size=1, max_size=12),
    st.one_of(st.none(), st.floats(allow_nan=False)),
    st.one_of(st.none(), st.floats(allow_nan=False)),
    st.sampled_from([np.float32, np.float64]),
)
def test_range_check_matches_numpy_for_any_values(
    values: list[float], low: float | None, high: float | None, dtype: Any
) -> None:
    arr = np.array(values, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        assert _outcome(arr, low, high) == _numpy_range_check(arr, low, high)


def test_range_check_names_the_field_and_the_bound() -> None:
    with pytest.raises(InvalidInput, match=r"field 'hour': values must be at most 23"):
        _check_range("hour", np.array([23.5], dtype=np.float32), 0, 23)
    with pytest.raises(InvalidInput, match=r"field 'amount': values must be finite numbers"):
        _check_range("amount", np.array([np.nan], dtype=np.float32), 0.01, None)
