"""A config error a component raises in ``__init__`` names the recipe, as a schema error does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from infercore.builtins.batchers import NoBatcher
from infercore.components import ComponentContext
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry
from infercore.testing import FakeModel


def _model() -> FakeModel:
    model = FakeModel(FakeModel.Config(features=4), ComponentContext("models.m.loader", Path(".")))
    asyncio.run(model.start())
    return model


@pytest.mark.parametrize("label", ["recipe=iris", ""])
def test_an_init_config_error_names_the_recipe_once(label: str) -> None:
    registry = Registry(make_plugin_manager()[0])
    context = ComponentContext("batching", Path("."), extra={"request_timeout_ms": 1000})
    node = {"kind": "dynamic", "max_queue_delay_ms": 4000}
    with pytest.raises(ConfigError) as info:
        registry.build("batcher", node, context, _model(), label=label)
    message = info.value.message
    assert message.startswith("batching.max_queue_delay_ms: 4000 is not below")
    assert message.count("recipe=iris") == (1 if label else 0)
    assert message.endswith(" (recipe=iris)") == bool(label)
    assert info.value.hint and "lower max_queue_delay_ms" in info.value.hint


class _Wraps(NoBatcher):
    """A batcher whose __init__ re-raises an inner component's error, already named."""

    kind = "wraps"

    def __init__(self, *args: Any) -> None:
        raise ConfigError("batching.inner.x: bad (recipe=iris)", hint="fix x")


class _Plugin:
    @hookimpl
    def register_batchers(self) -> list[Any]:
        return [_Wraps]


def test_an_error_already_naming_the_recipe_is_not_named_twice() -> None:
    registry = Registry(make_plugin_manager([("wraps", _Plugin())])[0])
    context = ComponentContext("batching", Path("."))
    with pytest.raises(ConfigError) as info:
        registry.build("batcher", {"kind": "wraps"}, context, _model(), label="recipe=iris")
    assert str(info.value) == "batching.inner.x: bad (recipe=iris) (hint: fix x)"
