"""Inference requests answered before Litestar's routing give exactly the routes' answers.

``create_app(fast_path=False)`` sends every request through the Litestar handlers; the default
answers the inference routes straight from the ASGI scope. Both must agree on status, body and
the headers a client reads, for good and bad requests alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from infercore.server import create_app
from infercore.server.app import InferenceApp, _inference_target
from infercore.testing import fake_model_config, runtime_from_dict

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
JSON = {"content-type": "application/json"}
RID = {"content-type": "application/json", "x-request-id": "req-7"}

# (method, path, body bytes, headers)
REQUESTS: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("POST", "/v2/models/m/infer", msgspec.json.encode(BODY), RID),
    ("POST", "/v2/models/m/versions/1/infer", msgspec.json.encode(BODY), RID),
    ("POST", "/v2/models/m/versions/9/infer", msgspec.json.encode(BODY), RID),
    ("POST", "/v2/models/nope/infer", msgspec.json.encode(BODY), RID),
    ("POST", "/v2/models/m/infer", b'{"inputs": [', RID),
    ("POST", "/v2/models/m/infer", msgspec.json.encode({"inputs": []}), RID),
    ("POST", "/v2/models/m/infer", msgspec.json.encode(BODY), {"content-type": "text/plain"}),
    ("POST", "/v2/models/m/infer", msgspec.json.encode(BODY), {"content-encoding": "gzip"}),
    ("POST", "/v2/models/m/infer", b"x" * 5000, RID),  # over server.max_body_bytes
    (
        "POST",
        "/v2/models/m/infer",
        msgspec.json.encode({**BODY, "outputs": [{"name": "nope"}]}),
        RID,
    ),
    ("POST", "/v1/models/m:predict", msgspec.json.encode({"instances": [[1, 2, 3, 4]]}), RID),
    (
        "POST",
        "/v1/models/m/versions/1:predict",
        msgspec.json.encode({"instances": [[1, 2, 3, 4]]}),
        JSON,
    ),
    ("POST", "/v1/models/m:explain", msgspec.json.encode({"instances": [[1, 2, 3, 4]]}), JSON),
    ("POST", "/v1/models/m:predict", b'{"instances": 3}', JSON),
    ("GET", "/v2/models/m/infer", b"", JSON),  # wrong method: Litestar's 405 either way
    # Empty names: 404 model_not_found naming them either way (not Litestar's 405, which
    # reads the path without the empty segment as a metadata route).
    ("POST", "/v2/models//infer", msgspec.json.encode(BODY), RID),
    ("POST", "/v2/models/m/versions//infer", msgspec.json.encode(BODY), RID),
    # Litestar finds no route for it (a 404 not_found): answered as the fast path answers it.
    ("POST", "/v2/models//versions/1/infer", msgspec.json.encode(BODY), RID),
    # The metadata route of a model named "infer" (a 405), and the inference route of a model
    # named "versions" as Litestar reads it: neither is taken by the fast path.
    ("POST", "/v2/models/infer", msgspec.json.encode(BODY), JSON),
    ("POST", "/v2/models//versions//infer", msgspec.json.encode(BODY), RID),
]


@pytest.fixture
def clients() -> Iterator[tuple[TestClient[Any], TestClient[Any]]]:
    config = fake_model_config(server={"max_body_bytes": 4096})
    fast = create_app(runtime_from_dict(config))
    slow = create_app(runtime_from_dict(config), fast_path=False)
    assert isinstance(fast, InferenceApp) and fast.inference_fast_path is not None
    assert isinstance(slow, InferenceApp) and slow.inference_fast_path is None
    with (
        TestClient(fast, raise_server_exceptions=False) as f,
        TestClient(slow, raise_server_exceptions=False) as s,
    ):
        yield f, s


@pytest.mark.parametrize(("method", "path", "body", "headers"), REQUESTS)
def test_the_fast_path_answers_as_the_routes_do(
    clients: tuple[TestClient[Any], TestClient[Any]],
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    fast, slow = clients
    a = fast.request(method, path, content=body, headers=headers)
    b = slow.request(method, path, content=body, headers=headers)
    assert (a.status_code, a.content) == (b.status_code, b.content)
    for name in ("content-type", "retry-after", "allow"):
        assert a.headers.get(name) == b.headers.get(name), name
    if "x-request-id" in headers:
        assert a.headers["x-request-id"] == b.headers["x-request-id"] == headers["x-request-id"]
    else:  # generated (32 hex digits) on inference answers; none on Litestar's own 405
        assert ("x-request-id" in a.headers) == ("x-request-id" in b.headers)
        if "x-request-id" in a.headers:
            assert len(a.headers["x-request-id"]) == len(b.headers["x-request-id"]) == 32


def test_both_paths_count_the_same_responses(
    clients: tuple[TestClient[Any], TestClient[Any]],
) -> None:
    def counts(client: TestClient[Any]) -> list[str]:
        text = client.get("/metrics").text
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith(("infercore_requests_total", "infercore_request_failures_total"))
        )

    for client in clients:
        for method, path, body, headers in REQUESTS:
            client.request(method, path, content=body, headers=headers)
    fast, slow = counts(clients[0]), counts(clients[1])
    assert fast == slow
    assert any('code="200"' in line for line in fast)
    assert any('reason="invalid_input"' in line for line in fast)


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v2/models/m/infer", ("m", None, "v2")),
        ("/v2/models/m/versions/3/infer", ("m", "3", "v2")),
        ("/v1/models/m:predict", ("m", None, "v1")),
        ("/v1/models/m/versions/3:predict", ("m", "3", "v1")),
        ("/v2/models//infer", ("", None, "v2")),  # answered 404 naming the empty name
        ("/v2/models/m/versions//infer", ("m", "", "v2")),
        ("/v2/models//versions/1/infer", ("", "1", "v2")),
        ("/v2/models/infer", None),  # the metadata route of a model named "infer"
        ("/v2/models//versions//infer", None),  # Litestar reads it as model "versions"
        ("/v2/models/m/x/3/infer", None),
        ("/v2/models/m/infer/extra", None),
        ("/v1/models/m:explain", None),
        ("/v1/models/m:predict:predict", None),
        ("/v1/models/:predict", None),
        ("/v2/health/ready", None),
    ],
)
def test_only_the_inference_routes_take_the_fast_path(
    path: str, target: tuple[str, str | None, str] | None
) -> None:
    assert _inference_target(path) == target


def test_a_client_that_goes_before_its_body_is_counted_and_not_answered() -> None:
    app = create_app(runtime_from_dict(fake_model_config()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }
    with TestClient(app) as client:  # the lifespan starts the runtime
        asyncio.run(app(scope, receive, send))
        assert sent == []
        metrics = client.get("/metrics").text
    assert 'reason="cancelled"' in metrics
