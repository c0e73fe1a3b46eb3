"""Hints that point at the right fix: an entity key sent the wrong way, over V1 and V2, and a
damaged SQLite online store at start-up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import card, latest, make_source, run, source_node

from infercore.errors import PluginError
from infercore.testing import async_app_client, runtime_from_dict


def fraud_runtime(model_root: Path) -> Any:
    """The feast source (matrix layout into the fake model's ``x``) behind the real app."""
    return runtime_from_dict(
        {
            "model_root": str(model_root),
            "features": {"kind": "feast", **source_node(layout="matrix", matrix_input="x")},
            "models": {"fraud": {"versions": {"1": {"loader": {"kind": "fake", "features": 5}}}}},
        }
    )


def v2(*inputs: tuple[str, str, list[Any]]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": n, "datatype": dt, "shape": [len(data)], "data": data}
            for n, dt, data in inputs
        ]
    }


def test_a_badly_sent_entity_key_gets_a_hint_for_either_protocol(model_root: Path) -> None:
    """The source sees decoded columns, not the protocol (a V2 INT64 tensor and V1 numbers
    decode alike): the hints name the V2 and the V1 way, never V1 syntax alone."""
    rt = fraud_runtime(model_root)

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        async with async_app_client(rt) as client:
            bodies = [
                ("/v2/models/fraud/infer", v2(("card_id", "INT64", [42]), ("amount", "FP32", [1]))),
                ("/v2/models/fraud/infer", v2(("card_id", "FP32", [4.2]), ("amount", "FP32", [1]))),
                ("/v2/models/fraud/infer", v2(("amount", "FP32", [1.0]))),
                ("/v1/models/fraud:predict", {"instances": [{"card_id": 42, "amount": 1.0}]}),
                ("/v1/models/fraud:predict", {"instances": [{"amount": 1.0}]}),
                (
                    "/v2/models/fraud/infer",
                    v2(("card_id", "BYTES", [card(3)]), ("amount", "FP32", [1])),
                ),
            ]
            out = []
            for path, body in bodies:
                r = await client.post(path, json=body)
                out.append((r.status_code, r.json()))
            return out

    answers = run(scenario())
    *refused, (ok_status, ok) = answers
    assert ok_status == 200, ok
    for status, doc in refused:
        assert status == 400 and doc["reason"] == "invalid_input", doc
        error = doc["error"]
        assert "'card_id'" in error
        assert "BYTES input (V2)" in error or "BYTES input (V2," in error, error
        assert "(V1" in error, error
        # The old hints: V1 syntax, or V1's instances, for a V2 client too.
        assert 'send e.g. "card_id"' not in error
        assert "send 'card_id' with every instance" not in error
    assert "expected string keys" in refused[0][1]["error"]
    assert "missing field 'card_id'" in refused[2][1]["error"]


def corrupt(model_root: Path) -> Path:
    db = model_root / "fraud" / "feature_repo" / "data" / "online_store.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"this is not a database\n" * 512)
    return db


def test_a_damaged_sqlite_store_is_told_to_be_deleted(model_root: Path) -> None:
    """``materialize_on_start: true`` does not repair a file that is not a database: the
    hint says to delete it (and that start-up then rebuilds it), which works."""
    db = corrupt(model_root)
    with pytest.raises(PluginError, match="could not be prepared: DatabaseError") as info:
        run(make_source(model_root).start())
    hint = info.value.hint or ""
    assert "damaged: delete it; materialize_on_start rebuilds it at the next start" in hint
    assert "materialize_on_start: true builds" not in hint
    assert str(model_root) not in str(info.value)
    db.unlink()  # what the hint says

    async def served() -> int:
        source = make_source(model_root)
        await source.start()
        try:
            loop = asyncio.get_running_loop()
            out = await source.fetch(
                {"card_id": np.array([card(2)]), "amount": np.array([1.0])},
                deadline=loop.time() + 10,
            )
            return int(out["txn_count_24h"][0, 0])
        finally:
            await source.stop()

    assert run(served()) == latest(2)["txn_count_24h"]


def test_without_materialize_on_start_a_damaged_store_is_rebuilt_with_feast(
    model_root: Path,
) -> None:
    async def first() -> None:
        source = make_source(model_root)  # the registry and the store, as an operator would
        await source.start()
        await source.stop()

    run(first())
    corrupt(model_root)
    with pytest.raises(PluginError, match="DatabaseError") as info:
        run(make_source(model_root, materialize_on_start=False).start())
    hint = info.value.hint or ""
    assert "damaged: delete it; rebuild it with `feast materialize`" in hint
