"""Request groups: requests for one version that arrive together share one pass of the pipeline.

Under load, many requests for the same version reach the runtime in the same turn of the event
loop (every connection whose bytes arrived in one poll). Run one by one, each builds its own
feature columns, checks its own inputs, joins the batcher's queue on its own, and has its
outputs mapped on its own; the model then sees them stacked anyway. A request group does that
work once for all of them: their request fields are stacked, the feature source fetches for the
stack, the inputs are checked once, the batcher gets one submission, the outputs plan runs once,
drift and shadow get one offer, and each request gets back a view of its own rows.

Who may be grouped, and what stays per request:

- Only versions whose model is batchable and whose batcher batches (``Batcher.batches``:
  never ``none``, which promises one model call per request), behind a feature source that
  declares itself ``groupable`` (row *i* of its answer depends only on row *i* of the
  fields), when ``server.group_requests`` is on.
- A request joins the open group of its shape (same field names, dtypes, trailing shapes and
  declared datatypes) while that group has not started and has room (the batcher's
  ``max_batch_size`` in rows). The group starts on the next turn of the loop, or, while the
  loop is busy (other requests are being read and decoded), up to ``BUSY_TURNS`` turns later;
  an idle turn (under ``IDLE_TURN_S``: nothing else is on its way) starts it at once.
- A group of one request runs exactly as that request alone would.
- When a group of several fails in a way that one request could have caused (a bad value, a
  model error, a feature-store failure, default features served to some of them), nothing is
  answered from it: each request runs again alone, so it gets the answer, error or
  ``X-Infercore-Degraded`` mark it would have got alone (P13). Failures that are the same for
  every request (queue full or timed out, shutting down, deadline) are everyone's answer.
- Requests in groups count against the batcher's ``max_queue_size`` from arrival until
  answered: beyond it, 503 ``queue_full`` at once (P1).
- A request whose client goes leaves its group. A group whose requests have all gone is
  cancelled (its work, if still queued, never runs); once the group's batch is running, a
  departed request's rows are computed with it, as in any batch.
- Each request keeps its own deadline; the group as a whole waits for the latest one.
- A component that counts per request (the feature source's lookups, failures, defaults) can
  tell a request run again alone from any other: the group's pass is :func:`group_pass` inside
  it, and the first :func:`run_again_after` of each of its requests run again alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from infercore.components import Tensors
from infercore.components.batching import IDLE_TURN_S, SUBMISSION_REQUESTS
from infercore.components.features import begin_request, degraded_parts
from infercore.errors import (
    DeadlineExceeded,
    ModelNotReady,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)

Array = npt.NDArray[Any]

#: Turns a group stays open while the event loop is busy (``RequestGroups.busy_turns``).
BUSY_TURNS = 3

#: Failures that every request of a group would have met alone: answered to all of them.
SHARED_FAILURES = (QueueFull, QueueTimeout, ShuttingDown, DeadlineExceeded, ModelNotReady)

#: Rows of one group (and one shadow submission) when the batcher does not say.
DEFAULT_GROUP_ROWS = 64
#: Requests waiting in groups when the batcher does not say (``max_queue_size``).
DEFAULT_GROUP_WAITING = 512


def batcher_option(batcher: Any, name: str, default: int) -> int:
    """An int option of a batcher's config (``max_batch_size``, ``max_queue_size``), if any."""
    value = getattr(getattr(batcher, "config", None), name, None)
    return value if isinstance(value, int) and value > 0 else default


def _own_copy(exc: BaseException) -> BaseException:
    """A group member's own copy of a shared failure.

    Each caller raises its answer again; one object raised in every caller would collect all
    of their tracebacks. Same type, message, hint and cause.
    """
    try:
        twin = copy.copy(exc)
    except Exception:  # an exception class that cannot be rebuilt from its args
        return exc
    twin.__cause__ = exc.__cause__
    twin.__suppress_context__ = exc.__suppress_context__
    return twin


class RunAlone(Exception):
    """Raised by a group runner: the group's answer cannot be split; each request runs alone."""


class GroupPass:
    """One pass of a group of several requests through the pipeline, by identity (weakly
    referable: a component may key what the pass counted by it, for as long as the group's
    requests can still run again alone)."""

    __slots__ = ("__weakref__",)


_group_pass: contextvars.ContextVar[GroupPass | None] = contextvars.ContextVar(
    "infercore_group_pass", default=None
)
_run_again: contextvars.ContextVar[GroupPass | None] = contextvars.ContextVar(
    "infercore_run_again_after", default=None
)


