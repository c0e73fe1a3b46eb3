"""Everything that touches Feast at start-up: config, apply, materialize, checks.

``feast`` (about 1 s to import, 2-3 s with its type checks: :func:`import_feast`) and
``pyarrow`` are imported here, inside the functions, never when the plugin is imported. Every
function here blocks: the feature source runs them in a thread.
Feast is used only as an in-process client; its feature, registry and UI servers are never
started (feast-dev/feast#6810, CVE-2026-23536).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import logging
import sqlite3
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from infercore.artifacts import resolve_artifact
from infercore.errors import ConfigError
from infercore_feast.config import FeastInput, FeastSourceConfig, redis_connection_string
from infercore_feast.failures import clean

log = logging.getLogger("infercore.feast")

_module_ids = itertools.count()

# Feast value types each input datatype can hold without a surprise.
_COMPATIBLE = {
    "FP32": {"FLOAT", "DOUBLE", "INT32", "INT64", "BOOL"},
    "FP64": {"FLOAT", "DOUBLE", "INT32", "INT64", "BOOL"},
    "INT64": {"INT32", "INT64", "BOOL"},
    "BYTES": {"STRING", "BYTES"},
}


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """Where the feature repo and the store's files are (resolved)."""

    model_root: Path
    repo_dir: Path
    registry: Path
    sqlite: Path

    def scrub(self, text: str) -> str:
        """``text`` without the local paths (error lines must not carry them: S6)."""
        for path, label in (
            (self.registry, "<registry>"),
            (self.sqlite, "<online_store>"),
            (self.repo_dir, "<feature_repo>"),
            (self.model_root, "<model_root>"),
        ):
            text = text.replace(str(path), label)
        return text


def locate(config: FeastSourceConfig, model_root: Path, path: str) -> StoreLocation:
    """Resolve the repo folder inside the model root, and the registry and SQLite files.

    The registry and the SQLite online store are state, not artifacts: an absolute path may
    point outside the model root (a writable volume when the model volume is read-only); a
    relative one is taken from the repo folder.
    """
    repo_dir = resolve_artifact(model_root, config.repo, config_path=f"{path}.repo")
    if not repo_dir.is_dir():
        raise ConfigError(
            f"{path}.repo: {config.repo!r} is not a folder",
            hint="point `repo` at the Feast feature repo folder",
        )

    def state(value: str | None, default: str) -> Path:
        p = Path(value or default)
        return p if p.is_absolute() else repo_dir / p

    return StoreLocation(
        model_root=model_root.resolve(),
        repo_dir=repo_dir,
        registry=state(config.registry_path, "data/registry.db"),
        sqlite=state(config.sqlite_path, "data/online_store.db"),
    )


#: Whether Feast's classes check their arguments in this process: false once
#: :func:`import_feast` imported Feast without its type checks.
_feast_type_checks = True


def import_feast(*, type_checks: bool = False) -> Any:
    """``import feast``; without ``type_checks``, with typeguard's ``@typechecked`` a no-op.

    Feast decorates its definition classes (``Entity``, ``FeatureView``, ``Field``, the data
    sources ...) with typeguard's ``@typechecked``, which recompiles every annotated method of
    each from its module's parsed source, at import: ``import feast`` took 2.2-3.1 s here
    with it and 1.0-1.1 s without (one core, bytecode compiled). What the checks give is a
    more precise error for a wrong argument in a feature repo's definitions (``argument
    "entities" ... is not a list`` rather than ``'Entity' object is not iterable``), which
    ``features.check_definition_types`` turns back on. Typeguard itself says its checks are
    not meant for production (they are off under ``python -O``). The decorator is replaced
    only while Feast's modules are first imported, and only the first import in a process
    decides: a later call, or Feast imported before, changes nothing.
    """
    global _feast_type_checks
    _ignore_feast_pydantic_warning()
    if "feast" in sys.modules:
        return importlib.import_module("feast")
    with _process_warning_filters_kept():
        if type_checks:
            return importlib.import_module("feast")
        try:
            typeguard: Any = importlib.import_module("typeguard")
        except ImportError:  # a Feast release that no longer uses it
            return importlib.import_module("feast")
        checked = typeguard.typechecked
        typeguard.typechecked = _unchecked
        try:
            feast = importlib.import_module("feast")
            _feast_type_checks = False
            return feast
        finally:
            typeguard.typechecked = checked


