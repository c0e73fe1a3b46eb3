"""The batcher interface: queues requests for one model version and calls the model."""

from __future__ import annotations

import abc
import contextvars
import logging
import time
from typing import Any, Protocol

from infercore.components.base import Component, ComponentContext
from infercore.components.model import Model, Tensors

#: A turn of the event loop shorter than this ran nothing but the check that timed it: the loop
#: is idle, and no request is on its way through it. An idle uvloop turn takes about 1 µs here,
#: reading one HTTP request tens of µs; a noisy machine can only make a turn look longer (busy).
#: The ``adaptive`` batcher ends a wait and a request group starts at the first idle turn.
IDLE_TURN_S = 20e-6


#: Requests one submission stands for: a request group (``server.group_requests``) submits its
#: requests' stacked rows once, from a task of its own that sets this; 1 otherwise. A batcher
#: reads it in ``submit`` (:func:`submission_requests`) and passes it to
#: :meth:`BatchObserver.observe_queue_wait`, so that queue waits are counted per request.
SUBMISSION_REQUESTS: contextvars.ContextVar[int] = contextvars.ContextVar(
    "infercore_submission_requests", default=1
)
submission_requests = SUBMISSION_REQUESTS.get


class BatchObserver(Protocol):
    """Where a batcher reports what it did (infercore binds it to the version's metrics)."""

    def observe_batch(self, rows: int, inference_seconds: float) -> None: ...

    def observe_queue_wait(self, seconds: float, requests: int = 1) -> None:
        """One submission waited ``seconds`` in the queue; it stands for ``requests``
        requests (:func:`submission_requests`), each of which waited that long."""

    def set_queue_depth(self, depth: int) -> None: ...


def observe_wait(observer: BatchObserver, seconds: float, requests: int) -> None:
    """``observer.observe_queue_wait``, with ``requests`` only when it is not 1: an observer
    written before that argument (``observe_queue_wait(self, seconds)``) keeps working."""
    if requests == 1:
        observer.observe_queue_wait(seconds)
    else:
        observer.observe_queue_wait(seconds, requests)


class NullObserver:
    """An observer that records nothing (for tests and embedding)."""

    #: Its methods never raise: a batcher calls them as they are (see :class:`GuardedObserver`).
    infallible = True

    def observe_batch(self, rows: int, inference_seconds: float) -> None:
        pass

    def observe_queue_wait(self, seconds: float, requests: int = 1) -> None:
        pass

    def set_queue_depth(self, depth: int) -> None:
        pass


log = logging.getLogger("infercore.batching")

#: After an observer's first failure is logged, further ones are logged at most this often.
_REPEAT_LOG_S = 60.0


class GuardedObserver:
    """Another party's observer, made harmless to the batcher that calls it.

    An exception from one of its methods is logged (the first with its traceback, then a count
    at most once a minute) and goes no further: a metrics hook's bug must not fail a request,
    keep a model slot or end a batcher's collector. ``observe_queue_wait`` goes through
    :func:`observe_wait`, so an observer written before its ``requests`` argument works. Other
    attributes (``set_batch_wait_target``) are passed through, guarded the same way.
    infercore's own observers (``infallible = True``) are used unwrapped.
    """

    def __init__(self, inner: Any, where: str) -> None:
        self.inner = inner
        self.where = where
        self.failures = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def _failed(self, method: str, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if self._logged_at is None:
            self._logged_at = now
            log.error(
                "%s: the batch observer's %s raised %s; observations it fails are dropped",
                self.where,
                method,
                type(exc).__name__,
                exc_info=exc,
            )
            return
        self._unlogged += 1
        if now - self._logged_at >= _REPEAT_LOG_S:
            log.warning(
                "%s: the batch observer raised %d more times (last: %s from %s)",
                self.where,
                self._unlogged,
                type(exc).__name__,
                method,
            )
            self._logged_at, self._unlogged = now, 0

    def observe_batch(self, rows: int, inference_seconds: float) -> None:
        try:
            self.inner.observe_batch(rows, inference_seconds)
        except Exception as exc:
            self._failed("observe_batch", exc)

    def observe_queue_wait(self, seconds: float, requests: int = 1) -> None:
        try:
            observe_wait(self.inner, seconds, requests)
        except Exception as exc:
            self._failed("observe_queue_wait", exc)

    def set_queue_depth(self, depth: int) -> None:
        try:
            self.inner.set_queue_depth(depth)
        except Exception as exc:
            self._failed("set_queue_depth", exc)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):  # copy/pickle probes, a half-built wrapper
            raise AttributeError(name)
        attr = getattr(inner, name)  # AttributeError where the observer has none
        if not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self._failed(name, exc)
                return None

        return guarded


