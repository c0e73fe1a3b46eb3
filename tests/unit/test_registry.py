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
    assert "'badcfg'" in str(info.value)
    assert "Config" in str(info.value) and "msgspec.Struct" in str(info.value)


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
