"""The ``request`` source's ``assemble`` against the model it feeds, checked at start-up.

An entry named after no input, or listing more or fewer fields than the input has columns,
would leave the server ready and every request answered 400 (``missing input``, ``shape
[1, 5] does not match``), blaming the client for the recipe.
"""

from __future__ import annotations

import asyncio
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
