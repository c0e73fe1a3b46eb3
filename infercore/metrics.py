"""Prometheus metrics (prefix ``infercore_``), one registry per app.

Label children are bound once per model version at start-up (:class:`VersionMetrics`), so the
request path only calls ``observe``/``inc`` on prepared objects.

Under ``server.workers`` > 1 (:mod:`infercore.server.workers`) every worker writes its samples
into the supervisor's ``PROMETHEUS_MULTIPROC_DIR`` and :meth:`Metrics.exposition` answers with
the totals of all workers: counters and histograms add up (a dead worker's counts stay);
gauges follow their ``multiprocess_mode``: ``livesum`` for what is in progress (in-flight
requests, queue depth), ``livemin`` for readiness (1 only when every live worker is ready),
``mostrecent`` for state set by a decision (stages, weights, drift verdicts). No gauge keeps
the default mode, ``all`` (a series per pid, a dead worker's included). When a worker dies the
supervisor calls :func:`forget_process`: its live gauges no longer count (and a gauge some
library left in ``all`` mode loses that pid's series). The exposition holds the families this
app's registry knows, as with one worker: the module-level gauges a library creates on import
(Feast's ``feast_feature_server_*``, which describe a server infercore never starts) are left
out. With one worker the registry is the plain in-process one.

The families updated on every request (request and queue-wait durations, response counts,
in-flight requests, queue depth, per-variant routing) are then :class:`LoopCounter`,
:class:`LoopGauge` and :class:`LoopHistogram`: the same families, names, labels, buckets and
exposition, with values kept in plain floats instead of behind a lock per value (a
``prometheus_client`` histogram observation is a Python loop over the buckets and two locked
increments; these take a ``bisect`` and two additions). They must only be updated from one
thread, the event loop's (every request-path update is); reading them (``/metrics``) may
happen anywhere. Several workers keep ``prometheus_client``'s own classes, whose values live
in the shared files.
"""

from __future__ import annotations

import contextlib
import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric

# The *_created series double every counter and histogram for no use in dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Event-loop stalls start at ``server.loop_block_warn_ms`` (500 ms by default).
_STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LABELS = ("model", "version")
_DRIFT_LABELS = ("model", "detector", "feature")


#: Set by the supervisor of several workers (``infercore.server.workers``) for each worker.
_WORKER_ENV = "INFERCORE_WORKER"


def multiprocess_dir() -> str | None:
    """The folder every worker's samples go to, when this process is one of several workers."""
    if not os.environ.get(_WORKER_ENV):
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def forget_process(pid: int, path: str) -> None:
    """A dead worker's gauges stop counting in ``path`` (its counters and histograms stay).

    ``prometheus_client``'s ``mark_process_dead`` removes the files of the ``live*`` modes;
    the ``all`` mode's file (a series labelled with the pid) is removed too: a dead process's
    series would otherwise report its last value for as long as the server runs.
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, f"gauge_all_{pid}.db"))


class _Registered:
    """The totals of every worker, for the families ``registry`` knows (see the module doc)."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        from prometheus_client import multiprocess

        self._registry = registry
        self._collector = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        # Read at each scrape: components register their families while the app starts.
        known = self._registry._names_to_collectors
        for metric in self._collector.collect():  # type: ignore[no-untyped-call]
            if metric.name in known:
                yield metric


