"""The Open Inference Protocol (KServe V2) REST API, in process, against the ``fake`` model.

``FakeModel`` answers ``y = sum(x, axis=1) + offset`` and echoes ``x`` as ``echo``; ``offset``
tells versions apart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import tritonclient.http as triton

from infercore import __version__
from infercore.errors import ModelLoadError
from infercore.server import create_app
from infercore.testing import app_client, fake_model_config, runtime_from_dict

ROWS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.5, 2.0, 10.0]]


def infer_body(rows: list[list[float]] = ROWS, **extra: Any) -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {
        "inputs": [
            {"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": flat}
        ],
        **extra,
    }


def outputs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {out["name"]: out for out in doc["outputs"]}


def assert_error(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["reason"] == reason
    assert isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in response.text
    return doc


def versioned_config(primary: str | None = None) -> dict[str, Any]:
    """Model ``m`` with versions 1 (offset 0) and 2 (offset 100)."""
    cfg = fake_model_config(
        versions={
            "1": {"loader": {"kind": "fake", "offset": 0.0}},
            "2": {"loader": {"kind": "fake", "offset": 100.0}},
        }
    )
    if primary is not None:
        cfg["models"]["m"]["primary"] = primary
    return cfg


def with_optional_broken(cfg: dict[str, Any], **failure: Any) -> dict[str, Any]:
    """Add an optional model ``bad`` that fails to load (``fail_load`` unless told otherwise)."""
    loader = {"kind": "fake", **(failure or {"fail_load": True})}
    cfg["models"]["bad"] = {"required": False, "versions": {"1": {"loader": loader}}}
    return cfg


@asynccontextmanager
async def served(runtime: Any, *, start: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client over ASGI; the runtime is started (and stopped) here, not by the app."""
    app = create_app(runtime, manage_runtime=False)
    if start:
        await runtime.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await runtime.stop()


@pytest.fixture
def client() -> Any:
    with app_client(runtime_from_dict(fake_model_config())) as c:
        yield c


# --- health --------------------------------------------------------------------------------


def test_live_and_ready(client: Any) -> None:
    r = client.get("/v2/health/live")
    assert r.status_code == 200
    assert r.json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True}


