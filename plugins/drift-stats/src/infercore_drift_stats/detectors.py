"""Per-feature drift tests against a reference sample: ``ks``, ``chi2`` and ``psi``.

Every detector reads its reference when it starts (in a worker thread), picks its feature
columns from it, precomputes what it can (sorted reference values, category counts, bin
edges), and then tests each window the drift monitor hands it in that monitor's worker
thread.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from infercore.components import ComponentContext, DriftDetector, DriftResult, Tensors
from infercore.drift.columns import Array, Columns, is_categorical
from infercore.drift.reference import load_reference, reference_format, select_columns
from infercore.errors import ConfigError
from infercore_drift_stats.corrections import Correction, correct

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]
PVal = Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)]


class WindowError(ValueError):
    """A window that lacks a feature column the detector tests (or has it in the wrong type)."""


class _Base(DriftDetector):
    """Reference loading and column checks shared by the three detectors."""

    #: True: numeric columns only; False: categorical by default (numeric allowed when named).
    numeric: ClassVar[bool | None] = None

    def __init__(self, config: Any, context: ComponentContext) -> None:
        super().__init__(config, context)
        reference_format(config.reference, config_path=f"{context.path}.reference")
        if config.features is not None and not config.features:
            raise ConfigError(f"{context.path}.features: empty list; omit it to test all")
        self.name = str(context.extra.get("detector_name", self.kind))
        self.features: list[str] = []

    async def start(self) -> None:
        path = self.context.path
        # scipy.stats takes about a second of CPU to import: pay it at start-up, not in the
        # first window, where it would compete with serving for the same core.
        await asyncio.to_thread(importlib.import_module, "scipy.stats")
        reference = await asyncio.to_thread(
            load_reference,
            self.context.model_root,
            self.config.reference,
            sha256=self.config.sha256,
            config_path=f"{path}.reference",
        )
        numeric = self.numeric
        if numeric is False and self.config.features is not None:
            numeric = None  # chi2 takes numeric columns named explicitly as categories
        self.features = select_columns(
            reference, self.config.features, config_path=f"{path}.features", numeric=numeric
        )
        await asyncio.to_thread(self._prepare, {f: reference[f] for f in self.features})

    def _prepare(self, reference: Columns) -> None:
        raise NotImplementedError

    def _column(self, window: Tensors, feature: str, *, numeric: bool) -> Array:
        col = window.get(feature)
        if col is None:
            raise WindowError(
                f"the window has no column {feature!r} (it has: {', '.join(window) or 'none'})"
            )
        if numeric:
            if is_categorical(col):
                raise WindowError(f"column {feature!r} holds categories, not numbers")
            x = np.asarray(col, dtype=np.float64)
            return x[~np.isnan(x)]
        return col


# --- ks -------------------------------------------------------------------------------------


class KSConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Reference sample (parquet, npz or csv), relative to the model root.
    reference: str
    #: Hex SHA-256 pinning the reference file (checked before it is parsed).
    sha256: Sha256 | None = None
    #: Numeric columns (or tensor names) to test; default every numeric reference column.
    features: list[str] | None = None
    #: Level of the whole test, after correction.
    p_val: PVal = 0.05
    #: ``bonferroni``, ``fdr`` (Benjamini-Hochberg) or ``none``.
    correction: Correction = "bonferroni"
    #: scipy's ``ks_2samp`` method: ``auto``, ``exact`` or ``asymp``.
    method: Literal["auto", "exact", "asymp"] = "auto"


class KSDetector(_Base):
    """Two-sample Kolmogorov-Smirnov test per numeric feature, with a multiple-testing correction.

    Score: the KS statistic (largest gap between the two empirical CDFs, 0-1). Missing values
    (NaN) are left out of both samples.
    """

    kind = "ks"
    Config = KSConfig
    config: KSConfig
    numeric = True

    def _prepare(self, reference: Columns) -> None:
        self._ref: dict[str, Array] = {}
        for name, col in reference.items():
            x = np.asarray(col, dtype=np.float64)
            x = np.sort(x[~np.isnan(x)])
            if x.size < 2:
                raise ConfigError(
                    f"{self.context.path}.features: reference column {name!r} has fewer than "
                    "2 values"
                )
            self._ref[name] = x

    def detect(self, window: Tensors) -> DriftResult:
        from scipy.stats import ks_2samp

        scores: dict[str, float] = {}
        p_values: dict[str, float] = {}
        for feature in self.features:
            x = self._column(window, feature, numeric=True)
            if x.size == 0:
                scores[feature], p_values[feature] = math.nan, math.nan
                continue
            res = ks_2samp(self._ref[feature], x, method=self.config.method)
            scores[feature], p_values[feature] = float(res.statistic), float(res.pvalue)
        return _decide(self.name, scores, p_values, self.config.p_val, self.config.correction)


def _decide(
    name: str,
    scores: dict[str, float],
    p_values: dict[str, float],
    p_val: float,
    correction: Correction,
) -> DriftResult:
    features = list(p_values)
    flags, threshold = correct([p_values[f] for f in features], p_val, correction)
    feature_drift = dict(zip(features, flags, strict=True))
    return DriftResult(
        detector=name,
        drift=any(flags),
        scores=scores,
        p_values=p_values,
        feature_drift=feature_drift,
        info={"p_val": p_val, "correction": correction, "threshold": threshold},
    )


# --- chi2 -----------------------------------------------------------------------------------


class Chi2Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Reference sample (parquet, npz or csv), relative to the model root.
    reference: str
    #: Hex SHA-256 pinning the reference file (checked before it is parsed).
    sha256: Sha256 | None = None
    #: Columns to test; default every categorical reference column. Numeric columns named
    #: here are tested as categories (each distinct value one category).
    features: list[str] | None = None
    #: Level of the whole test, after correction.
    p_val: PVal = 0.05
    #: ``bonferroni``, ``fdr`` (Benjamini-Hochberg) or ``none``.
    correction: Correction = "bonferroni"


class _Categories:
    """A reference column's categories and their counts; counts a window's values the same way.

    Values the reference never had are counted together as one extra category ("unseen").
    """

    __slots__ = ("categorical", "index", "labels", "ref_counts")

    def __init__(self, column: Array) -> None:
        self.categorical = is_categorical(column)
        values = column if is_categorical(column) else column[~np.isnan(column.astype(float))]
        labels, counts = np.unique(values, return_counts=True)
        self.labels = labels.tolist()
        self.index = {v: i for i, v in enumerate(self.labels)}
        self.ref_counts = np.append(counts.astype(np.float64), 0.0)

    def count(self, column: Array) -> Array:
        values = column
        if not is_categorical(column):
            x = np.asarray(column, dtype=np.float64)
            values = x[~np.isnan(x)]
        labels, counts = np.unique(values, return_counts=True)
        out = np.zeros(len(self.labels) + 1)
        unseen = len(self.labels)
        for label, n in zip(labels.tolist(), counts.tolist(), strict=True):
            out[self.index.get(label, unseen)] += n
        return out


class Chi2Detector(_Base):
    """Chi-square test of homogeneity per categorical feature: window counts vs reference counts.

    Score: the chi-square statistic of the 2 x k table (reference row, window row; one
    column per category the two samples have, values the reference never had together in
    one "unseen" column). scipy's ``chi2_contingency`` with its default Yates correction for
    1 degree of freedom.
    """

    kind = "chi2"
    Config = Chi2Config
    config: Chi2Config
    numeric = False

    def _prepare(self, reference: Columns) -> None:
        self._cats = {name: _Categories(col) for name, col in reference.items()}

    def detect(self, window: Tensors) -> DriftResult:
        from scipy.stats import chi2_contingency

        scores: dict[str, float] = {}
        p_values: dict[str, float] = {}
        for feature in self.features:
            cats = self._cats[feature]
            col = window.get(feature)
            if col is None:
                raise WindowError(
                    f"the window has no column {feature!r} (it has: {', '.join(window) or 'none'})"
                )
            if is_categorical(col) != cats.categorical:
                raise WindowError(
                    f"column {feature!r} has {'categories' if is_categorical(col) else 'numbers'}"
                    " where the reference has the other"
                )
            table = np.vstack([cats.ref_counts, cats.count(col)])
            table = table[:, table.sum(axis=0) > 0]
            if table.shape[1] < 2 or table[1].sum() == 0:
                scores[feature], p_values[feature] = 0.0, 1.0
                continue
            stat, p, _, _ = chi2_contingency(table)
            scores[feature], p_values[feature] = float(stat), float(p)
        return _decide(self.name, scores, p_values, self.config.p_val, self.config.correction)


# --- psi ------------------------------------------------------------------------------------


class PSIConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Reference sample (parquet, npz or csv), relative to the model root.
    reference: str
    #: Hex SHA-256 pinning the reference file (checked before it is parsed).
    sha256: Sha256 | None = None
    #: Columns to test (numeric or categorical); default every reference column.
    features: list[str] | None = None
    #: Quantile bins per numeric feature, edges from the reference (ties merge bins).
    bins: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 10
    #: A feature drifts when its PSI exceeds this (0.1: moderate shift, 0.2: significant).
    threshold: Annotated[float, msgspec.Meta(gt=0.0)] = 0.2
    #: Smallest bin share used in the logarithm, so an empty bin does not give infinity.
    epsilon: Annotated[float, msgspec.Meta(gt=0.0, lt=0.1)] = 1e-4


def _quantile_edges(x: Array, bins: int) -> Array:
    """Inner bin edges of ``x``: its ``bins``-quantiles, a bin being ``[edge, next edge)``.

    A value that several quantiles share (a mass point: the 0 of a mostly-0 flag or count)
    gets a bin of its own, ``[v, next float above v)``; merged into one edge alone, it would
    share its bin with every value above it up to the next edge, and a 0/1 column whose inner
    quantiles are all 0 would put 0 and 1 in one bin (a PSI of 0 whatever the window holds).
    """
    qs = np.quantile(x, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges, ties = np.unique(qs, return_counts=True)
    tied = edges[ties > 1]
    if tied.size:
        edges = np.union1d(edges, np.nextafter(tied, np.inf))
    out: Array = edges
    return out


class PSIDetector(_Base):
    """Population stability index per feature: sum over bins of (a - e) * ln(a / e).

    ``e`` is a bin's share of the reference, ``a`` its share of the window. Numeric features:
    ``bins`` quantile bins of the reference (values below the first or above the last edge
    fall into the outer bins; tied quantiles merge bins, and a value several quantiles share
    gets a bin of its own, so a 0/1 column has a bin for 0 and one for 1); categorical
    features: one bin per reference category plus one for unseen values. No p-value: a
    feature drifts when its PSI exceeds ``threshold``.
    """

    kind = "psi"
    Config = PSIConfig
    config: PSIConfig
    numeric = None

    def _prepare(self, reference: Columns) -> None:
        eps = self.config.epsilon
        self._edges: dict[str, Array] = {}
        self._cats: dict[str, _Categories] = {}
        self._expected: dict[str, Array] = {}
        for name, col in reference.items():
            if is_categorical(col):
                cats = _Categories(col)
                self._cats[name] = cats
                counts = cats.ref_counts
            else:
                x = np.asarray(col, dtype=np.float64)
                x = x[~np.isnan(x)]
                if x.size < 2:
                    raise ConfigError(
                        f"{self.context.path}.features: reference column {name!r} has fewer "
                        "than 2 values"
                    )
                edges = _quantile_edges(x, self.config.bins)
                self._edges[name] = edges
                counts = np.bincount(
                    np.searchsorted(edges, x, side="right"), minlength=edges.size + 1
                ).astype(np.float64)
            self._expected[name] = np.maximum(counts / counts.sum(), eps)

    def detect(self, window: Tensors) -> DriftResult:
        eps = self.config.epsilon
        scores: dict[str, float] = {}
        flags: dict[str, bool] = {}
        for feature in self.features:
            if feature in self._cats:
                col = window.get(feature)
                if col is None:
                    raise WindowError(
                        f"the window has no column {feature!r} "
                        f"(it has: {', '.join(window) or 'none'})"
                    )
                if not is_categorical(col):
                    raise WindowError(f"column {feature!r} holds numbers, not categories")
                counts = self._cats[feature].count(col)
            else:
                x = self._column(window, feature, numeric=True)
                edges = self._edges[feature]
                counts = np.bincount(
                    np.searchsorted(edges, x, side="right"), minlength=edges.size + 1
                ).astype(np.float64)
            total = counts.sum()
            if total == 0:
                scores[feature], flags[feature] = math.nan, False
                continue
            actual = np.maximum(counts / total, eps)
            expected = self._expected[feature]
            psi = float(np.sum((actual - expected) * np.log(actual / expected)))
            scores[feature] = psi
            flags[feature] = psi > self.config.threshold
        return DriftResult(
            detector=self.name,
            drift=any(flags.values()),
            scores=scores,
            feature_drift=flags,
            info={"threshold": self.config.threshold, "bins": self.config.bins},
        )
