"""compose.yaml's Redis keeps Feast's online store across restarts.

A Redis without persistence comes back empty: every card had no row until the store was
materialized again (the QA report's "every card is new"). The feast source now finds an emptied
store and restores it, but refuses or degrades requests meanwhile; the append-only file on a
volume makes a restart lose nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_redis_persists_its_rows_on_a_volume() -> None:
    stack: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    redis = stack["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    mounts = dict(v.split(":")[:2] for v in redis["volumes"])
    assert mounts.get("redis-data") == "/data"  # the image's working directory
    assert "redis-data" in stack["volumes"]
