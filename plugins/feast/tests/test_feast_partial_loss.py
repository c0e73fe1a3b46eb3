"""One feature view of several loses its rows while the others keep theirs (its keys' fields
deleted in Redis, its rows deleted or its table dropped in SQLite): the check, per view, finds
and names it; the entities without a row of it are refused or degraded (reason ``empty``), not
served that view's defaults as if they were new; and only that view is materialized again.

Real stores: the SQLite store, and a ``redis-server`` of the test's own (skipped without one).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from feast_test_support import (
    CARDS,
    DEFAULT_24H,
    INPUTS,
    SECOND_VIEW_INPUT,
    Gate,
    RedisProcess,
    add_second_view,
    errors,
    fetch_card,
    latest,
    make_source,
    run,
    sample,
    until,
)

from infercore.components.features import begin_request
from infercore.errors import FeatureStoreUnavailable
from infercore_feast import FeastFeatureSource

RECENT_DEFAULT = SECOND_VIEW_INPUT["default"]
RECENT_REF = SECOND_VIEW_INPUT["feature"]
TWO_VIEWS = [*INPUTS, SECOND_VIEW_INPUT]


def sqlite_db(model_root: Path) -> Path:
    return model_root / "fraud" / "feature_repo" / "data" / "online_store.db"


def delete_view_fields(url: str, store: Any, view_name: str) -> int:
    """Delete one view's fields from every entity hash (what Feast's ``RedisOnlineStore.
    delete_table`` does, whose key prefix misses keys serialized with version 3); how many
    hashes held them."""
    import redis
    from feast.infra.online_stores.helpers import _mmh3

    view = store.get_feature_view(view_name)
    fields = [_mmh3(f"{view.name}:{f.name}") for f in view.features]
    fields.append(f"_ts:{view.name}".encode())
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for key in client.scan_iter() if client.hdel(key, *fields))
    finally:
        client.close()


def empty_gauge(source: FeastFeatureSource, view: str) -> float:
    return sample(source, "infercore_feature_store_empty", view=view)


def test_one_views_deleted_rows_are_found_named_refused_and_restored_alone(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """card_recent's rows deleted, card_features' kept: the check names card_recent (log,
    gauge); a card read before the check, cached with card_recent's defaults, is dropped from
    the cache; every card is refused (reason empty) until card_recent alone is materialized
    again, and then served both views' values."""
    add_second_view(model_root)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(model_root, inputs=TWO_VIEWS, empty_check_s=60, cache_ttl_s=60)
        await source.start()
        try:
            assert set(source.markers) == {"card_features", "card_recent"}
            # The remaining window: a check has just found the store whole, and reads that
            # find none of a view's rows within suspect_check_interval_s of it are not held
            # for another (a long interval here, so that the test's own check finds it).
            source.suspect_check_interval_s = 60
            await source.check_rows()
            with sqlite3.connect(sqlite_db(model_root)) as conn:
                conn.execute("DELETE FROM fraud_card_recent")
            # Before the next check: read, served card_recent's defaults, and cached.
            out = await fetch_card(source, 3)
            assert out["recent_txn_count_1h"][0, 0] == RECENT_DEFAULT
            assert out["txn_count_24h"][0, 0] == latest(3)["txn_count_24h"]
            await source.check_rows()
            assert source.lost_views == ("card_recent",)
            assert empty_gauge(source, "card_recent") == 1
            assert empty_gauge(source, "card_features") == 0
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 3)  # dropped from the cache
            with pytest.raises(FeatureStoreUnavailable, match="empty"):
                await fetch_card(source, 4)  # read: card_features' row alone
            assert sample(source, "infercore_feature_fetch_failures_total", reason="empty") == 2
            gate.open()
            await until(lambda: not source.lost_views)
            assert gate.views == [["card_recent"]]
            assert empty_gauge(source, "card_recent") == 0
            for i in (3, 4):
                out = await fetch_card(source, i)
                assert out["recent_txn_count_1h"][0, 0] == latest(i)["txn_count_1h"]
                assert out["txn_count_24h"][0, 0] == latest(i)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    (logged,) = errors(caplog)
    assert "has lost its rows of card_recent (none of its marker entities found)" in logged
    assert "card_features" not in logged
    messages = [r.getMessage() for r in caplog.records]
    assert any("holds its rows of card_recent again" in m for m in messages)


