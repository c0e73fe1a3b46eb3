"""Named admin tokens (``admin.tokens_file``): the token says who decides.

The file's format is parsed strictly, each refusal a config error that names the file and the
line and never shows a token; a call's ``by`` defaults to its token's name and may name no
one else (403), so ``rollout.distinct_approver`` holds between tokens; the audit log records
the name as authenticated; the CLI sends no ``by`` of its own with a named token. The shared
token keeps its behaviour. A line may hold the token's SHA-256 digest instead of the token
(``name:sha256:<hex>``), and ``infercore models token NAME`` prints a new token and that line.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from infercore.config.rollout import AdminConfig
from infercore.errors import ConfigError
from infercore.server import admin
from infercore.server.admin import AdminListener, BearerAuth, load_named_tokens, load_token
from infercore.testing import runtime_from_dict

#: Tokens whose every character would show if a message echoed one.
ANN = "SECRETann0123456789abcdef"
BOB = "SECRETbob0123456789abcdef"
SHARED = "SECRETshared0123456789abcdef"
TOKENS = {"ann": ANN, "bob": BOB}
#: A token that only its digest names in the files below.
CAROL = "SECRETcarol0123456789abcdef"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rollout_config(**rollout: Any) -> dict[str, Any]:
    """Model m: primary 1, 2 in shadow, 3 a candidate; canary and primary need approval."""
    return {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": {"kind": "fake", "offset": 0}},
                    "2": {"loader": {"kind": "fake", "offset": 100}, "stage": "shadow"},
                    "3": {"loader": {"kind": "fake", "offset": 200}},
                },
                "routing": {"kind": "shadow", "inner": {"kind": "weighted"}},
                "rollout": {"approvals": ["canary", "primary"], **rollout},
            }
        },
    }


def tokens_file(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "admin-tokens"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def admin_client(runtime: Any, token: admin.AdminTokens) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``runtime``'s admin app (no token of its own: each call sends one)."""
    await runtime.start()
    try:
        app = admin.create_admin_app(runtime, token)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            yield client
    finally:
        await runtime.stop()


# -- the file ------------------------------------------------------------------------------


def test_a_tokens_file_names_each_token(tmp_path: Path) -> None:
    path = tokens_file(
        tmp_path,
        "# operators\n\n"
        f"ann:{ANN}\r\n"
        "   # an indented comment\n"
        f"  bob@example.com:{BOB}:with-a-colon  \n",
    )
    assert load_named_tokens(str(path)) == {"ann": ANN, "bob@example.com": f"{BOB}:with-a-colon"}
    # What serve and config validate call: the named tokens, not the shared one.
    env = {"INFERCORE_ADMIN_TOKEN": ANN}
    assert load_token(AdminConfig(enabled=True, tokens_file=str(path)), env) == {
        "ann": ANN,
        "bob@example.com": f"{BOB}:with-a-colon",
    }


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        (f"ann {ANN}\n", "line 1: expected name:token, found no ':'", "one name:token per line"),
        (f"ann:{ANN}\n{BOB}\n", "line 2: expected name:token, found no ':'", "'#' starts"),
        (f"an n:{ANN}\n", "line 1: the name before ':' must be 1-64 letters", "who decides"),
        (f"ann :{ANN}\n", "line 1: the name before ':' must be", "e.g. ann"),
        (f":{ANN}\n", "line 1: the name before ':' must be", "ann@example.com"),
        (f"-ann:{ANN}\n", "starting with a letter or a digit", "who decides"),
        (f"{'a' * 65}:{ANN}\n", "line 1: the name before ':' must be 1-64", "who decides"),
        ("# c\nann:\n", "line 2: no token after ':'", "right after the colon"),
        (f"ann: {ANN}\n", "line 1: the token holds a space", "nothing around the ':'"),
        (f"ann:{ANN}\tx\n", "line 1: the token holds a space", "printable ASCII"),
        (f"ann:{ANN}é\n", "other than printable ASCII", "printable ASCII"),
        ("ann:SECRETshort\n", "line 1: the token is shorter than 16 characters", "openssl"),
        (f"ann:{ANN}\n\nann:{BOB}\n", "line 3: the name is line 1's too", "one line"),
        (f"ann:{ANN}\nbob:{ANN}\n", "line 2: the token is line 1's too", "of their own"),
        ("# nobody yet\n\n", "the file names no token", "one name:token per line"),
        ("", "the file names no token", "one name:token per line"),
        (f"ann:{ANN}\n".encode() + b"bob:\xff\xfe" + BOB.encode(), "line 2: not UTF-8", "plain"),
    ],
)
def test_each_tokens_file_mistake_names_the_file_the_line_and_the_fix(
    tmp_path: Path, text: str | bytes, message: str, hint: str
) -> None:
    path = tokens_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_named_tokens(str(path))
    error = caught.value
    assert error.message.startswith(f"admin.tokens_file {str(path)!r}"), error.message
    assert message in error.message
    assert error.hint is not None and hint in error.hint
    assert "SECRET" not in str(error)  # what a line holds is never shown: it may be a token
    # serve and config validate refuse it the same way.
    with pytest.raises(ConfigError, match=r"admin\.tokens_file"):
        load_token(AdminConfig(enabled=True, tokens_file=str(path)), {})


