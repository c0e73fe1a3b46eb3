"""Multiple-testing corrections for per-feature drift tests.

Testing ``m`` features at level ``p_val`` each raises false alarms about ``m`` times as
often as one test. Both corrections here keep the chance of *any* false alarm on a window
near ``p_val``:

- ``bonferroni``: a feature drifts when its p-value is at most ``p_val / m`` (controls the
  family-wise error rate; conservative when features are correlated).
- ``fdr``: Benjamini-Hochberg. Sort the p-values ``p(1) <= … <= p(m)``; take the largest
  ``k`` with ``p(k) <= k / m * p_val``; the features with the ``k`` smallest p-values drift.
  It controls the false discovery rate at ``p_val``; when no feature has drifted (the
  situation a false alarm comes from) that is the same as the family-wise rate.
- ``none``: each feature at ``p_val``.

A NaN p-value (a feature with no values in the window) counts as 1: no evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Correction = Literal["bonferroni", "fdr", "none"]


def correct(
    p_values: Sequence[float], p_val: float, method: Correction
) -> tuple[list[bool], float]:
    """Per-feature drift flags and the p-value threshold the correction arrived at.

    Args:
        p_values: One p-value per feature.
        p_val: The level of the whole test (e.g. 0.05).
        method: ``bonferroni``, ``fdr`` or ``none``.

    Returns:
        ``(flags, threshold)``: ``flags[i]`` is whether feature ``i`` drifted; a feature
        drifted exactly when its p-value is at most ``threshold`` (``0.0`` under ``fdr``
        when nothing drifted).
    """
    ps = [1.0 if (p is None or math.isnan(p)) else float(p) for p in p_values]
    m = len(ps)
    if m == 0:
        return [], p_val
    if method == "none":
        threshold = p_val
    elif method == "bonferroni":
        threshold = p_val / m
    elif method == "fdr":
        ordered = sorted(ps)
        passing = [k for k in range(1, m + 1) if ordered[k - 1] <= k / m * p_val]
        if not passing:
            return [False] * m, 0.0
        threshold = ordered[max(passing) - 1]
    else:
        raise ValueError(f"unknown correction {method!r}")
    return [p <= threshold for p in ps], threshold
