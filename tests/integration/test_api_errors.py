"""The status-code table of DESIGN.md, one condition at a time, in process.

Every non-2xx body is JSON ``{"error", "reason"}`` and carries no traceback, file path or
exception text (RELIABILITY S6); bad input is never a 5xx.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import infercore
from infercore.components import Model, Tensors, TensorSpec
from infercore.hookspecs import hookimpl
from infercore.server import create_app
from infercore.testing import app_client, fake_model_config, runtime_from_dict

ROW = [1.0, 2.0, 3.0, 4.0]
POISON = 13.0

# Strings that must never reach a client: tracebacks, source and install paths, internals.
_LEAKS = (
    "Traceback",
    'File "',
    ".py",
    str(Path(infercore.__file__).resolve().parent.parent),
    sys.prefix,
    "ValueError",
    "poisoned",
    "models.m.versions",
)


def body(rows: list[list[float]] | None = None, **extra: Any) -> dict[str, Any]:
    rows = rows or [ROW]
    return {
        "inputs": [
            {
                "name": "x",
                "shape": [len(rows), len(rows[0])],
                "datatype": "FP32",
                "data": [v for r in rows for v in r],
            }
        ],
        **extra,
    }


def assert_error(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert set(doc) == {"error", "reason"}, doc
    assert doc["reason"] == reason
    assert isinstance(doc["error"], str) and doc["error"]
    for leak in _LEAKS:
        assert leak not in response.text, (leak, response.text)
    return doc


def no_warmup(**loader: Any) -> dict[str, Any]:
    """One version of the fake model, without the warm-up call (it would sleep latency_s)."""
    return {"1": {"loader": {"kind": "fake", **loader}, "warmup": False}}


@asynccontextmanager
async def served(runtime: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client over ASGI with the runtime started here, for concurrent requests."""
    app = create_app(runtime, manage_runtime=False)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await runtime.stop()


@pytest.fixture
def client() -> Iterator[Any]:
    cfg = fake_model_config(fail_on_value=POISON, server={"max_body_bytes": 4096})
    with app_client(runtime_from_dict(cfg)) as c:
        yield c


def post_raw(
    client: Any, content: bytes, path: str = "/v2/models/m/infer", **headers: str
) -> httpx.Response:
    return client.post(
        path, content=content, headers={"content-type": "application/json", **headers}
    )


# --- 400 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{", b"", b"not json", b'{"inputs": [', b"\xff\xfe", b'{"inputs": [{"name": "x"}]} x'],
)
def test_malformed_json_is_400(client: Any, content: bytes) -> None:
    assert_error(post_raw(client, content), 400, "invalid_input")


# What msgspec raises besides its DecodeError: a string that is not UTF-8 (UnicodeDecodeError)
# and nesting past Python's recursion limit (RecursionError, from a 2 KB body). Both were 500s.
_V2, _V1 = "/v2/models/m/infer", "/v1/models/m:predict"
_DEEP = b"[" * 1000 + b"]" * 1000
_UNREADABLE = {
    "V2 name not UTF-8": (_V2, b'{"inputs": [{"name": "\xff", "shape": [1], "data": [1]}]}'),
    "V2 id a lone surrogate": (_V2, b'{"id": "\xed\xa0\x80", "inputs": []}'),
    "V1 field not UTF-8": (_V1, b'{"instances": [{"x": "\xe9"}]}'),
    "V1 key not UTF-8": (_V1, b'{"instances": [{"\xe9": 1}]}'),
    "V2 deep data": (_V2, b'{"inputs": [{"name": "x", "data": ' + _DEEP + b"}]}"),
    "V2 deep parameters": (_V2, b'{"parameters": {"p": ' + _DEEP + b'}, "inputs": []}'),
    "V1 deep instances": (_V1, b'{"instances": ' + _DEEP + b"}"),
    "V1 deep inputs": (_V1, b'{"inputs": {"x": ' + _DEEP + b"}}"),
}


