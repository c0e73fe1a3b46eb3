"""alibi-detect's drift detectors as infercore ``drift_detector`` kinds.

| kind | alibi-detect class | columns |
|---|---|---|
| ``alibi-ks`` | ``KSDrift`` | numeric |
| ``alibi-cvm`` | ``CVMDrift`` | numeric |
| ``alibi-chi2`` | ``ChiSquareDrift`` | categorical |
| ``alibi-tabular`` | ``TabularDrift`` | numeric (KS) and categorical (chi-square) |
| ``alibi-mmd`` | ``MMDDrift`` | numeric, multivariate; needs PyTorch, TensorFlow or KeOps |
| ``alibi-lsdd`` | ``LSDDDrift`` | numeric, multivariate; needs PyTorch or TensorFlow |

``alibi_detect`` is imported when a detector starts (it takes seconds), never when the plugin
registers. The detector is built in ``start`` either from a reference sample (``reference``)
or loaded from a folder saved by alibi-detect (``load_path``, under the trust rules of
:mod:`infercore_alibi_detect.artifact`).

Categorical columns (strings) are encoded as integer codes: a string column's categories are
sorted (or taken from ``categories_per_feature``), each value becomes its position, and a
value the vocabulary does not have becomes one extra code ("unseen"). alibi-detect infers
the categories of each feature from the encoded reference and counts a window's values over
the union of reference and window categories.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from infercore.artifacts import resolve_artifact
from infercore.components import ComponentContext, DriftDetector, DriftResult, Tensors
from infercore.drift.columns import Array, Columns, is_categorical
from infercore.drift.reference import load_reference, reference_format, select_columns
from infercore.errors import ConfigError, ModelLoadError
from infercore_alibi_detect.artifact import load_checked

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]
PVal = Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)]
Correction = Literal["bonferroni", "fdr"]
#: Device of the ``pytorch`` and ``keops`` backends (MMD, LSDD).
Device = Literal["cpu", "cuda", "auto"]
#: Column -> ``null`` (categorical; categories from the reference), an int ``n`` (a numeric
#: column holding codes ``0 … n-1``), or the list of a string column's categories in code order.
Categories = dict[str, int | list[str] | None]

#: Package to install for each backend.
BACKENDS = {"pytorch": "torch", "tensorflow": "tensorflow", "keops": "pykeops"}


def _backend_hint(backend: str) -> str:
    if backend == "pytorch":
        fix = (
            "install torch (not part of infercore's lock; the CPU build: .ci/install-torch-cpu, "
            "or pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        )
    else:
        fix = (
            f"use backend: pytorch (the tested one), or pip install {BACKENDS[backend]} "
            "(not part of infercore's lock)"
        )
    return f"{fix}; alibi-ks, alibi-cvm, alibi-chi2 and alibi-tabular need no backend"


class WindowError(ValueError):
    """A window that lacks a column the detector tests, or has it in the wrong type."""


class _Common(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Reference sample (parquet, npz or csv) relative to the model root; or use ``load_path``.
    reference: str | None = None
    #: A folder written by alibi-detect's ``save_detector``, relative to the model root.
    load_path: str | None = None
    #: Hex SHA-256 of ``reference`` (the file), or the tree digest of ``load_path``.
    sha256: Sha256 | None = None
    #: Allow a ``load_path`` folder with code-executing parts (dill, pickle, model files);
    #: needs ``sha256``.
    trusted: bool = False
    #: Columns (or tensor names) to test, in order; required with ``load_path``.
    features: list[str] | None = None
    #: Level of the test (after correction, for the per-feature tests).
    p_val: PVal = 0.05


class KSConfig(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``bonferroni`` or ``fdr`` (Benjamini-Hochberg) across features.
    correction: Correction = "bonferroni"


class CVMConfig(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``bonferroni`` or ``fdr`` (Benjamini-Hochberg) across features.
    correction: Correction = "bonferroni"


class Chi2Config(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``bonferroni`` or ``fdr`` (Benjamini-Hochberg) across features.
    correction: Correction = "bonferroni"
    #: Categorical columns and their categories (see :data:`Categories`).
    categories_per_feature: Categories | None = None


class TabularConfig(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``bonferroni`` or ``fdr`` (Benjamini-Hochberg) across features.
    correction: Correction = "bonferroni"
    #: Categorical columns and their categories (see :data:`Categories`); string columns are
    #: categorical anyway.
    categories_per_feature: Categories | None = None


class MMDConfig(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``pytorch``, ``tensorflow`` or ``keops``; the package must be installed.
    backend: Literal["pytorch", "tensorflow", "keops"] = "pytorch"
    #: Permutations of the permutation test: each costs a pass over the window's and the
    #: reference's kernel matrix; 100 resolves p-values to 0.01, enough for a serving window.
    n_permutations: Annotated[int, msgspec.Meta(ge=10, le=100_000)] = 100
    #: Where ``pytorch`` and ``keops`` compute: ``cpu`` (the default: the GPU stays the
    #: model's), ``cuda`` (refused at start when no GPU is visible) or ``auto`` (a GPU when
    #: one is visible). TensorFlow places its ops itself: only ``cpu`` is accepted with it.
    device: Device = "cpu"


class LSDDConfig(_Common, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``pytorch`` or ``tensorflow``; the package must be installed.
    backend: Literal["pytorch", "tensorflow"] = "pytorch"
    #: Permutations of the permutation test (see :class:`MMDConfig`).
    n_permutations: Annotated[int, msgspec.Meta(ge=10, le=100_000)] = 100
    #: ``cpu``, ``cuda`` or ``auto`` (see :class:`MMDConfig`).
    device: Device = "cpu"


class AlibiDetector(DriftDetector):
    """Common part: config checks, reference or saved detector, column encoding, results."""

    #: Name of the alibi-detect class in ``alibi_detect.cd``.
    alibi_class: ClassVar[str]
    #: ``numeric``, ``categorical`` or ``mixed`` columns.
    columns: ClassVar[str] = "numeric"
    #: Whether the test gives one p-value per feature (else one for the whole window).
    per_feature: ClassVar[bool] = True

    def __init__(self, config: Any, context: ComponentContext) -> None:
        super().__init__(config, context)
        path = context.path
        if (config.reference is None) == (config.load_path is None):
            raise ConfigError(
                f"{path}: set exactly one of `reference` and `load_path`",
                hint="reference: a sample of training inputs; load_path: a folder saved by "
                "alibi-detect's save_detector",
            )
        if config.reference is not None:
            reference_format(config.reference, config_path=f"{path}.reference")
            if config.trusted:
                raise ConfigError(
                    f"{path}.trusted: only applies to `load_path`",
                    hint="a reference sample is data, not code: remove `trusted`",
                )
        if config.trusted and config.sha256 is None:
            raise ConfigError(
                f"{path}.trusted: trusted: true needs a pinned sha256",
                hint="python -m infercore_alibi_detect digest <folder>",
            )
        if config.load_path is not None and not config.features:
            raise ConfigError(
                f"{path}.features: required with `load_path` (the columns of the saved "
                "detector's reference, in order)"
            )
        if config.features is not None and not config.features:
            raise ConfigError(f"{path}.features: empty list; omit it to test all")
        if len(set(config.features or [])) != len(config.features or []):
            raise ConfigError(f"{path}.features: a column is named twice")
        backend = getattr(config, "backend", None)
        if backend is not None:
            if backend == "tensorflow" and config.device != "cpu":
                raise ConfigError(
                    f"{path}.device: {config.device!r} is for the pytorch and keops backends; "
                    "TensorFlow places its operations itself",
                    hint="remove `device`, or use backend: pytorch",
                )
            module = BACKENDS[backend]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{path}.backend: {self.kind} with backend {backend!r} needs {module!r}, "
                    "which is not installed",
                    hint=_backend_hint(backend),
                )
        self.name = str(context.extra.get("detector_name", self.kind))
        self.features: list[str] = []
        self._vocab: dict[str, dict[str, int]] = {}
        self._categorical: set[str] = set()
        self._cd: Any = None

    # --- building ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._build)

    def _categories(self) -> Categories:
        return dict(getattr(self.config, "categories_per_feature", None) or {})

    def _build(self) -> None:
        path = self.context.path
        cats = self._categories()
        if self.config.load_path is not None:
            folder = resolve_artifact(
                self.context.model_root, self.config.load_path, config_path=f"{path}.load_path"
            )
            detector = load_checked(
                folder,
                sha256=self.config.sha256,
                trusted=self.config.trusted,
                config_path=f"{path}.load_path",
            )
            found = type(detector).__name__
            if found != self.alibi_class:
                raise ModelLoadError(
                    f"{path}.load_path: the saved detector is a {found}, not a "
                    f"{self.alibi_class} ({self.kind})",
                    hint="use the kind that matches the saved detector",
                )
            width = int(np.asarray(detector.x_ref).reshape(len(detector.x_ref), -1).shape[1])
            self.features = _saved_columns(list(self.config.features), width, f"{path}.features")
            for name, spec in cats.items():
                if name not in self.features:
                    raise ConfigError(
                        f"{path}.categories_per_feature: {name!r} is not in `features`"
                    )
                self._categorical.add(name)
                if isinstance(spec, list):
                    self._vocab[name] = {v: i for i, v in enumerate(spec)}
            self._cd = detector
            return
        reference = load_reference(
            self.context.model_root,
            self.config.reference,
            sha256=self.config.sha256,
            config_path=f"{path}.reference",
        )
        self.features = self._select(reference, cats)
        x_ref = self._encode_reference(reference, cats)
        self._cd = self._make(x_ref)

    def _select(self, reference: Columns, cats: Categories) -> list[str]:
        path = f"{self.context.path}.features"
        for name in cats:
            if name not in reference:
                raise ConfigError(
                    f"{self.context.path}.categories_per_feature: {name!r} not in the reference",
                    hint=f"reference columns: {', '.join(reference)}",
                )
        if self.columns == "numeric":
            return select_columns(reference, self.config.features, config_path=path, numeric=True)
        if self.columns == "mixed" or self.config.features is not None:
            return select_columns(reference, self.config.features, config_path=path)
        names = [n for n in reference if is_categorical(reference[n]) or n in cats]
        if not names:
            raise ConfigError(
                f"{path}: the reference has no categorical columns to test",
                hint="name numeric columns holding codes in categories_per_feature",
            )
        return names

    def _encode_reference(self, reference: Columns, cats: Categories) -> Array:
        path = self.context.path
        for name in self.features:
            col = reference[name]
            spec = cats.get(name)
            if self.columns == "categorical" or is_categorical(col) or name in cats:
                self._categorical.add(name)
            if is_categorical(col):
                if isinstance(spec, int):
                    raise ConfigError(
                        f"{path}.categories_per_feature.{name}: a number of codes is for numeric "
                        "columns; this one holds strings",
                        hint="give the list of its categories, or null",
                    )
                values = spec if isinstance(spec, list) else sorted(set(col.tolist()))
                self._vocab[name] = {v: i for i, v in enumerate(values)}
            elif isinstance(spec, list):
                raise ConfigError(
                    f"{path}.categories_per_feature.{name}: a list of categories is for string "
                    "columns; this one is numeric",
                    hint="give the number of codes, or null",
                )
        x_ref = self._encode({n: reference[n] for n in self.features})
        if x_ref.shape[0] < 2:
            raise ConfigError(f"{path}.reference: fewer than 2 complete rows")
        return x_ref

    def _make(self, x_ref: Array) -> Any:
        raise NotImplementedError

    # --- windows ----------------------------------------------------------------------------

    def _encode(self, window: Tensors) -> Array:
        """The detector's columns as one float matrix; rows with a missing number are left out."""
        cols = []
        for name in self.features:
            col = window.get(name)
            if col is None:
                raise WindowError(
                    f"the window has no column {name!r} (it has: {', '.join(window) or 'none'})"
                )
            vocab = self._vocab.get(name)
            if vocab is not None:
                if not is_categorical(col):
                    raise WindowError(f"column {name!r} holds numbers, not categories")
                unseen = len(vocab)
                cols.append(np.fromiter((vocab.get(v, unseen) for v in col), np.float64, len(col)))
            else:
                if is_categorical(col):
                    raise WindowError(f"column {name!r} holds categories, not numbers")
                cols.append(np.asarray(col, dtype=np.float64))
        x: Array = np.column_stack(cols)
        keep: Array = ~np.isnan(x).any(axis=1)
        return x[keep]

    def detect(self, window: Tensors) -> DriftResult:
        x = self._encode(window)
        if x.shape[0] < 2:
            raise WindowError("fewer than 2 complete rows in the window")
        out = self._cd.predict(
            x.astype(np.float32) if not self.per_feature else x,
            return_p_val=True,
            return_distance=True,
            **({"drift_type": "batch"} if self.per_feature else {}),
        )
        data = out["data"]
        drift = bool(data["is_drift"])
        info: dict[str, Any] = {"p_val": self.config.p_val, "alibi_class": self.alibi_class}
        if not self.per_feature:
            key = "multivariate"
            info["distance_threshold"] = float(data.get("distance_threshold", float("nan")))
            return DriftResult(
                detector=self.name,
                drift=drift,
                scores={key: float(data["distance"])},
                p_values={key: float(data["p_val"])},
                feature_drift={key: drift},
                info=info,
            )
        p = np.asarray(data["p_val"], dtype=np.float64).reshape(-1)
        dist = np.asarray(data["distance"], dtype=np.float64).reshape(-1)
        threshold = data.get("threshold")
        info["correction"] = self.config.correction
        if np.ndim(threshold) == 0 and threshold is not None:
            t = float(threshold)
            info["threshold"] = t
            flags = [bool(drift and v < t) for v in p]
        else:  # alibi's fdr returns every candidate threshold when nothing drifted
            info["threshold"] = None
            flags = [False] * len(p)
        return DriftResult(
            detector=self.name,
            drift=drift,
            scores={f: float(d) for f, d in zip(self.features, dist, strict=True)},
            p_values={f: float(v) for f, v in zip(self.features, p, strict=True)},
            feature_drift=dict(zip(self.features, flags, strict=True)),
            info=info,
        )