def group_pass() -> GroupPass | None:
    """The pass of a group of several requests that the caller runs in (the group's stacked
    fetch, say), else ``None``: a request alone, a group of one, or a request run again alone."""
    return _group_pass.get()


def run_again_after() -> GroupPass | None:
    """In a request run again alone because its group's answer could not be split: that
    group's pass, to the first call of the request's run (later calls get ``None``, so a
    second fetch of one request is never taken for its first); else ``None``."""
    after = _run_again.get()
    if after is not None:
        _run_again.set(None)
    return after


class _Member:
    __slots__ = ("deadline", "declared", "degraded", "fields", "future", "rows")

    def __init__(
        self,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
        rows: int,
        future: asyncio.Future[Tensors | None],
        degraded: set[str] | None,
    ) -> None:
        self.fields = fields
        self.declared = declared
        self.deadline = deadline
        self.rows = rows
        self.future = future
        self.degraded = degraded


class _Group:
    __slots__ = ("key", "live", "members", "passed", "rows", "task")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.members: list[_Member] = []
        self.rows = 0
        self.live = 0
        self.task: asyncio.Task[None] | None = None
        #: The group's pass, once it runs with several requests.
        self.passed: GroupPass | None = None


#: ``runner(members' fields, stacked fields, declared, deadline)`` -> the outputs of every row.
GroupRunner = Callable[
    [Sequence[Mapping[str, Array]], Mapping[str, Array], Mapping[str, str] | None, float],
    Awaitable[Tensors],
]
#: ``alone(fields, declared, deadline)`` -> one request's outputs, run as if ungrouped.
AloneRunner = Callable[[Mapping[str, Array], Mapping[str, str] | None, float], Awaitable[Tensors]]


