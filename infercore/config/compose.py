"""Compose a config with Hydra (recipes as the group ``recipe``) and validate it with msgspec.

``hydra.utils.instantiate`` is never called: config is data, resolved into closed schemas.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from infercore.config.schema import NAME_RE, VERSION_RE, InfercoreConfig
from infercore.config.validation import allowed_fields, convert
from infercore.errors import ConfigError

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
        key, _, value = item.partition("=")
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
    for var in _ENV_REF.findall(raw) if isinstance(raw, str) else []:
        if os.environ.get(var) == "":
            return ConfigError(
                f"{key}: the environment variable {var} is set but empty",
                hint=f"give {var} a value, or unset it to use the default",
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
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(f"cannot compose config from {overrides}: {first}")


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


#: Words of a key name (split at ``_``, ``-``, ``.`` and camelCase) that mark its value secret
#: wherever they stand (``db_password``, ``AWS_SECRET_ACCESS_KEY``); whole words, so
#: ``max_tokens`` and ``tokenizer`` stay visible. ``authorization`` and ``cookie`` are the HTTP
#: headers that carry credentials (a webhook's ``headers:``).
_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "apikey",
        "credential",
        "credentials",
        "authorization",
        "cookie",
        "sessionid",
    }
)
#: Words that mark a secret only as the key's last word, the thing it names: ``DB_PASS``,
#: ``private_key``, ``X-Signing-Key``, ``x-api-key``, ``sig``, ``X-Hub-Signature-256``,
#: ``X-Auth``, ``session``. In front of another word they qualify it: ``key_field``,
#: ``auth_env``, ``pass_env``, ``signature_version``, ``session_ttl``.
_SECRET_HEADS = frozenset({"pass", "pwd", "key", "sig", "signature", "auth", "session"})
#: Words before a head word that make it data, not a secret: a feature store's ``join_key``,
#: a ``public_key``, a ``partition_key``, a ``first_pass``.
_PLAIN_QUALIFIERS = frozenset(
    {
        "public",
        "join",
        "primary",
        "foreign",
        "sort",
        "partition",
        "shard",
        "cache",
        "routing",
        "entity",
        "lookup",
        "row",
        "object",
        "group",
        "idempotency",
        "dedup",
        "sticky",
        "feature",
        "column",
        "index",
        "first",
        "second",
        "last",
        "single",
        "multi",
    }
)
#: Last words that say the value only names or locates the secret, and is none itself:
#: ``auth_env``, ``token_file``, ``password_path``, ``secret_name``, ``api_key_header``,
#: ``token_url``.
_POINTER_WORDS = frozenset({"env", "var", "file", "path", "dir", "name", "header", "field", "url"})
_KEY_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Everything between the scheme and the last '@' before the path is userinfo.
_URL_CREDS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<creds>[^/\s]+)@", re.I)
_URL = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s\"'<>]+", re.I)
#: A query (or fragment) parameter of a URL: ``?access_token=…``, ``&sig=…``, ``#token=…``.
_URL_PARAM = re.compile(r"(?P<sep>[?&;#])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
#: An argument with its value: ``--password=…``, ``-token=…``, a Hydra ``db.password=…``.
_ARG_WITH_VALUE = re.compile(r"(?P<name>[-+~]{0,2}[A-Za-z_][\w.\-]*)=(?P<value>.*)", re.S)
#: An option whose value is the next argument: ``--password …``.
_ARG_OPTION = re.compile(r"--(?P<name>[A-Za-z][\w.\-]*)")

#: Tokens whose prefix names them, masked wherever they stand in a string, in a URL or not (a
#: GitHub token in a command's argv, an OpenAI key in a description). The prefix stays visible:
#: it says which token to rotate. The prefix must start a word and the body be as long as its
#: issuer makes it, in its alphabet, with two of lowercase, uppercase and digits
#: (:func:`_mixed`), so that words do not match: ``sk-learn-compatible-models``,
#: ``xoxb-your-token-here``, ``task-1234…``.
_PREFIXED_TOKENS = tuple(
    re.compile(rf"(?<![A-Za-z0-9])(?P<prefix>{prefix})(?P<body>{body})(?![A-Za-z0-9])")
    for prefix, body in (
        (r"gh[pousr]_", r"[A-Za-z0-9]{36,}"),  # GitHub
        (r"github_pat_", r"[A-Za-z0-9_]{22,}"),  # GitHub, fine-grained
        (r"glpat-", r"[A-Za-z0-9_\-]{20,}"),  # GitLab
        (r"xox[abeoprs]-|xapp-", r"[A-Za-z0-9\-]{10,}"),  # Slack
        (r"sk-", r"[A-Za-z0-9_\-]{20,}"),  # OpenAI, Anthropic, DeepSeek …
        (r"[rs]k_(?:live|test)_", r"[A-Za-z0-9]{16,}"),  # Stripe
        (r"hf_", r"[A-Za-z0-9]{30,}"),  # Hugging Face
        (r"npm_", r"[A-Za-z0-9]{36,}"),  # npm
        (r"AIza", r"[A-Za-z0-9_\-]{35}"),  # Google API key (Google Chat's ?key=)
        (r"A[KS]IA", r"[A-Z0-9]{16}"),  # AWS access key id
        (r"eyJ", r"[\w\-]{8,}\.eyJ[\w\-]{8,}\.[\w\-]{8,}"),  # a JWT (a bearer token)
    )
)
_PRIVATE_KEY = re.compile(
    r"(?P<begin>-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)(?P<body>.+?)(?=-----END|\Z)", re.S
)
#: Hosts of webhooks whose path holds the secret, each with where it sits (see
#: :func:`_known_secret_segments`). Their IDs (Slack's team and channel, Discord's webhook
#: id, Teams' group and tenant) stay visible: they help to recognise the URL and grant nothing.
_SLACK_HOSTS = frozenset({"hooks.slack.com", "hooks.slack-gov.com"})
_DISCORD_HOSTS = frozenset(
    f"{sub}{domain}"
    for sub in ("", "canary.", "ptb.")
    for domain in ("discord.com", "discordapp.com")
)
_TEAMS_HOSTS = (".webhook.office.com", "outlook.office.com", "outlook.office365.com")
#: Hosts whose paths hold only IDs and whose secret is a query parameter (Power Automate and
#: Logic Apps, as Teams workflows use them: ``…/workflows/<32 hex>/triggers/…?sig=…``):
#: their paths are not searched for random-looking segments.
_SIGNED_QUERY_HOSTS = (".logic.azure.com", ".api.powerplatform.com")
#: Schemes whose URLs are requested, and so may be capability URLs (whoever knows the URL may
#: POST to it): only their paths are searched for random-looking segments. Object stores and
#: databases (``s3://bucket/0/<run id>/model.onnx``, ``redis://host/0``) carry credentials in
#: the userinfo or the query, masked anyway; their paths name things.
_REQUESTED_SCHEMES = frozenset({"http", "https", "ws", "wss"})
#: A path segment that may be a random token: token characters only (base64url, hex), so a
#: file name (``model.onnx``), a version (``1.2.3``), a digest with its algorithm
#: (``sha256:…``) or an interpolation never is.
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9_\-]{20,}")
#: Trailing characters of a URL found in text that are not part of it: punctuation, and the
#: ``}`` of an interpolation whose default is the URL (``${oc.env:HOOK,https://…}``).
_URL_TAIL = re.compile(r"[.,;:!?)\]}'\"]+$")


def _secret_key(key: str) -> bool:
    """Whether a key (a config key, a header, an environment variable, a URL parameter or an
    option's name) names a secret."""
    words = [w.lower() for w in _KEY_WORD.findall(key)]
    while words and words[-1].isdigit():  # X-Hub-Signature-256
        words.pop()
    if not words or words[-1] in _POINTER_WORDS:
        return False
    joined = {a + b for a, b in itertools.pairwise(words)}  # api_key -> apikey
    if _SECRET_WORDS.intersection(words) or _SECRET_WORDS.intersection(joined):
        return True
    return words[-1] in _SECRET_HEADS and (len(words) == 1 or words[-2] not in _PLAIN_QUALIFIERS)


def _literal(value: str, references: bool) -> bool:
    """Whether a secret's ``value`` is written out (not empty, and with ``references``, not a
    ``${…}`` interpolation whose value comes from elsewhere)."""
    return bool(value) and not (references and "${" in value)


def _mixed(text: str) -> bool:
    """Whether ``text`` mixes two of lowercase letters, uppercase letters and digits."""
    classes = (str.islower, str.isupper, str.isdigit)
    return sum(any(test(c) for c in text) for test in classes) >= 2


def _random_segment(segment: str) -> bool:
    """Whether a URL path segment looks like a random token (a generic webhook's secret,
    ``/hook/3f9a0c…``, a Mattermost hook id): 20 or more token characters
    (:data:`_TOKEN_SEGMENT`) holding a run of 16 or more letters and digits, both, without a
    separator.

    Names are made of words: ``distilbert-base-uncased-finetuned-sst-2-english`` has no such
    run, and neither has a UUID (runs of at most 12), which in a path names a resource (a run,
    a subscription) far more often than it grants anything; a webhook whose secret is a UUID
    is known by its host (:func:`_known_secret_segments`). What cannot be told from a token is
    masked as one: a commit id or a digest in hex without its algorithm (``secrets.token_hex``
    makes the same).
    """
    if not _TOKEN_SEGMENT.fullmatch(segment):
        return False
    run = max(re.split(r"[_\-]", segment), key=len)
    return len(run) >= 16 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)


