"""The feature source interface: turns request fields into model inputs."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from typing import ClassVar

from infercore.components.base import Component
from infercore.components.model import Array, Tensors
from infercore.components.tensors import TensorSpec

_degraded: ContextVar[set[str] | None] = ContextVar("infercore_degraded", default=None)


def mark_degraded(part: str) -> None:
    """Record that this request was served in a degraded way (e.g. default features).

    The server answers it with ``X-Infercore-Degraded: <part>[, ...]``. Call it from a feature
    source (or any component) while handling the request; outside a request it does nothing.
    """
    parts = _degraded.get()
    if parts is not None:
        parts.add(part)


def begin_request(parts: set[str] | None = None) -> set[str]:
    """Start collecting degraded parts for the current request (called by the server).

    ``parts``: collect into this set (a request's own, when its work runs in another task).
    """
    if parts is None:
        parts = set()
    _degraded.set(parts)
    return parts


def degraded_parts() -> set[str] | None:
    """The set the current request's degraded parts go to (``None`` outside a request)."""
    return _degraded.get()


class FeatureSource(Component):
    """Builds a model's input tensors from the fields of a request.

    The protocol codec decodes a request into named columns: a V2 request gives one array per
    input; a V1 request with ``instances`` of objects gives one array per field. A feature
    source may add features from elsewhere (a feature store) and must return the tensors the
    model expects by name. It runs on the event loop: blocking reads belong in a thread.
    """

    #: Whether the runtime may fetch once for several requests that arrive together
    #: (``server.group_requests``): true when row *i* of :meth:`fetch`'s answer depends only
    #: on row *i* of the fields, so the answer for the stacked fields of several requests,
    #: split by rows, is what each request would have got alone. An error or a
    #: :func:`mark_degraded` during a grouped fetch makes each request run alone again.
    groupable: ClassVar[bool] = False

    def request_inputs(self) -> Sequence[TensorSpec] | None:
        """The tensors a request carries, when they are not the model's own inputs.

        V2 model metadata lists them as the model's ``inputs`` (what a client that reads the
        metadata first, such as Triton's ``perf_analyzer``, must send). ``None`` (the default):
        the request carries the model's inputs, and the metadata lists those.
        """
        return None

    def request_fields(self, model_inputs: Sequence[str]) -> Sequence[str]:
        """The names a request may carry, for the hint of a missing or unknown input.

        The runtime calls it only to explain a refused request, never per request. Override
        it when :meth:`request_inputs` does not say it all: a source that passes the model's
        inputs through and also builds them from named fields (the ``request`` source's
        ``assemble``) returns both.

        Args:
            model_inputs: The input names of the model version the request went to.

        Returns:
            Default: the names of :meth:`request_inputs` where it lists them, else
            ``model_inputs`` (the hint then names the model's inputs, as without a source).
        """
        specs = self.request_inputs()
        return [s.name for s in specs] if specs is not None else list(model_inputs)

    def provided_inputs(self) -> AbstractSet[str] | None:
        """The names of the model inputs :meth:`fetch` builds, when the source's config says.

        The runtime compares each model version's inputs with them once the version has
        loaded, at start-up and on every reload, and refuses a version with an input no
        entry builds (a config error naming it) rather than serve it and answer every request
        400. A source whose answer always holds these names, whatever the request sends,
        should return them: the ``feast`` source returns its ``inputs`` (or its
        ``matrix_input`` with ``layout: matrix``).

        Returns:
            The input names, or ``None`` (the default) when the source cannot know: it
            passes request tensors through (the ``request`` source), so what reaches the
            model depends on the request. Nothing is checked then.
        """
        return None

    def check_model_inputs(self, inputs: Sequence[TensorSpec]) -> None:
        """Refuse a config that could not serve the model: called at start-up, once the
        model's versions have loaded, with the inputs of every version that loaded.

        The default checks nothing. The ``request`` source refuses an ``assemble`` entry named
        after no input, or listing more or fewer fields than its input has columns: the
        server would otherwise report ready and answer every request 400.

        Raises:
            ConfigError: Naming the config path and what the model takes.
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
