"""Real torch models built at fixture time (tiny, deterministic, nothing downloaded)."""

from __future__ import annotations

import pytest
from torch_test_support import Artifacts, mlp


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
