"""The ``feast`` source on a real Redis online store (what ``env=prod`` uses).

Starts its own ``redis-server`` on a free loopback port, without persistence, in tmp_path.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from feast_test_support import (
    INPUTS,
    SECOND_VIEW_INPUT,
    RedisProcess,
    add_second_view,
    assert_readers_agree,
    card,
    free_port,
    latest,
    make_source,
    needs_redis,
    run,
)

from infercore.errors import PluginError

pytestmark = needs_redis


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    return redis_process.url(2)


def test_materializes_into_redis_and_reads_through_the_source(
    model_root: Path, redis_url: str
) -> None:
    import redis

    async def main() -> dict[str, np.ndarray]:
        source = make_source(model_root, online_store="redis", redis_url=redis_url)
        await source.start()
        try:
            loop = asyncio.get_running_loop()
            return await source.fetch(
                {"card_id": np.array([card(4), "c_nobody"]), "amount": np.array([1.0, 2.0])},
                deadline=loop.time() + 10,
            )
        finally:
            await source.stop()

    out = run(main())
    assert out["txn_count_24h"][:, 0].tolist() == [latest(4)["txn_count_24h"], -1]
    assert out["amount_sum_24h"][0, 0] == pytest.approx(latest(4)["amount_sum_24h"])
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() >= 20  # one hash per card, in the database of the URL
    finally:
        client.close()
    # The SQLite online store was not touched.
    assert not (model_root / "fraud" / "feature_repo" / "data" / "online_store.db").exists()


def test_direct_redis_reads_answer_as_the_sdk_does(model_root: Path, redis_url: str) -> None:
    from infercore_feast.store import OnlineStoreReader

    add_second_view(model_root)
    source = make_source(
        model_root,
        online_store="redis",
        redis_url=redis_url,
        inputs=[*INPUTS, SECOND_VIEW_INPUT],
    )
    run(source.start())
    try:
        assert isinstance(source.reader, OnlineStoreReader)
        assert_readers_agree(source.store)
    finally:
        run(source.stop())


def test_redis_down_at_start_fails_clearly(model_root: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    source = make_source(model_root, online_store="redis", redis_url=url)
    with pytest.raises(PluginError, match="redis store could not be prepared") as info:
        run(source.start())
    assert "hunter2" not in str(info.value)
    assert str(model_root) not in str(info.value)
