"""A served model and its versions: load state, rollout stage, and the routing table.

Every change to a version (loaded, unloaded, moved to another stage, given a weight) ends with
:meth:`ServedModel.refresh`, which builds a new :class:`~infercore.components.RoutingTable` and
swaps it in with one assignment: a router never sees a half-made change, and a version that is
not ready is never in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from infercore.components import (
    Batcher,
    FeatureSource,
    Model,
    Router,
    RouteRequest,
    RoutingTable,
    TensorSpec,
)
from infercore.config.rollout import GuardConfig
from infercore.config.schema import ModelConfig, OutputMapping
from infercore.errors import ConfigError, ModelNotFound
from infercore.metrics import Metrics, VersionMetrics
from infercore.runtime.errors import Conflict, VersionNotReady, quoted
from infercore.runtime.grouping import RequestGroups
from infercore.runtime.guard import Window
from infercore.runtime.inputs import names_hint
from infercore.runtime.outputs import OutputPlan
from infercore.runtime.regions import CanaryRegions
from infercore.runtime.repository import Repository
from infercore.runtime.shadow import ShadowRunner

if TYPE_CHECKING:
    from infercore.drift import DriftMonitor

Array = npt.NDArray[Any]

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"
UNLOADING, UNLOADED = "unloading", "unloaded"

CANDIDATE, SHADOW, CANARY, PRIMARY, RETIRED = "candidate", "shadow", "canary", "primary", "retired"
STAGES = (CANDIDATE, SHADOW, CANARY, PRIMARY, RETIRED)

Node = dict[str, Any]
Event = dict[str, Any]


@dataclass(slots=True)
class ServedVersion:
    """One loaded (or loading) version of a model."""

    name: str
    version: str
    model: Model
    batcher: Batcher
    metrics: VersionMetrics
    warmup: bool
    state: str = LOADING
    error: str | None = None
    #: Why it failed to load, when that was a config error (exit 2 at start-up, not 1).
    config_error: ConfigError | None = None
    #: Why a reload was refused rather than failed (a changed signature: 409, not 422).
    refusal: Conflict | None = None
    outputs_plan: OutputPlan | None = None
    #: The model's input names, known once it has loaded.
    input_names: frozenset[str] = frozenset()
    #: The router's key fields this model does not take: they route, and never reach it.
    route_only: frozenset[str] = frozenset()
    #: What a request may carry, for the hint of a refused input (the model's feature source's
    #: ``request_fields``), bound once it has loaded so the request path looks nothing up.
    request_fields: Callable[[Sequence[str]], Sequence[str]] | None = None
    #: Its model's ``batchable``, bound once it has loaded: whether a request's batched inputs
    #: must share their first dimension.
    batchable: bool = True
    #: Its rollout stage and, for a canary, its share of routed traffic in percent.
    stage: str = CANDIDATE
    weight: float = 0.0
    #: The loader node it was built from (a reload builds it again), and that node's path.
    node: Node = field(default_factory=dict)
    path: str = ""
    #: ``recipe`` or ``repository``.
    origin: str = "recipe"
    #: The version's own output mapping (``None``: the model's).
    outputs_config: dict[str, OutputMapping] | None = None
    #: Why the latest load at run time failed (the version kept serving as before).
    last_load_error: str | None = None
    #: Requests (and shadow copies) inside the pipeline right now; unload waits for 0.
    active: int = 0
    window: Window | None = None
    route_requests: Any = None
    route_errors: Any = None
    route_duration: Any = None
    route_role: str = ""
    #: Its request groups (``None``: each request runs alone), set when it loads.
    groups: RequestGroups | None = None
    _idle: asyncio.Event | None = None

    @property
    def output_specs(self) -> list[TensorSpec]:
        """The outputs clients see: the recipe's mapping, or the model's own outputs."""
        if self.outputs_plan is not None:
            return list(self.outputs_plan.specs)
        return self.model.outputs

    @property
    def ready(self) -> bool:
        return self.state == READY

    def names_hint(self) -> str:
        """What a request to this version carries, for an error hint (never per request)."""
        return names_hint(self.model.inputs, self.request_fields)

    @property
    def default_input(self) -> str | None:
        """The input a V1 instance of plain values fills (a model with one input)."""
        specs = self.model.inputs
        return specs[0].name if len(specs) == 1 else None

    @property
    def full(self) -> bool:
        """Whether a request for this version would now be answered 503 ``queue_full``.

        With request groups, the requests inside them count against the queue bound (the
        batcher sees a group as one request), and the batcher's own ``full`` holds too (the
        work ahead outlasts 80 % of its queue timeout, say: ``reject_expected_timeouts``);
        without, the batcher's alone.
        """
        groups = self.groups
        if groups is not None:
            return groups.full
        return self.batcher.full

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active <= 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is inside this version; ``False`` when ``timeout_s`` passed."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while self.active > 0:
            self._idle = asyncio.Event()
            left = until - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except TimeoutError:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "stage": self.stage,
            "state": self.state,
            "ready": self.ready,
            "origin": self.origin,
        }
        if self.stage == CANARY:
            doc["weight"] = self.weight
        if self.error:
            doc["error"] = self.error
        if self.last_load_error:
            doc["last_load_error"] = self.last_load_error
        return doc


@dataclass(slots=True)
class ServedModel:
    """A model with its versions, feature source and router."""

    name: str
    config: ModelConfig
    features: FeatureSource
    router: Router
    versions: dict[str, ServedVersion]
    primary: str
    metrics: Metrics | None = None
    shadow: ShadowRunner | None = None
    repository: Repository | None = None
    guard: GuardConfig | None = None
    #: The drift monitor of the model's inputs, when the recipe configures one.
    drift: DriftMonitor | None = None
    #: Primaries before the current one, latest last (rollback target).
    previous: list[str] = field(default_factory=list)
    table: RoutingTable = field(init=False)
    #: Each canary's region of the sticky hash space (stable while its weight stays put).
    regions: CanaryRegions = field(init=False, default_factory=CanaryRegions)
    #: A canary takes traffic and the guard is on: versions record into their windows.
    guarding: bool = field(init=False, default=False)
    next_guard_check: float = 0.0
    #: When the guard last judged (a failing canary is judged at once, this far apart).
    guard_checked_at: float = float("-inf")
    _lock: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the routing table (and the stage metrics) after a version changed."""
        versions = self.versions
        ready = frozenset(v for v, sv in versions.items() if sv.ready)
        split: tuple[tuple[str, float], ...] = ()
        if self.router.splits_traffic:
            # Canaries that are not ready keep their region (routed to the primary meanwhile),
            # so that their keys come back to them when they are ready again.
            regions = self.regions
            regions.update(
                {v: sv.weight for v, sv in versions.items() if sv.stage == CANARY and sv.weight > 0}
            )
            split = regions.split(self.primary, ready)
        shadows: tuple[str, ...] = ()
        if self.shadow is not None:
            shadows = tuple(
                sorted(v for v, sv in versions.items() if sv.stage == SHADOW and sv.ready)
            )
        stages = MappingProxyType({v: sv.stage for v, sv in versions.items()})
        self.table = RoutingTable(self.primary, ready, split, shadows, stages)
        self.guarding = self.guard is not None and any(v != self.primary for v, _ in split)
        if self.metrics is not None:
            self._publish(self.metrics)

    def _publish(self, metrics: Metrics) -> None:
        for v, sv in self.versions.items():
            metrics.model_ready.labels(self.name, v).set(1 if sv.ready else 0)
            for stage in STAGES:
                metrics.model_stage.labels(self.name, v, stage).set(1 if sv.stage == stage else 0)
            metrics.canary_weight.labels(self.name, v).set(sv.weight if sv.stage == CANARY else 0)
            if sv.route_role != sv.stage or sv.route_requests is None:
                labels = (self.name, v, self.router.variant(v), sv.stage)
                sv.route_requests = metrics.route_requests.labels(*labels)
                sv.route_errors = metrics.route_errors.labels(*labels)
                sv.route_duration = metrics.route_duration.labels(*labels)
                sv.route_role = sv.stage

    @property
    def ready(self) -> bool:
        return self.primary in self.table.ready

    @property
    def lock(self) -> asyncio.Lock:
        """Serializes run-time changes (loads, unloads) of this model."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def version(self, version: str) -> ServedVersion:
        served = self.versions.get(version)
        if served is None:
            raise ModelNotFound(
                f"model {self.name!r} has no version {quoted(version)}",
                hint=f"versions: {', '.join(self.versions)}",
            )
        return served

    def full_version(self, version: str | None, headers: Mapping[str, str]) -> ServedVersion | None:
        """The version a request is turned away by (503 ``queue_full``) from its headers alone.

        ``version`` (asked for in the URL) when it is ready and full. For a routed request,
        when every version the router may choose (:meth:`Router.candidates`; every ready
        version when it cannot tell) is ready and full: the primary if it is one of them.
        ``None``: the request may be admitted, or the request path decides.
        """
        versions = self.versions
        if version is not None:
            sv = versions.get(version)
            return sv if sv is not None and sv.ready and sv.full else None
        table = self.table
        names = self.router.candidates(headers, table)
        if names is None:
            names = table.ready
        found: ServedVersion | None = None
        for name in names:
            sv = versions.get(name)
            if sv is None or not sv.ready or not sv.full:
                return None
            if found is None or name == table.primary:
                found = sv
        return found

    def pick(
        self,
        version: str | None,
        headers: Mapping[str, str],
        request_id: str,
        fields: Mapping[str, Array] | None = None,
    ) -> ServedVersion:
        """The version that serves a request: the asked one, or the router's choice.

        Raises:
            ModelNotFound: The version (asked for, or named by a header) is unknown.
            VersionNotReady: It is not ready; a version that is not ready never takes traffic.
        """
        if version is None:
            request = (
                RouteRequest(headers, request_id)
                if fields is None
                else RouteRequest(headers, request_id, fields)
            )
            version = self.router.route(request, self.table)
        served = self.versions.get(version)
        if served is None:
            raise ModelNotFound(
                f"model {self.name!r} has no version {quoted(version)}",
                hint=f"versions: {', '.join(self.versions)}",
            )
        if not served.ready:
            raise VersionNotReady(
                f"model {self.name!r} version {version!r} is not ready", version=version
            )
        served.route_requests.inc()
        return served

    def pick_v1(
        self,
        version: str | None,
        headers: Mapping[str, str],
        request_id: str,
        decode: Callable[[ServedVersion], dict[str, Array]],
    ) -> tuple[ServedVersion, dict[str, Array]]:
        """Pick a version for a body whose decoding depends on it (V1's default input name, and
        the names its errors hint at).

        Readiness comes first (a model that is not ready is a 503 whatever the body). A
        router that routes by request fields sees the fields decoded for the primary.
        """
        if version is not None or not self.router.uses_fields:
            sv = self.pick(version, headers, request_id)
            return sv, decode(sv)
        first = self.versions[self.primary]
        if not first.ready:
            raise VersionNotReady(
                f"model {self.name!r} version {self.primary!r} is not ready", version=self.primary
            )
        fields = decode(first)
        sv = self.pick(None, headers, request_id, fields)
        if sv is not first and sv.default_input != first.default_input:
            fields = decode(sv)
        return sv, fields

    def routed_shares(self) -> dict[str, float]:
        """Each version's share of routed traffic (percent) in the table in effect.

        A canary that is not ready takes none of its weight: the primary serves it.
        """
        split = self.table.split
        if not split:
            return {self.primary: 100.0}
        shares: dict[str, float] = {}
        low = 0.0
        for version, bound in split:
            high = min(bound, 100.0)
            shares[version] = shares.get(version, 0.0) + high - low
            low = high
        return shares

    def describe(self) -> dict[str, Any]:
        shares = self.routed_shares()
        docs = [sv.describe() for sv in self.versions.values()]
        for doc in docs:
            if doc["stage"] == CANARY:
                doc["routed_weight"] = round(shares.get(doc["version"], 0.0), 6)
        return {
            "name": self.name,
            "primary": self.primary,
            "ready": self.ready,
            "router": self.router.kind,
            # The share actually routed to the primary (canaries not ready leave theirs to it).
            "primary_weight": round(shares.get(self.primary, 0.0), 6),
            "previous_primaries": list(self.previous),
            "versions": docs,
        }
