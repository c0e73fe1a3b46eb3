"""The ``feast`` source under request grouping (infercore/runtime/grouping.py): a group whose
fetch fails runs again request by request; the counters count requests, and the keys that
have just failed are not read again for those requests.

The runners do what the runtime's do around the feature source (``Runtime._run_group`` /
``_run_alone``), so each request gets the answer it would get alone. Requests handed to one
``asyncio.gather`` reach their group in the same turn of the loop; nothing waits on a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import ReadSpy, card, latest, make_source, run, sample

from infercore.components import Tensors
from infercore.components.features import begin_request, degraded_parts
from infercore.errors import FeatureStoreUnavailable
from infercore.runtime.grouping import RequestGroups, RunAlone
from infercore_feast import FeastFeatureSource

Array = np.ndarray[Any, Any]
FAILURES = "infercore_feature_fetch_failures_total"


def boom() -> None:
    raise RuntimeError("database disk image is malformed")


def grouped(source: FeastFeatureSource) -> RequestGroups:
    async def run_group(
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        inputs = await source.fetch(fields, deadline=deadline)
        if degraded_parts():
            raise RunAlone("some rows were served degraded")
        return inputs

    async def run_alone(
        fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
    ) -> Tensors:
        return await source.fetch(fields, deadline=deadline)

    return RequestGroups(run_group, run_alone, max_rows=64, max_waiting=100, model_name="fraud")


async def request(
    source: FeastFeatureSource, groups: RequestGroups, *cards: str
) -> tuple[Tensors | Exception, set[str]]:
    """One request as the server runs it: its own degraded marks; grouped, else alone."""
    degraded = begin_request()
    fields = {"card_id": np.array(cards), "amount": np.ones(len(cards), dtype=np.float32)}
    deadline = asyncio.get_running_loop().time() + 30.0
    try:
        result = await groups.submit(fields, None, deadline)
        if result is None:
            result = await source.fetch(fields, deadline=deadline)
    except FeatureStoreUnavailable as exc:
        return exc, degraded
    return result, degraded


def counts(source: FeastFeatureSource) -> dict[str, float]:
    return {
        "error": sample(source, FAILURES, reason="error"),
        "breaker_open": sample(source, FAILURES, reason="breaker_open"),
        "hits": sample(source, "infercore_feature_cache_hits_total"),
        "misses": sample(source, "infercore_feature_cache_misses_total"),
        "degraded": sample(source, "infercore_feature_degraded_total", reason="error"),
    }


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_failed_group_counts_each_request_once_and_reads_once(
    model_root: Path, policy: str
) -> None:
    """Two cached cards and three the store fails for, in one group: the cached ones are
    answered, the others fail as alone; one read, and each request counted once."""

    async def main() -> tuple[list[tuple[Any, set[str]]], FeastFeatureSource, int]:
        source = make_source(model_root, on_failure=policy)
        await source.start()
        try:
            groups = grouped(source)
            spy = ReadSpy(source)
            await source.fetch(
                {"card_id": np.array([card(1), card(2)]), "amount": np.ones(2, np.float32)},
                deadline=asyncio.get_running_loop().time() + 30,
            )
            spy.calls.clear()
            spy.behaviour = boom
            before = counts(source)
            out = await asyncio.gather(*(request(source, groups, card(i)) for i in (1, 3, 2, 4, 5)))
            after = counts(source)
            delta = {k: after[k] - before[k] for k in after}
            assert delta["hits"] == 2 and delta["misses"] == 3, delta
            assert delta["error"] == 3 and delta["breaker_open"] == 0, delta
            assert delta["degraded"] == (3 if policy == "fail_open" else 0), delta
            return out, source, len(spy.calls)
        finally:
            await source.stop()

    out, _, reads = run(main())
    assert reads == 1  # the group's read; the requests that ran again alone did not read
    for (result, degraded), i in zip(out, (1, 3, 2, 4, 5), strict=True):
        if i in (1, 2):
            assert isinstance(result, dict), result
            assert result["txn_count_24h"][0, 0] == latest(i)["txn_count_24h"]
            assert degraded == set()
        elif policy == "fail_closed":
            assert isinstance(result, FeatureStoreUnavailable)
            assert degraded == set()
        else:
            assert isinstance(result, dict) and degraded == {"features"}
            assert result["txn_count_24h"][0, 0] == -1  # its default


def test_a_group_refused_by_the_open_breaker_counts_each_request_once(model_root: Path) -> None:
    async def main() -> tuple[list[tuple[Any, set[str]]], dict[str, float], int]:
        source = make_source(model_root, breaker_failures=1, breaker_failing_s=0)
        await source.start()
        try:
            groups = grouped(source)
            spy = ReadSpy(source)
            spy.behaviour = boom
            first = await request(source, groups, card(1))
            assert isinstance(first[0], FeatureStoreUnavailable)
            assert source.breaker.state == "open"
            before = counts(source)
            out = await asyncio.gather(*(request(source, groups, card(i)) for i in (2, 3, 4)))
            after = counts(source)
            return out, {k: after[k] - before[k] for k in after}, len(spy.calls)
        finally:
            await source.stop()

    out, delta, reads = run(main())
    assert all(isinstance(result, FeatureStoreUnavailable) for result, _ in out)
    assert delta["breaker_open"] == 3 and delta["error"] == 0, delta
    assert delta["misses"] == 3, delta
    assert reads == 1  # the first request's; none while the breaker is open


def test_keys_that_just_failed_are_read_again_by_later_requests(model_root: Path) -> None:
    """Only the requests of the failed group, on the next turn, skip the read: a later
    request for the same card reads the store again, and every failure counts."""

    async def main() -> tuple[dict[str, float], int, Any]:
        source = make_source(model_root)
        await source.start()
        try:
            groups = grouped(source)
            spy = ReadSpy(source)
            spy.behaviour = boom
            # A request of two rows fails alone: one failure, two misses.
            lone = await request(source, groups, card(1), card(2))
            assert isinstance(lone[0], FeatureStoreUnavailable)
            for _ in range(3):
                await asyncio.sleep(0)
            spy.behaviour = None
            later, _ = await request(source, groups, card(1))
            return counts(source), len(spy.calls), later
        finally:
            await source.stop()

    got, reads, later = run(main())
    assert reads == 2  # the store was read again, and answered
    assert isinstance(later, dict) and later["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
    assert got["error"] == 1 and got["misses"] == 3, got


def test_a_group_whose_read_opens_the_breaker_counts_each_request_once(model_root: Path) -> None:
    """The group's failed read opens the breaker: its requests, alone, meet the open breaker.
    One failure per request all the same (the group's read counted under its own reason)."""

    async def main() -> tuple[list[tuple[Any, set[str]]], dict[str, float], int]:
        source = make_source(model_root, breaker_failures=1, breaker_failing_s=0)
        await source.start()
        try:
            groups = grouped(source)
            spy = ReadSpy(source)
            spy.behaviour = boom
            out = await asyncio.gather(*(request(source, groups, card(i)) for i in (2, 3, 4)))
            assert source.breaker.state == "open"
            return out, counts(source), len(spy.calls)
        finally:
            await source.stop()

    out, got, reads = run(main())
    assert all(
        str(result).startswith("feature store unavailable (breaker open)") for result, _ in out
    )
    assert got["error"] + got["breaker_open"] == 3 and got["error"] == 1, got
    assert got["misses"] == 3, got
    assert reads == 1
