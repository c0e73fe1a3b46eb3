"""The feature source interface: turns request fields into model inputs."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from contextvars import ContextVar

from infercore.components.base import Component
from infercore.components.model import Array, Tensors

_degraded: ContextVar[set[str] | None] = ContextVar("infercore_degraded", default=None)


def mark_degraded(part: str) -> None:
    """Record that this request was served in a degraded way (e.g. default features).

    The server answers it with ``X-Infercore-Degraded: <part>[, ...]``. Call it from a feature
    source (or any component) while handling the request; outside a request it does nothing.
    """
    parts = _degraded.get()
    if parts is not None:
        parts.add(part)


def begin_request() -> set[str]:
    """Start collecting degraded parts for the current request (called by the server)."""
    parts: set[str] = set()
    _degraded.set(parts)
    return parts


class FeatureSource(Component):
    """Builds a model's input tensors from the fields of a request.

    The protocol codec decodes a request into named columns: a V2 request gives one array per
    input; a V1 request with ``instances`` of objects gives one array per field. A feature
    source may add features from elsewhere (a feature store) and must return the tensors the
    model expects by name. It runs on the event loop: blocking reads belong in a thread.
    """

    @abc.abstractmethod
    async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
        """Return the model's inputs for the rows of one request.

        Args:
            fields: Named request columns, each with the request's rows along axis 0.
            deadline: Event-loop time (``loop.time()``) by which the whole request must finish.

        Returns:
            One array per model input name.
        """
