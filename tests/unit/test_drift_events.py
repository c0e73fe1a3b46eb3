"""A drift action's or detector's error reaches the admin API's events and the logs through
``scrub()``: one line, no absolute paths, and the secrets of the URLs in it masked the way
``infercore config show`` masks them (RELIABILITY S6)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from infercore.components import Action, DriftDetector, DriftEvent, DriftResult, Tensors
from infercore.components.drift import ActionFailed
from infercore.config.compose import redact
from infercore.drift import DriftMonitor
from infercore.drift.events import scrub
from infercore.hookspecs import hookimpl
from infercore.metrics import Metrics
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry

TOKEN = "Zk3vQ9xLmP2rT8wYb4nH6jDa"
SLACK = f"https://hooks.slack.com/services/T0000/B0000/{TOKEN}"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A webhook's token in its path, with a scheme or without; the host stays.
        (
            f"URLError: <urlopen error timed out> posting to {SLACK}",
            "URLError: <urlopen error timed out> posting to "
            "https://hooks.slack.com/services/T0000/B0000/***",
        ),
        (
            f"POST hooks.slack.com/services/T0000/B0000/{TOKEN}: HTTP 404",
            "POST hooks.slack.com/services/T0000/B0000/***: HTTP 404",
        ),
        (f"POST https://alerts.example.com/in/{TOKEN}", "POST https://alerts.example.com/in/***"),
        # Credentials, secret and random-looking query values.
        (
            "ConnectionError: redis://:hunter2@redis.internal:6379/0 refused",
            "ConnectionError: redis://***@redis.internal:6379/0 refused",
        ),
        (
            "AuthenticationError: user:hunter2@redis.internal:6379",
            "AuthenticationError: ***@redis.internal:6379",
        ),
        (
            "HTTPError: https://h.example/hook?token=hunter2&team=ml: 403",
            "HTTPError: https://h.example/hook?token=***&team=ml: 403",
        ),
        (f"HTTPError: https://x.example/hook?x={TOKEN}", "HTTPError: https://x.example/hook?x=***"),
        (
            "Max retries exceeded with url: /drift?token=hunter2 (Caused by timeout)",
            "Max retries exceeded with url: /drift?token=*** (Caused by timeout)",
        ),
        # Tokens that their prefix names.
        (
            "401: bad credentials ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "401: bad credentials ghp_***",
        ),
        # Paths as before; a file URL's path too.
        ("RuntimeError: boom in /secret/path/detector.py", "RuntimeError: boom in <path>"),
        (
            "OSError: cannot read file:///etc/infercore/hook.txt",
            "OSError: cannot read file://<path>",
        ),
    ],
)
def test_scrub_masks_url_secrets_and_paths(text: str, shown: str) -> None:
    assert scrub(text) == shown


def test_scrub_masks_as_config_show_does() -> None:
    # One implementation: whatever config show masks in a value, scrub masks in a message.
    for url in (
        SLACK,
        f"discord.com/api/webhooks/1234/{TOKEN}",
        "rediss://user:hunter2@redis.internal:6380/0",
        f"redis.internal:6379?password=hunter2&x={TOKEN}",
    ):
        assert scrub(f"failed: {url}") == f"failed: {redact({'url': url})['url']}"


def test_scrub_masks_before_it_cuts() -> None:
    # A token cut in two must not leave its first half behind.
    line = scrub(f"{'x' * 80} redis://:{TOKEN}@redis.internal:6379/0 refused", limit=100)
    assert TOKEN[:8] not in line and len(line) == 100 and line.endswith("…")


def test_scrub_keeps_the_first_line_and_what_is_no_secret() -> None:
    text = "HTTP 503 from alerts.example.com:8443 (model fraud v2.3.1)\nTraceback ..."
    assert scrub(text) == "HTTP 503 from alerts.example.com:8443 (model fraud v2.3.1)"


# --- through the monitor: the events of the admin API and the error log ----------------------


class HookFails(Action):
    """A webhook-like action whose failure quotes its URL, token and all."""

    kind = "hook-fails"

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        raise ActionFailed(f"webhook to {SLACK} answered HTTP 404")


class HookRaises(Action):
    """An action that fails with an unexpected error carrying credentials."""

    kind = "hook-raises"

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        raise ConnectionError(f"redis://:{TOKEN}@redis.internal:6379/0 refused")


class AlwaysDrift(DriftDetector):
    kind = "always"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        pass

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult("always", True, scores={"x": 1.0}, feature_drift={"x": True})


class _Plugin:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [AlwaysDrift]

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        return [HookFails, HookRaises]


def test_an_action_error_with_a_token_in_its_url_reaches_events_and_logs_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pm, _ = make_plugin_manager([("drift-events-test", _Plugin())])
    node = {
        "seed": 0,
        "window_size": 2,
        "detectors": {"always": {"kind": "always"}},
        "actions": [{"kind": "hook-fails"}, {"kind": "hook-raises"}],
    }
    mon = DriftMonitor.build(
        Registry(pm), node, model="m", model_root=Path("."), metrics=Metrics(), version="1"
    )

    async def main() -> None:
        await mon.start()
        try:
            mon.offer({"x": np.ones((2, 1), dtype=np.float32)})
            deadline = time.monotonic() + 5
            while not mon.events() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await mon.wait_actions(5)
        finally:
            await mon.stop()

    with caplog.at_level(logging.DEBUG, logger="infercore"):
        asyncio.run(main())
    actions = mon.events()[0]["actions"]
    assert actions["hook-fails"]["error"] == (
        "webhook to https://hooks.slack.com/services/T0000/B0000/*** answered HTTP 404"
    )
    assert actions["hook-raises"]["error"] == (
        "ConnectionError: redis://***@redis.internal:6379/0 refused"
    )
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("answered HTTP 404" in m for m in logged)
    assert not any(TOKEN in m for m in logged)
    assert TOKEN not in repr(mon.events())


# --- a detector's info: scrubbed in webhook bodies, command files and the admin API ----------


def _deep(levels: int, bottom: str = "bottom") -> Any:
    value: Any = bottom
    for _ in range(levels):
        value = {"d": value}
    return value


LEAKY_INFO: dict[str, Any] = {
    # Config-like keys that name a secret: any value masked, a switch aside.
    "db_password": "hunter2",
    "PGPASSWORD": 12345,
    "credentials": {"user": "bob", "key": "k3y"},
    "auth": True,
    # Strings masked as config show masks them; paths out.
    "reference": "s3://minio:hunter2@minio.internal:9000/refs/ref.npz",
    "source": f"{SLACK} (loaded from /srv/models/fraud/ref.npz)",
    "note": "fetched with password=hunter2,again",
    "argv": ["fetch", "--token", "hunter2"],
    "pair": ("tuple", "MY_API_TOKEN=hunter2"),
    # What is no secret stays.
    "threshold": 0.05,
    "correction": "bonferroni",
    "max_tokens": 16,
    "token_count": 5,
    "tokenizer": "bert",
    "nan": float("nan"),
    # Bounded: depth and string length.
    "deep": _deep(12),
    "blob": "password=" + "x" * 5000,
}

SCRUBBED_INFO: dict[str, Any] = {
    "db_password": "***",
    "PGPASSWORD": "***",
    "credentials": {"user": "***", "key": "***"},
    "auth": True,
    "reference": "s3://***@minio.internal:9000/refs/ref.npz",
    "source": "https://hooks.slack.com/services/T0000/B0000/*** (loaded from <path>)",
    "note": "fetched with password=***",
    "argv": ["fetch", "--token", "***"],
    "pair": ["tuple", "MY_API_TOKEN=***"],
    "threshold": 0.05,
    "correction": "bonferroni",
    "max_tokens": 16,
    "token_count": 5,
    "tokenizer": "bert",
    "nan": None,
    # Eight levels of containers are shown (the info dict is the first); the ninth is "…".
    "deep": _deep(7, "…"),
    "blob": "<5009 characters>",
}


def test_a_detector_s_info_is_scrubbed_in_results_and_events() -> None:
    from infercore.drift.events import event_to_json, result_to_json

    result = DriftResult("ks", True, scores={"x": 1.0}, info=LEAKY_INFO)
    assert result_to_json(result)["info"] == SCRUBBED_INFO
    event = DriftEvent("m", "1", result, extra={"id": "e1", "window": 1, "samples": 2})
    body = event_to_json(event)
    assert body["info"] == SCRUBBED_INFO
    assert "hunter2" not in repr(body) and TOKEN not in repr(body)


def test_a_detector_s_info_may_hold_numpy_arrays() -> None:
    """alibi-detect's ``data`` holds arrays (feature-wise p-values, thresholds): an array of
    more than one element has no ``item()``, and used to fail the window's result."""
    from infercore.drift.events import result_to_json

    info = {"p_val": np.array([0.5, np.nan, 0.01], dtype=np.float32), "n": np.int64(3)}
    info["grid"] = np.arange(4).reshape(2, 2)
    result = DriftResult("ks", True, scores={"x": np.float64(1.0)}, info=info)
    out = result_to_json(result)
    assert out["info"] == {
        "p_val": [0.5, None, pytest.approx(0.01)],
        "n": 3,
        "grid": [[0, 1], [2, 3]],
    }
    assert msgspec.json.decode(msgspec.json.encode(out))["info"]["grid"] == [[0, 1], [2, 3]]


