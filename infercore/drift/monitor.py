"""The drift monitor of one model: sample, queue, window, test, record, act.

The request path calls :meth:`DriftMonitor.offer` with a request's model inputs and outputs;
``offer`` never blocks and never raises: it samples (``sample_rate``), appends references to
the arrays to a bounded queue (``queue_size`` rows) and counts what it drops when the queue
is full (``infercore_drift_samples_dropped_total``). Nothing is copied or converted there.

A background task takes windows off the queue (``schedule: window``: every ``window_size``
rows; ``schedule: interval``: what is waiting every ``interval_s``), turns them into columns
(:mod:`infercore.drift.columns`) and runs every detector on them in the monitor's own worker
thread, one detector after the other, so neither the event loop nor the default executor
(which model runtimes use) waits for a drift test. A detector that raises is counted
(``infercore_drift_detector_errors_total``), logged, and recorded in :meth:`latest_results`;
the other detectors and the monitor go on.

A window where a detector reports drift becomes a drift event, kept in a bounded in-memory
history (:meth:`events`). Its actions then run as tasks on the event loop, unless a previous
event ran actions less than ``cooldown_s`` ago (the event is recorded with every action
``skipped: cooldown``); an action still running from an earlier event is not started again
(``skipped: busy``): no two runs of one action overlap. With ``action_order: sequential`` the
actions of one event run one after the other in one task, in list order (each ``pending``
until its turn), and each sees what the earlier ones did (``DriftEvent.actions``): a retraining
``command`` followed by ``register_candidate``.

Inside a server the lifecycle hands the monitor the model's rollout control
(:meth:`bind_rollout`); it reaches every action (``Action.bind_rollout``) and every event
(``DriftEvent.rollout``). The cooldown survives a restart when the lifecycle saves the rollout
state (``admin.state_file``): it reads :attr:`DriftMonitor.last_action_at` when told by
:attr:`DriftMonitor.action_listeners` that actions started, and hands it back at start-up
(:meth:`restore_last_action`), so a restart under drift does not run the actions again
inside ``cooldown_s``.

For the server, four calls suffice: :meth:`DriftMonitor.build` when the runtime is built
(config errors surface then), :meth:`check_tensors` once the model's versions have loaded
(a ``features`` or ``outputs`` name the model lacks is a config error then), :meth:`start` /
:meth:`stop` with the model, and :meth:`offer` after each successful inference;
:meth:`latest_results`, :meth:`events` and :meth:`status` feed the admin API and
``infercore events``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from infercore.components import Action, ComponentContext, DriftDetector, Tensors
from infercore.components.drift import ActionFailed, DriftEvent, DriftResult, ModelRollout
from infercore.config.validation import convert
from infercore.drift.columns import (
    Array,
    Columns,
    concat_columns,
    row_count,
    spec_columns,
    to_columns,
)
from infercore.drift.config import DETECTOR_NAME_PATTERN, DriftConfig
from infercore.drift.events import event_to_json, result_to_json, scrub
from infercore.errors import ConfigError, InfercoreError, PluginError
from infercore.metrics import Metrics
from infercore.registry import Registry

log = logging.getLogger("infercore.drift")

_NAME_RE = re.compile(DETECTOR_NAME_PATTERN)
#: The ``feature`` label of a detector's overall verdict.
OVERALL = "*"

_Item = tuple[Mapping[str, Array], Mapping[str, Array] | None, int]


def _rows_of(tensors: Mapping[str, Array]) -> int:
    for value in tensors.values():
        return int(value.shape[0])
    return 0


def _head(tensors: Mapping[str, Array], n: int, rows: int) -> dict[str, Array]:
    return {k: v[:n] for k, v in tensors.items() if v.ndim and v.shape[0] == rows}


def _tail(tensors: Mapping[str, Array], n: int, rows: int) -> dict[str, Array]:
    return {k: v[n:] for k, v in tensors.items() if v.ndim and v.shape[0] == rows}


def _action_names(nodes: Sequence[Any]) -> tuple[str, ...]:
    """The name of each action node, as events and metrics show it: its ``kind``, and
    ``kind#2``, ``kind#3`` ... for further ones of a kind. (A node without a string kind fails
    when it is built; its placeholder name is never seen.)"""
    seen: dict[str, int] = {}
    names: list[str] = []
    for node in nodes:
        kind = node.get("kind") if isinstance(node, Mapping) else None
        if not isinstance(kind, str):
            kind = "?"
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return tuple(names)


class DriftMonitor:
    """Samples one model's traffic and runs its drift detectors and actions off the request path.

    Args:
        config: The model's validated ``drift`` node.
        model: The model name (metric label, event field).
        detectors: Built detectors by config name (see :meth:`build`).
        actions: Built actions with their names (``log``, ``webhook``, ``webhook#2`` …).
        metrics: The app's metrics; a private set when ``None``.
        version: The version events report: a string, or a callable returning the current
            primary version (called when an event is made).
        path: The config path of the ``drift`` node, for messages.
    """

    def __init__(
        self,
        config: DriftConfig,
        *,
        model: str,
        detectors: Mapping[str, DriftDetector],
        actions: list[tuple[str, Action]] | None = None,
        metrics: Metrics | None = None,
        version: str | Callable[[], str] = "",
        path: str = "drift",
    ) -> None:
        if config.schedule == "window" and config.queue_size < config.window_size:
            raise ConfigError(
                f"{path}.queue_size: {config.queue_size} is smaller than window_size "
                f"({config.window_size}); a window would never fill",
                hint="make queue_size at least window_size (a few windows is a good size)",
            )
        smallest = min(config.min_samples, config.window_size)
        if config.schedule == "interval" and config.queue_size < smallest:
            limit = "min_samples" if config.min_samples <= config.window_size else "window_size"
            raise ConfigError(
                f"{path}.queue_size: {config.queue_size} is smaller than {limit} ({smallest}); "
                "an interval window would never be tested",
                hint=f"make queue_size at least {limit} (a few windows is a good size)",
            )
        self.config = config
        self.model = model
        self.detectors = dict(detectors)
        self.actions = list(actions or [])
        self.metrics = metrics or Metrics()
        self._version = version
        self._path = path
        self._features = None if config.features is None else frozenset(config.features)
        self._outputs = frozenset(config.outputs)
        #: The model's monitored columns, and tensors whose columns only data tells
        #: (:meth:`expect_columns`); ``None``: not given, detectors' features unchecked.
        self._columns: tuple[set[str], set[str]] | None = None
        self._rate = float(config.sample_rate)
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._items: deque[_Item] = deque()
        self._pending = 0
        self._capacity = config.queue_size
        self._window_size = config.window_size
        self._accepting = True
        self._offered = 0
        self._sampled = 0
        self._dropped = 0
        self._invalid = 0
        self._degraded = 0
        self._windows = 0
        self._event_ids = itertools.count(1)
        self._history: deque[dict[str, Any]] = deque(maxlen=config.history_size)
        self._latest: dict[str, dict[str, Any]] = {}
        self._errors: dict[str, int] = dict.fromkeys(self.detectors, 0)
        self._running: dict[str, asyncio.Task[None]] = {}
        #: Actions of a running sequence that are done (the sequence holds them all busy).
        self._done_in_sequence: set[str] = set()
        self._last_trigger: float | None = None
        #: ``_last_trigger`` on the wall clock (what survives a restart).
        self._last_trigger_at: float | None = None
        #: Called with the wall-clock time whenever an event's actions start (not when they
        #: are skipped): the lifecycle saves the cooldown with the rollout state.
        self.action_listeners: list[Callable[[float], None]] = []
        self._warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._wake_requested = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy: asyncio.Lock | None = None
        self._started = False
        #: The model's rollout control (see :meth:`bind_rollout`).
        self.rollout: ModelRollout | None = None
        m = self.metrics
        self._dropped_counter = m.drift_samples_dropped.labels(model)
        self._det_metrics = {
            name: (
                m.drift_windows.labels(model, name),
                m.drift_last_run.labels(model, name),
                m.drift_detector_errors.labels(model, name),
            )
            for name in self.detectors
        }
        for name in self.detectors:
            m.drift_detected.labels(model, name, OVERALL).set(0)

    # --- building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        registry: Registry,
        config: DriftConfig | Mapping[str, Any],
        *,
        model: str,
        model_root: Path,
        path: str | None = None,
        metrics: Metrics | None = None,
        version: str | Callable[[], str] = "",
        label: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> DriftMonitor:
        """Validate a model's ``drift`` node and build its detectors and actions.

        Call it when the runtime is built, so that a typo, an unknown kind or a webhook host
        off the allow-list fails start-up before any model loads.

        Args:
            registry: The app's registry (kinds of the ``drift_detector`` and ``action`` roles).
            config: The validated :class:`DriftConfig`, or the plain ``drift`` mapping.
            model: The model name.
            model_root: The folder reference files and commands resolve inside.
            path: The config path of the node (default ``models.<model>.drift``).
            metrics: The app's metrics (``Runtime.metrics``).
            version: See the class.
            label: Appended to config error messages (e.g. ``recipe=fraud``).
            extra: Passed to every component's ``ComponentContext.extra``.

        Raises:
            ConfigError: Invalid options, an unknown kind, a bad detector name, or an option
                a component refuses.
            PluginError: A component failed to initialise for another reason.
        """
        path = path or f"models.{model}.drift"
        cfg = (
            config
            if isinstance(config, DriftConfig)
            else convert(dict(config), DriftConfig, path=path, context=label)
        )
        shared: dict[str, Any] = dict(extra or {})
        if metrics is not None:
            shared.setdefault("metrics_registry", metrics.registry)
        detectors: dict[str, DriftDetector] = {}
        for name, node in cfg.detectors.items():
            if not _NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"{path}.detectors: invalid detector name {name!r}",
                    hint="use letters, digits, '_' and '-' (at most 64), starting with a "
                    "letter or digit",
                )
            det = registry.build(
                "drift_detector",
                node,
                ComponentContext(
                    f"{path}.detectors.{name}",
                    model_root,
                    model_name=model,
                    extra={**shared, "detector_name": name},
                ),
                label=label,
            )
            assert isinstance(det, DriftDetector)
            detectors[name] = det
        actions: list[tuple[str, Action]] = []
        # Every action's name (its kind; a second one of a kind kind#2), known before any is
        # built: an action may check options that name its siblings (register_candidate's
        # `after`) when it is built, not when drift fires.
        names = _action_names(cfg.actions)
        for i, node in enumerate(cfg.actions):
            act = registry.build(
                "action",
                node,
                ComponentContext(
                    f"{path}.actions[{i}]",
                    model_root,
                    model_name=model,
                    extra={
                        **shared,
                        "drift_actions": names,
                        "drift_action_index": i,
                        "drift_action_order": cfg.action_order,
                    },
                ),
                label=label,
            )
            assert isinstance(act, Action)
            actions.append((names[i], act))
        return cls(
            cfg,
            model=model,
            detectors=detectors,
            actions=actions,
            metrics=metrics,
            version=version,
            path=path,
        )

    def check_tensors(self, inputs: Collection[str], outputs: Collection[str]) -> None:
        """Check that ``features`` and ``outputs`` name tensors the model has.

        The names are known only once the model has loaded: the server calls this when it
        starts, before :meth:`start`, with the input and the (raw, before the recipe's output
        mapping) output names of every version that loaded. A name that matches nothing would
        otherwise leave every sample out of every window, and monitoring silently off.

        Raises:
            ConfigError: A name that is not among ``inputs`` (``features``) or ``outputs``
                (``outputs``), naming the config path and the names there are.
        """
        checks = (
            ("features", self.config.features or [], inputs, "input"),
            ("outputs", self.config.outputs, outputs, "output"),
        )
        for option, wanted, have, what in checks:
            missing = [name for name in wanted if name not in have]
            if not missing:
                continue
            names = ", ".join(map(repr, missing))
            verb = "is not an" if len(missing) == 1 else "are not"
            noun = what if len(missing) == 1 else f"{what}s"
            hint = f"{what}s of model {self.model}: {', '.join(sorted(have)) or 'none'}"
            if option == "outputs":
                hint += " (the model's own names, before the recipe's output mapping)"
            raise ConfigError(
                f"{self._path}.{option}: {names} {verb} {noun} of model {self.model}", hint=hint
            )

    def expect_columns(
        self,
        inputs: Iterable[tuple[str, Sequence[int]]],
        outputs: Iterable[tuple[str, Sequence[int]]],
    ) -> None:
        """Give the columns the model's tensors become (``(name, shape)`` of every input and
        raw output of the versions that loaded), so that :meth:`start` checks each detector's
        ``features`` against them once the detectors have read their references. Only the
        monitored tensors count (``features`` and ``outputs`` of the monitor's config)."""
        known: set[str] = set()
        open_tensors: set[str] = set()
        chosen = (
            (inputs, self._features),
            (outputs, self._outputs),
        )
        for specs, wanted in chosen:
            for name, shape in specs:
                if wanted is not None and name not in wanted:
                    continue
                cols = spec_columns(name, shape)
                if cols is None:
                    open_tensors.add(name)
                else:
                    known.update(cols)
        self._columns = (known, open_tensors)

    def _check_detector_features(self) -> None:
        """Each started detector's ``features`` (where it keeps them) name columns the model's
        monitored tensors become; a name matching none would fail every window.

        Raises:
            ConfigError: Naming the detector's ``features`` and the columns there are.
        """
        if self._columns is None:
            return
        known, open_tensors = self._columns
        for name, detector in self.detectors.items():
            features = getattr(detector, "features", None)
            if not isinstance(features, list | tuple):
                continue
            missing = [
                f
                for f in features
                if isinstance(f, str) and f not in known and f.partition("[")[0] not in open_tensors
            ]
            if not missing:
                continue
            have = sorted(known | {f"{t}[…]" for t in open_tensors})
            shown = ", ".join(have[:20]) + (f" … ({len(have)} in all)" if len(have) > 20 else "")
            names = ", ".join(map(repr, missing[:10]))
            verb = "is not a column" if len(missing) == 1 else "are not columns"
            # The option that holds them, where a detector keeps them under another name.
            option = getattr(detector, "features_option", None) or "features"
            raise ConfigError(
                f"{self._path}.detectors.{name}.{option}: {names} {verb} of model "
                f"{self.model}'s monitored tensors",
                hint=f"columns: {shown or 'none'}; a tensor of shape [N, k] becomes "
                "name[0] … name[k-1]; outputs are monitored only when listed in `outputs`",
            )

    # --- lifecycle --------------------------------------------------------------------------

    def bind_rollout(self, rollout: ModelRollout) -> None:
        """Give the actions (``Action.bind_rollout``) and events the model's rollout control.

        The server's lifecycle calls it before the monitor starts.

        Raises:
            ConfigError: An action cannot work with this model (e.g. it needs a repository).
        """
        for _, action in self.actions:
            action.bind_rollout(rollout)
        self.rollout = rollout

    async def start(self) -> None:
        """Start the detectors (they load their references) and actions, then the background task.

        Raises:
            InfercoreError: A detector or action failed to start (naming its config path).
        """
        if self._started:
            return
        for component in [*self.detectors.values(), *(a for _, a in self.actions)]:
            try:
                await component.start()
            except InfercoreError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{component.context.path}: {type(component).__name__} failed to start: "
                    f"{type(exc).__name__}: {scrub(str(exc))}"
                ) from exc
        self._check_detector_features()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infercore-drift-{self.model}")
        self._started = True
        self._accepting = True
        self._task = asyncio.create_task(self._loop_forever(), name=f"drift-monitor-{self.model}")
        if self._pending >= self._window_size:
            self._request_wake()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling and the background task; give running actions ``timeout`` seconds,
        then cancel them; stop detectors and actions. A window being tested is abandoned."""
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("drift monitor of model %s: background task failed", self.model)
            self._task = None
        running = [t for t in self._running.values() if not t.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for component in [*self.detectors.values(), *(a for _, a in self.actions)]:
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", component.context.path)
        self._started = False

    # --- the request path -------------------------------------------------------------------

    def offer(
        self, inputs: Tensors, outputs: Tensors | None = None, *, degraded: bool = False
    ) -> None:
        """Hand one request's (or batch's) tensors to the monitor. Never blocks, never raises.

        Rows go along the first dimension of every tensor. The arrays are kept by reference
        until their window is tested: do not modify them afterwards. A request is sampled
        whole with probability ``sample_rate``; a sampled request that does not fit in the
        queue is dropped whole and its rows counted in
        ``infercore_drift_samples_dropped_total``.

        ``degraded``: the request was answered in a degraded way (``X-Infercore-Degraded``,
        e.g. default features while the feature store is down). Its rows are not the data's,
        so they are left out (counted as ``degraded_rows`` in :meth:`status`): an outage must
        not look like drift and start a retraining.
        """
        try:
            if not self._accepting:
                return
            n = _rows_of(inputs)
            if n <= 0:
                return
            self._offered += n  # approximate if offered from several threads at once
            if degraded:
                self._degraded += n
                return
            rate = self._rate
            if rate < 1.0 and (rate <= 0.0 or self._rng.random() >= rate):
                return
            with self._lock:
                if self._pending + n > self._capacity:
                    self._dropped += n
                    dropped = True
                else:
                    self._items.append((inputs, outputs, n))
                    self._pending += n
                    self._sampled += n
                    dropped = False
                    full = self._pending >= self._window_size
            if dropped:
                self._dropped_counter.inc(n)
            elif full and self.config.schedule == "window" and not self._wake_requested:
                self._request_wake()
        except Exception as exc:  # never let the request path see a monitoring problem
            self._warn_once("offer", "drift monitor of model %s: offer failed: %s", exc)

    def _request_wake(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        self._wake_requested = True
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    # --- windows ----------------------------------------------------------------------------

    def _take(self, want: int) -> list[_Item]:
        """Up to ``want`` rows off the queue, splitting the last request if needed."""
        taken: list[_Item] = []
        got = 0
        with self._lock:
            while self._items and got < want:
                inputs, outputs, n = self._items[0]
                if got + n <= want:
                    self._items.popleft()
                    taken.append((inputs, outputs, n))
                    got += n
                    continue
                k = want - got
                taken.append(
                    (
                        _head(inputs, k, n),
                        None if outputs is None else _head(outputs, k, n),
                        k,
                    )
                )
                self._items[0] = (
                    _tail(inputs, k, n),
                    None if outputs is None else _tail(outputs, k, n),
                    n - k,
                )
                got += k
            self._pending -= got
        return taken

    def _assemble(self, items: list[_Item]) -> Columns:
        """Items -> one column set (runs in the worker thread).

        Consecutive requests whose monitored tensors have the same names, dtypes and trailing
        shapes (each with the request's rows) are stacked first and turned into columns once:
        the same columns, in the same order, as turning each request into columns and
        stacking those, for a fraction of the per-request work. Any other request is turned
        into columns on its own, as before.
        """
        parts: list[Columns] = []
        i, end = 0, len(items)
        while i < end:
            key = self._stack_key(items[i])
            j = i + 1
            if key is not None:
                while j < end and self._stack_key(items[j]) == key:
                    j += 1
            item = items[i] if j == i + 1 else self._stack(items[i:j])
            cols = self._item_columns(item)
            if cols is not None:
                parts.append(cols)
            i = j
        return concat_columns(parts)

    def _selected(self, item: _Item) -> tuple[list[tuple[str, Array]], list[tuple[str, Array]]]:
        inputs, outputs, _ = item
        features = self._features
        ins = [(k, v) for k, v in inputs.items() if features is None or k in features]
        outs: list[tuple[str, Array]] = []
        if outputs is not None and self._outputs:
            outs = [(k, v) for k, v in outputs.items() if k in self._outputs]
        return ins, outs

    def _stack_key(self, item: _Item) -> tuple[Any, ...] | None:
        """What requests must share to be stacked; ``None``: this one is converted alone."""
        n = item[2]
        ins, outs = self._selected(item)
        key: list[Any] = []
        for group in (ins, outs):
            for name, value in group:
                if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != n:
                    return None
                key.append((name, value.dtype.str, value.shape[1:]))
            key.append(None)  # inputs and outputs stay apart
        return tuple(key)

    def _stack(self, run: list[_Item]) -> _Item:
        ins, outs = self._selected(run[0])
        parts = [self._selected(item) for item in run]
        inputs = {
            name: np.concatenate([p[0][k][1] for p in parts]) for k, (name, _) in enumerate(ins)
        }
        outputs = None
        if run[0][1] is not None and self._outputs:
            outputs = {
                name: np.concatenate([p[1][k][1] for p in parts])
                for k, (name, _) in enumerate(outs)
            }
        return inputs, outputs, sum(item[2] for item in run)

    def _item_columns(self, item: _Item) -> Columns | None:
        """One item's columns, or ``None`` (counted as invalid) when they cannot be made."""
        inputs, outputs, n = item
        try:
            cols = to_columns(inputs, self._features)
            if outputs is not None and self._outputs:
                for name, col in to_columns(outputs, self._outputs).items():
                    if name in cols:
                        self._warn_once(
                            f"collide:{name}",
                            "drift monitor of model %s: output column %r has the name of "
                            "an input column and is not monitored",
                            name,
                        )
                        continue
                    cols[name] = col
            if row_count(cols) != n:
                raise ValueError("the monitored tensors do not have the request's rows")
            return cols
        except Exception as exc:
            with self._lock:
                self._invalid += n
            self._warn_once("assemble", "drift monitor of model %s: a sample was left out: %s", exc)
            return None

    async def _loop_forever(self) -> None:
        assert self._wake is not None
        while True:
            try:
                if self.config.schedule == "window":
                    await self._wake.wait()
                    self._wake.clear()
                    self._wake_requested = False
                    await self.flush()
                else:
                    await asyncio.sleep(self.config.interval_s)
                    await self.flush(min_rows=self.config.min_samples)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep monitoring whatever happened to one window
                log.exception("drift monitor of model %s: a window failed", self.model)

    async def flush(self, min_rows: int | None = None) -> int:
        """Test every full window waiting now; then, when ``min_rows`` is given and at least
        that many rows are left, test them as one more (shorter) window.

        The background task calls this; tests and benchmarks may too. Returns the number of
        windows tested. Actions started by them may still be running (see
        :meth:`wait_actions`).
        """
        if not self._started or self._busy is None:
            raise RuntimeError("the drift monitor is not started")
        done = 0
        async with self._busy:
            while True:
                with self._lock:
                    pending = self._pending
                if pending >= self._window_size:
                    want = self._window_size
                elif min_rows is not None and pending >= max(min_rows, 1):
                    want = pending
                    min_rows = None  # one short window at most
                else:
                    break
                items = self._take(want)
                if not items:
                    break
                await self._test_window(items)
                done += 1
        return done

    async def _test_window(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executor
        window = await loop.run_in_executor(executor, self._assemble, items)
        rows = row_count(window)
        if rows < 2:
            return
        number = self._windows + 1
        try:
            await self._run_detectors(window, number, rows)
        finally:
            self._windows = number  # counted once every detector had its turn

    async def _run_detectors(self, window: Columns, number: int, rows: int) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executor
        for name, detector in self.detectors.items():
            started = time.perf_counter()
            try:
                result = await loop.run_in_executor(executor, detector.detect, window)
                if not isinstance(result, DriftResult):
                    raise TypeError(f"detect() returned {type(result).__name__}, not DriftResult")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._record_error(name, detector, exc, number, rows)
                continue
            if result.detector != name:
                result = dataclasses.replace(result, detector=name)
            self._record_result(name, detector, result, number, rows, time.perf_counter() - started)
            if result.drift:
                self._on_drift(result, number, rows)

    # --- results ----------------------------------------------------------------------------

    def _record_error(
        self, name: str, detector: DriftDetector, exc: Exception, window: int, rows: int
    ) -> None:
        self._errors[name] = self._errors.get(name, 0) + 1
        windows, _, errors = self._det_metrics[name]
        # The window was this detector's to test, failed or not: errors / windows is a ratio.
        windows.inc()
        errors.inc()
        message = scrub(f"{type(exc).__name__}: {exc}")
        log.error(
            "drift detector %s of model %s failed on window %d: %s",
            name,
            self.model,
            window,
            message,
        )
        log.debug("drift detector %s traceback", name, exc_info=exc)
        self._latest[name] = {
            "detector": name,
            "kind": detector.kind,
            "drift": None,
            "time": time.time(),
            "window": window,
            "samples": rows,
            "error": message,
            "errors": self._errors[name],
        }

    def _record_result(
        self,
        name: str,
        detector: DriftDetector,
        result: DriftResult,
        window: int,
        rows: int,
        seconds: float,
    ) -> None:
        m = self.metrics
        model = self.model
        for feature, score in result.scores.items():
            m.drift_score.labels(model, name, feature).set(float(score))
        for feature, p in result.p_values.items():
            m.drift_p_value.labels(model, name, feature).set(float(p))
        for feature, flag in result.feature_drift.items():
            m.drift_detected.labels(model, name, feature).set(1 if flag else 0)
        m.drift_detected.labels(model, name, OVERALL).set(1 if result.drift else 0)
        windows, last_run, _ = self._det_metrics[name]
        windows.inc()
        now = time.time()
        last_run.set(now)
        self._latest[name] = {
            **result_to_json(result),
            "kind": detector.kind,
            "time": now,
            "window": window,
            "samples": rows,
            "duration_s": round(seconds, 6),
            "error": None,
            "errors": self._errors.get(name, 0),
        }

    def _current_version(self) -> str:
        try:
            return self._version() if callable(self._version) else self._version
        except Exception:
            return ""

    def _on_drift(self, result: DriftResult, window: int, rows: int) -> None:
        event_id = next(self._event_ids)
        event = DriftEvent(
            model=self.model,
            version=self._current_version(),
            result=result,
            extra={"id": event_id, "time": time.time(), "window": window, "samples": rows},
            rollout=self.rollout,
        )
        record = event_to_json(event)
        record["actions"] = {}
        self._history.append(record)
        log.warning(
            "drift detected: model %s detector %s window %d features %s",
            self.model,
            result.detector,
            window,
            ", ".join(record["features"]) or "-",
        )
        if not self.actions:
            return
        now = time.monotonic()
        cooling = (
            self._last_trigger is not None and now - self._last_trigger < self.config.cooldown_s
        )
        if not cooling:
            self._last_trigger = now
            self._last_trigger_at = time.time()
            self._tell_action_listeners(self._last_trigger_at)
        if self.config.action_order == "sequential":
            self._start_sequence(event, record["actions"], cooling)
            return
        for name, action in self.actions:
            if cooling:
                record["actions"][name] = {"status": "skipped", "reason": "cooldown"}
                self.metrics.drift_actions.labels(self.model, name, "cooldown").inc()
            elif name in self._running:
                record["actions"][name] = {"status": "skipped", "reason": "busy"}
                self.metrics.drift_actions.labels(self.model, name, "busy").inc()
            else:
                state: dict[str, Any] = {"status": "running", "started": time.time()}
                record["actions"][name] = state
                task = asyncio.create_task(
                    self._run_action(name, action, event, state), name=f"drift-action-{name}"
                )
                self._running[name] = task

    def _tell_action_listeners(self, at: float) -> None:
        for listener in list(self.action_listeners):
            try:
                listener(at)
            except Exception:
                log.exception("drift monitor of model %s: an action listener failed", self.model)

    @property
    def last_action_at(self) -> float | None:
        """When (wall clock, seconds since the epoch) an event's actions last started: the
        start of the cooldown; ``None`` before any."""
        return self._last_trigger_at

    def restore_last_action(self, at: float) -> None:
        """Start the cooldown at ``at`` (wall clock), as saved by a previous run.

        Only ever makes the cooldown later: a time older than the one this run has is ignored,
        and a time in the future (a clock set back) counts as now.
        """
        if not isinstance(at, int | float) or at != at:  # NaN
            return
        wall = time.time()
        at = min(float(at), wall)
        start = time.monotonic() - (wall - at)
        if self._last_trigger is None or start > self._last_trigger:
            self._last_trigger = start
            self._last_trigger_at = at

    def _start_sequence(self, event: DriftEvent, states: dict[str, Any], cooling: bool) -> None:
        names = [name for name, _ in self.actions]
        busy = any(name in self._running for name in names)
        if cooling or busy:
            reason = "cooldown" if cooling else "busy"
            for name in names:
                states[name] = {"status": "skipped", "reason": reason}
                self.metrics.drift_actions.labels(self.model, name, reason).inc()
            return
        for name in names:
            states[name] = {"status": "pending"}
        task = asyncio.create_task(
            self._run_sequence(event, states), name=f"drift-actions-{self.model}"
        )
        for name in names:
            self._running[name] = task

    async def _run_sequence(self, event: DriftEvent, states: dict[str, Any]) -> None:
        try:
            done: dict[str, dict[str, Any]] = {}
            for name, action in self.actions:
                state = states[name]
                state.update(status="running", started=time.time())
                seen = dataclasses.replace(event, actions=copy.deepcopy(done))
                await self._run_action(name, action, seen, state, release=False)
                done[name] = {k: v for k, v in state.items() if k != "started"}
                self._done_in_sequence.add(name)
        except asyncio.CancelledError:
            for state in states.values():
                if state.get("status") == "pending":
                    state["status"] = "cancelled"
            raise
        finally:
            for name, _ in self.actions:
                self._running.pop(name, None)
            self._done_in_sequence.clear()

    async def _run_action(
        self,
        name: str,
        action: Action,
        event: DriftEvent,
        state: dict[str, Any],
        *,
        release: bool = True,
    ) -> None:
        outcome = "error"
        try:
            details = await action.run(event)
            state["status"] = "ok"
            if details:
                state["details"] = dict(details)
            outcome = "ok"
        except asyncio.CancelledError:
            state["status"] = "cancelled"
            raise
        except ActionFailed as exc:
            state["status"] = "error"
            state["error"] = scrub(exc.message)
            if exc.details:
                state["details"] = dict(exc.details)
            log.error("drift action %s of model %s failed: %s", name, self.model, state["error"])
        except Exception as exc:
            state["status"] = "error"
            state["error"] = scrub(f"{type(exc).__name__}: {exc}")
            log.error("drift action %s of model %s failed: %s", name, self.model, state["error"])
            log.debug("drift action %s traceback", name, exc_info=exc)
        finally:
            state["finished"] = time.time()
            if release:
                self._running.pop(name, None)
            self.metrics.drift_actions.labels(self.model, name, outcome).inc()

    async def wait_actions(self, timeout: float | None = None) -> None:
        """Wait until no action is running (or ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            await asyncio.wait(list(self._running.values()), timeout=left)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            log.debug(msg, self.model, *args)
            return
        self._warned.add(key)
        log.warning(msg, self.model, *args)

    # --- what the admin API shows -----------------------------------------------------------

    def latest_results(self) -> dict[str, dict[str, Any]]:
        """Each detector's latest result (or error), by detector name, as plain JSON values.

        A result: ``detector``, ``kind``, ``drift``, ``scores``, ``p_values``,
        ``feature_drift``, ``info``, ``time``, ``window``, ``samples``, ``duration_s``,
        ``error`` (``null``) and ``errors`` (the detector's error count). After a failed run:
        ``drift`` is ``null`` and ``error`` the message (paths scrubbed).
        """
        return copy.deepcopy(self._latest)

    def events(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Drift events, oldest first (the last ``limit`` when given), as plain JSON values.

        An event has the keys of :func:`infercore.drift.events.event_to_json` plus
        ``actions``: action name -> ``{status: pending|running|ok|error|skipped|cancelled,
        reason (skipped: cooldown|busy), started, finished, error, details}``.
        """
        items = list(self._history)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return copy.deepcopy(items)

    def status(self) -> dict[str, Any]:
        """Counters of the monitor: queue, sampling, drops, windows, actions, cooldown.

        ``offered_rows``: rows handed to :meth:`offer`; ``sampled_rows``: rows the sampler
        kept and the queue took; ``dropped_rows``: rows sampled but dropped (queue full);
        ``invalid_rows``: queued rows left out of a window (tensors that could not become
        columns); ``degraded_rows``: rows left out because their request was served degraded
        (see :meth:`offer`).
        """
        with self._lock:
            pending = self._pending
            offered, sampled, dropped, invalid, degraded = (
                self._offered,
                self._sampled,
                self._dropped,
                self._invalid,
                self._degraded,
            )
        cooldown_left = 0.0
        if self._last_trigger is not None:
            cooldown_left = max(
                0.0, self.config.cooldown_s - (time.monotonic() - self._last_trigger)
            )
        return {
            "model": self.model,
            "running": self._started,
            "schedule": self.config.schedule,
            "sample_rate": self.config.sample_rate,
            "window_size": self.config.window_size,
            "queue_rows": pending,
            "queue_size": self._capacity,
            "offered_rows": offered,
            "sampled_rows": sampled,
            "dropped_rows": dropped,
            "invalid_rows": invalid,
            "degraded_rows": degraded,
            "windows": self._windows,
            "detectors": list(self.detectors),
            "detector_errors": dict(self._errors),
            "actions": [name for name, _ in self.actions],
            "running_actions": sorted(set(self._running) - self._done_in_sequence),
            "cooldown_remaining_s": round(cooldown_left, 3),
            "events": len(self._history),
        }
