"""The ``none`` and ``dynamic`` batchers.

Both bound their queue (a full queue answers 503 ``queue_full`` at once, without running the
model): by its length, and with ``reject_expected_timeouts`` by the time the model takes to run
what it holds (:class:`_Drain`), so that a request that could only time out is told at once.
They answer a request whose queue wait passed ``queue_timeout_ms`` with 503
``queue_timeout`` and never run it, and never run a request whose caller has gone. With
``priority_levels``, ``dynamic`` (and so ``adaptive`` and ``torch-gpu``) queues by level, and
``priority_queue_policy`` gives single levels a bound and a queue timeout of their own
(:class:`LevelQueuePolicy`); ``timeout_action: delay`` (a level's, or the batcher's for every
level) moves a request past its queue timeout behind the others instead of refusing it, until
its deadline. Only the
outputs the model declares are passed on, each checked against its declared datatype and shape
(:class:`OutputCheck`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import numpy as np

from infercore.components import (
    Batcher,
    BatchObserver,
    ComponentContext,
    Model,
    Tensors,
    submission_requests,
    v2_datatype,
)
from infercore.components.batching import observe_wait
from infercore.errors import (
    BackendError,
    ConfigError,
    DeadlineExceeded,
    InfercoreError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from infercore.hookspecs import hookimpl

log = logging.getLogger("infercore.batching")

#: The longest wait or timeout a batcher option may name: ``server.request_timeout_ms``'s own
#: upper bound. A longer one (``inf``, ``1e300``) could never end before a request's deadline.
MAX_MS = 3_600_000

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
DelayMs = Annotated[float, msgspec.Meta(ge=0, le=MAX_MS)]
PositiveMs = Annotated[float, msgspec.Meta(gt=0, le=MAX_MS)]

#: The most request priority levels a batcher may have (``priority_levels``): one queue per level.
MAX_PRIORITY_LEVELS = 255
PriorityLevel = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY_LEVELS)]
#: What becomes of a request whose queue timeout passed (Triton's ``timeout_action``):
#: ``reject``: 503 queue_timeout, never run; ``delay``: queued on behind every request of its
#: level and the levels above that has not timed out, until its deadline (then 504).
TimeoutAction = Literal["reject", "delay"]

_QUEUED, _RUNNING, _DONE = 0, 1, 2

#: The cancellation message with which :meth:`NoBatcher.stop_now` ends a queued caller's wait
#: (the caller then raises ``ShuttingDown``; any other cancellation passes through).
_STOPPED_NOW = "infercore: the batcher stopped without draining"
#: What a request that :meth:`stop_now` cut short is told (503 ``shutting_down``).
_STOPPING = "the server is stopping"

_ndarray = np.ndarray  # a module global: the output check runs once per model call


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _datatype_text(dtype: np.dtype[Any]) -> str:
    """A returned dtype as the protocol would name it, with numpy's name: ``FP64 (float64)``."""
    try:
        return f"{v2_datatype(dtype)} ({dtype})"
    except ValueError:
        return str(dtype)


class OutputCheck:
    """The check of a model's outputs against its declared :attr:`Model.outputs`.

    Every batching path runs this one check on what the model returned, once per model call:
    the ``none``, ``dynamic`` and ``adaptive`` batchers (and so request groups and shadow
    copies, which go through a version's batcher), the ``torch-gpu`` batcher (a ``dynamic``
    one) and :meth:`Model.warmup`. Outputs must be a dict holding, for each declared output,
    an array of its declared datatype (numpy's ``str``, ``bytes`` and ``object`` arrays all
    are ``BYTES``) and rank, with each fixed (non ``-1``) dimension as declared and, for a
    batched output (first dimension ``-1``), one row per input row. Nothing is cast: a model
    declaring FP32 that returns float64 is a plugin's bug, and serving it as FP64 would
    contradict the model metadata that V2 clients decode binary tensors by.

    What can be is bound once, when the check is built (a batcher builds it at its
    :meth:`~infercore.components.Batcher.start` and keeps the bound :meth:`check`): per
    output, its name, expected dtype and fixed dimensions. A call costs, per output, a dtype
    identity test, a rank and row count test, and a comparison per fixed dimension.
    """

    __slots__ = ("_expected", "_specs", "_where")

    def __init__(self, model: Model) -> None:
        self._where = model.context.path  # the model's config path: whose output is wrong
        self._specs = tuple(model.outputs)
        # Per output: name, dtype, batched, rank, its fixed dimensions as (axis, size) pairs,
        # and its index (for the message).
        self._expected = tuple(
            (
                spec.name,
                spec.dtype,
                spec.batched,
                len(spec.shape),
                tuple((axis, size) for axis, size in enumerate(spec.shape) if size != -1),
                index,
            )
            for index, spec in enumerate(self._specs)
        )

    def check(self, outputs: Any, rows: int) -> Tensors:
        """The declared outputs of ``outputs``, checked; ``rows``: the batch's input rows.

        Returns the declared outputs only: an undeclared one is never split per request, so
        passing it on could hand one request the rows of its batch-mates.

        Raises:
            BackendError: Not a dict, or a declared output missing, not an array, or of
                another datatype, rank, fixed dimension or row count than declared. The
                message (logged, never sent) names the model's config path and the output.
        """
        if not isinstance(outputs, dict):
            raise BackendError(
                f"{self._where}: the model returned {type(outputs).__name__}, "
                "expected a dict of arrays"
            )
        checked: Tensors = {}
        for name, dtype, batched, rank, fixed, index in self._expected:
            value = outputs.get(name)
            if not isinstance(value, _ndarray):
                raise BackendError(
                    f"{self._where}: model output {name!r} is missing or not an array"
                )
            shape = value.shape
            if len(shape) != rank or (batched and shape[0] != rows):
                self._wrong_shape(index, shape, rows)
            else:
                for axis, size in fixed:
                    if shape[axis] != size:
                        self._wrong_shape(index, shape, rows)
            if value.dtype is not dtype and not _same_datatype(value.dtype, dtype):
                self._wrong_datatype(index, value.dtype)
            checked[name] = value
        return checked

    def _wrong_shape(self, index: int, shape: tuple[int, ...], rows: int) -> NoReturn:
        spec = self._specs[index]
        if spec.batched and (not shape or shape[0] != rows):
            raise BackendError(
                f"{self._where}: model output {spec.name!r} has "
                f"{shape[0] if shape else 0} rows for a batch of {rows}",
                hint="a batched output (first dimension -1) needs one row per input row; "
                "declare it with a fixed first dimension and use batching: {kind: none} if "
                "the model answers a batch with one row",
            )
        raise BackendError(
            f"{self._where}: model output {spec.name!r} has shape "
            f"{_shape_text(shape)}, {self._declared(index)}",
            hint="-1 marks a variable dimension; the number of dimensions and every other "
            "dimension must be as declared",
        )

    def _declared(self, index: int) -> str:
        spec = self._specs[index]
        return f"declared {spec.datatype} {_shape_text(spec.shape)}"

    def _wrong_datatype(self, index: int, dtype: np.dtype[Any]) -> NoReturn:
        spec = self._specs[index]
        raise BackendError(
            f"{self._where}: model output {spec.name!r} is {_datatype_text(dtype)}, "
            f"{self._declared(index)}",
            hint=f"return {spec.datatype} ({spec.dtype}) from the model, or declare the output "
            "with the datatype it returns; infercore does not cast outputs",
        )


def _same_datatype(returned: np.dtype[Any], declared: np.dtype[Any]) -> bool:
    """Whether ``returned`` is the declared datatype (the slow path: not the same object)."""
    if declared.kind == "O":  # BYTES: the encoder takes str, bytes and object arrays
        return returned.kind in "OSU"
    return returned == declared


