"""The kind registry: what a plugin may register, and how config nodes resolve into components."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from infercore.components import ComponentContext, Model, Router, Tensors
from infercore.errors import ConfigError, PluginError
from infercore.hookspecs import hookimpl
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import KINDS, Registry
from infercore.testing import FakeModel, FakeModelConfig, FakePlugin


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("INFERCORE_DISABLE_PLUGINS", raising=False)


def _loaders(*classes: Any) -> object:
    """A throwaway plugin whose ``register_model_loaders`` returns ``classes``."""

    class Loaders:
        @hookimpl
        def register_model_loaders(self) -> list[Any]:
            return list(classes)

    return Loaders()


def _registry(*plugins: tuple[str, object]) -> Registry:
    pm, _ = make_plugin_manager(list(plugins))
    return Registry(pm)


def _context(path: str = "models.m.versions.1.loader") -> ComponentContext:
    return ComponentContext(path, Path.cwd(), model_name="m", version="1")


class _EchoConfig(msgspec.Struct, forbid_unknown_fields=True):
    scale: float = 1.0


class _Echo(Model):
    kind = "echo-test"
    Config = _EchoConfig

    async def predict(self, inputs: Tensors) -> Tensors:
        return inputs


def test_every_role_has_a_hook_in_the_hookspecs() -> None:
    from infercore import hookspecs

    for spec in KINDS:
        assert callable(getattr(hookspecs, spec.hook))


# --- what a plugin registers ---


def test_kind_registered_by_two_plugins_names_both() -> None:
    class Other(_Echo):
        pass

    with pytest.raises(PluginError) as info:
        _registry(("first", _loaders(_Echo)), ("second", _loaders(Other)))
    text = str(info.value)
    assert "'echo-test'" in text
    assert "'first'" in text and "'second'" in text


def test_kind_clashing_with_an_installed_plugin_names_both() -> None:
    class Onnx(_Echo):
        kind = "onnx"

    with pytest.raises(PluginError) as info:
        _registry(("impostor", _loaders(Onnx)))
    assert "'onnx'" in str(info.value) and "'impostor'" in str(info.value)


def test_same_kind_in_different_roles_is_fine() -> None:
    class SingleModel(_Echo):
        kind = "single"  # also the built-in router's kind

    registry = _registry(("p", _loaders(SingleModel)))
    assert registry.kinds("model_loader")["single"].cls is SingleModel
    assert registry.kinds("router")["single"].plugin == "builtins.routers"


def test_class_without_kind_fails() -> None:
    class NoKind(Model):
        async def predict(self, inputs: Tensors) -> Tensors:
            return inputs

    with pytest.raises(PluginError) as info:
        _registry(("nokind", _loaders(NoKind)))
    assert "'nokind'" in str(info.value)
    assert "`kind`" in str(info.value)
    assert "NoKind" in str(info.value)


def test_class_with_empty_kind_fails() -> None:
    class Empty(_Echo):
        kind = ""

    with pytest.raises(PluginError, match=r"'empty'.*`kind`"):
        _registry(("empty", _loaders(Empty)))


def test_config_that_is_not_a_struct_fails() -> None:
    class DictConfig(_Echo):
        kind = "dict-config"
        Config = dict  # type: ignore[assignment]

    with pytest.raises(PluginError) as info:
        _registry(("badcfg", _loaders(DictConfig)))
    text = str(info.value)
    assert text.startswith(
        "plugin 'badcfg': register_model_loaders() returned DictConfig, whose `Config` (dict) "
        "is not a msgspec.Struct (hint: declare `class Config(msgspec.Struct, "
        "forbid_unknown_fields=True, frozen=True, kw_only=True)` in the class"
    )
    assert "<class" not in text


def test_config_that_does_not_forbid_unknown_fields_fails() -> None:
    class LooseConfig(msgspec.Struct, frozen=True, kw_only=True):
        scale: float = 1.0

    class Loose(_Echo):
        kind = "loose"
        Config = LooseConfig  # type: ignore[assignment]

    with pytest.raises(PluginError) as info:
        _registry(("loose-plugin", _loaders(Loose)))
    assert str(info.value) == (
        "plugin 'loose-plugin': register_model_loaders() returned Loose, whose `Config` "
        "(LooseConfig) does not forbid unknown fields, so a misspelled option would be ignored "
        "(hint: add forbid_unknown_fields=True to its class statement, e.g. `class "
        "LooseConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True)`)"
    )


def test_config_inheriting_forbid_unknown_fields_is_accepted() -> None:
    class Wider(_EchoConfig):
        offset: float = 0.0

    class Inherits(_Echo):
        kind = "inherits"
        Config = Wider

    registry = _registry(("inherits", _loaders(Inherits)))
    with pytest.raises(ConfigError, match=r"^m\.loader\.ofset: unknown key"):
        registry.resolve("model_loader", {"kind": "inherits", "ofset": 1}, path="m.loader")


@pytest.mark.parametrize("kind", ["Bad Kind!", "Echo", "1st", "-x", "_x", "a.b", "a" * 65])
def test_kind_that_is_not_a_valid_name_fails(kind: str) -> None:
    class Odd(_Echo):
        pass

    Odd.kind = kind
    with pytest.raises(PluginError) as info:
        _registry(("odd", _loaders(Odd)))
    assert str(info.value) == (
        f"plugin 'odd': register_model_loaders() returned Odd, whose kind {kind!r} is not a "
        "valid kind (hint: a kind is a lower-case letter followed by at most 63 lower-case "
        "letters, digits, '-' or '_', e.g. 'my-format')"
    )


@pytest.mark.parametrize("kind", ["a", "torch-gpu", "alibi-ks", "register_candidate", "a" * 64])
def test_kinds_like_the_first_party_ones_are_accepted(kind: str) -> None:
    class Fine(_Echo):
        pass

    Fine.kind = kind
    assert _registry(("fine", _loaders(Fine))).kinds("model_loader")[kind].cls is Fine


def test_every_installed_component_passes_the_checks() -> None:
    from infercore.registry import KIND_PATTERN

    # Building the registry checks every class the built-ins and installed plugins register.
    registry = _registry()
    assert "onnx" in registry.kinds("model_loader")
    assert "dynamic" in registry.kinds("batcher")
    kinds = [kind for spec in KINDS for kind in registry.kinds(spec.role)]
    assert [k for k in kinds if not KIND_PATTERN.fullmatch(k)] == []


def test_a_plain_def_where_the_base_awaits_fails_naming_the_method() -> None:
    class Blocking(Model):
        kind = "blocking"
        Config = _EchoConfig

        def predict(self, inputs: Tensors) -> Tensors:  # type: ignore[override]
            return inputs

    with pytest.raises(PluginError) as info:
        _registry(("blocking-plugin", _loaders(Blocking)))
    assert str(info.value) == (
        "plugin 'blocking-plugin': register_model_loaders() returned Blocking, whose predict() "
        "is not `async def`, but infercore awaits it (hint: declare it `async def "
        "predict(...)`; run blocking work in a thread with `await asyncio.to_thread(...)`)"
    )


def test_several_plain_defs_are_named_together() -> None:
    class Blocking(_Echo):
        kind = "blocking"

        def start(self) -> None:  # type: ignore[override]
            pass

        def warmup(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(PluginError) as info:
        _registry(("p", _loaders(Blocking)))
    text = str(info.value)
    assert "whose start(), warmup() are not `async def`, but infercore awaits them" in text
    assert "(hint: declare them `async def`;" in text


class _SyncFetch:
    @hookimpl
    def register_feature_sources(self) -> list[Any]:
        from infercore.components import FeatureSource

        class SyncFetch(FeatureSource):
            kind = "sync-fetch"

            def fetch(self, fields: Any, *, deadline: float) -> Any:
                return dict(fields)

        return [SyncFetch]


class _SyncSubmit:
    @hookimpl
    def register_batchers(self) -> list[Any]:
        from infercore.components import Batcher

        class SyncSubmit(Batcher):
            kind = "sync-submit"

            def submit(self, inputs: Any, *, deadline: float) -> Any:
                return inputs

        return [SyncSubmit]


class _SyncRun:
    @hookimpl
    def register_actions(self) -> list[Any]:
        from infercore.components import Action

        class SyncRun(Action):
            kind = "sync-run"

            def run(self, event: Any) -> Any:
                return None

        return [SyncRun]


class _SyncStop:
    @hookimpl
    def register_routers(self) -> list[Any]:
        class SyncStop(Router):
            kind = "sync-stop"

            def route(self, request: Any, table: Any) -> str:
                return "1"

            def stop(self) -> None:  # type: ignore[override]
                pass

        return [SyncStop]


@pytest.mark.parametrize(
    ("plugin", "hook", "method"),
    [
        (_SyncFetch(), "register_feature_sources", "fetch"),
        (_SyncSubmit(), "register_batchers", "submit"),
        (_SyncRun(), "register_actions", "run"),
        (_SyncStop(), "register_routers", "stop"),
    ],
)
def test_every_role_s_awaited_methods_must_be_async(plugin: object, hook: str, method: str) -> None:
    with pytest.raises(PluginError) as info:
        _registry(("sync", plugin))
    text = str(info.value)
    assert text.startswith(f"plugin 'sync': {hook}() returned Sync")
    assert f"whose {method}() is not `async def`, but infercore awaits it" in text


def test_methods_the_base_declares_plain_may_stay_plain() -> None:
    from infercore.components import DriftDetector, DriftResult

    class PlainRouter(Router):
        kind = "plain-router"

        def route(self, request: Any, table: Any) -> str:
            return "1"

    class PlainDetector(DriftDetector):
        kind = "plain-detector"

        def detect(self, window: Tensors) -> DriftResult:
            raise NotImplementedError

    class Plugin:
        @hookimpl
        def register_routers(self) -> list[Any]:
            return [PlainRouter]

        @hookimpl
        def register_drift_detectors(self) -> list[Any]:
            return [PlainDetector]

    registry = _registry(("plain", Plugin()))
    assert registry.kinds("router")["plain-router"].cls is PlainRouter
    assert registry.kinds("drift_detector")["plain-detector"].cls is PlainDetector


def test_class_of_the_wrong_role_fails() -> None:
    class NotAModel(Router):
        kind = "lost"

        def route(self, request: Any, table: Any) -> str:
            return "1"

    with pytest.raises(PluginError) as info:
        _registry(("wrongbase", _loaders(NotAModel)))
    text = str(info.value)
    assert "'wrongbase'" in text
    assert "register_model_loaders" in text
    assert "not a subclass of Model" in text


def test_something_that_is_not_a_class_fails() -> None:
    with pytest.raises(PluginError, match=r"'notclass'.*not a subclass of Model"):
        _registry(("notclass", _loaders(_Echo(_EchoConfig(), _context()))))


def test_hook_returning_a_class_not_a_list_fails() -> None:
    class Single:
        @hookimpl
        def register_model_loaders(self) -> Any:
            return _Echo

    with pytest.raises(PluginError, match=r"'single'.*must return a list"):
        _registry(("single", Single()))


def test_hook_returning_none_registers_nothing() -> None:
    class Nothing:
        @hookimpl
        def register_model_loaders(self) -> Any:
            return None

    registry = _registry(("nothing", Nothing()))
    assert "nothing" not in registry.kinds_by_plugin()


def test_hook_that_raises_is_reported_with_the_plugin_name() -> None:
    class Raises:
        @hookimpl
        def register_model_loaders(self) -> list[Any]:
            raise ImportError("libfoo.so not found")

    with pytest.raises(PluginError) as info:
        _registry(("raiser", Raises()))
    text = str(info.value)
    assert "'raiser'" in text
    assert "register_model_loaders" in text
    assert "ImportError" in text and "libfoo.so not found" in text


# --- resolve ---


@pytest.fixture
def registry() -> Registry:
    return _registry(("fake", FakePlugin()), ("echo", _loaders(_Echo)))


def test_resolve_validates_options_into_the_config(registry: Registry) -> None:
    cls, cfg = registry.resolve(
        "model_loader", {"kind": "fake", "features": 3}, path="models.m.versions.1.loader"
    )
    assert cls is FakeModel
    assert isinstance(cfg, FakeModelConfig)
    assert cfg.features == 3
    assert cfg.latency_s == 0.0


def test_resolve_missing_kind(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        registry.resolve("model_loader", {"features": 3}, path="models.m.versions.1.loader")
    text = str(info.value)
    assert text.startswith("models.m.versions.1.loader.kind: required key is missing")
    assert "fake" in text and "echo-test" in text


def test_resolve_unknown_kind_lists_the_available_kinds(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        registry.resolve("model_loader", {"kind": "fak"}, path="x.loader", context="recipe=r")
    text = str(info.value)
    assert text.startswith("x.loader.kind: unknown model_loader 'fak'; available: ")
    available = text.split("available: ")[1].split(" (")[0].split(", ")
    assert available == sorted(registry.kinds("model_loader"))
    assert "(recipe=r)" in text


def test_resolve_unknown_kind_when_none_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # infercore-torch adds a batcher of its own (torch-gpu): disabled too.
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "builtins.batchers,torch")
    registry = _registry()
    with pytest.raises(ConfigError, match=r"unknown batcher 'none'.*none installed"):
        registry.resolve("batcher", {"kind": "none"}, path="batching")


@pytest.mark.parametrize("kind", [["fake"], {"a": 1}, 3])
def test_resolve_kind_that_is_not_a_string(registry: Registry, kind: Any) -> None:
    with pytest.raises(ConfigError) as info:
        registry.resolve("model_loader", {"kind": kind}, path="m.loader")
    assert str(info.value).startswith("m.loader.kind: expected a string")


def test_resolve_node_that_is_not_a_mapping(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="batching: expected a mapping with a `kind` key"):
        registry.resolve("batcher", "dynamic", path="batching")


def test_resolve_rejected_option_names_the_path(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        registry.resolve(
            "model_loader", {"kind": "fake", "featurs": 3}, path="models.m.versions.1.loader"
        )
    text = str(info.value)
    assert text.startswith("models.m.versions.1.loader.featurs: unknown key (value 3)")
    assert "features" in text.split("valid keys here:")[1]


def test_resolve_option_of_the_wrong_type_names_the_path(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        registry.resolve("model_loader", {"kind": "fake", "features": "many"}, path="m.loader")
    text = str(info.value)
    assert text.startswith("m.loader.features: expected int, got 'many'")


def test_resolve_option_out_of_range_names_the_path(registry: Registry) -> None:
    with pytest.raises(ConfigError, match=r"^m\.loader\.features: .*>= 1"):
        registry.resolve("model_loader", {"kind": "fake", "features": 0}, path="m.loader")


def test_normalize_fills_in_defaults(registry: Registry) -> None:
    node = registry.normalize("batcher", {"kind": "dynamic", "max_batch_size": 8}, path="b")
    assert node["kind"] == "dynamic"
    assert node["max_batch_size"] == 8
    assert "max_concurrent_batches" in node


# --- build ---


def test_build_constructs_the_component(registry: Registry) -> None:
    model = registry.build("model_loader", {"kind": "echo-test", "scale": 2}, _context())
    assert isinstance(model, _Echo)
    assert model.config == _EchoConfig(scale=2.0)
    assert model.context.path == "models.m.versions.1.loader"


def test_component_whose_init_raises_names_path_kind_and_plugin() -> None:
    class Exploding(_Echo):
        kind = "exploding"

        def __init__(self, config: Any, context: ComponentContext) -> None:
            raise RuntimeError("cannot open device")

    registry = _registry(("boom-plugin", _loaders(Exploding)))
    with pytest.raises(PluginError) as info:
        registry.build(
            "model_loader", {"kind": "exploding"}, _context("models.m.versions.2.loader")
        )
    text = str(info.value)
    assert text.startswith("models.m.versions.2.loader:")
    assert "'exploding'" in text
    assert "'boom-plugin'" in text
    assert "RuntimeError" in text and "cannot open device" in text


def test_class_that_does_not_implement_its_role_fails() -> None:
    class Abstract(Model):
        kind = "abstract"

    with pytest.raises(PluginError, match=r"'lazy'.*does not implement predict"):
        _registry(("lazy", _loaders(Abstract)))


def test_config_error_from_init_stays_a_config_error() -> None:
    class Picky(_Echo):
        kind = "picky"

        def __init__(self, config: Any, context: ComponentContext) -> None:
            raise ConfigError(f"{context.path}.scale: must be positive")

    registry = _registry(("picky", _loaders(Picky)))
    with pytest.raises(ConfigError, match=r"^m\.loader\.scale: must be positive"):
        registry.build("model_loader", {"kind": "picky"}, _context("m.loader"))
