"""alibi-detect drift detectors for infercore.

The adapter is Apache-2.0; **alibi-detect itself is under the Business Source License 1.1**
(since 0.11.5): production use needs a licence from Seldon. ``infercore-drift-stats`` is the
permissively licensed alternative.

Kinds of the ``drift_detector`` role: ``alibi-ks``, ``alibi-cvm``, ``alibi-chi2``,
``alibi-tabular``, ``alibi-mmd`` and ``alibi-lsdd``. ``alibi_detect`` is imported when a
detector starts, not when the plugin registers.
"""

from __future__ import annotations

from infercore.components import DriftDetector
from infercore.hookspecs import hookimpl
from infercore_alibi_detect.artifact import folder_digest, save
from infercore_alibi_detect.detectors import (
    DETECTORS,
    AlibiChi2,
    AlibiCVM,
    AlibiKS,
    AlibiLSDD,
    AlibiMMD,
    AlibiTabular,
)

#: Shown by `infercore plugins` and GET /-/plugins next to this plugin's own licence.
LICENCE_NOTE = (
    "wraps alibi-detect, licensed under the Business Source License 1.1: production use needs "
    "a licence from Seldon; infercore-drift-stats (Apache-2.0) is the permissive alternative"
)

__all__ = [
    "LICENCE_NOTE",
    "AlibiCVM",
    "AlibiChi2",
    "AlibiKS",
    "AlibiLSDD",
    "AlibiMMD",
    "AlibiTabular",
    "folder_digest",
    "register_drift_detectors",
    "save",
]


@hookimpl
def register_drift_detectors() -> list[type[DriftDetector]]:
    """The alibi-detect detectors."""
    return list(DETECTORS)
