"""An online store that comes back empty while the source serves (a Redis restarted without
persistence, a FLUSHALL, SQLite rows deleted): found by the check every ``empty_check_s``,
logged once, refused or degraded by ``on_failure`` (reason ``empty``) until its rows are back,
and materialized again in the background with ``materialize_on_start``.

Real stores throughout: a ``redis-server`` of the test's own (skipped without one) and the
SQLite store. Materializing again may be held at a gate (the real function runs once it
opens), so that the time the store is empty is the test's to choose.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from feast_test_support import (
    DEFAULT_24H,
    REF_24H,
    Gate,
    RedisProcess,
    card,
    errors,
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
from infercore_feast import store as feast_store


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_an_emptied_redis_fails_closed_until_it_is_materialized_again(
    model_root: Path,
    redis_process: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """The QA report's case: a Redis without persistence loses its rows while serving. The
    watcher (every 0.2 s here) finds it, logs one ERROR, and from then on a card the store has
    no row for is a 503 (reason ``empty``), not a silent default; the rows come back by
    themselves and the same card is served its real values."""
    url = redis_process.url(2)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(
            model_root, online_store="redis", redis_url=url, empty_check_s=0.2, cache_ttl_s=0
        )
        await source.start()
        try:
            assert source.markers == {"card_features": source.markers["card_features"]}
            assert source.markers["card_features"][0] == card(0)  # the newest offline row
            out = await fetch_card(source, 4)
            assert out["txn_count_24h"][0, 0] == latest(4)["txn_count_24h"]
            assert sample(source, "infercore_feature_store_empty", view="card_features") == 0
            if how == "flushall":
                flush(url)
            else:
                await asyncio.to_thread(redis_process.restart)
            await until(lambda: bool(source.lost_views))
            assert source.lost_views == ("card_features",)
            assert sample(source, "infercore_feature_store_empty", view="card_features") == 1
            # Several checks go by while the store stays empty: still one ERROR line.
            await asyncio.sleep(0.6)
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 4)
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 5)
            assert sample(source, "infercore_feature_fetch_failures_total", reason="empty") == 2
            assert sample(source, "infercore_feature_defaults_total", feature=REF_24H) == 0
            assert sample(source, "infercore_feature_breaker_open") == 0  # the store answers
            assert gate.calls == 1  # one restoration at a time
            gate.open()
            await until(lambda: not source.lost_views)
            out = await fetch_card(source, 5)
            assert out["txn_count_24h"][0, 0] == latest(5)["txn_count_24h"]
            assert sample(source, "infercore_feature_store_empty", view="card_features") == 0
            # An entity the store never had is an unknown entity again: its defaults, no error.
            out = await fetch_card(source, "c_nobody")
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    logged = errors(caplog)
    assert len(logged) == 1, logged
    assert "has lost its rows" in logged[0] and "card_features" in logged[0]
    assert "materializing again" in logged[0]
    assert url.split("//")[1] not in logged[0]  # no address in the line (S6)
    messages = [r.getMessage() for r in caplog.records]
    assert any("materialized card_features again" in m for m in messages)
    assert any("holds its rows of card_features again" in m for m in messages)


def test_an_emptied_redis_fails_open_with_defaults_marked_degraded(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fail_open: while the store is empty, a card without a row gets its defaults *and* the
    degraded mark, counted as degraded (reason ``empty``), not as an unknown entity's
    defaults. A card still in the cache keeps its real values."""
    url = redis_process.url(2)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(
            model_root,
            online_store="redis",
            redis_url=url,
            on_failure="fail_open",
            empty_check_s=60,  # the test runs the check itself
        )
        await source.start()
        try:
            await fetch_card(source, 3)  # cached, real values
            flush(url)
            await source.check_rows()
            assert source.lost_views == ("card_features",)
            degraded = begin_request()
            out = await fetch_card(source, 6)
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            assert degraded == {"features"}
            assert sample(source, "infercore_feature_degraded_total", reason="empty") == 1
            assert sample(source, "infercore_feature_fetch_failures_total", reason="empty") == 1
            assert sample(source, "infercore_feature_defaults_total", feature=REF_24H) == 0
            degraded = begin_request()
            out = await fetch_card(source, 3)
            assert out["txn_count_24h"][0, 0] == latest(3)["txn_count_24h"]
            assert degraded == set()
            gate.open()
            await until(lambda: not source.lost_views)
            degraded = begin_request()
            out = await fetch_card(source, 6)
            assert out["txn_count_24h"][0, 0] == latest(6)["txn_count_24h"]
            assert degraded == set()
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_unknown_rows_cached_before_the_check_are_dropped_when_it_finds_the_store_empty(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the store emptying and the next check, a read finds nothing and caches the
    card as unknown (the remaining window: within ``suspect_check_interval_s`` of a check
    that found the store whole, a read that finds none of its keys is not held for another).
    The check drops those rows: the card is not served its defaults from the cache for the
    rest of the TTL."""
    url = redis_process.url(2)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(
            model_root, online_store="redis", redis_url=url, empty_check_s=60, cache_ttl_s=60
        )
        await source.start()
        try:
            source.suspect_check_interval_s = 60  # the test runs the next check itself
            await source.check_rows()
            flush(url)
            out = await fetch_card(source, 7)  # before the next check: an unknown card
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            await source.check_rows()
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 7)
            gate.open()
            await until(lambda: not source.lost_views)
            out = await fetch_card(source, 7)
            assert out["txn_count_24h"][0, 0] == latest(7)["txn_count_24h"]
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_without_materialize_on_start_the_policy_applies_until_the_rows_are_back(
    model_root: Path, redis_process: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """``materialize_on_start: false``: nothing is written; the source refuses (``empty``)
    until the operator materializes (``feast materialize``; here the same Feast call), and
    the next check sees the rows back."""
    url = redis_process.url(2)

    async def main() -> None:
        first = make_source(model_root, online_store="redis", redis_url=url)
        await first.start()  # applies the registry and fills the store
        await first.stop()
        source = make_source(
            model_root,
            online_store="redis",
            redis_url=url,
            materialize_on_start=False,
            empty_check_s=0.2,
        )
        await source.start()
        try:
            assert source.markers
            flush(url)
            await until(lambda: bool(source.lost_views))
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 8)
            assert source._restoring is None  # nothing written by the source
            where = feast_store.locate(source.config, model_root, "features")
            await asyncio.to_thread(
                feast_store.materialize_again,
                source.config,
                where,
                ["card_features"],
                path="features",
            )
            await until(lambda: not source.lost_views)
            out = await fetch_card(source, 8)
            assert out["txn_count_24h"][0, 0] == latest(8)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    logged = errors(caplog)
    assert len(logged) == 1 and "feast materialize" in logged[0], logged


def test_an_emptied_sqlite_store_is_found_and_filled_again(
    model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same on the SQLite store (runs without redis-server): its rows deleted while the
    source serves. Not gated: the watcher finds it, materializes again, and a card read after
    that has its values."""
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"

    async def main() -> None:
        source = make_source(model_root, empty_check_s=0.1, cache_ttl_s=0)
        await source.start()
        try:
            with sqlite3.connect(db) as conn:
                (table,) = [
                    name
                    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                    if name.endswith("card_features")
                ]
                conn.execute(f'DELETE FROM "{table}"')
            await until(lambda: any("lost its rows" in m for m in errors(caplog)))
            await until(lambda: not source.lost_views)
            out = await fetch_card(source, 9)
            assert out["txn_count_24h"][0, 0] == latest(9)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    assert len(errors(caplog)) == 1


def test_the_check_can_be_turned_off(model_root: Path) -> None:
    async def main() -> tuple[dict[str, Any], Any]:
        source = make_source(model_root, empty_check_s=0)
        await source.start()
        try:
            return source.markers, source._watcher
        finally:
            await source.stop()

    markers, watcher = run(main())
    assert markers == {} and watcher is None
