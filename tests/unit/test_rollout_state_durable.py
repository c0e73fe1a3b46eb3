"""An admin call answers once its change is in ``admin.state_file``, at most
``STATE_WAIT_S``, and its answer says in ``"state_file"`` how the write went: ``written`` (a
restart, even after a SIGKILL, restores it), ``failed`` or ``writing``. The write still happens
on the writer's thread, and the event loop goes on while it runs."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_rollout_state import (
    _HeldWrites,
    config,
    errors,
    saved_primary_and_canaries,
    started,
    write_repo,
)

from infercore.lifecycle import state as rollout_state
from infercore.server.admin import create_admin_app

TOKEN = "t0ken-for-tests-0123456789"


@asynccontextmanager
async def admin_client(rt: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_admin_app(rt, TOKEN))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://admin",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as client:
        yield client


def saved(state: Path) -> dict[str, Any]:
    return json.loads(state.read_text())  # type: ignore[no-any-return]


def test_an_admin_call_answers_once_its_change_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
            call = asyncio.create_task(
                admin.post(
                    "/admin/models/m/versions/2/promote",
                    json={"to": "canary", "weight": 10, "by": "ann"},
                )
            )
            assert await asyncio.to_thread(held.entered.wait, 30)
            for _ in range(200):  # the call goes as far as it can: it waits for the write
                await asyncio.sleep(0)
            assert rt.models["m"].versions["2"].weight == 10  # made
            assert not call.done(), "the admin call answered before its change was on disk"
            held.release.set()
            answer = await call
            assert answer.status_code == 200, answer.text
            # Read right after the answer: no flush, no sleep.
            assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})

    asyncio.run(scenario())


def test_every_admin_change_is_in_the_file_when_its_call_answers(tmp_path: Path) -> None:
    """Each kind of change, read back the moment its call answers."""
    write_repo(tmp_path, "3")
    cfg = config(tmp_path, approvals=("primary",))
    state = tmp_path / "state" / "rollout.json"

    answers: list[httpx.Response] = []

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:

            async def keep(answer: httpx.Response) -> None:
                await answer.aread()
                answers.append(answer)

            admin.event_hooks = {"request": [], "response": [keep]}
            promote = "/admin/models/m/versions/{}/promote"
            r = await admin.post(promote.format(2), json={"to": "canary", "weight": 10, "by": "a"})
            assert r.status_code == 200, r.text
            assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})

            r = await admin.put(
                "/admin/models/m/weights", json={"weights": {"1": 70, "2": 30}, "by": "a"}
            )
            assert r.status_code == 200, r.text
            assert saved_primary_and_canaries(state) == ("1", {"2": 30.0})

            r = await admin.post(promote.format(2), json={"to": "primary", "by": "ann"})
            assert r.status_code == 202, r.text
            first = r.json()["approval"]["id"]
            assert [a["id"] for a in saved(state)["approvals"]] == [first]

            r = await admin.post(f"/admin/approvals/{first}/reject", json={"by": "bob"})
            assert r.status_code == 200, r.text
            assert saved(state)["approvals"] == []

            r = await admin.post(promote.format(2), json={"to": "primary", "by": "ann"})
            second = r.json()["approval"]["id"]
            r = await admin.post(f"/admin/approvals/{second}/approve", json={"by": "bob"})
            assert r.status_code == 200, r.text
            assert saved_primary_and_canaries(state) == ("2", {})
            assert saved(state)["approvals"] == []

            r = await admin.post("/admin/models/m/rollback", json={"by": "bob"})
            assert r.status_code == 200, r.text
            assert saved_primary_and_canaries(state) == ("1", {})

            load = {"parameters": {"version": "3", "by": "ann"}}
            r = await admin.post("/v2/repository/models/m/load", json=load)
            assert r.status_code == 200, r.text
            v3 = saved(state)["models"]["m"]["versions"]["3"]
            assert (v3["origin"], v3.get("loaded", True)) == ("repository", True)

            r = await admin.post("/v2/repository/models/m/unload", json=load)
            assert r.status_code == 200, r.text
            assert saved(state)["models"]["m"]["versions"]["3"]["loaded"] is False

    asyncio.run(scenario())
    # Every answer, the 202 that asks for an approval too, says the change is on disk.
    assert len(answers) == 9
    assert [a.json()["state_file"] for a in answers] == ["written"] * 9


def test_a_call_that_stops_waiting_leaves_its_write_and_the_writer_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves cancels its call's wait, not the write: the change is saved, and
    the writer goes on saving the next ones."""
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)

    async def scenario() -> None:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            call = asyncio.create_task(lc.promote("m", "2", "canary", weight=10, by="ann"))
            assert await asyncio.to_thread(held.entered.wait, 30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            held.release.set()
            assert await lc.flush(30)
            assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})
            # The writer is still there: the next call's change is saved when it answers.
            await asyncio.wait_for(lc.set_weights("m", {"1": 80, "2": 20}, by="ann"), 30)
            assert saved_primary_and_canaries(state) == ("1", {"2": 20.0})

    with caplog.at_level(logging.WARNING, logger="infercore"):
        asyncio.run(scenario())
    assert errors(caplog) == []


