"""The staging pipeline of the ``torch-gpu`` batcher: host buffers, device copies, streams.

One :class:`StagingPipeline` per model version holds ``slots`` staging slots, one per batch in
flight. A slot owns, per input, a host buffer of ``buffer_rows`` rows (pinned memory on CUDA),
a device buffer of the same shape (CUDA only), per output a pinned host buffer, a CUDA stream
and an event. A batch takes a free slot, writes each request's rows straight into the slot's
host buffers (zero-filling the padding rows up to a preferred size), and then, on CUDA, on the
slot's own stream: copies them in (``non_blocking``), runs the model, copies the outputs back
into the pinned output buffers (``non_blocking``) and records the slot's event. The worker
thread waits on that event only, so while one batch computes the next one's copy-in (its own
slot, its own stream) runs beside it, and a third can be copying out. Each request then gets
a copy of its own rows, so the slot is free for reuse the moment the event has fired.

Without CUDA the same pipeline runs with plain CPU tensors: no device buffers, no streams, no
events, the model reads the host buffer directly. Everything but the branches marked
"CUDA-specific" is exercised by the CPU tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infercore.components import Tensors, TensorSpec
from infercore.errors import BackendError, InvalidInput
from infercore_torch.model import TorchModel, to_numpy
from infercore_torch.signature import torch_dtype


@dataclass
class PipelineStats:
    """What the pipeline did, for tests and the benchmark (updated under the pipeline's lock).

    Attributes:
        batches: Batches run (warm-up included).
        rows: Request rows run.
        padded_rows: Zero rows added to reach a preferred size.
        in_flight: Batches holding a slot now.
        max_in_flight: Most batches that held a slot at once.
        extra_slots: Batches that found every slot taken and used a temporary one.
        oversize_buffers: Buffers allocated for a batch larger than ``buffer_rows``.
        slots_used: Indices of the slots that ran a batch.
    """

    batches: int = 0
    rows: int = 0
    padded_rows: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    extra_slots: int = 0
    oversize_buffers: int = 0
    slots_used: set[int] = field(default_factory=set)


class _Slot:
    """One batch in flight: its buffers, and on CUDA its stream and event."""

    def __init__(self, index: int, torch: Any, device: Any, cuda: bool) -> None:
        self.index = index
        self.host_in: dict[str, Any] = {}
        self.dev_in: dict[str, Any] = {}
        self.host_out: dict[str, Any] = {}
        # CUDA-specific: a stream per slot so consecutive batches overlap; an event per slot
        # so the worker waits for its own batch only.
        self.stream: Any = torch.cuda.Stream(device=device) if cuda else None
        self.done: Any = torch.cuda.Event() if cuda else None


def padded_size(rows: int, preferred: Sequence[int], pad: bool) -> int:
    """Rows the model is called with: ``rows``, or with ``pad`` the smallest preferred size
    that holds them.

    Raises:
        InvalidInput: ``pad`` and ``rows`` exceed the largest preferred size.
    """
    if not pad:
        return rows
    for size in preferred:
        if size >= rows:
            return size
    raise InvalidInput(
        f"the request has {rows} rows; this model takes at most {preferred[-1]} rows per call",
        hint="split the request",
    )


def _shape(value: Any) -> tuple[int, tuple[int, ...]] | None:
    """A request input's rank and trailing dimensions (its rows left out), or ``None`` for a
    missing or shapeless value (compared, not trusted: :meth:`TorchModel.check_dims` words
    any error)."""
    shape = getattr(value, "shape", None)
    return None if shape is None else (len(shape), tuple(shape[1:]))


class StagingPipeline:
    """Assemble, copy, run and split batches for one :class:`TorchModel` (see the module doc).

    :meth:`run` is blocking: call it from a worker thread, one thread per batch in flight.

    Args:
        torch: The torch module.
        model: A started torch model; its :attr:`~TorchModel.device` decides CUDA or CPU.
        slots: Staging slots, i.e. batches in flight at once.
        buffer_rows: Rows of each preallocated buffer (the batcher's largest batch).
        preferred: Preferred batch sizes, ascending.
        pad: Pad each batch with zero rows up to the smallest preferred size holding it.
    """

    def __init__(
        self,
        torch: Any,
        model: TorchModel,
        *,
        slots: int,
        buffer_rows: int,
        preferred: Sequence[int] = (),
        pad: bool = False,
    ) -> None:
        self.torch = torch
        self.model = model
        self.device = model.device
        self.cuda = self.device is not None and self.device.type == "cuda"
        self.buffer_rows = buffer_rows
        self.preferred = tuple(sorted(preferred))
        self.pad = pad
        self.stats = PipelineStats()
        self._lock = threading.Lock()
        self._slots = [_Slot(i, torch, self.device, self.cuda) for i in range(slots)]
        self._free = list(reversed(self._slots))
        self._preallocate()

    # -- slots and buffers ---------------------------------------------------------------

    def _preallocate(self) -> None:
        """Allocate every buffer whose shape the signature fixes (the rest on first use)."""
        for slot in self._slots:
            for spec in self.model.inputs:
                trailing = spec.shape[1:]
                if -1 in trailing:
                    continue
                dtype = torch_dtype(self.torch, spec.datatype)
                self._buffer(slot.host_in, spec, self.buffer_rows, trailing, dtype, host=True)
                if self.cuda:
                    self._buffer(slot.dev_in, spec, self.buffer_rows, trailing, dtype, host=False)
            if self.cuda:
                for spec in self.model.outputs:
                    trailing = spec.shape[1:]
                    if -1 not in trailing:
                        dtype = torch_dtype(self.torch, spec.datatype)
                        self._buffer(slot.host_out, spec, self.buffer_rows, trailing, dtype)
        if self.cuda:  # CUDA-specific: buffers exist before any slot stream uses them
            self.torch.cuda.synchronize(self.device)

    def _buffer(
        self,
        cache: dict[str, Any],
        spec: TensorSpec,
        rows: int,
        trailing: tuple[int, ...],
        dtype: Any,
        *,
        host: bool = True,
    ) -> Any:
        """A buffer of at least ``rows`` rows; cached per slot unless it is oversize."""
        buf = cache.get(spec.name)
        if (
            buf is not None
            and buf.shape[0] >= rows
            and tuple(buf.shape[1:]) == trailing
            and buf.dtype == dtype
        ):
            return buf
        oversize = rows > self.buffer_rows
        shape = (rows if oversize else self.buffer_rows, *trailing)
        if host:
            buf = self.torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
        else:
            buf = self.torch.empty(shape, dtype=dtype, device=self.device)
        if oversize:
            with self._lock:
                self.stats.oversize_buffers += 1
        else:
            cache[spec.name] = buf
        return buf

    def _acquire(self) -> _Slot:
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                # The batcher runs at most `slots` batches at once; this only happens if it
                # ever does not (a temporary slot keeps the request served).
                self.stats.extra_slots += 1
                slot = _Slot(-1, self.torch, self.device, self.cuda)
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            if slot.index >= 0:
                self.stats.slots_used.add(slot.index)
            return slot

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            self.stats.in_flight -= 1
            if slot.index >= 0:
                self._free.append(slot)

    # -- one batch --------------------------------------------------------------------------

    def run(self, parts: Sequence[Tensors]) -> Tensors:
        """Run the requests ``parts`` as one batch; blocking.

        Returns:
            The batch's outputs, ``rows`` rows each (padding dropped), as fresh arrays.

        Raises:
            InvalidInput: A request lacks an input, or its values cannot take the input's
                dtype, or (with padding) the batch exceeds the largest preferred size.
            BackendError: The model failed, or returned a wrong number of rows.
        """
        slot = self._acquire()
        try:
            return self._run_on(slot, parts)
        finally:
            self._release(slot)

    def warm(self) -> None:
        """Run a one-row zero batch through every slot (allocates lazy buffers, warms streams)."""
        row: Tensors = {}
        for spec in self.model.inputs:
            row[spec.name] = np.zeros(self.model.sample_shape(spec), dtype=spec.dtype)
        for slot in list(self._free):
            self._run_on(slot, [row])

    def _run_on(self, slot: _Slot, parts: Sequence[Tensors]) -> Tensors:
        first = self.model.inputs[0].name
        try:
            rows = sum(int(part[first].shape[0]) for part in parts)
        except KeyError:
            raise InvalidInput(f"missing input {first!r}") from None
        self._check_parts(parts)
        padded = padded_size(rows, self.preferred, self.pad)
        staged = self._assemble(slot, parts, rows, padded)
        with self._lock:
            self.stats.batches += 1
            self.stats.rows += rows
            self.stats.padded_rows += padded - rows
        if slot.stream is None:
            outs = self.model.forward_tensors(staged)
            for spec, out in zip(self.model.outputs, outs, strict=True):
                self._check_rows(spec, out, padded)
            # to_numpy copies: an output may alias the slot's host buffer (an identity model).
            return {
                spec.name: to_numpy(out[:rows], spec, where=self.model.context.path)
                for spec, out in zip(self.model.outputs, outs, strict=True)
            }
        return self._run_cuda(slot, staged, rows, padded)

    def _check_parts(self, parts: Sequence[Tensors]) -> None:
        """:meth:`TorchModel.check_dims` for each request, paid once per distinct shape.

        The model is batchable, so the check leaves the row dimension out, and a request
        whose every input has the first request's rank and trailing dimensions passes exactly
        when the first one does (the batcher only batches such requests). Only the model's
        inputs are compared: other keys are ignored, as the check ignores them.
        """
        model = self.model
        first = parts[0]
        model.check_dims(first)
        if len(parts) == 1:
            return
        if not model.batchable:
            for part in parts[1:]:
                model.check_dims(part)
            return
        shapes = [(spec.name, _shape(first.get(spec.name))) for spec in model.inputs]
        for part in parts[1:]:
            if any(_shape(part.get(name)) != shape for name, shape in shapes):
                model.check_dims(part)

    def _assemble(self, slot: _Slot, parts: Sequence[Tensors], rows: int, padded: int) -> list[Any]:
        """Write each request's rows into the slot's host buffers; views of ``padded`` rows."""
        staged = []
        for spec in self.model.inputs:
            arrays = []
            for part in parts:
                try:
                    arrays.append(np.asarray(part[spec.name]))
                except KeyError:
                    raise InvalidInput(f"missing input {spec.name!r}") from None
            trailing = tuple(int(d) for d in arrays[0].shape[1:])
            dtype = torch_dtype(self.torch, spec.datatype)
            buf = self._buffer(slot.host_in, spec, padded, trailing, dtype)
            host = buf.numpy()  # shares the buffer's memory
            if len(arrays) > 1:
                # One C loop writes every request's rows; a part it refuses is found below.
                try:
                    np.concatenate(arrays, axis=0, out=host[:rows], casting="same_kind")
                except (TypeError, ValueError):
                    pass
                else:
                    arrays = []
            offset = 0
            for array in arrays:
                n = int(array.shape[0])
                try:
                    np.copyto(host[offset : offset + n], array, casting="same_kind")
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(
                        f"input {spec.name!r}: expected {spec.datatype} rows of shape "
                        f"{list(trailing)}, got {array.dtype} {list(array.shape)}",
                        hint=f"send {spec.datatype} values",
                    ) from exc
                offset += n
            if padded > rows:
                host[rows:padded] = 0
            staged.append(buf[:padded])
        return staged

    def _check_rows(self, spec: TensorSpec, out: Any, padded: int) -> None:
        if out.dim() == 0 or int(out.shape[0]) != padded:
            got = int(out.shape[0]) if out.dim() else 0
            raise BackendError(
                f"{self.model.context.path}.outputs: output {spec.name!r} has {got} rows for a "
                f"batch of {padded} rows; torch-gpu needs one output row per input row",
                hint=f"declare {spec.name!r} without -1 first and use `batching: {{kind: none}}` "
                "if the model does not return one row per input row",
            )

    def _run_cuda(self, slot: _Slot, staged: list[Any], rows: int, padded: int) -> Tensors:
        # CUDA-specific: everything below runs only with a CUDA device (checked by the `gpu`
        # tests and benchmarks/gpu/run_gpu_checks.sh).
        torch = self.torch
        with torch.cuda.stream(slot.stream):
            on_device = []
            for spec, host in zip(self.model.inputs, staged, strict=True):
                trailing = tuple(host.shape[1:])
                dev = self._buffer(slot.dev_in, spec, padded, trailing, host.dtype, host=False)
                on_device.append(dev[:padded].copy_(host, non_blocking=True))
            outs = self.model.forward_tensors(on_device)
            copied = []
            for spec, out in zip(self.model.outputs, outs, strict=True):
                self._check_rows(spec, out, padded)
                trailing = tuple(out.shape[1:])
                dest = self._buffer(slot.host_out, spec, padded, trailing, out.dtype)
                copied.append(dest[:padded].copy_(out, non_blocking=True))
            slot.done.record(slot.stream)
        # Wait for this slot's batch only; the other slots' streams keep running.
        slot.done.synchronize()
        return {
            spec.name: to_numpy(host[:rows], spec, where=self.model.context.path)
            for spec, host in zip(self.model.outputs, copied, strict=True)
        }
