"""A fresh pluggy manager per app: built-ins first, then the ``infercore`` entry points.

Built-in plugins are modules with ``@hookimpl`` functions like any third-party plugin; they are
always loaded. ``INFERCORE_LOAD_PLUGINS`` (comma-separated entry-point names) loads only the
named external plugins; ``INFERCORE_DISABLE_PLUGINS`` skips the named ones (built-ins included).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from infercore import hookspecs
from infercore.errors import PluginError

ENTRY_POINT_GROUP = "infercore"

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


def make_plugin_manager(
    extra_plugins: list[tuple[str, object]] | None = None,
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Build a plugin manager with built-ins, entry-point plugins and ``extra_plugins``.

    Args:
        extra_plugins: ``(name, plugin object)`` pairs registered after the others (tests and
            embedding applications use this).

    Returns:
        The manager and, by plugin name, what is known about each plugin.

    Raises:
        PluginError: A plugin fails to import, or implements a hook infercore does not define
            (a misspelled hook name) or with argument names the spec does not have.
    """
    pm = pluggy.PluginManager("infercore")
    pm.add_hookspecs(hookspecs)
    allow = _env_list("INFERCORE_LOAD_PLUGINS")
    deny = _env_list("INFERCORE_DISABLE_PLUGINS") or set()
    infos: dict[str, PluginInfo] = {}

    core_version = _core_version()
    for name, module_name in BUILTIN_PLUGINS:
        if name in deny:
            continue
        _register(pm, name, importlib.import_module(module_name))
        infos[name] = PluginInfo(name, "infercore", core_version, "Apache-2.0", builtin=True)

    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in deny or (allow is not None and ep.name not in allow):
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}",
                hint=f"reinstall it, or skip it with INFERCORE_DISABLE_PLUGINS={ep.name}",
            ) from exc
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
        raise PluginError(
            f"plugin {plugin_name!r} implements a hook infercore does not define: {exc}",
            hint="hook names are listed in infercore.hookspecs (e.g. register_model_loaders)",
        ) from None
    return pm, infos


def _core_version() -> str:
    try:
        return md.version("infercore")
    except md.PackageNotFoundError:
        return "0+unknown"
