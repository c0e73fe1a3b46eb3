"""The admin listener: the V2 repository extension and infercore's rollout routes.

A separate Litestar app on its own uvicorn server, started by ``infercore serve`` only when
``admin.enabled`` is true (off by default), on loopback or a Unix socket by default
(RELIABILITY.md S1). Every request needs ``Authorization: Bearer <token>``, compared in
constant time. No request is routed before it is authenticated: 401 without a token, 403 with
a wrong one. The inference listener mounts none of these routes, so there they answer 404.

The token is either one shared token, from an environment variable (``admin.auth_env``) or a
file (``admin.auth_file``), or one of the named tokens of ``admin.tokens_file`` (one
``name:token`` or ``name:sha256:<the token's digest>`` per line, :func:`load_named_tokens`;
``infercore models token NAME`` makes a token and its line). With the shared token, a decision's
``by`` is what the caller says: it names, it does not authenticate. With named tokens the
token's name is who decides: ``by`` may be left out (it is the token's name), a ``by`` that
names anyone else is a 403, and the audit record says ``"authenticated": true``; so
``rollout.distinct_approver`` holds between tokens. ``GET /admin/whoami`` says which.

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
    GET  /admin/whoami                              the token's name, if it has one

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
import re
import secrets
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post, put
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery

from infercore.config.rollout import AdminConfig
from infercore.config.schema import NAME_RE, VERSION_RE
from infercore.errors import (
    ConfigError,
    Forbidden,
    InfercoreError,
    InvalidInput,
    UnsupportedMediaType,
)
from infercore.lifecycle.manager import AUTHENTICATED_ACTOR, check_actor
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
#: A name in ``admin.tokens_file``: what ``by`` is with that token (a subset of what
#: :func:`check_actor` takes: no spaces and no ``:``, which ends the name on its line).
TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: :data:`TOKEN_NAME_RE` in words, for the messages that refuse a name.
TOKEN_NAME_RULE = (
    "1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or a digit, with no spaces"
)
#: The actors the server itself records in the audit log (the canary guard, the server's own
#: decisions, a V2 repository call with the shared token): no token may take one of these
#: names (in any case), or its decisions would read as the server's. (Drift actions record
#: ``drift:<detector>``, which no token name can be: ``:`` ends a name.)
RESERVED_ACTORS = frozenset({"guard", "server", "repository-api"})
#: What starts a digest in ``admin.tokens_file``: ``name:sha256:<64 hex digits>``.
DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")
#: Another hash's name before a ``:`` (``sha512:``, ``SHA256:``, ``md5:``): refused rather
#: than taken for a plain token, which would then be that text, digest and all.
_OTHER_DIGEST_RE = re.compile(r"(?:md5|sha-?\d*|sha3[-_]\d+|blake2[bs]?):", re.IGNORECASE)
#: How to write a digest line, for the messages that refuse one.
_DIGEST_HOWTO = (
    "write name:sha256: and the 64 hex digits of the token's SHA-256 digest "
    "(infercore models token NAME prints a new token and its line), or name:token"
)
#: A token: printable ASCII without spaces, what an ``Authorization`` header carries as is.
_TOKEN_RE = re.compile(r"[!-~]+")
#: The ASGI scope key :class:`BearerAuth` sets for the app behind it: the presented token's
#: name from ``admin.tokens_file``, ``None`` for the shared token.
SCOPE_TOKEN_NAME = "infercore.admin_token_name"
#: What :func:`load_token` gives: the shared token, or the named tokens: name -> the token,
#: or ``sha256:<64 hex digits>``, its SHA-256 digest (:func:`named_token_digest`).
AdminTokens = str | Mapping[str, str]


class _PromoteBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    to: str
    #: Who decides; with a named token, absent means the token's name (:func:`decided_by`).
    by: str | None = None
    weight: float | None = None
    reason: str | None = None


class _WeightsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    weights: dict[str, float]
    by: str | None = None
    reason: str | None = None


class _DecisionBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    by: str | None = None
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
    # tritonclient.http.aio (aiohttp) labels every body application/octet-stream: read as
    # JSON, as Triton does.
    if media not in (JSON, "application/octet-stream"):
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


def load_token(config: AdminConfig, environ: Mapping[str, str] | None = None) -> AdminTokens:
    """The admin API's credentials: the named tokens of ``admin.tokens_file`` (name -> token
    or its digest, :func:`load_named_tokens`), or else the shared bearer token, from
    ``admin.auth_file`` or the ``admin.auth_env`` variable.

    With ``admin.tokens_file`` the shared token is not accepted: ``admin.auth_file`` beside it
    is a config error, and a set ``admin.auth_env`` variable that is none of the named tokens
    is a warning (it may be there for the CLI).

    Raises:
        ConfigError: No token, one shorter than :data:`MIN_TOKEN_CHARS`, or a tokens file
            that :func:`load_named_tokens` refuses.
    """
    env = os.environ if environ is None else environ
    if config.tokens_file:
        if config.auth_file:
            raise ConfigError(
                "admin.tokens_file and admin.auth_file are both set: the named tokens replace "
                "the shared token",
                hint="keep admin.tokens_file (one name:sha256:<digest> or name:token line per "
                "person) and unset admin.auth_file, or the other way round",
            )
        tokens = load_named_tokens(config.tokens_file)
        shared = env.get(config.auth_env, "").strip()
        # Compared as digests: a line may hold a token's digest rather than the token.
        if shared and _digest(shared) not in {named_token_digest(t) for t in tokens.values()}:
            log.warning(
                "$%s is set, but admin.tokens_file replaces the shared token: the admin API "
                "does not accept it",
                config.auth_env,
            )
        return tokens
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
                hint=f"export {config.auth_env}=$(openssl rand -hex 24), or set admin.auth_file, "
                "or admin.tokens_file for a token per person",
            )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{where}: the admin token is shorter than {MIN_TOKEN_CHARS} characters",
            hint="use a long random token, e.g. openssl rand -hex 24",
        )
    return token


_TOKENS_FILE_FORMAT = (
    "one name:token per line, e.g. ann:$(openssl rand -hex 24), or name:sha256:<the token's "
    "SHA-256 digest> (infercore models token NAME prints a new token and its line)"
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def named_token_digest(credential: str) -> bytes:
    """The SHA-256 digest a named token is checked against: the one ``credential`` holds
    when it is ``sha256:<64 hex digits>`` (either case), else the digest of ``credential``,
    a plain token. Anything else after ``sha256:`` is refused: a digest mistyped must not
    become a token (:func:`load_named_tokens` says which line).

    Raises:
        ValueError: ``credential`` starts with ``sha256:`` but is not a digest.
    """
    if credential.startswith(DIGEST_PREFIX):
        match = _DIGEST_RE.fullmatch(credential)
        if match is None:
            raise ValueError(f"not {DIGEST_PREFIX} and 64 hex digits")
        return bytes.fromhex(match[1])
    return _digest(credential)


def digest_line(name: str, token: str) -> str:
    """The ``admin.tokens_file`` line that names ``token`` by its digest:
    ``name:sha256:<64 lowercase hex digits>``.

    Raises:
        ValueError: ``name`` is not a token name (:data:`TOKEN_NAME_RE`).
    """
    if not TOKEN_NAME_RE.fullmatch(name):
        raise ValueError(f"a token name is {TOKEN_NAME_RULE}")
    return f"{name}:{DIGEST_PREFIX}{hashlib.sha256(token.encode()).hexdigest()}"


def new_named_token(name: str) -> tuple[str, str]:
    """A fresh random token for ``name``, and its ``admin.tokens_file`` line
    (:func:`digest_line`): what ``infercore models token NAME`` prints.

    The token is 48 hex digits (192 random bits, :func:`secrets.token_hex`): far more than
    :data:`MIN_TOKEN_CHARS`, which the server cannot check on a digest line.

    Raises:
        ValueError: ``name`` is not a token name (:data:`TOKEN_NAME_RE`).
    """
    token = secrets.token_hex(24)
    return token, digest_line(name, token)


def load_named_tokens(path: str) -> dict[str, str]:
    """The named tokens of ``admin.tokens_file``: name -> the token, or ``sha256:<64 hex
    digits>``, its SHA-256 digest (lowercased; :func:`named_token_digest`).

    The format, parsed strictly::

        # who: name:token or name:sha256:<digest>, one per line; '#' starts a comment line,
        # blank lines are skipped
        ann:3f9a1c2e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39
        carol:sha256:dd44a13723d56742d0996dcc3a26147352b24277f4efeef6a089dcea4120f7ef

    A name is 1-64 letters, digits, ``.``, ``_``, ``-`` or ``@``, starting with a letter or a
    digit (:data:`TOKEN_NAME_RE`); it is what ``by`` is with that token. What follows the
    first ``:``, with nothing around it, is either:

    - ``sha256:`` and the 64 hex digits (either case) of the token's SHA-256 digest: the file
      then does not hold the token, and a copy of it that leaks (a backup, a ``kubectl get
      secret``) lets no one in. ``infercore models token NAME`` prints a new token and its
      line. A fast hash is enough (no bcrypt or scrypt, as for passwords): the tokens are
      long random strings (192 bits from the generator), so a digest leaves nothing to guess.
      The server cannot tell how long the token behind a digest is, so it cannot refuse a
      short one: the generator makes them long.
    - Else the token itself: at least :data:`MIN_TOKEN_CHARS` printable ASCII characters, no
      spaces. A token that starts with ``sha256:`` is always read as a digest, so anything
      else after ``sha256:`` is an error, as is another hash's name before a ``:``
      (``sha512:``, ``SHA256:``, ``md5:``): a mistyped digest never becomes a token.

    No name may be given twice, nor a token, in either form: a token on one line whose
    digest is another line's is a duplicate. Nor may a name be one of the server's own actors
    (:data:`RESERVED_ACTORS`, in any case).

    The file is opened once and checked through that descriptor (what is checked is what is
    read): it must be a regular file (a named pipe would hold the start-up for ever), owned
    by the server's user or root, and not readable or writable by every user (ssh's rule
    for a private key), a file of digests too: whoever reads it can act as anyone whose token
    (not digest) it holds, whoever writes it (or owns it) can add themselves. Readable by its
    group is a warning (:func:`_check_tokens_file_mode`), but for a Kubernetes Secret's file
    in its pod: an INFO.

    Messages name the file and the line, never what the line holds: it may be a token.

    Raises:
        ConfigError: The file cannot be read, is no regular file, belongs to another user,
            is open to other users, or a line is not ``name:token`` or
            ``name:sha256:<digest>`` as above.
    """
    where = f"admin.tokens_file {path!r}"
    raw = _read_tokens_file(where, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}, line {line}: not UTF-8 text",
            hint=f"write the file as plain text: {_TOKENS_FILE_FORMAT}",
        ) from None
    tokens: dict[str, str] = {}
    name_lines: dict[str, int] = {}
    #: digest -> (line, whether the line holds the digest): a token is the same in both forms.
    token_lines: dict[bytes, tuple[int, bool]] = {}
    for number, text_line in enumerate(text.split("\n"), 1):
        entry = text_line.strip()
        if not entry or entry.startswith("#"):
            continue
        at = f"{where}, line {number}"
        name, colon, token = entry.partition(":")
        if not colon:
            raise ConfigError(
                f"{at}: expected name:token, found no ':'",
                hint=f"{_TOKENS_FILE_FORMAT}; '#' starts a comment line",
            )
        if not TOKEN_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{at}: the name before ':' must be {TOKEN_NAME_RULE}",
                hint="the name is who decides (`by`) in the audit log, e.g. ann or ann@example.com",
            )
        if name.lower() in RESERVED_ACTORS:
            raise ConfigError(
                f"{at}: the name {name!r} is one the server records its own decisions under "
                f"({', '.join(sorted(RESERVED_ACTORS))}): a person's decisions would read as "
                "the server's",
                hint="name the token after the person who holds it, e.g. ann or ann@example.com",
            )
        if not token:
            raise ConfigError(
                f"{at}: no token after ':'",
                hint=f"put the token right after the colon: {_TOKENS_FILE_FORMAT}",
            )
        if not _TOKEN_RE.fullmatch(token):
            raise ConfigError(
                f"{at}: the token holds a space or a character other than printable ASCII",
                hint="write name:token with nothing around the ':'; a token is printable "
                "ASCII without spaces, e.g. openssl rand -hex 24",
            )
        hashed = token.startswith(DIGEST_PREFIX)
        if hashed:
            if not _DIGEST_RE.fullmatch(token):
                raise ConfigError(
                    f"{at}: after 'sha256:' the line must hold the token's SHA-256 digest, "
                    "64 hex digits and nothing else (a token that starts with 'sha256:' is "
                    "always read as a digest)",
                    hint=_DIGEST_HOWTO,
                )
            token = token.lower()
        elif _OTHER_DIGEST_RE.match(token):
            raise ConfigError(
                f"{at}: the token starts with a hash's name and ':', as another hash's digest "
                "would; only SHA-256 digests are read, after 'sha256:' in lowercase",
                hint=_DIGEST_HOWTO,
            )
        elif len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{at}: the token is shorter than {MIN_TOKEN_CHARS} characters",
                hint="use a long random token, e.g. openssl rand -hex 24, or infercore models "
                "token NAME",
            )
        if name in name_lines:
            raise ConfigError(
                f"{at}: the name is line {name_lines[name]}'s too",
                hint="give each person one line (one name, one token)",
            )
        digest = named_token_digest(token)
        if digest in token_lines:
            first, first_hashed = token_lines[digest]
            forms = ""
            if first_hashed != hashed:
                forms = f" ({'this' if hashed else 'that'} line holds its digest)"
            raise ConfigError(
                f"{at}: the token is line {first}'s too{forms}; a token must name one person",
                hint="give each person a token of their own: infercore models token NAME",
            )
        name_lines[name], token_lines[digest] = number, (number, hashed)
        tokens[name] = token
    if not tokens:
        raise ConfigError(
            f"{where}: the file names no token",
            hint=_TOKENS_FILE_FORMAT,
        )
    return tokens


#: Opens the tokens file without waiting for a writer (a named pipe) nor leaking it to a child.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _read_tokens_file(where: str, path: str) -> bytes:
    """The bytes of the tokens file, checked (:func:`_check_tokens_file`) through the one
    descriptor they are read from: a file swapped between a check by path and the read
    cannot pass another's check."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the file ({exc.strerror})",
            hint=f"point admin.tokens_file at a readable file: {_TOKENS_FILE_FORMAT}",
        ) from None
    try:
        _check_tokens_file(where, os.fstat(fd))
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the file ({exc.strerror})",
            hint=f"point admin.tokens_file at a readable file: {_TOKENS_FILE_FORMAT}",
        ) from None
    finally:
        os.close(fd)


