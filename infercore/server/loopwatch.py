"""A watchdog that says when something blocks the event loop, and names the code that does.

A plugin whose ``async def predict`` (or ``fetch``, ``start``, an action's ``run`` …) does
blocking work on the event loop stalls every request and the liveness probe, and nothing in
the request path can tell why. :class:`LoopWatch` tells: on by default, in every worker, at
the cost of one timer callback on the loop every 100 ms.

* The loop runs a heartbeat (``loop.call_later``) that writes when the next one is due.
* A daemon thread sleeps until the pending heartbeat is ``threshold`` late (its wake-ups
  follow the heartbeat, so a healthy loop costs it about one wake-up per threshold). If the
  loop still has not run it, the loop is blocked: the thread takes the loop thread's stack
  (``sys._current_frames()``), counts the stall, and logs **one** WARNING that names the
  blocking code and how long the loop has been blocked so far.
* When the loop runs again the heartbeat, late, records by how much: the thread logs the
  stall's total at INFO and observes it in a histogram. A stall the thread could not see
  while it lasted (the blocking code held the GIL, so the thread could not run) is still
  found this way, and logged as a WARNING without a name. One the thread saw late (it got
  the GIL only once the blocking call returned) is named with that said: the loop may have
  moved on past the code to blame.

Which code is named: of the loop thread's frames inside the running callback (the frames
called by asyncio's or uvloop's own), the innermost one in a registered plugin's package; else
in a module that is not installed (the application's own, a test's); else in an installed
library; else anywhere (infercore's own code: then without the advice meant for plugins).
Frames are shown as ``module:line qualname``: module names, never file paths (RELIABILITY S6).

Each blocking place is logged at WARNING at most once per :data:`REPEAT_S` (a plugin that
blocks on every request would otherwise log twice a second for as long as it serves); the
repeats go to DEBUG and the next WARNING says how many there were. Every stall is counted.

A blocked loop is measured from when the heartbeat was due: it may have begun up to one
heartbeat interval earlier, so durations are lower bounds and a block shorter than the
threshold plus that interval may go unreported.

infercore's own start-up work that must run on the loop and may take long (``freeze_heap``:
a full collection, then ``gc.freeze``, 60-240 ms with the shipped recipes, more with a larger
heap) runs through :func:`unwatched`: the watchdog is paused around it, so it is neither
counted nor logged as a stall (one DEBUG line, or INFO past the threshold, says how long it
held the loop). Only synchronous work can be excused this way, so nothing else (a plugin's
``start()``, a request) runs while the watchdog looks away: a plugin's blocking at start-up
is seen as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import site
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from infercore.server.logs import module_name

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from infercore.registry import Registry

log = logging.getLogger("infercore.server.loop")

P = ParamSpec("P")
T = TypeVar("T")

#: The heartbeat's period: at most this, and at most a fifth of the threshold, so that a
#: block is measured within a fifth of the threshold.
MAX_INTERVAL_S = 0.1
#: ... and at least this (a tiny threshold must not turn the heartbeat into a busy loop).
MIN_INTERVAL_S = 0.01
#: Shortest time between two WARNING lines about one blocking place.
REPEAT_S = 10.0
#: The thread looked this late (or half the threshold, if more), and says so: see _say.
LATE_LOOK_S = 0.05
#: How long :meth:`LoopWatch.stop` waits for the thread.
JOIN_S = 2.0

#: Frames of these packages run the loop itself: the running callback's frames are the ones
#: inside the first of them (asyncio's coroutines, ``wait_for`` …, may be in the callback).
_LOOP_MODULES = frozenset({"asyncio.events", "asyncio.base_events", "asyncio.runners"})
_LOOP_PACKAGES = frozenset({"uvloop"})
#: The server around a request: its frames are never the one to blame while a plugin's or the
#: application's own frame is on the stack.
_SERVING = frozenset(
    {
        "infercore",
        "uvicorn",
        "uvloop",
        "litestar",
        "starlette",
        "anyio",
        "httptools",
        "h11",
        "sniffio",
        "msgspec",
        "pluggy",
        "pytest",
        "_pytest",
    }
)
#: Frames shown in a stack excerpt, at most.
_SHOWN = 4
#: Frames looked at, at most (a deep recursion is cut).
_DEPTH = 200

# Culprit preference, best first.
_PLUGIN, _USER, _LIBRARY, _SERVER, _STDLIB = range(5)


def _installed_prefixes() -> tuple[str, ...]:
    """The folders installed distributions live in (site-packages and the like)."""
    paths = {sysconfig.get_paths().get(k, "") for k in ("purelib", "platlib")}
    paths.update(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str):
        paths.add(user)
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths if p)


_INSTALLED = _installed_prefixes()


def plugin_modules(registry: Registry) -> dict[str, str]:
    """Top-level packages of the registered plugins' code, each with its plugin's name.

    A component class's package stands for its plugin's code (``infercore_onnx`` for
    ``infercore_onnx.model.OnnxModel``). infercore's own built-in plugins are left out: a
    built-in batcher's frame is the caller of every ``predict``, never the one to blame
    before it (a built-in that blocks is still named, as infercore's innermost frame).
    """
    from infercore.registry import KINDS

    found: dict[str, str] = {}

    def add(module: str, plugin: str) -> None:
        top = module.partition(".")[0]
        if top != "infercore":
            found.setdefault(top, plugin)

    for spec in KINDS:
        for reg in registry.kinds(spec.role).values():
            add(reg.cls.__module__, reg.plugin)
    for name, plugin in registry.pm.list_name_plugin():
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        if isinstance(module, str):
            add(module, name)
    return found


@dataclass(frozen=True, slots=True)
class BlockingCode:
    """Where the loop thread was: the frame to blame and a short excerpt of its stack."""

    #: ``module:line qualname`` of the frame to blame.
    culprit: str
    #: Its caller, the culprit, then what it called down to the innermost frame (a few,
    #: outermost first, ``>``-separated).
    stack: str
    #: The plugin whose module holds the culprit, when one does.
    plugin: str | None = None
    #: No plugin's, application's or library's frame is on the stack: infercore's own code
    #: (or the server's) blocks, which the advice to plugin authors does not fit.
    ours: bool = False


def _module_of(frame: FrameType) -> tuple[str, str]:
    """The frame's module name as imported (``__main__`` too), and as shown (a script by its
    file's module name)."""
    name = frame.f_globals.get("__name__")
    if not isinstance(name, str) or not name:
        shown = module_name(frame.f_code.co_filename)
        return shown, shown
    return name, module_name(frame.f_code.co_filename) if name == "__main__" else name


def _where(frame: FrameType, module: str) -> str:
    return f"{module}:{frame.f_lineno} {frame.f_code.co_qualname}"


def blocking_code(
    frame: FrameType | None, plugins: Mapping[str, str] | None = None
) -> BlockingCode | None:
    """The code to blame in the stack whose innermost frame is ``frame`` (``None``: none).

    Args:
        frame: The loop thread's current frame.
        plugins: Top-level packages of plugin code and their plugin names
            (:func:`plugin_modules`).
    """
    plugins = plugins or {}
    # Innermost first, down to the loop's own frames.
    frames: list[tuple[FrameType, str, int, str | None]] = []
    depth = 0
    while frame is not None and depth < _DEPTH:
        imported, module = _module_of(frame)
        top = module.partition(".")[0]
        if frames and (module in _LOOP_MODULES or top in _LOOP_PACKAGES):
            break
        plugin = plugins.get(imported.partition(".")[0])
        frames.append((frame, module, _rank(frame, module, top, plugin), plugin))
        frame = frame.f_back
        depth += 1
    if not frames:
        return None
    best = min(rank for _, _, rank, _ in frames)
    at = next(i for i, (_, _, rank, _) in enumerate(frames) if rank == best)
    culprit_frame, culprit_module, _, plugin = frames[at]
    # Its caller (which role called it: a batcher, a feature fetch …), the culprit, then what
    # it called: frames of the standard library only as the innermost (``ssl:… recv_into``
    # says what it waits for). At most _SHOWN, the innermost kept.
    callees = [f for f in reversed(frames[:at]) if f[2] != _STDLIB]
    if at > 0 and frames[0][2] == _STDLIB:
        callees.append(frames[0])
    chain = [f[:2] for f in frames[at + 1 : at + 2]]
    chain += [(culprit_frame, culprit_module), *(f[:2] for f in callees)]
    shown = [_where(f, m) for f, m in chain]
    if len(shown) > _SHOWN:
        shown = [*shown[: _SHOWN - 2], "…", shown[-1]]
    return BlockingCode(
        _where(culprit_frame, culprit_module), " > ".join(shown), plugin, ours=best >= _SERVER
    )


def _rank(frame: FrameType, module: str, top: str, plugin: str | None) -> int:
    if plugin is not None:
        return _PLUGIN
    if top in sys.stdlib_module_names or module.startswith("<"):
        return _STDLIB
    if top in _SERVING:
        return _SERVER
    filename = os.path.realpath(frame.f_code.co_filename)
    return _LIBRARY if filename.startswith(_INSTALLED) else _USER


@dataclass(slots=True)
class _Stall:
    #: The heartbeat the loop could not run (its due time).
    due: float
    code: BlockingCode | None
    #: The level of its lines: WARNING, or DEBUG for a repeat (``REPEAT_S``).
    level: int
    #: Repeats of its place logged at DEBUG since the last WARNING about it.
    held: int
    #: How much later than due the thread could look (it needs the GIL to run).
    looked_late: float = 0.0
    #: Its WARNING was logged while it lasted.
    warned: bool = False


class LoopWatch:
    """Warns when the event loop it runs on is blocked for longer than ``threshold_s``.

    :meth:`start` on the loop, :meth:`stop` on the same loop (the app's lifespan does both).

    Args:
        threshold_s: How long the loop may be blocked before a warning (over 0).
        stalls: Counted once per stall, when it is found (so a worker stuck for good shows in
            the totals the other workers serve).
        stall_seconds: Each stall's duration, observed when it ends.
        plugins: Top-level packages of plugin code (:func:`plugin_modules`), preferred when
            the blocking code is named.
        repeat_s: Shortest time between two WARNING lines about one blocking place.
        logger: Where the lines go.
    """

    def __init__(
        self,
        threshold_s: float,
        *,
        stalls: Counter | None = None,
        stall_seconds: Histogram | None = None,
        plugins: Mapping[str, str] | None = None,
        repeat_s: float = REPEAT_S,
        logger: logging.Logger = log,
    ) -> None:
        if not threshold_s > 0:
            raise ValueError(f"threshold_s must be over 0, got {threshold_s!r}")
        self.threshold_s = threshold_s
        self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, threshold_s / 5))
        self._stalls = stalls
        self._stall_seconds = stall_seconds
        self._plugins = dict(plugins or {})
        self._repeat_s = repeat_s
        self._log = logger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        #: When the pending heartbeat is due (``time.monotonic``); written by the loop only.
        self._due = 0.0
        #: How late each heartbeat that ran over ``threshold_s`` late was: appended by the
        #: loop, taken by the thread (a deque's append and popleft are atomic).
        self._late: deque[float] = deque()
        #: Pauses in force (:meth:`pause`); written by the loop only, read by the thread.
        self._paused = 0
        # The thread's own state.
        self._stall: _Stall | None = None
        self._quiet: dict[str | None, tuple[float, int]] = {}

    # --- on the loop ------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching the running loop; call it on the loop (once)."""
        if self._loop is not None:
            raise RuntimeError("this LoopWatch was started already")
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._due = time.monotonic() + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._beat, loop)
        self._thread = threading.Thread(target=self._watch, name="infercore-loopwatch", daemon=True)
        self._thread.start()
        _STARTED.add(self)

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        # The only work on the loop: a clock read, a comparison and the next timer.
        now = time.monotonic()
        late = now - self._due
        if late > self.threshold_s:
            self._late.append(late)  # before the next due time: see _watch
        self._due = now + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._beat, loop)

    def _cancel_beat(self) -> None:
        """Cancel the pending heartbeat; a stall that has just ended (it did not get to run)
        ends here."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            late = time.monotonic() - self._due
            if late > self.threshold_s:
                self._late.append(late)

    def pause(self) -> None:
        """Stop counting from now until :meth:`resume`; call it on the loop, right before
        synchronous work that is known to hold the loop (:func:`unwatched`). Pauses nest."""
        self._paused += 1
        if self._paused == 1:
            self._cancel_beat()

    def resume(self) -> None:
        """Count again, from now: the time paused is no stall (the heartbeat starts afresh)."""
        if self._paused == 0:
            raise RuntimeError("LoopWatch.resume() without pause()")
        self._paused -= 1
        loop = self._loop
        if self._paused or loop is None or self._stopped.is_set() or self._handle is not None:
            return
        self._due = time.monotonic() + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._beat, loop)

    def stop(self) -> None:
        """Stop the heartbeat and the thread (whatever stall just ended is logged first)."""
        _STARTED.discard(self)
        self._cancel_beat()
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_S)

    # --- on the thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        stopped = self._stopped
        try:
            while True:
                self._take_late()
                loop = self._loop
                if loop is None or loop.is_closed():
                    return  # the loop went without stop(): nothing left to watch
                due = self._due
                if self._stall is None:
                    wait = due + self.threshold_s - time.monotonic()
                    if self._paused and wait <= 0:
                        wait = self.interval_s  # no heartbeat is pending: see resume()
                    if wait > 0:
                        if stopped.wait(wait):
                            return
                        continue
                    self._begin(due)
                elif due != self._stall.due and not self._late:
                    # The heartbeat ran, yet recorded nothing: it was a hair under the
                    # threshold late (the heartbeat writes its lateness before its next due
                    # time, so no record is still to come).
                    self._stall = None
                elif stopped.wait(self.interval_s):
                    return
        except Exception:  # pragma: no cover - a watchdog must not take anything down with it
            self._log.exception("the event loop watchdog stopped")
        finally:
            self._take_late()

    def _begin(self, due: float) -> None:
        """The heartbeat due at ``due`` is over the threshold late: name what blocks."""
        looked_late = time.monotonic() - due - self.threshold_s
        frame = sys._current_frames().get(self._loop_thread)
        if self._paused:
            # Paused since the check in _watch: the loop is in work it was told of, and the
            # frame would blame that. A heartbeat over the threshold late before the pause
            # was recorded by pause() (counted unnamed, as a stall this thread did not see).
            del frame
            return
        try:
            code = blocking_code(frame, self._plugins)
        finally:
            del frame
        level, held = self._level(code.culprit if code is not None else None)
        stall = self._stall = _Stall(due, code, level, held, looked_late)
        if self._stalls is not None:
            self._stalls.inc()
        if self._due != due:
            return  # it ran meanwhile: one line when its lateness is taken
        stall.warned = True
        blocked = time.monotonic() - due
        self._say(level, blocked, code, held, ongoing=True, looked_late=looked_late)

    def _take_late(self) -> None:
        """Log and observe each stall whose heartbeat has run since."""
        while self._late:
            late = self._late.popleft()
            stall, self._stall = self._stall, None
            if self._stall_seconds is not None:
                self._stall_seconds.observe(late)
            if stall is None:
                # Never seen while it lasted: this thread could not run (the blocking code
                # held the GIL throughout) or was not scheduled.
                if self._stalls is not None:
                    self._stalls.inc()
                level, held = self._level(None)
                self._say(level, late, None, held, ongoing=False, unseen=True)
            elif not stall.warned:
                # Found, then over before its line: one line says both.
                self._say(
                    stall.level,
                    late,
                    stall.code,
                    stall.held,
                    ongoing=False,
                    looked_late=stall.looked_late,
                )
            else:
                code = stall.code
                extra: dict[str, Any] = {"blocked_ms": round(late * 1000)}
                if code is not None:
                    extra["culprit"] = code.culprit
                self._log.log(
                    min(stall.level, logging.INFO),
                    "event loop running again after %.2f s blocked%s",
                    late,
                    f" by {code.culprit}" if code is not None else "",
                    extra=extra,
                )

    def _say(
        self,
        level: int,
        blocked: float,
        code: BlockingCode | None,
        held: int,
        *,
        ongoing: bool,
        unseen: bool = False,
        looked_late: float = 0.0,
    ) -> None:
        """One stall's WARNING (or DEBUG, for a repeat): how long, which code, the fix."""
        extra: dict[str, Any] = {"blocked_ms": round(blocked * 1000)}
        if ongoing:
            line, waits = f"event loop blocked for {blocked:.2f} s so far", "waits until it returns"
        else:
            line, waits = f"event loop was blocked for {blocked:.2f} s", "waited"
        if code is None:
            line += " by code that could not be named"
            if unseen:
                line += " (it held the GIL until it returned, or the process was not scheduled)"
        else:
            extra["culprit"] = code.culprit
            plugin = f" (plugin {code.plugin!r})" if code.plugin is not None else ""
            line += f" by {code.culprit}{plugin} (stack: {code.stack})"
            if looked_late > max(LATE_LOOK_S, self.threshold_s / 2):
                # The thread could not run when it meant to: the blocking code held the GIL
                # (it has returned by now) or no CPU was free. Said, not hidden: the frame is
                # often still the right function, at the line after the call.
                line += (
                    f", seen {looked_late:.2f} s late (the blocking code held the GIL, or the "
                    "process was short of CPU: the loop may have moved on past it)"
                )
            line += f"; every request {waits}"
            if not code.ours:
                line += ": run blocking work in a thread (await asyncio.to_thread(...))"
        if held:
            line += (
                f" (and {held} more like it in the last {self._repeat_s:.0f} s, logged at DEBUG)"
            )
        self._log.log(level, "%s", line, extra=extra)

    def _level(self, key: str | None) -> tuple[int, int]:
        """WARNING and how many repeats of ``key`` went to DEBUG since its last WARNING; or
        DEBUG within ``repeat_s`` of that WARNING."""
        now = time.monotonic()
        quiet_until, held = self._quiet.get(key, (0.0, 0))
        if now < quiet_until:
            self._quiet[key] = (quiet_until, held + 1)
            return logging.DEBUG, 0
        self._quiet[key] = (now + self._repeat_s, 0)
        return logging.WARNING, held