async def _call_model(
    model: Model, inputs: Tensors, rows: int, check: Callable[[Any, int], Tensors] | None = None
) -> Tensors:
    """The model's checked outputs for ``inputs``; ``check``: the one bound at the batcher's
    start (built here for a batcher used without starting it)."""
    try:
        outputs = await model.predict(inputs)
    except InfercoreError:
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # this call was cancelled (a stop, the loop closing)
        # The model's own code let a cancellation out (a task of its own that was cancelled):
        # a failure of this call, not the end of the batcher's collector running it.
        log.error("model %s raised CancelledError without being cancelled", model.context.path)
        raise BackendError("the model failed on this request") from None
    except Exception as exc:
        log.error("model %s raised %s: %s", model.context.path, type(exc).__name__, exc)
        raise BackendError("the model failed on this request") from exc
    return (check or OutputCheck(model).check)(outputs, rows)


def _rows(model: Model, inputs: Tensors) -> int:
    for spec in model.inputs:
        if spec.batched and spec.name in inputs:
            return int(inputs[spec.name].shape[0])
    return 1


#: The share of ``queue_timeout_ms`` that the work queued ahead of a request may take (with
#: ``reject_expected_timeouts``). The rest absorbs the model slowing down while the request waits:
#: under overload on one shared core its rate varied by a third from batch to batch
#: (benchmarks/README.md: Overload), and with the whole timeout 4-17 % of the admitted requests
#: timed out all the same; with this share, under 1 %.
HEADROOM = 0.8

#: A measured drain rate is forgotten when no interval was measured for this many horizons
#: (8 s with the default ``queue_timeout_ms`` of 1 s): the next backlog measures its own.
STALE_HORIZONS = 10


class _Drain:
    """How fast a queue empties while it is backlogged, and how much it may hold by that.

    :meth:`took` is told of each take from the queue (a batch formed, a slot won) and whether
    requests were left behind. Between two takes that both left requests queued, the model was
    never idle for want of work: the units taken over that interval measure the drain rate
    (throughput, all concurrent calls together). The time the batcher itself spent waiting for
    a batch to fill (``max_queue_delay_ms``) is left out: it is not the model's, and it is spent
    only while the queue is short, so counting it would make a fast model look slow exactly
    when little is queued. :meth:`idle` says the queue emptied without a take (its requests
    timed out or left): the next take then measures nothing. ``limit`` is the number of units
    (queued, or in calls that have not returned) that take ``horizon_s`` to drain at the rate of
    the last ``window`` such intervals: a request behind more would wait past ``horizon_s``. It is
    infinite until ``min_samples`` intervals were measured, and always when the check is off
    (``horizon_s`` ``None``). Measurements are forgotten, and the limit is infinite again, once
    :data:`STALE_HORIZONS` horizons have passed since the last interval measured: a rate from an
    earlier backlog (a cold start, a busier host) says little about the next. :meth:`took`
    checks that at each take, and :meth:`over` before it refuses anything, so a burst that
    arrives after a quiet spell, before the batcher's next take, is not judged by the old rate.
    Times are ``time.perf_counter()``: the event loop's clock may tick in whole milliseconds (as
    uvloop's does), too coarse for a model that answers in less.
    """

    __slots__ = (
        "_last",
        "_measured_at",
        "_samples",
        "_seconds",
        "_stale_after",
        "_units",
        "horizon_s",
        "limit",
        "min_samples",
    )

    def __init__(self, horizon_s: float | None, window: int = 8, min_samples: int = 1) -> None:
        self.horizon_s = horizon_s
        self.min_samples = min_samples
        self.limit = math.inf
        self._last: float | None = None
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._units = 0
        self._seconds = 0.0
        self._measured_at = -math.inf
        self._stale_after = math.inf if horizon_s is None else STALE_HORIZONS * horizon_s

    def took(self, units: int, now: float, backlog_left: bool, waited: float = 0.0) -> None:
        """``units`` left the queue at ``now``; ``waited``: seconds of the time since the last
        take that the batcher spent waiting for this batch to fill (left out of the interval)."""
        last, self._last = self._last, (now if backlog_left else None)
        if self.horizon_s is None:
            return
        samples = self._samples
        if samples and now - self._measured_at > self._stale_after:
            self._forget()
        if last is None:
            return
        self._measured_at = now
        if len(samples) == samples.maxlen:
            old_units, old_seconds = samples[0]
            self._units -= old_units
            self._seconds -= old_seconds
        seconds = max(0.0, now - last - waited)
        samples.append((units, seconds))
        self._units += units
        self._seconds += seconds
        if len(samples) >= self.min_samples and self._seconds > 0:
            self.limit = self._units / self._seconds * self.horizon_s

    def over(self, units: float) -> bool:
        """Whether ``units`` queued or running take longer than ``horizon_s`` to drain.

        Cheap while they fit; only a refusal reads the clock, to forget a stale rate first.
        """
        if units <= self.limit:
            return False
        if time.perf_counter() - self._measured_at > self._stale_after:
            self._forget()
            return False
        return True

    def idle(self) -> None:
        """The queue emptied without a take: the time until the next one is not the model's."""
        self._last = None

    def _forget(self) -> None:
        self._samples.clear()
        self._units = 0
        self._seconds = 0.0
        self.limit = math.inf

    def wait_ms(self, queued: int) -> float:
        """The estimated wait, in ms, behind ``queued`` units (for error messages)."""
        if self.horizon_s is None or not self._units:
            return math.nan
        return 1000 * queued * self._seconds / self._units


def _horizon_s(queue_timeout_ms: float, on: bool) -> float | None:
    return queue_timeout_ms / 1000 * HEADROOM if on else None


def _expected_timeout_error(
    model_name: str | None,
    queued: int,
    unit: str,
    drain: _Drain,
    timeout_ms: float,
    option: str = "queue_timeout_ms",
) -> QueueFull:
    """The 503 ``queue_full`` for a request refused because the work ahead outlasts the horizon;
    ``option``: the one that set ``timeout_ms`` (a priority level's own, say)."""
    return QueueFull(
        f"queue of model {model_name!r} is full: the {queued} {unit} queued or running take "
        f"about {drain.wait_ms(queued):,.0f} ms, over {HEADROOM:.0%} of {option} "
        f"({timeout_ms:g})"
    )


class NoBatcherConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Model calls running at once; further requests wait in the queue.
    max_concurrency: PositiveInt = 4
    #: Requests waiting for a slot; beyond this: 503 queue_full.
    max_queue_size: PositiveInt = 512
    #: Longest wait for a slot; then 503 queue_timeout and the request never runs.
    queue_timeout_ms: PositiveMs = 1000
    #: Also answer 503 queue_full, at once, a request that would wait too long: when the
    #: requests queued or running take the model more than 80 % of ``queue_timeout_ms`` at the
    #: rate measured while requests were waiting (:data:`HEADROOM`).
    reject_expected_timeouts: bool = True


