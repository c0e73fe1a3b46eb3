"""A consecutive-failure circuit breaker with a single half-open probe."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Stops calling a failing dependency, then lets one probe through to see if it is back.

    ``failures`` consecutive failed calls open the breaker: :meth:`allow` answers ``False``
    for ``reset_s`` seconds. After that the breaker is half-open: calls are allowed until one
    is dispatched (:meth:`on_dispatch`); that probe's outcome closes the breaker or opens it
    for another ``reset_s``. Event-loop only (not thread-safe).

    Attributes:
        clock: Monotonic seconds; tests may replace it.
        on_change: Called with the new state whenever it changes (for a gauge).
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.clock = clock
        self.on_change = on_change
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open breaker past its reset time reads
        ``half_open``)."""
        if self._state == OPEN and self.clock() - self._opened_at >= self.reset_s:
            self._set(HALF_OPEN)
            self._probe_in_flight = False
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the dependency now."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            return not self._probe_in_flight
        return False

    def on_dispatch(self) -> None:
        """A call is about to be made; in the half-open state it becomes the probe."""
        if self.state == HALF_OPEN:
            self._probe_in_flight = True

    def record_success(self) -> None:
        self._consecutive = 0
        self._probe_in_flight = False
        if self._state != CLOSED:
            self._set(CLOSED)

    def record_failure(self) -> None:
        self._consecutive += 1
        self._probe_in_flight = False
        if self._state == HALF_OPEN or (
            self._state == CLOSED and self._consecutive >= self.failures
        ):
            self._opened_at = self.clock()
            self._set(OPEN)

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
