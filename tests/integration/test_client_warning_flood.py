"""A client sending malformed requests in a loop gets a 400 for each, counted, but fills no
log: uvicorn's WARNING for them is logged once per 10 s once ``configure()`` ran, as
``infercore serve`` runs it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from uvicorn_support import app_on_loopback

from infercore.server.logs import ClientWarningLimit, configure
from infercore.server.shutdown import http_protocol

BAD = b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"


async def ok_app(scope: dict[str, object], receive: object, send: object) -> None:
    raise AssertionError("a malformed request reached the app")


@pytest.fixture
def uvicorn_lines() -> Iterator[list[str]]:
    """``configure()`` as serve calls it, and what uvicorn's logger then lets through."""
    configure("info", "text", "stderr")
    configure("info", "text", "stderr")  # twice: still one limit
    logger = logging.getLogger("uvicorn.error")
    assert sum(isinstance(f, ClientWarningLimit) for f in logger.filters) == 1
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        for f in [f for f in logger.filters if isinstance(f, ClientWarningLimit)]:
            logger.removeFilter(f)


async def send_bad(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(BAD)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def test_malformed_requests_in_a_loop_are_each_answered_and_logged_once(
    uvicorn_lines: list[str],
) -> None:
    counted: list[tuple[int | None, str]] = []
    protocol = http_protocol(count_refused=lambda status, reason: counted.append((status, reason)))

    async def scenario() -> list[bytes]:
        async with app_on_loopback(ok_app, protocol) as (port, _):
            return [await send_bad(port) for _ in range(20)]

    answers = asyncio.run(scenario())
    assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers), answers[0][:200]
    assert counted == [(400, "invalid_input")] * 20
    assert [line for line in uvicorn_lines if "Invalid HTTP request" in line] == [
        "Invalid HTTP request received."
    ]