class NoBatcher(Batcher):
    """Calls the model once per request, at most ``max_concurrency`` at a time.

    A model call keeps its slot until the model returns, even when its caller has gone.
    :meth:`stop` refuses new requests and returns once the running and queued ones are
    answered (each queued one still runs or times out); :meth:`stop_now` runs nothing more.
    """

    kind = "none"
    Config = NoBatcherConfig
    config: NoBatcherConfig

    def __init__(
        self,
        config: NoBatcherConfig,
        context: ComponentContext,
        model: Model,
        observer: BatchObserver | None = None,
    ) -> None:
        super().__init__(config, context, model, observer)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._waiting = 0
        self._drain = _Drain(_horizon_s(config.queue_timeout_ms, config.reject_expected_timeouts))
        self._stopping = False
        # Each model call's task and its caller's future; and the callers waiting for a slot.
        self._calls: dict[asyncio.Task[None], asyncio.Future[Tensors]] = {}
        self._queued: set[asyncio.Task[Any]] = set()
        self._check: Callable[[Any, int], Tensors] | None = None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        return self._waiting >= self.config.max_queue_size or (
            self._slots.locked() and self._drain.over(self._waiting + len(self._calls))
        )

    async def start(self) -> None:
        self._stopping = False
        self._check = OutputCheck(self.model).check

    async def stop(self) -> None:
        self._stopping = True
        # Slots go to waiters first come, first served: holding every slot means that each
        # request queued before this call has run or timed out.
        held = 0
        try:
            for _ in range(self.config.max_concurrency):
                await self._slots.acquire()
                held += 1
        finally:
            for _ in range(held):
                self._slots.release()

    def stop_now(self) -> int:
        """Stop without draining (a forced shutdown): nothing more runs through the model.

        New requests are refused; each queued request and each request whose model call is
        running is answered 503 ``shutting_down`` (a queued one once its task resumes, at the
        loop's next turn), and the running calls are cancelled (a model that honours
        cancellation stops: ONNX Runtime terminates its run). :meth:`stop` then returns as
        soon as those calls have let go of their slots. Returns how many requests it cut short.
        """
        self._stopping = True
        cut = 0
        for task in list(self._queued):
            if not task.done():
                task.cancel(_STOPPED_NOW)
                cut += 1
        for call, result in list(self._calls.items()):
            if not result.done():
                result.set_exception(ShuttingDown(_STOPPING))
                cut += 1
            call.cancel()
        return cut

    async def submit(self, inputs: Tensors, *, deadline: float) -> Tensors:
        if self._stopping:
            raise ShuttingDown("the model version is stopping")
        loop = asyncio.get_running_loop()
        now: float | None = None  # when a queued request got its slot (perf_counter)
        waited = 0.0
        if self._slots.locked():
            if self._waiting >= self.config.max_queue_size:
                raise QueueFull(f"queue of model {self.context.model_name!r} is full")
            ahead = self._waiting + len(self._calls)
            if self._drain.over(ahead):
                raise _expected_timeout_error(
                    self.context.model_name,
                    ahead,
                    "requests",
                    self._drain,
                    self.config.queue_timeout_ms,
                )
            # The loop's clock sets the timeout; perf_counter measures the wait (the loop's
            # may tick in whole milliseconds, as uvloop's does).
            limit = loop.time() + self.config.queue_timeout_ms / 1000
            start = time.perf_counter()
            self._waiting += 1
            caller = asyncio.current_task()
            if caller is not None:
                self._queued.add(caller)
            acquired = False
            try:
                self.observer.set_queue_depth(self._waiting)
                async with asyncio.timeout_at(min(limit, deadline)):
                    await self._slots.acquire()
                acquired = True
            except BaseException as exc:  # timed out, the caller went, or stop_now()
                if self._waiting == 1:
                    self._drain.idle()  # the queue empties without a take
                if (
                    caller is not None
                    and isinstance(exc, asyncio.CancelledError)
                    and exc.args[:1] == (_STOPPED_NOW,)
                ):
                    caller.uncancel()  # handled here: the caller is answered, not cancelled
                    raise ShuttingDown(_STOPPING) from None
                if not isinstance(exc, TimeoutError):
                    raise
                if deadline <= limit:
                    raise DeadlineExceeded("deadline exceeded while queued") from None
                raise QueueTimeout(
                    f"waited over {self.config.queue_timeout_ms:g} ms in the queue"
                ) from None
            finally:
                self._waiting -= 1
                if caller is not None:
                    self._queued.discard(caller)
                if not acquired:
                    self.observer.set_queue_depth(self._waiting)
            now = time.perf_counter()
            waited = now - start
        else:
            await self._slots.acquire()
        # The slot is this request's from here; until the call's task owns it, whatever
        # raises (an observer's bug) gives it back, or the batcher would lose it for good.
        try:
            if now is not None:
                self.observer.set_queue_depth(self._waiting)
                self._drain.took(1, now, self._waiting > 0)
            observe_wait(self.observer, waited, submission_requests())
        except BaseException:
            self._slots.release()
            raise
        # The model call runs in its own task, which owns the slot until the model returns: a
        # caller that goes (disconnect, deadline) cannot stop a call already running in a
        # worker thread, so the slot must stay taken until then, or the next request would
        # run beside it.
        result: asyncio.Future[Tensors] = loop.create_future()
        call = asyncio.create_task(self._run(inputs, result))
        self._calls[call] = result
        call.add_done_callback(self._call_done)
        return await result  # cancelling the caller cancels ``result``

    def _call_done(self, call: asyncio.Task[None]) -> None:
        # Here, not in _run: a call cancelled before it began (stop_now) never runs its body.
        del self._calls[call]
        self._slots.release()

    async def _run(self, inputs: Tensors, result: asyncio.Future[Tensors]) -> None:
        """One model call; its slot is released when it ends (:meth:`_call_done`)."""
        try:
            if result.done():
                return  # the caller went before the call began: it never runs
            rows = _rows(self.model, inputs)
            t0 = time.perf_counter()
            outputs = await _call_model(self.model, inputs, rows, self._check)
            self.observer.observe_batch(rows, time.perf_counter() - t0)
            if not result.done():
                result.set_result(outputs)
        except Exception as exc:
            if not result.done():
                result.set_exception(exc)
        finally:
            if not result.done():  # this task itself was cancelled
                result.cancel()


class LevelQueuePolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One priority level's queue policy: an entry of ``priority_queue_policy`` (Triton's
    ``ModelQueuePolicy``). Each option left out is the batcher's own, shared one."""

    #: Requests waiting at this level; beyond this: 503 queue_full naming the level. The
    #: batcher's ``max_queue_size`` still bounds all levels together.
    max_queue_size: PositiveInt | None = None
    #: Longest queue wait at this level, in place of the batcher's ``queue_timeout_ms``
    #: (longer or shorter); then ``timeout_action``.
    queue_timeout_ms: PositiveMs | None = None
    #: What a request of this level gets past its queue timeout, in place of the batcher's
    #: ``timeout_action``: ``reject`` (503 queue_timeout, never run) or ``delay`` (served after
    #: every request of this level and those above that has not timed out, until its deadline).
    timeout_action: TimeoutAction | None = None


class DynamicBatcherConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Most rows in one model call. A request with more rows runs alone.
    max_batch_size: PositiveInt = 32
    #: Longest wait, from the first queued request, for a batch to fill. 0: take what is there.
    max_queue_delay_ms: DelayMs = 0.0
    #: Requests waiting; beyond this: 503 queue_full.
    max_queue_size: PositiveInt = 512
    #: Longest queue wait; then ``timeout_action``.
    queue_timeout_ms: PositiveMs = 1000
    #: What a request gets once its queue wait passed its queue timeout (Triton's
    #: ``timeout_action``, here for every level without its own in ``priority_queue_policy``):
    #: ``reject``: 503 queue_timeout, and it never runs; ``delay``: it stays queued, behind
    #: every request of its level and the levels above that has not timed out, until its
    #: deadline (504 deadline_exceeded); it still counts towards ``max_queue_size``.
    timeout_action: TimeoutAction = "reject"
    #: Also answer 503 queue_full, at once, a request that would wait too long: when the rows
    #: queued or running take the model more than 80 % of ``queue_timeout_ms`` at the rate
    #: measured while requests were waiting (:data:`HEADROOM`). Not for a request whose
    #: ``timeout_action`` is ``delay``: passing its queue timeout is no failure.
    reject_expected_timeouts: bool = True
    #: Model calls in flight at once.
    max_concurrent_batches: PositiveInt = 1
    #: Batch sizes (rows) that go at once instead of waiting out ``max_queue_delay_ms``; when
    #: the queue holds more, the batch stops at the largest preferred size it reaches (Triton's
    #: ``preferred_batch_size``). Each at most ``max_batch_size``.
    preferred_batch_sizes: tuple[PositiveInt, ...] = ()
    #: Request priority levels (Triton's ``priority_levels``): a V2 request's
    #: ``parameters.priority`` picks one, 1 (served first) to this; batches form from the
    #: highest level waiting, first come first served within a level, under the one
    #: ``max_queue_size``. 0: no levels, priorities are ignored.
    priority_levels: PriorityLevel = 0
    #: The level of a request that names no priority (or 0), 1 to ``priority_levels``; needed
    #: when ``priority_levels`` is above 0 (Triton's ``default_priority_level``).
    default_priority_level: PriorityLevel = 0
    #: Queue policies of single levels (Triton's ``priority_queue_policy``), by level (1 to
    #: ``priority_levels``): ``{3: {max_queue_size: 64, queue_timeout_ms: 5000}}`` bounds
    #: level 3's waiting requests on top of ``max_queue_size`` and gives them their own queue
    #: timeout; ``timeout_action`` there says what a timed-out request of the level gets
    #: (Triton's ``REJECT`` or ``DELAY``). A request's own timeout may shorten a level's queue
    #: timeout, never extend it (as ``allow_timeout_override``), and bounds a delayed request.
    #: Needs ``priority_levels``.
    priority_queue_policy: dict[int, LevelQueuePolicy] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        too_big = [n for n in self.preferred_batch_sizes if n > self.max_batch_size]
        if too_big:
            # The " - at `$.field`" suffix is msgspec's own way of naming the failing field:
            # the config error then starts with the full path (batching.preferred_batch_sizes).
            raise ValueError(
                f"{too_big[0]} is above max_batch_size ({self.max_batch_size}); each preferred "
                "batch size must be at most max_batch_size - at `$.preferred_batch_sizes`"
            )
        levels = self.priority_levels
        if levels and not 1 <= self.default_priority_level <= levels:
            raise ValueError(
                f"{self.default_priority_level} is not a level of priority_levels ({levels}); "
                f"with priority levels on, set it from 1 to {levels}: the level of a request "
                "that names no priority - at `$.default_priority_level`"
            )
        if self.priority_queue_policy:
            self._check_priority_queue_policy()

    def _check_priority_queue_policy(self) -> None:
        levels = self.priority_levels
        policies = self.priority_queue_policy
        # " - at `$.<path>`" names the option (the config error starts with its full path).
        if not levels:
            raise ValueError(
                f"policies for levels {sorted(policies)} need priority levels (priority_levels "
                "is 0: priorities are ignored); set priority_levels and default_priority_level, "
                "or remove priority_queue_policy - at `$.priority_queue_policy`"
            )
        for level in sorted(policies):
            if not 1 <= level <= levels:
                raise ValueError(
                    f"{level} is not a level of priority_levels ({levels}); key each policy by "
                    f"a level from 1 to {levels} - at `$.priority_queue_policy.{level}`"
                )
            size = policies[level].max_queue_size
            if size is not None and size > self.max_queue_size:
                raise ValueError(
                    f"{size} is above max_queue_size ({self.max_queue_size}), which bounds all "
                    "levels together and would refuse first; lower it or raise max_queue_size "
                    f"- at `$.priority_queue_policy.{level}.max_queue_size`"
                )


class _Item:
    """One queued request. ``enqueued`` (loop time) schedules its waits; ``queued_at``
    (``perf_counter``) measures them: the loop's clock may tick in whole milliseconds.
    ``level``: its priority level, set only for a request that named one other than the
    default (with ``priority_levels``; :class:`_LevelQueue` reads it)."""

    __slots__ = (
        "deadline",
        "enqueued",
        "future",
        "inputs",
        "key",
        "level",
        "queued_at",
        "requests",
        "rows",
        "state",
        "timer",
    )

    level: int  # set only when not the default level (unset: AttributeError)

    def __init__(
        self,
        inputs: Tensors,
        rows: int,
        key: tuple[Any, ...],
        future: Any,
        t: float,
        deadline: float,
        queued_at: float,
    ):
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future: asyncio.Future[Tensors] = future
        self.enqueued = t
        self.deadline = deadline
        self.queued_at = queued_at
        #: The requests it stands for (a request group's: :func:`submission_requests`).
        self.requests = submission_requests()
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None


class _LevelQueue:
    """The dynamic batcher's queue with priority levels: a deque per level, served highest first.

    It is what the batcher does with its deque (``append``, ``popleft``, ``[0]``, iteration,
    ``len``, ``clear``, ``extend``), in priority order: iteration and ``popleft`` go through
    level 1 first, then level 2, ..., each first come first served, so the collector's FIFO
    logic forms batches from the highest levels waiting. The batcher picks it when
    ``priority_levels`` is above 0, and the plain deque otherwise, whose path is then unchanged.
    Like the deque, it keeps timed-out and abandoned requests until they reach the head (or the
    batcher compacts it); ``len`` counts them.
    """

    __slots__ = ("_default", "_len", "_levels", "_top")

    def __init__(self, levels: int, default: int) -> None:
        self._levels: tuple[collections.deque[_Item], ...] = tuple(
            collections.deque() for _ in range(levels)
        )
        self._default = default
        self._len = 0
        self._top = 0  # no level above this index holds anything

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def level_of(self, item: _Item) -> int:
        try:
            return item.level
        except AttributeError:  # submitted at the default level
            return self._default

    def append(self, item: _Item) -> None:
        index = self.level_of(item) - 1
        self._levels[index].append(item)
        self._len += 1
        if index < self._top:
            self._top = index

    def extend(self, items: Iterable[_Item]) -> None:
        for item in items:
            self.append(item)

    def clear(self) -> None:
        for level in self._levels:
            level.clear()
        self._len = 0
        self._top = 0

    def _head(self) -> collections.deque[_Item]:
        levels = self._levels
        top = self._top
        while top < len(levels):
            level = levels[top]
            if level:
                self._top = top
                return level
            top += 1
        raise IndexError("the queue is empty")

    def __getitem__(self, index: int) -> _Item:
        if index != 0:
            raise IndexError("only the head of the queue can be read")
        return self._head()[0]

    def popleft(self) -> _Item:
        item = self._head().popleft()
        self._len -= 1
        return item

    def __iter__(self) -> Iterator[_Item]:
        for level in self._levels[self._top :]:
            yield from level

    def full_at(self, level: int, bound: int) -> bool:
        """Whether ``bound`` requests still wait at ``level``.

        The level's deque also holds requests that timed out or whose callers went, until
        they reach its head: below ``bound`` entries this is answered by its length alone;
        at it, the gone ones are dropped (each once) and the live ones counted.
        """
        queue = self._levels[level - 1]
        if len(queue) < bound:
            return False
        return self._drop_gone(queue) >= bound

    def _drop_gone(self, queue: collections.deque[_Item]) -> int:
        """Drop ``queue``'s requests that timed out or whose callers went, keeping the order
        of the others; how many are left."""
        live = [it for it in queue if it.state == _QUEUED]
        gone = len(queue) - len(live)
        if gone:
            queue.clear()
            queue.extend(live)
            self._len -= gone
        return len(live)

    def rows_ahead(self, level: int) -> int:
        """The rows of the requests still queued at ``level`` (0: the default) or above: those
        served before a request that joins ``level`` now (unless more of a higher one come)."""
        top = self._top
        return sum(
            it.rows
            for queue in self._levels[top : max(level or self._default, top)]
            for it in queue
            if it.state == _QUEUED
        )

    def compact(self) -> None:
        """Drop the requests that timed out or whose callers went, keeping each deque's order
        (and so each request's place: a delayed one stays delayed)."""
        for queue in self._levels:
            self._drop_gone(queue)


