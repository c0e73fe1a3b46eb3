"""Built-in drift actions: log, webhook (allow-list, retries, no redirects) and command."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.builtins.actions import CommandAction, LogAction, WebhookAction
from infercore.components import ComponentContext, DriftDetector, DriftEvent, DriftResult, Tensors
from infercore.components.drift import ActionFailed
from infercore.drift import DriftMonitor, event_to_json
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl
from infercore.metrics import Metrics
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry


def event(**extra: Any) -> DriftEvent:
    result = DriftResult(
        "ks",
        True,
        scores={"amount": 0.4, "hour": float("nan")},
        p_values={"amount": 1e-9, "hour": 0.7},
        feature_drift={"amount": True, "hour": False},
        info={"threshold": 0.025},
    )
    return DriftEvent("fraud", "1", result, extra={"id": 7, "time": 1.5, "window": 3, **extra})


def build(registry: Registry, node: dict[str, Any], root: Path = Path(".")) -> Any:
    return registry.build("action", node, ComponentContext("drift.actions[0]", root))


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager()
    return Registry(pm)


def test_builtin_action_kinds(registry: Registry) -> None:
    kinds = registry.kinds("action")
    assert kinds["log"].cls is LogAction and kinds["log"].plugin == "builtins.actions"
    assert kinds["webhook"].cls is WebhookAction
    assert kinds["command"].cls is CommandAction


def test_event_json_is_plain_and_finite() -> None:
    body = event_to_json(event(samples=1000))
    assert body == {
        "type": "drift",
        "id": 7,
        "time": 1.5,
        "model": "fraud",
        "version": "1",
        "detector": "ks",
        "drift": True,
        "features": ["amount"],
        "scores": {"amount": 0.4, "hour": None},
        "p_values": {"amount": 1e-9, "hour": 0.7},
        "feature_drift": {"amount": True, "hour": False},
        "info": {"threshold": 0.025},
        "window": 3,
        "samples": 1000,
    }
    json.dumps(body, allow_nan=False)


def test_log_action(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    action = build(registry, {"kind": "log", "level": "error"})
    with caplog.at_level(logging.INFO, logger="infercore.drift.actions"):
        assert asyncio.run(action.run(event())) is None
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "model fraud version 1 detector ks window 3 features amount" in record.getMessage()


# --- webhook --------------------------------------------------------------------------------


class Hook:
    """A local HTTP server on 127.0.0.1 that answers with a scripted list of status codes."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.codes: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                hook.headers.append(dict(self.headers))
                code = hook.codes.pop(0) if hook.codes else 200
                self.send_response(code)
                if code in (301, 302, 307):
                    self.send_header("Location", "http://evil.example.com/steal")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/drift"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def test_webhook_posts_the_event(registry: Registry, hook: Hook) -> None:
    action = build(
        registry,
        {
            "kind": "webhook",
            "url": hook.url,
            "allow_hosts": ["127.0.0.1"],
            "headers": {"Authorization": "Bearer s3cret"},
        },
    )
    details = asyncio.run(action.run(event()))
    assert details == {"status": 200, "attempts": 1}
    assert hook.bodies == [event_to_json(event())]
    assert hook.headers[0]["Authorization"] == "Bearer s3cret"
    assert hook.headers[0]["Content-Type"] == "application/json"


def test_webhook_retries_5xx_with_backoff_then_succeeds(registry: Registry, hook: Hook) -> None:
    hook.codes = [503, 500]
    action = build(
        registry,
        {"kind": "webhook", "url": hook.url, "allow_hosts": ["127.0.0.1"], "backoff_s": 0.01},
    )
    assert asyncio.run(action.run(event())) == {"status": 200, "attempts": 3}
    assert len(hook.bodies) == 3


def test_webhook_gives_up_after_retries(registry: Registry, hook: Hook) -> None:
    hook.codes = [503] * 10
    action = build(
        registry,
        {
            "kind": "webhook",
            "url": hook.url,
            "allow_hosts": ["127.0.0.1"],
            "retries": 2,
            "backoff_s": 0.01,
        },
    )
    with pytest.raises(ActionFailed, match="failed after 3 attempts: HTTP 503"):
        asyncio.run(action.run(event()))
    assert len(hook.bodies) == 3


@pytest.mark.parametrize("code", [400, 404, 302])
def test_webhook_does_not_retry_4xx_nor_follow_redirects(
    registry: Registry, hook: Hook, code: int
) -> None:
    hook.codes = [code]
    action = build(
        registry,
        {"kind": "webhook", "url": hook.url, "allow_hosts": ["127.0.0.1"], "backoff_s": 0.01},
    )
    with pytest.raises(ActionFailed, match=f"answered HTTP {code}") as info:
        asyncio.run(action.run(event()))
    assert info.value.details == {"status": code}
    assert len(hook.bodies) == 1


