"""The JSON form of drift events and results (webhook bodies, command files, the admin API)."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from typing import Any

from infercore.components.drift import DriftEvent, DriftResult
from infercore.redaction import redact, redact_text

#: An absolute path; not the ``//`` after a URL's scheme (the URL is masked on its own terms,
#: and its host says which webhook failed), but the path of a ``file:///…`` URL.
_ABS_PATH = re.compile(r"(?<![\w.])(?<!:/)/(?:[\w.\-]+/)+[\w.\-]*")
#: How deep a detector's ``info`` is shown: deeper containers become ``"…"`` (a cycle, or a
#: structure nobody reads in a webhook body).
_INFO_DEPTH = 8
#: The longest string of a detector's ``info`` that is shown (masked): a longer one becomes
#: ``"<N characters>"``, so that scrubbing an event costs a bounded time per string.
_INFO_STRING = 4096
#: How many items of each list, tuple, array (along each axis) and mapping of a detector's
#: ``info`` are shown, and how many of all its containers together: the first ones, then one
#: more item, ``"<N more>"`` (in a mapping, under the key ``"…"``). An array is cut before it
#: is converted: a histogram of two million bins costs its first 100 values, not two million
#: Python floats on the event loop, and a cube of 100x100x100 its first 1000.
_INFO_ITEMS = 100
_INFO_VALUES = 1000


def finite(value: float) -> float | None:
    """``value`` as a float, or ``None`` for NaN and infinities (JSON has neither)."""
    f = float(value)
    return f if math.isfinite(f) else None


class _Limits:
    """How many items :func:`plain` still shows: of each container, and of all together."""

    def __init__(self, items: int | None, values: int | None) -> None:
        self.items = items
        self.left = values

    @property
    def bounded(self) -> bool:
        return self.items is not None or self.left is not None

    def take(self, count: int) -> int:
        """How many of a container's ``count`` items are shown; they are counted as shown."""
        if self.items is not None:
            count = min(count, self.items)
        if self.left is not None:
            count = min(count, self.left)
            self.left -= count
        return count


def plain(
    value: Any, depth: int | None = None, items: int | None = None, values: int | None = None
) -> Any:
    """``value`` with numpy scalars and arrays, tuples, sets and non-finite floats made
    JSON-safe; with
    ``depth``, containers deeper than ``depth`` levels become ``"…"``; with ``items``, each
    container (a list, a tuple, a mapping, an array along each axis) keeps its first ``items``
    items, and with ``values``, all of them together keep ``values``: the items cut become
    one last item, ``"<N more>"`` (a mapping's under the key ``"…"``)."""
    return _plain(value, depth, _Limits(items, values))


def _plain(value: Any, depth: int | None, limits: _Limits) -> Any:
    if isinstance(value, dict | list | tuple):
        if depth is not None and depth <= 0:
            return "…"
        below = None if depth is None else depth - 1
        shown = limits.take(len(value))
        if isinstance(value, dict):
            pairs = itertools.islice(value.items(), shown)
            out = {str(k): _plain(v, below, limits) for k, v in pairs}
            if shown < len(value):
                out["…"] = f"<{len(value) - shown} more>"
            return out
        return _listed([_plain(v, below, limits) for v in value[:shown]], len(value))
    if isinstance(value, set | frozenset):  # a list, in the set's order: not str()'d whole
        if depth is not None and depth <= 0:
            return "…"
        below = None if depth is None else depth - 1
        shown = limits.take(len(value))
        head = itertools.islice(value, shown)
        return _listed([_plain(v, below, limits) for v in head], len(value))
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return finite(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars (torch tensors too)
    if callable(tolist):
        if limits.bounded and getattr(value, "ndim", None) != 0:
            with contextlib.suppress(TypeError, IndexError, KeyError, ValueError, AttributeError):
                return _array(value, depth, limits)
        return _plain(tolist(), depth, limits)
    item = getattr(value, "item", None)
    if callable(item):
        return _plain(item(), depth, limits)
    return str(value)


def _listed(shown: list[Any], count: int) -> list[Any]:
    """The items ``shown`` of a list of ``count``, and how many more it has."""
    return shown if len(shown) == count else [*shown, f"<{count - len(shown)} more>"]


def _array(value: Any, depth: int | None, limits: _Limits) -> Any:
    """An array (numpy, torch, anything with ``tolist``, ``len`` and slices) as :func:`plain`
    makes it within ``limits``: only the rows shown are converted, each cut the same way."""
    count = len(value)  # TypeError for a scalar without ``ndim``: converted whole
    if depth is not None and depth <= 0:
        return "…"
    below = None if depth is None else depth - 1
    head = value[: limits.take(count)]
    if getattr(value, "ndim", 1) == 1:
        return _listed([_plain(v, below, limits) for v in head.tolist()], count)
    return _listed([_plain(row, below, limits) for row in head], count)


def _capped(value: Any) -> Any:
    """JSON ``value`` with its strings longer than :data:`_INFO_STRING` replaced by their
    length."""
    if isinstance(value, dict):
        return {k: _capped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_capped(v) for v in value]
    if isinstance(value, str) and len(value) > _INFO_STRING:
        return f"<{len(value)} characters>"
    return value


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str):
        return _ABS_PATH.sub("<path>", value)
    return value


