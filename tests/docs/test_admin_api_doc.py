"""docs/deploy.md "Admin API requests" says what the admin API takes and answers: its table of
bodies matches the schemas the routes decode, its curl examples work, and each refusal it lists
is the answer the API gives."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from infercore.server import admin
from infercore.testing import runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
TOKEN = "admin-api-doc-token-0123456789"
HEADING = "## Admin API requests"

#: The schema each route of the table decodes its body with.
BODIES: dict[str, type[msgspec.Struct]] = {
    "POST /admin/approvals/{id}/approve": admin._DecisionBody,
    "POST /admin/approvals/{id}/reject": admin._DecisionBody,
    "POST /admin/models/{m}/versions/{v}/promote": admin._PromoteBody,
    "PUT /admin/models/{m}/weights": admin._WeightsBody,
    "POST /admin/models/{m}/rollback": admin._DecisionBody,
}
REPOSITORY = "POST /v2/repository/models/{m}/load`, `…/unload"


def section() -> str:
    text = (REPO / "docs/deploy.md").read_text()
    assert HEADING in text, f"docs/deploy.md has no section {HEADING!r}"
    body = text.split(HEADING, 1)[1]
    return body.split("\n## ", 1)[0]


def table_rows(first_header: str) -> list[list[str]]:
    """The rows of the section's table whose first header cell is ``first_header``."""
    lines = section().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def documented_fields(cell: str) -> dict[str, bool]:
    """``name -> required`` of a body cell: ``**`name`**: …; `other`: …``."""
    fields = {}
    for part in cell.split("; "):
        match = re.match(r"(\*\*)?`(\w+)`(\*\*)?:", part)
        assert match, part
        fields[match.group(2)] = match.group(1) is not None
    return fields


def test_the_table_lists_each_body_s_fields_and_which_are_required() -> None:
    rows = {row[0].strip("`"): row[1] for row in table_rows("call")}
    assert set(rows) == {*BODIES, REPOSITORY}
    for route, schema in BODIES.items():
        expected = {f.name: f.required for f in msgspec.structs.fields(schema)}
        assert documented_fields(rows[route]) == expected, route
    # The V2 repository calls: one optional `parameters` object, whose keys the route checks.
    assert documented_fields(rows[REPOSITORY].split(": ", 1)[0] + ": x") == {"parameters": False}
    load = set(re.findall(r"`(\w+)` \(", rows[REPOSITORY]))
    unload = set(re.findall(r"`unload` also takes tritonclient's `(\w+)`", rows[REPOSITORY]))
    assert load == admin._REPOSITORY_PARAMETERS
    assert load | unload == admin._UNLOAD_PARAMETERS


def curl_examples() -> list[tuple[str, str, dict[str, Any], str]]:
    """``(approval id, approve|reject, body, the status its answer shows)`` of each curl."""
    block = section().split("```bash\n", 1)[1].split("```", 1)[0]
    found = []
    for command, answer in re.findall(r"(curl .*?)\n# (\{[^\n]*)", block, flags=re.DOTALL):
        args = shlex.split(command.replace("\\\n", " "))
        url = next(a for a in args if a.startswith("http"))
        match = re.fullmatch(
            r"http://127\.0\.0\.1:8081/admin/approvals/(\w+)/(approve|reject)", url
        )
        assert match, url
        assert args[args.index("-X") + 1] == "POST"
        assert "Authorization: Bearer $INFERCORE_ADMIN_TOKEN" in args
        assert "Content-Type: application/json" in args
        status = re.match(r'\{"status":"(\w+)"', answer)
        assert status, answer
        found.append((match[1], match[2], json.loads(args[args.index("-d") + 1]), status[1]))
    return found


def rollout() -> dict[str, Any]:
    """Model m: primary 1, candidates 2 and 3; canary and primary need an approval."""
    return {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": {"kind": "fake", "offset": 0}},
                    "2": {"loader": {"kind": "fake", "offset": 100}},
                    "3": {"loader": {"kind": "fake", "offset": 200}},
                },
                "routing": {"kind": "weighted"},
                "rollout": {"approvals": ["canary", "primary"]},
            }
        },
    }