@contextlib.contextmanager
def _process_warning_filters_kept() -> Iterator[None]:
    """Undo the process-wide warning filters that Feast's modules add when imported.

    Several of them run ``warnings.simplefilter("once", DeprecationWarning)`` (and
    ``RuntimeWarning``) at import: every library's deprecation warnings, hidden by Python's
    defaults, are then shown, as they happen: a restarted worker printed websockets' and
    uvicorn's on every restart. A filter that names a warning class of a library's own (urllib3
    and requests add some when Feast imports them) concerns that library only, and stays;
    one for a built-in class with no module or message applies to all code, and goes.
    """
    before = list(warnings.filters)
    try:
        yield
    finally:
        live = cast(list[Any], warnings.filters)  # a list (typeshed says Sequence)
        added = [
            f
            for f in live
            if f not in before
            and f[1] is None  # no message
            and f[3] is None  # no module
            and isinstance(f[2], type)
            and f[2].__module__ == "builtins"
        ]
        for f in added:
            live.remove(f)
        if added:
            # Tells the warnings module its filters changed (it caches what they decided),
            # through its public API: a filter of ours, already there, added again.
            _ignore_feast_pydantic_warning()


def _ignore_feast_pydantic_warning() -> None:
    # Feast 0.49's online-store config models shadow a pydantic attribute and warn when they
    # are first built: not ours to fix, and a stray warning line breaks JSON logs.
    warnings.filterwarnings(
        "ignore", message=r"Field name .* shadows an attribute in parent", category=UserWarning
    )


def _unchecked(target: Any = None, **options: Any) -> Any:
    """typeguard's ``typechecked``, bare or with options, leaving its target as it was."""
    return (lambda target: target) if target is None else target


#: ``redirect_stdout`` swaps the process's ``sys.stdout``: two at once in two threads (two
#: models' sources materializing again at the same time) could restore each other's buffer
#: and leave it in place.
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_feast(what: str) -> Iterator[None]:
    """Keep Feast's own console output (banners, progress bars) out of the server's logs.

    It is captured and logged at DEBUG, so JSON logs stay JSON. At start-up, and while an
    emptied store is materialized again (:func:`materialize_again`); the log handlers hold the
    real streams, so the server's own lines are not captured. One at a time in the process.
    """
    out, err = io.StringIO(), io.StringIO()
    with _quiet_lock, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield
    captured = (out.getvalue() + err.getvalue()).strip()
    if captured:
        log.debug("feast %s output: %s", what, captured[-2000:])


def repo_config(
    config: FeastSourceConfig, where: StoreLocation, *, path: str, serving: bool
) -> Any:
    """A Feast ``RepoConfig`` built in code (no ``feature_store.yaml`` needed).

    ``serving`` stores bound Redis socket operations by ``redis_socket_timeout_s`` so a read
    thread never hangs on a dead server; the store that materializes has no such bound.
    """
    feast = import_feast(type_checks=config.check_definition_types)
    if config.online_store == "redis":
        online: dict[str, Any] = {
            "type": "redis",
            "connection_string": redis_connection_string(
                config.redis_url,
                path=f"{path}.redis_url",
                socket_timeout_s=config.redis_socket_timeout_s if serving else None,
            ),
        }
    else:
        online = {"type": "sqlite", "path": str(where.sqlite)}
    return feast.RepoConfig(
        project=config.project,
        provider="local",
        # cache_ttl_seconds=0: load the registry once; a refresh would stall a read.
        registry={"registry_type": "file", "path": str(where.registry), "cache_ttl_seconds": 0},
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=where.repo_dir,
    )


