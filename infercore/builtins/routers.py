"""Built-in routers: ``single``, ``weighted``, ``ab``, ``header`` and ``shadow``.

Every router reads the model's :class:`~infercore.components.RoutingTable`: which versions are
ready, the traffic split (the primary and the canaries' weights, changed at run time through
the admin API) and the shadow versions. A version that is not ready is never in the split, so
it gets no routed traffic whatever the weights say.

``header`` and ``shadow`` wrap another router (``inner``), so they compose::

    routing:
      kind: header            # X-Infercore-Variant: 2 -> version 2 (testing in production)
      inner:
        kind: shadow          # copy primary traffic to shadow versions, off the request path
        fraction: 0.5
        inner: {kind: weighted, key_field: card_id}   # canary split, sticky per card
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping
from typing import Annotated, Any

import msgspec

from infercore.components import (
    Router,
    RouteRequest,
    RoutingTable,
    ShadowPolicy,
    WrappingRouter,
)
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl

Node = dict[str, Any]
_SCALE = 100.0 / 2**64
#: Longest header value taken as a version name (a longer one cannot name a version).
_MAX_VARIANT = 64

#: An HTTP header name (RFC 9110 token): an empty or impossible one would never be seen, and
#: the router would silently route at random, or never honour its override header.
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", max_length=128)]
#: A request field's name.
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def sticky_share(salt: bytes, key: bytes) -> float:
    """A number in ``[0, 100)`` fixed by ``key``: the same in every process and run.

    (``hash()`` of a str is salted per process, so it would move users between variants on
    every restart.)
    """
    digest = hashlib.blake2b(salt + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big") * _SCALE


class SingleRouter(Router):
    """Routes every request to ``table.primary``."""

    kind = "single"

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        return table.primary

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> tuple[str, ...]:
        return (table.primary,)


class WeightedRouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``routing: {kind: weighted}``.

    Attributes:
        key_field: Sticky assignment by this request field (e.g. ``card_id``): a key keeps its
            version while the weights stay put, and stays on the canary when its weight grows.
        key_header: Sticky by this header when the field is absent (e.g. ``x-user-id``).
        salt: Mixed into the key's hash (default: the model name), to reshuffle assignments.
    """

    key_field: FieldName | None = None
    key_header: HeaderName | None = None
    salt: str | None = None


class WeightedCanaryRouter(Router):
    """Splits routed traffic between the primary and its canaries by their weights.

    Random per request, or sticky by a hash of a request key. A request without the key is
    routed at random.
    """

    kind = "weighted"
    Config = WeightedRouterConfig
    config: WeightedRouterConfig

    def __init__(self, config: WeightedRouterConfig, context: Any) -> None:
        super().__init__(config, context)
        self._field = config.key_field
        self._header = config.key_header.lower() if config.key_header else None
        self._sticky = self._field is not None or self._header is not None
        self._salt = (config.salt or context.model_name or "").encode()
        self._random = random.Random()

    @property
    def splits_traffic(self) -> bool:
        return True

    @property
    def uses_fields(self) -> bool:
        return self._field is not None

    @property
    def key_fields(self) -> frozenset[str]:
        return frozenset(() if self._field is None else (self._field,))

    def share(self, request: RouteRequest) -> float:
        if self._sticky:
            key = request.key(self._field, self._header)
            if key is not None:
                return sticky_share(self._salt, key)
        return self._random.random() * 100.0

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        if not table.split:
            return table.primary
        return table.choose(self.share(request))

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> tuple[str, ...]:
        # Sticky keys may be in the body: any slice of the split (an A/B router's too).
        if not table.split:
            return (table.primary,)
        return tuple(version for version, _ in table.split)


class ABRouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``routing: {kind: ab}``.

    Attributes:
        arms: Arm name -> version, e.g. ``{control: "1", treatment: "2"}``. Metrics label each
            version's requests with its arm's name (``variant``).
        key_field: The request field that assigns a subject to an arm (e.g. ``user_id``).
        key_header: The header used when the field is absent.
        salt: Mixed into the hash; change it to start a new experiment with fresh assignments.
    """

    arms: dict[str, str]
    key_field: FieldName | None = None
    key_header: HeaderName | None = None
    salt: str | None = None


class ABRouter(WeightedCanaryRouter):
    """Named arms with sticky assignment, for experiments.

    Arms are versions in the traffic split (the primary and canaries; the weights set the
    arms' shares). Assignment is always sticky; a request without the key goes to the primary
    (the control arm), so an experiment never mixes anonymous traffic into a treatment arm.
    Nor a version nobody named: a canary in no arm takes no weight (a config error at
    start-up, a 409 from the admin API).
    """

    kind = "ab"
    Config = ABRouterConfig  # type: ignore[assignment]
    config: ABRouterConfig  # type: ignore[assignment]

    def __init__(self, config: ABRouterConfig, context: Any) -> None:
        if config.key_field is None and config.key_header is None:
            raise ConfigError(
                f"{context.path}: an A/B router needs key_field or key_header",
                hint="e.g. key_field: user_id (assignment is sticky per key)",
            )
        if not config.arms:
            raise ConfigError(f"{context.path}.arms: name at least one arm")
        names: dict[str, str] = {}
        for arm, version in config.arms.items():
            if version in names:
                raise ConfigError(
                    f"{context.path}.arms: version {version!r} is in two arms "
                    f"({names[version]!r} and {arm!r})"
                )
            names[version] = arm
        weighted = WeightedRouterConfig(
            key_field=config.key_field, key_header=config.key_header, salt=config.salt
        )
        super().__init__(weighted, context)
        self.config = config
        self._arms = names

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        if not table.split:
            return table.primary
        key = request.key(self._field, self._header)
        if key is None:
            return table.primary
        return table.choose(sticky_share(self._salt, key))

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> tuple[str, ...]:
        # A request without the key goes to the primary, even with no slice of the split.
        split = super().candidates(headers, table)
        return split if table.primary in split else (table.primary, *split)

    def variant(self, version: str) -> str:
        return self._arms.get(version, version)

    def named_versions(self) -> Mapping[str, str]:
        path = self.context.path
        return {f"{path}.arms.{arm}": version for arm, version in self.config.arms.items()}


class HeaderRouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``routing: {kind: header}``.

    Attributes:
        header: The header naming a version.
        inner: The router for requests without the header.
    """

    header: HeaderName = "x-infercore-variant"
    inner: Node = msgspec.field(default_factory=lambda: {"kind": "single"})


class HeaderRouter(WrappingRouter):
    """``X-Infercore-Variant: 2`` sends the request to version 2 (for testing in production).

    A named version that is unknown or not ready is answered 404 / 503 like a versioned
    request, never silently served by another version. Requests forced this way are not
    copied to shadows. Requests without the header go to the inner router.
    """

    kind = "header"
    Config = HeaderRouterConfig
    config: HeaderRouterConfig

    def __init__(self, config: HeaderRouterConfig, context: Any) -> None:
        super().__init__(config, context)
        self._header = config.header.lower()

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        wanted = request.headers.get(self._header)
        if wanted:
            return wanted[:_MAX_VARIANT]
        return self.inner.route(request, table)

    def mirror(self, request: RouteRequest, table: RoutingTable) -> tuple[str, ...]:
        if request.headers.get(self._header):
            return ()
        return self.inner.mirror(request, table)

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> Collection[str] | None:
        wanted = headers.get(self._header)
        if wanted:
            return (wanted[:_MAX_VARIANT],)
        return self.inner.candidates(headers, table)

    def forced(self, headers: Mapping[str, str]) -> bool:
        return bool(headers.get(self._header)) or self.inner.forced(headers)


Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]


class ShadowRouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``routing: {kind: shadow}``.

    Attributes:
        fraction: Share of the primary's requests copied to each shadow version.
        queue_size: Copies waiting at most; when full, a copy is dropped (counted).
        workers: Copies running at once (bounds the threads a hanging shadow can hold).
        timeout_ms: A copy taking longer is abandoned (counted as ``timeout``).
        atol: Absolute tolerance when comparing float outputs with the primary's.
        rtol: Relative tolerance when comparing float outputs.
        compare: Outputs to compare (default: every output both versions return).
        max_loop_busy: Copies wait while the event loop was busy more than this share of the
            last 50 ms (the shadow yields to the requests; under saturation its queue fills
            and drops, counted ``dropped``). 1.0 runs copies whatever the load.
        batch_delay_ms: How long a copy may wait for others to run with it, as one model
            call and one comparison (a full batch goes at once). Nobody waits for a copy, and
            under steady traffic copies then share calls instead of each costing one.
        inner: The router that picks the version answering the caller.
    """

    fraction: Fraction = 1.0
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 256
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    timeout_ms: Annotated[float, msgspec.Meta(gt=0)] = 1000.0
    atol: Annotated[float, msgspec.Meta(ge=0)] = 1e-6
    rtol: Annotated[float, msgspec.Meta(ge=0)] = 1e-4
    compare: list[str] = msgspec.field(default_factory=list)
    max_loop_busy: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    batch_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 10.0
    inner: Node = msgspec.field(default_factory=lambda: {"kind": "single"})


class ShadowRouter(WrappingRouter):
    """Copies a fraction of the primary's requests to every shadow version, off the path.

    The caller's response is the primary's, unchanged and not delayed: copies run after it
    is computed, from a bounded queue, and their outcomes and agreement with the primary are
    only counted (``infercore_shadow_requests_total``, ``infercore_shadow_rows_total``).
    Copies wait while the event loop is busier than ``max_loop_busy``, so that the shadow
    uses only the time the requests leave.
    """

    kind = "shadow"
    Config = ShadowRouterConfig
    config: ShadowRouterConfig

    def __init__(self, config: ShadowRouterConfig, context: Any) -> None:
        super().__init__(config, context)
        self._fraction = config.fraction
        self._random = random.Random()
        self._policy = ShadowPolicy(
            queue_size=config.queue_size,
            workers=config.workers,
            timeout_s=config.timeout_ms / 1000,
            atol=config.atol,
            rtol=config.rtol,
            compare=tuple(config.compare),
            max_loop_busy=config.max_loop_busy,
            batch_delay_s=config.batch_delay_ms / 1000,
        )

    def mirror(self, request: RouteRequest, table: RoutingTable) -> tuple[str, ...]:
        fraction = self._fraction
        if fraction >= 1.0 or (fraction > 0.0 and self._random.random() < fraction):
            return table.shadows
        return ()

    def shadow_policy(self) -> ShadowPolicy:
        return self._policy


@hookimpl
def register_routers() -> list[type[Router]]:
    return [SingleRouter, WeightedCanaryRouter, ABRouter, HeaderRouter, ShadowRouter]