@pytest.mark.parametrize("case", list(_UNREADABLE))
def test_a_body_msgspec_cannot_read_is_400_not_500(client: Any, case: str) -> None:
    path, content = _UNREADABLE[case]
    doc = assert_error(post_raw(client, content, path), 400, "invalid_input")
    named = "nested too deeply" if "deep" in case else "not valid UTF-8"
    assert doc["error"].startswith("malformed JSON") and named in doc["error"], doc
    good = body() if path == _V2 else {"instances": [ROW]}
    assert client.post(path, json=good).status_code == 200


def test_a_binary_request_whose_json_header_is_not_utf8_is_400(client: Any) -> None:
    head = b'{"inputs": [{"name": "\xff", "shape": [1, 4], "datatype": "FP32", ' + (
        b'"parameters": {"binary_data_size": 16}}]}'
    )
    r = client.post(
        "/v2/models/m/infer",
        content=head + np.asarray(ROW, dtype=np.float32).tobytes(),
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )
    assert "UTF-8" in assert_error(r, 400, "invalid_input")["error"]


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        ([{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": ROW}], "'x'"),
        (
            [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ROW},
                {"name": "z", "shape": [1, 4], "datatype": "FP32", "data": ROW},
            ],
            "'z'",
        ),
        ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ROW[:3]}], "'x'"),
        ([{"name": "x", "shape": [4], "datatype": "FP32", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, None, 3, 4]}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], [3]]}], "'x'"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32"}], "'x'"),
        ([{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [100000, 100000], "datatype": "FP32", "data": ROW}], "'x'"),
        ([{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}], "rows"),
        (
            [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ROW},
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ROW},
            ],
            "'x'",
        ),
        ([{"name": "x", "shape": "1,4", "datatype": "FP32", "data": ROW}], "shape"),
        ([], "inputs"),
    ],
)
def test_wrong_name_shape_or_dtype_is_400_naming_the_field(
    client: Any, inputs: list[dict[str, Any]], named: str
) -> None:
    doc = assert_error(
        client.post("/v2/models/m/infer", json={"inputs": inputs}), 400, "invalid_input"
    )
    assert named in doc["error"]


def test_a_declared_datatype_of_the_same_kind_is_refused_saying_what_to_send(
    client: Any,
) -> None:
    # As Triton: a V2 datatype must be the model's exactly; the hint names the one to send
    # (clients that build tensors from numpy's default float64 meet this first).
    inputs = [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}]
    r = client.post("/v2/models/m/infer", json={"inputs": inputs})
    doc = assert_error(r, 400, "invalid_input")
    assert "datatype FP64 does not match the model's FP32" in doc["error"]
    assert "send FP32" in doc["error"]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_literals_are_400(client: Any, literal: bytes) -> None:
    content = (
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, '
        + literal
        + b"]}]}"
    )
    assert_error(post_raw(client, content), 400, "invalid_input")


# --- 413 / 415 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/x-python-pickle",
        "multipart/form-data; boundary=x",
        "application/msgpack",
    ],
)
def test_unsupported_content_type_is_415(client: Any, content_type: str) -> None:
    r = client.post(
        "/v2/models/m/infer",
        content=httpx.Response(200, json=body()).content,
        headers={"content-type": content_type},
    )
    assert_error(r, 415, "unsupported_media_type")


@pytest.mark.parametrize("with_content_type", [True, False])
@pytest.mark.parametrize("encoding", ["br", "compress", "zstd", "gzip, br"])
def test_other_encodings_are_415(client: Any, encoding: str, with_content_type: bool) -> None:
    headers = {"content-encoding": encoding}
    if with_content_type:
        headers["content-type"] = "application/json"
    r = client.post("/v2/models/m/infer", content=b"\x1f\x8b\x08\x00compressed", headers=headers)
    doc = assert_error(r, 415, "unsupported_media_type")
    assert "encoding" in doc["error"] and "gzip or deflate" in doc["error"]


def _compress(data: bytes, encoding: str) -> bytes:
    return gzip.compress(data) if encoding.lower() == "gzip" else zlib.compress(data)


