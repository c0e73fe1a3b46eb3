"""The ``onnx`` model loader: one ONNX Runtime ``InferenceSession`` per model version."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from infercore.artifacts import resolve_artifact, verify_sha256_bytes
from infercore.components import ComponentContext, Model, Tensors, TensorSpec
from infercore.errors import BackendError, InvalidInput, ModelLoadError, ModelNotReady
from infercore.server.logs import FailureLog
from infercore_onnx.external_data import (
    ExternalFile,
    external_files,
    read_external_files,
    shown,
    unpinned,
)
from infercore_onnx.feed import prepare_input
from infercore_onnx.signature import tensor_specs

logger = logging.getLogger("infercore.onnx")

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
# In `run_on: auto`, a model whose calls outgrew `loop_max_ms` is measured on the event loop
# again once in this many calls, so it comes back when its batches shrink; only while its calls
# in the worker thread take under _PROBE_BELOW times `loop_max_ms` of CPU, so that a heavy model
# never stalls the loop for a whole call (a worker's measure also counts its GIL hand-overs, so
# it alone cannot bring a model back).
_PROBE_EVERY = 256
_PROBE_BELOW = 2.0
# Weight of the newest call in the running estimate of a call's time.
_EWMA = 0.2

_GPU_HINT = (
    "install onnxruntime-gpu (`pip install 'infercore-onnx[gpu]'`) in an environment without "
    "the CPU onnxruntime package, with a matching CUDA and cuDNN; or set device: cpu"
)

_EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# What each ORT load failure usually means, so the one-line error can say it without quoting
# ORT's message, which contains the model's absolute path (RELIABILITY S6).
_LOAD_FAILURES = {
    "InvalidProtobuf": "the file is not a valid ONNX model (corrupt or truncated)",
    "InvalidArgument": "the file is not a valid ONNX model (empty, corrupt or truncated)",
    "InvalidGraph": "the ONNX graph is invalid",
    "NoSuchFile": "a file the model needs (external data?) is missing",
    "NotImplemented": "the model uses an operator or opset this onnxruntime does not support",
}

# Where ONNX Runtime looks for an external data file it was not handed when the model comes
# from bytes (by default: the working directory): a path under which no file can exist.
_NO_FOLDER = os.devnull
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_SHA256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")

#: An ONNX file is one protobuf message, and protobuf refuses messages of 2 GiB or more: a larger
#: ``.onnx`` cannot be a model (a large one keeps its tensors in external data files, which
#: their own bounds cover). The default ``max_model_bytes``, so that a huge or endless file in
#: the model folder is refused from its size before a byte of it is held in memory.
MAX_MODEL_BYTES = 2 * 1024**3

#: The first onnxruntime whose Python ``SessionOptions`` has
#: ``add_external_initializers_from_files_in_memory`` (1.23.2 does not; 1.24.1 does).
_IN_MEMORY_EXTERNAL_DATA_ORT = "1.24"


class ModelTooLarge(ModelLoadError):
    """The ``.onnx`` file is larger than the loader's ``max_model_bytes``; nothing was read.

    Attributes:
        size: The file's size in bytes.
        limit: The ``max_model_bytes`` it broke.
    """

    def __init__(self, message: str, *, size: int, limit: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.size = size
        self.limit = limit


def _bytes(n: int) -> str:
    """``n`` bytes for a message: exact, and in binary units when that is shorter to read."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.4g} {unit})"
    return f"{n:,} bytes"


@dataclass(frozen=True, slots=True)
class _Loaded:
    session: Any
    ort: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]


def _scrub(text: str, root: Path) -> str:
    # ORT quotes the absolute path it was given; every artifact lives under the model root.
    return text.replace(str(root), "<model_root>")


def _one_line(text: str) -> str:
    return " ".join(_ORT_PREFIX.sub("", text).split())


