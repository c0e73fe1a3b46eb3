"""kind -> class registries built from the ``register_*`` hooks.

This is the only module that calls ``pm.hook``. It checks every registered class (the right
base class, a well-formed ``kind``, a ``Config`` Struct that forbids unknown fields, ``async``
role methods where the base class's are, nothing abstract left), refuses a kind registered by
two plugins (naming both), and builds components from config nodes ``{kind: NAME, ...options}``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pluggy

from infercore.components import (
    Action,
    Batcher,
    Component,
    ComponentContext,
    DriftDetector,
    FeatureSource,
    Model,
    Router,
)
from infercore.config.validation import convert
from infercore.errors import ConfigError, PluginError
from infercore.plugin_manager import ENTRY_POINT_GROUP, misgrouped_entry_points

C = TypeVar("C", bound=Component)

#: What a ``kind`` may look like: it is typed in recipes, in ``+key=`` overrides and in metric
#: labels, so a lower-case letter, then lower-case letters, digits, ``-`` and ``_``.
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_KIND_RULE = (
    "a kind is a lower-case letter followed by at most 63 lower-case letters, digits, "
    "'-' or '_', e.g. 'my-format'"
)
_CONFIG_DECLARATION = (
    "class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True)"
)


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One component role: its name in messages, its hook and its base class."""

    role: str
    hook: str
    base: type[Component]


KINDS: tuple[KindSpec, ...] = (
    KindSpec("model_loader", "register_model_loaders", Model),
    KindSpec("feature_source", "register_feature_sources", FeatureSource),
    KindSpec("batcher", "register_batchers", Batcher),
    KindSpec("router", "register_routers", Router),
    KindSpec("drift_detector", "register_drift_detectors", DriftDetector),
    KindSpec("action", "register_actions", Action),
)
ROLES = {k.role: k for k in KINDS}


@dataclass(frozen=True, slots=True)
class Registered:
    cls: type[Component]
    plugin: str


def _coroutine_methods(base: type[Component]) -> list[str]:
    """The methods ``base`` (or a class above it) declares ``async def``, in name order."""
    return sorted(
        {
            name
            for klass in base.__mro__
            for name, value in vars(klass).items()
            if inspect.iscoroutinefunction(value)
        }
    )