@pytest.mark.parametrize("path", ["/v2/models/m/infer", "/v1/models/m:predict"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
def test_gzip_and_deflate_bodies_are_served_as_triton_serves_them(
    client: Any, encoding: str, path: str
) -> None:
    plain = msgspec.json.encode(body() if "v2" in path else {"instances": [ROW]})
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    r = client.post(path, content=_compress(plain, encoding), headers=headers)
    assert r.status_code == 200, r.text
    assert (
        r.json()
        == client.post(path, content=plain, headers={"content-type": "application/json"}).json()
    )


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_bounded_and_checked_once_decompressed(
    client: Any, encoding: str
) -> None:
    # The client's limit is 4096 bytes: a bomb that inflates past it is a 413, whatever its
    # compressed size; data that is not what the header says, or cut short, is a 400.
    bomb = _compress(b" " * 100_000, encoding)
    assert len(bomb) < 4096
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    r = client.post("/v2/models/m/infer", content=bomb, headers=headers)
    assert "once decompressed" in assert_error(r, 413, "body_too_large")["error"]
    r = client.post("/v2/models/m/infer", content=b"{not compressed}", headers=headers)
    assert f"not valid {encoding}" in assert_error(r, 400, "invalid_input")["error"]
    whole = _compress(msgspec.json.encode(body()), encoding)
    r = client.post("/v2/models/m/infer", content=whole[:-6], headers=headers)
    assert "truncated" in assert_error(r, 400, "invalid_input")["error"]
    assert client.post("/v2/models/m/infer", json=body()).status_code == 200


def test_identity_encoding_is_fine(client: Any) -> None:
    r = client.post("/v2/models/m/infer", json=body(), headers={"content-encoding": "identity"})
    assert r.status_code == 200, r.text


def test_octet_stream_without_the_header_length_is_read_as_json(client: Any) -> None:
    # tritonclient.http.aio (aiohttp) labels every body so, JSON-only requests too; Triton
    # reads such a body as JSON.
    json_only = client.post("/v2/models/m/infer", json=body())
    r = client.post(
        "/v2/models/m/infer",
        content=httpx.Response(200, json=body()).content,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == json_only.json()["outputs"]
    octet = {"content-type": "application/octet-stream"}
    not_json = client.post("/v2/models/m/infer", content=b"\x00\x01", headers=octet)
    doc = assert_error(not_json, 400, "invalid_input")
    assert doc["error"].startswith("malformed JSON"), doc
    assert "needs the Inference-Header-Content-Length header" in doc["error"], doc
    # As JSON, the same bytes get no such hint: nothing suggests a binary body.
    doc = assert_error(post_raw(client, b"\x00\x01", "/v2/models/m/infer"), 400, "invalid_input")
    assert "Inference-Header-Content-Length" not in doc["error"], doc


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(client: Any) -> None:
    big = httpx.Response(200, json=body([ROW] * 400)).content
    assert len(big) > 4096
    for path in ("/v2/models/m/infer", "/v1/models/m:predict"):
        assert_error(post_raw(client, big, path), 413, "body_too_large")
    # Streamed without a Content-Length: counted while reading, still 413.
    chunks = iter([big[:2000], big[2000:4000], big[4000:]])
    r = client.post(
        "/v2/models/m/infer", content=chunks, headers={"content-type": "application/json"}
    )
    assert_error(r, 413, "body_too_large")
    for _ in range(3):
        r = client.post("/v2/models/m/infer", json=body())
        assert r.status_code == 200, r.text


def test_a_body_exactly_at_the_limit_is_read() -> None:
    content = httpx.Response(200, json=body()).content
    cfg = fake_model_config(server={"max_body_bytes": len(content)})
    with app_client(runtime_from_dict(cfg)) as c:
        assert post_raw(c, content).status_code == 200
        assert_error(post_raw(c, content + b" "), 413, "body_too_large")


# --- 404 / 405 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/nope/infer"),
        ("POST", "/v2/models/nope/versions/1/infer"),
        ("POST", "/v2/models/m/versions/7/infer"),
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("GET", "/v2/models/m/versions/7"),
        ("POST", "/v1/models/nope:predict"),
        ("GET", "/v1/models/nope"),
        ("POST", "/v2/models/m..x/infer"),
    ],
)
def test_unknown_model_or_version_is_404(client: Any, method: str, path: str) -> None:
    before = counted(client)
    r = client.request(method, path, json=body() if method == "POST" else None)
    assert_error(r, 404, "model_not_found")
    # An inference request is counted once; a model named in the config keeps its label, a
    # name from the URL alone does not get one. A metadata or readiness 404 is no inference
    # request: not counted (it would raise the model's inference error rate).
    model = "m" if path.startswith(("/v2/models/m/", "/v2/models/m?")) else ""
    inference = method == "POST"
    expected = {("404", "model_not_found", model): 1} if inference else {}
    assert counted(client) - before == expected


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/v3/models/m/infer",
        "/v2/models/m/explain",
        "/v2/repository/index",
        "/admin",
        "/v2/models/..%2F..%2Fetc/passwd/infer",
    ],
)
def test_unknown_route_is_404_json(client: Any, path: str) -> None:
    before = counted(client)
    assert_error(client.get(path), 404, "not_found")
    assert counted(client) - before == {}  # no inference request: not counted


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/m/infer"),
        ("PUT", "/v2/models/m/infer"),
        ("DELETE", "/v2/models/m"),
        ("POST", "/v2/health/live"),
        ("POST", "/metrics"),
        ("GET", "/v2/models/m/versions/1/infer"),
    ],
)
def test_wrong_method_is_405_json(client: Any, method: str, path: str) -> None:
    before = counted(client)
    assert_error(client.request(method, path), 405, "method_not_allowed")
    # No inference request (an inference route takes POST only): not counted.
    assert counted(client) - before == {}


