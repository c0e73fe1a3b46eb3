"""FailureLog: at most one WARNING per key and interval, the rest counted into the next line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from infercore.server.logs import FailureLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_one_warning_per_key_and_interval_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    flog = FailureLog(logging.getLogger("test.failures"), interval_s=10.0, clock=clock)
    key = ("fraud", "queue_full")
    with caplog.at_level(logging.DEBUG, logger="test.failures"):
        for i in range(5):
            flog.warning(key, "request failed: %s", f"full {i}", extra={"n": i})
        assert warnings(caplog) == ["request failed: full 0"]
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert [r.getMessage() for r in debug] == [
            f"request failed: full {i}" for i in (1, 2, 3, 4)
        ]
        assert [r.n for r in debug] == [1, 2, 3, 4]  # type: ignore[attr-defined]
        clock.t += 9.9
        flog.warning(key, "request failed: %s", "full 5", extra={})
        assert len(warnings(caplog)) == 1  # still within the interval
        clock.t += 0.1
        flog.warning(key, "request failed: %s", "full 6", extra={})
        assert warnings(caplog)[-1] == (
            "request failed: full 6 (and 5 more like it in the last 10 s, logged at DEBUG)"
        )
        clock.t += 10.0
        flog.warning(key, "request failed: %s", "full 7", extra={})
        assert warnings(caplog)[-1] == "request failed: full 7"  # nothing held since the last


def test_keys_are_limited_apart(caplog: pytest.LogCaptureFixture) -> None:
    flog = FailureLog(logging.getLogger("test.failures"), interval_s=10.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.failures"):
        flog.warning(("a", "queue_full"), "a full", extra={})
        flog.warning(("a", "deadline_exceeded"), "a late", extra={})
        flog.warning(("b", "queue_full"), "b full", extra={})
        flog.warning(("a", "queue_full"), "a full again", extra={})
    assert warnings(caplog) == ["a full", "a late", "b full"]


# -- uvicorn's per-request warnings ---------------------------------------------------------


def test_uvicorn_s_client_warnings_are_one_line_per_interval_then_the_count() -> None:
    from infercore.server.logs import ClientWarningLimit

    clock = Clock()
    lines: list[str] = []
    logger = logging.getLogger("test.uvicorn.error")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    limit = ClientWarningLimit(interval_s=10.0, clock=clock)
    logger.addFilter(limit)
    try:
        for _ in range(5):
            logger.warning("Invalid HTTP request received.")
        logger.warning("Unsupported upgrade request.")  # a message of its own
        logger.warning("Invalid HTTP request: %s", "other")  # not one of uvicorn's: untouched
        logger.warning("Invalid HTTP request: %s", "other")
        clock.t += 10.0
        logger.warning("Invalid HTTP request received.")
        logger.warning("Invalid HTTP request received.")
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)
    assert lines == [
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "Invalid HTTP request: other",
        "Invalid HTTP request: other",
        "Invalid HTTP request received. (and 4 more like it since the last such line, left out)",
    ]


# -- the count of the lines held back last ----------------------------------------------------


class Timers:
    """A ``schedule`` that keeps what it is given; the test runs it when it likes."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.pending.append((delay_s, callback))

    def run(self) -> None:
        pending, self.pending = self.pending, []
        for _, callback in pending:
            callback()


def flood(flog: FailureLog, key: tuple[str, str], n: int) -> None:
    for i in range(n):
        flog.warning(key, "request failed: %s", f"full {i}", extra={"request_id": str(i)})


def test_a_flood_s_last_count_gets_a_line_once_an_interval_passed_without_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, timers = Clock(), Timers()
    flog = FailureLog(
        logging.getLogger("test.failures"), interval_s=10.0, clock=clock, schedule=timers
    )
    key = ("fraud", "queue_full")
    with caplog.at_level(logging.WARNING, logger="test.failures"):
        flood(flog, key, 5)
        clock.t += 3.0
        flood(flog, key, 1)
        # One check for the flood, not one per request: one interval after the next line
        # could have come (at 110), without one.
        assert [delay for delay, _ in timers.pending] == [20.0]
        clock.t += 17.0
        timers.run()
        assert warnings(caplog) == [
            "request failed: full 0",
            "request failed: full 0 (5 more like it since the last such line, logged at DEBUG)",
        ]
        timers.run()
        assert flog.flush() == 0  # told once
        flood(flog, key, 1)  # the next line counts none of them again
        assert warnings(caplog)[-1] == "request failed: full 0"
    assert len(warnings(caplog)) == 3


def test_the_check_tells_nothing_once_the_next_line_told_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, timers = Clock(), Timers()
    flog = FailureLog(
        logging.getLogger("test.failures"), interval_s=10.0, clock=clock, schedule=timers
    )
    key = ("fraud", "queue_full")
    with caplog.at_level(logging.WARNING, logger="test.failures"):
        flood(flog, key, 3)
        clock.t += 10.0
        flood(flog, key, 1)  # the flood goes on: its next line says how many
        timers.run()
    assert warnings(caplog) == [
        "request failed: full 0",
        "request failed: full 0 (and 2 more like it in the last 10 s, logged at DEBUG)",
    ]