class _DelayingLevelQueue(_LevelQueue):
    """The queue by level when a level's ``timeout_action`` is ``delay`` (Triton's ``DELAY``).

    Each level has two deques, its requests and then its delayed ones (their queue timeout
    passed; :meth:`delay` moves them), served in that order: ``[1, 1 delayed, 2, 2 delayed,
    ...]``. A delayed request so goes only when no request of its level or a level above that
    has not timed out waits, and before those of the levels below, as in Triton. The base
    class's reads, ``popleft`` and iteration work on the deques in order unchanged; only where
    a level's requests are is told here. A batcher whose levels all reject keeps the base
    class (and a batcher with ``timeout_action: delay`` and no levels, one level of this), so
    this costs nothing where no level delays.
    """

    __slots__ = ()

    def __init__(self, levels: int, default: int) -> None:
        super().__init__(2 * levels, default)

    def append(self, item: _Item) -> None:
        index = 2 * (self.level_of(item) - 1)
        self._levels[index].append(item)
        self._len += 1
        if index < self._top:
            self._top = index

    def delay(self, item: _Item) -> None:
        """Move ``item``, still queued, behind the requests of its level that have not timed
        out. It is near the front of its deque: its level's requests time out in the order
        they came (one queue timeout for the level); those ahead of it have left already."""
        index = 2 * (self.level_of(item) - 1)
        self._levels[index].remove(item)
        self._levels[index + 1].append(item)

    def full_at(self, level: int, bound: int) -> bool:
        """Whether ``bound`` requests still wait at ``level``, delayed ones included."""
        index = 2 * (level - 1)
        queues = self._levels[index : index + 2]
        if sum(len(queue) for queue in queues) < bound:
            return False
        return sum(self._drop_gone(queue) for queue in queues) >= bound

    def rows_ahead(self, level: int) -> int:
        """The rows still queued ahead of a request joining ``level`` (0: the default) now:
        those of the levels above, delayed or not, and the ones of its level not delayed."""
        top = self._top
        end = 2 * ((level or self._default) - 1) + 1
        return sum(
            it.rows
            for queue in self._levels[top : max(end, top)]
            for it in queue
            if it.state == _QUEUED
        )


class _LevelPolicy:
    """One level's queue policy as :meth:`DynamicBatcher.submit` applies it (built once, at the
    batcher's construction, for every level when ``priority_queue_policy`` is set or the
    batcher's ``timeout_action`` is ``delay``).

    ``max_queue_size``: the level's own bound (0: only the shared one); ``timeout_s`` and
    ``timeout_ms``: its queue timeout; ``own_timeout``: whether that is the level's own (its
    timeouts then name it); ``delay``: whether a request past it is delayed, not refused;
    ``scale``: its queue timeout over the batcher's, by which the work a request of this level
    may have ahead of it (``reject_expected_timeouts``) is scaled; infinite for a level that
    delays, whose requests that check never refuses (waiting past the timeout is no failure).
    """

    __slots__ = (
        "delay",
        "level",
        "max_queue_size",
        "own_timeout",
        "scale",
        "timeout_ms",
        "timeout_s",
    )

    def __init__(
        self,
        level: int,
        policy: LevelQueuePolicy | None,
        shared_ms: float,
        shared_action: TimeoutAction = "reject",
    ) -> None:
        self.level = level
        self.max_queue_size = (policy.max_queue_size if policy else None) or 0
        own = policy.queue_timeout_ms if policy else None
        self.own_timeout = own is not None
        self.timeout_ms = shared_ms if own is None else own
        self.timeout_s = self.timeout_ms / 1000
        action = (policy.timeout_action if policy else None) or shared_action
        self.delay = action == "delay"
        self.scale = math.inf if self.delay else self.timeout_ms / shared_ms


class _Filling:
    """A batch waiting to fill, as :meth:`DynamicBatcher.submit` sees it.

    ``rows``: the batch's rows plus those of the compatible requests queued since the collector
    last took what was ready; ``until``: when the collector's wait ends unless woken; ``last``:
    the loop time of the latest arrival.
    """

    __slots__ = ("key", "last", "rows", "until")

    def __init__(self, key: tuple[Any, ...], rows: int, until: float, now: float) -> None:
        self.key = key
        self.rows = rows
        self.until = until
        self.last = now