def test_a_tokens_file_open_to_other_users_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: a warning
    text = f"ann:{ANN}\n"
    for mode, message in (
        (0o644, "readable by every user (mode 0644)"),
        (0o604, "readable by every user (mode 0604)"),
        (0o620, "writable by other users (mode 0620)"),
        (0o602, "writable by other users (mode 0602)"),
    ):
        path = tokens_file(tmp_path, text, mode)
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            load_named_tokens(str(path))
        assert caught.value.hint is not None and "chmod 600" in caught.value.hint
        assert "defaultMode: 0400" in caught.value.hint
    # Readable by its group (a Kubernetes Secret with fsGroup): loaded, with a warning.
    caplog.set_level(logging.WARNING, logger="infercore.admin")
    path = tokens_file(tmp_path, text, 0o640)
    assert load_named_tokens(str(path)) == {"ann": ANN}
    assert "readable by its group (mode 0640)" in caplog.text
    caplog.clear()
    path = tokens_file(tmp_path, text, 0o400)
    assert load_named_tokens(str(path)) == {"ann": ANN}
    assert caplog.text == ""


def test_a_missing_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin.tokens_file .*cannot read the file"):
        load_named_tokens(str(tmp_path / "missing"))


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Read as a file, a FIFO would hold the start-up until something writes to it."""
    fifo = tmp_path / "tokens-fifo"
    os.mkfifo(fifo, 0o600)
    caught: list[BaseException] = []

    def load() -> None:
        try:
            load_named_tokens(str(fifo))
        except BaseException as exc:
            caught.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(30)  # a bound on a hang, not a timing goal: the refusal needs no writer
    if reader.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
        pytest.fail("load_named_tokens waited for a writer on a named pipe")
    (error,) = caught
    assert isinstance(error, ConfigError), error
    assert error.message == f"admin.tokens_file {str(fifo)!r}: not a regular file (a named pipe)"
    assert error.hint is not None and "regular file" in error.hint
    with pytest.raises(ConfigError, match=r"not a regular file \(a directory\)"):
        load_named_tokens(str(tmp_path))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="giving a file to another user (chown) needs root",
)
def test_a_tokens_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """Its owner could make it readable or add a line at any time, whatever its mode now."""
    path = tokens_file(tmp_path, f"ann:{ANN}\n")
    os.chown(path, 12345, -1)
    with pytest.raises(ConfigError) as caught:
        load_named_tokens(str(path))
    error = caught.value
    assert "the file belongs to uid 12345, not to this server's user (uid 0) or root" in str(error)
    assert error.hint is not None and error.hint.startswith("chown 0 the file")
    # Its own user's or root's (a Kubernetes Secret's files are root's): read.
    os.chown(path, 0, -1)
    assert load_named_tokens(str(path)) == {"ann": ANN}
    # The mode is still checked, once the owner is right.
    path.chmod(0o604)
    with pytest.raises(ConfigError, match=r"readable by every user \(mode 0604\)"):
        load_named_tokens(str(path))


def test_a_group_readable_file_in_a_kubernetes_pod_s_own_group_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret mounted with defaultMode 0400 under the pod's fsGroup is 0440, its group the
    pod's: an INFO in a pod, a WARNING outside one (a user's group is often shared)."""
    path = tokens_file(tmp_path, f"ann:{ANN}\n", 0o440)
    assert path.stat().st_gid in (os.getegid(), *os.getgroups())  # the test's own group
    caplog.set_level(logging.INFO, logger="infercore.admin")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert load_named_tokens(str(path)) == {"ann": ANN}
    (record,) = [r for r in caplog.records if "admin.tokens_file" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "readable by its group (mode 0440), this server's own" in record.getMessage()
    caplog.clear()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert load_named_tokens(str(path)) == {"ann": ANN}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "readable by its group" in record.getMessage()
    # Writable by the group is refused, in a pod too.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    path.chmod(0o460)
    with pytest.raises(ConfigError, match=r"writable by other users \(mode 0460\)"):
        load_named_tokens(str(path))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="giving a file to another group (chown) needs root",
)
def test_a_group_readable_file_of_another_group_warns_in_a_pod_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tokens_file(tmp_path, f"ann:{ANN}\n", 0o440)
    os.chown(path, -1, 12345)
    assert 12345 not in (os.getegid(), *os.getgroups())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    caplog.set_level(logging.INFO, logger="infercore.admin")
    assert load_named_tokens(str(path)) == {"ann": ANN}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "readable by its group" in record.getMessage()


