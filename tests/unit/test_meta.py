"""Meta-tests: the plugin system stays tested and documented as it grows.

- every hookspec is implemented by some test (a ``@hookimpl`` function of that name) and has a
  reference entry in docs/plugins.md (a heading and an example that implements it);
- every component interface has a reference entry naming each of its public members;
- every first-party plugin's README names each option of each kind it registers;
- every shipped recipe, and every option of every config group, composes and validates.

Each check is a small function from text to "what is missing", tested below on text that lacks
an entry, so a hook that loses its test or its doc entry makes these tests fail.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from infercore import cli, hookspecs
from infercore.components import Component
from infercore.config.compose import compose
from infercore.registry import KINDS
from infercore.runtime import Runtime
from infercore.testing import plugin_manager

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"
RECIPES_DIR = REPO / "recipes"
CONF = REPO / "conf"
HOOKS_HEADING = "Reference: hooks"
INTERFACES_HEADING = "Reference: component interfaces"


def _guide_module() -> Any:
    """tests/docs/plugin_guide.py (pytest puts only a test's own folder on sys.path)."""
    found = sys.modules.get("plugin_guide")
    if found is not None:
        return found
    spec = importlib.util.spec_from_file_location(
        "plugin_guide", REPO / "tests" / "docs" / "plugin_guide.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plugin_guide"] = module
    spec.loader.exec_module(module)
    return module


guide = _guide_module()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERCORE_LOAD_PLUGINS", "INFERCORE_DISABLE_PLUGINS", "INFERCORE_CONF_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INFERCORE_RECIPES_DIR", str(RECIPES_DIR))


# --- the checks ------------------------------------------------------------------------------


def hook_names() -> list[str]:
    """Every hookspec in infercore.hookspecs."""
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if getattr(fn, "infercore_spec", None) is not None
    )


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute):
        return target.attr == "hookimpl"
    return isinstance(target, ast.Name) and target.id == "hookimpl"


def implemented_hooks(sources: Iterable[str]) -> set[str]:
    """Names of the functions marked ``@hookimpl`` in these Python sources."""
    found: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                _is_hookimpl(d) for d in node.decorator_list
            ):
                found.add(node.name)
    return found


def untested_hooks(hooks: Iterable[str], sources: Iterable[str]) -> list[str]:
    """Hooks that no test implements."""
    implemented = implemented_hooks(sources)
    return [hook for hook in hooks if hook not in implemented]


def undocumented_hooks(hooks: Iterable[str], text: str) -> list[str]:
    """Hooks without a reference entry: a heading ``### `hook``` under the hooks reference
    whose section shows the signature and an example implementing the hook."""
    reference = guide.section(HOOKS_HEADING, text)
    missing = []
    for hook in hooks:
        entry = guide.section(f"`{hook}`", reference)
        examples = [b for b in guide.blocks(entry) if b.lang == "python"]
        if (
            f"{hook}(" not in entry
            or not examples
            or not any(f"def {hook}(" in b.code for b in examples)
        ):
            missing.append(hook)
    return missing


def interface_members(cls: type) -> list[str]:
    """The public members an interface declares itself (methods, properties, attributes)."""
    own = set(vars(cls)) | set(vars(cls).get("__annotations__", {}))
    return sorted(name for name in own if not name.startswith("_"))


def undocumented_members(cls: type, text: str) -> list[str]:
    """Members of ``cls`` its reference entry does not name (all of them without an entry)."""
    entry = guide.section(f"`{cls.__name__}`", guide.section(INTERFACES_HEADING, text))
    members = interface_members(cls)
    if not entry or not any(b.lang == "python" for b in guide.blocks(entry)):
        return members
    return [m for m in members if not re.search(rf"\b{re.escape(m)}\b", entry)]


def options_missing_from(readme: str, options: Iterable[str]) -> list[str]:
    """Options a README does not name as `option` (or, for a nested one, `option.key` /
    `option[].key`)."""
    return [o for o in options if not re.search(rf"`{re.escape(o)}[`.\[]", readme)]


# --- the checks catch what they should (so the tests below can fail) -------------------------

_DOC = """\
## Reference: hooks

### `register_a`

```text
register_a() -> list[type[A]]
```

```python
@hookimpl
def register_a():
    return []
```

### `register_b`

No example.

## Reference: component interfaces

### `Thing`

```text
def run(self) -> None
```

```python
thing.run()
```
"""


