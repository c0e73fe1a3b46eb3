"""Several processes find one store emptied: one materializes it again, the others wait for
its lock and find the markers back. Two sources in this process stand for two replicas (the
lock is in Redis, or a ``flock`` of a file: a second source is refused as another process
is). Real stores throughout; materializing is held at a gate that counts every call.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from feast_test_support import (
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

from infercore_feast import FeastFeatureSource
from infercore_feast.restore_lock import FileRestoreLock, RedisRestoreLock


def restores(source: FeastFeatureSource, outcome: str) -> float:
    return sample(source, "infercore_feature_store_restores_total", outcome=outcome)


async def both_recover(sources: list[FeastFeatureSource], gate: Gate) -> None:
    gate.open()
    await until(lambda: not any(s.lost_views for s in sources))
    for source in sources:
        out = await fetch_card(source, 4)
        assert out["txn_count_24h"][0, 0] == latest(4)["txn_count_24h"]


def test_two_sources_on_one_redis_materialize_it_once(
    model_root: Path,
    redis_process: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both find the flushed Redis; the first takes the lock and materializes (held at the
    gate), the second waits, then finds the rows back: one materialization, both serve."""
    url = redis_process.url(2)
    gate = Gate(monkeypatch)

    async def main() -> None:
        options: dict[str, Any] = {"online_store": "redis", "redis_url": url, "empty_check_s": 0.2}
        first, second = make_source(model_root, **options), make_source(model_root, **options)
        await first.start()
        await second.start()
        try:
            flush(url)
            await until(lambda: bool(first.lost_views and second.lost_views))
            await until(lambda: gate.calls >= 1)
            await asyncio.sleep(1.0)  # several of the waiter's polls
            assert gate.calls == 1
            await both_recover([first, second], gate)
            assert gate.calls == 1
            assert restores(first, "materialized") + restores(second, "materialized") == 1
            assert restores(first, "elsewhere") + restores(second, "elsewhere") == 1
        finally:
            await first.stop()
            await second.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main(), timeout=120)
    messages = [r.getMessage() for r in caplog.records]
    assert any("another process is materializing the redis online store" in m for m in messages)
    assert any("materialized again by another process" in m for m in messages)


def test_a_holder_that_died_is_taken_over_after_the_ttl(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock left by a replica that died while materializing (its key, no longer
    refreshed): the source waits, and materializes once the key has expired."""
    import redis

    url = redis_process.url(2)
    gate = Gate(monkeypatch)
    gate.open()

    async def main() -> None:
        source = make_source(model_root, online_store="redis", redis_url=url, empty_check_s=60)
        await source.start()
        client = redis.Redis.from_url(url)
        try:
            lock = source._restore_lock
            assert isinstance(lock, RedisRestoreLock)
            flush(url)
            assert client.set(lock.key, "a-replica-that-died", px=2000)
            await source.check_rows()
            assert source.lost_views == ("card_features",)
            await asyncio.sleep(1.0)
            assert gate.calls == 0  # held (by the dead replica's key)
            await until(lambda: not source.lost_views)
            assert gate.calls == 1
            assert client.exists(lock.key) == 0  # released after materializing
        finally:
            client.close()
            await source.stop()

    run(main(), timeout=120)


def test_the_lock_is_refreshed_while_a_materialization_outlasts_its_ttl(
    model_root: Path, redis_process: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TTL of 0.3 s and a materialization held for 1.5 s: the holder's refreshes keep the
    key, so the other source does not take over from a live holder."""
    url = redis_process.url(2)
    gate = Gate(monkeypatch)

    async def main() -> None:
        options: dict[str, Any] = {
            "online_store": "redis",
            "redis_url": url,
            "empty_check_s": 0.2,
            "materialize_lock_ttl_s": 0.3,
        }
        first, second = make_source(model_root, **options), make_source(model_root, **options)
        await first.start()
        await second.start()
        try:
            flush(url)
            await until(lambda: bool(first.lost_views and second.lost_views))
            await until(lambda: gate.calls >= 1)
            await asyncio.sleep(1.5)  # five TTLs
            assert gate.calls == 1
            await both_recover([first, second], gate)
            assert gate.calls == 1
        finally:
            await first.stop()
            await second.stop()

    run(main(), timeout=120)


def test_a_holder_whose_key_expired_neither_extends_nor_deletes_the_next_holders(
    redis_process: RedisProcess,
) -> None:
    import redis

    url = redis_process.url(2)
    stalled = RedisRestoreLock(url, "lock", ttl_s=0.2, socket_timeout_s=1)
    next_one = RedisRestoreLock(url, "lock", ttl_s=30, socket_timeout_s=1)
    client = redis.Redis.from_url(url)
    try:
        assert stalled.acquire()
        assert not next_one.acquire()
        time.sleep(0.4)  # the stalled holder's key expires
        assert next_one.acquire()
        assert not stalled.refresh()
        stalled.release()
        assert client.exists("lock") == 1
        assert 0 < client.pttl("lock") <= 30_000
        next_one.release()
        assert client.exists("lock") == 0
    finally:
        for lock in (stalled, next_one):
            lock.close()
        client.close()


def test_two_sources_on_one_sqlite_file_materialize_it_once(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: several processes of one host (server workers, models) share the file; a
    ``flock`` next to it lets one materialize."""
    gate = Gate(monkeypatch)
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"

    async def main() -> None:
        first = make_source(model_root, empty_check_s=0.2, cache_ttl_s=0)
        second = make_source(model_root, empty_check_s=0.2, cache_ttl_s=0)
        await first.start()
        await second.start()
        try:
            with sqlite3.connect(db) as conn:
                conn.execute("DELETE FROM fraud_card_features")
            await until(lambda: bool(first.lost_views and second.lost_views))
            await until(lambda: gate.calls >= 1)
            await asyncio.sleep(1.0)
            assert gate.calls == 1
            await both_recover([first, second], gate)
            assert gate.calls == 1
            assert restores(first, "elsewhere") + restores(second, "elsewhere") == 1
        finally:
            await first.stop()
            await second.stop()

    run(main(), timeout=120)


def test_a_sqlite_lock_holder_that_dies_releases_it(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the file lock (materializing) and is killed: the kernel
    releases it, and the source materializes without waiting for any TTL."""
    gate = Gate(monkeypatch)
    gate.open()
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"

    async def main() -> None:
        source = make_source(model_root, empty_check_s=60, cache_ttl_s=0)
        await source.start()
        lock = source._restore_lock
        assert isinstance(lock, FileRestoreLock)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "time.sleep(60)\n",
                str(lock.path),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"held\n"
            with sqlite3.connect(db) as conn:
                conn.execute("DELETE FROM fraud_card_features")
            await source.check_rows()
            assert source.lost_views == ("card_features",)
            await asyncio.sleep(1.5)
            assert gate.calls == 0  # the other process holds it
            holder.kill()
            holder.wait(10)
            await until(lambda: not source.lost_views)
            assert gate.calls == 1
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
            await source.stop()

    run(main(), timeout=120)