def guard_observer(observer: BatchObserver | None, where: str) -> BatchObserver:
    """``observer`` as a batcher should call it: infercore's own as it is, another party's
    in a :class:`GuardedObserver`, none as a :class:`NullObserver`."""
    if observer is None:
        return NullObserver()
    if getattr(observer, "infallible", False) is True or isinstance(observer, GuardedObserver):
        return observer
    return GuardedObserver(observer, where)


class Batcher(Component):
    """Stands between requests and one loaded model version.

    Constructed as ``Batcher(config, context, model, observer)``. :meth:`submit` is called once per
    request with that request's validated inputs; it returns exactly that request's outputs.
    A batcher must bound its queue (raise :class:`~infercore.errors.QueueFull`), must never run
    a request whose caller gave up or whose queue wait exceeded its limit
    (:class:`~infercore.errors.QueueTimeout`), and must keep one request's failure from failing
    another's.
    """

    def __init__(
        self,
        config: Any,
        context: ComponentContext,
        model: Model,
        observer: BatchObserver | None = None,
    ) -> None:
        super().__init__(config, context)
        self.model = model
        self.observer: BatchObserver = guard_observer(observer, context.path)

    @abc.abstractmethod
    async def submit(self, inputs: Tensors, *, deadline: float) -> Tensors:
        """Run one request's inputs through the model.

        Args:
            inputs: The request's tensors; batched ones have the request's rows on axis 0.
            deadline: Event-loop time (``loop.time()``) by which the request must be answered.
        """

    @property
    def priority_levels(self) -> int:
        """How many request priority levels this batcher queues by (Triton's ``priority_levels``).

        Level 1 is served first. Above 0, infercore checks a V2 request's ``parameters.priority``
        against it (above it: 400 ``invalid_input``) and hands a request that names a level
        other than :attr:`default_priority_level` to :meth:`submit_with_priority`; every other
        request goes to :meth:`submit`, at the default level. The default, 0: priorities are
        ignored, as Triton ignores them without ``priority_levels``, and ``submit`` is all
        that is called (a batcher written before priorities keeps working unchanged).
        """
        return 0

    @property
    def default_priority_level(self) -> int:
        """The level of a request that names no priority (or 0); 0 when there are no levels."""
        return 0

    async def submit_with_priority(
        self, inputs: Tensors, *, deadline: float, priority: int
    ) -> Tensors:
        """:meth:`submit` for a request queued at ``priority`` (1 to :attr:`priority_levels`,
        1 first), which infercore has checked; called only when :attr:`priority_levels` is
        above 0. The default ignores the level."""
        return await self.submit(inputs, deadline=deadline)

    @property
    def batches(self) -> bool:
        """Whether one model call may carry the rows of several requests.

        infercore stacks requests that arrive together into one submission (request groups,
        ``server.group_requests``; shadow copies) only for a batcher that batches: a stack
        reaches the model as one call, and a stack that fails runs again request by request.
        A batcher that promises one model call per request (``none``) must never see one.
        Default: whether the config has a ``max_batch_size`` option (the rows one model call
        may carry). Override it (a class attribute will do) when that does not tell.
        """
        return isinstance(getattr(self.config, "max_batch_size", None), int)

    def stop_now(self) -> int:
        """Stop without draining (a second stop signal): answer every queued request, and every
        request whose model call is running, 503 ``shutting_down`` now, and run nothing more
        through the model. Returns how many requests it answered.

        The default does nothing and returns 0: such a batcher is drained by its ``stop``,
        bounded by the server's forced-stop budget. The built-in batchers override it.
        """
        return 0

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet running)."""
        return 0

    @property
    def full(self) -> bool:
        """Whether :meth:`submit` would raise :class:`~infercore.errors.QueueFull` now.

        While it is true, infercore may answer a request for this version 503 ``queue_full``
        from its headers alone, before reading its body (``server.reject_before_body``). The
        default, ``False``, never rejects early: override it when the queue has a bound.
        """
        return False
