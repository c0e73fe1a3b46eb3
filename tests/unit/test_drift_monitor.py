"""The drift monitor: bounded queue, sampling, windows, detector errors, cooldown, single-flight."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from infercore.components import Action, DriftDetector, DriftEvent, DriftResult, Tensors
from infercore.drift import DriftConfig, DriftMonitor
from infercore.drift.columns import Array
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl
from infercore.metrics import Metrics
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry


class MeanAbove(DriftDetector):
    """Drift when the mean of column ``x`` exceeds ``limit``; remembers the windows it saw."""

    kind = "mean-above"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        limit: float = 0.5
        column: str = "x"

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.windows: list[Tensors] = []
        self.features = [config.column]  # checked against the model's columns at start

    def detect(self, window: Tensors) -> DriftResult:
        self.windows.append(window)
        mean = float(np.mean(window[self.config.column]))
        drift = mean > self.config.limit
        return DriftResult(
            "ignored-name",
            drift,
            scores={self.config.column: mean},
            p_values={self.config.column: 0.01 if drift else 0.9},
            feature_drift={self.config.column: drift},
        )


class Explodes(DriftDetector):
    kind = "explodes"

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.calls = 0

    def detect(self, window: Tensors) -> DriftResult:
        self.calls += 1
        raise RuntimeError("boom in /secret/path/detector.py")


class Gate(Action):
    """An action that waits for a gate to open: a slow action, to test single-flight."""

    kind = "gate"

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.concurrent = 0
        self.max_concurrent = 0

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        self.started.append(event.extra["id"])
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await self.gate.wait()
        finally:
            self.concurrent -= 1
        self.finished.append(event.extra["id"])
        return {"ran": event.extra["id"]}


class Record(Action):
    kind = "record"

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.events: list[DriftEvent] = []

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        self.events.append(event)
        return None


class Fails(Action):
    kind = "fails"

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        raise ValueError("nope")


class _Plugin:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [MeanAbove, Explodes]

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        return [Gate, Record, Fails]


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager([("drift-test", _Plugin())])
    return Registry(pm)


def build(registry: Registry, **node: Any) -> DriftMonitor:
    node.setdefault("seed", 0)
    return DriftMonitor.build(
        registry, node, model="m", model_root=Path("."), metrics=Metrics(), version="1"
    )


def rows(values: list[float] | Array) -> Tensors:
    return {"x": np.asarray(values, dtype=np.float32).reshape(-1, 1)}


def sample(monitor: DriftMonitor, name: str, labels: dict[str, str]) -> float:
    value = monitor.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


# --- queue and sampling ---------------------------------------------------------------------


def test_bounded_queue_drops_and_counts(registry: Registry) -> None:
    mon = build(registry, queue_size=10, window_size=10)
    for _ in range(5):  # not started: nothing consumes the queue
        mon.offer(rows([0.0] * 4))
    st = mon.status()
    assert st["queue_rows"] == 8  # two requests fit, the third (8 + 4 > 10) does not
    assert st["dropped_rows"] == 12
    assert st["offered_rows"] == 20
    assert sample(mon, "infercore_drift_samples_dropped_total", {"model": "m"}) == 12
    mon.offer(rows([0.0, 0.0]))  # still fits exactly
    assert mon.status()["queue_rows"] == 10


def test_offer_never_raises(registry: Registry) -> None:
    mon = build(registry)
    mon.offer({"x": np.float32(3.0)})  # type: ignore[dict-item]  # a scalar: no rows
    mon.offer({})
    mon.offer(None)  # type: ignore[arg-type]
    mon.offer({"x": "not an array"})  # type: ignore[dict-item]
    assert mon.status()["queue_rows"] == 0


def test_sampling_rate(registry: Registry) -> None:
    mon = build(registry, sample_rate=0.25, queue_size=100_000, seed=7)
    for _ in range(4000):
        mon.offer(rows([1.0]))
    sampled = mon.status()["sampled_rows"]
    # Binomial(4000, 0.25): mean 1000, sd 27.4; 5 sd either side.
    assert 860 < sampled < 1140
    off = build(registry, sample_rate=0.0)
    for _ in range(100):
        off.offer(rows([1.0]))
    assert off.status()["sampled_rows"] == 0 and off.status()["offered_rows"] == 100


# --- windows --------------------------------------------------------------------------------


def test_windows_have_exactly_window_size_rows_in_order(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=100,
            queue_size=1000,
            detectors={"mean": {"kind": "mean-above", "limit": 1e9}},
        )
        values = np.arange(250, dtype=np.float32)
        for start in range(0, 250, 30):  # requests of 30 rows straddle windows
            mon.offer(rows(values[start : start + 30]))
        await mon.start()
        try:
            await until(lambda: mon.status()["windows"] == 2)
            det = mon.detectors["mean"]
            assert isinstance(det, MeanAbove)
            assert [w["x"].tolist() for w in det.windows] == [
                list(map(float, range(100))),
                list(map(float, range(100, 200))),
            ]
            assert det.windows[0]["x"].dtype == np.float64
            assert mon.status()["queue_rows"] == 50
            # a short final window on demand
            assert await mon.flush(min_rows=10) == 1
            assert det.windows[-1]["x"].tolist() == list(map(float, range(200, 250)))
            latest = mon.latest_results()["mean"]
            assert latest["detector"] == "mean" and latest["samples"] == 50
            assert latest["window"] == 3 and latest["error"] is None
            labels = {"model": "m", "detector": "mean"}
            assert sample(mon, "infercore_drift_windows_total", labels) == 3
            assert sample(mon, "infercore_drift_last_run_timestamp_seconds", labels) > 0
            assert sample(mon, "infercore_drift_score", {**labels, "feature": "x"}) == 224.5
        finally:
            await mon.stop()

    asyncio.run(main())


def test_columns_from_wide_and_categorical_tensors(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=4,
            features=["input", "channel"],
            outputs=["label"],
            detectors={"mean": {"kind": "mean-above", "limit": 1e9, "column": "input[2]"}},
        )
        await mon.start()
        try:
            wide = np.arange(8, dtype=np.float32).reshape(2, 4)
            chan = np.array([[b"pos"], [b"online"]], dtype=object)
            skipped = np.zeros((2, 1), dtype=np.float32)
            for _ in range(2):
                mon.offer(
                    {"input": wide, "channel": chan, "skipped": skipped},
                    {"label": np.array([0, 1]), "probabilities": np.zeros((2, 2))},
                )
            await until(lambda: mon.status()["windows"] == 1)
            det = mon.detectors["mean"]
            assert isinstance(det, MeanAbove)
            window = det.windows[0]
            assert list(window) == [
                "input[0]",
                "input[1]",
                "input[2]",
                "input[3]",
                "channel",
                "label",
            ]
            assert window["input[2]"].tolist() == [2.0, 6.0, 2.0, 6.0]
            assert window["channel"].tolist() == ["pos", "online", "pos", "online"]
            assert window["channel"].dtype == object
        finally:
            await mon.stop()

    asyncio.run(main())


def test_interval_schedule_tests_what_is_waiting(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            schedule="interval",
            interval_s=0.02,
            min_samples=5,
            window_size=1000,
            detectors={"mean": {"kind": "mean-above", "limit": 1e9}},
        )
        await mon.start()
        try:
            mon.offer(rows([1.0, 2.0, 3.0]))
            await asyncio.sleep(0.1)
            assert mon.status()["windows"] == 0  # fewer than min_samples: waits
            mon.offer(rows([4.0, 5.0]))
            await until(lambda: mon.status()["windows"] == 1)
            det = mon.detectors["mean"]
            assert isinstance(det, MeanAbove)
            assert det.windows[0]["x"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        finally:
            await mon.stop()

    asyncio.run(main())


def test_offer_from_another_thread_wakes_the_monitor(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry, window_size=10, detectors={"mean": {"kind": "mean-above", "limit": 1e9}}
        )
        await mon.start()
        try:

            def feed() -> None:
                for _ in range(10):
                    mon.offer(rows([1.0]))

            t = threading.Thread(target=feed)
            t.start()
            t.join()
            await until(lambda: mon.status()["windows"] == 1)
        finally:
            await mon.stop()

    asyncio.run(main())


# --- detector errors ------------------------------------------------------------------------


def test_a_detector_that_raises_is_counted_and_changes_nothing_else(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=5,
            detectors={
                "bad": {"kind": "explodes"},
                "good": {"kind": "mean-above", "limit": 0.5},
            },
            actions=[{"kind": "record"}],
        )
        await mon.start()
        try:
            mon.offer(rows([0.0] * 5))
            await until(lambda: mon.status()["windows"] == 1)
            mon.offer(rows([1.0] * 5))  # the monitor keeps going; "good" reports drift
            await until(lambda: mon.status()["windows"] == 2)
            await mon.wait_actions(5)
        finally:
            await mon.stop()
        bad = mon.detectors["bad"]
        assert isinstance(bad, Explodes) and bad.calls == 2
        labels = {"model": "m", "detector": "bad"}
        assert sample(mon, "infercore_drift_detector_errors_total", labels) == 2
        assert sample(mon, "infercore_drift_windows_total", labels) == 2
        latest = mon.latest_results()
        assert latest["bad"]["drift"] is None and latest["bad"]["errors"] == 2
        assert latest["bad"]["error"] == "RuntimeError: boom in <path>"  # no paths (S6)
        assert latest["good"]["drift"] is True and latest["good"]["error"] is None
        events = mon.events()
        assert len(events) == 1 and events[0]["detector"] == "good"
        assert events[0]["features"] == ["x"] and events[0]["version"] == "1"
        assert events[0]["actions"]["record"]["status"] == "ok"
        rec = mon.actions[0][1]
        assert isinstance(rec, Record) and len(rec.events) == 1
        assert mon.status()["detector_errors"] == {"bad": 2, "good": 0}
        overall = {"model": "m", "detector": "good", "feature": "*"}
        assert sample(mon, "infercore_drift_detected", overall) == 1

    asyncio.run(main())


def test_windows_total_counts_the_windows_a_detector_failed_on(registry: Registry) -> None:
    """errors / windows is each detector's error ratio: a failed run is a window too."""

    async def main() -> None:
        mon = build(
            registry,
            window_size=5,
            detectors={"bad": {"kind": "explodes"}, "good": {"kind": "mean-above"}},
        )
        await mon.start()
        try:
            for i in range(3):
                mon.offer(rows([0.0] * 5))
                await until(lambda i=i: mon.status()["windows"] == i + 1)  # type: ignore[misc]
        finally:
            await mon.stop()
        for name in ("bad", "good"):
            labels = {"model": "m", "detector": name}
            assert sample(mon, "infercore_drift_windows_total", labels) == 3, name
        bad = {"model": "m", "detector": "bad"}
        assert sample(mon, "infercore_drift_detector_errors_total", bad) == 3
        # "latest completed run": a failed run completes nothing
        assert sample(mon, "infercore_drift_last_run_timestamp_seconds", bad) == 0

    asyncio.run(main())


