"""Fixtures: a copy of the fraud recipe's feature repo over a tiny card table, in tmp_path."""
# (A module with its own name: every test folder of the workspace has a conftest.py, so
# ``from conftest import`` would find whichever conftest was imported last.)

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pytest

from infercore.components import ComponentContext, Tensors
from infercore.config.validation import convert
from infercore_feast import FeastFeatureSource, FeastSourceConfig
from infercore_feast import store as feast_store

T = TypeVar("T")

REPO_SRC = Path(__file__).resolve().parents[3] / "recipes" / "fraud" / "feature_repo"
CARDS = 20
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

#: The model's inputs, in its order: one from the request, four from Feast.
INPUTS: list[dict[str, Any]] = [
    {"name": "amount", "source": "request", "datatype": "FP32"},
    {
        "name": "txn_count_24h",
        "source": "feast",
        "feature": "card_features:txn_count_24h",
        "datatype": "INT64",
        "default": -1,
    },
    {
        "name": "amount_sum_24h",
        "source": "feast",
        "feature": "card_features:amount_sum_24h",
        "datatype": "FP32",
        "default": -2.0,
    },
    {
        "name": "cross_border_ratio_7d",
        "source": "feast",
        "feature": "card_features:cross_border_ratio_7d",
        "datatype": "FP64",
        "default": -3.0,
    },
    {
        "name": "txn_count_7d",
        "source": "feast",
        "feature": "card_features:txn_count_7d",
        "datatype": "INT64",
        "default": -4,
    },
]
NULL_CARD = f"c_{CARDS - 1:06d}"  # its txn_count_7d is null in the table


def pytest_configure(config: pytest.Config) -> None:
    # Emitted by pydantic when feast is imported (feast 0.49's SqliteOnlineStoreConfig); noise.
    config.addinivalue_line("filterwarnings", 'ignore:Field name "vector_enabled":UserWarning')


def card(i: int) -> str:
    return f"c_{i:06d}"


def latest(i: int) -> dict[str, Any]:
    """The newest row of card ``i`` (what the online store must serve)."""
    return {
        "txn_count_1h": i,
        "txn_count_24h": 10 + i,
        "txn_count_7d": None if card(i) == NULL_CARD else 100 + i,
        "amount_sum_24h": 1.5 * i,
        "amount_avg_7d": 0.25 * i,
        "amount_max_7d": 2.0 * i,
        "distinct_countries_7d": i % 3,
        "night_ratio_7d": i / 64,
        "cross_border_ratio_7d": i / 32,
    }


def card_table() -> pd.DataFrame:
    """Two snapshots per card; the older one's values are off by 1000 to catch stale reads."""
    rows = []
    for i in range(CARDS):
        for age_days, offset in ((2, 1000), (1, 0)):
            ts = NOW - timedelta(days=age_days, minutes=i)
            values = {k: (None if v is None else v + offset) for k, v in latest(i).items()}
            rows.append(
                {"card_id": card(i), "event_timestamp": ts, "created_timestamp": ts, **values}
            )
    df = pd.DataFrame(rows)
    for col in ("txn_count_1h", "txn_count_24h", "txn_count_7d", "distinct_countries_7d"):
        df[col] = df[col].astype("Int64")
    return df


#: A second view over the same table, for reads that span two views (only a view is defined
#: here: the ``card`` entity it names comes from the shipped definitions).
SECOND_VIEW = """
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64

card_recent = FeatureView(
    name="card_recent",
    entities=[Entity(name="card", join_keys=["card_id"], value_type=ValueType.STRING)],
    ttl=timedelta(days=3650),
    schema=[Field(name="txn_count_1h", dtype=Int64), Field(name="amount_avg_7d", dtype=Float32)],
    source=FileSource(
        name="card_recent_table",
        path=str(Path(__file__).resolve().parent.parent / "data" / "card_features.parquet"),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
    ),
)
"""

#: Feature references spanning both views, interleaved (rows keep this order).
TWO_VIEW_REFS = [
    "card_features:txn_count_24h",
    "card_recent:txn_count_1h",
    "card_features:txn_count_7d",
    "card_features:cross_border_ratio_7d",
    "card_recent:amount_avg_7d",
    "card_features:amount_sum_24h",
]

#: An input of the second view (adding it to INPUTS makes the source materialize that view).
SECOND_VIEW_INPUT: dict[str, Any] = {
    "name": "recent_txn_count_1h",
    "source": "feast",
    "feature": "card_recent:txn_count_1h",
    "datatype": "INT64",
    "default": -5,
}


def add_second_view(model_root: Path) -> None:
    (model_root / "fraud" / "feature_repo" / "recent.py").write_text(SECOND_VIEW)


