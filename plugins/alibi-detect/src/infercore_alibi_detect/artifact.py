"""Saved alibi-detect detectors: digests, trust rules and loading from a private copy.

alibi-detect saves a detector as a folder (``save_detector``): a ``config.toml``, the
reference data as ``.npy`` files and, for anything it cannot express in the config (a custom
``preprocess_fn``, a kernel, a model, the legacy ``meta.dill`` format), **dill or pickle files
or framework model files, which run code when loaded**. So (RELIABILITY.md S2, S8):

1. The folder must resolve inside the model root and may not contain symlinks.
2. It is read once, into memory; its *tree digest* (below) is computed on those bytes.
3. A folder with any file other than ``config.toml``, ``.toml``, ``.json``, ``.txt`` and
   ``.npy`` files holding plain (non-object) arrays has code-executing parts: it is refused
   unless the detector config says ``trusted: true`` **and** pins ``sha256`` (the config is
   refused earlier if ``trusted`` comes without ``sha256``).
4. When ``sha256`` is given it must equal the tree digest, whatever the contents.
5. Every file path inside ``config.toml`` must stay inside the folder.
6. Only then are the checked bytes written to a private temporary folder, and
   ``alibi_detect.saving.load_detector`` reads that copy with ``enable_unsafe_loading=False``
   (``.npy`` files are loaded without pickle). A file swapped in the model root after the
   check cannot reach the loader.

The **tree digest** is the SHA-256 of the lines ``<sha256 of file>  <relative path>\\n``
(POSIX separators), sorted by path: what ``sha256sum`` prints for each file. Compute it with
``python -m infercore_alibi_detect digest FOLDER``; :func:`save` returns it too.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from infercore.errors import ConfigError, ModelLoadError

#: Suffixes of files that load without running code (``.npy`` only without object arrays).
SAFE_SUFFIXES = frozenset({".toml", ".json", ".txt", ".npy"})
#: Suffixes a string in ``config.toml`` is taken to be a file path by.
_PATH_SUFFIXES = (
    ".npy",
    ".dill",
    ".pkl",
    ".pickle",
    ".pt",
    ".pth",
    ".h5",
    ".keras",
    ".json",
    ".toml",
    ".bin",
    ".safetensors",
    ".onnx",
    ".joblib",
)


def read_tree(folder: Path, *, config_path: str) -> dict[str, bytes]:
    """Every regular file under ``folder`` by POSIX relative path, read once.

    Raises:
        ModelLoadError: The folder has a symlink, or something that is not a file or folder,
            or is not a folder at all.
    """
    if not folder.is_dir():
        raise ModelLoadError(
            f"{config_path}: {folder.name!r} is not a folder saved by alibi-detect",
            hint="point load_path at the folder save_detector wrote",
        )
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if (base / name).is_symlink():
                raise ModelLoadError(
                    f"{config_path}: the detector folder contains a symlink "
                    f"({(base / name).relative_to(folder).as_posix()!r}); refused"
                )
        for name in filenames:
            path = base / name
            if not path.is_file():
                raise ModelLoadError(
                    f"{config_path}: {path.relative_to(folder).as_posix()!r} is not a regular file"
                )
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def tree_digest(files: Mapping[str, bytes]) -> str:
    """The tree digest of files by relative path (see the module docs)."""
    lines = "".join(f"{hashlib.sha256(files[rel]).hexdigest()}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """The tree digest of a folder on disk."""
    return tree_digest(read_tree(folder, config_path=str(folder.name)))


def _npy_has_objects(data: bytes) -> bool:
    try:
        fh = io.BytesIO(data)
        fmt: Any = np.lib.format  # untyped in numpy's stubs
        version = fmt.read_magic(fh)
        if version == (1, 0):
            _, _, dtype = fmt.read_array_header_1_0(fh)
        else:
            _, _, dtype = fmt.read_array_header_2_0(fh)
        return bool(dtype.hasobject)
    except Exception:
        return True  # unreadable: treat as unsafe


def code_parts(files: Mapping[str, bytes]) -> list[str]:
    """Files that can run code when alibi-detect loads them (dill, pickle, model files,
    object ``.npy`` arrays, anything unknown)."""
    out = []
    for rel, data in files.items():
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix not in SAFE_SUFFIXES or (suffix == ".npy" and _npy_has_objects(data)):
            out.append(rel)
    return sorted(out)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def check_config_paths(
    config: Mapping[str, Any], files: Mapping[str, bytes], *, config_path: str
) -> None:
    """Every path-like string in ``config.toml`` names a file or folder inside the artifact.

    Raises:
        ModelLoadError: An absolute path, ``..``, or a path to nothing in the folder.
    """
    folders = {str(PurePosixPath(rel).parent) for rel in files}
    for text in _strings(config):
        if text.startswith("@"):
            continue  # a function from alibi-detect's registry, not a file
        looks_like_path = (
            "/" in text or "\\" in text or text.lower().endswith(_PATH_SUFFIXES) or text == ".."
        )
        if not looks_like_path:
            continue
        pure = PurePosixPath(text.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or text.startswith("~"):
            raise ModelLoadError(
                f"{config_path}: config.toml refers to a file outside the detector folder "
                f"({text!r}); refused"
            )
        rel = pure.as_posix()
        if rel not in files and rel not in folders:
            raise ModelLoadError(
                f"{config_path}: config.toml refers to {text!r}, which is not in the folder"
            )


def load_checked(folder: Path, *, sha256: str | None, trusted: bool, config_path: str) -> Any:
    """Load a saved alibi-detect detector under the trust rules of the module docs.

    Args:
        folder: From :func:`infercore.artifacts.resolve_artifact` (inside the model root).
        sha256: The pinned tree digest, or ``None``.
        trusted: The operator vouches for code-executing parts (only with ``sha256``).
        config_path: The config key of ``load_path``, for messages.

    Raises:
        ConfigError: ``trusted`` without ``sha256``.
        ModelLoadError: Symlinks, digest mismatch, code-executing parts without trust, paths
            out of the folder, or alibi-detect failing to load; nothing was deserialized
            from a refused folder.
    """
    if trusted and sha256 is None:
        raise ConfigError(
            f"{config_path}: trusted: true needs a pinned sha256",
            hint="python -m infercore_alibi_detect digest <folder>",
        )
    files = read_tree(folder, config_path=config_path)
    if sha256 is not None:
        actual = tree_digest(files)
        if not hmac.compare_digest(actual, sha256.strip().lower()):
            raise ModelLoadError(
                f"{config_path}: sha256 mismatch (expected {sha256[:12]}…, got {actual[:12]}…); "
                "the detector was not loaded",
                hint="the folder changed since its digest was pinned: re-pin it or restore it",
            )
    unsafe = code_parts(files)
    if unsafe and not trusted:
        raise ModelLoadError(
            f"{config_path}: the saved detector has parts that run code when loaded "
            f"({', '.join(unsafe[:5])}{' …' if len(unsafe) > 5 else ''}); refused",
            hint="dill/pickle and model files execute code: only for a folder you built "
            "yourself, set trusted: true and pin its sha256",
        )
    if "config.toml" in files:
        try:
            config = tomllib.loads(files["config.toml"].decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ModelLoadError(f"{config_path}: config.toml is not valid TOML: {exc}") from None
        check_config_paths(config, files, config_path=config_path)
    elif not trusted:  # legacy meta.dill / meta.pickle formats are caught by code_parts
        raise ModelLoadError(
            f"{config_path}: no config.toml in the detector folder",
            hint="save the detector with alibi_detect.saving.save_detector",
        )
    from alibi_detect.saving import load_detector

    with tempfile.TemporaryDirectory(prefix="infercore-alibi-") as tmp:
        copy = Path(tmp) / "detector"
        for rel, data in files.items():
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            if "config.toml" in files:
                return load_detector(copy / "config.toml", enable_unsafe_loading=False)
            return load_detector(copy)
        except Exception as exc:
            message = str(exc).replace(str(copy), "<detector>").splitlines()
            raise ModelLoadError(
                f"{config_path}: alibi-detect could not load the detector: "
                f"{type(exc).__name__}: {(message[0] if message else '')[:200]}"
            ) from None
        finally:
            shutil.rmtree(copy, ignore_errors=True)


def save(detector: Any, folder: str | os.PathLike[str]) -> str:
    """Save a fitted alibi-detect detector in its config format and return the tree digest
    to pin as ``sha256``."""
    from alibi_detect.saving import save_detector

    save_detector(detector, folder)
    return folder_digest(Path(folder))
