"""Safe access to model artifacts: paths stay inside the model root, digests are checked.

Loaders call these before reading a byte of an artifact (RELIABILITY.md S2, S3).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from infercore.errors import ConfigError, ModelLoadError

_CHUNK = 1 << 20


def resolve_artifact(model_root: Path, path: str, *, config_path: str) -> Path:
    """Resolve ``path`` (relative to ``model_root``, or absolute) and check it stays inside.

    Symlinks are followed before the check, so a link pointing out of the root is refused,
    as is any ``..`` that climbs out of it.

    Args:
        model_root: The folder artifacts must live in.
        path: The path from the config.
        config_path: The config key holding ``path``, for the message.

    Raises:
        ConfigError: The path escapes the model root.
        ModelLoadError: The file does not exist.
    """
    root = model_root.resolve()
    raw = Path(path)
    candidate = raw if raw.is_absolute() else root / raw
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(
            f"{config_path}: {path!r} resolves outside the model root",
            hint="artifacts must live inside model_root; symlinks and '..' out of it are refused",
        )
    if not resolved.exists():
        raise ModelLoadError(
            f"{config_path}: artifact {path!r} not found under the model root",
            hint="build it (see the recipe's README) or fix the path",
        )
    return resolved


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, *, config_path: str) -> None:
    """Raise :class:`ModelLoadError` unless the file's SHA-256 equals ``expected``.

    Compared in constant time; the message never shows the file's path.
    """
    actual = sha256_file(path)
    if not hmac.compare_digest(actual, expected.strip().lower()):
        raise ModelLoadError(
            f"{config_path}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…)",
            hint="the artifact changed since its digest was pinned: re-pin it or restore the file",
        )
