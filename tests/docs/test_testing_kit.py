"""infercore.testing does what docs/plugins.md ("Testing a plugin") says: the helpers, the fake
feature source's knobs, and the pytest fixtures installed through the ``pytest11`` entry point."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import infercore_lightgbm
from infercore import hookimpl
from infercore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreUnavailable,
    ModelLoadError,
    PluginError,
)
from infercore.testing import (
    ClientFactory,
    FakeFeatureSource,
    FakeModel,
    PluginManagerFactory,
    RuntimeFactory,
    app_client,
    fake_model_config,
    plugin_manager,
    recipe_client,
    runtime_from_recipe,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("INFERCORE_DISABLE_PLUGINS", raising=False)


def _fetch(source: FakeFeatureSource, deadline: float = 1e9, **fields: object) -> dict[str, list]:
    async def run() -> dict[str, list]:
        loop = asyncio.get_running_loop()
        arrays = {k: np.asarray(v) for k, v in fields.items()}
        out = await source.fetch(arrays, deadline=loop.time() + deadline)
        return {k: v.tolist() for k, v in out.items()}

    return asyncio.run(run())


def _source(**knobs: object) -> FakeFeatureSource:
    source = plugin_manager().build("feature_source", {"kind": "fake", **knobs})
    assert isinstance(source, FakeFeatureSource)
    return source


# --- the fake feature source ---------------------------------------------------------------


def test_values_add_columns_and_a_request_field_wins() -> None:
    source = _source(values={"b": 2.0, "v": [1.0, 2.0], "a": 9.0})
    out = _fetch(source, a=[1.0, 3.0])
    assert out == {"a": [1.0, 3.0], "b": [2.0, 2.0], "v": [[1.0, 2.0], [1.0, 2.0]]}
    assert (source.calls, source.rows) == (1, 2)


def test_assemble_stacks_columns() -> None:
    source = _source(values={"b": 5.0}, assemble={"x": ["a", "b"]})
    assert _fetch(source, a=[1.0, 2.0]) == {"x": [[1.0, 5.0], [2.0, 5.0]]}


def test_fail_unavailable_and_error() -> None:
    with pytest.raises(FeatureStoreUnavailable, match="features: fake feature store is down"):
        _fetch(_source(fail="unavailable"), a=[1.0])
    with pytest.raises(RuntimeError, match="fake feature source failure"):
        _fetch(_source(fail="error"), a=[1.0])


def test_fail_every_fails_every_nth_fetch() -> None:
    source = _source(fail="unavailable", fail_every=3)
    outcomes = []
    for _ in range(7):
        try:
            _fetch(source, a=[1.0])
            outcomes.append("ok")
        except FeatureStoreUnavailable:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "fail", "ok", "ok", "fail", "ok"]


def test_latency_past_the_deadline_is_deadline_exceeded() -> None:
    assert _fetch(_source(latency_s=0.01), deadline=10, a=[1.0]) == {"a": [1.0]}
    with pytest.raises(DeadlineExceeded, match="passed the deadline"):
        _fetch(_source(latency_s=5.0), deadline=0.01, a=[1.0])


def test_knob_typos_and_ranges_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"features\.latncy_s: unknown key"):
        _source(latncy_s=1)
    with pytest.raises(ConfigError, match=r"features\.fail_every"):
        _source(fail="error", fail_every=0)
    with pytest.raises(ConfigError, match=r"features\.fail"):
        _source(fail="sometimes")


def test_served_degraded_and_failing() -> None:
    recipe = fake_model_config(features=1)
    recipe["features"] = {"kind": "fake", "degraded": True}
    with recipe_client(recipe) as client:
        response = client.post("/v1/models/m:predict", json={"instances": [[4.0]]})
        assert response.status_code == 200
        assert response.headers["x-infercore-degraded"] == "features"
    recipe["features"] = {"kind": "fake", "fail": "error"}
    with recipe_client(recipe) as client:
        response = client.post("/v1/models/m:predict", json={"instances": [[4.0]]})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error", "reason": "internal"}


# --- plugin managers -----------------------------------------------------------------------


def test_no_installed_plugin_unless_asked() -> None:
    isolated = plugin_manager()
    assert "lightgbm" not in isolated.kinds("model_loader")
    assert isolated.plugin_of("model_loader", "fake") == "fake"
    installed = plugin_manager(entry_points=True)
    assert installed.plugin_of("model_loader", "lightgbm") == "lightgbm"
    assert "INFERCORE_LOAD_PLUGINS" not in os.environ  # restored


def test_an_installed_plugin_passed_explicitly_loads_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "lightgbm,onnx")
    plugins = plugin_manager(infercore_lightgbm, entry_points=True)
    assert plugins.plugin_of("model_loader", "lightgbm") == "infercore_lightgbm"
    assert plugins.plugin_of("model_loader", "onnx") == "onnx"
    assert os.environ["INFERCORE_LOAD_PLUGINS"] == "lightgbm,onnx"
    assert "INFERCORE_DISABLE_PLUGINS" not in os.environ


def test_fakes_can_be_left_out() -> None:
    assert "fake" not in plugin_manager(fakes=False).kinds("model_loader")
    assert plugin_manager(fakes=False).infos.keys() >= {"builtins.batchers"}


def test_a_plugin_that_does_not_fit_fails_as_at_start_up() -> None:
    class Clash:
        @hookimpl
        def register_model_loaders(self) -> list[type[FakeModel]]:
            return [FakeModel]

    with pytest.raises(PluginError, match="registered by two plugins: 'fake' and 'clash'"):
        plugin_manager(("clash", Clash()))


def test_build_uses_the_role_s_default_path_or_the_given_one() -> None:
    plugins = plugin_manager()
    with pytest.raises(ConfigError, match=r"^models\.m\.versions\.1\.loader\.x: unknown key"):
        plugins.build("model_loader", {"kind": "fake", "x": 1})
    with pytest.raises(ConfigError, match=r"^models\.iris\.versions\.2\.loader\.x: unknown"):
        plugins.build(
            "model_loader", {"kind": "fake", "x": 1}, path="models.iris.versions.2.loader"
        )
    model = plugins.build("model_loader", {"kind": "fake"}, model_name="iris", version="2")
    assert (model.context.model_name, model.context.version) == ("iris", "2")
    batcher = plugins.build("batcher", {"kind": "dynamic", "max_batch_size": 4}, model)
    assert batcher.model is model and batcher.context.path == "batching"


def test_runtime_from_recipe_resolves_artifacts_in_model_root(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    recipe = fake_model_config()
    runtime = runtime_from_recipe(recipe, model_root=tmp_path)
    assert runtime.composed.model_root == tmp_path.resolve()
    assert set(runtime.plugins) >= {"fake", "builtins.routers"}


# --- errors out of the test clients --------------------------------------------------------


def test_a_model_that_fails_to_load_raises_model_load_error_from_recipe_client() -> None:
    with (
        pytest.raises(ModelLoadError, match=r"^models\.m\.versions\.1\.loader: fake load failure$"),
        recipe_client(fake_model_config(fail_load=True)),
    ):
        pytest.fail("the client started a runtime whose only model failed to load")


def test_app_client_and_the_fixture_raise_the_error_itself(
    infercore_client: ClientFactory,
) -> None:
    runtime = runtime_from_recipe(fake_model_config(fail_warmup=True))
    with pytest.raises(ModelLoadError, match="fake warm-up failure"), app_client(runtime):
        pytest.fail("the client started a runtime whose only model failed to warm up")
    with pytest.raises(ModelLoadError, match="fake load failure"):
        infercore_client(fake_model_config(fail_load=True))


def test_what_the_test_body_raises_is_left_as_it_is() -> None:
    group = ExceptionGroup("raised by the test", [ValueError("one")])
    with pytest.raises(ExceptionGroup) as info, recipe_client(fake_model_config()):
        raise group
    assert info.value is group


def test_only_a_lone_error_is_unwrapped_and_keeps_its_cause() -> None:
    from infercore.testing import _lone_errors_unwrapped

    several = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
    with pytest.raises(ExceptionGroup) as group_info, _lone_errors_unwrapped():
        raise several
    assert group_info.value is several

    try:
        raise ModelLoadError("models.m.versions.1.loader: no weights") from OSError("EACCES")
    except ModelLoadError as exc:
        error = exc
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    with pytest.raises(ModelLoadError) as info, _lone_errors_unwrapped():
        raise nested
    assert info.value is error
    assert isinstance(error.__cause__, OSError)


# --- the fixtures, as a plugin's test suite gets them --------------------------------------

_SUITE = """
from infercore.testing import fake_model_config