@pytest.mark.parametrize("name", ["guard", "server", "repository-api", "Server", "GUARD"])
def test_a_token_may_not_take_a_name_the_server_records_itself_under(
    tmp_path: Path, name: str
) -> None:
    path = tokens_file(tmp_path, f"# ops\nann:{ANN}\n{name}:{BOB}\n")
    with pytest.raises(ConfigError) as caught:
        load_named_tokens(str(path))
    error = caught.value
    assert error.message.startswith(f"admin.tokens_file {str(path)!r}, line 3: the name {name!r}")
    assert "guard, repository-api, server" in error.message
    assert error.hint is not None and "after the person" in error.hint
    assert "SECRET" not in str(error)
    # A name that only contains one is a person's.
    path = tokens_file(tmp_path, f"server-ops:{ANN}\nguardian:{BOB}\n")
    assert sorted(load_named_tokens(str(path))) == ["guardian", "server-ops"]


def test_the_tokens_file_replaces_the_shared_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tokens_file(tmp_path, f"ann:{ANN}\n")
    shared = tmp_path / "shared"
    shared.write_text(SHARED)
    with pytest.raises(ConfigError, match=r"admin\.tokens_file and admin\.auth_file are both set"):
        load_token(AdminConfig(tokens_file=str(path), auth_file=str(shared)), {})
    caplog.set_level(logging.WARNING, logger="infercore.admin")
    # The shared variable, set for the CLI to one of the named tokens: nothing to say.
    load_token(AdminConfig(tokens_file=str(path)), {"INFERCORE_ADMIN_TOKEN": ANN})
    assert caplog.text == ""
    # Set to another token: it is not accepted, and the log says so (without the token).
    load_token(AdminConfig(tokens_file=str(path)), {"INFERCORE_ADMIN_TOKEN": SHARED})
    assert "$INFERCORE_ADMIN_TOKEN is set, but admin.tokens_file replaces" in caplog.text
    assert "SECRET" not in caplog.text
    # `admin.tokens_file=` on the command line: unset, the shared token again.
    assert AdminConfig(tokens_file="").tokens_file is None


def test_the_listener_warns_of_a_distinct_approver_with_a_shared_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="infercore.admin")
    cfg = rollout_config(distinct_approver=True)
    cfg["admin"] = {"enabled": True, "port": 0}
    assert AdminListener.from_runtime(runtime_from_dict(cfg), {"INFERCORE_ADMIN_TOKEN": SHARED})
    assert "rollout.distinct_approver (model m) with one shared admin token" in caplog.text
    caplog.clear()
    cfg["admin"]["tokens_file"] = str(tokens_file(tmp_path, f"ann:{ANN}\nbob:{BOB}\n"))
    assert AdminListener.from_runtime(runtime_from_dict(cfg), {})
    assert "distinct_approver" not in caplog.text


# -- authentication ------------------------------------------------------------------------


