"""ONNX external data: kept inside the model file's folder (RELIABILITY S3), read once, pinned.

An ONNX file may keep large tensors in side files named by a ``location`` inside the file,
which an attacker who controls the file can point anywhere (ONNX CVE-2024-27318). Recent
ONNX Runtime releases refuse such locations themselves; this check runs first so that older
releases are covered too and the error names the config path instead of filesystem paths.

The loader then reads each side file once, here, through descriptors opened without following
a symlink, checks the digests pinned for them, and hands ONNX Runtime those bytes: ONNX Runtime
never opens them by path, so a file swapped after the checks cannot slip in (S2).

It needs the ``onnx`` package to read the graph, which is not a dependency of this plugin:
without it nothing here runs and the loader falls back as its README says.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import io
import os
import posixpath
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from infercore.errors import ModelLoadError

_CHUNK = 1 << 20
# Bytes per element of the fixed-width types; a tensor of another type (4-bit packed, or one
# this table does not know) makes the loader read its whole file, which is always enough.
_ITEMSIZE = {
    "FLOAT": 4, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "INT32": 4, "INT64": 8,
    "BOOL": 1, "FLOAT16": 2, "DOUBLE": 8, "UINT32": 4, "UINT64": 8, "COMPLEX64": 8,
    "COMPLEX128": 16, "BFLOAT16": 2, "FLOAT8E4M3FN": 1, "FLOAT8E4M3FNUZ": 1, "FLOAT8E5M2": 1,
    "FLOAT8E5M2FNUZ": 1,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ExternalFile:
    """One external data file a model names, after its location passed the folder check.

    Attributes:
        name: Its path relative to the model file's folder, normalized (``./w.bin`` and
            ``w.bin`` are ``w.bin``): what ``sha256sum`` run in that folder prints, and the key
            of ``external_data_sha256``. Safe to show: it stays inside the folder.
        keys: The names ONNX Runtime looks it up by (its locations, without a leading ``./``).
        target: The real file relative to the folder (a symlink inside the folder resolved).
        extent: How many bytes from its start the model's tensors use; ``None``: all of it.
    """

    name: str
    keys: tuple[str, ...]
    target: PurePosixPath
    extent: int | None


def _onnx() -> Any | None:
    try:
        return importlib.import_module("onnx")
    except ImportError:
        return None


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    # Constants and control-flow subgraphs (If, Loop, Scan) carry tensors in attributes.
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _all_tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _escapes(folder: Path, location: str) -> bool:
    if not location:
        return True
    # Either flavour of absolute path, or a drive letter, is refused outright: ORT resolves
    # locations relative to the model's folder, and a file meant to be portable has no use for them.
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor:
        return True
    # resolve() follows symlinks, so a link inside the folder that points out of it escapes too.
    return not (folder / location).resolve().is_relative_to(folder)


def _ort_key(location: str) -> str:
    # ONNX Runtime drops leading "./" when it matches a location to an in-memory file, and
    # refuses two entries that differ only by it.
    while location.startswith("./"):
        location = location[2:]
    return location


def _extent(onnx: Any, tensor: Any, entries: Mapping[str, str], config_path: str) -> int | None:
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        offset = length = -1
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(
            f"{config_path}: external data of tensor {tensor.name!r} has an invalid offset or "
            "length",
            hint="the file is corrupt: rebuild or re-copy it",
        )
    if length is None:
        itemsize = _ITEMSIZE.get(onnx.TensorProto.DataType.Name(tensor.data_type))
        if itemsize is None:
            return None
        length = prod(tensor.dims) * itemsize
    return offset + length


def check_external_data(model_file: Path, *, config_path: str) -> bool:
    """Raise unless every external-data location of ``model_file`` stays inside its folder.

    Blocking: reads and parses the whole file (without its external data), so call it from a
    worker thread.

    Args:
        model_file: The resolved ONNX file.
        config_path: The loader's config path, for the message.

    Returns:
        Whether the check ran (``False`` when the ``onnx`` package is not installed).

    Raises:
        ModelLoadError: A location escapes the folder, or the file is not an ONNX model.
    """
    return external_files(model_file, config_path=config_path) is not None


def external_files(
    model_file: Path, *, config_path: str, data: bytes | None = None
) -> list[ExternalFile] | None:
    """:func:`check_external_data`, and the external data files the model names.

    Args:
        model_file: The resolved ONNX file (its folder is where external data must stay).
        config_path: The loader's config path, for the message.
        data: The file's bytes when the caller has read them already (they are parsed instead
            of the file, so the bytes checked are the bytes the caller loads).

    Returns:
        One entry per file (sorted by name; empty when every tensor is inside the model), or
        ``None`` when the ``onnx`` package is not installed (nothing was checked).

    Raises:
        ModelLoadError: A location escapes the folder, an offset or length is invalid, or the
            file is not an ONNX model.
    """
    onnx = _onnx()
    if onnx is None:
        return None
    try:
        if data is None:
            model = onnx.load_model(str(model_file), load_external_data=False)
        else:
            model = onnx.load_model_from_string(data)
    except Exception as exc:
        # protobuf's DecodeError and friends: the message may carry the path, so it is dropped.
        raise ModelLoadError(
            f"{config_path}: the artifact is not a valid ONNX model ({type(exc).__name__})",
            hint="the file is corrupt or truncated: rebuild or re-copy it",
        ) from None
    folder = model_file.parent.resolve()
    external = onnx.TensorProto.EXTERNAL
    files: dict[str, tuple[set[str], PurePosixPath, int | None]] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location != external:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        if _escapes(folder, location):
            # The location is attacker-controlled text and may be a path: it is not echoed.
            raise ModelLoadError(
                f"{config_path}: external data of tensor {tensor.name!r} points outside the "
                "model file's folder",
                hint="keep external data files next to the .onnx file, with relative locations",
            )
        extent = _extent(onnx, tensor, entries, config_path)
        name = posixpath.normpath(location)
        if name not in files:
            target = (folder / location).resolve().relative_to(folder)
            files[name] = (set(), PurePosixPath(target.as_posix()), 0)
        keys, target, known = files[name]
        keys.add(_ort_key(location))
        files[name] = (
            keys,
            target,
            None if known is None or extent is None else max(known, extent),
        )
    return [
        ExternalFile(name, tuple(sorted(keys)), target, extent)
        for name, (keys, target, extent) in sorted(files.items())
    ]


def shown(name: str) -> str:
    """A file name for a message: quoted, control characters escaped, at most 64 characters."""
    return repr(name if len(name) <= 64 else name[:63] + "…")


def unpinned(files: list[ExternalFile], pins: Mapping[str, str]) -> list[str]:
    """The names of ``files`` that ``pins`` (name -> sha256) has no digest for."""
    normalized = {posixpath.normpath(name) for name in pins}
    return [f.name for f in files if f.name not in normalized]


def read_external_files(
    model_file: Path, files: list[ExternalFile], pins: Mapping[str, str], *, config_path: str
) -> dict[str, bytearray]:
    """Read each external data file once and check the digest ``pins`` gives it, if any.

    Each file is opened from the model file's folder one path component at a time, none of
    them followed if it is a symlink, so the file read is the one whose location was checked,
    inside the folder, even if links were planted since. Only the bytes the model's tensors use
    are kept (a file may be far larger than its tensors); a pinned file is hashed whole, the
    rest of it streamed through the digest, as ``sha256sum`` hashes it.

    Blocking: call it from a worker thread.

    Args:
        model_file: The resolved ONNX file.
        files: From :func:`external_files` for the same bytes.
        pins: Expected hex SHA-256 by file name (relative to the folder); a file without one
            is not checked.
        config_path: The loader's config path, for the message.

    Returns:
        The bytes by file name.

    Raises:
        ModelLoadError: A file is missing, not a regular file, reached through a link planted
            since the check, shorter than its tensors, or fails its digest.
    """
    folder = model_file.parent.resolve()
    expected = {posixpath.normpath(name): digest for name, digest in pins.items()}
    out: dict[str, bytearray] = {}
    for file in files:
        fd = _open_inside(folder, file, config_path)
        with os.fdopen(fd, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            want = size if file.extent is None else min(size, file.extent)
            if want < (file.extent or 0):
                raise ModelLoadError(
                    f"{config_path}: external data file {shown(file.name)} is shorter than "
                    "the model's tensors in it",
                    hint="the file is truncated or not this model's: rebuild or re-copy it",
                )
            data = bytearray(want)
            view = memoryview(data)
            got = 0
            while got < want and (n := fh.readinto(view[got:])):
                got += n
            view.release()
            if got < want:
                raise ModelLoadError(
                    f"{config_path}: external data file {shown(file.name)} shrank while read",
                    hint="something is writing the model's folder: keep it read-only",
                )
            digest = expected.get(file.name)
            if digest is not None:
                _check(fh, data, digest, file.name, config_path)
        out[file.name] = data
    return out


def _check(fh: io.FileIO, head: bytearray, digest: str, name: str, config_path: str) -> None:
    sha = hashlib.sha256(head)
    while chunk := fh.read(_CHUNK):
        sha.update(chunk)
    actual = sha.hexdigest()
    if not hmac.compare_digest(actual, digest.strip().lower()):
        raise ModelLoadError(
            f"{config_path}.external_data_sha256[{shown(name)}]: sha256 mismatch (expected "
            f"{digest[:12]}…, got {actual[:12]}…); the model was not loaded",
            hint="the external data file changed since its digest was pinned: re-pin it or "
            "restore the file",
        )


def _open_inside(folder: Path, file: ExternalFile, config_path: str) -> int:
    """A read-only descriptor of the regular file ``folder/file.target``, opened one component
    at a time without following a symlink at any of them."""
    parts = file.target.parts
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    leaf = -1
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                inner = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
            if parts:
                # O_NONBLOCK: a FIFO planted there must not hang the load (refused below).
                leaf = os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=fd)
        finally:
            os.close(fd)
        if leaf >= 0 and stat.S_ISREG(os.fstat(leaf).st_mode):
            return leaf
        what = "is not a regular file"
    except OSError as exc:
        # ELOOP or ENOTDIR: a component became a symlink after the location was checked.
        what = f"cannot be opened ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})"
    if leaf >= 0:
        os.close(leaf)
    raise ModelLoadError(
        f"{config_path}: external data file {shown(file.name)} {what}",
        hint="keep external data as regular files inside the model file's folder; a symlink "
        "planted there after the location was checked is refused",
    )