class OnnxModel(Model):
    """A model version served by ONNX Runtime (``loader: {kind: onnx, path: ...}``).

    :meth:`start` resolves the artifact inside the model root, reads it and its external data
    files once, checks their locations and pinned digests, creates the ``InferenceSession``
    from those bytes in a worker thread and reads the signature from it. :meth:`predict` runs
    a call that takes less than ``loop_max_ms`` on the event loop and a longer one in a worker
    thread (``run_on``). ``onnxruntime`` is imported by :meth:`start`, not with this module.

    Attributes:
        providers: The execution providers the session ended up with, best first.
    """

    kind = "onnx"
    platform = "onnxruntime_onnx"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
        """Options of ``loader: {kind: onnx, ...}``.

        Attributes:
            path: The ``.onnx`` file, relative to the model root.
            sha256: The file's expected hex SHA-256; checked before ONNX Runtime reads it.
            external_data_sha256: The expected hex SHA-256 of each external data file, by its
                path relative to the ``.onnx`` file's folder (as ``sha256sum`` prints it
                there). When the model is pinned (this or ``sha256`` set), every external
                data file must be listed; entries for files the model does not use are
                ignored.
            intra_op_num_threads: Threads inside one operator; 0 lets ONNX Runtime choose.
            inter_op_num_threads: Threads across operators (parallel mode); 0 lets ONNX Runtime
                choose.
            execution_mode: ``sequential`` or ``parallel`` operator scheduling.
            graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
            device: ``cpu``; ``cuda`` (fail unless CUDA works); ``auto`` (CUDA when available,
                otherwise CPU with one INFO line).
            io_binding: When the session runs on the CUDA execution provider, bind inputs and
                outputs on the device with ``io_binding()`` instead of ``session.run``; without
                CUDA it changes nothing.
            run_on: Where a call runs. ``thread``: always in a worker thread. ``loop``: always
                on the event loop. ``auto``: on the event loop while a call takes less than
                ``loop_max_ms`` of CPU (a running estimate; a slower model moves to a thread, and is
                measured on the loop again once in 256 calls). A worker thread hands the GIL
                back and forth with the event loop, which for a small model costs more CPU
                than the call itself; a long call on the loop would hold up every request.
            loop_max_ms: The longest call ``auto`` runs on the event loop.
            max_model_bytes: The largest ``.onnx`` file the loader reads (its size is checked
                before it is read); 2 GiB by default, protobuf's own limit for one message.
                External data files are not counted here: each is read only as far as the
                model's tensors in it reach.
        """

        path: Annotated[str, msgspec.Meta(min_length=1)]
        sha256: _SHA256 | None = None
        external_data_sha256: dict[Annotated[str, msgspec.Meta(min_length=1)], _SHA256] = (
            msgspec.field(default_factory=dict)
        )
        intra_op_num_threads: Annotated[int, msgspec.Meta(ge=0)] = 1
        inter_op_num_threads: Annotated[int, msgspec.Meta(ge=0)] = 1
        execution_mode: Literal["sequential", "parallel"] = "sequential"
        graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
        device: Literal["auto", "cpu", "cuda"] = "cpu"
        io_binding: bool = False
        run_on: Literal["auto", "loop", "thread"] = "auto"
        loop_max_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 1.0
        max_model_bytes: Annotated[int, msgspec.Meta(ge=1)] = MAX_MODEL_BYTES

    def __init__(self, config: OnnxModel.Config, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.config: OnnxModel.Config = config
        self.inputs = []
        self.outputs = []
        self.providers: list[str] = []
        self._session: Any = None
        self._ort: Any = None
        self._output_names: list[str] = []
        #: Run failures: one ERROR per kind of failure every 10 s (a broken canary fails
        #: every request it gets), the rest at DEBUG, counted in the next ERROR.
        self._failures = FailureLog(logger)
        self._bind_on_cuda = False
        self._loop_max_s = config.loop_max_ms / 1000
        self._estimate_s = 0.0  # running estimate of a call on the event loop
        self._thread_estimate_s = 0.0  # and of a call in a worker thread
        self._thread_calls = 0

    async def start(self) -> None:
        """Load the model; on any failure nothing is kept and the error says why.

        Raises:
            ConfigError: ``path`` escapes the model root (``..`` or a symlink).
            ModelLoadError: The file is missing, fails its digest, is corrupt, has external data
                outside its folder, unpinned while the model is pinned, or failing its digest,
                has a non-tensor input or output, or CUDA was required and is not usable.
        """
        loaded = await asyncio.to_thread(self._load)
        # Assigned only once everything succeeded, so a failed start leaves nothing half-loaded.
        self._ort = loaded.ort
        self.inputs = loaded.inputs
        self.outputs = loaded.outputs
        self.providers = loaded.providers
        self._output_names = [spec.name for spec in loaded.outputs]
        self._session = loaded.session
        self._bind_on_cuda = self.config.io_binding and _CUDA in loaded.providers
        if self.config.io_binding and not self._bind_on_cuda:
            logger.info(
                "%s: io_binding: the session has no CUDA execution provider; running without it",
                self.context.path,
            )
        logger.info(
            "%s: ONNX model loaded (%d inputs, %d outputs, providers: %s)",
            self.context.path,
            len(self.inputs),
            len(self.outputs),
            ", ".join(self.providers),
        )

    async def stop(self) -> None:
        """Drop the session; ONNX Runtime frees it once in-flight runs finish."""
        self._session = None
        self._ort = None

    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the session on a batch in a worker thread.

        Raises:
            ModelNotReady: The model is not started (or already stopped).
            InvalidInput: An input is missing, has a rank or fixed dimension other than the
                model's, or cannot take the model's dtype (checked here, before ONNX Runtime
                sees it, and said in infercore's words).
            BackendError: ONNX Runtime failed while running: any error it raises once the
                inputs match the signature, a node's failure on some values (an index out of
                range in a Gather, a Reshape that does not fit) included. ONNX Runtime's
                message goes to the log only.
        """
        session, ort = self._session, self._ort
        if session is None:
            raise ModelNotReady(f"{self.context.path}: the model is not loaded")
        feed: dict[str, Any] = {}
        for spec in self.inputs:
            try:
                array = inputs[spec.name]
            except KeyError:
                raise InvalidInput(f"missing input {spec.name!r}") from None
            feed[spec.name] = prepare_input(spec, array)
        run_options = ort.RunOptions()
        # ONNX Runtime's own line for a failed run goes to stderr past infercore's log format
        # (and every time): its message is in the exception, logged below.
        run_options.log_severity_level = 4
        try:
            if self._bind_on_cuda:
                results = await asyncio.to_thread(self._run_bound, session, ort, feed, run_options)
            elif self._on_loop():
                # CPU time, not wall time: waiting for the GIL (another thread's turn) or for
                # the core is not the model's cost, and would move a fast model to a thread.
                t0 = time.thread_time()
                try:
                    results = session.run(None, feed, run_options)
                finally:
                    took = time.thread_time() - t0
                    self._estimate_s += _EWMA * (took - self._estimate_s)
                    if self._estimate_s > self._loop_max_s and self.config.run_on == "auto":
                        logger.debug(
                            "%s: a call takes about %.2f ms (last %.2f ms, %d rows), above "
                            "loop_max_ms: running calls in a worker thread",
                            self.context.path,
                            self._estimate_s * 1000,
                            took * 1000,
                            len(next(iter(feed.values()), ())),
                        )
            else:
                self._thread_calls += 1
                results, took = await asyncio.to_thread(_timed_run, session, feed, run_options)
                self._thread_estimate_s += _EWMA * (took - self._thread_estimate_s)
        except asyncio.CancelledError:
            # The worker thread cannot be cancelled; this makes ORT abandon the run early.
            run_options.terminate = True
            raise
        except Exception as exc:
            # Every input matched the signature (prepare_input: names, rank, fixed dimensions,
            # element type), so ONNX Runtime's own input checks (INVALID_ARGUMENT "Invalid
            # rank", "Got invalid dimensions", "Unexpected input data type") cannot fail here:
            # what it raises now failed inside the graph, whatever its status code (a Gather
            # index out of range is INVALID_ARGUMENT too). That is the model's failure (500
            # backend_error, which the canary guard counts), and ONNX Runtime's text, which
            # names nodes and source files, stays in the log.
            self._failures.log(
                logging.ERROR,
                (self.context.path, type(exc).__name__),
                "%s: onnxruntime run failed: %s: %s",
                self.context.path,
                type(exc).__name__,
                _one_line(str(exc)),
                extra={},
            )
            raise BackendError(f"{self.context.path}: the model failed to run") from exc
        if len(results) != len(self._output_names) or not all(
            isinstance(r, np.ndarray) for r in results
        ):
            logger.error("%s: onnxruntime returned non-tensor outputs", self.context.path)
            raise BackendError(f"{self.context.path}: the model returned malformed output")
        return dict(zip(self._output_names, results, strict=True))

    def _on_loop(self) -> bool:
        run_on = self.config.run_on
        if run_on != "auto":
            return run_on == "loop"
        if self._estimate_s <= self._loop_max_s:
            return True
        if (
            self._thread_calls >= _PROBE_EVERY
            and self._thread_estimate_s <= _PROBE_BELOW * self._loop_max_s
        ):
            # Measure it on the loop again (its batches may have shrunk): one call in many.
            self._thread_calls = 0
            self._estimate_s = self._loop_max_s
            return True
        return False

    def _run_bound(
        self, session: Any, ort: Any, feed: dict[str, Any], run_options: Any
    ) -> list[Any]:
        # CUDA-specific (io_binding with the CUDA execution provider; checked on a GPU by
        # benchmarks/gpu/run_gpu_checks.sh): inputs are copied to device OrtValues once, the
        # outputs stay on the device until one copy back, instead of ORT staging each call.
        binding = session.io_binding()
        for name, array in feed.items():
            if array.dtype == object or array.dtype.kind == "U":
                binding.bind_cpu_input(name, array)  # string tensors live on the host
            else:
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cuda", 0)
        session.run_with_iobinding(binding, run_options)
        return list(binding.copy_outputs_to_cpu())

    # -- loading (runs in a worker thread) ---------------------------------------------------

    def _import_ort(self) -> Any:
        try:
            return importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise ModelLoadError(
                f"{self.context.path}: onnxruntime is not installed ({exc.name or 'import'} "
                "failed)",
                hint="pip install infercore-onnx (or infercore-onnx[gpu] for CUDA)",
            ) from None

    def _requested_providers(self, ort: Any) -> list[str]:
        device = self.config.device
        if device == "cpu":
            return [_CPU]
        if _CUDA in ort.get_available_providers():
            return [_CUDA, _CPU]
        if device == "cuda":
            raise ModelLoadError(
                f"{self.context.path}.device: 'cuda' requested, but this onnxruntime build has "
                "no CUDAExecutionProvider",
                hint=_GPU_HINT,
            )
        logger.info(
            "%s: device=auto: this onnxruntime build has no CUDAExecutionProvider; using CPU",
            self.context.path,
        )
        return [_CPU]

    def _session_options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_num_threads
        options.inter_op_num_threads = self.config.inter_op_num_threads
        options.execution_mode = getattr(
            ort.ExecutionMode, _EXECUTION_MODES[self.config.execution_mode]
        )
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[self.config.graph_optimization_level]
        )
        return options

    def _create_session(
        self,
        ort: Any,
        source: bytes | Path,
        providers: list[str],
        external: dict[str, bytearray] | None = None,
        files: list[ExternalFile] | None = None,
        hint: str = "see the infercore.onnx log for onnxruntime's message",
    ) -> Any:
        root = self.context.model_root.resolve()
        options = self._session_options(ort)
        if isinstance(source, bytes):
            # ORT would look for a data file it was not handed (a tensor the check did not
            # see, or any when the onnx package is missing) relative to the working directory.
            options.add_session_config_entry(_FOLDER_KEY, _NO_FOLDER)
            if external and files:
                names = [key for f in files for key in f.keys]
                buffers = [external[f.name] for f in files for _ in f.keys]
                # ORT copies what it needs from the buffers while it creates the session; they
                # must stay alive until then (the caller holds them), not after.
                options.add_external_initializers_from_files_in_memory(
                    names, buffers, [len(b) for b in buffers]
                )
        model = source if isinstance(source, bytes) else str(source)
        try:
            return ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:
            name = type(exc).__name__
            logger.warning(
                "%s: onnxruntime could not load the model: %s: %s",
                self.context.path,
                name,
                _one_line(_scrub(str(exc), root).replace(_NO_FOLDER, "<none>")),
            )
            what = _LOAD_FAILURES.get(name, f"onnxruntime failed to load it ({name})")
            # `from None`: ORT's message (with the absolute path) must not ride along.
            raise ModelLoadError(
                f"{self.context.path}.path: cannot load the ONNX model: {what}", hint=hint
            ) from None

    def _check_providers(self, requested: list[str], actual: list[str]) -> None:
        if _CUDA not in requested or _CUDA in actual:
            return
        # ORT silently falls back to CPU when the CUDA provider cannot start (no driver, or
        # CUDA/cuDNN libraries missing).
        if self.config.device == "cuda":
            raise ModelLoadError(
                f"{self.context.path}.device: 'cuda' requested, but the CUDA execution provider "
                "failed to start",
                hint=_GPU_HINT,
            )
        logger.info(
            "%s: device=auto: the CUDA execution provider failed to start; using CPU",
            self.context.path,
        )

    def _pinned(self) -> bool:
        return self.config.sha256 is not None or bool(self.config.external_data_sha256)

    def _read_external(
        self, ort: Any, artifact: Path, files: list[ExternalFile] | None
    ) -> dict[str, bytearray] | None:
        """The external data files' bytes, checked; ``None`` when they are not read here.

        A pinned model (``sha256`` or ``external_data_sha256`` set) must pin each of its
        external data files: the tensors are most of a model, and a pin on the ``.onnx``
        alone would let its weights be swapped unnoticed while the operator believes the
        model pinned. An unpinned model loads its external data unchecked, as it loads its
        ``.onnx``: pinning is the operator's choice (RELIABILITY S2 requires it only for
        formats that run code, which ONNX is not).
        """
        path = self.context.path
        pins = self.config.external_data_sha256
        if files is None:
            if pins:
                raise ModelLoadError(
                    f"{path}.external_data_sha256: checking external data needs the onnx "
                    "package to read the model's references, and it is not installed",
                    hint="pip install onnx next to the server",
                )
            return None
        if not files:
            return None
        if self._pinned():
            missing = unpinned(files, pins)
            if missing:
                names = ", ".join(shown(name) for name in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ModelLoadError(
                    f"{path}.external_data_sha256: external data file {names}{more} is not "
                    "pinned while the model is (sha256 or external_data_sha256 set); nothing "
                    "was loaded",
                    hint="add each file's sha256 (`sha256sum` in the .onnx file's folder) "
                    "under external_data_sha256, keyed by its name there",
                )
        if not hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory"):
            if self._pinned():
                version = getattr(ort, "__version__", "of unknown version")
                raise ModelLoadError(
                    f"{path}: onnxruntime {version} cannot take external data from memory "
                    "(SessionOptions.add_external_initializers_from_files_in_memory), so the "
                    "model's pinned external data cannot be checked and then loaded",
                    hint=f"upgrade to onnxruntime {_IN_MEMORY_EXTERNAL_DATA_ORT} or newer "
                    f"(pip install 'onnxruntime>={_IN_MEMORY_EXTERNAL_DATA_ORT}'; "
                    "onnxruntime-gpu likewise)",
                )
            return None
        return read_external_files(artifact, files, pins, config_path=path)

    def _read_model(self, artifact: Path) -> bytes:
        """The ``.onnx`` file's bytes, refused from its size before any is read.

        The size comes from the open file (``fstat``), so it is the size of the file read, and
        the read takes at most one byte more: a file that grew since is refused, not read on.

        Raises:
            ModelTooLarge: The file is larger than ``max_model_bytes``.
            ModelLoadError: The file grew while it was read.
        """
        limit = self.config.max_model_bytes
        path = self.context.path
        with artifact.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                option = f"{path}.max_model_bytes"
                if limit >= MAX_MODEL_BYTES:
                    hint = (
                        "an .onnx file over 2 GiB cannot be a model (protobuf's limit): save "
                        "large tensors as external data (onnx.save_model(..., "
                        f"save_as_external_data=True)); {option} sets this limit"
                    )
                else:
                    hint = f"raise {option} (default {_bytes(MAX_MODEL_BYTES)}) to load it"
                raise ModelTooLarge(
                    f"{path}.path: the ONNX file is {_bytes(size)}, over the limit of "
                    f"{_bytes(limit)} ({option}); nothing was read",
                    size=size,
                    limit=limit,
                    hint=hint,
                )
            data = fh.read(size + 1)  # buffered: reads on past a short read, up to EOF
        if len(data) > size:
            raise ModelLoadError(
                f"{path}.path: the ONNX file grew while it was read; nothing was loaded",
                hint="something is writing the model's folder: keep it read-only",
            )
        return data

    def _load(self) -> _Loaded:
        path = self.context.path
        ort = self._import_ort()
        providers = self._requested_providers(ort)
        artifact = resolve_artifact(
            self.context.model_root, self.config.path, config_path=f"{path}.path"
        )
        if not artifact.is_file():
            raise ModelLoadError(
                f"{path}.path: the artifact is not a file",
                hint="point path at the .onnx file itself",
            )
        data = self._read_model(artifact)
        if self.config.sha256 is not None:
            verify_sha256_bytes(data, self.config.sha256, config_path=f"{path}.sha256")
        files = external_files(artifact, config_path=f"{path}.path", data=data)
        # ONNX Runtime loads the bytes whose digests and external-data locations were checked,
        # the model's and its external data's, each file read once: a file swapped after the
        # checks cannot slip in. Only an unpinned model that nothing could parse (without the
        # onnx package) is loaded from its path, where ONNX Runtime finds its data files.
        source: bytes | Path = data
        external = self._read_external(ort, artifact, files)
        hint = "see the infercore.onnx log for onnxruntime's message"
        if files is None:
            if not self._pinned():
                source = artifact
            else:
                # From bytes, ORT finds no data file: a model with external data fails, since
                # its weights' digests cannot be checked without reading its references.
                hint = (
                    "if the model has external data: a pinned model's external data must be "
                    "pinned too, which needs the onnx package (pip install onnx); otherwise " + hint
                )
        elif files and external is None:
            source = artifact  # an onnxruntime that cannot take them from memory; unpinned
        del data
        session = self._create_session(ort, source, providers, external, files, hint)
        del external  # ORT copied what it needed while it created the session
        inputs = tensor_specs(session.get_inputs(), role="input", config_path=path)
        outputs = tensor_specs(session.get_outputs(), role="output", config_path=path)
        actual = list(session.get_providers())
        self._check_providers(providers, actual)
        return _Loaded(session, ort, inputs, outputs, actual)


def _timed_run(session: Any, feed: dict[str, Any], run_options: Any) -> tuple[list[Any], float]:
    """``session.run`` in a worker thread, and the CPU time it took there."""
    t0 = time.thread_time()
    results = session.run(None, feed, run_options)
    return results, time.thread_time() - t0
