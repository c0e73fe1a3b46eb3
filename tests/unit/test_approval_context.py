"""An approval is for a step under the primary it was asked under: a change of primary
supersedes the model's pending approvals at once (audited), and approving one whose primary or
version stage no longer holds, however that came about, is a 409 that says what changed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from infercore.runtime.errors import Conflict
from infercore.testing import metric_value, runtime_from_dict


def config(approvals: list[str]) -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": {"kind": "fake"}},
                    "2": {"loader": {"kind": "fake", "offset": 1}, "stage": "shadow"},
                    "3": {"loader": {"kind": "fake", "offset": 2}, "stage": "shadow"},
                },
                "routing": {"kind": "shadow", "inner": {"kind": "weighted"}},
                "rollout": {"approvals": approvals},
            }
        },
    }


@asynccontextmanager
async def started(approvals: list[str]) -> AsyncIterator[Any]:
    rt = runtime_from_dict(config(approvals))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def status(rt: Any, approval: str) -> tuple[str, str | None, str | None]:
    a = rt.lifecycle.approvals[approval]
    return a.status, a.decided_by, a.decision_reason


def pending_gauge(rt: Any) -> float:
    return metric_value(rt.metrics.exposition().decode(), "infercore_approvals_pending", model="m")


def test_an_approval_records_the_primary_and_the_stage_it_was_asked_under() -> None:
    async def scenario() -> None:
        async with started(["canary"]) as rt:
            asked = await rt.lifecycle.promote("m", "3", "canary", weight=10, by="ann")
            approval = asked["approval"]
            assert (approval["primary"], approval["from_stage"]) == ("1", "shadow")
            [record] = [
                r for r in rt.lifecycle.audit.recent() if r["event"] == "approval_requested"
            ]
            assert (record["primary"], record["from"]) == ("1", "shadow")

    asyncio.run(scenario())


def test_a_new_primary_supersedes_every_pending_approval_of_the_model() -> None:
    """v3 -> primary asked while 1 is primary; meanwhile 2 is approved to primary. Approving
    the v3 step now would replace 2, which nobody who asked or approved it saw."""

    async def scenario() -> None:
        async with started(["canary", "primary"]) as rt:
            lc = rt.lifecycle
            three = (await lc.promote("m", "3", "primary", by="ann"))["approval"]["id"]
            canary = (await lc.promote("m", "3", "canary", weight=5, by="ann"))["approval"]["id"]
            two = (await lc.promote("m", "2", "primary", by="ann"))["approval"]["id"]
            assert pending_gauge(rt) == 3
            await lc.approve(two, by="bob")
            assert rt.models["m"].primary == "2"
            # At once: the list says so, the gauge drops, the audit record names them.
            for stale in (three, canary):
                state, by, why = status(rt, stale)
                assert (state, by) == ("superseded", "bob")
                assert why is not None
                assert why.startswith("the primary of model 'm' changed from '1' to '2'")
            assert pending_gauge(rt) == 0
            assert lc.describe("m")[0]["pending_approvals"] == []
            [promoted] = [r for r in lc.audit.recent() if r["event"] == "promoted"]
            assert sorted(promoted["superseded"]) == sorted([three, canary])
            with pytest.raises(Conflict) as refused:
                await lc.approve(three, by="bob")
            message = str(refused.value)
            assert f"approval {three} was superseded by bob" in message
            assert "changed from '1' to '2'" in message
            assert refused.value.hint is not None and "ask again" in refused.value.hint
            assert rt.models["m"].primary == "2"  # nothing moved
            assert rt.models["m"].versions["3"].stage == "shadow"

    asyncio.run(scenario())


def test_a_rollback_supersedes_every_pending_approval_of_the_model() -> None:
    async def scenario() -> None:
        async with started(["primary"]) as rt:
            lc = rt.lifecycle
            await lc.approve(
                (await lc.promote("m", "2", "primary", by="ann"))["approval"]["id"], by="b"
            )
            three = (await lc.promote("m", "3", "primary", by="ann"))["approval"]["id"]
            await lc.rollback("m", by="carol", reason="alert rate")
            assert rt.models["m"].primary == "1"
            state, by, why = status(rt, three)
            assert (state, by) == ("superseded", "carol")
            assert why == "model 'm' was rolled back by carol: the primary changed from '2' to '1'"
            [record] = [r for r in lc.audit.recent() if r["event"] == "rolled_back"]
            assert record["superseded"] == [three]
            with pytest.raises(Conflict, match="superseded by carol"):
                await lc.approve(three, by="bob")
            assert rt.models["m"].primary == "1"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ("primary", "the primary of model 'm' is '2' now; it was '1' when the step was asked for"),
        ("stage", "version '3' is candidate now; it was shadow when the step was asked for"),
    ],
)
def test_approving_a_step_whose_context_changed_otherwise_is_a_409_and_supersedes_it(
    change: str, said: str
) -> None:
    """A change made around the lifecycle (here: the runtime directly) is caught when the
    approval is decided: refused, marked superseded, audited."""

    async def scenario() -> None:
        async with started(["canary"]) as rt:
            lc = rt.lifecycle
            asked = (await lc.promote("m", "3", "canary", weight=10, by="ann"))["approval"]["id"]
            if change == "primary":
                rt.set_stage("m", "2", "primary")
            else:
                rt.set_stage("m", "3", "candidate")
            with pytest.raises(Conflict) as refused:
                await lc.approve(asked, by="bob")
            assert refused.value.status_code == 409 and refused.value.reason == "conflict"
            assert f"approval {asked} (model 'm' version '3' -> canary) is superseded" in str(
                refused.value
            )
            assert said in str(refused.value)
            assert (
                refused.value.hint
                == "ask again from the state now: infercore models promote m 3 --to canary"
            )
            state, by, why = status(rt, asked)
            assert (state, by) == ("superseded", "server")
            assert why == f"{said} (found when bob approved it)"
            assert rt.models["m"].versions["3"].stage != "canary"
            [record] = [r for r in lc.audit.recent() if r["event"] == "superseded"]
            assert (record["approval"], record["actor"], record["attempted_by"]) == (
                asked,
                "server",
                "bob",
            )
            assert pending_gauge(rt) == 0
            # Asking again from the state now works.
            if change == "primary":
                again = await lc.promote("m", "3", "canary", weight=10, by="ann")
                assert again["approval"]["primary"] == "2"

    asyncio.run(scenario())


def test_a_canary_step_is_not_superseded_by_weights_or_other_canaries() -> None:
    """Only what the step's meaning depends on: the primary and the version's own stage."""

    async def scenario() -> None:
        async with started(["canary"]) as rt:
            lc = rt.lifecycle
            three = (await lc.promote("m", "3", "canary", weight=10, by="ann"))["approval"]["id"]
            two = (await lc.promote("m", "2", "canary", weight=20, by="ann"))["approval"]["id"]
            await lc.approve(two, by="bob")
            await lc.set_weights("m", {"1": 90, "2": 10}, by="ann")
            done = await lc.approve(three, by="bob")
            assert done["approval"]["status"] == "approved"
            assert rt.models["m"].versions["3"].stage == "canary"

    asyncio.run(scenario())
