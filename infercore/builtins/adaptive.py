"""The ``adaptive`` batcher: the dynamic batcher with a wait chosen from the load.

A fixed ``max_queue_delay_ms`` is a bet on the load: too short and a busy model runs small
batches, too long and a quiet one adds the whole delay to every request. The adaptive batcher
keeps the dynamic batcher's queue, bounds, stacking and failure isolation (it subclasses it)
and replaces only the decision of how long a forming batch waits for more rows, which
:class:`WaitController` takes from what it has measured: the recent arrival rate, the model's
cost per batch size and the p99 latency (queue wait + model call) of the last requests,
and which ends a wait as soon as the event loop has nothing else to do (see
:class:`AdaptiveBatcher`).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Iterable

from infercore.builtins.batchers import (
    DelayMs,
    DynamicBatcher,
    DynamicBatcherConfig,
    PositiveMs,
    _Item,
)
from infercore.components import BatchObserver, ComponentContext, Model
from infercore.components.batching import IDLE_TURN_S


class AdaptiveBatcherConfig(
    DynamicBatcherConfig, forbid_unknown_fields=True, frozen=True, kw_only=True
):
    #: Upper bound of the adaptive wait, from the oldest request's arrival.
    max_queue_delay_ms: DelayMs = 5.0
    #: Latency goal: the p99 of queue wait + model call per request, in milliseconds. The
    #: wait grows while the measured p99 is under 0.8 x this and shrinks when it is over.
    target_p99_ms: PositiveMs = 50.0


class WaitController:
    """Chooses how long a forming batch waits for more rows.

    Pure bookkeeping, with no clock of its own: the batcher passes the loop time in, so tests
    drive it with made-up times and latencies.

    - :attr:`wait_s`, the wait budget, moves by AIMD every ``adjust_every`` answered requests:
      plus ``max_wait_s / 16`` while the p99 of the last ``window`` latencies is under
      ``increase_below x target`` and batches are not full; halved (and the window cleared,
      so the next verdict is on fresh samples) when the p99 is over the target.
    - :meth:`decide` spends the budget only where it can pay: never for a full batch, never
      beyond ``max_wait_s`` since the oldest request arrived, never when less than one row is
      expected to arrive meanwhile (the arrival rate is a time-decayed count of rows; after an
      idle spell it is near zero, so a lone request goes at once), not while recent waits
      gathered less than half a row on average (:attr:`gain`; one probe in ``probe_every``
      keeps that up to date), and never so long that the oldest request's wait plus the
      expected model cost would pass the target.
    - :meth:`quiet_s` ends a wait early when no row has come for a few mean inter-arrival
      gaps.

    The batcher also ends a wait at once when the event loop goes idle (see
    :class:`AdaptiveBatcher`); that needs the loop, not bookkeeping, so it is not done here.
    """

    def __init__(
        self,
        *,
        target_s: float,
        max_wait_s: float,
        max_rows: int,
        window: int = 256,
        adjust_every: int = 32,
        rate_tau_s: float = 0.1,
        increase_below: float = 0.8,
        quiet_gaps: float = 3.0,
        probe_every: int = 64,
    ) -> None:
        self.target_s = target_s
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.adjust_every = adjust_every
        self.rate_tau_s = rate_tau_s
        self.increase_below = increase_below
        self.quiet_gaps = quiet_gaps
        self.probe_every = probe_every
        #: Rows a wait gathered, EWMA; starts hopeful so that the first waits are tried.
        self.gain = 1.0
        self._unprobed = 0
        self.step_s = max_wait_s / 16
        #: The current wait budget (seconds); starts at no wait.
        self.wait_s = 0.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self._rate = 0.0
        self._rate_t = 0.0
        # Per power-of-two size bucket: EWMA of (rows, seconds) of a model call.
        self._cost: dict[int, tuple[float, float]] = {}
        self._samples = 0
        self._batches = 0
        self._rows = 0

    def rate(self, now: float) -> float:
        """Rows per second recently formed into batches (time-decayed)."""
        if self._rate == 0.0:
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._rate_t) / self.rate_tau_s)

    def observe_arrivals(self, rows: int, now: float) -> None:
        """``rows`` rows arrived (were formed into a batch) by loop time ``now``."""
        self._rate = self.rate(now) + rows / self.rate_tau_s
        self._rate_t = now

    def cost(self, rows: float) -> float:
        """Expected seconds of one model call of ``rows`` rows (0 before any is measured)."""
        if not self._cost:
            return 0.0
        bucket = max(1, math.ceil(rows)).bit_length()
        known = self._cost.get(bucket)
        if known is not None:
            return known[1]
        # The nearest measured bucket, scaled linearly: pessimistic for the usual sublinear
        # cost, so the wait errs short.
        near = min(self._cost, key=lambda b: abs(b - bucket))
        mean_rows, seconds = self._cost[near]
        return seconds * rows / mean_rows

    def p99(self) -> float:
        """p99 of the latencies in the window (0 when empty)."""
        if not self._latencies:
            return 0.0
        ordered = sorted(self._latencies)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def decide(self, *, now: float, rows: int, waited_s: float) -> float:
        """Seconds a batch of ``rows`` rows whose oldest request waited ``waited_s`` waits."""
        if rows >= self.max_rows:
            return 0.0
        wait = min(self.wait_s, self.max_wait_s - waited_s)
        if wait <= 0.0:
            return 0.0
        expected = self.rate(now) * wait
        if expected < 1.0:
            return 0.0  # no company is coming: waiting would only add latency
        if self.gain < 0.5:
            # Recent waits gathered nothing (closed-loop clients all already in the batch, say):
            # go at once, but probe now and then in case the load has changed.
            self._unprobed += 1
            if self._unprobed < self.probe_every:
                return 0.0
            self._unprobed = 0
        rows_then = min(float(self.max_rows), rows + expected)
        slack = self.target_s - waited_s - self.cost(rows_then)
        return max(0.0, min(wait, slack))

    def quiet_s(self, now: float) -> float:
        """How long a waiting batch waits for the next arrival before it goes anyway.

        ``quiet_gaps`` mean inter-arrival gaps: a wait goes on only while rows keep coming at
        the recent pace, so the stragglers of a burst join and the silence after it is not
        waited out.
        """
        rate = self.rate(now)
        return self.max_wait_s if rate <= 0.0 else min(self.max_wait_s, self.quiet_gaps / rate)

    def observe_wait(self, gained_rows: int) -> None:
        """A wait (one :meth:`decide` > 0) ended with ``gained_rows`` more rows in the batch."""
        self.gain = 0.8 * self.gain + 0.2 * gained_rows

    def observe_batch(self, rows: int, seconds: float, latencies: Iterable[float]) -> bool:
        """Record one answered batch; True when :attr:`wait_s` changed."""
        bucket = rows.bit_length()
        old = self._cost.get(bucket)
        if old is None:
            self._cost[bucket] = (float(rows), seconds)
        else:
            self._cost[bucket] = (0.8 * old[0] + 0.2 * rows, 0.8 * old[1] + 0.2 * seconds)
        samples = list(latencies)
        self._latencies.extend(samples)
        self._samples += len(samples)
        self._batches += 1
        self._rows += rows
        if self._samples < self.adjust_every:
            return False
        p99 = self.p99()
        full = self._rows >= self.max_rows * self._batches
        self._samples = self._batches = self._rows = 0
        old_wait = self.wait_s
        if p99 > self.target_s:
            self.wait_s = old_wait / 2 if old_wait / 2 >= self.step_s / 4 else 0.0
            self._latencies.clear()
        elif p99 < self.increase_below * self.target_s and not full:
            self.wait_s = min(self.max_wait_s, old_wait + self.step_s)
        return self.wait_s != old_wait


class AdaptiveBatcher(DynamicBatcher):
    """A dynamic batcher whose wait for a batch to fill follows the load.

    At low load a lone request goes at once (nothing is expected to join it); as the load
    grows, the wait grows while the p99 of queue wait + model call stays under
    ``target_p99_ms``, and it is cut as soon as the p99 passes it. ``max_queue_delay_ms``
    bounds the wait. A batch goes at once when it is full or at a preferred size.

    A wait also ends as soon as the event loop goes idle: a turn of the loop that ran nothing
    but the batcher's own check (no request to parse, no response to write, no socket
    readable) took under :attr:`idle_turn_s`. A wait pays only while the core is busy with
    other work -- the requests that will join the batch are being read and decoded meanwhile.
    Once the loop is idle, every request that has reached the loop is in the batch or beyond
    it, and waiting on leaves the core idle and only adds latency: closed-loop clients (each
    waits for its answer before it sends again) are then in the batch or on their way, and
    their throughput is clients / latency. Under a saturating load the loop is never idle, so
    the waits run as the controller chose. The check is one callback per turn of the loop
    while a batch waits, and it stops at the first idle turn; it cannot see work in other
    threads (a model or feature fetch running in a worker thread does not keep a wait going).

    Queue bounds, timeouts, deadlines, cancellation, per-request failure isolation and
    :meth:`stop` behave as in the ``dynamic`` batcher. The current wait budget is reported to
    an observer that has ``set_batch_wait_target`` (the metric
    ``infercore_batch_wait_target_seconds``).
    """

    kind = "adaptive"
    Config = AdaptiveBatcherConfig
    config: AdaptiveBatcherConfig

    #: The longest turn of the event loop counted as idle (``IDLE_TURN_S``).
    idle_turn_s: float = IDLE_TURN_S

    def __init__(
        self,
        config: AdaptiveBatcherConfig,
        context: ComponentContext,
        model: Model,
        observer: BatchObserver | None = None,
    ) -> None:
        super().__init__(config, context, model, observer)
        self.controller = WaitController(
            target_s=config.target_p99_ms / 1000,
            max_wait_s=config.max_queue_delay_ms / 1000,
            max_rows=config.max_batch_size,
        )
        #: While a batch waits: (its rows when the wait began, the end of its wait budget).
        self._wait: tuple[int, float] | None = None
        #: The idle check: the time of its last turn (``perf_counter``: the loop's own clock
        #: may tick in whole milliseconds, as uvloop's does), its pending callback, and whether
        #: it found the loop idle during the current wait.
        self._turn_t = 0.0
        self._idle_check: asyncio.Handle | None = None
        self._idle = False
        # Looked up by attribute, not with a runtime Protocol: from Python 3.12 isinstance()
        # does not see the methods a GuardedObserver passes through (__getattr__).
        show = getattr(self.observer, "set_batch_wait_target", None)
        self._wait_sink: Callable[[float], None] | None = show if callable(show) else None

    async def start(self) -> None:
        await super().start()
        self._show_wait()

    def _show_wait(self) -> None:
        if self._wait_sink is not None:
            self._wait_sink(self.controller.wait_s)

    def _fill_until(self, first: _Item, rows: int, loop: asyncio.AbstractEventLoop) -> float:
        now = loop.time()
        wait = self.controller.decide(now=now, rows=rows, waited_s=now - first.enqueued)
        if wait <= 0.0:
            return now
        self._wait = (rows, now + wait)
        self._idle = False
        self._turn_t = time.perf_counter()
        self._idle_check = loop.call_soon(self._check_idle, loop)
        return min(now + wait, now + self.controller.quiet_s(now))

    def _check_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once per turn of the loop while a batch waits: end the wait at the first idle turn.

        Callbacks scheduled with ``call_soon`` during a turn run in the next one, after that
        turn's poll for I/O: the time between two runs of this check is one whole turn of the
        loop, everything else it ran included.
        """
        self._idle_check = None
        if self._wait is None or self._filling is None or self._wakeup is None:
            return  # the wait is over (or the collector was cancelled during it)
        t = time.perf_counter()
        if t - self._turn_t < self.idle_turn_s:
            self._idle = True
            self._wakeup.set()  # the collector ends the wait: see _refill_until
            return
        self._turn_t = t
        self._idle_check = loop.call_soon(self._check_idle, loop)

    def _refill_until(self, until: float, now: float) -> float:
        if self._wait is None:
            return until
        if self._idle:
            return now  # the loop went idle: no other request is on its way through it
        return min(self._wait[1], now + self.controller.quiet_s(now))

    def _formed(self, batch: list[_Item], rows: int, now: float) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        if self._wait is not None:
            self.controller.observe_wait(rows - self._wait[0])
            self._wait = None
        self.controller.observe_arrivals(rows, now)

    def _completed(self, live: list[_Item], rows: int, seconds: float, now: float) -> None:
        # perf_counter times: the model's cost and the latencies steer the wait against a
        # target of a few ms, which the loop's clock (whole ms under uvloop) cannot resolve.
        if self.controller.observe_batch(rows, seconds, [now - it.queued_at for it in live]):
            self._show_wait()