def test_a_409_for_a_superseded_approval_answers_once_the_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Approving a restored approval asked under another primary supersedes it (a change)
    and is refused: the refusal, too, waits until the file no longer holds the approval."""
    from infercore.runtime.errors import Conflict

    cfg = config(tmp_path)
    state = tmp_path / "state" / "rollout.json"

    async def first_run() -> str:
        async with started(cfg) as rt:
            asked = await rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann")
            return str(asked["approval"]["id"])

    pending = asyncio.run(first_run())
    doc = saved(state)
    doc["approvals"][0]["primary"] = "0"  # asked under a primary that is not the one now
    state.write_text(json.dumps(doc))

    async def second_run() -> None:
        async with started(cfg) as rt:
            held = _HeldWrites(monkeypatch)
            call = asyncio.create_task(rt.lifecycle.approve(pending, by="bob"))
            assert await asyncio.to_thread(held.entered.wait, 30)
            for _ in range(200):
                await asyncio.sleep(0)
            assert not call.done(), "the 409 came before the supersession was on disk"
            held.release.set()
            with pytest.raises(Conflict, match="superseded"):
                await call
            assert saved(state)["approvals"] == []  # read right after: no flush, no sleep

    asyncio.run(second_run())


def test_a_hung_volume_holds_an_admin_call_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``STATE_WAIT_S`` the call answers (the change made) with a WARNING, and the write
    lands once the volume answers."""
    from infercore.lifecycle import manager

    monkeypatch.setattr(manager, "STATE_WAIT_S", 0.05)
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
            with caplog.at_level(logging.WARNING, logger="infercore.lifecycle"):
                answer = await admin.post(
                    "/admin/models/m/versions/2/promote",
                    json={"to": "canary", "weight": 10, "by": "ann"},
                )
            assert answer.status_code == 200, answer.text
            # The answer says the change is not on disk yet; the rest of it is as ever.
            assert answer.json()["state_file"] == "writing"
            assert answer.json()["status"] == "applied"
            # The write goes on after the answer (held until released here).
            assert await asyncio.to_thread(held.entered.wait, 30)
            assert any("has taken over 0 s" in m for m in caplog.messages), caplog.messages
            held.release.set()
            assert await rt.lifecycle.flush()
            assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})

    asyncio.run(scenario())


def test_an_answer_says_when_the_write_of_its_change_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk: the change is made and the call answers 2xx, with ``"state_file":
    "failed"``; the next change, once the disk has room, says ``written``."""
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"

    def disk_full(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
            monkeypatch.setattr(rollout_state, "_replace", disk_full)
            answer = await admin.post(
                "/admin/models/m/versions/2/promote",
                json={"to": "canary", "weight": 10, "by": "ann"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["state_file"] == "failed"
            assert answer.json()["status"] == "applied"
            assert rt.models["m"].versions["2"].weight == 10  # made all the same
            assert not state.exists()  # but not on disk (the first change since the start)
            monkeypatch.undo()
            answer = await admin.put(
                "/admin/models/m/weights", json={"weights": {"1": 80, "2": 20}, "by": "ann"}
            )
            assert answer.json()["state_file"] == "written", answer.text
            assert saved_primary_and_canaries(state) == ("1", {"2": 20.0})

    with caplog.at_level(logging.ERROR, logger="infercore"):
        asyncio.run(scenario())
    assert any("No space left on device" in m for m in errors(caplog)), caplog.messages


def test_without_a_state_file_an_answer_has_no_state_file_field(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        state=False,
        approvals=(),
        routing={"kind": "shadow", "inner": {"kind": "weighted"}},
    )

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
            answer = await admin.post(
                "/admin/models/m/versions/2/promote",
                json={"to": "canary", "weight": 10, "by": "ann"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "applied"
            assert "state_file" not in answer.json()

    asyncio.run(scenario())


def test_a_whole_model_load_answers_how_its_last_write_went(tmp_path: Path) -> None:
    """A V2 load without a version loads each recipe version that is not serving: the last
    write holds them all, and its outcome is the answer's. Nothing to load: nothing written."""
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
            load = "/v2/repository/models/m/load"
            r = await admin.post(load, json={})
            assert r.status_code == 200, r.text
            assert r.json() == {"status": "loaded", "versions": []}  # all serving already
            unload = {"parameters": {"version": "2"}}
            r = await admin.post("/v2/repository/models/m/unload", json=unload)
            assert r.json()["state_file"] == "written", r.text
            r = await admin.post(load, json={})
            assert r.status_code == 200, r.text
            assert [v["version"] for v in r.json()["versions"]] == ["2"]
            assert r.json()["state_file"] == "written"
            assert saved(state)["models"]["m"]["versions"]["2"].get("loaded", True) is True

    asyncio.run(scenario())
