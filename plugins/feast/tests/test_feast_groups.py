"""The ``feast`` source under request grouping (infercore/runtime/grouping.py): a group whose
answer cannot be split (its fetch failed, some rows took defaults, a request's bad value, a
model error) runs again request by request; the counters count each request once, as if it had
run alone, and the keys that have just failed are not read again for those requests.

:class:`Serving` does what the runtime does around the feature source (``Runtime._run_group``
/ ``_run_alone``), so each request gets the answer it would get alone. Requests handed to one
``asyncio.gather`` reach their group in the same turn of the loop; nothing waits on a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import (
    INPUTS,
    ReadSpy,
    card,
    latest,
    make_source,
    run,
    sample,
    source_node,
)

from infercore import hookimpl
from infercore.builtins.batchers import NoBatcher
from infercore.components import Batcher, Tensors
from infercore.components.features import begin_request, degraded_parts
from infercore.errors import FeatureStoreUnavailable, InfercoreError, InvalidInput
from infercore.runtime.grouping import RequestGroups, RunAlone
from infercore.testing import async_app_client, runtime_from_dict
from infercore_feast import FeastFeatureSource

Array = np.ndarray[Any, Any]
Answer = tuple[Tensors | InfercoreError, set[str]]
FAILURES = "infercore_feature_fetch_failures_total"
UNKNOWN = "c_nobody"  # a card the store does not have: every feature takes its default
FEATURES = [i["feature"] for i in INPUTS if i["source"] == "feast"]


def boom() -> None:
    raise RuntimeError("database disk image is malformed")


def refused(fields: Mapping[str, Array]) -> bool:
    """A request the steps after the fetch refuse (a bad value the source does not check)."""
    return bool(np.any(fields["amount"] < 0))


class Serving:
    """A started source behind request groups, with the runtime's steps around the fetch.

    After the fetch, ``model_turns`` turns of the loop stand for the batcher and the model (a
    group also waits for ``gate`` when one is set); then a request with a negative amount is
    refused: 400 alone, and its group runs each of its requests again alone (as after one
    request's bad input, or a model error).
    """

    def __init__(
        self, source: FeastFeatureSource, model_turns: int = 0, max_rows: int = 64
    ) -> None:
        self.source = source
        self.spy = ReadSpy(source)
        self.model_turns = model_turns
        self.gate: asyncio.Event | None = None
        #: Groups of several requests whose fetch has ended (in the model's step, or past it).
        self.fetched_groups = 0
        self.groups = RequestGroups(
            self._run_group,
            self._run_alone,
            max_rows=max_rows,
            max_waiting=100,
            model_name="fraud",
        )

    async def _model(self) -> None:
        for _ in range(self.model_turns):
            await asyncio.sleep(0)

    async def _run_group(
        self,
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        inputs = await self.source.fetch(fields, deadline=deadline)
        if degraded_parts():
            raise RunAlone("some rows were served degraded")
        self.fetched_groups += 1
        if self.gate is not None:
            await self.gate.wait()
        await self._model()
        if any(refused(m) for m in members):
            raise RunAlone("a request's input was refused")
        return inputs

    async def _run_alone(
        self, fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
    ) -> Tensors:
        inputs = await self.source.fetch(fields, deadline=deadline)
        await self._model()
        if refused(fields):
            raise InvalidInput("field 'amount': values must be at least 0")
        return inputs

    async def request(self, *cards: str, amount: float = 1.0) -> Answer:
        """One request as the server runs it: its own degraded marks; grouped, else alone."""
        degraded = begin_request()
        fields = {"card_id": np.array(cards), "amount": np.full(len(cards), amount, np.float32)}
        deadline = asyncio.get_running_loop().time() + 30.0
        try:
            result = await self.groups.submit(fields, None, deadline)
            if result is None:
                result = await self._run_alone(fields, None, deadline)
        except InfercoreError as exc:
            return exc, degraded
        return result, degraded

    async def together(self, *requests: str | tuple[str, float]) -> list[Answer]:
        """Requests of one card each that arrive in one turn (one group): ``card`` or
        ``(card, amount)``."""
        return await asyncio.gather(
            *(
                self.request(r) if isinstance(r, str) else self.request(r[0], amount=r[1])
                for r in requests
            )
        )

    async def cache(self, *cards: str) -> None:
        """Read ``cards`` into the cache, outside the counts a test looks at."""
        fields = {"card_id": np.array(cards), "amount": np.ones(len(cards), np.float32)}
        await self.source.fetch(fields, deadline=asyncio.get_running_loop().time() + 30)
        self.spy.calls.clear()

    def counts(self) -> dict[str, float]:
        return counts(self.source)

    def since(self, before: Mapping[str, float]) -> dict[str, float]:
        return since(self.source, before)


def counts(source: FeastFeatureSource) -> dict[str, float]:
    """The source's counters a request moves."""
    got = {
        "error": sample(source, FAILURES, reason="error"),
        "breaker_open": sample(source, FAILURES, reason="breaker_open"),
        "hits": sample(source, "infercore_feature_cache_hits_total"),
        "misses": sample(source, "infercore_feature_cache_misses_total"),
        "degraded": sample(source, "infercore_feature_degraded_total", reason="error"),
    }
    for feature in FEATURES:
        got[feature] = sample(source, "infercore_feature_defaults_total", feature=feature)
    return got


def since(source: FeastFeatureSource, before: Mapping[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in counts(source).items()}


@asynccontextmanager
async def serving(
    model_root: Path, *, model_turns: int = 0, max_rows: int = 64, **options: Any
) -> AsyncIterator[Serving]:
    """A :class:`Serving` over a fresh source (``options``: the source's config)."""
    source = make_source(model_root, **options)
    await source.start()
    try:
        yield Serving(source, model_turns, max_rows)
    finally:
        await source.stop()


# -- a group whose fetch succeeded, run again alone ---------------------------------------

# card 1 cached; cards 3 and 2 read; UNKNOWN read and unknown to the store (defaults).
AFTER_A_GOOD_FETCH: list[tuple[str, float]] = [
    (card(1), 1.0),
    (card(3), 1.0),
    (card(2), -1.0),  # refused after the fetch
    (UNKNOWN, 1.0),
]


@pytest.mark.parametrize("model_turns", [0, 3], ids=["refused-at-once", "after-the-model"])
def test_a_group_run_again_after_its_fetch_counts_each_request_once(
    model_root: Path, model_turns: int
) -> None:
    """The group's fetch succeeds; one request's bad value (or the model) makes every request
    run again alone, finding the rows the group read in the cache. The lookups, the defaults
    and the reads are counted as if each request had run alone, once."""

    async def main() -> tuple[list[Answer], dict[str, float], int]:
        async with serving(model_root, model_turns=model_turns) as s:
            await s.cache(card(1))
            before = s.counts()
            out = await s.together(*AFTER_A_GOOD_FETCH)
            return out, s.since(before), len(s.spy.calls)

    out, delta, reads = run(main())
    assert reads == 1  # the group's read; the requests alone found its rows in the cache
    assert delta["hits"] == 1 and delta["misses"] == 3, delta
    assert all(delta[f] == 1 for f in FEATURES), delta  # UNKNOWN's row, once
    assert delta["error"] == delta["breaker_open"] == delta["degraded"] == 0, delta
    answers = [result for result, _ in out]
    assert isinstance(answers[2], InvalidInput), answers[2]
    for i, result in zip((1, 3), (answers[0], answers[1]), strict=True):
        assert isinstance(result, dict), result
        assert result["txn_count_24h"][0, 0] == latest(i)["txn_count_24h"]
    assert isinstance(answers[3], dict) and answers[3]["txn_count_24h"][0, 0] == -1


@pytest.mark.parametrize(
    ("max_rows", "bad"),
    [
        (64, {2}),  # one group, run again alone
        # Three groups: {0, 1} and {2, 3} run again alone (sharing card 4), {4} is answered.
        (3, {1, 2}),
    ],
)
def test_a_group_run_again_counts_what_the_same_requests_alone_count(
    model_root: Path, max_rows: int, bad: set[int]
) -> None:
    """Requests sharing cards, some of several rows: grouped (then run again alone) and one
    by one, the counters move alike."""
    requests = [(card(1),), (card(4), card(1)), (card(4),), (UNKNOWN, card(5)), (card(5),)]

    async def counted(grouped: bool) -> tuple[dict[str, float], int]:
        async with serving(model_root, max_rows=max_rows) as s:
            await s.cache(card(1))
            before = s.counts()
            calls = [
                s.request(*cards, amount=-1.0 if i in bad else 1.0)
                for i, cards in enumerate(requests)
            ]
            if grouped:
                out = await asyncio.gather(*calls)
            else:
                out = [await call for call in calls]
            for i, (result, _) in enumerate(out):
                assert isinstance(result, InvalidInput if i in bad else dict), (i, result)
            return s.since(before), s.fetched_groups

    async def main() -> tuple[tuple[dict[str, float], int], tuple[dict[str, float], int]]:
        return await counted(True), await counted(False)

    (grouped, groups), (alone, no_groups) = run(main())
    assert (groups, no_groups) == (1 if max_rows > len(requests) else 2, 0)
    assert alone["hits"] == 4 and alone["misses"] == 3, alone
    if max_rows < len(requests):
        # Groups fetching at once both miss a card they share, where requests one by one
        # miss it once: the lookups are the same, their split between hits and misses not.
        for counts in (grouped, alone):
            counts["lookups"] = counts.pop("hits") + counts.pop("misses")
    assert grouped == alone, (grouped, alone)


def test_fetches_beside_a_group_or_after_it_count_their_own_lookups(model_root: Path) -> None:
    """A request for a card the running group holds, and one after the group has answered,
    are not the group's requests run again: their lookups count."""

    async def main() -> dict[str, float]:
        async with serving(model_root) as s:
            s.gate = asyncio.Event()
            before = s.counts()
            group = asyncio.ensure_future(s.together(card(1), card(2)))
            while not s.fetched_groups:  # the group's fetch has ended; its model runs
                await asyncio.sleep(0.001)
            beside = await s.request(card(1))
            s.gate.set()
            out = await group
            after = await s.request(card(2))
            assert all(isinstance(r, dict) for r, _ in [*out, beside, after])
            return s.since(before)

    delta = run(main())
    assert delta["misses"] == 2 and delta["hits"] == 2, delta


class StackingBatcher(NoBatcher):
    """``none`` declared batching: each submission (a whole group's) is one model call."""

    kind = "stacking"
    batches = True


class StackingPlugin:
    @hookimpl
    def register_batchers(self) -> list[type[Batcher]]:
        return [StackingBatcher]


POISON = -7.0  # the fake model raises on a row whose amount (its first column) is this


def test_through_the_app_a_group_run_again_after_a_model_error_counts_each_request_once(
    model_root: Path,
) -> None:
    """The real runtime: five transactions grouped, one poisons the model's call, each then
    runs alone (its own answer: 500 for the poisoned one). Each card is looked up once, read
    once, and the unknown card's defaults are counted once."""
    rt = runtime_from_dict(
        {
            "model_root": str(model_root),
            "batching": {"kind": "stacking"},
            "features": {"kind": "feast", **source_node(layout="matrix", matrix_input="x")},
            "models": {
                "fraud": {
                    "versions": {
                        "1": {"loader": {"kind": "fake", "features": 5, "fail_on_value": POISON}}
                    }
                }
            },
        },
        extra_plugins=[("stacking", StackingPlugin())],
    )
    cards = [card(1), card(2), card(3), card(4), UNKNOWN]
    amounts = [1.0, 2.0, POISON, 4.0, 5.0]

    async def scenario() -> tuple[list[int], dict[str, float], int]:
        async with async_app_client(rt) as client:
            source = rt.models["fraud"].features
            spy = ReadSpy(source)
            before = counts(source)
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/models/fraud:predict",
                        json={"instances": [{"card_id": c, "amount": a}]},
                    )
                    for c, a in zip(cards, amounts, strict=True)
                )
            )
            return [r.status_code for r in responses], since(source, before), len(spy.calls)

    statuses, delta, reads = run(scenario())
    model = rt.models["fraud"].versions["1"].model
    assert model.batches[0] == len(cards), model.batches  # they were grouped
    assert statuses == [200, 200, 500, 200, 200], statuses
    assert reads == 1
    assert delta["misses"] == len(cards) and delta["hits"] == 0, delta
    assert all(delta[f] == 1 for f in FEATURES), delta