def load_definitions(where: StoreLocation, path: str) -> list[Any]:
    """The Feast objects defined in the repo folder's top-level ``*.py`` files.

    This runs the files, as ``feast apply`` does: they are code, part of the recipe, and must
    come from whoever writes the recipe. Each resolves inside the model root.
    """
    feast = import_feast()
    data_source = importlib.import_module("feast.data_source").DataSource
    kinds = (
        feast.Entity,
        feast.FeatureView,
        feast.OnDemandFeatureView,
        feast.FeatureService,
        data_source,
    )
    files = sorted(p for p in where.repo_dir.glob("*.py") if p.name != "__init__.py")
    if not files:
        raise ConfigError(
            f"{path}.repo: the feature repo has no *.py definitions",
            hint="add the file defining the entity and feature views",
        )
    objects: list[Any] = []
    for file in files:
        resolved = resolve_artifact(where.model_root, str(file), config_path=f"{path}.repo")
        name = f"_infercore_feast_repo_{next(_module_ids)}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{path}.repo: cannot load {file.name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise _definition_error(exc, file.name, str(resolved), where, path) from exc
        finally:
            sys.modules.pop(name, None)
        for value in vars(module).values():
            if isinstance(value, kinds) and not any(value is o for o in objects):
                objects.append(value)
    return objects


def _type_checks_hint(path: str) -> str:
    """How to have Feast name a definition's wrong argument, when its checks are off."""
    if _feast_type_checks:
        return ""
    return (
        f"; {path}.check_definition_types=true has Feast check each definition's arguments "
        "and name the one at fault (about 1.5 s more start-up)"
    )


def _definition_error(
    exc: Exception, name: str, filename: str, where: StoreLocation, path: str
) -> ConfigError:
    """A feature repo file that raised: the file, its line that was running, and the error."""
    line = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            line = f" line {lineno}"  # the innermost of the file's own lines
    text = clean(where.scrub(str(exc)))
    return ConfigError(
        f"{path}.repo: {name}{line} failed: {type(exc).__name__}: {text}",
        hint="fix the definition there; Feast's definitions run as code, as `feast apply` runs "
        "them" + _type_checks_hint(path),
    )


def check_inputs(store: Any, inputs: list[FeastInput], *, path: str) -> dict[str, Any]:
    """Every feast input names a view and feature the registry has, of a fitting type.

    Returns:
        The feature views used, by name.
    """
    views: dict[str, Any] = {}
    for item in inputs:
        where = f"{path}.inputs[{item.index}].feature"
        view = views.get(item.view)
        if view is None:
            try:
                view = store.get_feature_view(item.view)
            except Exception as exc:
                if type(exc).__name__ != "FeatureViewNotFoundException":
                    raise
                known = sorted(v.name for v in store.list_feature_views())
                raise ConfigError(
                    f"{where}: feature view {item.view!r} is not in the Feast registry; "
                    f"registered: {', '.join(known) or 'none'}",
                    hint="fix the name, or apply the repo (materialize_on_start: true or "
                    "`feast apply`)",
                ) from None
            views[item.view] = view
        fields = {f.name: f for f in view.features}
        found = fields.get(item.feature)
        if found is None:
            raise ConfigError(
                f"{where}: feature view {item.view!r} has no feature {item.feature!r}; "
                f"available: {', '.join(sorted(fields))}",
            )
        value_type = found.dtype.to_value_type().name
        if value_type not in _COMPATIBLE[item.datatype]:
            raise ConfigError(
                f"{path}.inputs[{item.index}].datatype: {item.datatype} cannot hold feature "
                f"{item.ref!r} of Feast type {value_type}",
            )
    return views


