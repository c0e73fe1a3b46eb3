"""``kind: lightgbm``: a LightGBM booster, loaded from its native text model format."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from infercore.artifacts import read_verified, resolve_artifact
from infercore.components import ComponentContext, Model, Tensors
from infercore.errors import (
    BackendError,
    ConfigError,
    InfercoreError,
    ModelLoadError,
    ModelNotReady,
)
from infercore_lightgbm.signature import INPUT_NAME, Signature, describe, read_objective
from infercore_lightgbm.text_format import MalformedModelText, check_model_text

log = logging.getLogger("infercore.lightgbm")

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]
_PICKLE_MAGIC = b"\x80"
_MAX_DETAIL = 200


def _one_line(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 1] + "…"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class LightGBMModel(Model):
    """A LightGBM booster (``loader: {kind: lightgbm, path: model.txt}``).

    The artifact is LightGBM's own text model format (``booster.save_model("model.txt")``),
    read once, checked against ``sha256`` when pinned, and handed to
    ``lightgbm.Booster(model_str=...)``: no pickle, no code from the file. The signature comes
    from the booster: input ``input`` (``[-1, num_feature]``); a ``binary`` objective gives
    ``probabilities`` (FP64 ``[-1, 2]``) and ``label`` (INT64 ``[-1]``), ``multiclass`` /
    ``multiclassova`` give ``probabilities`` (``[-1, k]``) and ``label``, and every other
    objective gives ``prediction`` (FP64 ``[-1]``, or ``[-1, k]`` for ``k`` outputs per row).
    """

    kind = "lightgbm"
    platform = "lightgbm"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
        """Options of ``kind: lightgbm``."""

        #: The text model file, relative to the model root.
        path: str
        #: Hex SHA-256 of the file, checked before LightGBM parses it.
        sha256: Sha256Hex | None = None
        #: Datatype clients send for ``input``.
        input_dtype: Literal["FP32", "FP64"] = "FP32"
        #: Classifier outputs, in this order; default: probabilities, then label.
        outputs: (
            Annotated[list[Literal["label", "probabilities"]], msgspec.Meta(min_length=1)] | None
        ) = None
        #: Threads LightGBM uses inside one predict call (0: its default, one per core).
        num_threads: Annotated[int, msgspec.Meta(ge=0)] = 1
        #: Use the first n boosting rounds; default: the best iteration saved with the model
        #: (all rounds when it has none).
        num_iteration: Annotated[int, msgspec.Meta(ge=1)] | None = None
        #: Binary classifiers: ``label`` is 1 when the probability of class 1 is at least this.
        binary_threshold: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5

    config: Config

    def __init__(self, config: Config, context: ComponentContext) -> None:
        super().__init__(config, context)
        if config.outputs is not None and len(set(config.outputs)) != len(config.outputs):
            raise ConfigError(
                f"{context.path}.outputs: {list(config.outputs)!r} names an output twice",
                hint="list each of 'label' and 'probabilities' at most once",
            )
        self._booster: Any = None
        self._signature: Signature | None = None
        # LightGBM serializes predict calls on one booster behind its own lock, and setting up
        # a predictor concurrently races (LightGBM#6142): one call at a time, from here.
        self._lock = threading.Lock()
        self.inputs = []
        self.outputs = []

    async def start(self) -> None:
        """Resolve, verify and parse the model in a worker thread; derive the signature.

        Raises:
            ConfigError: The path escapes the model root; ``outputs`` set for a booster that
                is not a classifier; ``num_iteration`` beyond the model's rounds.
            ModelLoadError: The file is missing, its digest differs, or it is not a LightGBM
                text model (a pickle is named as such; a truncated or corrupted text is
                refused before LightGBM, whose parser would abort the process, reads it).
        """
        try:
            booster, signature = await asyncio.to_thread(self._load)
        except InfercoreError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.context.path}: cannot load {self.config.path.rsplit('/', 1)[-1]!r} as "
                f"a LightGBM text model: {_one_line(exc)}",
                hint="save the booster with booster.save_model('model.txt') (or "
                "model_to_string()), with a compatible LightGBM version",
            ) from exc
        self._booster = booster
        self._signature = signature
        self.inputs = signature.inputs
        self.outputs = signature.outputs

    def _load(self) -> tuple[Any, Signature]:
        import lightgbm

        cfg, path = self.config, self.context.path
        artifact = resolve_artifact(self.context.model_root, cfg.path, config_path=f"{path}.path")
        data = read_verified(artifact, cfg.sha256, config_path=path)
        if data.startswith(_PICKLE_MAGIC):
            raise ModelLoadError(
                f"{path}.path: the file is a Python pickle, which this loader never reads "
                "(unpickling runs code from the file)",
                hint="save the booster in LightGBM's text format: booster.save_model('model.txt')",
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"{path}.path: the file is not text, so not a LightGBM text model",
                hint="save the booster with booster.save_model('model.txt')",
            ) from None
        # LightGBM's parser aborts the process (SIGABRT / SIGSEGV) on a truncated or corrupted
        # text instead of raising, so nothing reaches it that has not passed this check.
        try:
            check_model_text(data)
        except MalformedModelText as exc:
            raise ModelLoadError(
                f"{path}: cannot load {cfg.path.rsplit('/', 1)[-1]!r} as a LightGBM text model: "
                f"it is truncated or corrupted ({exc})",
                hint="the file looks truncated or corrupted: copy it again, or save the booster "
                "again with booster.save_model('model.txt')",
            ) from None
        booster = lightgbm.Booster(model_str=text)
        rounds = int(booster.current_iteration())
        if cfg.num_iteration is not None and cfg.num_iteration > rounds:
            raise ConfigError(
                f"{path}.num_iteration: {cfg.num_iteration} is more than the model's {rounds} "
                "boosting rounds",
                hint=f"use at most {rounds}, or leave it out",
            )
        signature = describe(
            objective=read_objective(text),
            num_feature=int(booster.num_feature()),
            outputs_per_row=int(booster.num_model_per_iteration()),
            input_datatype=cfg.input_dtype,
            requested=cfg.outputs,
            config_path=path,
        )
        return booster, signature

    async def stop(self) -> None:
        """Drop the booster."""
        self._booster = None

    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the booster on a batch in a worker thread.

        Raises:
            ModelNotReady: :meth:`start` has not succeeded.
            BackendError: LightGBM raised (the detail goes to the log, not the client).
        """
        booster, signature = self._booster, self._signature
        if booster is None or signature is None:
            raise ModelNotReady(f"{self.context.path}: the lightgbm model is not loaded")
        try:
            return await asyncio.to_thread(self._predict, booster, signature, inputs[INPUT_NAME])
        except Exception as exc:
            log.error("%s: prediction failed: %s", self.context.path, _one_line(exc))
            log.debug("%s: prediction traceback", self.context.path, exc_info=exc)
            raise BackendError("the lightgbm model failed on this request") from exc

    def _predict(self, booster: Any, signature: Signature, x: npt.NDArray[Any]) -> Tensors:
        with self._lock:
            raw = booster.predict(
                x, num_iteration=self.config.num_iteration, num_threads=self.config.num_threads
            )
        raw = np.asarray(raw, dtype=np.float64)
        if signature.task == "regression":
            return {"prediction": raw}
        if signature.task == "binary":
            positive = raw.reshape(-1)
            probabilities = np.column_stack([1.0 - positive, positive])
            labels = (positive >= self.config.binary_threshold).astype(np.int64)
        else:
            probabilities = raw.reshape(len(x), signature.n_classes)
            labels = np.argmax(probabilities, axis=1).astype(np.int64)
        out: Tensors = {"probabilities": probabilities, "label": labels}
        return {spec.name: out[spec.name] for spec in signature.outputs}