def scrub_info(info: Any) -> Any:
    """A detector's ``info`` fit for webhook bodies, command files and the admin API
    (RELIABILITY S6): plain JSON (:func:`plain`), bounded (:data:`_INFO_DEPTH` levels,
    :data:`_INFO_ITEMS` items of each container and :data:`_INFO_VALUES` in all, strings of
    :data:`_INFO_STRING` characters), masked as ``infercore config show`` masks config
    (:func:`infercore.redaction.redact`: the value of a key that names a secret, ``token``,
    ``db_password``, ``PGPASSWORD``, and the secrets in every string), absolute paths in
    strings replaced by ``<path>``."""
    return _without_paths(redact(_capped(plain(info, _INFO_DEPTH, _INFO_ITEMS, _INFO_VALUES))))


def result_to_json(result: DriftResult) -> dict[str, Any]:
    """A detector result as plain JSON values (NaN and infinities become ``null``), its
    ``info`` scrubbed (:func:`scrub_info`)."""
    return {
        "detector": result.detector,
        "drift": bool(result.drift),
        "scores": {k: finite(v) for k, v in result.scores.items()},
        "p_values": {k: finite(v) for k, v in result.p_values.items()},
        "feature_drift": {k: bool(v) for k, v in result.feature_drift.items()},
        "info": scrub_info(result.info),
    }


def event_to_json(event: DriftEvent) -> dict[str, Any]:
    """What a webhook receives and a command reads from its event file.

    Keys: ``type`` (``"drift"``), ``id``, ``time`` (Unix seconds), ``model``, ``version``,
    ``detector``, ``drift``, ``features`` (the drifted feature columns), ``scores``,
    ``p_values``, ``feature_drift``, ``info``, ``window`` (the detector's window number),
    ``samples`` (rows in the window).
    """
    body = result_to_json(event.result)
    extra = plain(event.extra)
    return {
        "type": "drift",
        "id": extra.get("id"),
        "time": extra.get("time"),
        "model": event.model,
        "version": event.version,
        "detector": body["detector"],
        "drift": body["drift"],
        "features": sorted(k for k, v in event.result.feature_drift.items() if v),
        "scores": body["scores"],
        "p_values": body["p_values"],
        "feature_drift": body["feature_drift"],
        "info": body["info"],
        "window": extra.get("window"),
        "samples": extra.get("samples"),
    }


def scrub(text: str, limit: int = 300) -> str:
    """An error message fit for the admin API and INFO logs (RELIABILITY S6): one line, at
    most ``limit`` characters, the secrets of every URL in it masked as ``infercore config
    show`` masks them (:func:`infercore.redaction.redact_text`: credentials, secret and
    random-looking query values, a webhook's token in its path, tokens their prefix names),
    then absolute paths replaced by ``<path>``."""
    line = text.splitlines()[0] if text else ""
    line = _ABS_PATH.sub("<path>", redact_text(line))
    return line if len(line) <= limit else line[: limit - 1] + "…"