def check_entity(
    store: Any, views: Mapping[str, Any], inputs: list[FeastInput], join_key: str, *, path: str
) -> None:
    """Every view the inputs use is keyed by one entity whose join key is ``join_key``.

    The source sends one key per row, under ``entity.join_key``: a view keyed by another join
    key (a typo, another entity) or by several would fail every read with Feast's ``KeyError:
    Missing join key values``. Found from the registry at start-up instead, naming the option,
    its value and the join keys there are. The entity's name in place of its join key, which
    Feast still takes (deprecated, and it forces the slower ``get_online_features`` path), is
    allowed with a warning.

    Raises:
        ConfigError: Naming ``<path>.entity.join_key``, the value, the view and its join keys.
    """
    dummy = importlib.import_module("feast.feature_view").DUMMY_ENTITY_NAME
    where = f"{path}.entity.join_key"
    first_input: dict[str, int] = {}
    for item in inputs:
        first_input.setdefault(item.view, item.index)
    for name, view in views.items():
        entities = [store.get_entity(e) for e in view.entities if e != dummy]
        if not entities:
            continue  # an entityless view: Feast reads it without keys
        used = f"{path}.inputs[{first_input[name]}].feature"
        described = ", ".join(f"entity {e.name!r} joins on {e.join_key!r}" for e in entities)
        if len(entities) > 1:
            raise ConfigError(
                f"{where}: feature view {name!r} ({used}) is keyed by {len(entities)} entities "
                f"({described}); the feast source reads views keyed by one entity, whose join "
                f"key is {join_key!r}",
                hint="read this view's features another way, or define a view of the same "
                "features keyed by one entity",
            )
        (entity,) = entities
        if join_key == entity.join_key:
            continue
        if join_key == entity.name:
            log.warning(
                "feast: %s is %r, the name of entity %r, not its join key %r: Feast still "
                "takes it (deprecated), but through get_online_features, the slower path; "
                "set %s: %s",
                where,
                join_key,
                entity.name,
                entity.join_key,
                where,
                entity.join_key,
            )
            continue
        raise ConfigError(
            f"{where}: {join_key!r} is not the join key of feature view {name!r} ({used}): "
            f"its {described}",
            hint=f"set {where}: {entity.join_key}"
            + (
                ""
                if len(views) == 1
                else " (every view the inputs use must be keyed by that one entity)"
            ),
        )


#: How many of a view's newest offline entities may serve as its markers (``OpenedStore``).
MARKERS = 8


@dataclass(frozen=True, slots=True)
class OfflineSpan:
    """The time range of a view's offline rows and the keys of its newest rows.

    Attributes:
        newest_keys: Up to :data:`MARKERS` distinct entity keys of the newest rows, newest
            first (empty when the source has no join key column).
    """

    start: datetime
    end: datetime
    rows: int
    newest_keys: tuple[Any, ...]


def offline_span(view: Any, where: StoreLocation) -> OfflineSpan | None:
    """Read the time range of a local parquet source (two columns); ``None`` if not local."""
    source = view.batch_source
    uri = getattr(source, "path", None)
    if not isinstance(uri, str) or "://" in uri:
        return None
    file = Path(uri) if Path(uri).is_absolute() else where.repo_dir / uri
    if not file.exists():
        raise ConfigError(
            f"the offline source of feature view {view.name!r} does not exist "
            f"({where.scrub(str(file))})",
            hint="build the recipe's data first (see its README)",
        )
    pq = importlib.import_module("pyarrow.parquet")
    pc = importlib.import_module("pyarrow.compute")
    join_key = view.entity_columns[0].name if view.entity_columns else None
    columns = [source.timestamp_field] + ([join_key] if join_key else [])
    table = pq.read_table(str(file), columns=columns)
    if table.num_rows == 0:
        return OfflineSpan(datetime.now(UTC), datetime.now(UTC), 0, ())
    ts = table.column(source.timestamp_field)
    bounds = pc.min_max(ts).as_py()
    lo, hi = bounds["min"], bounds["max"]
    if not isinstance(lo, datetime) or not isinstance(hi, datetime):
        return None
    newest: tuple[Any, ...] = ()
    if join_key:
        # The newest rows without sorting the table (select_k is linear); an entity with
        # several of them counts once.
        k = min(table.num_rows, 8 * MARKERS)
        order = pc.select_k_unstable(table, k=k, sort_keys=[(source.timestamp_field, "descending")])
        keys = table.column(join_key).take(order).to_pylist()
        newest = tuple(key for key in dict.fromkeys(keys) if key is not None)[:MARKERS]
    return OfflineSpan(_utc(lo), _utc(hi) + timedelta(seconds=1), table.num_rows, newest)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def present_keys(store: Any, view: Any, keys: Sequence[Any]) -> list[Any]:
    """The ``keys`` for which the online store holds a row of ``view`` (one read)."""
    if not keys or not view.entity_columns:
        return []
    refs = [f"{view.name}:{f.name}" for f in view.features]
    join_key = view.entity_columns[0].name
    found = store.get_online_features(
        features=refs, entity_rows={join_key: list(keys)}, full_feature_names=True
    ).to_dict()
    columns = [values for name, values in found.items() if name != join_key]
    return [key for i, key in enumerate(keys) if any(c[i] is not None for c in columns)]


