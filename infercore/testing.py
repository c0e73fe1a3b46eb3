"""Helpers for testing infercore and its plugins without files or servers.

For plugin authors (see ``docs/plugins.md``, "Testing a plugin"):

- :func:`plugin_manager` builds a fresh plugin manager with the built-ins and *your* plugins
  only, and returns a :class:`PluginSet` that builds components from config nodes exactly as
  the runtime does (so a typo in the options fails the same way).
- :func:`runtime_from_recipe` / :func:`app_from_recipe` / :func:`app_client` turn a recipe dict
  into a runtime, a Litestar app and a started test client.
- :class:`FakeModel` (``model_loader`` kind ``fake``) and :class:`FakeFeatureSource`
  (``feature_source`` kind ``fake``) stand in for the parts you are not testing, with knobs for
  latency and failures; :class:`FakePlugin` registers both.

Installing infercore also installs a pytest plugin (:mod:`infercore.testing_pytest`) with the
fixtures ``infercore_plugin_manager``, ``infercore_runtime``, ``infercore_app`` and
``infercore_client`` around these helpers.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from infercore.components import (
    Component,
    ComponentContext,
    FeatureSource,
    Model,
    Tensors,
    TensorSpec,
)
from infercore.components.features import mark_degraded
from infercore.config.compose import Composed
from infercore.config.schema import InfercoreConfig
from infercore.config.validation import convert
from infercore.errors import DeadlineExceeded, FeatureStoreUnavailable, ModelLoadError
from infercore.hookspecs import hookimpl

if TYPE_CHECKING:
    import httpx
    import pluggy
    from litestar import Litestar
    from litestar.testing import TestClient

    from infercore.plugin_manager import PluginInfo
    from infercore.registry import Registry
    from infercore.runtime import Runtime

__all__ = [
    "AppFactory",
    "ClientFactory",
    "FakeFeatureSource",
    "FakeFeatureSourceConfig",
    "FakeModel",
    "FakeModelConfig",
    "FakePlugin",
    "PluginManagerFactory",
    "PluginSet",
    "RuntimeFactory",
    "app_client",
    "app_from_recipe",
    "composed_from_dict",
    "fake_model_config",
    "plugin_manager",
    "recipe_client",
    "runtime_from_dict",
    "runtime_from_recipe",
]

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


# --- the fake model -----------------------------------------------------------------------


class FakeModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The knobs of ``kind: fake`` (:class:`FakeModel`)."""

    #: Width of the FP32 input ``x`` ([-1, features]).
    features: Annotated[int, msgspec.Meta(ge=1)] = 4
    #: Seconds each predict call sleeps (in a worker thread, like a real runtime).
    latency_s: NonNegative = 0.0
    #: Raise when any input row's first value equals this (a "poisoned" request).
    fail_on_value: float | None = None
    #: Fail to load (start() raises).
    fail_load: bool = False
    #: Fail the warm-up call.
    fail_warmup: bool = False
    #: Return a malformed output (wrong row count): the warm-up then fails the load, unless
    #: the version sets ``warmup: false``.
    malformed: bool = False
    #: Value added to the sum, to tell versions apart.
    offset: float = 0.0


class FakeModel(Model):
    """``y = sum(x, axis=1) + offset`` (FP32 ``[-1]``), and ``x`` echoed back as ``echo``.

    Input ``x``: FP32 ``[-1, features]``. Knobs (:class:`FakeModelConfig`): ``features``,
    ``latency_s`` (each call sleeps in a worker thread), ``fail_on_value`` (a call whose rows
    include one starting with this value raises, so one "poisoned" request fails its batch),
    ``fail_load``, ``fail_warmup``, ``malformed`` (``y`` one row short) and ``offset``.

    Attributes:
        calls: Predict calls, warm-up excluded.
        batches: Rows of each of those calls, in order (to check batching).
    """

    kind = "fake"
    platform = "fake"
    Config = FakeModelConfig
    config: FakeModelConfig

    def __init__(self, config: FakeModelConfig, context: Any) -> None:
        super().__init__(config, context)
        self.calls = 0
        self.batches: list[int] = []
        self._lock = threading.Lock()
        self._warming = False

    async def start(self) -> None:
        if self.config.fail_load:
            raise ModelLoadError(f"{self.context.path}: fake load failure")
        n = self.config.features
        self.inputs = [TensorSpec("x", "FP32", (-1, n))]
        self.outputs = [TensorSpec("y", "FP32", (-1,)), TensorSpec("echo", "FP32", (-1, n))]

    async def warmup(self) -> None:
        if self.config.fail_warmup:
            raise ModelLoadError(f"{self.context.path}: fake warm-up failure")
        self._warming = True
        try:
            await super().warmup()
        finally:
            self._warming = False

    def _run(self, x: npt.NDArray[Any]) -> Tensors:
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        if self.config.fail_on_value is not None and np.any(x[:, 0] == self.config.fail_on_value):
            raise ValueError("poisoned row")
        y = x.sum(axis=1, dtype=np.float32) + np.float32(self.config.offset)
        if self.config.malformed:
            y = y[:-1] if len(y) else np.zeros(1, np.float32)
        return {"y": y, "echo": x.copy()}

    async def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        if not self._warming:
            with self._lock:
                self.calls += 1
                self.batches.append(int(x.shape[0]))
        return await asyncio.to_thread(self._run, x)


