"""A plugin route on a path infercore serves is one clear PluginError, not Litestar's traceback."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import get

from infercore.errors import PluginError
from infercore.hookspecs import hookimpl
from infercore.server import create_app
from infercore.testing import fake_model_config, runtime_from_dict


def test_a_plugin_route_that_takes_a_core_path_is_a_plugin_error() -> None:
    @get("/v2/health/ready", sync_to_thread=False)
    def also_ready() -> dict[str, bool]:
        return {"ready": True}

    class Routes:
        @hookimpl
        def register_routes(self, runtime: Any) -> list[Any]:
            return [also_ready]

    runtime = runtime_from_dict(fake_model_config(), extra_plugins=[("routes", Routes())])
    with pytest.raises(PluginError) as info:
        create_app(runtime, manage_runtime=False)
    text = str(info.value)
    assert "register_routes()" in text and "'/v2/health/ready'" in text, text
    assert "a path of their own" in text and "\n" not in text