def test_a_dropped_sqlite_table_is_found_and_created_again(
    model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A view's table dropped: its reads fail (no such table), which the check took for a
    store it could not read, and never repaired. Now the view is lost ("its table is gone"),
    and materializing it again creates the table first."""
    add_second_view(model_root)

    async def main() -> None:
        source = make_source(model_root, inputs=TWO_VIEWS, empty_check_s=0.1, cache_ttl_s=0)
        await source.start()
        try:
            with sqlite3.connect(sqlite_db(model_root)) as conn:
                conn.execute("DROP TABLE fraud_card_recent")
            await until(lambda: any("its table is gone" in m for m in errors(caplog)))
            await until(lambda: not source.lost_views)
            out = await fetch_card(source, 5)
            assert out["recent_txn_count_1h"][0, 0] == latest(5)["txn_count_1h"]
            assert out["txn_count_24h"][0, 0] == latest(5)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    (logged,) = errors(caplog)
    assert "card_recent (its table is gone)" in logged and "card_features" not in logged


def test_one_view_deleted_from_redis_fails_open_marked_degraded(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis keeps one hash per entity, a field per view's feature: card_recent's fields
    deleted (as Feast's ``delete_table`` means to), card_features' kept. Under fail_open
    a card is then served defaults marked degraded (reason empty), as a failed read is, and
    not card_recent's defaults counted as an unknown entity's."""
    add_second_view(model_root)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(
            model_root,
            inputs=TWO_VIEWS,
            online_store="redis",
            redis_url=redis_process.url(2),
            on_failure="fail_open",
            empty_check_s=60,
            cache_ttl_s=0,
        )
        await source.start()
        try:
            deleted = delete_view_fields(redis_process.url(2), source.store, "card_recent")
            assert deleted >= CARDS
            await source.check_rows()
            assert source.lost_views == ("card_recent",)
            assert empty_gauge(source, "card_recent") == 1
            degraded = begin_request()
            out = await fetch_card(source, 6)
            assert degraded == {"features"}
            assert out["recent_txn_count_1h"][0, 0] == RECENT_DEFAULT
            assert out["txn_count_24h"][0, 0] == DEFAULT_24H
            assert sample(source, "infercore_feature_degraded_total", reason="empty") == 1
            assert sample(source, "infercore_feature_defaults_total", feature=RECENT_REF) == 0
            gate.open()
            await until(lambda: not source.lost_views)
            assert gate.views == [["card_recent"]]
            degraded = begin_request()
            out = await fetch_card(source, 6)
            assert degraded == set()
            assert out["recent_txn_count_1h"][0, 0] == latest(6)["txn_count_1h"]
        finally:
            await source.stop()

    run(main(), timeout=120)


def test_a_view_lost_while_another_is_materialized_is_restored_in_turn(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """card_features lost, and while it is materialized again, card_recent too. The check
    after card_features' materialization finds card_recent without its markers: a view
    newly lost (its own ERROR line, materialized in turn), not one whose markers the
    materialization failed to bring back (whose check would be turned off)."""
    add_second_view(model_root)
    gate = Gate(monkeypatch)

    async def main() -> None:
        source = make_source(model_root, inputs=TWO_VIEWS, empty_check_s=60, cache_ttl_s=0)
        await source.start()
        try:
            with sqlite3.connect(sqlite_db(model_root)) as conn:
                conn.execute("DELETE FROM fraud_card_features")
            await source.check_rows()
            await until(lambda: gate.calls == 1)
            with sqlite3.connect(sqlite_db(model_root)) as conn:
                conn.execute("DELETE FROM fraud_card_recent")
            gate.open()
            await until(lambda: gate.calls == 2 and not source.lost_views)
            assert gate.views == [["card_features"], ["card_recent"]]
            assert set(source.markers) == {"card_features", "card_recent"}  # both checked
            out = await fetch_card(source, 7)
            assert out["recent_txn_count_1h"][0, 0] == latest(7)["txn_count_1h"]
            assert out["txn_count_24h"][0, 0] == latest(7)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    logged = errors(caplog)
    assert len(logged) == 2, logged
    assert "lost its rows of card_features" in logged[0]
    assert "lost its rows of card_recent" in logged[1]
