"""``kind: torch``: a torch.export program, a TorchScript archive, or a state dict in a named
architecture, behind the model interface.

torch is imported by :meth:`TorchModel.start` (in a worker thread), never with this module, so
``infercore plugins`` and recipes without a torch model do not pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import io
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from infercore.artifacts import display_name, read_verified, resolve_artifact
from infercore.components import (
    Array,
    ComponentContext,
    Model,
    Tensors,
    TensorSpec,
    v2_datatype,
)
from infercore.errors import (
    BackendError,
    ConfigError,
    InfercoreError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
)
from infercore_torch.device import DEVICE_PATTERN, select_device
from infercore_torch.formats import (
    CODE_EXECUTING,
    Format,
    architecture_kind,
    check_trust,
    detect_format,
)
from infercore_torch.relations import DimRef, DimRelations
from infercore_torch.signature import (
    DimRange,
    InputRanges,
    as_input,
    cast_checked,
    check_declared,
    exported_dim_exprs,
    exported_input_ranges,
    exported_specs,
)

log = logging.getLogger("infercore.torch")

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]
TensorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.\-]{0,127}$")]
Dim = Annotated[int, msgspec.Meta(ge=-1)]
KwargValue = int | float | str | bool | None | list[int | float | str | bool]

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")
# Terminal escape sequences (torch bolds parts of its weights-only message).
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_MAX_DETAIL = 200
# torch's weights-only refusals advise re-running torch.load with weights_only=False (or
# allow-listing the file's globals): code execution, which infercore never offers (S2).
_WEIGHTS_ONLY_ADVICE = re.compile(r"weights[_ ]only|safe_globals", re.IGNORECASE)
_PICKLED_GLOBAL = re.compile(r"\bGLOBAL ([A-Za-z_][\w.]*)")
_WHAT = {"export": "a torch.export program (.pt2)", "torchscript": "a TorchScript archive"}
# An input named in a guard of an exported program: ``x.size()[0] == -1 + y.size()[0]``.
_GUARD_INPUT = re.compile(r"\b([A-Za-z_]\w*)(?=\.size\(\))")


def _scrub(exc: BaseException) -> str:
    """One line describing ``exc`` without filesystem paths (RELIABILITY S6), and without
    torch's advice to unpickle with ``weights_only=False`` (S2): what such a refusal found is
    kept (the Python object the pickle names), the advice is not."""
    detail = _ABSOLUTE_PATH.sub("<path>", " ".join(_ANSI_ESCAPE.sub("", str(exc)).split()))
    if _WEIGHTS_ONLY_ADVICE.search(detail):
        found = _PICKLED_GLOBAL.search(detail)
        detail = (
            f"it pickles the Python object {found.group(1)}"
            if found
            else "it holds pickled data other than tensors"
        )
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 1] + "…"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class _Captured(logging.Filter):
    """Keeps torch.export's own log records (a traceback with site-packages paths that it logs
    at WARNING before raising or giving up) off the handlers; they go to DEBUG as one line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _quiet_torch_export(config_path: str) -> Iterator[None]:
    logger = logging.getLogger("torch.export")
    captured = _Captured()
    logger.addFilter(captured)
    try:
        yield
    finally:
        logger.removeFilter(captured)
        for record in captured.records:
            log.debug(
                "%s: torch.export said: %s", config_path, _scrub(Exception(record.getMessage()))
            )


class TensorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One declared input or output: ``{name, datatype, shape}``; ``-1`` marks a varying dim."""

    name: TensorName
    datatype: Literal[
        "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
        "FP16", "FP32", "FP64",
    ]  # fmt: skip
    shape: list[Dim]

    def spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, datatype=self.datatype, shape=tuple(self.shape))


class TorchModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Options of ``loader: {kind: torch, ...}`` (each is described in the plugin's README)."""

    #: The artifact, relative to the model root.
    path: Annotated[str, msgspec.Meta(min_length=1)]
    #: ``auto`` picks by suffix: .pt2, .torchscript/.ts/.jit, .pt/.pth/.bin/.safetensors.
    format: Literal["auto", "export", "torchscript", "state_dict"] = "auto"
    #: Allow formats that can run code while loading (export, TorchScript, a module:Class).
    trusted: bool = False
    #: Hex SHA-256 of ``path``, checked on the bytes that are then deserialized.
    sha256: Sha256Hex | None = None
    #: For a state dict: a .pt2 whose parameters it replaces, or ``package.module:Class``.
    architecture: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    #: Hex SHA-256 of a .pt2 ``architecture``.
    architecture_sha256: Sha256Hex | None = None
    #: Keyword arguments for a ``module:Class`` architecture.
    architecture_kwargs: dict[str, KwargValue] = {}
    #: Declared inputs, in the forward's argument order (required unless the format is export).
    inputs: list[TensorConfig] | None = None
    #: Declared outputs, in the forward's return order (required unless the format is export).
    outputs: list[TensorConfig] | None = None
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    device: Annotated[str, msgspec.Meta(pattern=DEVICE_PATTERN)] = "auto"


class _Loaded(msgspec.Struct):
    torch: Any
    module: Any
    device: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ranges: dict[str, InputRanges]
    relations: DimRelations | None
    graph_inputs: list[str]


