"""The admin API in process: authentication, the repository extension, rollouts, approvals.

Every refusal is a 4xx with a reason, and changes nothing (the model's description before and
after are equal).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_support import AUTH, TOKEN, run

from infercore.artifacts import sha256_file
from infercore.config.rollout import AdminConfig
from infercore.errors import ConfigError, InvalidInput
from infercore.server.admin import AdminListener, load_token
from infercore.testing import metric_value, runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"

needs_iris = pytest.mark.skipif(not IRIS_ONNX.is_file(), reason="iris model not built")


def fake(offset: float = 0.0, **options: Any) -> dict[str, Any]:
    return {"kind": "fake", "offset": offset, **options}


def rollout_config(audit: Path | None = None, **rollout: Any) -> dict[str, Any]:
    """Model m: primary 1, 2 in shadow, 3 a candidate; canary and primary need approval."""
    cfg: dict[str, Any] = {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": fake(0)},
                    "2": {"loader": fake(100), "stage": "shadow"},
                    "3": {"loader": fake(200)},
                },
                "routing": {
                    "kind": "header",
                    "inner": {"kind": "shadow", "inner": {"kind": "weighted"}},
                },
                "rollout": {"approvals": ["canary", "primary"], **rollout},
            }
        },
    }
    if audit is not None:
        cfg["admin"] = {"audit_log": str(audit)}
    return cfg


def assert_refused(r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["reason"] == reason, doc
    assert doc["error"] and "Traceback" not in r.text
    return doc


def body(first: float = 1.0) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [first, 2, 3, 4]}]
    }


# -- authentication and separation ---------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/m/load"),
    ("POST", "/v2/repository/models/m/unload"),
    ("GET", "/admin/models"),
    ("GET", "/admin/models/m"),
    ("POST", "/admin/models/m/versions/2/promote"),
    ("PUT", "/admin/models/m/weights"),
    ("POST", "/admin/models/m/rollback"),
    ("GET", "/admin/models/m/shadow"),
    ("GET", "/admin/approvals"),
    ("POST", "/admin/approvals/abc/approve"),
    ("POST", "/admin/approvals/abc/reject"),
    ("GET", "/admin/audit"),
]


def test_admin_needs_a_bearer_token_and_compares_it() -> None:
    rt = runtime_from_dict(rollout_config())

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        for method, path in ADMIN_ROUTES:
            r = await a.request(method, path, headers={"Authorization": ""})
            assert_refused(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            r = await a.request(method, path, headers={"Authorization": f"Bearer {TOKEN}x"})
            assert_refused(r, 403, "unauthorized")
            r = await a.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
            assert_refused(r, 401, "unauthorized")
        # Authentication comes before routing: an unknown path says nothing without a token.
        r = await a.get("/nothing/here", headers={"Authorization": ""})
        assert_refused(r, 401, "unauthorized")
        assert (await a.get("/nothing/here")).status_code == 404
        assert (await a.get("/admin/models")).status_code == 200
        assert (
            await a.get("/admin/models", headers={"authorization": f"bearer {TOKEN}"})
        ).status_code == 200

    run(rt, scenario)


def test_admin_routes_answer_404_on_the_inference_listener() -> None:
    rt = runtime_from_dict(rollout_config())

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        for method, path in ADMIN_ROUTES:
            r = await i.request(method, path, headers=AUTH, json={})
            assert r.status_code == 404, (method, path, r.status_code)
        assert (await i.post("/v2/models/m/infer", json=body())).status_code == 200

    run(rt, scenario)


def test_an_admin_body_msgspec_cannot_read_is_400() -> None:
    rt = runtime_from_dict(rollout_config())
    deep = b"[" * 1000 + b"]" * 1000
    bodies = {
        b'{"parameters": {"note": "\xff"}}': "not valid UTF-8",
        b'{"parameters": {"note": ' + deep + b"}}": "nested too deeply",
        b"{": "malformed JSON",
    }

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        for content, named in bodies.items():
            r = await a.post(
                "/v2/repository/models/m/load",
                content=content,
                headers={"content-type": "application/json"},
            )
            assert named in assert_refused(r, 400, "invalid_input")["error"]
        assert (await a.get("/admin/models")).status_code == 200

    run(rt, scenario)


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INFERCORE_ADMIN_TOKEN is not set"):
        load_token(AdminConfig(enabled=True), {})
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_token(AdminConfig(enabled=True), {"INFERCORE_ADMIN_TOKEN": "short"})
    assert load_token(AdminConfig(enabled=True), {"INFERCORE_ADMIN_TOKEN": TOKEN}) == TOKEN
    assert load_token(AdminConfig(auth_env="MY_TOKEN"), {"MY_TOKEN": f" {TOKEN}\n"}) == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert load_token(AdminConfig(auth_file=str(token_file)), {}) == TOKEN
    with pytest.raises(ConfigError, match="cannot read the token file"):
        load_token(AdminConfig(auth_file=str(tmp_path / "missing")), {})
    # Off by default: no listener, no token needed.
    assert AdminListener.from_runtime(runtime_from_dict(rollout_config()), {}) is None
    enabled = rollout_config()
    enabled["admin"] = {"enabled": True}
    with pytest.raises(ConfigError):
        AdminListener.from_runtime(runtime_from_dict(enabled), {})


def test_the_admin_listener_serves_on_a_private_unix_socket(tmp_path: Path) -> None:
    cfg = rollout_config()
    sock = tmp_path / "admin.sock"
    cfg["admin"] = {"enabled": True, "uds": str(sock)}
    rt = runtime_from_dict(cfg)

    async def scenario() -> tuple[int, int, int]:
        listener = AdminListener.from_runtime(rt, {"INFERCORE_ADMIN_TOKEN": TOKEN})
        assert listener is not None
        await rt.start()
        await listener.start()
        try:
            mode = sock.stat().st_mode & 0o777
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as c:
                ok = (await c.get("/admin/models", headers=AUTH)).status_code
                refused = (await c.get("/admin/models")).status_code
        finally:
            await listener.stop()
            await rt.stop()
        return mode, ok, refused

    mode, ok, refused = asyncio.run(scenario())
    assert mode == 0o600
    assert (ok, refused) == (200, 401)
    assert not sock.exists()


# -- the lifecycle with approvals, end to end ----------------------------------------------


def test_the_approval_flow_end_to_end_with_refusals(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "decisions.jsonl"
    rt = runtime_from_dict(rollout_config(audit))

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> dict[str, Any]:
        async def state() -> Any:
            return (await a.get("/admin/models/m")).json()

        start = await state()
        assert [(v["version"], v["stage"]) for v in start["versions"]] == [
            ("1", "primary"),
            ("2", "shadow"),
            ("3", "candidate"),
        ]
        # Refusals: each a 4xx, nothing changed.
        refusals = [
            (
                a.post("/admin/models/m/versions/9/promote", json={"to": "canary", "by": "ann"}),
                404,
                "model_not_found",
            ),
            (
                a.post("/admin/models/nope/versions/2/promote", json={"to": "canary", "by": "ann"}),
                404,
                "model_not_found",
            ),
            (
                a.post("/admin/models/a..b/versions/2/promote", json={"to": "canary", "by": "ann"}),
                400,
                "invalid_input",
            ),
            (
                a.post("/admin/models/m/versions/2/promote", json={"to": "sideways", "by": "ann"}),
                400,
                "invalid_input",
            ),
            (
                a.post("/admin/models/m/versions/2/promote", json={"to": "canary"}),
                400,
                "invalid_input",
            ),
            (
                a.post(
                    "/admin/models/m/versions/2/promote",
                    json={"to": "canary", "by": "ann", "path": "/etc"},
                ),
                400,
                "invalid_input",
            ),
            (
                a.post("/admin/models/m/versions/1/promote", json={"to": "retired", "by": "ann"}),
                409,
                "conflict",
            ),
            (
                a.post("/admin/models/m/versions/2/promote", json={"to": "shadow", "by": "ann"}),
                409,
                "conflict",
            ),
            (
                a.post(
                    "/admin/models/m/versions/2/promote",
                    json={"to": "shadow", "by": "ann", "weight": 5},
                ),
                409,
                "conflict",
            ),
            # Weights for a version in shadow would skip the canary approval.
            (
                a.put("/admin/models/m/weights", json={"weights": {"1": 90, "2": 10}, "by": "ann"}),
                409,
                "conflict",
            ),
            (
                a.put("/admin/models/m/weights", json={"weights": {"1": 90}, "by": "ann"}),
                400,
                "invalid_input",
            ),
            # A version given twice would mean its last value: refused, whatever the values.
            (
                a.put(
                    "/admin/models/m/weights",
                    content=b'{"weights": {"1": 50, "2": 50, "2": 0}, "by": "ann"}',
                    headers={"content-type": "application/json"},
                ),
                400,
                "invalid_input",
            ),
            (
                a.put("/admin/models/m/weights", json={"weights": {"1": 100, "7": 0}, "by": "ann"}),
                404,
                "model_not_found",
            ),
            (a.post("/admin/models/m/rollback", json={"by": "ann"}), 409, "conflict"),
            (a.post("/admin/approvals/deadbeef/approve", json={"by": "bob"}), 404, "not_found"),
            (
                a.post("/admin/approvals/deadbeef/approve", content=b"{not json"),
                400,
                "invalid_input",
            ),
        ]
        for call, status, reason in refusals:
            assert_refused(await call, status, reason)
        assert await state() == start

        # Promotion to canary needs an approval: the call only asks for one.
        r = await a.post(
            "/admin/models/m/versions/2/promote",
            json={"to": "canary", "weight": 10, "by": "ann", "reason": "shadow agrees"},
        )
        assert r.status_code == 202, r.text
        approval = r.json()["approval"]
        assert approval["status"] == "pending" and approval["gates"] == ["canary"]
        assert await state() == {**start, "pending_approvals": [approval["id"]]}
        dup = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 10, "by": "ann"}
        )
        assert_refused(dup, 409, "conflict")
        pending = (await a.get("/admin/approvals", params={"status": "pending"})).json()
        assert [p["id"] for p in pending] == [approval["id"]]
        assert_refused(
            await a.get("/admin/approvals", params={"status": "maybe"}), 400, "invalid_input"
        )

        r = await a.post(
            f"/admin/approvals/{approval['id']}/approve", json={"by": "bob", "reason": "ok"}
        )
        assert r.status_code == 200, r.text
        after = r.json()["model"]
        assert {v["version"]: (v["stage"], v.get("weight")) for v in after["versions"]}["2"] == (
            "canary",
            10.0,
        )
        again = await a.post(f"/admin/approvals/{approval['id']}/approve", json={"by": "bob"})
        assert "already approved" in assert_refused(again, 409, "conflict")["error"]
        assert_refused(
            await a.post(f"/admin/approvals/{approval['id']}/reject", json={"by": "bob"}),
            409,
            "conflict",
        )

        # Traffic now reaches the canary; weights must add up and name the primary.
        seen = set()
        for _ in range(200):
            seen.add((await i.post("/v2/models/m/infer", json=body())).json()["model_version"])
        assert seen == {"1", "2"}
        bad = await a.put(
            "/admin/models/m/weights", json={"weights": {"1": 80, "2": 30}, "by": "ann"}
        )
        assert "add up to 110" in assert_refused(bad, 400, "invalid_input")["error"]
        ok = await a.put(
            "/admin/models/m/weights", json={"weights": {"1": 75, "2": 25}, "by": "ann"}
        )
        assert ok.status_code == 200

        # To primary: another approval; this one is rejected, then asked again and approved.
        r = await a.post("/admin/models/m/versions/2/promote", json={"to": "primary", "by": "ann"})
        assert r.status_code == 202
        first = r.json()["approval"]["id"]
        r = await a.post(
            f"/admin/approvals/{first}/reject", json={"by": "bob", "reason": "not yet"}
        )
        assert r.json()["approval"]["status"] == "rejected"
        assert (await state())["primary"] == "1"
        r = await a.post("/admin/models/m/versions/2/promote", json={"to": "primary", "by": "ann"})
        second = r.json()["approval"]["id"]
        r = await a.post(f"/admin/approvals/{second}/approve", json={"by": "bob"})
        assert r.json()["model"]["primary"] == "2"
        r = await i.post("/v2/models/m/infer", json=body())
        assert r.json()["model_version"] == "2"

        # A candidate straight to primary passes both gates: one approval covers both.
        r = await a.post("/admin/models/m/versions/3/promote", json={"to": "primary", "by": "ann"})
        assert r.json()["approval"]["gates"] == ["canary", "primary"]

        # Rollback to the last primary is one call, with no approval.
        r = await a.post("/admin/models/m/rollback", json={"by": "carol", "reason": "alerts"})
        assert r.status_code == 200 and r.json()["model"]["primary"] == "1"
        r = await i.post("/v2/models/m/infer", json=body())
        assert r.json()["model_version"] == "1"
        # Moving back needs no approval.
        r = await a.post("/admin/models/m/versions/2/promote", json={"to": "shadow", "by": "ann"})
        assert r.status_code == 200
        return (await a.get("/admin/audit", params={"limit": 100})).json()

    recent = run(rt, scenario)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert lines == recent
    events = [(r["event"], r.get("actor")) for r in lines]
    assert events == [
        ("approval_requested", "ann"),
        ("approved", "bob"),
        ("promoted", "bob"),
        ("weights_set", "ann"),
        ("approval_requested", "ann"),
        ("rejected", "bob"),
        ("approval_requested", "ann"),
        ("approved", "bob"),
        ("promoted", "bob"),
        ("approval_requested", "ann"),
        ("rolled_back", "carol"),
        ("promoted", "ann"),
    ]
    assert all(r["ts"].endswith("Z") for r in lines)
    promoted = lines[2]
    assert (promoted["requested_by"], promoted["to"], promoted["weight"]) == ("ann", "canary", 10)
    assert lines[5]["reason"] == "not yet" and lines[10]["reason"] == "alerts"


def test_a_distinct_approver_can_be_required() -> None:
    rt = runtime_from_dict(rollout_config(distinct_approver=True))

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post("/admin/models/m/versions/2/promote", json={"to": "canary", "by": "ann"})
        approval = r.json()["approval"]["id"]
        own = await a.post(f"/admin/approvals/{approval}/approve", json={"by": "ann"})
        assert "another person" in assert_refused(own, 409, "conflict")["error"]
        assert (
            await a.post(f"/admin/approvals/{approval}/approve", json={"by": "bob"})
        ).status_code == 200

    run(rt, scenario)


def test_an_approval_is_checked_again_when_approved() -> None:
    rt = runtime_from_dict(rollout_config())

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        first = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 60, "by": "ann"}
        )
        await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}})
        other = await a.post(
            "/admin/models/m/versions/3/promote", json={"to": "canary", "weight": 60, "by": "ann"}
        )
        r = await a.post(
            f"/admin/approvals/{other.json()['approval']['id']}/approve", json={"by": "bob"}
        )
        assert r.status_code == 200, r.text
        # Meanwhile another canary took 60 %: approving this one now cannot apply; it stays pending.
        approval = first.json()["approval"]["id"]
        late = await a.post(f"/admin/approvals/{approval}/approve", json={"by": "bob"})
        assert "add up to 120" in assert_refused(late, 400, "invalid_input")["error"]
        pending = (await a.get("/admin/approvals", params={"status": "pending"})).json()
        assert [p["id"] for p in pending] == [approval]

    run(rt, scenario)


async def pending_gauge(i: httpx.AsyncClient) -> float:
    for line in (await i.get("/metrics")).text.splitlines():
        if line.startswith('infercore_approvals_pending{model="m"}'):
            return float(line.split()[-1])
    raise AssertionError("no infercore_approvals_pending sample")


def test_approvals_made_stale_by_a_move_rollback_or_unload_are_superseded(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    rt = runtime_from_dict(rollout_config(audit))

    async def ask(a: httpx.AsyncClient, version: str, to: str, **extra: Any) -> str:
        r = await a.post(
            f"/admin/models/m/versions/{version}/promote", json={"to": to, "by": "ann", **extra}
        )
        assert r.status_code == 202, r.text
        return str(r.json()["approval"]["id"])

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        # 2 asks for canary and for primary; the primary approval applied, the canary one is stale.
        canary = await ask(a, "2", "canary", weight=10)
        primary = await ask(a, "2", "primary")
        assert await pending_gauge(i) == 2
        r = await a.post(f"/admin/approvals/{primary}/approve", json={"by": "bob"})
        assert r.json()["model"]["primary"] == "2"
        assert (await a.get("/admin/approvals", params={"status": "pending"})).json() == []
        assert (await a.get("/admin/models/m")).json()["pending_approvals"] == []
        assert await pending_gauge(i) == 0
        [stale] = (await a.get("/admin/approvals", params={"status": "superseded"})).json()
        assert (stale["id"], stale["decided_by"]) == (canary, "bob")
        late = await a.post(f"/admin/approvals/{canary}/approve", json={"by": "bob"})
        error = assert_refused(late, 409, "conflict")["error"]
        assert f"approval {canary} was superseded by bob" in error
        assert "version '2' moved shadow -> primary" in error and "ask again" in error
        assert_refused(
            await a.post(f"/admin/approvals/{canary}/reject", json={"by": "bob"}), 409, "conflict"
        )

        # A rollback supersedes what was asked for the versions it takes traffic from.
        await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}})
        r = await a.post(
            f"/admin/approvals/{await ask(a, '3', 'canary', weight=10)}/approve", json={"by": "bob"}
        )
        assert r.status_code == 200, r.text
        to_primary = await ask(a, "3", "primary")
        assert await pending_gauge(i) == 1
        r = await a.post("/admin/models/m/rollback", json={"by": "carol"})
        assert r.json()["model"]["primary"] == "1"
        assert await pending_gauge(i) == 0
        late = await a.post(f"/admin/approvals/{to_primary}/approve", json={"by": "bob"})
        assert "rolled back by carol" in assert_refused(late, 409, "conflict")["error"]
        assert (await a.get("/admin/models/m")).json()["primary"] == "1"

        # An unload supersedes the version's pending approvals.
        again = await ask(a, "3", "primary")
        assert await pending_gauge(i) == 1
        r = await a.post("/v2/repository/models/m/unload", json={"parameters": {"version": "3"}})
        assert r.status_code == 200
        assert await pending_gauge(i) == 0
        late = await a.post(f"/admin/approvals/{again}/approve", json={"by": "bob"})
        assert "unloaded by repository-api" in assert_refused(late, 409, "conflict")["error"]

    run(rt, scenario)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    superseded = {r["event"]: r["superseded"] for r in records if "superseded" in r}
    assert set(superseded) == {"promoted", "rolled_back", "unloaded"}
    assert all(len(ids) == 1 for ids in superseded.values())


def _fill_disk(path: Path) -> None:
    """A full disk: the file opens, and every write fails (ENOSPC)."""
    path.unlink()
    path.symlink_to("/dev/full")


@pytest.mark.parametrize("failure", ["unwritable", "disk_full"])
def test_every_change_is_refused_when_the_audit_log_cannot_be_written(
    tmp_path: Path, make_unwritable: Callable[[Path], None], failure: str
) -> None:
    if failure == "disk_full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    fail = make_unwritable if failure == "unwritable" else _fill_disk
    audit = tmp_path / "audit.jsonl"
    rt = runtime_from_dict(rollout_config(audit, approvals=["primary"]))

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 10, "by": "ann"}
        )
        assert r.status_code == 200, r.text
        r = await a.post("/admin/models/m/versions/2/promote", json={"to": "primary", "by": "ann"})
        approval = r.json()["approval"]["id"]
        await a.post("/v2/repository/models/m/unload", json={"parameters": {"version": "3"}})
        fail(audit)

        async def state() -> Any:
            return (await a.get("/admin/models/m")).json(), (await a.get("/admin/audit")).json()

        before = await state()
        calls = [
            a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}}),
            a.post("/v2/repository/models/m/load", json={"parameters": {"version": "2"}}),
            a.post("/v2/repository/models/m/load"),
            a.post("/v2/repository/models/m/unload", json={"parameters": {"version": "2"}}),
            a.post("/admin/models/m/versions/2/promote", json={"to": "shadow", "by": "ann"}),
            a.put("/admin/models/m/weights", json={"weights": {"1": 80, "2": 20}, "by": "ann"}),
            a.post("/admin/models/m/rollback", json={"by": "ann"}),
            a.post(f"/admin/approvals/{approval}/approve", json={"by": "bob"}),
            a.post(f"/admin/approvals/{approval}/reject", json={"by": "bob"}),
        ]
        for call in calls:
            doc = assert_refused(await call, 503, "audit_unavailable")
            assert "nothing changed" in doc["error"]
            assert await state() == before
        assert not rt.models["m"].versions["3"].ready

    run(rt, scenario)


def test_weights_that_do_not_add_up_are_a_400_whatever_the_versions_stages() -> None:
    """What the body says wrong (400) is said before what the state refuses (409)."""
    rt = runtime_from_dict(rollout_config())  # 2 is a shadow: it takes no weight

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        url = "/admin/models/m/weights"
        r = await a.put(url, json={"weights": {"1": 50, "2": 40}, "by": "ann"})
        assert "add up to 90" in assert_refused(r, 400, "invalid_input")["error"]
        r = await a.put(url, json={"weights": {"2": 100}, "by": "ann"})
        assert "must include the primary" in assert_refused(r, 400, "invalid_input")["error"]
        r = await a.put(url, json={"weights": {"1": 50, "2": 50}, "by": "ann"})
        assert "only the primary and canaries" in assert_refused(r, 409, "conflict")["error"]

    run(rt, scenario)


def test_a_gated_primary_cannot_be_bypassed_by_weights() -> None:
    rt = runtime_from_dict(rollout_config())  # canary and primary need approval

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 5, "by": "ann"}
        )
        await a.post(f"/admin/approvals/{r.json()['approval']['id']}/approve", json={"by": "bob"})
        before = (await a.get("/admin/models/m")).json()
        r = await a.put(
            "/admin/models/m/weights", json={"weights": {"1": 0, "2": 100}, "by": "ann"}
        )
        doc = assert_refused(r, 409, "conflict")
        assert "leave the primary ('1') 0 % of the traffic" in doc["error"]
        assert "infercore models promote m 2 --to primary" in doc["error"]
        # A canary taking the rest, whether asked for or approved, is refused the same way.
        await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}})
        r = await a.post(
            "/admin/models/m/versions/3/promote", json={"to": "canary", "weight": 95, "by": "ann"}
        )
        assert "0 % of the traffic" in assert_refused(r, 409, "conflict")["error"]
        r = await a.post(
            "/admin/models/m/versions/3/promote", json={"to": "canary", "weight": 50, "by": "ann"}
        )
        approval = r.json()["approval"]["id"]
        r = await a.put(
            "/admin/models/m/weights", json={"weights": {"1": 50, "2": 50}, "by": "ann"}
        )
        assert r.status_code == 200, (
            r.text
        )  # more than the 5 % approved: allowed, the primary keeps 50
        r = await a.post(f"/admin/approvals/{approval}/approve", json={"by": "bob"})
        assert "0 % of the traffic" in assert_refused(r, 409, "conflict")["error"]
        after = (await a.get("/admin/models/m")).json()
        assert after["primary"] == before["primary"] == "1"
        assert {v["version"]: v.get("weight") for v in after["versions"]}["3"] in (None, 0.0)
        for _ in range(20):
            assert (await i.post("/v2/models/m/infer", json=body())).status_code == 200

    run(rt, scenario)


def test_an_ungated_primary_may_get_no_traffic() -> None:
    rt = runtime_from_dict(rollout_config(approvals=["canary"]))

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 5, "by": "ann"}
        )
        await a.post(f"/admin/approvals/{r.json()['approval']['id']}/approve", json={"by": "bob"})
        r = await a.put(
            "/admin/models/m/weights", json={"weights": {"1": 0, "2": 100}, "by": "ann"}
        )
        assert r.status_code == 200, r.text

    run(rt, scenario)


def test_admin_bodies_are_json_and_the_413_names_the_admin_limit(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    rt = runtime_from_dict(rollout_config(audit))
    load = "/v2/repository/models/m/load"
    payload = json.dumps({"parameters": {"version": "3"}}).encode()

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        for headers in (
            {"content-type": "text/plain"},
            {"content-type": "application/x-www-form-urlencoded"},
            {"content-type": "application/json", "content-encoding": "gzip"},
        ):
            r = await a.post(load, content=payload, headers=headers)
            assert_refused(r, 415, "unsupported_media_type")
        r = await a.post(
            "/admin/models/m/versions/2/promote",
            content=b'{"to": "candidate", "by": "ann"}',
            headers={"content-type": "text/plain"},
        )
        assert_refused(r, 415, "unsupported_media_type")
        assert (await a.get("/admin/audit")).json() == []  # nothing was done
        big = {"parameters": {"version": "3", "reason": "x" * 70_000}}
        doc = assert_refused(await a.post(load, json=big), 413, "body_too_large")
        assert "admin.max_body_bytes" in doc["error"]
        # JSON with a charset, or (as tritonclient sends it) with no Content-Type at all.
        r = await a.post(
            load, content=payload, headers={"content-type": "Application/JSON; charset=utf-8"}
        )
        assert r.status_code == 200, r.text
        r = await a.post(
            "/v2/repository/models/m/unload",
            content=b'{"parameters": {"version": "3", "unload_dependents": false}}',
            # As tritonclient.http.aio (aiohttp) labels every body; Triton reads it as JSON.
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        assert (await a.post(load)).status_code == 200  # an empty body: load the model
        # A typo here is a plain 404: this listener serves the repository extension.
        typo = assert_refused(await a.post("/v2/repository/models/m/lod"), 404, "not_found")
        assert typo["error"] == "no route for POST /v2/repository/models/m/lod"
        # The inference listener's limit is still server.max_body_bytes.
        r = await i.post("/v2/models/m/infer", content=b"x" * (9 * 1024 * 1024))
        assert "server.max_body_bytes" in assert_refused(r, 413, "body_too_large")["error"]

    run(rt, scenario)


def test_repository_calls_check_a_given_by() -> None:
    rt = runtime_from_dict(rollout_config())

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        for route in ("load", "unload"):
            for by in (123, {"name": "mallory"}, None, True, ""):
                r = await a.post(
                    f"/v2/repository/models/m/{route}",
                    json={"parameters": {"version": "3", "by": by}},
                )
                assert_refused(r, 400, "invalid_input")
        assert (await a.get("/admin/audit")).json() == []
        r = await a.post(
            "/v2/repository/models/m/unload", json={"parameters": {"version": "3", "by": "ann"}}
        )
        assert r.status_code == 200
        r = await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}})
        assert r.status_code == 200
        actors = [(e["event"], e["actor"]) for e in (await a.get("/admin/audit")).json()]
        assert actors == [
            ("unload_requested", "ann"),
            ("unloaded", "ann"),
            ("load_requested", "repository-api"),
            ("loaded", "repository-api"),
        ]

    run(rt, scenario)


def test_serve_refuses_an_audit_log_it_cannot_write_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for enabled in (True, False):
        cfg = rollout_config(tmp_path / "file" / "audit.jsonl")
        cfg["admin"]["enabled"] = enabled
        with pytest.raises(ConfigError, match=r"admin\.audit_log: cannot create"):
            AdminListener.from_runtime(runtime_from_dict(cfg), {"INFERCORE_ADMIN_TOKEN": TOKEN})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- the repository extension --------------------------------------------------------------


def repository_root(tmp: Path) -> Path:
    """iris versions 1 and 2 in the recipe's folder layout, 3 only in the repository."""
    repo = tmp / "iris"
    lines = []
    for v in ("1", "2", "3", "4"):
        (repo / v).mkdir(parents=True)
        shutil.copy(IRIS_ONNX, repo / v / "model.onnx")
        if v != "4":  # 4: present but not pinned
            lines.append(f"{sha256_file(repo / v / 'model.onnx')}  {v}/model.onnx")
    (repo / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    outside = tmp.parent / f"{tmp.name}-outside"
    (outside / "model").mkdir(parents=True)
    shutil.copy(IRIS_ONNX, outside / "model" / "model.onnx")
    os.symlink(outside / "model", repo / "5")  # a version folder that leaves the model root
    with (repo / "SHA256SUMS").open("a") as fh:
        fh.write(f"{sha256_file(outside / 'model' / 'model.onnx')}  5/model.onnx\n")
    return tmp


def iris_repository_config() -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {
            "iris": {
                "primary": "1",
                "versions": {"1": {"loader": {"kind": "onnx", "path": "iris/1/model.onnx"}}},
                "routing": {"kind": "weighted"},
                "repository": {"folder": "iris", "loader": {"kind": "onnx", "path": "model.onnx"}},
            }
        },
    }