def test_flush_tells_each_key_s_count_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    flog = FailureLog(
        logging.getLogger("test.failures"), interval_s=10.0, clock=clock, schedule=Timers()
    )
    with caplog.at_level(logging.DEBUG, logger="test.failures"):
        flood(flog, ("a", "queue_full"), 4)
        flood(flog, ("b", "queue_full"), 1)  # nothing held back
        flog.log(logging.ERROR, ("a", "internal"), "request failed unexpectedly", extra={})
        flog.log(logging.ERROR, ("a", "internal"), "request failed unexpectedly", extra={})
        caplog.clear()
        assert flog.flush() == 2
        told = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert told == [
            (
                logging.WARNING,
                "request failed: full 0 (3 more like it since the last such line, logged at DEBUG)",
            ),
            (
                logging.ERROR,
                "request failed unexpectedly (1 more like it since the last such line, "
                "logged at DEBUG)",
            ),
        ]
        caplog.clear()
        assert flog.flush() == 0
        clock.t += 10.0
        flood(flog, ("a", "queue_full"), 1)
        assert [r.getMessage() for r in caplog.records] == ["request failed: full 0"]


def test_without_a_running_loop_no_check_is_scheduled_and_with_one_it_runs() -> None:
    from infercore.server.logs import call_later

    ran: list[str] = []
    call_later(0.0, lambda: ran.append("without a loop"))

    async def scenario() -> None:
        done = asyncio.Event()
        call_later(0.0, done.set)
        await asyncio.wait_for(done.wait(), timeout=10.0)
        ran.append("with a loop")

    asyncio.run(scenario())
    assert ran == ["with a loop"]


def test_uvicorn_s_warnings_left_out_last_are_counted_by_a_line_of_their_own() -> None:
    from infercore.server.logs import ClientWarningLimit

    clock, timers = Clock(), Timers()
    lines: list[tuple[str, int]] = []
    logger = logging.getLogger("test.uvicorn.error")
    handler = logging.Handler()

    def emit(record: logging.LogRecord) -> None:
        lines.append((record.getMessage(), record.levelno))

    handler.emit = emit  # type: ignore[method-assign]
    logger.addHandler(handler)
    limit = ClientWarningLimit(interval_s=10.0, clock=clock, schedule=timers)
    logger.addFilter(limit)
    try:
        for _ in range(4):
            logger.warning("Invalid HTTP request received.")
        for _ in range(2):
            logger.warning("Unsupported upgrade request.")
        assert [delay for delay, _ in timers.pending] == [20.0, 20.0]
        clock.t += 20.0
        timers.run()  # through the limit itself, which lets the count through
        for _ in range(3):
            logger.warning("Invalid HTTP request received.")
        assert limit.flush() == 1
        assert limit.flush() == 0
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)
    told = " (%d more like it since the last such line, left out)"
    assert lines == [
        ("Invalid HTTP request received.", logging.WARNING),
        ("Unsupported upgrade request.", logging.WARNING),
        ("Invalid HTTP request received." + told % 3, logging.WARNING),
        ("Unsupported upgrade request." + told % 1, logging.WARNING),
        ("Invalid HTTP request received.", logging.WARNING),
        ("Invalid HTTP request received." + told % 2, logging.WARNING),
    ]


def test_flush_held_lines_tells_every_failure_log_and_client_warning_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from infercore.server.logs import ClientWarningLimit, flush_held_lines

    clock = Clock()
    flog = FailureLog(
        logging.getLogger("test.flush.failures"), interval_s=10.0, clock=clock, schedule=Timers()
    )
    limit = ClientWarningLimit(interval_s=10.0, clock=clock, schedule=Timers())
    logger = logging.getLogger("test.flush.uvicorn")
    logger.addFilter(limit)

    def ours() -> list[str]:
        # Other limits alive in the process are flushed too, into their own loggers.
        names = ("test.flush.failures", "test.flush.uvicorn")
        return [r.getMessage() for r in caplog.records if r.name in names]

    try:
        with caplog.at_level(logging.WARNING):
            flood(flog, ("a", "queue_full"), 3)
            for _ in range(3):
                logger.warning("Exceeded concurrency limit.")
            caplog.clear()
            flush_held_lines()
            told = ours()
            caplog.clear()
            flush_held_lines()
            assert ours() == []
    finally:
        logger.removeFilter(limit)
    assert sorted(told) == [
        "Exceeded concurrency limit. (2 more like it since the last such line, left out)",
        "request failed: full 0 (2 more like it since the last such line, logged at DEBUG)",
    ]


def test_the_count_line_keeps_the_last_lines_fields_but_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # JSON logs (server.log_format=json) carry model and reason as fields: the line that tells
    # a count keeps them, so it can be found beside the lines it counts.
    clock = Clock()
    flog = FailureLog(
        logging.getLogger("test.failures"), interval_s=10.0, clock=clock, schedule=Timers()
    )
    fields = {"model": "m", "reason": "queue_full", "request_id": "r1"}
    with caplog.at_level(logging.DEBUG, logger="test.failures"):
        for _ in range(3):
            flog.warning(("m", "queue_full"), "request failed", extra=fields)
        caplog.clear()
        assert flog.flush() == 1
    (record,) = caplog.records
    assert (record.model, record.reason) == ("m", "queue_full")  # type: ignore[attr-defined]
    assert not hasattr(record, "request_id")