#: Why :class:`MarkerCheck` found a view lost (its ERROR line says which).
NO_MARKERS = "none of its marker entities found"
NO_TABLE = "its table is gone"


class MarkerCheck:
    """Which views has the online store lost? Each view's few marker entities, read.

    The check a serving source runs every ``empty_check_s``, off the request path. Resolved
    once at start-up, as :class:`OnlineStoreReader` is: a check is one ``online_read`` of its
    markers per view, nothing else (Feast reads one view per ``online_read``; its
    ``get_online_features`` makes the same call per view, behind registry lookups and a
    response proto, which cost several times the read itself). Its own online store object:
    for SQLite its own connection, never the readers'.

    A view is lost when the store answers and holds none of its markers, or, for SQLite,
    when its table is gone (dropped). A store that cannot be read raises: that is not an
    empty store, and the read path and its breaker see it.

    Attributes:
        markers: Per view, its marker entities (the source's own dict: a view taken out of
            it is no longer checked).
    """

    def __init__(self, store: Any, views: Mapping[str, Any], markers: dict[str, Any]) -> None:
        helpers = importlib.import_module("feast.infra.online_stores.helpers")
        type_map = importlib.import_module("feast.type_map")
        entity_key = importlib.import_module("feast.protos.feast.types.EntityKey_pb2").EntityKey
        self.markers = markers
        self._config = store.config
        self._online_store = helpers.get_online_store_from_config(store.config.online_store)
        #: view name -> (the view, its markers as entity keys, its feature names)
        self._plans: dict[str, tuple[Any, list[Any], list[str]]] = {}
        for name, keys in markers.items():
            view = views[name]
            column = view.entity_columns[0]
            values = type_map.python_values_to_proto_values(
                list(keys), column.dtype.to_value_type()
            )
            self._plans[name] = (
                view,
                [entity_key(join_keys=[column.name], entity_values=[v]) for v in values],
                [f.name for f in view.features],
            )

    def __call__(self) -> dict[str, str]:
        """The lost views, each with why (:data:`NO_MARKERS`, :data:`NO_TABLE`)."""
        lost: dict[str, str] = {}
        for name in list(self.markers):
            plan = self._plans.get(name)
            if plan is None:
                continue
            view, keys, features = plan
            try:
                # A copy: Feast's Redis store appends its timestamp key to the list it is given.
                read = self._online_store.online_read(self._config, view, keys, list(features))
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                lost[name] = NO_TABLE
                continue
            if not any(_holds(data) for _, data in read):
                lost[name] = NO_MARKERS
        return lost


def _holds(data: Mapping[str, Any] | None) -> bool:
    """Whether an ``online_read`` answer holds a value (Redis answers an absent entity with
    empty values, SQLite with ``None``)."""
    return data is not None and any(v.WhichOneof("val") is not None for v in data.values())


@dataclass(frozen=True, slots=True)
class OpenedStore:
    """What :func:`prepare_store` opened.

    Attributes:
        store: The serving ``FeatureStore``.
        views: The feature views the inputs use, by name.
        markers: Per view, its marker entities: those of the offline source's newest
            entities (:data:`MARKERS` at most) that the online store held once start-up was
            done. A store that later holds none of them has lost its rows (a Redis restarted
            without persistence). A view without markers (its offline source not a local file,
            or none of them online) is not checked.
        check: Reads the markers (``None`` without any, or with ``empty_check_s: 0``).
    """

    store: Any
    views: dict[str, Any]
    markers: dict[str, tuple[Any, ...]]
    check: MarkerCheck | None


