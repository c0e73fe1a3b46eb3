"""A fresh pluggy manager per app: built-ins first, then the ``infercore`` entry points.

Built-in plugins are modules with ``@hookimpl`` functions like any third-party plugin; they are
always loaded. ``INFERCORE_LOAD_PLUGINS`` (comma-separated entry-point names) loads only the
named external plugins (set but empty: none); ``INFERCORE_DISABLE_PLUGINS`` skips the named ones
(built-ins included). A name in either that matches no installed plugin is logged as a warning,
not an error: one environment may set the variable for images with different plugins (as
Datasette's ``DATASETTE_LOAD_PLUGINS`` does, it loads what it can), but a typo must not pass
unseen. The plugins the variables left out are remembered (:attr:`InfercorePluginManager.skipped`)
so that an unknown kind can say that its plugin is installed but filtered out.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import logging
import os
import re
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from infercore import hookspecs
from infercore.errors import PluginError

ENTRY_POINT_GROUP = "infercore"
LOAD_ENV = "INFERCORE_LOAD_PLUGINS"
DISABLE_ENV = "INFERCORE_DISABLE_PLUGINS"

log = logging.getLogger("infercore.plugins")

#: (name, module) of the plugins that ship with the core.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("builtins.features", "infercore.builtins.features"),
    ("builtins.batchers", "infercore.builtins.batchers"),
    ("builtins.routers", "infercore.builtins.routers"),
    ("builtins.actions", "infercore.builtins.actions"),
)


@dataclass(slots=True)
class PluginInfo:
    """What ``infercore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    license: str
    builtin: bool
    kinds: dict[str, list[str]] = field(default_factory=dict)
    #: A plugin module's ``LICENCE_NOTE``: e.g. the licence of a library it wraps.
    note: str = ""


class InfercorePluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which installed plugins the environment left out."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        #: Installed plugins not loaded, by name: the variable that left each out.
        self.skipped: dict[str, str] = {}
        #: Installed plugins that failed to import, by name (only with ``keep_going``).
        self.broken: dict[str, PluginError] = {}


def _import_hint(name: str, exc: BaseException) -> str:
    """How to get past a plugin that fails to import: what to fix, or how to skip it."""
    skip = f"skip it with INFERCORE_DISABLE_PLUGINS={name}"
    if isinstance(exc, SyntaxError):
        where = os.path.basename(exc.filename or "") or "its code"
        return f"fix the syntax error (line {exc.lineno} of {where}), or {skip}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"install {exc.name!r}, which the plugin imports (or reinstall it), or {skip}"
    return f"reinstall it, or {skip}"