def iris_body() -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }


@needs_iris
def test_repository_load_index_and_unload(tmp_path: Path) -> None:
    root = repository_root(tmp_path / "root")
    rt = runtime_from_dict(iris_repository_config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        index = (await a.post("/v2/repository/index")).json()
        assert [(r["version"], r["state"]) for r in index] == [
            ("1", "READY"),
            ("2", "UNAVAILABLE"),
            ("3", "UNAVAILABLE"),
            ("4", "UNAVAILABLE"),
        ]  # 5 leaves the model root: not listed
        assert [
            r["version"]
            for r in (await a.post("/v2/repository/index", json={"ready": True})).json()
        ] == ["1"]

        before = (await a.get("/admin/models/iris")).json()
        refusals = [
            ({"parameters": {"version": "5"}}, 400, "invalid_input", "outside the model root"),
            ({"parameters": {"version": "4"}}, 400, "invalid_input", "no digest pinned"),
            ({"parameters": {"version": "9"}}, 404, "model_not_found", "no version"),
            ({"parameters": {"version": "../1"}}, 400, "invalid_input", "invalid version"),
            ({"parameters": {"version": "1/../../x"}}, 400, "invalid_input", "invalid version"),
            # `$` in a pattern also matches before a final newline: names are matched whole.
            ({"parameters": {"version": "3\n"}}, 400, "invalid_input", "invalid version"),
            (
                {"parameters": {"version": "3", "file:model.onnx": "AAAA"}},
                400,
                "invalid_input",
                "not accepted",
            ),
            (
                {"parameters": {"version": "3", "path": "/etc/passwd"}},
                400,
                "invalid_input",
                "not accepted",
            ),
            ({"parameters": {"config": "{}"}}, 400, "invalid_input", "not accepted"),
            ({"model_path": "/tmp"}, 400, "invalid_input", "invalid request body"),
        ]
        for payload, status, reason, text in refusals:
            r = await a.post("/v2/repository/models/iris/load", json=payload)
            doc = assert_refused(r, status, reason)
            assert text in doc["error"], doc
            assert str(tmp_path) not in r.text
        assert_refused(
            await a.post("/v2/repository/models/a..b/load", json={}), 400, "invalid_input"
        )
        assert (await a.post("/v2/repository/models/a%2Fb/load", json={})).status_code == 404
        assert_refused(
            await a.post("/v2/repository/models/iris%0A/load", json={}), 400, "invalid_input"
        )
        assert_refused(
            await a.post("/v2/repository/models/nope/load", json={}), 404, "model_not_found"
        )
        assert (await a.get("/admin/models/iris")).json() == before

        r = await a.post(
            "/v2/repository/models/iris/load", json={"parameters": {"version": "3", "by": "ann"}}
        )
        assert r.status_code == 200, r.text
        assert r.json()["version"] == {
            "version": "3",
            "stage": "candidate",
            "state": "ready",
            "ready": True,
            "origin": "repository",
        }
        r = await i.post("/v2/models/iris/versions/3/infer", json=iris_body())
        assert r.status_code == 200 and r.json()["model_version"] == "3"
        # A candidate takes no routed traffic.
        for _ in range(20):
            assert (await i.post("/v2/models/iris/infer", json=iris_body())).json()[
                "model_version"
            ] == "1"

        assert_refused(
            await a.post(
                "/v2/repository/models/iris/unload", json={"parameters": {"version": "1"}}
            ),
            409,
            "conflict",
        )
        assert_refused(await a.post("/v2/repository/models/iris/unload", json={}), 409, "conflict")
        r = await a.post("/v2/repository/models/iris/unload", json={"parameters": {"version": "3"}})
        assert r.json()["version"]["state"] == "unloaded"
        r = await i.post("/v2/models/iris/versions/3/infer", json=iris_body())
        assert_refused(r, 503, "model_not_ready")
        assert (await i.get("/v2/models/iris/versions/3/ready")).status_code == 503

        # A numeric version (as a V2 client may send it) and an empty body (load the model).
        r = await a.post("/v2/repository/models/iris/load", json={"parameters": {"version": 3}})
        assert r.status_code == 200
        await a.post("/v2/repository/models/iris/unload", json={"parameters": {"version": "3"}})
        r = await a.post("/v2/repository/models/iris/load")
        assert [v["version"] for v in r.json()["versions"]] == ["3"]

    run(rt, scenario)


@needs_iris
def test_a_refused_repository_load_counts_as_a_load_failure(tmp_path: Path) -> None:
    """A version whose folder is there but that the repository refuses (no pinned digest, a
    folder out of the model root) is a failed load attempt: the 400 is counted in
    infercore_model_load_failures_total, as the same refusal on a reload (a 422) is, once.
    What names no version to load (no folder, a malformed name or body) counts nothing."""
    root = repository_root(tmp_path / "root")
    rt = runtime_from_dict(iris_repository_config(), recipes_dir=root)
    failures = "infercore_model_load_failures_total"

    async def counted(i: httpx.AsyncClient) -> dict[str, float]:
        text = (await i.get("/metrics")).text
        return {
            v: metric_value(text, failures, model="iris", version=v)
            for v in ("1", "3", "4", "5", "9")
        }

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        load = "/v2/repository/models/iris/load"
        for payload, status, reason in [
            ({"parameters": {"version": "9"}}, 404, "model_not_found"),
            ({"parameters": {"version": "../4"}}, 400, "invalid_input"),
            ({"parameters": {"version": "4", "path": "/tmp"}}, 400, "invalid_input"),
            ({"model_path": "/tmp"}, 400, "invalid_input"),
        ]:
            assert_refused(await a.post(load, json=payload), status, reason)
        assert_refused(
            await a.post("/v2/repository/models/nope/load", json={}), 404, "model_not_found"
        )
        assert await counted(i) == dict.fromkeys(("1", "3", "4", "5", "9"), 0.0)

        doc = assert_refused(
            await a.post(load, json={"parameters": {"version": "4"}}), 400, "invalid_input"
        )
        assert "no digest pinned" in doc["error"]
        doc = assert_refused(
            await a.post(load, json={"parameters": {"version": "5"}}), 400, "invalid_input"
        )
        assert "outside the model root" in doc["error"]
        assert await counted(i) == {"1": 0.0, "3": 0.0, "4": 1.0, "5": 1.0, "9": 0.0}
        # Asked by another caller (drift's register_candidate loads through the lifecycle,
        # not the admin API): the runtime counts it all the same.
        with pytest.raises(InvalidInput, match="no digest pinned"):
            await rt.lifecycle.load("iris", "4", by="drift:ks")
        assert (await counted(i))["4"] == 2.0
        # Each load_requested on record has its outcome there too, an unknown version's
        # (which counts no load failure) included.
        records = (await a.get("/admin/audit")).json()
        asked = [r["version"] for r in records if r["event"] == "load_requested"]
        outcomes = [(r["event"], r["version"]) for r in records if r["event"] != "load_requested"]
        assert outcomes == [
            ("load_failed", "9"),
            ("load_failed", "4"),
            ("load_failed", "5"),
            ("load_failed", "4"),
        ]
        assert asked == [version for _, version in outcomes]

        # A serving version whose pin is gone: the runtime refuses the reload (422) and counts
        # it; the admin API does not count it again.
        assert (await a.post(load, json={"parameters": {"version": "3"}})).status_code == 200
        sums = root / "iris" / "SHA256SUMS"
        sums.write_text("".join(x for x in sums.read_text().splitlines(True) if " 3/" not in x))
        assert_refused(
            await a.post(load, json={"parameters": {"version": "3"}}), 422, "model_load_failed"
        )
        assert await counted(i) == {"1": 0.0, "3": 1.0, "4": 2.0, "5": 1.0, "9": 0.0}

    run(rt, scenario)


@needs_iris
def test_tritonclient_speaks_the_repository_extension(tmp_path: Path) -> None:
    """A standard V2 client (tritonclient) loads and unloads through the admin listener."""
    import threading

    import tritonclient.http as triton

    root = repository_root(tmp_path / "root")
    cfg = iris_repository_config()
    port = _free_port()
    cfg["admin"] = {"enabled": True, "port": port}
    rt = runtime_from_dict(cfg, recipes_dir=root)
    ready = threading.Event()
    done = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        listener = AdminListener.from_runtime(rt, {"INFERCORE_ADMIN_TOKEN": TOKEN})
        assert listener is not None
        await rt.start()
        await listener.start()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await listener.stop()
        await rt.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        client.load_model("iris", headers=AUTH)  # the whole model: every recipe version
        index = client.get_model_repository_index(headers=AUTH)
        assert ("1", "READY") in {(r["version"], r["state"]) for r in index}
        # A config in the payload is refused (S7); so would be files (S4).
        with pytest.raises(Exception, match="not accepted"):
            client.load_model("iris", headers=AUTH, config='{"backend": "python"}')
        with pytest.raises(Exception, match="primary"):
            client.unload_model("iris", headers=AUTH)
        with pytest.raises(Exception, match="bearer token"):
            client.get_model_repository_index()
    finally:
        done.set()
        thread.join(30)
        loop.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_cli_talks_to_the_admin_api_over_a_unix_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from infercore.cli import run as cli

    sock = tmp_path / "a.sock"
    cfg = rollout_config()
    cfg["admin"] = {"enabled": True, "uds": str(sock)}
    rt = runtime_from_dict(cfg)
    ready, done = threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        listener = AdminListener.from_runtime(rt, {"INFERCORE_ADMIN_TOKEN": TOKEN})
        assert listener is not None
        await rt.start()
        await listener.start()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await listener.stop()
        await rt.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    base = ["models", "--url", f"unix:{sock}", "--token", TOKEN]
    try:
        assert ready.wait(30)
        assert cli([*base, "list"]) == 0
        out = capsys.readouterr().out
        assert "m      2        shadow" in out, out
        assert (
            cli([*base, "promote", "m", "2", "--to", "canary", "--weight", "20", "--by", "ann"])
            == 0
        )
        approval = capsys.readouterr().out.split()[1]
        assert cli([*base, "approvals"]) == 0
        assert approval in capsys.readouterr().out
        assert cli([*base, "approve", approval, "--by", "bob", "--reason", "fine"]) == 0
        assert "20%" in capsys.readouterr().out
        assert cli([*base, "approve", approval, "--by", "bob"]) == 1
        assert "HTTP 409 conflict" in capsys.readouterr().err
        assert cli([*base, "weights", "m", "1=70", "2=20"]) == 1
        assert "add up to 90" in capsys.readouterr().err
        assert cli([*base, "weights", "m", "1=70", "two"]) == 2
        capsys.readouterr()
        assert cli([*base, "--json", "shadow", "m"]) == 0
        assert json.loads(capsys.readouterr().out)["mirroring"] is True
        assert cli([*base, "rollback", "m", "--by", "carol"]) == 0
        capsys.readouterr()
        assert cli([*base, "audit", "--limit", "3"]) == 0
        events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
        assert events == ["approved", "promoted", "rolled_back"]
        assert cli(["models", "--url", f"unix:{sock}", "--token", TOKEN + "x", "list"]) == 1
        assert "HTTP 403" in capsys.readouterr().err
        assert (
            cli(["models", "--url", f"unix:{tmp_path / 'none.sock'}", "--token", TOKEN, "list"])
            == 1
        )
        assert "cannot reach" in capsys.readouterr().err
    finally:
        done.set()
        thread.join(30)
        loop.close()


def test_serve_refuses_an_enabled_admin_api_without_a_token() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "INFERCORE_ADMIN_TOKEN"}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "infercore"),
            "serve",
            "+recipe=iris",
            "admin.enabled=true",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("infercore: config error: admin.enabled:"), result.stderr
    assert "INFERCORE_ADMIN_TOKEN" in lines[-1]


