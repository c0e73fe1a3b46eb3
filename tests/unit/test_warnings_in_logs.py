"""Python warnings go through the configured log handler: one line, a module, no file path."""

from __future__ import annotations

import io
import json
import logging
import os
import sysconfig
import warnings
from collections.abc import Iterator

import pytest

from infercore.server.logs import WARNINGS_LOGGER, configure

# Where a library's module lives: under sys.path, so the line names it by its dotted name.
LIBRARY_FILE = os.path.join(sysconfig.get_paths()["purelib"], "somelib", "legacy", "__init__.py")


def _warn(message: str, category: type[Warning] = UserWarning) -> None:
    # As a library's own module would (a fresh registry: shown whatever came before).
    warnings.warn_explicit(message, category, LIBRARY_FILE, 6, module="somelib.legacy", registry={})


@pytest.fixture
def restore_logging() -> Iterator[None]:
    shown = warnings.showwarning
    yield None
    warnings.showwarning = shown
    configure("info", "text", "stderr")


@pytest.mark.usefixtures("restore_logging")
def test_a_warning_after_json_configure_is_one_json_line_without_a_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", "json", "stderr")
    _warn("somelib.legacy is deprecated; see https://example.org/upgrade", DeprecationWarning)
    out, err = capsys.readouterr()
    assert not out
    lines = err.splitlines()
    assert len(lines) == 1, err
    doc = json.loads(lines[0])
    assert doc["logger"] == WARNINGS_LOGGER and doc["level"] == "warning"
    assert doc["msg"] == (
        "DeprecationWarning: somelib.legacy is deprecated; see https://example.org/upgrade"
    )
    assert doc["source"] == "somelib.legacy:6"
    assert LIBRARY_FILE not in err and os.sep + "somelib" not in err and ".py" not in err


@pytest.mark.usefixtures("restore_logging")
def test_a_warning_after_text_configure_is_one_line_without_a_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", "text", "stderr")
    _warn("old argument")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        "WARNING py.warnings: UserWarning: old argument source=somelib.legacy:6"
    )


@pytest.mark.usefixtures("restore_logging")
def test_warnings_follow_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure("error", "json", "stderr")
    _warn("not at level error")
    assert capsys.readouterr().err == ""
    assert not logging.getLogger(WARNINGS_LOGGER).propagate


@pytest.mark.usefixtures("restore_logging")
def test_a_warning_shown_into_a_file_keeps_the_standard_rendering(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", "json", "stderr")
    buffer = io.StringIO()
    warnings.showwarning("x", UserWarning, "/somewhere/mod.py", 3, file=buffer)
    assert buffer.getvalue() == "/somewhere/mod.py:3: UserWarning: x\n"
    assert capsys.readouterr().err == ""