def _warn_unknown(variable: str, names: set[str], known: set[str]) -> None:
    for name in sorted(names - known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        log.warning(
            "%s names %r, which is no installed plugin%s (installed: %s)",
            variable,
            name,
            guess,
            ", ".join(sorted(known)) or "none",
        )


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _licence(dist: md.Distribution) -> str:
    meta = dist.metadata
    for key in ("License-Expression", "License"):
        values = meta.get_all(key) or []
        value = values[0] if values else None
        if isinstance(value, str) and value.strip() and value.strip().upper() != "UNKNOWN":
            return value.strip().splitlines()[0]
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            return str(classifier.rsplit("::", 1)[-1].strip())
    return "unknown"


def _register(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {name!r} does not match infercore's hooks: {exc}",
            hint="check the hook's argument names against infercore.hookspecs",
        ) from None
    except ValueError as exc:  # pluggy: the name, or the same object, is registered already
        raise PluginError(
            f"plugin {name!r} cannot be registered: {exc}",
            hint="each plugin needs its own name and object; disable the duplicate with "
            "INFERCORE_DISABLE_PLUGINS",
        ) from None


def misgrouped_entry_points() -> list[tuple[str, str, str]]:
    """Entry points in a group that looks like infercore's but is not it (``infercore_plugins``,
    ``infercore.plugins`` …), as ``(distribution, group, name)``: infercore never sees them.

    Reads every installed distribution's entry points: for an error's hint, not a hot path.
    """
    found = set()
    for dist in md.distributions():
        for ep in dist.entry_points:
            group = ep.group
            if group != ENTRY_POINT_GROUP and "infercore" in group.lower():
                found.add((dist.name, group, ep.name))
    return sorted(found)


def make_plugin_manager(
    extra_plugins: list[tuple[str, object]] | None = None,
    *,
    keep_going: bool = False,
) -> tuple[InfercorePluginManager, dict[str, PluginInfo]]:
    """Build a plugin manager with built-ins, entry-point plugins and ``extra_plugins``.

    Args:
        extra_plugins: ``(name, plugin object)`` pairs registered after the others (tests and
            embedding applications use this).
        keep_going: Leave out an installed plugin that fails to import, keeping its error in
            ``pm.broken``, instead of raising (``infercore plugins`` lists the others).

    Returns:
        The manager and, by plugin name, what is known about each plugin.

    Raises:
        PluginError: A plugin fails to import, or implements a hook infercore does not define
            (a misspelled hook name) or with argument names the spec does not have.
    """
    pm = InfercorePluginManager("infercore")
    pm.add_hookspecs(hookspecs)
    allow = _env_list(LOAD_ENV)
    deny = _env_list(DISABLE_ENV) or set()
    infos: dict[str, PluginInfo] = {}
    entry_points = list(md.entry_points(group=ENTRY_POINT_GROUP))
    builtin_names = {name for name, _ in BUILTIN_PLUGINS}
    external_names = {ep.name for ep in entry_points}
    if allow:
        _warn_unknown(LOAD_ENV, allow - builtin_names, external_names)
    if deny:
        _warn_unknown(DISABLE_ENV, deny, external_names | builtin_names)

    core_version = _core_version()
    for name, module_name in BUILTIN_PLUGINS:
        if name in deny:
            pm.skipped[name] = DISABLE_ENV
            continue
        _register(pm, name, importlib.import_module(module_name))
        infos[name] = PluginInfo(name, "infercore", core_version, "Apache-2.0", builtin=True)

    for ep in entry_points:
        if ep.name in deny:
            pm.skipped[ep.name] = DISABLE_ENV
            continue
        if allow is not None and ep.name not in allow:
            pm.skipped[ep.name] = LOAD_ENV
            continue
        dist_name = ep.dist.name if ep.dist else "?"
        if pm.has_plugin(ep.name):
            taken_by = "infercore (a built-in)" if ep.name in builtin_names else None
            if taken_by is None and ep.name in infos:
                if infos[ep.name].distribution == dist_name:
                    continue  # the same distribution seen twice on the path
                taken_by = infos[ep.name].distribution
            # Which one wins would depend on the order of sys.path: a plugin that silently
            # replaces another (a model loader, say) is refused, naming both.
            raise PluginError(
                f"plugin name {ep.name!r} of {dist_name} is taken by {taken_by}",
                hint="each plugin needs its own entry-point name: uninstall one of them",
            )
        try:
            plugin = ep.load()
        except Exception as exc:
            error = PluginError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}",
                hint=_import_hint(ep.name, exc),
            )
            if not keep_going:
                raise error from exc
            pm.broken[ep.name] = error
            continue
        _register(pm, ep.name, plugin)
        dist = ep.dist
        infos[ep.name] = PluginInfo(
            ep.name,
            dist.name if dist else "?",
            dist.version if dist else "?",
            _licence(dist) if dist else "unknown",
            builtin=False,
            note=str(getattr(plugin, "LICENCE_NOTE", "") or ""),
        )

    for name, plugin in extra_plugins or []:
        _register(pm, name, plugin)
        module: ModuleType | None = plugin if isinstance(plugin, ModuleType) else None
        infos[name] = PluginInfo(
            name, module.__name__ if module else type(plugin).__name__, "?", "unknown", False
        )

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin_name = pm.get_name(exc.plugin) or "?"
        # pluggy's text names the plugin by its repr: a module's holds its absolute path.
        detail = re.sub(r"<module '([^']+)' from (['\"]).*?\2>", r"module \1", str(exc))
        raise PluginError(
            f"plugin {plugin_name!r} implements a hook infercore does not define: {detail}",
            hint="hook names are listed in infercore.hookspecs (e.g. register_model_loaders)",
        ) from None
    return pm, infos


def _core_version() -> str:
    try:
        return md.version("infercore")
    except md.PackageNotFoundError:
        return "0+unknown"
