"""What requests can make the source hold: entity keys no longer than
``max_entity_key_bytes``, checked before any lookup, read or cache entry, however the key
arrives; and a cache bounded by ``cache_max_bytes`` whose expired rows are dropped by later
reads. (The cache alone: ``test_feast_parts.py``.)"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import ReadSpy, card, make_source, run, sample, source_node

from infercore.errors import InvalidInput
from infercore.testing import async_app_client, runtime_from_dict
from infercore_feast import FeastFeatureSource
from infercore_feast.cache import ENTRY_BYTES
from infercore_feast.source import row_nbytes_estimate

LIMIT = 256  # the default max_entity_key_bytes
FEAST_VALUES = 4  # the feast inputs of feast_test_support.INPUTS


def fraud_runtime(model_root: Path, **options: Any) -> Any:
    """The feast source (matrix layout into the fake model's ``x``) behind the real app."""
    features = source_node(layout="matrix", matrix_input="x", **options)
    return runtime_from_dict(
        {
            "model_root": str(model_root),
            "features": {"kind": "feast", **features},
            "models": {"fraud": {"versions": {"1": {"loader": {"kind": "fake", "features": 5}}}}},
        }
    )


def v2(key: str) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "card_id", "datatype": "BYTES", "shape": [1], "data": [key]},
            {"name": "amount", "datatype": "FP32", "shape": [1], "data": [1.0]},
        ]
    }


def v2_binary(key: bytes) -> tuple[bytes, dict[str, str]]:
    """The key as a binary BYTES tensor (Triton's extension: a 4-byte length, then bytes)."""
    blob = struct.pack("<I", len(key)) + key
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "card_id",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(blob)},
                },
                {"name": "amount", "datatype": "FP32", "shape": [1], "data": [1.0]},
            ]
        }
    ).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def test_an_over_long_entity_key_is_a_400_over_v1_and_v2_and_never_read(
    model_root: Path,
) -> None:
    """The audit's request (90 instances, 80 KB keys each) and one key over the limit each
    way a key arrives: a 400 ``invalid_input`` naming the field, the key's length, the limit
    and the option; no lookup, no read, no cache entry. A key at the limit is served."""
    rt = fraud_runtime(model_root)
    long = "k" * (LIMIT + 1)
    wide = "é" * (LIMIT // 2 + 1)  # 129 characters, 258 bytes in UTF-8
    audit = [{"card_id": f"{j}_" + "k" * 80_000, "amount": 23.5} for j in range(90)]
    mixed = [{"card_id": card(1), "amount": 1.0}, {"card_id": long, "amount": 2.0}]
    at_limit = "k" * LIMIT
    binary_body, binary_headers = v2_binary(long.encode())

    async def scenario() -> tuple[list[tuple[int, str, int]], Any, ReadSpy, int]:
        async with async_app_client(rt) as client:
            source = rt.models["fraud"].features
            spy = ReadSpy(source)
            v1_path, v2_path = "/v1/models/fraud:predict", "/v2/models/fraud/infer"
            sent: list[tuple[str, dict[str, Any], int]] = [
                (v1_path, {"json": {"instances": audit}}, 80_002),
                (v1_path, {"json": {"instances": mixed}}, LIMIT + 1),
                (v1_path, {"json": {"inputs": {"card_id": [long], "amount": [1.0]}}}, LIMIT + 1),
                (v1_path, {"json": {"instances": [{"card_id": wide, "amount": 1.0}]}}, 258),
                (v2_path, {"json": v2(long)}, LIMIT + 1),
                (v2_path, {"json": v2(wide)}, 258),
                (v2_path, {"content": binary_body, "headers": binary_headers}, LIMIT + 1),
            ]
            out = []
            for path, how, length in sent:
                r = await client.post(path, **how)
                out.append((r.status_code, r.text, length))
            ok = await client.post(
                v1_path, json={"instances": [{"card_id": at_limit, "amount": 1}]}
            )
            return out, source, spy, ok.status_code

    refused, source, spy, ok = run(scenario())
    for status, text, length in refused:
        assert status == 400, text
        doc = json.loads(text)
        assert doc["reason"] == "invalid_input", doc
        error = doc["error"]
        assert "field 'card_id': the entity key of row " in error, error
        assert f"is {length} bytes long, more than max_entity_key_bytes ({LIMIT})" in error
        assert "features.max_entity_key_bytes" in error, error  # the option to raise
        assert "k" * 64 not in error  # the key itself is not echoed
    assert "row 1 is" in json.loads(refused[1][1])["error"]  # the second instance's key
    assert ok == 200
    assert spy.calls == [["k" * LIMIT]]  # the refused keys never reached the store
    assert len(source.cache) == 1
    assert sample(source, "infercore_feature_cache_misses_total") == 1


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(lambda keys: np.array(keys), id="unicode-array"),
        pytest.param(lambda keys: np.array(keys, dtype=object), id="object-str"),
        pytest.param(lambda keys: np.array([k.encode() for k in keys], dtype=object), id="bytes"),
        pytest.param(lambda keys: np.array([k.encode() for k in keys]), id="fixed-bytes"),
        pytest.param(lambda keys: np.array(keys, dtype=object).reshape(-1, 1), id="column-2d"),
    ],
)
def test_the_key_limit_holds_for_every_column_the_source_takes(
    model_root: Path, column: Any
) -> None:
    """``max_entity_key_bytes`` counts UTF-8 bytes, whatever array the decoder made: a key one
    byte over (ASCII, or fewer characters than the limit but more bytes) is refused before
    any lookup; one at the limit is read."""

    async def main() -> tuple[list[str], list[list[str]], int]:
        source = make_source(model_root, max_entity_key_bytes=16)
        await source.start()
        spy = ReadSpy(source)
        errors = []
        try:
            deadline = asyncio.get_running_loop().time() + 10
            for keys in (
                [card(1), "x" * 17],
                ["é" * 9, card(2)],  # 9 characters, 18 bytes
                ["ü" * 17],
            ):
                amounts = np.ones(len(keys))
                with pytest.raises(InvalidInput) as info:
                    await source.fetch(
                        {"card_id": column(keys), "amount": amounts}, deadline=deadline
                    )
                errors.append(str(info.value))
            await source.fetch(
                {"card_id": column(["y" * 16, "é" * 8]), "amount": np.ones(2)}, deadline=deadline
            )
            return errors, spy.calls, len(source.cache)
        finally:
            await source.stop()

    errors, calls, cached = run(main())
    assert "row 1 is 17 bytes long, more than max_entity_key_bytes (16)" in errors[0]
    assert "row 0 is 18 bytes long, more than max_entity_key_bytes (16)" in errors[1]
    assert "row 0 is 34 bytes long" in errors[2]
    assert all("field 'card_id'" in e and "features.max_entity_key_bytes" in e for e in errors)
    assert calls == [["y" * 16, "é" * 8]]
    assert cached == 2


