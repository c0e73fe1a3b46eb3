"""An A/B router's arms are the only versions that share its subjects.

A canary given a weight takes a share of the split; under an ``ab`` router it would be reported
under its version's name, mixed into an experiment that never named it. The recipe asking for
that is a config error at start-up; a weight given to it later through the lifecycle (the
admin API's path) is refused with a 409 and changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infercore.errors import ConfigError
from infercore.runtime.errors import Conflict
from infercore.testing import runtime_from_dict

ARMS = {"control": "1", "treatment": "2"}


def fake(offset: float = 0.0) -> dict[str, Any]:
    return {"kind": "fake", "offset": offset}


def config(versions: dict[str, Any], routing: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": versions,
                "routing": routing or {"kind": "ab", "arms": ARMS, "key_header": "x-user"},
            }
        },
    }


def three(weight3: float, stage3: str = "canary") -> dict[str, Any]:
    """Versions 1 (primary), 2 (the treatment, a canary at 50) and 3 (in no arm)."""
    third: dict[str, Any] = {"loader": fake(200), "stage": stage3}
    if weight3:
        third["weight"] = weight3
    return {
        "1": {"loader": fake(0)},
        "2": {"loader": fake(100), "stage": "canary", "weight": 50},
        "3": third,
    }


def test_a_weighted_canary_in_no_arm_fails_start_up_naming_it_the_arms_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        runtime_from_dict(config(three(10)))
    message, hint = str(err.value), err.value.hint or ""
    assert message.startswith("models.m.versions.3.weight: canary '3' has weight 10"), message
    assert "no arm of models.m.routing.arms (control: '1', treatment: '2')" in message
    assert "add '3' to an arm, or give it weight 0" in hint


def test_the_arms_of_a_wrapped_ab_router_are_checked_too() -> None:
    routing = {
        "kind": "header",
        "inner": {"kind": "ab", "arms": ARMS, "key_header": "x-user"},
    }
    with pytest.raises(ConfigError, match=r"no arm of models\.m\.routing\.inner\.arms"):
        runtime_from_dict(config(three(10), routing))


AB = {"kind": "ab", "arms": ARMS, "key_header": "x-user"}


@pytest.mark.parametrize(
    ("routing", "versions"),
    [
        # A canary in no arm without a weight takes no subjects (it may be tested through
        # the versioned endpoint, or be given an arm's place later); nor does a shadow.
        (AB, three(0)),
        ({"kind": "shadow", "inner": AB}, three(0, stage3="shadow")),
        # Every weighted canary is an arm.
        (AB, {"1": {"loader": fake(0)}, "2": {"loader": fake(100), "stage": "canary"}}),
        # A weighted router names no versions: its canaries need no arm.
        ({"kind": "weighted", "key_header": "x-user"}, three(10)),
    ],
)
def test_what_the_arms_rule_allows(routing: dict[str, Any], versions: dict[str, Any]) -> None:
    served = runtime_from_dict(config(versions, routing)).models["m"]
    assert served.primary == "1"


def test_the_lifecycle_refuses_a_weight_for_a_canary_in_no_arm() -> None:
    rt = runtime_from_dict(config(three(0)))

    async def scenario() -> None:
        await rt.start()
        try:
            lc = rt.lifecycle
            before = lc.describe("m")
            with pytest.raises(Conflict) as err:
                await lc.set_weights("m", {"1": 40, "2": 50, "3": 10}, by="ann")
            assert "version '3' is in no arm of its router" in str(err.value)
            assert "control: '1', treatment: '2'" in str(err.value)
            assert "give '3' weight 0" in (err.value.hint or "")
            assert err.value.status_code == 409
            await lc.promote("m", "3", "candidate", by="ann")
            with pytest.raises(Conflict, match="version '3' is in no arm"):
                await lc.promote("m", "3", "canary", weight=5, by="ann")
            assert rt.models["m"].versions["3"].stage == "candidate"
            await lc.promote("m", "3", "canary", by="ann")  # no weight: no subjects
            # The arms' weights, and a weight of 0 for the canary in no arm, are the
            # operator's to set as before.
            await lc.set_weights("m", {"1": 30, "2": 70, "3": 0}, by="ann")
            versions = rt.models["m"].versions
            assert (versions["2"].weight, versions["3"].weight) == (70, 0)
            assert before[0]["primary"] == lc.describe("m")[0]["primary"] == "1"
        finally:
            await rt.stop()

    asyncio.run(scenario())
