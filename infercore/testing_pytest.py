"""The pytest plugin that ships with infercore (entry point ``pytest11: infercore``).

Installing infercore makes these fixtures available in every test session, so a plugin's own
tests need no ``conftest.py``:

``infercore_plugin_manager``
    :func:`infercore.testing.plugin_manager`: ``infercore_plugin_manager(my_plugin)`` gives a
    :class:`~infercore.testing.PluginSet` (a fresh manager with the built-ins and your plugin,
    its registry, and ``build(role, node)`` to construct a component as the runtime would).
``infercore_runtime``
    :func:`infercore.testing.runtime_from_recipe`: a built, not started, runtime from a recipe
    dict.
``infercore_app``
    :func:`infercore.testing.app_from_recipe`: the Litestar app for a recipe dict.
``infercore_client``
    A started Litestar test client for a recipe dict (or a runtime); the runtime starts in the
    app's lifespan and stops when the test ends.

Each fixture registers :class:`~infercore.testing.FakePlugin` (``kind: fake`` model and
feature source) unless given ``fakes=False``, and loads no other installed plugin unless given
``entry_points=True``. Heavy imports happen inside the fixtures, not when pytest starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.testing import TestClient

    from infercore.testing import (
        AppFactory,
        ClientFactory,
        PluginArg,
        PluginManagerFactory,
        RuntimeFactory,
    )


@pytest.fixture
def infercore_plugin_manager() -> PluginManagerFactory:
    """A factory of fresh plugin managers: ``infercore_plugin_manager(plugin, ...)``."""
    from infercore.testing import plugin_manager

    return plugin_manager


@pytest.fixture
def infercore_runtime() -> RuntimeFactory:
    """A factory of built (not started) runtimes: ``infercore_runtime(recipe, plugin, ...)``."""
    from infercore.testing import runtime_from_recipe

    return runtime_from_recipe


@pytest.fixture
def infercore_app() -> AppFactory:
    """A factory of Litestar apps: ``infercore_app(recipe, plugin, ...)``."""
    from infercore.testing import app_from_recipe

    return app_from_recipe


@pytest.fixture
def infercore_client() -> Iterator[ClientFactory]:
    """A factory of started test clients: ``infercore_client(recipe, plugin, ...)``.

    Every client it made is closed (and its runtime stopped) when the test ends.
    """
    from infercore.testing import recipe_client

    with ExitStack() as stack:

        def make(recipe: Any, *plugins: PluginArg, **options: Any) -> TestClient[Litestar]:
            return stack.enter_context(recipe_client(recipe, *plugins, **options))

        yield make
