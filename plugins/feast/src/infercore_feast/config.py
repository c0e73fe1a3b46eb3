"""Options of ``features: {kind: feast, ...}`` and the checks that need no feature store."""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from infercore.errors import ConfigError

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]

_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NUMERIC = ("FP32", "FP64", "INT64")


class EntitySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Which request field carries the entity key, and the Feast join key it fills.

    Attributes:
        field: The request field with one key per row, e.g. ``card_id``.
        join_key: The Feast entity's join key, e.g. ``card_id``.
    """

    field: NonEmpty
    join_key: NonEmpty


class InputSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One model input, in the order the model expects them.

    Attributes:
        name: The input name (and, for ``source: request``, the request field it comes from).
        source: ``request`` (taken from the request) or ``feast`` (read from the online store).
        feature: For ``feast`` inputs: ``"view:feature"``, e.g. ``card_features:txn_count_24h``.
        datatype: ``FP32``, ``FP64``, ``INT64`` or ``BYTES``.
        default: For ``feast`` inputs (required there): the value used when the store has
            none for the entity, and for every row when ``on_failure: fail_open`` applies. For
            ``request`` inputs (optional): makes the field optional; a request that omits it
            gets this value.
        min: For numeric ``request`` inputs: the smallest value accepted (400 below it).
        max: For numeric ``request`` inputs: the largest value accepted (400 above it).
    """

    name: NonEmpty
    source: Literal["request", "feast"]
    feature: str | None = None
    datatype: Literal["FP32", "FP64", "INT64", "BYTES"] = "FP32"
    default: float | int | str | None = None
    min: float | None = None
    max: float | None = None


class FeastSourceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``features: {kind: feast, ...}`` (every option is listed in the README)."""

    repo: NonEmpty
    project: Annotated[str, msgspec.Meta(pattern=_PROJECT.pattern)]
    entity: EntitySpec
    inputs: Annotated[list[InputSpec], msgspec.Meta(min_length=1)]
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: NonEmpty = "redis://127.0.0.1:6379"
    redis_socket_timeout_s: Positive = 1.0
    sqlite_path: str | None = None
    registry_path: str | None = None
    layout: Literal["columns", "matrix"] = "columns"
    matrix_input: NonEmpty = "input"
    batch_window_ms: NonNegative = 1.0
    max_batch_entities: PositiveInt = 256
    cache_ttl_s: NonNegative = 5.0
    cache_max_entries: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    cache_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024 * 1024
    max_entity_key_bytes: PositiveInt = 256
    timeout_ms: Positive = 50.0
    on_failure: Literal["fail_closed", "fail_open"] = "fail_closed"
    serve_stale_s: NonNegative = 0.0
    breaker_failures: PositiveInt = 5
    breaker_failing_s: NonNegative = 1.0
    breaker_reset_s: Positive = 5.0
    materialize_on_start: bool = True
    empty_check_s: NonNegative = 10.0
    materialize_lock_ttl_s: Positive = 30.0
    read_threads: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    check_definition_types: bool = False


@dataclass(frozen=True, slots=True)
class FeastInput:
    """A ``feast`` input, checked: its view, feature and typed default."""

    index: int
    name: str
    view: str
    feature: str
    datatype: str
    default: float | int | bytes

    @property
    def ref(self) -> str:
        return f"{self.view}:{self.feature}"


def check_config(
    config: FeastSourceConfig, path: str, *, request_timeout_ms: float | None = None
) -> list[FeastInput]:
    """Check what msgspec cannot; return the ``feast`` inputs with typed defaults.

    Args:
        config: The source's options.
        path: Their config path (``features``, ``models.NAME.features``).
        request_timeout_ms: The server's ``server.request_timeout_ms``, when the host passes
            it (``context.extra``): ``timeout_ms`` must be below it.

    Raises:
        ConfigError: Naming the option, the value and the fix.
    """
    _check_finite(config, path)
    if request_timeout_ms is not None and config.timeout_ms >= request_timeout_ms:
        # The request's deadline would always pass first: every slow read a 504, and
        # on_failure, serve_stale_s and the breaker's early refusals never reached (P10).
        raise ConfigError(
            f"{path}.timeout_ms: {config.timeout_ms:g} is not below "
            f"server.request_timeout_ms ({request_timeout_ms:g}): a slow read would always "
            "end in a 504 at the request's deadline, never in on_failure",
            hint=f"lower {path}.timeout_ms (default 50) well below server.request_timeout_ms, "
            "or raise server.request_timeout_ms",
        )
    seen: set[str] = set()
    feast_inputs: list[FeastInput] = []
    for i, spec in enumerate(config.inputs):
        where = f"{path}.inputs[{i}]"
        if spec.name in seen:
            raise ConfigError(
                f"{where}.name: input {spec.name!r} is declared twice",
                hint="every model input appears once in `inputs`",
            )
        seen.add(spec.name)
        if config.layout == "matrix" and spec.datatype not in NUMERIC:
            raise ConfigError(
                f"{where}.datatype: layout 'matrix' stacks inputs into one FP32 tensor, but "
                f"input {spec.name!r} is {spec.datatype}",
                hint="use layout: columns, or make every input numeric",
            )
        if spec.min is not None or spec.max is not None:
            if spec.source != "request" or spec.datatype == "BYTES":
                raise ConfigError(
                    f"{where}: min/max apply to numeric request inputs only "
                    f"({spec.name!r} is {spec.source}, {spec.datatype})",
                    hint="remove min/max from this input",
                )
            if spec.min is not None and spec.max is not None and spec.min > spec.max:
                raise ConfigError(f"{where}: min {spec.min} is greater than max {spec.max}")
        if spec.source == "request":
            if spec.feature is not None:
                raise ConfigError(
                    f"{where}.feature: input {spec.name!r} comes from the request; `feature` "
                    "applies only to source: feast",
                    hint="remove `feature`, or set source: feast",
                )
            if spec.default is not None:
                # An optional request field: requests that omit it get the default.
                _typed_default(spec, where)
            continue
        if spec.feature is None or spec.feature.count(":") != 1:
            raise ConfigError(
                f"{where}.feature: feast input {spec.name!r} needs `feature: view:feature`, "
                f"got {spec.feature!r}",
                hint="e.g. feature: card_features:txn_count_24h",
            )
        view, feature = spec.feature.split(":")
        if not (_NAME.match(view) and _NAME.match(feature)):
            raise ConfigError(
                f"{where}.feature: {spec.feature!r} is not 'view:feature' with two names",
                hint="e.g. feature: card_features:txn_count_24h",
            )
        default = _typed_default(spec, where)
        feast_inputs.append(FeastInput(i, spec.name, view, feature, spec.datatype, default))
    if config.online_store == "redis":
        redis_connection_string(config.redis_url, path=f"{path}.redis_url")
    if config.serve_stale_s and not (
        config.cache_ttl_s and config.cache_max_entries and config.cache_max_bytes
    ):
        raise ConfigError(
            f"{path}.serve_stale_s: {config.serve_stale_s:g} needs the cache, which "
            "cache_ttl_s: 0, cache_max_entries: 0 or cache_max_bytes: 0 turns off",
            hint="stale rows are the cache's expired ones; turn the cache on or set "
            "serve_stale_s: 0",
        )
    if config.breaker_failing_s >= config.breaker_reset_s:
        raise ConfigError(
            f"{path}.breaker_failing_s: {config.breaker_failing_s:g} is not less than "
            f"breaker_reset_s ({config.breaker_reset_s:g})",
            hint="the breaker opens after reads have failed for breaker_failing_s and probes "
            "breaker_reset_s after the first failure; lower breaker_failing_s",
        )
    return feast_inputs


#: Durations that must be finite, and the hint for each: ``.inf`` passes msgspec's bounds,
#: and as a timeout it never fires, as an interval it never comes round.
_FINITE = {
    "timeout_ms": "e.g. timeout_ms: 50",
    "redis_socket_timeout_s": "e.g. redis_socket_timeout_s: 1",
    "breaker_reset_s": "e.g. breaker_reset_s: 5",
    "empty_check_s": "e.g. empty_check_s: 10 (0 turns the check off)",
    "materialize_lock_ttl_s": "e.g. materialize_lock_ttl_s: 30",
}


def _check_finite(config: FeastSourceConfig, path: str) -> None:
    for name, hint in _FINITE.items():
        value = getattr(config, name)
        if not math.isfinite(value):
            raise ConfigError(f"{path}.{name}: expected a finite number, got {value!r}", hint=hint)


def _typed_default(spec: InputSpec, where: str) -> float | int | bytes:
    value = spec.default
    if value is None:
        raise ConfigError(
            f"{where}.default: feast input {spec.name!r} has no default",
            hint="set `default` (the value used when the store has no row for an entity, or "
            "when on_failure: fail_open applies)",
        )
    if spec.datatype == "BYTES":
        if not isinstance(value, str):
            raise ConfigError(
                f"{where}.default: BYTES input {spec.name!r} needs a string default, got {value!r}"
            )
        return value.encode()
    if isinstance(value, str | bool):
        raise ConfigError(
            f"{where}.default: {spec.datatype} input {spec.name!r} needs a numeric default, "
            f"got {value!r}"
        )
    if spec.datatype == "INT64":
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(
                f"{where}.default: INT64 input {spec.name!r} needs an integer default, "
                f"got {value!r}"
            )
        return int(value)
    return float(value)


def redis_connection_string(url: str, *, path: str, socket_timeout_s: float | None = None) -> str:
    """``redis://[user:password@]host:port/db`` as Feast's ``host:port,db=N[,...]``.

    ``rediss://`` adds ``ssl=true``. Messages never show the password.

    Raises:
        ConfigError: Not a redis URL, a bad port or database, or a value Feast's comma
            separated format cannot carry.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(
            f"{path}: not a valid redis URL", hint="e.g. redis://127.0.0.1:6379/0"
        ) from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(
            f"{path}: expected redis://host:port/db or rediss://…, got scheme "
            f"{parts.scheme or 'none'!r}",
            hint="e.g. redis://127.0.0.1:6379/0",
        )
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"{path}: the database must be a number (redis://host:port/0)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{path}: query parameters are not supported in the redis URL")
    host = parts.hostname
    if ":" in host:
        raise ConfigError(
            f"{path}: IPv6 hosts are not supported by Feast's redis connection string",
            hint="use a host name",
        )
    items = [f"{host}:{port}", f"db={int(db_text)}"]
    if parts.username:
        items.append(f"username={urllib.parse.unquote(parts.username)}")
    if parts.password:
        items.append(f"password={urllib.parse.unquote(parts.password)}")
    if parts.scheme == "rediss":
        items.append("ssl=true")
    if socket_timeout_s is not None:
        items.append(f"socket_timeout={socket_timeout_s}")
        items.append(f"socket_connect_timeout={socket_timeout_s}")
    if any("," in item for item in items[1:]):
        raise ConfigError(
            f"{path}: the user name or password contains a comma, which Feast's redis "
            "connection string cannot carry"
        )
    return ",".join(items)
