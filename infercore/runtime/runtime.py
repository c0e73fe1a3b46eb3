"""The runtime: models, their versions and components, built from a validated config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infercore.components import (
    Batcher,
    ComponentContext,
    FeatureSource,
    Model,
    Router,
    RouteRequest,
    RoutingTable,
    Tensors,
    TensorSpec,
)
from infercore.config.compose import Composed
from infercore.config.schema import ModelConfig
from infercore.errors import (
    InfercoreError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    PluginError,
    ShuttingDown,
)
from infercore.metrics import Metrics, VersionMetrics
from infercore.plugin_manager import PluginInfo, make_plugin_manager
from infercore.registry import Registry
from infercore.runtime.inputs import prepare_inputs
from infercore.runtime.outputs import OutputPlan, plan_outputs

log = logging.getLogger("infercore.runtime")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


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
    outputs_plan: OutputPlan | None = None
    #: The model's input names, known once it has loaded.
    input_names: frozenset[str] = frozenset()

    @property
    def output_specs(self) -> list[TensorSpec]:
        """The outputs clients see: the recipe's mapping, or the model's own outputs."""
        if self.outputs_plan is not None:
            return list(self.outputs_plan.specs)
        return self.model.outputs

    @property
    def ready(self) -> bool:
        return self.state == READY


@dataclass(slots=True)
class ServedModel:
    """A model with its versions, feature source and router."""

    name: str
    config: ModelConfig
    features: FeatureSource
    router: Router
    versions: dict[str, ServedVersion]
    primary: str
    table: RoutingTable = field(init=False)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the routing table after a version changed state."""
        ready = frozenset(v for v, sv in self.versions.items() if sv.ready)
        self.table = RoutingTable(primary=self.primary, ready=ready)

    @property
    def ready(self) -> bool:
        return self.primary in self.table.ready

    def pick(
        self, version: str | None, headers: Mapping[str, str], request_id: str
    ) -> ServedVersion:
        """The version that serves a request: the asked one, or the router's choice."""
        if version is None:
            version = self.router.route(RouteRequest(headers, request_id), self.table)
        served = self.versions.get(version)
        if served is None:
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r}",
                hint=f"versions: {', '.join(self.versions)}",
            )
        if not served.ready:
            raise ModelNotReady(f"model {self.name!r} version {version!r} is not ready")
        return served


