"""Request groups through the app: concurrent requests share work, each gets its own answer.

The feature source here is groupable: it takes the client's two columns ``x = [a, b]`` and
appends a computed third, ``10 * a``, so the fake model (``y = sum(x)``, ``echo = x``) answers
``y = 11 a + b`` and ``echo = [a, b, 10 a]`` for each row. A row whose ``a`` is ``INVALID``
makes the source refuse the request (400), one whose ``a`` is ``DEGRADED`` is served with
default features (``X-Infercore-Degraded: features``). Requests sent with one
``asyncio.gather`` over an in-process ASGI transport reach the runtime in the same loop turn;
the source's and the model's call counts show whether they were grouped. No timing is asserted.
Groups need a batcher that batches; behind ``none`` requests are never grouped. Here it is
``stacking``: ``none``'s one model call per submission, declared batching, so that the model's
call count is the number of submissions (a group's is one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import pytest

from infercore import hookimpl
from infercore.builtins.batchers import NoBatcher
from infercore.components import Batcher, ComponentContext, FeatureSource, Tensors
from infercore.components.features import mark_degraded
from infercore.errors import InvalidInput
from infercore.testing import async_app_client, fake_model_config, metric_value, runtime_from_dict

INVALID = -2.0
DEGRADED = -1.0
POISON = -3.0  # the fake model raises on rows starting with it (fail_on_value)
BATCHING = {"kind": "stacking"}


class ComputingSource(FeatureSource):
    """Appends ``10 * a`` to each row of ``x``; counts its fetches and the rows fetched."""

    kind = "computing"
    groupable = True

    def __init__(self, config: Any, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.calls = 0
        self.rows = 0

    async def fetch(
        self, fields: Mapping[str, np.ndarray[Any, Any]], *, deadline: float
    ) -> Tensors:
        self.calls += 1
        x = fields["x"]
        self.rows += len(x)
        if np.any(x[:, 0] == INVALID):
            raise InvalidInput(f"x[:, 0] == {INVALID} is refused by the source")
        if np.any(x[:, 0] == DEGRADED):
            mark_degraded("features")
        return {"x": np.concatenate([x, 10 * x[:, :1]], axis=1)}


class SoloComputingSource(ComputingSource):
    """The same source, not declared groupable."""

    kind = "computing_solo"
    groupable = False


class StackingBatcher(NoBatcher):
    """``none`` declared batching: each submission (a whole group's) is one model call."""

    kind = "stacking"
    batches = True


class ComputingPlugin:
    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [ComputingSource, SoloComputingSource]

    @hookimpl
    def register_batchers(self) -> list[type[Batcher]]:
        return [StackingBatcher]


def runtime(
    source: str = "computing", *, server: dict[str, Any] | None = None, **model: Any
) -> Any:
    cfg = fake_model_config(features=3, server=server or {}, batching=BATCHING, **model)
    cfg["features"] = {"kind": source}
    return runtime_from_dict(cfg, extra_plugins=[("computing", ComputingPlugin())])


def shadow_runtime() -> Any:
    versions = {
        "1": {"loader": {"kind": "fake", "features": 3}},
        "2": {"loader": {"kind": "fake", "features": 3, "offset": 0.5}, "stage": "shadow"},
    }
    cfg = fake_model_config(versions=versions, batching=BATCHING)
    cfg["models"]["m"]["primary"] = "1"
    cfg["models"]["m"]["routing"] = {"kind": "shadow"}
    cfg["features"] = {"kind": "computing"}
    return runtime_from_dict(cfg, extra_plugins=[("computing", ComputingPlugin())])


def requests(n: int, special: Mapping[int, float] | None = None) -> list[list[list[float]]]:
    """``n`` requests of 1 to 3 rows with distinct values; ``special[i]`` starts request i."""
    out = []
    for i in range(n):
        rows = [[float(i * 10 + j + 1), float(-(i * 10 + j))] for j in range(1 + i % 3)]
        if special and i in special:
            rows[-1][0] = special[i]
        out.append(rows)
    return out


def v2_body(rows: list[list[float]], rid: str) -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {
        "id": rid,
        "inputs": [{"name": "x", "shape": [len(rows), 2], "datatype": "FP32", "data": flat}],
    }


def expected(rows: list[list[float]], offset: float = 0.0) -> tuple[list[float], list[float]]:
    x = np.asarray(rows, dtype=np.float32)
    full = np.concatenate([x, 10 * x[:, :1]], axis=1)
    return full.sum(axis=1).tolist(), full.reshape(-1).tolist()


async def send_all(
    client: httpx.AsyncClient, bodies: list[list[list[float]]], protocol: str = "v2"
) -> list[httpx.Response]:
    if protocol == "v2":
        calls = [
            client.post("/v2/models/m/infer", json=v2_body(rows, f"r{i}"))
            for i, rows in enumerate(bodies)
        ]
    else:
        calls = [client.post("/v1/models/m:predict", json={"instances": rows}) for rows in bodies]
    return list(await asyncio.gather(*calls))


def serve_all(rt: Any, bodies: list[list[list[float]]]) -> list[httpx.Response]:
    """Start ``rt``, send every V2 body at once, stop it; the responses in order."""

    async def scenario() -> list[httpx.Response]:
        async with async_app_client(rt) as client:
            return await send_all(client, bodies)

    return asyncio.run(scenario())


def assert_own_answer(resp: httpx.Response, rows: list[list[float]], i: int, protocol: str) -> None:
    assert resp.status_code == 200, resp.text
    y, echo = expected(rows)
    if protocol == "v2":
        body = resp.json()
        assert body["id"] == f"r{i}"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["y"]["data"] == y
        assert outputs["y"]["shape"] == [len(rows)]
        assert outputs["echo"]["data"] == echo
        assert outputs["echo"]["shape"] == [len(rows), 3]
    else:
        predictions = resp.json()["predictions"]
        assert [p["y"] for p in predictions] == y
        assert [v for p in predictions for v in p["echo"]] == echo


# -- grouping ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["v2", "v1"])
def test_concurrent_requests_share_fetches_and_model_calls_and_get_their_own_answers(
    protocol: str,
) -> None:
    rt = runtime()
    n = 24
    bodies = requests(n)

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with async_app_client(rt) as client:
            responses = await send_all(client, bodies, protocol)
            return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        assert_own_answer(resp, rows, i, protocol)
        assert "x-infercore-degraded" not in resp.headers
    source = rt.models["m"].features
    model = rt.models["m"].versions["1"].model
    assert source.calls < n  # groups formed
    assert source.rows == sum(len(rows) for rows in bodies)  # each row fetched once
    assert model.calls == source.calls  # one batcher submission per group
    assert sum(model.batches) == source.rows
    assert metric_value(text, "infercore_requests_total", model="m", code="200") == n
    # A group's one submission waited for each of its requests: counted once per request.
    assert metric_value(text, "infercore_queue_wait_seconds_count", model="m") == n


@pytest.mark.parametrize(
    ("marker", "status", "reason"),
    [(INVALID, 400, "invalid_input"), (POISON, 500, "backend_error")],
    ids=["invalid-features", "model-error"],
)
def test_one_bad_request_gets_its_error_and_the_others_their_answers(
    marker: float, status: int, reason: str
) -> None:
    rt = runtime(fail_on_value=POISON)
    n, bad = 12, 5
    bodies = requests(n, {bad: marker})

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with async_app_client(rt) as client:
            responses = await send_all(client, bodies)
            return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        if i == bad:
            assert resp.status_code == status, resp.text
            assert resp.json()["reason"] == reason
        else:
            assert_own_answer(resp, rows, i, "v2")
    # The bad request's group was tried once, then each of its requests ran alone.
    assert rt.models["m"].features.calls > n
    assert metric_value(text, "infercore_requests_total", model="m", code="200") == n - 1
    assert metric_value(text, "infercore_requests_total", model="m", code=str(status)) == 1


def test_only_requests_with_degraded_rows_carry_the_header() -> None:
    rt = runtime()
    n = 12
    degraded = {2, 7}
    bodies = requests(n, {i: DEGRADED for i in degraded})
    responses = serve_all(rt, bodies)
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        assert_own_answer(resp, rows, i, "v2")
        if i in degraded:
            assert resp.headers["x-infercore-degraded"] == "features"
        else:
            assert "x-infercore-degraded" not in resp.headers, i
    assert rt.models["m"].features.calls > n  # a group was tried, then each ran alone
    # The degraded group stopped before its model call: the model ran once per request only
    # (no wasted call, and no drift or shadow offer of rows that are offered again alone).
    assert rt.models["m"].versions["1"].model.calls == n


@pytest.mark.parametrize(
    ("source", "server"),
    [("computing", {"group_requests": False}), ("computing_solo", {})],
    ids=["group_requests-off", "source-not-groupable"],
)
def test_without_groups_each_request_is_fetched_and_run_on_its_own(
    source: str, server: dict[str, Any]
) -> None:
    rt = runtime(source, server=server)
    n = 12
    bodies = requests(n)
    responses = serve_all(rt, bodies)
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        assert_own_answer(resp, rows, i, "v2")
    assert rt.models["m"].versions["1"].groups is None
    assert rt.models["m"].features.calls == n
    assert rt.models["m"].versions["1"].model.calls == n


def test_groups_are_on_by_default_for_a_groupable_source() -> None:
    rt = runtime()

    async def scenario() -> None:
        async with async_app_client(rt) as client:
            resp = await client.post("/v2/models/m/infer", json=v2_body([[1.0, 2.0]], "r0"))
            assert_own_answer(resp, [[1.0, 2.0]], 0, "v2")

    asyncio.run(scenario())
    assert rt.models["m"].versions["1"].groups is not None


@pytest.mark.parametrize("protocol", ["v2", "v1"])
def test_the_built_in_request_source_groups_requests_that_arrive_together(protocol: str) -> None:
    # features: {kind: request}, as iris: V2 tensors pass through; V1 instances of objects
    # are assembled column by column. Row i of either is row i of the request.
    cfg = fake_model_config(features=2, batching=BATCHING)
    cfg["features"] = {"kind": "request", "assemble": {"x": ["a", "b"]}}
    rt = runtime_from_dict(cfg, extra_plugins=[("computing", ComputingPlugin())])
    n = 24
    bodies = requests(n)

    async def scenario() -> list[httpx.Response]:
        async with async_app_client(rt) as client:
            if protocol == "v2":
                calls = [
                    client.post("/v2/models/m/infer", json=v2_body(rows, f"r{i}"))
                    for i, rows in enumerate(bodies)
                ]
            else:
                calls = [
                    client.post(
                        "/v1/models/m:predict",
                        json={"instances": [{"a": r[0], "b": r[1]} for r in rows]},
                    )
                    for rows in bodies
                ]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(scenario())
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        assert resp.status_code == 200, resp.text
        y = [float(np.float32(a) + np.float32(b)) for a, b in rows]
        if protocol == "v2":
            body = resp.json()
            assert body["id"] == f"r{i}"
            assert {o["name"]: o["data"] for o in body["outputs"]}["y"] == y
        else:
            assert [p["y"] for p in resp.json()["predictions"]] == y
    assert rt.models["m"].versions["1"].groups is not None
    assert rt.models["m"].versions["1"].model.calls < n  # requests shared model calls


# -- shadows -------------------------------------------------------------------------------


def test_a_grouped_requests_shadow_copies_count_one_per_request() -> None:
    rt = shadow_runtime()
    n = 16
    bodies = requests(n)
    total_rows = sum(len(rows) for rows in bodies)

    async def scenario() -> tuple[list[httpx.Response], dict[str, Any], str]:
        async with async_app_client(rt) as client:
            responses = await send_all(client, bodies)
            summary: dict[str, Any] = {}
            for _ in range(500):  # bounded wait for the copies to finish (not a timing check)
                summary = rt.lifecycle.shadow_summary("m")["versions"].get("2", {})
                if summary.get("rows_compared", 0) >= total_rows:
                    break
                await asyncio.sleep(0.01)
            return responses, summary, (await client.get("/metrics")).text

    responses, summary, text = asyncio.run(scenario())
    for i, (resp, rows) in enumerate(zip(responses, bodies, strict=True)):
        assert_own_answer(resp, rows, i, "v2")
        assert resp.json()["model_version"] == "1"
    assert rt.models["m"].features.calls < n  # the primary's requests were grouped
    assert summary["rows_compared"] == total_rows
    assert summary["mean_abs_diff"]["y"] == pytest.approx(0.5)
    assert summary["copies"]["ok"] == n
    assert metric_value(text, "infercore_shadow_requests_total", version="2", outcome="ok") == n
    assert metric_value(text, "infercore_shadow_requests_total", version="2") == n
    assert metric_value(text, "infercore_requests_total", model="m", code="200") == n
