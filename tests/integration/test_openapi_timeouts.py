"""The OpenAPI schema documents a request's own timeout, and the server keeps to what it says.

``X-Infercore-Timeout-Ms`` (milliseconds, over 0 and under 1e9) on every inference call, V2 and
V1; ``parameters.timeout`` (integer microseconds, 0 to 2**64-1, 0 = none) in the V2 body. Each
may shorten the server's deadline, never extend it; a bad value is a 400 ``invalid_input``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from infercore.testing import app_client, fake_model_config, runtime_from_dict

INFER = [
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{version}/infer",
    "/v1/models/{target}",
    "/v1/models/{model_name}/versions/{target}",
]
V2_ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
V1_ROW = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with app_client(runtime_from_dict(fake_model_config())) as c:
        yield c


@pytest.fixture(scope="module")
def paths(client: Any) -> dict[str, Any]:
    r = client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    paths: dict[str, Any] = r.json()["paths"]
    return paths


@pytest.mark.parametrize("path", INFER)
def test_every_inference_call_documents_the_timeout_header(
    paths: dict[str, Any], path: str
) -> None:
    headers = [p for p in paths[path]["post"]["parameters"] if p["in"] == "header"]
    (header,) = [p for p in headers if p["name"] == "X-Infercore-Timeout-Ms"]
    assert header["required"] is False
    assert header["schema"]["type"] == "number"
    assert header["schema"]["exclusiveMinimum"] == 0
    assert header["schema"]["exclusiveMaximum"] == 1e9
    text = header["description"]
    for rule in ("milliseconds", "never extend", "400 `invalid_input`", "504", "408"):
        assert rule in text, (rule, text)


@pytest.mark.parametrize("path", INFER[:2])
def test_the_v2_body_documents_parameters_timeout(paths: dict[str, Any], path: str) -> None:
    body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    timeout = body["properties"]["parameters"]["properties"]["timeout"]
    assert timeout["type"] == "integer"
    assert timeout["minimum"] == 0
    assert timeout["maximum"] == 2**64 - 1
    text = timeout["description"]
    for rule in ("microseconds", "0 means none", "never extend", "400 `invalid_input`"):
        assert rule in text, (rule, text)


def test_the_other_operations_take_no_timeout_header(paths: dict[str, Any]) -> None:
    for path, operations in paths.items():
        for method, operation in operations.items():
            names = {p["name"] for p in operation.get("parameters", [])}
            documented = "X-Infercore-Timeout-Ms" in names
            assert documented == (path in INFER and method == "post"), (method, path)


# --- the documented rules are the server's --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("250", 200),
        ("12.5", 200),
        ("999999999", 200),  # under 1e9: accepted (and longer than the server's own deadline)
        ("1e9", 400),
        ("0", 400),
        ("-5", 400),
        ("soon", 400),
        ("nan", 400),
    ],
)
@pytest.mark.parametrize(
    ("path", "body"), [("/v2/models/m/infer", V2_ROW), ("/v1/models/m:predict", V1_ROW)]
)
def test_the_header_takes_what_the_schema_says(
    client: Any, path: str, body: dict[str, Any], value: str, status: int
) -> None:
    r = client.post(path, json=body, headers={"X-Infercore-Timeout-Ms": value})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["reason"] == "invalid_input"
        assert "X-Infercore-Timeout-Ms" in r.json()["error"]


@pytest.mark.parametrize(
    ("timeout", "status"),
    [
        (0, 200),
        (60_000_000, 200),
        (2**64 - 1, 200),  # the schema's maximum: no shorter than the server's deadline
        (2**64, 400),
        (10**400, 400),  # once an OverflowError turning it into seconds: a 500
        (-1, 400),
        (1.5, 400),
        (1000.0, 400),
        ("100000", 400),
        (True, 400),
    ],
    ids=lambda value: repr(value)[:24],
)
def test_parameters_timeout_takes_what_the_schema_says(
    client: Any, timeout: Any, status: int
) -> None:
    content = (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],'
        f' "parameters": {{"timeout": {_json(timeout)}}}}}'
    )
    r = client.post(
        "/v2/models/m/infer", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["reason"] == "invalid_input"
        assert "parameters.timeout" in r.json()["error"]


def _json(value: Any) -> str:
    """``value`` as JSON text, a float kept as one (``1000.0``) and any integer exact."""
    if value is True:
        return "true"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
