"""Feast definitions of the fraud recipe: the ``card`` entity and its ``card_features`` view.

The offline source is the card feature table the recipe writes next to this folder
(``../data/card_features.parquet``, built by ``recipes/fraud/features.py``): one row per card
per transaction time, with the aggregates of the windows ending then. Materializing it leaves
each card's latest snapshot in the online store.

The table's path is resolved from this file when it is imported, so the definitions work from
any checkout and from a copy of the recipe folder. infercore's ``feast`` feature source imports
this file to apply the definitions (``materialize_on_start``), and so does ``feast apply`` run
in this folder. It is code: keep it to definitions.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64, String

CARD_FEATURES_TABLE = Path(__file__).resolve().parent.parent / "data" / "card_features.parquet"

card = Entity(
    name="card",
    join_keys=["card_id"],
    value_type=ValueType.STRING,
    description="A payment card, e.g. c_000042.",
)

card_features_source = FileSource(
    name="card_features_table",
    path=str(CARD_FEATURES_TABLE),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Per-card transaction aggregates written by recipes/fraud/features.py.",
)

card_features = FeatureView(
    name="card_features",
    entities=[card],
    # Long enough that the table's final snapshot of every card, however old, is served.
    ttl=timedelta(days=3650),
    schema=[
        Field(name="card_id", dtype=String),
        Field(name="txn_count_1h", dtype=Int64),
        Field(name="txn_count_24h", dtype=Int64),
        Field(name="txn_count_7d", dtype=Int64),
        Field(name="amount_sum_24h", dtype=Float32),
        Field(name="amount_avg_7d", dtype=Float32),
        Field(name="amount_max_7d", dtype=Float32),
        Field(name="distinct_countries_7d", dtype=Int64),
        Field(name="cross_border_ratio_7d", dtype=Float32),
        Field(name="night_ratio_7d", dtype=Float32),
    ],
    online=True,
    source=card_features_source,
    tags={"recipe": "fraud"},
)
