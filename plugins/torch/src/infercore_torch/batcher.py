"""``batching: {kind: torch-gpu}``: the core ``dynamic`` batcher feeding a staging pipeline.

Queueing, batch forming, timeouts, cancellation, failure isolation and stopping are the
``dynamic`` batcher's own (this class subclasses it and changes none of that). What changes is
the model call: instead of concatenating the requests' arrays on the event loop and calling
``model.predict``, a batch is handed unstacked to a :class:`StagingPipeline` in a worker
thread, which writes the rows straight into preallocated (pinned) buffers and runs the model
on them, overlapping the copies of consecutive batches on CUDA streams.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

from infercore.builtins.batchers import DynamicBatcher, DynamicBatcherConfig
from infercore.components import BatchObserver, ComponentContext, Model, Tensors
from infercore.errors import ConfigError, ModelNotReady
from infercore_torch.model import TorchModel
from infercore_torch.pipeline import StagingPipeline

log = logging.getLogger("infercore.torch")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class TorchGpuBatcherConfig(
    DynamicBatcherConfig, forbid_unknown_fields=True, frozen=True, kw_only=True
):
    """The ``dynamic`` batcher's options, plus (each is described in the plugin's README):"""

    #: Batches in flight at once, each with its own buffers, stream and event.
    max_concurrent_batches: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    # preferred_batch_sizes (the dynamic batcher's option, each at most max_batch_size): here
    # also the sizes a batch is padded to with pad_to_preferred, so they must ascend.
    #: Pad each batch with zero rows up to the smallest preferred size that holds it.
    pad_to_preferred: bool = False


class RequestBatch(dict[str, Any]):
    """What :meth:`TorchGpuBatcher._stack` hands the model call: the requests, not stacked.

    The mapping itself is empty; :attr:`parts` holds each request's inputs in batch order.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Tensors]) -> None:
        super().__init__()
        self.parts = list(parts)


class _PipelinedModel(Model):
    """The model as the dynamic batcher sees it: same signature, predict runs the pipeline."""

    kind = "torch-gpu-pipeline"

    def __init__(self, model: TorchModel) -> None:
        super().__init__(model.config, model.context)
        self.wrapped = model
        self.inputs = []
        self.outputs = []
        self.pipeline: StagingPipeline | None = None

    async def predict(self, inputs: Tensors) -> Tensors:
        pipeline = self.pipeline
        if pipeline is None:
            raise ModelNotReady(f"{self.context.path}: the torch-gpu batcher is not started")
        # A lone request retried after its batch failed arrives as a plain mapping.
        parts = inputs.parts if isinstance(inputs, RequestBatch) else [inputs]
        return await asyncio.to_thread(pipeline.run, parts)


class TorchGpuBatcher(DynamicBatcher):
    """Dynamic batching into pinned host buffers with overlapped copies on CUDA streams.

    Batches ``kind: torch`` models only. Without a CUDA device (or with the model on
    ``device: cpu``) it logs one line at start and runs the same pipeline on CPU tensors.

    Attributes:
        pipeline: The staging pipeline (after :meth:`start`).
    """

    kind = "torch-gpu"
    Config = TorchGpuBatcherConfig
    config: TorchGpuBatcherConfig

    def __init__(
        self,
        config: TorchGpuBatcherConfig,
        context: ComponentContext,
        model: Model,
        observer: BatchObserver | None = None,
    ) -> None:
        path = context.path
        if not isinstance(model, TorchModel):
            raise ConfigError(
                f"{path}.kind: 'torch-gpu' batches torch models only; "
                f"{model.context.path} is kind {getattr(model, 'kind', '?')!r}",
                hint="use `kind: dynamic` for other models",
            )
        preferred = list(config.preferred_batch_sizes)
        if preferred != sorted(set(preferred)):
            raise ConfigError(
                f"{path}.preferred_batch_sizes: {preferred!r} must be ascending without repeats"
            )
        if config.pad_to_preferred and (not preferred or preferred[-1] != config.max_batch_size):
            raise ConfigError(
                f"{path}.pad_to_preferred: needs preferred_batch_sizes ending at max_batch_size "
                f"({config.max_batch_size}), so that every batch has a size to pad to",
                hint=f"e.g. preferred_batch_sizes: [1, 8, {config.max_batch_size}]",
            )
        self.torch_model = model
        self._pipelined = _PipelinedModel(model)
        super().__init__(config, context, self._pipelined, observer)

    @property
    def pipeline(self) -> StagingPipeline | None:
        return self._pipelined.pipeline

    async def start(self) -> None:
        """Build the pipeline (buffers, streams), warm each slot, then start the collector.

        Raises:
            ConfigError: The model's inputs or outputs have no batch dimension.
        """
        model, cfg = self.torch_model, self.config
        if not model.batchable:
            conflict = model.batch_conflict
            raise ConfigError(
                f"{self.context.path}.kind: 'torch-gpu' needs a model whose every input and "
                "output has a batch dimension (-1 first)"
                + (
                    f"; this one's first dimension is no batch dimension: {conflict}"
                    if conflict
                    else ""
                ),
                hint="declare the shapes with -1 first, or use `kind: none`"
                if conflict is None
                else "use `kind: none` or `kind: dynamic` (each request then runs whole), or "
                "export the program with a first dimension no other dimension depends on",
            )
        self._pipelined.inputs, self._pipelined.outputs = model.inputs, model.outputs
        torch = importlib.import_module("torch")
        pipeline = await asyncio.to_thread(
            StagingPipeline,
            torch,
            model,
            slots=cfg.max_concurrent_batches,
            buffer_rows=cfg.max_batch_size,
            preferred=cfg.preferred_batch_sizes,
            pad=cfg.pad_to_preferred,
        )
        if pipeline.cuda:
            log.info(
                "%s: torch-gpu: %d batches in flight on %s, pinned buffers of %d rows",
                self.context.path,
                cfg.max_concurrent_batches,
                pipeline.device,
                cfg.max_batch_size,
            )
        elif not torch.cuda.is_available():
            log.info("%s: no CUDA device; torch-gpu batches on the CPU", self.context.path)
        else:
            log.info(
                "%s: the model runs on the CPU (device: cpu); torch-gpu batches on the CPU",
                self.context.path,
            )
        await asyncio.to_thread(pipeline.warm)
        self._pipelined.pipeline = pipeline
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        self._pipelined.pipeline = None

    def _stack(self, live: list[Any]) -> Tensors:
        # The pipeline writes the rows into its buffers itself, off the event loop.
        return RequestBatch([item.inputs for item in live])
