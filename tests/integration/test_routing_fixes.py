"""Routing fixes: a sticky key field that the model does not take, A/B arms checked against
the model's versions, canary regions that stay put, and the path of an empty routing block.

``FakeModel`` answers ``y = sum(x) + offset``; the offset tells versions apart (version 1: 0,
version 2: 100, version 3: 200).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.builtins.routers import sticky_share
from infercore.components import Model, RouteRequest
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl
from infercore.runtime.regions import CanaryRegions
from infercore.server.admin import create_admin_app
from infercore.testing import FakeModel, async_app_client, runtime_from_dict

TOKEN = "t0ken-for-tests-0123456789"


def fake(offset: float = 0.0) -> dict[str, Any]:
    return {"kind": "fake", "offset": offset}


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def model(routing: dict[str, Any], versions: dict[str, Any]) -> dict[str, Any]:
    # Routing is under test, not the canary guard: its latency bound could trip on a loaded
    # machine once a 50 % canary has its 50 requests, and take the canary's weight mid-test.
    return {"primary": "1", "routing": routing, "versions": versions, "rollout": {"guard": None}}


# -- a router's key field is routing input, not a model input ------------------------------


def test_a_key_field_the_model_does_not_take_routes_and_is_not_an_unknown_input() -> None:
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "features": {"kind": "request", "assemble": {"x": ["a", "b", "c", "d"]}},
            "models": {
                "m": model(
                    {"kind": "ab", "arms": {"control": "1", "treatment": "2"}, "key_field": "u"},
                    {
                        "1": {"loader": fake(0)},
                        "2": {"loader": fake(100), "stage": "canary", "weight": 50},
                    },
                )
            },
        }
    )

    async def scenario() -> tuple[dict[str, set[float]], int]:
        seen: dict[str, set[float]] = {}
        async with async_app_client(rt) as c:
            for _ in range(2):
                for i in range(60):
                    instance = {"a": 1, "b": 2, "c": 3, "d": 4, "u": f"user{i}"}
                    r = await c.post("/v1/models/m:predict", json={"instances": [instance]})
                    assert r.status_code == 200, r.text
                    seen.setdefault(f"user{i}", set()).add(r.json()["predictions"][0]["y"] - 10)
            # Any other field the model does not take is still a 400.
            bad = {"a": 1, "b": 2, "c": 3, "d": 4, "u": "x", "typo": 1}
            r = await c.post("/v1/models/m:predict", json={"instances": [bad]})
            return seen, r.status_code

    seen, bad_status = asyncio.run(scenario())
    assert all(len(offsets) == 1 for offsets in seen.values()), seen
    treated = sum(offsets == {100.0} for offsets in seen.values())
    assert 0 < treated < 60 and within_binomial(treated, 60, 0.5)
    assert bad_status == 400


def test_a_v2_key_input_reaches_only_a_model_that_takes_it() -> None:
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "models": {
                "m": model(
                    {"kind": "weighted", "key_field": "user"},
                    {
                        "1": {"loader": fake(0)},
                        "2": {"loader": fake(100), "stage": "canary", "weight": 50},
                    },
                )
            },
        }
    )

    def body(user: str) -> dict[str, Any]:
        return {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "user", "shape": [1], "datatype": "BYTES", "data": [user]},
            ]
        }

    async def scenario() -> dict[str, set[str]]:
        versions: dict[str, set[str]] = {}
        async with async_app_client(rt) as c:
            for _ in range(2):
                for i in range(40):
                    r = await c.post("/v2/models/m/infer", json=body(f"k{i}"))
                    assert r.status_code == 200, r.text
                    versions.setdefault(f"k{i}", set()).add(r.json()["model_version"])
        return versions

    versions = asyncio.run(scenario())
    assert all(len(v) == 1 for v in versions.values()), versions
    assert set().union(*versions.values()) == {"1", "2"}


# -- A/B arms are checked against the model's versions -------------------------------------


def test_an_arm_naming_a_version_the_model_does_not_have_is_a_config_error() -> None:
    data = {
        "batching": {"kind": "none"},
        "models": {
            "m": model(
                {"kind": "ab", "arms": {"control": "1", "treatment": "9"}, "key_header": "x-u"},
                {"1": {"loader": fake(0)}, "2": {"loader": fake(100)}},
            )
        },
    }
    with pytest.raises(ConfigError) as err:
        runtime_from_dict(data)
    message = str(err.value)
    assert message.startswith("models.m.routing.arms.treatment: version '9'"), message


def test_an_arm_on_a_version_without_traffic_is_warned_about_not_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = {
        "batching": {"kind": "none"},
        "models": {
            "m": model(
                {
                    "kind": "header",
                    "inner": {
                        "kind": "ab",
                        "arms": {"control": "1", "challenger": "2", "treatment": "3"},
                        "key_header": "x-u",
                    },
                },
                {
                    "1": {"loader": fake(0)},
                    "2": {"loader": fake(100), "stage": "canary", "weight": 30},
                    "3": {"loader": fake(200)},
                },
            )
        },
    }
    with caplog.at_level(logging.WARNING):
        runtime_from_dict(data)
    warned = [r.getMessage() for r in caplog.records if "arms.treatment" in r.getMessage()]
    assert len(warned) == 1, caplog.records
    assert "models.m.routing.inner.arms.treatment: version '3' is candidate" in warned[0]


def test_the_admin_api_refuses_a_weight_for_a_canary_in_no_arm() -> None:
    """The arms share the experiment's subjects: a weight that would send some to version 3,
    in no arm, is a 409 naming the arms and the fix, and changes nothing."""
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "models": {
                "m": model(
                    {"kind": "ab", "arms": {"control": "1", "treatment": "2"}, "key_header": "x"},
                    {
                        "1": {"loader": fake(0)},
                        "2": {"loader": fake(100), "stage": "canary", "weight": 50},
                        "3": {"loader": fake(200)},
                    },
                )
            },
        }
    )

    async def scenario() -> tuple[list[httpx.Response], dict[str, Any], dict[str, Any], set[str]]:
        await rt.start()
        try:
            admin = httpx.ASGITransport(app=create_admin_app(rt, TOKEN))
            async with httpx.AsyncClient(
                transport=admin,
                base_url="http://admin",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as a:
                before = (await a.get("/admin/models/m")).json()
                promote = "/admin/models/m/versions/3/promote"
                refused = [
                    await a.post(promote, json={"to": "canary", "weight": 10, "by": "ann"}),
                ]
                ok = await a.post(promote, json={"to": "canary", "by": "ann"})
                assert ok.status_code == 200, ok.text
                refused.append(
                    await a.put(
                        "/admin/models/m/weights",
                        json={"weights": {"1": 40, "2": 50, "3": 10}, "by": "ann"},
                    )
                )
                after = (await a.get("/admin/models/m")).json()
            served = rt.models["m"]
            seen = {
                served.router.route(RouteRequest({"x": f"u{i}"}, "rid"), served.table)
                for i in range(200)
            }
            return refused, before, after, seen
        finally:
            await rt.stop()

    refused, before, after, seen = asyncio.run(scenario())
    for r in refused:
        assert r.status_code == 409, r.text
        doc = r.json()
        assert doc["reason"] == "conflict"
        assert "version '3' is in no arm of its router" in doc["error"], doc
        assert "control: '1', treatment: '2'" in doc["error"], doc
        assert "give '3' weight 0" in r.text, doc
    weights = {v["version"]: v.get("weight") or 0 for v in after["versions"]}
    assert weights == {v["version"]: v.get("weight") or 0 for v in before["versions"]}
    assert seen == {"1", "2"}


# -- a canary's sticky keys stay while its own weight stays put ---------------------------


def test_raising_one_canarys_weight_keeps_the_other_canarys_keys() -> None:
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "models": {
                "m": model(
                    {"kind": "weighted", "key_header": "x-user"},
                    {
                        "1": {"loader": fake(0)},
                        "2": {"loader": fake(100), "stage": "canary", "weight": 10},
                        "3": {"loader": fake(200), "stage": "canary", "weight": 10},
                    },
                )
            },
        }
    )
    keys = [f"user{i}" for i in range(4000)]

    def assign() -> dict[str, str]:
        served = rt.models["m"]
        return {
            k: served.router.route(RouteRequest({"x-user": k}, "rid"), served.table) for k in keys
        }

    async def scenario() -> list[dict[str, str]]:
        async with async_app_client(rt):
            seen = [assign()]
            for weights in ({"1": 70, "2": 10, "3": 20}, {"1": 40, "2": 40, "3": 20}):
                rt.set_weights("m", weights)
                seen.append(assign())
            rt.set_weights("m", {"1": 80, "2": 0, "3": 20})
            seen.append(assign())
            return seen

    first, more3, more2, no2 = asyncio.run(scenario())
    n = len(keys)
    for seen, shares in (
        (first, {"2": 0.1, "3": 0.1}),
        (more3, {"2": 0.1, "3": 0.2}),
        (more2, {"2": 0.4, "3": 0.2}),
        (no2, {"2": 0.0, "3": 0.2}),
    ):
        for version, share in shares.items():
            count = sum(v == version for v in seen.values())
            assert within_binomial(count, n, share), (version, count, share)
    # v3 grew: v2's keys (weight unchanged) and v3's own keys stay put.
    assert all(more3[k] == "2" for k in keys if first[k] == "2")
    assert all(more3[k] == "3" for k in keys if first[k] == "3")
    # v2 grew: v3's keys (unchanged) and v2's own stay put.
    assert all(more2[k] == "3" for k in keys if more3[k] == "3")
    assert all(more2[k] == "2" for k in keys if more3[k] == "2")
    # v2 dropped to 0: v3's keys stay put, v2's go to the primary.
    assert all(no2[k] == "3" for k in keys if more2[k] == "3")
    assert all(no2[k] == "1" for k in keys if more2[k] == "2")


weight_maps = st.dictionaries(
    st.sampled_from(["2", "3", "4"]), st.integers(min_value=0, max_value=33), max_size=3
)


@settings(max_examples=200, deadline=None)
@given(st.lists(weight_maps, min_size=1, max_size=8))
def test_canary_regions_hold_their_weights_and_keep_keys_that_stay_or_grow(
    steps: list[dict[str, int]],
) -> None:
    regions = CanaryRegions()
    shares = [sticky_share(b"m", str(i).encode()) for i in range(300)]
    before: dict[str, float] = {}
    owner: list[str] = ["1"] * len(shares)
    for weights in steps:
        regions.update({v: float(w) for v, w in weights.items()})
        split = regions.split("1", {"2", "3", "4"})
        measure = {v: sum(hi - lo for lo, hi in regions.held(v)) for v in ("2", "3", "4")}
        for v in ("2", "3", "4"):
            assert math.isclose(measure[v], weights.get(v, 0), abs_tol=1e-6), (v, measure)
        held = sorted(iv for v in ("2", "3", "4") for iv in regions.held(v))
        assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(held)), held
        now = [_choose(split, s) for s in shares]
        for was, is_now in zip(owner, now, strict=True):
            if was != "1" and weights.get(was, 0) >= before.get(was, 0):
                assert is_now == was, (was, is_now, before, weights)
        owner, before = now, {v: float(w) for v, w in weights.items()}


def _choose(split: tuple[tuple[str, float], ...], share: float) -> str:
    for version, bound in split:
        if share < bound:
            return version
    return "1"


def test_a_wrapping_router_reports_its_inner_routers_key_field() -> None:
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "models": {
                "m": model(
                    {"kind": "header", "inner": {"kind": "weighted", "key_field": "user"}},
                    {"1": {"loader": fake(0)}},
                )
            },
        }
    )
    assert rt.models["m"].router.key_fields == frozenset({"user"})


# -- config paths -------------------------------------------------------------------------


def test_an_empty_model_routing_block_is_reported_at_its_own_path() -> None:
    data = {
        "batching": {"kind": "none"},
        "models": {"m": {"primary": "1", "routing": {}, "versions": {"1": {"loader": fake()}}}},
    }
    with pytest.raises(ConfigError) as err:
        runtime_from_dict(data)
    assert str(err.value).startswith("models.m.routing.kind"), str(err.value)


# -- the split reported is the split in effect ----------------------------------------------


def test_a_canary_that_failed_to_load_leaves_its_share_to_the_primary_in_describe() -> None:
    rt = runtime_from_dict(
        {
            "batching": {"kind": "none"},
            "models": {
                "m": model(
                    {"kind": "weighted"},
                    {
                        "1": {"loader": fake(0)},
                        "2": {"loader": fake(100), "stage": "canary", "weight": 50},
                        "4": {
                            "loader": {**fake(300), "fail_warmup": True},
                            "stage": "canary",
                            "weight": 20,
                        },
                    },
                )
            },
        }
    )

    async def scenario() -> dict[str, Any]:
        async with async_app_client(rt):
            doc: dict[str, Any] = rt.models["m"].describe()
            return doc

    doc = asyncio.run(scenario())
    by_version = {v["version"]: v for v in doc["versions"]}
    assert by_version["4"]["state"] == "failed"
    assert doc["primary_weight"] == 50.0
    assert (by_version["2"]["weight"], by_version["2"]["routed_weight"]) == (50.0, 50.0)
    assert (by_version["4"]["weight"], by_version["4"]["routed_weight"]) == (20.0, 0.0)


def test_models_list_shows_a_canary_s_routed_share_when_it_differs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infercore.admin_client import _print_models

    doc = {
        "name": "m",
        "primary_weight": 50.0,
        "versions": [
            {"version": "1", "stage": "primary", "state": "ready"},
            {
                "version": "3",
                "stage": "canary",
                "weight": 30.0,
                "routed_weight": 30.0,
                "state": "ready",
            },
            {
                "version": "4",
                "stage": "canary",
                "weight": 20.0,
                "routed_weight": 0.0,
                "state": "failed",
            },
        ],
    }
    _print_models([doc])
    lines = capsys.readouterr().out.splitlines()
    assert "50%" in lines[1]
    assert "30%" in lines[2] and "routed" not in lines[2]
    assert "20% (0% routed)" in lines[3]


# -- at start-up, a version takes its traffic once it is ready -------------------------------


class _GatedModel(FakeModel):
    """A fake model whose load waits until the test opens the gate."""

    kind = "gated"
    gate: asyncio.Event | None = None

    async def start(self) -> None:
        assert _GatedModel.gate is not None
        await _GatedModel.gate.wait()
        await super().start()


class _GatedPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [_GatedModel]


def test_a_slow_version_does_not_hold_the_canary_split_or_the_shadow_at_start_up() -> None:
    # Before: the routing table was built once every version had loaded, so a slow candidate
    # kept the ready canary at 0 % (and shadows without copies) while `models list` said 50 %.
    versions = {
        "1": {"loader": fake()},
        "2": {"loader": fake(1.0), "stage": "canary", "weight": 50},
        "3": {"loader": fake(2.0), "stage": "shadow"},
        "9": {"loader": {"kind": "gated"}, "stage": "candidate"},
    }
    routing = {"kind": "shadow", "fraction": 1.0, "inner": {"kind": "weighted"}}
    cfg = {"models": {"m": model(routing, versions)}}
    runtime = runtime_from_dict(cfg, extra_plugins=[("gated", _GatedPlugin())])

    async def scenario() -> tuple[set[str], tuple[str, ...], bool]:
        _GatedModel.gate = asyncio.Event()
        starting = asyncio.create_task(runtime.start())
        served = runtime.models["m"]
        async with asyncio.timeout(10):
            while not all(served.versions[v].ready for v in ("1", "2", "3")):
                await asyncio.sleep(0.01)
        table = served.table
        split = {version for version, _ in table.split}
        shadows, nine_ready = table.shadows, served.versions["9"].ready
        _GatedModel.gate.set()
        await starting
        await runtime.stop()
        return split, shadows, nine_ready

    split, shadows, nine_ready = asyncio.run(scenario())
    assert not nine_ready  # still loading when the table was read
    assert split == {"1", "2"}
    assert shadows == ("3",)
