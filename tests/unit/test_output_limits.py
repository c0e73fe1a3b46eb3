"""Output limits and large responses (infercore.protocol.responses; RELIABILITY P14).

A model's output may grow with its input: a request of 200 bytes was answered 275 MB of JSON
(RSS 120 MB -> 2.6 GB) while liveness waited 2.5 s. The output tensors' data is added up
before anything is encoded, and a large response allowed by the limit is encoded in parts with
the event loop running between them; the parts are the one-piece encoding, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infercore.errors import DeadlineExceeded
from infercore.protocol import v1, v2
from infercore.protocol.responses import (
    OutputTooLarge,
    check_output_bytes,
    encode_in_parts,
    tensor_data_bytes,
)

# --- the limit ------------------------------------------------------------------------------


def test_numbers_count_their_bytes_and_bytes_their_binary_encoding() -> None:
    assert tensor_data_bytes(np.zeros((3, 4), np.float32), 10**9) == 48
    assert tensor_data_bytes(np.zeros(5, np.bool_), 10**9) == 5
    words = np.array([b"ab", "é", b""], dtype=object)
    assert tensor_data_bytes(words, 10**9) == 3 * 4 + 2 + 2 + 0  # as to_binary() sends them


def test_bytes_are_counted_only_until_the_limit_is_passed() -> None:
    class Loud(bytes):
        seen = 0

        def __len__(self) -> int:
            Loud.seen += 1
            return 1000

    arr = np.empty(10_000, dtype=object)
    arr[:] = [Loud() for _ in range(10_000)]
    assert tensor_data_bytes(arr, 5000) > 5000
    assert Loud.seen < 10  # not every element: the answer is known after a few


def test_outputs_above_the_limit_are_refused_naming_size_limit_and_option() -> None:
    outputs = {"y": np.zeros(1000, np.float32), "echo": np.zeros((1000, 4), np.float32)}
    with pytest.raises(OutputTooLarge) as info:
        check_output_bytes(outputs, outputs, 10_000)
    exc = info.value
    assert (exc.status_code, exc.reason) == (400, "output_too_large")
    text = str(exc)
    assert "would carry 20000 bytes of tensor data; the limit is 10000" in text
    assert "(server.max_output_bytes)" in text
    assert "'echo' float32[1000, 4]" in text
    assert "only the outputs you need" in text
    # Only what the response carries counts: the client may ask for less.
    assert check_output_bytes(outputs, ["y"], 10_000) == 4000


def test_a_bytes_output_over_the_limit_says_at_least() -> None:
    arr = np.array([b"x" * 100] * 100, dtype=object)
    with pytest.raises(OutputTooLarge, match="at least"):
        check_output_bytes({"s": arr}, ["s"], 1000)


# --- large responses, in parts --------------------------------------------------------------

_DTYPES = st.sampled_from(["FP32", "FP64", "INT8", "INT64", "UINT64", "BOOL", "FP16"])


@st.composite
def _outputs(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.integers(0, 12))
    out: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            from infercore.components.tensors import V2_TO_NUMPY

            dtype = V2_TO_NUMPY[draw(_DTYPES)]
            extra = draw(st.lists(st.integers(1, 3), max_size=2))
            out[f"o{i}"] = draw(hnp.arrays(dtype, (rows, *extra)))  # NaN and Inf included
        else:
            words = draw(st.lists(st.binary(max_size=5) | st.text(max_size=3), min_size=rows))
            arr = np.empty(rows, dtype=object)
            arr[:] = words[:rows]
            out[f"o{i}"] = arr
    return out


def _joined(gen: Any) -> tuple[bytes, Any]:
    parts = []
    while True:
        try:
            parts.append(next(gen))
        except StopIteration as stop:
            return b"".join(parts), stop.value


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_outputs(), st.integers(1, 7), st.data())
def test_property_v2_parts_are_the_one_piece_body(
    outputs: dict[str, Any], part: int, data: st.DataObject
) -> None:
    binary_default = data.draw(st.booleans())
    requested = None
    if data.draw(st.booleans()):
        names = data.draw(st.lists(st.sampled_from(list(outputs)), min_size=1, unique=True))
        requested = {n: data.draw(st.booleans()) for n in names}
    args = {
        "model_name": "m",
        "model_version": "1",
        "request_id": data.draw(st.none() | st.text(max_size=4)),
        "outputs": outputs,
        "requested": requested,
        "binary_default": binary_default,
    }
    whole, head_len = v2.encode(**args)
    joined, parts_head_len = _joined(v2.encode_parts(**args, part_values=part))
    assert joined == whole
    assert parts_head_len == head_len


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_outputs(), st.integers(1, 7))
def test_property_v1_parts_are_the_one_piece_body(outputs: dict[str, Any], part: int) -> None:
    rows = len(next(iter(outputs.values())))
    assert b"".join(v1.encode_parts(outputs, rows, part)) == v1.encode(outputs, rows)


def test_a_large_response_lets_the_event_loop_run_between_its_parts() -> None:
    arr = np.arange(100_000, dtype=np.float32)
    outputs = {"y": arr}

    async def scenario() -> tuple[int, int, bytes]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        parts, _ = await encode_in_parts(
            v2.encode_parts(
                model_name="m",
                model_version="1",
                request_id=None,
                outputs=outputs,
                requested=None,
                binary_default=False,
                part_values=10_000,
            )
        )
        done = True
        await task
        return ticks - start, len(parts), b"".join(parts)

    ticks, parts, body = asyncio.run(scenario())
    assert parts >= 10
    assert ticks >= parts - 1  # the loop ran between every two parts
    assert json.loads(body)["outputs"][0]["data"][-1] == 99_999.0


def test_encoding_stops_at_the_deadline() -> None:
    def parts() -> Any:
        while True:
            yield b"x"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await encode_in_parts(parts(), deadline=loop.time() + 0.05)

    with pytest.raises(DeadlineExceeded, match="encoding its response"):
        asyncio.run(scenario())