def prepare_store(
    config: FeastSourceConfig, where: StoreLocation, inputs: list[FeastInput], *, path: str
) -> OpenedStore:
    """Open the serving ``FeatureStore``; apply and materialize first when asked.

    With ``materialize_on_start`` the repo's definitions are applied (idempotent) and every
    view the inputs use whose online store has no row for the offline source's newest entity
    is materialized over the source's time range. Then the views' markers are chosen
    (:class:`OpenedStore`) and one read checks the store answers.
    """
    feast = import_feast(type_checks=config.check_definition_types)
    if config.materialize_on_start:
        where.registry.parent.mkdir(parents=True, exist_ok=True)
        if config.online_store == "sqlite":
            where.sqlite.parent.mkdir(parents=True, exist_ok=True)
        admin = feast.FeatureStore(
            repo_path=str(where.repo_dir),
            config=repo_config(config, where, path=path, serving=False),
        )
        objects = load_definitions(where, path)
        t0 = time.perf_counter()
        try:
            with _quiet_feast("apply"):
                admin.apply(objects)
        except (TypeError, AttributeError, ValueError) as exc:
            # A store that fails raises its own errors (sqlite3, redis, OSError); these come
            # from a definition whose argument Feast took and could not use.
            raise ConfigError(
                f"{path}.repo: Feast could not apply the definitions: {type(exc).__name__}: "
                + clean(where.scrub(str(exc))),
                hint="check the definitions in the feature repo" + _type_checks_hint(path),
            ) from exc
        log.info(
            "feast: applied %d definitions of project %s in %.2fs",
            len(objects),
            config.project,
            time.perf_counter() - t0,
        )
    elif not where.registry.exists():
        raise ConfigError(
            f"{path}: the Feast registry does not exist and materialize_on_start is false",
            hint="run `feast apply` in the repo folder, set registry_path, or set "
            "materialize_on_start: true",
        )
    store = feast.FeatureStore(
        repo_path=str(where.repo_dir), config=repo_config(config, where, path=path, serving=True)
    )
    views = check_inputs(store, inputs, path=path)
    check_entity(store, views, inputs, config.entity.join_key, path=path)
    markers: dict[str, tuple[Any, ...]] = {}
    for name, view in views.items():
        if config.materialize_on_start:
            span = offline_span(view, where)
            _materialize_if_empty(admin, store, view, span, config.online_store)
        elif config.empty_check_s:
            span = _offline_span_if_readable(view, where)
        else:
            continue
        if span is not None and config.empty_check_s:
            markers[name] = tuple(present_keys(store, view, span.newest_keys))
        if not markers.get(name) and config.empty_check_s:
            log.warning(
                "feast: an emptied online store cannot be detected for view %s: %s",
                name,
                "its offline source is not a local file this host can read"
                if span is None
                else "its offline source has no rows"
                if not span.newest_keys
                else "the online store holds none of its newest offline entities",
            )
    # One read end to end: connections open, registry cached, and a broken store fails here.
    first = inputs[0]
    store.get_online_features(
        features=[i.ref for i in inputs],
        entity_rows={config.entity.join_key: ["__infercore_warmup__"]},
        full_feature_names=True,
    ).to_dict()
    log.info(
        "feast: feature source ready (project %s, %s online store, %d features, e.g. %s)",
        config.project,
        config.online_store,
        len(inputs),
        first.ref,
    )
    markers = {name: keys for name, keys in markers.items() if keys}
    return OpenedStore(
        store, views, markers, MarkerCheck(store, views, markers) if markers else None
    )


