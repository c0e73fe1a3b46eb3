"""Turning msgspec validation failures into one line that names path, value and fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from infercore.errors import ConfigError

T = TypeVar("T")

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_EXPECTED = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`")
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _segments(path: str) -> list[str | int]:
    out: list[str | int] = []
    for m in _SEGMENT.finditer(path):
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return out


def _lookup(data: Any, segments: list[str | int]) -> tuple[bool, Any]:
    cur = data
    for seg in segments:
        try:
            cur = cur[seg]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, cur


def join_path(base: str, segments: list[str | int]) -> str:
    out = base
    for seg in segments:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out = f"{out}.{seg}" if out else seg
    return out


def field_names(struct: type[msgspec.Struct]) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(struct)]


def convert(
    data: Any,
    target: type[T],
    *,
    path: str,
    context: str = "",
) -> T:
    """``msgspec.convert`` that raises :class:`ConfigError` naming the config path.

    Args:
        data: Plain config data (dicts, lists, scalars).
        target: The Struct type to validate into.
        path: Config path of ``data`` (``""`` for the root).
        context: Appended to the message in parentheses, e.g. ``recipe=iris``.
    """
    try:
        return msgspec.convert(data, target, strict=False)
    except msgspec.ValidationError as exc:
        raise describe(exc, data, target, path=path, context=context) from None


def describe(
    exc: msgspec.ValidationError,
    data: Any,
    target: Any,
    *,
    path: str,
    context: str = "",
) -> ConfigError:
    text = str(exc)
    m = _AT.match(text)
    msg = m.group("msg") if m else text
    segs = _segments(m.group("path") or "") if m else []
    suffix = f" ({context})" if context else ""
    unknown = _UNKNOWN.search(msg)
    if unknown:
        name = unknown.group("field")
        full = join_path(path, [*segs, name])
        _, parent = _lookup(data, segs)
        value = parent.get(name) if isinstance(parent, Mapping) else None
        allowed = _allowed_fields(target, segs)
        choices = f"; valid keys here: {', '.join(allowed)}" if allowed else ""
        return ConfigError(
            f"{full}: unknown key (value {value!r}){choices}{suffix}",
            hint="fix the spelling or remove the key",
        )
    missing = _MISSING.search(msg)
    if missing:
        full = join_path(path, [*segs, missing.group("field")])
        return ConfigError(f"{full}: required key is missing{suffix}", hint="set it")
    full = join_path(path, segs) or "<root>"
    found, value = _lookup(data, segs)
    expected = _EXPECTED.search(msg)
    if expected:
        got = repr(value) if found else expected.group("got")
        return ConfigError(
            f"{full}: expected {expected.group('want')}, got {got}{suffix}",
            hint="correct the value's type",
        )
    shown = f" (value {value!r})" if found else ""
    return ConfigError(f"{full}: {msg[0].lower()}{msg[1:]}{shown}{suffix}")


def _allowed_fields(target: Any, segs: list[str | int]) -> list[str]:
    """Field names of the Struct at ``segs`` inside ``target``, where it can be followed."""
    cur = target
    for seg in segs:
        if isinstance(cur, type) and issubclass(cur, msgspec.Struct) and isinstance(seg, str):
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(cur)}
            cur = fields.get(seg)
        else:
            args = getattr(cur, "__args__", ())
            cur = args[-1] if args else None
        cur = _unwrap_optional(cur)
        if cur is None:
            return []
    if isinstance(cur, type) and issubclass(cur, msgspec.Struct):
        return field_names(cur)
    return []


def _unwrap_optional(tp: Any) -> Any:
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp
