"""The plugin manager: built-ins, entry points, allow/deny lists, and plugins that are wrong."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from infercore import hookspecs
from infercore.components import (
    Action,
    DriftDetector,
    DriftEvent,
    DriftResult,
    FeatureSource,
    Model,
    Router,
    RouteRequest,
    RoutingTable,
    Tensors,
)
from infercore.errors import ConfigError, PluginError
from infercore.hookspecs import hookimpl
from infercore.plugin_manager import BUILTIN_PLUGINS, make_plugin_manager
from infercore.registry import Registry
from infercore.testing import (
    FakeModel,
    FakePlugin,
    app_client,
    fake_model_config,
    runtime_from_dict,
)

TESTS = Path(__file__).resolve().parents[1]
BUILTIN_NAMES = [name for name, _ in BUILTIN_PLUGINS]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("INFERCORE_DISABLE_PLUGINS", raising=False)


def _kinds(role: str, extra: list[tuple[str, object]] | None = None) -> set[str]:
    pm, _ = make_plugin_manager(extra)
    return set(Registry(pm).kinds(role))


# --- one manager per call ---


def test_each_call_builds_a_fresh_manager() -> None:
    pm1, infos1 = make_plugin_manager([("fake", FakePlugin())])
    pm2, infos2 = make_plugin_manager()
    assert pm1 is not pm2
    assert pm1.has_plugin("fake")
    assert not pm2.has_plugin("fake")
    assert "fake" in infos1 and "fake" not in infos2
    assert "fake" in Registry(pm1).kinds("model_loader")
    assert "fake" not in Registry(pm2).kinds("model_loader")


def test_registering_on_one_manager_does_not_leak_into_the_next() -> None:
    pm1, _ = make_plugin_manager()
    pm1.register(FakePlugin(), name="late")
    pm1.unregister(name="builtins.routers")
    pm2, _ = make_plugin_manager()
    assert not pm2.has_plugin("late")
    assert pm2.has_plugin("builtins.routers")
    assert "single" in Registry(pm2).kinds("router")


# --- what is installed ---


def test_builtins_are_present_with_their_kinds() -> None:
    pm, infos = make_plugin_manager()
    registry = Registry(pm)
    for name in BUILTIN_NAMES:
        assert pm.has_plugin(name)
        assert infos[name].builtin
        assert infos[name].distribution == "infercore"
        assert infos[name].license == "Apache-2.0"
    assert set(registry.kinds("batcher")) >= {"none", "dynamic"}
    assert set(registry.kinds("router")) >= {"single"}
    assert set(registry.kinds("feature_source")) >= {"request"}
    by_plugin = registry.kinds_by_plugin()
    assert set(by_plugin["builtins.batchers"]["batcher"]) == {"none", "dynamic", "adaptive"}
    assert "single" in by_plugin["builtins.routers"]["router"]


def test_first_party_plugins_come_from_entry_points() -> None:
    pm, infos = make_plugin_manager()
    registry = Registry(pm)
    for name in ("onnx", "sklearn"):
        assert not infos[name].builtin
        assert infos[name].distribution == f"infercore-{name}"
        assert infos[name].license == "Apache-2.0"
        assert re.fullmatch(r"\d+\.\d+.*", infos[name].version)
        assert registry.kinds("model_loader")[name].plugin == name


# --- INFERCORE_LOAD_PLUGINS / INFERCORE_DISABLE_PLUGINS ---


def test_disable_removes_a_plugin_and_its_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "sklearn")
    pm, infos = make_plugin_manager()
    assert "sklearn" not in infos
    assert not pm.has_plugin("sklearn")
    kinds = set(Registry(pm).kinds("model_loader"))
    assert "sklearn" not in kinds
    assert "onnx" in kinds


def test_disable_takes_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", " sklearn , onnx , lightgbm, torch,")
    assert _kinds("model_loader") == set()


def test_load_is_an_allow_list_of_external_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "onnx")
    pm, infos = make_plugin_manager()
    external = {name for name, info in infos.items() if not info.builtin}
    assert external == {"onnx"}
    assert set(Registry(pm).kinds("model_loader")) == {"onnx"}
    for name in BUILTIN_NAMES:  # built-ins are not external: always loaded
        assert name in infos


def test_empty_load_list_loads_no_external_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "")
    pm, infos = make_plugin_manager()
    assert all(info.builtin for info in infos.values())
    assert Registry(pm).kinds("model_loader") == {}
    assert "dynamic" in Registry(pm).kinds("batcher")


def test_disable_wins_over_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "onnx,sklearn")
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "onnx")
    assert _kinds("model_loader") == {"sklearn"}


def test_a_builtin_is_disabled_by_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # infercore-torch adds a batcher of its own (torch-gpu): disabled too.
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "builtins.batchers,torch")
    pm, infos = make_plugin_manager()
    assert "builtins.batchers" not in infos
    assert Registry(pm).kinds("batcher") == {}
    assert "single" in Registry(pm).kinds("router")


@pytest.mark.parametrize("variable", ["INFERCORE_LOAD_PLUGINS", "INFERCORE_DISABLE_PLUGINS"])
def test_a_name_that_matches_no_plugin_is_a_warning_with_a_guess(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str
) -> None:
    monkeypatch.setenv(variable, "onxx,sklearn")
    with caplog.at_level("WARNING", logger="infercore.plugins"):
        make_plugin_manager()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{variable} names 'onxx', which is no installed plugin")
    assert "did you mean 'onnx'?" in warnings[0]


def test_known_names_and_builtins_are_no_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "onnx,builtins.batchers")
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "torch,builtins.routers")
    with caplog.at_level("WARNING", logger="infercore.plugins"):
        make_plugin_manager()
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_an_unknown_kind_says_when_its_plugin_is_filtered_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from infercore.errors import ConfigError

    def hint(kind: str) -> str:
        pm, _ = make_plugin_manager()
        with pytest.raises(ConfigError) as info:
            Registry(pm).resolve("model_loader", {"kind": kind}, path="loader")
        return info.value.hint or ""

    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "onxx")
    assert hint("onnx") == (
        "the plugin 'onnx' is installed but INFERCORE_LOAD_PLUGINS leaves it out; add it there"
    )
    monkeypatch.delenv("INFERCORE_LOAD_PLUGINS")
    monkeypatch.setenv("INFERCORE_DISABLE_PLUGINS", "sklearn")
    assert hint("sklearn") == (
        "the plugin 'sklearn' is installed but INFERCORE_DISABLE_PLUGINS leaves it out; "
        "remove it there"
    )
    # A kind whose plugin has another name: the plugins left out are listed.
    assert "sklearn (INFERCORE_DISABLE_PLUGINS)" in hint("skops")
    monkeypatch.delenv("INFERCORE_DISABLE_PLUGINS")
    assert hint("nope") == "install the plugin that provides it (see `infercore plugins`)"


def test_extra_plugins_are_registered_and_listed() -> None:
    pm, infos = make_plugin_manager([("fake", FakePlugin())])
    assert infos["fake"].distribution == "FakePlugin"
    assert not infos["fake"].builtin
    assert Registry(pm).kinds("model_loader")["fake"].cls is FakeModel


# --- plugins that do not match the hooks ---


def test_misspelled_hook_name_fails_naming_the_plugin() -> None:
    class Typo:
        @hookimpl
        def register_model_loader(self) -> list[type[Model]]:
            return [FakeModel]

    with pytest.raises(PluginError) as info:
        make_plugin_manager([("typo-plugin", Typo())])
    text = str(info.value)
    assert "'typo-plugin'" in text
    assert "register_model_loader" in text
    assert "register_model_loaders" in text  # the hint names a real hook


def test_wrong_argument_name_fails_naming_the_plugin() -> None:
    class WrongArgs:
        @hookimpl
        def register_routes(self, app: Any) -> list[Any]:
            return []

    with pytest.raises(PluginError) as info:
        make_plugin_manager([("wrong-args", WrongArgs())])
    text = str(info.value)
    assert "'wrong-args'" in text
    assert "app" in text


def test_argument_on_a_hook_without_arguments_fails() -> None:
    class ExtraArg:
        @hookimpl
        def register_batchers(self, config: Any) -> list[Any]:
            return []

    with pytest.raises(PluginError, match="'extra-arg'"):
        make_plugin_manager([("extra-arg", ExtraArg())])


def test_plugin_name_already_taken_fails_clearly() -> None:
    with pytest.raises(PluginError) as info:
        make_plugin_manager([("onnx", FakePlugin())])
    assert "'onnx'" in str(info.value)


def test_same_plugin_object_twice_fails_clearly() -> None:
    plugin = FakePlugin()
    with pytest.raises(PluginError) as info:
        make_plugin_manager([("one", plugin), ("two", plugin)])
    assert "'two'" in str(info.value)


# --- hooks: every hookspec is exercised here or elsewhere in tests/ ---


class _Detector(DriftDetector):
    kind = "always"

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult(detector=self.kind, drift=True)


class _ActionConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "http://localhost/hook"


class _Action(Action):
    kind = "remember"
    Config = _ActionConfig

    async def run(self, event: DriftEvent) -> None:
        return None


class _Features(FeatureSource):
    kind = "nothing"

    async def fetch(self, fields: Any, *, deadline: float) -> Tensors:
        return dict(fields)


class _Router(Router):
    kind = "first"

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        return sorted(table.ready)[0]


class _AllHooks:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [FakeModel]

    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [_Features]

    @hookimpl
    def register_routers(self) -> list[type[Router]]:
        return [_Router]

    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [_Detector]

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        return [_Action]


def test_every_register_hook_adds_its_kinds() -> None:
    pm, _ = make_plugin_manager([("all", _AllHooks())])
    registry = Registry(pm)
    assert registry.kinds("model_loader")["fake"].plugin == "all"
    assert registry.kinds("feature_source")["nothing"].cls is _Features
    assert registry.kinds("router")["first"].cls is _Router
    assert registry.kinds("drift_detector")["always"].cls is _Detector
    assert registry.kinds("action")["remember"].cls is _Action
    assert registry.kinds_by_plugin()["all"] == {
        "model_loader": ["fake"],
        "feature_source": ["nothing"],
        "router": ["first"],
        "drift_detector": ["always"],
        "action": ["remember"],
    }
    cls, cfg = registry.resolve("action", {"kind": "remember", "url": "http://x"}, path="a")
    assert cls is _Action
    assert isinstance(cfg, _ActionConfig) and cfg.url == "http://x"


def test_register_batchers_from_a_plugin() -> None:
    from infercore.builtins.batchers import NoBatcher

    class Named(NoBatcher):
        kind = "named"

    class Batchers:
        @hookimpl
        def register_batchers(self) -> list[type[Any]]:
            return [Named]

    pm, _ = make_plugin_manager([("batchers", Batchers())])
    assert Registry(pm).kinds("batcher")["named"].plugin == "batchers"


def test_register_routes_mounts_a_handler() -> None:
    from litestar import get

    @get("/-/echo-plugin", sync_to_thread=False)
    def echo_plugin() -> dict[str, str]:
        return {"plugin": "routes"}

    seen: list[Any] = []

    class Routes:
        @hookimpl
        def register_routes(self, runtime: Any) -> list[Any]:
            seen.append(runtime)
            return [echo_plugin]

    runtime = runtime_from_dict(fake_model_config(), extra_plugins=[("routes", Routes())])
    assert runtime.registry.routes(runtime) == [echo_plugin]
    with app_client(runtime) as client:
        response = client.get("/-/echo-plugin")
        assert response.status_code == 200
        assert response.json() == {"plugin": "routes"}
    assert seen and seen[-1] is runtime


def test_register_routes_that_raises_names_the_plugin() -> None:
    class Broken:
        @hookimpl
        def register_routes(self, runtime: Any) -> list[Any]:
            raise RuntimeError("no routes today")

    pm, _ = make_plugin_manager([("broken-routes", Broken())])
    with pytest.raises(PluginError) as info:
        Registry(pm).routes(runtime=None)
    assert "'broken-routes'" in str(info.value)
    assert "no routes today" in str(info.value)


def test_register_routes_must_return_a_list() -> None:
    class NotAList:
        @hookimpl
        def register_routes(self, runtime: Any) -> Any:
            return "oops"

    pm, _ = make_plugin_manager([("str-routes", NotAList())])
    with pytest.raises(PluginError, match=r"'str-routes'.*list"):
        Registry(pm).routes(runtime=None)


def _hook_names() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if getattr(fn, "infercore_spec", None) is not None
    ]


def test_hookspecs_are_found() -> None:
    names = _hook_names()
    assert "register_model_loaders" in names
    assert "register_routes" in names
    assert "hookimpl" not in names


def test_every_hookspec_has_a_test() -> None:
    text = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    # A hook counts as tested when some test implements it (`def register_…(`).
    untested = [name for name in _hook_names() if f"def {name}(" not in text]
    assert untested == [], f"hooks no test implements: {untested}"


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "0.1"
        self.metadata: dict[str, Any] = {}


class _FakeEntryPoint:
    """An entry point of group ``infercore`` from distribution ``dist``."""

    def __init__(self, name: str, dist: str, plugin: object) -> None:
        self.name, self.value, self.dist = name, f"{dist}:plugin", _FakeDist(dist)
        self._plugin = plugin

    def load(self) -> object:
        return self._plugin


def _with_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: _FakeEntryPoint) -> None:
    import infercore.plugin_manager as manager

    monkeypatch.setattr(manager.md, "entry_points", lambda group: list(eps))
    monkeypatch.setattr(manager, "_licence", lambda dist: "MIT")


class _Loaders:
    @hookimpl
    def register_model_loaders(self) -> list[Any]:
        return []


@pytest.mark.parametrize(
    ("eps", "message"),
    [
        # Two distributions claim one plugin name: which one won depended on sys.path order.
        (
            [("onnx", "infercore-onnx"), ("onnx", "evil-onnx")],
            "plugin name 'onnx' of evil-onnx is taken by infercore-onnx",
        ),
        # A distribution that names its plugin like a built-in.
        (
            [("builtins.features", "other-features")],
            "plugin name 'builtins.features' of other-features is taken by infercore (a built-in)",
        ),
    ],
)
def test_a_plugin_name_two_distributions_claim_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch, eps: list[tuple[str, str]], message: str
) -> None:
    _with_entry_points(monkeypatch, *(_FakeEntryPoint(n, d, _Loaders()) for n, d in eps))
    with pytest.raises(PluginError, match=re.escape(message)):
        make_plugin_manager()


def test_the_same_distribution_seen_twice_is_registered_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin = _Loaders()
    twice = [_FakeEntryPoint("onnx", "infercore-onnx", plugin) for _ in range(2)]
    _with_entry_points(monkeypatch, *twice)
    pm, infos = make_plugin_manager()
    assert pm.get_plugin("onnx") is plugin and infos["onnx"].distribution == "infercore-onnx"


class _Broken(_FakeEntryPoint):
    """An entry point whose module raises ``exc`` on import."""

    def __init__(self, name: str, exc: Exception) -> None:
        super().__init__(name, f"infercore-{name}", None)
        self.exc = exc

    def load(self) -> object:
        raise self.exc


def _syntax_error() -> SyntaxError:
    try:
        compile("def f(:\n", "/home/me/src/infercore_bad/action.py", "exec")
    except SyntaxError as exc:
        return exc
    raise AssertionError("compiled")


@pytest.mark.parametrize(
    ("exc", "hint"),
    [
        (_syntax_error(), "fix the syntax error (line 1 of action.py), or skip it with"),
        (
            ModuleNotFoundError("No module named 'sklearnx'", name="sklearnx"),
            "install 'sklearnx', which the plugin imports (or reinstall it), or skip it with",
        ),
        (RuntimeError("boom"), "reinstall it, or skip it with"),
    ],
    ids=["syntax", "missing-module", "other"],
)
def test_a_plugin_that_fails_to_import_says_what_to_fix(
    monkeypatch: pytest.MonkeyPatch, exc: Exception, hint: str
) -> None:
    _with_entry_points(monkeypatch, _Broken("bad", exc))
    with pytest.raises(PluginError) as info:
        make_plugin_manager()
    assert info.value.hint is not None and info.value.hint.startswith(hint)
    assert info.value.hint.endswith("INFERCORE_DISABLE_PLUGINS=bad")
    assert "/home/me" not in str(info.value)


def test_the_plugins_command_lists_the_others_and_names_a_broken_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infercore import cli

    _with_entry_points(
        monkeypatch,
        _FakeEntryPoint("good", "infercore-good", _Loaders()),
        _Broken("bad", _syntax_error()),
    )
    with pytest.raises(SystemExit) as exited:
        cli.main(["plugins"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    table = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "good" in table and "builtins.batchers" in table  # the rest is still listed
    assert table["bad"].rstrip().endswith("failed to import (below)")
    assert err.splitlines()[-1].startswith(
        "infercore: error: plugin 'bad' (infercore-bad:plugin) failed to import: SyntaxError:"
    )
    assert "fix the syntax error (line 1 of action.py)" in err


def test_a_misspelt_hook_names_the_module_not_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    module = types.ModuleType("infercore_typo")
    module.__file__ = "/home/me/site-packages/infercore_typo/__init__.py"

    @hookimpl
    def register_model_loader() -> list[Any]:  # the hook is register_model_loaders
        return []

    module.register_model_loader = register_model_loader  # type: ignore[attr-defined]
    _with_entry_points(monkeypatch, _FakeEntryPoint("typo", "infercore-typo", module))
    with pytest.raises(PluginError, match="does not define") as info:
        make_plugin_manager()
    assert "/home/me" not in str(info.value) and "infercore_typo" in str(info.value)


def test_an_unknown_kind_declared_in_another_entry_point_group_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import infercore.plugin_manager as manager
    from infercore.components import ComponentContext

    class _Dist:
        name = "infercore-fr"
        entry_points = [
            type("EP", (), {"group": "infercore_plugins", "name": "fr"})(),
            type("EP", (), {"group": "console_scripts", "name": "fr"})(),
        ]

    with pytest.MonkeyPatch.context() as only_here:  # importlib's entry_points() reads it too
        only_here.setattr(manager.md, "distributions", lambda: [_Dist()])
        found = manager.misgrouped_entry_points()
    assert found == [("infercore-fr", "infercore_plugins", "fr")]
    import infercore.registry as registry_module

    monkeypatch.setattr(registry_module, "misgrouped_entry_points", lambda: found)
    registry = Registry(make_plugin_manager()[0])
    with pytest.raises(ConfigError) as info:
        registry.build("router", {"kind": "fr"}, ComponentContext("routing", Path(".")))
    assert info.value.message.startswith("routing.kind: unknown router 'fr'")
    assert info.value.hint == (
        "infercore-fr declares 'fr' as an entry point of group 'infercore_plugins'; infercore "
        "reads the group 'infercore': [project.entry-points.infercore] in its pyproject.toml, "
        "then reinstall it"
    )
    with pytest.raises(ConfigError) as other:
        registry.build("router", {"kind": "nope"}, ComponentContext("routing", Path(".")))
    assert other.value.hint == "install the plugin that provides it (see `infercore plugins`)"