def _known_secret_segments(host: str, segments: list[str]) -> set[int]:
    """Indexes of the ``segments`` of a URL path (``segments[0]`` is empty: the path starts
    with ``/``) that hold a known webhook's secret."""
    found: set[int] = set()
    filled = [i for i, s in enumerate(segments) if s]
    if host in _SLACK_HOSTS and len(filled) >= 4:
        # /services/T…/B…/<secret>, /workflows/T…/A…/<id>/<secret>, /triggers/T…/<id>/<secret>
        found.add(filled[-1])
    elif host in _DISCORD_HOSTS:
        # /api[/v10]/webhooks/<id>/<token>[/slack|/github]
        found.update(i + 2 for i, s in enumerate(segments) if s == "webhooks")
    elif host.endswith(_TEAMS_HOSTS):
        # /webhookb2/<group>@<tenant>/IncomingWebhook/<32 hex>/<owner>[/<V2 key>]
        if "IncomingWebhook" in segments:
            found.update(range(segments.index("IncomingWebhook") + 1, len(segments)))
    elif host == "api.telegram.org":
        # /bot<id>:<token>/sendMessage
        found.update(i for i, s in enumerate(segments) if re.fullmatch(r"bot\d+:.+", s))
    return {i for i in found if i < len(segments) and segments[i]}


