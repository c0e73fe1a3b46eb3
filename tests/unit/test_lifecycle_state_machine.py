"""A hypothesis state machine over the rollout lifecycle of one model.

Random sequences of load, unload, promote, set weights, approve, reject, rollback and infer;
after every step: exactly one primary, no traffic to a version that is not ready, readiness
(the V2 endpoints) equals the state, the metrics equal the state, and a refused call changed
nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from infercore.errors import InfercoreError
from infercore.server import create_app
from infercore.testing import runtime_from_dict

VERSIONS = ("1", "2", "3", "4", "5")
STAGES = ("candidate", "shadow", "canary", "primary", "retired")
OFFSETS = {"1": 0.0, "2": 100.0, "3": 200.0, "4": 300.0, "5": 400.0}


def config() -> dict[str, Any]:
    versions: dict[str, Any] = {
        v: {"loader": {"kind": "fake", "offset": OFFSETS[v]}} for v in VERSIONS[:4]
    }
    versions["2"]["stage"] = "shadow"
    # Version 5 never loads (its artifact is broken); every load of it must change nothing.
    versions["5"] = {"loader": {"kind": "fake", "offset": 400.0, "fail_load": True}}
    return {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": versions,
                "routing": {
                    "kind": "header",
                    "inner": {"kind": "shadow", "inner": {"kind": "weighted"}},
                },
                "rollout": {"approvals": ["canary"], "guard": None},
            }
        },
    }


BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def snapshot(rt: Any) -> Any:
    served = rt.models["m"]
    return (
        served.primary,
        list(served.previous),
        {v: (sv.stage, sv.weight, sv.state) for v, sv in served.versions.items()},
        {a.id: a.status for a in rt.lifecycle.approvals.values()},
    )


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rt = runtime_from_dict(config())
        self.app = create_app(self.rt, manage_runtime=False)
        self.loop.run_until_complete(self.rt.start())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://t"
        )

    def teardown(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.rt.stop())
        self.loop.close()

    # -- helpers ------------------------------------------------------------------------

    def call(self, make: Any) -> Any:
        """Run a lifecycle call; a refused one must leave everything as it was."""
        before = snapshot(self.rt)
        try:
            return self.loop.run_until_complete(make())
        except InfercoreError as exc:
            assert 400 <= exc.status_code < 500, exc
            assert snapshot(self.rt) == before, exc
            return None

    @property
    def served(self) -> Any:
        return self.rt.models["m"]

    def routes(self) -> dict[str, float]:
        """route_requests_total per version (any role)."""
        out = dict.fromkeys(VERSIONS, 0.0)
        for family in self.rt.metrics.route_requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["version"]] += sample.value
        return out

    def samples(self, *families: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for metric in families:
            for family in metric.collect():
                for sample in family.samples:
                    out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    # -- rules --------------------------------------------------------------------------

    @rule(version=st.sampled_from(VERSIONS))
    def load(self, version: str) -> None:
        self.call(lambda: self.rt.lifecycle.load("m", version, by="prop"))
        if version == "5":
            assert not self.served.versions["5"].ready

    @rule(version=st.sampled_from(VERSIONS))
    def unload(self, version: str) -> None:
        was_primary = version == self.served.primary
        result = self.call(lambda: self.rt.lifecycle.unload("m", version, by="prop"))
        assert (result is None) == was_primary
        if result is not None:
            assert self.served.versions[version].state == "unloaded"

    @rule(
        version=st.sampled_from(VERSIONS),
        to=st.sampled_from(STAGES),
        weight=st.sampled_from([None, 0, 10, 50, 100, 150]),
    )
    def promote(self, version: str, to: str, weight: int | None) -> None:
        result = self.call(
            lambda: self.rt.lifecycle.promote("m", version, to, weight=weight, by="prop")
        )
        event(f"promote: {result['status'] if result else 'refused'}")
        if result is not None and result["status"] == "applied":
            assert self.served.versions[version].stage == to
            if to == "primary":
                assert self.served.primary == version

    @rule(
        split=st.dictionaries(
            st.sampled_from(VERSIONS), st.sampled_from([0, 10, 25, 50, 75, 90, 100]), max_size=3
        )
    )
    def set_weights(self, split: dict[str, int]) -> None:
        result = self.call(
            lambda: self.rt.lifecycle.set_weights("m", dict(split), by="prop")  # type: ignore[arg-type]
        )
        event(f"weights: {'set' if result else 'refused'}")
        if result is not None:
            assert sum(split.values()) == 100

    @rule(version=st.sampled_from(VERSIONS[1:4]), weight=st.sampled_from([10, 30, 60]))
    def canary_with_approval(self, version: str, weight: int) -> None:
        """A common path, made likely: load, ask for canary, a person approves."""
        self.call(lambda: self.rt.lifecycle.load("m", version, by="prop"))
        result = self.call(
            lambda: self.rt.lifecycle.promote("m", version, "canary", weight=weight, by="prop")
        )
        if result is not None and result["status"] == "pending":
            approval = result["approval"]["id"]
            done = self.call(lambda: self.rt.lifecycle.approve(approval, by="person"))
            event(f"canary: {'live' if done else 'refused'}")
        self.infer(12, None)

    @precondition(
        lambda self: any(a.status == "pending" for a in self.rt.lifecycle.approvals.values())
    )
    @rule(data=st.data(), accept=st.booleans())
    def decide(self, data: st.DataObject, accept: bool) -> None:
        pending = sorted(
            a.id for a in self.rt.lifecycle.approvals.values() if a.status == "pending"
        )
        approval = data.draw(st.sampled_from(pending))
        lifecycle = self.rt.lifecycle
        act = lifecycle.approve if accept else lifecycle.reject
        event(f"decide: {'done' if self.call(lambda: act(approval, by='person')) else 'refused'}")
        # Deciding twice is always refused.
        status = lifecycle.approvals[approval].status
        if status != "pending":
            assert self.call(lambda: act(approval, by="person")) is None
            assert lifecycle.approvals[approval].status == status

    @rule()
    def rollback(self) -> None:
        target = self.rt.previous_primary("m")
        result = self.call(lambda: self.rt.lifecycle.rollback("m", by="prop"))
        event(f"rollback: {'done' if result else 'refused'}")
        if result is not None and target is not None:
            assert self.served.primary == target

    @rule(n=st.integers(min_value=1, max_value=12), pinned=st.sampled_from((None, *VERSIONS)))
    def infer(self, n: int, pinned: str | None) -> None:
        before = self.routes()
        table = self.served.table
        routable = {v for v, _ in table.split} or {table.primary}

        async def go() -> list[httpx.Response]:
            out = []
            for _ in range(n):
                path = (
                    "/v2/models/m/infer"
                    if pinned is None
                    else f"/v2/models/m/versions/{pinned}/infer"
                )
                out.append(await self.client.post(path, json=BODY))
            return out

        responses = self.loop.run_until_complete(go())
        event(f"infer: {len(routable)} routable")
        for r in responses:
            if pinned is not None and not self.served.versions[pinned].ready:
                assert r.status_code == 503 and r.json()["reason"] == "model_not_ready"
                continue
            assert r.status_code == 200, r.text
            version = r.json()["model_version"]
            assert self.served.versions[version].ready
            if pinned is None:
                assert version in routable
                assert r.json()["outputs"][0]["data"] == [10.0 + OFFSETS[version]]
        after = self.routes()
        for v in VERSIONS:
            if not self.served.versions[v].ready:
                assert after[v] == before[v], (v, before, after)
        assert sum(after.values()) - sum(before.values()) == sum(
            r.status_code == 200 for r in responses
        )

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def exactly_one_primary(self) -> None:
        primaries = [v for v, sv in self.served.versions.items() if sv.stage == "primary"]
        assert primaries == [self.served.primary]
        assert self.served.versions[self.served.primary].ready  # never unloaded, never failed

    @invariant()
    def only_ready_versions_are_routed(self) -> None:
        served = self.served
        table = served.table
        ready = {v for v, sv in served.versions.items() if sv.ready}
        assert table.ready == ready
        assert {v for v, _ in table.split} <= ready
        assert set(table.shadows) == {v for v in ready if served.versions[v].stage == "shadow"}
        canaries = sum(sv.weight for sv in served.versions.values() if sv.stage == "canary")
        assert canaries <= 100
        for sv in served.versions.values():
            assert sv.stage == "canary" or sv.weight == 0
        live = [
            v
            for v, sv in served.versions.items()
            if sv.stage == "canary" and sv.weight > 0 and sv.ready
        ]
        # A canary's region may be in pieces (it grew into free space on both sides of
        # another's), so it can appear more than once: its slices add up to its weight.
        shares: dict[str, float] = {}
        at = 0.0
        for v, bound in table.split:
            top = min(bound, 100.0)
            shares[v] = shares.get(v, 0.0) + top - at
            at = top
        assert {v for v in shares if v != served.primary} == set(live)
        for v in live:
            assert shares[v] == pytest.approx(served.versions[v].weight), (v, table.split)

    @invariant()
    def readiness_equals_the_state(self) -> None:
        async def go() -> dict[str, int]:
            codes = {}
            for v in VERSIONS:
                codes[v] = (await self.client.get(f"/v2/models/m/versions/{v}/ready")).status_code
            codes["model"] = (await self.client.get("/v2/models/m/ready")).status_code
            codes["server"] = (await self.client.get("/v2/health/ready")).status_code
            return codes

        codes = self.loop.run_until_complete(go())
        for v in VERSIONS:
            assert codes[v] == (200 if self.served.versions[v].ready else 503), (v, codes)
        assert codes["model"] == codes["server"] == 200

    @invariant()
    def metrics_equal_the_state(self) -> None:
        m = self.rt.metrics
        got = self.samples(m.model_ready, m.model_stage, m.canary_weight, m.approvals_pending)

        def value(name: str, **labels: str) -> float | None:
            return got.get((name, frozenset({"model": "m", **labels}.items())))

        for v, sv in self.served.versions.items():
            assert value("infercore_model_ready", version=v) == (1 if sv.ready else 0)
            for stage in STAGES:
                found = value("infercore_model_stage", version=v, stage=stage)
                assert found == (1 if sv.stage == stage else 0), (v, stage, found)
            weight = value("infercore_canary_weight", version=v)
            assert weight == (sv.weight if sv.stage == "canary" else 0)
        pending = sum(a.status == "pending" for a in self.rt.lifecycle.approvals.values())
        assert (value("infercore_approvals_pending") or 0) == pending


Lifecycle.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycle = Lifecycle.TestCase