def run(runtime: Any, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """``scenario(admin client)`` against ``runtime``'s admin app, started and stopped around."""

    async def main() -> None:
        await runtime.start()
        try:
            app = admin.create_admin_app(runtime, TOKEN)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://admin",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as client:
                await scenario(client)
        finally:
            await runtime.stop()

    asyncio.run(main())


async def ask(a: httpx.AsyncClient, to: str, version: str = "2") -> str:
    """A pending approval of moving ``version`` to ``to``, asked by bob: its id."""
    body = {"to": to, "by": "bob", **({"weight": 10} if to == "canary" else {})}
    r = await a.post(f"/admin/models/m/versions/{version}/promote", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["approval"]["id"])


def test_the_curl_examples_approve_and_reject() -> None:
    examples = curl_examples()
    assert [action for _, action, _, _ in examples] == ["approve", "reject"]

    async def scenario(a: httpx.AsyncClient) -> None:
        for (_, action, body, shown), to in zip(examples, ("canary", "primary"), strict=True):
            approval = await ask(a, to)
            r = await a.post(f"/admin/approvals/{approval}/{action}", json=body)
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["status"] == shown
            assert (
                doc["approval"]["status"] == {"approve": "approved", "reject": "rejected"}[action]
            )
            assert doc["approval"]["decided_by"] == body["by"]
            assert doc["approval"]["decision_reason"] == body["reason"]
            assert ("model" in doc) == (action == "approve")

    run(runtime_from_dict(rollout()), scenario)


def test_each_refusal_listed_is_what_the_api_answers() -> None:
    listed = {(row[0], row[1].strip("`")) for row in table_rows("status")}
    assert listed == {
        ("400", "invalid_input"),
        ("401 / 403", "unauthorized"),
        ("404", "not_found"),
        ("409", "conflict"),
        ("413", "body_too_large"),
        ("415", "unsupported_media_type"),
        ("503", "audit_unavailable"),
        ("503", "model_not_ready"),
        ("503", "shutting_down"),
    }
    rt = runtime_from_dict(rollout())

    async def scenario(a: httpx.AsyncClient) -> None:
        async def refused(path: str, status: int, reason: str, **kw: Any) -> None:
            r = await a.post(path, **kw)
            assert (r.status_code, r.json()["reason"]) == (status, reason), r.text

        approval = await ask(a, "canary")
        path = f"/admin/approvals/{approval}/approve"
        await refused(path, 400, "invalid_input")  # no body
        for body in ({}, {"reason": "ok"}, {"by": ""}, {"by": 1}, {"by": "x" * 65}):
            await refused(path, 400, "invalid_input", json=body)
        await refused(path, 400, "invalid_input", json={"by": "ann", "reason": "r" * 501})
        await refused(path, 400, "invalid_input", json={"by": "ann", "note": "x"})
        await refused(path, 400, "invalid_input", content=b'{"by": "ann", "by": "eve"}')
        await refused(path, 415, "unsupported_media_type", content=b"by=ann",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        await refused("/admin/approvals/nope/approve", 404, "not_found", json={"by": "ann"})
        assert (await a.post(path, json={"by": "ann"})).status_code == 200
        await refused(path, 409, "conflict", json={"by": "ann"})
        await refused(path.replace("approve", "reject"), 409, "conflict", json={"by": "ann"})

        later, rejected = await ask(a, "primary"), await ask(a, "canary", "3")
        rt.lifecycle._restoring = True  # as while admin.state_file is restored at start-up
        await refused(f"/admin/approvals/{later}/approve", 503, "model_not_ready", json={"by": "a"})
        rt.lifecycle._restoring = False
        rt.begin_shutdown()  # what SIGTERM does first
        await refused(f"/admin/approvals/{later}/approve", 503, "shutting_down", json={"by": "a"})
        r = await a.post(f"/admin/approvals/{rejected}/reject", json={"by": "ann"})
        assert r.status_code == 200 and r.json()["status"] == "rejected", r.text

    run(rt, scenario)


@pytest.mark.parametrize("route", sorted(BODIES))
def test_every_body_names_who_decides(route: str) -> None:
    """Every decision takes ``by``: optional in the schema, as a named token is its own name;
    with the shared token the route requires it (the 400s above)."""
    by = {f.name: f for f in msgspec.structs.fields(BODIES[route])}["by"]
    assert not by.required and by.type == (str | None)


def named_tokens_example() -> str:
    """The example tokens file of the section's "Named tokens" paragraph."""
    text = section().split("**Named tokens.**", 1)[1]
    return text.split("```text\n", 1)[1].split("```", 1)[0]


def token_generator_example() -> tuple[list[str], str, str]:
    """The paragraph's ``infercore models token carol`` example: its output's two labels, the
    token and the line."""
    text = section().split("**Named tokens.**", 1)[1]
    block = text.split("```console\n", 1)[1].split("```", 1)[0]
    command, label, token, file_label, line = block.splitlines()
    assert command == "$ infercore models token carol"
    return [label, file_label], token, line


def test_the_token_generator_example_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infercore.cli import run as cli

    labels, token, line = token_generator_example()
    assert line == f"carol:sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    assert line in named_tokens_example().splitlines()
    assert cli(["models", "token", "carol"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [printed[0], printed[2]] == labels
    assert re.fullmatch(r"[0-9a-f]{48}", printed[1]) and len(token) == len(printed[1])


def test_the_named_tokens_example_is_a_valid_file_and_acts_as_documented(
    tmp_path: Path,
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(named_tokens_example())
    tokens_file.chmod(0o600)
    tokens = admin.load_named_tokens(str(tokens_file))
    assert sorted(tokens) == ["ann", "bob", "carol"]
    _, carol_token, _ = token_generator_example()
    cfg = rollout()
    cfg["models"]["m"]["rollout"]["distinct_approver"] = True
    rt = runtime_from_dict(cfg)
    documented = re.search(r"\(`(this token belongs to [^`]*`by`[^`]*)`\)", section())
    assert documented, "the section quotes the 403's message"

    async def main() -> None:
        await rt.start()
        try:
            app = admin.create_admin_app(rt, tokens)
            transport = httpx.ASGITransport(app=app)
            as_ann = {"Authorization": f"Bearer {tokens['ann']}"}
            as_bob = {"Authorization": f"Bearer {tokens['bob']}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as a:
                who = (await a.get("/admin/whoami", headers=as_ann)).json()
                assert who == {"name": "ann", "authenticated": True}
                body = {"to": "canary", "weight": 10}
                r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=as_ann)
                assert r.status_code == 202, r.text
                approval = r.json()["approval"]["id"]
                path = f"/admin/approvals/{approval}/approve"
                r = await a.post(path, json={"by": "bob"}, headers=as_ann)
                assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
                assert r.json()["error"].startswith(documented[1])
                r = await a.post(path, json={}, headers=as_bob)
                assert r.status_code == 200 and r.json()["approval"]["decided_by"] == "bob"
                # carol's line holds her token's digest: the token printed beside it is hers.
                as_carol = {"Authorization": f"Bearer {carol_token}"}
                who = (await a.get("/admin/whoami", headers=as_carol)).json()
                assert who == {"name": "carol", "authenticated": True}
        finally:
            await rt.stop()

    asyncio.run(main())


def test_the_state_file_values_listed_are_those_a_change_answers(tmp_path: Path) -> None:
    """The section's table of ``"state_file"`` values is the lifecycle's, and a change's
    answer carries one with ``admin.state_file`` (the other values: the durable-state
    tests, tests/unit/test_rollout_state_durable.py)."""
    from infercore.lifecycle import manager

    listed = [row[0].strip("`") for row in table_rows("`state_file`")]
    assert listed == list(manager.STATE_FILE_OUTCOMES)
    cfg = rollout()
    cfg["admin"] = {"state_file": str(tmp_path / "state" / "rollout.json")}

    async def scenario(a: httpx.AsyncClient) -> None:
        body = {"to": "canary", "weight": 10, "by": "bob"}
        r = await a.post("/admin/models/m/versions/2/promote", json=body)
        assert (r.status_code, r.json()["state_file"]) == (202, manager.STATE_WRITTEN), r.text
        r = await a.post(f"/admin/approvals/{r.json()['approval']['id']}/reject", json={"by": "a"})
        assert (r.status_code, r.json()["state_file"]) == (200, manager.STATE_WRITTEN), r.text

    run(runtime_from_dict(cfg), scenario)