def test_webhook_connection_refused_is_retried_then_fails(registry: Registry) -> None:
    h = Hook()
    url = h.url
    h.close()  # nothing listens there now
    action = build(
        registry,
        {
            "kind": "webhook",
            "url": url,
            "allow_hosts": ["127.0.0.1"],
            "retries": 1,
            "backoff_s": 0.01,
            "timeout_s": 2,
        },
    )
    with pytest.raises(ActionFailed, match="failed after 2 attempts"):
        asyncio.run(action.run(event()))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"url": "http://evil.example.com/x", "allow_hosts": ["127.0.0.1"]},
            "host 'evil.example.com' is not on allow_hosts",
        ),
        (
            {"url": "http://127.0.0.1:9000/x", "allow_hosts": ["127.0.0.1:8000"]},
            "host '127.0.0.1' is not on allow_hosts",
        ),
        ({"url": "http://127.0.0.1/x", "allow_hosts": []}, "allow_hosts: empty"),
        ({"url": "file:///etc/passwd", "allow_hosts": ["127.0.0.1"]}, "not an http"),
        (
            {"url": "http://user:pw@127.0.0.1/x", "allow_hosts": ["127.0.0.1"]},
            "credentials in the URL",
        ),
        ({"url": "http://127.0.0.1/x"}, "allow_hosts: required key is missing"),
        (
            {"url": "http://127.0.0.1/x", "allow_hosts": ["127.0.0.1"], "retries": -1},
            "retries",
        ),
    ],
)
def test_webhook_config_refusals(registry: Registry, node: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(registry, {"kind": "webhook", **node})


def test_webhook_allow_list_with_port_and_case(registry: Registry) -> None:
    action = build(
        registry,
        {
            "kind": "webhook",
            "url": "https://Hooks.Example.com/x",
            "allow_hosts": ["hooks.example.com:443"],
        },
    )
    assert isinstance(action, WebhookAction)


def test_monitor_sends_drift_to_a_local_webhook(registry: Registry, hook: Hook) -> None:
    pm, _ = make_plugin_manager([("drift-test", _Always())])
    reg = Registry(pm)

    async def main() -> None:
        mon = DriftMonitor.build(
            reg,
            {
                "window_size": 4,
                "detectors": {"mean": {"kind": "always"}},
                "actions": [
                    {"kind": "log"},
                    {"kind": "webhook", "url": hook.url, "allow_hosts": ["127.0.0.1"]},
                ],
            },
            model="fraud",
            model_root=Path("."),
            metrics=Metrics(),
            version=lambda: "2",
        )
        await mon.start()
        try:
            mon.offer({"x": np.ones((4, 1), dtype=np.float32)})
            for _ in range(500):
                if mon.events() and mon.events()[0]["actions"]["webhook"]["status"] != "running":
                    break
                await asyncio.sleep(0.01)
        finally:
            await mon.stop()
        (ev,) = mon.events()
        assert ev["actions"]["webhook"]["status"] == "ok"
        assert ev["actions"]["log"]["status"] == "ok"
        (body,) = hook.bodies
        assert body["model"] == "fraud" and body["version"] == "2"
        assert body["detector"] == "mean" and body["features"] == ["x"]
        assert body["id"] == ev["id"] and body["samples"] == 4

    asyncio.run(main())


class AlwaysDrifts(DriftDetector):
    kind = "always"

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult("always", True, feature_drift={"x": True})


class _Always:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [AlwaysDrifts]


# --- command --------------------------------------------------------------------------------

SCRIPT = """
import json, os, sys
event_file = sys.argv[-1]
with open(event_file) as fh:
    event = json.load(fh)
out = {
    "argv": sys.argv[1:],
    "event": event,
    "env": {k: v for k, v in os.environ.items() if k.startswith(("INFERCORE_", "EXTRA", "SECRET"))},
    "cwd": os.getcwd(),
}
with open(os.path.join(os.getcwd(), "seen.json"), "w") as fh:
    json.dump(out, fh)
print("x" * 5000)
print("retrained", event["id"])
code = int(os.environ.get("EXIT_CODE", "0"))
sys.exit(code)
"""


@pytest.fixture
def script_root(tmp_path: Path) -> Path:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "retrain.py").write_text(SCRIPT)
    return tmp_path


