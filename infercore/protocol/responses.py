"""What a response may cost: the output limit, and encoding a large response in parts.

A model's output can grow with its input (a tile, an expand, a sequence): a request of a few
hundred bytes may ask for hundreds of megabytes, and its JSON text is several times the tensor
data (about 20 bytes per FP32 value). RELIABILITY P14: output limits are checked before
allocating. :func:`check_output_bytes` adds up the output tensors' data (``nbytes``: nothing is
copied or converted) before anything is encoded; past ``server.max_output_bytes`` the answer is
400 ``output_too_large``.

Below the limit a response can still be large. Encoding one in a single call holds the event
loop for as long as it takes (1M FP32 values to JSON: about 0.3 s here; the default limit's 16M:
seconds), and every other request, health checks included, waits meanwhile. A response with
more than :data:`LARGE_RESPONSE_BYTES` of tensor data is encoded in parts
(:func:`encode_in_parts`), and the loop runs between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Generator, Mapping
from typing import Any

from infercore.components.model import Array
from infercore.errors import DeadlineExceeded, InvalidInput

#: Tensor data above which a response is encoded in parts (:func:`encode_in_parts`): 64 KiB is
#: 16K FP32 values, a few milliseconds of JSON encoding; smaller responses are encoded at once,
#: as before (nothing is added to the common request).
LARGE_RESPONSE_BYTES = 64 * 1024
#: Values per part of JSON ``data`` (a few milliseconds of encoding each).
PART_VALUES = 16 * 1024


class OutputTooLarge(InvalidInput):
    """A response whose output tensors hold more data than ``server.max_output_bytes``.

    A 4xx: the request asked for it (its input sets the output's size, or it asked for every
    output), the same request would fail every time, and a smaller one succeeds; a 5xx would
    count against the server (a service mesh ejects pods that answer 5xx). Not 413, which is
    about the request's own content.
    """

    reason = "output_too_large"


def tensor_data_bytes(arr: Array, limit: int) -> int:
    """Bytes of ``arr``'s data as the binary tensor extension sends it: ``nbytes`` for numbers
    and booleans; 4 + the UTF-8 length per BYTES element. Counting BYTES elements stops once
    the total passes ``limit`` (the answer is then some value above it)."""
    if arr.dtype.kind not in "OSU":
        return int(arr.nbytes)
    total = 4 * arr.size
    if total > limit:
        return total
    for value in arr.flat:
        total += len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8"))
        if total > limit:
            break
    return total


def check_output_bytes(outputs: Mapping[str, Array], names: Collection[str], limit: int) -> int:
    """The tensor data of the outputs ``names`` (those the response carries), in bytes.

    Raises:
        OutputTooLarge: It is above ``limit`` (``server.max_output_bytes``).
    """
    total = 0
    for name in names:
        arr = outputs[name]
        # Numbers (every output of most models) inline: this runs on every request.
        total += tensor_data_bytes(arr, limit - total) if arr.dtype.kind in "OSU" else arr.nbytes
    if total <= limit:
        return total
    carried = [(n, outputs[n]) for n in names]
    # BYTES elements are counted only until the limit is passed: the size is then a floor.
    size = f"at least {total}" if any(a.dtype.kind in "OSU" for _, a in carried) else str(total)
    shown = ", ".join(f"{n!r} {a.dtype.name}{list(a.shape)}" for n, a in carried[:4])
    more = f" and {len(carried) - 4} more" if len(carried) > 4 else ""
    raise OutputTooLarge(
        f"the response would carry {size} bytes of tensor data; the limit is {limit} "
        f"(server.max_output_bytes); outputs: {shown}{more}",
        hint="ask for less per request (fewer rows, or inputs that make the outputs smaller), "
        "or only the outputs you need (V2 `outputs`); or have server.max_output_bytes raised",
    )


async def encode_in_parts(
    parts: Generator[bytes, None, Any], *, deadline: float | None = None
) -> tuple[list[bytes], Any]:
    """Run an encoder that yields a response in parts, letting the event loop run between them.

    Returns the parts (sent as they are: no copy joins them) and the encoder's return value.

    Raises:
        DeadlineExceeded: The request's deadline (``loop.time()``) passed while encoding (it
            covers encoding too, RELIABILITY P3).
    """
    loop = asyncio.get_running_loop()
    out: list[bytes] = []
    while True:
        try:
            part = next(parts)
        except StopIteration as stop:
            return out, stop.value
        out.append(part)
        await asyncio.sleep(0)
        if deadline is not None and loop.time() > deadline:
            parts.close()
            raise DeadlineExceeded(
                "request did not finish within its deadline (encoding its response)",
                hint="ask for less per request, or raise server.request_timeout_ms",
            )