# --- the fake feature source --------------------------------------------------------------


class FakeFeatureSourceConfig(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True
):
    """The knobs of ``features: {kind: fake}`` (:class:`FakeFeatureSource`)."""

    #: Features added to every row: name -> a number (an FP32 ``[N]`` column) or a list of
    #: numbers (an FP32 ``[N, k]`` tensor). A request field of the same name wins.
    values: dict[str, float | list[float]] = {}
    #: Stack named columns (request fields or ``values``) into one 2-D input, as the
    #: ``request`` source does: ``{x: [a, b, c]}``.
    assemble: dict[str, list[str]] = {}
    #: Seconds each fetch waits (on the event loop, as an awaited network read would). A fetch
    #: that would outlive the request's deadline waits until the deadline and raises
    #: ``DeadlineExceeded`` (504).
    latency_s: NonNegative = 0.0
    #: Make fetches fail: ``unavailable`` raises ``FeatureStoreUnavailable`` (503),
    #: ``error`` raises ``RuntimeError`` (an unexpected failure, 500).
    fail: Literal["unavailable", "error"] | None = None
    #: With ``fail``: fail only every n-th fetch (calls n, 2n, ...); default: every fetch.
    fail_every: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: Mark every response degraded (``X-Infercore-Degraded: features``), as a store that
    #: served defaults would.
    degraded: bool = False


class FakeFeatureSource(FeatureSource):
    """A feature source with knobs: constant feature values, latency, failures, degradation.

    Attributes:
        calls: Fetches so far (failed ones included).
        rows: Rows fetched so far.
    """

    kind = "fake"
    Config = FakeFeatureSourceConfig
    config: FakeFeatureSourceConfig

    def __init__(self, config: FakeFeatureSourceConfig, context: ComponentContext) -> None:
        from infercore.builtins.features import RequestFeatureSource, RequestFeatureSourceConfig

        super().__init__(config, context)
        self.calls = 0
        self.rows = 0
        self._assembler = RequestFeatureSource(
            RequestFeatureSourceConfig(assemble=dict(config.assemble)), context
        )

    async def fetch(self, fields: Mapping[str, npt.NDArray[Any]], *, deadline: float) -> Tensors:
        self.calls += 1
        n = next((len(v) for v in fields.values() if v.ndim > 0), 1)
        self.rows += n
        cfg = self.config
        if cfg.latency_s:
            loop = asyncio.get_running_loop()
            left = deadline - loop.time()
            if left < cfg.latency_s:
                await asyncio.sleep(max(left, 0.0))
                raise DeadlineExceeded(
                    f"{self.context.path}: fake feature fetch passed the deadline"
                )
            await asyncio.sleep(cfg.latency_s)
        if cfg.fail is not None and (cfg.fail_every is None or self.calls % cfg.fail_every == 0):
            if cfg.fail == "unavailable":
                raise FeatureStoreUnavailable(f"{self.context.path}: fake feature store is down")
            raise RuntimeError("fake feature source failure")
        if cfg.degraded:
            mark_degraded("features")
        merged: dict[str, npt.NDArray[Any]] = {}
        for name, value in cfg.values.items():
            row = np.asarray(value, dtype=np.float32)
            merged[name] = np.tile(row, (n, 1)) if row.ndim else np.full(n, row)
        merged.update(fields)
        return await self._assembler.fetch(merged, deadline=deadline)


