"""The admin listener: the V2 repository extension and infercore's rollout routes.

A separate Litestar app on its own uvicorn server, started by ``infercore serve`` only when
``admin.enabled`` is true (off by default), on loopback or a Unix socket by default
(RELIABILITY.md S1). Every request needs ``Authorization: Bearer <token>``; the token comes
from an environment variable (``admin.auth_env``) or a file (``admin.auth_file``) and is
compared in constant time. No request is routed before it is authenticated: 401 without a
token, 403 with a wrong one. The inference listener mounts none of these routes, so there
they answer 404.

Routes::

    POST /v2/repository/index                       versions and their states (V2 repository)
    POST /v2/repository/models/{m}/load             {"parameters": {"version": "2"}}
    POST /v2/repository/models/{m}/unload           {"parameters": {"version": "2"}}
    GET  /admin/models[/{m}]                        stages, weights, states, pending approvals
    POST /admin/models/{m}/versions/{v}/promote     {"to": "canary", "weight": 10, "by": ...}
    PUT  /admin/models/{m}/weights                  {"weights": {"1": 90, "2": 10}, "by": ...}
    POST /admin/models/{m}/rollback                 {"by": ..., "reason": ...}
    GET  /admin/models/{m}/shadow                   shadow copies and agreement
    GET  /admin/models/{m}/drift[?limit=50]         drift monitor: status, latest results and
                                                    the latest ``limit`` events (1 to the
                                                    model's drift.history_size)
    GET  /admin/approvals[?status=pending]
    POST /admin/approvals/{id}/approve | reject     {"by": ..., "reason": ...}
    GET  /admin/audit[?limit=100]                   the latest audit records

No route takes a server-side path (S4): a load names a version, whose folder comes from the
recipe (``models.<m>.versions``) or the model's repository folder. A load the repository refuses
(no pinned digest, a folder out of the model root) is a 400 counted in
``infercore_model_load_failures_total``, as a failed load is. Each body's fields, and the
answers: docs/deploy.md, "Admin API requests".

Bodies are JSON: a ``Content-Type`` other than ``application/json`` (or a compressed body) is a
415 ``unsupported_media_type`` before the body is read. A request without a ``Content-Type`` is
read as JSON, as on the inference listener: tritonclient sends its load and unload bodies so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post, put
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery

from infercore.config.rollout import AdminConfig
from infercore.config.schema import NAME_RE, VERSION_RE
from infercore.errors import ConfigError, InfercoreError, InvalidInput, UnsupportedMediaType
from infercore.lifecycle.manager import check_actor
from infercore.protocol.tensors import UNREADABLE_JSON, malformed_json
from infercore.runtime import Runtime
from infercore.runtime.errors import quoted
from infercore.server.errors import EXCEPTION_HANDLERS, http_exception_handler
from infercore.server.unix_sockets import OWNER_ONLY_MODE, SocketFile, bind_unix

log = logging.getLogger("infercore.admin")

JSON = "application/json"
#: Shortest token accepted: a guessable token is no protection.
MIN_TOKEN_CHARS = 16
_REPOSITORY_PARAMETERS = frozenset({"version", "by", "reason"})
#: Sent by tritonclient's unload_model; infercore has no ensembles, so it changes nothing.
_UNLOAD_PARAMETERS = _REPOSITORY_PARAMETERS | {"unload_dependents"}
_encoder = msgspec.json.Encoder()


class _PromoteBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    to: str
    by: str
    weight: float | None = None
    reason: str | None = None


class _WeightsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    weights: dict[str, float]
    by: str
    reason: str | None = None


class _DecisionBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    by: str
    reason: str | None = None


class _RepositoryBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class _IndexBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ready: bool = False


def _check_content_type(request: Request[Any, Any, Any]) -> None:
    encoding = request.headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(
            f"content encoding {encoding[:40]!r} is not accepted", hint="send the body uncompressed"
        )
    raw = request.headers.get("content-type")
    if raw is None:  # tritonclient sends its JSON bodies without one
        return
    media = raw.split(";", 1)[0].strip().lower()
    if media != JSON:
        raise UnsupportedMediaType(
            f"content type {media[:60]!r} is not accepted", hint=f"send the body as {JSON}"
        )


async def _read(request: Request[Any, Any, Any], kind: type[Any], *, empty_ok: bool = False) -> Any:
    """The request's JSON body as ``kind`` (415 for another content type, before reading it)."""
    _check_content_type(request)
    return _decode(await request.body(), kind, empty_ok=empty_ok)


