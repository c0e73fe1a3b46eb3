"""``batching: {kind: none}`` calls the model once per request and runs each
request (and each shadow copy) at most once; header-routed failures are counted under the
version's label; the ``InfercoreModelNotReady`` alert covers only versions meant to take traffic.

Requests are sent with one ``asyncio.gather`` over an in-process ASGI transport, so that they
reach the runtime in the same turn of the event loop (where request groups would form). The
fake model's ``batches`` (rows of each call) shows how they reached it. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infercore import hookimpl
from infercore.components import Batcher, Tensors
from infercore.testing import async_app_client, fake_model_config, metric_value, runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rules/infercore.yml"
POISON = 13.0  # the fake model raises on a row starting with it (fail_on_value)


def v2_body(first: float, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [first, 1, 2, 3]}],
    }


async def send_together(client: httpx.AsyncClient, firsts: list[float]) -> list[httpx.Response]:
    calls = [
        client.post("/v2/models/m/infer", json=v2_body(v, f"r{i}")) for i, v in enumerate(firsts)
    ]
    return list(await asyncio.gather(*calls))


def serve_together(rt: Any, firsts: list[float]) -> tuple[list[httpx.Response], str]:
    async def scenario() -> tuple[list[httpx.Response], str]:
        async with async_app_client(rt) as client:
            responses = await send_together(client, firsts)
            return responses, (await client.get("/metrics")).text

    return asyncio.run(scenario())


# -- none: one model call per request ------------------------------------------------------


def test_none_calls_the_model_once_per_request_and_never_twice_after_a_failure() -> None:
    # The defaults: server.group_requests on, features {kind: request} (groupable), a batchable
    # model: everything that lets requests be grouped, except the batcher.
    rt = runtime_from_dict(fake_model_config(fail_on_value=POISON))
    firsts = [1.0, 2.0, POISON, 4.0, 5.0]
    responses, text = serve_together(rt, firsts)
    for v, resp in zip(firsts, responses, strict=True):
        if v == POISON:
            assert resp.status_code == 500, resp.text
            assert resp.json()["reason"] == "backend_error"
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["outputs"][0]["data"] == [v + 6.0]
    sv = rt.models["m"].versions["1"]
    # Five calls of one row: no stacked call, and no request ran a second time after the
    # poisoned one failed (a failed group would have run each of its requests again alone).
    assert sv.model.batches == [1] * len(firsts)
    assert sv.groups is None
    assert metric_value(text, "infercore_requests_total", model="m", code="200") == 4


class DirectBatcher(Batcher):
    """A third-party batcher that does not batch: each request is its own model call.

    It says nothing about batching: its config has no ``max_batch_size``.
    """

    kind = "direct"

    async def submit(self, inputs: Tensors, *, deadline: float) -> Tensors:
        return await self.model.predict(inputs)


class DeclaredDirectConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_batch_size: int = 8


class DeclaredDirectBatcher(DirectBatcher):
    """The same, with a batch-size option that it does not batch by: it says so."""

    kind = "direct_declared"
    Config = DeclaredDirectConfig
    batches = False


class DirectPlugin:
    @hookimpl
    def register_batchers(self) -> list[type[Batcher]]:
        return [DirectBatcher, DeclaredDirectBatcher]


def test_a_third_party_batcher_that_does_not_batch_gets_no_groups() -> None:
    cfg = fake_model_config(batching={"kind": "direct"})
    rt = runtime_from_dict(cfg, extra_plugins=[("direct", DirectPlugin())])
    firsts = [float(i) for i in range(1, 9)]
    responses, _ = serve_together(rt, firsts)
    assert [r.status_code for r in responses] == [200] * len(firsts)
    sv = rt.models["m"].versions["1"]
    assert sv.model.batches == [1] * len(firsts)
    assert sv.groups is None


@pytest.mark.parametrize(
    ("kind", "batches"),
    [
        ("none", False),
        ("dynamic", True),
        ("adaptive", True),
        ("direct", False),  # no max_batch_size: the default says it does not batch
        ("direct_declared", False),  # a max_batch_size, but the class says it does not
    ],
)
def test_batchers_say_whether_they_batch(kind: str, batches: bool) -> None:
    cfg = fake_model_config(batching={"kind": kind})
    rt = runtime_from_dict(cfg, extra_plugins=[("direct", DirectPlugin())])
    assert rt.models["m"].versions["1"].batcher.batches is batches


def test_a_batcher_that_batches_still_groups_requests() -> None:
    cfg = fake_model_config(batching={"kind": "dynamic", "max_batch_size": 64})
    rt = runtime_from_dict(cfg)
    firsts = [float(i) for i in range(1, 17)]
    responses, _ = serve_together(rt, firsts)
    assert [r.status_code for r in responses] == [200] * len(firsts)
    sv = rt.models["m"].versions["1"]
    assert sv.groups is not None
    assert sum(sv.model.batches) == len(firsts)
    assert len(sv.model.batches) < len(firsts)  # requests shared model calls


# -- header-routed failures keep the version's label -----------------------------------------


def header_runtime() -> Any:
    versions = {
        "1": {"loader": {"kind": "fake"}},
        "2": {"loader": {"kind": "fake", "fail_load": True}, "stage": "candidate"},
    }
    cfg = fake_model_config(versions=versions)
    cfg["models"]["m"]["primary"] = "1"
    cfg["models"]["m"]["routing"] = {"kind": "header"}
    return runtime_from_dict(cfg)


def test_a_not_ready_version_named_by_a_header_is_counted_under_its_label() -> None:
    rt = header_runtime()

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with async_app_client(rt) as client:
            body = v2_body(1.0, "r")
            responses = [
                await client.post(
                    "/v2/models/m/infer", json=body, headers={"x-infercore-variant": "2"}
                ),
                await client.post("/v2/models/m/versions/2/infer", json=body),
                # An unknown version named by a header: 404, never a label of its own.
                await client.post(
                    "/v2/models/m/infer", json=body, headers={"x-infercore-variant": "zz9"}
                ),
            ]
            return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [503, 503, 404]
    failures = "infercore_request_failures_total"
    assert metric_value(text, failures, model="m", version="2", reason="model_not_ready") == 2
    assert metric_value(text, failures, model="m", version="", reason="model_not_ready") == 0
    assert metric_value(text, failures, model="m", version="", reason="model_not_found") == 1
    assert 'version="zz9"' not in text


def test_the_runtime_names_the_not_ready_version_a_header_chose() -> None:
    from infercore.errors import ModelNotFound, ModelNotReady
    from infercore.runtime.errors import VersionNotReady

    rt = header_runtime()

    async def scenario() -> None:
        await rt.start()
        try:
            served = rt.models["m"]
            x = {"x": np.zeros((1, 4), np.float32)}
            with pytest.raises(VersionNotReady) as info:
                served.pick(None, {"x-infercore-variant": "2"}, "r", x)
            assert info.value.version == "2"
            assert isinstance(info.value, ModelNotReady)  # same status, reason and body
            assert info.value.status_code == 503 and info.value.reason == "model_not_ready"
            with pytest.raises(VersionNotReady) as info:
                served.pick("2", {}, "r", x)
            assert info.value.version == "2"
            with pytest.raises(ModelNotFound):
                served.pick(None, {"x-infercore-variant": "zz9"}, "r", x)
        finally:
            await rt.stop()

    asyncio.run(scenario())


def run(rt: Any, scenario: Any) -> Any:
    async def main() -> Any:
        await rt.start()
        try:
            return await scenario(rt)
        finally:
            await rt.stop()

    return asyncio.run(main())


# -- shadow copies behind none ----------------------------------------------------------------


def test_shadow_copies_behind_none_are_one_call_each_and_run_once() -> None:
    versions = {
        "1": {"loader": {"kind": "fake"}},
        "2": {"loader": {"kind": "fake", "fail_on_value": 3.0}, "stage": "shadow"},
    }
    model = {"versions": versions, "primary": "1", "routing": {"kind": "shadow", "workers": 1}}
    rt = runtime_from_dict({"batching": {"kind": "none"}, "models": {"m": model}})

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int]]:
        served = rt.models["m"]
        target = (served.versions["2"],)
        # Offered without yielding: all five wait together when the worker wakes up (behind a
        # batcher that batches they would be one submission, re-run copy by copy on failure).
        for i in range(1, 6):
            x = np.full((1, 4), float(i), np.float32)
            served.shadow.offer(target, {"x": x}, {"x": x}, None, {"y": x.sum(axis=1)})
        for _ in range(500):  # bounded wait for the copies to settle (not a timing check)
            stats = served.shadow.stats.get("2")
            if stats is not None and sum(stats.outcomes.values()) >= 5:
                break
            await asyncio.sleep(0.01)
        return dict(served.shadow.stats["2"].outcomes), served.versions["2"].model.batches

    outcomes, batches = run(rt, scenario)
    assert outcomes == {"ok": 4, "error": 1, "timeout": 0, "dropped": 0}
    assert batches == [1, 1, 1, 1, 1]  # one call per copy, none of them twice


# -- the InfercoreModelNotReady alert -------------------------------------------------------


_TERM = re.compile(
    r"max by \(model, version\) \((infercore_[a-z_]+)(?:\{(\w+)=~\"([^\"]+)\"\})?\) == (\d+)"
)


def alerting(expr: str, text: str) -> set[tuple[str, str]]:
    """The (model, version) pairs for which ``expr`` holds on one scrape ``text``.

    ``expr`` is the rule's: terms ``max by (model, version) (METRIC{label=~"re"}) == N``
    joined by ``and on (model, version)``; anything else fails the test (the rule changed
    shape: teach this evaluator, or check the rule by hand).
    """
    families = {f.name: f for f in text_string_to_metric_families(text)}
    result: set[tuple[str, str]] | None = None
    terms = [t.strip() for t in expr.strip().split("and on (model, version)")]
    for term in terms:
        m = _TERM.fullmatch(term)
        assert m is not None, f"unexpected term in the rule: {term!r}"
        name, label, pattern, wanted = m.groups()
        peak: dict[tuple[str, str], float] = {}
        for sample in families[name.removesuffix("_total")].samples:
            if label is not None and not re.fullmatch(pattern, sample.labels[label]):
                continue
            key = (sample.labels["model"], sample.labels["version"])
            peak[key] = max(peak.get(key, float("-inf")), sample.value)
        holds = {k for k, v in peak.items() if v == float(wanted)}
        result = holds if result is None else result & holds
    return result or set()


def not_ready_rule() -> str:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "InfercoreModelNotReady":
                return str(rule["expr"])
    raise AssertionError("InfercoreModelNotReady is gone from the rules")


def test_model_not_ready_alerts_only_for_versions_meant_to_serve() -> None:
    versions = {
        "1": {"loader": {"kind": "fake"}},
        "2": {"loader": {"kind": "fake"}, "stage": "candidate"},  # unloaded below
        "3": {"loader": {"kind": "fake", "fail_load": True}, "stage": "shadow"},
    }
    model = {"versions": versions, "primary": "1", "routing": {"kind": "shadow"}}
    rt = runtime_from_dict({"batching": {"kind": "none"}, "models": {"m": model}})
    expr = not_ready_rule()

    async def scenario(rt: Any) -> tuple[str, str]:
        before = rt.metrics.exposition().decode()
        await rt.unload("m", "2")
        return before, rt.metrics.exposition().decode()

    before, after = run(rt, scenario)
    # The shadow that failed to load is meant to take (copied) traffic: it alerts throughout.
    assert alerting(expr, before) == {("m", "3")}
    # Version 2, unloaded on purpose, keeps a 0 readiness series but does not alert.
    assert 'infercore_model_ready{model="m",version="2"} 0.0' in after
    assert alerting(expr, after) == {("m", "3")}