# -- the cache -------------------------------------------------------------------------------


def row_cost(key: str, known: bool) -> int:
    """What the cache counts for ``key``'s row (an unknown entity's row is shared: 0)."""
    return ENTRY_BYTES + len(key) + (row_nbytes_estimate(FEAST_VALUES) if known else 0)


async def fetch_one(source: FeastFeatureSource, key: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    await source.fetch({"card_id": np.array([key]), "amount": np.array([1.0])}, deadline=deadline)


def test_the_cache_holds_no_more_than_cache_max_bytes(model_root: Path) -> None:
    """Rows count their key and their values: with room for three known cards' rows, a fourth
    evicts the least recently used; unknown entities (one shared row) cost their keys only."""
    budget = 3 * row_cost(card(1), known=True)

    async def main() -> tuple[list[int], list[list[str]], FeastFeatureSource]:
        source = make_source(model_root, cache_max_bytes=budget)
        await source.start()
        spy = ReadSpy(source)
        held = []
        try:
            for i in (1, 2, 3, 4):
                await fetch_one(source, card(i))
                held.append(len(source.cache))
            assert source.cache.nbytes == budget
            await fetch_one(source, card(1))  # evicted: read again
            source.cache.clear()
            for i in range(8):
                await fetch_one(source, f"new_{i:06d}")
            held.append(len(source.cache))
            return held, spy.calls, source
        finally:
            await source.stop()

    held, calls, source = run(main())
    assert held[:4] == [1, 2, 3, 3]
    assert calls[4] == [card(1)]
    assert held[4] == budget // row_cost("new_000000", known=False)  # 5 of the 8
    assert source.cache.nbytes <= budget


def test_expired_rows_are_dropped_by_later_reads(model_root: Path) -> None:
    """A burst of keys never asked for again (the audit's unique card ids) does not stay in
    memory past its TTL: the reads that follow sweep it, a few entries per row they cache."""
    now = [1000.0]

    async def main() -> list[int]:
        source = make_source(model_root, cache_ttl_s=5)
        source.cache.clock = lambda: now[0]
        await source.start()
        sizes = []
        try:
            for i in range(12):
                await fetch_one(source, f"burst_{i}")
            sizes.append(len(source.cache))
            now[0] += 6  # past the TTL: every burst row has expired
            await fetch_one(source, card(1))
            sizes.append(len(source.cache))
            await fetch_one(source, card(2))
            await fetch_one(source, card(3))
            sizes.append(len(source.cache))
            return sizes
        finally:
            await source.stop()

    # One row cached sweeps up to four expired ones (never a scan of the whole cache).
    assert run(main()) == [12, 12 - 4 + 1, 3]
