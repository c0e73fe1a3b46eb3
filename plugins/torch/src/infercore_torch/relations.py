"""Relations between the dynamic dimensions of a ``torch.export`` program's inputs.

torch writes each dynamic dimension of an input as a sympy expression over the program's root
symbols: dimensions that are the same symbol (``s77``, one ``Dim`` used twice) must be the same
size, and a derived one (``s77 + 1``, ``2*s77``, from ``Dim`` arithmetic) follows from its
symbol. The program's own input guard refuses a request that breaks one with an
``AssertionError`` inside the call, which would surface as a 500; :class:`DimRelations`
refuses it before the call, as a 400 that names both dimensions, their sizes and the relation.

sympy comes with torch and is used here only through the expressions' own methods: this module
imports neither, so importing the plugin stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infercore.components import Array
from infercore.errors import InvalidInput
from infercore_torch.signature import bound_of

#: One entry per dimension: the size where the program fixes it, else its sympy expression.
DimExprs = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class DimRef:
    """One dimension of one input."""

    input: str
    dim: int

    def size(self, inputs: Mapping[str, Array]) -> int | None:
        array = inputs.get(self.input)
        if array is None or array.ndim <= self.dim:
            return None  # a missing or misshapen input has its own error
        return int(array.shape[self.dim])

    def __str__(self) -> str:
        return f"{self.input!r} dimension {self.dim}"


@dataclass(frozen=True, slots=True)
class _Reader:
    """A dimension whose size is ``scale * symbol + offset``: it gives the symbol's value."""

    at: DimRef
    symbol: Any
    scale: int
    offset: int

    @property
    def bare(self) -> bool:
        return self.scale == 1 and self.offset == 0

    def label(self) -> str:
        """The symbol's value, in terms of this dimension (for messages)."""
        if self.bare:
            return str(self.at)
        shifted = str(self.at) if self.offset == 0 else f"({self.at}{_signed(-self.offset)})"
        return shifted if self.scale == 1 else f"{shifted} / {self.scale}"

    def form(self) -> str:
        """The sizes this dimension takes, in terms of a whole number ``n``."""
        return _linear_text({"n": self.scale}, self.offset)


@dataclass(frozen=True, slots=True)
class _Root:
    """Where a symbol's value is read, and the values the program allows it."""

    reader: _Reader
    lower: int
    upper: int | None

    def admits(self, value: int) -> bool:
        return self.lower <= value and (self.upper is None or value <= self.upper)


@dataclass(frozen=True, slots=True)
class _Derived:
    """A dimension whose size follows from the roots' values."""

    at: DimRef
    expr: Any
    #: ``symbol -> coefficient`` and the constant when ``expr`` is linear, else ``None``.
    terms: tuple[tuple[Any, int], ...] | None
    constant: int
    text: str
    #: The roots it reads, for the message.
    roots: tuple[_Reader, ...]

    def expected(self, values: Mapping[Any, int]) -> int | None:
        if self.terms is not None:
            try:
                return self.constant + sum(c * values[s] for s, c in self.terms)
            except KeyError:
                return None
        if not all(s in values for s in self.expr.free_symbols):
            return None
        try:
            from sympy import Integer

            return int(self.expr.xreplace({s: Integer(values[s]) for s in self.expr.free_symbols}))
        except Exception:  # an expression sympy cannot reduce to a number: torch decides
            return None

    @property
    def equality(self) -> bool:
        return (
            self.terms is not None
            and len(self.terms) == 1
            and self.terms[0][1] == 1
            and self.constant == 0
            and self.roots[0].bare
        )


