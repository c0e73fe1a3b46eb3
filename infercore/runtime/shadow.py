"""Shadow copies: requests the primary answered, run again on shadow versions, off the path.

The request path only offers a copy (an append to a bounded queue; a full queue drops it and
counts it). A few worker tasks take copies, run them through the shadow version's own input
checks and batcher under a timeout, and compare the outputs with the primary's. The caller's
response was computed before the copy was offered, so a shadow that raises, hangs or is slow
never delays or changes it; the worker count bounds the threads a hanging shadow can hold.

A worker takes every copy already waiting for the same version (up to that version's batch
size in rows; one at a time behind a batcher that does not batch, such as ``none``), checks
each one's inputs on its own (a copy the shadow rejects counts ``error`` alone), and sends
the rest as one submission: one batcher call, one outputs plan and one vectorised
comparison for the lot instead of one per copy. Outcomes and statistics
are still counted per copy, exactly as if each copy had run alone: a submission of several
copies that fails is run again copy by copy so that only the failing ones count ``error``.
Under steady traffic copies arrive one at a time, so a worker lets the oldest wait up to
``ShadowPolicy.batch_delay_s`` for others (a full batch goes at once): nobody waits for a
copy's answer, and one call and one comparison for many cost little more than for one.

The shadow gets only the time the primary leaves. Before each submission a worker looks at
how busy the event loop's thread was over the last 50 ms (:mod:`infercore.runtime.loop_load`);
above ``ShadowPolicy.max_loop_busy`` it holds the copies back and looks again 20 ms later.
Under saturation the queue therefore fills and drops (counted ``dropped``) instead of taking
CPU from the requests; the copies run again once the load falls.

A copy keeps its request's priority level (Triton's ``parameters.priority``, with
``priority_levels``), read by the shadow version's batcher as :func:`shadow_level` says, and
only copies at the same level share a submission.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from infercore.components import Batcher, ShadowPolicy, Tensors
from infercore.errors import DeadlineExceeded, QueueFull, QueueTimeout
from infercore.metrics import Metrics
from infercore.runtime.grouping import DEFAULT_GROUP_ROWS, batcher_option
from infercore.runtime.loop_load import LoopLoad

if TYPE_CHECKING:
    from infercore.runtime.served import ServedVersion

Array = npt.NDArray[Any]

log = logging.getLogger("infercore.shadow")

OUTCOMES = ("ok", "error", "timeout", "dropped")

#: How long a worker holding copies back (the loop too busy) waits before looking again.
HOLD_S = 0.02


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
    #: Requests this copy stands for (a request group is copied once, as its requests).
    copies: int = 1
    #: The shadow's own inputs, once checked (a copy put back keeps them), its rows and the
    #: key that copies must share to be concatenated (names, dtypes, trailing shapes).
    prepared: Tensors | None = None
    rows: int = 0
    key: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    #: When it was offered (``time.monotonic()``).
    at: float = 0.0
    #: The level at which the shadow's batcher queues it (:func:`shadow_level`; 0: default).
    priority: int = 0


def shadow_level(priority: int, batcher: Batcher) -> int:
    """The level at which a shadow version's ``batcher`` queues a copy of a request that the
    primary queued at ``priority`` (as ``protocol.v2.priority_level`` gave it: 0 for the
    primary's default level); 0 is the shadow's own default level (its plain ``submit``).

    The copy is what the same request sent to the shadow version would be, as far as that
    can be without a client to answer: a request at the primary's default level is at the
    shadow's default level; one that named another level keeps it. A shadow batcher without
    levels ignores it, as Triton ignores a priority for a model without ``priority_levels``.
    A level beyond the shadow's levels (its batcher has fewer than the primary's) is not a 400
    here, nobody would read it: the copy goes to the shadow's lowest level, so that a request
    the primary served after others is not served ahead of them by the shadow. (Versions of
    one model share a ``batching`` node, so the levels differ only for a batcher that sets
    its own.)
    """
    if not priority:
        return 0
    levels = batcher.priority_levels
    if not levels:
        return 0
    level = min(priority, levels)
    return 0 if level == batcher.default_priority_level else level


def _group_rows(sv: ServedVersion) -> int:
    """Most rows of one submission to ``sv``: its batcher's ``max_batch_size``, if it has one.

    A model whose tensors are not all batched is called once per copy (rows cannot be
    concatenated along a batch dimension it does not have), and so is one behind a batcher
    that does not batch (``none`` promises one model call per request; a failed stack would
    run each copy again).
    """
    if not (sv.model.batchable and sv.batcher.batches):
        return 1
    return batcher_option(sv.batcher, "max_batch_size", DEFAULT_GROUP_ROWS)


def _rows_of(sv: ServedVersion, inputs: Tensors) -> int:
    for spec in sv.model.inputs:
        if spec.batched:
            value = inputs.get(spec.name)
            if value is not None and value.ndim:
                return int(value.shape[0])
    return 1


def _concat(parts: list[Tensors]) -> Tensors:
    first = parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in first}


def _concat_primaries(group: list[_Copy]) -> Tensors | None:
    """The primaries' outputs stacked, when comparing the stack equals comparing each copy.

    That holds when every copy's primary has the same outputs (same dtypes, trailing shapes)
    each with exactly the copy's rows; otherwise ``None`` (compare copy by copy).
    """
    first = group[0].primary
    names = tuple(first)
    for copy in group:
        p = copy.primary
        if tuple(p) != names:
            return None
        for name in names:
            a, b = p[name], first[name]
            if (
                a.ndim == 0
                or a.shape[0] != copy.rows
                or a.dtype != b.dtype
                or a.shape[1:] != b.shape[1:]
            ):
                return None
    return {name: np.concatenate([c.primary[name] for c in group]) for name in names}


class ShadowRunner:
    """The bounded queue and workers of one model's shadow copies."""

    def __init__(
        self,
        model: str,
        policy: ShadowPolicy,
        metrics: Metrics,
        prepare: Callable[[ServedVersion, Tensors, Mapping[str, Array], Any], Tensors],
        record: Callable[[ServedVersion, float], None],
    ) -> None:
        self.model = model
        self.policy = policy
        self._metrics = metrics
        self._prepare = prepare
        self._record = record
        self._pending: deque[_Copy] = deque()
        self._wake: asyncio.Event | None = None
        self._running = False
        self._workers: list[asyncio.Task[None]] = []
        self._load: LoopLoad | None = None
        self.stats: dict[str, ShadowStats] = {}
        # Label children by (family, version, label value), looked up once each.
        self._children: dict[tuple[Any, str, str], Any] = {}

    def reset(self, version: str) -> None:
        """Start counting afresh (a version entering the shadow stage)."""
        self.stats[version] = ShadowStats()

    def _stats(self, version: str) -> ShadowStats:
        stats = self.stats.get(version)
        if stats is None:
            stats = self.stats[version] = ShadowStats()
        return stats

    def _inc(self, family: Any, version: str, label: str, amount: int) -> None:
        key = (family, version, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(self.model, version, label)
        child.inc(amount)

    def _count(self, version: str, outcome: str, copies: int = 1) -> None:
        self._stats(version).outcomes[outcome] += copies
        self._inc(self._metrics.shadow_requests, version, outcome, copies)

    def _count_rows(self, version: str, result: str, rows: int) -> None:
        self._inc(self._metrics.shadow_rows, version, result, rows)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._pending.clear()
        self._wake = asyncio.Event()
        # Created here, on the loop's thread: it reads that thread's scheduler counters.
        self._load = LoopLoad() if self.policy.max_loop_busy < 1.0 else None
        self._workers = [
            asyncio.create_task(self._work(), name=f"shadow:{self.model}:{i}")
            for i in range(self.policy.workers)
        ]

    async def stop(self) -> None:
        self._running = False
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._pending.clear()
        self._wake = None

    def offer(
        self,
        targets: tuple[ServedVersion, ...],
        inputs: Tensors,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        primary: Tensors,
        copies: int = 1,
        priority: int = 0,
    ) -> None:
        """Queue a copy for each target, or drop it (counted). Never blocks, never raises.

        ``copies``: how many requests the copy stands for (a request group's stacked rows);
        ``priority``: the request's level on the primary (0: its default; :func:`shadow_level`).
        """
        pending = self._pending
        room = self.policy.queue_size
        queued = False
        for sv in targets:
            if not self._running or len(pending) >= room:
                self._count(sv.version, "dropped", copies)
                continue
            copy = _Copy(sv, inputs, fields, declared, primary, copies, at=time.monotonic())
            if priority:
                copy.priority = shadow_level(priority, sv.batcher)
            pending.append(copy)
            queued = True
        if queued and self._wake is not None:
            self._wake.set()

    def _gathered(self, sv: ServedVersion, priority: int, limit: int) -> bool:
        """Whether ``limit`` copies for ``sv`` at ``priority`` wait (a full batch for it: no
        reason to wait)."""
        n = 0
        for copy in self._pending:
            if copy.sv is sv and copy.priority == priority:
                n += 1
                if n >= limit:
                    return True
        return False

    def _take(self) -> list[_Copy]:
        """The oldest copy and every other waiting copy for its version at its priority level,
        up to the version's batch size in copies (each copy has at least one row); other copies
        keep their places (one submission is queued at one level)."""
        pending = self._pending
        first = pending.popleft()
        sv = first.sv
        priority = first.priority
        group = [first]
        limit = _group_rows(sv)
        if limit <= 1 or not pending:
            return group
        others: list[_Copy] = []
        while pending and len(group) < limit:
            copy = pending.popleft()
            if copy.sv is sv and copy.priority == priority:
                group.append(copy)
            else:
                others.append(copy)
        pending.extendleft(reversed(others))
        return group

    async def _work(self) -> None:
        wake = self._wake
        assert wake is not None
        pending = self._pending
        loop = asyncio.get_running_loop()
        limit = self.policy.max_loop_busy
        delay = self.policy.batch_delay_s
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            load = self._load
            if load is not None and load.share() > limit:
                # The requests keep the loop busy: the copies wait (or are dropped when the
                # queue fills) rather than take time from them.
                await asyncio.sleep(HOLD_S)
                continue
            if delay > 0.0:
                # Let copies gather: one call and one comparison for several costs little
                # more than for one, and nobody waits for a copy's answer.
                first = pending[0]
                wait = first.at + delay - time.monotonic()
                if wait > 0.0 and not self._gathered(
                    first.sv, first.priority, _group_rows(first.sv)
                ):
                    await asyncio.sleep(wait)
                    continue
            group = self._take()
            try:
                await self._run_group(group, loop)
            except asyncio.CancelledError:
                raise
            except BaseException:  # a bug here must not stop the worker
                log.exception("shadow copies for model %s failed unexpectedly", self.model)

    async def _run_group(self, group: list[_Copy], loop: asyncio.AbstractEventLoop) -> None:
        sv = group[0].sv
        version = sv.version
        if not sv.ready:
            self._count(version, "dropped", sum(c.copies for c in group))
            return
        together = self._prepare_together(sv, group)
        alone = False
        if together is not None:
            inputs, rows = together
            if await self._run_batch(sv, group, rows, loop, inputs=inputs, quiet_error=True):
                return
            alone = True  # the model raised on the whole group: which copy failed?
        ready: list[_Copy] = []
        for copy in group:
            if copy.prepared is not None:
                ready.append(copy)
                continue
            t0 = loop.time()
            try:
                prepared = self._prepare(sv, copy.inputs, copy.fields, copy.declared)
            except Exception as exc:
                # The shadow rejects this copy's inputs: it alone counts an error.
                log.debug("shadow %s@%s rejected a copy: %s", self.model, version, exc)
                self._count(version, "error", copy.copies)
                for _ in range(copy.copies):
                    self._record(sv, loop.time() - t0)
                continue
            copy.prepared = prepared
            copy.rows = _rows_of(sv, prepared)
            copy.key = tuple(
                (name, value.dtype.str, value.shape[1:]) for name, value in prepared.items()
            )
            ready.append(copy)
        if alone:
            t0 = loop.time()
            sv.enter()
            try:
                await self._run_alone(sv, ready, t0, t0 + self.policy.timeout_s, loop)
            finally:
                sv.leave()
            return
        limit = _group_rows(sv)
        batch: list[_Copy] = []
        rows = 0
        for copy in ready:
            if batch and (rows + copy.rows > limit or copy.key != batch[0].key):
                await self._run_batch(sv, batch, rows, loop)
                batch, rows = [], 0
            batch.append(copy)
            rows += copy.rows
        if batch:
            await self._run_batch(sv, batch, rows, loop)

    def _prepare_together(
        self, sv: ServedVersion, group: list[_Copy]
    ) -> tuple[Tensors, int] | None:
        """The group's inputs checked once, as one stack: ``(inputs, rows)``, or ``None``.

        Copies of one model's requests usually carry the same tensors (a feature source builds
        them alike), so the shadow's input checks run once on their concatenation instead of
        once per copy: same checks, same result when they pass. ``None`` (each copy is then
        checked alone, and a bad one fails alone) when the copies differ in their tensors'
        names, dtypes or trailing shapes, when a client's declared datatype binds a tensor,
        when the rows exceed one submission, or when the stack fails a check.
        """
        if len(group) < 2:
            return None
        wanted = sv.input_names
        sig: tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] | None = None
        parts: list[list[Array]] = []
        rows = 0
        for copy in group:
            if copy.prepared is not None:
                return None
            fields = copy.fields
            kept: list[tuple[str, Array]] = []
            for name, value in copy.inputs.items():
                sent = value is fields.get(name)
                if sent and copy.declared and name in copy.declared:
                    return None  # a client's declared datatype: checked copy by copy
                if sent or name in wanted:
                    kept.append((name, value))
            key = tuple((name, value.dtype, value.shape[1:]) for name, value in kept)
            if sig is None:
                sig = key
                parts = [[] for _ in kept]
            elif key != sig:
                return None
            n = -1
            for (name, value), part in zip(kept, parts, strict=True):
                if value.ndim == 0:
                    return None
                if name in wanted and n < 0:
                    n = int(value.shape[0])
                part.append(value)
            copy.rows = max(n, 1)
            rows += copy.rows
        if sig is None or rows > _group_rows(sv):
            return None
        stacked = {
            name: np.concatenate(part) for (name, _, _), part in zip(sig, parts, strict=True)
        }
        try:
            prepared = self._prepare(sv, stacked, {}, None)
        except Exception:
            return None
        if _rows_of(sv, prepared) != rows:
            return None
        return prepared, rows

    async def _submit(
        self, sv: ServedVersion, inputs: Tensors, until: float, priority: int = 0
    ) -> tuple[str, Tensors | None, Exception | None]:
        """One submission to the shadow's batcher, at ``priority`` (:func:`shadow_level`):
        ``(outcome, raw outputs, error)``."""
        try:
            async with asyncio.timeout_at(until):
                if priority:
                    outputs = await sv.batcher.submit_with_priority(
                        inputs, deadline=until, priority=priority
                    )
                else:
                    outputs = await sv.batcher.submit(inputs, deadline=until)
                return "ok", outputs, None
        except (TimeoutError, DeadlineExceeded, QueueTimeout):
            return "timeout", None, None
        except QueueFull:
            return "dropped", None, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "error", None, exc

    async def _run_batch(
        self,
        sv: ServedVersion,
        batch: list[_Copy],
        rows: int,
        loop: asyncio.AbstractEventLoop,
        *,
        inputs: Tensors | None = None,
        quiet_error: bool = False,
    ) -> bool:
        """Submit a batch of copies and count them; False only when ``quiet_error`` and the
        model raised (nothing counted: the caller runs the copies again, one by one)."""
        version = sv.version
        t0 = loop.time()
        until = t0 + self.policy.timeout_s
        sv.enter()
        try:
            if inputs is None:
                if len(batch) == 1:
                    inputs = batch[0].prepared
                    assert inputs is not None
                else:
                    inputs = _concat([c.prepared for c in batch if c.prepared is not None])
            outcome, raw, exc = await self._submit(sv, inputs, until, batch[0].priority)
            if outcome == "error" and len(batch) > 1:
                if quiet_error:
                    return False
                # Which copy failed? Each runs alone, as it would have without grouping.
                await self._run_alone(sv, batch, t0, until, loop)
                return True
        finally:
            sv.leave()
        elapsed = loop.time() - t0
        n = sum(c.copies for c in batch)
        self._count(version, outcome, n)
        if outcome != "dropped":
            for _ in range(n):
                self._record(sv, elapsed)
        if exc is not None:
            log.debug("shadow %s@%s raised %s: %s", self.model, version, type(exc).__name__, exc)
        if raw is not None:
            self._compare(sv, batch, rows, raw)
        return True

    async def _run_alone(
        self,
        sv: ServedVersion,
        batch: list[_Copy],
        t0: float,
        until: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        version = sv.version
        for copy in batch:
            assert copy.prepared is not None
            outcome, raw, exc = await self._submit(sv, copy.prepared, until, copy.priority)
            self._count(version, outcome, copy.copies)
            if outcome != "dropped":
                for _ in range(copy.copies):
                    self._record(sv, loop.time() - t0)
            if exc is not None:
                log.debug(
                    "shadow %s@%s raised %s: %s", self.model, version, type(exc).__name__, exc
                )
            if raw is not None:
                self._compare(sv, [copy], copy.rows, raw)

    def _compare(self, sv: ServedVersion, batch: list[_Copy], rows: int, raw: Tensors) -> None:
        """Compare a submission's outputs with its copies' primaries and count the rows."""
        try:
            self._compare_rows(sv, batch, rows, raw)
        except Exception:  # outcomes are counted already; other submissions go on
            log.exception("comparing shadow copies of model %s failed", self.model)

    def _compare_rows(self, sv: ServedVersion, batch: list[_Copy], rows: int, raw: Tensors) -> None:
        plan = sv.outputs_plan
        policy = self.policy
        stats = self._stats(sv.version)
        pairs: list[tuple[Tensors, Tensors]]
        primary = batch[0].primary if len(batch) == 1 else _concat_primaries(batch)
        if primary is not None and (
            len(batch) == 1 or all(v.ndim and v.shape[0] == rows for v in raw.values())
        ):
            pairs = [(primary, raw if plan is None else plan.apply(raw))]
        else:
            # Copy by copy: the primaries cannot be stacked, or the shadow returned an
            # output without the submission's rows (it is then every copy's own).
            pairs = []
            start = 0
            for copy in batch:
                end = start + copy.rows
                own = {
                    k: (v[start:end] if v.ndim and v.shape[0] == rows else v)
                    for k, v in raw.items()
                }
                pairs.append((copy.primary, own if plan is None else plan.apply(own)))
                start = end
        compared = agreeing = 0
        for p, s in pairs:
            r, a = compare_rows(
                p, s, policy.compare, atol=policy.atol, rtol=policy.rtol, stats=stats
            )
            compared += r
            agreeing += a
        stats.rows += compared
        stats.agreeing_rows += agreeing
        if agreeing:
            self._count_rows(sv.version, "agree", agreeing)
        if compared - agreeing:
            self._count_rows(sv.version, "disagree", compared - agreeing)
