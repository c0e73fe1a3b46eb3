"""The ``feast`` feature source against a real Feast store (SQLite online store in tmp_path)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import (
    CARDS,
    INPUTS,
    NULL_CARD,
    SECOND_VIEW_INPUT,
    ReadSpy,
    add_second_view,
    assert_readers_agree,
    card,
    latest,
    make_source,
    run,
    sample,
)
from prometheus_client import CollectorRegistry

from infercore.components.features import begin_request
from infercore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreUnavailable,
    InvalidInput,
)
from infercore_feast import FeastFeatureSource
from infercore_feast.cache import MISSING
from infercore_feast.store import OnlineStoreReader, online_reader

FEAST_INPUTS = ["txn_count_24h", "amount_sum_24h", "cross_border_ratio_7d", "txn_count_7d"]
DEFAULTS = {
    "txn_count_24h": -1,
    "amount_sum_24h": -2.0,
    "cross_border_ratio_7d": -3.0,
    "txn_count_7d": -4,
}


def fields(cards: list[str], amounts: list[float] | None = None) -> dict[str, np.ndarray]:
    amounts = amounts if amounts is not None else [float(i) for i in range(len(cards))]
    return {"card_id": np.array(cards), "amount": np.array(amounts)}


async def started(source: FeastFeatureSource) -> FeastFeatureSource:
    await source.start()
    return source


async def fetch(source: FeastFeatureSource, cards: list[str], **kw: Any) -> dict[str, np.ndarray]:
    deadline = asyncio.get_running_loop().time() + kw.pop("budget_s", 10.0)
    return await source.fetch(fields(cards, **kw), deadline=deadline)


def expected_row(i: int) -> dict[str, Any]:
    want = latest(i)
    return {
        "txn_count_24h": want["txn_count_24h"],
        "amount_sum_24h": want["amount_sum_24h"],
        "cross_border_ratio_7d": np.float32(want["cross_border_ratio_7d"]),  # stored Float32
        "txn_count_7d": DEFAULTS["txn_count_7d"]
        if want["txn_count_7d"] is None
        else want["txn_count_7d"],
    }


# -- values ---------------------------------------------------------------------------------


def test_fetch_returns_feast_values_in_declared_order(model_root: Path) -> None:
    async def main() -> dict[str, np.ndarray]:
        source = await started(make_source(model_root))
        try:
            return await fetch(source, [card(3), card(1), card(3)], amounts=[5.5, 6.5, 7.5])
        finally:
            await source.stop()

    out = run(main())
    assert list(out) == ["amount", *FEAST_INPUTS]
    assert out["amount"].dtype == np.float32 and out["amount"].shape == (3, 1)
    np.testing.assert_array_equal(out["amount"][:, 0], [5.5, 6.5, 7.5])
    assert out["txn_count_24h"].dtype == np.int64
    assert out["amount_sum_24h"].dtype == np.float32
    assert out["cross_border_ratio_7d"].dtype == np.float64
    for row, i in enumerate([3, 1, 3]):
        want = expected_row(i)
        for name in FEAST_INPUTS:
            assert out[name].shape == (3, 1)
            assert out[name][row, 0] == pytest.approx(want[name]), (name, i)


def test_a_request_input_with_a_default_is_optional(model_root: Path) -> None:
    async def main() -> tuple[dict[str, np.ndarray], str]:
        source = await started(make_source(model_root, inputs=_input(0, default=2.5)))
        strict = await started(make_source(model_root))
        try:
            deadline = asyncio.get_running_loop().time() + 10
            without = {"card_id": np.array([card(1), card(2)], dtype=object)}
            out = await source.fetch(without, deadline=deadline)
            try:
                await strict.fetch(without, deadline=deadline)
            except InvalidInput as exc:
                return out, str(exc)
            return out, ""
        finally:
            await source.stop()
            await strict.stop()

    out, error = run(main())
    assert out["amount"].dtype == np.float32 and out["amount"].shape == (2, 1)
    np.testing.assert_array_equal(out["amount"][:, 0], [2.5, 2.5])
    assert "missing field 'amount'" in error  # without a default the field stays required


def test_matrix_layout_stacks_inputs_in_declared_order(model_root: Path) -> None:
    async def main() -> dict[str, np.ndarray]:
        source = await started(make_source(model_root, layout="matrix", matrix_input="x"))
        try:
            return await fetch(source, [card(2), card(7)], amounts=[1.0, 2.0])
        finally:
            await source.stop()

    out = run(main())
    assert list(out) == ["x"]
    assert out["x"].dtype == np.float32 and out["x"].shape == (2, 5)
    for row, (i, amount) in enumerate([(2, 1.0), (7, 2.0)]):
        want = expected_row(i)
        expected = [amount, *(want[n] for n in FEAST_INPUTS)]
        np.testing.assert_allclose(out["x"][row], np.array(expected, dtype=np.float32))


def test_unknown_card_gets_defaults_and_is_counted(model_root: Path) -> None:
    async def main() -> tuple[dict[str, np.ndarray], FeastFeatureSource]:
        source = await started(make_source(model_root))
        try:
            return await fetch(source, [card(4), "c_999999", "c_999999"]), source
        finally:
            await source.stop()

    out, source = run(main())
    for name in FEAST_INPUTS:
        assert out[name][1, 0] == DEFAULTS[name] and out[name][2, 0] == DEFAULTS[name]
        assert out[name][0, 0] == pytest.approx(expected_row(4)[name])
    # Two rows of the unknown card, per feature.
    assert (
        sample(source, "infercore_feature_defaults_total", feature="card_features:txn_count_24h")
        == 2
    )
    assert (
        sample(source, "infercore_feature_defaults_total", feature="card_features:amount_sum_24h")
        == 2
    )


def test_null_feature_value_gets_its_default(model_root: Path) -> None:
    async def main() -> tuple[dict[str, np.ndarray], FeastFeatureSource]:
        source = await started(make_source(model_root))
        try:
            return await fetch(source, [NULL_CARD]), source
        finally:
            await source.stop()

    out, source = run(main())
    assert out["txn_count_7d"][0, 0] == DEFAULTS["txn_count_7d"]
    assert out["txn_count_24h"][0, 0] == latest(CARDS - 1)["txn_count_24h"]
    assert (
        sample(source, "infercore_feature_defaults_total", feature="card_features:txn_count_7d")
        == 1
    )
    assert (
        sample(source, "infercore_feature_defaults_total", feature="card_features:txn_count_24h")
        == 0
    )


# -- merged reads, de-duplication, cache ------------------------------------------------------


def test_concurrent_fetches_share_one_read(model_root: Path) -> None:
    async def main() -> tuple[list[dict[str, np.ndarray]], ReadSpy, FeastFeatureSource]:
        source = await started(make_source(model_root, batch_window_ms=20))
        spy = ReadSpy(source)
        try:
            outs = await asyncio.gather(*(fetch(source, [card(i)]) for i in range(12)))
            return outs, spy, source
        finally:
            await source.stop()

    outs, spy, source = run(main())
    assert len(spy.calls) == 1
    assert sorted(spy.calls[0]) == sorted(card(i) for i in range(12))
    for i, out in enumerate(outs):
        assert out["txn_count_24h"][0, 0] == latest(i)["txn_count_24h"]
    assert sample(source, "infercore_feature_fetch_seconds_count") == 1
    assert sample(source, "infercore_feature_read_entities_sum") == 12


def test_fetches_arriving_during_a_read_share_the_next_one(model_root: Path) -> None:
    """A lone fetch reads at once; those that arrive while it reads wait for it (the 1 s
    window aside) and go together."""

    async def main() -> ReadSpy:
        source = await started(make_source(model_root, batch_window_ms=1000))
        spy = ReadSpy(source)
        reading, release = threading.Event(), threading.Event()

        def hold() -> None:  # the first read, in its worker thread
            reading.set()
            release.wait(5)

        spy.behaviour = hold
        try:
            t0 = asyncio.get_running_loop().time()
            first = asyncio.ensure_future(fetch(source, [card(1)]))
            assert await asyncio.to_thread(reading.wait, 5)  # read at once, not after 1 s
            spy.behaviour = None
            later = [asyncio.ensure_future(fetch(source, [card(2)]))]
            await asyncio.sleep(0.01)  # another turn of the event loop
            later.append(asyncio.ensure_future(fetch(source, [card(3)])))
            await asyncio.sleep(0.01)
            assert spy.calls == [[card(1)]]  # the others wait for that read
            release.set()
            await asyncio.gather(first, *later)
            assert asyncio.get_running_loop().time() - t0 < 0.9  # no window waited for
            return spy
        finally:
            release.set()
            await source.stop()

    assert run(main()).calls == [[card(1)], [card(2), card(3)]]


def test_sqlite_reads_one_at_a_time(model_root: Path) -> None:
    """Feast's SQLite store shares one connection between threads: a second read in flight
    would only contend with the first. Keys that arrive meanwhile wait for it (even with no
    window) and go together."""

    async def main() -> ReadSpy:
        source = await started(make_source(model_root, batch_window_ms=0))
        assert source.read_slots == 1
        spy = ReadSpy(source)
        reading, release = threading.Event(), threading.Event()

        def hold() -> None:
            reading.set()
            release.wait(5)

        spy.behaviour = hold
        try:
            first = asyncio.ensure_future(fetch(source, [card(1)]))
            assert await asyncio.to_thread(reading.wait, 5)
            spy.behaviour = None
            later = []
            for i in (2, 3):
                later.append(asyncio.ensure_future(fetch(source, [card(i)])))
                await asyncio.sleep(0.01)
            assert spy.calls == [[card(1)]]
            release.set()
            outs = await asyncio.gather(first, *later)
            assert [o["txn_count_24h"][0, 0] for o in outs] == [
                latest(i)["txn_count_24h"] for i in (1, 2, 3)
            ]
            return spy
        finally:
            release.set()
            await source.stop()

    assert run(main()).calls == [[card(1)], [card(2), card(3)]]


@pytest.mark.parametrize(
    ("options", "slots"),
    [({}, 1), ({"online_store": "redis"}, 4), ({"read_threads": 3}, 3)],
)
def test_reads_in_flight_default_by_store(
    model_root: Path, options: dict[str, Any], slots: int
) -> None:
    source = make_source(model_root, **options)
    assert source.read_slots == slots and source.merger.max_in_flight == slots


def test_without_merging_each_fetch_reads(model_root: Path) -> None:
    async def main() -> ReadSpy:
        source = await started(make_source(model_root, batch_window_ms=0, max_batch_entities=1))
        spy = ReadSpy(source)
        try:
            await asyncio.gather(*(fetch(source, [card(i)]) for i in range(12)))
            return spy
        finally:
            await source.stop()

    assert len(run(main()).calls) == 12


def test_max_batch_entities_splits_reads(model_root: Path) -> None:
    async def main() -> ReadSpy:
        source = await started(make_source(model_root, batch_window_ms=50, max_batch_entities=4))
        spy = ReadSpy(source)
        try:
            await fetch(source, [card(i) for i in range(10)])
            return spy
        finally:
            await source.stop()

    assert sorted(len(c) for c in run(main()).calls) == [2, 4, 4]


def test_duplicate_keys_are_read_once(model_root: Path) -> None:
    async def main() -> tuple[ReadSpy, list[dict[str, np.ndarray]]]:
        source = await started(make_source(model_root, batch_window_ms=20, cache_ttl_s=0))
        spy = ReadSpy(source)
        try:
            outs = await asyncio.gather(
                *(fetch(source, [card(5)]) for _ in range(8)),
                fetch(source, [card(5), card(6), card(5)]),
            )
            return spy, outs
        finally:
            await source.stop()

    spy, outs = run(main())
    assert spy.calls == [[card(5), card(6)]]
    assert all(o["txn_count_24h"][0, 0] == latest(5)["txn_count_24h"] for o in outs)
    np.testing.assert_array_equal(outs[-1]["txn_count_24h"][:, 0], [15, 16, 15])


def test_cache_hit_avoids_a_read_and_expires(model_root: Path) -> None:
    now = [1000.0]

    async def main() -> tuple[ReadSpy, FeastFeatureSource]:
        source = await started(make_source(model_root, cache_ttl_s=5))
        source.cache.clock = lambda: now[0]
        spy = ReadSpy(source)
        try:
            await fetch(source, [card(1), "c_unknown"])
            assert len(spy.calls) == 1
            out = await fetch(source, [card(1), "c_unknown"])  # both cached (unknown too)
            assert len(spy.calls) == 1
            assert out["txn_count_24h"][:, 0].tolist() == [11, -1]
            now[0] += 4.9
            await fetch(source, [card(1)])
            assert len(spy.calls) == 1
            now[0] += 0.2  # past the TTL of the first read
            await fetch(source, [card(1)])
            assert spy.calls[-1] == [card(1)] and len(spy.calls) == 2
            return spy, source
        finally:
            await source.stop()

    _, source = run(main())
    assert sample(source, "infercore_feature_cache_hits_total") == 3
    assert sample(source, "infercore_feature_cache_misses_total") == 3


# -- failures: timeout, errors, breaker -------------------------------------------------------


def hang(release: threading.Event) -> Any:
    def behaviour() -> None:
        release.wait(10)  # bounded; released at the end of the test

    return behaviour


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_slow_read_times_out_and_applies_the_policy(model_root: Path, policy: str) -> None:
    release = threading.Event()

    async def main() -> tuple[Any, set[str], FeastFeatureSource]:
        source = await started(make_source(model_root, timeout_ms=30, on_failure=policy))
        spy = ReadSpy(source)
        spy.behaviour = hang(release)
        degraded = begin_request()
        try:
            try:
                result: Any = await fetch(source, [card(1), card(2)], amounts=[3.0, 4.0])
            except FeatureStoreUnavailable as exc:
                result = exc
            return result, degraded, source
        finally:
            release.set()
            await source.stop()

    result, degraded, source = run(main())
    assert sample(source, "infercore_feature_fetch_failures_total", reason="timeout") == 1
    if policy == "fail_closed":
        assert isinstance(result, FeatureStoreUnavailable)
        assert result.status_code == 503 and result.reason == "feature_store_unavailable"
        assert degraded == set()
    else:
        assert degraded == {"features"}
        np.testing.assert_array_equal(result["amount"][:, 0], [3.0, 4.0])
        for name in FEAST_INPUTS:
            assert result[name][:, 0].tolist() == [DEFAULTS[name]] * 2
        assert sample(source, "infercore_feature_degraded_total", reason="timeout") == 1
        # Defaults for an unreachable store are not "unknown entity" defaults.
        assert (
            sample(
                source, "infercore_feature_defaults_total", feature="card_features:txn_count_24h"
            )
            == 0
        )


def test_a_read_that_times_out_is_cached_when_it_ends(model_root: Path) -> None:
    """Its callers fail at the timeout, but the rows it reads after all are kept: a burst
    of misses that overruns the store still fills the cache."""
    release = threading.Event()

    async def main() -> tuple[dict[str, np.ndarray], ReadSpy, FeastFeatureSource]:
        source = await started(make_source(model_root, timeout_ms=30))
        spy = ReadSpy(source)
        spy.behaviour = hang(release)
        try:
            with pytest.raises(FeatureStoreUnavailable, match="timeout"):
                await fetch(source, [card(1)])
            release.set()
            for _ in range(500):  # bounded (5 s): until the late read's rows are cached
                if source.cache.get(card(1)) is not MISSING:
                    break
                await asyncio.sleep(0.01)
            out = await fetch(source, [card(1)])
            return out, spy, source
        finally:
            release.set()
            await source.stop()

    out, spy, source = run(main())
    assert spy.calls == [[card(1)]]  # the second fetch was a cache hit
    assert out["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
    assert sample(source, "infercore_feature_fetch_failures_total", reason="timeout") == 1


def test_a_late_read_does_not_replace_fresher_rows(model_root: Path) -> None:
    """A read that timed out and ends after a later read of the same key cached its row
    leaves that row alone."""
    release = threading.Event()

    async def main() -> tuple[dict[str, np.ndarray], list[list[str]]]:
        source = await started(make_source(model_root, timeout_ms=30))
        real = source.reader
        assert real is not None
        calls: list[list[str]] = []

        def reader(keys: list[str]) -> list[Any]:
            calls.append(list(keys))
            if len(calls) == 1:  # the slow read: ends late, with no row (defaults)
                release.wait(5)
                return [None] * len(keys)
            return real(keys)

        source.reader = reader
        try:
            with pytest.raises(FeatureStoreUnavailable, match="timeout"):
                await fetch(source, [card(1)])
            await fetch(source, [card(1)])  # the second read, on the spare thread, is cached
            release.set()
            executor = source._executor
            assert executor is not None
            await asyncio.to_thread(executor.shutdown, wait=True)  # the late read has ended
            await asyncio.sleep(0.05)  # and its callback has run
            return await fetch(source, [card(1)]), calls
        finally:
            release.set()
            await source.stop()

    out, calls = run(main())
    assert calls == [[card(1)], [card(1)]]
    assert out["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]


def test_a_hung_store_still_opens_the_breaker(model_root: Path) -> None:
    """Reads that outlive their timeouts hold their threads (one slot, two threads); the next
    read, queued behind them, times out unstarted and is dropped, and the failures open the
    breaker once they have gone on for ``breaker_failing_s`` (its default, 1 s)."""
    release = threading.Event()
    now = [0.0]

    async def main() -> tuple[ReadSpy, FeastFeatureSource]:
        source = await started(make_source(model_root, timeout_ms=30, breaker_failures=3))
        source.breaker.clock = lambda: now[0]
        spy = ReadSpy(source)
        spy.behaviour = hang(release)
        try:
            for i in (1, 2, 3):
                with pytest.raises(FeatureStoreUnavailable, match="timeout"):
                    await fetch(source, [card(i)])
                now[0] += 0.5  # failures at 0, 0.5 and 1 s
            with pytest.raises(FeatureStoreUnavailable, match="breaker open"):
                await fetch(source, [card(4)])
            release.set()
            executor = source._executor
            assert executor is not None
            # Every job the pool still holds runs now: a queued third read would be read.
            await asyncio.to_thread(executor.shutdown, wait=True)
            return spy, source
        finally:
            release.set()
            await source.stop()

    spy, source = run(main())
    assert spy.calls == [[card(1)], [card(2)]]
    assert sample(source, "infercore_feature_fetch_failures_total", reason="timeout") == 3
    assert sample(source, "infercore_feature_fetch_failures_total", reason="breaker_open") == 1


@pytest.mark.parametrize("failing_s", [None, 0.0])
def test_a_stall_fails_its_reads_but_opens_the_breaker_only_when_it_lasts(
    model_root: Path, failing_s: float | None
) -> None:
    """Five reads in a row time out in a stall far shorter than ``breaker_failing_s`` (the
    breaker's clock stands still): their requests fail, the breaker stays closed, and the first
    read after the stall is served. With ``breaker_failing_s: 0`` the same stall opens it, and
    requests after the stall are refused for ``breaker_reset_s``."""
    release = threading.Event()
    options: dict[str, Any] = {"timeout_ms": 100, "breaker_failures": 5}
    if failing_s is not None:
        options["breaker_failing_s"] = failing_s

    async def main() -> tuple[Any, FeastFeatureSource]:
        source = await started(make_source(model_root, **options))
        source.breaker.clock = lambda: 0.0
        spy = ReadSpy(source)
        spy.behaviour = hang(release)
        try:
            for i in range(1, 6):
                with pytest.raises(FeatureStoreUnavailable, match="timeout"):
                    await fetch(source, [card(i)])
            spy.behaviour = None
            release.set()
            for _ in range(500):  # bounded (5 s): the two stalled reads have ended, and cached
                if all(source.cache.get(card(i)) is not MISSING for i in (1, 2)):
                    break
                await asyncio.sleep(0.01)
            try:
                return await fetch(source, [card(9)]), source
            except FeatureStoreUnavailable as exc:
                return exc, source
        finally:
            release.set()
            await source.stop()

    after, source = run(main())
    assert sample(source, "infercore_feature_fetch_failures_total", reason="timeout") == 5
    if failing_s is None:
        assert source.breaker.state == "closed"
        assert after["txn_count_24h"][0, 0] == latest(9)["txn_count_24h"]
    else:
        assert source.breaker.state == "open"
        assert isinstance(after, FeatureStoreUnavailable) and "breaker open" in str(after)


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_serve_stale_answers_a_failed_read_from_rows_that_expired_recently(
    model_root: Path, policy: str
) -> None:
    """With ``serve_stale_s``, a card whose row expired less than that long ago is served its
    last row when the store fails (degraded, counted), under either policy. A card with no such
    row gets the policy: a 503 with ``fail_closed``, its defaults with ``fail_open`` (beside the
    stale row of the other card)."""
    now = [0.0]
    failing = [False]

    def maybe_fail() -> None:
        if failing[0]:
            raise ConnectionError("refused")

    async def main() -> dict[str, Any]:
        source = await started(
            make_source(model_root, on_failure=policy, cache_ttl_s=5, serve_stale_s=60)
        )
        source.cache.clock = lambda: now[0]
        spy = ReadSpy(source)
        spy.behaviour = maybe_fail
        out: dict[str, Any] = {}
        try:
            await fetch(source, [card(1), card(2)])  # cached at 0 s
            now[0] = 30.0  # expired 25 s ago: stale, within 60 s
            failing[0] = True
            degraded = begin_request()
            out["stale"] = await fetch(source, [card(1), card(2)])
            out["stale_degraded"] = set(degraded)
            degraded = begin_request()
            try:
                out["mixed"] = await fetch(source, [card(1), card(3)])  # card 3: never read
            except FeatureStoreUnavailable as exc:
                out["mixed"] = exc
            out["mixed_degraded"] = set(degraded)
            now[0] = 65.0  # expired 60 s ago: past serve_stale_s
            try:
                out["too_old"] = await fetch(source, [card(1)])
            except FeatureStoreUnavailable as exc:
                out["too_old"] = exc
            out["stale_rows"] = sample(source, "infercore_feature_stale_rows_total")
            out["failures"] = sample(
                source, "infercore_feature_fetch_failures_total", reason="error"
            )
            return out
        finally:
            await source.stop()

    out = run(main())
    stale = out["stale"]
    for i, c in enumerate((1, 2)):
        assert stale["txn_count_24h"][i, 0] == latest(c)["txn_count_24h"]
    assert out["stale_degraded"] == {"features"}
    if policy == "fail_closed":
        assert isinstance(out["mixed"], FeatureStoreUnavailable)
        assert isinstance(out["too_old"], FeatureStoreUnavailable)
        assert out["stale_rows"] == 2  # the refused request's stale row is not counted
    else:
        mixed = out["mixed"]
        assert mixed["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
        assert mixed["txn_count_24h"][1, 0] == DEFAULTS["txn_count_24h"]
        assert out["mixed_degraded"] == {"features"}
        assert out["too_old"]["txn_count_24h"][0, 0] == DEFAULTS["txn_count_24h"]
        assert out["stale_rows"] == 3
    assert out["failures"] == 2  # the mixed request and the too old one: the policy applied


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_store_error_applies_the_policy(
    model_root: Path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError(f"disk I/O error at {model_root}/secret.db")

    async def main() -> tuple[Any, set[str], FeastFeatureSource]:
        source = await started(make_source(model_root, on_failure=policy))
        ReadSpy(source).behaviour = boom
        degraded = begin_request()
        try:
            try:
                result: Any = await fetch(source, [card(1)])
            except FeatureStoreUnavailable as exc:
                result = exc
            return result, degraded, source
        finally:
            await source.stop()

    with caplog.at_level(logging.WARNING, logger="infercore.feast"):
        result, degraded, source = run(main())
    assert sample(source, "infercore_feature_fetch_failures_total", reason="error") == 1
    if policy == "fail_closed":
        assert isinstance(result, FeatureStoreUnavailable)
        assert "disk" not in str(result) and str(model_root) not in str(result)
        assert degraded == set()
    else:
        assert degraded == {"features"}
        assert result["txn_count_24h"][0, 0] == DEFAULTS["txn_count_24h"]
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)


def test_fail_open_keeps_cached_values(model_root: Path) -> None:
    async def main() -> dict[str, np.ndarray]:
        source = await started(make_source(model_root, on_failure="fail_open"))
        spy = ReadSpy(source)
        try:
            await fetch(source, [card(1)])

            def boom() -> None:
                raise RuntimeError("down")

            spy.behaviour = boom
            begin_request()
            return await fetch(source, [card(1), card(2)])
        finally:
            await source.stop()

    out = run(main())
    assert out["txn_count_24h"][:, 0].tolist() == [11, DEFAULTS["txn_count_24h"]]


def test_breaker_opens_after_consecutive_failures_and_closes_after_a_probe(
    model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    failing = [True]

    def maybe_fail() -> None:
        if failing[0]:
            raise ConnectionError("refused")

    async def main() -> None:
        source = await started(
            make_source(
                model_root,
                breaker_failures=3,
                breaker_reset_s=30,
                cache_ttl_s=0,
            )
        )
        source.breaker.clock = lambda: now[0]
        spy = ReadSpy(source)
        spy.behaviour = maybe_fail
        gauge = "infercore_feature_breaker_open"
        try:
            for _ in range(3):  # failing for 1 s (breaker_failing_s' default)
                with pytest.raises(FeatureStoreUnavailable, match="error"):
                    await fetch(source, [card(1)])
                now[0] += 0.5
            assert len(spy.calls) == 3 and sample(source, gauge) == 1
            with pytest.raises(FeatureStoreUnavailable, match="breaker open"):
                await fetch(source, [card(1)])
            assert len(spy.calls) == 3  # skipped at once, no read
            assert (
                sample(source, "infercore_feature_fetch_failures_total", reason="breaker_open") == 1
            )
            now[0] += 31  # half-open: one probe; it fails and the breaker opens again
            with pytest.raises(FeatureStoreUnavailable, match="error"):
                await fetch(source, [card(1)])
            assert len(spy.calls) == 4
            with pytest.raises(FeatureStoreUnavailable, match="breaker open"):
                await fetch(source, [card(1)])
            assert len(spy.calls) == 4
            failing[0] = False
            now[0] += 31  # the next probe succeeds and closes the breaker
            out = await fetch(source, [card(2)])
            assert out["txn_count_24h"][0, 0] == latest(2)["txn_count_24h"]
            assert sample(source, gauge) == 0
            await fetch(source, [card(3)])
            assert len(spy.calls) == 6
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("circuit breaker open for model fraud" in m for m in messages)
    assert any("circuit breaker closed for model fraud" in m for m in messages)


def test_half_open_lets_only_the_probe_batch_through(model_root: Path) -> None:
    now = [0.0]
    release = threading.Event()

    async def main() -> None:
        source = await started(
            make_source(
                model_root,
                breaker_failures=1,
                breaker_failing_s=0,
                breaker_reset_s=10,
                timeout_ms=2000,
                cache_ttl_s=0,
            )
        )
        source.breaker.clock = lambda: now[0]
        spy = ReadSpy(source)
        spy.behaviour = lambda: (_ for _ in ()).throw(ConnectionError("refused"))
        try:
            with pytest.raises(FeatureStoreUnavailable):
                await fetch(source, [card(1)])
            now[0] += 11
            spy.behaviour = hang(release)  # the probe hangs until released
            probe = asyncio.ensure_future(fetch(source, [card(2)]))
            for _ in range(500):  # wait (bounded, 5 s) until the probe read is in flight
                if len(spy.calls) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(spy.calls) == 2
            with pytest.raises(FeatureStoreUnavailable, match="breaker open"):
                await fetch(source, [card(3)])
            release.set()
            out = await probe
            assert out["txn_count_24h"][0, 0] == latest(2)["txn_count_24h"]
            assert source.breaker.state == "closed"
        finally:
            release.set()
            await source.stop()

    run(main())


def test_request_deadline_caps_the_wait(model_root: Path) -> None:
    release = threading.Event()

    async def main() -> None:
        source = await started(make_source(model_root, timeout_ms=5000, on_failure="fail_open"))
        ReadSpy(source).behaviour = hang(release)
        try:
            with pytest.raises(DeadlineExceeded):
                await fetch(source, [card(1)], budget_s=0.05)
            with pytest.raises(DeadlineExceeded):
                await fetch(source, [card(2)], budget_s=-1)
        finally:
            release.set()
            await source.stop()

    run(main())


# -- request validation ------------------------------------------------------------------------


def test_request_validation(model_root: Path) -> None:
    async def main() -> None:
        source = await started(make_source(model_root))
        loop = asyncio.get_running_loop()
        try:
            with pytest.raises(InvalidInput, match="'amount'"):
                await source.fetch({"card_id": np.array([card(1)])}, deadline=loop.time() + 5)
            with pytest.raises(InvalidInput, match="'card_id'"):
                await source.fetch({"amount": np.array([1.0])}, deadline=loop.time() + 5)
            with pytest.raises(InvalidInput, match="string keys"):
                await source.fetch(
                    {"card_id": np.array([42]), "amount": np.array([1.0])}, deadline=loop.time() + 5
                )
            with pytest.raises(InvalidInput, match="rows"):
                await source.fetch(
                    {"card_id": np.array([card(1)]), "amount": np.array([1.0, 2.0])},
                    deadline=loop.time() + 5,
                )
            with pytest.raises(InvalidInput, match="amount"):
                await source.fetch(
                    {"card_id": np.array([card(1)]), "amount": np.array(["abc"])},
                    deadline=loop.time() + 5,
                )
            # V2 BYTES columns arrive as object arrays of bytes: accepted as keys.
            out = await source.fetch(
                {
                    "card_id": np.array([card(1).encode()], dtype=object),
                    "amount": np.array([[1.0]]),
                },
                deadline=loop.time() + 5,
            )
            assert out["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
            # A field the source does not take is refused, never dropped: a misspelled
            # optional field would otherwise take its default without a word.
            good = {"card_id": np.array([card(1)]), "amount": np.array([1.0])}
            with pytest.raises(InvalidInput, match=r"unknown field 'amuont'.*card_id"):
                await source.fetch({**good, "amuont": np.array([1.0])}, deadline=loop.time() + 5)
            with pytest.raises(InvalidInput, match="'txn_count_24h' comes from the feature"):
                await source.fetch(
                    {**good, "txn_count_24h": np.array([9.0])}, deadline=loop.time() + 5
                )
        finally:
            await source.stop()

    run(main())


# -- start-up --------------------------------------------------------------------------------


def test_materialize_on_start_populates_an_empty_store_once(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import feast

    calls: list[Any] = []
    real = feast.FeatureStore.materialize

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("feature_views"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(feast.FeatureStore, "materialize", counting)
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"
    assert not db.exists()

    async def once() -> int:
        source = await started(make_source(model_root))
        try:
            out = await fetch(source, [card(8)])
            return int(out["txn_count_24h"][0, 0])
        finally:
            await source.stop()

    with caplog.at_level(logging.INFO, logger="infercore.feast"):
        assert run(once()) == latest(8)["txn_count_24h"]
        assert calls == [["card_features"]] and db.exists()
        assert run(once()) == latest(8)["txn_count_24h"]
    assert calls == [["card_features"]]  # the second start found the store populated
    messages = [r.getMessage() for r in caplog.records]
    assert any("materializing card_features" in m for m in messages)
    assert any("not materializing" in m for m in messages)


def test_without_materialize_on_start_the_store_must_exist(model_root: Path) -> None:
    with pytest.raises(ConfigError, match="registry does not exist"):
        run(make_source(model_root, materialize_on_start=False).start())

    async def prepared() -> int:
        first = await started(make_source(model_root))
        await first.stop()
        source = await started(make_source(model_root, materialize_on_start=False))
        try:
            return int((await fetch(source, [card(9)]))["txn_count_24h"][0, 0])
        finally:
            await source.stop()

    assert run(prepared()) == latest(9)["txn_count_24h"]


def test_state_files_may_live_outside_the_model_root(model_root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def main() -> int:
        source = await started(
            make_source(
                model_root,
                sqlite_path=str(state / "online.db"),
                registry_path=str(state / "registry.db"),
            )
        )
        try:
            return int((await fetch(source, [card(2)]))["txn_count_24h"][0, 0])
        finally:
            await source.stop()

    assert run(main()) == latest(2)["txn_count_24h"]
    assert (state / "online.db").exists() and (state / "registry.db").exists()
    assert not (model_root / "fraud" / "feature_repo" / "data").exists()


def _input(index: int, **changes: Any) -> list[dict[str, Any]]:
    from feast_test_support import INPUTS

    inputs = [dict(i) for i in INPUTS]
    inputs[index].update(changes)
    return [i for i in inputs if i.get("name")]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"inputs": _input(1, default=None)},
            r"inputs\[1\]\.default: feast input "
            r"'txn_count_24h' has no default",
        ),
        ({"inputs": _input(1, feature="card_features")}, r"inputs\[1\]\.feature"),
        ({"inputs": _input(0, default="abc")}, r"inputs\[0\]\.default: FP32 .*numeric default"),
        ({"inputs": _input(1, default=1.5)}, r"inputs\[1\]\.default: INT64 .*integer"),
        ({"inputs": _input(2, name="txn_count_24h")}, "declared twice"),
        ({"inputs": _input(0, datatype="BYTES"), "layout": "matrix"}, "layout 'matrix'"),
        ({"online_store": "redis", "redis_url": "http://x:1/0"}, "redis_url"),
        (
            {"serve_stale_s": 60, "cache_ttl_s": 0},
            r"features\.serve_stale_s: 60 needs the cache",
        ),
        (
            {"serve_stale_s": 60, "cache_max_bytes": 0},
            r"features\.serve_stale_s: 60 needs the cache, which .*cache_max_bytes: 0",
        ),
        ({"max_entity_key_bytes": 0}, r"max_entity_key_bytes"),
        ({"cache_max_bytes": -1}, r"cache_max_bytes"),
        (
            {"breaker_failing_s": 5},
            r"features\.breaker_failing_s: 5 is not less than breaker_reset_s \(5\)",
        ),
    ],
)
def test_config_errors_are_clear(model_root: Path, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_source(model_root, **options)


def test_unknown_layout_is_refused(model_root: Path) -> None:
    # The core's message names the path and the value; listing the choices is the core's job
    # (infercore.config.validation.describe does not list Literal choices yet).
    with pytest.raises(ConfigError, match=r"features\.layout: .*'rows'"):
        make_source(model_root, layout="rows")


@pytest.mark.parametrize(
    ("feature", "match"),
    [
        ("card_features:txn_count_1y", "has no feature 'txn_count_1y'; available: amount_avg_7d"),
        ("merchant_stats:txn_count_1h", "feature view 'merchant_stats' is not in the Feast"),
    ],
)
def test_unknown_features_fail_start_up(model_root: Path, feature: str, match: str) -> None:
    source = make_source(model_root, inputs=_input(1, feature=feature))
    with pytest.raises(ConfigError, match=match):
        run(source.start())


def test_datatype_must_fit_the_feast_type(model_root: Path) -> None:
    source = make_source(model_root, inputs=_input(2, datatype="BYTES", default="x"))
    with pytest.raises(ConfigError, match="BYTES cannot hold feature 'card_features:amount_sum"):
        run(source.start())


def test_repo_must_stay_inside_the_model_root(model_root: Path) -> None:
    with pytest.raises(ConfigError, match="outside the model root"):
        run(make_source(model_root, repo="../../etc").start())


def test_metrics_go_to_the_registry_the_host_passes(model_root: Path) -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        a = await started(make_source(model_root, extra={"metrics_registry": registry}))
        # A second source in the same registry (another model) must not clash.
        b = make_source(model_root, extra={"metrics_registry": registry})
        try:
            await fetch(a, [card(1)])
            assert b.metrics_registry is registry
        finally:
            await a.stop()

    run(main())
    assert (
        registry.get_sample_value("infercore_feature_fetch_seconds_count", {"model": "fraud"}) == 1
    )


# -- the direct reader ------------------------------------------------------------------------


def test_direct_reads_answer_as_the_sdk_does(model_root: Path) -> None:
    add_second_view(model_root)

    async def main() -> FeastFeatureSource:
        return await started(make_source(model_root, inputs=[*INPUTS, SECOND_VIEW_INPUT]))

    source = run(main())
    try:
        assert isinstance(source.reader, OnlineStoreReader)
        assert_readers_agree(source.store)
    finally:
        run(source.stop())


def test_views_it_cannot_read_directly_go_through_the_sdk(model_root: Path) -> None:
    source = run(started(make_source(model_root)))
    try:
        # An entity joined on another key than the source's (here: a join key it does not use).
        reader, how = online_reader(source.store, ["card_features:txn_count_24h"], "account_id")
        assert not isinstance(reader, OnlineStoreReader)
        assert how == "get_online_features (card_features's entity joins on 'card_id')"
    finally:
        run(source.stop())


def test_one_row_requests_get_what_each_row_of_a_batch_gets(model_root: Path) -> None:
    # One transaction per request takes a shorter way to its tensors: same values, dtypes,
    # shapes and default counts as the general one.
    cards = [card(3), NULL_CARD, "c_nobody", card(3)]

    async def main() -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], list[float]]:
        source = await started(make_source(model_root))
        try:
            singles = [await fetch(source, [c], amounts=[float(i)]) for i, c in enumerate(cards)]
            counted = [
                sample(source, "infercore_feature_defaults_total", feature=f"card_features:{f}")
                for f in ("txn_count_7d", "txn_count_24h")
            ]
            return singles, await fetch(source, cards), counted
        finally:
            await source.stop()

    singles, batch, counted = run(main())
    assert counted == [2, 1]  # NULL_CARD's null and c_nobody: 2; c_nobody only: 1
    for i, single in enumerate(singles):
        assert list(single) == list(batch)
        for name, tensor in single.items():
            assert tensor.shape == (1, 1) and tensor.dtype == batch[name].dtype, name
            assert tensor[0, 0] == batch[name][i, 0], (name, i)
    assert batch["txn_count_7d"][:, 0].tolist() == [103, -4, -4, 103]


def _break_definitions(model_root: Path, old: str, new: str) -> int:
    """Replace ``old`` in the repo's definitions; the line of ``card_features = FeatureView(``."""
    file = model_root / "fraud" / "feature_repo" / "feature_repo.py"
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new))
    return text.splitlines().index("card_features = FeatureView(") + 1