class FakePlugin:
    """A plugin object registering :class:`FakeModel` and :class:`FakeFeatureSource`.

    Pass it to ``extra_plugins`` (``[("fake", FakePlugin())]``); the recipe helpers below
    register it for you.
    """

    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [FakeModel]

    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [FakeFeatureSource]


# --- plugin managers ----------------------------------------------------------------------

#: Where :meth:`PluginSet.build` puts a component when no ``path`` is given.
DEFAULT_PATHS = {
    "model_loader": "models.m.versions.1.loader",
    "feature_source": "features",
    "batcher": "batching",
    "router": "routing",
    "drift_detector": "models.m.drift.detectors.d",
    "action": "models.m.drift.actions[0]",
}

PluginArg = object | tuple[str, object]


@dataclass(slots=True)
class PluginSet:
    """A fresh plugin manager, what it knows about each plugin, and its registry.

    Attributes:
        pm: The pluggy manager (hooks already checked with ``check_pending``).
        infos: What ``infercore plugins`` would show, by plugin name.
        registry: The kind -> class tables the ``register_*`` hooks built.
    """

    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    registry: Registry

    def kinds(self, role: str) -> dict[str, type[Component]]:
        """Classes of a role (``model_loader``, ``feature_source`` …) by kind."""
        return {kind: reg.cls for kind, reg in self.registry.kinds(role).items()}

    def plugin_of(self, role: str, kind: str) -> str:
        """The name of the plugin that registered ``kind``."""
        return self.registry.kinds(role)[kind].plugin

    def build(
        self,
        role: str,
        node: Mapping[str, Any],
        *args: Any,
        path: str | None = None,
        model_root: str | Path = ".",
        model_name: str = "m",
        version: str = "1",
    ) -> Any:
        """Validate ``node`` (``{kind: ..., **options}``) and construct the component.

        Exactly what the runtime does: options go through the kind's ``Config`` (a typo
        raises :class:`~infercore.errors.ConfigError` naming ``path``), then ``__init__``.
        Nothing is started: await ``start()`` yourself.

        Args:
            role: ``model_loader``, ``feature_source``, ``batcher``, ``router``,
                ``drift_detector`` or ``action``.
            node: The config node.
            *args: Extra constructor arguments: a batcher takes the model (and an observer).
            path: The config path in messages (default: where a recipe would put it).
            model_root: The folder artifact paths resolve inside.
            model_name: ``context.model_name``.
            version: ``context.version``.
        """
        context = ComponentContext(
            path or DEFAULT_PATHS[role],
            Path(model_root).resolve(),
            model_name=model_name,
            version=version,
        )
        return self.registry.build(role, dict(node), context, *args)


def _named(plugins: Sequence[PluginArg]) -> list[tuple[str, object]]:
    named: list[tuple[str, object]] = []
    for plugin in plugins:
        if isinstance(plugin, tuple):
            name, obj = plugin
            named.append((str(name), obj))
        elif isinstance(plugin, ModuleType):
            named.append((plugin.__name__, plugin))
        else:
            named.append((type(plugin).__name__, plugin))
    return named