@pytest.fixture
def silent_admin_url() -> Any:
    """An admin URL whose server accepts connections and never answers."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("options", "env", "waited"),
    [(["--timeout", "0.2"], {}, "0.2"), ([], {"INFERCORE_ADMIN_TIMEOUT": "0.3"}, "0.3")],
    ids=["option", "env"],
)
def test_the_cli_gives_up_on_a_silent_admin_api_after_its_timeout(
    silent_admin_url: str,
    options: list[str],
    env: dict[str, str],
    waited: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infercore.cli import run as cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["models", "--url", silent_admin_url, "--token", TOKEN, *options, "list"]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert f"did not answer within {waited} s" in err, err
    assert "INFERCORE_ADMIN_TIMEOUT" in err


def test_reads_wait_less_than_changes_by_default(
    silent_admin_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infercore import admin_client
    from infercore.cli import run as cli

    monkeypatch.setattr(admin_client, "READ_TIMEOUT_S", 0.2)
    monkeypatch.setattr(admin_client, "CHANGE_TIMEOUT_S", 0.4)
    assert cli(["models", "--url", silent_admin_url, "--token", TOKEN, "list"]) == 1
    assert "within 0.2 s" in capsys.readouterr().err
    argv = [
        "models",
        "--url",
        silent_admin_url,
        "--token",
        TOKEN,
        "promote",
        "m",
        "2",
        "--to",
        "shadow",
        "--by",
        "x",
    ]
    assert cli(argv) == 1
    assert "within 0.4 s" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infercore.cli import run as cli

    with pytest.raises(SystemExit) as info:
        cli(["models", "--timeout", value, "list"])
    assert info.value.code == 2
    assert "not a positive number of seconds" in capsys.readouterr().err
    monkeypatch.setenv("INFERCORE_ADMIN_TIMEOUT", value)
    assert cli(["models", "--token", TOKEN, "list"]) == 2
    assert "INFERCORE_ADMIN_TIMEOUT" in capsys.readouterr().err
