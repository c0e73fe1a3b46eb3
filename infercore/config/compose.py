"""Compose a config with Hydra (recipes as the group ``recipe``) and validate it with msgspec.

``hydra.utils.instantiate`` is never called: config is data, resolved into closed schemas.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from infercore.config.schema import NAME_RE, VERSION_RE, InfercoreConfig
from infercore.config.validation import allowed_fields, convert, field_names
from infercore.errors import ConfigError

# `infercore config show` and `infercore deploy k8s` import these from here; the detection
# lives in infercore.redaction, which the drift events' scrub() shares.
from infercore.redaction import redact as redact
from infercore.redaction import secret_paths as secret_paths
from infercore.redaction import secret_url_paths as secret_url_paths

if TYPE_CHECKING:
    from omegaconf import DictConfig

_PKG = Path(__file__).resolve().parent.parent
_REPO = _PKG.parent


def default_conf_dir() -> Path:
    env = os.environ.get("INFERCORE_CONF_DIR")
    if env:
        return Path(env)
    packaged = _PKG / "_conf"
    return packaged if packaged.is_dir() else _REPO / "conf"


def default_recipes_dir() -> Path:
    env = os.environ.get("INFERCORE_RECIPES_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "recipes"
    if local.is_dir():
        return local
    packaged = _PKG / "_recipes"
    return packaged if packaged.is_dir() else _REPO / "recipes"


@dataclass(slots=True)
class Composed:
    """A composed and validated config, with what it was composed from."""

    config: InfercoreConfig
    data: dict[str, Any]
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    recipes_dir: Path = _REPO / "recipes"

    @property
    def label(self) -> str:
        recipe = self.choices.get("recipe")
        return f"recipe={recipe}" if recipe else ""

    @property
    def model_root(self) -> Path:
        root = Path(self.config.model_root)
        if not root.is_absolute():
            root = self.recipes_dir / root
        return root.resolve()


_HYDRA_NOT_FOUND = re.compile(r"Could not find '(?P<what>[^']+)'")
_HYDRA_AVAILABLE = re.compile(
    r"Available options in '(?P<group>[^']+)':\n(?P<opts>(?:\t[^\n]*\n?)*)"
)
_HYDRA_KEY = re.compile(r"Could not override '(?P<key>[^']+)'")


def _override_value(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.lstrip("~+") == key:
            return value
    return None


def _keys_here(exc: Exception, key: str) -> list[str]:
    """Keys valid next to ``key``: the schema's fields there, then those the config sets."""
    parent_path = key.split(".")[:-1]
    names = allowed_fields(InfercoreConfig, list(parent_path))
    parent = getattr(exc.__cause__, "parent_node", None)
    try:
        present = [str(k) for k in parent] if parent is not None else []
    except Exception:  # a node that cannot list its keys: show the schema's only
        present = []
    return names + [k for k in present if k not in names]


_HYDRA_NESTED_RECIPE = re.compile(
    r"In 'recipe/(?P<name>[^']+)': Could not override '[^']*@recipe\."
)
_HYDRA_APPEND = re.compile(r"Could not append to config\. An item is already at '(?P<key>[^']+)'")
_HYDRA_MULTIPLE = re.compile(r"Multiple values for (?P<key>[^ .]+)")
_HYDRA_PARSE = re.compile(r"Error parsing override '(?P<item>[^']*)'")
_HYDRA_LEXER = re.compile(r"LexerNoViableAltException: (?P<item>[^\n]*)")


