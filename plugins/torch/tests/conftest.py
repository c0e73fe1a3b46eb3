"""Real torch models built at fixture time (tiny, deterministic, nothing downloaded)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("torch-models")
    module, other = mlp(0), mlp(1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (torch.randn(4, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, root / "mlp.pt2")
    torch.jit.save(torch.jit.script(module), root / "mlp.torchscript")
    torch.save(other.state_dict(), root / "other.pt")
    # A bare nn.Linear for the module:Class architecture.
    torch.manual_seed(2)
    linear = torch.nn.Linear(4, 3)
    torch.save(linear.state_dict(), root / "linear.pt")
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        save_file(other.state_dict(), str(root / "other.safetensors"))
    return Artifacts(root, module, other)