def _decode(body: bytes, kind: type[Any], *, empty_ok: bool = False) -> Any:
    if not body.strip():
        if empty_ok:
            return kind()
        raise InvalidInput("the request needs a JSON body")
    try:
        decoded = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid request body: {exc}") from None
    except UNREADABLE_JSON as exc:
        raise malformed_json(exc, body) from None
    # A key given twice would silently mean its last value (`{"2": 50, "2": 0}` in a traffic
    # split): refused. Admin bodies are small; this second parse costs nothing that matters.
    json.loads(body, object_pairs_hook=_refuse_duplicate_keys)
    return decoded


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise InvalidInput(
                f"invalid request body: {key[:40]!r} is given twice",
                hint="give each key once",
            )
        found[key] = value
    return found


def _model_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid model name {quoted(name)}",
            hint="letters, digits, '_' and '-' (no '/', no '..')",
        )
    return name


def _version_name(version: str, where: str = "") -> str:
    """``version`` if it is a valid version name, else a 400 (``where``: the body's field)."""
    if not VERSION_RE.fullmatch(version) or ".." in version:
        raise InvalidInput(
            f"{where}invalid version {quoted(version)}",
            hint="letters, digits, '_', '-' and '.' (at most 32; no '/', no '..')",
        )
    return version


#: ``GET /admin/models/{m}/drift``: the events shown when no ``limit`` is given.
DRIFT_EVENTS_DEFAULT = 50


def _events_limit(raw: str | None, most: int | None) -> int:
    """The drift route's ``limit``: an integer from 1 to ``most`` (the monitor's
    ``history_size``; ``None`` for a model without one), :data:`DRIFT_EVENTS_DEFAULT` if
    absent (at most ``most``)."""
    if raw is None:
        return DRIFT_EVENTS_DEFAULT if most is None else min(DRIFT_EVENTS_DEFAULT, most)
    upper = f" and {most}" if most is not None else ""
    try:
        limit = int(raw.strip())
    except ValueError:
        limit = 0
    if limit < 1 or (most is not None and limit > most):
        raise InvalidInput(
            f"limit: expected an integer between 1{upper}, got {quoted(raw)}",
            hint="the monitor keeps its model's drift.history_size latest events"
            if most is not None
            else "a positive integer",
        )
    return limit


def _json(doc: Any, status: int = 200) -> Response[bytes]:
    return Response(_encoder.encode(doc), media_type=JSON, status_code=status)


def load_token(config: AdminConfig, environ: Mapping[str, str] | None = None) -> str:
    """The admin bearer token, from ``admin.auth_file`` or the ``admin.auth_env`` variable.

    Raises:
        ConfigError: No token, or one shorter than :data:`MIN_TOKEN_CHARS`.
    """
    env = os.environ if environ is None else environ
    if config.auth_file:
        try:
            token = Path(config.auth_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"admin.auth_file: cannot read the token file ({exc.strerror})",
                hint="point admin.auth_file at a readable file holding the token",
            ) from None
        where = "admin.auth_file"
    else:
        token = env.get(config.auth_env, "").strip()
        where = f"${config.auth_env}"
        if not token:
            raise ConfigError(
                f"admin.enabled: the admin API needs a bearer token; {where} is not set",
                hint=f"export {config.auth_env}=$(openssl rand -hex 24), or set admin.auth_file",
            )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{where}: the admin token is shorter than {MIN_TOKEN_CHARS} characters",
            hint="use a long random token, e.g. openssl rand -hex 24",
        )
    return token