def counted(client: Any) -> Counter[tuple[str, str, str]]:
    """(code, reason, model) of every response counted as a failure so far, from /metrics:
    ``requests_total{code}`` and ``request_failures_total{reason}`` go up together."""
    codes: Counter[tuple[str, str]] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "infercore_requests_total" and labels["code"] != "200":
                codes[labels["code"], labels["model"]] += int(sample.value)
            elif sample.name == "infercore_request_failures_total":
                reasons[labels["reason"], labels["model"]] += int(sample.value)
    assert sum(codes.values()) == sum(reasons.values()), (codes, reasons)
    # One failure per response here, so pair them up by model.
    out: Counter[tuple[str, str, str]] = Counter()
    for (code, model), n in codes.items():
        for (reason, model2), m in reasons.items():
            if model2 == model:
                out[code, reason, model] += min(n, m)
    return out


# --- 503 / 504 ------------------------------------------------------------------------------


def burst(runtime: Any, n: int) -> list[httpx.Response]:
    """The answers to ``n`` concurrent V2 requests to model ``m`` of a served runtime."""

    async def scenario() -> list[httpx.Response]:
        async with served(runtime) as c:
            calls = (c.post("/v2/models/m/infer", json=body()) for _ in range(n))
            return list(await asyncio.gather(*calls))

    return asyncio.run(scenario())


def test_queue_full_is_503_with_retry_after_and_never_runs_the_model() -> None:
    cfg = fake_model_config(
        # The batcher's own queue, request by request: groups off (they would share one call).
        server={"group_requests": False},
        batching={
            "kind": "none",
            "max_concurrency": 1,
            "max_queue_size": 1,
            "queue_timeout_ms": 5000,
        },
        versions=no_warmup(latency_s=0.3),
    )
    runtime = runtime_from_dict(cfg)

    responses = burst(runtime, 6)
    codes = sorted(r.status_code for r in responses)
    # One runs, one waits for the slot, the other four are turned away at once.
    assert codes == [200, 200, 503, 503, 503, 503], [r.text for r in responses]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "queue_full")
            assert r.headers["retry-after"] == "1"
    assert runtime.models["m"].versions["1"].model.calls == 2


