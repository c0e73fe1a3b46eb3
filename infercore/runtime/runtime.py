"""The runtime: models, their versions and components, built from a validated config.

A model has several versions loaded at once. Each version has a load state (``loading``,
``ready``, ``failed``, ``unloading``, ``unloaded``, ``stopped``) and a stage in its rollout
(``candidate``, ``shadow``, ``canary`` with a weight, ``primary``, ``retired``). Every change
builds a new :class:`~infercore.components.RoutingTable` and swaps it in with one assignment;
a version that is not ready is never in it, so it gets no routed traffic.

Run-time changes (:meth:`Runtime.load`, :meth:`Runtime.unload`, :meth:`Runtime.set_stage`,
:meth:`Runtime.set_weights`, :meth:`Runtime.rollback`) validate everything before changing
anything: a refused or failed call leaves the model serving exactly as before. A reload builds
a fresh instance beside the serving one, loads and warms it, swaps it in, then drains and
stops the old one, so no request is dropped. The fresh instance must have the serving one's
signature (a new signature is a new version), and its artifact is checked against the digest
the recipe or the model's repository manifest pins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from infercore.components import (
    Batcher,
    ComponentContext,
    FeatureSource,
    Model,
    Router,
    RouteRequest,
    RoutingTable,
    Tensors,
    WrappingRouter,
)
from infercore.components.features import degraded_parts
from infercore.components.routing import describe_named
from infercore.config.compose import Composed
from infercore.config.schema import VERSION_RE, ModelConfig
from infercore.errors import (
    ConfigError,
    FeatureStoreUnavailable,
    InfercoreError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    PluginError,
    ShuttingDown,
)
from infercore.metrics import Metrics
from infercore.plugin_manager import PluginInfo, make_plugin_manager
from infercore.redaction import redact_text
from infercore.registry import Registry
from infercore.runtime.errors import Conflict, LoadFailed, SignatureChanged, quoted
from infercore.runtime.grouping import (
    DEFAULT_GROUP_ROWS,
    DEFAULT_GROUP_WAITING,
    RequestGroups,
    RunAlone,
    batcher_option,
)
from infercore.runtime.guard import Verdict, Window, judge, latency_bound, may_trip
from infercore.runtime.inputs import prepare_inputs
from infercore.runtime.outputs import plan_outputs
from infercore.runtime.repository import (
    COMPANIONS_OPTION,
    REFUSED_LOADS,
    Repository,
    UnsafePath,
    check_template,
    companion_digests,
)
from infercore.runtime.served import (
    CANARY,
    CANDIDATE,
    FAILED,
    PRIMARY,
    READY,
    RETIRED,
    SHADOW,
    STAGES,
    STOPPED,
    UNLOADED,
    UNLOADING,
    Event,
    Node,
    ServedModel,
    ServedVersion,
)
from infercore.runtime.shadow import ShadowRunner
from infercore.runtime.signature import describe_changes, signature_changes

if TYPE_CHECKING:
    from infercore.lifecycle import Lifecycle

Array = npt.NDArray[Any]

log = logging.getLogger("infercore.runtime")

__all__ = [
    "CANARY",
    "CANDIDATE",
    "PRIMARY",
    "RETIRED",
    "SHADOW",
    "STAGES",
    "Event",
    "Runtime",
    "ServedModel",
    "ServedVersion",
]

#: Previous primaries remembered for rollback.
_HISTORY = 16
#: A canary's failure is judged at once, at most this often: when the primary fails too, the
#: guard does not trip and each canary error would otherwise pay for a full judgement.
_GUARD_ON_ERROR_S = 0.05
#: 503s that say nothing about the version: a server stopping, a feature store every version
#: shares. Counted in the version's metrics; never evidence for the guard. (A full queue or a
#: queue timeout is: a canary that hangs answers nothing else once its first batch is stuck.)
_NOT_RUN = (ShuttingDown, FeatureStoreUnavailable)
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def default_primary(versions: Mapping[str, Any]) -> str:
    """The primary of a model whose recipe names none: its only (or highest) version."""

    def key(v: str) -> tuple[int, int | str]:
        return (0, int(v)) if v.isdigit() else (1, v)

    return sorted(versions, key=key)[-1]


class Runtime:
    """Everything a served config needs, built (and validated) in ``__init__``.

    ``__init__`` resolves every component against the registry, so a config error surfaces
    before any model loads; :meth:`start` loads and warms the models; :meth:`stop` releases
    everything in reverse order.
    """

    def __init__(
        self,
        composed: Composed,
        *,
        extra_plugins: list[tuple[str, object]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.composed = composed
        self.config = composed.config
        self.pm, self.plugins = make_plugin_manager(extra_plugins)
        self.registry = Registry(self.pm)
        for name, kinds in self.registry.kinds_by_plugin().items():
            if name in self.plugins:
                self.plugins[name].kinds = kinds
        self.metrics = metrics or Metrics()
        #: Set by :meth:`stop`: requests are refused (503 shutting_down).
        self.draining = False
        #: Set by :meth:`begin_shutdown` when a stop signal arrives: model state changes (load,
        #: unload, stages, weights, rollback) are refused while requests are still served.
        self.frozen = False
        self.started = False
        self.models: dict[str, ServedModel] = {}
        #: Called with every rollout event (loads, stage changes, guard trips).
        self.listeners: list[Callable[[Event], None]] = []
        self._lifecycle: Lifecycle | None = None
        self._batching: dict[str, tuple[Node, str]] = {}
        #: Model name -> the guard's latency bound at its last judgement (guard.latency_bound):
        #: what a timeout against a client's own deadline must have outlasted to count.
        self._guard_bounds: dict[str, float] = {}
        model_root = composed.model_root
        label = composed.label
        # Components may register their own metric families on the app's registry; batchers
        # check their waits against the request deadline.
        self._shared = {
            "metrics_registry": self.metrics.registry,
            "request_timeout_ms": self.config.server.request_timeout_ms,
        }
        cfg = self.config
        for name, mc in cfg.models.items():
            base = f"models.{name}"
            features_node = mc.features if mc.features is not None else cfg.features
            routing_node = mc.routing if mc.routing is not None else cfg.routing
            batching_node = mc.batching if mc.batching is not None else cfg.batching
            self._batching[name] = (
                batching_node,
                f"{base}.batching" if mc.batching else "batching",
            )
            features = self.registry.build(
                "feature_source",
                features_node,
                ComponentContext(
                    f"{base}.features" if mc.features else "features",
                    model_root,
                    model_name=name,
                    extra=dict(self._shared),
                ),
                label=label,
            )
            router = self._build_router(
                routing_node,
                ComponentContext(
                    f"{base}.routing" if mc.routing is not None else "routing",
                    model_root,
                    model_name=name,
                    extra=dict(self._shared),
                ),
                label,
            )
            primary = mc.primary or default_primary(mc.versions)
            repository = None
            if mc.repository is not None:
                repository = self._check_repository(name, mc, model_root, label)
            versions: dict[str, ServedVersion] = {}
            for version, vc in mc.versions.items():
                vpath = f"{base}.versions.{version}"
                node = self._pinned(name, repository, vc.loader, f"{vpath}.loader", warn=True)
                sv = self._build_version(
                    name, version, node, vc.warmup, f"{vpath}.loader", recipe_node=vc.loader
                )
                self._check_stage(name, version, vc.stage, vc.weight, primary, router, vpath)
                sv.stage = PRIMARY if version == primary else vc.stage
                sv.weight = vc.weight
                sv.outputs_config = vc.outputs
                versions[version] = sv
            self._check_named_versions(name, mc, router, versions)
            total = sum(sv.weight for sv in versions.values())
            if total > 100:
                raise ConfigError(
                    f"{base}.versions: canary weights add up to {total:g}; at most 100",
                    hint="the primary takes what the canaries leave",
                )
            assert isinstance(features, FeatureSource)
            policy = router.shadow_policy()
            shadow = None
            if policy is not None:
                shadow = ShadowRunner(name, policy, self.metrics, self._prepare, self._record)
            guard = mc.rollout.guard
            if guard is not None:
                for sv in versions.values():
                    sv.window = Window(guard.window_s)
            self.models[name] = ServedModel(
                name,
                mc,
                features,
                router,
                versions,
                primary,
                metrics=self.metrics,
                shadow=shadow,
                repository=repository,
                guard=guard,
            )
            if mc.drift is not None:
                from infercore.drift import DriftMonitor

                served_model = self.models[name]
                served_model.drift = DriftMonitor.build(
                    self.registry,
                    mc.drift,
                    model=name,
                    model_root=model_root,
                    path=f"{base}.drift",
                    metrics=self.metrics,
                    version=lambda m=served_model: m.primary,  # type: ignore[misc]
                    label=label,
                    extra=self._shared,
                )

    # -- building -------------------------------------------------------------------------

    def _build_router(
        self, node: Any, context: ComponentContext, label: str, depth: int = 0
    ) -> Router:
        if depth > 8:
            raise ConfigError(f"{context.path}: routers nested too deeply")
        router = self.registry.build("router", node, context, label=label)
        assert isinstance(router, Router)
        if isinstance(router, WrappingRouter):
            inner = getattr(router.config, "inner", None)
            if not isinstance(inner, Mapping):
                raise ConfigError(f"{context.path}.inner: expected a router node {{kind: ...}}")
            inner_context = dataclasses.replace(context, path=f"{context.path}.inner")
            router.inner = self._build_router(inner, inner_context, label, depth + 1)
        return router

    def _check_named_versions(
        self, name: str, mc: ModelConfig, router: Router, versions: Mapping[str, ServedVersion]
    ) -> None:
        """A version the router names (an A/B arm) must be one the model can have.

        One not in the recipe is a config error, unless the model has a repository (the admin
        API may load it from there later). One that takes no routed traffic now (neither the
        primary nor a canary) is only warned about: stages change at run time. A canary the
        recipe gives a weight must be in one of them (:meth:`_check_weighted_canaries_named`).
        """
        named = router.named_versions()
        for path, version in named.items():
            sv = versions.get(version)
            if sv is None:
                if mc.repository is None:
                    raise ConfigError(
                        f"{path}: version {version!r} is not one of models.{name}.versions "
                        f"({', '.join(versions)})",
                        hint="name a version the recipe lists",
                    )
                log.warning(
                    "%s: version %r is not in the recipe; it gets traffic once loaded from the "
                    "repository and made the primary or a canary",
                    path,
                    version,
                )
            elif sv.stage not in (PRIMARY, CANARY):
                log.warning(
                    "%s: version %r is %s: the traffic split gives it nothing until it is the "
                    "primary or a canary with a weight (a router that picks it by name, as "
                    "`header` does, still reaches it)",
                    path,
                    version,
                    sv.stage,
                )
        self._check_weighted_canaries_named(name, router, named, versions)

    @staticmethod
    def _check_weighted_canaries_named(
        name: str,
        router: Router,
        named: Mapping[str, str],
        versions: Mapping[str, ServedVersion],
    ) -> None:
        """A router that names versions (A/B arms) splits its subjects among those only.

        A canary with a weight takes a share of the split from the first request on: one in no
        arm would join the experiment under its version's name, unnoticed. The recipe itself
        asks for that mix, so it is a config error, not a warning (unlike an arm without
        traffic, which stage changes at run time may fix). The admin API refuses the same
        weight later (:meth:`Lifecycle._check_in_arms`).
        """
        if not named or not router.splits_traffic:
            return
        arms = set(named.values())
        for version, sv in versions.items():
            if sv.stage == CANARY and sv.weight > 0 and version not in arms:
                raise ConfigError(
                    f"models.{name}.versions.{version}.weight: canary {version!r} has weight "
                    f"{sv.weight:g} but is in no arm of {describe_named(named)}",
                    hint=f"add {version!r} to an arm, or give it weight 0: the arms share the "
                    "experiment's subjects, and any other version would join it unnamed",
                )

    def _build_version(
        self,
        name: str,
        version: str,
        node: Node,
        warmup: bool,
        path: str,
        *,
        recipe_node: Node | None = None,
    ) -> ServedVersion:
        """Build a version's model and batcher from ``node``.

        ``recipe_node`` is the node as the recipe gives it, kept for reloads when ``node`` adds
        the manifest's digest to it: a reload reads the manifest again.
        """
        model_root = self.composed.model_root
        label = self.composed.label
        batching_node, batching_path = self._batching[name]
        model = self.registry.build(
            "model_loader",
            node,
            ComponentContext(
                path,
                model_root,
                model_name=name,
                version=version,
                extra=dict(self._shared),
            ),
            label=label,
        )
        vm = self.metrics.version(name, version)
        batcher = self.registry.build(
            "batcher",
            batching_node,
            ComponentContext(
                batching_path,
                model_root,
                model_name=name,
                version=version,
                extra=dict(self._shared),
            ),
            model,
            vm,
            label=label,
        )
        assert isinstance(model, Model) and isinstance(batcher, Batcher)
        kept = dict(node if recipe_node is None else recipe_node)
        return ServedVersion(name, version, model, batcher, vm, warmup, node=kept, path=path)

    @staticmethod
    def _check_stage(
        name: str,
        version: str,
        stage: str,
        weight: float,
        primary: str,
        router: Router,
        path: str,
    ) -> None:
        if version == primary:
            if stage != CANDIDATE or weight:
                raise ConfigError(
                    f"{path}: version {version!r} is the primary; it takes no stage or weight",
                    hint=f"remove stage/weight, or set models.{name}.primary to another version",
                )
            return
        if weight and stage != CANARY:
            raise ConfigError(f"{path}.weight: only a canary takes a weight (stage is {stage!r})")
        if stage == CANARY and weight and not router.splits_traffic:
            raise ConfigError(
                f"{path}.weight: the {router.kind!r} router sends canaries no traffic",
                hint="use routing: {kind: weighted} (or ab) for this model",
            )
        if stage == SHADOW and router.shadow_policy() is None:
            raise ConfigError(
                f"{path}.stage: shadow needs a router that copies requests to shadows",
                hint="wrap the model's router: routing: {kind: shadow, inner: {kind: ...}}",
            )

    def _check_repository(
        self, name: str, mc: ModelConfig, model_root: Any, label: str
    ) -> Repository:
        assert mc.repository is not None
        path = f"models.{name}.repository"
        check_template(mc.repository, path=path)
        cls, _ = self.registry.resolve(
            "model_loader",
            {**mc.repository.loader, "path": "x", "sha256": "0" * 64},
            path=f"{path}.loader",
            context=label,
        )
        fields = getattr(cls.Config, "__struct_fields__", ())
        if "path" not in fields or "sha256" not in fields:
            raise ConfigError(
                f"{path}.loader: loader {cls.kind!r} takes no path and sha256; a repository "
                "version needs both (its digest is pinned by the manifest)"
            )
        return Repository(mc.repository, model_root, model=name)

    def _pinned(
        self, name: str, repo: Repository | None, node: Node, path: str, *, warn: bool = False
    ) -> Node:
        """A recipe version's loader node, with the digest its model's repository manifest pins.

        A recipe version whose artifact lies inside the repository folder and is listed in
        the manifest is checked against that digest every time it loads: a reload must not read
        a swapped file the manifest does not vouch for. A ``sha256`` in the recipe must agree.
        The manifest is read at each call, so re-pinning a file there is how an operator
        vouches for a new one.

        Raises:
            ConfigError: The recipe's ``sha256`` and the manifest's disagree, the manifest
                cannot be read or leaves the model root, or the loader cannot check a digest.
        """
        artifact = node.get("path")
        if repo is None or not isinstance(artifact, str):
            return node
        key = repo.manifest_key(artifact)
        if key is None:
            return node
        manifest = f"models.{name}.repository.manifest ({repo.config.manifest})"
        try:
            digest = repo.digests().get(key)
        except UnsafePath:
            raise ConfigError(
                f"{manifest}: resolves outside the model root",
                hint="symlinks and '..' out of model_root are refused",
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{manifest}: cannot be read ({type(exc).__name__})",
                hint="it pins this version's artifact; make it readable by the server",
            ) from None
        own = node.get("sha256")
        if digest is None:
            if own is None and warn:
                log.warning(
                    "%s: %r is in the repository folder but neither %s nor the recipe pins its "
                    "sha256; a reload reads whatever file is there",
                    path,
                    key,
                    repo.config.manifest,
                )
            return node
        if own is not None:  # not a string: the loader's Config refuses it
            if isinstance(own, str) and own.strip().lower() != digest:
                raise ConfigError(
                    f"{path}.sha256: the recipe pins {own!r} but {manifest} pins "
                    f"{digest!r} for {key!r}; the artifact can match only one",
                    hint="make them agree: re-pin whichever is out of date",
                )
            return self._companions(repo, node, path)
        cls, _ = self.registry.resolve("model_loader", node, path=path, context=self.composed.label)
        if "sha256" not in getattr(cls.Config, "__struct_fields__", ()):
            raise ConfigError(
                f"{path}: {manifest} pins {key!r}, but loader {cls.kind!r} takes no sha256 and "
                "cannot check it",
                hint="use a loader that checks digests, or keep the artifact out of the "
                "repository folder",
            )
        return self._companions(repo, {**node, "sha256": digest}, path)

    def _companions(self, repo: Repository, node: Node, path: str) -> Node:
        """``node`` with the manifest's pins of the files beside its pinned artifact, for a
        loader whose ``Config`` takes them (:data:`COMPANIONS_OPTION`): an ONNX model's
        external data, pinned in the same manifest as the ``.onnx`` file.

        Raises:
            ConfigError: The recipe pins one of those files with another digest.
        """
        artifact = node.get("path")
        key = repo.manifest_key(artifact) if isinstance(artifact, str) else None
        if key is None:
            return node
        cls, _ = self.registry.resolve("model_loader", node, path=path, context=self.composed.label)
        if COMPANIONS_OPTION not in getattr(cls.Config, "__struct_fields__", ()):
            return node
        pins = companion_digests(repo.digests(), key)
        own = node.get(COMPANIONS_OPTION)
        if not isinstance(own, dict):  # absent; anything else, the loader's Config refuses
            return {**node, COMPANIONS_OPTION: pins} if pins and own is None else node
        for name, digest in own.items():
            pinned = pins.get(str(PurePosixPath(str(name))))
            if pinned is not None and isinstance(digest, str) and digest.lower() != pinned:
                raise ConfigError(
                    f"{path}.{COMPANIONS_OPTION}: the recipe pins {digest!r} for {name!r} but "
                    f"models.{repo.model}.repository.manifest ({repo.config.manifest}) pins "
                    f"{pinned!r}; the file can match only one",
                    hint="make them agree: re-pin whichever is out of date",
                )
        return {**node, COMPANIONS_OPTION: {**pins, **own}}

    @property
    def plugin_infos(self) -> dict[str, PluginInfo]:
        return self.plugins

    @property
    def lifecycle(self) -> Lifecycle:
        """Stage moves with approvals and the audit log (created on first use)."""
        if self._lifecycle is None:
            from infercore.lifecycle import Lifecycle

            self._lifecycle = Lifecycle(self)
        return self._lifecycle

    @property
    def ready(self) -> bool:
        """Every required model's primary is serving, and the server is not draining."""
        if not self.started or self.draining:
            return False
        return all(m.ready for m in self.models.values() if m.config.required)

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(
                f"unknown model {quoted(name)}",
                hint=f"served models: {', '.join(self.models) or 'none'}",
            )
        return served

    # -- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """Start feature sources and routers, then load, warm and open every version, then
        restore the rollout the previous run saved (``admin.state_file``), then start drift
        monitoring.

        Raises:
            ModelLoadError: A required model's primary version failed to load (an optional
                model, or a non-primary version, fails alone and is reported).
        """
        # The lifecycle listens from the start, so that the guard's decisions are audited.
        _ = self.lifecycle
        for served in self.models.values():
            await self._start_component(served.features, f"models.{served.name} features")
            await self._start_component(served.router, f"models.{served.name} router")
        for served in self.models.values():
            if served.shadow is not None:
                served.shadow.start()  # copies go to each shadow version once it is ready

            async def load(sv: ServedVersion, served: ServedModel = served) -> None:
                # Each version takes its traffic as soon as it is ready: a slow one (even a
                # candidate nothing routes to) does not hold the others' canary share or copies.
                if await self._load(served, sv):
                    served.refresh()

            await asyncio.gather(*(load(sv) for sv in served.versions.values()))
            served.refresh()
        # The rollout saved by the previous run (admin.state_file), over the recipe's: before
        # drift monitoring starts (its cooldown is part of it) and before readiness.
        await self.lifecycle.restore_state()
        for served in self.models.values():
            loaded = [sv.model for sv in served.versions.values() if sv.ready]
            # The config is checked against the models' tensors only when every version
            # loaded: a name only a version that failed (optional, P5) takes is no error.
            unloaded = [sv.version for sv in served.versions.values() if not sv.ready]
            if loaded and not unloaded:
                # What the feature source's config assembles, against what the model takes:
                # a mismatch would report ready and answer every request 400.
                served.features.check_model_inputs(
                    [spec for model in loaded for spec in model.inputs]
                )
            if served.drift is not None:
                if loaded:  # tensor names are known once a version has loaded
                    try:
                        served.drift.check_tensors(
                            {spec.name for model in loaded for spec in model.inputs},
                            {spec.name for model in loaded for spec in model.outputs},
                        )
                    except ConfigError as exc:
                        if not unloaded:
                            raise
                        log.warning(
                            "%s (not refused: version(s) %s did not load and may take it)",
                            exc,
                            ", ".join(unloaded),
                        )
                if loaded and not unloaded:
                    served.drift.expect_columns(
                        [(spec.name, spec.shape) for model in loaded for spec in model.inputs],
                        [(spec.name, spec.shape) for model in loaded for spec in model.outputs],
                    )
                await served.drift.start()
            if served.config.required and not served.ready:
                primary = served.versions[served.primary]
                if primary.config_error is not None:
                    raise primary.config_error  # a path outside the model root, say: exit 2
                raise ModelLoadError(primary.error or "failed to load")
        self.started = True

    async def _start_component(self, component: Any, what: str) -> None:
        try:
            await component.start()
        except InfercoreError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{component.context.path}: {type(component).__name__} ({what}, plugin "
                f"{self.registry.plugin_of(component)!r}) failed to start: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def _load(
        self, served: ServedModel, sv: ServedVersion, *, serving: ServedVersion | None = None
    ) -> bool:
        """Load, check and warm ``sv``; ``False`` (with ``sv.error``) when it did not load.

        ``serving``: the instance of the same version serving now (a reload). A new artifact
        with another signature is refused before its warm-up (``sv.refusal``).
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            try:
                await sv.model.start()
                if serving is not None:
                    self._check_signature(serving, sv)
                self._check_provided(served, sv)
                sv.input_names = frozenset(spec.name for spec in sv.model.inputs)
                sv.route_only = served.router.key_fields - sv.input_names
                sv.request_fields = served.features.request_fields
                sv.batchable = sv.model.batchable
                own = sv.outputs_config is not None
                sv.outputs_plan = plan_outputs(
                    sv.outputs_config if own else served.config.outputs,
                    sv.model.outputs,
                    config_path=f"models.{served.name}."
                    + (f"versions.{sv.version}.outputs" if own else "outputs"),
                )
                if sv.warmup:
                    await sv.model.warmup()
                await sv.batcher.start()
            except InfercoreError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"{sv.model.context.path}: {type(sv.model).__name__} (plugin "
                    f"{self.registry.plugin_of(sv.model)!r}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        except InfercoreError as exc:
            sv.state = FAILED
            sv.error = self.scrub(str(exc))  # the admin API and the logs show it
            sv.config_error = exc if isinstance(exc, ConfigError) else None
            sv.refusal = exc if isinstance(exc, SignatureChanged) else None
            self.metrics.model_load_failures.labels(sv.name, sv.version).inc()
            if sv.refusal is not None:
                log.warning(
                    "model %s version %s: reload refused: %s", sv.name, sv.version, sv.error
                )
            else:
                log.error("model %s version %s failed to load: %s", sv.name, sv.version, sv.error)
            return False
        sv.groups = self._groups(served, sv)
        sv.state = READY
        self.metrics.model_ready.labels(sv.name, sv.version).set(1)
        log.info("model %s version %s ready in %.2fs", sv.name, sv.version, loop.time() - t0)
        return True

    @staticmethod
    def _check_provided(served: ServedModel, sv: ServedVersion) -> None:
        """Every input of the loaded model must be one its feature source builds, when the
        source can say (:meth:`FeatureSource.provided_inputs`).

        Otherwise the version would report ready and answer every request 400 (``missing
        input``), blaming the client for the recipe.

        Raises:
            ConfigError: An input no entry of the source builds.
        """
        provided = served.features.provided_inputs()
        if provided is None:
            return
        missing = [spec.name for spec in sv.model.inputs if spec.name not in provided]
        if missing:
            source = served.features.context.path  # `features` or models.<m>.features
            raise ConfigError(
                f"models.{served.name}.versions.{sv.version}: the model takes input "
                f"{missing[0]!r}, which no entry of the feature source ({source}) builds "
                f"(it builds: {', '.join(sorted(provided)) or 'nothing'})",
                hint=f"add an entry named {missing[0]!r} to {source}, or serve a model that "
                "does not take it",
            )

    @staticmethod
    def _check_signature(serving: ServedVersion, fresh: ServedVersion) -> None:
        """Refuse a reload that would change the tensors a serving version takes or gives.

        A reload in place is for a repaired or re-pinned artifact of the same version. With a
        new signature every client of the version (and of the model, for the primary) would
        fail at once (400 missing input) with nothing judging the new model first: it must
        arrive as a new version, through shadow and canary, where the guard and approvals
        see it.

        Raises:
            SignatureChanged: Names, datatypes or shapes differ.
        """
        old, new = serving.model, fresh.model
        changes = signature_changes(old.inputs, old.outputs, new.inputs, new.outputs)
        if changes:
            raise SignatureChanged(
                f"model {fresh.name!r} version {fresh.version!r}: the new artifact's signature "
                f"differs from the one serving ({describe_changes(changes)}); the old one keeps "
                "serving",
                hint="a version's inputs and outputs never change under its clients: load the "
                "new artifact as a new version (its own folder in the repository, or a new "
                "recipe version) and roll it out (shadow, canary, primary)",
            )

    def _groups(self, served: ServedModel, sv: ServedVersion) -> RequestGroups | None:
        """Request groups for ``sv``, when its model, batcher and feature source allow them.

        A batcher that does not batch (``none``) gets none: a group reaches it as one
        submission, so as one model call, and a failed group runs each request again alone,
        where ``none`` promises one model call per request and each request at most once.
        """
        if not (
            self.config.server.group_requests
            and served.features.groupable
            and sv.model.batchable
            and sv.batcher.batches
        ):
            return None

        async def run_group(
            members: Sequence[Mapping[str, Array]],
            fields: Mapping[str, Array],
            declared: Mapping[str, str] | None,
            deadline: float,
        ) -> Tensors:
            return await self._run_group(served, sv, members, fields, declared, deadline)

        async def run_alone(
            fields: Mapping[str, Array], declared: Mapping[str, str] | None, deadline: float
        ) -> Tensors:
            return await self._run_alone(served, sv, fields, declared, deadline)

        return RequestGroups(
            run_group,
            run_alone,
            max_rows=min(
                batcher_option(sv.batcher, "max_batch_size", DEFAULT_GROUP_ROWS),
                self.config.server.max_request_rows,
            ),
            max_waiting=batcher_option(sv.batcher, "max_queue_size", DEFAULT_GROUP_WAITING),
            model_name=served.name,
            batcher_full=lambda: sv.batcher.full,
        )

    async def _stop_instance(self, sv: ServedVersion) -> None:
        # Bounded: a model call that never returns must not hang an unload or a shutdown.
        budget = self.config.server.request_timeout_ms / 1000 + 5.0
        for part in (sv.batcher, sv.model):
            try:
                await asyncio.wait_for(part.stop(), budget)
            except TimeoutError:
                log.error("stopping %s took over %.0fs; abandoned", part.context.path, budget)
            except Exception:
                log.exception("stopping %s failed", part.context.path)

    def begin_shutdown(self) -> None:
        """A stop signal arrived: refuse model state changes from now on (503 shutting_down).

        Requests are still served through the drain; :meth:`stop` refuses them later. A load or
        promotion accepted during the drain would change what a server that is about to stop
        serves, and be audited as done.
        """
        self.frozen = True

    def _check_changes_allowed(self) -> None:
        if self.frozen or self.draining:
            raise ShuttingDown("the server is shutting down; model state changes are refused")

    async def stop(self) -> None:
        """Stop shadow copies and batchers (finishing queued work), then models, routers and
        feature sources."""
        self.frozen = True
        self.draining = True
        for served in self.models.values():
            if served.drift is not None:
                await served.drift.stop()
            if served.shadow is not None:
                await served.shadow.stop()
            for sv in served.versions.values():
                if sv.state != UNLOADED:
                    await self._stop_instance(sv)
                sv.state = STOPPED
            served.refresh()
            for component in (served.router, served.features):
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s failed", component.context.path)
        if self._lifecycle is not None:
            self._lifecycle.close()  # the state file's lock: another server may take it now

    # -- the request path -----------------------------------------------------------------

    def _prepare(
        self,
        sv: ServedVersion,
        inputs: Tensors,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
    ) -> Tensors:
        wanted = sv.input_names
        only = sv.route_only
        if any(k not in wanted and (k in only or inputs[k] is not fields.get(k)) for k in inputs):
            # A feature source may build inputs for every version of the model (a challenger
            # with more features); each version takes its own. Tensors the client sent stay,
            # so an unknown input name is still a 400, except the router's sticky key: it was
            # sent to route the request, not for a model that does not take it.
            inputs = {
                k: v
                for k, v in inputs.items()
                if k in wanted or (v is fields.get(k) and k not in only)
            }
        if declared:
            # A client's declared datatypes bind only tensors that reach the model unchanged;
            # a feature source that built an input has already converted it.
            declared = {k: v for k, v in declared.items() if inputs.get(k) is fields.get(k)}
        return prepare_inputs(
            sv.model.inputs,
            inputs,
            declared=declared,
            max_rows=self.config.server.max_request_rows,
            # Behind a feature source the client sends its fields, not the model's inputs:
            # the hint of a missing or unknown input names those.
            request_fields=sv.request_fields,
            same_rows=sv.batchable,
        )

    def _record(self, sv: ServedVersion, elapsed: float) -> None:
        # A shadow copy's time, beside the routed requests' (role shadow). Not its failure:
        # route_errors_total counts routed requests, as route_requests_total does, so that
        # their ratio is an error rate for every role; a copy's outcome is in
        # infercore_shadow_requests_total{outcome}.
        sv.route_duration.observe(elapsed)

    async def infer(
        self,
        served: ServedModel,
        sv: ServedVersion,
        fields: Mapping[str, Array],
        *,
        declared: Mapping[str, str] | None,
        deadline: float,
        priority: int = 0,
        client_deadline: bool = False,
        pinned: bool = False,
    ) -> Tensors:
        """Features -> input checks -> batcher -> model, for one request.

        Requests that arrive together may share that work (:mod:`infercore.runtime.grouping`).
        The primary's answer may then be copied to shadow versions (never awaited here).
        ``priority``: the batcher's priority level for the request (``protocol.v2.priority_level``);
        0, the default level. A request at a level of its own runs alone: a group is queued as
        one request, at the default level.
        ``client_deadline``: ``deadline`` is the client's own, earlier than the server's
        (``X-Infercore-Timeout-Ms``, V2 ``parameters.timeout``). Its passing is then the
        client's choice, not evidence against the version: the canary guard counts such a
        timeout only when the version had already taken longer than the guard's latency bound
        (:func:`~infercore.runtime.guard.latency_bound`).
        ``pinned``: the request named its version (a versioned URL, ``X-Infercore-Variant``;
        :meth:`Router.forced`) rather than taking the traffic split's choice. Counted in the
        metrics, never evidence for the guard: any client can aim such requests, their inputs
        and their timing at one version.
        """
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        sv.enter()
        t0 = time.perf_counter()
        error: bool | None = True  # None: the client went; nothing to judge the version by
        judged = not pinned  # False: counted in the metrics, but no evidence for the guard
        try:
            groups = sv.groups
            result = None
            if groups is not None and not priority:
                result = await groups.submit(fields, declared, deadline)
            if result is None:
                result = await self._run_alone(served, sv, fields, declared, deadline, priority)
            error = False
            return result
        except InfercoreError as exc:
            # A 5xx (or a 504 against the server's deadline) is the version's fault. A bad
            # request is not, nor a stopping server or a shared feature store, nor a deadline
            # the client cut short: any client can cause those.
            code = exc.status_code
            error = code >= 500
            if not error or isinstance(exc, _NOT_RUN):
                judged = False
            elif client_deadline and code == 504 and judged:
                judged = self._outlasted_bound(served, time.perf_counter() - t0)
            raise
        except asyncio.CancelledError:
            # The deadline passed (the version was too slow, or the client's own deadline
            # was too short for it), or the client went.
            if asyncio.get_running_loop().time() < deadline:
                error = None
            elif client_deadline and judged:
                judged = self._outlasted_bound(served, time.perf_counter() - t0)
            raise
        finally:
            self._finish(served, sv, time.perf_counter() - t0, error, judged)

    def _outlasted_bound(self, served: ServedModel, elapsed: float) -> bool:
        """Whether a request timed out by the client's own deadline ran longer than the
        guard's latency bound: then the version was slow by the guard's measure, whoever set
        the deadline (else a canary that hangs would go unjudged behind clients that all send
        deadlines). Unknown bound (the primary has too few requests yet): not judged."""
        bound = self._guard_bounds.get(served.name)
        return bound is not None and elapsed >= bound

    async def _run_alone(
        self,
        served: ServedModel,
        sv: ServedVersion,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
        priority: int = 0,
    ) -> Tensors:
        """One request through the pipeline on its own."""
        inputs = await served.features.fetch(fields, deadline=deadline)
        prepared = self._prepare(sv, inputs, fields, declared)
        result = await self._run_model(served, sv, inputs, prepared, deadline, priority)
        table = served.table
        if table.shadows and sv.version == table.primary and served.shadow is not None:
            targets = served.router.mirror(RouteRequest(_NO_HEADERS, "", fields), table)
            if targets:
                versions = served.versions
                served.shadow.offer(
                    tuple(versions[t] for t in targets if t in versions),
                    inputs,
                    fields,
                    declared,
                    result,
                    priority=priority,  # each shadow's batcher reads it (shadow.shadow_level)
                )
        return result

    async def _run_model(
        self,
        served: ServedModel,
        sv: ServedVersion,
        inputs: Tensors,
        prepared: Tensors,
        deadline: float,
        priority: int = 0,
    ) -> Tensors:
        """Batcher and model, the outputs plan, and the drift offer: the answer's tensors."""
        if priority:
            outputs = await sv.batcher.submit_with_priority(
                prepared, deadline=deadline, priority=priority
            )
        else:
            outputs = await sv.batcher.submit(prepared, deadline=deadline)
        plan = sv.outputs_plan
        result = outputs if plan is None else plan.apply(outputs)
        if served.drift is not None:
            # The feature source's full output (every version's inputs): never blocks. Rows
            # served with default features (fail_open during a store outage) are left out:
            # an outage is not drift, and must not start a retraining.
            served.drift.offer(inputs, outputs, degraded=bool(degraded_parts()))
        return result

    async def _run_group(
        self,
        served: ServedModel,
        sv: ServedVersion,
        members: Sequence[Mapping[str, Array]],
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        """Several requests' stacked ``fields`` through the pipeline at once.

        Raises:
            RunAlone: The inputs fail a check, or do not keep the requests' rows: each
                request runs alone (and meets its own error).
        """
        inputs = await served.features.fetch(fields, deadline=deadline)
        if degraded_parts():
            # Default features for some rows: each request learns alone whether it was one.
            raise RunAlone("some rows were served degraded")
        try:
            prepared = self._prepare(sv, inputs, fields, declared)
        except InvalidInput as exc:
            raise RunAlone(str(exc)) from None
        rows = next(iter(fields.values())).shape[0]
        if any(v.ndim == 0 or v.shape[0] != rows for v in prepared.values()):
            raise RunAlone("the inputs do not have the requests' rows")
        result = await self._run_model(served, sv, inputs, prepared, deadline)
        table = served.table
        if table.shadows and sv.version == table.primary and served.shadow is not None:
            self._mirror_group(served, table, members, inputs, fields, declared, result)
        return result

    def _mirror_group(
        self,
        served: ServedModel,
        table: RoutingTable,
        members: Sequence[Mapping[str, Array]],
        inputs: Tensors,
        fields: Mapping[str, Array],
        declared: Mapping[str, str] | None,
        result: Tensors,
    ) -> None:
        """Shadow copies of a group: one copy of the whole group when every request goes to
        the same shadows (counted as that many copies), else one per request."""
        shadow = served.shadow
        assert shadow is not None
        router, versions = served.router, served.versions
        targets = [router.mirror(RouteRequest(_NO_HEADERS, "", m), table) for m in members]
        first = targets[0]
        if all(t == first for t in targets):
            if first:
                shadow.offer(
                    tuple(versions[t] for t in first if t in versions),
                    inputs,
                    fields,
                    declared,
                    result,
                    copies=len(members),
                )
            return
        start = 0
        for own, m in zip(targets, members, strict=True):
            end = start + next(iter(m.values())).shape[0]
            if own:
                shadow.offer(
                    tuple(versions[t] for t in own if t in versions),
                    {k: v[start:end] for k, v in inputs.items()},
                    m,
                    declared,
                    {k: v[start:end] for k, v in result.items()},
                )
            start = end

    def _finish(
        self,
        served: ServedModel,
        sv: ServedVersion,
        elapsed: float,
        error: bool | None,
        judged: bool = True,
    ) -> None:
        sv.leave()
        if error is None:
            return
        sv.route_duration.observe(elapsed)
        if error:
            sv.route_errors.inc()
        if judged and served.guarding and sv.window is not None:
            now = time.monotonic()
            sv.window.record(now, elapsed, error)
            if now >= served.next_guard_check or (
                error
                and sv.stage == CANARY
                and now >= served.guard_checked_at + _GUARD_ON_ERROR_S
                and served.guard is not None
                and may_trip(served.guard, sv.window, now)
            ):
                # A failing canary is judged at once, not at the next interval: a burst
                # against a broken canary failed for up to check_interval_s (77 of 150
                # requests in 0.8 s at the default 1 s), and with no traffic after it the
                # window could expire unjudged.
                self.check_guard(served, now)

    # -- the canary guard -----------------------------------------------------------------

    def check_guard(self, served: ServedModel, now: float | None = None) -> list[str]:
        """Judge every canary against the primary now; returns the versions dropped."""
        guard = served.guard
        if guard is None or not served.guarding:
            return []
        now = time.monotonic() if now is None else now
        served.next_guard_check = now + guard.check_interval_s
        served.guard_checked_at = now
        primary = served.versions[served.primary]
        if primary.window is None:
            return []
        base = primary.window.stats(now)
        bound = latency_bound(guard, base)
        if bound is None:
            self._guard_bounds.pop(served.name, None)
        else:
            self._guard_bounds[served.name] = bound
        dropped: list[str] = []
        for sv in list(served.versions.values()):
            if sv.stage != CANARY or sv.weight <= 0 or sv.window is None:
                continue
            verdict = judge(guard, sv.window.stats(now), base)
            if verdict is not None:
                self._trip(served, sv, verdict)
                dropped.append(sv.version)
        return dropped

    def _trip(self, served: ServedModel, sv: ServedVersion, verdict: Verdict) -> None:
        was = sv.weight
        sv.weight = 0.0
        if sv.window is not None:
            sv.window.reset()
        served.refresh()
        self.metrics.guard_trips.labels(served.name, sv.version, verdict.cause).inc()
        log.warning(
            "canary guard: model %s version %s weight %g -> 0 (%s: %s)",
            served.name,
            sv.version,
            was,
            verdict.cause,
            verdict.detail,
        )
        self.emit(
            {
                "event": "guard_tripped",
                "model": served.name,
                "version": sv.version,
                "actor": "guard",
                "cause": verdict.cause,
                "reason": verdict.detail,
                "weight_before": was,
            }
        )

    def emit(self, event: Event) -> None:
        """Hand a rollout event to every listener (the lifecycle's audit log among them)."""
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("a rollout event listener failed")

    # -- run-time changes -----------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` without the model root's path and with its credentials masked as
        ``infercore config show`` masks them (:func:`infercore.redaction.redact_text`: a URL's
        userinfo, ``password=…``, ``PGPASSWORD=…``, prefixed tokens): error bodies and INFO
        logs carry neither (RELIABILITY S6)."""
        return redact_text(text.replace(str(self.composed.model_root), "<model_root>"))

    async def load(
        self, name: str, version: str, *, pin: Mapping[str, Any] | None = None
    ) -> ServedVersion:
        """Load (or reload) a version and open it to traffic; the old instance serves until then.

        A recipe version is built from its recipe node, pinned by the model's repository
        manifest when that lists its artifact; another version from the model's repository
        folder (its digest pinned by the folder's manifest). The manifest is read again for
        every load. A reload keeps the version's stage and weight and must keep the serving
        instance's signature; a new version starts as a ``candidate``.

        ``pin``: a repository version must be loaded with exactly these pins (``path``,
        ``sha256`` and the companions' digests, as an earlier load used them): the manifest
        must pin them still (a restored rollout loads what was approved, or nothing).

        Raises:
            InvalidInput: An invalid version name, or a repository version without a pinned
                digest or whose folder escapes the model root.
            ModelNotFound: The model, or a version in neither the recipe nor the repository.
            SignatureChanged: A reload of a serving version whose new artifact takes or gives
                other tensors (409); nothing changed.
            LoadFailed: The load, digest check or warm-up failed, or the recipe's and the
                manifest's digests disagree; nothing changed.
        """
        served = self.model(name)
        if not VERSION_RE.fullmatch(version):
            raise InvalidInput(
                f"invalid version {quoted(version)}",
                hint="use letters, digits, '_', '-' and '.' (at most 32)",
            )
        self._check_changes_allowed()
        async with served.lock:
            current = served.versions.get(version)
            repo = served.repository
            recipe_node: Node | None = None
            if current is not None and current.origin == "recipe":
                warmup, path, origin = current.warmup, current.path, current.origin
                recipe_node = current.node
                try:
                    node = self._pinned(name, repo, recipe_node, path)
                except ConfigError as exc:
                    self.metrics.model_load_failures.labels(name, version).inc()
                    raise self._load_failed(served, current, version, str(exc)) from None
            elif repo is not None:
                try:
                    node = self._repository_node(name, repo, version, pin)
                except InfercoreError as exc:
                    if current is None:
                        if isinstance(exc, REFUSED_LOADS):
                            # Its folder exists but is refused (no pinned digest, out of the
                            # model root): a failed load attempt, whoever asked (the admin
                            # API, drift's register_candidate). A version without a folder
                            # names nothing to count.
                            self.metrics.model_load_failures.labels(name, version).inc()
                        raise
                    # A version serving now whose folder or pin is gone: a failed reload.
                    self.metrics.model_load_failures.labels(name, version).inc()
                    raise self._load_failed(served, current, version, exc.message) from None
                warmup, path, origin = repo.config.warmup, _repository_path(name), "repository"
            else:
                raise ModelNotFound(
                    f"model {name!r} has no version {quoted(version)}",
                    hint="the recipe lists its versions; models.<m>.repository lets the "
                    "admin API load others from folders",
                )
            try:
                fresh = self._build_version(
                    name, version, node, warmup, path, recipe_node=recipe_node
                )
            except ConfigError as exc:
                raise InvalidInput(self.scrub(str(exc))) from None
            fresh.origin = origin
            if current is not None:
                fresh.outputs_config = current.outputs_config
            if served.guard is not None:
                fresh.window = Window(served.guard.window_s)
            serving = current if current is not None and current.ready else None
            if not await self._load(served, fresh, serving=serving):
                await self._stop_instance(fresh)
                if fresh.refusal is not None:
                    refusal = fresh.refusal
                    raise self._load_failed(served, current, version, str(refusal), refusal)
                reason = fresh.error or "failed to load"
                raise self._load_failed(served, current, version, reason)
            if current is not None:
                fresh.stage, fresh.weight = current.stage, current.weight
            served.versions[version] = fresh
            served.refresh()
            if current is not None and current.state not in (UNLOADED, STOPPED):
                # The replaced instance: requests that picked it finish on it, then it stops.
                serving_now = current.ready
                current.state = UNLOADING  # shadow copies still queued for it are dropped
                if serving_now:
                    await self._retire_instance(current)
                else:
                    await self._stop_instance(current)
                current.state = STOPPED
        self.emit({"event": "loaded", "model": name, "version": version, "stage": fresh.stage})
        return fresh

    def build_repository_version(
        self, name: str, version: str, *, pin: Mapping[str, Any] | None = None
    ) -> ServedVersion:
        """Build a version from the model's repository folder as :meth:`load` builds one,
        without starting it or listing it: its loader node with the digests the manifest pins
        now, its model and batcher, ``origin`` ``"repository"``.

        For a restored rollout: a version loaded from the repository at run time and unloaded
        since is known again, unloaded (the caller sets its ``state``); loading it later reads
        the manifest again, as any load does.

        Args:
            name: The model.
            version: The version's name (its folder in the repository).
            pin: The pins an earlier load used (``path``, ``sha256``, the companions'
                digests): the manifest must pin exactly these now.

        Raises:
            ModelNotFound: The model, or its repository or the version's folder in it.
            InvalidInput: An invalid version name.
            UnpinnedArtifact: The manifest pins no digest for the version's artifact.
            UnsafePath: The version's folder, artifact or manifest leaves the model root.
            LoadFailed: The manifest does not pin ``pin`` any more.
            ConfigError: The recipe's and the manifest's pins of a companion file disagree, or
                the loader's or batcher's config is invalid.
            OSError: The manifest cannot be read.
        """
        served = self.model(name)
        repo = served.repository
        if repo is None:
            raise ModelNotFound(
                f"model {name!r} has no repository folder to build version {quoted(version)} from"
            )
        node = self._repository_node(name, repo, version, pin)
        sv = self._build_version(name, version, node, repo.config.warmup, _repository_path(name))
        sv.origin = "repository"
        return sv

    def _repository_node(
        self, name: str, repo: Repository, version: str, pin: Mapping[str, Any] | None
    ) -> Node:
        """The loader node of a repository version, with its companions' pins; ``pin``
        checked against it (see :meth:`build_repository_version`)."""
        node = self._companions(repo, repo.loader_node(version), _repository_path(name))
        if pin is not None:
            _check_pin(name, version, node, pin)
        return node

    def _load_failed(
        self,
        served: ServedModel,
        current: ServedVersion | None,
        version: str,
        reason: str,
        refusal: Conflict | None = None,
    ) -> InfercoreError:
        """Record a load that changed nothing (the old instance, if any, serves on) and return
        the error to raise: ``refusal`` (409) when the reload was refused, else LoadFailed."""
        name = served.name
        reason = self.scrub(reason)
        if current is not None:
            current.last_load_error = reason
            # The old instance (if any) still serves under this label.
            self.metrics.model_ready.labels(name, version).set(1 if current.ready else 0)
        self.emit({"event": "load_failed", "model": name, "version": version, "reason": reason})
        if refusal is not None:
            return refusal
        return LoadFailed(
            f"model {name!r} version {version!r} did not load: {reason}",
            hint="nothing changed: the model serves as before",
        )

    async def _retire_instance(self, sv: ServedVersion) -> None:
        """Drain a replaced or unloaded instance, then stop it."""
        budget = self.config.server.request_timeout_ms / 1000 + 1.0
        if not await sv.drain(budget):
            log.warning(
                "model %s version %s: %d request(s) still running after %.1fs; stopping anyway",
                sv.name,
                sv.version,
                sv.active,
                budget,
            )
        await self._stop_instance(sv)

    async def discard(self, name: str, version: str) -> None:
        """Forget a version loaded from the repository at run time, as if it never was.

        For a restored rollout that could not be applied in full (all or nothing): the
        versions it loaded go again. A version of the recipe, or the primary, stays.
        """
        served = self.model(name)
        sv = served.versions.get(version)
        if sv is None or sv.origin != "repository" or version == served.primary:
            return
        async with served.lock:
            del served.versions[version]
            sv.state = UNLOADING
            served.refresh()
            await self._stop_instance(sv)
            sv.state = STOPPED
            self.metrics.model_ready.labels(name, version).set(0)
            for stage in STAGES:
                self.metrics.model_stage.labels(name, version, stage).set(0)

    async def unload(self, name: str, version: str) -> ServedVersion:
        """Take a version out of traffic, let its requests finish, then stop it.

        A shadow or canary goes back to ``candidate``. Unloading an unloaded version does
        nothing.

        Raises:
            ModelNotFound: Unknown model or version.
            Conflict: The version is the primary.
        """
        served = self.model(name)
        sv = served.version(version)
        self._check_changes_allowed()
        async with served.lock:
            sv = served.version(version)
            if version == served.primary:
                raise Conflict(
                    f"version {version!r} is the primary of model {name!r}",
                    hint="promote another version to primary (or roll back) first",
                )
            if sv.state in (UNLOADED, STOPPED):
                return sv
            if sv.stage in (SHADOW, CANARY):
                sv.stage, sv.weight = CANDIDATE, 0.0
            was_loaded = sv.state == READY
            sv.state = UNLOADING
            served.refresh()
            if was_loaded:
                await self._retire_instance(sv)
            else:
                await self._stop_instance(sv)
            sv.state = UNLOADED
            sv.error = None
            served.refresh()
        self.emit({"event": "unloaded", "model": name, "version": version})
        return sv

    def set_stage(
        self,
        name: str,
        version: str,
        stage: str,
        weight: float | None = None,
        *,
        dry_run: bool = False,
    ) -> ServedVersion:
        """Move a version to ``stage`` (synchronously, with one table swap).

        Promoting to ``primary`` retires the current primary and remembers it for
        :meth:`rollback`.

        Raises:
            InvalidInput: Unknown stage, a weight outside 0..100, a weight for a non-canary,
                or canary weights above 100 in total.
            ModelNotFound: Unknown model or version.
            Conflict: The version is the primary, is not ready (for shadow, canary, primary),
                or the model's router cannot serve the stage.
        """
        served = self.model(name)
        sv = served.version(version)
        self._check_changes_allowed()
        if stage not in STAGES:
            raise InvalidInput(f"unknown stage {stage[:20]!r}", hint=f"stages: {', '.join(STAGES)}")
        if version == served.primary:
            raise Conflict(
                f"version {version!r} is the primary of model {name!r}",
                hint="promote another version to primary, or roll back",
            )
        if stage in (SHADOW, CANARY, PRIMARY) and not sv.ready:
            raise Conflict(
                f"model {name!r} version {version!r} is {sv.state}, not ready",
                hint="load it first (POST /v2/repository/models/NAME/load)",
            )
        if stage == SHADOW and served.shadow is None:
            raise Conflict(
                f"model {name!r}: its {served.router.kind!r} router copies no requests to shadows",
                hint="wrap the model's router in routing: {kind: shadow, inner: {...}}",
            )
        w = 0.0
        if stage == CANARY:
            w = _check_weight(weight or 0.0)
            if w > 0 and not served.router.splits_traffic:
                raise Conflict(
                    f"model {name!r}: its {served.router.kind!r} router sends canaries no traffic",
                    hint="use routing: {kind: weighted} (or ab) for this model",
                )
            others = sum(
                o.weight for o in served.versions.values() if o.stage == CANARY and o is not sv
            )
            if others + w > 100 + 1e-9:
                raise InvalidInput(
                    f"canary weights would add up to {others + w:g}; at most 100",
                    hint="lower another canary's weight first",
                )
        elif weight:
            raise InvalidInput(
                "only a canary takes a weight", hint="drop weight, or use --to canary"
            )
        if dry_run:
            return sv
        if stage == PRIMARY:
            old = served.versions[served.primary]
            old.stage, old.weight = RETIRED, 0.0
            served.previous.append(served.primary)
            del served.previous[:-_HISTORY]
            served.primary = version
            if old.window is not None:
                old.window.reset()
        if stage == SHADOW and served.shadow is not None:
            served.shadow.reset(version)
        if sv.window is not None and (stage != sv.stage or w != sv.weight):
            sv.window.reset()
        sv.stage, sv.weight = stage, w
        served.refresh()
        return sv

    def set_weights(
        self, name: str, weights: Mapping[str, float], *, dry_run: bool = False
    ) -> None:
        """Set the traffic split: the primary and canaries, in percent, adding up to 100.

        Canaries left out get 0.

        Raises:
            InvalidInput: Weights outside 0..100, not adding up to 100, or no primary.
            ModelNotFound: Unknown model or version.
            Conflict: A version that is neither the primary nor a canary (promote it to
                canary first), a canary that is not ready, or a router that does not split.
        """
        served = self.model(name)
        self._check_changes_allowed()
        # What the body says wrong (400) before what the state refuses (409).
        for version, value in weights.items():
            served.version(version)
            _check_weight(value)
        if served.primary not in weights:
            raise InvalidInput(
                f"the weights must include the primary ({served.primary!r})",
                hint=f"e.g. {{{served.primary!r}: 90, 'CANARY': 10}}",
            )
        total = math.fsum(weights.values())
        if abs(total - 100.0) > 1e-6:
            raise InvalidInput(f"the weights add up to {total:g}, not 100")
        for version, value in weights.items():
            sv = served.version(version)
            if sv.stage not in (PRIMARY, CANARY):
                raise Conflict(
                    f"model {name!r} version {version!r} is {sv.stage}: only the primary and "
                    "canaries take weights",
                    hint="promote it to canary first (that step may need an approval)",
                )
            if sv.stage == CANARY and value > 0:
                if not sv.ready:
                    raise Conflict(f"model {name!r} version {version!r} is {sv.state}, not ready")
                if not served.router.splits_traffic:
                    raise Conflict(
                        f"model {name!r}: its {served.router.kind!r} router sends canaries no "
                        "traffic",
                        hint="use routing: {kind: weighted} (or ab) for this model",
                    )
        if dry_run:
            return
        for sv in served.versions.values():
            if sv.stage == CANARY:
                new = float(weights.get(sv.version, 0.0))
                if new != sv.weight and sv.window is not None:
                    sv.window.reset()
                sv.weight = new
        served.refresh()

    def previous_primary(self, name: str) -> str | None:
        served = self.model(name)
        for version in reversed(served.previous):
            if version in served.versions and version != served.primary:
                return version
        return None

    def rollback(self, name: str, *, dry_run: bool = False) -> str | None:
        """Back to the last primary, and every canary's weight to 0; returns the new primary.

        Raises:
            Conflict: Nothing to roll back (no previous primary and no canary traffic), or the
                previous primary is not loaded.
        """
        served = self.model(name)
        self._check_changes_allowed()
        target = self.previous_primary(name)
        live = [sv for sv in served.versions.values() if sv.stage == CANARY and sv.weight > 0]
        if target is None and not live:
            raise Conflict(
                f"model {name!r}: nothing to roll back (no previous primary, no canary traffic)"
            )
        if target is not None and not served.versions[target].ready:
            raise Conflict(
                f"model {name!r}: the previous primary {target!r} is "
                f"{served.versions[target].state}",
                hint="load it first",
            )
        if dry_run:
            return target
        for sv in live:
            sv.weight = 0.0
            if sv.window is not None:
                sv.window.reset()
        if target is not None:
            while served.previous and served.previous[-1] != target:
                served.previous.pop()
            served.previous.pop()
            current = served.versions[served.primary]
            current.stage, current.weight = RETIRED, 0.0
            new = served.versions[target]
            new.stage, new.weight = PRIMARY, 0.0
            served.primary = target
            for sv in (current, new):
                if sv.window is not None:
                    sv.window.reset()
        served.refresh()
        return target


def _repository_path(name: str) -> str:
    """The config path of a repository version's loader (in errors and the version's path)."""
    return f"models.{name}.repository.loader"


def _check_pin(name: str, version: str, node: Node, pin: Mapping[str, Any]) -> None:
    """The repository's node of a version must carry the pins an earlier load used.

    Raises:
        LoadFailed: The manifest pins another digest (or the folder moved); nothing loaded.
    """
    for key in ("path", "sha256", COMPANIONS_OPTION):
        if node.get(key) != pin.get(key):
            raise LoadFailed(
                f"model {name!r} version {version!r}: the repository's {key} is not the one "
                "it was loaded with before",
                hint="restore the folder and its manifest pins as they were",
            )


def _check_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"a weight must be a number, got {value!r}")
    w = float(value)
    if not (0.0 <= w <= 100.0):  # NaN fails both
        raise InvalidInput(f"a weight must be between 0 and 100, got {value!r}")
    return w