class DimRelations:
    """The relations between an exported program's input dimensions, and their check.

    Each root symbol is read from one dimension: the first that is exactly the symbol, else
    the first that is ``a*symbol + b``; every other dimension that uses only read symbols is
    checked against them. A dimension over a symbol that no dimension reveals (``s0*s1`` with
    neither alone) is left to the program's guard.

    Attributes:
        batch_conflict: Why the first dimension is not a batch dimension that requests may be
            stacked along and split (the program relates it to another dimension, or derives
            it); ``None`` when it is one, or when some input or output has a fixed first
            dimension (then the model is not batchable anyway).
    """

    def __init__(
        self,
        names: Sequence[str],
        exprs: Sequence[DimExprs],
        outputs: Mapping[str, DimExprs],
        constraints: Mapping[Any, Any],
    ) -> None:
        readers: dict[Any, list[_Reader]] = {}
        dynamic: list[tuple[DimRef, Any]] = []
        for name, dims in zip(names, exprs, strict=True):
            for index, expr in enumerate(dims):
                if type(expr) is int:
                    continue
                at = DimRef(name, index)
                dynamic.append((at, expr))
                linear = _linear(expr)
                if linear is not None and len(linear[0]) == 1:
                    ((symbol, scale),) = linear[0]
                    if scale != 0:
                        readers.setdefault(symbol, []).append(_Reader(at, symbol, scale, linear[1]))
        self._readers = readers
        roots: dict[Any, _Root] = {}
        for symbol, found in readers.items():
            reader = next((r for r in found if r.bare), found[0])
            bounds = constraints.get(symbol)
            lower = bound_of(bounds.lower) if bounds is not None else None
            roots[symbol] = _Root(reader, lower or 0, bound_of(bounds.upper) if bounds else None)
        self._roots = list(roots.values())
        self._derived: list[_Derived] = []
        self.unchecked: list[DimRef] = []
        for at, expr in dynamic:
            symbols = expr.free_symbols
            if any(roots[s].reader.at == at for s in symbols if s in roots) and len(symbols) == 1:
                continue  # the root itself
            if not all(s in roots for s in symbols):
                self.unchecked.append(at)
                continue
            linear = _linear(expr)
            used = tuple(roots[s].reader for s in sorted(symbols, key=str))
            labels = {s: roots[s].reader.label() for s in symbols}
            if linear is not None:
                text = _linear_text({labels[s]: c for s, c in linear[0]}, linear[1])
            else:
                text = str(expr.xreplace({s: _named(labels[s]) for s in symbols}))
            self._derived.append(
                _Derived(
                    at,
                    expr,
                    linear[0] if linear is not None else None,
                    linear[1] if linear is not None else 0,
                    text,
                    used,
                )
            )
        self.batch_conflict = self._batch_conflict(names, exprs, outputs)

    def _batch_conflict(
        self, names: Sequence[str], exprs: Sequence[DimExprs], outputs: Mapping[str, DimExprs]
    ) -> str | None:
        # Stacking requests adds their first dimensions, splitting and padding change it: only
        # a first dimension that is a free symbol, used by no other dimension, survives that.
        # A program that relates it to another dimension (y: (b, b)), or derives it (y: b + 1),
        # is called once per request with the request whole, and its relations are checked on
        # the request as sent, never on pieces the server made.
        firsts = [dims[0] if dims else 0 for dims in (*exprs, *outputs.values())]
        if any(type(first) is int for first in firsts):
            return None  # a fixed first dimension: not batchable in the first place
        derived = {d.at: d for d in self._derived}
        batch = set()
        for name, dims in zip(names, exprs, strict=True):
            if not getattr(dims[0], "is_Symbol", False):
                found = derived.get(DimRef(name, 0))
                reader = next(
                    (r.reader for r in self._roots if r.reader.at == DimRef(name, 0)), None
                )
                shown = (
                    found.text
                    if found is not None
                    else reader.form()
                    if reader is not None
                    else str(dims[0])
                )
                return f"input {name!r} dimension 0 is {shown}, not a free batch dimension"
            batch.add(dims[0])
        for name, dims in zip(names, exprs, strict=True):
            for index, expr in enumerate(dims[1:], start=1):
                if type(expr) is not int and expr.free_symbols & batch:
                    found = derived.get(DimRef(name, index))
                    shown = found.text if found is not None else str(expr)
                    return (
                        f"input {name!r} dimension {index} must be {shown}, so it depends on "
                        "the batch dimension"
                    )
        for name, dims in outputs.items():
            if dims[0] not in batch:
                return f"output {name!r} dimension 0 is not the inputs' dimension 0"
        return None

    def check(self, inputs: Mapping[str, Array], *, skip_rows: bool) -> None:
        """Refuse ``inputs`` whose dimensions break a relation of the program.

        Args:
            inputs: One request's arrays (or a batch's; with ``skip_rows`` their first
                dimension is not checked: stacking keeps a free batch dimension's equality).
            skip_rows: Leave the first dimension out (a batchable model).

        Raises:
            InvalidInput: Naming both dimensions, their sizes and the relation.
        """
        values: dict[Any, int] = {}
        for root in self._roots:
            reader = root.reader
            if skip_rows and reader.at.dim == 0:
                continue
            size = reader.at.size(inputs)
            if size is None:
                continue
            value, rest = divmod(size - reader.offset, reader.scale)
            if not reader.bare and (rest or not root.admits(value)):
                span = f"{root.lower}..{root.upper}" if root.upper is not None else (
                    f"at least {root.lower}"
                )  # fmt: skip
                raise InvalidInput(
                    f"input {reader.at.input!r}: dimension {reader.at.dim} is {size}, but the "
                    f"model needs {reader.form()} for a whole number n in {span}",
                    hint=f"send {reader.at.input!r} with dimension {reader.at.dim} equal to "
                    f"{reader.form()}",
                )
            values[reader.symbol] = value
        for derived in self._derived:
            at = derived.at
            if skip_rows and at.dim == 0:
                continue
            size = at.size(inputs)
            expected = derived.expected(values) if size is not None else None
            if expected is None or expected == size:
                continue
            given = ", ".join(f"input {r.at} is {r.at.size(inputs)}" for r in derived.roots)
            if derived.equality:
                (shared,) = derived.roots
                raise InvalidInput(
                    f"input {at.input!r}: dimension {at.dim} is {size}, but input {shared.at} "
                    f"is {shared.at.size(inputs)}; the model needs them equal",
                    hint="send inputs whose shared dimensions have the same size",
                )
            raise InvalidInput(
                f"input {at.input!r}: dimension {at.dim} is {size}, but the model needs "
                f"{derived.text} = {expected} ({given})",
                hint=f"send {at.input!r} with dimension {at.dim} equal to {derived.text}",
            )

    def sample_sizes(self, fixed: Mapping[DimRef, int], *, one_row: bool) -> dict[DimRef, int]:
        """Sizes of the dynamic dimensions for a warm-up that keeps every relation: each
        symbol at the lower end of its range (at least 1), or where a declared size fixes a
        dimension that reveals it, at the value that size gives; with ``one_row`` a symbol read
        from a first dimension is 1 (the batch is padded to the program's range)."""
        values: dict[Any, int] = {}
        for root in self._roots:
            symbol = root.reader.symbol
            for reader in self._readers[symbol]:
                if reader.at in fixed:
                    value, rest = divmod(fixed[reader.at] - reader.offset, reader.scale)
                    if not rest:
                        values[symbol] = value
                        break
            else:
                if one_row and root.reader.at.dim == 0:
                    values[symbol] = 1
                else:
                    values[symbol] = max(1, root.lower)
        sizes = {r.reader.at: r.reader.scale * values[r.reader.symbol] + r.reader.offset
                 for r in self._roots}  # fmt: skip
        for derived in self._derived:
            expected = derived.expected(values)
            if expected is not None:
                sizes[derived.at] = expected
        return sizes