SEEN = []


def test_fixtures(infercore_plugin_manager, infercore_runtime, infercore_app, infercore_client):
    assert "fake" in infercore_plugin_manager().kinds("model_loader")
    runtime = infercore_runtime(fake_model_config(features=2))
    assert not runtime.started
    assert infercore_app(fake_model_config()).routes
    client = infercore_client(runtime)
    assert client.post("/v1/models/m:predict", json={"instances": [[1, 2]]}).json() == {
        "predictions": [{"y": 3.0, "echo": [1.0, 2.0]}]
    }
    assert runtime.started
    SEEN.append(runtime)


def test_the_client_stopped_its_runtime():
    assert SEEN and SEEN[0].draining
"""


def test_the_fixtures_come_with_infercore(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(_SUITE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_suite.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_fixtures_here_too(
    infercore_plugin_manager: PluginManagerFactory,
    infercore_runtime: RuntimeFactory,
    infercore_client: ClientFactory,
) -> None:
    runtime = infercore_runtime(fake_model_config(latency_s=0.0))
    client = infercore_client(runtime)
    assert client.get("/v2/health/ready").status_code == 200
    model = runtime.models["m"].versions["1"].model
    client.post("/v1/models/m:predict", json={"instances": [[1, 2, 3, 4]]})
    assert isinstance(model, FakeModel) and model.calls == 1
    assert infercore_plugin_manager(fakes=False).kinds("feature_source").keys() >= {"request"}
