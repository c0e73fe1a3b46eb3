"""Versions found in a model's repository folder (``models.<m>.repository``).

The admin API never takes a path: a version is named, and its folder is derived from the
recipe (``<model_root>/<folder>/<version_folder>``). The folder must resolve inside the model
root (a symlink out of it, or ``..``, is refused) and the artifact's digest must be pinned in
the folder's manifest, so a file dropped into the folder cannot be loaded unless an operator
pinned it (RELIABILITY.md S3, S4).

The manifest pins recipe versions too: a recipe version whose artifact lies inside the folder
and is listed in the manifest is checked against that digest whenever it loads (start-up and
every reload), so a reload never reads a swapped file the manifest does not vouch for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from infercore.config.rollout import RepositoryConfig
from infercore.config.schema import VERSION_RE
from infercore.errors import InfercoreError, InvalidInput, ModelNotFound
from infercore.runtime.errors import quoted

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class UnsafePath(InfercoreError):
    """A repository folder or artifact that resolves outside the model root."""

    status_code = 400
    reason = "invalid_input"


class UnpinnedArtifact(InvalidInput):
    """A repository version whose artifact the folder's manifest pins no digest for."""


#: What the repository refuses to load of a version whose folder it found: a folder or
#: manifest out of the model root, an artifact nobody pinned. A failed load attempt of a real
#: version (``infercore_model_load_failures_total``), unlike a malformed request or a version
#: that has no folder.
REFUSED_LOADS: tuple[type[InfercoreError], ...] = (UnsafePath, UnpinnedArtifact)


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise UnsafePath(
            "the version's folder resolves outside the model root",
            hint="symlinks and '..' out of model_root are refused",
        )
    return resolved


def _folder_pattern(template: str) -> re.Pattern[str]:
    before, sep, after = template.partition("{version}")
    if not sep:
        return re.compile(re.escape(template))
    version = r"(?P<version>[A-Za-z0-9][A-Za-z0-9_\-.]{0,31})"
    return re.compile(re.escape(before) + version + re.escape(after))


def check_template(config: RepositoryConfig, *, path: str) -> None:
    """Refuse a folder layout that could escape its folder whatever the version.

    Raises:
        InvalidInput: ``version_folder`` lacks ``{version}`` or climbs with ``..``.
    """
    from infercore.errors import ConfigError

    if "{version}" not in config.version_folder:
        raise ConfigError(f"{path}.version_folder: must contain {{version}}")
    for text, key in (
        (config.version_folder, "version_folder"),
        (config.folder, "folder"),
        (str(config.loader.get("path", "")), "loader.path"),
    ):
        if ".." in PurePosixPath(text).parts:
            raise ConfigError(f"{path}.{key}: '..' is not allowed")


#: A loader option the runtime fills with the manifest's pins of the files beside a pinned
#: artifact, when the loader's ``Config`` declares it (``dict[str, str]``): a model read from
#: several files (ONNX external data) checks each of them, not only the file the path names.
COMPANIONS_OPTION = "external_data_sha256"


def companion_digests(digests: dict[str, str], key: str) -> dict[str, str]:
    """The manifest's pins of the files in the folder of the artifact pinned as ``key`` and
    below it, keyed relative to that folder (as ``sha256sum`` run there prints them)."""
    folder = PurePosixPath(key).parent
    out: dict[str, str] = {}
    for name, digest in digests.items():
        path = PurePosixPath(name)
        if name != key and (folder == PurePosixPath(".") or path.is_relative_to(folder)):
            out[str(path.relative_to(folder))] = digest
    return out


def read_manifest(path: Path) -> dict[str, str]:
    """``sha256sum``-format lines (``<hex>  <relative path>``) as path -> digest."""
    digests: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or not _HEX64.match(parts[0]):
            continue
        name = parts[1].lstrip("*").strip()
        digests[str(PurePosixPath(name))] = parts[0].lower()
    return digests


