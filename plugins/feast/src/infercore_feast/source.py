"""The ``feast`` feature source: request fields plus Feast online features, merged and cached."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from infercore.components import ComponentContext, FeatureSource, Tensors
from infercore.components.features import mark_degraded
from infercore.components.tensors import V2_TO_NUMPY, TensorSpec
from infercore.errors import (
    DeadlineExceeded,
    FeatureStoreUnavailable,
    InfercoreError,
    InvalidInput,
    PluginError,
)
from infercore.protocol.tensors import coerce
from infercore.runtime.grouping import GroupPass, group_pass, run_again_after
from infercore_feast import store as feast_store
from infercore_feast.breaker import CLOSED, OPEN, CircuitBreaker
from infercore_feast.cache import MISSING, TTLCache
from infercore_feast.config import FeastInput, FeastSourceConfig, check_config
from infercore_feast.failures import clean, corrupt_registry, redis_needs_auth
from infercore_feast.merging import ReadFailed, ReadMerger
from infercore_feast.metrics import feature_metrics
from infercore_feast.restore_lock import RestoreLock, restore_lock

log = logging.getLogger("infercore.feast")

Row = feast_store.Row

#: An entity's row as :meth:`FeastFeatureSource._assemble` uses it (and as the cache holds
#: it): each feast input's value in the order of the feast inputs, its default where the
#: store has none and BYTES encoded; and the positions of the inputs that took their default.
Prepared = tuple[tuple[Any, ...], tuple[int, ...]]


_NOTHING: frozenset[str] = frozenset()
_NO_ROWS: frozenset[int] = frozenset()

#: Why a fetch got no values: the labels of the failures and degraded counters. ``empty``: the
#: online store has lost the rows of a feature view (found by the check every
#: ``empty_check_s``) and the read found none of that view for a key.
REASONS = ("timeout", "error", "breaker_open", "empty")

#: What the 503 of each reason says (no internals: it goes to the client).
_REFUSALS = {
    "timeout": "feature store unavailable (timeout)",
    "error": "feature store unavailable (error)",
    "breaker_open": "feature store unavailable (breaker open)",
    "empty": "feature store unavailable (empty: it has lost its rows)",
}

#: Seconds between the marker checks that reads finding none of their keys start (below,
#: :meth:`FeastFeatureSource._verify`): at most one per interval, whatever the stream of
#: new entities; the check costs ~0.5 ms of CPU (one small ``online_read`` per view), so
#: at most ~0.5 % of a core. It is also the longest an emptied store is served as "every
#: entity is new" while such reads keep coming (README: "A read that finds none of its keys").
SUSPECT_CHECK_INTERVAL_S = 0.1

#: What a cached row of feast values costs besides its BYTES values' lengths: the row's two
#: tuples, and per value a slot and a number object (a Python float or int is 24-28 bytes, a
#: numpy scalar 32). See :func:`row_nbytes_estimate`.
_ROW_BYTES, _VALUE_BYTES, _BYTES_VALUE_BYTES = 96, 40, 33

#: How to give the Redis server its password (the URL's own form; never the password).
_AUTH_HINT = (
    "put the password in INFERCORE_REDIS_URL (redis_url): redis://:PASSWORD@host:port/db, "
    "or redis://USER:PASSWORD@host:port/db for an ACL user"
)

T = TypeVar("T")


class _Counted:
    """What one fetch of several rows counted, for its requests run again alone to claim.

    A request group (``server.group_requests``) fetches once for its requests' stacked rows.
    When its answer cannot be split (its read failed, some rows took defaults, one request's
    bad value, a model error), each request runs again alone and fetches its own rows again.
    Those fetches claim what the group's counted instead of counting it again: each key's
    lookup (a hit or a miss, and a stale row) once, each row's defaults, and a failure per
    fetch that got no values. And they take the reason each failed key's read failed instead
    of reading it again. Which fetch is one of those requests' is exact: the group's pass and
    the request's first fetch after it tell (``infercore.runtime.grouping``).
    """

    __slots__ = ("failed", "failures", "lookups", "rows")

    def __init__(self, lookups: Sequence[str]) -> None:
        #: key -> lookups of it counted and not claimed yet
        self.lookups = dict.fromkeys(lookups, 1)
        #: key -> rows of it whose defaults were counted and not claimed yet
        self.rows: dict[str, int] = {}
        #: key -> why its read failed
        self.failed: dict[str, str] = {}
        #: Failures counted and not claimed yet.
        self.failures = 0

    def read_failed(self, reason: str, failed: Sequence[str], charged: str | None) -> None:
        for key in failed:
            self.failed.setdefault(key, reason)
        if charged is not None:
            self.failures += 1

    def assembled(self, keys: Sequence[str], found: Mapping[str, Prepared]) -> None:
        """The rows of ``keys`` were answered from ``found``, their defaults counted."""
        rows = self.rows
        for key in keys:
            if found[key][1]:
                rows[key] = rows.get(key, 0) + 1

    def claim_lookups(self, found: Mapping[str, Any], misses: Sequence[str]) -> set[str]:
        """The keys among ``found`` and ``misses`` whose lookup is counted already (claimed)."""
        claimed: set[str] = set()
        lookups = self.lookups
        for key in (*found, *misses):
            left = lookups.get(key, 0)
            if left:
                claimed.add(key)
                if left == 1:
                    del lookups[key]
                else:
                    lookups[key] = left - 1
        return claimed

    def claim_rows(self, keys: Sequence[str]) -> set[int]:
        """The positions of the rows of ``keys`` whose defaults are counted already."""
        claimed: set[int] = set()
        rows = self.rows
        for i, key in enumerate(keys):
            left = rows.get(key, 0)
            if left:
                claimed.add(i)
                rows[key] = left - 1
        return claimed

    def claim_failure(self) -> bool:
        """Whether a failure was counted already (it is claimed then).

        Whatever its reason: the group's read may have been the failure that opened the
        breaker, and its requests, alone, then meet ``breaker_open``.
        """
        if self.failures:
            self.failures -= 1
            return True
        return False

    def reason_for(self, keys: Sequence[str]) -> str | None:
        """Why the read of ``keys`` failed, when every one of them did; else ``None``."""
        failed = self.failed
        if failed and all(key in failed for key in keys):
            return failed[keys[0]]
        return None


class FeastFeatureSource(FeatureSource):
    """Model inputs from the request and from Feast's online store (``kind: feast``).

    Per request: the entity keys come from the ``entity.field`` column (none longer than
    ``max_entity_key_bytes``: a 400 before any lookup otherwise); keys held in the TTL
    cache are answered at once; the others join a merged read (:class:`ReadMerger`: at once
    when no read is in flight; else it collects keys from every concurrent request for at most
    ``batch_window_ms``, until the reads in flight end, or up to ``max_batch_entities`` keys),
    which reads them in a worker thread with one ``online_read`` per feature view (for views
    it cannot read that way, one ``get_online_features`` call; see ``store.online_reader``),
    caches and fans the rows out. At most ``read_threads`` reads are in flight (one for SQLite,
    whose Feast store shares one connection between threads). A read is abandoned after
    ``timeout_ms`` (its rows are still cached if it ends later); a request waits no longer
    than its deadline. Failed reads apply ``on_failure`` and count towards the circuit
    breaker. What a request group's fetch counted is kept while its requests may run again
    alone: then they do not read its failed keys again, and each request is counted once
    (:meth:`_keep_counts`).

    ``feast`` is imported by :meth:`start` (it takes seconds), never with this module.
    """

    kind = "feast"
    Config = FeastSourceConfig
    config: FeastSourceConfig
    # Each row's features depend on its own key and fields only: requests that arrive together
    # may be fetched as one stack (server.group_requests).
    groupable = True

    def __init__(self, config: FeastSourceConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.config = config
        # The runtime passes the server's request timeout to every component (context.extra);
        # another host may not.
        request_timeout = context.extra.get("request_timeout_ms")
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, int | float):
            request_timeout = None
        self._feast_inputs: list[FeastInput] = check_config(
            config, context.path, request_timeout_ms=request_timeout
        )
        self._refs: list[str] = list(dict.fromkeys(i.ref for i in self._feast_inputs))
        # Per feast input: its slot in a Row, its default, whether it is BYTES.
        self._feast_plan = [
            (self._refs.index(i.ref), i.default, i.datatype == "BYTES") for i in self._feast_inputs
        ]
        defaults = tuple(i.default for i in self._feast_inputs)
        # An entity the store does not know: every input takes (and counts) its default.
        self._unknown: Prepared = (defaults, tuple(range(len(defaults))))
        # A key whose read failed (fail_open): defaults, not counted as defaults.
        self._unread: Prepared = (defaults, ())
        # What a read answers for a key the store has no row of a lost view for (while the
        # store is known to have lost that view's rows): a failure (reason ``empty``), never
        # cached. Told apart by identity, as ``_unknown`` is.
        self._lost: Prepared = (defaults, ())
        feast_index = {i.name: j for j, i in enumerate(self._feast_inputs)}
        #: Per feature view, the positions of its feast inputs: a row whose inputs of a lost
        #: view all took their defaults has no row of that view.
        view_inputs: dict[str, set[int]] = {}
        for j, item in enumerate(self._feast_inputs):
            view_inputs.setdefault(item.view, set()).add(j)
        self._view_inputs = {view: frozenset(js) for view, js in view_inputs.items()}
        # Per model input, in order: its name, its feast input's position (-1 for a request
        # input) and the dtype of a feast input's tensor.
        self._plan = [
            (spec.name, feast_index.get(spec.name, -1), V2_TO_NUMPY[spec.datatype])
            for spec in config.inputs
        ]
        self._request_specs = [spec for spec in config.inputs if spec.source == "request"]
        #: The fields a request may carry: anything else is a typo (``contry`` would silently
        #: take ``country``'s default) or a feature the store provides, and is refused.
        self._accepted = frozenset(
            [config.entity.field, *(spec.name for spec in self._request_specs)]
        )
        self._timeout_s = config.timeout_ms / 1000
        #: Merged reads in flight at once (``read_threads``). Feast's SQLite store shares one
        #: connection between threads, so parallel reads there only contend for it and for
        #: the GIL: one at a time, the others' keys gathering into the next read.
        self.read_slots = config.read_threads or (1 if config.online_store == "sqlite" else 4)
        model = self._model = context.model_name or context.path
        registry = context.extra.get("metrics_registry")
        if not isinstance(registry, CollectorRegistry):
            registry = CollectorRegistry(auto_describe=True)
        #: The registry the metrics are in (a private one until the core passes its own).
        self.metrics_registry: CollectorRegistry = registry
        m = feature_metrics(registry)
        self._m_fetch = m.fetch_seconds.labels(model)
        self._m_entities = m.read_entities.labels(model)
        self._m_hits = m.cache_hits.labels(model)
        self._m_misses = m.cache_misses.labels(model)
        self._m_breaker = m.breaker_open.labels(model)
        self._m_breaker.set(0)
        self._m_store_empty = m.store_empty
        self._m_restores = {
            outcome: m.restores.labels(model, outcome)
            for outcome in ("materialized", "failed", "elsewhere")
        }
        self._m_failures = {r: m.failures.labels(model, r) for r in REASONS}
        self._m_degraded = {r: m.degraded.labels(model, r) for r in REASONS}
        self._m_defaults = [m.defaults.labels(model, i.ref) for i in self._feast_inputs]
        self._m_stale = m.stale_rows.labels(model)
        self.cache: TTLCache[Prepared] = TTLCache(
            config.cache_ttl_s,
            config.cache_max_entries,
            stale_s=config.serve_stale_s,
            max_bytes=config.cache_max_bytes,
        )
        #: What a cached row costs (:meth:`_row_nbytes`): a numeric row, a fixed size; BYTES
        #: values add their lengths.
        self._row_bytes = row_nbytes_estimate(len(self._feast_inputs))
        self._bytes_inputs = tuple(
            j for j, item in enumerate(self._feast_inputs) if item.datatype == "BYTES"
        )
        self._max_key_bytes = config.max_entity_key_bytes
        self.breaker = CircuitBreaker(
            config.breaker_failures,
            config.breaker_reset_s,
            failing_s=config.breaker_failing_s,
            on_change=self._breaker_changed,
        )
        self.merger: ReadMerger[Prepared] = ReadMerger(
            self._read,
            window_s=config.batch_window_ms / 1000,
            max_keys=config.max_batch_entities,
            max_in_flight=self.read_slots,
        )
        #: The ``feast.FeatureStore`` (after :meth:`start`).
        self.store: Any = None
        #: Reads rows, blocking (after :meth:`start`): through the online store's
        #: ``online_read`` where the views allow it, else through ``self.store``.
        self.reader: feast_store.RowReader | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._where: feast_store.StoreLocation | None = None
        #: The feature views the inputs use, and their marker entities (after :meth:`start`).
        self._views: dict[str, Any] = {}
        self.markers: dict[str, tuple[Any, ...]] = {}
        #: The views found without their marker rows: while one is, the store has lost its
        #: rows, and a read that finds none of it for a key is a failure (``empty``).
        self.lost_views: tuple[str, ...] = ()
        #: The input positions of each lost view (``_view_inputs``).
        self._lost_inputs: tuple[frozenset[int], ...] = ()
        #: Reads the markers (after :meth:`start`, when there are markers to check).
        self._check: feast_store.MarkerCheck | None = None
        #: Taken by the one process that materializes the lost views (after :meth:`start`).
        self._restore_lock: RestoreLock | None = None
        self._check_executor: ThreadPoolExecutor | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: Loop time the latest marker check started (any: the watcher's, a read's).
        self._last_check_at = -math.inf
        #: The check a read that found none of its keys started, while it runs.
        self._checking: asyncio.Task[None] | None = None
        #: The check such a read scheduled for the end of the rate limit's interval.
        self._check_timer: asyncio.TimerHandle | None = None
        #: At most one check per this many seconds is started by such reads.
        self.suspect_check_interval_s = SUSPECT_CHECK_INTERVAL_S
        self._restoring: asyncio.Task[None] | None = None
        #: What each request group's fetch counted (:meth:`_keep_counts`), while the group's
        #: pass is alive: its task, or one of its requests that may still run again alone.
        self._counts: weakref.WeakKeyDictionary[GroupPass, _Counted] = weakref.WeakKeyDictionary()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (applying and materializing first with ``materialize_on_start``).

        Raises:
            ConfigError: A bad repo path, or an input naming a view or feature the registry
                does not have.
            PluginError: Feast failed (the message carries no local paths or passwords).
        """
        path = self.context.path
        where = self._where = feast_store.locate(self.config, self.context.model_root, path)
        try:
            opened, self.reader = await asyncio.to_thread(self._open, where)
        except InfercoreError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{path}: the Feast {self.config.online_store} store could not be prepared: "
                + (self._needs_auth() if redis_needs_auth(exc) else self._describe(exc)),
                hint=self._open_hint(exc),
            ) from exc
        self.store, self._views, self.markers = opened.store, opened.views, opened.markers
        self._check = opened.check
        # A spare thread per read slot: a read that outlives its timeout keeps its thread
        # (it cannot be stopped), and the next read should not queue behind it. Reads that
        # queue all the same (a hung store) time out unstarted, so the breaker still opens.
        self._executor = ThreadPoolExecutor(
            max_workers=2 * self.read_slots, thread_name_prefix="infercore-feast"
        )
        if self._check is not None:
            for view in self.markers:
                self._m_store_empty.labels(self._model, view).set(0)
            if self.config.materialize_on_start:
                self._restore_lock = restore_lock(self.config, where.sqlite)
            # Its own thread: a check that waits on a stalled store never holds a read's.
            self._check_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="infercore-feast-check"
            )
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
            log.info(
                "feast: model %s checks every %gs that the online store still holds its rows "
                "(marker entities of %s)",
                self.context.model_name,
                self.config.empty_check_s,
                ", ".join(sorted(self.markers)),
            )

    def _open(
        self, where: feast_store.StoreLocation
    ) -> tuple[feast_store.OpenedStore, feast_store.RowReader]:
        opened = feast_store.prepare_store(
            self.config, where, self._feast_inputs, path=self.context.path
        )
        store = opened.store
        reader, how = feast_store.online_reader(store, self._refs, self.config.entity.join_key)
        # One read through the reader too: its own connections open here, not on a request.
        reader(["__infercore_warmup__"])
        log.info("feast: model %s reads through %s", self.context.model_name, how)
        return opened, reader

    def _open_hint(self, exc: Exception) -> str:
        """The fix for a store that could not be opened, for the case at hand."""
        config = self.config
        if corrupt_registry(exc):
            # Written by `feast apply` from the repo's definitions: nothing else is lost.
            rebuild = (
                "materialize_on_start applies the repo's definitions and rebuilds it at the "
                "next start"
                if config.materialize_on_start
                else "rebuild it with `feast apply` in the repo folder, or set "
                "materialize_on_start: true to have it rebuilt at start-up"
            )
            name = self._registry_name()
            return f"the Feast registry file ({name}) is corrupt: delete it; {rebuild}"
        if config.online_store == "redis":
            if redis_needs_auth(exc):
                return _AUTH_HINT
            return "check INFERCORE_REDIS_URL (redis_url) and that the server is up"
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            # Not a database, or a damaged one: materializing again does not repair a file,
            # it writes into it.
            rebuild = (
                "materialize_on_start rebuilds it at the next start"
                if config.materialize_on_start
                else "rebuild it with `feast materialize` in the repo folder, or set "
                "materialize_on_start: true to have it rebuilt at start-up"
            )
            return (
                "the SQLite online store file (sqlite_path, default data/online_store.db in "
                f"the repo folder) is damaged: delete it; {rebuild}"
            )
        if config.materialize_on_start:
            return (
                "check that the SQLite online store's folder (sqlite_path) is writable and "
                "that no other process holds the file locked"
            )
        return (
            "build the store first (`feast apply` and `feast materialize` in the repo folder), "
            "or set materialize_on_start: true"
        )

    async def stop(self) -> None:
        if self._check_timer is not None:
            self._check_timer.cancel()
            self._check_timer = None
        for task in (self._watcher, self._restoring, self._checking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._restoring = self._checking = None
        await self.merger.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._check_executor is not None:
            self._check_executor.shutdown(wait=False, cancel_futures=True)
            self._check_executor = None
        lock, self._restore_lock = self._restore_lock, None
        if lock is not None:
            # Held only if stopped while taking it; a materialization still running in its
            # daemon thread releases it itself when it ends.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lock.close)

    def _registry_name(self) -> str:
        """The registry file, as the operator configured it (never an absolute path: S6)."""
        value = self.config.registry_path
        if value is None:
            return "registry_path, default data/registry.db in the repo folder"
        if os.path.isabs(value):
            return "the file registry_path names"
        return f"registry_path: {value} in the repo folder"

    def _needs_auth(self) -> str:
        """What is wrong when the Redis server refuses a client that has not authenticated."""
        if urllib.parse.urlsplit(self.config.redis_url).password:
            return "the Redis server requires authentication"
        return "the Redis server requires authentication and redis_url has no password"

    def _scrub(self, text: str) -> str:
        """``text`` fit for a log line or an error: no local paths, no redis URL, no Redis
        pipeline command (entity keys), nothing that does not print (S6)."""
        if self._where is not None:
            text = self._where.scrub(text)
        if self.config.online_store == "redis":
            text = text.replace(self.config.redis_url, "<redis_url>")
        return clean(text)

    def _describe(self, exc: BaseException) -> str:
        """``exc`` for a log line or an error: its type and scrubbed text, or (a Redis server
        that requires a password) what is wrong and the fix."""
        if redis_needs_auth(exc):
            return f"{self._needs_auth()}; {_AUTH_HINT}"
        return f"{type(exc).__name__}: {self._scrub(str(exc))}"

    def _breaker_changed(self, state: str) -> None:
        self._m_breaker.set(0 if state == CLOSED else 1)
        if state == OPEN:
            log.warning(
                "feast circuit breaker open for model %s: reads skipped for %.1fs (policy %s)",
                self.context.model_name,
                self.breaker.open_for_s,
                self.config.on_failure,
            )
        elif state == CLOSED:
            log.info("feast circuit breaker closed for model %s", self.context.model_name)

    # -- an online store that lost its rows -------------------------------------------------

    async def _watch(self) -> None:
        """Every ``empty_check_s``: does the store still hold each view's marker rows?

        Off the request path: one small read per view, in a thread of its own. A Redis
        restarted without persistence (or flushed) answers every read, with nothing in it;
        one view's rows deleted (its keys' fields in Redis, its table in SQLite) leave the
        others served. Either way its entities would get their defaults, silently.
        """
        interval = self.config.empty_check_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_rows()
            except Exception:
                # A bug here must not end the checks (nor reach a request).
                log.exception("feast: the empty-store check of model %s failed", self._model)

    async def check_rows(self) -> None:
        """Check the marker rows once (the watcher's step; tests call it directly too).

        A store that cannot be read is left to the read path and the breaker; while the
        store's rows are being restored, the restoration checks.
        """
        if self._restoring is not None or self._check is None:
            return
        try:
            lost = await self._check_markers()
        except Exception as exc:
            self._check_failed(exc)
            return
        self._found(lost)

    async def _check_markers(self) -> dict[str, str]:
        """The lost views and why (:class:`feast_store.MarkerCheck`), in the check's thread."""
        assert self._check is not None
        self._last_check_at = asyncio.get_running_loop().time()
        return await self._in_check_thread(self._check)

    # A read that finds none of its keys: new entities, or a store that has just lost them.

    def _suspect(self, rows: Sequence[Prepared]) -> bool:
        """Whether no row of ``rows`` holds a row of some checked view not known lost.

        An emptied store (a ``FLUSHALL``, a Redis restarted without persistence, a view's
        rows deleted) answers every read so; so does a read of entities new to the store.
        Cheap when it matters: the first row that took no default ends it.
        """
        unknown = self._unknown
        pending: list[frozenset[int]] | None = None
        for row in rows:
            if row is unknown:
                continue
            defaulted = row[1]
            if not defaulted:
                return False  # a row of every view
            if pending is None:
                pending = self._checked_inputs()
            pending = [inputs for inputs in pending if inputs.issubset(defaulted)]
            if not pending:
                return False
        return bool(self._checked_inputs() if pending is None else pending)

    def _checked_inputs(self) -> list[frozenset[int]]:
        """The input positions of each view the marker check watches and that is not lost."""
        lost = self.lost_views
        return [self._view_inputs[view] for view in self.markers if view not in lost]

    def _check_soon(self) -> asyncio.Task[None] | None:
        """Check the markers for a read that found none of its keys: the check running (one
        already running is joined), or ``None`` when one started less than
        ``suspect_check_interval_s`` ago; one is then scheduled for that interval's end."""
        if self._checking is not None:
            return self._checking
        if self._check is None or self._check_executor is None:
            return None
        loop = asyncio.get_running_loop()
        wait = self._last_check_at + self.suspect_check_interval_s - loop.time()
        if wait > 0:
            if self._check_timer is None:
                self._check_timer = loop.call_later(wait, self._check_due)
            return None
        task = self._checking = loop.create_task(self._check_for_read())
        return task

    def _check_due(self) -> None:
        self._check_timer = None
        self._check_soon()

    async def _check_for_read(self) -> None:
        try:
            lost = await self._check_markers()
        except Exception as exc:
            self._check_failed(exc)
            return
        finally:
            self._checking = None
        if self._restoring is not None:
            # Only newly lost views: markers come back before the process materializing
            # them has written every row (the restoration says when they are back).
            lost = {**dict.fromkeys(self.lost_views, ""), **lost}
        self._found(lost)

    async def _verify(self, budget_s: float) -> bool:
        """Hold a read that found none of its keys until a marker check has answered (and
        :meth:`_found` applied what it found), for at most ``budget_s``. Whether the read
        may be answered: ``False`` when the check did not answer in time.

        Held only when no check started in the last ``suspect_check_interval_s``, or one is
        running: a stream of new entities costs a check per interval, not one per read, and
        only the first read after a quiet interval waits (one small ``online_read`` per
        view). A read not held is answered as it is: if the store was emptied within the
        interval after the last check found it whole, its rows are served as new entities
        until the check scheduled for the interval's end finds the loss and drops them from
        the cache.
        """
        task = self._check_soon()
        if task is None:
            return True
        done, _ = await asyncio.wait((task,), timeout=max(budget_s, 0.0))
        return bool(done)

    def _check_failed(self, exc: Exception) -> None:
        log.debug(
            "feast: the empty-store check of model %s could not read: %s",
            self._model,
            self._describe(exc),
        )

    async def _in_check_thread(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._check_executor
        if executor is None:
            raise RuntimeError("the feature source has stopped")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(fn, *args))

    def _found(self, lost: Mapping[str, str]) -> None:
        """What a check found: the views without their marker rows, each with why (none:
        all is well). A view found lost is logged once, when found; one back, once."""
        before = self.lost_views
        new = [view for view in lost if view not in before]
        back = [view for view in before if view not in lost]
        if new or back:
            self._set_lost(tuple(lost))
        if new:
            # Rows read since the view emptied were cached without it: wrong.
            gone = tuple(self._view_inputs[view] for view in new)
            dropped = self.cache.discard_where(functools.partial(self._misses, gone=gone))
            then = (
                "materializing again in the background"
                if self.config.materialize_on_start
                else "materialize it again (`feast materialize`)"
            )
            names = ", ".join(new)
            log.error(
                "feast: the %s online store of model %s has lost its rows of %s; %s. Until "
                "they are back, a read that finds no row of %s for an entity is a store "
                "failure (reason empty, on_failure: %s); %d cached rows without them dropped",
                self.config.online_store,
                self._model,
                ", ".join(f"{view} ({lost[view]})" for view in new),
                then,
                names,
                self.config.on_failure,
                dropped,
            )
        if back:
            log.info(
                "feast: the online store of model %s holds its rows of %s again; serving from it",
                self._model,
                ", ".join(back),
            )
        if self.lost_views and self._restore_lock is not None and self._restoring is None:
            self._restoring = asyncio.get_running_loop().create_task(self._restore())

    def _set_lost(self, views: tuple[str, ...]) -> None:
        self.lost_views = views
        self._lost_inputs = tuple(self._view_inputs[view] for view in views)
        for view in self.markers:
            self._m_store_empty.labels(self._model, view).set(1 if view in views else 0)

    def _misses(self, row: Prepared, gone: tuple[frozenset[int], ...]) -> bool:
        """Whether ``row`` has no row of one of the views whose inputs are ``gone``: every
        input of that view took its default (an entity unknown to the store has none)."""
        if row is self._unknown:
            return True
        defaulted = row[1]
        return bool(defaulted) and any(inputs.issubset(defaulted) for inputs in gone)

    async def _restore(self) -> None:
        """Materialize the lost views again: take the lock the store's processes share (its
        holder materializes; the others wait, then find the markers back), materialize in a
        daemon thread (a long materialization must not hold the process's exit; one cut short
        is idempotent), then check the markers again."""
        lock = self._restore_lock
        assert lock is not None and self._where is not None
        where, path, model = self._where, self.context.path, self._model
        views: list[str] = []
        lost: dict[str, str] = {}
        try:
            try:
                await self._take(lock)
                # Under the lock: the process that held it may have restored them.
                lost = await self._check_markers()
            except Exception as exc:
                if lock.held:
                    await self._release(lock)
                log.error(
                    "feast: model %s could not take the materialization lock or check the "
                    "store: %s; next try in %gs",
                    model,
                    self._describe(exc),
                    self.config.empty_check_s,
                )
                return
            if not lost:
                await self._release(lock)
                self._m_restores["elsewhere"].inc()
                log.info(
                    "feast: %s materialized again by another process; model %s did not materialize",
                    ", ".join(self.lost_views) or "the lost views",
                    model,
                )
                self._found({})
                return
            self._found(lost)
            views = list(lost)
            t0 = time.perf_counter()
            try:
                await _in_daemon_thread(
                    lock.hold_while,
                    feast_store.materialize_again,
                    self.config,
                    where,
                    views,
                    path=path,
                )
            except Exception as exc:
                self._m_restores["failed"].inc()
                log.error(
                    "feast: materializing %s again for model %s failed: %s; next try in %gs",
                    ", ".join(views),
                    model,
                    self._describe(exc),
                    self.config.empty_check_s,
                )
                return
            self._m_restores["materialized"].inc()
            log.info(
                "feast: materialized %s again for model %s in %.2fs",
                ", ".join(views),
                model,
                time.perf_counter() - t0,
            )
            try:
                lost = await self._check_markers()
            except Exception as exc:
                self._check_failed(exc)
                return  # the next check decides
        finally:
            # (Cancelled holding the lock, before materializing: stop() releases it.)
            self._restoring = None
        still = [view for view in lost if view in views]
        if still:
            # Materialized, and still none of the markers: the check is wrong about these
            # views (their newest offline rows are not what the store keeps), not the store.
            log.error(
                "feast: %s still lacks its marker rows after materializing; the empty-store "
                "check of model %s is off for it",
                ", ".join(still),
                model,
            )
            for view in still:
                self._m_store_empty.labels(model, view).set(0)
                self.markers.pop(view, None)
        # Views lost while these were materialized are found now (and restored in turn).
        self._found({view: why for view, why in lost.items() if view not in views})

    async def _release(self, lock: RestoreLock) -> None:
        try:
            await self._in_check_thread(lock.release)
        except Exception as exc:  # a Redis lock expires by itself
            log.debug("feast: releasing the materialization lock failed: %r", exc)

    async def _take(self, lock: RestoreLock) -> None:
        """Wait for the materialization lock. Meanwhile, every ``min(1 s, empty_check_s)``,
        the markers are checked for views newly lost (none is found back while another
        process materializes: its rows come back before it has written them all)."""
        poll = min(1.0, self.config.empty_check_s)
        waited = False
        while not await self._in_check_thread(lock.acquire):
            if not waited:
                waited = True
                log.info(
                    "feast: another process is materializing the %s online store of project "
                    "%s; model %s waits for it, then checks the store",
                    self.config.online_store,
                    self.config.project,
                    self._model,
                )
            await asyncio.sleep(poll)
            try:
                lost = await self._check_markers()
            except Exception as exc:
                self._check_failed(exc)
                continue
            self._found({**dict.fromkeys(self.lost_views, ""), **lost})

    # -- the request path ----------------------------------------------------------------

    async def fetch(self, fields: Mapping[str, npt.NDArray[Any]], *, deadline: float) -> Tensors:
        if not self._accepted.issuperset(fields):
            self._refuse_unknown(fields)
        keys = self._entity_keys(fields)
        rows = len(keys)
        request_columns = self._request_columns(fields, rows)
        found: dict[str, Any] = {}
        misses: list[str] = []
        for key in dict.fromkeys(keys):
            value = self.cache.get(key)
            if value is MISSING:
                misses.append(key)
            else:
                found[key] = value
        # A request of a group that has run each of its requests again alone: what the
        # group's fetch counted for these keys is not counted again.
        after = run_again_after()
        earlier = self._counts.get(after) if after is not None else None
        counted: AbstractSet[str] = _NOTHING
        hits, missed = len(found), len(misses)
        if earlier is not None:
            counted = earlier.claim_lookups(found, misses)
            if counted:
                counted_hits = sum(1 for key in found if key in counted)
                hits -= counted_hits
                missed -= len(counted) - counted_hits
        mine = self._keep_counts(found, misses)
        if hits:
            self._m_hits.inc(hits)
        if misses:
            if missed:
                self._m_misses.inc(missed)
            failed = await self._lookup(misses, found, deadline, earlier)
            reason = failed
            if (
                reason is not None
                and self.cache.stale_s
                and self._serve_stale(misses, found, counted)
            ):
                reason = None
            if failed is not None:
                charged = None
                if reason is not None and (earlier is None or not earlier.claim_failure()):
                    charged = reason
                    self._m_failures[reason].inc()
                    if self.config.on_failure == "fail_open":
                        self._m_degraded[reason].inc()
                if mine is not None:
                    mine.read_failed(failed, [key for key in misses if key not in found], charged)
            if reason is not None:
                if self.config.on_failure == "fail_closed":
                    raise FeatureStoreUnavailable(
                        _REFUSALS[reason],
                        hint="retry later; the operator may set on_failure: fail_open",
                    )
                mark_degraded("features")
                for key in misses:
                    found.setdefault(key, self._unread)
        if mine is not None:
            mine.assembled(keys, found)
        claimed_rows = earlier.claim_rows(keys) if earlier is not None else _NO_ROWS
        return self._assemble(keys, found, request_columns, claimed_rows)

    def _keep_counts(self, found: Mapping[str, Any], misses: list[str]) -> _Counted | None:
        """Keep what a request group's fetch counts, for its requests run again alone.

        With request grouping (``server.group_requests``), when the group's answer cannot be
        split, each of its requests runs again alone: their fetches claim these counts
        instead of counting again, so each request is counted once; and they do not read
        again the keys whose read has just failed. Any other fetch counts its own.

        Args:
            found: The fetch's keys found in the cache.
            misses: Its other keys.
        """
        passed = group_pass()
        if passed is None:
            return None
        mine = self._counts[passed] = _Counted([*found, *misses])
        return mine

    def _serve_stale(
        self, keys: list[str], found: dict[str, Any], counted: AbstractSet[str] = frozenset()
    ) -> bool:
        """After a failed read: rows for the ``keys`` not in ``found`` from the cache, expired
        up to ``serve_stale_s`` ago. Whether every key has a row now: the request is served,
        marked degraded. Otherwise the failure policy applies; ``fail_open`` keeps the stale
        rows it found and gives the rest their defaults. Rows of ``counted`` keys (their lookup
        counted by a group's fetch before: :meth:`_keep_counts`) are not counted again."""
        stale = {}
        for key in keys:
            if key not in found:
                value = self.cache.get_stale(key)
                if value is not MISSING:
                    stale[key] = value
        complete = all(key in found or key in stale for key in keys)
        if stale and (complete or self.config.on_failure == "fail_open"):
            found.update(stale)
            fresh = sum(1 for key in stale if key not in counted) if counted else len(stale)
            if fresh:
                self._m_stale.inc(fresh)
            mark_degraded("features")
        return complete

    async def _lookup(
        self,
        keys: list[str],
        found: dict[str, Any],
        deadline: float,
        earlier: _Counted | None = None,
    ) -> str | None:
        """Read ``keys`` through the merger into ``found``; the failure reason, if any.

        Keys whose read has just failed in their group's fetch (``earlier``) are not read
        again: the group's requests, each running alone after the group's fetch failed, would
        only ask the failing store the same question again.
        """
        if not self.breaker.allow():
            return "breaker_open"
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before fetching features")
        if earlier is not None:
            known = earlier.reason_for(keys)
            if known is not None:
                return known
        futures = [self.merger.submit(key) for key in keys]
        # asyncio.wait never cancels the (shared) futures; the merged read bounds itself by
        # timeout_ms, the deadline bounds this request. No time left means no useful answer,
        # whatever the failure policy: 504, as for any stage that passes the deadline (P3).
        _, pending = await asyncio.wait(futures, timeout=remaining)
        if pending:
            # Not a store failure: the request ran out of time (counted by the server as
            # request_failures_total{reason="deadline_exceeded"}, its 504). The read itself,
            # if it passes timeout_ms, counts towards the breaker.
            raise DeadlineExceeded("deadline exceeded while fetching features")
        reason: str | None = None
        lost = self._lost
        for key, fut in zip(keys, futures, strict=True):
            exc = fut.exception()
            if exc is None:
                value = fut.result()
                if value is lost:
                    reason = reason or "empty"
                else:
                    found[key] = value
            elif isinstance(exc, ReadFailed) and exc.reason in self._m_failures:
                reason = reason or exc.reason
            else:
                reason = reason or "error"
        return reason

    async def _read(self, keys: list[str]) -> list[Prepared]:
        """One merged read: a worker thread, bounded by ``timeout_ms``; results cached."""
        executor, reader = self._executor, self.reader
        if executor is None or reader is None:
            raise ReadFailed("error")
        loop = asyncio.get_running_loop()
        self.breaker.on_dispatch()
        self._m_entities.observe(len(keys))
        t0 = time.perf_counter()
        job = executor.submit(self._read_blocking, reader, keys)
        read = asyncio.wrap_future(job, loop=loop)
        try:
            await asyncio.wait((read,), timeout=self._timeout_s)
        except asyncio.CancelledError:
            read.cancel()  # and the job, unless it has started
            raise
        if not read.done():
            # A read that never started (the threads all busy with reads that outlived their
            # timeouts) is dropped. One that started cannot be stopped: its rows are cached
            # when it ends, so a burst of misses that overruns the store still fills the
            # cache. Either way its callers fail now.
            if not job.cancel():
                read.add_done_callback(functools.partial(self._keep_late, keys))
            self._m_fetch.observe(time.perf_counter() - t0)
            self.breaker.record_failure()
            raise ReadFailed("timeout")
        try:
            rows = read.result()
        except Exception as exc:
            self._m_fetch.observe(time.perf_counter() - t0)
            self.breaker.record_failure()
            log.warning("feast read of %d keys failed: %s", len(keys), self._describe(exc))
            raise ReadFailed("error") from None
        elapsed = time.perf_counter() - t0
        self._m_fetch.observe(elapsed)
        # None of the keys has a row of a view: new entities, or a store that has just lost
        # the view's rows. Served as new entities, a lost store's rows would be 200s with
        # defaults, unmarked, until the next empty_check_s (and windows of default values
        # look like drift). The markers say which, first; within timeout_ms.
        if (
            self._check is not None
            and self._suspect(rows)
            and not await self._verify(self._timeout_s - elapsed)
        ):
            self.breaker.record_failure()
            raise ReadFailed("timeout")
        # The store answered: an emptied one is not failing, and opening the breaker would
        # only hide the rows coming back.
        self.breaker.record_success()
        gone = self._lost_inputs
        if gone:
            lost, misses = self._lost, self._misses
            rows = [lost if misses(row, gone) else row for row in rows]
        else:
            lost = None
        cache, nbytes = self.cache, self._row_nbytes
        for key, row in zip(keys, rows, strict=True):
            if row is not lost:
                cache.put(key, row, nbytes(row))
        return rows

    def _keep_late(self, keys: list[str], read: asyncio.Future[list[Prepared]]) -> None:
        """A read that timed out has ended: cache its rows if it succeeded, for the keys no
        later read has cached meanwhile (theirs are fresher)."""
        if read.cancelled() or read.exception() is not None:
            return
        rows = read.result()
        if self._check is not None and self._suspect(rows):
            # Nobody waits for these: not cached, and the markers checked (rate-limited).
            self._check_soon()
            return
        cache, gone = self.cache, self._lost_inputs
        for key, row in zip(keys, rows, strict=True):
            if not (gone and self._misses(row, gone)) and cache.get(key) is MISSING:
                cache.put(key, row, self._row_nbytes(row))

    def _row_nbytes(self, row: Prepared) -> int:
        """About what caching ``row`` holds in memory that no other entry shares."""
        if row is self._unknown:
            return 0  # one row for every entity the store does not know
        size = self._row_bytes
        for j in self._bytes_inputs:
            value = row[0][j]
            if isinstance(value, bytes):
                size += _BYTES_VALUE_BYTES + len(value)
        return size

    def _read_blocking(self, reader: feast_store.RowReader, keys: list[str]) -> list[Prepared]:
        return [self._prepare(row) for row in reader(keys)]

    def _prepare(self, row: Row) -> Prepared:
        if row is None:
            return self._unknown
        values: list[Any] = []
        defaulted: list[int] = []
        for j, (slot, default, is_bytes) in enumerate(self._feast_plan):
            value = row[slot]
            if value is None:
                defaulted.append(j)
                values.append(default)
            elif is_bytes and isinstance(value, str):
                values.append(value.encode())
            else:
                values.append(value)
        return tuple(values), tuple(defaulted)

    # -- request fields and tensors -------------------------------------------------------

    def provided_inputs(self) -> frozenset[str]:
        """Every entry of ``inputs`` (``layout: columns``), or the one ``matrix_input``."""
        if self.config.layout == "matrix":
            return frozenset([self.config.matrix_input])
        return frozenset(spec.name for spec in self.config.inputs)

    def request_inputs(self) -> list[TensorSpec]:
        """The entity key and the ``source: request`` inputs, one value per row each."""
        key = TensorSpec(self.config.entity.field, "BYTES", (-1,))
        return [key, *(TensorSpec(s.name, s.datatype, (-1,)) for s in self._request_specs)]

    def _refuse_unknown(self, fields: Mapping[str, npt.NDArray[Any]]) -> None:
        name = next(n for n in fields if n not in self._accepted)
        sent = ", ".join(sorted(self._accepted))
        if any(spec.name == name for spec in self._feast_inputs):
            raise InvalidInput(
                f"field {name!r} comes from the feature store; the request must not send it",
                hint=f"the request's fields are: {sent}",
            )
        raise InvalidInput(f"unknown field {name!r}", hint=f"the request's fields are: {sent}")

    def _entity_keys(self, fields: Mapping[str, npt.NDArray[Any]]) -> list[str]:
        name = self.config.entity.field
        column = fields.get(name)
        # The hints name both protocols: fetch gets the decoded columns, not which protocol
        # carried them (a V2 INT64 tensor and V1 numbers decode alike).
        if column is None:
            raise InvalidInput(
                f"missing field {name!r} (the entity key for the feature store)",
                hint=f"send {name!r}, one string key per row: a BYTES input (V2) or a string "
                "field of every instance (V1)",
            )
        column = _one_per_row(name, column)
        # Every key's length is checked before any is looked up, cached or read: an
        # over-long one is a client's mistake (or an attack on the cache's memory), never
        # something to send the store.
        limit = self._max_key_bytes
        if column.dtype.kind == "U":
            keys = [str(v) for v in column.tolist()]
            # At most 4 bytes a character: no key is longer in UTF-8 than the array's width.
            if column.dtype.itemsize > limit:
                self._check_key_lengths(keys)
            return keys
        if column.dtype.kind in "OS":
            keys = []
            short = limit // 4  # a key of no more characters fits, whatever they are
            for value in column.tolist():
                if isinstance(value, bytes):
                    if len(value) > limit:  # before decoding it
                        self._refuse_long_key(len(keys), len(value))
                    try:
                        value = value.decode()
                    except UnicodeDecodeError:
                        raise InvalidInput(f"field {name!r}: keys must be UTF-8 text") from None
                elif not isinstance(value, str):
                    raise InvalidInput(f"field {name!r}: expected a string key per row")
                elif len(value) > short and _utf8_len(value) > limit:
                    self._refuse_long_key(len(keys), _utf8_len(value))
                keys.append(value)
            return keys
        raise InvalidInput(
            f"field {name!r}: expected string keys, got numbers or booleans",
            hint=f"send {name!r} as text: a BYTES input (V2, datatype BYTES) or a string field "
            'of every instance (V1, in quotes: "42", not 42)',
        )

    def _check_key_lengths(self, keys: list[str]) -> None:
        """Refuse the first key longer than ``max_entity_key_bytes`` in UTF-8."""
        limit = self._max_key_bytes
        for row, key in enumerate(keys):
            if len(key) > limit // 4 and _utf8_len(key) > limit:
                self._refuse_long_key(row, _utf8_len(key))

    def _refuse_long_key(self, row: int, length: int) -> NoReturn:
        name, limit = self.config.entity.field, self._max_key_bytes
        raise InvalidInput(
            f"field {name!r}: the entity key of row {row} is {length} bytes long, more than "
            f"max_entity_key_bytes ({limit})",
            hint=f"send the entity's id (a card or customer id), not data; the operator may "
            f"raise {self.context.path}.max_entity_key_bytes",
        )

    def _request_columns(self, fields: Mapping[str, npt.NDArray[Any]], rows: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in self._request_specs:
            column = fields.get(spec.name)
            if column is None and spec.default is not None:
                value = spec.default
                fill = np.empty(rows, dtype=object) if spec.datatype == "BYTES" else None
                if fill is not None:
                    fill[:] = value
                    out[spec.name] = fill
                else:
                    out[spec.name] = np.full(rows, value, dtype=V2_TO_NUMPY[spec.datatype])
                continue
            if column is None:
                raise InvalidInput(
                    f"missing field {spec.name!r}",
                    hint="send every required request field of the model: "
                    + ", ".join(s.name for s in self._request_specs if s.default is None),
                )
            column = _one_per_row(spec.name, column)
            if len(column) != rows:
                raise InvalidInput(
                    f"field {spec.name!r} has {len(column)} rows but "
                    f"{self.config.entity.field!r} has {rows}"
                )
            coerced = coerce(spec.name, column, spec.datatype)
            if spec.datatype != "BYTES":
                _check_range(spec.name, coerced, spec.min, spec.max)
            out[spec.name] = coerced
        return out

    def _assemble(
        self,
        keys: Sequence[str],
        found: Mapping[str, Prepared],
        request_columns: dict[str, Any],
        counted_rows: AbstractSet[int] = _NO_ROWS,
    ) -> Tensors:
        """The model's inputs for ``keys``; the defaults of the rows not in ``counted_rows``
        (counted by the group's fetch before: :meth:`_keep_counts`) are counted."""
        rows = len(keys)
        if rows == 1 and self.config.layout == "columns":
            # One transaction, the common request: each tensor in one step.
            values, defaulted = found[keys[0]]
            if not counted_rows:
                for j in defaulted:
                    self._m_defaults[j].inc()
            return {
                name: request_columns[name].reshape(1, 1)
                if j < 0
                else np.array([[values[j]]], dtype=dtype)
                for name, j, dtype in self._plan
            }
        prepared = [found[key] for key in keys]
        counts = [0] * len(self._feast_inputs)
        for i, (_, defaulted) in enumerate(prepared):
            if i in counted_rows:
                continue
            for j in defaulted:
                counts[j] += 1
        for j, count in enumerate(counts):
            if count:
                self._m_defaults[j].inc(count)
        columns: list[npt.NDArray[Any]] = [
            request_columns[name]
            if j < 0
            else np.array([p[0][j] for p in prepared], dtype=dtype).reshape(rows)
            for name, j, dtype in self._plan
        ]
        if self.config.layout == "matrix":
            matrix = np.empty((rows, len(columns)), dtype=np.float32)
            for j, column in enumerate(columns):
                matrix[:, j] = column
            return {self.config.matrix_input: matrix}
        return {
            name: column.reshape(rows, 1)
            for (name, _, _), column in zip(self._plan, columns, strict=True)
        }


# A few values (one field of one transaction, say): Python compares them faster than numpy
# starts its reductions.
_FEW = 8


def _check_range(name: str, value: npt.NDArray[Any], low: float | None, high: float | None) -> None:
    """Request values must be finite and inside the recipe's bounds (a 400 otherwise)."""
    if value.dtype.kind == "f" and value.size <= _FEW:
        values = value.ravel().tolist()
        if not all(map(math.isfinite, values)):
            raise InvalidInput(f"field {name!r}: values must be finite numbers")
        if low is not None and any(v < _bound(value.dtype, low) for v in values):
            raise InvalidInput(
                f"field {name!r}: values must be at least {low:g}", hint="fix the value"
            )
        if high is not None and any(v > _bound(value.dtype, high) for v in values):
            raise InvalidInput(
                f"field {name!r}: values must be at most {high:g}", hint="fix the value"
            )
        return
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise InvalidInput(f"field {name!r}: values must be finite numbers")
    if low is not None and np.any(value < low):
        raise InvalidInput(f"field {name!r}: values must be at least {low:g}", hint="fix the value")
    if high is not None and np.any(value > high):
        raise InvalidInput(f"field {name!r}: values must be at most {high:g}", hint="fix the value")


@functools.lru_cache(maxsize=256)
def _bound(dtype: np.dtype[Any], bound: float) -> float:
    """``bound`` as numpy compares it with an array of ``dtype``: rounded to float32 for a
    float32 array where it fits (numpy 1's value-based casting), so the Python comparison
    of the array's values gives numpy's answer exactly."""
    common = np.result_type(dtype, bound)
    return float(common.type(bound))


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def row_nbytes_estimate(values: int) -> int:
    """About what a cached row of ``values`` numeric feast values holds (BYTES values add
    their lengths: :meth:`FeastFeatureSource._row_nbytes`). Counted by the cache's
    ``cache_max_bytes``; ``benchmarks/bench_cache.py`` measures it."""
    return _ROW_BYTES + _VALUE_BYTES * values


def _one_per_row(name: str, column: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if column.ndim == 2 and column.shape[1] == 1:
        return column.reshape(-1)
    if column.ndim != 1:
        raise InvalidInput(
            f"field {name!r}: expected one value per row, got shape {list(column.shape)}"
        )
    return column


async def _in_daemon_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread of its own: unlike an executor's threads,
    which the interpreter joins at exit, it never holds up the process's end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def work() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="infercore-feast-materialize", daemon=True).start()
    return await future