class TorchModel(Model):
    """A torch model version (``loader: {kind: torch, path: ...}``).

    :meth:`start` resolves the artifact inside the model root, reads it once, checks its digest,
    refuses code-executing formats unless trusted and pinned, and loads it in a worker thread.
    :meth:`predict` runs the module in a worker thread under ``torch.inference_mode()``.
    The ``torch-gpu`` batcher calls :meth:`forward_tensors` with tensors already on
    :attr:`device`.

    An exported program's dynamic dimensions keep their ``torch.export.Dim`` ranges: a request
    whose other dimensions fall outside them is a 400 before the module runs, and a batch
    dimension is never handed the program outside its range: :meth:`forward_tensors` splits
    more rows into calls of at most its ``max`` and pads fewer than its ``min`` with zero rows.
    The relations between dimensions (one ``Dim`` in two places, ``Dim`` arithmetic such as
    ``n + 1``) are checked too, and a program that relates its first dimension to another one
    is not batchable (:attr:`batch_conflict`).

    Attributes:
        device: The ``torch.device`` the module runs on (after :meth:`start`).
        format: The artifact's format.
        dim_ranges: Per input name, the range of each dynamic dimension (``None`` where the
            size is fixed); empty unless the signature comes from an exported program.
        batch_range: The rows one call of the program may take, when it bounds them (a
            batchable exported program with a ``max``, or a ``min`` above 1); else ``None``.
        relations: The relations between an exported program's input dimensions (``None``
            for other formats).
        batch_conflict: Why an exported program's first dimension is no batch dimension
            although every tensor's first dimension varies; ``None`` otherwise.
    """

    kind = "torch"
    platform = "pytorch"
    Config = TorchModelConfig
    config: TorchModelConfig

    def __init__(self, config: TorchModelConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        path = context.path
        self.format: Format = detect_format(config.path, config.format, config_path=path)
        # Everything the config alone decides fails here, before a file is touched.
        if self.format in CODE_EXECUTING:
            check_trust(
                _WHAT[self.format], trusted=config.trusted, sha256=config.sha256, config_path=path
            )
        if self.format == "state_dict":
            self._check_architecture(config, path)
        elif config.architecture is not None:
            raise ConfigError(
                f"{path}.architecture: only a state dict is loaded into an architecture; "
                f"this artifact is {self.format}",
                hint="drop `architecture:` or set `format: state_dict`",
            )
        needs_specs = self.format == "torchscript" or (
            self.format == "state_dict"
            and config.architecture is not None
            and architecture_kind(config.architecture, config_path=path) == "import"
        )
        for role in ("inputs", "outputs"):
            declared: list[TensorConfig] | None = getattr(config, role)
            if declared is None:
                if needs_specs:
                    raise ConfigError(
                        f"{path}.{role}: required for {self.format} models without a .pt2 "
                        "architecture (they carry no usable signature)",
                        hint=f"declare `{role}: [{{name: x, datatype: FP32, shape: [-1, 4]}}]`",
                    )
                continue
            names = [t.name for t in declared]
            if not names or len(set(names)) != len(names):
                raise ConfigError(
                    f"{path}.{role}: {names!r} must name at least one tensor, each once",
                    hint="give every tensor a distinct name",
                )
        self.inputs = [t.spec() for t in config.inputs or ()]
        self.outputs = [t.spec() for t in config.outputs or ()]
        self.device: Any = None
        self.dim_ranges: dict[str, InputRanges] = {}
        self.batch_range: DimRange | None = None
        self.relations: DimRelations | None = None
        self._torch: Any = None
        self._module: Any = None
        self._guards: Any = None
        self._graph_inputs: dict[str, str] = {}

    @staticmethod
    def _check_architecture(config: TorchModelConfig, path: str) -> None:
        if config.architecture is None:
            raise ConfigError(
                f"{path}.architecture: a state dict holds weights only; name the architecture "
                "to load them into",
                hint="a .pt2 exported program with the same parameter names, or "
                "'package.module:Class' (with `trusted: true`)",
            )
        if architecture_kind(config.architecture, config_path=path) == "export":
            check_trust(
                _WHAT["export"],
                trusted=config.trusted,
                sha256=config.architecture_sha256,
                config_path=path,
                sha256_key="architecture_sha256",
            )
        elif not config.trusted:
            raise ConfigError(
                f"{path}.trusted: refusing to import {config.architecture!r}: building a "
                "module:Class architecture runs that module's code",
                hint="set `trusted: true` if the class comes from code you installed, or use "
                "a .pt2 architecture",
            )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the artifact in a worker thread; a failed start keeps nothing.

        Raises:
            ConfigError: A path escapes the model root.
            ModelLoadError: Missing or corrupt file, digest mismatch, a state dict that is not
                weights-only data or does not fit its architecture, an unusable signature, or
                CUDA requested and not available.
        """
        try:
            loaded = await asyncio.to_thread(self._load)
        except InfercoreError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.context.path}: cannot load {display_name(self.config.path)!r} as "
                f"{self.format}: {_scrub(exc)}",
                hint="check that the file is complete and was written by a compatible torch",
            ) from None
        self._torch, self.device = loaded.torch, loaded.device
        self.inputs, self.outputs = loaded.inputs, loaded.outputs
        self.dim_ranges = loaded.ranges
        self.relations = loaded.relations
        self.batch_range = self._rows_per_call()
        # An exported module runs this input guard before anything else (torch 2.13 has it;
        # without it, no fallback): a failed call runs it again to tell a request the program
        # refuses (400) from a model that failed (500).
        self._guards = getattr(loaded.module, "_guards_fn", None)
        self._graph_inputs = {
            graph: spec.name for graph, spec in zip(loaded.graph_inputs, self.inputs, strict=False)
        }
        self._module = loaded.module
        if self.batch_conflict is not None:
            log.info(
                "%s: not batched: %s; each request runs whole",
                self.context.path,
                self.batch_conflict,
            )
        log.info(
            "%s: torch %s model loaded on %s (%d inputs, %d outputs)",
            self.context.path,
            self.format,
            loaded.device,
            len(self.inputs),
            len(self.outputs),
        )

    async def stop(self) -> None:
        """Drop the module; its memory is freed once in-flight calls return."""
        self._module = None
        self._guards = None

    @property
    def batch_conflict(self) -> str | None:
        return self.relations.batch_conflict if self.relations is not None else None

    @property
    def batchable(self) -> bool:
        """Whether requests may be stacked into one call: every tensor has a varying first
        dimension, and (for an exported program) it is a free one (:attr:`batch_conflict`)."""
        return self.batch_conflict is None and super().batchable

    def warmup_inputs(self) -> Tensors:
        """One zero row, each other varying dimension at the smallest size the program takes
        (the base warm-up runs it, checks the outputs and says so when it fails)."""
        return {s.name: np.zeros(self.sample_shape(s), dtype=s.dtype) for s in self.inputs}

    def sample_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """The smallest shape ``spec`` admits: one row, and each other varying dimension at the
        lower end of its range (a warm-up's; a size of 1 may be outside it), related ones
        sized together so that they keep the program's relations (y's ``n + 1`` from x's
        ``n``, or from a size declared in ``inputs:``)."""
        ranges = self.dim_ranges.get(spec.name, ())
        related: dict[DimRef, int] = {}
        if self.relations is not None:
            # Related dimensions are sized together, so the sample keeps their relations.
            fixed = {
                DimRef(s.name, i): d for s in self.inputs for i, d in enumerate(s.shape) if d >= 0
            }
            related = self.relations.sample_sizes(fixed, one_row=self.batchable)
        shape = []
        for index, dim in enumerate(spec.shape):
            if dim >= 0:
                shape.append(dim)
            elif index == 0 and self.batchable:
                shape.append(1)  # forward_tensors pads a batch to the program's min
            elif DimRef(spec.name, index) in related:
                shape.append(related[DimRef(spec.name, index)])
            else:
                found = ranges[index] if index < len(ranges) else None
                shape.append(max(1, found.lower) if found is not None else 1)
        return tuple(shape)

    def _rows_per_call(self) -> DimRange | None:
        if not self.dim_ranges or not self.batchable:
            return None
        firsts = [r[0] for r in self.dim_ranges.values() if r and r[0] is not None]
        if not firsts:
            return None
        lower = max(r.lower for r in firsts)
        uppers = [r.upper for r in firsts if r.upper is not None]
        upper = min(uppers) if uppers else None
        if (upper is None and lower <= 1) or (upper is not None and upper < max(lower, 1)):
            return None  # nothing to enforce, or a range no row count meets (left to torch)
        return DimRange(max(lower, 1), upper)

    def check_dims(self, inputs: Mapping[str, Array]) -> None:
        """Refuse a request whose shapes the model excludes, before it runs.

        Each input must have its spec's rank and fixed sizes (an exported program's guard
        does not check the rank: a tensor of another rank may run and return another shape,
        or fail inside the model). For an exported program, every dynamic dimension must
        lie in its range and keep the program's relations between dimensions (equal where
        they share a ``Dim``, ``n + 1`` where the program derives one). The batch dimension of
        a batchable model is left out: :meth:`forward_tensors` fits any row count to the
        program, and such a dimension takes part in no relation but the equality of rows.

        Raises:
            InvalidInput: Naming the input, the dimension, its size and what the model needs.
        """
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                continue  # a missing input has its own error
            shape = tuple(int(d) for d in array.shape)
            if len(shape) != len(spec.shape) or any(
                want >= 0 and got != want for got, want in zip(shape, spec.shape, strict=False)
            ):
                raise InvalidInput(
                    f"input {spec.name!r}: shape {list(shape)} does not match the model's "
                    f"{list(spec.shape)}",
                    hint=f"send {spec.name!r} with {len(spec.shape)} dimensions "
                    f"({', '.join('any' if d < 0 else str(d) for d in spec.shape)})",
                )
        if not self.dim_ranges:
            return
        skip_rows = self.batchable
        for name, ranges in self.dim_ranges.items():
            array = inputs.get(name)
            if array is None:
                continue
            for index, (allowed, size) in enumerate(zip(ranges, array.shape, strict=True)):
                if allowed is None or (index == 0 and skip_rows):
                    continue
                size = int(size)
                if not allowed.admits(size):
                    raise InvalidInput(
                        f"input {name!r}: dimension {index} is {size}, outside the model's "
                        f"range {allowed}",
                        hint=f"send {name!r} with dimension {index} in {allowed}",
                    )
        if self.relations is not None:
            self.relations.check(inputs, skip_rows=skip_rows)

    # -- inference --------------------------------------------------------------------------

    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the module on a batch in a worker thread.

        Raises:
            ModelNotReady: Not started, or stopped.
            InvalidInput: An input is missing or cannot take the model's dtype.
            BackendError: The module raised (the detail goes to the log).
        """
        if self._module is None:
            raise ModelNotReady(f"{self.context.path}: the torch model is not loaded")
        arrays = []
        for spec in self.inputs:
            try:
                arrays.append(as_input(spec, inputs[spec.name]))
            except KeyError:
                raise InvalidInput(f"missing input {spec.name!r}") from None
        self.check_dims(inputs)
        return await asyncio.to_thread(self._predict, arrays)

    def _predict(self, arrays: list[Array]) -> Tensors:
        torch = self._torch
        tensors = [torch.from_numpy(a).to(self.device) for a in arrays]
        outputs = self.forward_tensors(tensors)
        return {
            spec.name: to_numpy(out, spec, where=self.context.path)
            for spec, out in zip(self.outputs, outputs, strict=True)
        }

    def forward_tensors(self, tensors: Sequence[Any]) -> list[Any]:
        """Call the module on tensors already on :attr:`device`; blocking (run it in a thread).

        With a :attr:`batch_range`, a row count outside it is fitted to the program: more rows
        than its ``max`` run as calls of at most ``max`` rows, fewer than its ``min`` are padded
        with zero rows, and the outputs are joined with the padding dropped (the batching
        contract makes a batchable model row-wise, so this is what one call would give).

        Returns:
            One tensor per declared output, in :attr:`outputs` order, on :attr:`device`.

        Raises:
            ModelNotReady: Not started, or stopped.
            BackendError: The module raised, or returned something other than the declared
                tensors.
        """
        module = self._module
        if module is None:
            raise ModelNotReady(f"{self.context.path}: the torch model is not loaded")
        allowed = self.batch_range
        if allowed is not None and tensors:
            rows = int(tensors[0].shape[0])
            if not allowed.admits(rows):
                return self._forward_in_calls(module, tensors, rows, allowed)
        return self._call(module, tensors)

    def _forward_in_calls(
        self, module: Any, tensors: Sequence[Any], rows: int, allowed: DimRange
    ) -> list[Any]:
        torch = self._torch
        step = allowed.upper or rows
        pieces: list[list[Any]] = []
        with torch.inference_mode():
            for start in range(0, rows, step):
                n = min(step, rows - start)
                part = [t[start : start + n] for t in tensors]
                pad = max(0, allowed.lower - n)
                if pad:
                    part = [torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in part]
                outs = self._call(module, part)
                for spec, out in zip(self.outputs, outs, strict=True):
                    if out.dim() == 0 or int(out.shape[0]) != n + pad:
                        log.error(
                            "%s: output %r has %d rows for a call of %d rows",
                            self.context.path,
                            spec.name,
                            int(out.shape[0]) if out.dim() else 0,
                            n + pad,
                        )
                        raise BackendError(
                            f"{self.context.path}: the model returned malformed output"
                        )
                pieces.append([out[:n] for out in outs])
            return [torch.cat(parts) for parts in zip(*pieces, strict=True)]

    def _call(self, module: Any, tensors: Sequence[Any]) -> list[Any]:
        try:
            with self._torch.inference_mode():
                result = module(*tensors)
        except Exception as exc:
            refused = self._guard_refusal(exc, tensors)
            if refused is not None:
                raise refused from None
            log.error("%s: forward failed: %s", self.context.path, _scrub(exc))
            log.debug("%s: forward traceback", self.context.path, exc_info=exc)
            raise BackendError(f"{self.context.path}: the model failed to run") from exc
        return self._outputs_of(result)

    def _guard_refusal(self, exc: Exception, tensors: Sequence[Any]) -> InvalidInput | None:
        """The request's error when the exported program's own input guard refused
        ``tensors`` (a relation :meth:`check_dims` does not know, such as ``x.size()[0] % 2 ==
        0`` from a reshape), else ``None``.

        The guard runs before the program computes anything and raises ``AssertionError``;
        so may the model's own code, so the guard is run again alone to tell them apart. Only
        a failed call pays for it.
        """
        guards = self._guards
        if guards is None or not isinstance(exc, AssertionError):
            return None
        try:
            guards(*tensors)
        except AssertionError as failed:
            guard = str(failed).removeprefix("Guard failed:").strip()
        except Exception:
            return None
        else:
            return None  # the guard passes: the model itself failed
        guard = _GUARD_INPUT.sub(lambda m: self._graph_inputs.get(m[1], m[1]), guard)
        if len(guard) > _MAX_DETAIL:
            guard = guard[: _MAX_DETAIL - 1] + "…"
        shapes = ", ".join(
            f"{spec.name!r} {[int(d) for d in t.shape]}"
            for spec, t in zip(self.inputs, tensors, strict=False)
        )
        return InvalidInput(
            f"the inputs' shapes ({shapes}) break the model's check: {guard}",
            hint="send shapes that satisfy it (NAME.size()[i] is dimension i of input NAME)",
        )

    def _outputs_of(self, result: Any) -> list[Any]:
        torch = self._torch
        names = [spec.name for spec in self.outputs]
        if isinstance(result, Mapping):
            values = [result.get(name) for name in names]
        elif isinstance(result, list | tuple):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
            log.error(
                "%s: the module returned %s, expected %d tensors (%s)",
                self.context.path,
                type(result).__name__,
                len(names),
                ", ".join(names),
            )
            raise BackendError(f"{self.context.path}: the model returned malformed output")
        return values

    # -- loading (runs in a worker thread) ----------------------------------------------

    def _import_torch(self) -> Any:
        try:
            return importlib.import_module("torch")
        except ImportError:
            raise ModelLoadError(
                f"{self.context.path}: torch is not installed",
                hint="pip install 'infercore-torch[torch]' (or the CPU build from "
                "download.pytorch.org)",
            ) from None

    def _read(self, rel: str, sha256: str | None, key: str) -> bytes:
        path = self.context.path
        artifact = resolve_artifact(self.context.model_root, rel, config_path=f"{path}.{key}")
        if not artifact.is_file():
            raise ModelLoadError(f"{path}.{key}: the artifact is not a file")
        # Read once: the bytes whose digest was checked are the bytes deserialized.
        return read_verified(artifact, sha256, config_path=path)

    def _load(self) -> _Loaded:
        cfg, path = self.config, self.context.path
        torch = self._import_torch()
        device = select_device(torch, cfg.device, config_path=path)
        data = self._read(cfg.path, cfg.sha256, "path")
        program: Any = None
        if self.format == "export":
            with _quiet_torch_export(path):
                program = torch.export.load(io.BytesIO(data))
            module = program.module()
        elif self.format == "torchscript":
            module = torch.jit.load(io.BytesIO(data), map_location=device)
        else:
            state = self._state_dict(torch, data)
            module, program = self._architecture(torch)
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"{path}.architecture: the state dict does not fit it: {_scrub(exc)}",
                    hint="the state dict's keys and shapes must match the architecture's",
                ) from None
        if program is not None and device.type != "cpu":
            # CUDA-specific: also moves device constants baked into the graph.
            program = move_program(program, device)
            module = program.module()
            if self.format == "state_dict":
                module.load_state_dict(state, strict=True)
        module = module.to(device)
        if program is None:
            module.eval()  # exported modules are already in eval form (and refuse .eval())
        inputs, outputs = self._specs(torch, program)
        ranges = self._ranges(program, inputs)
        relations: DimRelations | None = None
        graph_inputs: list[str] = []
        if program is not None:
            graph_inputs = [str(n) for n in program.graph_signature.user_inputs]
            in_exprs, out_exprs = exported_dim_exprs(program)
            relations = DimRelations(
                [s.name for s in inputs],
                in_exprs,
                {s.name: e for s, e in zip(outputs, out_exprs, strict=True)},
                getattr(program, "range_constraints", None) or {},
            )
            for at in relations.unchecked:
                log.debug(
                    "%s: input %s is left to the program's own guard (it depends on symbols "
                    "no other dimension reveals)",
                    path,
                    at,
                )
        return _Loaded(torch, module, device, inputs, outputs, ranges, relations, graph_inputs)

    def _state_dict(self, torch: Any, data: bytes) -> dict[str, Any]:
        path = self.context.path
        if PurePath(self.config.path).suffix.lower() == ".safetensors":
            try:
                from safetensors.torch import load as load_safetensors
            except ImportError:
                raise ModelLoadError(
                    f"{path}.path: reading .safetensors needs the safetensors package",
                    hint="pip install safetensors, or save the state dict with torch.save",
                ) from None
            state: Any = load_safetensors(data)
        else:
            # torch.save writes a zip archive (legacy files: a pickle, protocol 2+ starts with
            # 0x80); anything else is no torch file at all, not a refused pickle.
            if not (data.startswith(b"PK\x03\x04") or data[:1] == b"\x80"):
                kind = "empty" if not data else "text" if data[:64].isascii() else "binary"
                raise ModelLoadError(
                    f"{path}.path: not a torch.save file (neither a zip archive nor a pickle: "
                    f"{len(data)} bytes, {kind})",
                    hint="point it at the state dict `torch.save(model.state_dict(), f)` wrote, "
                    "or a .safetensors file",
                )
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:
                # weights_only refuses any global outside torch's allow-list: a pickle that
                # would build other objects (or run code) ends here, unexecuted.
                raise ModelLoadError(
                    f"{path}.path: refused: the file is not weights-only data ({_scrub(exc)})",
                    hint="save plain tensors (`torch.save(model.state_dict(), f)`) or use "
                    "safetensors",
                ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ModelLoadError(
                f"{path}.path: expected a state dict (names to tensors), got "
                f"{type(state).__name__}",
                hint="save `model.state_dict()`, not the model or a checkpoint dict",
            )
        return state

    def _architecture(self, torch: Any) -> tuple[Any, Any]:
        cfg, path = self.config, self.context.path
        assert cfg.architecture is not None
        if architecture_kind(cfg.architecture, config_path=path) == "export":
            data = self._read(cfg.architecture, cfg.architecture_sha256, "architecture")
            with _quiet_torch_export(path):
                program = torch.export.load(io.BytesIO(data))
            return program.module(), program
        module_name, _, class_name = cfg.architecture.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(
                f"{path}.architecture: cannot import {cfg.architecture!r} ({type(exc).__name__})",
                hint="install the package that defines it in the server's environment",
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ModelLoadError(
                f"{path}.architecture: {cfg.architecture!r} is not a torch.nn.Module subclass"
            )
        return self._construct(cls), None

    def _construct(self, cls: type[Any]) -> Any:
        """``cls(**architecture_kwargs)``; keywords it does not take are a config error."""
        cfg, path = self.config, self.context.path
        try:
            parameters = inspect.signature(cls)
        except (TypeError, ValueError):  # no introspectable signature: let the call decide
            parameters = None
        if parameters is not None:
            try:
                parameters.bind(**cfg.architecture_kwargs)
            except TypeError as exc:
                names = [
                    p.name + ("" if p.default is inspect.Parameter.empty else "=…")
                    for p in parameters.parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
                raise ConfigError(
                    f"{path}.architecture_kwargs: {sorted(cfg.architecture_kwargs)!r} do not fit "
                    f"{cfg.architecture!r}: {exc}",
                    hint=f"{cls.__name__} takes: {', '.join(names) or 'no parameters'}",
                ) from None
        try:
            return cls(**cfg.architecture_kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"{path}.architecture_kwargs: building {cfg.architecture!r} with them failed: "
                f"{_scrub(exc)}",
                hint="check the values against the class's parameters",
            ) from None

    def _specs(self, torch: Any, program: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
        path = self.context.path
        declared_in, declared_out = self.inputs, self.outputs
        if program is None:
            return declared_in, declared_out
        found_in, found_out = exported_specs(program, config_path=path)
        for role, declared, found in (
            ("inputs", declared_in, found_in),
            ("outputs", declared_out, found_out),
        ):
            if declared and len(declared) != len(found):
                raise ModelLoadError(
                    f"{path}.{role}: {len(declared)} declared, but the exported program has "
                    f"{len(found)}",
                    hint=f"declare one entry per {role[:-1]}, in order, or drop `{role}:`",
                )
            if declared:
                check_declared(declared, found, role=role, config_path=path)
        return declared_in or found_in, declared_out or found_out

    def _ranges(self, program: Any, inputs: list[TensorSpec]) -> dict[str, InputRanges]:
        if program is None:
            return {}
        ranges = dict(zip([s.name for s in inputs], exported_input_ranges(program), strict=True))
        for index, spec in enumerate(inputs):
            for dim, (size, allowed) in enumerate(zip(spec.shape, ranges[spec.name], strict=True)):
                if size >= 0 and allowed is not None and not allowed.admits(size):
                    raise ModelLoadError(
                        f"{self.context.path}.inputs[{index}]: declared {spec.name!r} dimension "
                        f"{dim} as {size}, outside the exported program's range {allowed}",
                        hint=f"declare a size in {allowed}, or -1",
                    )
        return ranges


def move_program(program: Any, device: Any) -> Any:
    """``program`` (a ``torch.export`` program) with its parameters, buffers and the device
    constants baked into its graph on ``device``.

    ``torch.export.passes`` is a submodule ``import torch`` does not load (``torch.export.passes``
    as an attribute raises ``AttributeError`` until something imports it): import it by name.
    """
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device)


def to_numpy(tensor: Any, spec: TensorSpec, *, where: str = "model") -> Array:
    """A host array of ``spec``'s dtype from an output tensor: always a copy, so it never
    aliases a buffer the caller reuses (a staging buffer, or an input the module returned).

    The tensor must match ``spec``, and the declared datatype never changes a value: the dtype
    may only be cast within the same kind (a float is never truncated to a declared integer
    type), and where the declared type cannot hold every value of the tensor's
    (:func:`~infercore_torch.signature.holds_every_value`) the values themselves must survive
    the cast (:func:`~infercore_torch.signature.cast_checked`: integers within range, finite
    floats finite). Every fixed dimension of ``spec`` must be the tensor's.

    Args:
        tensor: One output of the module.
        spec: The declared (or exported) output it must match.
        where: The loader's config path, for the error.

    Raises:
        BackendError: The tensor's dtype has no numpy equivalent (bfloat16, …), or the tensor
            contradicts ``spec``'s datatype or shape, or a value does not fit the declared
            datatype (a fault of the server's config, not of the request).
    """
    out = tensor.detach()
    if out.device.type != "cpu":
        out = out.cpu()
    try:
        host = out.numpy()
    except TypeError:
        raise BackendError(
            f"model output {spec.name!r} has dtype {str(out.dtype).removeprefix('torch.')}, "
            "which numpy cannot hold"
        ) from None
    shape = tuple(int(d) for d in host.shape)
    if host.dtype != spec.dtype and not np.can_cast(host.dtype, spec.dtype, casting="same_kind"):
        raise BackendError(
            f"{where}.outputs: output {spec.name!r} is {host.dtype} {list(shape)}, which cannot "
            f"be served as the declared {spec.datatype} without changing its kind"
        )
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape, strict=False)
    ):
        raise BackendError(
            f"{where}.outputs: output {spec.name!r} has shape {list(shape)}, but "
            f"{list(spec.shape)} is declared"
        )
    if host.dtype == spec.dtype:
        return np.array(host, copy=True)
    cast, changed = cast_checked(host, spec.datatype)
    if changed is not None:
        returned = v2_datatype(host.dtype)
        raise BackendError(
            f"{where}.outputs: output {spec.name!r} is {returned}, declared {spec.datatype}, and "
            f"holds {changed}: serving it as {spec.datatype} would change it",
            hint=f"declare {spec.name!r} as {returned}, or cast in the model to a datatype that "
            "holds its values",
        )
    return cast
