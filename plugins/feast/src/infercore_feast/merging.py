"""Merging concurrent lookups into one read: collect keys briefly, read once, fan out."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class ReadFailed(Exception):
    """A merged read failed; every request waiting on one of its keys sees this.

    Attributes:
        reason: ``timeout``, ``error`` or ``cancelled`` (the label of the failures counter).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReadMerger(Generic[V]):
    """Turns many concurrent single-key lookups into few multi-key reads.

    :meth:`submit` returns a future for one key. With no read in flight, a batch is read at
    once: in the next turn of the event loop, with the keys submitted in this one. While a
    read is in flight, the first key of a new batch starts a timer of ``window_s``, and the
    batch is read when the timer fires, when every read in flight has ended, or when it holds
    ``max_keys`` keys, whichever comes first. So a lone lookup never waits for the window,
    and under load the keys that arrive during one read go together in the next. A key
    already waiting (in the open batch or in a read in flight) is not added again: its
    callers share one future, so every key is read at most once at a time. With
    ``max_in_flight``, a batch that is due while that many reads are in flight waits for one
    of them to end (oldest first), and the keys that arrive meanwhile gather with no timer.
    ``read`` gets the keys and must return one value per key, in order; if it raises, every
    future of the batch gets :class:`ReadFailed` (its ``reason`` taken from a ``ReadFailed``
    raised by ``read``, else ``error``).

    Futures are shared: a caller must wait on them with :func:`asyncio.wait` (which does not
    cancel them), never cancel them itself. Event-loop only.
    """

    def __init__(
        self,
        read: Callable[[list[str]], Awaitable[Sequence[V]]],
        *,
        window_s: float,
        max_keys: int,
        max_in_flight: int | None = None,
    ) -> None:
        self._read = read
        self.window_s = window_s
        self.max_keys = max_keys
        self.max_in_flight = max_in_flight
        self._waiting: dict[str, asyncio.Future[V]] = {}
        self._batch: list[str] = []
        # Batches due (full, or their window over) but waiting for a read slot, oldest first.
        self._due: deque[list[str]] = deque()
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        """Keys waiting for a value (in the open batch or in reads in flight)."""
        return len(self._waiting)

    def submit(self, key: str) -> asyncio.Future[V]:
        """A future for ``key``'s value, shared with every other caller waiting on it."""
        fut = self._waiting.get(key)
        if fut is not None:
            return fut
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._closed:
            fut.set_exception(ReadFailed("cancelled"))
            fut.exception()  # retrieved: nobody may wait for it
            return fut
        self._waiting[key] = fut
        self._batch.append(key)
        if len(self._batch) >= self.max_keys:
            self._flush()
        elif self._timer is None and not self._at_limit():
            if self._in_flight and self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self._flush)
            else:
                # Nothing to wait for: still merge whatever arrives in this turn of the loop.
                self._timer = loop.call_soon(self._flush)
        return fut

    def _at_limit(self) -> bool:
        return self.max_in_flight is not None and self._in_flight >= self.max_in_flight

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, self._batch = self._batch, []
        if not keys:
            return
        if self._at_limit():
            # No slot: the batch waits for the end of a read (new keys gather meanwhile, so
            # the next reads are larger, and cheaper per key).
            self._due.append(keys)
            return
        self._start(keys)

    def _start(self, keys: list[str]) -> None:
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(keys))
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._closed:
            return
        if self._due:
            self._start(self._due.popleft())
        # The window waits only for reads in flight: with none left, read what gathered. A
        # batch without a timer was waiting for this slot.
        elif self._batch and (not self._in_flight or self._timer is None):
            self._flush()

    async def _run(self, keys: list[str]) -> None:
        try:
            values = await self._read(keys)
            if len(values) != len(keys):
                raise ReadFailed("error")
        except asyncio.CancelledError:
            self._fail(keys, ReadFailed("cancelled"))
            raise
        except ReadFailed as exc:
            self._fail(keys, exc)
            return
        except Exception:
            self._fail(keys, ReadFailed("error"))
            return
        for key, value in zip(keys, values, strict=True):
            fut = self._waiting.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(value)

    def _fail(self, keys: list[str], exc: ReadFailed) -> None:
        for key in keys:
            fut = self._waiting.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_exception(ReadFailed(exc.reason))
                # Mark it retrieved: a caller that gave up at its deadline never will, and
                # asyncio would log "exception was never retrieved" for each such future.
                fut.exception()

    async def close(self) -> None:
        """Fail the open batch and cancel reads in flight (their callers see ``cancelled``)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, self._batch = self._batch, []
        while self._due:
            keys.extend(self._due.popleft())
        self._fail(keys, ReadFailed("cancelled"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