@contextmanager
def _plugin_selection(entry_points: bool, plugins: list[tuple[str, object]]) -> Iterator[None]:
    """Set ``INFERCORE_LOAD_PLUGINS`` / ``INFERCORE_DISABLE_PLUGINS`` while a manager is built.

    Without ``entry_points`` no installed plugin loads, so a test sees the built-ins and the
    plugins it names, whatever else is installed. With them, an installed plugin that is also
    passed explicitly is loaded once (as passed), not twice. Not thread-safe: for tests.
    """
    saved = {k: os.environ.get(k) for k in ("INFERCORE_LOAD_PLUGINS", "INFERCORE_DISABLE_PLUGINS")}
    try:
        if not entry_points:
            os.environ["INFERCORE_LOAD_PLUGINS"] = ""
        else:
            modules = {obj.__name__ for _, obj in plugins if isinstance(obj, ModuleType)}
            same = {
                ep.name
                for ep in md.entry_points(group="infercore")
                if ep.value.split(":")[0] in modules
            }
            if same:
                deny = {d for d in (saved["INFERCORE_DISABLE_PLUGINS"] or "").split(",") if d}
                os.environ["INFERCORE_DISABLE_PLUGINS"] = ",".join(sorted(deny | same))
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plugin_manager(
    *plugins: PluginArg, entry_points: bool = False, fakes: bool = True
) -> PluginSet:
    """A fresh plugin manager with the built-ins and ``plugins``.

    Args:
        *plugins: Plugin modules or objects (named after the module, or the object's class),
            or ``(name, plugin)`` pairs.
        entry_points: Also load the installed plugins (group ``infercore``), honouring
            ``INFERCORE_LOAD_PLUGINS`` / ``INFERCORE_DISABLE_PLUGINS``. Off by default so a
            test does not depend on what else is installed.
        fakes: Register :class:`FakePlugin` as ``fake`` (``kind: fake`` model and feature
            source), e.g. to give a batcher under test a model.

    Raises:
        PluginError: A plugin does not match the hooks, or two register the same kind.
    """
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    named = _named(plugins)
    if fakes:
        named.insert(0, ("fake", FakePlugin()))
    with _plugin_selection(entry_points, named):
        pm, infos = make_plugin_manager(named)
    return PluginSet(pm, infos, Registry(pm))


# --- runtimes and apps --------------------------------------------------------------------


def composed_from_dict(
    data: dict[str, Any], *, recipes_dir: Path | None = None, choices: dict[str, str] | None = None
) -> Composed:
    """A :class:`Composed` from a plain dict, validated like a composed Hydra config."""
    config = convert(data, InfercoreConfig, path="")
    return Composed(config, data, choices or {}, [], (recipes_dir or Path.cwd()).resolve())


def fake_model_config(**options: Any) -> dict[str, Any]:
    """A one-model config serving a ``fake`` model named ``m`` (version ``1``)."""
    batching = options.pop("batching", {"kind": "none"})
    server = options.pop("server", {})
    versions = options.pop("versions", None) or {"1": {"loader": {"kind": "fake", **options}}}
    return {
        "server": server,
        "batching": batching,
        "models": {"m": {"versions": versions}},
    }


def runtime_from_dict(
    data: dict[str, Any],
    *,
    extra_plugins: list[tuple[str, object]] | None = None,
    recipes_dir: Path | None = None,
) -> Any:
    """A built (not started) runtime, with :class:`FakePlugin` and the installed plugins."""
    from infercore.runtime import Runtime

    plugins = [("fake", FakePlugin()), *(extra_plugins or [])]
    return Runtime(composed_from_dict(data, recipes_dir=recipes_dir), extra_plugins=plugins)


def runtime_from_recipe(
    recipe: dict[str, Any],
    *plugins: PluginArg,
    entry_points: bool = False,
    model_root: str | Path | None = None,
    fakes: bool = True,
) -> Runtime:
    """A built (not started) runtime from a recipe dict, with the plugins you name.

    ``recipe`` is the composed config as a dict (``models``, ``features``, ``batching`` …);
    keys it leaves out take the schema defaults (``batching: {kind: none}``,
    ``routing: {kind: single}``, ``features: {kind: request}``).

    Args:
        recipe: The config.
        *plugins: As for :func:`plugin_manager`.
        entry_points: Also load the installed plugins.
        model_root: Where relative ``model_root`` / artifact paths resolve (default: the
            current folder).
        fakes: Register :class:`FakePlugin` (``kind: fake`` model and feature source).

    Raises:
        ConfigError: The recipe, or a component's options, do not validate.
        PluginError: As for :func:`plugin_manager`.
    """
    from infercore.runtime import Runtime

    named = _named(plugins)
    if fakes:
        named.insert(0, ("fake", FakePlugin()))
    composed = composed_from_dict(
        recipe, recipes_dir=Path(model_root) if model_root is not None else None
    )
    with _plugin_selection(entry_points, named):
        return Runtime(composed, extra_plugins=named)


def app_from_recipe(
    recipe: dict[str, Any] | Runtime, *plugins: PluginArg, **options: Any
) -> Litestar:
    """The Litestar app for a recipe dict (or a built runtime); its lifespan starts the runtime.

    ``options`` are those of :func:`runtime_from_recipe`.
    """
    from infercore.server import create_app

    runtime = (
        recipe if not isinstance(recipe, dict) else runtime_from_recipe(recipe, *plugins, **options)
    )
    return create_app(runtime)