def _known_hydra_error(exc: Exception, text: str, overrides: list[str]) -> ConfigError | None:
    """Hydra's own messages that have a clearer one-line equivalent (or None)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark, context = exc.problem_mark, exc.context_mark
        where = f" ({exc.context} at line {context.line + 1})" if exc.context and context else ""
        return ConfigError(
            f"{mark.name}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
            f"{exc.problem}{where}",
            hint="check the brackets, quotes and indentation there",
        )
    nested = _HYDRA_NESTED_RECIPE.search(text)
    if nested:
        name = nested.group("name")
        return ConfigError(
            f"recipe {name!r}: its defaults list was read inside the `recipe` package",
            hint=f"start {name}.yaml with the line `# @package _global_`",
        )
    append = _HYDRA_APPEND.search(text)
    if append:
        key = append.group("key")
        value = _override_value(overrides, key) or "VALUE"
        return ConfigError(
            f"{key}: the config sets it already; +{key}=... only adds a key it does not set",
            hint=f"use {key}={value} (or ++{key}={value} to add or replace)",
        )
    multiple = _HYDRA_MULTIPLE.search(text)
    if multiple:
        key = multiple.group("key")
        given = [o for o in overrides if o.partition("=")[0].lstrip("+~") == key]
        return ConfigError(
            f"{key}: given more than once ({' '.join(given) or key})", hint="keep one"
        )
    parse = _HYDRA_PARSE.search(text)
    if parse and "missing EQUAL" in text:
        return ConfigError(
            f"override {parse.group('item')!r}: expected KEY=VALUE",
            hint="e.g. server.port=9000 (+KEY=VALUE adds a key, ~KEY removes one)",
        )
    lexer = _HYDRA_LEXER.search(text)
    if lexer:
        item = lexer.group("item").strip()
        key, sep, value = item.partition("=")
        if re.search(r"\[\d+\]", key):
            # Errors name list items as config paths do (actions[0]); overrides cannot.
            dotted = re.sub(r"\[(\d+)\]", r".\1", key)
            return ConfigError(
                f"override {item!r}: an override names a list item by its index after a dot",
                hint=f"use {dotted}{sep}{value}",
            )
        return ConfigError(
            f"override {item!r}: the value has characters that need quotes",
            hint=f"quote it: {key}='{value}' (in a shell: \"{key}='{value}'\")",
        )
    return None


_ENV_REF = re.compile(r"oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")


def _interpolation_error(cfg: Any, exc: Exception) -> ConfigError:
    """A value that did not resolve; an ``${oc.env:VAR}`` set but empty is named (an empty
    variable is not unset: the default does not apply, and the empty text fails to decode)."""
    from omegaconf import OmegaConf

    key = str(getattr(exc, "full_key", "") or "")
    raw: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split(".") if key else []:
        raw = raw.get(part) if isinstance(raw, dict) else None
    env_vars = _ENV_REF.findall(raw) if isinstance(raw, str) else []
    for var in env_vars:
        if os.environ.get(var) == "":
            return ConfigError(
                f"{key}: the environment variable {var} is set but empty",
                hint=f"give {var} a value, or unset it to use the default",
            )
    set_vars = [var for var in env_vars if os.environ.get(var) is not None]
    if set_vars and "oc.decode" in raw:
        # The variable is set, and its text does not parse (`{a: 1`, an unclosed quote).
        var = set_vars[0]
        return ConfigError(
            f"{key}: the environment variable {var} does not parse as a value",
            hint=f"set {var} to a plain value (a number, a word); quote text with {{, [, "
            "or a comma in it",
        )
    return ConfigError(
        f"{key or '<config>'}: {str(exc).splitlines()[0]}",
        hint="an ${oc.env:VAR} needs the variable set, or a default: ${oc.env:VAR,default}",
    )


def _hydra_error(exc: Exception, overrides: list[str]) -> ConfigError:
    text = str(exc).strip()
    known = _known_hydra_error(exc, text, overrides)
    if known is not None:
        return known
    key = _HYDRA_KEY.search(text)
    if key:
        name = key.group("key")
        value = _override_value(overrides, name)
        # The first missing key on the way to `name` (models.irs for models.irs.versions.1...).
        missing = str(getattr(exc.__cause__, "full_key", "") or name)
        if missing.startswith(f"{name}.") and (value or "").lstrip().startswith("{"):
            # KEY={…} over a node the config sets: Hydra merges the mapping into the node,
            # and without `++` a merge may only change the keys the node has.
            new = missing.removeprefix(f"{name}.")
            return ConfigError(
                f"{name}: the override {name}={value} merges into the node the config sets "
                f"here, which has no key {new!r}; a plain override only changes keys",
                hint=f"to add keys too: ++{name}={value}; to replace the node whole: "
                f"~{name} +{name}={value}",
            )
        if not name.startswith(missing):
            missing = name
        shown = f" (value {value!r})" if value is not None else ""
        if missing != name:
            shown = f" (override {name}={value})" if value is not None else f" (override {name})"
        keys = _keys_here(exc, missing)
        add = f"+{name}={value if value is not None else 'VALUE'}"
        if missing.rpartition(".")[2] in keys:
            # A valid key the recipe leaves unset (models.iris.primary): Hydra overrides only
            # what is set; it is added with `+`.
            return ConfigError(
                f"{missing}: a valid key the composed config does not set, so there is "
                f"nothing to override{shown}",
                hint=f"add it: {add}",
            )
        choices = f"; keys here: {', '.join(keys)}" if keys else ""
        return ConfigError(
            f"{missing}: no such key in the composed config{shown}{choices}",
            hint=f"check its spelling; to add a key the config does not set yet use {add}",
        )
    nf = _HYDRA_NOT_FOUND.search(text)
    if nf:
        what = nf.group("what")
        group, _, option = what.rpartition("/")
        avail = _HYDRA_AVAILABLE.search(text)
        opts = ", ".join(avail.group("opts").split()) if avail else "none"
        if group:
            how = "+recipe=NAME" if group == "recipe" else f"{group}=NAME"
            return ConfigError(
                f"{group}: unknown option {option!r}; available: {opts}", hint=f"use {how}"
            )
        return ConfigError(f"config {what!r} not found")
    if "Cannot merge DictConfig with ListConfig" in text:
        source = re.search(r"In '([^']+)'", text)
        key = re.search(r"full_key: (\S+)", text)
        return ConfigError(
            f"{source.group(1) if source else 'the config'}: "
            f"{key.group(1) + ': ' if key else ''}a list where a mapping is "
            "expected",
            hint="a recipe's top level, and keys such as models, batching and features, take "
            "`key: value` entries (models: {NAME: {versions: ...}})",
        )
    # Hydra's first line often only says where ("... raised while composing config:"); the
    # cause is on the next.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
    return ConfigError(f"cannot compose config from {overrides}: {first or type(exc).__name__}")


#: A recipe name: a file ``NAME.yaml`` directly in the recipes folder. The same name is the
#: ConfigMap key ``NAME.yaml`` that ``infercore deploy k8s`` renders (``[-._a-zA-Z0-9]+``).
RECIPE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


def _check_recipe_overrides(overrides: list[str]) -> None:
    """``+recipe=NAME``: a plain name, the same locally and in a pod (never a path or a file)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.lstrip("+~") != "recipe":
            continue
        name = value.strip()
        stem = name
        for suffix in (".yaml", ".yml"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        if name != stem and RECIPE_NAME_RE.fullmatch(stem) and ".." not in stem:
            raise ConfigError(
                f"recipe: {name!r} is a file name; recipes are named without .yaml",
                hint=f"use +recipe={stem}",
            )
        if not RECIPE_NAME_RE.fullmatch(name) or ".." in name:
            raise ConfigError(
                f"recipe: {name[:80]!r} is not a recipe name (a file NAME.yaml in the recipes "
                "folder; no '/' or '..')",
                hint="use +recipe=NAME; set INFERCORE_RECIPES_DIR to serve recipes from "
                "another folder",
            )


@contextlib.contextmanager
def hydra_composed(
    overrides: list[str],
    *,
    conf_dir: Path,
    recipes_dir: Path,
    return_hydra_config: bool = False,
) -> Iterator[DictConfig]:
    """Hydra's compose of ``conf_dir/config.yaml``, the recipes folder as the group ``recipe``.

    Hydra's global state is cleared before and after. An error that Hydra or OmegaConf raises
    here or in the ``with`` body becomes one :class:`ConfigError` naming the override at fault;
    a ``ConfigError`` raised in the body passes as it is.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with tempfile.TemporaryDirectory(prefix="infercore-recipes-") as tmp:
        # Hydra maps folders to groups: expose the recipes folder as the group `recipe`.
        if recipes_dir.is_dir():
            os.symlink(recipes_dir, Path(tmp) / "recipe", target_is_directory=True)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                yield hydra_compose(
                    config_name="config",
                    overrides=[*overrides, f"hydra.searchpath=[file://{tmp}]"],
                    return_hydra_config=return_hydra_config,
                )
        except ConfigError:
            raise
        except Exception as exc:
            raise _hydra_error(exc, list(overrides)) from None
        finally:
            GlobalHydra.instance().clear()


def compose(
    overrides: list[str] | None = None,
    *,
    conf_dir: Path | None = None,
    recipes_dir: Path | None = None,
) -> Composed:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate the result.

    Args:
        overrides: Hydra overrides as typed on the command line (``+recipe=iris``,
            ``env=prod``, ``server.port=9000`` …).
        conf_dir: The config root (default: the project's ``conf/``).
        recipes_dir: The folder whose ``*.yaml`` files form the group ``recipe``.

    Raises:
        ConfigError: The overrides do not compose, an interpolation fails, or the result
            does not validate. The message is one line naming the path and the fix.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    _check_recipe_overrides(overrides)
    conf_dir = (conf_dir or default_conf_dir()).resolve()
    recipes_dir = (recipes_dir or default_recipes_dir()).resolve()
    if not conf_dir.is_dir():
        raise ConfigError(
            f"config folder {str(conf_dir)!r} not found",
            hint="point INFERCORE_CONF_DIR at the folder holding config.yaml",
        )

    with hydra_composed(
        overrides, conf_dir=conf_dir, recipes_dir=recipes_dir, return_hydra_config=True
    ) as cfg:
        choices = {
            str(k): str(v)
            for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()  # type: ignore[union-attr]
            if v is not None and not str(k).startswith("hydra")
        }
        try:
            OmegaConf.set_struct(cfg, False)
            cfg.pop("hydra")
            data = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as exc:
            raise _interpolation_error(cfg, exc) from None

    assert isinstance(data, dict)
    plain: dict[str, Any] = {str(k): v for k, v in data.items()}
    _versions_as_strings(plain)
    label = f"recipe={choices['recipe']}" if "recipe" in choices else ""
    if plain.get("recipe") == {} and "recipe" in choices:
        raise ConfigError(
            f"recipe {choices['recipe']!r}: the file sets nothing ({label})",
            hint="a recipe starts with `# @package _global_` and sets models: (see recipes/)",
        )
    if isinstance(plain.get("recipe"), dict) and "recipe" in choices:
        # Without the package header Hydra nests the whole recipe under `recipe:`.
        raise ConfigError(
            f"recipe {choices['recipe']!r}: its keys ended up under `recipe:` ({label})",
            hint=f"start {choices['recipe']}.yaml with the line `# @package _global_`",
        )
    if isinstance(plain.get("recipe"), str | int) and "recipe" not in choices:
        # No recipe files: Hydra took `+recipe=NAME` for a plain key.
        raise ConfigError(
            f"recipe: unknown option {str(plain['recipe'])!r}; no recipes in {str(recipes_dir)!r}",
            hint="set INFERCORE_RECIPES_DIR to the folder holding NAME.yaml, or run from the "
            "project folder",
        )
    config = convert(plain, InfercoreConfig, path="", context=label)
    _check_names(config, label)
    _check_kind_overrides(plain, overrides, choices, conf_dir, recipes_dir, label)
    return Composed(config, plain, choices, overrides, recipes_dir)


def _versions_as_strings(data: dict[str, Any]) -> None:
    """Version names typed as numbers (``primary=2``, ``versions: {1: ...}``) become strings.

    Hydra and YAML read ``2`` as an int; a version is a name, so ``2`` means ``"2"``.
    """
    models = data.get("models")
    if not isinstance(models, dict):
        return
    for model in models.values():
        if not isinstance(model, dict):
            continue
        if isinstance(model.get("primary"), int) and not isinstance(model["primary"], bool):
            model["primary"] = str(model["primary"])
        versions = model.get("versions")
        if isinstance(versions, dict) and any(type(k) is int for k in versions):
            if any(str(k) in versions for k in versions if type(k) is int):
                continue  # both 1 and "1": leave it for validation to report
            model["versions"] = {str(k) if type(k) is int else k: v for k, v in versions.items()}


def _key(base: str, key: str) -> str:
    """``base.key``, or ``base['key']`` where the key would make the path ambiguous."""
    return f"{base}.{key}" if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else f"{base}[{key!r}]"


def _check_names(config: InfercoreConfig, label: str) -> None:
    suffix = f" ({label})" if label else ""
    for name, model in config.models.items():
        base = _key("models", name)
        if not NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{base}: invalid model name {name!r}{suffix}",
                hint="use letters, digits, '_' and '-' (at most 64, no '/' or '..')",
            )
        if not model.versions:
            raise ConfigError(f"{base}.versions: at least one version is needed{suffix}")
        for version in model.versions:
            if not VERSION_RE.fullmatch(version):
                raise ConfigError(
                    f"{_key(base + '.versions', version)}: invalid version {version!r}{suffix}",
                    hint="use letters, digits, '_', '-' and '.' (at most 32)",
                )
        if model.primary is not None and model.primary not in model.versions:
            raise ConfigError(
                f"{base}.primary: {model.primary!r} is not one of the versions "
                f"({', '.join(model.versions)}){suffix}"
            )


# --- an override that picks a component's kind keeps the node's other keys ------------------


#: A config path Hydra can take as an override's key: names and list indices (``[0]``).
_HYDRA_PATH = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+|\[\d+\])*")


def _hydra_key(path: str) -> str | None:
    """``path`` as Hydra's overrides write it (``actions[0].url`` -> ``actions.0.url``), or
    None where they cannot."""
    if not _HYDRA_PATH.fullmatch(path):
        return None
    return re.sub(r"\[(\d+)\]", r".\1", path)


@dataclass(frozen=True, slots=True)
class _KindOverride:
    """An override that picks a component node's kind: ``P.kind=K``, ``P={kind: K, …}`` or
    a config group's option (``batching=none``). Hydra merges it into the node the config
    sets at ``P``: the keys it does not name stay."""

    item: str  # as typed
    path: str  # the node's config path
    names: frozenset[str]  # the keys it sets in the node
    whole: bool  # P={…}: the node can be replaced whole instead (~P +P={…})


def _node_at(data: Any, path: str) -> Any:
    """The value at a dotted config path (``models.m.versions.1.loader``), or None."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, cur.get(int(part)) if part.isdigit() else None)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def _shown_path(data: Any, path: str) -> str:
    """A dotted override path as errors write config paths: list indices in brackets
    (``models.m.drift.actions.0`` -> ``models.m.drift.actions[0]``)."""
    out, cur = "", data
    for part in path.split("."):
        if isinstance(cur, list) and part.isdigit():
            out += f"[{part}]"
            cur = cur[int(part)] if int(part) < len(cur) else None
        else:
            out = f"{out}.{part}" if out else part
            cur = cur.get(part) if isinstance(cur, dict) else None
    return out


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _kind_overrides(
    overrides: list[str], choices: dict[str, str], conf_dir: Path
) -> list[_KindOverride]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # they composed, so they parse; if not, there is nothing to explain
        return []
    found: list[_KindOverride] = []
    for o in parsed:
        if o.is_delete() or o.package is not None:
            continue
        key, value, item = o.key_or_group, o.value(), o.input_line or o.key_or_group
        if key.endswith(".kind") and isinstance(value, str):
            found.append(_KindOverride(item, key[: -len(".kind")], frozenset({"kind"}), False))
        elif isinstance(value, dict) and isinstance(value.get("kind"), str):
            found.append(_KindOverride(item, key, frozenset(map(str, value)), True))
        elif key in choices and key != "recipe" and isinstance(value, str):
            option = conf_dir / key / f"{value}.yaml"
            text = option.read_text(encoding="utf-8") if option.is_file() else ""
            data = _read_yaml(option) if "@package" not in text else None
            if isinstance(data, dict) and "kind" in data:
                found.append(_KindOverride(item, key, frozenset(map(str, data)), False))
    return found


def _component_registry() -> Any:
    """The registry the runtime will build (same plugins, same environment), or None."""
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    try:
        pm, _ = make_plugin_manager()
        return Registry(pm)
    except Exception:  # a broken plugin: the runtime reports it in its own words
        return None


def _origin(path: str, choices: dict[str, str], conf_dir: Path, recipes_dir: Path) -> str:
    """Which config file sets ``path``: the recipe, a config group's option, or config.yaml."""
    recipe = choices.get("recipe")
    if recipe and _node_at(_read_yaml(recipes_dir / f"{recipe}.yaml"), path) is not None:
        return f"recipe={recipe}"
    for group, option in choices.items():
        if group == "recipe":
            continue
        file = conf_dir / group / f"{option}.yaml"
        text = file.read_text(encoding="utf-8") if file.is_file() else ""
        top = "@package _global_" in text  # else its keys sit under `group.`
        inner = path if top else path.removeprefix(f"{group}.")
        if (top or inner != path) and _node_at(_read_yaml(file), inner) is not None:
            return f"{group}={option}"
    return "conf/config.yaml"


def _check_kind_overrides(
    data: dict[str, Any],
    overrides: list[str],
    choices: dict[str, str],
    conf_dir: Path,
    recipes_dir: Path,
    label: str,
) -> None:
    """An override that picks another kind for a component (``model.loader.kind=sklearn``,
    ``…loader={kind: sklearn, path: …}``, ``batching=none``) is merged by Hydra into the node
    the config sets there: the keys it does not name stay, and the new kind's ``Config``
    rejects those it does not know. Say so, naming the file the key comes from and the
    override that kept it, with the fix (``~PATH.KEY``), instead of the runtime's plain
    "unknown key" for a key the user never wrote.

    Only such overrides cost anything: the plugins are looked up when one keeps keys.
    """
    kind_overrides = _kind_overrides(overrides, choices, conf_dir)
    if not kind_overrides:
        return
    # Keys an override names (`P.key=…`, `P={…, key: …}`) were written by the user: the
    # runtime's "unknown key" names them well enough.
    named = {o.partition("=")[0].lstrip("+~") for o in overrides}
    named |= {f"{ko.path}.{k}" for ko in kind_overrides for k in ko.names}
    registry: Any = None
    for ko in kind_overrides:
        node = _node_at(data, ko.path)
        if not isinstance(node, dict) or not isinstance(node.get("kind"), str):
            continue
        kept = [str(k) for k in node if k != "kind" and f"{ko.path}.{k}" not in named]
        if not kept:
            continue
        if registry is None:
            registry = _component_registry()
            if registry is None:
                return
        from infercore.registry import ROLES

        kind = node["kind"]
        configs = [
            (role, registry.kinds(role)[kind].cls.Config)
            for role in ROLES
            if kind in registry.kinds(role)
        ]

        def unknown(key: str, configs: list[tuple[str, Any]] = configs) -> bool:
            return all(
                c.__struct_config__.forbid_unknown_fields and key not in field_names(c)
                for _, c in configs
            )

        bad = [k for k in kept if configs and unknown(k)]
        if bad:
            where = _shown_path(data, ko.path)
            raise _kept_keys_error(
                ko, where, node, bad, configs[0], choices, conf_dir, recipes_dir, label
            )


def _kept_keys_error(
    ko: _KindOverride,
    where: str,
    node: dict[str, Any],
    bad: list[str],
    found: tuple[str, Any],
    choices: dict[str, str],
    conf_dir: Path,
    recipes_dir: Path,
    label: str,
) -> ConfigError:
    role, config = found
    first = f"{where}.{bad[0]}"
    # The value is shown as `config show` would show it: a kept `url` or `token` is no
    # reason to print a secret.
    value = redact(node[bad[0]], bad[0])
    also = f" (also {', '.join(bad[1:])})" if len(bad) > 1 else ""
    origin = _origin(f"{ko.path}.{bad[0]}", choices, conf_dir, recipes_dir)
    valid = ", ".join(field_names(config)) or "none"
    suffix = f" ({label})" if label and label != origin else ""
    keys = [_hydra_key(f"{where}.{k}") for k in bad]
    removes = " ".join(f"~{k}" for k in keys if k)
    hint = f"remove {'it' if len(bad) == 1 else 'them'}: {removes}" if removes else ""
    if ko.whole:
        whole = f"~{ko.path} +{ko.item.lstrip('+')}"
        hint = f"{hint}; or replace the node whole: {whole}" if hint else f"replace it: {whole}"
    return ConfigError(
        f"{first}: not a key of {role} {node['kind']!r} (value {value!r}){also}: it comes from "
        f"{origin}, and the override {ko.item} sets only the keys it names, so the node keeps "
        f"the others; valid keys here: {valid}{suffix}",
        hint=hint or None,
    )


def to_yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def config_as_builtins(config: InfercoreConfig) -> Any:
    return msgspec.to_builtins(config)
