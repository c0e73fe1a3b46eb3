"""The admin API fuzzed: every route, with path parameters and bodies from hypothesis.

The admin listener publishes no OpenAPI schema (it is off the inference listener and closed
by default), so the cases come from hypothesis directly: names that exist and names that do
not, and bodies that are arbitrary JSON, JSON objects with the fields the routes know holding
values of any type, or arbitrary bytes. The calls are authenticated, and they run in sequence
against one runtime, so one case meets the state the earlier ones left (a version promoted, a
canary's weight set, an approval pending). No answer may be a 5xx, and every refusal carries
the `{"error", "reason"}` body. Derandomized, so a failure reproduces.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_admin import TOKEN, rollout_config  # model m: 1 primary, 2 shadow, 3 a candidate

from infercore.server.admin import create_admin_app
from infercore.testing import runtime_from_dict

PENDING = "<pending>"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
stages = st.one_of(
    st.sampled_from(["candidate", "shadow", "canary", "primary", "retired"]),
    st.sampled_from(["shadow", "canary"]),
    st.sampled_from(["Canary", "", "primary "]),
)
deciders = st.one_of(st.sampled_from(["alice", "bob"]), st.text(max_size=8))
edge_floats = st.floats() | st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.1, 1.5, 100.0])

#: Per route: bodies of its shape with values good and bad, so calls succeed as well as fail.
SHAPES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "promote": st.fixed_dictionaries(
        {"to": stages, "by": deciders},
        optional={"weight": edge_floats | st.none(), "reason": st.text(max_size=8)},
    ),
    "weights": st.fixed_dictionaries(
        {
            "weights": st.dictionaries(st.sampled_from(["1", "2", "3", "9", ""]), edge_floats),
            "by": deciders,
        }
    ),
    "decision": st.fixed_dictionaries({"by": deciders}, optional={"reason": st.text(max_size=8)}),
    "repository": st.fixed_dictionaries({}, optional={"parameters": json_values}),
    "index": st.fixed_dictionaries({}, optional={"ready": json_values}),
}

ROUTES = [
    ("POST", "/v2/repository/index", "index"),
    ("POST", "/v2/repository/models/{model}/load", "repository"),
    ("POST", "/v2/repository/models/{model}/unload", "repository"),
    ("GET", "/admin/models", None),
    ("GET", "/admin/models/{model}", None),
    ("POST", "/admin/models/{model}/versions/{version}/promote", "promote"),
    ("PUT", "/admin/models/{model}/weights", "weights"),
    ("POST", "/admin/models/{model}/rollback", "decision"),
    ("GET", "/admin/models/{model}/shadow", None),
    ("GET", "/admin/models/{model}/drift", None),
    ("GET", "/admin/approvals", None),
    ("POST", "/admin/approvals/{approval}/approve", "decision"),
    ("POST", "/admin/approvals/{approval}/reject", "decision"),
    ("GET", "/admin/audit", None),
    ("GET", "/admin/whoami", None),
]

#: Field names the admin bodies use, so arbitrary objects reach past "unknown field".
FIELDS = ["to", "by", "weight", "weights", "reason", "parameters", "ready", "note"]
any_body = st.one_of(
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4).map(
        lambda v: json.dumps(v).encode()
    ),
    st.binary(max_size=64),
)


def bodies(shape: str | None) -> st.SearchStrategy[bytes]:
    """Mostly the route's own shape (hypothesis picks a branch of one_of about evenly: a pick
    of everything would almost never reach a promotion or an approval), else anything."""
    if shape is None:
        return any_body
    own = SHAPES[shape].map(lambda v: json.dumps(v).encode())
    return st.one_of(own, own, own, any_body)


names = st.sampled_from(["m", "1", "2", "3", "canary", "primary", "shadow"]) | st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
)
model_names = st.one_of(st.just("m"), st.just("m"), st.just("m"), names)
version_names = st.one_of(*[st.sampled_from(["1", "2", "3"])] * 3, names)
queries = st.dictionaries(
    st.sampled_from(["status", "limit"]),
    st.sampled_from(["pending", "approved", "-1", "5", "99999999", "x"]),
    max_size=2,
)


@pytest.fixture(scope="module")
def admin() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]]:
    loop = asyncio.new_event_loop()
    runtime = runtime_from_dict(rollout_config())
    loop.run_until_complete(runtime.start())
    transport = httpx.ASGITransport(app=create_admin_app(runtime, TOKEN))
    client = httpx.AsyncClient(
        transport=transport,
        base_url="http://admin",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    # Pending approvals to decide, so approve and reject meet real ones as well as unknown ids.
    for version, to in (("3", "canary"), ("2", "primary")):
        body = {"to": to, "by": "alice"} | ({"weight": 0.1} if to == "canary" else {})
        answer = loop.run_until_complete(
            client.post(f"/admin/models/m/versions/{version}/promote", json=body)
        )
        assert answer.status_code == 202, answer.text
    try:
        yield loop, client
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(runtime.stop())
        loop.close()


@settings(settings.get_profile("fuzz"), max_examples=600)
@given(
    data=st.data(),
    model=model_names,
    version=version_names,
    approval=st.one_of(st.just(PENDING), st.just(PENDING), names),
    query=queries,
    json_type=st.booleans(),
)
def test_no_admin_call_gets_a_5xx(
    admin: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient],
    data: st.DataObject,
    model: str,
    version: str,
    approval: str,
    query: dict[str, str],
    json_type: bool,
) -> None:
    loop, client = admin
    method, template, shape = data.draw(st.sampled_from(ROUTES), label="route")
    body = data.draw(bodies(shape), label="body")
    if approval == PENDING:  # the oldest pending approval, if any, so decisions are reached
        listed = loop.run_until_complete(client.get("/admin/approvals?status=pending")).json()
        items = listed.get("approvals", listed) if isinstance(listed, dict) else listed
        approval = str(items[0]["id"]) if items else "none-pending"
    path = template.format(
        model=quote(model, safe=""),
        version=quote(version, safe=""),
        approval=quote(approval, safe=""),
    )
    headers = {"Content-Type": "application/json"} if json_type else {}
    response = loop.run_until_complete(
        client.request(method, path, content=body, params=query, headers=headers)
    )
    assert response.status_code < 500, (method, path, body, response.text)
    if response.status_code >= 400:
        error = response.json()
        assert isinstance(error.get("error"), str) and isinstance(error.get("reason"), str)
