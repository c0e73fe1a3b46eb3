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


def env_references(data: Any) -> list[str]:
    """Environment variables the config reads through ``${oc.env:VAR…}``, sorted."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.update(_ENV_REF.findall(value))

    walk(data)
    return sorted(found)


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
    secret (``token``, ``password`` …) or a URL with credentials (``redis://:pw@host``)."""
    from infercore.config.compose import _URL_CREDS, _secret_key

    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict | list):
                found.extend(check_secret_literals(value, sub))
            elif isinstance(value, str) and "${" in value:
                continue
            elif (_secret_key(str(key)) and value not in (None, "", False)) or (
                isinstance(value, str) and _URL_CREDS.search(value)
            ):
                found.append(sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(check_secret_literals(value, f"{path}[{i}]"))
    return found


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
        raise ConfigError(
            f"{literals[0]}: a secret written literally would end up in the ConfigMap",
            hint="read it from the environment: ${oc.env:VAR} (the pod gets VAR from a Secret)",
        )
    return composed, data
