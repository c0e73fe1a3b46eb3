"""Request groups (infercore/runtime/grouping.py) with fake runners, without an app.

The runners compute ``y = 2 * x + 1`` row by row, so any request's right answer is known
whether it ran in a group or alone. Arrival is controlled by loop turns, never by sleeps with
a duration: coroutines handed to one ``asyncio.gather`` all reach ``submit`` in the same turn
(one group); ``await asyncio.sleep(0)`` lets every task that is ready take one step (the
callers reach their group, the group's task is queued behind them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infercore.components import Tensors
from infercore.components.features import begin_request, mark_degraded
from infercore.errors import BackendError, InvalidInput, QueueFull
from infercore.runtime.grouping import SHARED_FAILURES, RequestGroups, RunAlone

Array = np.ndarray[Any, Any]
FAR = 1e12  # a deadline that never passes (event-loop time)
HANG_S = 10.0
T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` with a generous bound: a request left without an answer fails the test
    instead of hanging it (not a timing check)."""
    return asyncio.run(asyncio.wait_for(scenario, HANG_S))


def answer(fields: Mapping[str, Array]) -> Tensors:
    return {"y": fields["x"] * 2 + 1}


def x(*firsts: float, width: int = 2, dtype: Any = np.float32) -> Array:
    """Rows ``[first, first + 0.5, ...]``, one per ``first``."""
    rows = [[f + 0.5 * i for i in range(width)] for f in firsts]
    return np.asarray(rows, dtype=dtype).reshape(len(firsts), width)