class BearerAuth:
    """ASGI middleware: every HTTP request carries ``Authorization: Bearer <token>``.

    Runs before routing, so an unauthenticated caller learns nothing about the routes.
    Compared in constant time over SHA-256 digests (the token's length does not leak either).
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()

    def check(self, header: bytes | None) -> int:
        """0 when authorized, else the status to answer (401 no token, 403 a wrong one)."""
        if not header:
            return 401
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return 401
        ok = hmac.compare_digest(hashlib.sha256(given.strip()).digest(), self._digest)
        return 0 if ok else 403

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        status = self.check(header)
        if status == 0:
            await self.app(scope, receive, send)
            return
        if status == 401:
            body = b'{"error":"the admin API needs a bearer token","reason":"unauthorized"}'
            extra = [(b"www-authenticate", b"Bearer")]
        else:
            body = b'{"error":"the bearer token is not valid","reason":"unauthorized"}'
            extra = []
        # Quoted: the path is the unauthenticated caller's, URL-decoded (CWE-117).
        log.warning("admin: refused %s %r (%d)", scope.get("method"), scope.get("path"), status)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_admin_app(runtime: Runtime, token: str) -> BearerAuth:
    """The admin ASGI app (Litestar behind :class:`BearerAuth`) for ``runtime``."""
    lifecycle = runtime.lifecycle
    cfg = runtime.config.admin

    def actor(params: Mapping[str, Any]) -> str:
        # A V2 client names nobody: the repository API is the actor. A `by` that is given is
        # checked as on every other route (a wrong actor would be recorded otherwise).
        if "by" not in params:
            return "repository-api"
        if not isinstance(params["by"], str):
            raise InvalidInput("parameters.by must be a string: who decides")
        return check_actor(params["by"])

    def repository_version(
        params: Mapping[str, Any], allowed: frozenset[str] = _REPOSITORY_PARAMETERS
    ) -> str | None:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise InvalidInput(
                f"parameter {unknown[0][:40]!r} is not accepted",
                hint='name a version ({"parameters": {"version": "2"}}); versions come '
                "from the recipe or the model's repository folder, never from a path or a "
                "config in the request",
            )
        version = params.get("version")
        if version is None:
            return None
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str):
            raise InvalidInput("parameters.version must be a string")
        return _version_name(version)

    # --- the V2 repository extension ---------------------------------------------------
    @post("/v2/repository/index", status_code=200)
    async def repository_index(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await _read(request, _IndexBody, empty_ok=True)
        rows: list[dict[str, Any]] = []
        for name, served in runtime.models.items():
            known = dict(served.versions)
            for version, sv in known.items():
                if body.ready and not sv.ready:
                    continue
                row = {
                    "name": name,
                    "version": version,
                    "state": "READY" if sv.ready else "UNAVAILABLE",
                    "reason": "" if sv.ready else sv.state,
                    "stage": sv.stage,
                }
                rows.append(row)
            if served.repository is not None and not body.ready:
                for version in served.repository.versions():
                    if version not in known:
                        rows.append(
                            {
                                "name": name,
                                "version": version,
                                "state": "UNAVAILABLE",
                                "reason": "unloaded",
                                "stage": None,
                            }
                        )
        return _json(rows)

    @post("/v2/repository/models/{model_name:str}/load", status_code=200)
    async def repository_load(
        request: Request[Any, Any, Any], model_name: FromPath[str]
    ) -> Response[bytes]:
        name = _model_name(model_name)
        body = await _read(request, _RepositoryBody, empty_ok=True)
        params = body.parameters
        version = repository_version(params)
        served = runtime.model(name)
        by = actor(params)
        reason = params.get("reason")
        if version is not None:
            return _json(await lifecycle.load(name, version, by=by, reason=reason))
        # The whole model: every recipe version that is not serving (a V2 client's load).
        loaded = []
        for v, sv in list(served.versions.items()):
            if not sv.ready:
                loaded.append((await lifecycle.load(name, v, by=by, reason=reason))["version"])
        return _json({"status": "loaded", "versions": loaded})

    @post("/v2/repository/models/{model_name:str}/unload", status_code=200)
    async def repository_unload(
        request: Request[Any, Any, Any], model_name: FromPath[str]
    ) -> Response[bytes]:
        name = _model_name(model_name)
        body = await _read(request, _RepositoryBody, empty_ok=True)
        params = body.parameters
        version = repository_version(params, _UNLOAD_PARAMETERS)
        runtime.model(name)
        if version is None:
            from infercore.runtime.errors import Conflict

            raise Conflict(
                f"unloading all of model {name!r} would stop serving it",
                hint='name a version that is not the primary: {"parameters": {"version": "2"}}',
            )
        by = actor(params)
        return _json(await lifecycle.unload(name, version, by=by, reason=params.get("reason")))

    # --- rollouts ------------------------------------------------------------------------
    @get("/admin/models")
    async def list_models() -> Response[bytes]:
        return _json(lifecycle.describe())

    @get("/admin/models/{model_name:str}")
    async def show_model(model_name: FromPath[str]) -> Response[bytes]:
        return _json(lifecycle.describe(_model_name(model_name))[0])

    @post("/admin/models/{model_name:str}/versions/{version:str}/promote", status_code=200)
    async def promote(
        request: Request[Any, Any, Any], model_name: FromPath[str], version: FromPath[str]
    ) -> Response[bytes]:
        name, v = _model_name(model_name), _version_name(version)
        body = await _read(request, _PromoteBody)
        result = await lifecycle.promote(
            name, v, body.to, weight=body.weight, by=body.by, reason=body.reason
        )
        return _json(result, 202 if result["status"] == "pending" else 200)

    @put("/admin/models/{model_name:str}/weights", status_code=200)
    async def weights(
        request: Request[Any, Any, Any], model_name: FromPath[str]
    ) -> Response[bytes]:
        name = _model_name(model_name)
        body = await _read(request, _WeightsBody)
        for version in body.weights:
            # As in a path: a name with '/' or '..' is a malformed request, not an unknown one.
            _version_name(version, "weights: ")
        return _json(
            await lifecycle.set_weights(name, body.weights, by=body.by, reason=body.reason)
        )

    @post("/admin/models/{model_name:str}/rollback", status_code=200)
    async def rollback(
        request: Request[Any, Any, Any], model_name: FromPath[str]
    ) -> Response[bytes]:
        name = _model_name(model_name)
        body = await _read(request, _DecisionBody)
        return _json(await lifecycle.rollback(name, by=body.by, reason=body.reason))

    @get("/admin/models/{model_name:str}/shadow")
    async def shadow(model_name: FromPath[str]) -> Response[bytes]:
        return _json(lifecycle.shadow_summary(_model_name(model_name)))

    @get("/admin/models/{model_name:str}/drift")
    async def drift(
        model_name: FromPath[str], limit: FromQuery[str | None] = None
    ) -> Response[bytes]:
        """The drift monitor's status, latest result per detector and latest events.

        ``?limit=N``: the latest N events, oldest first; 1 to the model's
        ``drift.history_size`` (the events the monitor keeps), 50 by default. Anything else
        is a 400 ``invalid_input``.
        """
        served = runtime.model(_model_name(model_name))
        monitor = served.drift
        if monitor is None:
            _events_limit(limit, None)
            return _json({"model": served.name, "monitored": False})
        count = _events_limit(limit, monitor.config.history_size)
        return _json(
            {
                "model": served.name,
                "monitored": True,
                "status": monitor.status(),
                "latest": monitor.latest_results(),
                "events": monitor.events(count),
            }
        )

    @get("/admin/approvals")
    async def approvals(status: FromQuery[str | None] = None) -> Response[bytes]:
        return _json(lifecycle.list_approvals(status))

    @post("/admin/approvals/{approval_id:str}/approve", status_code=200)
    async def approve(
        request: Request[Any, Any, Any], approval_id: FromPath[str]
    ) -> Response[bytes]:
        body = await _read(request, _DecisionBody)
        return _json(await lifecycle.approve(approval_id, by=body.by, reason=body.reason))

    @post("/admin/approvals/{approval_id:str}/reject", status_code=200)
    async def reject(
        request: Request[Any, Any, Any], approval_id: FromPath[str]
    ) -> Response[bytes]:
        body = await _read(request, _DecisionBody)
        return _json(await lifecycle.reject(approval_id, by=body.by, reason=body.reason))

    @get("/admin/audit")
    async def audit(limit: FromQuery[int] = 100) -> Response[bytes]:
        if not 0 <= limit <= 10_000:
            raise InvalidInput("limit must be between 0 and 10000")
        return _json(lifecycle.audit.recent(limit))

    app = Litestar(
        route_handlers=[
            repository_index,
            repository_load,
            repository_unload,
            list_models,
            show_model,
            promote,
            weights,
            rollback,
            shadow,
            drift,
            approvals,
            approve,
            reject,
            audit,
        ],
        exception_handlers={
            **EXCEPTION_HANDLERS,
            HTTPException: http_exception_handler("admin.max_body_bytes"),
        },
        request_max_body_size=cfg.max_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    return BearerAuth(app, token)


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def _listening(sock: socket.socket, bind: Callable[[], None]) -> socket.socket:
    """``sock`` bound by ``bind()`` and listening, non-blocking; closed if either fails."""
    try:
        bind()
        sock.listen(128)
    except BaseException:  # an OSError, or the ConfigError of a socket another server holds
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _serve(server: Any, sockets: list[socket.socket]) -> None:
    """``server.serve()``; uvicorn's ``sys.exit`` on a failed start-up becomes a return.

    A ``SystemExit`` raised in a task is re-raised by the event loop itself, past whoever
    awaits the task, and would end ``infercore serve`` with its traceback; :meth:`start`
    reports the failure as one line instead.
    """
    with contextlib.suppress(SystemExit):
        await server.serve(sockets=sockets)


class AdminListener:
    """The admin app on its own uvicorn server, beside the inference listener."""

    def __init__(self, runtime: Runtime, token: str) -> None:
        self.runtime = runtime
        self.config = runtime.config.admin
        self.app = create_admin_app(runtime, token)
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        #: The socket file this listener created: the only one it removes.
        self._bound: SocketFile | None = None

    @classmethod
    def from_runtime(
        cls, runtime: Runtime, environ: Mapping[str, str] | None = None
    ) -> AdminListener | None:
        """``None`` unless ``admin.enabled``; checks the token first (ConfigError: exit 2).

        Opens ``admin.audit_log`` either way (the guard's decisions are audited without the
        admin API too): a path that cannot be written is a config error here, at start-up.
        """
        cfg = runtime.config.admin
        _ = runtime.lifecycle
        if not cfg.enabled:
            return None
        token = load_token(cfg, environ)
        if cfg.uds is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the admin API listens on %s, not loopback; keep it off untrusted networks",
                cfg.host,
            )
        if not cfg.audit_log:  # unset, or empty (`admin.audit_log=`): unset
            log.warning("admin.audit_log is not set: rollout decisions are not persisted")
        return cls(runtime, token)

    @property
    def where(self) -> str:
        cfg = self.config
        return f"unix:{cfg.uds}" if cfg.uds else f"http://{cfg.host}:{cfg.port}"

    def _socket(self) -> socket.socket:
        path = self.config.uds
        assert path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def bind() -> None:
            self._bound = bind_unix(sock, path, key="admin.uds", mode=OWNER_ONLY_MODE)

        return _listening(sock, bind)

    def _tcp_socket(self) -> socket.socket:
        # Bound here rather than by uvicorn, whose failed bind is a log line and a sys.exit:
        # the cause (a port in use) reaches the one line the CLI prints.
        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)

        def bind() -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((cfg.host, cfg.port))

        return _listening(sock, bind)

    def _remove_socket_file(self) -> None:
        """Remove the socket file this listener created, and no other.

        Another server may have replaced it since (a file removed by hand, then bound anew):
        that one's socket is left alone.
        """
        bound, self._bound = self._bound, None
        if bound is not None:
            bound.remove()

    async def start(self) -> None:
        """Listen; returns once the server accepts connections.

        Raises:
            ConfigError: ``admin.uds`` is a socket another server answers on.
            InfercoreError: The listener could not start (address in use, bad socket path).
        """
        import uvicorn

        from infercore.server.shutdown import http_protocol

        cfg = self.config
        heads = self.runtime.config.server
        config = uvicorn.Config(
            self.app,
            host=cfg.host,
            port=cfg.port,
            # The inference listener's bounds on request heads (431/414/408): the token is
            # read from the head, so an unbounded one was read whole before the 401.
            http=http_protocol(
                0.0,
                max_header_bytes=heads.max_header_bytes,
                header_timeout_s=heads.header_timeout_ms / 1000,
            ),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
        )
        server = uvicorn.Server(config)
        server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
        try:
            sock = self._socket() if cfg.uds else self._tcp_socket()
        except OSError as exc:
            if cfg.uds:
                self._remove_socket_file()
                raise InfercoreError(
                    f"admin.uds: cannot listen on the socket ({exc.strerror})"
                ) from None
            if exc.errno == errno.EADDRINUSE:
                hint = "stop what listens there, or set admin.port to a free port"
            else:
                hint = "set admin.host and admin.port to an address this machine can listen on"
            raise InfercoreError(
                f"the admin API could not listen on {self.where}: {exc.strerror or exc}",
                hint=hint,
            ) from None
        self._server = server
        self._task = asyncio.create_task(_serve(server, [sock]), name="admin-listener")
        while not server.started:
            if self._task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            with contextlib.suppress(BaseException):
                await self._task
            sock.close()
            self._remove_socket_file()
            raise InfercoreError(f"the admin listener could not start on {self.where}")
        if cfg.uds:
            # INFO lines carry no file paths (S6): the config key says which socket it is.
            log.info("admin API on the Unix socket admin.uds")
            log.debug("admin.uds: %s", cfg.uds)
        else:
            log.info("admin API on %s", self.where)

    async def stop(self) -> None:
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=5.0)
        except (TimeoutError, Exception):
            task.cancel()
        self._remove_socket_file()
