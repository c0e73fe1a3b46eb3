"""``kind: sklearn``: a fitted scikit-learn classifier or regressor behind the model interface."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from infercore.artifacts import display_name, read_verified, resolve_artifact
from infercore.components import ComponentContext, Model, Tensors
from infercore.errors import (
    BackendError,
    ConfigError,
    InfercoreError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
)
from infercore_sklearn.formats import (
    check_trust,
    deserialize,
    detect_format,
)
from infercore_sklearn.signature import INPUT_NAME, Signature, describe

log = logging.getLogger("infercore.sklearn")

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]
TypeName = Annotated[str, msgspec.Meta(min_length=1)]

# Anything that looks like an absolute POSIX path inside a library's error message.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")
_MAX_DETAIL = 200
# scikit-learn's check_array, when a step inside a pipeline meets NaN or infinity it made itself.
_NOT_FINITE = re.compile(r"Input( X)? contains (NaN|infinity)")


def accepts_missing(estimator: Any) -> bool:
    """Whether ``estimator`` takes NaN in its input: its ``allow_nan`` tag.

    A pipeline's first step sees the input, so it decides for the pipeline. The tag comes from
    ``__sklearn_tags__()`` (scikit-learn 1.6 and later) or ``_get_tags()`` (older); an object
    with neither is taken not to accept NaN, scikit-learn's own default.
    """
    steps = getattr(estimator, "steps", None)
    if isinstance(steps, list):
        for step in steps:
            first = step[1] if isinstance(step, tuple) and len(step) == 2 else None
            if first is not None and not (isinstance(first, str) and first == "passthrough"):
                return accepts_missing(first)
    tags = getattr(estimator, "__sklearn_tags__", None)
    if callable(tags):
        try:
            return bool(tags().input_tags.allow_nan)
        except Exception:  # a third-party estimator with a broken tag method
            pass
    old_tags = getattr(estimator, "_get_tags", None)
    if callable(old_tags):
        try:
            return bool(old_tags().get("allow_nan", False))
        except Exception:
            pass
    return False


def _scrub(exc: BaseException) -> str:
    """A one-line description of ``exc`` that carries no filesystem path (RELIABILITY S6)."""
    detail = " ".join(str(exc).split())
    detail = _ABSOLUTE_PATH.sub("<path>", detail)
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 1] + "…"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class SklearnModel(Model):
    """A scikit-learn estimator loaded from skops (preferred), or a trusted pickle or joblib file.

    Serves one input ``input`` (``[-1, n_features_in_]``). A classifier returns ``label``
    (``[-1]``, INT64 for integer classes, BYTES for string classes) and ``probabilities``
    (FP64 ``[-1, n_classes]``, when it has ``predict_proba``); a regressor returns
    ``prediction`` (FP64 ``[-1]``, or ``[-1, k]`` for ``k`` outputs).
    """

    kind = "sklearn"
    platform = "sklearn"

    class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
        """Options of ``kind: sklearn``."""

        #: The artifact, relative to the model root.
        path: str
        #: ``auto`` picks by suffix: .skops, .pkl / .pickle, .joblib.
        format: Literal["auto", "skops", "pickle", "joblib"] = "auto"
        #: Types (as skops names them) trusted on top of skops' own defaults, after review.
        trusted_types: list[TypeName] = []
        #: Allow pickle / joblib, which run code while loading; needs ``sha256`` too.
        trusted: bool = False
        #: Hex SHA-256 of the artifact, checked before it is deserialized.
        sha256: Sha256Hex | None = None
        #: Datatype clients send for ``input``.
        input_dtype: Literal["FP32", "FP64"] = "FP64"
        #: Classifier outputs; default: both when the classifier has predict_proba.
        outputs: (
            Annotated[list[Literal["label", "probabilities"]], msgspec.Meta(min_length=1)] | None
        ) = None

    config: Config

    def __init__(self, config: Config, context: ComponentContext) -> None:
        super().__init__(config, context)
        # Everything that needs only the config fails here, before any file is touched.
        self._format = detect_format(config.path, config.format, config_path=context.path)
        check_trust(
            self._format, trusted=config.trusted, sha256=config.sha256, config_path=context.path
        )
        if config.outputs is not None and len(set(config.outputs)) != len(config.outputs):
            raise ConfigError(
                f"{context.path}.outputs: {list(config.outputs)!r} names an output twice",
                hint="list each of 'label' and 'probabilities' at most once",
            )
        self._estimator: Any = None
        self._accepts_missing = False
        self.inputs = []
        self.outputs = []

    async def start(self) -> None:
        """Resolve, verify and load the artifact in a thread, then derive the signature.

        Raises:
            ConfigError: The path escapes the model root, or ``outputs`` does not fit the model.
            ModelLoadError: Missing, corrupt, mismatching or untrusted artifact, or an object
                that is not a fitted classifier or regressor.
        """
        try:
            estimator, signature = await asyncio.to_thread(self._load)
        except InfercoreError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.context.path}: cannot load {display_name(self.config.path)!r} as "
                f"{self._format}: {_scrub(exc)}",
                hint="check that the file is complete and was written by the format named, with "
                "a compatible scikit-learn version",
            ) from exc
        self._estimator = estimator
        self._accepts_missing = accepts_missing(estimator)
        # NaN reaches an estimator that reads it as missing (the server refuses it otherwise).
        self.accepts_non_finite = self._accepts_missing
        self.inputs = signature.inputs
        self.outputs = signature.outputs

    def _load(self) -> tuple[Any, Signature]:
        cfg, path = self.config, self.context.path
        artifact: Path = resolve_artifact(
            self.context.model_root, cfg.path, config_path=f"{path}.path"
        )
        data = read_verified(artifact, cfg.sha256, config_path=path)
        estimator = deserialize(
            data, self._format, trusted_types=list(cfg.trusted_types), config_path=path
        )
        signature = describe(
            estimator, input_datatype=cfg.input_dtype, requested=cfg.outputs, config_path=path
        )
        return estimator, signature

    async def stop(self) -> None:
        """Drop the estimator."""
        self._estimator = None

    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the estimator on a batch in a thread.

        Raises:
            ModelNotReady: :meth:`start` has not succeeded.
            InvalidInput: NaN or infinity sent to an estimator that does not accept missing
                values (a 400 naming the input and the row, not a 500), or values the
                estimator's own steps turn into NaN or infinity.
            BackendError: The estimator raised (the detail goes to the log, not the client).
        """
        estimator = self._estimator
        if estimator is None:
            raise ModelNotReady(f"{self.context.path}: the sklearn model is not loaded")
        try:
            return await asyncio.to_thread(self._predict, estimator, inputs[INPUT_NAME])
        except InvalidInput:
            raise
        except ValueError as exc:
            if _NOT_FINITE.search(str(exc)):
                raise InvalidInput(
                    f"input {INPUT_NAME!r}: the model turns these values into NaN or infinity, "
                    "which it cannot process",
                    hint="send values inside the model's domain",
                ) from None
            log.error("%s: prediction failed: %s", self.context.path, _scrub(exc))
            log.debug("%s: prediction traceback", self.context.path, exc_info=exc)
            raise BackendError("the sklearn model failed on this request") from exc
        except Exception as exc:
            log.error("%s: prediction failed: %s", self.context.path, _scrub(exc))
            log.debug("%s: prediction traceback", self.context.path, exc_info=exc)
            raise BackendError("the sklearn model failed on this request") from exc

    def _check_finite(self, x: np.ndarray[Any, Any]) -> None:
        # An estimator that takes NaN as "missing" decides about NaN and infinity itself (a
        # refusal of infinity still comes back as InvalidInput, through _NOT_FINITE).
        if self._accepts_missing or not np.issubdtype(x.dtype, np.floating):
            return
        finite = np.isfinite(x)
        if finite.all():
            return
        bad = tuple(np.argwhere(~finite)[0])
        what = "NaN" if np.isnan(x[bad]) else "infinity"
        row = f" row {int(bad[0])}" if x.ndim > 1 else ""
        raise InvalidInput(
            f"input {INPUT_NAME!r}:{row} holds {what}, which this model does not accept",
            hint="send finite numbers (the estimator has no missing-value support)",
        )

    def _predict(self, estimator: Any, x: np.ndarray[Any, Any]) -> Tensors:
        self._check_finite(x)
        # Numeric warnings (a sqrt of a negative inside a pipeline …) would reach stderr with
        # library paths; errstate is per thread, so this affects this call only.
        with np.errstate(all="ignore"):
            return self._run(estimator, x)

    def _run(self, estimator: Any, x: np.ndarray[Any, Any]) -> Tensors:
        out: Tensors = {}
        for spec in self.outputs:
            if spec.name == "probabilities":
                out[spec.name] = np.asarray(estimator.predict_proba(x), dtype=np.float64)
            elif spec.name == "label":
                labels = np.asarray(estimator.predict(x))
                if spec.datatype == "BYTES":
                    # Python str (or bytes) objects, as the BYTES codec expects.
                    out[spec.name] = labels.astype(object)
                else:
                    out[spec.name] = labels.astype(spec.dtype, copy=False)
            else:
                out[spec.name] = np.asarray(estimator.predict(x), dtype=np.float64)
        return out