def test_degraded_requests_are_left_out_and_counted(registry: Registry) -> None:
    mon = build(registry, window_size=10)
    mon.offer(rows([0.0] * 4))
    mon.offer(rows([9.0] * 3), degraded=True)  # default features: not the data's rows
    mon.offer(rows([0.0] * 2), degraded=False)
    st = mon.status()
    assert st["offered_rows"] == 9
    assert st["degraded_rows"] == 3
    assert st["sampled_rows"] == 6 and st["queue_rows"] == 6
    assert st["dropped_rows"] == 0
    assert sample(mon, "infercore_drift_samples_dropped_total", {"model": "m"}) == 0


@pytest.mark.parametrize(
    ("node", "inputs", "outputs", "message"),
    [
        (
            {"features": ["amont"]},
            {"amount", "hour"},
            set(),
            r"^drift\.features: 'amont' is not an input of model m "
            r"\(hint: inputs of model m: amount, hour\)$",
        ),
        (
            {"features": ["amount", "a", "b"]},
            {"amount"},
            set(),
            r"^drift\.features: 'a', 'b' are not inputs of model m",
        ),
        (
            {"outputs": ["fraud_probability"]},
            {"amount"},
            {"probabilities", "label"},
            r"^drift\.outputs: 'fraud_probability' is not an output of model m "
            r"\(hint: outputs of model m: label, probabilities \(the model's own names",
        ),
    ],
)
def test_tensor_names_the_model_lacks_are_config_errors(
    registry: Registry, node: dict[str, Any], inputs: set[str], outputs: set[str], message: str
) -> None:
    mon = DriftMonitor.build(registry, node, model="m", model_root=Path("."), path="drift")
    with pytest.raises(ConfigError, match=message):
        mon.check_tensors(inputs, outputs)