def _cd() -> Any:
    import alibi_detect.cd as cd

    return cd


def _device(backend: str, device: str, path: str) -> dict[str, Any]:
    """alibi-detect's ``device`` argument: none for TensorFlow, ``None`` for ``auto``.

    Raises:
        ConfigError: ``cuda`` asked for with the pytorch backend and no GPU visible to torch.
    """
    if backend == "tensorflow":
        return {}
    if device == "auto":
        return {"device": None}
    if device == "cuda" and backend == "pytorch":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{path}.device: 'cuda', but torch sees no GPU (torch {torch.__version__})",
                hint="use device: cpu (or auto), or install a CUDA build of torch",
            )
    return {"device": device}


class AlibiKS(AlibiDetector):
    """``KSDrift``: two-sample Kolmogorov-Smirnov per numeric feature, corrected."""

    kind = "alibi-ks"
    Config = KSConfig
    config: KSConfig
    alibi_class = "KSDrift"

    def _make(self, x_ref: Array) -> Any:
        return _cd().KSDrift(x_ref, p_val=self.config.p_val, correction=self.config.correction)


class AlibiCVM(AlibiDetector):
    """``CVMDrift``: Cramér-von Mises per numeric feature, corrected."""

    kind = "alibi-cvm"
    Config = CVMConfig
    config: CVMConfig
    alibi_class = "CVMDrift"

    def _make(self, x_ref: Array) -> Any:
        return _cd().CVMDrift(x_ref, p_val=self.config.p_val, correction=self.config.correction)