def test_ready_is_503_until_the_models_are_warm_and_live_never_waits() -> None:
    # latency_s also slows the warm-up call, so start() takes about that long.
    runtime = runtime_from_dict(fake_model_config(latency_s=0.4))

    async def scenario() -> None:
        async with served(runtime, start=False) as c:
            starting = asyncio.create_task(runtime.start())
            await asyncio.sleep(0.05)
            assert not starting.done()
            assert (await c.get("/v2/health/live")).status_code == 200
            r = await c.get("/v2/health/ready")
            assert_error(r, 503, "model_not_ready")
            assert r.json()["ready"] is False
            assert r.headers["retry-after"] == "1"
            assert_error(await c.get("/v2/models/m/ready"), 503, "model_not_ready")
            r = await c.post("/v2/models/m/infer", json=infer_body())
            assert_error(r, 503, "model_not_ready")
            assert "retry-after" in r.headers
            await starting
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.get("/v2/models/m/ready")).json() == {"name": "m", "ready": True}
            assert (await c.post("/v2/models/m/infer", json=infer_body())).status_code == 200

    asyncio.run(scenario())


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception inside ``exc`` (exception groups and causes included)."""
    found = [exc]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found.extend(_chain(inner))
    if exc.__cause__ is not None:
        found.extend(_chain(exc.__cause__))
    return found


@pytest.mark.parametrize("failure", [{"fail_load": True}, {"fail_warmup": True}])
def test_a_required_model_that_fails_to_load_fails_start_up(failure: dict[str, Any]) -> None:
    runtime = runtime_from_dict(fake_model_config(**failure))
    # Litestar's lifespan wraps the error in an exception group.
    with pytest.raises(BaseException) as info, app_client(runtime):
        pass
    assert any(isinstance(e, ModelLoadError) for e in _chain(info.value))
    assert not runtime.ready


@pytest.mark.parametrize("failure", [{"fail_load": True}, {"fail_warmup": True}])
def test_an_optional_model_that_fails_to_load_fails_alone(failure: dict[str, Any]) -> None:
    runtime = runtime_from_dict(with_optional_broken(fake_model_config(), **failure))
    with app_client(runtime) as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/models/m/ready").status_code == 200
        for path in ("/v2/models/bad/ready", "/v2/models/bad/versions/1/ready"):
            r = c.get(path)
            assert_error(r, 503, "model_not_ready")
            assert r.json()["ready"] is False
            assert r.json()["name"] == "bad"
            assert r.headers["retry-after"] == "1"
        # Not a 200 with no inputs (a V2 client would take that for a model without any).
        for path in ("/v2/models/bad", "/v2/models/bad/versions/1"):
            r = c.get(path)
            meta = assert_error(r, 503, "model_not_ready")
            assert meta["state"] == "failed" and meta["name"] == "bad"
            assert "inputs" not in meta and r.headers["retry-after"] == "1"
        r = c.post("/v2/models/bad/infer", json=infer_body())
        assert_error(r, 503, "model_not_ready")
        assert r.headers["retry-after"] == "1"
        assert c.post("/v2/models/m/infer", json=infer_body()).status_code == 200


def test_readiness_goes_false_while_draining() -> None:
    runtime = runtime_from_dict(fake_model_config())

    async def scenario() -> None:
        async with served(runtime) as c:
            assert (await c.get("/v2/health/ready")).status_code == 200
            runtime.draining = True
            assert_error(await c.get("/v2/health/ready"), 503, "shutting_down")
            assert (await c.get("/v2/health/live")).status_code == 200
            r = await c.post("/v2/models/m/infer", json=infer_body())
            assert_error(r, 503, "shutting_down")
            assert r.headers["retry-after"] == "1"

    asyncio.run(scenario())


# --- metadata ------------------------------------------------------------------------------


def test_server_metadata(client: Any) -> None:
    doc = client.get("/v2").json()
    assert doc["name"] == "infercore"
    assert doc["version"] == __version__
    assert "binary_tensor_data" in doc["extensions"]


def test_model_metadata_unversioned_and_versioned() -> None:
    with app_client(runtime_from_dict(versioned_config())) as c:
        doc = c.get("/v2/models/m").json()
        assert doc["name"] == "m"
        assert doc["versions"] == ["1", "2"]
        assert doc["platform"] == "fake"
        assert doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert doc["outputs"] == [
            {"name": "y", "datatype": "FP32", "shape": [-1]},
            {"name": "echo", "datatype": "FP32", "shape": [-1, 4]},
        ]
        assert c.get("/v2/models/m/versions/1").json()["inputs"] == doc["inputs"]
        assert c.get("/v2/models/m/versions/2").status_code == 200
        assert_error(c.get("/v2/models/m/versions/3"), 404, "model_not_found")
        assert_error(c.get("/v2/models/nope"), 404, "model_not_found")
        assert c.get("/v2/models/m/ready").json() == {"name": "m", "ready": True}
        assert c.get("/v2/models/m/versions/1/ready").status_code == 200
        assert c.get("/v2/models/m/versions/2/ready").status_code == 200
        assert_error(c.get("/v2/models/m/versions/3/ready"), 404, "model_not_found")
        assert_error(c.get("/v2/models/nope/ready"), 404, "model_not_found")


def test_metadata_reports_the_declared_width() -> None:
    with app_client(runtime_from_dict(fake_model_config(features=7))) as c:
        assert c.get("/v2/models/m").json()["inputs"][0]["shape"] == [-1, 7]


# --- inference -----------------------------------------------------------------------------


def test_infer_json(client: Any) -> None:
    r = client.post("/v2/models/m/infer", json=infer_body())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "1"
    assert "id" not in doc
    out = outputs_by_name(doc)
    assert out["y"] == {"name": "y", "datatype": "FP32", "shape": [2], "data": [10.0, 11.0]}
    assert out["echo"]["shape"] == [2, 4]
    assert out["echo"]["data"] == [v for row in ROWS for v in row]


def test_infer_accepts_nested_data_and_no_content_type(client: Any) -> None:
    body = infer_body()
    body["inputs"][0]["data"] = ROWS
    r = client.post("/v2/models/m/infer", content=httpx.Response(200, json=body).content)
    assert r.status_code == 200, r.text
    assert outputs_by_name(r.json())["y"]["data"] == [10.0, 11.0]


def test_infer_routes_to_versions() -> None:
    with app_client(runtime_from_dict(versioned_config())) as c:
        r = c.post("/v2/models/m/infer", json=infer_body())  # primary: the highest version
        assert r.json()["model_version"] == "2"
        assert outputs_by_name(r.json())["y"]["data"] == [110.0, 111.0]
        r = c.post("/v2/models/m/versions/1/infer", json=infer_body())
        assert r.json()["model_version"] == "1"
        assert outputs_by_name(r.json())["y"]["data"] == [10.0, 11.0]
        r = c.post("/v2/models/m/versions/2/infer", json=infer_body())
        assert outputs_by_name(r.json())["y"]["data"] == [110.0, 111.0]
        doc = assert_error(
            c.post("/v2/models/m/versions/3/infer", json=infer_body()), 404, "model_not_found"
        )
        assert "'3'" in doc["error"]
        assert_error(c.post("/v2/models/nope/infer", json=infer_body()), 404, "model_not_found")
        assert_error(
            c.post("/v2/models/nope/versions/1/infer", json=infer_body()), 404, "model_not_found"
        )


def test_an_explicit_primary_serves_unversioned_requests() -> None:
    with app_client(runtime_from_dict(versioned_config(primary="1"))) as c:
        r = c.post("/v2/models/m/infer", json=infer_body())
        assert r.json()["model_version"] == "1"
        assert outputs_by_name(r.json())["y"]["data"] == [10.0, 11.0]


def test_requested_outputs_only_are_returned(client: Any) -> None:
    r = client.post("/v2/models/m/infer", json=infer_body(outputs=[{"name": "y"}]))
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["y"]
    r = client.post("/v2/models/m/infer", json=infer_body(outputs=[{"name": "echo"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["echo"]
    r = client.post(
        "/v2/models/m/infer", json=infer_body(outputs=[{"name": "echo"}, {"name": "y"}])
    )
    assert [o["name"] for o in r.json()["outputs"]] == ["echo", "y"]


def test_an_unknown_requested_output_is_400_and_never_runs_the_model() -> None:
    runtime = runtime_from_dict(fake_model_config())
    with app_client(runtime) as c:
        model = runtime.models["m"].versions["1"].model
        calls = model.calls
        r = c.post("/v2/models/m/infer", json=infer_body(outputs=[{"name": "y"}, {"name": "zz"}]))
        doc = assert_error(r, 400, "invalid_input")
        assert "'zz'" in doc["error"]
        assert model.calls == calls


def test_request_id_is_echoed(client: Any) -> None:
    r = client.post("/v2/models/m/infer", json=infer_body(id="req-42"))
    assert r.json()["id"] == "req-42"
    r = client.post("/v2/models/m/infer", json=infer_body(), headers={"x-request-id": "abc"})
    assert r.headers["x-request-id"] == "abc"
    assert "id" not in r.json()
    r = client.post("/v2/models/m/infer", json=infer_body())
    assert len(r.headers["x-request-id"]) >= 16  # generated when absent


def _triton_request(
    rows: np.ndarray,
    *,
    binary_input: bool,
    outputs: list[tuple[str, bool]] | None,
    request_id: str = "",
) -> tuple[bytes, dict[str, str]]:
    """A request body built exactly as ``tritonclient.http`` builds it."""
    inp = triton.InferInput("x", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=binary_input)
    requested = (
        None
        if outputs is None
        else [triton.InferRequestedOutput(name, binary_data=b) for name, b in outputs]
    )
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=requested, request_id=request_id
    )
    headers = {}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def _triton_result(response: httpx.Response) -> Any:
    length = response.headers.get("inference-header-content-length")
    return triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(length) if length is not None else None
    )


@pytest.mark.parametrize(
    ("binary_input", "outputs"),
    [
        (True, None),  # tritonclient's default: binary in, binary_data_output for all
        (False, None),
        (True, [("y", True), ("echo", True)]),
        (True, [("y", False)]),
        (False, [("echo", True), ("y", False)]),
    ],
)
def test_binary_tensor_extension(
    client: Any, binary_input: bool, outputs: list[tuple[str, bool]] | None
) -> None:
    rows = np.array(ROWS * 3, dtype=np.float32)
    body, headers = _triton_request(
        rows, binary_input=binary_input, outputs=outputs, request_id="bin-1"
    )
    r = client.post("/v2/models/m/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    any_binary = outputs is None or any(b for _, b in outputs)
    assert ("inference-header-content-length" in r.headers) == any_binary
    result = _triton_result(r)
    assert result.get_response()["id"] == "bin-1"
    wanted = ["y", "echo"] if outputs is None else [name for name, _ in outputs]
    assert [o["name"] for o in result.get_response()["outputs"]] == wanted
    if "y" in wanted:
        np.testing.assert_array_equal(result.as_numpy("y"), rows.sum(axis=1))
        assert result.as_numpy("y").dtype == np.float32
    if "echo" in wanted:
        np.testing.assert_array_equal(result.as_numpy("echo"), rows)
    for out in result.get_response()["outputs"]:
        binary = outputs is None or dict(outputs)[out["name"]]
        assert ("parameters" in out and "binary_data_size" in out["parameters"]) == binary
        assert ("data" in out) == (not binary)


def test_binary_request_with_octet_stream_content_type(client: Any) -> None:
    rows = np.array(ROWS, dtype=np.float32)
    body, headers = _triton_request(rows, binary_input=True, outputs=None)
    headers["content-type"] = "application/octet-stream"
    r = client.post("/v2/models/m/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/octet-stream")
    np.testing.assert_array_equal(_triton_result(r).as_numpy("y"), rows.sum(axis=1))


def test_binary_request_with_a_wrong_header_length_is_400(client: Any) -> None:
    rows = np.array(ROWS, dtype=np.float32)
    body, headers = _triton_request(rows, binary_input=True, outputs=None)
    for bad in (str(len(body) + 1), "-1", "ten"):
        r = client.post(
            "/v2/models/m/infer", content=body, headers={"Inference-Header-Content-Length": bad}
        )
        assert_error(r, 400, "invalid_input")
    # A truncated blob: the declared binary_data_size runs past the body.
    r = client.post("/v2/models/m/infer", content=body[:-4], headers=headers)
    assert "binary_data_size" in assert_error(r, 400, "invalid_input")["error"]
    # Negative sizes are named as what they are.
    r = client.post(
        "/v2/models/m/infer", content=body, headers={"Inference-Header-Content-Length": "-5"}
    )
    assert "is negative (-5)" in assert_error(r, 400, "invalid_input")["error"]
    head_len = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:head_len])
    head["inputs"][0]["parameters"]["binary_data_size"] = -16
    negative = json.dumps(head).encode()
    r = client.post(
        "/v2/models/m/infer",
        content=negative + body[head_len:],
        headers={"Inference-Header-Content-Length": str(len(negative))},
    )
    message = assert_error(r, 400, "invalid_input")["error"]
    assert "binary_data_size must be a byte count" in message and "got -16" in message


# --- operations ----------------------------------------------------------------------------


def test_plugins_endpoint_lists_builtins_and_extra_plugins(client: Any) -> None:
    r = client.get("/-/plugins")
    assert r.status_code == 200
    plugins = {p["name"]: p for p in r.json()}
    fake = plugins["fake"]
    assert fake["kinds"]["model_loader"] == ["fake"]
    kinds = {
        (role, kind)
        for p in plugins.values()
        for role, names in p["kinds"].items()
        for kind in names
    }
    assert {
        ("batcher", "none"),
        ("batcher", "dynamic"),
        ("router", "single"),
        ("feature_source", "request"),
    } <= kinds
    assert all(
        p["builtin"]
        for p in plugins.values()
        if p["distribution"] == "infercore" and p["name"] != "fake"
    )


def test_openapi_schema_is_served(client: Any) -> None:
    r = client.get("/schema/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{version}/infer",
        "/v1/models/{target}",
        "/metrics",
    ):
        assert path in paths, path
    assert "post" in paths["/v2/models/{model_name}/infer"]


def test_openapi_documents_the_inference_bodies(client: Any) -> None:
    """The handlers read raw bytes, so the bodies are documented by hand (server/openapi.py):
    a V2 client, or a fuzzer (test_api_fuzz.py), learns them from the schema."""
    paths = client.get("/schema/openapi.json").json()["paths"]
    for path, request, response in [
        ("/v2/models/{model_name}/infer", "InferenceRequest", "InferenceResponse"),
        (
            "/v2/models/{model_name}/versions/{version}/infer",
            "InferenceRequest",
            "InferenceResponse",
        ),
        ("/v1/models/{target}", "PredictRequest", "PredictResponse"),
        ("/v1/models/{model_name}/versions/{target}", "PredictRequest", "PredictResponse"),
    ]:
        op = paths[path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body["title"] == request, path
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["title"] == response
        for code in ("400", "404", "413", "415", "503", "504"):
            error = op["responses"][code]["content"]["application/json"]["schema"]
            assert error["required"] == ["error", "reason"], (path, code)
    v2 = paths["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]
    assert set(v2) == {"application/json", "application/octet-stream"}
    tensor = v2["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert "FP32" in tensor["properties"]["datatype"]["enum"]
    assert tensor["required"] == ["name", "shape", "datatype"]


def test_openapi_can_be_switched_off() -> None:
    with app_client(runtime_from_dict(fake_model_config(server={"openapi": False}))) as c:
        assert_error(c.get("/schema/openapi.json"), 404, "not_found")
        assert c.get("/v2/health/live").status_code == 200


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_outputs_are_still_strict_json(client: Any) -> None:
    # float32 overflow: the sum is +inf, which JSON cannot carry; it is sent as null (P15).
    big = [3e38, 3e38, 0.0, 0.0]
    r = client.post("/v2/models/m/infer", json=infer_body([big, ROWS[0]]))
    assert r.status_code == 200
    doc = msgspec.json.decode(r.content)  # strict: NaN / Infinity literals would fail here
    assert outputs_by_name(doc)["y"]["data"] == [None, 10.0]
    r = client.post("/v1/models/m:predict", json={"instances": [big]})
    assert msgspec.json.decode(r.content)["predictions"][0]["y"] is None
    # The binary extension carries the value itself.
    body, headers = _triton_request(np.array([big], np.float32), binary_input=True, outputs=None)
    r = client.post("/v2/models/m/infer", content=body, headers=headers)
    assert np.isposinf(_triton_result(r).as_numpy("y")[0])