def _check_tokens_file(where: str, st: os.stat_result) -> None:
    """A regular file, owned by the server's user or root, its mode as
    :func:`_check_tokens_file_mode` wants.

    Raises:
        ConfigError: It is not so.
    """
    if not stat.S_ISREG(st.st_mode):
        kind = next(
            (name for test, name in _FILE_KINDS if test(st.st_mode)), "another kind of file"
        )
        raise ConfigError(
            f"{where}: not a regular file ({kind})",
            hint=f"point admin.tokens_file at a regular file: {_TOKENS_FILE_FORMAT}",
        )
    if os.name == "posix":
        owner, me = st.st_uid, os.geteuid()
        if owner not in (me, 0):
            raise ConfigError(
                f"{where}: the file belongs to uid {owner}, not to this server's user (uid "
                f"{me}) or root: its owner can change its mode and give themselves a token",
                hint=f"chown {me} the file (or root: chown root), then chmod 600 it",
            )
    _check_tokens_file_mode(where, st.st_mode, st.st_gid)


def _in_pod_group(gid: int) -> bool:
    """Whether group ``gid`` is this server's own in a Kubernetes pod: the process runs in
    Kubernetes (``KUBERNETES_SERVICE_HOST``, which the kubelet sets in every container, with
    ``enableServiceLinks: false`` too) and is a member of the group (its own, or a
    supplementary one: the pod's ``fsGroup``)."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return False
    return gid == os.getegid() or gid in os.getgroups()


def _check_tokens_file_mode(where: str, mode: int, gid: int | None = None) -> None:
    """Refuse a tokens file every user may read, or its group or every user may write.

    Readable by its group is a WARNING (every member can act as anyone whose token it holds),
    but for the file of a Kubernetes Secret in its pod: the pod's ``fsGroup`` makes a
    ``defaultMode: 0400`` file 0440, its group the pod's own. So when the server runs in
    Kubernetes and the file's group (``gid``) is one of its own (:func:`_in_pod_group`), it
    is an INFO. Outside Kubernetes a user's group is often shared (``users``, ``staff``): a
    warning still.
    """
    if os.name != "posix":  # no POSIX modes to check
        return
    bits = stat.S_IMODE(mode)
    fix = "chmod 600 the file (a Kubernetes Secret: defaultMode: 0400)"
    if bits & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{where}: the file is writable by other users (mode {bits:04o}): whoever can "
            "write it can give themselves a token",
            hint=fix,
        )
    if bits & stat.S_IROTH:
        raise ConfigError(
            f"{where}: the file is readable by every user (mode {bits:04o}): whoever reads "
            "it can act as anyone whose token (not digest) it holds",
            hint=fix,
        )
    if bits & stat.S_IRGRP:
        if gid is not None and _in_pod_group(gid):
            log.info(
                "admin.tokens_file is readable by its group (mode %04o), this server's own in "
                "its Kubernetes pod (a Secret's file under the pod's fsGroup)",
                bits,
            )
            return
        log.warning(
            "admin.tokens_file is readable by its group (mode %04o): every member can act as "
            "anyone whose token (not digest) it holds; chmod 600 it unless the group is this "
            "server's alone",
            bits,
        )


class BearerAuth:
    """ASGI middleware: every HTTP request carries ``Authorization: Bearer <token>``.

    Runs before routing, so an unauthenticated caller learns nothing about the routes.
    Compared in constant time over SHA-256 digests (the token's length does not leak either);
    with named tokens, against every one of them, without stopping at the one that matches.
    A named token given as its digest (``sha256:<hex>``, :func:`named_token_digest`) is one
    more digest in that loop; the digest itself, presented as a token, is not accepted.
    The app behind it finds the token's name in ``scope[SCOPE_TOKEN_NAME]`` (``None`` for the
    shared token), and the lifecycle in :data:`AUTHENTICATED_ACTOR`.
    """

    def __init__(self, app: Any, token: AdminTokens) -> None:
        self.app = app
        # The shared token is always a token (``sha256:`` in it means nothing); a named one
        # may be its digest, as in admin.tokens_file.
        self._digests: list[tuple[str | None, bytes]] = (
            [(None, _digest(token))]
            if isinstance(token, str)
            else [(name, named_token_digest(secret)) for name, secret in token.items()]
        )

    @property
    def named(self) -> bool:
        """Whether the tokens are named (``admin.tokens_file``)."""
        return any(name is not None for name, _ in self._digests)

    def identify(self, header: bytes | None) -> tuple[int, str | None]:
        """``(0, the token's name or None)`` when authorized, else ``(401 or 403, None)``."""
        if not header:
            return 401, None
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return 401, None
        digest = hashlib.sha256(given.strip()).digest()
        matched, found = False, None
        for name, expected in self._digests:  # every one: the time says nothing of which
            same = hmac.compare_digest(digest, expected)
            matched |= same
            found = name if same else found
        return (0, found) if matched else (403, None)

    def check(self, header: bytes | None) -> int:
        """0 when authorized, else the status to answer (401 no token, 403 a wrong one)."""
        return self.identify(header)[0]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        status, token_name = self.identify(header)
        if status == 0:
            # Set for this request only; a load resets it while the version starts, so the
            # tasks that outlive the request (a batcher's collector) do not copy it.
            actor = AUTHENTICATED_ACTOR.set(token_name)
            try:
                await self.app({**scope, SCOPE_TOKEN_NAME: token_name}, receive, send)
            finally:
                AUTHENTICATED_ACTOR.reset(actor)
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


def token_name(request: Request[Any, Any, Any]) -> str | None:
    """The name of the token ``request`` came with (``admin.tokens_file``); ``None`` for the
    shared token."""
    name = request.scope.get(SCOPE_TOKEN_NAME)
    return name if isinstance(name, str) else None


def decided_by(request: Request[Any, Any, Any], by: str | None) -> str:
    """Who decides: the token's name with named tokens, else the ``by`` the caller gave.

    With a named token, a missing ``by`` is the token's name and a ``by`` that names anyone
    else is refused: a token acts for its own name only. With the shared token ``by`` is
    required, and names without authenticating.

    Raises:
        InvalidInput: ``by`` is missing (shared token) or not 1-64 printable characters
            (with a named token, the message says to leave it out).
        Forbidden: ``by`` is not the named token's name (403).
    """
    name = token_name(request)
    if name is None:
        return check_actor(by)
    if by is None:
        return name
    try:
        given = check_actor(by)
    except InvalidInput as exc:
        # check_actor's fix ("say who decides") is the shared token's: this token says it.
        empty = not by.strip()
        raise InvalidInput(
            f"`by` is empty; with this token leave it out: {name!r} decides"
            if empty
            else f"{exc.message}; with this token leave it out: {name!r} decides",
            hint="leave `by` out (or null): the token's name is who decides",
        ) from None
    if given != name:
        raise Forbidden(
            f"this token belongs to {name!r}; `by` says {quoted(given)}",
            hint="leave `by` out (the token's name decides), or call with the token of the "
            "person named",
        )
    return name


def create_admin_app(runtime: Runtime, token: AdminTokens) -> BearerAuth:
    """The admin ASGI app (Litestar behind :class:`BearerAuth`) for ``runtime``.

    Args:
        runtime: The runtime whose lifecycle the routes drive.
        token: The shared token, or the named tokens (name -> token) of
            ``admin.tokens_file``: see :func:`load_token`.
    """
    lifecycle = runtime.lifecycle
    cfg = runtime.config.admin

    def actor(request: Request[Any, Any, Any], params: Mapping[str, Any]) -> str:
        # A V2 client names nobody: with the shared token, the repository API is the actor;
        # with a named token, the token's name (`by` absent or null, as on the decision
        # routes). A `by` that is given is checked as on every other route (a wrong actor
        # would be recorded otherwise).
        named = token_name(request)
        by = params.get("by")
        if "by" not in params or (by is None and named is not None):
            return named or "repository-api"
        if not isinstance(by, str):
            raise InvalidInput("parameters.by must be a string: who decides")
        return decided_by(request, by)

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
        by = actor(request, params)
        reason = params.get("reason")
        if version is not None:
            return _json(await lifecycle.load(name, version, by=by, reason=reason))
        # The whole model: every recipe version that is not serving (a V2 client's load).
        loaded, answer = [], {}
        for v, sv in list(served.versions.items()):
            if not sv.ready:
                done = await lifecycle.load(name, v, by=by, reason=reason)
                loaded.append(done["version"])
                answer = {"state_file": done["state_file"]} if "state_file" in done else {}
        # The last load's write holds every change before it (the file holds the whole
        # rollout): its outcome is the call's. Nothing loaded: nothing written, no key.
        return _json({"status": "loaded", "versions": loaded, **answer})

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
        by = actor(request, params)
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
        by = decided_by(request, body.by)
        result = await lifecycle.promote(
            name, v, body.to, weight=body.weight, by=by, reason=body.reason
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
        by = decided_by(request, body.by)
        return _json(await lifecycle.set_weights(name, body.weights, by=by, reason=body.reason))

    @post("/admin/models/{model_name:str}/rollback", status_code=200)
    async def rollback(
        request: Request[Any, Any, Any], model_name: FromPath[str]
    ) -> Response[bytes]:
        name = _model_name(model_name)
        body = await _read(request, _DecisionBody)
        by = decided_by(request, body.by)
        return _json(await lifecycle.rollback(name, by=by, reason=body.reason))

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
        by = decided_by(request, body.by)
        return _json(await lifecycle.approve(approval_id, by=by, reason=body.reason))

    @post("/admin/approvals/{approval_id:str}/reject", status_code=200)
    async def reject(
        request: Request[Any, Any, Any], approval_id: FromPath[str]
    ) -> Response[bytes]:
        body = await _read(request, _DecisionBody)
        by = decided_by(request, body.by)
        return _json(await lifecycle.reject(approval_id, by=by, reason=body.reason))

    @get("/admin/audit")
    async def audit(limit: FromQuery[int] = 100) -> Response[bytes]:
        if not 0 <= limit <= 10_000:
            raise InvalidInput("limit must be between 0 and 10000")
        return _json(lifecycle.audit.recent(limit))

    @get("/admin/whoami")
    async def whoami(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The token's name (``admin.tokens_file``), or ``null`` for the shared token."""
        name = token_name(request)
        return _json({"name": name, "authenticated": name is not None})

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
            whoami,
        ],
        exception_handlers={
            **EXCEPTION_HANDLERS,
            HTTPException: http_exception_handler("admin.max_body_bytes", extension_notes=False),
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

    def __init__(self, runtime: Runtime, token: AdminTokens) -> None:
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
        if isinstance(token, str):
            gated = sorted(
                name for name, m in runtime.config.models.items() if m.rollout.distinct_approver
            )
            if gated:
                log.warning(
                    "rollout.distinct_approver (model %s) with one shared admin token: `by` "
                    "names who decides without authenticating them; set admin.tokens_file for "
                    "a token per person",
                    ", ".join(gated),
                )
        else:
            log.info("admin API: %d named tokens (admin.tokens_file)", len(token))
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