class AlibiChi2(AlibiDetector):
    """``ChiSquareDrift``: chi-square per categorical feature, corrected."""

    kind = "alibi-chi2"
    Config = Chi2Config
    config: Chi2Config
    alibi_class = "ChiSquareDrift"
    columns = "categorical"

    def _make(self, x_ref: Array) -> Any:
        return _cd().ChiSquareDrift(
            x_ref, p_val=self.config.p_val, correction=self.config.correction
        )


class AlibiTabular(AlibiDetector):
    """``TabularDrift``: KS for numeric features, chi-square for categorical ones, corrected."""

    kind = "alibi-tabular"
    Config = TabularConfig
    config: TabularConfig
    alibi_class = "TabularDrift"
    columns = "mixed"

    def _make(self, x_ref: Array) -> Any:
        cats = {i: None for i, name in enumerate(self.features) if name in self._categorical}
        return _cd().TabularDrift(
            x_ref,
            p_val=self.config.p_val,
            correction=self.config.correction,
            categories_per_feature=cats,
        )


class AlibiMMD(AlibiDetector):
    """``MMDDrift``: maximum mean discrepancy over all numeric features, permutation test."""

    kind = "alibi-mmd"
    Config = MMDConfig
    config: MMDConfig
    alibi_class = "MMDDrift"
    per_feature = False

    def _make(self, x_ref: Array) -> Any:
        return _cd().MMDDrift(
            x_ref.astype(np.float32),
            backend=self.config.backend,
            p_val=self.config.p_val,
            n_permutations=self.config.n_permutations,
            **_device(self.config.backend, self.config.device, self.context.path),
        )


