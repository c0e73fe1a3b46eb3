"""The ``feast`` source on a real Redis online store (what ``env=prod`` uses).

Starts its own ``redis-server`` on a free loopback port, without persistence, in tmp_path.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from feast_test_support import (
    INPUTS,
    SECOND_VIEW_INPUT,
    add_second_view,
    assert_readers_agree,
    card,
    latest,
    make_source,
    run,
)

from infercore.errors import PluginError

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not on PATH (apt-get install -y redis-server)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    assert REDIS_SERVER is not None
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/2"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
