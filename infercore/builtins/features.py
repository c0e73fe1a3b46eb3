"""The ``request`` feature source: model inputs come from the request itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from infercore.components import ComponentContext, FeatureSource, Tensors, TensorSpec
from infercore.components.model import Array
from infercore.errors import ConfigError, InvalidInput
from infercore.hookspecs import hookimpl
from infercore.protocol.names import listed


class RequestFeatureSourceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: Assemble named request fields into one 2-D input, column by column:
    #: ``{input: [field_a, field_b, ...]}``. Fields not named here pass through unchanged.
    assemble: dict[str, list[str]] = {}


class RequestFeatureSource(FeatureSource):
    """Passes the request's tensors to the model, optionally stacking named fields.

    With ``assemble: {input: [sepal_length, sepal_width, petal_length, petal_width]}`` a V1
    request of objects (``{"instances": [{"sepal_length": 5.1, ...}]}``) becomes one ``[N, 4]``
    tensor named ``input``.
    """

    kind = "request"
    Config = RequestFeatureSourceConfig
    #: Row *i* of the answer is row *i* of the fields (assembled or passed through).
    groupable = True
    config: RequestFeatureSourceConfig

    def __init__(self, config: RequestFeatureSourceConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._columns = frozenset(c for columns in config.assemble.values() for c in columns)

    def request_fields(self, model_inputs: Sequence[str]) -> list[str]:
        """The model's inputs (each may come whole), then the fields assembled into them."""
        assemble = self.config.assemble
        built = [c for name in model_inputs for c in assemble.get(name, ())]
        return [*model_inputs, *built]

    def check_model_inputs(self, inputs: Sequence[TensorSpec]) -> None:
        """Each ``assemble`` entry builds an input the model takes, as wide as its fields."""
        specs = {spec.name: spec for spec in inputs}
        path = f"{self.context.path}.assemble"
        for name, columns in self.config.assemble.items():
            spec = specs.get(name)
            if spec is None:
                raise ConfigError(
                    f"{path}.{name}: the model takes no input {name!r} (its inputs: "
                    f"{', '.join(sorted(specs)) or 'none'})",
                    hint="name the entry after the input it builds, e.g. "
                    f"assemble: {{{next(iter(sorted(specs)), 'input')}: [{', '.join(columns)}]}}",
                )
            shape = list(spec.shape)
            if len(shape) != 2 or shape[1] not in (-1, len(columns)):
                raise ConfigError(
                    f"{path}.{name}: {len(columns)} field(s) make a [N, {len(columns)}] "
                    f"tensor, but input {name!r} is {shape}",
                    hint=f"list {shape[1]} fields, one per column of the input"
                    if len(shape) == 2
                    else f"send {name!r} whole, or serve a model whose input is [N, k]",
                )

    async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
        assemble = self.config.assemble
        if not assemble:
            return dict(fields)
        if self._columns.isdisjoint(fields) and all(name in fields for name in assemble):
            # Every assembled input came whole (a V2 request): what the loop below gives.
            out: Tensors = {name: fields[name] for name in assemble}
            out.update(fields)
            return out
        out = {}
        used: set[str] = set()
        for input_name, columns in self.config.assemble.items():
            if not any(c in fields for c in columns):
                if input_name in fields:
                    out[input_name] = fields[input_name]  # the client sent the tensor whole
                    continue
                # Neither form: say what the client did send, not only the first field.
                raise InvalidInput(
                    f"missing input {input_name!r} (got {listed(fields)})",
                    hint=f"send {input_name!r} as one tensor, or its fields: {', '.join(columns)}",
                )
            parts = []
            for column in columns:
                value = fields.get(column)
                if value is None:
                    raise InvalidInput(
                        f"missing field {column!r} (needed for input {input_name!r})",
                        hint=f"send every field of: {', '.join(columns)}",
                    )
                if value.ndim != 1:
                    raise InvalidInput(f"field {column!r}: expected one scalar per instance")
                parts.append(value)
                used.add(column)
            lengths = {len(p) for p in parts}
            if len(lengths) > 1:
                raise InvalidInput(f"input {input_name!r}: fields have different row counts")
            _check_alike(input_name, columns, parts)
            out[input_name] = np.stack(parts, axis=1)
        for name, value in fields.items():
            if name not in used and name not in out:
                out[name] = value
        return out


#: What a field's values are, by numpy kind: stacking fields of different kinds would convert
#: silently (booleans to 1.0, numbers to strings), so they are refused before.
_KINDS = {"b": "booleans", "i": "numbers", "u": "numbers", "f": "numbers"}


def _check_alike(input_name: str, columns: list[str], parts: list[Array]) -> None:
    """The fields of one assembled input hold one kind of value; the odd field is named."""
    kinds = [_KINDS.get(p.dtype.kind, "strings or mixed values") for p in parts]
    if len(set(kinds)) == 1:
        return
    usual = max(kinds, key=kinds.count)
    odd = next(i for i, k in enumerate(kinds) if k != usual)
    raise InvalidInput(
        f"field {columns[odd]!r}: expected {usual} like the other fields of input "
        f"{input_name!r}, got {kinds[odd]}",
        hint="send every field of the input as the same type",
    )


@hookimpl
def register_feature_sources() -> list[type[FeatureSource]]:
    return [RequestFeatureSource]
