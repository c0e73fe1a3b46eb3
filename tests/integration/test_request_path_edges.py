"""Request-path edges an audit against a live server found: the row limit before decoding, an
empty Content-Encoding, which requests the request counters count, strict header parsing and
empty model or version names. Each runs through both the fast path and Litestar's routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar.exceptions import HTTPException
from litestar.testing import TestClient

from infercore.components import TensorSpec
from infercore.protocol import tensors, v1, v2
from infercore.server import create_app
from infercore.testing import fake_model_config, metric_value, runtime_from_dict

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
V1_ROW = {"instances": [[1, 2, 3, 4]]}
JSON = {"content-type": "application/json"}


@pytest.fixture(params=[True, False], ids=["fast", "routes"])
def client(request: pytest.FixtureRequest) -> Iterator[TestClient[Any]]:
    config = fake_model_config(server={"max_request_rows": 8})
    app = create_app(runtime_from_dict(config), fast_path=request.param)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def error(r: Any, status: int, reason: str) -> str:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["reason"] == reason, doc
    message: str = doc["error"]
    return message


# --- item 1: rows from the declared shape, before the data is converted ---------------------


def test_rows_over_the_limit_are_refused_before_the_data_is_converted(
    client: TestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def converted(*args: Any) -> Any:
        raise AssertionError("the data was converted before the refusal")

    monkeypatch.setattr(tensors, "json_array", converted)
    big = {"inputs": [{"name": "x", "shape": [100, 4], "datatype": "FP32", "data": [0] * 400}]}
    r = client.post("/v2/models/m/infer", content=msgspec.json.encode(big), headers=JSON)
    message = error(r, 400, "invalid_input")
    assert "input 'x': shape [100, 4] has 100 rows; the limit is 8" in message
    assert "server.max_request_rows" in message


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"inputs": [[1, 2, 3, 4]] * 9}, "`inputs` 'x' has 9 rows; the limit is 8"),
        ({"inputs": {"x": [[]] * 3000}}, "`inputs` 'x' has 3000 rows; the limit is 8"),
        ({"instances": [[[]] * 3000]}, "field 'x': data is 3001 nested lists without a value"),
        ({"inputs": [[[]] * 3000]}, "field 'x': data is 3001 nested lists without a value"),
    ],
)
def test_v1_inputs_rows_and_empty_nesting_are_refused_before_the_data_is_converted(
    client: TestClient[Any], monkeypatch: pytest.MonkeyPatch, doc: Any, needle: str
) -> None:
    def converted(*args: Any) -> Any:
        raise AssertionError("the data was converted before the refusal")

    monkeypatch.setattr(v1, "json_array", converted)
    r = client.post("/v1/models/m:predict", content=msgspec.json.encode(doc), headers=JSON)
    message = error(r, 400, "invalid_input")
    assert needle in message
    assert "server.max_request_rows" in message


# --- item 2: an empty Content-Encoding is no encoding ---------------------------------------


@pytest.mark.parametrize("encoding", ["", " ", "identity", "IDENTITY "])
@pytest.mark.parametrize(
    ("path", "doc"), [("/v2/models/m/infer", ROW), ("/v1/models/m:predict", V1_ROW)]
)
def test_an_empty_content_encoding_is_no_encoding(
    client: TestClient[Any], encoding: str, path: str, doc: dict[str, Any]
) -> None:
    headers = {**JSON, "content-encoding": encoding}
    r = client.post(path, content=msgspec.json.encode(doc), headers=headers)
    assert r.status_code == 200, r.text


# --- item 3: the request counters count inference requests only ----------------------------


def counters(client: TestClient[Any]) -> tuple[float, float]:
    text = client.get("/metrics").text
    return (
        metric_value(text, "infercore_requests_total"),
        metric_value(text, "infercore_request_failures_total"),
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/m"),  # 200
        ("GET", "/v2/models/m/ready"),  # 200
        ("GET", "/v2/models/m/versions/7"),  # 404
        ("GET", "/v2/models/nope/ready"),  # 404
        ("GET", "/v1/models/m"),  # 200
        ("GET", "/v2/health/live"),  # 200
        ("GET", "/nope"),  # 404 not_found
        ("GET", "/v2/models/m/infer"),  # 405
        ("HEAD", "/v2/models/nope"),
    ],
)
def test_requests_that_are_not_inference_are_not_counted(
    client: TestClient[Any], method: str, path: str
) -> None:
    before = counters(client)
    for _ in range(3):
        client.request(method, path)
    assert counters(client) == before


def test_inference_requests_are_counted_whatever_their_answer(client: TestClient[Any]) -> None:
    before = counters(client)
    assert client.post("/v2/models/m/infer", json=ROW).status_code == 200
    assert client.post("/v2/models/m/versions/7/infer", json=ROW).status_code == 404
    assert client.post("/v1/models/m:predict", json={"instances": "x"}).status_code == 400
    requests, failures = counters(client)
    assert (requests - before[0], failures - before[1]) == (3, 2)


def test_a_framework_error_on_an_inference_route_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Through Litestar's routes, an HTTPException from the request path reaches the exception
    # handlers: counted there, as an inference request's answer, under its model.
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise HTTPException(status_code=400, detail="framework")

    monkeypatch.setattr(v2, "decode", broken)
    app = create_app(runtime_from_dict(fake_model_config()), fast_path=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v2/models/m/infer", json=ROW).status_code == 400
        text = c.get("/metrics").text
    assert metric_value(text, "infercore_requests_total", code="400", model="m") == 1
    assert metric_value(text, "infercore_request_failures_total", model="m") == 1


# --- items 5 and 6: Inference-Header-Content-Length and X-Infercore-Timeout-Ms ----------------


@pytest.mark.parametrize("value", ["1_0", "+75", "7 5", "0x10", "\u00b2", "1.0", ""])
def test_a_header_length_that_is_not_digits_is_refused(client: TestClient[Any], value: str) -> None:
    raw = msgspec.json.encode(ROW)
    # Latin-1, as HTTP carries it: "\u00b2" (superscript two) is a digit to str.isdigit().
    headers = [
        (b"content-type", b"application/json"),
        (b"inference-header-content-length", value.encode("latin-1")),
    ]
    r = client.post("/v2/models/m/infer", content=raw, headers=headers)
    assert "Inference-Header-Content-Length must be a byte count" in error(r, 400, "invalid_input")


@pytest.mark.parametrize("value", ["9" * 5000, "-" + "9" * 5000, "1" + "0" * 19])
def test_a_header_length_of_too_many_digits_is_a_400_not_a_500(
    client: TestClient[Any], value: str
) -> None:
    # Past 4300 digits int() itself raises (Python's limit on long digit strings).
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": value}
    r = client.post("/v2/models/m/infer", content=msgspec.json.encode(ROW), headers=headers)
    message = error(r, 400, "invalid_input")
    assert "Inference-Header-Content-Length must be a byte count" in message
    assert "at most 19" in message
    assert len(message) < 300  # the value is cut, not echoed whole
    text = client.get("/metrics").text
    failures = metric_value(text, "infercore_request_failures_total", model="m")
    assert failures == metric_value(
        text, "infercore_request_failures_total", model="m", reason="invalid_input"
    )
    assert failures == 1


def test_a_repeated_header_length_is_refused(client: TestClient[Any]) -> None:
    raw = msgspec.json.encode(ROW)
    headers = [
        ("content-type", "application/json"),
        ("inference-header-content-length", str(len(raw))),
        ("inference-header-content-length", "5"),
    ]
    r = client.post("/v2/models/m/infer", content=raw, headers=headers)
    assert "appears more than once" in error(r, 400, "invalid_input")


@pytest.mark.parametrize("cut", [0, 5])
def test_a_short_header_length_is_named_with_the_body_length(
    client: TestClient[Any], cut: int
) -> None:
    raw = msgspec.json.encode(ROW)
    headers = {**JSON, "inference-header-content-length": str(cut)}
    message = error(
        client.post("/v2/models/m/infer", content=raw, headers=headers), 400, "invalid_input"
    )
    assert message.startswith("malformed JSON")
    assert f"the first {cut} bytes of the {len(raw)}-byte body" in message
    assert "Inference-Header-Content-Length" in message


def test_an_exact_header_length_still_passes(client: TestClient[Any]) -> None:
    raw = msgspec.json.encode(ROW)
    headers = {**JSON, "inference-header-content-length": f" {len(raw)} "}
    assert client.post("/v2/models/m/infer", content=raw, headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("1_000", 400),
        ("+5", 400),
        ("1 0", 400),
        ("inf", 400),
        ("\u00b3", 400),
        # Accepted values are long enough for the request to finish on a loaded machine.
        ("2500", 200),
        ("1200.5", 200),
        (".5e4", 200),
        ("1e3", 200),
        (" 2500 ", 200),
    ],
)
def test_the_timeout_header_is_a_plain_decimal(
    client: TestClient[Any], value: str, status: int
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"x-infercore-timeout-ms", value.encode("latin-1")),
    ]
    r = client.post("/v2/models/m/infer", content=msgspec.json.encode(ROW), headers=headers)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert "X-Infercore-Timeout-Ms" in error(r, 400, "invalid_input")


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/v2/models//infer", "unknown model ''"),
        ("/v2/models/m/versions//infer", "model 'm' has no version ''"),
        ("/v2/models//versions/1/infer", "unknown model ''"),
    ],
)
def test_an_empty_model_or_version_is_a_404_naming_it(
    client: TestClient[Any], path: str, needle: str
) -> None:
    before = counters(client)
    assert needle in error(client.post(path, json=ROW), 404, "model_not_found")
    requests, failures = counters(client)
    assert (requests - before[0], failures - before[1]) == (1, 1)  # an inference request


def test_the_metadata_route_of_a_model_named_infer_is_no_inference_path(
    client: TestClient[Any],
) -> None:
    # "/v2/models/infer": "/infer" is the prefix's own last segment, not one after a model's.
    before = counters(client)
    assert client.post("/v2/models/infer", json=ROW).status_code == 405
    assert counters(client) == before  # a 405, not an inference request


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "routes"])
def test_an_unbatched_input_over_the_row_limit_passes_both_protocols(fast_path: bool) -> None:
    # A fixed first dimension is no batch dimension: the row limit (8) does not hold for it
    # (70 values: past the decoder's shortcut for a few, which checks no rows).
    runtime = runtime_from_dict(fake_model_config(server={"max_request_rows": 8}))
    app = create_app(runtime, fast_path=fast_path)
    v2_body = {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "t", "shape": [70], "datatype": "FP32", "data": [0.5] * 70},
        ]
    }
    v1_body = {"inputs": {"x": [[1, 2, 3, 4]], "t": [0.5] * 70}}
    with TestClient(app, raise_server_exceptions=False) as client:
        model = runtime.models["m"].versions["1"].model
        model.inputs = [*model.inputs, TensorSpec("t", "FP32", (70,))]
        r = client.post("/v2/models/m/infer", json=v2_body)
        assert r.status_code == 200, r.text
        r = client.post("/v1/models/m:predict", json=v1_body)
        assert r.status_code == 200, r.text
        # Batched (a variable first dimension), the same 70 rows are over the limit.
        model.inputs = [*model.inputs[:-1], TensorSpec("t", "FP32", (-1,))]
        r = client.post("/v1/models/m:predict", json=v1_body)
        assert "`inputs` 't' has 70 rows; the limit is 8" in error(r, 400, "invalid_input")
        r = client.post("/v2/models/m/infer", json=v2_body)
        assert "input 't': shape [70] has 70 rows; the limit is 8" in error(r, 400, "invalid_input")
