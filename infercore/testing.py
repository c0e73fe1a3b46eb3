"""Helpers for testing infercore and its plugins without files or servers.

``FakeModel`` (kind ``fake``) computes a known function of its input with knobs for latency
and failures; :func:`runtime_from_dict` builds a runtime from a plain config dict;
:func:`app_client` gives a Litestar test client with the runtime started.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from infercore.components import Model, Tensors, TensorSpec
from infercore.config.compose import Composed
from infercore.config.schema import InfercoreConfig
from infercore.config.validation import convert
from infercore.errors import ModelLoadError
from infercore.hookspecs import hookimpl


class FakeModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Width of the FP32 input ``x`` ([-1, features]).
    features: Annotated[int, msgspec.Meta(ge=1)] = 4
    #: Seconds each predict call sleeps (in a worker thread, like a real runtime).
    latency_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Raise when any input row's first value equals this (a "poisoned" request).
    fail_on_value: float | None = None
    #: Fail to load (start() raises).
    fail_load: bool = False
    #: Fail the warm-up call.
    fail_warmup: bool = False
    #: Return a malformed output (wrong row count).
    malformed: bool = False
    #: Value added to the sum, to tell versions apart.
    offset: float = 0.0


class FakeModel(Model):
    """``y = sum(x, axis=1) + offset`` (FP32 ``[-1]``), and ``x`` echoed back as ``echo``.

    Counts calls and rows so tests can check batching (``calls``, ``rows``, ``batches``).
    """

    kind = "fake"
    platform = "fake"
    Config = FakeModelConfig
    config: FakeModelConfig

    def __init__(self, config: FakeModelConfig, context: Any) -> None:
        super().__init__(config, context)
        self.calls = 0
        self.batches: list[int] = []
        self._lock = threading.Lock()
        self._warming = False

    async def start(self) -> None:
        if self.config.fail_load:
            raise ModelLoadError(f"{self.context.path}: fake load failure")
        n = self.config.features
        self.inputs = [TensorSpec("x", "FP32", (-1, n))]
        self.outputs = [TensorSpec("y", "FP32", (-1,)), TensorSpec("echo", "FP32", (-1, n))]

    async def warmup(self) -> None:
        if self.config.fail_warmup:
            raise ModelLoadError(f"{self.context.path}: fake warm-up failure")
        self._warming = True
        try:
            await super().warmup()
        finally:
            self._warming = False

    def _run(self, x: np.ndarray) -> Tensors:
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        if self.config.fail_on_value is not None and np.any(x[:, 0] == self.config.fail_on_value):
            raise ValueError("poisoned row")
        y = x.sum(axis=1, dtype=np.float32) + np.float32(self.config.offset)
        if self.config.malformed:
            y = y[:-1] if len(y) else np.zeros(1, np.float32)
        return {"y": y, "echo": x.copy()}

    async def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        if not self._warming:
            with self._lock:
                self.calls += 1
                self.batches.append(int(x.shape[0]))
        return await asyncio.to_thread(self._run, x)


class FakePlugin:
    """A plugin object registering :class:`FakeModel`; pass to ``extra_plugins``."""

    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [FakeModel]


def composed_from_dict(
    data: dict[str, Any], *, recipes_dir: Path | None = None, choices: dict[str, str] | None = None
) -> Composed:
    """A :class:`Composed` from a plain dict, validated like a composed Hydra config."""
    config = convert(data, InfercoreConfig, path="")
    return Composed(config, data, choices or {}, [], (recipes_dir or Path.cwd()).resolve())


def fake_model_config(**options: Any) -> dict[str, Any]:
    """A one-model config serving a ``fake`` model named ``m`` (version ``1``)."""
    batching = options.pop("batching", {"kind": "none"})
    server = options.pop("server", {})
    versions = options.pop("versions", None) or {"1": {"loader": {"kind": "fake", **options}}}
    return {
        "server": server,
        "batching": batching,
        "models": {"m": {"versions": versions}},
    }


def runtime_from_dict(
    data: dict[str, Any],
    *,
    extra_plugins: list[tuple[str, object]] | None = None,
    recipes_dir: Path | None = None,
) -> Any:
    """A built (not started) runtime, with :class:`FakePlugin` registered."""
    from infercore.runtime import Runtime

    plugins = [("fake", FakePlugin()), *(extra_plugins or [])]
    return Runtime(composed_from_dict(data, recipes_dir=recipes_dir), extra_plugins=plugins)


@contextmanager
def app_client(runtime: Any) -> Iterator[Any]:
    """A Litestar ``TestClient`` whose lifespan starts and stops ``runtime``."""
    from litestar.testing import TestClient

    from infercore.server import create_app

    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        yield client