class Runners:
    """The two runners, recording their calls; ``fail`` / ``gate`` / ``mark`` change them."""

    def __init__(self) -> None:
        self.groups: list[tuple[list[Mapping[str, Array]], dict[str, Array], Any, float]] = []
        self.alone: list[Mapping[str, Array]] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.started: asyncio.Event | None = None
        self.cancelled = 0
        self.mark_group = False
        self.mark_alone_when: float | None = None  # mark_degraded when x[0, 0] equals this
        self.short_rows = False

    async def run_group(
        self,
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        self.groups.append((list(members), dict(fields), declared, deadline))
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.mark_group:
            mark_degraded("features")
        if self.fail is not None:
            raise self.fail
        out = answer(fields)
        if self.short_rows:
            out = {"y": out["y"][:-1]}
        return out

    async def run_alone(
        self, fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
    ) -> Tensors:
        self.alone.append(fields)
        if self.mark_alone_when is not None and fields["x"][0, 0] == self.mark_alone_when:
            mark_degraded("features")
        return answer(fields)

    def make(
        self,
        *,
        max_rows: int = 64,
        max_waiting: int = 512,
        busy_turns: int = 3,
        batcher_full: Callable[[], bool] = lambda: False,
    ) -> RequestGroups:
        return RequestGroups(
            self.run_group,
            self.run_alone,
            max_rows=max_rows,
            max_waiting=max_waiting,
            model_name="m",
            batcher_full=batcher_full,
            busy_turns=busy_turns,
        )


def submit(
    groups: RequestGroups,
    value: Array,
    declared: Mapping[str, str] | None = None,
    deadline: float = FAR,
    **more: Array,
) -> Any:
    return groups.submit({"x": value, **more}, declared, deadline)


def assert_own_answer(result: Tensors | None, value: Array) -> None:
    assert result is not None
    assert set(result) == {"y"}
    np.testing.assert_array_equal(result["y"], value * 2 + 1)


# -- forming groups ------------------------------------------------------------------------


def test_requests_of_one_turn_form_one_group_and_each_gets_its_own_rows() -> None:
    r = Runners()
    values = [x(1), x(2, 3, 4), x(5, 6), x(7)]
    deadlines = [FAR - 3, FAR, FAR - 1, FAR - 2]

    async def scenario() -> list[Tensors | None]:
        groups = r.make()
        results = await asyncio.gather(
            *(submit(groups, v, {"x": "FP32"}, d) for v, d in zip(values, deadlines, strict=True))
        )
        assert groups.waiting == 0
        return list(results)

    results = run(scenario())
    assert r.alone == []
    assert len(r.groups) == 1
    members, stacked, declared, deadline = r.groups[0]
    np.testing.assert_array_equal(stacked["x"], np.concatenate(values))
    assert [m["x"] for m in members] == values  # the members' own fields, in arrival order
    assert declared == {"x": "FP32"}
    assert deadline == FAR  # the group waits for the latest deadline
    for result, value in zip(results, values, strict=True):
        assert_own_answer(result, value)
        assert result is not None and result["y"].shape[0] == value.shape[0]


def test_a_request_alone_in_its_turn_runs_as_alone() -> None:
    r = Runners()
    value = x(1, 2)

    async def scenario() -> Tensors | None:
        return await submit(r.make(), value)  # type: ignore[no-any-return]

    result = run(scenario())
    assert r.groups == []
    assert len(r.alone) == 1 and r.alone[0]["x"] is value
    assert_own_answer(result, value)


def test_requests_of_later_turns_form_new_groups() -> None:
    r = Runners()

    async def scenario() -> None:
        groups = r.make()
        first = await asyncio.gather(submit(groups, x(1)), submit(groups, x(2)))
        second = await asyncio.gather(submit(groups, x(3)), submit(groups, x(4)))
        for result, value in zip([*first, *second], [x(1), x(2), x(3), x(4)], strict=True):
            assert_own_answer(result, value)

    run(scenario())
    assert [g[1]["x"][:, 0].tolist() for g in r.groups] == [[1, 2], [3, 4]]


async def keep_busy(stop: asyncio.Event, step_s: float = 300e-6) -> None:
    """Keep the event loop busy: each turn spends ``step_s`` here, as reading requests would."""
    while not stop.is_set():
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


def submit_turn_by_turn(r: Runners, busy_turns: int, firsts: list[float]) -> list[list[float]]:
    """One request per turn of a busy loop; the first row of each group's requests."""

    async def scenario() -> None:
        groups = r.make(busy_turns=busy_turns)
        stop = asyncio.Event()
        busy = asyncio.create_task(keep_busy(stop))
        calls = []
        for first in firsts:
            calls.append(asyncio.ensure_future(submit(groups, x(first))))
            await asyncio.sleep(0)
        results = await asyncio.gather(*calls)
        stop.set()
        await busy
        for result, first in zip(results, firsts, strict=True):
            assert_own_answer(result, x(first))

    run(scenario())
    groups = [g[1]["x"][:, 0].tolist() for g in r.groups]
    return groups + [[a["x"][0, 0]] for a in r.alone]


@pytest.mark.parametrize("busy_turns", [0, 3])
def test_while_the_loop_is_busy_a_group_waits_a_few_turns_for_company(busy_turns: int) -> None:
    # Under load the next requests are being read while a group forms: it stays open while
    # the loop is busy (each turn here takes 300 µs), up to busy_turns turns.
    r = Runners()
    groups = submit_turn_by_turn(r, busy_turns, [1, 2, 3, 4, 5, 6, 7, 8])
    assert sorted(v for g in groups for v in g) == [1, 2, 3, 4, 5, 6, 7, 8]
    if busy_turns == 0:
        assert all(len(g) == 1 for g in groups), groups  # each went in its own turn
    else:
        assert len(groups[0]) > 1, groups  # later turns' requests joined the first group
        # ... but for busy_turns turns at most: one request joins per turn.
        assert all(len(g) <= busy_turns + 1 for g in groups), groups


def test_a_group_closes_at_max_rows_and_the_next_request_opens_another() -> None:
    r = Runners()
    values = [x(1, 2), x(3), x(4), x(5, 6), x(7, 8, 9), x(10)]

    async def scenario() -> list[Tensors | None]:
        groups = r.make(max_rows=4)
        return list(await asyncio.gather(*(submit(groups, v) for v in values)))

    results = run(scenario())
    # 2 + 1 + 1 = 4 rows closes the first; 2 + 3 would pass 4, so 3 rows open a third group,
    # which 1 more row fills.
    assert [g[1]["x"][:, 0].tolist() for g in r.groups] == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert [a["x"][:, 0].tolist() for a in r.alone] == [[5, 6]]
    assert all(len(g[1]["x"]) <= 4 for g in r.groups)
    for result, value in zip(results, values, strict=True):
        assert_own_answer(result, value)


@pytest.mark.parametrize(
    ("other", "declared"),
    [
        (x(9, dtype=np.float64), None),
        (x(9, width=3), None),
        (x(9).astype(np.int32), None),
        (x(9), {"x": "FP32"}),
    ],
    ids=["dtype", "trailing-shape", "int-dtype", "declared-datatype"],
)
def test_requests_of_different_shapes_or_types_go_to_different_groups(
    other: Array, declared: dict[str, str] | None
) -> None:
    r = Runners()
    plain = [x(1), x(2)]
    odd = [other, other + 1]

    async def scenario() -> list[Tensors | None]:
        groups = r.make()
        calls = [submit(groups, plain[0]), submit(groups, odd[0], declared)]
        calls += [submit(groups, plain[1]), submit(groups, odd[1], declared)]
        return list(await asyncio.gather(*calls))

    results = run(scenario())
    assert r.alone == []
    assert len(r.groups) == 2
    for members, _, _, _ in r.groups:
        assert len(members) == 2

    # Which group runs first depends on the event loop's timing (a busy machine): by content.
    def is_plain(group: Any) -> bool:
        stacked = group[1]["x"]
        return bool(
            group[2] is None
            and stacked.dtype == plain[0].dtype
            and stacked.shape[1:] == plain[0].shape[1:]
        )

    (first,) = [g for g in r.groups if is_plain(g)]
    (second,) = [g for g in r.groups if g is not first]
    np.testing.assert_array_equal(first[1]["x"], np.concatenate(plain))
    np.testing.assert_array_equal(second[1]["x"], np.concatenate(odd))
    assert first[2] is None and second[2] == declared
    for result, value in zip(results, [plain[0], odd[0], plain[1], odd[1]], strict=True):
        assert_own_answer(result, value)


def test_requests_with_other_field_names_go_to_different_groups() -> None:
    r = Runners()

    async def scenario() -> None:
        groups = r.make()
        await asyncio.gather(
            submit(groups, x(1)),
            submit(groups, x(2), z=np.zeros(1)),
            submit(groups, x(3)),
            submit(groups, x(4), z=np.ones(1)),
        )

    run(scenario())
    assert sorted(tuple(g[1]) for g in r.groups) == [("x",), ("x", "z")]
    assert [g[1]["x"][:, 0].tolist() for g in r.groups] == [[1, 3], [2, 4]]


@pytest.mark.parametrize(
    "fields",
    [
        {"x": x(1, 2), "z": np.zeros(3)},  # row counts that differ between fields
        {"x": x(1), "scalar": np.ones((), np.float32)},  # a 0-d field
        {"x": np.zeros((0, 2), np.float32)},  # no rows
        {"x": x(1, 2, 3, 4, 5)},  # more rows than one group holds
    ],
    ids=["mismatched-rows", "0-d", "no-rows", "over-max-rows"],
)
def test_requests_that_cannot_be_stacked_are_left_to_run_alone(fields: dict[str, Array]) -> None:
    r = Runners()

    async def scenario() -> list[Tensors | None]:
        groups = r.make(max_rows=4)
        # A stackable request in the same turn: it must not be grouped with the odd one.
        results = await asyncio.gather(groups.submit(fields, None, FAR), submit(groups, x(7)))
        assert groups.waiting == 0
        return list(results)

    odd, fine = run(scenario())
    assert odd is None
    assert r.groups == []
    assert [a["x"][:, 0].tolist() for a in r.alone] == [[7]]  # the other ran as a group of one
    assert_own_answer(fine, x(7))


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        RunAlone("cannot split"),
        InvalidInput("bad value"),
        BackendError("the model failed"),
        ValueError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_failure_one_request_could_cause_sends_every_request_alone(
    failure: Exception,
) -> None:
    r = Runners()
    r.fail = failure

    async def scenario() -> list[Tensors | None]:
        groups = r.make()
        results = await asyncio.gather(submit(groups, x(1)), submit(groups, x(2, 3)))
        assert groups.waiting == 0
        return list(results)

    assert run(scenario()) == [None, None]
    assert len(r.groups) == 1
    assert r.alone == []  # submit says "alone"; the caller runs it (Runtime.infer does)


def test_outputs_without_the_groups_rows_send_every_request_alone() -> None:
    r = Runners()
    r.short_rows = True

    async def scenario() -> list[Tensors | None]:
        groups = r.make()
        return list(await asyncio.gather(submit(groups, x(1)), submit(groups, x(2))))

    assert run(scenario()) == [None, None]


@pytest.mark.parametrize("failure", SHARED_FAILURES, ids=lambda c: c.__name__)
def test_a_failure_every_request_shares_is_every_requests_answer(failure: type[Exception]) -> None:
    r = Runners()
    error = failure("for everyone")
    r.fail = error

    async def scenario() -> list[Any]:
        groups = r.make()
        calls = [submit(groups, x(1)), submit(groups, x(2, 3)), submit(groups, x(4))]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert groups.waiting == 0
        return list(results)

    results = run(scenario())
    assert len(r.groups) == 1 and r.alone == []
    assert results[0] is error
    # Each caller gets its own object (one raised in every caller would collect every
    # caller's traceback), alike in type, message and status.
    assert len({id(result) for result in results}) == 3, results
    for result in results:
        assert type(result) is failure and str(result) == str(error)
        assert getattr(result, "status_code", None) == getattr(error, "status_code", None)


def test_degraded_marks_inside_a_group_send_every_request_alone() -> None:
    r = Runners()
    r.mark_group = True

    async def caller(groups: RequestGroups, value: Array) -> tuple[Any, set[str]]:
        own = begin_request()
        return await submit(groups, value), own

    async def scenario() -> list[tuple[Any, set[str]]]:
        groups = r.make()
        return list(await asyncio.gather(caller(groups, x(1)), caller(groups, x(2))))

    results = run(scenario())
    assert len(r.groups) == 1
    # Nobody is answered from the group, and the group's mark reaches no request: each will
    # learn alone whether it was served degraded.
    assert results == [(None, set()), (None, set())]


def test_a_group_of_one_gets_its_own_degraded_marks() -> None:
    r = Runners()
    r.mark_alone_when = 5.0

    async def caller(groups: RequestGroups, value: Array) -> tuple[Any, set[str]]:
        own = begin_request()
        return await submit(groups, value), own

    async def scenario() -> list[tuple[Any, set[str]]]:
        groups = r.make()
        # Different widths: two groups of one, in the same turn.
        return list(await asyncio.gather(caller(groups, x(5)), caller(groups, x(6, width=3))))

    (marked_result, marked), (plain_result, plain) = run(scenario())
    assert r.groups == [] and len(r.alone) == 2
    assert marked == {"features"}
    assert plain == set()
    assert_own_answer(marked_result, x(5))
    assert_own_answer(plain_result, x(6, width=3))


def test_a_group_of_one_raises_what_it_raises_alone() -> None:
    error = InvalidInput("bad value")

    async def run_alone(fields: Any, declared: Any, deadline: float) -> Tensors:
        raise error

    async def scenario() -> None:
        groups = RequestGroups(
            Runners().run_group, run_alone, max_rows=8, max_waiting=8, model_name="m"
        )
        with pytest.raises(InvalidInput) as info:
            await submit(groups, x(1))
        assert info.value is error
        assert groups.waiting == 0

    run(scenario())


def test_requests_beyond_max_waiting_are_queue_full() -> None:
    r = Runners()

    async def scenario() -> list[Any]:
        groups = r.make(max_waiting=2)
        calls = [submit(groups, x(1)), submit(groups, x(2)), submit(groups, x(3))]
        results = list(await asyncio.gather(*calls, return_exceptions=True))
        assert groups.waiting == 0
        # Room again once answered.
        assert_own_answer(await submit(groups, x(4)), x(4))
        return results

    first, second, third = run(scenario())
    assert_own_answer(first, x(1))
    assert_own_answer(second, x(2))
    assert isinstance(third, QueueFull)
    assert [g[1]["x"][:, 0].tolist() for g in r.groups] == [[1, 2]]


def test_while_the_batcher_is_full_a_request_is_queue_full_before_joining_a_group() -> None:
    """The batcher's ``full`` (work over its queue timeout, say) turns requests away at once."""
    r = Runners()
    full = [False]

    async def scenario() -> list[Any]:
        groups = r.make(batcher_full=lambda: full[0])
        assert not groups.full
        full[0] = True
        assert groups.full  # what reject_before_body asks (ServedVersion.full)
        turned = list(await asyncio.gather(submit(groups, x(1)), return_exceptions=True))
        full[0] = False
        assert_own_answer(await submit(groups, x(2)), x(2))
        return turned

    (turned,) = run(scenario())
    assert isinstance(turned, QueueFull)
    assert all(1 not in g[1]["x"][:, 0].tolist() for g in r.groups)
    assert not any(1 in a["x"][:, 0].tolist() for a in r.alone)


# -- callers that leave --------------------------------------------------------------------


@pytest.mark.parametrize("leaving", [1, 0], ids=["a-later-one", "the-one-that-opened-it"])
def test_a_request_whose_caller_left_before_its_group_ran_is_not_in_it(leaving: int) -> None:
    r = Runners()
    values = [x(1), x(2), x(3)]

    async def scenario() -> list[Any]:
        groups = r.make()
        tasks = [asyncio.ensure_future(submit(groups, v)) for v in values]
        await asyncio.sleep(0)  # each caller takes its step into the group
        assert groups.waiting == 3 and r.groups == []  # the group has not run yet
        tasks[leaving].cancel()
        results = list(await asyncio.gather(*tasks, return_exceptions=True))
        assert groups.waiting == 0
        # A request of the same shape arriving now opens a group of its own.
        assert_own_answer(await submit(groups, x(4)), x(4))
        return results

    results = run(scenario())
    assert isinstance(results[leaving], asyncio.CancelledError)
    stayed = [i for i in range(3) if i != leaving]
    assert len(r.groups) == 1
    members, stacked, _, _ = r.groups[0]
    np.testing.assert_array_equal(stacked["x"], np.concatenate([values[i] for i in stayed]))
    assert len(members) == 2
    for i in stayed:
        assert_own_answer(results[i], values[i])
    assert [a["x"][:, 0].tolist() for a in r.alone] == [[4]]


def test_when_the_first_caller_leaves_while_its_group_waits_one_other_runs_as_alone() -> None:
    r = Runners()

    async def scenario() -> list[Any]:
        groups = r.make()
        tasks = [asyncio.ensure_future(submit(groups, x(v))) for v in (1, 2)]
        await asyncio.sleep(0)
        tasks[0].cancel()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first, second = run(scenario())
    assert isinstance(first, asyncio.CancelledError)
    assert r.groups == []
    assert [a["x"][:, 0].tolist() for a in r.alone] == [[2]]
    assert_own_answer(second, x(2))


def test_when_every_caller_leaves_before_the_group_runs_it_never_runs() -> None:
    r = Runners()

    async def scenario() -> None:
        groups = r.make()
        tasks = [asyncio.ensure_future(submit(groups, x(v))) for v in (1, 2)]
        await asyncio.sleep(0)
        assert groups.waiting == 2 and r.groups == []
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, asyncio.CancelledError) for e in results)
        assert groups.waiting == 0
        # A request of the same shape arriving now gets a group that runs.
        assert_own_answer(await submit(groups, x(3)), x(3))

    run(scenario())
    assert r.groups == []
    assert [a["x"][:, 0].tolist() for a in r.alone] == [[3]]