class RequestGroups:
    """The open groups of one version and the requests inside groups.

    Args:
        run_group: Runs a group of several requests; raises :class:`RunAlone` when its answer
            cannot be given to each request (they then run alone), or a failure every request
            shares.
        run_alone: Runs one request exactly as if groups did not exist.
        max_rows: Most rows in one group.
        max_waiting: Most requests inside groups at once; beyond it, ``queue_full``.
        model_name: For messages.
        batcher_full: The batcher's own ``full``: while it is true (the work ahead outlasts
            80 % of its queue timeout, say: ``reject_expected_timeouts``), a request is
            answered ``queue_full`` at once instead of joining a group.
        busy_turns: Turns of the event loop a group stays open past its first while the loop
            is busy: requests that arrive meanwhile join it. A turn that took under
            ``idle_turn_s`` ran nothing else (the loop is idle: no request is on its way), and
            the group goes at once; so does a full one.
        idle_turn_s: The longest turn counted as idle (an idle uvloop turn takes about 1 µs,
            reading one HTTP request tens of µs; a noisy machine can only make a turn look
            busier, which keeps a group open at most ``busy_turns`` turns).
    """

    def __init__(
        self,
        run_group: GroupRunner,
        run_alone: AloneRunner,
        *,
        max_rows: int,
        max_waiting: int,
        model_name: str,
        batcher_full: Callable[[], bool] = lambda: False,
        busy_turns: int = BUSY_TURNS,
        idle_turn_s: float = IDLE_TURN_S,
    ) -> None:
        self._run_group = run_group
        self._run_alone = run_alone
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self._model_name = model_name
        self.batcher_full = batcher_full
        self.busy_turns = busy_turns
        self.idle_turn_s = idle_turn_s
        self._open: dict[tuple[Any, ...], _Group] = {}
        #: Requests inside groups (from arrival until answered).
        self.waiting = 0

    @property
    def full(self) -> bool:
        """Whether a request would now be answered ``queue_full``."""
        return self.waiting >= self.max_waiting or self.batcher_full()

    def _key(self, fields: Mapping[str, Array], declared: Mapping[str, str] | None) -> Any:
        """``(key, rows)`` of a request that may join a group, or ``None``."""
        rows = -1
        parts: list[Any] = []
        for name, value in fields.items():
            shape = value.shape
            if not shape:
                return None
            if rows < 0:
                rows = shape[0]
            elif shape[0] != rows:
                return None  # a request that is wrong on its own: its own error, alone
            parts.append((name, value.dtype, shape[1:]))
        if rows <= 0 or rows > self.max_rows:
            return None
        if declared:
            parts.append(tuple(declared.items()))
        return tuple(parts), rows

    async def submit(
        self, fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
    ) -> Tensors | None:
        """This request's outputs from its group, or ``None``: it must run alone.

        Raises:
            QueueFull: Too many requests inside groups, or the batcher is full.
            Whatever the group's run raised that every request shares.
        """
        keyed = self._key(fields, declared)
        if keyed is None:
            return None
        if self.full:
            raise QueueFull(f"queue of model {self._model_name!r} is full")
        key, rows = keyed
        loop = asyncio.get_running_loop()
        group = self._open.get(key)
        if group is None or group.rows + rows > self.max_rows:
            group = _Group(key)
            self._open[key] = group
            # A fresh context: the group's own degraded marks are not the first request's.
            group.task = loop.create_task(self._run(group), context=contextvars.Context())
        member = _Member(fields, declared, deadline, rows, loop.create_future(), degraded_parts())
        group.members.append(member)
        group.rows += rows
        group.live += 1
        if group.rows >= self.max_rows:
            self._close(group)
        self.waiting += 1
        try:
            result = await member.future
            if result is None and group.passed is not None:
                # The caller runs the request again alone next, in this task's context.
                _run_again.set(group.passed)
            return result
        except asyncio.CancelledError:
            # The caller went before its answer: out of the group; the last one out cancels
            # the group's work. Cancelling the caller has usually cancelled its future already
            # (the future it awaits), so "not answered" is "not done, or cancelled".
            if not member.future.done() or member.future.cancelled():
                member.future.cancel()
                group.live -= 1
                if group.live <= 0 and group.task is not None:
                    group.task.cancel()
                    # A task cancelled before its first step never runs _run (nor its
                    # _close): a later request must not join a group that will never run.
                    self._close(group)
            raise
        finally:
            self.waiting -= 1

    def _close(self, group: _Group) -> None:
        if self._open.get(group.key) is group:
            del self._open[group.key]

    async def _run(self, group: _Group) -> None:
        # Started on the loop's next turn: every request that arrived with the first is in.
        # While the loop is busy (other requests being read and decoded), wait for them a few
        # turns more; an idle turn means none is on its way.
        turns = self.busy_turns
        if turns > 0:
            t = time.perf_counter()
            while turns > 0 and group.rows < self.max_rows and self._open.get(group.key) is group:
                await asyncio.sleep(0)
                now = time.perf_counter()
                if now - t < self.idle_turn_s:
                    break
                t = now
                turns -= 1
        self._close(group)
        members = [m for m in group.members if not m.future.done()]
        if not members:
            return
        try:
            if len(members) == 1:
                await self._one(members[0])
                return
            # The group's task has a context of its own: its requests' do not see this.
            group.passed = GroupPass()
            _group_pass.set(group.passed)
            await self._several(members)
        except asyncio.CancelledError:
            for m in members:
                if not m.future.done():
                    m.future.cancel()
            raise

    async def _one(self, member: _Member) -> None:
        # Exactly the request's own run, its degraded marks going to its own response.
        begin_request(member.degraded)
        try:
            result: Tensors | None = await self._run_alone(
                member.fields, member.declared, member.deadline
            )
        except Exception as exc:
            if not member.future.done():
                member.future.set_exception(exc)
            return
        if not member.future.done():
            member.future.set_result(result)

    async def _several(self, members: list[_Member]) -> None:
        # The group's own task: the batcher counts its queue wait once per request.
        SUBMISSION_REQUESTS.set(len(members))
        first = members[0].fields
        stacked = {name: np.concatenate([m.fields[name] for m in members]) for name in first}
        deadline = max(m.deadline for m in members)
        degraded = begin_request()
        try:
            result = await self._run_group(
                [m.fields for m in members], stacked, members[0].declared, deadline
            )
            if degraded:
                raise RunAlone("some rows were served degraded")
            total = sum(m.rows for m in members)
            if any(v.ndim == 0 or v.shape[0] != total for v in result.values()):
                raise RunAlone("outputs without the group's rows")
        except SHARED_FAILURES as exc:
            for i, m in enumerate(members):
                if not m.future.done():
                    m.future.set_exception(exc if i == 0 else _own_copy(exc))
            return
        except Exception:
            # Which request was it? Each runs alone and meets its own answer.
            for m in members:
                if not m.future.done():
                    m.future.set_result(None)
            return
        start = 0
        for m in members:
            end = start + m.rows
            if not m.future.done():
                m.future.set_result({name: value[start:end] for name, value in result.items()})
            start = end
