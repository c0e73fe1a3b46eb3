"""Composing and validating configs: every shipped recipe, every environment, every error."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from infercore.config.compose import Composed, compose, redact
from infercore.errors import ConfigError
from infercore.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
RECIPES_DIR = REPO / "recipes"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
ENVS = sorted(p.stem for p in (CONF / "env").glob("*.yaml"))
DEPLOYS = sorted(p.stem for p in (CONF / "deploy").glob("*.yaml"))

#: Top-level keys a recipe may set (pipeline keys) and an env file may set (deployment keys).
RECIPE_KEYS = {
    "description",
    "features",
    "batching",
    "routing",
    "models",
    "model_root",
    "defaults",
}
DEPLOYMENT_KEYS = {"server", "feature_store", "admin", "defaults"}

_ENV_VARS = (
    "INFERCORE_PORT",
    "INFERCORE_HOST",
    "INFERCORE_RECIPES_DIR",
    "INFERCORE_CONF_DIR",
    "INFERCORE_LOAD_PLUGINS",
    "INFERCORE_DISABLE_PLUGINS",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return data or {}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _recipe(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / f"{name}.yaml").write_text("# @package _global_\n" + textwrap.dedent(body))
    return tmp_path


def _error(overrides: list[str], *, recipes_dir: Path = RECIPES_DIR) -> str:
    """The one-line message of the ConfigError composing (and building) ``overrides`` raises."""
    with pytest.raises(ConfigError) as info:
        Runtime(compose(overrides, recipes_dir=recipes_dir))
    text = str(info.value)
    assert "\n" not in text, text
    return text


def test_there_are_shipped_recipes_and_environments() -> None:
    assert "iris" in RECIPES
    assert ENVS == ["dev", "prod", "staging"]
    assert DEPLOYS == ["k8s", "sidecar", "standalone"]


@pytest.mark.parametrize("deploy", DEPLOYS)
@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates_in_every_env_and_deploy(
    recipe: str, env: str, deploy: str
) -> None:
    composed = compose(
        [f"+recipe={recipe}", f"env={env}", f"deploy={deploy}"], recipes_dir=RECIPES_DIR
    )
    assert composed.choices["recipe"] == recipe
    assert composed.choices["env"] == env
    assert composed.choices["deploy"] == deploy
    assert composed.config.models, f"recipe {recipe} serves no model"
    runtime = Runtime(composed)  # resolves every component node against its kind
    assert set(runtime.models) == set(composed.config.models)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_files_set_only_pipeline_keys(recipe: str) -> None:
    path = RECIPES_DIR / f"{recipe}.yaml"
    assert path.read_text().startswith("# @package _global_"), path
    keys = set(_yaml(path))
    assert keys <= RECIPE_KEYS, f"{path.name} sets {sorted(keys - RECIPE_KEYS)}"


@pytest.mark.parametrize("group", ["env", "deploy"])
def test_env_and_deploy_files_set_only_deployment_keys(group: str) -> None:
    for path in sorted((CONF / group).glob("*.yaml")):
        keys = set(_yaml(path))
        assert keys <= DEPLOYMENT_KEYS, f"{group}/{path.name} sets {sorted(keys - DEPLOYMENT_KEYS)}"


def test_recipe_keys_and_env_keys_are_disjoint() -> None:
    recipe_keys = set().union(*(set(_yaml(RECIPES_DIR / f"{r}.yaml")) for r in RECIPES))
    env_keys = set().union(
        *(set(_yaml(p)) for group in ("env", "deploy") for p in (CONF / group).glob("*.yaml"))
    )
    assert recipe_keys & env_keys <= {"defaults"}
    assert "server" not in recipe_keys
    assert "feature_store" not in recipe_keys


@pytest.mark.parametrize("env", ["staging", "prod"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_env_changes_only_deployment_keys(recipe: str, env: str) -> None:
    dev = _flatten(compose([f"+recipe={recipe}", "env=dev"], recipes_dir=RECIPES_DIR).data)
    other = _flatten(compose([f"+recipe={recipe}", f"env={env}"], recipes_dir=RECIPES_DIR).data)
    changed = {k for k in dev.keys() | other.keys() if dev.get(k, ...) != other.get(k, ...)}
    assert changed, f"env={env} changes nothing"
    # A recipe key may change only by interpolating a deployment key (e.g. the online store).
    raw = _flatten(_yaml(RECIPES_DIR / f"{recipe}.yaml"))
    derived = {k for k, v in raw.items() if isinstance(v, str) and "${feature_store." in v}
    outside = {
        k for k in changed if not k.startswith(("server.", "feature_store.")) and k not in derived
    }
    assert not outside, sorted(outside)


def test_prod_reads_port_and_host_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    default = compose(["+recipe=iris", "env=prod"], recipes_dir=RECIPES_DIR)
    assert default.config.server.port == 8080
    monkeypatch.setenv("INFERCORE_PORT", "9123")
    monkeypatch.setenv("INFERCORE_HOST", "0.0.0.0")
    composed = compose(["+recipe=iris", "env=prod"], recipes_dir=RECIPES_DIR)
    assert composed.config.server.port == 9123
    assert isinstance(composed.config.server.port, int)
    assert composed.config.server.host == "0.0.0.0"
    assert composed.config.server.log_format == "json"


def test_prod_port_set_but_empty_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set but empty is not unset: the default does not apply, and "" fails to decode (a raw
    # GrammarParseError before).
    monkeypatch.setenv("INFERCORE_PORT", "")
    text = _error(["+recipe=iris", "env=prod"])
    assert text.startswith("server.port: the environment variable INFERCORE_PORT is set but empty")
    assert "unset it to use the default" in text and "Grammar" not in text


def test_prod_port_that_does_not_parse_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("{a: 1", "${hunter2", "${hunter2}"):
        monkeypatch.setenv("INFERCORE_PORT", value)
        text = _error(["+recipe=iris", "env=prod"])
        assert text.startswith(
            "server.port: the environment variable INFERCORE_PORT does not parse as a value"
        ), text
        assert "set INFERCORE_PORT to a plain value" in text
        # Its value is not shown, nor Hydra's line quoting it: it may be a secret elsewhere.
        assert "a: 1" not in text and "hunter2" not in text, text


def test_prod_port_that_is_not_a_number_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_PORT", "eighty")
    text = _error(["+recipe=iris", "env=prod"])
    assert text.startswith("server.port:")
    assert "'eighty'" in text
    assert "expected int" in text


def test_command_line_override_beats_the_recipe_and_env() -> None:
    composed = compose(
        ["+recipe=iris", "env=prod", "server.port=9001", "batching.max_batch_size=7"],
        recipes_dir=RECIPES_DIR,
    )
    assert composed.config.server.port == 9001
    assert composed.config.batching["max_batch_size"] == 7
    assert composed.label == "recipe=iris"


def test_default_groups_without_a_recipe() -> None:
    composed = compose([], recipes_dir=RECIPES_DIR)
    assert composed.config.models == {}
    assert composed.config.batching == {"kind": "none"}
    assert composed.label == ""


# --- errors: one line naming the path, the bad value, what was expected and the choices ---


def test_wrong_type_in_override() -> None:
    text = _error(["+recipe=iris", "batching.max_batch_size=abc"])
    assert text.startswith("batching.max_batch_size:")
    assert "expected int" in text
    assert "'abc'" in text
    assert "recipe=iris" in text


def test_value_out_of_range_names_the_path() -> None:
    text = _error(["+recipe=iris", "batching.max_batch_size=0"])
    assert text.startswith("batching.max_batch_size:")
    assert ">= 1" in text
    assert "0" in text


@pytest.mark.parametrize(
    ("override", "message", "hint"),
    [
        ("server.port=99999", "server.port: expected `int` <= 65535 (value 99999)", "<= 65535"),
        # workers also takes `auto`: the bound alone would hide it.
        ("server.workers=0", "server.workers: expected `int` >= 1 or 'auto'", ">= 1 or 'auto'"),
        ("server.host=", "server.host: expected `str` of length >= 1", "of length >= 1"),
    ],
)
def test_a_value_out_of_range_gets_a_hint_with_the_bound(
    override: str, message: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Runtime(compose(["+recipe=iris", override], recipes_dir=RECIPES_DIR))
    assert info.value.message.startswith(message), info.value.message
    assert info.value.hint == f"use a value {hint}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # An empty host made uvicorn listen on every interface (S9).
        ("server.host=", "server.host: expected `str` of length >= 1 (value '')"),
        ("server.port=70000", "server.port: expected `int` <= 65535"),  # bound port 4464
        ("server.port=-1", "server.port: expected `int` >= 0"),
        # Zero limits refused every request; inf or 1e300 never let the server stop.
        ("server.max_body_bytes=0", "server.max_body_bytes: expected `int` >= 1"),
        ("server.max_request_rows=0", "server.max_request_rows: expected `int` >= 1"),
        ("server.request_timeout_ms=-1", "server.request_timeout_ms: expected `int` >= 1"),
        ("server.graceful_timeout_s=inf", "server.graceful_timeout_s: expected `float` <= 3600"),
        ("server.drain_delay_s=1e300", "server.drain_delay_s: expected `float` <= 3600"),
    ],
)
def test_server_limits_are_finite_and_the_host_not_empty(override: str, expected: str) -> None:
    assert _error(["+recipe=iris", override]).startswith(expected)


def test_an_empty_host_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_HOST", "")  # set but empty: oc.env's default does not apply
    assert _error(["+recipe=iris", "env=prod"]).startswith("server.host:")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("server.log_level=DEBUG", "server.log_level: 'DEBUG' is not one of: debug, info,"),
        ("server.workers=Auto", "server.workers: 'Auto' is not one of: auto (or an int)"),
        (
            "++models.iris.versions.1.loader.device=gpu",
            "models.iris.versions.1.loader.device: 'gpu' is not one of: auto, cpu, cuda",
        ),
    ],
)
def test_a_value_outside_a_fixed_set_lists_the_choices(override: str, expected: str) -> None:
    text = _error(["+recipe=iris", override])
    assert text.startswith(expected), text
    assert "case-sensitive" in text


def test_typo_in_existing_key_without_plus() -> None:
    text = _error(["+recipe=iris", "batching.max_bach_size=3"])
    assert text.startswith("batching.max_bach_size:")
    assert "'3'" in text
    assert "max_batch_size" in text.split("keys here:")[1]
    assert "+batching.max_bach_size=3" in text


def test_typo_in_a_missing_parent_names_the_first_missing_key() -> None:
    text = _error(["+recipe=iris", "models.irs.versions.1.loader.path=x.onnx"])
    assert text.startswith("models.irs:")
    assert "iris" in text.split("keys here:")[1]


def test_schema_key_the_config_does_not_set_needs_plus() -> None:
    # A valid key the recipe leaves unset: not "no such key" beside a list that names it.
    text = _error(["+recipe=iris", "models.iris.primary=1"])
    assert text.startswith("models.iris.primary: a valid key the composed config does not set")
    assert "no such key" not in text and "(hint: add it: +models.iris.primary=1)" in text


def test_typo_with_plus_lists_the_valid_keys() -> None:
    text = _error(["+recipe=iris", "+batching.max_bach_size=3"])
    assert text.startswith("batching.max_bach_size:")
    assert "unknown key" in text
    assert "3" in text
    valid = text.split("valid keys here:")[1]
    for key in ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "queue_timeout_ms"):
        assert key in valid


def test_typo_with_plus_in_a_schema_node() -> None:
    text = _error(["+recipe=iris", "+server.prot=1"])
    assert text.startswith("server.prot:")
    assert "port" in text.split("valid keys here:")[1]


def test_unknown_kind_lists_available_kinds() -> None:
    text = _error(["+recipe=iris", "models.iris.versions.1.loader.kind=onx"])
    assert text.startswith("models.iris.versions.1.loader.kind:")
    assert "'onx'" in text
    available = text.split("available:")[1]
    assert "onnx" in available
    assert "sklearn" in available


def test_unknown_batcher_kind() -> None:
    text = _error(["+recipe=iris", "batching.kind=dynamc"])
    assert text.startswith("batching.kind:")
    assert "'dynamc'" in text
    assert "dynamic, none" in text


# --- an override that picks another kind keeps the node's other keys ---

_ONNX_TUNED = """\
models:
  m:
    versions:
      "1":
        loader: {kind: onnx, path: iris/artifacts/model.onnx, intra_op_num_threads: 2}
