"""The ``single`` router: every unversioned request goes to the primary version."""

from __future__ import annotations

from infercore.components import Router, RouteRequest, RoutingTable
from infercore.hookspecs import hookimpl


class SingleRouter(Router):
    """Routes every request to ``table.primary``."""

    kind = "single"

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        return table.primary


@hookimpl
def register_routers() -> list[type[Router]]:
    return [SingleRouter]