def test_a_definition_that_raises_names_its_file_and_line(model_root: Path) -> None:
    line = _break_definitions(model_root, "entities=[card],", "entities=card,")
    with pytest.raises(ConfigError) as info:
        run(make_source(model_root).start())
    message = str(info.value)
    # TypeError without Feast's type checks, TypeCheckError with them: the process's first
    # import of Feast decided, and this test runs either way.
    assert f"features.repo: feature_repo.py line {line} failed: " in message
    assert 'TypeCheckError: argument "entities"' in message or "TypeError: " in message
    assert str(model_root) not in message and str(model_root) not in (info.value.hint or "")
    hint = info.value.hint or ""
    assert ("check_definition_types=true" in hint) == ("TypeCheckError" not in message)


def test_a_definition_feast_cannot_apply_is_a_config_error(model_root: Path) -> None:
    line = _break_definitions(model_root, "ttl=timedelta(days=3650),", "ttl=3650,")
    with pytest.raises(ConfigError) as info:
        run(make_source(model_root).start())
    message, hint = str(info.value), info.value.hint or ""
    if "TypeCheckError" in message:  # checked where it was written
        assert f'feature_repo.py line {line} failed: TypeCheckError: argument "ttl"' in message
    else:  # taken as written, failing in Feast's apply
        assert "features.repo: Feast could not apply the definitions: TypeError: " in message
        assert "check_definition_types=true" in hint


