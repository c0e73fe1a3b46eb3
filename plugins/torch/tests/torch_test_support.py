"""Helpers of the torch plugin's tests (a module with its own name: every test folder has a
conftest.py, so ``from conftest import`` would find whichever was imported last)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_PATH = "models.m.versions.1.loader"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mlp(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


@dataclass
class Artifacts:
    root: Path
    module: Any  # the module the .pt2 / TorchScript files were made from
    other: Any  # same architecture, other weights: the state dicts hold these

    def digest(self, name: str) -> str:
        return sha256(self.root / name)

    def mlp_architecture(self) -> dict[str, Any]:
        """Loader options that give a state dict the trusted, pinned ``mlp.pt2`` to fill."""
        return {
            "architecture": "mlp.pt2",
            "architecture_sha256": self.digest("mlp.pt2"),
            "trusted": True,
        }


def loader(root: Path, name: str, **options: Any) -> dict[str, Any]:
    """Loader options for the trusted, pinned exported program ``root / name``, on the CPU."""
    return {
        "path": name,
        "trusted": True,
        "sha256": sha256(root / name),
        "device": "cpu",
        **options,
    }


def started(root: Path, name: str, **options: Any) -> Any:
    """A started :class:`~infercore_torch.TorchModel` of ``root / name`` (not warmed)."""
    import msgspec

    from infercore.components import ComponentContext
    from infercore_torch import TorchModel

    config = msgspec.convert(loader(root, name, **options), TorchModel.Config)
    model = TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=root))
    asyncio.run(model.start())
    return model


def scripted(root: Path, module: Any, name: str) -> Any:
    """A started :class:`~infercore_torch.TorchModel` of ``module`` saved as TorchScript
    ``root / name``, declared ``x`` FP32 ``[-1, 2]`` in and ``y`` FP32 ``[-1, 2]`` out."""
    import torch

    torch.jit.save(torch.jit.script(module), root / name)
    return started(
        root,
        name,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    )


class Recorder:
    """Stands in for the loaded module and records the rows of each call."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.rows: list[int] = []

    def __call__(self, *tensors: Any) -> Any:
        self.rows.append(int(tensors[0].shape[0]))
        return self.module(*tensors)


def recorded(model: Any) -> Recorder:
    """Put a :class:`Recorder` in front of a started model's module."""
    recorder = Recorder(model._module)
    model._module = recorder
    return recorder
