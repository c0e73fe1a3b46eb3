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


def test_scrub_info_shows_the_head_of_a_large_array() -> None:
    """A histogram of two million bins is cut before it is converted: its first 100 values,
    then how many more there are."""
    from infercore.drift.events import scrub_info

    hist = np.arange(2_000_000, dtype=np.float64)
    out = scrub_info({"hist": hist, "n": 2})
    assert out == {"hist": [*(float(i) for i in range(100)), "<1999900 more>"], "n": 2}


def test_scrub_info_cuts_every_axis_of_an_array() -> None:
    from infercore.drift.events import scrub_info

    grid = np.arange(1_000 * 2_000).reshape(1_000, 2_000)
    rows = scrub_info({"grid": grid})["grid"]
    assert len(rows) == 101 and rows[-1] == "<900 more>"
    assert rows[1] == [*range(2_000, 2_100), "<1900 more>"]
    # 1000 items in all: the key and the 100 rows, 800 values of the first eight rows, the
    # ninth row's first 99; the other rows show only how many values they have.
    assert rows[8] == [*range(16_000, 16_099), "<1901 more>"]
    assert rows[9] == rows[99] == ["<2000 more>"]


def test_scrub_info_shows_a_thousand_items_in_all() -> None:
    from infercore.drift.events import scrub_info

    cube = scrub_info({"cube": np.zeros((100, 100, 100))})["cube"]
    values = [v for plane in cube for row in plane if isinstance(row, list) for v in row]
    # The key, the 100 planes, the first plane's 100 rows, and 799 values.
    assert values.count(0.0) == 1_000 - 1 - 100 - 100
    assert len(cube) == 100 and cube[1] == cube[-1] == ["<100 more>"]


class _RecordingArray:
    """An array that records how many elements each ``tolist()`` converts."""

    converted: list[int] = []

    def __init__(self, array: Any) -> None:
        self.array = array
        self.ndim = array.ndim

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: Any) -> Any:
        part = self.array[index]
        return _RecordingArray(part) if isinstance(part, np.ndarray) else part

    def tolist(self) -> Any:
        _RecordingArray.converted.append(self.array.size)
        return self.array.tolist()


@pytest.mark.parametrize("shape", [(50_000,), (300, 400), (20, 30, 40)])
def test_scrub_info_converts_only_the_head_of_an_array(shape: tuple[int, ...]) -> None:
    from infercore.drift.events import scrub_info

    _RecordingArray.converted = []
    array = np.arange(np.prod(shape)).reshape(shape)
    out = scrub_info({"a": _RecordingArray(array)})
    assert out == scrub_info({"a": array})
    assert _RecordingArray.converted and max(_RecordingArray.converted) <= 100


def test_scrub_info_cuts_lists_tuples_and_mappings() -> None:
    from infercore.drift.events import scrub_info

    info = {
        "bins": list(range(250)),
        "edges": tuple(range(101)),
        "per_feature": {f"f{i}": i for i in range(130)},
        "exact": list(range(100)),
    }
    out = scrub_info(info)
    assert out["bins"] == [*range(100), "<150 more>"]
    assert out["edges"] == [*range(100), "<1 more>"]
    assert out["per_feature"] == {**{f"f{i}": i for i in range(100)}, "…": "<30 more>"}
    assert out["exact"] == list(range(100))  # 100 items: nothing cut


def test_scrub_info_lists_a_set_and_cuts_it() -> None:
    """A set is a list (it used to be ``str()``'d whole: a million-item set on the loop)."""
    from infercore.drift.events import scrub_info

    out = scrub_info({"seen": set(range(1_000_000)), "few": frozenset({"a"})})
    assert len(out["seen"]) == 101 and out["seen"][-1] == "<999900 more>"
    assert set(out["seen"][:100]) <= set(range(1_000_000))
    assert out["few"] == ["a"]


def test_scrub_info_masks_what_it_keeps_of_a_long_list() -> None:
    from infercore.drift.events import scrub_info

    out = scrub_info({"argv": ["fetch", "--token", "hunter2", *["x"] * 197]})
    assert out["argv"][:3] == ["fetch", "--token", "***"]
    assert out["argv"][-1] == "<100 more>" and len(out["argv"]) == 101


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
