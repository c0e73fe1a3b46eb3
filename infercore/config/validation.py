"""Turning msgspec validation failures into one line that names path, value and fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import msgspec

from infercore.errors import ConfigError
from infercore.redaction import shown as _shown

T = TypeVar("T")

_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_EXPECTED = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`")
#: A bound msgspec checked: ``Expected `int` <= 65535``, ``Expected `str` of length >= 1``.
_BOUND = re.compile(
    r"^Expected `(?P<want>[^`]+)`(?P<length> of length)? (?P<op>[<>]=?) (?P<bound>\S+)$"
)
# msgspec writes a mapping key it does not name as `[...]`.
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[(\.\.\.)\]")


def _segments(path: str) -> list[str | int | None]:
    """Path segments; ``None`` stands for a mapping key msgspec did not name."""
    out: list[str | int | None] = []
    for m in _SEGMENT.finditer(path):
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(int(m.group(2)))
        else:
            out.append(None)
    return out


def _child_type(tp: Any, seg: Any) -> Any:
    """The declared type at ``seg`` inside ``tp`` (a Struct field, or a container's items)."""
    tp = _unwrap_optional(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(seg, str):
            return None
        return {f.encode_name: f.type for f in msgspec.structs.fields(tp)}.get(seg)
    args = getattr(tp, "__args__", ())
    return args[-1] if args else None


def _failing_key(data: Any, tp: Any, *, keys_only: bool = False) -> Any:
    """The first key of mapping ``data`` whose key or value does not convert into ``tp``."""
    tp = _unwrap_optional(tp)
    args: tuple[Any, ...] = getattr(tp, "__args__", ())
    if not isinstance(data, Mapping) or len(args) != 2:
        return None
    key_type, value_type = args
    for key, value in data.items():
        try:
            msgspec.convert(key, key_type, strict=False)
            if not keys_only:
                msgspec.convert(value, value_type, strict=False)
        except msgspec.ValidationError:
            return key
    return None


def _resolve(data: Any, target: Any, raw: list[str | int | None]) -> list[str | int]:
    """``raw`` with every unnamed mapping key replaced by the key that failed validation."""
    out: list[str | int] = []
    cur, tp = data, target
    for seg in raw:
        key = _failing_key(cur, tp) if seg is None else seg
        if key is None:
            key = "?"
        out.append(key if isinstance(key, int) else str(key))
        tp = _child_type(tp, key)
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            cur = None
    return out


def _lookup(data: Any, segments: list[str | int]) -> tuple[bool, Any]:
    cur = data
    for seg in segments:
        try:
            cur = cur[seg]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, cur


def join_path(base: str, segments: list[str | int], data: Any = None) -> str:
    """``base.a[0].b``: an int is a list index, or, where ``data`` has a mapping there (an
    int key, as YAML reads ``2:``), a key like any other (``priority_queue_policy.2``)."""
    out = base
    cur = data
    for seg in segments:
        if isinstance(seg, int) and not isinstance(cur, Mapping):
            out += f"[{seg}]"
        else:
            out = f"{out}.{seg}" if out else str(seg)
        try:
            cur = cur[seg] if cur is not None else None
        except (KeyError, IndexError, TypeError):
            cur = None
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
    segs = _resolve(data, target, _segments(m.group("path") or "")) if m else []
    suffix = f" ({context})" if context else ""
    if m and m.group("key"):
        # The failure is a mapping key at `segs`, not a value.
        found, mapping = _lookup(data, segs)
        tp: Any = target
        for seg in segs:
            tp = _child_type(tp, seg)
        bad = _failing_key(mapping, tp, keys_only=True) if found else None
        full = join_path(path, segs, data) or "<root>"
        expected = _EXPECTED.search(msg)
        want = f"expected {expected.group('want')}" if expected else msg
        shown = f" {bad!r}" if bad is not None else ""
        return ConfigError(
            f"{full}: invalid key{shown}: {want}{suffix}",
            hint='quote keys that look like numbers, e.g. "1"',
        )
    unknown = _UNKNOWN.search(msg)
    if unknown:
        name = unknown.group("field")
        full = join_path(path, [*segs, name], data)
        _, parent = _lookup(data, segs)
        value = _shown(parent.get(name), name) if isinstance(parent, Mapping) else None
        allowed = allowed_fields(target, segs)
        choices = f"; valid keys here: {', '.join(allowed)}" if allowed else ""
        return ConfigError(
            f"{full}: unknown key (value {value!r}){choices}{suffix}",
            hint="fix the spelling or remove the key",
        )
    missing = _MISSING.search(msg)
    if missing:
        full = join_path(path, [*segs, missing.group("field")], data)
        return ConfigError(f"{full}: required key is missing{suffix}", hint="set it")
    full = join_path(path, segs, data) or "<root>"
    found, value = _lookup(data, segs)
    expected = _EXPECTED.search(msg)
    if expected:
        got = repr(value) if found else expected.group("got")
        want = expected.group("want")
        hint = "correct the value's type"
        if want.split(" | ")[0] == "str" and expected.group("got") in ("int", "float", "bool"):
            # YAML reads 0123, 1e5, yes and an all-digit digest as numbers and booleans.
            hint = "quote it ('...') in YAML, which reads digits, 1e5, yes/no as other types"
        return ConfigError(
            f"{full}: expected {want}, got {got}{suffix}",
            hint=hint,
        )
    values, others = (
        _literal_choices(target, segs) if msg.startswith("Invalid enum value") else ([], [])
    )
    if values:
        got = repr(value) if found else msg.removeprefix("Invalid enum value ")
        besides = f" (or {' or '.join(others)})" if others else ""
        return ConfigError(
            f"{full}: {got} is not one of: {', '.join(map(str, values))}{besides}{suffix}",
            hint="use one of the listed values (they are case-sensitive)",
        )
    shown = f" (value {value!r})" if found else ""
    bound = _BOUND.match(msg)
    if bound:
        # The bound as msgspec words it, then what else the field takes (`workers`: auto).
        op, limit = bound.group("op"), bound.group("bound")
        of = "of length " if bound.group("length") else ""
        literals, _ = _literal_choices(target, segs)
        besides = f" or {' or '.join(repr(v) for v in literals)}" if literals else ""
        return ConfigError(
            f"{full}: {msg[0].lower()}{msg[1:]}{besides}{shown}{suffix}",
            hint=f"use a value {of}{op} {limit}{besides}",
        )
    return ConfigError(f"{full}: {msg[0].lower()}{msg[1:]}{shown}{suffix}")


def _literal_choices(target: Any, segs: list[str | int]) -> tuple[list[Any], list[str]]:
    """The values a ``Literal`` field at ``segs`` allows, and the names of the other types it
    also takes (``workers``: an int or ``auto``); empty where the field cannot be followed."""
    tp: Any = target
    for seg in segs:
        tp = _child_type(tp, seg)
        if tp is None:
            return [], []
    found: list[Any] = []
    others: list[str] = []

    def collect(t: Any) -> None:
        if getattr(t, "__origin__", None) is Literal:
            found.extend(t.__args__)
        elif hasattr(t, "__metadata__"):  # Annotated[...]
            collect(t.__origin__)
        elif isinstance(t, type):
            others.append("null" if t is type(None) else f"an {t.__name__}")
        else:
            for arg in getattr(t, "__args__", ()):
                collect(arg)

    collect(tp)
    return found, others


def allowed_fields(target: Any, segs: list[str | int]) -> list[str]:
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
