"""Every option of every drift component is named in its documentation, and the licences
are stated where a user chooses between the drift plugins."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from infercore.components import Component
from infercore.config.validation import field_names

REPO = Path(__file__).resolve().parents[2]


def _documented(readme: Path, classes: Sequence[type[Component]]) -> list[str]:
    text = readme.read_text()
    missing = []
    for cls in classes:
        assert issubclass(cls.Config, msgspec.Struct)
        if f"`{cls.kind}`" not in text:
            missing.append(f"kind {cls.kind}")
        for name in field_names(cls.Config):
            if f"`{name}`" not in text:
                missing.append(f"{cls.kind}.{name}")
    return missing


def test_drift_stats_readme_names_every_option() -> None:
    pytest.importorskip("infercore_drift_stats")
    from infercore_drift_stats import register_drift_detectors

    readme = REPO / "plugins" / "drift-stats" / "README.md"
    assert _documented(readme, register_drift_detectors()) == []
    assert "Apache-2.0" in readme.read_text()


def test_alibi_detect_readme_names_every_option_and_the_licence() -> None:
    pytest.importorskip("infercore_alibi_detect")
    from infercore_alibi_detect import register_drift_detectors

    readme = REPO / "plugins" / "alibi-detect" / "README.md"
    assert _documented(readme, register_drift_detectors()) == []
    text = readme.read_text()
    assert "Business Source License 1.1" in text and "licence from Seldon" in text
    assert "drift-stats" in text


def test_drift_monitor_and_actions_docs_name_every_option() -> None:
    from infercore.builtins.actions import register_actions
    from infercore.drift.config import DriftConfig

    doc = REPO / "infercore" / "drift" / "README.md"
    assert _documented(doc, register_actions()) == []
    text = doc.read_text()
    missing = [n for n in field_names(DriftConfig) if f"`{n}`" not in text]
    assert missing == []
