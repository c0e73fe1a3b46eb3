"""The one error-mapping layer: every non-2xx body is ``{"error": ..., "reason": ...}``.

Bodies never carry paths, tokens or tracebacks (RELIABILITY.md S6): unexpected exceptions are
logged with the request id and answered with a generic 500 ``internal``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from infercore.errors import InfercoreError

log = logging.getLogger("infercore.server")

_encoder = msgspec.json.Encoder()

_HTTP_REASONS = {
    400: "invalid_input",
    401: "unauthorized",
    403: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        _encoder.encode({"error": message, "reason": reason}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def public_message(exc: InfercoreError) -> str:
    """What the client is told: the error's own message, or a generic one for server faults."""
    if exc.status_code >= 500 and exc.reason in ("backend_error", "internal", "model_load_failed"):
        # The detail may name files or internals: log it, send a generic message.
        return (
            "the model failed to process the request"
            if exc.reason == "backend_error"
            else "internal error"
        )
    return str(exc)


def error_body(exc: InfercoreError) -> bytes:
    """The JSON body of an error response: ``{"error": ..., "reason": ...}``."""
    return _encoder.encode({"error": public_message(exc), "reason": exc.reason})


def from_infercore_error(exc: InfercoreError) -> Response[bytes]:
    return error_response(
        exc.status_code, exc.reason, public_message(exc), dict(exc.headers) or None
    )


def handle_infercore_error(request: Request[Any, Any, Any], exc: InfercoreError) -> Response[bytes]:
    return from_infercore_error(exc)


def unserved_extension(path: str) -> str | None:
    """What a Triton client asking for one of Triton's HTTP extensions infercore does not
    serve should be told, or ``None`` for any other unknown path."""
    parts = path.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "v2":
        return None
    if parts[1] == "repository":
        return (
            "the model repository extension is served on the admin listener "
            "(admin.enabled, admin.port), not on this one"
        )
    if parts[1] in ("systemsharedmemory", "cudasharedmemory"):
        return (
            "the shared-memory extensions are not served: send the tensors in the request body "
            "(JSON, or the binary tensor extension)"
        )
    if parts[1] in ("trace", "logging"):
        return f"Triton's {parts[1]} extension is not served"
    if parts[1] == "models" and parts[-1] == "config":
        return (
            "the model configuration extension is not served: GET /v2/models/NAME gives a "
            "model's metadata"
        )
    if parts[1] == "models" and parts[-1] == "stats":
        return "the statistics extension is not served: GET /metrics has the Prometheus metrics"
    return None


def http_exception_handler(
    body_limit: str, *, extension_notes: bool = True
) -> Callable[..., Response[bytes]]:
    """The handler of Litestar's HTTP errors; a 413 names ``body_limit``, the setting to raise.

    ``extension_notes``: a 404 for one of Triton's endpoints says which extension it belongs
    to (:func:`unserved_extension`); off on the admin listener, which serves the repository
    extension itself.
    """

    def handle_http_exception(
        request: Request[Any, Any, Any], exc: HTTPException
    ) -> Response[bytes]:
        status = exc.status_code
        reason = _HTTP_REASONS.get(status, "internal" if status >= 500 else "invalid_input")
        if status == 413:
            message = f"request body too large ({body_limit})"
        elif status == 404:
            message = f"no route for {request.method} {request.url.path}"
            note = unserved_extension(request.url.path) if extension_notes else None
            if note is not None:
                message = f"{message}: {note} (hint: GET /v2 lists the extensions served)"
        elif status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
            message = "internal error"
        else:
            message = str(exc.detail)
        return error_response(status, reason, message, dict(exc.headers or {}) or None)

    return handle_http_exception


handle_http_exception = http_exception_handler("server.max_body_bytes")


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error(
        "unexpected error on %s %s: %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
        exc_info=log.isEnabledFor(logging.DEBUG),
    )
    return error_response(500, "internal", "internal error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    InfercoreError: handle_infercore_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
