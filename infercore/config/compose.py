"""Compose a config with Hydra (recipes as the group ``recipe``) and validate it with msgspec.

``hydra.utils.instantiate`` is never called: config is data, resolved into closed schemas.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from infercore.config.schema import NAME_RE, VERSION_RE, InfercoreConfig
from infercore.config.validation import convert
from infercore.errors import ConfigError

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
_HYDRA_AVAILABLE = re.compile(r"Available options in '(?P<group>[^']+)':\n(?P<opts>(?:\t[^\n]*\n?)*)")
_HYDRA_KEY = re.compile(r"Could not override '(?P<key>[^']+)'")


def _hydra_error(exc: Exception, overrides: list[str]) -> ConfigError:
    text = str(exc).strip()
    key = _HYDRA_KEY.search(text)
    if key:
        return ConfigError(
            f"{key.group('key')}: unknown key in override",
            hint=f"check its spelling; to add a new key use +{key.group('key')}=VALUE",
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
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(f"cannot compose config from {overrides}: {first}")


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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    conf_dir = (conf_dir or default_conf_dir()).resolve()
    recipes_dir = (recipes_dir or default_recipes_dir()).resolve()
    if not conf_dir.is_dir():
        raise ConfigError(f"config folder {conf_dir.name!r} not found", hint="set INFERCORE_CONF_DIR")

    with tempfile.TemporaryDirectory(prefix="infercore-recipes-") as tmp:
        # Hydra maps folders to groups: expose the recipes folder as the group `recipe`.
        if recipes_dir.is_dir():
            os.symlink(recipes_dir, Path(tmp) / "recipe", target_is_directory=True)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                cfg = hydra_compose(
                    config_name="config",
                    overrides=[*overrides, f"hydra.searchpath=[file://{tmp}]"],
                    return_hydra_config=True,
                )
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
                    raise ConfigError(
                        f"{getattr(exc, 'full_key', '') or '<config>'}: "
                        f"{str(exc).splitlines()[0]}",
                        hint="an ${oc.env:VAR} needs the variable set, or a default: "
                        "${oc.env:VAR,default}",
                    ) from None
        except ConfigError:
            raise
        except Exception as exc:
            raise _hydra_error(exc, overrides) from None
        finally:
            GlobalHydra.instance().clear()

    assert isinstance(data, dict)
    label = f"recipe={choices['recipe']}" if "recipe" in choices else ""
    config = convert(data, InfercoreConfig, path="", context=label)
    _check_names(config, label)
    return Composed(config, data, choices, overrides, recipes_dir)


def _check_names(config: InfercoreConfig, label: str) -> None:
    suffix = f" ({label})" if label else ""
    for name, model in config.models.items():
        if not NAME_RE.match(name):
            raise ConfigError(
                f"models.{name}: invalid model name {name!r}{suffix}",
                hint="use letters, digits, '_' and '-' (at most 64, no '/' or '..')",
            )
        if not model.versions:
            raise ConfigError(f"models.{name}.versions: at least one version is needed{suffix}")
        for version in model.versions:
            if not VERSION_RE.match(version):
                raise ConfigError(
                    f"models.{name}.versions.{version}: invalid version {version!r}{suffix}",
                    hint="use letters, digits, '_', '-' and '.' (at most 32)",
                )
        if model.primary is not None and model.primary not in model.versions:
            raise ConfigError(
                f"models.{name}.primary: {model.primary!r} is not one of the versions "
                f"({', '.join(model.versions)}){suffix}"
            )


_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.I)
_URL_CREDS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<creds>[^@/\s]+)@", re.I)


def redact(value: Any, key: str = "") -> Any:
    """A copy of config data with secret-looking values replaced by ``'***'``."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return "***"
    if isinstance(value, str):
        return _URL_CREDS.sub(lambda m: f"{m.group('scheme')}***@", value)
    return value


def to_yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def config_as_builtins(config: InfercoreConfig) -> Any:
    return msgspec.to_builtins(config)
