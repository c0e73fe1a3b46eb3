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
from infercore.components import Array, ComponentContext, Model, Tensors, TensorSpec
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
from infercore_torch.signature import as_input, check_declared, exported_specs

log = logging.getLogger("infercore.torch")

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]
TensorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.\-]{0,127}$")]
Dim = Annotated[int, msgspec.Meta(ge=-1)]
KwargValue = int | float | str | bool | None | list[int | float | str | bool]

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")
# Terminal escape sequences (torch bolds parts of its weights-only message).
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_MAX_DETAIL = 200
_WHAT = {"export": "a torch.export program (.pt2)", "torchscript": "a TorchScript archive"}


def _scrub(exc: BaseException) -> str:
    """One line describing ``exc`` without filesystem paths (RELIABILITY S6)."""
    detail = _ABSOLUTE_PATH.sub("<path>", " ".join(_ANSI_ESCAPE.sub("", str(exc)).split()))
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


class TorchModel(Model):
    """A torch model version (``loader: {kind: torch, path: ...}``).

    :meth:`start` resolves the artifact inside the model root, reads it once, checks its digest,
    refuses code-executing formats unless trusted and pinned, and loads it in a worker thread.
    :meth:`predict` runs the module in a worker thread under ``torch.inference_mode()``.
    The ``torch-gpu`` batcher calls :meth:`forward_tensors` with tensors already on
    :attr:`device`.

    Attributes:
        device: The ``torch.device`` the module runs on (after :meth:`start`).
        format: The artifact's format.
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
        self._torch: Any = None
        self._module: Any = None

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
        self._module = loaded.module
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
        try:
            with self._torch.inference_mode():
                result = module(*tensors)
        except Exception as exc:
            log.error("%s: forward failed: %s", self.context.path, _scrub(exc))
            log.debug("%s: forward traceback", self.context.path, exc_info=exc)
            raise BackendError(f"{self.context.path}: the model failed to run") from exc
        return self._outputs_of(result)

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
            program = torch.export.passes.move_to_device_pass(program, device)
            module = program.module()
            if self.format == "state_dict":
                module.load_state_dict(state, strict=True)
        module = module.to(device)
        if program is None:
            module.eval()  # exported modules are already in eval form (and refuse .eval())
        inputs, outputs = self._specs(torch, program)
        return _Loaded(torch, module, device, inputs, outputs)

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


def to_numpy(tensor: Any, spec: TensorSpec, *, where: str = "model") -> Array:
    """A host array of ``spec``'s dtype from an output tensor: always a copy, so it never
    aliases a buffer the caller reuses (a staging buffer, or an input the module returned).

    The tensor must match ``spec``: its dtype may only be cast within the same kind (FP64 to
    a declared FP32 is fine; floats are never truncated to a declared integer type), and every
    fixed dimension of ``spec`` must be the tensor's.

    Args:
        tensor: One output of the module.
        spec: The declared (or exported) output it must match.
        where: The loader's config path, for the error.

    Raises:
        BackendError: The tensor's dtype has no numpy equivalent (bfloat16, …), or the tensor
            contradicts ``spec``'s datatype or shape.
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
    return np.array(host, dtype=spec.dtype, copy=True)