def _redact_url_path(url: str, references: bool) -> str:
    """``url`` with the secrets in its path masked, each segment as ``***``: a known
    webhook's secret (:func:`_known_secret_segments`) and, in a URL that is requested, any
    segment that looks random (:func:`_random_segment`). Scheme, host, query and the other
    segments stay, so that the URL can still be recognised."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if not sep or cut < 0 or rest[cut] != "/":
        return url
    authority, path = rest[:cut], rest[cut:]
    end = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
    path, after = path[:end], path[end:]
    host = authority.rpartition("@")[2].lower()
    host = host.rpartition(":")[0] if re.search(r":\d*$", host) else host
    segments = path.split("/")
    masked = _known_secret_segments(host, segments)
    if scheme.lower() in _REQUESTED_SCHEMES and not host.endswith(_SIGNED_QUERY_HOSTS):
        masked.update(i for i, s in enumerate(segments) if _random_segment(s))
    masked = {i for i in masked if _literal(segments[i], references)}
    if not masked:
        return url
    path = "/".join("***" if i in masked else s for i, s in enumerate(segments))
    return f"{scheme}://{authority}{path}{after}"


def _redact_url(url: str, references: bool) -> str:
    """One URL found in text with its path's secrets and its secret query parameters masked
    (punctuation after it, or an interpolation's closing ``}``, is kept out of it)."""
    tail = _URL_TAIL.search(url)
    url, tail_text = (url[: tail.start()], tail.group()) if tail else (url, "")

    def param(m: re.Match[str]) -> str:
        name, value = m.group("name"), m.group("value")
        if not _secret_key(urllib.parse.unquote_plus(name)) or not _literal(value, references):
            return m.group()
        return f"{m.group('sep')}{name}=***"

    return _URL_PARAM.sub(param, _redact_url_path(url, references)) + tail_text


def _redact_tokens(text: str) -> str:
    """``text`` with every token that its prefix names (:data:`_PREFIXED_TOKENS`) and every
    private key in PEM masked."""

    def token(m: re.Match[str]) -> str:
        return f"{m.group('prefix')}***" if _mixed(m.group("body")) else m.group()

    for pattern in _PREFIXED_TOKENS:
        text = pattern.sub(token, text)
    return _PRIVATE_KEY.sub(lambda m: f"{m.group('begin')}***", text)


def _redact_text(text: str, references: bool) -> str:
    """``text`` with the credentials of every URL in it masked: userinfo
    (``redis://:pw@host``), secret query parameters (``?access_token=…``, ``&sig=…``) and
    secrets in the path (``https://hooks.slack.com/services/T…/B…/***``); and every token its
    prefix names (``ghp_…``, ``xoxb-…``, ``sk-…``, ``AKIA…``), URL or not."""
    if "://" in text:

        def creds(m: re.Match[str]) -> str:
            if not _literal(m.group("creds"), references):
                return m.group()
            return f"{m.group('scheme')}***@"

        text = _URL_CREDS.sub(creds, text)
        text = _URL.sub(lambda m: _redact_url(m.group(), references), text)
    return _redact_tokens(text)


def _redact_args(items: list[Any], references: bool) -> list[Any]:
    """An argument list (a ``command`` action's ``argv``) with the values of secret options
    masked: ``--password=…``, ``--token …``, ``db.password=…``."""
    out = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            continue
        if m := _ARG_WITH_VALUE.fullmatch(item):
            name, value = m.group("name"), m.group("value")
            if _secret_key(name) and _literal(value, references):
                out[i] = f"{name}=***"
        elif (m := _ARG_OPTION.fullmatch(item)) and i + 1 < len(items):
            name, value = m.group("name"), items[i + 1]
            flag = name.lower().startswith(("no-", "no_"))  # --no-password takes no value
            if (
                not flag
                and _secret_key(name)
                and isinstance(value, str)
                and not value.startswith("-")
                and _literal(value, references)
            ):
                out[i + 1] = "***"
    return out


def redact(value: Any, key: str = "", *, references: bool = False) -> Any:
    """A copy of config data with secret-looking values replaced by ``'***'``.

    A value is secret when its key names one (``token``, ``password``, ``api_key``,
    ``DB_PASS``, ``X-Signing-Key`` …: :func:`_secret_key`); the credentials in a URL
    (``redis://:pw@host``, ``?access_token=…``, a webhook's token in its path), tokens that
    their prefix names (``ghp_…``, ``sk-…``) and the values of secret options in an argument
    list (``--password=…``) are masked wherever they appear. With ``references``
    (unresolved data), a ``${…}`` interpolation is left as it is: it is no secret itself.
    """
    secret = bool(key) and _secret_key(key)
    if isinstance(value, dict):
        # Below a secret key (``credentials: {user: …, key: …}``) everything is secret.
        return {
            k: redact(v, key if secret else str(k), references=references) for k, v in value.items()
        }
    if isinstance(value, list):
        return _redact_args([redact(v, key, references=references) for v in value], references)
    # A bool is a switch, never a secret (``auth: true``).
    if (
        secret
        and value is not None
        and not isinstance(value, bool)
        and (not isinstance(value, str) or _literal(value, references))
    ):
        return "***"
    if isinstance(value, str):
        return _redact_text(value, references)
    return value


def _leaves(data: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts and lists with its config path (``a.b[0].c``)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, data


def secret_paths(data: Any, path: str = "") -> list[str]:
    """Config paths (``a.b[0].c``) of the secrets written literally in ``data``: what
    :func:`redact` masks, ``${…}`` interpolations aside."""
    pairs = zip(_leaves(data, path), _leaves(redact(data, references=True), path), strict=True)
    return [where for (where, given), (_, masked) in pairs if given != masked]


def _secret_in_url_path(value: Any) -> bool:
    if not isinstance(value, str) or "://" not in value:
        return False
    urls = (_URL_TAIL.sub("", m.group()) for m in _URL.finditer(value))
    return any(_redact_url_path(url, references=True) != url for url in urls)


def secret_url_paths(data: Any, path: str = "") -> list[str]:
    """Those of :func:`secret_paths` whose value has a URL with a secret written literally in
    its path (a Slack or Discord webhook): the fix is to read the whole URL from the
    environment, ``url: ${oc.env:HOOK_URL}``."""
    return [where for where, value in _leaves(data, path) if _secret_in_url_path(value)]


def to_yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def config_as_builtins(config: InfercoreConfig) -> Any:
    return msgspec.to_builtins(config)
