"""The text log keeps one record on one line: control characters a client sent (in a path, a
model name, a header) are escaped, so no client string can start a forged line (CWE-117),
while a traceback keeps its own lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from infercore.server.logs import JsonFormatter, TextFormatter, escape_controls

FORGED = "/admin/x\n15:30:00 INFO    infercore.audit: audit: forged (401)"


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("infercore.test_log_escaping")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.handlers[:] = []


def test_a_forged_line_in_an_argument_stays_on_its_record(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = text_log
    logger.warning("admin: refused %s %s (%d)", "GET", FORGED, 401)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        "admin: refused GET /admin/x\\n15:30:00 INFO    infercore.audit: audit: forged (401) (401)"
    )


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\r", "\\r"),
        ("\n", "\\n"),
        ("\t", "\\t"),
        ("\x00", "\\x00"),
        ("\x1b", "\\x1b"),  # ESC: terminal escape sequences
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),  # NEL, a C1 line break
        ("\x9b", "\\x9b"),  # CSI, the C1 form of ESC [
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ],
)
def test_every_control_character_is_escaped(
    text_log: tuple[logging.Logger, io.StringIO], char: str, shown: str
) -> None:
    logger, stream = text_log
    logger.info("model %s", f"a{char}b")
    text = stream.getvalue()
    assert text.endswith(f"model a{shown}b\n")
    assert char not in text.removesuffix("\n")
    assert len(text.splitlines()) == 1


def test_the_message_itself_and_extras_are_escaped(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = text_log
    # A message built with an f-string (no arguments) and an extra field a client filled.
    name = "m\r\nforged"
    logger.warning(f"unknown model {name}", extra={"request_id": "r1\nforged"})
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("unknown model m\\r\\nforged request_id=r1\\nforged")


def test_printable_text_is_unchanged(text_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text_log
    text = "modèle «iris» 🌸 \\n stays a backslash and an n; 100% ok"
    logger.info("%s", text)
    assert stream.getvalue().endswith(": " + text + "\n")
    assert escape_controls(text) is text


def test_a_traceback_keeps_its_lines_after_an_escaped_message(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = text_log
    try:
        raise ValueError("bad value\x1b[2J")
    except ValueError:
        logger.exception("request %s failed", "/v2/models/x\ny")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("request /v2/models/x\\ny failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2].startswith("  File ")
    # The exception's own text: an ESC cannot clear the operator's terminal.
    assert lines[-1] == "ValueError: bad value\\x1b[2J"


def test_the_json_format_escapes_as_json() -> None:
    record = logging.makeLogRecord(
        {"name": "infercore.admin", "levelno": 30, "levelname": "WARNING", "msg": FORGED}
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["msg"] == FORGED