class _LoopValue:
    """A metric value without a lock: written from one thread only (see the module doc)."""

    __slots__ = ("_exemplar", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> Any:
        return self._exemplar


class LoopCounter(Counter):
    """A :class:`~prometheus_client.Counter` updated from the event loop's thread only."""

    def _metric_init(self) -> None:
        self._value: Any = _LoopValue()
        self._created = time.time()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar:
            super().inc(amount, exemplar)  # the checks (and the exemplar) of the base class
            return
        self._value.value += amount


class LoopGauge(Gauge):
    """A :class:`~prometheus_client.Gauge` updated from the event loop's thread only."""

    def _metric_init(self) -> None:
        self._value: Any = _LoopValue()

    def inc(self, amount: float = 1) -> None:
        self._value.value += amount

    def dec(self, amount: float = 1) -> None:
        self._value.value -= amount

    def set(self, value: float) -> None:
        self._value.value = float(value)


class LoopHistogram(Histogram):
    """A :class:`~prometheus_client.Histogram` updated from the event loop's thread only."""

    def _metric_init(self) -> None:
        self._created = time.time()
        self._sum: Any = _LoopValue()
        self._buckets: Any = [_LoopValue() for _ in self._upper_bounds]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            super().observe(amount, exemplar)
            return
        self._sum.value += amount
        bounds = self._upper_bounds
        i = bisect_left(bounds, amount)
        # The base class counts a value in the first bucket whose bound it is <= to (NaN in
        # none): bisect finds that bucket, the comparison keeps NaN out.
        if i < len(bounds) and amount <= bounds[i]:
            self._buckets[i].value += 1

    def observe_many(self, amount: float, count: int) -> None:
        """:meth:`observe` of ``amount``, ``count`` times, in one step."""
        self._sum.value += amount * count
        bounds = self._upper_bounds
        i = bisect_left(bounds, amount)
        if i < len(bounds) and amount <= bounds[i]:
            self._buckets[i].value += count


def observe_many(histogram: Any, amount: float, count: int) -> None:
    """``count`` observations of ``amount``: at once on a :class:`LoopHistogram` (a request
    group's queue wait, one per request), one by one on any other histogram."""
    if isinstance(histogram, LoopHistogram):
        histogram.observe_many(amount, count)
    else:
        for _ in range(count):
            histogram.observe(amount)


def _single_process() -> bool:
    """Values live in this process (not in ``prometheus_client``'s multiprocess files)."""
    return multiprocess_dir() is None and values.ValueClass is values.MutexValue


class Metrics:
    """Every metric family of one app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._exposed: CollectorRegistry | None = None
        r = self.registry
        # The families the request path updates: lock-free in a single process.
        local = _single_process()
        hot_histogram = LoopHistogram if local else Histogram
        hot_counter = LoopCounter if local else Counter
        hot_gauge = LoopGauge if local else Gauge
        self.request_duration = hot_histogram(
            "infercore_request_duration_seconds",
            "Time from reading a request to its response, by model and version.",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = hot_histogram(
            "infercore_queue_wait_seconds",
            "Time a request waited in the batcher queue before its model call began.",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = hot_histogram(
            "infercore_inference_duration_seconds",
            "Duration of one model call (one batch).",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = hot_histogram(
            "infercore_batch_size",
            "Rows per model call.",
            _LABELS,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.requests = hot_counter(
            "infercore_requests",
            "Inference requests answered, by status code.",
            (*_LABELS, "code"),
            registry=r,
        )
        self.failures = hot_counter(
            "infercore_request_failures",
            "Inference requests that failed, by reason.",
            (*_LABELS, "reason"),
            registry=r,
        )
        self.queue_depth = hot_gauge(
            "infercore_queue_depth",
            "Requests waiting in the batcher queue.",
            _LABELS,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.batch_wait_target = Gauge(
            "infercore_batch_wait_target_seconds",
            "The adaptive batcher's current wait budget for a batch to fill.",
            _LABELS,
            registry=r,
            # Each worker adapts its own wait: the largest live one bounds the added latency.
            multiprocess_mode="livemax",
        )
        self.inflight = hot_gauge(
            "infercore_inflight_requests",
            "Inference requests being processed.",
            _LABELS,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_ready = Gauge(
            "infercore_model_ready",
            "1 when the model version is loaded, warmed and serving.",
            _LABELS,
            multiprocess_mode="livemin",
            registry=r,
        )
        self.model_load_failures = Counter(
            "infercore_model_load_failures",
            "Model version loads that failed.",
            _LABELS,
            registry=r,
        )
        # Drift monitoring (infercore.drift): per model, detector and feature column. The
        # feature label "*" carries a detector's overall verdict.
        self.drift_score = Gauge(
            "infercore_drift_score",
            "Latest drift test statistic per detector and feature column.",
            _DRIFT_LABELS,
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.drift_p_value = Gauge(
            "infercore_drift_p_value",
            "Latest drift test p-value per detector and feature column (tests that have one).",
            _DRIFT_LABELS,
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.drift_detected = Gauge(
            "infercore_drift_detected",
            '1 when the latest window drifted (feature="*": the detector\'s overall verdict).',
            _DRIFT_LABELS,
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.drift_samples_dropped = Counter(
            "infercore_drift_samples_dropped",
            "Sampled rows the drift monitor dropped because its queue was full.",
            ("model",),
            registry=r,
        )
        self.drift_detector_errors = Counter(
            "infercore_drift_detector_errors",
            "Drift detector runs that raised.",
            ("model", "detector"),
            registry=r,
        )
        self.drift_windows = Counter(
            "infercore_drift_windows",
            "Windows a drift detector tested (the window count).",
            ("model", "detector"),
            registry=r,
        )
        self.drift_last_run = Gauge(
            "infercore_drift_last_run_timestamp_seconds",
            "Unix time of a drift detector's latest completed run.",
            ("model", "detector"),
            multiprocess_mode="max",
            registry=r,
        )
        self.drift_actions = Counter(
            "infercore_drift_actions",
            "Drift actions by outcome: ok, error, cooldown (skipped), busy (skipped).",
            ("model", "action", "outcome"),
            registry=r,
        )

        # Rollouts (infercore.runtime, infercore.lifecycle): per variant (an A/B arm's name, or
        # the version) and role (the version's stage: primary, canary, shadow, candidate ...).
        route = (*_LABELS, "variant", "role")
        self.route_requests = hot_counter(
            "infercore_route_requests",
            "Requests routed to a version, by variant and role (shadow copies not included).",
            route,
            registry=r,
        )
        self.route_errors = hot_counter(
            "infercore_route_errors",
            "Routed requests that failed in a version (5xx, timeouts); shadow copies' outcomes "
            "are in infercore_shadow_requests_total.",
            route,
            registry=r,
        )
        self.route_duration = hot_histogram(
            "infercore_route_duration_seconds",
            "Time in the pipeline (features, queue, model) by variant and role; shadow copies "
            "too (role shadow).",
            route,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_requests = Counter(
            "infercore_shadow_requests",
            "Copies of requests sent to a shadow version, by outcome: ok, error, timeout, "
            "dropped (queue full or version not ready).",
            (*_LABELS, "outcome"),
            registry=r,
        )
        self.shadow_rows = Counter(
            "infercore_shadow_rows",
            "Rows a shadow version answered, by agreement with the primary: agree, disagree.",
            (*_LABELS, "result"),
            registry=r,
        )
        self.model_stage = Gauge(
            "infercore_model_stage",
            "1 for the stage each version is in (candidate, shadow, canary, primary, retired).",
            (*_LABELS, "stage"),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.canary_weight = Gauge(
            "infercore_canary_weight",
            "Share of routed traffic (percent) a canary version is set to take.",
            _LABELS,
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.guard_trips = Counter(
            "infercore_canary_guard_trips",
            "Canaries whose weight the guard set to 0, by cause: error_rate, latency.",
            (*_LABELS, "cause"),
            registry=r,
        )
        self.approvals_pending = Gauge(
            "infercore_approvals_pending",
            "Rollout steps waiting for a person's approval.",
            ("model",),
            multiprocess_mode="mostrecent",
            registry=r,
        )

        # The rollout state (admin.state_file, infercore.lifecycle.state).
        self.rollout_state_restore_failures = Counter(
            "infercore_rollout_state_restore_failures",
            "Start-ups whose admin.state_file could not be applied in full: the recipe's "
            "rollout served instead (the log says why).",
            registry=r,
        )
        self.rollout_state_save_failures = Counter(
            "infercore_rollout_state_save_failures",
            "Rollout changes that could not be saved to admin.state_file (a restart would "
            "not restore them).",
            registry=r,
        )

        # The event loop's watchdog (infercore.server.loopwatch), per process: updated from its
        # own thread, so prometheus_client's classes (each value behind a lock), never the
        # Loop* ones. Several workers add up.
        self.loop_stalls = Counter(
            "infercore_event_loop_stalls",
            "Times the event loop was blocked longer than server.loop_block_warn_ms (counted "
            "when found, while it lasts).",
            registry=r,
        )
        self.loop_stall_seconds = Histogram(
            "infercore_event_loop_stall_seconds",
            "How long each of those stalls blocked the event loop (observed when it ends).",
            buckets=_STALL_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        """``/metrics`` in the Prometheus text format: this process's registry, or the totals
        of every worker when there are several."""
        if self._exposed is None:
            path = multiprocess_dir()
            if path is None:
                self._exposed = self.registry
            else:
                self._exposed = CollectorRegistry()
                self._exposed.register(_Registered(self.registry, path))
        return generate_latest(self._exposed)

    def version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)

    def responses(self, model: str, version: str) -> ResponseCounters:
        """Counters only, for requests that failed before reaching a version."""
        return ResponseCounters(self, model, version)


class ResponseCounters:
    """``requests_total{code}`` and ``request_failures_total{reason}`` for one label set."""

    __slots__ = ("_codes", "_metrics", "_reasons", "labels")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self.labels = (model, version)
        self._codes: dict[int, Counter] = {}
        self._reasons: dict[str, Counter] = {}

    def count_response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._metrics.requests.labels(*self.labels, str(code))
        child.inc()

    def count_failure(self, reason: str) -> None:
        child = self._reasons.get(reason)
        if child is None:
            child = self._reasons[reason] = self._metrics.failures.labels(*self.labels, reason)
        child.inc()


class VersionMetrics(ResponseCounters):
    """Label children of one model version, bound once.

    The batcher reports through :meth:`observe_batch` and :meth:`set_queue_depth`.
    """

    __slots__ = (
        "batch_size",
        "inference_duration",
        "inflight",
        "queue_depth",
        "queue_wait",
        "request_duration",
    )

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        super().__init__(metrics, model, version)
        self.request_duration = metrics.request_duration.labels(model, version)
        self.queue_wait = metrics.queue_wait.labels(model, version)
        self.inference_duration = metrics.inference_duration.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self.queue_depth = metrics.queue_depth.labels(model, version)
        self.inflight = metrics.inflight.labels(model, version)

    #: Its methods never raise: a batcher calls them unwrapped (no ``GuardedObserver``).
    infallible = True

    def observe_batch(self, rows: int, inference_seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference_duration.observe(inference_seconds)

    def observe_queue_wait(self, seconds: float, requests: int = 1) -> None:
        if requests == 1:
            self.queue_wait.observe(seconds)
        else:
            observe_many(self.queue_wait, seconds, requests)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def set_batch_wait_target(self, seconds: float) -> None:
        # Bound on first use (rarely: when the adaptive wait changes), so that versions behind
        # other batchers export no such series.
        self._metrics.batch_wait_target.labels(*self.labels).set(seconds)
