"""The ``request`` source's ``assemble`` against the model it feeds, checked at start-up.

An entry named after no input, or listing more or fewer fields than the input has columns,
would leave the server ready and every request answered 400 (``missing input``, ``shape
[1, 5] does not match``), blaming the client for the recipe.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from infercore.errors import ConfigError
from infercore.testing import fake_model_config, runtime_from_dict

FIELDS = ["a", "b", "c"]


def start(assemble: dict[str, list[str]]) -> Any:
    cfg = fake_model_config(features=3)  # the fake model takes x: [-1, 3]
    cfg["features"] = {"kind": "request", "assemble": assemble}
    rt = runtime_from_dict(cfg)

    async def main() -> None:
        await rt.start()
        await rt.stop()

    asyncio.run(main())
    return rt


def test_an_entry_that_builds_the_models_input_starts() -> None:
    assert start({"x": FIELDS}).started


@pytest.mark.parametrize(
    ("assemble", "message"),
    [
        (
            {"input": FIELDS},
            r"^features\.assemble\.input: the model takes no input 'input' \(its inputs: x\) "
            r"\(hint: name the entry after the input it builds, e\.g\. assemble: "
            r"\{x: \[a, b, c\]\}\)$",
        ),
        (
            {"x": [*FIELDS, "d", "e"]},
            r"^features\.assemble\.x: 5 field\(s\) make a \[N, 5\] tensor, but input 'x' is "
            r"\[-1, 3\] \(hint: list 3 fields, one per column of the input\)$",
        ),
        ({"x": ["a"]}, r"1 field\(s\) make a \[N, 1\] tensor, but input 'x' is \[-1, 3\]"),
    ],
    ids=["unknown-input", "too-many-fields", "too-few-fields"],
)
def test_an_entry_the_model_cannot_take_stops_start_up(
    assemble: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        start(assemble)


def test_with_a_version_that_failed_to_load_the_checks_stand_aside() -> None:
    # An optional version that failed (P5) may be the one taking what the config names: the
    # server starts on the others, as it did before these checks.
    cfg = fake_model_config(
        versions={
            "1": {"loader": {"kind": "fake", "features": 3}},
            "2": {"loader": {"kind": "fake", "features": 3, "fail_load": True}},
        }
    )
    cfg["models"]["m"]["primary"] = "1"
    cfg["features"] = {"kind": "request", "assemble": {"input": FIELDS}}
    rt = runtime_from_dict(cfg)

    async def main() -> None:
        await rt.start()
        await rt.stop()

    asyncio.run(main())
    assert rt.started


def test_drift_names_checked_only_when_every_version_loaded(tmp_path: Path) -> None:
    import numpy as np

    rows = np.random.default_rng(0).normal(size=(50, 3))
    np.savez(tmp_path / "ref.npz", x=rows, z=rows[:, 0])

    def drift_runtime(fail: bool) -> Any:
        cfg = fake_model_config(
            versions={
                "1": {"loader": {"kind": "fake", "features": 3}},
                "2": {"loader": {"kind": "fake", "features": 3, "fail_load": fail}},
            }
        )
        cfg["models"]["m"]["primary"] = "1"
        # 'z' is no column of the model's: refused when every version loaded.
        cfg["models"]["m"]["drift"] = {
            "detectors": {"ks": {"kind": "ks", "reference": "ref.npz", "features": ["x", "z"]}}
        }
        return runtime_from_dict(cfg, recipes_dir=tmp_path)

    async def main(rt: Any) -> None:
        try:
            await rt.start()
        finally:
            await rt.stop()

    with pytest.raises(ConfigError, match=r"'z' is not a column of model m's monitored"):
        asyncio.run(main(drift_runtime(fail=False)))
    rt = drift_runtime(fail=True)
    asyncio.run(main(rt))
    assert rt.started
