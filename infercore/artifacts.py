"""Safe access to model artifacts: paths stay inside the model root, digests are checked.

Loaders call these before reading a byte of an artifact (RELIABILITY.md S2, S3).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import TypeVar

from infercore.errors import ConfigError, ModelLoadError

_CHUNK = 1 << 20

F = TypeVar("F", bound=str)


def display_name(path: str) -> str:
    """The file name of a configured path: enough to recognise it, never an absolute path."""
    return PurePath(path).name or path


def format_from_suffix(
    path: str, declared: str, by_suffix: Mapping[str, F], *, config_path: str
) -> F:
    """The artifact format: ``declared`` when it names one of ``by_suffix``'s formats (a
    loader's ``format:`` option), else the one the suffix of ``path`` names (``auto``).

    Raises:
        ConfigError: The format is ``auto`` and the suffix names no known format.
    """
    names = list(dict.fromkeys(by_suffix.values()))
    for name in names:
        if declared == name:
            return name
    suffix = PurePath(path).suffix.lower()
    fmt = by_suffix.get(suffix)
    if fmt is None:
        known = ", ".join(sorted(by_suffix))
        choices = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise ConfigError(
            f"{config_path}.path: cannot tell the format of {display_name(path)!r} from its "
            f"suffix {suffix or '(none)'!r}; known suffixes: {known}",
            hint=f"rename the file or set `format:` to {choices}",
        )
    return fmt


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


def read_verified(path: Path, sha256: str | None, *, config_path: str) -> bytes:
    """Read an artifact once and check its digest, so the bytes checked are the bytes loaded.

    Prefer this to :func:`verify_sha256` when the loader can deserialize from bytes: a file
    swapped between the check and the load cannot slip through.

    Args:
        path: A path from :func:`resolve_artifact`.
        sha256: The pinned hex digest, or ``None`` for no check.
        config_path: The config key of the artifact, for the message.

    Raises:
        ModelLoadError: The digest differs from ``sha256``; nothing was deserialized.
    """
    data = path.read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(actual, sha256.strip().lower()):
            raise ModelLoadError(
                f"{config_path}.sha256: mismatch (expected {sha256[:12]}…, got {actual[:12]}…); "
                "the artifact was not deserialized",
                hint="the artifact changed since its digest was pinned: re-pin it or restore "
                "the file",
            )
    return data


def verify_sha256(path: Path, expected: str, *, config_path: str) -> None:
    """Raise :class:`ModelLoadError` unless the file's SHA-256 equals ``expected``.

    Compared in constant time; the message never shows the file's path.
    """
    _check_digest(sha256_file(path), expected, config_path)


def verify_sha256_bytes(data: bytes, expected: str, *, config_path: str) -> None:
    """:func:`verify_sha256` for an artifact already read: a loader that then deserializes
    ``data`` loads exactly the bytes checked, even if the file is swapped meanwhile."""
    _check_digest(hashlib.sha256(data).hexdigest(), expected, config_path)


def _check_digest(actual: str, expected: str, config_path: str) -> None:
    if not hmac.compare_digest(actual, expected.strip().lower()):
        raise ModelLoadError(
            f"{config_path}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…)",
            hint="the artifact changed since its digest was pinned: re-pin it or restore the file",
        )