def test_every_named_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken says nothing of which token (if any) matched."""
    compared: list[int] = []

    class CountingHmac:
        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            compared.append(1)
            return hmac.compare_digest(a, b)

    monkeypatch.setattr(admin, "hmac", CountingHmac)
    auth = BearerAuth(None, {"ann": ANN, "bob": BOB, "carol": "SECRETcarol0123456789abc"})
    for token, expected in ((ANN, (0, "ann")), (BOB, (0, "bob")), ("x" * 30, (403, None))):
        compared.clear()
        assert auth.identify(f"Bearer {token}".encode()) == expected
        assert len(compared) == 3
    assert auth.identify(None) == (401, None)
    assert auth.identify(b"Basic abc") == (401, None)
    assert BearerAuth(None, SHARED).identify(f"Bearer {SHARED}".encode()) == (0, None)


def test_each_named_token_is_accepted_and_knows_its_name() -> None:
    rt = runtime_from_dict(rollout_config())

    async def main() -> None:
        async with admin_client(rt, TOKENS) as a:
            assert (await a.get("/admin/models")).status_code == 401
            r = await a.get("/admin/models", headers=bearer(SHARED))
            assert (r.status_code, r.json()["reason"]) == (403, "unauthorized")
            for name, token in TOKENS.items():
                assert (await a.get("/admin/models", headers=bearer(token))).status_code == 200
                who = (await a.get("/admin/whoami", headers=bearer(token))).json()
                assert who == {"name": name, "authenticated": True}
            assert (await a.get("/admin/whoami")).status_code == 401

    asyncio.run(main())


def test_with_the_shared_token_by_is_required_and_only_names() -> None:
    rt = runtime_from_dict(rollout_config())

    async def main() -> None:
        async with admin_client(rt, SHARED) as a:
            auth = bearer(SHARED)
            who = (await a.get("/admin/whoami", headers=auth)).json()
            assert who == {"name": None, "authenticated": False}
            for body in ({"to": "canary", "weight": 10}, {"to": "canary", "by": None}):
                r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=auth)
                assert (r.status_code, r.json()["reason"]) == (400, "invalid_input"), r.text
                assert "say who decides" in r.json()["error"]
            body = {"to": "canary", "weight": 10, "by": "anyone"}
            r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=auth)
            assert r.status_code == 202, r.text
            r = await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "3"}},
                             headers=auth)  # fmt: skip
            assert r.status_code == 200, r.text
            audit = (await a.get("/admin/audit", headers=auth)).json()
            assert [(e["event"], e["actor"]) for e in audit] == [
                ("approval_requested", "anyone"),
                ("load_requested", "repository-api"),
                ("loaded", "repository-api"),
            ]
            assert not any("authenticated" in e for e in audit)

    asyncio.run(main())


# -- who decides ---------------------------------------------------------------------------


def test_a_named_token_decides_as_its_name_and_no_one_else() -> None:
    """Every decision route: ``by`` absent is the token's name, the name itself is fine, and
    any other is a 403 that changes nothing."""
    rt = runtime_from_dict(rollout_config())

    async def main() -> None:
        async with admin_client(rt, TOKENS) as a:
            ann = bearer(ANN)

            async def state() -> Any:
                return (await a.get("/admin/models/m", headers=ann)).json()

            async def refused(method: str, path: str, body: dict[str, Any]) -> None:
                before = await state()
                r = await a.request(method, path, json={**body, "by": "bob"}, headers=ann)
                assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
                assert r.json()["error"].startswith(
                    "this token belongs to 'ann'; `by` says 'bob'"
                ), r.text
                assert await state() == before

            promote = "/admin/models/m/versions/2/promote"
            await refused("POST", promote, {"to": "canary", "weight": 10})
            r = await a.post(promote, json={"to": "canary", "weight": 10}, headers=ann)
            assert r.status_code == 202 and r.json()["approval"]["requested_by"] == "ann"
            first = r.json()["approval"]["id"]
            for route in ("approve", "reject"):
                await refused("POST", f"/admin/approvals/{first}/{route}", {})
            r = await a.post(f"/admin/approvals/{first}/reject", json={"by": " ann "}, headers=ann)
            assert r.status_code == 200 and r.json()["approval"]["decided_by"] == "ann", r.text
            await refused("PUT", "/admin/models/m/weights", {"weights": {"1": 100}})
            r = await a.put("/admin/models/m/weights", json={"weights": {"1": 100}}, headers=ann)
            assert r.status_code == 200, r.text
            await refused("POST", "/admin/models/m/rollback", {})
            r = await a.post("/admin/models/m/rollback", json={"reason": "test"}, headers=ann)
            # Primary 1 since the start and no canary traffic: nothing to roll back. A 409
            # from the runtime, past the token check (a 403 would come first), changing nothing.
            assert (r.status_code, r.json()["reason"]) == (409, "conflict"), r.text
            assert "nothing to roll back" in r.json()["error"], r.text
            for route in ("unload", "load"):
                path = f"/v2/repository/models/m/{route}"
                r = await a.post(
                    path, json={"parameters": {"version": "3", "by": "bob"}}, headers=ann
                )
                assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
            r = await a.post(
                "/v2/repository/models/m/unload", json={"parameters": {"version": "3"}}, headers=ann
            )
            assert r.status_code == 200, r.text
            audit = (await a.get("/admin/audit", headers=ann)).json()
            assert {e["actor"] for e in audit} == {"ann"}
            assert all(e["authenticated"] is True for e in audit)
            assert [e["event"] for e in audit][-2:] == ["unload_requested", "unloaded"]

    asyncio.run(main())


def test_with_a_named_token_a_by_to_fix_is_told_to_leave_by_out() -> None:
    """An empty ``by`` is refused as ever, but the fix with a named token is to leave it out
    (not to name yourself); ``parameters.by: null`` on a V2 repository call is the token's
    name, as ``by: null`` is on the decision routes. The shared token keeps its answers."""
    rt = runtime_from_dict(rollout_config())

    async def named() -> None:
        async with admin_client(rt, TOKENS) as a:
            ann = bearer(ANN)
            promote = "/admin/models/m/versions/2/promote"
            for by, message in (
                ("", "`by` is empty; with this token leave it out: 'ann' decides"),
                ("  ", "`by` is empty; with this token leave it out: 'ann' decides"),
                ("x" * 65, "`by` must be 1-64 printable characters; with this token leave it out"),
            ):
                body = {"to": "canary", "weight": 10, "by": by}
                r = await a.post(promote, json=body, headers=ann)
                assert (r.status_code, r.json()["reason"]) == (400, "invalid_input"), r.text
                assert r.json()["error"].startswith(message), r.text
                assert "say who decides" not in r.json()["error"]
            load = "/v2/repository/models/m/load"
            r = await a.post(load, json={"parameters": {"version": "3", "by": ""}}, headers=ann)
            assert r.status_code == 400 and "leave it out" in r.json()["error"], r.text
            r = await a.post(load, json={"parameters": {"version": "3", "by": None}}, headers=ann)
            assert r.status_code == 200, r.text
            audit = (await a.get("/admin/audit", headers=ann)).json()
            assert [(e["event"], e["actor"], e["authenticated"]) for e in audit] == [
                ("load_requested", "ann", True),
                ("loaded", "ann", True),
            ]

    asyncio.run(named())

    async def shared() -> None:
        async with admin_client(runtime_from_dict(rollout_config()), SHARED) as a:
            auth = bearer(SHARED)
            body = {"to": "canary", "weight": 10, "by": ""}
            r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=auth)
            assert r.status_code == 400 and "say who decides" in r.json()["error"], r.text
            params = {"parameters": {"version": "3", "by": None}}
            r = await a.post("/v2/repository/models/m/load", json=params, headers=auth)
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith("parameters.by must be a string"), r.text

    asyncio.run(shared())


def test_tasks_a_load_starts_do_not_act_as_the_request_s_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A version's background tasks (its batcher's collector, say) start while the load
    request runs but outlive it: they see no token, while the load's own records are the
    token's."""
    from infercore.lifecycle.manager import AUTHENTICATED_ACTOR
    from infercore.testing import FakeModel

    seen: list[str | None] = []
    background: list[asyncio.Task[None]] = []
    start = FakeModel.start

    async def start_with_a_task(self: FakeModel) -> None:
        await start(self)

        async def later() -> None:
            seen.append(AUTHENTICATED_ACTOR.get())

        background.append(asyncio.create_task(later()))

    monkeypatch.setattr(FakeModel, "start", start_with_a_task)
    rt = runtime_from_dict(rollout_config())

    async def main() -> None:
        async with admin_client(rt, TOKENS) as a:
            await asyncio.gather(*background)  # the recipe's versions, started with the server
            assert seen == [None, None, None]
            background.clear()
            seen.clear()
            body = {"parameters": {"version": "3"}}
            r = await a.post("/v2/repository/models/m/load", json=body, headers=bearer(ANN))
            assert r.status_code == 200, r.text
            await asyncio.gather(*background)
            assert len(background) == 1 and seen == [None]
            audit = (await a.get("/admin/audit", headers=bearer(ANN))).json()
            assert [(e["event"], e["actor"], e["authenticated"]) for e in audit] == [
                ("load_requested", "ann", True),
                ("loaded", "ann", True),
            ]

    asyncio.run(main())


