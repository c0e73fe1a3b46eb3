"""A structural check of LightGBM's text model format, run before LightGBM parses the text.

LightGBM's C++ parser trusts the text it is given: it jumps to the byte offsets listed in
``tree_sizes=`` without checking them against the length, scans for ``=`` and line ends past the
end of a cut-off line, and reports a bad tree with ``Log::Fatal`` from inside an OpenMP loop,
which calls ``std::terminate``. A truncated or corrupted file therefore aborts or crashes the
whole process (SIGABRT, SIGSEGV), taking every other model with it, instead of raising. This
module checks, in Python and without LightGBM, everything that parser relies on:

- the header: ``tree`` first, integer ``num_class``, ``num_tree_per_iteration`` and
  ``max_feature_idx``;
- the trees: with ``tree_sizes=`` (every LightGBM since v3), each size must lead exactly to a
  ``Tree=`` block; without it (older files), the blocks are found by their ``Tree=`` lines;
- each tree: ``key=value`` lines ending with a blank line, array lengths that match
  ``num_leaves`` / ``num_cat``, numbers that parse, child indices that form one tree, feature
  indices inside ``max_feature_idx`` (so that prediction cannot read out of bounds or loop);
- the ``end of trees`` trailer after the last tree (and ``end of parameters`` when a
  ``parameters:`` section starts).

It is deliberately no stricter than that: any model LightGBM writes (binary, multiclass,
regression, categorical splits, linear trees, DART / RF) passes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

#: LightGBM's ``Tree`` constructor reads at most this many ``key=value`` lines per tree.
_MAX_TREE_LINES = 22
_INT_ARRAYS_INTERNAL = ("left_child", "right_child", "split_feature")
_FLOAT_ARRAYS_INTERNAL_OPTIONAL = ("split_gain", "internal_value", "internal_weight")
_CATEGORICAL_BIT = 1
# LightGBM splits each line of the parameters section at ':' and reads the second part
# unchecked: a line without it crashes Booster(model_str=...).
_PARAMETER_LINE = re.compile(rb"\[[A-Za-z0-9_]+: [^\r\n]*\]")


class MalformedModelText(ValueError):
    """The text is not a complete, well-formed LightGBM text model (the message says where)."""


def _line(raw: bytes) -> bytes:
    return raw[:-1] if raw.endswith(b"\r") else raw


def _int(value: bytes, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MalformedModelText(f"{what}: {_show(value)} is not an integer") from None


def _float(value: bytes, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MalformedModelText(f"{what}: {_show(value)} is not a number") from None


def _show(value: bytes) -> str:
    text = value[:40].decode("utf-8", "replace")
    return repr(text + ("…" if len(value) > 40 else ""))


def _array(
    keys: dict[bytes, bytes], key: str, count: int, parse: Callable[[bytes, str], float], where: str
) -> list[float]:
    words = keys[key.encode()].split()
    if len(words) != count:
        raise MalformedModelText(f"{where}: {key} has {len(words)} values, expected {count}")
    return [parse(word, f"{where}: {key}") for word in words]


def check_model_text(data: bytes) -> None:
    """Raise :class:`MalformedModelText` unless ``data`` is a whole LightGBM text model.

    Args:
        data: The file's bytes, exactly as they will be handed to LightGBM.

    Raises:
        MalformedModelText: The reason, naming the tree or header line at fault (no bytes of
            the file beyond a short excerpt).
    """
    if b"\x00" in data:
        raise MalformedModelText("the text contains a NUL byte")
    lines: list[tuple[int, bytes]] = []
    offset = 0
    for raw in data.split(b"\n"):
        lines.append((offset, _line(raw)))
        offset += len(raw) + 1

    first_tree = next((i for i, (_, text) in enumerate(lines) if text.startswith(b"Tree=")), None)
    end_of_trees = next((i for i, (_, text) in enumerate(lines) if text == b"end of trees"), None)
    if end_of_trees is None:
        raise MalformedModelText("no 'end of trees' line: the file is cut short")
    header_end = first_tree if first_tree is not None and first_tree < end_of_trees else None
    header = [text for _, text in lines[: end_of_trees if header_end is None else header_end]]
    keys = _check_header(header)
    max_feature = _int(keys[b"max_feature_idx"], "header: max_feature_idx")

    if header_end is None:
        blocks: list[bytes] = []
    elif b"tree_sizes" in keys:
        blocks = _blocks_by_size(data, lines, header_end, end_of_trees, keys[b"tree_sizes"])
    else:
        blocks = _blocks_by_line(data, lines, header_end, end_of_trees)
    for index, block in enumerate(blocks):
        _check_tree(block, index, max_feature)

    _check_parameters([text for _, text in lines[end_of_trees:]])


def _check_parameters(trailer: list[bytes]) -> None:
    if b"parameters:" not in trailer:
        return
    start = trailer.index(b"parameters:") + 1
    if b"end of parameters" not in trailer[start:]:
        raise MalformedModelText("no 'end of parameters' line: the file is cut short")
    end = trailer.index(b"end of parameters", start)
    for text in trailer[start:end]:
        if text and not _PARAMETER_LINE.fullmatch(text):
            raise MalformedModelText(f"parameters: {_show(text)} is not a '[name: value]' line")


def _check_header(header: list[bytes]) -> dict[bytes, bytes]:
    body = [text for text in header if text.strip()]
    if not body or body[0].strip() != b"tree":
        raise MalformedModelText("the first line is not 'tree'")
    keys: dict[bytes, bytes] = {}
    for text in body[1:]:
        key, _, value = text.partition(b"=")
        keys[key] = value
    for key, least in ((b"num_class", 1), (b"num_tree_per_iteration", 1), (b"max_feature_idx", 0)):
        if key not in keys:
            raise MalformedModelText(f"header: no {key.decode()}= line")
        if _int(keys[key], f"header: {key.decode()}") < least:
            raise MalformedModelText(f"header: {key.decode()} is less than {least}")
    return keys


def _blocks_by_size(
    data: bytes, lines: list[tuple[int, bytes]], first: int, end: int, sizes_text: bytes
) -> list[bytes]:
    sizes = [_int(word, "header: tree_sizes") for word in sizes_text.split()]
    if any(size <= 0 for size in sizes):
        raise MalformedModelText("header: tree_sizes lists a size that is not positive")
    start = lines[first][0]
    end_offset = lines[end][0]
    blocks = []
    for index, size in enumerate(sizes):
        if start + size > end_offset:
            raise MalformedModelText(
                f"tree {index}: tree_sizes says {size} bytes, but the trees end sooner "
                "(the file is cut short, or its line endings were converted)"
            )
        blocks.append(data[start : start + size])
        start += size
    if data[start:end_offset].strip():
        raise MalformedModelText(
            f"tree_sizes lists {len(sizes)} trees, but more text follows them "
            "(the file is corrupted, or its line endings were converted)"
        )
    return blocks


def _blocks_by_line(
    data: bytes, lines: list[tuple[int, bytes]], first: int, end: int
) -> list[bytes]:
    starts = [i for i in range(first, end) if lines[i][1].startswith(b"Tree=")]
    bounds = [*starts, end]
    return [data[lines[a][0] : lines[b][0]] for a, b in itertools.pairwise(bounds)]


def _check_tree(block: bytes, index: int, max_feature: int) -> None:
    where = f"tree {index}"
    rows = [_line(raw) for raw in block.split(b"\n")]
    if not rows[0].startswith(b"Tree="):
        raise MalformedModelText(f"{where}: does not start with a 'Tree=' line")
    keys: dict[bytes, bytes] = {}
    position = 1
    while position < len(rows) and rows[position]:
        if position > _MAX_TREE_LINES:
            raise MalformedModelText(f"{where}: more than {_MAX_TREE_LINES} lines")
        key, equals, value = rows[position].partition(b"=")
        if not equals:
            raise MalformedModelText(f"{where}: a line without '='")
        keys[key] = value
        position += 1
    # The block must hold the blank line that ends the tree: without it LightGBM reads on
    # past the tree (and past the end of the text) looking for '=' and line ends.
    if position >= len(rows) - 1 or any(row.strip() for row in rows[position:]):
        raise MalformedModelText(f"{where}: does not end with a blank line (cut short?)")

    for name in ("num_leaves", "num_cat", "leaf_value"):
        if name.encode() not in keys:
            raise MalformedModelText(f"{where}: no {name}= line")
    leaves = _int(keys[b"num_leaves"], f"{where}: num_leaves")
    categories = _int(keys[b"num_cat"], f"{where}: num_cat")
    if leaves < 1 or categories < 0:
        raise MalformedModelText(f"{where}: num_leaves or num_cat is out of range")
    _array(keys, "leaf_value", leaves, _float, where)
    linear = _int(keys.get(b"is_linear", b"0"), f"{where}: is_linear") != 0
    if b"shrinkage" in keys:
        _float(keys[b"shrinkage"], f"{where}: shrinkage")
    for name in ("leaf_weight", "leaf_count"):
        if name.encode() in keys:
            _array(keys, name, leaves, _float if name == "leaf_weight" else _int, where)
    if leaves > 1:
        _check_splits(keys, leaves, categories, max_feature, where)
    if linear:
        _check_linear(keys, leaves, max_feature, where)


def _check_splits(
    keys: dict[bytes, bytes], leaves: int, categories: int, max_feature: int, where: str
) -> None:
    nodes = leaves - 1
    for key in (*_INT_ARRAYS_INTERNAL, "threshold"):
        if key.encode() not in keys:
            raise MalformedModelText(f"{where}: no {key}= line")
    left = [int(v) for v in _array(keys, "left_child", nodes, _int, where)]
    right = [int(v) for v in _array(keys, "right_child", nodes, _int, where)]
    features = _array(keys, "split_feature", nodes, _int, where)
    thresholds = _array(keys, "threshold", nodes, _float, where)
    for key in _FLOAT_ARRAYS_INTERNAL_OPTIONAL:
        if key.encode() in keys:
            _array(keys, key, nodes, _float, where)
    if b"internal_count" in keys:
        _array(keys, "internal_count", nodes, _int, where)
    decisions = (
        [int(v) for v in _array(keys, "decision_type", nodes, _int, where)]
        if b"decision_type" in keys
        else [0] * nodes
    )
    if any(not 0 <= f <= max_feature for f in features):
        raise MalformedModelText(f"{where}: split_feature names a feature beyond max_feature_idx")
    # Node 0 is the root; every other node and every leaf (~leaf, i.e. -1 - leaf) must be the
    # child of exactly one node, or prediction reads out of bounds or never ends.
    expected = sorted([*range(1, nodes), *(-1 - leaf for leaf in range(leaves))])
    if sorted(left + right) != expected:
        raise MalformedModelText(f"{where}: left_child / right_child do not form a tree")
    if categories > 0:
        for key in ("cat_boundaries", "cat_threshold"):
            if key.encode() not in keys:
                raise MalformedModelText(f"{where}: no {key}= line")
        bounds = _array(keys, "cat_boundaries", categories + 1, _int, where)
        if bounds[0] != 0 or any(a > b for a, b in itertools.pairwise(bounds)):
            raise MalformedModelText(f"{where}: cat_boundaries are not increasing from 0")
        _array(keys, "cat_threshold", int(bounds[-1]), _int, where)
    for decision, threshold in zip(decisions, thresholds, strict=True):
        if decision & _CATEGORICAL_BIT and not (
            math.isfinite(threshold) and threshold == int(threshold) and 0 <= threshold < categories
        ):
            raise MalformedModelText(f"{where}: a categorical split points past num_cat")


def _check_linear(keys: dict[bytes, bytes], leaves: int, max_feature: int, where: str) -> None:
    for key in ("leaf_const", "num_features", "leaf_features", "leaf_coeff"):
        if key.encode() not in keys:
            raise MalformedModelText(f"{where}: a linear tree without {key}=")
    _array(keys, "leaf_const", leaves, _float, where)
    counts = _array(keys, "num_features", leaves, _int, where)
    if any(c < 0 for c in counts):
        raise MalformedModelText(f"{where}: num_features is negative")
    total = int(sum(counts))
    features = _array(keys, "leaf_features", total, _int, where)
    _array(keys, "leaf_coeff", total, _float, where)
    if any(not 0 <= f <= max_feature for f in features):
        raise MalformedModelText(f"{where}: leaf_features names a feature beyond max_feature_idx")