def test_tensor_names_the_model_has_pass_the_check(registry: Registry) -> None:
    build(registry).check_tensors({"x"}, set())  # features: null monitors whatever there is
    build(registry, features=["x"], outputs=["y"]).check_tensors({"x", "z"}, {"y"})


#: iris-like: one [N, 4] input; outputs label [N] and probabilities [N, 3].
IRIS_INPUTS = [("input", (-1, 4))]
IRIS_OUTPUTS = [("label", (-1,)), ("probabilities", (-1, 3))]


def _start_with_columns(
    registry: Registry,
    column: str,
    inputs: list[tuple[str, tuple[int, ...]]],
    model_outputs: list[tuple[str, tuple[int, ...]]] = IRIS_OUTPUTS,
    **node: Any,
) -> None:
    node = {"detectors": {"mean": {"kind": "mean-above", "column": column}}, **node}
    mon = DriftMonitor.build(registry, node, model="m", model_root=Path("."), path="drift")
    mon.expect_columns(inputs, model_outputs)

    async def main() -> None:
        await mon.start()
        await mon.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("column", "inputs", "node"),
    [
        ("input[3]", IRIS_INPUTS, {}),
        ("amount", [("amount", (-1,))], {}),
        ("amount", [("amount", (-1, 1))], {}),
        ("image[11]", [("image", (-1, 2, 3, 2))], {}),
        ("emb[700]", [("emb", (-1, -1))], {}),  # its width is known from data only
        ("probabilities[2]", IRIS_INPUTS, {"outputs": ["probabilities"]}),
    ],
)
def test_detector_features_the_model_has_pass_at_start(
    registry: Registry, column: str, inputs: list[tuple[str, tuple[int, ...]]], node: Any
) -> None:
    _start_with_columns(registry, column, inputs, **node)