def test_a_burst_of_503s_logs_one_warning_and_counts_every_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An overloaded server answers thousands of 503s a second: one WARNING line each would
    # cost more than the rejections. The first is logged, the rest go to DEBUG.
    cfg = fake_model_config(
        # The batcher's own queue, request by request: groups off (they would share one call).
        server={"group_requests": False},
        batching={"kind": "none", "max_concurrency": 1, "max_queue_size": 1},
        versions=no_warmup(latency_s=0.3),
    )
    runtime = runtime_from_dict(cfg)

    with caplog.at_level("DEBUG", logger="infercore.server"):
        responses = burst(runtime, 12)
    rejected = [r for r in responses if r.status_code == 503]
    assert len(rejected) == 10, [r.status_code for r in responses]
    lines = [r for r in caplog.records if r.getMessage().startswith("request failed")]
    warnings = [r for r in lines if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].reason == "queue_full"  # type: ignore[attr-defined]
    assert len(lines) == 10  # the other nine at DEBUG, each with its request id
    assert len({r.request_id for r in lines}) == 10  # type: ignore[attr-defined]


def test_queue_full_with_the_dynamic_batcher() -> None:
    cfg = fake_model_config(
        batching={
            "kind": "dynamic",
            "max_batch_size": 1,
            "max_queue_size": 2,
            "queue_timeout_ms": 5000,
        },
        versions=no_warmup(latency_s=0.3),
    )
    runtime = runtime_from_dict(cfg)

    responses = burst(runtime, 6)
    ok = [r for r in responses if r.status_code == 200]
    full = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(full) == 6
    assert len(full) >= 3  # at most one running and two queued when the burst arrives
    for r in full:
        assert_error(r, 503, "queue_full")
        assert r.headers["retry-after"] == "1"
    assert runtime.models["m"].versions["1"].model.calls == len(ok)


def test_queue_timeout_is_503_and_the_request_never_runs() -> None:
    cfg = fake_model_config(
        # The batcher's own queue, request by request: groups off (they would share one call).
        server={"group_requests": False},
        batching={"kind": "none", "max_concurrency": 1, "queue_timeout_ms": 50},
        versions=no_warmup(latency_s=0.4),
    )
    runtime = runtime_from_dict(cfg)

    responses = burst(runtime, 3)
    assert sorted(r.status_code for r in responses) == [200, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "queue_timeout")
            assert r.headers["retry-after"] == "1"
    assert runtime.models["m"].versions["1"].model.calls == 1


def test_deadline_is_504() -> None:
    cfg = fake_model_config(server={"request_timeout_ms": 50}, versions=no_warmup(latency_s=0.3))
    runtime = runtime_from_dict(cfg)
    with app_client(runtime) as c:
        doc = assert_error(c.post("/v2/models/m/infer", json=body()), 504, "deadline_exceeded")
        assert "50 ms" in doc["error"]
        assert_error(
            c.post("/v1/models/m:predict", json={"instances": [ROW]}), 504, "deadline_exceeded"
        )


def test_deadline_while_queued_is_504() -> None:
    cfg = fake_model_config(
        server={"request_timeout_ms": 100},
        batching={"kind": "none", "max_concurrency": 1, "queue_timeout_ms": 5000},
        versions=no_warmup(latency_s=0.4),
    )
    runtime = runtime_from_dict(cfg)

    for r in burst(runtime, 2):
        assert_error(r, 504, "deadline_exceeded")