def test_distinct_approver_holds_between_named_tokens(tmp_path: Path) -> None:
    """ann asks; ann's token cannot approve, not even saying it is bob; bob's token can."""
    audit_log = tmp_path / "audit.jsonl"
    cfg = rollout_config(distinct_approver=True)
    cfg["admin"] = {"audit_log": str(audit_log)}
    rt = runtime_from_dict(cfg)

    async def main() -> None:
        async with admin_client(rt, TOKENS) as a:
            ann, bob = bearer(ANN), bearer(BOB)
            body = {"to": "canary", "weight": 10, "reason": "shadow agrees"}
            r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=ann)
            assert r.status_code == 202, r.text
            approve = f"/admin/approvals/{r.json()['approval']['id']}/approve"
            r = await a.post(approve, json={"by": "bob"}, headers=ann)
            assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
            r = await a.post(approve, json={}, headers=ann)
            assert (r.status_code, r.json()["reason"]) == (409, "conflict"), r.text
            assert "another person must approve it" in r.json()["error"]
            r = await a.post(approve, json={"by": "ann"}, headers=bob)
            assert r.status_code == 403, r.text
            r = await a.post(approve, json={"reason": "looked"}, headers=bob)
            assert r.status_code == 200, r.text
            assert r.json()["approval"]["requested_by"] == "ann"
            assert r.json()["approval"]["decided_by"] == "bob"

    asyncio.run(main())
    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    decided = [(r["event"], r["actor"], r.get("authenticated")) for r in records]
    assert decided == [
        ("approval_requested", "ann", True),
        ("approved", "bob", True),
        ("promoted", "bob", True),
    ]


# -- digests ------------------------------------------------------------------------------