def test_command_runs_with_event_file_and_env(
    registry: Registry, script_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "do-not-pass")
    monkeypatch.setenv("SECRET_OK", "pass-me")
    action = build(
        registry,
        {
            "kind": "command",
            "argv": ["{python}", "retrain.py", "--event", "{event_file}"],
            "cwd": "jobs",
            "env": {"EXTRA": "1"},
            "pass_env": ["SECRET_OK"],
            "output_limit_bytes": 100,
        },
        script_root,
    )
    details = asyncio.run(action.run(event()))
    assert details["exit_code"] == 0
    assert details["output_tail"].endswith("retrained 7\n")
    assert len(details["output_tail"].encode()) == 100  # bounded
    seen = json.loads((script_root / "jobs" / "seen.json").read_text())
    assert seen["argv"][0] == "--event" and seen["argv"][1].endswith("event.json")
    assert seen["event"] == event_to_json(event())
    assert Path(seen["cwd"]).resolve() == (script_root / "jobs").resolve()
    env = seen["env"]
    assert env["INFERCORE_EVENT_ID"] == "7" and env["INFERCORE_MODEL"] == "fraud"
    assert env["INFERCORE_VERSION"] == "1" and env["INFERCORE_DETECTOR"] == "ks"
    assert env["INFERCORE_DRIFT_FEATURES"] == "amount"
    assert env["INFERCORE_EVENT_FILE"] == seen["argv"][1]
    assert env["EXTRA"] == "1" and env["SECRET_OK"] == "pass-me"
    assert "SECRET_TOKEN" not in env  # the server's environment is not passed on
    assert not Path(seen["argv"][1]).exists()  # the event file is removed afterwards


def test_command_appends_the_event_file_without_placeholder(
    registry: Registry, script_root: Path
) -> None:
    action = build(
        registry,
        {"kind": "command", "argv": [sys.executable, "jobs/retrain.py"]},
        script_root,
    )
    details = asyncio.run(action.run(event()))
    assert details["exit_code"] == 0
    seen = json.loads((script_root / "seen.json").read_text())
    assert len(seen["argv"]) == 1 and seen["argv"][0].endswith("event.json")


def test_command_non_zero_exit_is_recorded(registry: Registry, script_root: Path) -> None:
    action = build(
        registry,
        {"kind": "command", "argv": ["{python}", "jobs/retrain.py"], "env": {"EXIT_CODE": "3"}},
        script_root,
    )
    with pytest.raises(ActionFailed, match="exited with 3") as info:
        asyncio.run(action.run(event()))
    assert info.value.details["exit_code"] == 3
    assert "retrained 7" in info.value.details["output_tail"]


def test_command_timeout_kills_it(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "sleep.py").write_text("import time\nprint('start', flush=True)\ntime.sleep(60)\n")
    action = build(
        registry,
        {"kind": "command", "argv": ["{python}", "sleep.py"], "timeout_s": 0.5},
        tmp_path,
    )
    with pytest.raises(ActionFailed, match=r"timed out after 0\.5 s") as info:
        asyncio.run(action.run(event()))
    assert info.value.details["timed_out"] is True
    assert info.value.details["exit_code"] is not None and info.value.details["exit_code"] < 0
    assert info.value.details["output_tail"] == "start\n"


def test_a_cancelled_command_is_killed_and_logged_in_one_line(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At shutdown the monitor cancels a running command: one line, no asyncio traceback."""
    started = tmp_path / "started"
    (tmp_path / "sleep.py").write_text(
        f"import os, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).write_text(str(os.getpid()))\ntime.sleep(60)\n"
    )
    action = build(registry, {"kind": "command", "argv": ["{python}", "sleep.py"]}, tmp_path)

    async def main() -> None:
        task = asyncio.create_task(action.run(event()))
        for _ in range(500):
            if started.exists():
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
        gc.collect()  # an unretrieved exception is reported when its future is collected
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert not [m for m in messages if m[0] == "asyncio" and m[1] != "DEBUG"], messages
    cancelled = [m for m in messages if "cancelled" in m[2]]
    assert len(cancelled) == 1 and cancelled[0][1] == "WARNING", messages
    assert cancelled[0][2].startswith("command python cancelled")
    assert not any(r.exc_info for r in caplog.records)
    with pytest.raises(ProcessLookupError):  # killed (and reaped)
        os.kill(int(started.read_text()), 0)


def test_command_that_cannot_start(registry: Registry, tmp_path: Path) -> None:
    action = build(registry, {"kind": "command", "argv": ["./no-such-program"]}, tmp_path)
    with pytest.raises(ActionFailed, match="could not start"):
        asyncio.run(action.run(event()))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"argv": []}, "argv: needs the program"),
        ({"argv": [""]}, "argv: needs the program"),
        ({"argv": "python retrain.py"}, "argv: expected array"),
        ({"argv": ["x"], "cwd": "../.."}, "cwd: '../..' resolves outside the model root"),
        ({"argv": ["x"], "shell": True}, "shell: unknown key"),
    ],
)
def test_command_config_refusals(
    registry: Registry, tmp_path: Path, node: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build(registry, {"kind": "command", **node}, tmp_path)