# -- a group whose fetch failed --------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_failed_group_counts_each_request_once_and_reads_once(
    model_root: Path, policy: str
) -> None:
    """Two cached cards and three the store fails for, in one group: the cached ones are
    answered, the others fail as alone; one read, and each request counted once."""

    async def main() -> tuple[list[Answer], dict[str, float], int]:
        async with serving(model_root, on_failure=policy) as s:
            await s.cache(card(1), card(2))
            s.spy.behaviour = boom
            before = s.counts()
            out = await s.together(*(card(i) for i in (1, 3, 2, 4, 5)))
            return out, s.since(before), len(s.spy.calls)

    out, delta, reads = run(main())
    assert delta["hits"] == 2 and delta["misses"] == 3, delta
    assert delta["error"] == 3 and delta["breaker_open"] == 0, delta
    assert delta["degraded"] == (3 if policy == "fail_open" else 0), delta
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
    async def main() -> tuple[list[Answer], dict[str, float], int]:
        async with serving(model_root, breaker_failures=1, breaker_failing_s=0) as s:
            s.spy.behaviour = boom
            first = await s.request(card(1))
            assert isinstance(first[0], FeatureStoreUnavailable)
            assert s.source.breaker.state == "open"
            before = s.counts()
            out = await s.together(*(card(i) for i in (2, 3, 4)))
            return out, s.since(before), len(s.spy.calls)

    out, delta, reads = run(main())
    assert all(isinstance(result, FeatureStoreUnavailable) for result, _ in out)
    assert delta["breaker_open"] == 3 and delta["error"] == 0, delta
    assert delta["misses"] == 3, delta
    assert reads == 1  # the first request's; none while the breaker is open


