"""``entity.join_key`` is checked against the Feast registry at start-up.

QA's case: a wrong join key failed start-up with Feast's ``KeyError: Missing join key values``
from the first read, reported as a store that "could not be prepared" with a hint about a
writable folder and file locks. Now it is a config error naming the option, the value, the
view and the join key its entity has, as a wrong view or feature name is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from feast_test_support import INPUTS, fetch_card, latest, make_source, run

from infercore.errors import ConfigError

#: A view keyed by another entity (``merchant``), and one keyed by two; both over the card
#: table (start-up refuses them before anything reads it).
OTHER_ENTITIES = """
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Int64

merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.STRING)
card = Entity(name="card", join_keys=["card_id"], value_type=ValueType.STRING)
table = FileSource(
    name="other_table",
    path=str(Path(__file__).resolve().parent.parent / "data" / "card_features.parquet"),
    timestamp_field="event_timestamp",
)
merchant_stats = FeatureView(
    name="merchant_stats",
    entities=[merchant],
    ttl=timedelta(days=3650),
    schema=[Field(name="txn_count_1h", dtype=Int64)],
    source=table,
)
card_at_merchant = FeatureView(
    name="card_at_merchant",
    entities=[card, merchant],
    ttl=timedelta(days=3650),
    schema=[Field(name="txn_count_1h", dtype=Int64)],
    source=table,
)
"""


def _with_view(view: str) -> list[dict[str, object]]:
    return [
        *INPUTS,
        {
            "name": "other",
            "source": "feast",
            "feature": f"{view}:txn_count_1h",
            "datatype": "INT64",
            "default": 0,
        },
    ]


def test_a_wrong_join_key_is_a_config_error_naming_the_join_key(model_root: Path) -> None:
    source = make_source(model_root, entity={"field": "card_id", "join_key": "cardid"})
    with pytest.raises(ConfigError) as info:
        run(source.start())
    text = str(info.value)
    assert text.startswith(
        "features.entity.join_key: 'cardid' is not the join key of feature view "
        "'card_features' (features.inputs[1].feature): its entity 'card' joins on 'card_id'"
    ), text
    assert info.value.hint == "set features.entity.join_key: card_id"
    assert "Missing join key" not in text and "writable" not in text


def test_a_view_of_another_entity_is_named(model_root: Path) -> None:
    (model_root / "fraud" / "feature_repo" / "other.py").write_text(OTHER_ENTITIES)
    source = make_source(model_root, inputs=_with_view("merchant_stats"))
    with pytest.raises(ConfigError) as info:
        run(source.start())
    text = str(info.value)
    assert "'card_id' is not the join key of feature view 'merchant_stats'" in text
    assert "(features.inputs[5].feature)" in text
    assert "entity 'merchant' joins on 'merchant_id'" in text
    assert "every view the inputs use must be keyed by that one entity" in str(info.value.hint)


def test_a_view_keyed_by_two_entities_is_refused(model_root: Path) -> None:
    (model_root / "fraud" / "feature_repo" / "other.py").write_text(OTHER_ENTITIES)
    source = make_source(model_root, inputs=_with_view("card_at_merchant"))
    with pytest.raises(
        ConfigError,
        match=r"features\.entity\.join_key: feature view "
        r"'card_at_merchant' \(features\.inputs\[5\]\.feature\) is keyed by 2 "
        r"entities \(entity 'card' joins on 'card_id', entity 'merchant' joins "
        r"on 'merchant_id'\)",
    ):
        run(source.start())


def test_the_entity_name_still_works_with_a_warning(
    model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Feast still takes the entity's name for its join key (deprecated; through the slower
    ``get_online_features``): not refused, a config that worked keeps working, but said."""

    async def main() -> None:
        source = make_source(model_root, entity={"field": "card_id", "join_key": "card"})
        await source.start()
        try:
            out = await fetch_card(source, 2)
            assert out["txn_count_24h"][0, 0] == latest(2)["txn_count_24h"]
        finally:
            await source.stop()

    with caplog.at_level(logging.WARNING, logger="infercore.feast"):
        run(main(), timeout=120)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "features.entity.join_key is 'card', the name of entity 'card', not its join key "
        "'card_id'" in m
        for m in warned
    ), warned