#: The watches started and not stopped, in this process (one per worker's loop, as a rule).
_STARTED: set[LoopWatch] = set()


def unwatched(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)``, run now, with the watchdog of the running loop (if any)
    paused around it: infercore's own start-up work that is known to hold the loop
    (``freeze_heap``) is no stall, neither counted nor logged as one. How long it held the
    loop is logged (DEBUG; INFO past the watchdog's threshold, as the loop did not answer).

    ``work`` must be synchronous (a coroutine function is refused): while it runs nothing else
    runs on the loop, so nothing but ``work`` goes unseen. Outside a running loop it just
    runs.
    """
    if inspect.iscoroutinefunction(work):
        raise TypeError(f"unwatched() runs synchronous work, not {work.__qualname__}()")
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return work(*args, **kwargs)
    # A snapshot: other threads' loops (a test client's portal) start and stop theirs.
    watches = [w for w in tuple(_STARTED) if w._loop is loop]
    for watch in watches:
        watch.pause()
    begun = time.monotonic()
    try:
        return work(*args, **kwargs)
    finally:
        held = time.monotonic() - begun
        for watch in watches:
            watch.resume()
        if watches:
            over = held > min(w.threshold_s for w in watches)
            log.log(
                logging.INFO if over else logging.DEBUG,
                "%s held the event loop for %.2f s (infercore's own start-up work: not counted "
                "as a stall)",
                getattr(work, "__qualname__", repr(work)),
                held,
                extra={"blocked_ms": round(held * 1000)},
            )


def watch_loop(
    threshold_ms: int,
    *,
    stalls: Counter | None = None,
    stall_seconds: Histogram | None = None,
    plugins: Mapping[str, str] | None = None,
) -> LoopWatch | None:
    """A started :class:`LoopWatch` on the running loop, or ``None`` when ``threshold_ms``
    is 0 (``server.loop_block_warn_ms=0``: off)."""
    if threshold_ms <= 0:
        return None
    watch = LoopWatch(
        threshold_ms / 1000,
        stalls=stalls,
        stall_seconds=stall_seconds,
        plugins=plugins,
    )
    watch.start()
    return watch