def test_when_every_caller_leaves_a_running_group_its_work_is_cancelled() -> None:
    r = Runners()

    async def scenario() -> None:
        r.gate, r.started = asyncio.Event(), asyncio.Event()
        groups = r.make()
        tasks = [asyncio.ensure_future(submit(groups, x(v))) for v in (1, 2)]
        await r.started.wait()  # the group's work is under way (e.g. queued in the batcher)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await asyncio.sleep(0)
        assert r.cancelled == 0  # one caller is still there: the work goes on
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, asyncio.CancelledError) for e in results)
        for _ in range(3):
            await asyncio.sleep(0)  # the group's task meets its cancellation
        assert r.cancelled == 1
        assert groups.waiting == 0
        r.gate.set()  # nothing is left waiting on it

    run(scenario())
    assert len(r.groups) == 1


def test_a_caller_that_leaves_a_running_group_does_not_stop_the_others() -> None:
    r = Runners()

    async def scenario() -> list[Any]:
        r.gate, r.started = asyncio.Event(), asyncio.Event()
        groups = r.make()
        tasks = [asyncio.ensure_future(submit(groups, x(v))) for v in (1, 2, 3)]
        await r.started.wait()
        tasks[1].cancel()
        await asyncio.sleep(0)
        r.gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first, second, third = run(scenario())
    assert isinstance(second, asyncio.CancelledError)
    assert r.cancelled == 0
    assert_own_answer(first, x(1))
    assert_own_answer(third, x(3))


