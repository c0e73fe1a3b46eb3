"""Drift monitoring: sample live model inputs off the request path, test windows against a
reference sample with pluggable detectors, and run actions on drift.

- :class:`DriftConfig`: a model's ``drift:`` node.
- :class:`DriftMonitor`: one per model; ``build`` / ``start`` / ``offer`` / ``stop``, and
  ``latest_results`` / ``events`` / ``status`` for the admin API.
- :mod:`infercore.drift.columns`: how tensors become the feature columns detectors see.
- :mod:`infercore.drift.reference`: reference samples (parquet, npz, csv) for detector plugins.
"""

from infercore.drift.config import DriftConfig
from infercore.drift.events import event_to_json, result_to_json
from infercore.drift.monitor import OVERALL, DriftMonitor

__all__ = ["OVERALL", "DriftConfig", "DriftMonitor", "event_to_json", "result_to_json"]
