"""Permissively licensed drift detectors for infercore (Apache-2.0; scipy, numpy, pyarrow).

Kinds of the ``drift_detector`` role: ``ks`` (per-feature two-sample Kolmogorov-Smirnov),
``chi2`` (per-feature chi-square on category counts) and ``psi`` (population stability
index), each against a reference sample file. scipy is imported when a detector first runs,
not when the plugin registers.
"""

from __future__ import annotations

from infercore.components import DriftDetector
from infercore.hookspecs import hookimpl
from infercore_drift_stats.corrections import correct
from infercore_drift_stats.detectors import Chi2Detector, KSDetector, PSIDetector

__all__ = ["Chi2Detector", "KSDetector", "PSIDetector", "correct", "register_drift_detectors"]


@hookimpl
def register_drift_detectors() -> list[type[DriftDetector]]:
    """The ``ks``, ``chi2`` and ``psi`` detectors."""
    return [KSDetector, Chi2Detector, PSIDetector]
