"""Refuse ONNX external data that lives outside the model file's folder (RELIABILITY S3).

An ONNX file may keep large tensors in side files named by a ``location`` inside the file,
which an attacker who controls the file can point anywhere (ONNX CVE-2024-27318). Recent
ONNX Runtime releases refuse such locations themselves; this check runs first so that older
releases are covered too and the error names the config path instead of filesystem paths.

It needs the ``onnx`` package to read the graph, which is not a dependency of this plugin:
without it the check is skipped and ONNX Runtime's own validation is all there is.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from infercore.errors import ModelLoadError


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
    return external_tensors(model_file, config_path=config_path) is not None


def external_tensors(
    model_file: Path, *, config_path: str, data: bytes | None = None
) -> int | None:
    """:func:`check_external_data`, and how many tensors keep their data outside the file.

    Args:
        model_file: The resolved ONNX file (its folder is where external data must stay).
        config_path: The loader's config path, for the message.
        data: The file's bytes when the caller has read them already (they are parsed instead
            of the file, so the bytes checked are the bytes the caller loads).

    Returns:
        The number of tensors with external data, or ``None`` when the ``onnx`` package is
        not installed (nothing was checked).

    Raises:
        ModelLoadError: A location escapes the folder, or the file is not an ONNX model.
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
    count = 0
    for tensor in _all_tensors(model):
        if tensor.data_location != external:
            continue
        count += 1
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if _escapes(folder, location):
            # The location is attacker-controlled text and may be a path: it is not echoed.
            raise ModelLoadError(
                f"{config_path}: external data of tensor {tensor.name!r} points outside the "
                "model file's folder",
                hint="keep external data files next to the .onnx file, with relative locations",
            )
    return count
