"""The built-in routers: split proportions, sticky keys, A/B arms, header override, shadows.

Proportions are checked against the binomial distribution: with ``n`` requests and share
``p`` the count stays within 5 standard deviations (a false failure about once in 1.7 million
runs).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.builtins.routers import (
    ABRouter,
    ABRouterConfig,
    HeaderRouter,
    HeaderRouterConfig,
    ShadowRouter,
    ShadowRouterConfig,
    SingleRouter,
    WeightedCanaryRouter,
    WeightedRouterConfig,
    sticky_share,
)
from infercore.components import ComponentContext, EmptyConfig, RouteRequest, RoutingTable
from infercore.errors import ConfigError

CTX = ComponentContext("routing", model_root=Path("."), model_name="m")


def table(
    primary: str = "1", canaries: dict[str, float] | None = None, shadows: tuple[str, ...] = ()
) -> RoutingTable:
    """A table like ServedModel.refresh() builds: primary first, then canaries."""
    canaries = canaries or {}
    entries: list[tuple[str, float]] = []
    acc = 100.0 - sum(canaries.values())
    if acc > 0:
        entries.append((primary, acc))
    for version, weight in sorted(canaries.items()):
        acc += weight
        entries.append((version, acc))
    if entries:
        entries[-1] = (entries[-1][0], math.inf)
    split = tuple(entries) if canaries else ()
    ready = frozenset({primary, *canaries, *shadows})
    return RoutingTable(primary, ready, split, shadows, MappingProxyType({}))


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= sigmas * sd + 1


def weighted(**options: Any) -> WeightedCanaryRouter:
    return WeightedCanaryRouter(WeightedRouterConfig(**options), CTX)


def card(card_id: str) -> RouteRequest:
    return RouteRequest({}, "rid", {"card_id": np.array([card_id], dtype=object)})


def test_table_choose_slices_the_split() -> None:
    t = table(canaries={"2": 10.0})
    assert t.choose(0.0) == "1"
    assert t.choose(89.999) == "1"
    assert t.choose(90.0) == "2"
    assert t.choose(99.9999) == "2"
    assert t.choose(100.0) == "2"  # past the end: the last slice
    assert table().choose(50.0) == "1"  # no split: the primary


def test_single_router_ignores_canaries() -> None:
    r = SingleRouter(EmptyConfig(), CTX)
    t = table(canaries={"2": 50.0})
    assert {r.route(RouteRequest({}, str(i)), t) for i in range(200)} == {"1"}
    assert not r.splits_traffic


@pytest.mark.parametrize("weight", [1.0, 10.0, 50.0, 90.0])
def test_weighted_random_share_is_within_binomial_tolerance(weight: float) -> None:
    r = weighted()
    t = table(canaries={"2": weight})
    n = 20_000
    hits = sum(r.route(RouteRequest({}, ""), t) == "2" for _ in range(n))
    assert within_binomial(hits, n, weight / 100), (hits, n * weight / 100)


def test_two_canaries_split_three_ways() -> None:
    r = weighted()
    t = table(canaries={"2": 20.0, "3": 5.0})
    n = 20_000
    counts = {"1": 0, "2": 0, "3": 0}
    for _ in range(n):
        counts[r.route(RouteRequest({}, ""), t)] += 1
    for version, p in (("1", 0.75), ("2", 0.20), ("3", 0.05)):
        assert within_binomial(counts[version], n, p), counts


def test_sticky_assignment_is_stable_per_key_and_across_router_instances() -> None:
    t = table(canaries={"2": 30.0})
    a, b = weighted(key_field="card_id"), weighted(key_field="card_id")
    cards = [f"c_{i:06d}" for i in range(3000)]
    first = {c: a.route(card(c), t) for c in cards}
    for _ in range(3):
        assert {c: a.route(card(c), t) for c in cards} == first
    assert {c: b.route(card(c), t) for c in cards} == first
    share = sum(v == "2" for v in first.values())
    assert within_binomial(share, len(cards), 0.30), share


def test_sticky_hash_does_not_depend_on_the_process() -> None:
    # A fixed value: Python's str hash is salted per process; this one must not be.
    assert sticky_share(b"m", b"c_000042") == pytest.approx(sticky_share(b"m", b"c_000042"))
    assert 0 <= sticky_share(b"m", b"c_000042") < 100
    assert sticky_share(b"m", b"c_000042") != sticky_share(b"other", b"c_000042")


def test_growing_a_canary_keeps_its_keys_on_it() -> None:
    r = weighted(key_field="card_id")
    cards = [f"c_{i:06d}" for i in range(2000)]
    small = {c for c in cards if r.route(card(c), table(canaries={"2": 10.0})) == "2"}
    large = {c for c in cards if r.route(card(c), table(canaries={"2": 40.0})) == "2"}
    assert small and small <= large
    assert within_binomial(len(large), len(cards), 0.40)


def test_sticky_key_from_a_header_and_random_without_a_key() -> None:
    r = weighted(key_field="card_id", key_header="X-User")
    t = table(canaries={"2": 50.0})
    by_header = {r.route(RouteRequest({"x-user": "alice"}, ""), t) for _ in range(50)}
    assert len(by_header) == 1
    anonymous = {r.route(RouteRequest({}, ""), t) for _ in range(200)}
    assert anonymous == {"1", "2"}  # random: both, with overwhelming probability


def test_a_multi_row_request_is_routed_by_its_first_row() -> None:
    r = weighted(key_field="card_id")
    t = table(canaries={"2": 50.0})
    rows = RouteRequest({}, "", {"card_id": np.array(["c_000001", "c_000002"], dtype=object)})
    assert r.route(rows, t) == r.route(card("c_000001"), t)


def test_field_key_reads_bytes_strings_and_numbers() -> None:
    fields = {
        "b": np.array([b"k1"], dtype=object),
        "s": np.array(["k1"]),
        "n": np.array([[7.0, 8.0]], dtype=np.float32),
        "empty": np.zeros((0,), dtype=np.float32),
    }
    req = RouteRequest({}, "", fields)
    assert req.field_key("b") == b"k1"
    assert req.field_key("s") == b"k1"
    assert req.field_key("n") == b"7.0"
    assert req.field_key("empty") is None
    assert req.field_key("missing") is None


def test_ab_router_needs_a_key_and_names_its_arms() -> None:
    with pytest.raises(ConfigError, match="key_field or key_header"):
        ABRouter(ABRouterConfig(arms={"control": "1"}), CTX)
    with pytest.raises(ConfigError, match="two arms"):
        ABRouter(ABRouterConfig(arms={"a": "1", "b": "1"}, key_field="user"), CTX)
    r = ABRouter(ABRouterConfig(arms={"control": "1", "treatment": "2"}, key_field="user"), CTX)
    assert r.variant("1") == "control" and r.variant("2") == "treatment"
    assert r.variant("3") == "3"
    t = table(canaries={"2": 50.0})
    users = [f"u{i}" for i in range(4000)]
    arms = {
        u: r.route(RouteRequest({}, "", {"user": np.array([u], dtype=object)}), t) for u in users
    }
    assert within_binomial(sum(v == "2" for v in arms.values()), len(users), 0.5)
    # Anonymous traffic stays in the control arm (the primary).
    assert {r.route(RouteRequest({}, ""), t) for _ in range(100)} == {"1"}


def test_header_router_overrides_and_otherwise_defers() -> None:
    r = HeaderRouter(HeaderRouterConfig(), CTX)
    r.inner = weighted()
    t = table(canaries={"2": 50.0}, shadows=("3",))
    assert r.route(RouteRequest({"x-infercore-variant": "3"}, ""), t) == "3"
    # An unknown or not-ready version comes back as asked: the caller gets 404 / 503.
    assert r.route(RouteRequest({"x-infercore-variant": "9"}, ""), t) == "9"
    assert len(r.route(RouteRequest({"x-infercore-variant": "x" * 5000}, ""), t)) == 64
    assert {r.route(RouteRequest({}, ""), t) for _ in range(200)} == {"1", "2"}
    assert r.splits_traffic  # delegated
    assert r.variant("2") == "2"


def test_shadow_router_mirrors_a_fraction_and_composes() -> None:
    r = ShadowRouter(ShadowRouterConfig(fraction=0.25), CTX)
    r.inner = SingleRouter(EmptyConfig(), CTX)
    t = table(shadows=("2", "3"))
    n = 20_000
    mirrored = sum(bool(r.mirror(RouteRequest({}, ""), t)) for _ in range(n))
    assert within_binomial(mirrored, n, 0.25), mirrored
    assert r.mirror(RouteRequest({}, ""), table()) == ()  # no shadows
    assert ShadowRouter(ShadowRouterConfig(fraction=1.0), CTX).mirror(RouteRequest({}, ""), t) == (
        "2",
        "3",
    )
    assert ShadowRouter(ShadowRouterConfig(fraction=0.0), CTX).mirror(RouteRequest({}, ""), t) == ()
    policy = r.shadow_policy()
    assert policy.queue_size == 256 and policy.timeout_s == 1.0
    assert r.route(RouteRequest({}, ""), t) == "1"


def test_header_override_is_not_mirrored() -> None:
    header = HeaderRouter(HeaderRouterConfig(), CTX)
    shadow = ShadowRouter(ShadowRouterConfig(fraction=1.0), CTX)
    shadow.inner = SingleRouter(EmptyConfig(), CTX)
    header.inner = shadow
    t = table(shadows=("2",))
    assert header.mirror(RouteRequest({"x-infercore-variant": "1"}, ""), t) == ()
    assert header.mirror(RouteRequest({}, ""), t) == ("2",)
    assert header.shadow_policy() is shadow.shadow_policy()


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=3),
    share=st.floats(min_value=0, max_value=100, exclude_max=True),
)
def test_any_share_lands_on_a_version_in_the_split(weights: list[int], share: float) -> None:
    canaries = {str(i + 2): float(w) for i, w in enumerate(weights) if w > 0}
    t = table(canaries=canaries)
    chosen = t.choose(share)
    assert chosen in {"1", *canaries}
    if not canaries:
        assert chosen == "1"


def test_a_canary_at_100_percent_takes_every_request() -> None:
    t = table(canaries={"2": 100.0})
    assert t.split == (("2", math.inf),)
    assert {weighted().route(RouteRequest({}, ""), t) for _ in range(100)} == {"2"}
    assert weighted(key_field="card_id").route(card("c_000001"), t) == "2"
    ab = ABRouter(ABRouterConfig(arms={"a": "1", "b": "2"}, key_field="card_id"), CTX)
    assert ab.route(card("c_000001"), t) == "2"


def _composed(kind: str) -> Any:
    """Each built-in router, and the fraud recipe's stack (header -> shadow -> weighted)."""
    if kind == "single":
        return SingleRouter(EmptyConfig(), CTX)
    if kind == "weighted":
        return weighted(key_field="user", key_header="x-user")
    if kind == "ab":
        return ABRouter(ABRouterConfig(arms={"c": "1", "t": "2"}, key_field="user"), CTX)
    header = HeaderRouter(HeaderRouterConfig(), CTX)
    shadow = ShadowRouter(ShadowRouterConfig(fraction=1.0), CTX)
    shadow.inner = weighted(key_field="user")
    header.inner = shadow
    return header


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["single", "weighted", "ab", "stack"]),
    weights=st.lists(st.integers(min_value=0, max_value=50), min_size=0, max_size=3),
    user=st.one_of(st.none(), st.text(max_size=8)),
    header_user=st.one_of(st.none(), st.text(alphabet="abc", min_size=1, max_size=4)),
    variant=st.one_of(st.none(), st.sampled_from(["1", "2", "3", "9"])),
)
def test_a_router_only_ever_routes_to_one_of_its_candidates(
    kind: str,
    weights: list[int],
    user: str | None,
    header_user: str | None,
    variant: str | None,
) -> None:
    # What reject_before_body relies on: the headers alone bound where a request can go.
    r = _composed(kind)
    t = table(canaries={str(i + 2): w for i, w in enumerate(weights) if w}, shadows=("9",))
    headers = {}
    if header_user is not None:
        headers["x-user"] = header_user
    if variant is not None:
        headers["x-infercore-variant"] = variant
    fields = {} if user is None else {"user": np.array([user], dtype=object)}
    candidates = r.candidates(headers, t)
    assert candidates is not None and len(candidates) >= 1
    for _ in range(5):  # random shares too
        assert r.route(RouteRequest(headers, "rid", fields), t) in candidates


