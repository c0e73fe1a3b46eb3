"""An admin call answers once its change is in ``admin.state_file``: a 2xx means a restart
(even after a SIGKILL) restores it. The write still happens on the writer's thread, and the
event loop goes on while it runs."""

from __future__ import annotations

import asyncio
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

    async def scenario() -> None:
        async with started(cfg) as rt, admin_client(rt) as admin:
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
            # The write goes on after the answer (held until released here).
            assert await asyncio.to_thread(held.entered.wait, 30)
            assert any("has taken over 0 s" in m for m in caplog.messages), caplog.messages
            held.release.set()
            assert await rt.lifecycle.flush()
            assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})

    asyncio.run(scenario())