def _offline_span_if_readable(view: Any, where: StoreLocation) -> OfflineSpan | None:
    """:func:`offline_span`, or ``None`` where the source cannot be read: without
    ``materialize_on_start`` the offline data need not be on this host."""
    try:
        return offline_span(view, where)
    except ConfigError:
        return None
    except Exception as exc:  # an unreadable parquet file: only the check is lost
        log.warning(
            "feast: the offline source of %s could not be read: %s: %s",
            view.name,
            type(exc).__name__,
            clean(where.scrub(str(exc))),
        )
        return None


def _materialize_if_empty(
    admin: Any, store: Any, view: Any, span: OfflineSpan | None, kind: str
) -> None:
    if span is not None and span.rows == 0:
        log.warning(
            "feast: the offline source of %s has no rows; nothing to materialize", view.name
        )
        return
    if span is not None and present_keys(store, view, span.newest_keys[:1]):
        log.info("feast: %s is already in the %s online store; not materializing", view.name, kind)
        return
    _materialize(admin, view, span, kind)


def materialize_again(
    config: FeastSourceConfig, where: StoreLocation, view_names: Sequence[str], *, path: str
) -> None:
    """Materialize ``view_names`` over their offline sources' time ranges, as at start-up.

    For a store found empty while serving (:class:`MarkerCheck`): the registry was applied at
    start-up, so only the rows are written, and for SQLite a view's table if it was dropped
    (Feast's ``materialize`` writes into the table, it does not create it). Blocking, and for
    large sources long.
    """
    feast = import_feast(type_checks=config.check_definition_types)
    admin = feast.FeatureStore(
        repo_path=str(where.repo_dir),
        config=repo_config(config, where, path=path, serving=False),
    )
    views = [admin.get_feature_view(name) for name in view_names]
    if config.online_store == "sqlite":
        helpers = importlib.import_module("feast.infra.online_stores.helpers")
        online = helpers.get_online_store_from_config(admin.config.online_store)
        # CREATE TABLE IF NOT EXISTS: nothing for a table that is there.
        online.update(admin.config, [], views, [], [], partial=True)
    for view in views:
        span = offline_span(view, where)
        if span is None or span.rows:
            _materialize(admin, view, span, config.online_store)


def _materialize(admin: Any, view: Any, span: OfflineSpan | None, kind: str) -> None:
    if span is None:
        end = datetime.now(UTC)
        ttl = view.ttl if view.ttl else timedelta(days=3650)
        start, rows = end - ttl, "?"
    else:
        start, end, rows = span.start, span.end, str(span.rows)
    log.info(
        "feast: materializing %s (%s offline rows, %s .. %s) into the %s online store",
        view.name,
        rows,
        start.isoformat(),
        end.isoformat(),
        kind,
    )
    t0 = time.perf_counter()
    with _quiet_feast("materialize"):
        admin.materialize(start, end, feature_views=[view.name])
    log.info("feast: materialized %s in %.2fs", view.name, time.perf_counter() - t0)


# -- reading rows (serving) ------------------------------------------------------------------

#: One entity's values, in the order of the requested feature references; ``None`` for an
#: entity the store has no value for.
Row = tuple[Any, ...] | None

#: Reads the rows of a list of entity keys (blocking; one row per key, in order).
RowReader = Callable[[list[str]], list[Row]]


def sdk_reader(store: Any, refs: list[str], join_key: str) -> RowReader:
    """Rows through ``FeatureStore.get_online_features`` (the general path)."""
    columns = [ref.replace(":", "__") for ref in refs]

    def read(keys: list[str]) -> list[Row]:
        response = store.get_online_features(
            features=refs, entity_rows={join_key: keys}, full_feature_names=True
        ).to_dict()
        values = [response[name] for name in columns]
        out: list[Row] = []
        for i in range(len(keys)):
            row = tuple(column[i] for column in values)
            out.append(None if all(v is None for v in row) else row)
        return out

    return read


