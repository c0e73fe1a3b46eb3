"""A read that finds none of its keys checks the store's markers before it is answered.

QA's case: the fraud recipe on Redis, every request sampled for drift, ``FLUSHALL`` during
traffic. Until the next ``empty_check_s`` tick (up to 10 s) every card read from the emptied
store was served its defaults as a card the store does not know: 200s, not marked degraded,
so their rows went into the drift windows and the windows drifted. A read none of whose keys
has a row of a checked view is that signature (every key a new entity, or a store that has
just lost the view): the source checks the markers before answering it, so those rows are
refused or degraded (reason ``empty``) instead. The checks such reads start are rate-limited:
a stream of genuinely new entities costs at most one check per ``suspect_check_interval_s``.

Real stores: the SQLite store, and a ``redis-server`` of the test's own (skipped without one).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from feast_test_support import (
    DEFAULT_24H,
    REF_24H,
    Gate,
    RedisProcess,
    fetch_card,
    flush,
    latest,
    make_source,
    run,
    sample,
    until,
)

from infercore.components.features import begin_request
from infercore.errors import FeatureStoreUnavailable
from infercore_feast import FeastFeatureSource


class CheckSpy:
    """Wraps the source's marker check: counts the checks that ran."""

    def __init__(self, source: FeastFeatureSource) -> None:
        assert source._check is not None, "start the source first (with markers)"
        self.real = source._check
        self.calls = 0
        source._check = self  # type: ignore[assignment]

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return self.real()


def delete_sqlite_rows(model_root: Path) -> None:
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"
    with sqlite3.connect(db) as conn:
        (table,) = [
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if name.endswith("card_features")
        ]
        conn.execute(f'DELETE FROM "{table}"')


def test_a_flushed_redis_is_refused_from_the_first_read_not_served_as_new_cards(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic check is 60 s away: the first read after the FLUSHALL finds none of its
    keys, checks the markers before answering, and its card is refused (reason ``empty``),
    not served the defaults of a new card. Without the check on that read it was a 200 with
    defaults and no degraded mark."""
    url = redis_process.url(2)
    Gate(monkeypatch)  # hold the restoration: the store stays empty

    async def main() -> None:
        source = make_source(
            model_root, online_store="redis", redis_url=url, empty_check_s=60, cache_ttl_s=60
        )
        await source.start()
        try:
            out = await fetch_card(source, 3)
            assert out["txn_count_24h"][0, 0] == latest(3)["txn_count_24h"]
            flush(url)
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 4)
            assert source.lost_views == ("card_features",)
            assert sample(source, "infercore_feature_fetch_failures_total", reason="empty") == 1
            assert sample(source, "infercore_feature_defaults_total", feature=REF_24H) == 0
            # The card read before the flush is still served from the cache, as before.
            out = await fetch_card(source, 3)
            assert out["txn_count_24h"][0, 0] == latest(3)["txn_count_24h"]
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_fail_open_marks_the_first_rows_after_the_loss_degraded(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite, ``fail_open``: the rows of the first read after the table was emptied carry
    the degraded mark (so the drift monitor leaves them out), counted as ``empty``, not as
    an unknown entity's defaults."""
    Gate(monkeypatch)

    async def main() -> None:
        source = make_source(model_root, on_failure="fail_open", empty_check_s=60)
        await source.start()
        try:
            delete_sqlite_rows(model_root)
            degraded = begin_request()
            out = await fetch_card(source, 5)
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            assert degraded == {"features"}
            assert sample(source, "infercore_feature_degraded_total", reason="empty") == 1
            assert sample(source, "infercore_feature_defaults_total", feature=REF_24H) == 0
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_new_entities_are_served_their_defaults_and_checks_are_rate_limited(
    model_root: Path,
) -> None:
    """A store that is whole: cards it does not know get their defaults, unmarked, as
    before. The first such read checks the markers; the reads of new cards that follow
    within ``suspect_check_interval_s`` are not held for a check, and a stream of them
    costs one check per interval, not one per read."""

    async def main() -> None:
        source = make_source(model_root, empty_check_s=60, cache_ttl_s=0)
        await source.start()
        try:
            spy = CheckSpy(source)
            source.suspect_check_interval_s = 0.2
            degraded = begin_request()
            out = await fetch_card(source, "c_new_0")
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            assert degraded == set()
            assert spy.calls == 1  # the first read waited for a check
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            n = 0
            while loop.time() - t0 < 1.0:
                out = await fetch_card(source, f"c_new_{n % 7}")
                assert out["txn_count_24h"][0, 0] == DEFAULT_24H
                n += 1
                await asyncio.sleep(0.005)
            elapsed = loop.time() - t0
            await asyncio.sleep(0.3)  # a check scheduled last runs
            assert n > 50
            # Checks start at least 0.2 s apart (the first included), over the loop and the
            # sleep after it: far fewer than the reads.
            assert 2 <= spy.calls <= 2 + (elapsed + 0.3) / 0.2, spy.calls
            assert sample(source, "infercore_feature_fetch_failures_total", reason="empty") == 0
            assert not source.lost_views
            # Known cards never start a check.
            calls = spy.calls
            await asyncio.sleep(0.3)
            for i in range(10):
                await fetch_card(source, i)
            await asyncio.sleep(0.3)
            assert spy.calls == calls
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_within_the_interval_the_loss_is_found_by_the_check_scheduled_for_its_end(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remaining window: a check has just found the store whole, then it is emptied. A
    read within ``suspect_check_interval_s`` of that check is answered as unknown entities
    (not held), but schedules a check at the interval's end, which finds the loss and drops
    the cached rows; the next read of that card is refused."""
    Gate(monkeypatch)

    async def main() -> None:
        source = make_source(model_root, empty_check_s=60, cache_ttl_s=60)
        await source.start()
        try:
            spy = CheckSpy(source)
            source.suspect_check_interval_s = 0.5
            await source.check_rows()  # the store is whole
            assert spy.calls == 1 and not source.lost_views
            delete_sqlite_rows(model_root)
            out = await fetch_card(source, 6)  # within the interval: not held
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            assert spy.calls == 1
            await until(lambda: bool(source.lost_views), timeout_s=5)
            assert spy.calls >= 2  # the scheduled one (then the restoration's own)
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 6)  # its cached unknown row was dropped
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_a_check_that_cannot_answer_within_timeout_ms_fails_the_read(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read and the check it waits for together stay within ``timeout_ms``: a check held
    up (here: blocked) fails the read as a timeout, and its rows are not cached."""

    async def main() -> None:
        source = make_source(model_root, empty_check_s=60, timeout_ms=50, cache_ttl_s=60)
        await source.start()
        try:
            spy = CheckSpy(source)
            release = asyncio.Event()
            loop = asyncio.get_running_loop()
            held: list[Any] = []

            def blocked() -> dict[str, str]:
                held.append(True)
                asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
                return spy.real()

            source._check = blocked  # type: ignore[assignment]
            with pytest.raises(FeatureStoreUnavailable, match="timeout"):
                await fetch_card(source, "c_new")
            assert held
            release.set()
            await until(lambda: source._checking is None, timeout_s=5)
            # Not cached: the next read reads (and checks) again, and is served.
            source._check = spy  # type: ignore[assignment]
            source.suspect_check_interval_s = 0
            out = await fetch_card(source, "c_new")
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
        finally:
            await source.stop()

    run(main(), timeout=120)