def test_keys_that_just_failed_are_read_again_by_later_requests(model_root: Path) -> None:
    """Only the requests of the failed group, run again alone, skip the read: a later
    request for the same card reads the store again, and every failure counts."""

    async def main() -> tuple[dict[str, float], int, Any]:
        async with serving(model_root) as s:
            s.spy.behaviour = boom
            # A request of two rows fails alone: one failure, two misses.
            lone = await s.request(card(1), card(2))
            assert isinstance(lone[0], FeatureStoreUnavailable)
            for _ in range(3):
                await asyncio.sleep(0)
            s.spy.behaviour = None
            later, _ = await s.request(card(1))
            return s.counts(), len(s.spy.calls), later

    got, reads, later = run(main())
    assert reads == 2  # the store was read again, and answered
    assert isinstance(later, dict) and later["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
    assert got["error"] == 1 and got["misses"] == 3, got


def test_a_group_whose_read_opens_the_breaker_counts_each_request_once(model_root: Path) -> None:
    """The group's failed read opens the breaker: its requests, alone, meet the open breaker.
    One failure per request all the same (the group's read counted under its own reason)."""

    async def main() -> tuple[list[Answer], dict[str, float], int]:
        async with serving(model_root, breaker_failures=1, breaker_failing_s=0) as s:
            s.spy.behaviour = boom
            out = await s.together(*(card(i) for i in (2, 3, 4)))
            assert s.source.breaker.state == "open"
            return out, s.counts(), len(s.spy.calls)

    out, got, reads = run(main())
    assert all(
        str(result).startswith("feature store unavailable (breaker open)") for result, _ in out
    )
    assert got["error"] + got["breaker_open"] == 3 and got["error"] == 1, got
    assert got["misses"] == 3, got
    assert reads == 1


class WakesOneBeside(Serving):
    """When the group's fetch fails: the store is back, and ``woken`` is set, in the step
    that hands the group's requests back to run alone (so a request waiting on it fetches in
    the very turn they do, first)."""

    def __init__(self, source: FeastFeatureSource) -> None:
        super().__init__(source)
        self.woken = asyncio.Event()

    async def _run_group(
        self,
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        try:
            return await super()._run_group(members, fields, declared, deadline)
        except FeatureStoreUnavailable:
            self.spy.behaviour = None
            self.woken.set()
            raise


def test_a_request_beside_a_failed_group_reads_and_counts_its_own(model_root: Path) -> None:
    """A request that is not the group's, for a card among the group's, fetching in the turn
    the group's requests run again alone: it is not one of them, so it neither takes the
    group's failure without reading nor its counts. It reads the store (back by then) and is
    served; the group's requests take the group's failure, one failure each."""

    async def main() -> tuple[list[Answer], Any, dict[str, float], list[list[str]]]:
        source = make_source(model_root)
        await source.start()
        try:
            s = WakesOneBeside(source)
            s.spy.behaviour = boom

            async def beside() -> Any:
                await s.woken.wait()
                fields = {"card_id": np.array([card(1)]), "amount": np.ones(1, np.float32)}
                deadline = asyncio.get_running_loop().time() + 30
                try:
                    return await source.fetch(fields, deadline=deadline)
                except InfercoreError as exc:
                    return exc

            other = asyncio.create_task(beside())
            await asyncio.sleep(0)  # it waits for the group's failure
            before = s.counts()
            group = await s.together(card(1), card(2))
            alone = await other
            return group, alone, s.since(before), s.spy.calls
        finally:
            await source.stop()

    group, alone, delta, reads = run(main())
    assert all(isinstance(result, FeatureStoreUnavailable) for result, _ in group)
    assert isinstance(alone, dict), alone
    assert alone["txn_count_24h"][0, 0] == latest(1)["txn_count_24h"]
    assert reads == [[card(1), card(2)], [card(1)]]  # the group's, and the request's beside
    assert delta["error"] == 2 and delta["misses"] == 3 and delta["hits"] == 0, delta
