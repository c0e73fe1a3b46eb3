"""``device: auto | cpu | cuda | cuda:N`` to a ``torch.device``."""

from __future__ import annotations

import logging
from typing import Any

from infercore.errors import ModelLoadError

log = logging.getLogger("infercore.torch")

#: The pattern the config accepts.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def select_device(torch: Any, requested: str, *, config_path: str) -> Any:
    """The device to run on. ``auto`` is CUDA when available, else CPU with one INFO line.

    Raises:
        ModelLoadError: ``cuda`` / ``cuda:N`` requested and not available.
    """
    if requested == "cpu":
        return torch.device("cpu")
    available = bool(torch.cuda.is_available())
    if requested == "auto":
        if available:
            return torch.device("cuda")
        log.info("%s: device=auto: no CUDA device; running on the CPU", config_path)
        return torch.device("cpu")
    # CUDA-specific: only reached on a machine with a GPU (or to fail without one).
    device = torch.device(requested)
    if not available:
        raise ModelLoadError(
            f"{config_path}.device: {requested!r} requested, but torch sees no CUDA device",
            hint="install a CUDA build of torch on a machine with an NVIDIA GPU, or set "
            "device: auto / cpu",
        )
    count = int(torch.cuda.device_count())
    if device.index is not None and device.index >= count:
        raise ModelLoadError(
            f"{config_path}.device: {requested!r} requested, but there are {count} CUDA devices",
            hint=f"use cuda:0 … cuda:{count - 1}",
        )
    return device
