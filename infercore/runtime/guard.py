"""The canary guard: error rates and p99 latencies over a sliding window, canary vs primary.

Each version that takes routed traffic records its requests into a :class:`Window`: a ring of
time slots, each with a request count, an error count and a latency histogram (fixed
geometric buckets, so recording is a bisect and three increments, and p99 is read off the
merged histogram). :func:`judge` compares a canary's window with the primary's.

A window holds only what its version answers for (``Runtime.infer`` decides): answers it gave,
500s, and 504s against the server's own deadline. Not: a bad request (4xx); an answer it never
ran (503 ``queue_full``, ``queue_timeout``, ``shutting_down``, ``feature_store_unavailable``:
load and shared parts, which any client can drive); a client that went away; a timeout
against a deadline the client shortened (``X-Infercore-Timeout-Ms``, V2 ``parameters.timeout``)
unless the version had already taken longer than :func:`latency_bound`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from infercore.config.rollout import GuardConfig

#: Latency bucket upper bounds in seconds: 0.1 ms to about 2 min, 15 % apart.
BUCKETS: tuple[float, ...] = tuple(1e-4 * 1.15**i for i in range(101))
_SLOTS = 10


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What a window holds right now."""

    requests: int
    errors: int
    p99_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Window:
    """Requests, errors and latencies of one version over the last ``window_s`` seconds."""

    __slots__ = ("_counts", "_errors", "_hist", "_ids", "_slot_s", "_top")

    def __init__(self, window_s: float) -> None:
        self._slot_s = window_s / _SLOTS
        self._ids = [-1] * _SLOTS
        self._counts = [0] * _SLOTS
        self._errors = [0] * _SLOTS
        self._hist = [[0] * (len(BUCKETS) + 1) for _ in range(_SLOTS)]
        self._top = -1

    def reset(self) -> None:
        for i in range(_SLOTS):
            self._ids[i] = -1
            self._counts[i] = 0
            self._errors[i] = 0
            hist = self._hist[i]
            for j in range(len(hist)):
                hist[j] = 0
        self._top = -1

    def record(self, now: float, latency_s: float, error: bool) -> None:
        slot_id = int(now / self._slot_s)
        i = slot_id % _SLOTS
        if self._ids[i] != slot_id:
            self._ids[i] = slot_id
            self._counts[i] = 0
            self._errors[i] = 0
            hist = self._hist[i]
            for j in range(len(hist)):
                hist[j] = 0
        if slot_id > self._top:
            self._top = slot_id
        self._counts[i] += 1
        if error:
            self._errors[i] += 1
        self._hist[i][bisect.bisect_left(BUCKETS, latency_s)] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """Requests and errors in the window: what :meth:`stats` says, without the p99."""
        newest = int(now / self._slot_s)
        oldest = newest - _SLOTS + 1
        requests = errors = 0
        for i in range(_SLOTS):
            if oldest <= self._ids[i] <= newest:
                requests += self._counts[i]
                errors += self._errors[i]
        return requests, errors

    def stats(self, now: float) -> WindowStats:
        newest = int(now / self._slot_s)
        oldest = newest - _SLOTS + 1
        requests = errors = 0
        merged = [0] * (len(BUCKETS) + 1)
        for i in range(_SLOTS):
            if oldest <= self._ids[i] <= newest:
                requests += self._counts[i]
                errors += self._errors[i]
                for j, n in enumerate(self._hist[i]):
                    if n:
                        merged[j] += n
        return WindowStats(requests, errors, _quantile(merged, requests, 0.99))


def _quantile(hist: list[int], total: int, q: float) -> float:
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for j, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return BUCKETS[j] if j < len(BUCKETS) else float("inf")
    return float("inf")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why the guard drops a canary: ``cause`` is ``error_rate`` or ``latency``."""

    cause: str
    detail: str


def may_trip(config: GuardConfig, canary: Window, now: float) -> bool:
    """Whether a canary's errors alone may already break the error-rate bound (the primary's
    rate can only lower the delta): a cheap test of counts, for judging at once on a failure."""
    requests, errors = canary.counts(now)
    return requests >= config.min_requests and errors > config.max_error_rate_delta * requests


def latency_bound(config: GuardConfig, primary: WindowStats) -> float | None:
    """The p99 (seconds) a canary is held to: the primary's times ``max_p99_ratio``, plus
    ``p99_slack_ms``; ``None`` while the primary has fewer than ``min_requests`` in its window.

    The runtime also holds a request timed out by the client's own deadline to it: a version
    that did not answer within this bound is slow by the guard's own measure, whoever set the
    deadline; one cut off sooner says only that the client asked for more.
    """
    if primary.requests < config.min_requests:
        return None
    return primary.p99_s * config.max_p99_ratio + config.p99_slack_ms / 1000


def judge(config: GuardConfig, canary: WindowStats, primary: WindowStats) -> Verdict | None:
    """A verdict when the canary breaks the recipe's bounds relative to the primary."""
    if canary.requests < config.min_requests:
        return None
    delta = canary.error_rate - primary.error_rate
    if delta > config.max_error_rate_delta:
        return Verdict(
            "error_rate",
            f"canary error rate {canary.error_rate:.1%} vs primary {primary.error_rate:.1%} "
            f"over {canary.requests} requests (bound: +{config.max_error_rate_delta:.1%})",
        )
    bound = latency_bound(config, primary)
    if bound is not None and canary.p99_s > bound:
        return Verdict(
            "latency",
            f"canary p99 {canary.p99_s * 1000:.1f} ms vs primary "
            f"{primary.p99_s * 1000:.1f} ms (bound: {bound * 1000:.1f} ms)",
        )
    return None