@pytest.mark.parametrize(
    ("column", "inputs", "node", "message"),
    [
        (
            "input[4]",
            IRIS_INPUTS,
            {},
            r"^drift\.detectors\.mean\.features: 'input\[4\]' is not a column of model m's "
            r"monitored tensors \(hint: columns: input\[0\], input\[1\], input\[2\], "
            r"input\[3\]; a tensor of shape \[N, k\] becomes name\[0\]",
        ),
        # A reference column named like the tensor, where the model has [N, 4].
        ("input", IRIS_INPUTS, {}, r"'input' is not a column"),
        # Outputs are columns only when the monitor's `outputs` lists them.
        ("probabilities[1]", IRIS_INPUTS, {}, r"'probabilities\[1\]' is not a column"),
        # `features` narrows the monitored tensors.
        ("hour", [("amount", (-1,)), ("hour", (-1,))], {"features": ["amount"]}, r"'hour'"),
    ],
)
def test_detector_features_the_model_lacks_fail_at_start(
    registry: Registry,
    column: str,
    inputs: list[tuple[str, tuple[int, ...]]],
    node: Any,
    message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        _start_with_columns(registry, column, inputs, **node)


# --- actions: single-flight and cooldown ----------------------------------------------------


def test_single_flight_a_running_action_is_not_started_again(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=2,
            cooldown_s=0,
            detectors={"mean": {"kind": "mean-above"}},
            actions=[{"kind": "gate"}, {"kind": "record"}],
        )
        gate = mon.actions[0][1]
        assert isinstance(gate, Gate)
        await mon.start()
        try:
            for n in (1, 2, 3):
                mon.offer(rows([1.0, 1.0]))
                await until(lambda n=n: mon.status()["windows"] == n)  # type: ignore[misc]
            await until(lambda: gate.started == [1])
            assert mon.status()["running_actions"] == ["gate"]
            gate.gate.set()
            await mon.wait_actions(5)
            mon.offer(rows([1.0, 1.0]))  # after it finished, it runs again
            await until(lambda: len(mon.events()) == 4)
            await mon.wait_actions(5)
        finally:
            await mon.stop()
        assert gate.max_concurrent == 1
        assert gate.started == [1, 4] and gate.finished == [1, 4]
        events = mon.events()
        assert [e["actions"]["gate"]["status"] for e in events] == [
            "ok",
            "skipped",
            "skipped",
            "ok",
        ]
        assert events[1]["actions"]["gate"]["reason"] == "busy"
        assert events[0]["actions"]["gate"]["details"] == {"ran": 1}
        # the other action was free each time
        assert [e["actions"]["record"]["status"] for e in events] == ["ok"] * 4
        busy = {"model": "m", "action": "gate", "outcome": "busy"}
        assert sample(mon, "infercore_drift_actions_total", busy) == 2

    asyncio.run(main())


def test_cooldown_records_the_event_and_runs_nothing(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=2,
            cooldown_s=3600,
            detectors={"mean": {"kind": "mean-above"}},
            actions=[{"kind": "record"}, {"kind": "fails"}],
        )
        rec = mon.actions[0][1]
        assert isinstance(rec, Record)
        await mon.start()
        try:
            for n in (1, 2, 3):
                mon.offer(rows([1.0, 1.0]))
                await until(lambda n=n: len(mon.events()) == n)  # type: ignore[misc]
                await mon.wait_actions(5)
        finally:
            await mon.stop()
        assert len(rec.events) == 1
        events = mon.events()
        assert events[0]["actions"]["record"]["status"] == "ok"
        assert events[0]["actions"]["fails"] == {
            "status": "error",
            "started": events[0]["actions"]["fails"]["started"],
            "finished": events[0]["actions"]["fails"]["finished"],
            "error": "ValueError: nope",
        }
        for e in events[1:]:
            assert e["actions"] == {
                "record": {"status": "skipped", "reason": "cooldown"},
                "fails": {"status": "skipped", "reason": "cooldown"},
            }
        assert mon.status()["cooldown_remaining_s"] > 3000
        assert mon.events(limit=1) == events[-1:]
        cooldown = {"model": "m", "action": "record", "outcome": "cooldown"}
        assert sample(mon, "infercore_drift_actions_total", cooldown) == 2

    asyncio.run(main())


def test_stop_cancels_actions_that_outlive_the_timeout(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=2,
            detectors={"mean": {"kind": "mean-above"}},
            actions=[{"kind": "gate"}],
        )
        await mon.start()
        mon.offer(rows([1.0, 1.0]))
        await until(lambda: mon.status()["running_actions"] == ["gate"])
        await mon.stop(timeout=0.05)
        assert mon.events()[0]["actions"]["gate"]["status"] == "cancelled"
        mon.offer(rows([1.0, 1.0]))  # after stop: ignored, no error
        assert mon.status()["queue_rows"] == 0

    asyncio.run(main())


def test_running_actions_leave_out_those_a_sequence_finished(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry,
            window_size=2,
            detectors={"mean": {"kind": "mean-above"}},
            actions=[{"kind": "record"}, {"kind": "gate"}],
            action_order="sequential",
        )
        await mon.start()
        mon.offer(rows([1.0, 1.0]))
        # record is done, gate waits: the sequence holds both busy, only gate runs.
        await until(lambda: mon.status()["running_actions"] == ["gate"])
        assert mon.events()[0]["actions"]["record"]["status"] == "ok"
        await mon.stop(timeout=0.05)
        assert mon.status()["running_actions"] == []

    asyncio.run(main())


def test_history_is_bounded(registry: Registry) -> None:
    async def main() -> None:
        mon = build(
            registry, window_size=2, history_size=3, detectors={"mean": {"kind": "mean-above"}}
        )
        await mon.start()
        try:
            for _ in range(5):
                mon.offer(rows([1.0, 1.0]))
            await until(lambda: mon.status()["windows"] == 5)
        finally:
            await mon.stop()
        assert [e["id"] for e in mon.events()] == [3, 4, 5]

    asyncio.run(main())


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"window_size": 100, "queue_size": 50},
            "models.m.drift.queue_size: 50 is smaller than window_size",
        ),
        (
            {"schedule": "interval", "queue_size": 50, "min_samples": 100},
            "models.m.drift.queue_size: 50 is smaller than min_samples (100); an interval "
            "window would never be tested",
        ),
        (
            {"schedule": "interval", "queue_size": 50, "min_samples": 100, "window_size": 80},
            "models.m.drift.queue_size: 50 is smaller than window_size (80); an interval",
        ),
        ({"sample_rate": 1.5}, "models.m.drift.sample_rate"),
        ({"schedule": "hourly"}, "models.m.drift.schedule"),
        ({"windows": 3}, "models.m.drift.windows: unknown key"),
        ({"detectors": {"a b": {"kind": "mean-above"}}}, "invalid detector name 'a b'"),
        ({"detectors": {"d": {"kind": "nope"}}}, "unknown drift_detector 'nope'"),
        (
            {"detectors": {"d": {"kind": "mean-above", "limt": 1}}},
            "models.m.drift.detectors.d.limt: unknown key",
        ),
        ({"actions": [{"kind": "record"}, {"kind": "nope"}]}, "models.m.drift.actions[1].kind"),
    ],
)
def test_config_errors_name_the_path(
    registry: Registry, node: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        DriftMonitor.build(registry, node, model="m", model_root=Path("."))


def test_config_defaults_and_action_names(registry: Registry) -> None:
    cfg = msgspec.convert({}, DriftConfig)
    assert (cfg.sample_rate, cfg.queue_size, cfg.window_size, cfg.schedule) == (
        1.0,
        10_000,
        1000,
        "window",
    )
    assert cfg.cooldown_s == 600 and cfg.features is None
    mon = DriftMonitor.build(
        registry,
        {"actions": [{"kind": "record"}, {"kind": "gate"}, {"kind": "record"}]},
        model="m",
        model_root=Path("."),
    )
    assert [name for name, _ in mon.actions] == ["record", "gate", "record#2"]


# --- assembling a window --------------------------------------------------------------------


def _reference_window(mon: DriftMonitor, items: list[Any]) -> tuple[dict[str, Array], int]:
    """Each request turned into columns alone, then stacked (how a window was always made)."""
    from infercore.drift.columns import concat_columns, row_count, to_columns

    parts, invalid = [], 0
    for inputs, outputs, n in items:
        try:
            cols = to_columns(inputs, mon._features)
            if outputs is not None and mon._outputs:
                for name, col in to_columns(outputs, mon._outputs).items():
                    cols.setdefault(name, col)
            if row_count(cols) != n:
                raise ValueError("rows")
        except ValueError:
            invalid += n
            continue
        parts.append(cols)
    return concat_columns(parts), invalid


def test_a_window_stacks_alike_requests_and_sees_what_each_request_would_give(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import infercore.drift.monitor as monitor_module

    mon = build(registry, features=["amount", "channel", "wide"], outputs=["score"])
    rng = np.random.default_rng(3)

    def request(n: int, *, amount_dtype: Any = np.float32, channel: Any = None) -> Any:
        inputs = {
            "amount": rng.random(n).astype(amount_dtype).reshape(n, 1),
            # BYTES tensors arrive as object arrays of bytes (invalid UTF-8 included).
            "channel": np.array(
                [[rng.choice([b"pos", b"web", b"\xff"])] for _ in range(n)], dtype=object
            )
            if channel is None
            else channel,
            "wide": rng.random((n, 3)),
            "ignored": np.zeros((n, 2)),
        }
        return inputs, {"score": rng.random(n), "other": np.zeros(n)}, n

    bad_rows = request(2)
    bad_rows[0]["amount"] = np.zeros((3, 1), np.float32)  # three rows in a request of two
    numeric_channel = request(1, channel=np.array([[7.0]]))  # a client that sent numbers
    items = [
        *(request(int(rng.integers(1, 4))) for _ in range(20)),
        bad_rows,
        *(request(1) for _ in range(5)),
        request(2, amount_dtype=np.float64),
        numeric_channel,
        *(request(1) for _ in range(4)),
        (request(1)[0], None, 1),  # no outputs
    ]
    items = [(dict(i), None if o is None else dict(o), n) for i, o, n in items]
    expected, expected_invalid = _reference_window(mon, items)

    calls = []
    real = monitor_module.to_columns

    def counting(tensors: Any, names: Any = None) -> Any:
        calls.append(1)
        return real(tensors, names)

    monkeypatch.setattr(monitor_module, "to_columns", counting)
    window = mon._assemble(items)

    assert list(window) == list(expected) == ["amount", "channel", "wide[0]", "wide[1]", "wide[2]"]
    for name, column in expected.items():
        assert window[name].dtype == column.dtype, name
        assert window[name].tolist() == column.tolist(), name
    assert mon.status()["invalid_rows"] == expected_invalid == 2
    # Alike neighbours are converted together: the twenty first requests once, the five and
    # the four once each, the four odd ones alone; two calls each (inputs, outputs), but one
    # for the request without outputs and one for the bad one (its inputs fail).
    assert len(calls) == 2 * 7 - 2 < len(items)