def test_a_line_may_hold_the_token_s_digest_instead_of_the_token(tmp_path: Path) -> None:
    short = "SECRET"  # behind a digest the server cannot see a token's length: the generator's job
    path = tokens_file(
        tmp_path,
        f"ann:{ANN}\n"
        f"carol:sha256:{sha256(CAROL)}\n"
        f"dave:sha256:{sha256(short).upper()}\n",  # either case, as sha256 pins elsewhere
    )
    assert load_named_tokens(str(path)) == {
        "ann": ANN,
        "carol": f"sha256:{sha256(CAROL)}",
        "dave": f"sha256:{sha256(short)}",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"ann:sha256:{sha256(ANN)[:-1]}\n", "line 1: after 'sha256:' the line must hold"),
        (f"ann:sha256:{sha256(ANN)}0\n", "line 1: after 'sha256:' the line must hold"),
        (f"ann:sha256:{sha256(ANN)[:-1]}g\n", "64 hex digits and nothing else"),
        (f"ann:sha256:{sha256(ANN)}:x\n", "64 hex digits and nothing else"),
        (f"# c\nann:sha256:{ANN}\n", "line 2: after 'sha256:'"),  # a token that starts so
        ("ann:sha256:\n", "always read as a digest"),
        (f"ann:SHA256:{sha256(ANN)}\n", "only SHA-256 digests are read, after 'sha256:' in"),
        (f"ann:sha512:{hashlib.sha512(ANN.encode()).hexdigest()}\n", "another hash's digest"),
        (f"ann:md5:{hashlib.md5(ANN.encode()).hexdigest()}\n", "another hash's digest"),
        # One token on two lines, whatever their forms: it must name one person.
        (f"ann:{ANN}\nbob:sha256:{sha256(ANN)}\n", "line 2: the token is line 1's too (this"),
        (f"ann:sha256:{sha256(ANN)}\nbob:{ANN}\n", "line 2: the token is line 1's too (that"),
        (
            f"ann:sha256:{sha256(ANN)}\nbob:sha256:{sha256(ANN).upper()}\n",
            "line 2: the token is line 1's too; a token",
        ),
    ],
)
def test_each_digest_line_mistake_names_the_line_never_the_token_or_digest(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tokens_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_named_tokens(str(path))
    error = caught.value
    assert error.message.startswith(f"admin.tokens_file {str(path)!r}"), error.message
    assert message in error.message
    assert error.hint is not None and "infercore models token NAME" in error.hint
    shown = str(error).lower()
    assert "secret" not in shown
    assert not re.search(r"[0-9a-f]{16}", shown), shown  # no digest, nor a piece of one
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_token(AdminConfig(enabled=True, tokens_file=str(path)), {})


def test_a_digest_line_is_one_more_digest_in_the_constant_time_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[int] = []

    class CountingHmac:
        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            compared.append(1)
            return hmac.compare_digest(a, b)

    monkeypatch.setattr(admin, "hmac", CountingHmac)
    auth = BearerAuth(None, {"ann": ANN, "carol": f"sha256:{sha256(CAROL)}", "bob": BOB})
    for token, expected in ((CAROL, (0, "carol")), (ANN, (0, "ann")), ("x" * 30, (403, None))):
        compared.clear()
        assert auth.identify(f"Bearer {token}".encode()) == expected
        assert len(compared) == 3
    # What the file holds is no credential: the digest, presented, is refused.
    for leaked in (f"sha256:{sha256(CAROL)}", sha256(CAROL)):
        assert auth.identify(f"Bearer {leaked}".encode()) == (403, None)
    # The shared token is a token, whatever it looks like.
    shared = f"sha256:{sha256(CAROL)}"
    assert BearerAuth(None, shared).identify(f"Bearer {shared}".encode()) == (0, None)
    assert BearerAuth(None, shared).identify(f"Bearer {CAROL}".encode()) == (403, None)


def test_a_token_whose_digest_is_in_the_file_is_accepted_and_decides_as_its_name(
    tmp_path: Path,
) -> None:
    path = tokens_file(tmp_path, f"ann:{ANN}\ncarol:sha256:{sha256(CAROL)}\n")
    tokens = load_token(AdminConfig(enabled=True, tokens_file=str(path)), {})
    rt = runtime_from_dict(rollout_config(distinct_approver=True))

    async def main() -> None:
        async with admin_client(rt, tokens) as a:
            carol, ann = bearer(CAROL), bearer(ANN)
            who = (await a.get("/admin/whoami", headers=carol)).json()
            assert who == {"name": "carol", "authenticated": True}
            for leaked in (f"sha256:{sha256(CAROL)}", sha256(CAROL)):
                r = await a.get("/admin/whoami", headers=bearer(leaked))
                assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
            body = {"to": "canary", "weight": 10}
            r = await a.post("/admin/models/m/versions/2/promote", json=body, headers=carol)
            assert r.status_code == 202 and r.json()["approval"]["requested_by"] == "carol"
            approve = f"/admin/approvals/{r.json()['approval']['id']}/approve"
            r = await a.post(approve, json={"by": "ann"}, headers=carol)
            assert (r.status_code, r.json()["reason"]) == (403, "unauthorized"), r.text
            r = await a.post(approve, json={}, headers=ann)
            assert r.status_code == 200 and r.json()["approval"]["decided_by"] == "ann", r.text
            audit = (await a.get("/admin/audit", headers=carol)).json()
            assert [(e["event"], e["actor"], e["authenticated"]) for e in audit] == [
                ("approval_requested", "carol", True),
                ("approved", "ann", True),
                ("promoted", "ann", True),
            ]

    asyncio.run(main())


def test_the_shared_variable_set_to_a_token_whose_digest_is_in_the_file_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tokens_file(tmp_path, f"ann:{ANN}\ncarol:sha256:{sha256(CAROL)}\n")
    caplog.set_level(logging.WARNING, logger="infercore.admin")
    load_token(AdminConfig(tokens_file=str(path)), {"INFERCORE_ADMIN_TOKEN": CAROL})
    assert caplog.text == ""
    # The digest line's text is not carol's token: the variable holding it is not accepted.
    load_token(
        AdminConfig(tokens_file=str(path)), {"INFERCORE_ADMIN_TOKEN": f"sha256:{sha256(CAROL)}"}
    )
    assert "$INFERCORE_ADMIN_TOKEN is set, but admin.tokens_file replaces" in caplog.text


# -- the CLI -------------------------------------------------------------------------------


@contextmanager
def admin_listener(runtime: Any, environ: dict[str, str]) -> Iterator[None]:
    """``runtime`` and its admin listener (``admin.uds``) on a thread of their own."""
    ready, done = threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()
    failed: list[BaseException] = []

    async def serve() -> None:
        try:
            listener = AdminListener.from_runtime(runtime, environ)
            assert listener is not None
            await runtime.start()
            await listener.start()
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            raise
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await listener.stop()
        await runtime.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and not failed, failed
        yield
    finally:
        done.set()
        thread.join(30)
        loop.close()


def test_the_cli_decides_as_the_named_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infercore.cli import run as cli

    monkeypatch.setattr(getpass, "getuser", lambda: "local-user")
    sock = tmp_path / "a.sock"
    cfg = rollout_config(distinct_approver=True)
    path = tokens_file(tmp_path, f"ann:{ANN}\nbob:{BOB}\n")
    cfg["admin"] = {"enabled": True, "uds": str(sock), "tokens_file": str(path)}
    as_ann = ["models", "--url", f"unix:{sock}", "--token", ANN]
    as_bob = ["models", "--url", f"unix:{sock}", "--token", BOB]
    with admin_listener(runtime_from_dict(cfg), {}):
        assert cli([*as_ann, "whoami"]) == 0
        assert capsys.readouterr().out.startswith("ann (a named token")
        assert cli([*as_ann, "promote", "m", "2", "--to", "canary", "--weight", "20"]) == 0
        approval = capsys.readouterr().out.split()[1]
        assert cli([*as_ann, "approve", approval, "--by", "bob"]) == 1
        err = capsys.readouterr().err
        assert "this token belongs to 'ann'; `by` says 'bob'" in err and "HTTP 403" in err
        assert cli([*as_ann, "approve", approval]) == 1
        assert "another person must approve it (HTTP 409 conflict)" in capsys.readouterr().err
        assert cli([*as_bob, "approve", approval, "--reason", "fine"]) == 0
        assert "approved by bob" in capsys.readouterr().out
        assert cli([*as_bob, "load", "m", "3"]) == 0
        capsys.readouterr()
        assert cli([*as_bob, "audit", "--limit", "5"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["event"], r["actor"], r["authenticated"]) for r in records] == [
            ("approval_requested", "ann", True),
            ("approved", "bob", True),
            ("promoted", "bob", True),
            ("load_requested", "bob", True),
            ("loaded", "bob", True),
        ]


def test_the_cli_names_the_local_user_with_the_shared_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infercore.cli import run as cli

    monkeypatch.setattr(getpass, "getuser", lambda: "local-user")
    sock = tmp_path / "a.sock"
    cfg = rollout_config()
    cfg["admin"] = {"enabled": True, "uds": str(sock)}
    base = ["models", "--url", f"unix:{sock}", "--token", SHARED]
    with admin_listener(runtime_from_dict(cfg), {"INFERCORE_ADMIN_TOKEN": SHARED}):
        assert cli([*base, "whoami"]) == 0
        assert capsys.readouterr().out.startswith("a shared token")
        assert cli([*base, "promote", "m", "2", "--to", "canary", "--weight", "20"]) == 0
        approval = capsys.readouterr().out.split()[1]
        assert cli([*base, "approve", approval, "--by", "bob"]) == 0
        capsys.readouterr()
        assert cli([*base, "--json", "approvals", "--status", "all"]) == 0
        (decided,) = json.loads(capsys.readouterr().out)
        assert (decided["requested_by"], decided["decided_by"]) == ("local-user", "bob")


IRIS_ONNX = Path(__file__).resolve().parents[2] / "recipes" / "iris" / "artifacts" / "model.onnx"


@pytest.mark.skipif(not IRIS_ONNX.is_file(), reason="iris model not built")
def test_config_validate_reads_the_tokens_file_instead_of_the_shared_token(
    tmp_path: Path,
) -> None:
    """``admin.tokens_file`` is a key of the root config, and needs no shared token."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "INFERCORE_ADMIN_TOKEN"}
    path = tokens_file(tmp_path, f"ann:{ANN}\nbob:{BOB}\n")

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(Path(sys.executable).parent / "infercore"),
                "config",
                "validate",
                "+recipe=iris",
                "admin.enabled=true",
                f"admin.tokens_file={path}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    ok = validate()
    assert ok.returncode == 0, ok.stderr
    path.write_text(f"ann:{ANN}\nbob {BOB}\n")
    refused = validate()
    assert refused.returncode == 2, refused
    line = refused.stderr.strip()
    assert line.startswith(f"infercore: config error: admin.tokens_file {str(path)!r}, line 2: ")
    assert len(line.splitlines()) == 1 and "SECRET" not in line


# -- the token generator -------------------------------------------------------------------


def generated(capsys: pytest.CaptureFixture[str], name: str) -> tuple[str, str]:
    """``infercore models token NAME``'s token and line, from its labelled output."""
    from infercore.cli import run as cli

    assert cli(["models", "token", name]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    label, token, file_label, line = out.splitlines()
    assert label.startswith(f"# the token for {name}: give it to {name} alone")
    assert file_label.startswith("# the line for admin.tokens_file")
    return token, line


def test_a_generated_token_authenticates_against_a_file_of_its_printed_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server, no admin token, no admin URL: the command only prints."""
    monkeypatch.delenv("INFERCORE_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("INFERCORE_ADMIN_URL", "http://:not-a-port")  # not read
    token, line = generated(capsys, "carol@example.com")
    assert re.fullmatch(r"[0-9a-f]{48}", token)  # 192 random bits, well over MIN_TOKEN_CHARS
    assert line == f"carol@example.com:sha256:{sha256(token)}" and token not in line
    again, _ = generated(capsys, "carol@example.com")
    assert again != token
    path = tokens_file(tmp_path, f"# generated\n{line}\nann:{ANN}\n")
    tokens = load_token(AdminConfig(enabled=True, tokens_file=str(path)), {})
    assert not isinstance(tokens, str)
    assert token not in tokens.values()  # the file and the server hold the digest only
    rt = runtime_from_dict(rollout_config())

    async def main() -> None:
        async with admin_client(rt, tokens) as a:
            who = (await a.get("/admin/whoami", headers=bearer(token))).json()
            assert who == {"name": "carol@example.com", "authenticated": True}
            r = await a.get("/admin/whoami", headers=bearer(again))
            assert r.status_code == 403

    asyncio.run(main())


def test_the_generator_s_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    from infercore.cli import run as cli

    assert cli(["models", "--json", "token", "ann"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"name", "token", "line"} and doc["name"] == "ann"
    assert doc["line"] == f"ann:sha256:{sha256(doc['token'])}"


@pytest.mark.parametrize("name", ["an n", "-ann", "a" * 65, "ann:x", "", "ann\n"])
def test_the_generator_refuses_a_name_the_file_would_refuse(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from infercore.cli import run as cli

    assert cli(["models", "token", "--", name]) == 2  # `--`: "-ann" is a name, not an option
    out, err = capsys.readouterr()
    assert out == ""  # no token is made for a line the server would refuse
    (line,) = err.splitlines()
    assert line.startswith(f"infercore: error: NAME {name!r}: a token's name is 1-64 letters")


@pytest.mark.parametrize("name", ["server", "Guard", "repository-api"])
def test_the_generator_refuses_a_name_the_server_decides_under(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from infercore.cli import run as cli

    assert cli(["models", "token", name]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "records its own decisions under" in err and "e.g. ann" in err


@pytest.mark.parametrize(
    ("outcome", "said"),
    [("failed", "could not be written"), ("writing", "still being written"), ("written", None)],
)
def test_the_cli_says_when_a_change_did_not_reach_the_state_file(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    outcome: str,
    said: str | None,
) -> None:
    from infercore import admin_client

    class Answer:
        status = 200

        def read(self) -> bytes:
            return json.dumps({"status": "applied", "state_file": outcome}).encode()

    class Connection:
        def __init__(self, timeout: float) -> None:
            pass

        def request(self, *args: Any, **kwargs: Any) -> None:
            pass

        def getresponse(self) -> Answer:
            return Answer()

        def close(self) -> None:
            pass

    client = admin_client.AdminClient("http://127.0.0.1:1", "t" * 24)
    monkeypatch.setattr(client, "_connection", Connection)
    status, doc = client.request("POST", "/admin/models/m/rollback", {"by": "ann"})
    assert (status, doc["state_file"]) == (200, outcome)
    err = capsys.readouterr().err
    if said is None:
        assert err == ""
    else:
        assert err.startswith("infercore: warning: the change is made but") and said in err