def assert_readers_agree(store: Any) -> None:
    """The direct reader answers as ``get_online_features`` does: known cards, a card with a
    null value, unknown and empty keys, across two views."""
    from infercore_feast.store import OnlineStoreReader, online_reader, sdk_reader

    direct, how = online_reader(store, TWO_VIEW_REFS, "card_id")
    assert isinstance(direct, OnlineStoreReader), how
    keys = [card(i) for i in range(CARDS)] + ["c_nobody", ""]
    got, want = direct(keys), sdk_reader(store, TWO_VIEW_REFS, "card_id")(keys)
    assert got == want
    assert [r and [type(v) for v in r] for r in got] == [r and [type(v) for v in r] for r in want]
    # ... and both are the table's newest values.
    for i in range(CARDS):
        row = got[i]
        assert row is not None
        want_i = latest(i)
        assert row[0] == want_i["txn_count_24h"]
        assert row[1] == want_i["txn_count_1h"]
        assert row[2] == want_i["txn_count_7d"]  # None for NULL_CARD
        assert row[4] == pytest.approx(want_i["amount_avg_7d"])
    last = got[CARDS - 1]
    assert last is not None and last[2] is None
    assert got[-2:] == [None, None]


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """``<tmp>/models`` holding ``fraud/feature_repo`` (the shipped definitions) and
    ``fraud/data/card_features.parquet`` (a tiny table with the generator's schema)."""
    root = tmp_path / "models"
    shutil.copytree(
        REPO_SRC,
        root / "fraud" / "feature_repo",
        ignore=shutil.ignore_patterns("data", "__pycache__"),
    )
    (root / "fraud" / "data").mkdir(parents=True)
    card_table().to_parquet(root / "fraud" / "data" / "card_features.parquet")
    return root


def source_node(**options: Any) -> dict[str, Any]:
    """The source's config (``features:`` without its ``kind``) over :func:`model_root`."""
    return {
        "repo": "fraud/feature_repo",
        "project": "fraud",
        "entity": {"field": "card_id", "join_key": "card_id"},
        "inputs": INPUTS,
        **options,
    }


def make_source(
    model_root: Path, extra: dict[str, Any] | None = None, **options: Any
) -> FeastFeatureSource:
    cfg = convert(source_node(**options), FeastSourceConfig, path="features")
    ctx = ComponentContext("features", model_root, model_name="fraud", extra=extra or {})
    return FeastFeatureSource(cfg, ctx)


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """asyncio.run with a bound, so a hang fails the test instead of stalling the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def sample(source: FeastFeatureSource, name: str, **labels: str) -> float:
    value = source.metrics_registry.get_sample_value(name, {"model": "fraud", **labels})
    return 0.0 if value is None else value


class ReadSpy:
    """Wraps the source's row reader: records each read's keys; can fail or block."""

    def __init__(self, source: FeastFeatureSource) -> None:
        assert source.reader is not None, "start the source first"
        self.real = source.reader
        self.calls: list[list[str]] = []
        self.behaviour: Callable[[], None] | None = None
        source.reader = self

    def __call__(self, keys: list[str]) -> list[Any]:
        self.calls.append(list(keys))
        if self.behaviour is not None:
            self.behaviour()
        return self.real(keys)


# -- a real redis-server -------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not on PATH (apt-get install -y redis-server)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A ``redis-server`` on a loopback port, without persistence (as compose.yaml ran it
    before), in its own folder; stopped by its PID only. :meth:`restart` brings it back on the
    same port, empty, as a restarted Redis without persistence comes back."""

    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 2) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install -y redis-server)")
    server = RedisProcess(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


# -- an online store that loses its rows ---------------------------------------------------------

DEFAULT_24H = -1  # txn_count_24h's default in INPUTS
REF_24H = "card_features:txn_count_24h"
WAIT_S = 30.0


async def fetch_card(source: FeastFeatureSource, i: int | str) -> Tensors:
    key = card(i) if isinstance(i, int) else i
    loop = asyncio.get_running_loop()
    return await source.fetch(
        {"card_id": np.array([key]), "amount": np.array([1.0])}, deadline=loop.time() + 10
    )


async def until(what: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll ``what`` on the loop (the source's checks run meanwhile), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not what():
        if loop.time() > end:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


class Gate:
    """Holds ``materialize_again`` (the real one) until :meth:`open`; counts its calls (every
    source's in the process) and records the views each was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.calls = 0
        self.views: list[list[str]] = []
        self._lock = threading.Lock()
        real = feast_store.materialize_again

        def gated(*args: Any, **kwargs: Any) -> None:
            with self._lock:
                self.calls += 1
                self.views.append(list(args[2]))
            if not self.opened.wait(WAIT_S):
                raise RuntimeError("the test never opened the gate")
            real(*args, **kwargs)

        monkeypatch.setattr(feast_store, "materialize_again", gated)

    def open(self) -> None:
        self.opened.set()


def flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        assert client.dbsize() == 0
    finally:
        client.close()


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name == "infercore.feast"
    ]