# -- the property: grouped or not, each request gets what it would get alone ---------------

POISON = -7.0

request = st.tuples(
    st.lists(
        st.lists(st.integers(-8, 8).map(float), min_size=2, max_size=2), min_size=1, max_size=4
    ),
    st.integers(0, 2),  # loop turns to wait before arriving
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request, min_size=1, max_size=12), max_rows=st.integers(1, 8))
def test_every_request_gets_what_it_would_get_alone(
    requests: list[tuple[list[list[float]], int]], max_rows: int
) -> None:
    """Rows starting with POISON make the model fail (as a bad value would): in a group, the
    whole group then runs alone; alone, only that request fails."""
    stacked_rows: list[int] = []

    def model(fields: Mapping[str, Array]) -> Tensors:
        if np.any(fields["x"][:, 0] == POISON):
            raise BackendError("poisoned row")
        return answer(fields)

    async def run_group(
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        stacked_rows.append(len(fields["x"]))
        assert len(members) >= 2
        await asyncio.sleep(0)
        return model(fields)

    async def run_alone(
        fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
    ) -> Tensors:
        await asyncio.sleep(0)
        return model(fields)

    groups = RequestGroups(
        run_group, run_alone, max_rows=max_rows, max_waiting=1000, model_name="m"
    )

    async def infer(value: Array, turns: int) -> Any:
        # What Runtime.infer does with the groups.
        for _ in range(turns):
            await asyncio.sleep(0)
        result = await groups.submit({"x": value}, None, FAR)
        if result is None:
            result = await run_alone({"x": value}, None, FAR)
        return result

    async def scenario() -> list[Any]:
        values = [np.asarray(rows, dtype=np.float32) for rows, _ in requests]
        calls = [infer(v, turns) for v, (_, turns) in zip(values, requests, strict=True)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = run(scenario())
    assert groups.waiting == 0
    assert all(n <= max_rows for n in stacked_rows)
    for (rows, _), result in zip(requests, results, strict=True):
        value = np.asarray(rows, dtype=np.float32)
        if np.any(value[:, 0] == POISON):
            assert isinstance(result, BackendError)
        else:
            assert not isinstance(result, BaseException), result
            np.testing.assert_array_equal(result["y"], value * 2 + 1)