class Repository:
    """One model's repository folder."""

    def __init__(self, config: RepositoryConfig, model_root: Path, *, model: str) -> None:
        self.config = config
        self.root = model_root.resolve()
        self.model = model
        self._pattern = _folder_pattern(config.version_folder)

    @property
    def base(self) -> Path:
        return self.root / self.config.folder

    def versions(self) -> list[str]:
        """Version names with a folder inside the model root (unsafe ones are skipped)."""
        base = self.base
        try:
            _inside(self.root, base)
            entries = sorted(base.iterdir())
        except (OSError, UnsafePath):
            return []
        found: list[str] = []
        for entry in entries:
            match = self._pattern.fullmatch(entry.name)
            if match is None or not VERSION_RE.fullmatch(match.group("version")):
                continue
            try:
                if _inside(self.root, entry).is_dir():
                    found.append(match.group("version"))
            except (OSError, UnsafePath):
                continue
        return found

    def loader_node(self, version: str) -> dict[str, Any]:
        """The loader node of ``version``: its artifact path and the digest the manifest pins.

        Raises:
            InvalidInput: An invalid version name.
            UnpinnedArtifact: No pinned digest for the artifact.
            UnsafePath: The version's folder, the artifact or the manifest resolves outside the
                model root.
            ModelNotFound: No folder for this version.
        """
        if not VERSION_RE.fullmatch(version):
            raise InvalidInput(
                f"invalid version {quoted(version)}",
                hint="use letters, digits, '_', '-' and '.' (at most 32)",
            )
        cfg = self.config
        folder_rel = cfg.version_folder.format(version=version)
        folder = self.root / cfg.folder / folder_rel
        resolved = _inside(self.root, folder) if folder.exists() or folder.is_symlink() else None
        if resolved is None or not resolved.is_dir():
            raise ModelNotFound(
                f"model {self.model!r} has no version {version!r} in the recipe or its "
                "repository folder"
            )
        artifact_rel = str(cfg.loader.get("path", ""))
        artifact = folder / artifact_rel
        if artifact.exists() or artifact.is_symlink():
            _inside(self.root, artifact)
        digest = self.digests().get(str(PurePosixPath(folder_rel) / artifact_rel))
        if digest is None:
            raise UnpinnedArtifact(
                f"model {self.model!r} version {version!r}: no digest pinned for its artifact "
                f"in the repository manifest ({cfg.manifest})",
                hint="add the artifact's sha256 to the manifest, then load it",
            )
        node = dict(cfg.loader)
        node["path"] = str(PurePosixPath(cfg.folder) / folder_rel / artifact_rel)
        node["sha256"] = digest
        return node

    def digests(self) -> dict[str, str]:
        """The manifest's pins (path relative to the folder -> digest); none without one.

        Raises:
            UnsafePath: The manifest resolves outside the model root.
            OSError: The manifest exists but cannot be read.
        """
        manifest = self.base / self.config.manifest
        if not manifest.is_file():
            return {}
        _inside(self.root, manifest)
        return read_manifest(manifest)

    def manifest_key(self, path: str) -> str | None:
        """The manifest key of an artifact ``path`` (as a recipe loader gives it: relative to
        the model root, or absolute), or ``None`` when the artifact is not inside the folder.

        Lexical first, so that the key is the name the recipe uses (a link inside the folder
        is pinned under its own name, as ``sha256sum`` lists it); then resolved, for a path
        that reaches the folder through a link above it.
        """
        raw = Path(path)
        full = raw if raw.is_absolute() else self.root / raw
        lexical, base = Path(os.path.normpath(full)), Path(os.path.normpath(self.base))
        if lexical != base and lexical.is_relative_to(base):
            return lexical.relative_to(base).as_posix()
        try:
            resolved, base = full.resolve(), self.base.resolve()
        except (OSError, RuntimeError):  # a link loop: the loader refuses the path itself
            return None
        if resolved != base and resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
        return None