def test_a_caller_that_gives_up_keeps_its_slot_until_the_model_returns() -> None:
    # A starts at 0 ms and gives up at 100 ms; its model call lasts 400 ms. B arrives at 50 ms
    # and may wait until 150 ms: the one slot is busy until 400 ms, so B must never run.
    # (NoBatcher once released the slot when A was cancelled, and B ran beside A's call.)
    cfg = fake_model_config(
        server={"request_timeout_ms": 100},
        batching={"kind": "none", "max_concurrency": 1, "queue_timeout_ms": 5000},
        versions=no_warmup(latency_s=0.4),
    )
    runtime = runtime_from_dict(cfg)

    async def scenario() -> list[httpx.Response]:
        async with served(runtime) as c:

            async def later() -> httpx.Response:
                await asyncio.sleep(0.05)
                return await c.post("/v2/models/m/infer", json=body())

            first = c.post("/v2/models/m/infer", json=body())
            return list(await asyncio.gather(first, later()))

    for r in asyncio.run(scenario()):
        assert_error(r, 504, "deadline_exceeded")
    assert runtime.models["m"].versions["1"].model.calls == 1


def test_shutting_down_is_503_with_retry_after() -> None:
    runtime = runtime_from_dict(fake_model_config())

    async def scenario() -> httpx.Response:
        async with served(runtime) as c:
            runtime.draining = True
            return await c.post("/v2/models/m/infer", json=body())

    r = asyncio.run(scenario())
    assert_error(r, 503, "shutting_down")
    assert r.headers["retry-after"] == "1"


def test_model_not_ready_is_503_with_retry_after() -> None:
    cfg = fake_model_config()
    cfg["models"]["bad"] = {"required": False, "versions": no_warmup(fail_load=True)}
    with app_client(runtime_from_dict(cfg)) as c:
        for path in ("/v2/models/bad/infer", "/v2/models/bad/versions/1/infer"):
            r = c.post(path, json=body())
            assert_error(r, 503, "model_not_ready")
            assert r.headers["retry-after"] == "1"


# --- 500 ------------------------------------------------------------------------------------


def test_a_model_that_raises_is_500_backend_error_without_details(client: Any) -> None:
    r = client.post("/v2/models/m/infer", json=body([[POISON, 0, 0, 0]]))
    doc = assert_error(r, 500, "backend_error")
    assert doc["error"] == "the model failed to process the request"
    # The next request is fine.
    assert client.post("/v2/models/m/infer", json=body()).status_code == 200


def test_a_malformed_model_output_is_500_backend_error() -> None:
    # No warm-up: it would refuse the model (test_output_signature_app.py).
    with app_client(runtime_from_dict(fake_model_config(versions=no_warmup(malformed=True)))) as c:
        for _ in range(2):
            r = c.post("/v2/models/m/infer", json=body([ROW, ROW]))
            assert_error(r, 500, "backend_error")
        assert_error(
            c.post("/v1/models/m:predict", json={"instances": [ROW, ROW]}), 500, "backend_error"
        )


def test_bad_input_never_fails_a_batch_mate() -> None:
    cfg = fake_model_config(
        batching={"kind": "dynamic", "max_batch_size": 32, "max_queue_delay_ms": 100},
        versions=no_warmup(fail_on_value=POISON),
    )
    runtime = runtime_from_dict(cfg)

    async def scenario() -> list[httpx.Response]:
        async with served(runtime) as c:
            reqs = [
                c.post("/v2/models/m/infer", json=body([[float(i), 1, 1, 1]])) for i in range(8)
            ]
            reqs.insert(4, c.post("/v2/models/m/infer", json=body([[POISON, 0, 0, 0]])))
            reqs.insert(2, c.post("/v2/models/m/infer", json={"inputs": []}))
            return list(await asyncio.gather(*reqs))

    responses = asyncio.run(scenario())
    assert_error(responses[2], 400, "invalid_input")
    assert_error(responses[5], 500, "backend_error")
    good = [r for i, r in enumerate(responses) if i not in (2, 5)]
    assert [r.json()["outputs"][0]["data"] for r in good] == [[float(i) + 3] for i in range(8)]


class _Unlistable(np.ndarray):  # type: ignore[type-arg]
    """An FP32 array the JSON encoder fails on: the model's output check passes it."""

    def tolist(self) -> Any:
        raise RuntimeError("complex failure while encoding")


