"""The lock-free request-path families expose exactly what prometheus_client's own would."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from infercore.metrics import LoopCounter, LoopGauge, LoopHistogram, Metrics

_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
_values = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, *_BUCKETS, math.nextafter(0.01, 1.0), math.nextafter(0.01, 0.0)]
)


def _pair(plain: type, loop: type, **kwargs: object) -> tuple[object, object, tuple]:
    regs = (CollectorRegistry(), CollectorRegistry())
    a = plain("x", "doc", ("model",), registry=regs[0], **kwargs)
    b = loop("x", "doc", ("model",), registry=regs[1], **kwargs)
    return a, b, regs


@given(st.lists(_values, max_size=40))
def test_histogram_exposition_matches(observations: list[float]) -> None:
    a, b, regs = _pair(Histogram, LoopHistogram, buckets=_BUCKETS)
    for v in observations:
        a.labels("m").observe(v)  # type: ignore[attr-defined]
        b.labels("m").observe(v)  # type: ignore[attr-defined]
    assert generate_latest(regs[1]) == generate_latest(regs[0])


@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=20), st.integers(0, 3))
def test_counter_exposition_matches(amounts: list[float], ones: int) -> None:
    a, b, regs = _pair(Counter, LoopCounter)
    for c in (a, b):
        child = c.labels("m")  # type: ignore[attr-defined]
        for v in amounts:
            child.inc(v)
        for _ in range(ones):
            child.inc()
    assert generate_latest(regs[1]) == generate_latest(regs[0])


def test_counter_refuses_a_negative_increment() -> None:
    _, b, _ = _pair(Counter, LoopCounter)
    child = b.labels("m")  # type: ignore[attr-defined]
    try:
        child.inc(-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a negative increment was accepted")


@given(st.lists(st.tuples(st.sampled_from(["inc", "dec", "set"]), st.integers(-5, 5))))
def test_gauge_exposition_matches(ops: list[tuple[str, int]]) -> None:
    a, b, regs = _pair(Gauge, LoopGauge, multiprocess_mode="livesum")
    for g in (a, b):
        child = g.labels("m")  # type: ignore[attr-defined]
        for op, v in ops:
            getattr(child, op)(v)
    assert generate_latest(regs[1]) == generate_latest(regs[0])


def test_request_path_families_are_lock_free_in_one_process() -> None:
    m = Metrics()
    assert isinstance(m.request_duration, LoopHistogram)
    assert isinstance(m.route_duration, LoopHistogram)
    assert isinstance(m.requests, LoopCounter)
    assert isinstance(m.inflight, LoopGauge)
    # Families written from other threads (drift runs in its own) keep their locks.
    assert not isinstance(m.drift_windows, LoopCounter)


def test_several_workers_keep_the_shared_values(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("INFERCORE_WORKER", "1")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Metrics()
    assert not isinstance(m.request_duration, LoopHistogram)
    assert not isinstance(m.requests, LoopCounter)
    assert not isinstance(m.inflight, LoopGauge)
