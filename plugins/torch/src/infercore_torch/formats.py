"""Which torch format an artifact is in, and which of them need the operator's trust.

torch has no format that is both a program and free of pickle. TorchScript archives carry
code. ``torch.export.load`` (``.pt2``) documents that it "uses pickle under the hood"; in torch
2.13 a ``.pt2`` may mark weights or constants as pickled, and those are read with
``torch.load(weights_only=False)``, so a crafted file runs code. Both are therefore refused
unless the operator marks the model trusted and pins its sha256, checked against the very bytes
that are then deserialized (RELIABILITY.md S2). A state dict read with ``weights_only=True``
(or from safetensors) is data; the architecture it is loaded into is trusted input again.

This module imports neither torch nor safetensors: every check here runs in ``__init__``,
before any file is touched.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Literal

from infercore.artifacts import format_from_suffix
from infercore.errors import ConfigError

Format = Literal["export", "torchscript", "state_dict"]

#: File suffix -> format, for ``format: auto``.
FORMAT_BY_SUFFIX: dict[str, Format] = {
    ".pt2": "export",
    ".torchscript": "torchscript",
    ".ts": "torchscript",
    ".jit": "torchscript",
    ".pt": "state_dict",
    ".pth": "state_dict",
    ".bin": "state_dict",
    ".safetensors": "state_dict",
}

#: Formats whose loading can execute code carried by the file.
CODE_EXECUTING: frozenset[Format] = frozenset({"export", "torchscript"})

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def detect_format(path: str, declared: str, *, config_path: str) -> Format:
    """``declared`` unless it is ``auto``; else the format the suffix of ``path`` names.

    Raises:
        ConfigError: ``auto`` and a suffix that names no known format.
    """
    return format_from_suffix(path, declared, FORMAT_BY_SUFFIX, config_path=config_path)


def check_trust(
    what: str, *, trusted: bool, sha256: str | None, config_path: str, sha256_key: str = "sha256"
) -> None:
    """Refuse a code-executing artifact unless it is trusted and its digest is pinned.

    Args:
        what: What is being loaded, for the message (``a TorchScript archive``).
        trusted: The loader's ``trusted`` option.
        sha256: The pinned digest, or ``None``.
        config_path: The loader's config path.
        sha256_key: The option that pins this artifact's digest.

    Raises:
        ConfigError: Not trusted, or trusted without a pinned digest.
    """
    if not trusted:
        raise ConfigError(
            f"{config_path}.trusted: refusing to load {what}: loading it can run code the "
            "file contains",
            hint="if you built this file yourself, set `trusted: true` and pin "
            f"`{sha256_key}:` (the output of `sha256sum FILE`); otherwise ask for a state dict "
            "in safetensors",
        )
    if sha256 is None:
        raise ConfigError(
            f"{config_path}.{sha256_key}: a trusted artifact needs its sha256 pinned",
            hint=f"set `{sha256_key}:` to the output of `sha256sum FILE`; it is checked "
            "before any byte is deserialized",
        )


def architecture_kind(architecture: str, *, config_path: str) -> Literal["export", "import"]:
    """Whether ``architecture`` names an exported program (``.pt2``) or a ``module:Class``.

    Raises:
        ConfigError: It is neither.
    """
    if PurePath(architecture).suffix.lower() == ".pt2":
        return "export"
    if _IMPORT_PATH.match(architecture):
        return "import"
    raise ConfigError(
        f"{config_path}.architecture: {architecture!r} is neither a .pt2 file nor a "
        "'package.module:Class' import path",
        hint="name an exported program (model.pt2) whose parameters the state dict replaces, "
        "or the nn.Module class to build (needs `trusted: true`)",
    )
