"""One error hierarchy for everything infercore reports to a user.

Every error carries the HTTP status it maps to, a machine-readable ``reason`` (the label of
``infercore_request_failures_total``) and a hint saying how to fix it. The server's single
error-mapping layer (:mod:`infercore.server.errors`) turns these into ``{"error", "reason"}``
bodies; the CLI turns :class:`ConfigError` into one line and exit code 2.
"""

from __future__ import annotations

from collections.abc import Mapping


class InfercoreError(Exception):
    """Base class of every error infercore raises on purpose.

    Args:
        message: What was wrong, naming the field, path or value.
        hint: How to fix it (appended to the message when shown).
    """

    status_code: int = 500
    reason: str = "internal"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def headers(self) -> Mapping[str, str]:
        """Extra response headers (``Retry-After`` for retryable errors)."""
        return {}

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class ConfigError(InfercoreError):
    """Config that does not compose or validate; the CLI exits with code 2."""

    status_code = 400
    reason = "invalid_config"


class PluginError(InfercoreError):
    """A plugin that cannot be loaded or registers something invalid."""

    status_code = 500
    reason = "plugin_error"


class InvalidInput(InfercoreError):
    """A request that is malformed or does not match the model's signature."""

    status_code = 400
    reason = "invalid_input"


class UnsupportedMediaType(InfercoreError):
    status_code = 415
    reason = "unsupported_media_type"


class BodyTooLarge(InfercoreError):
    status_code = 413
    reason = "body_too_large"


class ModelNotFound(InfercoreError):
    status_code = 404
    reason = "model_not_found"


class NotFound(InfercoreError):
    status_code = 404
    reason = "not_found"


class MethodNotAllowed(InfercoreError):
    status_code = 405
    reason = "method_not_allowed"


class Unauthorized(InfercoreError):
    status_code = 401
    reason = "unauthorized"


class Forbidden(InfercoreError):
    status_code = 403
    reason = "unauthorized"


class RetryableError(InfercoreError):
    """A 503 the client may retry after ``retry_after`` seconds."""

    status_code = 503
    retry_after: int = 1

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QueueFull(RetryableError):
    reason = "queue_full"


class QueueTimeout(RetryableError):
    reason = "queue_timeout"


class ModelNotReady(RetryableError):
    reason = "model_not_ready"


class ShuttingDown(RetryableError):
    reason = "shutting_down"


class FeatureStoreUnavailable(RetryableError):
    reason = "feature_store_unavailable"


class DeadlineExceeded(InfercoreError):
    status_code = 504
    reason = "deadline_exceeded"


class RequestTimeout(InfercoreError):
    """The request's body did not arrive within its deadline (the client's fault: a 4xx).

    The connection closes after the answer: what is still to come of the body cannot be told
    from the next request.
    """

    status_code = 408
    reason = "request_timeout"

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Connection": "close"}


class BackendError(InfercoreError):
    """The model raised or returned something malformed. The message is logged, not sent."""

    status_code = 500
    reason = "backend_error"


class ModelLoadError(InfercoreError):
    """A model artifact that is missing, corrupt, untrusted or fails its warm-up."""

    status_code = 500
    reason = "model_load_failed"
