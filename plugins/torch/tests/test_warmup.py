"""The torch model's warm-up: its own sample shapes, the base warm-up's checks and message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from infercore.errors import ModelLoadError

torch = pytest.importorskip("torch")
from torch_test_support import CONFIG_PATH, scripted  # noqa: E402

from infercore_torch import TorchModel  # noqa: E402


class RefusesZeros(torch.nn.Module):  # type: ignore[misc]
    """Raises on an all-zero input: a model whose warm-up row is no valid input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 0).all()):
            raise ValueError("all zeros")
        return x * 2


def model(root: Path) -> TorchModel:
    built: TorchModel = scripted(root, RefusesZeros(), "zeros.ts")
    return built


def test_a_warm_up_that_raises_says_it_was_the_warm_up(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(model(tmp_path).warmup())
    assert info.value.message.startswith(f"{CONFIG_PATH}: warm-up failed: "), info.value.message


def test_the_warm_up_runs_the_models_own_sample(tmp_path: Path) -> None:
    built = model(tmp_path)
    batch = built.warmup_inputs()
    assert set(batch) == {"x"} and batch["x"].shape == (1, 2)
