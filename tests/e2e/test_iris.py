"""``infercore serve +recipe=iris`` as a real process, driven by standard clients.

Predictions are compared with ONNX Runtime run offline on the same artifact and rows, and with
the true species of a few known flowers. The server is started once (``iris_server`` in
conftest.py) and stopped with SIGTERM, which must exit 0.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from e2e_support import start_server, stop_server, wait_ready
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

if TYPE_CHECKING:
    from e2e_support import Launcher, Server

pytestmark = pytest.mark.e2e

FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# Rows 0, 50 and 100 are the first setosa, versicolor and virginica of the data set.
KNOWN = {0: 0, 50: 1, 100: 2}
PROB_TOL = {"rtol": 1e-4, "atol": 1e-6}


# --- offline reference ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris_rows() -> np.ndarray:
    return np.asarray(load_iris().data, dtype=np.float32)


@pytest.fixture(scope="module")
def offline(iris_onnx: Path, iris_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every iris row, from ONNX Runtime in this process."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(iris_onnx), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": iris_rows})
    # Row by row too: the served answer for a row must not depend on its batch-mates.
    for i in (0, 50, 100):
        one = session.run(["label", "probabilities"], {"input": iris_rows[i : i + 1]})
        assert one[0][0] == labels[i]
        np.testing.assert_allclose(one[1][0], probabilities[i], **PROB_TOL)
    return np.asarray(labels), np.asarray(probabilities)


@pytest.fixture
def triton_client(iris_server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(iris_server.host_port, network_timeout=30.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def http(iris_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=iris_server.url, timeout=30.0) as client:
        yield client


def v2_json(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.reshape(-1).tolist(),
            }
        ],
        **extra,
    }


def outputs_of(doc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["label"]["datatype"] == "INT64"
    assert out["probabilities"]["datatype"] == "FP32"
    labels = np.asarray(out["label"]["data"], dtype=np.int64).reshape(out["label"]["shape"])
    probs = np.asarray(out["probabilities"]["data"], dtype=np.float32).reshape(
        out["probabilities"]["shape"]
    )
    return labels, probs


def assert_matches(
    labels: np.ndarray, probs: np.ndarray, index: list[int], offline: tuple[np.ndarray, np.ndarray]
) -> None:
    np.testing.assert_array_equal(labels, offline[0][index])
    np.testing.assert_allclose(probs, offline[1][index], **PROB_TOL)


def metric_samples(client: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


# --- tritonclient ------------------------------------------------------------------------------


def test_tritonclient_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("iris")
    assert triton_client.is_model_ready("iris", "1")
    assert not triton_client.is_model_ready("nope")
    meta = triton_client.get_model_metadata("iris")
    assert meta["name"] == "iris"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert triton_client.get_model_metadata("iris", "1") == meta
    server = triton_client.get_server_metadata()
    assert server["name"] == "infercore"
    assert "binary_tensor_data" in server["extensions"]


def test_tritonclient_infer_binary_default(
    triton_client: triton.InferenceServerClient,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
) -> None:
    index = [0, 50, 100, 7, 77, 149]
    inp = triton.InferInput("input", [len(index), 4], "FP32")
    inp.set_data_from_numpy(iris_rows[index])  # binary_data=True: the client's default
    result = triton_client.infer("iris", [inp], request_id="tc-1")
    assert result.get_response()["id"] == "tc-1"
    assert result.get_response()["model_version"] == "1"
    labels, probs = result.as_numpy("label"), result.as_numpy("probabilities")
    assert labels.dtype == np.int64 and probs.dtype == np.float32
    assert_matches(labels, probs, index, offline)
    assert labels[:3].tolist() == [KNOWN[i] for i in (0, 50, 100)]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_aio_infer(
    iris_server: Server,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
    binary: bool,
) -> None:
    # aiohttp labels every body application/octet-stream, a JSON-only one too: read as JSON,
    # as Triton reads it (it was a 415).
    import asyncio

    import tritonclient.http.aio as triton_aio

    index = [0, 50, 100]

    async def infer() -> tuple[np.ndarray, np.ndarray]:
        client = triton_aio.InferenceServerClient(iris_server.host_port)
        try:
            assert await client.is_model_ready("iris")
            inp = triton_aio.InferInput("input", [len(index), 4], "FP32")
            inp.set_data_from_numpy(iris_rows[index], binary_data=binary)
            outputs = [
                triton_aio.InferRequestedOutput(name, binary_data=binary)
                for name in ("label", "probabilities")
            ]
            result = await client.infer("iris", [inp], outputs=outputs)
            return result.as_numpy("label"), result.as_numpy("probabilities")
        finally:
            await client.close()

    labels, probs = asyncio.run(infer())
    assert_matches(labels, probs, index, offline)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_compression(
    triton_client: triton.InferenceServerClient,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
    algorithm: str,
    binary: bool,
) -> None:
    # tritonclient compresses the body when asked (Triton accepts gzip and deflate).
    index = [3, 60, 120]
    inp = triton.InferInput("input", [3, 4], "FP32")
    inp.set_data_from_numpy(iris_rows[index], binary_data=binary)
    result = triton_client.infer("iris", [inp], request_compression_algorithm=algorithm)
    assert_matches(result.as_numpy("label"), result.as_numpy("probabilities"), index, offline)


def test_tritonclient_infer_json_and_requested_outputs(
    triton_client: triton.InferenceServerClient,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
) -> None:
    index = [100, 50, 0]
    inp = triton.InferInput("input", [3, 4], "FP32")
    inp.set_data_from_numpy(iris_rows[index], binary_data=False)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = triton_client.infer("iris", [inp], model_version="1", outputs=outputs)
    assert_matches(result.as_numpy("label"), result.as_numpy("probabilities"), index, offline)
    assert result.as_numpy("label").tolist() == [2, 1, 0]
    # Only what was asked for comes back.
    result = triton_client.infer(
        "iris", [inp], outputs=[triton.InferRequestedOutput("label", binary_data=True)]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("label").tolist() == [2, 1, 0]


def test_tritonclient_sees_errors_as_exceptions(
    triton_client: triton.InferenceServerClient, iris_rows: np.ndarray
) -> None:
    inp = triton.InferInput("input", [1, 3], "FP32")
    inp.set_data_from_numpy(iris_rows[:1, :3])
    with pytest.raises(triton.InferenceServerException) as info:
        triton_client.infer("iris", [inp])
    assert info.value.status() == "400"
    assert "'input'" in info.value.message()
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(iris_rows[:1])
    with pytest.raises(triton.InferenceServerException) as info:
        triton_client.infer("nope", [inp])
    assert info.value.status() == "404"


# --- plain HTTP ----------------------------------------------------------------------------------


def test_v2_json_over_httpx(
    http: httpx.Client, iris_rows: np.ndarray, offline: tuple[np.ndarray, np.ndarray]
) -> None:
    index = list(range(0, 150, 10))
    r = http.post("/v2/models/iris/infer", json=v2_json(iris_rows[index], id="plain"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("iris", "1", "plain")
    assert_matches(*outputs_of(doc), index, offline)
    r = http.post("/v2/models/iris/versions/1/infer", json=v2_json(iris_rows[[0, 50, 100]]))
    assert outputs_of(r.json())[0].tolist() == [0, 1, 2]


def test_v1_instances_arrays_and_named_fields(
    http: httpx.Client, iris_rows: np.ndarray, offline: tuple[np.ndarray, np.ndarray]
) -> None:
    index = [0, 50, 100, 3, 60, 120]
    rows = iris_rows[index]
    as_arrays = {"instances": rows.tolist()}
    as_objects = {"instances": [dict(zip(FIELDS, row, strict=True)) for row in rows.tolist()]}
    for body in (as_arrays, as_objects):
        for path in ("/v1/models/iris:predict", "/v1/models/iris/versions/1:predict"):
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            preds = r.json()["predictions"]
            assert len(preds) == len(index)
            labels = np.asarray([p["label"] for p in preds])
            probs = np.asarray([p["probabilities"] for p in preds], dtype=np.float32)
            assert_matches(labels, probs, index, offline)
            assert labels[:3].tolist() == [0, 1, 2]
    r = http.get("/v1/models/iris")
    assert r.json() == {"model_version_status": [{"version": "1", "state": "AVAILABLE"}]}
    # A missing field is named.
    r = http.post("/v1/models/iris:predict", json={"instances": [{f: 1.0 for f in FIELDS[:3]}]})
    assert r.status_code == 400
    assert "petal_width" in r.json()["error"]


def test_oversized_body_is_413_and_the_connection_pool_keeps_working(
    http: httpx.Client, iris_rows: np.ndarray
) -> None:
    big = b'{"inputs": [' + b" " * (9 * 1024 * 1024) + b"]}"
    try:
        r = http.post(
            "/v2/models/iris/infer", content=big, headers={"content-type": "application/json"}
        )
    except httpx.TransportError as exc:  # pragma: no cover - the failure we guard against
        pytest.fail(f"the server dropped the connection instead of answering 413: {exc!r}")
    assert r.status_code == 413
    assert r.json()["reason"] == "body_too_large"
    for _ in range(3):
        r = http.post("/v2/models/iris/infer", json=v2_json(iris_rows[:2]))
        assert r.status_code == 200


# --- under load ----------------------------------------------------------------------------------


def _run_mixed_load(
    base_url: str,
    iris_rows: np.ndarray,
    *,
    n_requests: int,
    threads: int,
    bad_every: int,
    seed: int,
) -> list[tuple[str, list[int], int, Any]]:
    """Send a mix of V2 JSON, V2 binary, V1 array and V1 object requests from many threads.

    Returns (kind, row indices, status, decoded answer) per request, in sending order.
    """
    rng = random.Random(seed)
    plan: list[tuple[str, list[int]]] = []
    kinds = ["v2_json", "v2_binary", "v1_arrays", "v1_objects"]
    for i in range(n_requests):
        if bad_every and i % bad_every == bad_every // 2:
            plan.append(("bad", [rng.randrange(150)]))
        else:
            plan.append((kinds[i % 4], rng.sample(range(150), rng.randint(1, 4))))
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=30.0)
        return local.client

    def send(item: tuple[str, list[int]]) -> tuple[str, list[int], int, Any]:
        kind, index = item
        rows = iris_rows[index]
        c = client()
        if kind == "bad":
            r = c.post("/v2/models/iris/infer", json=v2_json(rows[:, :3]))
            return kind, index, r.status_code, r.json()
        if kind == "v2_json":
            r = c.post("/v2/models/iris/infer", json=v2_json(rows))
            return kind, index, r.status_code, outputs_of(r.json()) if r.is_success else r.text
        if kind == "v2_binary":
            inp = triton.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            body, json_size = triton.InferenceServerClient.generate_request_body([inp])
            r = c.post(
                "/v2/models/iris/infer",
                content=body,
                headers={"Inference-Header-Content-Length": str(json_size)},
            )
            if not r.is_success:
                return kind, index, r.status_code, r.text
            result = triton.InferenceServerClient.parse_response_body(
                r.content, header_length=int(r.headers["inference-header-content-length"])
            )
            return (
                kind,
                index,
                r.status_code,
                (result.as_numpy("label"), result.as_numpy("probabilities")),
            )
        if kind == "v1_arrays":
            instances: list[Any] = rows.tolist()
        else:
            instances = [dict(zip(FIELDS, row, strict=True)) for row in rows.tolist()]
        r = c.post("/v1/models/iris:predict", json={"instances": instances})
        if not r.is_success:
            return kind, index, r.status_code, r.text
        preds = r.json()["predictions"]
        return (
            kind,
            index,
            r.status_code,
            (
                np.asarray([p["label"] for p in preds]),
                np.asarray([p["probabilities"] for p in preds], dtype=np.float32),
            ),
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(send, plan))


def _check_load_results(
    results: list[tuple[str, list[int], int, Any]], offline: tuple[np.ndarray, np.ndarray]
) -> tuple[int, int, int]:
    """Assert every answer; return (successes, rows in them, bad requests)."""
    ok = rows = bad = 0
    for kind, index, status, answer in results:
        if kind == "bad":
            assert status == 400, answer
            assert answer["reason"] == "invalid_input"
            assert "'input'" in answer["error"]
            bad += 1
            continue
        assert status == 200, (kind, answer)
        assert_matches(*answer, index, offline)
        ok += 1
        rows += len(index)
    return ok, rows, bad


def test_concurrent_mixed_requests_are_all_answered_correctly(
    iris_server: Server,
    http: httpx.Client,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
) -> None:
    labels = dict(model="iris", version="1")
    before = metric_samples(http)
    results = _run_mixed_load(
        iris_server.url, iris_rows, n_requests=200, threads=16, bad_every=25, seed=1
    )
    ok, rows, bad = _check_load_results(results, offline)
    assert (ok, bad) == (192, 8)
    after = metric_samples(http)

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert delta("infercore_requests_total", code="200") == ok
    assert delta("infercore_requests_total", code="400") == bad
    assert delta("infercore_request_failures_total", reason="invalid_input") == bad
    assert delta("infercore_request_duration_seconds_count") == ok
    # One queue wait per request answered, whether it came alone or in a request group (one
    # submission for several requests).
    assert delta("infercore_queue_wait_seconds_count") == ok
    # Batching never loses or duplicates a row, and never runs more calls than requests.
    assert delta("infercore_batch_size_sum") == rows
    calls = delta("infercore_batch_size_count")
    assert 1 <= calls <= ok
    assert delta("infercore_inference_duration_seconds_count") == calls
    assert metric(after, "infercore_queue_depth", **labels) == 0
    assert metric(after, "infercore_inflight_requests", **labels) == 0
    assert metric(after, "infercore_model_ready", **labels) == 1


def test_batching_under_concurrency_with_a_fill_window(
    launcher: Launcher,
    iris_onnx: Path,
    iris_rows: np.ndarray,
    offline: tuple[np.ndarray, np.ndarray],
) -> None:
    """With a 50 ms fill window, concurrent requests share model calls (batch size > 1)."""
    server = launcher.start(["+recipe=iris", "batching=dynamic", "batching.max_queue_delay_ms=50"])
    results = _run_mixed_load(server.url, iris_rows, n_requests=96, threads=16, bad_every=0, seed=2)
    ok, rows, _ = _check_load_results(results, offline)
    with httpx.Client(base_url=server.url) as c:
        samples = metric_samples(c)
    assert launcher.stop(server) == 0, server.log_text()
    labels = dict(model="iris", version="1")
    calls = metric(samples, "infercore_batch_size_count", **labels)
    single = metric(samples, "infercore_batch_size_bucket", le="1.0", **labels)
    # The warm-up call is not counted: only the rows that were sent.
    assert metric(samples, "infercore_batch_size_sum", **labels) == rows
    assert calls < ok, "16 concurrent clients and a 50 ms window never shared a model call"
    assert single < calls, "no batch had more than one row"


@pytest.mark.parametrize("access_log", [True, False])
def test_the_access_log_shows_the_forwarded_client_of_a_trusted_proxy(
    launcher: Launcher, iris_onnx: Path, access_log: bool
) -> None:
    """X-Forwarded-For from 127.0.0.1 (uvicorn's default trusted proxy) names the client in
    the access log; without the access log there is no line (and the header goes unread)."""
    server = launcher.start(["+recipe=iris", f"server.access_log={str(access_log).lower()}"])
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/v2/health/live", headers={"X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 200
    assert launcher.stop(server) == 0, server.log_text()
    log = server.log_text()
    if access_log:
        assert '203.0.113.7:0 - "GET /v2/health/live HTTP/1.1" 200' in log, log
    else:
        assert "/v2/health/live" not in log and "203.0.113.7" not in log, log


def test_a_required_model_that_fails_to_load_exits_non_zero(
    launcher: Launcher, iris_onnx: Path
) -> None:
    server = launcher.start(
        ["+recipe=iris", "models.iris.versions.1.loader.path=iris/artifacts/missing.onnx"],
        ready=False,
    )
    code = server.process.wait(timeout=30)
    log = server.log_text()
    assert code == 1, log
    assert "infercore: error: models.iris.versions.1.loader.path" in log
    assert "Traceback" not in log


def test_metrics_endpoint_is_prometheus_text(http: httpx.Client) -> None:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for name in (
        "infercore_requests",
        "infercore_request_failures",
        "infercore_request_duration_seconds",
        "infercore_queue_wait_seconds",
        "infercore_inference_duration_seconds",
        "infercore_batch_size",
        "infercore_queue_depth",
        "infercore_model_ready",
    ):
        assert name in names, name


@pytest.mark.parametrize(
    "path", ["/v2/health/live", "/v2/health/ready", "/v2/models/iris", "/v2", "/metrics"]
)
def test_head_answers_what_get_answers_without_a_body(http: httpx.Client, path: str) -> None:
    # RFC 9110 §9.3.2; uptime checks and load balancers send HEAD. Over a real connection, so
    # the body really is left out (a body here would be read as the next response).
    get = http.get(path)
    head = http.head(path)
    assert (head.status_code, get.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert http.get("/v2/health/live").json() == {"live": True}  # the connection still works


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v2 HTTP/1.1\r\nHost x\r\n\r\n",  # a header line without its colon
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS spoken to plain HTTP
    ],
)
def test_a_request_the_http_parser_refuses_gets_the_json_error_body(
    http: httpx.Client, request_bytes: bytes
) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as s:
        s.sendall(request_bytes)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), received[:200]
    assert b"content-type: application/json" in head.lower(), head
    doc = json.loads(body)
    assert doc["reason"] == "invalid_input" and doc["error"].startswith("malformed HTTP request")
    assert http.get("/v2/health/live").status_code == 200  # the server serves on


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # server.max_header_bytes (64 KiB): a target that long is 414, headers 431.
        (b"GET /v2/models/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4_000_000, 431),
    ],
)
def test_a_request_head_over_the_limit_is_refused_before_it_is_read_whole(
    http: httpx.Client, request_bytes: bytes, status: int
) -> None:
    import contextlib
    import socket

    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as s:
        with contextlib.suppress(OSError):  # the server stops reading once past the limit
            s.sendall(request_bytes)
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), received[:200]
    assert b"connection: close" in head.lower(), head
    doc = json.loads(body)
    assert doc["reason"] == "headers_too_large" and "server.max_header_bytes" in doc["error"]
    assert http.get("/v2/health/live").status_code == 200  # the server serves on


def test_the_head_limits_are_the_config_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``server.max_header_bytes`` and ``server.header_timeout_ms`` reach the HTTP protocol of
    both listeners (the defaults are built in too: a server that ignored the config would
    pass the test above; the admin listener reads its token from the head)."""
    import socket

    from e2e_support import free_port

    monkeypatch.setenv("INFERCORE_ADMIN_TOKEN", "t" * 32)
    admin_port = free_port()
    server = start_server(
        [
            "+recipe=iris",
            "server.max_header_bytes=2048",
            "server.header_timeout_ms=300",
            "admin.enabled=true",
            f"admin.port={admin_port}",
        ],
        tmp_path / "server.log",
    )
    try:
        wait_ready(server)
        host, port = server.host_port.rsplit(":", 1)
        for listener in (int(port), admin_port):
            with socket.create_connection((host, listener), timeout=10) as s:
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
                received = s.recv(65536)
            assert received.startswith(b"HTTP/1.1 431 "), (listener, received[:200])
            with socket.create_connection((host, listener), timeout=10) as s:
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never ends
                received = s.recv(65536)
            assert received.startswith(b"HTTP/1.1 408 "), (listener, received[:200])
    finally:
        assert stop_server(server) == 0, server.log_text()