@pytest.mark.parametrize("type_checks", [False, True])
def test_feast_is_imported_without_its_type_checks_unless_asked(type_checks: bool) -> None:
    """Feast's typeguard checks cost about 1.5 s of import (off by default); asked for, they
    catch a wrong argument where it is passed. typeguard's own decorator is left as it was."""
    script = (
        "import typeguard\n"
        "real = typeguard.typechecked\n"
        "from infercore_feast.store import import_feast\n"
        f"feast = import_feast(type_checks={type_checks})\n"
        "assert typeguard.typechecked is real, 'typeguard left patched'\n"
        "try:\n"
        "    feast.Field(name='x', dtype='Int64')\n"
        "    print('unchecked')\n"
        "except typeguard.TypeCheckError:\n"
        "    print('checked')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["checked" if type_checks else "unchecked"]


@pytest.mark.parametrize("type_checks", [False, True])
def test_importing_feast_leaves_the_warning_filters_as_they_were(type_checks: bool) -> None:
    """Feast's modules run ``warnings.simplefilter("once", DeprecationWarning)`` at import:
    every library's deprecation warnings would then be printed (raw, with file paths, in JSON
    logs). Only filters of a library's own warning classes (urllib3's) and our own may stay."""
    script = (
        "import warnings\n"
        "before = list(warnings.filters)\n"
        "from infercore_feast.store import import_feast\n"
        f"import_feast(type_checks={type_checks})\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "print([(f[0], f[2].__name__) for f in added if f[2].__module__ == 'builtins'"
        " and f[1] is None])\n"
        "shown = []\n"
        "warnings.showwarning = lambda *a, **k: shown.append(a[0])\n"
        "for category in (DeprecationWarning, PendingDeprecationWarning):\n"
        "    warnings.warn_explicit('old', category, 'lib.py', 1, module='lib', registry={})\n"
        "print(len(shown))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "0"]