class DynamicBatcher(Batcher):
    """Stacks concurrent requests along the batch dimension into one model call.

    A collector task takes the oldest waiting request and adds the following ones while the
    batch has room and their tensors are compatible (same dtypes and trailing shapes). The
    batch goes at once when it is full, when the next request cannot join it, or when it
    holds one of ``preferred_batch_sizes`` rows; otherwise it waits for more rows until
    ``max_queue_delay_ms`` after its oldest request arrived (as Triton's dynamic batcher does:
    the delay is an upper bound spent only while the batch is not full, and it counts the
    time the request already waited for the model, so under load nothing waits twice). With
    ``max_queue_delay_ms`` = 0 it never waits: at low load a lone request goes at once, and
    under load the queue fills while the previous batch runs. The ``adaptive`` batcher
    chooses that wait from the load instead. No request waits to fill past its deadline.

    With ``priority_levels`` (Triton's), requests queue by level and batches form from the
    highest level waiting, first come first served within a level, under the one
    ``max_queue_size``. ``priority_queue_policy`` (Triton's, by level) adds a level's own
    ``max_queue_size`` (a full level is answered 503 ``queue_full`` naming it, while the other
    levels are still admitted) and its own ``queue_timeout_ms`` (shorter or longer than the
    batcher's; ``reject_expected_timeouts`` then judges the level's requests by it). Without
    policies no per-level work is done; with them, a request costs one index into a tuple of
    per-level policies, and a level at its bound a pass over that level's queue.

    ``timeout_action`` (Triton's, the batcher's for every level or a level's own) says what a
    request gets once its queue timeout passed: ``reject``, the default, answers it 503
    ``queue_timeout``; ``delay`` keeps it queued but moves it behind every request of its level
    and the levels above that has not timed out (before those of the levels below), so it runs
    only when none of them waits. Unlike Triton's, a delayed request is not delayed
    indefinitely: at its deadline it is answered 504 ``deadline_exceeded``, as any queued
    request is, and it counts towards its level's ``max_queue_size`` and ``max_queue_size``
    until it leaves. ``reject_expected_timeouts`` does not refuse a request of a level that
    delays (waiting past its queue timeout is no failure there). :attr:`delayed_requests`
    counts the delays. Where no level delays, the queue and each request's path are as without
    the option.

    Each request gets exactly its own rows back. If a batch of several requests fails, each
    request is retried alone, so one poisoned request cannot fail its batch-mates. A model
    whose tensors have no batch dimension is called once per request. :meth:`stop` refuses
    new requests and finishes the queued ones (each still runs or times out) before it
    returns; :meth:`stop_now` runs nothing more.
    """

    kind = "dynamic"
    Config = DynamicBatcherConfig
    config: DynamicBatcherConfig

    def __init__(
        self,
        config: DynamicBatcherConfig,
        context: ComponentContext,
        model: Model,
        observer: BatchObserver | None = None,
    ) -> None:
        super().__init__(config, context, model, observer)
        levels = config.priority_levels
        # With priority_queue_policy or timeout_action: delay, each level's policy by level - 1
        # (one index per request); None keeps submit's other paths as they are without them.
        # timeout_action: delay without levels is one level's policy: the whole queue's.
        self._level_policies: tuple[_LevelPolicy, ...] | None = None
        self._default_level = config.default_priority_level if levels else 1
        #: The largest share of queue_timeout_ms a level may wait (``full`` judges by it).
        self._lenient_scale = 1.0
        if (levels and config.priority_queue_policy) or config.timeout_action == "delay":
            self._level_policies = tuple(
                _LevelPolicy(
                    level,
                    config.priority_queue_policy.get(level),
                    config.queue_timeout_ms,
                    config.timeout_action,
                )
                for level in range(1, max(levels, 1) + 1)
            )
            self._lenient_scale = max(p.scale for p in self._level_policies)
        # With priority levels, a queue per level (the collector's logic is the same); where a
        # level delays timed-out requests, two (its own, then its delayed ones).
        self._queue: collections.deque[_Item] | _LevelQueue
        if self._level_policies is not None and any(p.delay for p in self._level_policies):
            self._queue = _DelayingLevelQueue(max(levels, 1), self._default_level)
        elif levels:
            self._queue = _LevelQueue(levels, config.default_priority_level)
        else:
            self._queue = collections.deque()
        #: Requests whose queue timeout passed at a level that delays them (not refused).
        self.delayed_requests = 0
        self._waiting = 0
        self._queued_rows = 0
        self._running_rows = 0  # rows of batches formed and not yet answered
        self._drain = _Drain(_horizon_s(config.queue_timeout_ms, config.reject_expected_timeouts))
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # The batches taken off the queue and not yet answered (filling or running), by id.
        self._active: dict[int, list[_Item]] = {}
        self._batched_names: tuple[str, ...] = ()
        self._check: Callable[[Any, int], Tensors] | None = None
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._stopping = False
        self._filling: _Filling | None = None
        self._inline = False  # the collector is running a batch itself
        #: How long before the earliest deadline it holds a batch stops waiting to fill:
        #: twice the last model call, the call itself and as much again for a slower one,
        #: the wake-ups and the response, so that the model can still answer in time.
        self._margin_s = 0.0
        self._check_request_timeout(config, context)

    @staticmethod
    def _check_request_timeout(config: DynamicBatcherConfig, context: ComponentContext) -> None:
        """Refuse a fill wait that cannot end before a request's deadline.

        The host passes ``server.request_timeout_ms`` in ``context.extra`` (the runtime does):
        a batch that waits that long for company is answered 504 before the model runs.
        """
        timeout_ms = context.extra.get("request_timeout_ms")
        if isinstance(timeout_ms, int | float) and config.max_queue_delay_ms >= timeout_ms:
            raise ConfigError(
                f"{context.path}.max_queue_delay_ms: {config.max_queue_delay_ms:g} is not below "
                f"server.request_timeout_ms ({timeout_ms:g}): a request that cannot fill a batch "
                "would reach its deadline (504) before the model runs",
                hint="lower max_queue_delay_ms (a few ms is typical) or raise "
                "server.request_timeout_ms",
            )

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        # A level's own max_queue_size is not looked at: the level is in the body, not read yet.
        return (
            self._waiting >= self.config.max_queue_size
            or self._rows_ahead_past_horizon(1, self._lenient_scale) > 0
        )

    def _rows_ahead_past_horizon(self, level: int, scale: float = 1.0) -> int:
        """The rows ahead of a new request when they outlast the drain limit, else 0.

        ``scale``: the request's queue timeout over ``queue_timeout_ms`` (a level's own
        timeout, with ``priority_queue_policy``): the limit is scaled by it.

        Nothing is ahead of a request that would be taken at once: none queued and a model
        slot free (the rows of the batches running elsewhere do not delay it). With priority
        levels, only the rows queued at the request's ``level`` (0: the default level) or
        above are ahead of it, and ``full`` asks for level 1: whether even a request of the
        highest level would wait too long. They are counted only when all the rows queued or
        running are over the limit (an overload: the default path never counts them).
        """
        ahead = self._queued_rows + self._running_rows
        if ahead <= self._drain.limit * scale:
            return 0
        slots = self._slots
        if not self._waiting and slots is not None and not slots.locked():
            return 0
        if not self._drain.over(ahead / scale):
            return 0
        queue = self._queue
        if isinstance(queue, _LevelQueue):
            ahead = self._running_rows + queue.rows_ahead(level)
            if not self._drain.over(ahead / scale):
                return 0
        return ahead

    @property
    def priority_levels(self) -> int:
        return self.config.priority_levels

    @property
    def default_priority_level(self) -> int:
        return self.config.default_priority_level if self.config.priority_levels else 0

    async def submit_with_priority(
        self, inputs: Tensors, *, deadline: float, priority: int
    ) -> Tensors:
        return await self.submit(inputs, deadline=deadline, priority=priority)

    async def start(self) -> None:
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._batched_names = tuple(s.name for s in self.model.inputs if s.batched)
        self._check = OutputCheck(self.model).check
        self._task = asyncio.create_task(self._collect(), name=f"batcher:{self.context.path}")

    async def stop(self) -> None:
        task = self._task
        if task is None or self._wakeup is None:
            return
        self._stopping = True
        self._wakeup.set()
        try:
            # The collector returns once the queue is empty: every queued request has been
            # taken into a batch or has timed out.
            await asyncio.wait({task})
            if self._running:
                await asyncio.wait(set(self._running))
        finally:
            # Early only when stop() itself is cancelled: answer whatever still waits. A
            # batch the collector runs itself is not cut short (as one in its own task is
            # not): the collector returns after it, the queue being empty by then.
            if not self._inline:
                task.cancel()
            while self._queue:
                item = self._queue.popleft()
                if item.state == _QUEUED:
                    self._abandon(item)
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown("the model version stopped"))
            self._task = None

    def stop_now(self) -> int:
        """Stop without draining (a forced shutdown): nothing more runs through the model.

        New requests are refused; each queued request and each request of a batch that is
        filling or running is answered 503 ``shutting_down`` now, and the collector and the
        running model calls are cancelled (a model that honours cancellation stops: ONNX
        Runtime terminates its run). :meth:`stop` then returns as soon as those tasks have
        ended. Returns how many requests it cut short.
        """
        self._stopping = True
        cut = 0
        while self._queue:
            item = self._queue.popleft()
            if item.state == _QUEUED:
                self._abandon(item)
                if not item.future.done():
                    item.future.set_exception(ShuttingDown(_STOPPING))
                    cut += 1
        for batch in self._active.values():
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ShuttingDown(_STOPPING))
                    cut += 1
        self._active.clear()
        if self._task is not None:
            self._task.cancel()
        for task in self._running:
            task.cancel()
        return cut

    async def submit(self, inputs: Tensors, *, deadline: float, priority: int = 0) -> Tensors:
        """Queue one request; ``priority``: its level (with ``priority_levels``), 0 the default.

        Raises:
            ValueError: ``priority`` is not one of the levels (infercore checks it first).
        """
        if self._stopping:
            raise ShuttingDown("the model version is stopping")
        if self._task is None or self._wakeup is None:
            raise RuntimeError("DynamicBatcher.submit() before start()")
        if priority and not 0 < priority <= self.config.priority_levels:
            raise ValueError(
                f"priority {priority} is not a level from 1 to {self.config.priority_levels}"
            )
        if self._waiting >= self.config.max_queue_size:
            raise QueueFull(f"queue of model {self.context.model_name!r} is full")
        policies = self._level_policies
        policy: _LevelPolicy | None = None  # a level's own queue timeout, when it has one
        if policies is None:
            ahead = self._rows_ahead_past_horizon(priority)
            if ahead:
                raise _expected_timeout_error(
                    self.context.model_name,
                    ahead,
                    "rows",
                    self._drain,
                    self.config.queue_timeout_ms,
                )
            timeout_s = self.config.queue_timeout_ms / 1000
            on_timeout = self._expire
        else:
            level_policy = policies[(priority or self._default_level) - 1]
            self._admit_at_level(priority, level_policy)
            timeout_s = level_policy.timeout_s
            if level_policy.own_timeout:
                policy = level_policy
            on_timeout = self._delay if level_policy.delay else self._expire
        queue = self._queue
        if len(queue) >= 2 * self.config.max_queue_size:
            # Timed-out and abandoned requests stay in the deque until they reach its head;
            # drop them so that memory stays bounded while the model is slow or stuck.
            if isinstance(queue, _LevelQueue):
                queue.compact()
            else:
                live = [it for it in queue if it.state == _QUEUED]
                queue.clear()
                queue.extend(live)
        loop = asyncio.get_running_loop()
        now = loop.time()
        rows = _rows(self.model, inputs)
        key = tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(inputs.items()))
        item = _Item(inputs, rows, key, loop.create_future(), now, deadline, time.perf_counter())
        if priority:
            item.level = priority
        limit = now + timeout_s
        item.timer = loop.call_at(min(limit, deadline), on_timeout, item, deadline <= limit, policy)
        self._queue.append(item)
        self._waiting += 1
        self._queued_rows += rows
        self.observer.set_queue_depth(self._waiting)
        fill = self._filling
        if fill is None:
            self._wakeup.set()
        else:
            # A batch is waiting to fill: wake its collector only when this request completes
            # it (full, a preferred size, a request that cannot join), must shorten its wait
            # (an earlier deadline) or would time out in the queue before the wait ends (a
            # queue_timeout_ms shorter than the fill wait: taken into the batch now, it waits
            # with it, as the batch's first request does); otherwise the collector takes it
            # when its wait ends (what it would have done on waking now: see _fill), which
            # saves a task wake-up, a timeout and a look at the queue per request.
            fill.last = now
            if key != fill.key:
                self._wakeup.set()
            else:
                fill.rows += rows
                if (
                    fill.rows >= self.config.max_batch_size
                    or fill.rows in self._preferred
                    or deadline - self._margin_s < fill.until
                    or limit < fill.until
                ):
                    self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            # The caller has gone (client disconnect or deadline): never run its work.
            self._abandon(item)
            raise

    def _admit_at_level(self, priority: int, policy: _LevelPolicy) -> None:
        """:meth:`submit`'s admission past the shared bound, with ``priority_queue_policy``:
        the request's level's own bound, and the work ahead judged by its own queue timeout.

        Raises:
            QueueFull: The level holds its ``max_queue_size`` requests, or the rows ahead of
                the request take longer than its level's queue timeout allows.
        """
        bound = policy.max_queue_size
        level = policy.level
        if bound:
            queue = self._queue
            assert isinstance(queue, _LevelQueue)
            if queue.full_at(level, bound):
                raise QueueFull(
                    f"queue of model {self.context.model_name!r} is full at priority level "
                    f"{level}: {bound} requests wait at that level "
                    f"(priority_queue_policy.{level}.max_queue_size)",
                    hint="retry later, or send the request at another priority level",
                )
        ahead = self._rows_ahead_past_horizon(priority, policy.scale)
        if ahead:
            raise _expected_timeout_error(
                self.context.model_name,
                ahead,
                "rows",
                self._drain,
                policy.timeout_ms,
                f"priority_queue_policy.{level}.queue_timeout_ms"
                if policy.own_timeout
                else "queue_timeout_ms",
            )

    def _unfill(self, item: _Item) -> None:
        """A queued request left before the filling batch took it: it no longer counts."""
        fill = self._filling
        if fill is not None and item.key == fill.key:
            fill.rows -= item.rows

    def _abandon(self, item: _Item) -> None:
        if item.state == _QUEUED:
            item.state = _DONE
            self._waiting -= 1
            self._queued_rows -= item.rows
            self.observer.set_queue_depth(self._waiting)
            self._unfill(item)
        if item.timer is not None:
            item.timer.cancel()

    def _expire(self, item: _Item, by_deadline: bool, policy: _LevelPolicy | None) -> None:
        if item.state != _QUEUED:
            return
        item.state = _DONE
        self._waiting -= 1
        self._queued_rows -= item.rows
        self.observer.set_queue_depth(self._waiting)
        self._unfill(item)
        if not item.future.done():
            if by_deadline:
                item.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
            elif policy is None:
                item.future.set_exception(
                    QueueTimeout(f"waited over {self.config.queue_timeout_ms:g} ms in the queue")
                )
            else:
                item.future.set_exception(
                    QueueTimeout(
                        f"waited over {policy.timeout_ms:g} ms in the queue at priority level "
                        f"{policy.level} (priority_queue_policy.{policy.level}.queue_timeout_ms)"
                    )
                )

    def _delay(self, item: _Item, by_deadline: bool, policy: _LevelPolicy | None) -> None:
        """:meth:`_expire` for a level whose ``timeout_action`` is ``delay``: past its queue
        timeout, a request is queued on behind the others (:meth:`_DelayingLevelQueue.delay`)
        until its deadline, when it is answered as any request at its deadline is (504)."""
        if by_deadline or item.state != _QUEUED:
            self._expire(item, by_deadline, policy)
            return
        queue = self._queue
        assert isinstance(queue, _DelayingLevelQueue)
        queue.delay(item)
        self.delayed_requests += 1
        item.timer = asyncio.get_running_loop().call_at(
            item.deadline, self._expire, item, True, None
        )

    def _next_live(self) -> _Item | None:
        while self._queue:
            item = self._queue[0]
            if item.state == _QUEUED:
                return item
            self._queue.popleft()
        return None

    def _take(self, item: _Item, now: float) -> None:
        """Move ``item`` (already off the deque) from the queue into a forming batch at
        ``now`` (``perf_counter``)."""
        item.state = _RUNNING
        self._waiting -= 1
        self._queued_rows -= item.rows
        if item.timer is not None:
            item.timer.cancel()
        observe_wait(self.observer, now - item.queued_at, item.requests)

    # Hooks for subclasses (the adaptive batcher): when to stop waiting for a batch to fill,
    # and what happened to each batch. They run on the event loop and must not block.

    def _fill_until(self, first: _Item, rows: int, loop: asyncio.AbstractEventLoop) -> float:
        """Loop time until which a batch of ``rows`` rows, ``first`` the oldest, waits to fill.

        Called once per batch, after the requests already queued have been taken and only when
        the batch is not complete (not full, not blocked, no preferred size reached).
        """
        return first.enqueued + self.config.max_queue_delay_ms / 1000

    def _refill_until(self, until: float, now: float) -> float:
        """The new end of the wait each time the collector wakes, ``now`` the latest arrival.

        Called after more rows joined the waiting batch, and also when the collector was woken
        without them (a subclass may wake it to end the wait: returning ``now`` does).
        """
        return until

    def _formed(self, batch: list[_Item], rows: int, now: float) -> None:
        """A batch of ``rows`` rows was formed and is about to run."""

    def _completed(self, live: list[_Item], rows: int, seconds: float, now: float) -> None:
        """A batch model call of ``rows`` rows answered ``live`` in ``seconds``, at ``now``.

        Both are ``perf_counter`` readings, like each item's ``queued_at``.
        """

    async def _collect(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            first = self._next_live()
            if first is None:
                if self._stopping:
                    return
                self._drain.idle()  # emptied by timeouts and callers gone, if not by a take
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for a free model slot before forming the batch: requests keep arriving
            # meanwhile, so the batch is as full as it can be when the model is free.
            await self._slots.acquire()
            first = self._next_live()
            if first is None:
                self._slots.release()
                continue
            self._queue.popleft()
            # The slot is free: the time since the last take was the model's (and that of the
            # batches running beside it); what the fill waits from now on is the batcher's own.
            started = time.perf_counter()
            self._take(first, started)
            batch = [first]
            self._active[id(batch)] = batch
            try:
                rows, waited = await self._fill(batch, loop)
            except BaseException:
                # Cancelled while filling: the requests already taken must still be answered.
                self._active.pop(id(batch), None)
                for it in batch:
                    it.state = _DONE
                    if not it.future.done():
                        it.future.set_exception(ShuttingDown("the model version stopped"))
                self._slots.release()
                raise
            self.observer.set_queue_depth(self._waiting)
            if waited:
                ended = time.perf_counter()
                self._drain.took(rows, ended, self._waiting > 0, ended - started)
            else:
                self._drain.took(rows, started, self._waiting > 0)
            self._formed(batch, rows, loop.time())
            self._running_rows += rows
            if self.config.max_concurrent_batches == 1:
                # One batch at a time: the collector would only wait for it to end before
                # forming the next, so it runs it itself (a task and a wake-up fewer per batch,
                # which is what a lone request at low load pays for going through the queue).
                self._inline = True
                try:
                    await self._execute(batch, rows)
                finally:
                    self._inline = False
                continue
            task = asyncio.create_task(self._execute(batch, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> tuple[int, bool]:
        """Add requests to ``batch`` (holding the oldest) until it should go.

        It goes at once when it is full, when the next queued request cannot join it (FIFO:
        incompatible tensors or too many rows), when it reaches a preferred size, or when the
        version is stopping; otherwise it waits for more until :meth:`_fill_until`. It stops
        waiting twice the last model call's time before the earliest deadline it holds: a
        wait that ends at the deadline only ends in a 504 (the request is answered then, and
        the batch forms without it), and one that ends later than this leaves the model too
        little time to answer. Returns the batch's rows and whether it waited.
        """
        assert self._wakeup is not None
        rows = batch[0].rows
        if not self.model.batchable:
            return rows, False
        rows, complete = self._take_ready(batch, rows)
        if complete or self._stopping:
            return rows, False
        margin = self._margin_s
        limit = min(it.deadline for it in batch) - margin
        until = min(self._fill_until(batch[0], rows, loop), limit)
        # Requests that arrive while the batch waits stay queued unless they complete it or
        # shorten its wait (submit() wakes the collector for those); when the wait ends they
        # are taken and the wait is extended as it would have been at the latest arrival
        # (_refill_until is non-decreasing in time, so nothing would have ended it sooner).
        fill = self._filling = _Filling(batch[0].key, rows, until, loop.time())
        waited = False
        try:
            while not self._stopping:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                fill.rows = rows
                fill.until = until
                self._wakeup.clear()
                waited = True
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                taken = len(batch)
                rows, complete = self._take_ready(batch, rows)
                if complete:
                    break
                if len(batch) > taken:
                    limit = min(limit, min(it.deadline for it in batch[taken:]) - margin)
                until = min(self._refill_until(until, fill.last), limit)
        finally:
            self._filling = None
        if self._stopping:  # stop() finishes the queue: whatever else fits goes along
            rows, _ = self._take_ready(batch, rows)
        return rows, waited

    def _take_ready(self, batch: list[_Item], rows: int) -> tuple[int, bool]:
        """Take the queued requests that join ``batch`` now; True when it should go at once."""
        max_rows = self.config.max_batch_size
        if rows >= max_rows:
            return rows, True
        key = batch[0].key
        preferred = self._preferred
        # Look ahead before taking: with preferred sizes the batch may stop short of what is
        # queued, at the largest preferred size the queued requests reach.
        total = rows
        fit = 0
        best = 0 if rows in preferred else -1
        complete = False
        for it in self._queue:
            if it.state != _QUEUED:
                continue
            if it.key != key or total + it.rows > max_rows:
                complete = True  # FIFO: the batch cannot grow past this request
                break
            total += it.rows
            fit += 1
            if total in preferred:
                best = fit
            if total == max_rows:
                complete = True
                break
        if not complete and best >= 0:
            fit, complete = best, True
        if not fit:
            return rows, complete
        now = time.perf_counter()  # one reading for the requests taken together
        taken = 0
        while taken < fit:
            item = self._queue.popleft()
            if item.state != _QUEUED:
                continue
            self._take(item, now)
            batch.append(item)
            rows += item.rows
            taken += 1
        return rows, complete

    async def _execute(self, batch: list[_Item], rows: int) -> None:
        try:
            await self._run_batch(batch, rows)
        except Exception:
            # A bug past the model call (a subclass's hook, say) must not end the collector
            # that runs the batch, nor leave its requests waiting for their deadline.
            log.exception("batcher %s: a batch failed unexpectedly", self.context.path)
            for item in batch:
                self._fail(item, BackendError("the batch failed"))

    async def _run_batch(self, batch: list[_Item], rows: int) -> None:
        assert self._slots is not None
        formed = rows
        try:
            live = [it for it in batch if not it.future.done()]
            if not live:
                return
            if len(live) < len(batch):
                rows = sum(it.rows for it in live)
            try:
                t0 = time.perf_counter()
                outputs = await _call_model(self.model, self._stack(live), rows, self._check)
                t1 = time.perf_counter()
                self._margin_s = 2 * (t1 - t0)
                self.observer.observe_batch(rows, t1 - t0)
            except Exception as exc:
                if len(live) == 1:
                    self._fail(live[0], exc)
                    return
                # Isolate the failure: run each request alone so one bad request fails alone.
                for item in live:
                    if item.future.done():
                        continue
                    try:
                        t0 = time.perf_counter()
                        alone = await _call_model(self.model, item.inputs, item.rows, self._check)
                        self.observer.observe_batch(item.rows, time.perf_counter() - t0)
                    except Exception as exc_alone:
                        self._fail(item, exc_alone)
                    else:
                        if not item.future.done():
                            item.future.set_result(alone)
                return
            self._split(live, outputs)
            self._completed(live, rows, t1 - t0, t1)
        finally:
            self._active.pop(id(batch), None)
            for it in batch:
                it.state = _DONE
            self._running_rows -= formed
            self._slots.release()

    def _stack(self, live: list[_Item]) -> Tensors:
        if len(live) == 1:
            return live[0].inputs
        first = live[0].inputs
        out: Tensors = {}
        for name, value in first.items():
            if name in self._batched_names:
                out[name] = np.concatenate([it.inputs[name] for it in live], axis=0)
            else:
                out[name] = value
        return out

    def _split(self, live: list[_Item], outputs: Tensors) -> None:
        if len(live) == 1:
            if not live[0].future.done():
                live[0].future.set_result(outputs)
            return
        batched = {s.name for s in self.model.outputs if s.batched}
        start = 0
        for item in live:
            end = start + item.rows
            result = {
                name: (value[start:end] if name in batched else value)
                for name, value in outputs.items()
            }
            start = end
            if not item.future.done():
                item.future.set_result(result)

    @staticmethod
    def _fail(item: _Item, exc: BaseException) -> None:
        if item.future.done():
            return
        if not isinstance(exc, InfercoreError):
            exc = BackendError("the model failed on this request")
        item.future.set_exception(exc)


@hookimpl
def register_batchers() -> list[type[Batcher]]:
    # Imported here: the adaptive batcher subclasses DynamicBatcher from this module.
    from infercore.builtins.adaptive import AdaptiveBatcher

    return [NoBatcher, DynamicBatcher, AdaptiveBatcher]
