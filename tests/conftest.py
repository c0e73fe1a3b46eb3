from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from infercore.testing import fake_model_config

# The fuzz tests that drive a whole app or server (API, admin, fraud's transactions): the same
# examples every run (a failure names its input and reproduces), no example database, no
# per-example deadline and no health checks (each example is an HTTP round trip, and the
# strategies filter hard). Each test sets its own max_examples on top:
# ``@settings(settings.get_profile("fuzz"), max_examples=200)``.
settings.register_profile(
    "fuzz",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def fake_config():
    return fake_model_config


def _make_unwritable(path: Path) -> None:
    """Make the file at ``path`` unwritable: read-only, or (as root, who writes anyway) a
    folder in its place."""
    path.write_text("")
    os.chmod(path, 0o400)
    if os.access(path, os.W_OK):
        os.chmod(path, 0o600)
        path.unlink()
        path.mkdir()


@pytest.fixture
def make_unwritable() -> Callable[[Path], None]:
    """``make_unwritable(path)``: a file no write can reach (an audit log that fails, say)."""
    return _make_unwritable


@pytest.fixture(autouse=True)
def _restore_log_config() -> Iterator[None]:
    """Undo what a test's in-process ``infercore serve`` (``logs.configure``) did to the
    infercore and uvicorn loggers: its handler writes to that test's captured stderr, closed
    once the test ends, and every later log line would then print a "Logging error". Its
    filters too: uvicorn's client-warning limit would swallow a later test's lines."""
    names = ("infercore", "uvicorn", "uvicorn.error", "py.warnings")
    saved = [
        (lg, list(lg.handlers), list(lg.filters), lg.level, lg.propagate)
        for lg in (logging.getLogger(n) for n in names)
    ]
    from infercore.server import logs

    root = logging.getLogger()
    root_handlers, leveled = list(root.handlers), set(logs._leveled)
    yield
    for lg, handlers, filters, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.filters[:] = filters
        lg.setLevel(level)
        lg.propagate = propagate
    # Its handler on the root logger too, and the levels it gave plugin packages' loggers.
    root.handlers[:] = root_handlers
    for package in logs._leveled - leveled:
        logging.getLogger(package).setLevel(logging.NOTSET)
    logs._leveled.intersection_update(leveled)
