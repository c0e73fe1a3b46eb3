"""A composed config written back as one self-contained recipe (for a ConfigMap).

``infercore serve +recipe=NAME`` with the rendered file as the only recipe composes to the same
config as the overrides it was rendered from: the defaults list selects the same option of
every config group and the body sets every key. ``${oc.env:…}`` interpolations are kept, so
addresses and secrets are read from the pod's environment, never written into the ConfigMap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from infercore.config.compose import (
    Composed,
    compose,
    default_conf_dir,
    default_recipes_dir,
    hydra_composed,
    secret_url_paths,
)
from infercore.errors import ConfigError

#: Config groups whose choice the rendered recipe pins (``recipe`` itself is the file).
_SKIP_GROUPS = ("recipe",)
_ENV_REF = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def compose_unresolved(
    overrides: list[str], *, conf_dir: Path | None = None, recipes_dir: Path | None = None
) -> dict[str, Any]:
    """The composed config as data with its interpolations kept (``resolve=False``)."""
    from omegaconf import OmegaConf

    conf_dir = (conf_dir or default_conf_dir()).resolve()
    recipes_dir = (recipes_dir or default_recipes_dir()).resolve()
    with hydra_composed(overrides, conf_dir=conf_dir, recipes_dir=recipes_dir) as cfg:
        data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


#: Root sections that hold deployment values for the rest of the config to refer to
#: (``${feature_store.redis_url}``): what they read is needed only where they are referred to.
_HOLDERS = ("feature_store",)
#: A node interpolation (``${feature_store.redis_url}``), not a resolver (``${oc.env:…}``).
_NODE_REF = re.compile(r"\$\{([A-Za-z_][\w-]*(?:\.[\w-]+)*)\}")
_MISSING = object()


def _lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def env_needed(data: dict[str, Any], resolved: dict[str, Any]) -> dict[str, str]:
    """Environment variables the config reads (``${oc.env:VAR}``) where they are used, each
    with the config path that reads it (the first one found).

    ``data`` is the composed config unresolved, ``resolved`` the same resolved. A holder
    section (``feature_store``) counts only through the interpolations that refer to it, and a
    node's ``redis_url`` only when that node's ``online_store`` is ``redis``: every recipe
    composes ``feature_store.redis_url``, which iris never reads.
    """
    found: dict[str, str] = {}
    followed: set[str] = set()

    def walk(value: Any, live: Any, where: str) -> None:
        if isinstance(value, dict):
            node = live if isinstance(live, dict) else {}
            for key, child in value.items():
                key = str(key)
                if key == "redis_url" and node.get("online_store") != "redis":
                    continue
                walk(child, node.get(key), f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            items = live if isinstance(live, list) else []
            for i, child in enumerate(value):
                walk(child, items[i] if i < len(items) else None, f"{where}[{i}]")
        elif isinstance(value, str):
            for var in _ENV_REF.findall(value):
                found.setdefault(var, where)
            for target in _NODE_REF.findall(value):
                if target not in followed:
                    followed.add(target)
                    walk(_lookup(data, target), _lookup(resolved, target), where)

    for key, value in data.items():
        if key not in _HOLDERS:
            walk(value, resolved.get(key), key)
    return found


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating the dicts on the way."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


def render_recipe(
    composed: Composed, data: dict[str, Any], *, source: list[str], note: str = ""
) -> str:
    """The recipe file: package header, pinned group choices, then every key."""
    import yaml

    choices = {
        group: option
        for group, option in sorted(composed.choices.items())
        if group not in _SKIP_GROUPS and "/" not in group
    }
    lines = [
        "# @package _global_",
        "# Rendered by `infercore deploy` from: " + " ".join(source),
        "# Serve it with INFERCORE_RECIPES_DIR set to this file's folder.",
    ]
    if note:
        lines.extend(f"# {line}" for line in note.splitlines())
    doc: dict[str, Any] = {
        "defaults": [{f"override /{g}": o} for g, o in choices.items()],
        **data,
    }

    class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    body: str = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)
    return "\n".join(lines) + "\n" + body


def check_secret_literals(data: Any, path: str = "") -> list[str]:
    """Config paths whose value is a literal secret, not ``${oc.env:…}``: a key that names a
    secret (``token``, ``password``, ``DB_PASS``, ``X-Signing-Key`` …), a URL's credentials
    (``redis://:pw@host``, ``?access_token=…``, a webhook's token in its path:
    ``https://hooks.slack.com/services/T…/B…/…``), a token its prefix names (``ghp_…``,
    ``sk-…``) or a secret option in an argument list (``--password=…``): what
    ``infercore config show`` redacts."""
    from infercore.config.compose import secret_paths

    return secret_paths(data, path)


def compose_for_deploy(overrides: list[str]) -> tuple[Composed, dict[str, Any]]:
    """Validate the overrides (exactly as ``serve`` would), then compose them unresolved.

    Raises:
        ConfigError: As ``infercore config validate`` would; also when a secret is written
            literally into the config (it would end up in a ConfigMap).
    """
    composed = compose(overrides)
    data = compose_unresolved(overrides)
    literals = check_secret_literals(data)
    if literals:
        # All of them at once: fixing one at a time would take as many runs.
        more = f" (also {', '.join(literals[1:])})" if len(literals) > 1 else ""
        hint = "read it from the environment: ${oc.env:VAR} (the pod gets VAR from a Secret)"
        in_urls = secret_url_paths(data)
        if in_urls:
            # A webhook's URL is its secret: it moves to the Secret whole.
            hint += "; a URL with a token in its path goes there whole: url: ${oc.env:WEBHOOK_URL}"
        what = "a URL with a token in its path" if literals[0] in in_urls else "a secret"
        raise ConfigError(
            f"{literals[0]}: {what} written literally would end up in the ConfigMap{more}",
            hint=hint,
        )
    return composed, data
