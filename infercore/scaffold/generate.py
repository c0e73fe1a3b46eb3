"""Validating a plugin name and rendering the templates into a distribution."""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from infercore.errors import InfercoreError


class ScaffoldError(InfercoreError):
    """A name, kind or destination ``new-plugin`` cannot use; the CLI exits with code 2."""

    status_code = 400
    reason = "invalid_argument"


@dataclass(frozen=True, slots=True)
class RoleTemplate:
    """How one component role is scaffolded."""

    role: str
    hook: str
    base: str
    suffix: str
    module: str
    words: str


#: role -> template facts, in the order of ``infercore.registry.KINDS``.
ROLES: dict[str, RoleTemplate] = {
    r.role: r
    for r in (
        RoleTemplate("model_loader", "register_model_loaders", "Model", "Model", "model",
                     "model loader"),
        RoleTemplate("feature_source", "register_feature_sources", "FeatureSource",
                     "FeatureSource", "features", "feature source"),
        RoleTemplate("batcher", "register_batchers", "Batcher", "Batcher", "batcher", "batcher"),
        RoleTemplate("router", "register_routers", "Router", "Router", "router", "router"),
        RoleTemplate("drift_detector", "register_drift_detectors", "DriftDetector",
                     "DriftDetector", "detector", "drift detector"),
        RoleTemplate("action", "register_actions", "Action", "Action", "action", "action"),
    )
}  # fmt: skip

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
_MAX_NAME = 24
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, slots=True)
class PluginNames:
    """Every name derived from what the user typed (``my-store``).

    Attributes:
        name: As typed.
        distribution: ``infercore-my-store`` (also the folder created).
        package: ``infercore_my_store``, the import package.
        kind: ``my_store``: the kind recipes use, and the entry-point (plugin) name.
        camel: ``MyStore``, the prefix of the class names.
    """

    name: str
    distribution: str
    package: str
    kind: str
    camel: str


def plugin_names(name: str) -> PluginNames:
    """Validate ``name`` and derive the distribution, package, kind and class names.

    Raises:
        ScaffoldError: The name is not lower-case letters and digits joined by ``-`` or ``_``,
            is too long, or repeats the ``infercore`` prefix.
    """
    if name.startswith("infercore"):
        bare = name.removeprefix("infercore").lstrip("-_")
        raise ScaffoldError(
            f"plugin name {name!r}: leave out the 'infercore' prefix; it is added for you",
            hint=f"use `infercore new-plugin {bare or 'NAME'}` to get infercore-{bare or 'NAME'}",
        )
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        raise ScaffoldError(
            f"plugin name {name!r} is not valid",
            hint=f"use lower-case letters and digits, words joined by '-' or '_', starting with "
            f"a letter, at most {_MAX_NAME} characters (e.g. my-format)",
        )
    kind = name.replace("-", "_")
    if keyword.iskeyword(kind):
        raise ScaffoldError(f"plugin name {name!r} is a Python keyword", hint="choose another")
    return PluginNames(
        name=name,
        distribution=f"infercore-{name.replace('_', '-')}",
        package=f"infercore_{kind}",
        kind=kind,
        camel="".join(part.capitalize() for part in kind.split("_")),
    )


def _template(name: str) -> str:
    return resources.files("infercore.scaffold").joinpath("templates", name).read_text("utf-8")


def render(text: str, values: dict[str, str]) -> str:
    """Replace every ``{{key}}``; a key without a value is a bug in the template."""

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER.sub(sub, text)


def _core_requirement() -> str:
    from infercore import __version__

    match = re.match(r"^(\d+)\.(\d+)", __version__)
    return f"infercore>={match.group(1)}.{match.group(2)}" if match else "infercore"


def _installed_kind(role: str, kind: str) -> str | None:
    """The plugin that already registers ``kind`` for ``role`` here, if any."""
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    try:
        pm, _ = make_plugin_manager()
        found = Registry(pm).kinds(role).get(kind)
    except InfercoreError:  # a broken plugin elsewhere must not block scaffolding
        return None
    return found.plugin if found else None


