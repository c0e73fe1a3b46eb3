"""The router interface: picks the model version that serves a request."""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy.typing as npt

from infercore.components.base import Component

Array = npt.NDArray[Any]

_NO_FIELDS: Mapping[str, Array] = MappingProxyType({})
_NO_STAGES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """The versions of one model a router may choose from, as one immutable snapshot.

    infercore builds a new table whenever a version loads, unloads or changes stage, and swaps
    it in with one assignment, so a router never sees a half-made change.

    Attributes:
        primary: The version that serves by default.
        ready: Every version that is loaded, warmed and may take traffic.
        split: The traffic split of routed requests: ``(version, cumulative upper bound)``
            pairs over ``[0, 100)``, lowest first. Each ready canary with a weight holds its
            own region (maybe in several slices), which grows and shrinks in place; the
            primary has the rest. Empty means "everything to the primary".
        shadows: Ready versions in the ``shadow`` stage (requests may be copied to them).
        stages: Every version's stage (``candidate``, ``shadow``, ``canary``, ``primary``,
            ``retired``).
    """

    primary: str
    ready: frozenset[str]
    split: tuple[tuple[str, float], ...] = ()
    shadows: tuple[str, ...] = ()
    stages: Mapping[str, str] = field(default_factory=lambda: _NO_STAGES)

    def choose(self, share: float) -> str:
        """The version whose slice of ``split`` holds ``share`` (a number in ``[0, 100)``)."""
        for version, bound in self.split:
            if share < bound:
                return version
        return self.primary


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a router may look at: headers (case-insensitive), the request id, its fields.

    Attributes:
        headers: The request's headers.
        request_id: The request's id (``X-Request-Id`` or the V2 ``id``).
        fields: The decoded request columns (V2 inputs, or V1 instance fields), each with the
            request's rows along axis 0. Use :meth:`key` rather than reading them directly.
    """

    headers: Mapping[str, str]
    request_id: str
    fields: Mapping[str, Array] = field(default_factory=lambda: _NO_FIELDS)

    def field_key(self, name: str) -> bytes | None:
        """The first row's value of field ``name`` as bytes (``None`` when absent or empty).

        A request of several rows is routed as one, by its first row.
        """
        column = self.fields.get(name)
        if column is None or column.size == 0:
            return None
        value: Any = column.flat[0]
        if isinstance(value, bytes):
            return value
        return str(value).encode()

    def key(self, field_name: str | None, header: str | None) -> bytes | None:
        """A sticky key: the request field ``field_name`` if sent, else the header ``header``."""
        if field_name is not None:
            found = self.field_key(field_name)
            if found is not None:
                return found
        if header is not None:
            value = self.headers.get(header)
            if value:
                return value.encode()
        return None


@dataclass(frozen=True, slots=True)
class ShadowPolicy:
    """How copies of requests reach shadow versions (set by a mirroring router).

    Attributes:
        queue_size: Copies waiting at most; a full queue drops the copy (counted).
        workers: Copies running at once.
        timeout_s: A copy that takes longer is abandoned (counted as ``timeout``).
        atol: Absolute tolerance when comparing float outputs with the primary's.
        rtol: Relative tolerance when comparing float outputs.
        compare: Output names to compare; empty means every output both versions return.
        max_loop_busy: Copies wait while the event loop's thread was busy (running or waiting
            for a CPU) more than this share of the last 50 ms, so that the shadow only uses
            the time the primary leaves; 1.0 never holds them back.
        batch_delay_s: How long the oldest waiting copy may wait for others to run with it
            (a full batch goes at once); 0 runs copies as soon as a worker is free.
    """

    queue_size: int = 256
    workers: int = 2
    timeout_s: float = 1.0
    atol: float = 1e-6
    rtol: float = 1e-4
    compare: tuple[str, ...] = ()
    max_loop_busy: float = 0.8
    batch_delay_s: float = 0.0


class Router(Component):
    """Chooses a version for each unversioned request to a model.

    :meth:`route` runs on the request path for every request: keep it cheap and never block.
    Routers that wrap another (``header``, ``shadow``) subclass :class:`WrappingRouter`.
    """

    @abc.abstractmethod
    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        """Return the version (one of ``table.ready``) that serves this request."""

    def mirror(self, request: RouteRequest, table: RoutingTable) -> tuple[str, ...]:
        """Shadow versions this request (answered by the primary) is copied to. Default: none.

        Called after the primary answered, only when ``table.shadows`` is not empty.
        """
        return ()

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> Collection[str] | None:
        """Every version :meth:`route` may choose for a request with these headers.

        Asked before the request's body is read: while every candidate's queue is full, the
        request is answered 503 ``queue_full`` at once (``server.reject_before_body``).
        Default ``None``: any version in ``table.ready`` (a router that routes by the body,
        by the request id, or by anything else the headers do not settle).
        """
        return None

    def variant(self, version: str) -> str:
        """The name metrics give ``version`` (an A/B arm's name). Default: the version."""
        return version

    def forced(self, headers: Mapping[str, str]) -> bool:
        """Whether these headers name the version themselves (``X-Infercore-Variant``), so
        that the traffic split did not choose it. The canary guard judges a version by the
        requests the split sent it only: any client can aim forced ones (and their load, and
        their inputs) at one version. Default: ``False``."""
        return False

    @property
    def splits_traffic(self) -> bool:
        """Whether canary weights in ``table.split`` send traffic to canaries."""
        return False

    @property
    def uses_fields(self) -> bool:
        """Whether :meth:`route` reads ``request.fields`` (a V1 body is then decoded first)."""
        return False

    @property
    def key_fields(self) -> frozenset[str]:
        """Request fields that only route (sticky keys): a version whose model does not take
        one as an input is not sent it, so that sending the key is never an unknown input."""
        return frozenset()

    def named_versions(self) -> Mapping[str, str]:
        """Versions this router's config names, by config path (an A/B arm's version).

        infercore checks them against the model's versions at start-up. Default: none.
        """
        return _NO_STAGES

    def shadow_policy(self) -> ShadowPolicy | None:
        """How shadow copies run, for a router that mirrors; ``None`` otherwise."""
        return None


def describe_named(named: Mapping[str, str]) -> str:
    """``Router.named_versions()`` for a message: where they are set, then each name's version,
    e.g. ``models.m.routing.arms (control: '1', treatment: '2')``."""
    where = next(iter(named)).rpartition(".")[0] if named else ""
    listing = ", ".join(f"{path.rpartition('.')[2]}: {v!r}" for path, v in named.items())
    return f"{where} ({listing})"


class WrappingRouter(Router):
    """A router around another one, built by infercore from the ``inner`` node of its config.

    The ``Config`` of a subclass has an ``inner`` field (a router node, ``{kind: single}`` by
    default). Everything it does not override is delegated to the inner router.
    """

    inner: Router

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        return self.inner.route(request, table)

    def mirror(self, request: RouteRequest, table: RoutingTable) -> tuple[str, ...]:
        return self.inner.mirror(request, table)

    def candidates(self, headers: Mapping[str, str], table: RoutingTable) -> Collection[str] | None:
        return self.inner.candidates(headers, table)

    def variant(self, version: str) -> str:
        return self.inner.variant(version)

    def forced(self, headers: Mapping[str, str]) -> bool:
        return self.inner.forced(headers)

    @property
    def splits_traffic(self) -> bool:
        return self.inner.splits_traffic

    @property
    def uses_fields(self) -> bool:
        return self.inner.uses_fields

    @property
    def key_fields(self) -> frozenset[str]:
        return self.inner.key_fields

    def named_versions(self) -> Mapping[str, str]:
        return self.inner.named_versions()

    def shadow_policy(self) -> ShadowPolicy | None:
        return self.inner.shadow_policy()

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()
