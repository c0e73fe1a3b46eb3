"""Shared by the locustfiles: write the final figures as JSON when locust quits.

``INFERCORE_LOAD_SUMMARY=PATH`` (set by benchmarks/run_load.sh) names the file: one object per
request name and one for the total, with requests, failures, requests/s and p50/p90/p99/max ms.
Locust's own ``--csv`` snapshot can miss the last second of a run; this cannot.
"""

from __future__ import annotations

import json
import os
from typing import Any

from locust import events
from locust.env import Environment

_environments: list[Environment] = []


@events.init.add_listener
def _remember_environment(environment: Environment, **_: Any) -> None:
    _environments.append(environment)


@events.quit.add_listener
def write_summary(**_: Any) -> None:
    """The final figures per request name and in total, as JSON."""
    path = os.environ.get("INFERCORE_LOAD_SUMMARY")
    if not path or not _environments:
        return
    stats = _environments[-1].stats
    entries = sorted(stats.entries.values(), key=lambda e: e.name)
    rows = []
    for entry in [*entries, stats.total]:
        rows.append(
            {
                "name": entry.name,
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "requests_per_s": round(entry.total_rps, 1),
                "p50_ms": entry.get_response_time_percentile(0.50),
                "p90_ms": entry.get_response_time_percentile(0.90),
                "p99_ms": entry.get_response_time_percentile(0.99),
                "max_ms": round(entry.max_response_time or 0, 1),
            }
        )
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
