"""A plugin's own loggers (``logging.getLogger(__name__)``) and libraries' loggers go through the
configured handler: formatted like infercore's lines, the plugin's at the server's level."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from infercore.server import logs
from infercore.server.logs import configure


@pytest.fixture
def plugin_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(logs, "plugin_packages", lambda: {"infercore_paging"})
    yield "infercore_paging"
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("infercore_paging").setLevel(logging.NOTSET)
    logs._leveled.discard("infercore_paging")
    configure("info", "text", "stderr")
    root.handlers[:] = handlers


def test_a_plugins_lines_are_json_at_the_servers_level(
    plugin_package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info", "json", "stderr")
    logging.getLogger(f"{plugin_package}.action").info("inputs drifted: %s", "model linear")
    logging.getLogger(f"{plugin_package}.action").debug("not at info")
    logging.getLogger("somelib.sub").info("a library's INFO: below its WARNING")
    logging.getLogger("somelib.sub").warning("a library's warning")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(d["level"], d["logger"], d["msg"]) for d in lines] == [
        ("info", "infercore_paging.action", "inputs drifted: model linear"),
        ("warning", "somelib.sub", "a library's warning"),
    ]


def test_the_level_follows_a_second_configure(
    plugin_package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info", "text", "stderr")
    configure("error", "text", "stderr")
    log = logging.getLogger(f"{plugin_package}.batcher")
    log.warning("below error now")
    log.error("shown once")
    err = capsys.readouterr().err
    assert err.count("shown once") == 1 and "below error now" not in err  # one root handler
    assert "infercore_paging.batcher" in err  # formatted: the logger is named


def test_a_librarys_own_info_level_and_own_handler_are_respected(
    plugin_package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    chatty = logging.getLogger("chattylib")
    chatty.setLevel(logging.INFO)  # a library that turns its own INFO lines on
    own = logging.getLogger("ownhandlerlib")
    mine = logging.StreamHandler()  # writes to the captured stderr, bare
    own.addHandler(mine)
    try:
        configure("info", "json", "stderr")
        chatty.info("CA file at /etc/secret/ca.pem")  # not a warning: not in the log
        chatty.warning("chatty warning")
        own.warning("own warning")  # printed by its own handler, and not a second time
        err = capsys.readouterr().err
    finally:
        chatty.setLevel(logging.NOTSET)
        own.removeHandler(mine)
    assert "/etc/secret" not in err
    assert err.count("own warning") == 1 and err.count("chatty warning") == 1
    assert [json.loads(line)["logger"] for line in err.splitlines() if line.startswith("{")] == [
        "chattylib"
    ]
