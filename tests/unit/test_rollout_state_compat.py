"""A state file written by a newer infercore: fields this one does not know are ignored with
one WARNING (a wrong type or a missing field is still refused, naming it); a newer format is
refused, naming both formats and the fix."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from test_rollout_state import config, errors, stages, started, write_repo

from infercore.lifecycle import state as rollout_state


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("infercore")
    ]


def test_fields_a_newer_infercore_added_are_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_repo(tmp_path, "3")
    cfg = config(tmp_path, approvals=("primary",))
    state = tmp_path / "state" / "rollout.json"

    async def first_run() -> str:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            await lc.load("m", "3", by="ann")
            await lc.promote("m", "2", "canary", weight=10, by="ann")
            asked = await lc.promote("m", "2", "primary", by="ann")
            return str(asked["approval"]["id"])

    approval = asyncio.run(first_run())
    # What a newer infercore might have added, in every kind of record.
    doc = json.loads(state.read_text())
    doc["written_by"] = "infercore 9.0"
    m = doc["models"]["m"]
    m["notes"] = "pinned by the release train"
    m["recipe"]["routing"] = {"kind": "header"}
    m["recipe"]["repository"]["warmup"] = True
    m["versions"]["2"]["ramp"] = {"step": 5}
    m["versions"]["3"]["ramp"] = {"step": 1}
    doc["approvals"][0]["risk"] = "low"
    state.write_text(json.dumps(doc))

    async def second_run() -> None:
        async with started(cfg) as rt:
            assert stages(rt) == {
                "1": ("primary", 0.0, "ready"),
                "2": ("canary", 10.0, "ready"),
                "3": ("candidate", 0.0, "ready"),
            }
            lc = rt.lifecycle
            assert [a["id"] for a in lc.list_approvals("pending")] == [approval]
            await lc.reject(approval, by="bob")
        # Saved by this infercore: without the fields it does not know.
        again = json.loads(state.read_text())
        assert "written_by" not in again and "notes" not in again["models"]["m"]
        assert "ramp" not in again["models"]["m"]["versions"]["2"]

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(second_run())
    assert errors(caplog) == []
    [warning] = [w for w in warnings_of(caplog) if "does not know" in w]
    assert warning.startswith(f"admin.state_file {str(state)!r}: ignored field(s) this ")
    assert (
        "does not know: approvals[].risk, models.<model>.notes, models.<model>.recipe.repository"
        ".warmup, models.<model>.recipe.routing, models.<model>.versions.<version>.ramp, "
        "written_by (a newer infercore wrote the file)" in warning
    ), warning
    assert "the next rollout change saves it without them" in warning
    assert any("restored the rollout saved at" in r.getMessage() for r in caplog.records)


def test_a_file_without_unknown_fields_restores_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())

    async def first_run() -> None:
        async with started(cfg) as rt:
            await rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann")

    asyncio.run(first_run())
    with caplog.at_level(logging.INFO, logger="infercore"):

        async def second_run() -> None:
            async with started(cfg) as rt:
                assert stages(rt)["2"] == ("canary", 10.0, "ready")

        asyncio.run(second_run())
    assert not [w for w in warnings_of(caplog) if "does not know" in w]


def _state(**extra: Any) -> dict[str, Any]:
    return {"format": 1, "saved_at": "t", "models": {}, **extra}


@pytest.mark.parametrize(
    ("doc", "said"),
    [
        (
            _state(models={"m": {"recipe": {}, "primary": 3, "versions": {}, "new": 1}}),
            'Expected `str`, got `int` - at `$.models["m"].primary`',
        ),
        (
            _state(models={"m": {"recipe": {}, "versions": {}, "new": 1}}),
            'Object missing required field `primary` - at `$.models["m"]`',
        ),
        (
            _state(approvals=[{"id": "a1", "risk": "low"}], new=True),
            "Object missing required field `model` - at `$.approvals[0]`",
        ),
        (
            _state(
                models={
                    "m": {
                        "recipe": {},
                        "primary": "1",
                        "versions": {"1": {"stage": "primary", "weight": "full", "ramp": 1}},
                    }
                }
            ),
            'Expected `float`, got `str` - at `$.models["m"].versions["1"].weight`',
        ),
    ],
)
def test_a_wrong_type_or_a_missing_field_beside_unknown_ones_is_still_refused(
    doc: dict[str, Any], said: str
) -> None:
    with pytest.raises(rollout_state.Unrestorable) as refused:
        rollout_state.read_state(json.dumps(doc).encode())
    assert refused.value.what == f"the file is not a valid rollout state ({said})"


def test_the_unknown_fields_are_named_once_each() -> None:
    version = {"stage": "candidate", "ramp": 1}
    model = {"recipe": {"x": 1}, "primary": "1", "versions": {"1": version, "2": version}}
    approval = {
        "id": "a",
        "model": "m",
        "version": "1",
        "to": "canary",
        "weight": None,
        "requested_by": "ann",
        "requested_at": "t",
        "reason": "",
        "gates": ["canary"],
        "risk": "low",
    }
    doc = _state(models={"m": model, "n": model}, approvals=[approval, approval])
    saved, unknown = rollout_state.read_state(json.dumps(doc).encode())
    assert unknown == [
        "approvals[].risk",
        "models.<model>.recipe.x",
        "models.<model>.versions.<version>.ramp",
    ]
    assert saved.models["m"].recipe == {}
    assert saved.approvals[0].id == "a"


def test_the_recipe_keys_a_state_knows_are_the_ones_it_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(config(tmp_path)) as rt:
            recipe = rollout_state.recipe_rollout(rt.lifecycle, "m")
            assert tuple(recipe) == rollout_state._RECIPE_KEYS
            assert tuple(recipe["repository"]) == rollout_state._RECIPE_REPOSITORY_KEYS

    asyncio.run(scenario())


def test_a_newer_format_is_refused_naming_both_formats_and_the_fix() -> None:
    newer = _state(format=rollout_state.FORMAT + 1, approvals=[], shards=[{"id": 1}])
    with pytest.raises(rollout_state.Unrestorable) as refused:
        rollout_state.decode(json.dumps(newer).encode())
    assert refused.value.what == (
        f"the file holds rollout state format {rollout_state.FORMAT + 1}, written by a newer "
        f"infercore; this infercore reads format {rollout_state.FORMAT}"
    )
    assert refused.value.fix == (
        f"upgrade infercore to the version that wrote it (it reads format "
        f"{rollout_state.FORMAT + 1}), or delete the state file to start from the recipe's "
        "rollout"
    )


def test_a_newer_format_serves_the_recipe_and_keeps_the_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())
    state = tmp_path / "state" / "rollout.json"
    state.parent.mkdir()
    content = json.dumps(_state(format=2, models={"m": {"anything": "new"}})).encode()
    state.write_bytes(content)

    async def scenario() -> None:
        async with started(cfg) as rt:
            assert stages(rt) == {"1": ("primary", 0.0, "ready"), "2": ("shadow", 0.0, "ready")}
            assert state.read_bytes() == content  # left as it is until a change is saved
            await rt.lifecycle.promote("m", "2", "canary", weight=5, by="ann")
            assert state.with_name("rollout.json.unapplied").read_bytes() == content
            assert json.loads(state.read_text())["format"] == 1

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(scenario())
    [error] = errors(caplog)
    assert "rollout state format 2, written by a newer infercore" in error
    assert "this infercore reads format 1" in error
    assert "Fix: upgrade infercore to the version that wrote it (it reads format 2)" in error
