"""Helpers of the torch plugin's tests (a module with its own name: every test folder has a
conftest.py, so ``from conftest import`` would find whichever was imported last)."""

from __future__ import annotations

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
