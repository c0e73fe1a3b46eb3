"""Shadow copies keep their request's priority level (Triton's ``parameters.priority``).

- :func:`shadow_level`: a request at the primary's default level is at the shadow's default;
  another level is kept, clamped to the shadow's lowest level when the shadow has fewer, and
  ignored by a shadow without levels (as Triton ignores a priority for a model without levels).
- Copies at different levels never share a submission; each goes at its own level.
- Through the app: a V2 request's ``parameters.priority`` reaches the shadow's batcher.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from infercore.components import Batcher
from infercore.runtime.shadow import shadow_level
from infercore.testing import async_app_client, runtime_from_dict

LEVELED = {
    "kind": "dynamic",
    "max_batch_size": 64,
    "priority_levels": 3,
    "default_priority_level": 2,
}


class Levels(Batcher):
    """A batcher that only says what levels it has."""

    kind = "levels"

    def __init__(self, levels: int, default: int) -> None:
        self._levels = levels
        self._default = default

    @property
    def priority_levels(self) -> int:
        return self._levels

    @property
    def default_priority_level(self) -> int:
        return self._default

    async def submit(self, inputs: Any, *, deadline: float) -> Any:
        raise AssertionError("not called")


@pytest.mark.parametrize(
    ("priority", "levels", "default", "want"),
    [
        (0, 3, 2, 0),  # the primary's default level: the shadow's default
        (1, 3, 2, 1),  # a level of its own: kept
        (3, 3, 2, 3),
        (2, 3, 2, 0),  # the shadow's default level: its plain submit
        (5, 3, 2, 3),  # beyond the shadow's levels: its lowest, never a refusal
        (5, 3, 3, 0),  # ... which is its default here
        (1, 0, 0, 0),  # a shadow without levels ignores it
    ],
)
def test_the_level_a_shadow_copy_is_queued_at(
    priority: int, levels: int, default: int, want: int
) -> None:
    assert shadow_level(priority, Levels(levels, default)) == want


def shadow_runtime(**routing: Any) -> Any:
    model = {
        "versions": {
            "1": {"loader": {"kind": "fake"}},
            "2": {"loader": {"kind": "fake"}, "stage": "shadow"},
        },
        "primary": "1",
        "routing": {"kind": "shadow", "workers": 1, **routing},
    }
    return runtime_from_dict({"batching": LEVELED, "models": {"m": model}})


def record_submissions(batcher: Any) -> list[tuple[int, int]]:
    """(level, rows) of each submission to ``batcher``, a ``dynamic`` one: its
    ``submit_with_priority`` queues through ``submit(..., priority=)``; 0, the default."""
    seen: list[tuple[int, int]] = []
    submit = batcher.submit

    async def recorded(inputs: Any, *, deadline: float, priority: int = 0) -> Any:
        seen.append((priority, int(inputs["x"].shape[0])))
        return await submit(inputs, deadline=deadline, priority=priority)

    batcher.submit = recorded
    return seen


async def settle(rt: Any, copies: int) -> dict[str, int]:
    runner = rt.models["m"].shadow
    async with asyncio.timeout(10):
        while True:
            stats = runner.stats.get("2")
            if stats is not None and sum(stats.outcomes.values()) >= copies:
                return dict(stats.outcomes)
            await asyncio.sleep(0.01)


def test_copies_at_different_levels_go_in_separate_submissions_at_their_levels() -> None:
    rt = shadow_runtime()

    async def main() -> tuple[dict[str, int], list[tuple[int, int]]]:
        await rt.start()
        try:
            served = rt.models["m"]
            seen = record_submissions(served.versions["2"].batcher)
            target = (served.versions["2"],)
            # Offered without yielding: all wait when the worker wakes.
            for i, priority in enumerate([1, 0, 1, 3, 0, 1, 2]):
                x = np.full((1, 4), float(i), np.float32)
                primary = {"y": x.sum(axis=1), "echo": x}
                served.shadow.offer(target, {"x": x}, {"x": x}, None, primary, priority=priority)
            return await settle(rt, 7), seen
        finally:
            await rt.stop()

    outcomes, seen = asyncio.run(main())
    assert outcomes == {"ok": 7, "error": 0, "timeout": 0, "dropped": 0}
    # Oldest first, each with the copies waiting at its level; 2 is the shadow's default (0).
    assert seen == [(1, 3), (0, 3), (3, 1)]


def test_a_v2_requests_priority_reaches_the_shadows_batcher() -> None:
    rt = shadow_runtime()
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    }

    async def main() -> list[tuple[int, int]]:
        async with async_app_client(rt) as client:
            seen = record_submissions(rt.models["m"].versions["2"].batcher)
            for copies, params in enumerate(({"priority": 1}, {}, {"priority": 2}), start=1):
                response = await client.post(
                    "/v2/models/m/infer", json={**doc, "parameters": params}
                )
                assert response.status_code == 200, response.text
                await settle(rt, copies)
            return seen

    # Level 2 is the default on both versions: the shadow's plain submit, as for none.
    assert asyncio.run(main()) == [(1, 1), (0, 1), (0, 1)]