class OnlineStoreReader:
    """Rows through the online store's own ``online_read``, resolved once at start-up.

    ``FeatureStore.get_online_features`` does this too, but resolves the feature views and
    entities from the registry, converts the keys and builds a response proto on every call:
    most of a read's CPU for the few keys a merged read holds. This keeps its semantics for
    what :func:`online_reader` lets through (plain feature views keyed by one string entity):
    the same ``online_read`` per view, a feature absent from a row read as ``None``, values
    converted by Feast's own ``feast_value_type_to_python_type``, and no age filter (Feast
    0.49 applies none on online reads either).
    """

    def __init__(
        self,
        online_store: Any,
        repo_config: Any,
        join_key: str,
        groups: list[tuple[Any, list[str], list[int]]],
        width: int,
    ) -> None:
        self._online_store = online_store
        self._repo_config = repo_config
        self._join_key = join_key
        #: (feature view, its requested feature names, their slots in a row)
        self._groups = groups
        self._width = width
        self._entity_key = importlib.import_module("feast.protos.feast.types.EntityKey_pb2")
        self._value = importlib.import_module("feast.protos.feast.types.Value_pb2")
        self._to_python = importlib.import_module("feast.type_map").feast_value_type_to_python_type

    def __call__(self, keys: list[str]) -> list[Row]:
        entity_key, value = self._entity_key.EntityKey, self._value.Value
        join_keys = [self._join_key]
        entity_keys = [
            entity_key(join_keys=join_keys, entity_values=[value(string_val=k)]) for k in keys
        ]
        to_python = self._to_python
        rows: list[list[Any]] = [[None] * self._width for _ in keys]
        for view, names, slots in self._groups:
            # A copy: Feast's Redis store appends its timestamp key to the list it is given.
            read = self._online_store.online_read(self._repo_config, view, entity_keys, list(names))
            if len(read) != len(keys):
                raise RuntimeError(
                    f"online_read of {view.name!r} returned {len(read)} rows for {len(keys)} keys"
                )
            pairs = list(zip(names, slots, strict=True))
            for row, (_, data) in zip(rows, read, strict=True):
                if data:
                    for name, slot in pairs:
                        proto = data.get(name)
                        if proto is not None:
                            row[slot] = to_python(proto)
        return [None if all(v is None for v in row) else tuple(row) for row in rows]


def online_reader(store: Any, refs: list[str], join_key: str) -> tuple[RowReader, str]:
    """The cheapest reader that answers as ``get_online_features`` would, and why it was chosen.

    :class:`OnlineStoreReader` when every view the references name is a plain feature view
    keyed by one string entity whose join key is ``join_key`` (no aliases, no projections);
    :func:`sdk_reader` otherwise.
    """
    feast = import_feast()
    helpers = importlib.import_module("feast.infra.online_stores.helpers")
    value_type = importlib.import_module("feast.value_type").ValueType
    groups: dict[str, tuple[Any, list[str], list[int]]] = {}
    for slot, ref in enumerate(refs):
        view_name, feature = ref.split(":")
        group = groups.get(view_name)
        if group is None:
            view = store.get_feature_view(view_name)
            why = _unusual_view(store, view, feast, value_type, join_key)
            if why is not None:
                return sdk_reader(store, refs, join_key), f"get_online_features ({why})"
            group = groups[view_name] = (view, [], [])
        group[1].append(feature)
        group[2].append(slot)
    online_store = helpers.get_online_store_from_config(store.config.online_store)
    reader = OnlineStoreReader(
        online_store, store.config, join_key, list(groups.values()), len(refs)
    )
    return reader, f"{type(online_store).__name__}.online_read"


def _unusual_view(store: Any, view: Any, feast: Any, value_type: Any, join_key: str) -> str | None:
    """Why ``view`` must be read through the SDK, or ``None``."""
    if type(view) is not feast.FeatureView:
        return f"{view.name} is a {type(view).__name__}"
    projection = view.projection
    if projection.join_key_map or projection.name_to_use() != view.name:
        return f"{view.name} has a projection"
    if len(view.entities) != 1:
        return f"{view.name} has {len(view.entities)} entities"
    entity = store.get_entity(view.entities[0])
    if entity.join_key != join_key:
        return f"{view.name}'s entity joins on {entity.join_key!r}"
    if entity.value_type != value_type.STRING:
        return f"{view.name}'s entity keys are {entity.value_type.name}"
    return None
