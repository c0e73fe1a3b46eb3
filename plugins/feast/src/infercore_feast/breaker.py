"""A consecutive-failure circuit breaker with a single half-open probe."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Stops calling a failing dependency, then lets one probe through to see if it is back.

    ``failures`` consecutive failed calls, the first of them at least ``failing_s`` seconds
    before the last, open the breaker: :meth:`allow` answers ``False`` until ``reset_s``
    seconds after the first of them. After that the breaker is half-open: calls are allowed
    until one is dispatched (:meth:`on_dispatch`); that probe's outcome closes the breaker or
    opens it for another ``reset_s``. Event-loop only (not thread-safe).

    ``failing_s`` is what keeps a blip from opening it: calls that time out one after another
    fail several times a second, so a count alone is reached by a pause of a few hundred
    milliseconds (a stalled disk, a starved core), and an open breaker turns that into
    ``reset_s`` of refusals. A dependency that is down keeps failing and opens it
    ``failing_s`` on; counting ``reset_s`` from its first failure keeps the first probe where
    a count alone would have put it (``failing_s`` must be less than ``reset_s``).

    Attributes:
        clock: Monotonic seconds; tests may replace it.
        on_change: Called with the new state whenever it changes (for a gauge).
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        failing_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.failing_s = failing_s
        self.clock = clock
        self.on_change = on_change
        self._state = CLOSED
        self._consecutive = 0
        self._first_failure_at = 0.0
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
        now = self.clock()
        if self._consecutive == 0:
            self._first_failure_at = now
        self._consecutive += 1
        self._probe_in_flight = False
        if self._state == HALF_OPEN:  # the probe failed
            self._opened_at = now
            self._set(OPEN)
        elif (
            self._state == CLOSED
            and self._consecutive >= self.failures
            and now - self._first_failure_at >= self.failing_s
        ):
            self._opened_at = self._first_failure_at
            self._set(OPEN)

    @property
    def open_for_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self.clock())

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