class Registry:
    """Every component class the installed plugins provide, by role and kind."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._by_role: dict[str, dict[str, Registered]] = {}
        for spec in KINDS:
            self._by_role[spec.role] = self._collect(spec)

    def _collect(self, spec: KindSpec) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        caller = getattr(self.pm.hook, spec.hook)
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                classes = impl.function()
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin_name!r}: {spec.hook}() raised {type(exc).__name__}: {exc}"
                ) from exc
            if classes is None:
                continue
            if not isinstance(classes, list | tuple):
                raise PluginError(
                    f"plugin {plugin_name!r}: {spec.hook}() must return a list of classes, "
                    f"got {type(classes).__name__}"
                )
            for cls in classes:
                self._check_class(spec, plugin_name, cls)
                kind = cls.kind
                if kind in found:
                    raise PluginError(
                        f"{spec.role} kind {kind!r} is registered by two plugins: "
                        f"{found[kind].plugin!r} and {plugin_name!r}",
                        hint="uninstall one, or disable it with INFERCORE_DISABLE_PLUGINS",
                    )
                found[kind] = Registered(cls, plugin_name)
        return found

    @staticmethod
    def _check_class(spec: KindSpec, plugin: str, cls: Any) -> None:
        shown = cls.__name__ if isinstance(cls, type) else repr(cls)
        where = f"plugin {plugin!r}: {spec.hook}() returned {shown}"
        if not (isinstance(cls, type) and issubclass(cls, spec.base)):
            raise PluginError(f"{where}, which is not a subclass of {spec.base.__name__}")
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise PluginError(f"{where}, which has no `kind` string")
        if not KIND_PATTERN.fullmatch(kind):
            raise PluginError(f"{where}, whose kind {kind!r} is not a valid kind", hint=_KIND_RULE)
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
            what = config.__name__ if isinstance(config, type) else repr(config)
            raise PluginError(
                f"{where}, whose `Config` ({what}) is not a msgspec.Struct",
                hint=f"declare `{_CONFIG_DECLARATION}` in the class, or leave `Config` out "
                "for a component without options",
            )
        if not config.__struct_config__.forbid_unknown_fields:
            raise PluginError(
                f"{where}, whose `Config` ({config.__name__}) does not forbid unknown fields, so "
                "a misspelled option would be ignored",
                hint="add forbid_unknown_fields=True to its class statement, e.g. `class "
                f"{config.__name__}(msgspec.Struct, forbid_unknown_fields=True, frozen=True, "
                "kw_only=True)`",
            )
        # The bases are not ABCMeta classes, so Python would not refuse these itself.
        missing = sorted(
            name
            for name in dir(cls)
            if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
        )
        if missing:
            raise PluginError(f"{where}, which does not implement {', '.join(missing)}")
        # infercore awaits these: a plain `def` would only fail at load or on the first request.
        not_async = [
            name
            for name in _coroutine_methods(spec.base)
            if not inspect.iscoroutinefunction(getattr(cls, name, None))
        ]
        if not_async:
            one = len(not_async) == 1
            listed = ", ".join(f"{name}()" for name in not_async)
            example = f"`async def {not_async[0]}(...)`" if one else "`async def`"
            raise PluginError(
                f"{where}, whose {listed} {'is' if one else 'are'} not `async def`, "
                f"but infercore awaits {'it' if one else 'them'}",
                hint=f"declare {'it' if one else 'them'} {example}; run blocking work in a "
                "thread with `await asyncio.to_thread(...)`",
            )

    def routes(self, runtime: Any) -> list[Any]:
        """Route handlers from every ``register_routes`` hook, in registration order.

        Raises:
            PluginError: A hook raised, or returned something other than a list (naming the
                plugin).
        """
        handlers: list[Any] = []
        for impl in self.pm.hook.register_routes.get_hookimpls():
            try:
                extra = impl.function(runtime=runtime)
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: register_routes() raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if extra is None:
                continue
            if not isinstance(extra, list | tuple):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: register_routes() must return a list of "
                    f"route handlers, got {type(extra).__name__}"
                )
            handlers.extend(extra)
        return handlers

    def plugin_of(self, component: object) -> str:
        """The name of the plugin that registered ``component``'s class (``?`` if none did)."""
        cls = type(component)
        for table in self._by_role.values():
            for reg in table.values():
                if reg.cls is cls:
                    return reg.plugin
        return "?"

    def kinds(self, role: str) -> dict[str, Registered]:
        """Registered classes of a role (``model_loader``, ``batcher`` …) by kind."""
        return self._by_role[role]

    def kinds_by_plugin(self) -> dict[str, dict[str, list[str]]]:
        """plugin name -> role -> kinds it adds."""
        out: dict[str, dict[str, list[str]]] = {}
        for role, table in self._by_role.items():
            for kind, reg in table.items():
                out.setdefault(reg.plugin, {}).setdefault(role, []).append(kind)
        return out

    def resolve(
        self, role: str, node: Any, *, path: str, context: str = ""
    ) -> tuple[type[Component], msgspec.Struct]:
        """Look up ``node['kind']`` and validate the rest of ``node`` into its ``Config``.

        Raises:
            ConfigError: No ``kind``, an unknown kind (listing the available ones), or options
                the kind's ``Config`` rejects (naming the path).
        """
        suffix = f" ({context})" if context else ""
        if not isinstance(node, Mapping):
            raise ConfigError(f"{path}: expected a mapping with a `kind` key, got {node!r}{suffix}")
        kind = node.get("kind")
        table = self._by_role[role]
        available = ", ".join(sorted(table)) or "none installed"
        if kind is None:
            raise ConfigError(
                f"{path}.kind: required key is missing{suffix}",
                hint=f"available {role} kinds: {available}",
            )
        if not isinstance(kind, str):
            raise ConfigError(
                f"{path}.kind: expected a string, got {kind!r}{suffix}",
                hint=f"available {role} kinds: {available}",
            )
        reg = table.get(kind)
        if reg is None:
            raise ConfigError(
                f"{path}.kind: unknown {role} {kind!r}; available: {available}{suffix}",
                hint=self._unknown_kind_hint(kind),
            )
        options = {k: v for k, v in node.items() if k != "kind"}
        cfg = convert(options, reg.cls.Config, path=path, context=context)
        return reg.cls, cfg

    def _unknown_kind_hint(self, kind: str) -> str:
        """Install the plugin, or, when the environment left installed plugins out, say so."""
        skipped: dict[str, str] = getattr(self.pm, "skipped", {})

        def norm(name: str) -> str:
            return name.lower().replace("_", "-")

        if not skipped:
            try:
                misgrouped = misgrouped_entry_points()
            except Exception:  # a broken installation: the hint stays the plain one
                misgrouped = []
            for dist, group, name in misgrouped:
                if norm(name) == norm(kind):
                    return (
                        f"{dist} declares {name!r} as an entry point of group {group!r}; "
                        f"infercore reads the group {ENTRY_POINT_GROUP!r}: "
                        f"[project.entry-points.{ENTRY_POINT_GROUP}] in its pyproject.toml, "
                        "then reinstall it"
                    )
            return "install the plugin that provides it (see `infercore plugins`)"

        for name, variable in sorted(skipped.items()):
            if norm(name) == norm(kind):
                how = "add it there" if variable.endswith("LOAD_PLUGINS") else "remove it there"
                return f"the plugin {name!r} is installed but {variable} leaves it out; {how}"
        left_out = ", ".join(f"{n} ({v})" for n, v in sorted(skipped.items()))
        return (
            f"installed plugins left out by the environment: {left_out}; one of them may "
            "provide it, else install the plugin that does (see `infercore plugins`)"
        )

    def normalize(self, role: str, node: Any, *, path: str, context: str = "") -> dict[str, Any]:
        """``node`` validated, with every option's default filled in."""
        cls, cfg = self.resolve(role, node, path=path, context=context)
        return {"kind": cls.kind, **msgspec.to_builtins(cfg)}

    def build(
        self, role: str, node: Any, context: ComponentContext, *args: Any, label: str = ""
    ) -> Component:
        """Resolve ``node`` and construct the component."""
        cls, cfg = self.resolve(role, node, path=context.path, context=label)
        try:
            return cls(cfg, context, *args)
        except ConfigError as exc:
            # As a schema error of the node says it: which recipe the options came from.
            suffix = f" ({label})"
            if not label or exc.message.endswith(suffix):
                raise
            raise ConfigError(exc.message + suffix, hint=exc.hint) from exc
        except Exception as exc:
            raise PluginError(
                f"{context.path}: {role} {cls.kind!r} from plugin "
                f"{self._by_role[role][cls.kind].plugin!r} failed to initialise: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