@contextmanager
def _lone_errors_unwrapped() -> Iterator[None]:
    """Re-raise an exception group holding one error as that error.

    The test client runs the app's lifespan in an anyio task group, which wraps what start-up
    or shut-down raised (a :class:`~infercore.errors.ModelLoadError` …) in an exception group;
    unwrapped, ``pytest.raises(ModelLoadError)`` sees it. A group of several errors stays.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, BaseExceptionGroup):
            raise
        # Keep the error's own chain (its cause), not the group it travelled in.
        cause, context, suppress = error.__cause__, error.__context__, error.__suppress_context__
        try:
            raise error
        finally:
            error.__cause__, error.__context__ = cause, context
            error.__suppress_context__ = suppress


@contextmanager
def app_client(runtime: Any) -> Iterator[TestClient[Litestar]]:
    """A Litestar ``TestClient`` whose lifespan starts and stops ``runtime``.

    Server errors come back as responses (500 with the problem body), as a real client sees
    them, instead of being raised into the test. An error that starting or stopping the
    runtime raises comes out as itself (a model that fails to load raises
    :class:`~infercore.errors.ModelLoadError`), not wrapped in an ``ExceptionGroup``.
    """
    from litestar.testing import TestClient

    from infercore.server import create_app

    client = TestClient(create_app(runtime), raise_server_exceptions=False)
    with _lone_errors_unwrapped():
        client.__enter__()
    try:
        yield client
    finally:
        # Only the lifespan's own errors are unwrapped: what the test body raised is untouched.
        with _lone_errors_unwrapped():
            client.__exit__(None, None, None)


@asynccontextmanager
async def async_app_client(runtime: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` over the app of ``runtime`` (started on entry, stopped on exit),
    for tests that send requests concurrently (``asyncio.gather``) on one event loop."""
    import httpx

    from infercore.server import create_app

    app = create_app(runtime, manage_runtime=False)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
    finally:
        await runtime.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in Prometheus text ``text`` whose labels include
    ``labels`` (0.0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def unrouted_counts(text: str) -> dict[str, float]:
    """What Prometheus text ``text`` counts under no model (``model=""``, ``version=""``):
    ``{"431": n, "headers_too_large": n, ...}``, the codes of ``requests_total`` and the
    reasons of ``request_failures_total``, zeros left out."""
    found: dict[str, float] = {}
    for name, label in (("requests", "code"), ("request_failures", "reason")):
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.startswith(f"infercore_{name}_total{{") and float(value):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', head))
                if labels["model"] == labels["version"] == "":
                    found[labels[label]] = found.get(labels[label], 0.0) + float(value)
    return found


@contextmanager
def recipe_client(
    recipe: dict[str, Any] | Runtime, *plugins: PluginArg, **options: Any
) -> Iterator[TestClient[Litestar]]:
    """:func:`app_client` for a recipe dict (or a built runtime)."""
    runtime = (
        recipe if not isinstance(recipe, dict) else runtime_from_recipe(recipe, *plugins, **options)
    )
    with app_client(runtime) as client:
        yield client


# --- what the pytest fixtures hand out (for annotating tests) -----------------------------


class PluginManagerFactory(Protocol):
    """The ``infercore_plugin_manager`` fixture: :func:`plugin_manager`."""

    def __call__(
        self, *plugins: PluginArg, entry_points: bool = False, fakes: bool = True
    ) -> PluginSet: ...


class RuntimeFactory(Protocol):
    """The ``infercore_runtime`` fixture: :func:`runtime_from_recipe`."""

    def __call__(
        self,
        recipe: dict[str, Any],
        *plugins: PluginArg,
        entry_points: bool = False,
        model_root: str | Path | None = None,
        fakes: bool = True,
    ) -> Runtime: ...


class AppFactory(Protocol):
    """The ``infercore_app`` fixture: :func:`app_from_recipe`."""

    def __call__(
        self, recipe: dict[str, Any] | Runtime, *plugins: PluginArg, **options: Any
    ) -> Litestar: ...


class ClientFactory(Protocol):
    """The ``infercore_client`` fixture: a started test client, closed when the test ends."""

    def __call__(
        self, recipe: dict[str, Any] | Runtime, *plugins: PluginArg, **options: Any
    ) -> TestClient[Litestar]: ...