def test_scrub_info_keeps_a_cycle_bounded() -> None:
    from infercore.drift.events import scrub_info

    info: dict[str, Any] = {"name": "ks"}
    info["self"] = info
    out = scrub_info(info)
    for _ in range(8):  # eight levels shown, the ninth cut
        assert out["name"] == "ks"
        out = out["self"]
    assert out == "…"


class LeakyInfoDrift(DriftDetector):
    kind = "leaky-info"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        pass

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult(
            "leaky-info",
            True,
            scores={"x": 1.0},
            feature_drift={"x": True},
            info={"reference": "redis://:hunter2@cache:6379/0", "api_token": "hunter2"},
        )


class _InfoPlugin:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [LeakyInfoDrift]


def test_a_detector_s_info_reaches_the_monitor_s_events_scrubbed() -> None:
    pm, _ = make_plugin_manager([("drift-info-test", _InfoPlugin())])
    node = {"seed": 0, "window_size": 2, "detectors": {"leaky": {"kind": "leaky-info"}}}
    mon = DriftMonitor.build(
        Registry(pm), node, model="m", model_root=Path("."), metrics=Metrics(), version="1"
    )

    async def main() -> None:
        await mon.start()
        try:
            mon.offer({"x": np.ones((2, 1), dtype=np.float32)})
            deadline = time.monotonic() + 5
            while not mon.events() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            await mon.stop()

    asyncio.run(main())
    (event,) = mon.events()
    assert event["info"] == {"reference": "redis://***@cache:6379/0", "api_token": "***"}
    assert "hunter2" not in repr(mon.events())