class _ComplexModel(Model):
    """Returns a declared output that the encoder then fails on (a server bug, not the model's:
    a wrong datatype, such as complex64, is the model's and answers 500 backend_error)."""

    kind = "complex_out"

    async def start(self) -> None:
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("z", "FP32", (-1,))]

    async def predict(self, inputs: Tensors) -> Tensors:
        return {"z": inputs["x"][:, 0].copy().view(_Unlistable)}


class _ComplexPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [_ComplexModel]


def test_an_unexpected_failure_repeated_logs_one_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client that found a bug can send it in a loop: one ERROR line, the rest at DEBUG.
    cfg = fake_model_config(versions={"1": {"loader": {"kind": "complex_out"}, "warmup": False}})
    runtime = runtime_from_dict(cfg, extra_plugins=[("complex", _ComplexPlugin())])
    with caplog.at_level("DEBUG", logger="infercore.server"), app_client(runtime) as c:
        for _ in range(5):
            assert_error(c.post("/v2/models/m/infer", json=body()), 500, "internal")
    lines = [r for r in caplog.records if r.getMessage().startswith("request failed unexpect")]
    assert [r.levelname for r in lines] == ["ERROR"] + ["DEBUG"] * 4
    assert len({r.request_id for r in lines}) == 5  # type: ignore[attr-defined]


def test_an_unexpected_failure_is_a_counted_500_internal_without_details() -> None:
    cfg = fake_model_config(versions={"1": {"loader": {"kind": "complex_out"}, "warmup": False}})
    runtime = runtime_from_dict(cfg, extra_plugins=[("complex", _ComplexPlugin())])
    with app_client(runtime) as c:
        r = c.post("/v2/models/m/infer", json=body())
        doc = assert_error(r, 500, "internal")
        assert doc["error"] == "internal error"
        assert "complex" not in r.text
        assert r.headers["x-request-id"]
        metrics = c.get("/metrics").text
    assert 'infercore_requests_total{code="500",model="m",version="1"} 1.0' in metrics
    assert (
        'infercore_request_failures_total{model="m",reason="internal",version="1"} 1.0' in metrics
    )


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("GET", "/v2/models/m/config", "the model configuration extension is not served"),
        ("GET", "/v2/models/m/versions/1/config", "the model configuration extension"),
        ("GET", "/v2/models/m/stats", "the statistics extension is not served: GET /metrics"),
        ("GET", "/v2/models/m/versions/1/stats", "the statistics extension is not served"),
        ("POST", "/v2/repository/index", "the model repository extension is served on the"),
        ("POST", "/v2/repository/models/m/load", "the model repository extension is served"),
        ("GET", "/v2/systemsharedmemory/status", "the shared-memory extensions are not served"),
        ("POST", "/v2/cudasharedmemory/region/r/register", "the shared-memory extensions"),
        ("GET", "/v2/trace/setting", "Triton's trace extension is not served"),
        ("GET", "/v2/logging", "Triton's logging extension is not served"),
    ],
)
def test_tritons_extensions_that_are_not_served_are_named(
    client: Any, method: str, path: str, says: str
) -> None:
    r = client.request(method, path)
    doc = assert_error(r, 404, "not_found")
    assert doc["error"].startswith(f"no route for {method} {path}: {says}"), doc
    assert doc["error"].endswith("(hint: GET /v2 lists the extensions served)")


def test_statistics_of_every_model_is_not_an_unknown_model_called_stats(client: Any) -> None:
    doc = assert_error(client.get("/v2/models/stats"), 404, "model_not_found")
    assert "Triton's statistics extension (GET /v2/models/stats) is not served" in doc["error"]
    assert "served models: m" in doc["error"]
    assert "no route" in assert_error(client.get("/v2/models/m/nope"), 404, "not_found")["error"]
    # Only there: an inference request for a model called stats is an unknown model.
    for path in ("/v1/models/stats:predict", "/v2/models/stats/infer"):
        doc = assert_error(client.post(path, json={}), 404, "model_not_found")
        assert "statistics" not in doc["error"], doc