def test_without_canaries_a_weighted_router_has_one_candidate() -> None:
    assert weighted().candidates({}, table()) == ("1",)
    assert weighted().candidates({}, table(canaries={"2": 10.0})) == ("1", "2")
    # A canary at 100 %: the primary takes nothing.
    assert weighted().candidates({}, table(canaries={"2": 100.0})) == ("2",)


@pytest.mark.parametrize(
    ("routing", "path"),
    [
        ({"kind": "weighted", "key_header": ""}, "key_header"),
        ({"kind": "weighted", "key_header": "x user"}, "key_header"),
        ({"kind": "weighted", "key_field": ""}, "key_field"),
        ({"kind": "ab", "arms": {"control": "1"}, "key_header": "x:user"}, "key_header"),
        ({"kind": "header", "header": ""}, "header"),
    ],
)
def test_header_and_field_names_that_could_never_match_are_config_errors(
    routing: dict[str, Any], path: str
) -> None:
    # Accepted, key_header "" routed at random instead of sticky, and header "" silently
    # turned the X-Infercore-Variant override off.
    from infercore.testing import fake_model_config, runtime_from_dict

    config = fake_model_config()
    config["models"]["m"]["routing"] = routing
    with pytest.raises(ConfigError, match=rf"models\.m\.routing\.{path}"):
        runtime_from_dict(config)