"""
_LOADER = "models.m.versions.1.loader"


@pytest.mark.parametrize(
    "override",
    [
        f"{_LOADER}.kind=sklearn",
        f"{_LOADER}={{kind: sklearn, path: iris/model.skops}}",
        f"++{_LOADER}={{kind: sklearn, path: iris/model.skops}}",
    ],
)
def test_an_override_that_picks_another_loader_names_the_key_the_recipe_kept(
    tmp_path: Path, override: str
) -> None:
    _recipe(tmp_path, "tuned", _ONNX_TUNED)
    text = _error(["+recipe=tuned", override], recipes_dir=tmp_path)
    assert text.startswith(
        f"{_LOADER}.intra_op_num_threads: not a key of model_loader 'sklearn' (value 2): "
        f"it comes from recipe=tuned, and the override {override} sets only the keys it names"
    )
    assert "valid keys here: path, format" in text
    assert f"(hint: remove it: ~{_LOADER}.intra_op_num_threads" in text
    # The hint works: the key goes, the rest of the override stays.
    fixed = compose(
        ["+recipe=tuned", override, f"~{_LOADER}.intra_op_num_threads"], recipes_dir=tmp_path
    )
    loader = fixed.data["models"]["m"]["versions"]["1"]["loader"]
    assert loader["kind"] == "sklearn" and "intra_op_num_threads" not in loader


def test_a_mapping_override_may_replace_the_node_whole_instead(tmp_path: Path) -> None:
    _recipe(tmp_path, "tuned", _ONNX_TUNED)
    override = f"{_LOADER}={{kind: sklearn, path: iris/model.skops}}"
    text = _error(["+recipe=tuned", override], recipes_dir=tmp_path)
    assert text.endswith(f"; or replace the node whole: ~{_LOADER} +{override})")
    whole = [f"~{_LOADER}", f"+{override}"]
    loader = compose(["+recipe=tuned", *whole], recipes_dir=tmp_path).data["models"]["m"]
    assert loader["versions"]["1"]["loader"] == {"kind": "sklearn", "path": "iris/model.skops"}


def test_a_group_option_that_picks_another_batcher_names_every_key_the_recipe_kept() -> None:
    # fraud sets batching.max_batch_size and max_queue_delay_ms; the none batcher has neither.
    text = _error(["+recipe=fraud", "batching=none"])
    assert text.startswith(
        "batching.max_batch_size: not a key of batcher 'none' (value 64) (also "
        "max_queue_delay_ms): it comes from recipe=fraud, and the override batching=none"
    )
    assert text.endswith(
        "(hint: remove them: ~batching.max_batch_size ~batching.max_queue_delay_ms)"
    )
    fixed = compose(
        [
            "+recipe=fraud",
            "batching=none",
            "~batching.max_batch_size",
            "~batching.max_queue_delay_ms",
        ],
        recipes_dir=RECIPES_DIR,
    )
    assert fixed.data["batching"]["kind"] == "none"


def test_a_kept_key_is_shown_as_config_show_shows_it(tmp_path: Path) -> None:
    token = "Zk3vQ9xLmP2rT8wYb4nH6jDa"
    _recipe(
        tmp_path,
        "hooked",
        f"""\
        models:
          m:
            versions:
              "1":
                loader: {{kind: onnx, path: iris/artifacts/model.onnx}}
            drift:
              detectors: {{}}
              actions:
                - kind: webhook
                  url: https://hooks.slack.com/services/T0000/B0000/{token}
                  allow_hosts: [hooks.slack.com]
        """,
    )
    text = _error(["+recipe=hooked", "models.m.drift.actions.0.kind=log"], recipes_dir=tmp_path)
    assert text.startswith(
        "models.m.drift.actions[0].url: not a key of action 'log' "
        "(value 'https://hooks.slack.com/services/T0000/B0000/***') (also allow_hosts)"
    )
    assert "~models.m.drift.actions.0.url ~models.m.drift.actions.0.allow_hosts" in text
    assert token not in text


def test_keys_the_new_kind_knows_may_stay() -> None:
    # iris's loader sets kind and path; sklearn takes a path too: nothing to explain.
    composed = compose(["+recipe=iris", "models.iris.versions.1.loader.kind=sklearn"])
    loader = composed.data["models"]["iris"]["versions"]["1"]["loader"]
    assert loader == {"kind": "sklearn", "path": "iris/artifacts/model.onnx"}


def test_a_mapping_override_that_adds_a_key_says_it_merges() -> None:
    value = "{kind: sklearn, path: x.skops, input_dtype: FP32}"
    text = _error(["+recipe=fraud", f"models.fraud.versions.1.loader={value}"])
    assert text.startswith(
        f"models.fraud.versions.1.loader: the override models.fraud.versions.1.loader={value} "
        "merges into the node the config sets here, which has no key 'input_dtype'"
    )
    assert "a valid key the composed config does not set" not in text
    assert f"to add keys too: ++models.fraud.versions.1.loader={value}" in text
    assert (
        f"to replace the node whole: ~models.fraud.versions.1.loader "
        f"+models.fraud.versions.1.loader={value}"
    ) in text


def test_unknown_group_option_lists_options() -> None:
    text = _error(["+recipe=iris", "batching=dynamc"])
    assert text.startswith("batching:")
    assert "'dynamc'" in text
    assert "available: adaptive, dynamic, none" in text


def test_unknown_env_lists_options() -> None:
    text = _error(["+recipe=iris", "env=production"])
    assert "'production'" in text
    assert "dev, prod, staging" in text


def test_unknown_recipe_lists_recipes() -> None:
    text = _error(["+recipe=nope"])
    assert text.startswith("recipe:")
    assert "'nope'" in text
    listed = {r.strip() for r in text.split("available:")[1].split("(")[0].split(",")}
    assert listed == set(RECIPES)
    assert "+recipe=NAME" in text


def test_unknown_recipe_in_own_recipes_dir(tmp_path: Path) -> None:
    _recipe(tmp_path, "alpha", "description: a\n")
    _recipe(tmp_path, "beta", "description: b\n")
    text = _error(["+recipe=gamma"], recipes_dir=tmp_path)
    assert "'gamma'" in text
    assert "available: alpha, beta" in text


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # Composes here, but deploy k8s would render the ConfigMap key iris.yaml.yaml and a pod
        # that asks for +recipe=iris.yaml: refused with the fix.
        (
            "+recipe=iris.yaml",
            "recipe: 'iris.yaml' is a file name; recipes are named without "
            ".yaml (hint: use +recipe=iris)",
        ),
        ("+recipe=iris.yml", "recipe: 'iris.yml' is a file name"),
        # A path: a ConfigMap key Kubernetes rejects.
        ("+recipe=fraud/../iris", "recipe: 'fraud/../iris' is not a recipe name"),
        ("+recipe=iris/train", "recipe: 'iris/train' is not a recipe name"),
        ("+recipe=../recipes/iris", "recipe: '../recipes/iris' is not a recipe name"),
    ],
)
def test_a_recipe_is_named_not_given_as_a_file_or_path(override: str, expected: str) -> None:
    assert _error([override]).startswith(expected)


def test_a_recipe_name_with_dots_and_dashes_is_fine(tmp_path: Path) -> None:
    _recipe(tmp_path, "fraud-v2.1_b", "description: x\n")
    assert compose(["+recipe=fraud-v2.1_b"], recipes_dir=tmp_path).label == "recipe=fraud-v2.1_b"


def test_recipe_with_no_recipes_folder_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    text = _error(["+recipe=iris"], recipes_dir=missing)
    assert text.startswith("recipe:")
    assert "'iris'" in text
    assert str(missing) in text
    assert "INFERCORE_RECIPES_DIR" in text


def test_invalid_model_name(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "bad",
        """\
        models:
          "../x":
            versions:
              "1":
                loader: {kind: onnx, path: m.onnx}
        """,
    )
    text = _error(["+recipe=bad"], recipes_dir=tmp_path)
    assert "models['../x']" in text
    assert "invalid model name '../x'" in text
    assert "recipe=bad" in text


def test_invalid_version_name(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "bad",
        """\
        models:
          m:
            versions:
              "../1":
                loader: {kind: onnx, path: m.onnx}
        """,
    )
    text = _error(["+recipe=bad"], recipes_dir=tmp_path)
    assert "models.m.versions['../1']" in text
    assert "invalid version '../1'" in text


def test_model_without_versions(tmp_path: Path) -> None:
    _recipe(tmp_path, "bad", "models:\n  m:\n    versions: {}\n")
    text = _error(["+recipe=bad"], recipes_dir=tmp_path)
    assert text.startswith("models.m.versions:")
    assert "at least one version" in text


def test_primary_not_among_versions() -> None:
    text = _error(["+recipe=iris", "+models.iris.primary=2"])
    assert text.startswith("models.iris.primary:")
    assert "'2'" in text
    assert "(1)" in text


def test_numeric_versions_and_primary_are_names(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "numeric",
        """\
        models:
          m:
            primary: 1
            versions:
              1: {loader: {kind: onnx, path: a.onnx}}
              2: {loader: {kind: onnx, path: b.onnx}}
        """,
    )
    composed = compose(["+recipe=numeric"], recipes_dir=tmp_path)
    model = composed.config.models["m"]
    assert list(model.versions) == ["1", "2"]
    assert model.primary == "1"
    assert Runtime(composed).models["m"].primary == "1"


def test_error_inside_second_model_names_its_path(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "two",
        """\
        models:
          a:
            versions:
              "1": {loader: {kind: onnx, path: a.onnx}}
          b:
            versions:
              "1": {loader: {kind: onnx, path: b.onnx}, warmup: sometimes}
        """,
    )
    text = _error(["+recipe=two"], recipes_dir=tmp_path)
    assert text.startswith("models.b.versions.1.warmup:")
    assert "expected bool" in text
    assert "'sometimes'" in text


def test_numeric_model_name_is_a_key_error(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "num",
        """\
        models:
          7:
            versions:
              "1": {loader: {kind: onnx, path: a.onnx}}
        """,
    )
    text = _error(["+recipe=num"], recipes_dir=tmp_path)
    assert text.startswith("models:")
    assert "invalid key 7" in text
    assert "expected str" in text


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("# @package _global_\ndescription: {a: 1, b\nmodels: {}\n")
    text = _error(["+recipe=bad"], recipes_dir=tmp_path)
    assert text.startswith(f"{tmp_path / 'bad.yaml'}: invalid YAML at line 3, column 7: "), text
    assert "(while parsing a flow mapping at line 2)" in text


def test_a_recipe_with_defaults_but_no_package_header_gets_the_fix(tmp_path: Path) -> None:
    (tmp_path / "nopkg.yaml").write_text(
        "defaults:\n  - override /batching: adaptive\ndescription: x\n"
    )
    text = _error(["+recipe=nopkg"], recipes_dir=tmp_path)
    assert text.startswith("recipe 'nopkg': its defaults list was read inside the `recipe` package")
    assert "start nopkg.yaml with the line `# @package _global_`" in text


def test_an_empty_recipe_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert _error(["+recipe=empty"], recipes_dir=tmp_path).startswith(
        "recipe 'empty': the file sets nothing"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["+recipe=iris", "+server.port=9001"],
            "server.port: the config sets it already; +server.port=... only adds a key it does "
            "not set (hint: use server.port=9001 (or ++server.port=9001 to add or replace))",
        ),
        (
            ["+recipe=iris", "+recipe=fraud"],
            "recipe: given more than once (+recipe=iris +recipe=fraud) (hint: keep one)",
        ),
        (
            ["+recipe=iris", "server.port"],
            "override 'server.port': expected KEY=VALUE",
        ),
        (
            ["+recipe=iris", "description=\u00fc\U0001f680"],
            "override 'description=\u00fc\U0001f680': the value has characters that need quotes",
        ),
        # Errors write list items as config paths do; an override names them after a dot.
        (
            ["+recipe=fraud", "+models.fraud.drift.actions[0].foo=1"],
            "override '+models.fraud.drift.actions[0].foo=1': an override names a list item by "
            "its index after a dot (hint: use +models.fraud.drift.actions.0.foo=1)",
        ),
        (
            ["+recipe=fraud", "~models.fraud.drift.actions[0].level"],
            "override '~models.fraud.drift.actions[0].level': an override names a list item by "
            "its index after a dot (hint: use ~models.fraud.drift.actions.0.level)",
        ),
    ],
)
def test_override_mistakes_name_the_override_and_the_fix(
    overrides: list[str], expected: str
) -> None:
    assert _error(overrides).startswith(expected)


def test_a_missing_config_folder_is_named_in_full(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "conf"
    with pytest.raises(ConfigError) as info:
        compose(["+recipe=iris"], conf_dir=missing)
    assert str(info.value).startswith(f"config folder {str(missing)!r} not found")


def test_loader_option_typo_names_the_loader_path(tmp_path: Path) -> None:
    _recipe(
        tmp_path,
        "typo",
        """\
        models:
          m:
            versions:
              "1": {loader: {kind: onnx, pth: a.onnx}}
        """,
    )
    text = _error(["+recipe=typo"], recipes_dir=tmp_path)
    assert text.startswith("models.m.versions.1.loader.pth:")
    assert "'a.onnx'" in text
    assert "path" in text.split("valid keys here:")[1]


def test_loader_without_kind(tmp_path: Path) -> None:
    _recipe(tmp_path, "nokind", 'models:\n  m:\n    versions:\n      "1": {loader: {path: a}}\n')
    text = _error(["+recipe=nokind"], recipes_dir=tmp_path)
    assert text.startswith("models.m.versions.1.loader.kind: required key is missing")
    assert "onnx" in text


def test_recipe_without_package_header(tmp_path: Path) -> None:
    (tmp_path / "headless.yaml").write_text("description: no header\n")
    text = _error(["+recipe=headless"], recipes_dir=tmp_path)
    assert "headless" in text
    assert "# @package _global_" in text


def test_missing_environment_variable_in_recipe(tmp_path: Path) -> None:
    _recipe(tmp_path, "envvar", "description: ${oc.env:INFERCORE_TEST_SURELY_UNSET}\n")
    text = _error(["+recipe=envvar"], recipes_dir=tmp_path)
    assert text.startswith("description:")
    assert "INFERCORE_TEST_SURELY_UNSET" in text
    assert "oc.env" in text


def test_unknown_top_level_key_with_plus() -> None:
    text = _error(["+recipe=iris", "+modles.x=1"])
    assert text.startswith("modles:")
    assert "models" in text.split("valid keys here:")[1]


def test_composed_records_what_it_came_from() -> None:
    composed = compose(["+recipe=iris", "env=staging"], recipes_dir=RECIPES_DIR)
    assert isinstance(composed, Composed)
    assert composed.overrides == ["+recipe=iris", "env=staging"]
    assert composed.recipes_dir == RECIPES_DIR.resolve()
    assert composed.model_root == RECIPES_DIR.resolve()


# --- redact ---


def test_redact_masks_secret_keys() -> None:
    data = {
        "token": "t0k",
        "api_key": "k3y",
        "apiKey": "k3y",
        "x-api-key": "k3y",
        "password": "pw",
        "db_password": "pw",
        "AUTH_TOKEN": "t",
        "client_secret": "s",
        "nested": {"credentials": {"user": "u", "key": "k"}},
        "list": [{"password": "pw"}],
        "headers": {"Authorization": "Bearer t0k", "Proxy-Authorization": "t0k", "Cookie": "s=t0k"},
    }
    out = redact(data)
    assert set(out["headers"].values()) == {"***"}
    assert out["token"] == out["api_key"] == out["apiKey"] == out["x-api-key"] == "***"
    assert out["password"] == out["db_password"] == out["AUTH_TOKEN"] == "***"
    assert out["client_secret"] == "***"
    assert out["nested"]["credentials"] == {"user": "***", "key": "***"}
    assert out["list"] == [{"password": "***"}]
    assert "t0k" not in repr(out) and "k3y" not in repr(out) and "pw" not in repr(out)
    assert data["token"] == "t0k", "redact must not change its input"


def test_redact_masks_url_credentials() -> None:
    out = redact(
        {
            "online_store": "redis://:pw@host:6379/0",
            "db": "postgresql://user:s3cret@db.local/feast",
            "odd": "https://user:p@ss@host/path@x",
            "text": "cache at redis://admin:hunter2@cache:6379 and more",
        }
    )
    assert out["online_store"] == "redis://***@host:6379/0"
    assert out["db"] == "postgresql://***@db.local/feast"
    assert out["odd"] == "https://***@host/path@x"
    assert out["text"] == "cache at redis://***@cache:6379 and more"


def test_redact_leaves_ordinary_values_alone() -> None:
    data = {
        "host": "127.0.0.1",
        "port": 8080,
        "max_tokens": 128,
        "tokenizer": "tok.json",
        "path": "iris/artifacts/model.onnx",
        "url": "https://example.com/model.onnx",
        "email": "someone@example.com",
        "token": None,
        "password": "",
        "keys": ["a", "b"],
        "enabled": True,
    }
    assert redact(data) == data


def test_redact_the_composed_iris_config_changes_nothing() -> None:
    data = compose(["+recipe=iris"], recipes_dir=RECIPES_DIR).data
    assert redact(data) == data


@pytest.mark.parametrize("body", ["- a\n- b\n", "models: [a, b]\n"], ids=["top-level", "models"])
def test_a_list_where_a_mapping_belongs_names_the_recipe_and_the_fix(
    tmp_path: Path, body: str
) -> None:
    # Hydra's message puts its cause on a second line, after "... raised while composing
    # config:", which alone said nothing.
    text = _error(["+recipe=listed"], recipes_dir=_recipe(tmp_path, "listed", body))
    assert text.startswith("recipe/listed: a list where a mapping is expected"), text
    assert "`key: value` entries" in text


def test_a_number_where_a_string_belongs_says_to_quote_it(tmp_path: Path) -> None:
    # An all-digit digest is an int to YAML (and 0123 one too).
    digest = "1" * 64
    text = _error(
        ["+recipe=digits"],
        recipes_dir=_recipe(
            tmp_path,
            "digits",
            f"""\
            models:
              m:
                versions:
                  "1":
                    loader: {{kind: onnx, path: m.onnx, sha256: {digest}}}
            """,
        ),
    )
    assert text.startswith("models.m.versions.1.loader.sha256: expected str"), text
    assert "hint: quote it ('...') in YAML" in text
    text = _error(["+recipe=iris", "server.host=8"])
    assert "expected str, got 8" in text and "quote it" in text