def _linear(expr: Any) -> tuple[tuple[tuple[Any, int], ...], int] | None:
    """``expr`` as ``((symbol, coefficient), ...), constant`` when it is linear with integer
    coefficients, else ``None``."""
    try:
        coefficients = expr.as_coefficients_dict()
    except AttributeError:
        return None
    terms: list[tuple[Any, int]] = []
    constant = 0
    for key, coefficient in coefficients.items():
        if not getattr(coefficient, "is_Integer", False):
            return None
        if key == 1:
            constant = int(coefficient)
        elif getattr(key, "is_Symbol", False):
            terms.append((key, int(coefficient)))
        else:
            return None
    return tuple(sorted(terms, key=lambda t: str(t[0]))), constant


def _signed(value: int) -> str:
    return f" + {value}" if value >= 0 else f" - {-value}"


def _linear_text(terms: Mapping[str, int], constant: int) -> str:
    """``2 * ('x' dimension 0) + 1`` for ``{"'x' dimension 0": 2}, 1``."""
    text = ""
    for label, coefficient in terms.items():
        if abs(coefficient) == 1:
            term = label
        else:
            term = f"{abs(coefficient)} * {label if ' ' not in label else f'({label})'}"
        if not text:
            text = term if coefficient > 0 else f"-{term}"
        else:
            text += f" + {term}" if coefficient > 0 else f" - {term}"
    if constant:
        text += _signed(constant) if text else str(constant)
    return text or "0"


def _named(label: str) -> Any:
    from sympy import Symbol

    return Symbol(f"[{label}]")