class AlibiLSDD(AlibiDetector):
    """``LSDDDrift``: least-squares density difference over all numeric features."""

    kind = "alibi-lsdd"
    Config = LSDDConfig
    config: LSDDConfig
    alibi_class = "LSDDDrift"
    per_feature = False

    def _make(self, x_ref: Array) -> Any:
        return _cd().LSDDDrift(
            x_ref.astype(np.float32),
            backend=self.config.backend,
            p_val=self.config.p_val,
            n_permutations=self.config.n_permutations,
            **_device(self.config.backend, self.config.device, self.context.path),
        )


DETECTORS: list[type[DriftDetector]] = [
    AlibiKS,
    AlibiCVM,
    AlibiChi2,
    AlibiTabular,
    AlibiMMD,
    AlibiLSDD,
]


def _saved_columns(features: list[str], width: int, config_path: str) -> list[str]:
    """The columns a saved detector tests, from ``features`` and its reference's width.

    A saved detector keeps no column names, only ``x_ref``. A single tensor name stands for all
    its columns (``input`` -> ``input[0]`` … ``input[width-1]``), as with ``reference``; with
    several names, each must be one column, since a tensor's width cannot be told apart.

    Raises:
        ConfigError: The names do not add up to the reference's width.
    """
    if len(features) == width:
        return features
    if len(features) == 1 and "[" not in features[0] and width > 1:
        return [f"{features[0]}[{i}]" for i in range(width)]
    example = ", ".join(f"x[{i}]" for i in range(min(width, 3))) + (", …" if width > 3 else "")
    raise ConfigError(
        f"{config_path}: {len(features)} columns, but the saved detector's reference has {width}",
        hint=f"list {width} columns in the reference's order: a tensor's columns are written "
        f"name[i] ({example}); a tensor name alone expands only when it is the only entry",
    )
