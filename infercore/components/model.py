"""The model interface: what a ``model_loader`` plugin provides."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from infercore.components.base import Component
from infercore.components.tensors import TensorSpec

#: A numpy array of any dtype and shape (the type of every tensor infercore passes around).
Array = npt.NDArray[Any]
Tensors = dict[str, Array]


class Model(Component):
    """A loaded model version that turns named input tensors into named output tensors.

    A ``model_loader`` plugin registers a subclass. infercore constructs it with its validated
    ``Config`` and a :class:`~infercore.components.base.ComponentContext` (``model_name`` and
    ``version`` set), then awaits :meth:`start`, which must load the artifact and set
    :attr:`inputs` and :attr:`outputs`, and then :meth:`warmup`. Only after both succeeded
    does the version receive traffic.

    :meth:`predict` receives a batch: every tensor whose spec is batched has the rows of one
    or more requests stacked along its first dimension, and must return one row per input row
    for every batched output. It runs on the event loop, so a blocking runtime must hand the
    work to a thread itself (``await asyncio.to_thread(...)``).
    """

    #: Shown as ``platform`` in the V2 model metadata, e.g. ``onnxruntime_onnx``.
    platform: ClassVar[str] = ""

    #: Whether NaN and infinities in float inputs reach :meth:`predict` (the model reads them
    #: as missing values, or refuses them itself with ``InvalidInput``). ``False``: the server
    #: answers 400 ``invalid_input`` naming the input and element before queueing (JSON cannot
    #: carry them; the binary extension can).
    accepts_non_finite: bool = False

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the model on a batch.

        Args:
            inputs: One array per input name, validated against :attr:`inputs`.

        Returns:
            One array per output name listed in :attr:`outputs`, of its declared datatype
            (numpy ``str``, ``bytes`` and ``object`` arrays are ``BYTES``) and shape (each
            fixed dimension as declared, one row per input row for a batched output). Nothing
            is cast: outputs that differ fail the call (500 ``backend_error``; the log names
            the output, what was declared and what came back), and fail the load at the
            warm-up.
        """

    async def warmup(self) -> None:
        """Run one prediction on :meth:`warmup_inputs` (a zero-filled row) so the first request
        pays no start-up cost.

        Its outputs go through the check every batch's outputs go through
        (:class:`~infercore.builtins.batchers.OutputCheck`: declared names, datatypes and
        shapes), so that a model whose outputs contradict :attr:`outputs` fails its load
        instead of reporting ready and answering every request 500. An override that does not
        call this method should check its outputs itself.

        Raises:
            ModelLoadError: :meth:`predict` raised, or returned outputs other than the declared
                ones; the message says it was the warm-up (``warm-up failed: …``). A failed
                warm-up fails the load.
            ConfigError: :meth:`predict` raised one (its message then says the same).
        """
        # Imported here: the built-in batchers import this module.
        from infercore.builtins.batchers import OutputCheck
        from infercore.errors import BackendError, ConfigError, InfercoreError, ModelLoadError

        where = self.context.path
        batch = self.warmup_inputs()
        try:
            outputs = await self.predict(batch)
        except ConfigError as exc:
            raise ConfigError(f"{where}: warm-up failed: {exc.message}", hint=exc.hint) from exc
        except InfercoreError as exc:
            raise ModelLoadError(f"{where}: warm-up failed: {exc.message}", hint=exc.hint) from exc
        except Exception as exc:
            raise ModelLoadError(f"{where}: warm-up failed: {type(exc).__name__}: {exc}") from exc
        # The rows of the first batched input, as a batcher counts a request's.
        rows = next((len(batch[s.name]) for s in self.inputs if s.batched and s.name in batch), 1)
        try:
            OutputCheck(self).check(outputs, rows)
        except BackendError as exc:
            raise ModelLoadError(
                f"{where}: warm-up failed: {exc.message.removeprefix(f'{where}: ')}",
                hint=exc.hint,
            ) from None

    def warmup_inputs(self) -> Tensors:
        """The batch :meth:`warmup` runs: per input, zeros (empty strings for ``BYTES``) of its
        declared shape, each variable dimension 1. Override it for a model whose zero row or
        sizes of 1 are no valid input; the warm-up keeps its output check and its message."""
        batch: Tensors = {}
        for spec in self.inputs:
            shape = tuple(1 if d < 0 else d for d in spec.shape)
            if spec.datatype == "BYTES":
                batch[spec.name] = np.full(shape, b"", dtype=object)
            else:
                batch[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return batch

    @property
    def batchable(self) -> bool:
        """Whether requests may be stacked into one call (every tensor has a batch dimension)."""
        return all(s.batched for s in self.inputs) and all(s.batched for s in self.outputs)