def test_the_checks_find_what_is_missing() -> None:
    assert untested_hooks(["register_a", "register_b"], ["@hookimpl\ndef register_a(): ..."]) == [
        "register_b"
    ]
    # A plain function of the name, or a hookimpl in a string, does not count as a test.
    assert untested_hooks(["register_a"], ["def register_a(): ...\nx = '@hookimpl'"]) == [
        "register_a"
    ]
    assert (
        untested_hooks(["register_a"], ["@pm.hookimpl(tryfirst=True)\ndef register_a(): ..."]) == []
    )
    assert undocumented_hooks(["register_a", "register_b", "register_c"], _DOC) == [
        "register_b",
        "register_c",
    ]

    class Thing:
        limit: int

        def run(self) -> None: ...

        def halt(self) -> None: ...

        def _private(self) -> None: ...

    class Other:
        def run(self) -> None: ...

    assert interface_members(Thing) == ["halt", "limit", "run"]
    assert undocumented_members(Thing, _DOC) == ["halt", "limit"]
    assert undocumented_members(Other, _DOC) == ["run"]  # no entry at all
    assert options_missing_from("| `path` | required |", ["path", "sha256"]) == ["sha256"]
    assert options_missing_from("`entity.field`, `inputs[].name`", ["entity", "inputs"]) == []
    assert options_missing_from("`paths` and `sha256sum`", ["path", "sha256"]) == ["path", "sha256"]


# --- hooks ---------------------------------------------------------------------------------


def test_there_are_hooks_to_check() -> None:
    assert "register_model_loaders" in hook_names()
    assert "register_routes" in hook_names()
    assert len(hook_names()) >= 7


def test_every_hook_is_implemented_by_a_test() -> None:
    files = [*REPO.glob("tests/**/*.py"), *REPO.glob("plugins/*/tests/**/*.py")]
    assert files
    untested = untested_hooks(hook_names(), (p.read_text() for p in files))
    assert untested == [], f"hooks no test implements with @hookimpl: {untested}"


def test_every_hook_has_a_reference_entry() -> None:
    missing = undocumented_hooks(hook_names(), GUIDE.read_text())
    assert missing == [], f"hooks without a reference entry in docs/plugins.md: {missing}"


def test_the_hook_reference_names_only_real_hooks() -> None:
    reference = guide.section(HOOKS_HEADING)
    documented = re.findall(r"^### `(\w+)`$", reference, flags=re.M)
    assert sorted(documented) == hook_names()


# --- component interfaces ------------------------------------------------------------------

INTERFACES = [Component, *(spec.base for spec in KINDS)]


@pytest.mark.parametrize("cls", INTERFACES, ids=[c.__name__ for c in INTERFACES])
def test_every_component_interface_is_documented(cls: type) -> None:
    assert interface_members(cls), f"{cls.__name__} declares nothing?"
    missing = undocumented_members(cls, GUIDE.read_text())
    assert missing == [], (
        f"docs/plugins.md: the reference entry of {cls.__name__} does not name {missing}"
    )


# --- first-party plugins: README names every option ------------------------------------------


def _first_party() -> list[tuple[str, str, Path]]:
    """(entry-point name, module, folder) of every plugin distribution in plugins/."""
    found = []
    for pyproject in sorted(REPO.glob("plugins/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for name, value in project.get("entry-points", {}).get("infercore", {}).items():
            found.append((name, value.split(":")[0], pyproject.parent))
    return found


FIRST_PARTY = _first_party()


def test_there_are_first_party_plugins() -> None:
    assert {"onnx", "sklearn", "lightgbm"} <= {name for name, _, _ in FIRST_PARTY}


@pytest.mark.parametrize(
    ("name", "module_name", "folder"), FIRST_PARTY, ids=[n for n, _, _ in FIRST_PARTY]
)
def test_every_first_party_readme_names_each_option(
    name: str, module_name: str, folder: Path
) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(f"plugins/{folder.name}: {module_name} does not import ({exc}); uv sync?")
    plugins = plugin_manager((name, module), fakes=False)
    readme = (folder / "README.md").read_text()
    checked = 0
    for spec in KINDS:
        for kind, registered in plugins.registry.kinds(spec.role).items():
            if registered.plugin != name:
                continue
            fields = [f.encode_name for f in msgspec.structs.fields(registered.cls.Config)]
            missing = options_missing_from(readme, fields)
            assert missing == [], (
                f"plugins/{folder.name}/README.md does not name the {spec.role} {kind!r} "
                f"options {missing}"
            )
            assert f"`{kind}`" in readme, f"plugins/{folder.name}/README.md never names {kind!r}"
            checked += 1
    assert checked, f"plugin {name!r} registers no kind"


# --- shipped recipes and config groups --------------------------------------------------------

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF.iterdir()
    if group.is_dir()
    for option in group.glob("*.yaml")
)


def test_the_lightgbm_recipe_is_shipped() -> None:
    assert {"iris", "iris_lightgbm"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_validates(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["config", "validate", f"+recipe={recipe}"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"ok: recipe={recipe}, ")


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_every_config_group_option_composes_and_validates(group: str, option: str) -> None:
    composed = compose(["+recipe=iris", f"{group}={option}"], recipes_dir=RECIPES_DIR)
    assert composed.choices[group] == option
    runtime = Runtime(composed)  # every component node resolved against its kind
    assert set(runtime.models) == {"iris"}
