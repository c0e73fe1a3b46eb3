"""A version's signature: the names, datatypes and shapes of its inputs and outputs.

A version name is a contract: clients call ``/versions/{v}`` and the unversioned route with
the tensors it takes, and a rollout (shadow, canary, the guard, approvals) judges a version
by what it answers. A reload may replace the artifact behind a version (a repaired file, new
weights), never that contract: a new signature is a new version, rolled out as one.
"""

from __future__ import annotations

from collections.abc import Sequence

from infercore.components import TensorSpec

#: Changes listed in one message; a model with many tensors must not make it unbounded.
_LISTED = 6


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def _changes(role: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> list[str]:
    before = {spec.name: spec for spec in old}
    after = {spec.name: spec for spec in new}
    found: list[str] = []
    for name, spec in before.items():
        now = after.get(name)
        if now is None:
            found.append(f"{role} {name!r} removed")
            continue
        if now.datatype != spec.datatype:
            found.append(f"{role} {name!r} datatype {spec.datatype} -> {now.datatype}")
        if tuple(now.shape) != tuple(spec.shape):
            found.append(f"{role} {name!r} shape {_shape(spec)} -> {_shape(now)}")
    found.extend(
        f"{role} {name!r} added ({spec.datatype} {_shape(spec)})"
        for name, spec in after.items()
        if name not in before
    )
    return found


def signature_changes(
    old_inputs: Sequence[TensorSpec],
    old_outputs: Sequence[TensorSpec],
    new_inputs: Sequence[TensorSpec],
    new_outputs: Sequence[TensorSpec],
) -> list[str]:
    """What differs between two signatures, one line per tensor; empty when they agree.

    Tensors are matched by name (the protocols address them by name, so their order does not
    matter); a variable dimension is ``-1`` on both sides or it is a change.
    """
    return _changes("input", old_inputs, new_inputs) + _changes("output", old_outputs, new_outputs)


def describe_changes(changes: Sequence[str]) -> str:
    """``changes`` as one bounded clause for a message."""
    shown = "; ".join(changes[:_LISTED])
    if len(changes) > _LISTED:
        shown += f"; and {len(changes) - _LISTED} more"
    return shown
