"""Structured logs: text for people, JSON lines for collectors; a request id where known."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO

_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.levelno >= logging.DEBUG:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


#: C0 and C1 controls, DEL and the Unicode line and paragraph separators. In a text log line
#: any of them lets a client-controlled string (a path, a model name, a header) end the line and
#: start a forged one (CR, LF), or drive the operator's terminal (ESC): CWE-117.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: The same but for LF and tab, which a traceback's own layout uses.
_TRACEBACK_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with its control characters written as Python escapes (``\\n``, ``\\x1b``), so
    that it stays on one line."""
    return _CONTROL.sub(_escape_control, text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message key=value …``, one line per record, then the
    traceback when there is one.

    The line (message, arguments and extras) has its control characters escaped, so that
    whatever a client sent (a path, a model name, a header) stays on it. A traceback keeps the
    line breaks and tabs of its layout (it must stay readable), and only those.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return escape_controls(line)

    def formatException(self, ei: Any) -> str:
        # Its own lines stay lines; a CR or an ESC sequence in an exception's text cannot
        # overwrite what the terminal shows.
        text = super().formatException(ei)
        return _TRACEBACK_CONTROL.sub(_escape_control, text)


class FailureLog:
    """Warnings about failed requests, at most one line per key and interval.

    Under overload a server answers thousands of 503s a second; a log line for each would
    cost the core more than the rejection itself and bury everything else in the log. The
    first failure of a key (model, reason) is logged at once; the ones after it within
    ``interval_s`` go to DEBUG only, and the next line logged for that key says how many
    there were. Every failure is counted in the metrics whatever is logged.

    Args:
        logger: Where the lines go.
        interval_s: Shortest time between two WARNING lines of one key.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        #: key -> (time of the next line allowed, failures not logged since the last line)
        self._state: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, key: tuple[str, str], msg: str, *args: Any, extra: dict[str, Any]) -> None:
        self.log(logging.WARNING, key, msg, *args, extra=extra)

    def log(
        self,
        level: int,
        key: tuple[str, str],
        msg: str,
        *args: Any,
        extra: dict[str, Any],
        exc_info: bool = False,
    ) -> None:
        """Log at ``level`` unless ``key`` was logged less than ``interval_s`` ago (DEBUG then)."""
        now = self._clock()
        due, held = self._state.get(key, (0.0, 0))
        if now < due:
            self._state[key] = (due, held + 1)
            self._log.debug(msg, *args, extra=extra, exc_info=exc_info)
            return
        self._state[key] = (now + self._interval_s, 0)
        if held:
            msg += " (and %d more like it in the last %.0f s, logged at DEBUG)"
            args = (*args, held, self._interval_s)
        self._log.log(level, msg, *args, extra=extra, exc_info=exc_info)


#: What uvicorn logs at WARNING for one request a client sent: the request is answered (a 400
#: counted in the metrics, or uvicorn's own 503 past ``limit_concurrency``), and a client
#: sending them in a loop would fill the log.
CLIENT_WARNINGS = frozenset(
    {
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "Exceeded concurrency limit.",
    }
)


class ClientWarningLimit(logging.Filter):
    """On uvicorn's logger: each of :data:`CLIENT_WARNINGS` at most once per ``interval_s``,
    as :class:`FailureLog` limits infercore's own failure lines; the next line logged says how
    many were left out since the one before (none is logged for those left out last, once
    the client stops). Other records pass untouched.

    Args:
        interval_s: Shortest time between two lines of one message.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        #: message -> (time of the next line allowed, lines left out since the last one)
        self._state: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str) or msg not in CLIENT_WARNINGS:
            return True
        now = self._clock()
        due, held = self._state.get(msg, (0.0, 0))
        if now < due:
            self._state[msg] = (due, held + 1)
            return False
        self._state[msg] = (now + self._interval_s, 0)
        if held:
            record.msg = f"{msg} (and %d more like it since the last such line, left out)"
            record.args = (held,)
        return True


#: The logger Python warnings go to (the name ``logging.captureWarnings`` uses).
WARNINGS_LOGGER = "py.warnings"
_warnings_log = logging.getLogger(WARNINGS_LOGGER)


def configure(level: str = "info", fmt: str = "text", stream: str = "stderr") -> None:
    """Route infercore's (and uvicorn's) logs, and Python warnings, to stderr (or stdout) in
    the chosen format."""
    handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("infercore", "uvicorn", "uvicorn.error", WARNINGS_LOGGER):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # uvicorn logs a WARNING per malformed request (and per upgrade it cannot serve): a client
    # sending them in a loop would flood the log. At most one line per message every 10 s.
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientWarningLimit) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(ClientWarningLimit())
    # A warning a library emits (a DeprecationWarning, say) is otherwise printed raw on stderr:
    # two lines, one of them an absolute file path, in the middle of JSON lines (S6).
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` that logs one WARNING line naming the module, not the file.

    Not ``logging.captureWarnings``: it logs ``warnings.formatwarning``'s text, which is the
    file's absolute path and the source line, on two lines.
    """
    if file is not None:
        # Asked for in a file of the caller's own: the standard rendering there.
        with contextlib.suppress(OSError):
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    _warnings_log.warning(
        "%s: %s",
        category.__name__,
        message,
        extra={"source": f"{module_name(filename)}:{lineno}"},
    )


def module_name(filename: str) -> str:
    """The dotted module name of ``filename`` when it is under ``sys.path``, else its stem
    (``<string>`` and the like as they are).

    Warnings and event-loop stalls (:mod:`infercore.server.loopwatch`) are rare: the search
    costs nothing that matters.
    """
    if filename.startswith("<"):
        return filename
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if filename.startswith(root) and len(root) > len(best):
            best = root
    rel = filename[len(best) :] if best else os.path.basename(filename)
    stem = os.path.splitext(rel)[0]
    if stem.endswith(f"{os.sep}__init__"):
        stem = stem[: -len("__init__") - 1]
    return stem.replace(os.sep, ".")
