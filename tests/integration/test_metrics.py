"""``/metrics``: after a known mix of requests, every family counts exactly what was sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from infercore.server import create_app
from infercore.testing import app_client, fake_model_config, runtime_from_dict

ROW = [1.0, 2.0, 3.0, 4.0]
POISON = 13.0

Samples = list[tuple[str, dict[str, str], float]]


def body(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
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


def scrape(client: Any) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200
    # One media type with one charset: Prometheus 3 refuses a header it cannot parse (two
    # charset parameters, as Litestar's own one beside prometheus_client's once made).
    assert r.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    return parse(r.text)


def parse(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for n, lab, value in samples
        if n == name and all(lab.get(k) == v for k, v in labels.items())
    )


def label_sets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in samples if n == name]


def test_every_family_counts_what_was_sent() -> None:
    cfg = fake_model_config(fail_on_value=POISON, server={"max_body_bytes": 2048})
    runtime = runtime_from_dict(cfg)
    with app_client(runtime) as c:
        before = scrape(c)
        # The families exist from the start, with the version's labels.
        assert total(before, "infercore_model_ready", model="m", version="1") == 1
        assert total(before, "infercore_queue_depth", model="m", version="1") == 0
        assert total(before, "infercore_batch_size_count", model="m", version="1") == 0

        sent: dict[int, int] = {}

        def send(expect: int, method: str, path: str, **kw: Any) -> None:
            r = c.request(method, path, **kw)
            assert r.status_code == expect, r.text
            sent[expect] = sent.get(expect, 0) + 1

        for _ in range(5):
            send(200, "POST", "/v2/models/m/infer", json=body([ROW, ROW]))
        for _ in range(3):
            send(200, "POST", "/v1/models/m:predict", json={"instances": [ROW]})
        send(200, "POST", "/v2/models/m/versions/1/infer", json=body([ROW, ROW, ROW]))
        # 400s: malformed JSON (before a version is picked), a wrong shape (after), a V1 verb.
        send(
            400,
            "POST",
            "/v2/models/m/infer",
            content=b"{",
            headers={"content-type": "application/json"},
        )
        send(400, "POST", "/v2/models/m/infer", json=body([[1.0, 2.0]]))
        send(400, "POST", "/v2/models/m/infer", json=body([ROW], outputs=[{"name": "nope"}]))
        send(400, "POST", "/v1/models/m:explain", json={"instances": [ROW]})
        # 404s: unknown model, unknown version.
        send(404, "POST", "/v2/models/nope/infer", json=body([ROW]))
        send(404, "POST", "/v1/models/nope:predict", json={"instances": [ROW]})
        send(404, "POST", "/v2/models/m/versions/9/infer", json=body([ROW]))
        send(
            415, "POST", "/v2/models/m/infer", content=b"{}", headers={"content-type": "text/plain"}
        )
        send(
            413,
            "POST",
            "/v2/models/m/infer",
            content=b" " * 4096,
            headers={"content-type": "application/json"},
        )
        send(500, "POST", "/v2/models/m/infer", json=body([[POISON, 0, 0, 0]]))
        # Requests that are not inference are not counted, whatever their answer: a
        # metadata 404 or an unknown route is no inference request (every non-2xx answer
        # of an inference request counts one reason).
        c.get("/v2/models/m")
        c.get("/v2/health/ready")
        assert c.get("/v2/models/m/versions/9").status_code == 404
        assert c.get("/nope").status_code == 404

        s = scrape(c)
        model = runtime.models["m"].versions["1"].model

    req = "infercore_requests_total"
    fail = "infercore_request_failures_total"
    assert total(s, req, model="m", version="1", code="200") == 9
    for code, n in sent.items():
        assert total(s, req, code=str(code)) == n, code
    assert total(s, req) == sum(sent.values())
    # Every non-2xx counts exactly one reason.
    assert total(s, fail) == sum(n for code, n in sent.items() if code != 200)
    assert total(s, fail, reason="invalid_input") == 4
    assert total(s, fail, reason="model_not_found") == 3
    assert total(s, fail, reason="unsupported_media_type") == 1
    assert total(s, fail, reason="body_too_large") == 1
    assert total(s, fail, reason="backend_error") == 1
    assert total(s, fail, model="m", version="1", reason="backend_error") == 1
    # Unknown names never become label values.
    for name in (req, fail):
        for labels in label_sets(s, name):
            assert labels["model"] in ("", "m"), labels
            assert labels["version"] in ("", "1"), labels

    ok = dict(model="m", version="1")
    assert total(s, "infercore_request_duration_seconds_count", **ok) == 9
    # The fake model ran for the 9 successes and the poisoned request (which raised).
    assert model.calls == 10
    assert total(s, "infercore_inference_duration_seconds_count", **ok) == 9
    assert total(s, "infercore_batch_size_count", **ok) == 9
    assert total(s, "infercore_batch_size_sum", **ok) == 5 * 2 + 3 * 1 + 3
    assert total(s, "infercore_batch_size_bucket", le="1.0", **ok) == 3
    assert total(s, "infercore_batch_size_bucket", le="2.0", **ok) == 8
    assert total(s, "infercore_batch_size_bucket", le="+Inf", **ok) == 9
    assert total(s, "infercore_queue_wait_seconds_count", **ok) == 10
    assert total(s, "infercore_queue_depth", **ok) == 0
    assert total(s, "infercore_inflight_requests", **ok) == 0
    assert total(s, "infercore_model_ready", **ok) == 1
    assert total(s, "infercore_model_load_failures_total") == 0


def test_model_ready_and_load_failures_per_version() -> None:
    cfg = fake_model_config(
        versions={
            "1": {"loader": {"kind": "fake"}},
            "2": {"loader": {"kind": "fake", "fail_warmup": True}},
        },
    )
    cfg["models"]["m"]["primary"] = "1"
    cfg["models"]["bad"] = {
        "required": False,
        "versions": {"3": {"loader": {"kind": "fake", "fail_load": True}}},
    }
    runtime = runtime_from_dict(cfg)
    with app_client(runtime) as c:
        s = scrape(c)
    assert total(s, "infercore_model_ready", model="m", version="1") == 1
    assert total(s, "infercore_model_ready", model="m", version="2") == 0
    assert total(s, "infercore_model_ready", model="bad", version="3") == 0
    assert total(s, "infercore_model_load_failures_total", model="m", version="2") == 1
    assert total(s, "infercore_model_load_failures_total", model="bad", version="3") == 1
    assert total(s, "infercore_model_load_failures_total", model="m", version="1") == 0
    # After stop, nothing is ready.
    after = parse(_render(runtime))
    assert total(after, "infercore_model_ready") == 0


def _render(runtime: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(runtime.metrics.registry).decode()


@asynccontextmanager
async def served(runtime: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(runtime, manage_runtime=False)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await runtime.stop()


def test_rejections_under_overload_are_counted_with_their_reason() -> None:
    cfg = fake_model_config(
        # The batcher's own queue, request by request: groups off (they would share one call).
        server={"group_requests": False},
        batching={
            "kind": "none",
            "max_concurrency": 1,
            "max_queue_size": 1,
            "queue_timeout_ms": 5000,
        },
        versions={"1": {"loader": {"kind": "fake", "latency_s": 0.2}, "warmup": False}},
    )
    runtime = runtime_from_dict(cfg)

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with served(runtime) as c:
            responses = await asyncio.gather(
                *(c.post("/v2/models/m/infer", json=body([ROW])) for _ in range(7))
            )
            return list(responses), (await c.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    s = parse(text)
    ok = sum(r.status_code == 200 for r in responses)
    full = sum(r.status_code == 503 for r in responses)
    assert (ok, full) == (2, 5)
    assert total(s, "infercore_requests_total", model="m", version="1", code="200") == ok
    assert total(s, "infercore_requests_total", model="m", version="1", code="503") == full
    assert total(s, "infercore_request_failures_total", reason="queue_full") == full
    assert total(s, "infercore_batch_size_count", model="m", version="1") == ok
    # One request waited for the slot; queue_wait saw both that run.
    assert total(s, "infercore_queue_wait_seconds_count", model="m", version="1") == ok
    assert total(s, "infercore_queue_depth", model="m", version="1") == 0


def test_dynamic_batching_shows_in_batch_size() -> None:
    # A long fill window: a burst of concurrent requests all land in one batch.
    # The dynamic batcher's own batching: groups off (a group would be one submission).
    cfg = fake_model_config(
        server={"group_requests": False},
        batching={"kind": "dynamic", "max_batch_size": 64, "max_queue_delay_ms": 300},
        versions={"1": {"loader": {"kind": "fake"}, "warmup": False}},
    )
    runtime = runtime_from_dict(cfg)
    rows_per_request = [1, 2, 3, 1, 2, 3, 1, 2]

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with served(runtime) as c:
            responses = await asyncio.gather(
                *(
                    c.post(
                        "/v2/models/m/infer",
                        json=body([[float(i), float(j), 0.0, 0.0] for j in range(n)]),
                    )
                    for i, n in enumerate(rows_per_request)
                )
            )
            return list(responses), (await c.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    s = parse(text)
    # Each request got exactly its own rows back.
    for i, (r, n) in enumerate(zip(responses, rows_per_request, strict=True)):
        assert r.status_code == 200, r.text
        y = next(o for o in r.json()["outputs"] if o["name"] == "y")
        assert y["data"] == [float(i + j) for j in range(n)]
    model = runtime.models["m"].versions["1"].model
    ok = dict(model="m", version="1")
    assert total(s, "infercore_batch_size_sum", **ok) == sum(rows_per_request)
    assert total(s, "infercore_batch_size_count", **ok) == model.calls
    assert model.calls < len(rows_per_request)
    assert max(model.batches) > 1
    assert total(s, "infercore_queue_wait_seconds_count", **ok) == len(rows_per_request)
    assert total(s, "infercore_requests_total", code="200", **ok) == len(rows_per_request)
