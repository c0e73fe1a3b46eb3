"""Shadow copies: requests the primary answered, run again on shadow versions, off the path.

The request path only offers a copy (``put_nowait`` on a bounded queue; a full queue drops it
and counts it). A few worker tasks take copies, run them through the shadow version's own
input checks and batcher under a timeout, and compare the outputs with the primary's. The
caller's response was computed before the copy was offered, so a shadow that raises, hangs
or is slow never delays or changes it; the worker count bounds the threads a hanging shadow
can hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from infercore.components import ShadowPolicy, Tensors
from infercore.errors import DeadlineExceeded, QueueFull, QueueTimeout
from infercore.metrics import Metrics

if TYPE_CHECKING:
    from infercore.runtime.served import ServedVersion

Array = npt.NDArray[Any]

log = logging.getLogger("infercore.shadow")

OUTCOMES = ("ok", "error", "timeout", "dropped")


@dataclass(slots=True)
class ShadowStats:
    """Counts for one shadow version since it (last) entered the shadow stage."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    rows: int = 0
    agreeing_rows: int = 0
    abs_diff_sum: dict[str, float] = field(default_factory=dict)
    abs_diff_rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        mean = {name: self.abs_diff_sum[name] / n for name, n in self.abs_diff_rows.items() if n}
        return {
            "copies": dict(self.outcomes),
            "rows_compared": self.rows,
            "rows_agreeing": self.agreeing_rows,
            "agreement": (self.agreeing_rows / self.rows) if self.rows else None,
            "mean_abs_diff": mean,
        }


def compare_rows(
    primary: Mapping[str, Array],
    shadow: Mapping[str, Array],
    names: tuple[str, ...],
    *,
    atol: float,
    rtol: float,
    stats: ShadowStats,
) -> tuple[int, int]:
    """Per-row agreement with the primary: ``(rows, agreeing rows)``.

    A row agrees when every compared output (``names``, or every output both returned)
    agrees on it: floats within ``atol + rtol * |primary|``, everything else equal; an output
    whose shape differs disagrees on every row. The mean absolute difference of every float
    output both returned is accumulated in ``stats`` whether compared or not.
    """
    rows = 0
    agree: Array | None = None
    for name, p in primary.items():
        s = shadow.get(name)
        if s is None:
            continue
        n = p.shape[0] if p.ndim else 1
        rows = max(rows, n)
        floats = p.dtype.kind in "fc" or s.dtype.kind in "fc"
        if p.shape != s.shape:
            same = np.zeros(n, dtype=bool)
        elif floats:
            pf = p.astype(np.float64, copy=False).reshape(n, -1)
            sf = s.astype(np.float64, copy=False).reshape(n, -1)
            diff = np.abs(pf - sf)
            same = np.all(diff <= atol + rtol * np.abs(pf), axis=1)
            stats.abs_diff_sum[name] = stats.abs_diff_sum.get(name, 0.0) + float(
                diff.mean(axis=1).sum()
            )
            stats.abs_diff_rows[name] = stats.abs_diff_rows.get(name, 0) + n
        else:
            same = np.all((p == s).reshape(n, -1), axis=1)
        if names and name not in names:
            continue
        agree = same if agree is None else (agree & same)
    return rows, int(agree.sum()) if agree is not None else 0


@dataclass(slots=True)
class _Copy:
    sv: ServedVersion
    inputs: Tensors
    fields: Mapping[str, Array]
    declared: Mapping[str, str] | None
    primary: Tensors


class ShadowRunner:
    """The bounded queue and workers of one model's shadow copies."""

    def __init__(
        self,
        model: str,
        policy: ShadowPolicy,
        metrics: Metrics,
        prepare: Callable[[ServedVersion, Tensors, Mapping[str, Array], Any], Tensors],
        record: Callable[[ServedVersion, float, bool], None],
    ) -> None:
        self.model = model
        self.policy = policy
        self._metrics = metrics
        self._prepare = prepare
        self._record = record
        self._queue: asyncio.Queue[_Copy] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.stats: dict[str, ShadowStats] = {}
        self._counters: dict[tuple[str, str], Any] = {}

    def reset(self, version: str) -> None:
        """Start counting afresh (a version entering the shadow stage)."""
        self.stats[version] = ShadowStats()

    def _count(self, version: str, outcome: str) -> None:
        stats = self.stats.get(version)
        if stats is None:
            stats = self.stats[version] = ShadowStats()
        stats.outcomes[outcome] += 1
        key = (version, outcome)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._metrics.shadow_requests.labels(
                self.model, version, outcome
            )
        child.inc()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        if self._queue is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.policy.queue_size)
        self._workers = [
            asyncio.create_task(self._work(), name=f"shadow:{self.model}:{i}")
            for i in range(self.policy.workers)
        ]

    async def stop(self) -> None:
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._queue = None

    def offer(
        self,
        targets: tuple[ServedVersion, ...],
        inputs: Tensors,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        primary: Tensors,
    ) -> None:
        """Queue a copy for each target, or drop it (counted). Never blocks, never raises."""
        queue = self._queue
        for sv in targets:
            if queue is None:
                self._count(sv.version, "dropped")
                continue
            try:
                queue.put_nowait(_Copy(sv, inputs, fields, declared, primary))
            except asyncio.QueueFull:
                self._count(sv.version, "dropped")

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        timeout = self.policy.timeout_s
        while True:
            item = await queue.get()
            try:
                await self._run(item, loop, timeout)
            except asyncio.CancelledError:
                raise
            except BaseException:  # a bug here must not stop the worker
                log.exception("shadow copy for model %s failed unexpectedly", self.model)

    async def _run(self, item: _Copy, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        sv = item.sv
        version = sv.version
        if not sv.ready:
            self._count(version, "dropped")
            return
        sv.enter()
        t0 = loop.time()
        outcome = "ok"
        outputs: Tensors | None = None
        try:
            async with asyncio.timeout(timeout):
                prepared = self._prepare(sv, item.inputs, item.fields, item.declared)
                raw = await sv.batcher.submit(prepared, deadline=t0 + timeout)
                plan = sv.outputs_plan
                outputs = raw if plan is None else plan.apply(raw)
        except (TimeoutError, DeadlineExceeded, QueueTimeout):
            outcome = "timeout"
        except QueueFull:
            outcome = "dropped"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = "error"
            log.debug("shadow %s@%s raised %s: %s", self.model, version, type(exc).__name__, exc)
        finally:
            sv.leave()
        self._count(version, outcome)
        if outcome != "dropped":
            self._record(sv, loop.time() - t0, outcome != "ok")
        if outputs is None:
            return
        stats = self.stats[version]
        policy = self.policy
        rows, agreeing = compare_rows(
            item.primary,
            outputs,
            policy.compare,
            atol=policy.atol,
            rtol=policy.rtol,
            stats=stats,
        )
        stats.rows += rows
        stats.agreeing_rows += agreeing
        if rows:
            m = self._metrics.shadow_rows
            if agreeing:
                m.labels(self.model, version, "agree").inc(agreeing)
            if rows - agreeing:
                m.labels(self.model, version, "disagree").inc(rows - agreeing)
