"""FailureLog: at most one WARNING per key and interval, the rest counted into the next line."""

from __future__ import annotations

import logging

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