def _normalized(name: str) -> str:
    # As installers compare distribution names (PEP 503): infercore-drift_stats is
    # infercore-drift-stats.
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_name(names: PluginNames) -> tuple[str, str] | None:
    """What is installed here under a name the new plugin would also take, and what
    installing the new one would do to it; ``None`` when the names are free.

    Installing ``infercore-NAME`` replaces an installed distribution of that name (its
    ``infercore_NAME`` package and entry point with it); an entry point of the same name in
    another distribution makes both refuse to start. Read from the installed metadata, without
    importing any plugin.
    """
    import importlib.metadata as md
    import importlib.util

    try:
        dist = md.distribution(names.distribution)
    except md.PackageNotFoundError:
        pass
    else:
        installed = dist.metadata["Name"] or names.distribution
        return f"the installed distribution {installed}", "would replace it"
    wanted = _normalized(names.kind)
    for ep in md.entry_points(group="infercore"):
        if _normalized(ep.name) == wanted:
            owner = ep.dist.name if ep.dist is not None else "an installed distribution"
            if ep.name == names.kind:
                return f"the plugin {ep.name!r} of {owner}", "would make both refuse to start"
            return f"the plugin {ep.name!r} of {owner}", "would add a look-alike of its name"
    try:
        found = importlib.util.find_spec(names.package) is not None
    except (ImportError, ValueError):  # a broken package of that name is still that name
        found = True
    if not found:
        return None
    return f"the installed package {names.package}", "would overwrite or shadow it"


def new_plugin(name: str, role: str, parent: Path) -> list[Path]:
    """Write the distribution ``infercore-NAME`` for a ``role`` component into ``parent``.

    Args:
        name: The plugin name (``my-format``); see :func:`plugin_names`.
        role: ``model_loader``, ``feature_source``, ``batcher``, ``router``,
            ``drift_detector`` or ``action``.
        parent: The folder in which ``infercore-NAME/`` is created (made if missing).

    Returns:
        The files written, in a stable order.

    Raises:
        ScaffoldError: An invalid name or role, a name an installed distribution, plugin or
            package already uses, a kind an installed plugin already registers for the role,
            a destination that exists and is not empty, or one that cannot be written.
    """
    names = plugin_names(name)
    spec = ROLES.get(role)
    if spec is None:
        raise ScaffoldError(
            f"--kind {role!r} is not a component role",
            hint=f"choose one of: {', '.join(ROLES)}",
        )
    taken = _installed_name(names)
    if taken is not None:
        what, effect = taken
        other = f"my-{names.name.replace('_', '-')}"
        example = f" (e.g. {other})" if len(other) <= _MAX_NAME else ""
        raise ScaffoldError(
            f"plugin name {name!r} is taken by {what}; installing {names.distribution} {effect}",
            hint=f"choose another name{example}; `infercore plugins` lists the installed ones",
        )
    owner = _installed_kind(role, names.kind)
    if owner is not None:
        raise ScaffoldError(
            f"{role} kind {names.kind!r} is already registered by the installed plugin "
            f"{owner!r}; two plugins with one kind refuse to start",
            hint="choose another name",
        )
    dest = parent / names.distribution
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ScaffoldError(
            f"{str(dest)!r} already exists and is not empty",
            hint="choose another --dir, or remove it",
        )
    values = {
        "name": names.name,
        "distribution": names.distribution,
        "package": names.package,
        "kind": names.kind,
        "camel": names.camel,
        "Class": names.camel + spec.suffix,
        "role": spec.role,
        "role_words": spec.words,
        "hook": spec.hook,
        "base": spec.base,
        "module": spec.module,
        "infercore_requirement": _core_requirement(),
    }
    values["role_readme"] = render(_template(f"{role}.README.md.tmpl"), values).rstrip("\n")
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"src/{names.package}/__init__.py": "__init__.py.tmpl",
        f"src/{names.package}/{spec.module}.py": f"{role}.py.tmpl",
        f"src/{names.package}/py.typed": None,
        f"tests/test_{names.kind}.py": f"{role}.test.py.tmpl",
    }
    written: list[Path] = []
    for rel, template in files.items():
        path = dest / rel
        text = render(_template(template), values) if template else ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, "utf-8")
        except OSError as exc:
            raise ScaffoldError(
                f"--dir: cannot write {str(path)!r} ({exc.strerror or type(exc).__name__})",
                hint="choose a folder that you can write",
            ) from None
        written.append(path)
    return written