def _default_primary(versions: Mapping[str, Any]) -> str:
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
        self.draining = False
        self.started = False
        self.models: dict[str, ServedModel] = {}
        model_root = composed.model_root
        label = composed.label
        # Components may register their own metric families on the app's registry.
        shared = {"metrics_registry": self.metrics.registry}
        cfg = self.config
        for name, mc in cfg.models.items():
            base = f"models.{name}"
            features_node = mc.features if mc.features is not None else cfg.features
            routing_node = mc.routing if mc.routing is not None else cfg.routing
            batching_node = mc.batching if mc.batching is not None else cfg.batching
            features = self.registry.build(
                "feature_source",
                features_node,
                ComponentContext(
                    f"{base}.features" if mc.features else "features",
                    model_root,
                    model_name=name,
                    extra=dict(shared),
                ),
                label=label,
            )
            router = self.registry.build(
                "router",
                routing_node,
                ComponentContext(
                    f"{base}.routing" if mc.routing else "routing",
                    model_root,
                    model_name=name,
                    extra=dict(shared),
                ),
                label=label,
            )
            versions: dict[str, ServedVersion] = {}
            for version, vc in mc.versions.items():
                vpath = f"{base}.versions.{version}"
                model = self.registry.build(
                    "model_loader",
                    vc.loader,
                    ComponentContext(
                        f"{vpath}.loader",
                        model_root,
                        model_name=name,
                        version=version,
                        extra=dict(shared),
                    ),
                    label=label,
                )
                vm = self.metrics.version(name, version)
                batcher = self.registry.build(
                    "batcher",
                    batching_node,
                    ComponentContext(
                        f"{base}.batching" if mc.batching else "batching",
                        model_root,
                        model_name=name,
                        version=version,
                        extra=dict(shared),
                    ),
                    model,
                    vm,
                    label=label,
                )
                assert isinstance(model, Model) and isinstance(batcher, Batcher)
                versions[version] = ServedVersion(name, version, model, batcher, vm, vc.warmup)
                self.metrics.model_ready.labels(name, version).set(0)
            assert isinstance(features, FeatureSource) and isinstance(router, Router)
            primary = mc.primary or _default_primary(mc.versions)
            self.models[name] = ServedModel(name, mc, features, router, versions, primary)

    @property
    def plugin_infos(self) -> dict[str, PluginInfo]:
        return self.plugins

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
                f"unknown model {name!r}",
                hint=f"served models: {', '.join(self.models) or 'none'}",
            )
        return served

    async def start(self) -> None:
        """Start feature sources and routers, then load, warm and open every version.

        Raises:
            ModelLoadError: A required model's primary version failed to load (an optional
                model, or a non-primary version, fails alone and is reported).
        """
        for served in self.models.values():
            await self._start_component(served.features, f"models.{served.name} features")
            await self._start_component(served.router, f"models.{served.name} router")
        for served in self.models.values():
            await asyncio.gather(*(self._load(served, sv) for sv in served.versions.values()))
            served.refresh()
            if served.config.required and not served.ready:
                err = served.versions[served.primary].error or "failed to load"
                raise ModelLoadError(err)
        self.started = True

    @staticmethod
    async def _start_component(component: Any, what: str) -> None:
        try:
            await component.start()
        except InfercoreError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{component.context.path}: {type(component).__name__} ({what}) failed to "
                f"start: {type(exc).__name__}: {exc}"
            ) from exc

    async def _load(self, served: ServedModel, sv: ServedVersion) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            try:
                await sv.model.start()
                sv.input_names = frozenset(spec.name for spec in sv.model.inputs)
                sv.outputs_plan = plan_outputs(
                    served.config.outputs,
                    sv.model.outputs,
                    config_path=f"models.{served.name}.outputs",
                )
                if sv.warmup:
                    await sv.model.warmup()
                await sv.batcher.start()
            except InfercoreError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"{sv.model.context.path}: {type(sv.model).__name__} failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        except InfercoreError as exc:
            sv.state = FAILED
            sv.error = str(exc)
            self.metrics.model_load_failures.labels(sv.name, sv.version).inc()
            log.error("model %s version %s failed to load: %s", sv.name, sv.version, exc)
            return
        sv.state = READY
        self.metrics.model_ready.labels(sv.name, sv.version).set(1)
        log.info("model %s version %s ready in %.2fs", sv.name, sv.version, loop.time() - t0)

    async def stop(self) -> None:
        """Stop batchers (finishing queued work), then models, routers and feature sources."""
        self.draining = True
        for served in self.models.values():
            for sv in served.versions.values():
                for part in (sv.batcher, sv.model):
                    try:
                        await part.stop()
                    except Exception:
                        log.exception("stopping %s failed", part.context.path)
                sv.state = STOPPED
                self.metrics.model_ready.labels(sv.name, sv.version).set(0)
            served.refresh()
            for component in (served.router, served.features):
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s failed", component.context.path)

    async def infer(
        self,
        served: ServedModel,
        sv: ServedVersion,
        fields: Mapping[str, np.ndarray],
        *,
        declared: Mapping[str, str] | None,
        deadline: float,
    ) -> Tensors:
        """Features -> input checks -> batcher -> model, for one request."""
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        inputs = await served.features.fetch(fields, deadline=deadline)
        wanted = sv.input_names
        if any(k not in wanted and inputs[k] is not fields.get(k) for k in inputs):
            # A feature source may build inputs for every version of the model (a challenger
            # with more features); each version takes its own. Tensors the client sent stay,
            # so an unknown input name is still a 400.
            inputs = {k: v for k, v in inputs.items() if k in wanted or v is fields.get(k)}
        if declared:
            # A client's declared datatypes bind only tensors that reach the model unchanged;
            # a feature source that built an input has already converted it.
            declared = {k: v for k, v in declared.items() if inputs.get(k) is fields.get(k)}
        prepared = prepare_inputs(
            sv.model.inputs,
            inputs,
            declared=declared,
            max_rows=self.config.server.max_request_rows,
        )
        outputs = await sv.batcher.submit(prepared, deadline=deadline)
        plan = sv.outputs_plan
        return outputs if plan is None else plan.apply(outputs)
