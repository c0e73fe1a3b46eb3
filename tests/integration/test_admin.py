"""The admin API in process: authentication, the repository extension, rollouts, approvals.

Every refusal is a 4xx with a reason, and changes nothing (the model's description before and
after are equal).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from infercore.artifacts import sha256_file
from infercore.config.rollout import AdminConfig
from infercore.errors import ConfigError
from infercore.server import create_app
from infercore.server.admin import AdminListener, create_admin_app, load_token
from infercore.testing import runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

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


@asynccontextmanager
async def admin_and_inference(
    runtime: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    await runtime.start()
    try:
        admin = httpx.ASGITransport(app=create_admin_app(runtime, TOKEN))
        inference = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
        async with (
            httpx.AsyncClient(transport=admin, base_url="http://admin", headers=AUTH) as a,
            httpx.AsyncClient(transport=inference, base_url="http://infer") as i,
        ):
            yield a, i
    finally:
        await runtime.stop()


def run(runtime: Any, scenario: Callable[[httpx.AsyncClient, httpx.AsyncClient], Any]) -> Any:
    async def main() -> Any:
        async with admin_and_inference(runtime) as (a, i):
            return await scenario(a, i)

    return asyncio.run(main())


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
        r = await a.post(
            "/admin/models/m/versions/2/promote", json={"to": "canary", "weight": 10, "by": "ann"}
        )
        approval = r.json()["approval"]["id"]
        # Meanwhile the version was unloaded: approving it now cannot apply; it stays pending.
        r = await a.post("/v2/repository/models/m/unload", json={"parameters": {"version": "2"}})
        assert r.status_code == 200 and r.json()["version"]["stage"] == "candidate"
        late = await a.post(f"/admin/approvals/{approval}/approve", json={"by": "bob"})
        assert "not ready" in assert_refused(late, 409, "conflict")["error"]
        pending = (await a.get("/admin/approvals")).json()
        assert [p["id"] for p in pending] == [approval]

    run(rt, scenario)


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
