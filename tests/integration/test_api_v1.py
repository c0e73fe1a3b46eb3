"""The V1 (TensorFlow Serving style) API, in process, against the ``fake`` model.

``POST /v1/models/{m}:predict`` with ``{"instances": [...]}`` answers ``{"predictions": [...]}``;
the fake model has two outputs, so each prediction is an object ``{"y": ..., "echo": [...]}``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from infercore.testing import app_client, fake_model_config, runtime_from_dict

ROWS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.5, 2.0, 10.0]]
SUMS = [10.0, 11.0]
FIELDS = ["a", "b", "c", "d"]


def assert_error(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["reason"] == reason
    assert isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in response.text
    return doc


def config(**options: Any) -> dict[str, Any]:
    """Model ``m``: versions 1 (offset 0) and 2 (offset 100, the primary); fields a..d -> x."""
    server = options.pop("server", {})
    cfg = fake_model_config(
        server=server,
        versions={
            "1": {"loader": {"kind": "fake", "offset": 0.0, **options}},
            "2": {"loader": {"kind": "fake", "offset": 100.0, **options}},
        },
    )
    cfg["features"] = {"kind": "request", "assemble": {"x": FIELDS}}
    return cfg


@pytest.fixture
def client() -> Any:
    with app_client(runtime_from_dict(config())) as c:
        yield c


def test_predict_with_array_instances(client: Any) -> None:
    r = client.post("/v1/models/m:predict", json={"instances": ROWS})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {
        "predictions": [{"y": s + 100.0, "echo": row} for s, row in zip(SUMS, ROWS, strict=True)]
    }


def test_predict_one_version(client: Any) -> None:
    r = client.post("/v1/models/m/versions/1:predict", json={"instances": ROWS})
    assert r.status_code == 200, r.text
    assert [p["y"] for p in r.json()["predictions"]] == SUMS
    r = client.post("/v1/models/m/versions/2:predict", json={"instances": ROWS})
    assert [p["y"] for p in r.json()["predictions"]] == [s + 100.0 for s in SUMS]
    doc = assert_error(
        client.post("/v1/models/m/versions/9:predict", json={"instances": ROWS}),
        404,
        "model_not_found",
    )
    assert "'9'" in doc["error"]


def test_predict_with_named_field_objects(client: Any) -> None:
    instances = [dict(zip(FIELDS, row, strict=True)) for row in ROWS]
    r = client.post("/v1/models/m/versions/1:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    assert [p["y"] for p in r.json()["predictions"]] == SUMS
    assert [p["echo"] for p in r.json()["predictions"]] == ROWS
    # Key order does not matter.
    shuffled = [{k: inst[k] for k in reversed(FIELDS)} for inst in instances]
    r = client.post("/v1/models/m/versions/1:predict", json={"instances": shuffled})
    assert [p["y"] for p in r.json()["predictions"]] == SUMS


def test_predict_with_objects_keyed_by_input_name(client: Any) -> None:
    r = client.post(
        "/v1/models/m/versions/1:predict", json={"instances": [{"x": row} for row in ROWS]}
    )
    assert r.status_code == 200, r.text
    assert [p["y"] for p in r.json()["predictions"]] == SUMS


def test_predict_with_columnar_inputs(client: Any) -> None:
    r = client.post("/v1/models/m/versions/1:predict", json={"inputs": ROWS})
    assert r.status_code == 200, r.text
    assert [p["y"] for p in r.json()["predictions"]] == SUMS
    r = client.post(
        "/v1/models/m/versions/1:predict",
        json={"inputs": {f: [row[i] for row in ROWS] for i, f in enumerate(FIELDS)}},
    )
    assert [p["y"] for p in r.json()["predictions"]] == SUMS


def test_integers_are_accepted_for_a_float_input(client: Any) -> None:
    r = client.post("/v1/models/m/versions/1:predict", json={"instances": [[1, 2, 3, 4]]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["y"] == 10.0


def test_request_id_header(client: Any) -> None:
    r = client.post(
        "/v1/models/m:predict", json={"instances": ROWS}, headers={"x-request-id": "v1-req"}
    )
    assert r.headers["x-request-id"] == "v1-req"


def test_model_status(client: Any) -> None:
    r = client.get("/v1/models/m")
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE"},
            {"version": "2", "state": "AVAILABLE"},
        ]
    }
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_model_status_of_a_failed_optional_model() -> None:
    cfg = config()
    cfg["models"]["bad"] = {
        "required": False,
        "versions": {"1": {"loader": {"kind": "fake", "fail_load": True}}},
    }
    with app_client(runtime_from_dict(cfg)) as c:
        assert c.get("/v1/models/bad").json() == {
            "model_version_status": [{"version": "1", "state": "FAILED"}]
        }
        r = c.post("/v1/models/bad:predict", json={"instances": ROWS})
        assert_error(r, 503, "model_not_ready")
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/m:classify",
        "/v1/models/m:",
        "/v1/models/m",
        "/v1/models/m/versions/1:regress",
        "/v1/models/m/versions/1",
    ],
)
def test_unknown_verb_is_400(client: Any, path: str) -> None:
    doc = assert_error(client.post(path, json={"instances": ROWS}), 400, "invalid_input")
    assert "verb" in doc["error"]


def test_unknown_model_is_404(client: Any) -> None:
    assert_error(
        client.post("/v1/models/nope:predict", json={"instances": ROWS}), 404, "model_not_found"
    )
    assert_error(
        client.post("/v1/models/nope/versions/1:predict", json={"instances": ROWS}),
        404,
        "model_not_found",
    )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"{", "malformed JSON"),
        (b"[1, 2]", "instances"),
        (b'{"instances": 3}', "instances"),
        (b'{"instances": []}', "instances"),
        (b'{"rows": [[1, 2, 3, 4]]}', "instances"),
        (b'{"instances": [[1, 2, 3, 4], [1, 2]]}', "'x'"),
        (b'{"instances": [[1, 2, 3]]}', "'x'"),
        (b'{"instances": [["a", "b", "c", "d"]]}', "'x'"),
        (b'{"instances": [[1, null, 3, 4]]}', "'x'"),
        (b'{"instances": [[true, false, true, false]]}', "'x'"),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}, [1, 2, 3, 4]]}', "mixes"),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3}]}', "'d'"),
        (
            b'{"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 1, "b": 2, "c": 3}]}',
            "instances[1]",
        ),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3, "d": 4, "zz": 5}]}', "'zz'"),
        # An assembled field of another type is named, never converted (true was 1.0).
        (b'{"instances": [{"a": "x", "b": 2, "c": 3, "d": 4}]}', "field 'a': expected numbers"),
        (b'{"instances": [{"a": 1, "b": true, "c": 3, "d": 4}]}', "field 'b': expected numbers"),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3, "d": "4"}]}', "field 'd': expected numbers"),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3, "d": null}]}', "field 'd'"),
        # Mixed kinds in a row: named as mixed, not as the first value's kind wanted.
        (b'{"instances": [["5.1", 3.5, 1.4, 0.2]]}', "the first is a string, then float"),
        (b'{"instances": [[5.1, "3.5", 1.4, 0.2]]}', "the first is a number, then str"),
    ],
)
def test_bad_instances_are_400_naming_the_problem(client: Any, body: bytes, names: str) -> None:
    r = client.post(
        "/v1/models/m:predict", content=body, headers={"content-type": "application/json"}
    )
    doc = assert_error(r, 400, "invalid_input")
    assert names in doc["error"]


@pytest.mark.parametrize(
    ("inputs", "names"),
    [
        # V2 fields: a declared BOOL among FP32 fields was stacked into 1.0.
        (
            [
                {"name": "c", "shape": [1], "datatype": "BOOL", "data": [True]}
                if f == "c"
                else {"name": f, "shape": [1], "datatype": "FP32", "data": [1]}
                for f in FIELDS
            ],
            "field 'c': expected numbers like the other fields of input 'x', got booleans",
        ),
        # Neither the input nor its fields: the error names what was sent.
        (
            [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
            "missing input 'x' (got 'y')",
        ),
    ],
)
def test_bad_v2_fields_are_400_naming_the_problem(
    client: Any, inputs: list[dict[str, Any]], names: str
) -> None:
    doc = assert_error(
        client.post("/v2/models/m/infer", json={"inputs": inputs}), 400, "invalid_input"
    )
    assert names in doc["error"], doc


def test_too_many_rows_is_400() -> None:
    with app_client(runtime_from_dict(config(server={"max_request_rows": 3}))) as c:
        r = c.post("/v1/models/m:predict", json={"instances": ROWS * 2})
        assert "limit" in assert_error(r, 400, "invalid_input")["error"]
        assert c.post("/v1/models/m:predict", json={"instances": ROWS}).status_code == 200


def test_v1_content_checks(client: Any) -> None:
    r = client.post(
        "/v1/models/m:predict",
        content=b'{"instances": [[1, 2, 3, 4]]}',
        headers={"content-type": "text/csv"},
    )
    assert_error(r, 415, "unsupported_media_type")
    r = client.post(
        "/v1/models/m:predict",
        content=b'{"instances": [[1, 2, 3, 4]]}',
        headers={"content-type": "application/json", "content-encoding": "br"},
    )
    assert_error(r, 415, "unsupported_media_type")
    # gzip is taken, as Triton takes it, and must then be gzip.
    r = client.post(
        "/v1/models/m:predict",
        content=b'{"instances": [[1, 2, 3, 4]]}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert "not valid gzip" in assert_error(r, 400, "invalid_input")["error"]


def test_a_model_failure_is_500_without_details() -> None:
    with app_client(runtime_from_dict(config(fail_on_value=13.0))) as c:
        r = c.post("/v1/models/m:predict", json={"instances": [[13.0, 0, 0, 0]]})
        doc = assert_error(r, 500, "backend_error")
        assert "poisoned" not in r.text
        assert "models.m" not in doc["error"]
        r = c.post("/v1/models/m:predict", json={"instances": ROWS})
        assert r.status_code == 200
