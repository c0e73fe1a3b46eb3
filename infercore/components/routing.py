"""The router interface: picks the model version that serves a request."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

from infercore.components.base import Component


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """The versions of one model a router may choose from.

    Attributes:
        primary: The version that serves by default.
        ready: Every version that is loaded, warmed and may take traffic.
    """

    primary: str
    ready: frozenset[str]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a router may look at: the request's headers (lower-case names) and its id."""

    headers: Mapping[str, str]
    request_id: str


class Router(Component):
    """Chooses a version for each unversioned request to a model.

    :meth:`route` runs on the request path for every request: keep it cheap and never block.
    """

    @abc.abstractmethod
    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        """Return the version (one of ``table.ready``) that serves this request."""
