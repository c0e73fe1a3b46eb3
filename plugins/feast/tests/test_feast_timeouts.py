"""``timeout_ms`` against the request's deadline: a timeout that can never fire first is a
config error, a non-finite one too, and a request whose deadline passed is not counted as a
feature store failure."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import ReadSpy, card, make_source, run, sample, source_node

from infercore.errors import ConfigError, DeadlineExceeded
from infercore.testing import runtime_from_dict

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "option",
    [
        "timeout_ms",
        "redis_socket_timeout_s",
        "breaker_reset_s",
        "empty_check_s",
        "materialize_lock_ttl_s",
    ],
)
def test_a_non_finite_duration_is_refused(model_root: Path, option: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"features\.{option}: expected a finite number, got inf"
    ):
        options: dict[str, Any] = {option: float("inf")}
        make_source(model_root, **options)


@pytest.mark.parametrize("timeout_ms", [1000, 3000])
def test_a_timeout_not_below_the_request_timeout_is_refused(
    model_root: Path, timeout_ms: int
) -> None:
    with pytest.raises(ConfigError) as info:
        make_source(model_root, extra={"request_timeout_ms": 1000}, timeout_ms=timeout_ms)
    message = str(info.value)
    assert f"features.timeout_ms: {timeout_ms} is not below server.request_timeout_ms (1000)" in (
        message
    )
    assert "lower features.timeout_ms" in (info.value.hint or "")
    make_source(model_root, extra={"request_timeout_ms": 1000}, timeout_ms=999)  # fine


def test_the_runtime_hands_the_source_the_request_timeout(model_root: Path) -> None:
    """What ``config validate`` and ``serve`` build: the check runs with the server's value,
    at its per-model path too."""
    features = {"kind": "feast", **source_node(timeout_ms=3000)}
    config: dict[str, Any] = {
        "model_root": str(model_root),
        "server": {"request_timeout_ms": 1000},
        "models": {"fraud": {"versions": {"1": {"loader": {"kind": "fake", "features": 5}}}}},
    }
    with pytest.raises(ConfigError, match=r"^features\.timeout_ms: 3000 is not below server"):
        runtime_from_dict({**config, "features": features})
    per_model = {**config["models"]["fraud"], "features": features}
    with pytest.raises(ConfigError, match=r"^models\.fraud\.features\.timeout_ms: 3000"):
        runtime_from_dict({**config, "models": {"fraud": per_model}})
    runtime_from_dict({**config, "features": {**features, "timeout_ms": 50}})


def test_config_validate_refuses_the_recipe_with_a_timeout_past_the_deadline() -> None:
    """The QA report's command: one line, exit 2, naming both keys; Feast is not imported."""
    env = {**os.environ, "INFERCORE_RECIPES_DIR": str(REPO / "recipes")}
    cli = [sys.executable, "-m", "infercore.cli", "config", "validate", "+recipe=fraud"]
    done = subprocess.run(
        [*cli, "features.timeout_ms=3000", "server.request_timeout_ms=1000"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "features.timeout_ms: 3000 is not below server.request_timeout_ms (1000)" in line
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [*cli, "features.timeout_ms=inf"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert "features.timeout_ms: expected a finite number" in done.stderr


def test_a_request_out_of_time_is_not_a_feature_store_failure(model_root: Path) -> None:
    """The request's deadline passes while its read is still within ``timeout_ms``: a 504
    for the server to count (deadline_exceeded), not a store failure. The read, when it then
    passes its own timeout, is what counts (towards the breaker)."""
    release = threading.Event()

    async def main() -> Any:
        source = make_source(model_root, timeout_ms=5000, on_failure="fail_open")
        await source.start()

        def hang() -> None:
            release.wait(10)  # bounded; released at the end

        ReadSpy(source).behaviour = hang
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(DeadlineExceeded):
                await source.fetch(
                    {"card_id": np.array([card(1)]), "amount": np.array([1.0])},
                    deadline=loop.time() + 0.05,
                )
            return source
        finally:
            release.set()
            await source.stop()

    source = run(main())
    for reason in ("timeout", "error", "breaker_open", "empty"):
        assert sample(source, "infercore_feature_fetch_failures_total", reason=reason) == 0
        assert sample(source, "infercore_feature_degraded_total", reason=reason) == 0
