"""Which format a model artifact is in, and how each format is read under the trust rules.

pickle and joblib run arbitrary code while loading, so they are refused unless the operator
marks the model trusted and pins its sha256; the digest is checked against the very bytes that
are then deserialized, before any of them is (RELIABILITY.md S2). skops loads only the types
it trusts by default plus the ones the operator lists.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Literal

from infercore.artifacts import format_from_suffix
from infercore.errors import ConfigError, ModelLoadError

Format = Literal["skops", "pickle", "joblib"]

#: File suffix -> format, for ``format: auto``.
FORMAT_BY_SUFFIX: dict[str, Format] = {
    ".skops": "skops",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "joblib",
}

#: Formats whose loading can execute code embedded in the file.
CODE_EXECUTING: frozenset[Format] = frozenset({"pickle", "joblib"})


def detect_format(path: str, declared: str, *, config_path: str) -> Format:
    """``declared`` unless it is ``auto``; else the format the suffix of ``path`` names.

    Raises:
        ConfigError: ``auto`` and a suffix that names no known format.
    """
    return format_from_suffix(path, declared, FORMAT_BY_SUFFIX, config_path=config_path)


def check_trust(fmt: Format, *, trusted: bool, sha256: str | None, config_path: str) -> None:
    """Refuse a code-executing format unless it is marked trusted and its digest is pinned.

    Raises:
        ConfigError: ``fmt`` is pickle or joblib without ``trusted: true`` and ``sha256``.
    """
    if fmt not in CODE_EXECUTING:
        return
    if not trusted:
        raise ConfigError(
            f"{config_path}.trusted: refusing to load a {fmt} artifact: loading {fmt} runs "
            "any code the file contains",
            hint="export the model with skops instead; if you built this file yourself, set "
            "`trusted: true` and pin `sha256:` (the output of `sha256sum FILE`)",
        )
    if sha256 is None:
        raise ConfigError(
            f"{config_path}.sha256: a trusted {fmt} artifact needs its sha256 pinned",
            hint="set `sha256:` to the output of `sha256sum FILE`; it is checked before any "
            "byte is deserialized",
        )


def deserialize(data: bytes, fmt: Format, *, trusted_types: list[str], config_path: str) -> Any:
    """Turn verified bytes into the estimator; call only after :func:`check_trust`.

    Raises:
        ModelLoadError: A skops file holds types neither skops nor ``trusted_types`` trust.
        Exception: Whatever the format's reader raises on a corrupt file.
    """
    if fmt == "skops":
        import skops.io as sio

        untrusted = sio.get_untrusted_types(data=data)
        missing = sorted(set(untrusted) - set(trusted_types))
        if missing:
            raise ModelLoadError(
                f"{config_path}.trusted_types: the skops artifact contains types that are not "
                f"trusted: {', '.join(missing)}",
                hint="review what these types do; if you trust them, add them to `trusted_types`",
            )
        return sio.load(io.BytesIO(data), trusted=list(trusted_types))
    if fmt == "joblib":
        import joblib

        return joblib.load(io.BytesIO(data))
    # Only reached for an artifact the operator trusted and whose digest matched.
    return pickle.loads(data)
