"""A runtime's app behind uvicorn with infercore's HTTP protocol on a loopback port, as
``infercore serve`` runs it, for the tests that need real sockets (request heads, rejections
before the body)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from infercore.server import create_app


@asynccontextmanager
async def on_loopback(
    runtime: Any, protocol: Callable[[Any], type[asyncio.Protocol]]
) -> AsyncIterator[int]:
    """Serve ``runtime`` (started here) with ``protocol(app)`` as uvicorn's HTTP protocol;
    yields the port, and stops both on the way out."""
    app = create_app(runtime, manage_runtime=False)
    await runtime.start()
    try:
        async with app_on_loopback(app, protocol(app)) as (port, _):
            yield port
    finally:
        await runtime.stop()


@asynccontextmanager
async def app_on_loopback(
    app: Any, protocol: type[asyncio.Protocol], **options: Any
) -> AsyncIterator[tuple[int, Any]]:
    """Serve the ASGI ``app`` (any: a bare one too) with ``protocol`` as uvicorn's HTTP
    protocol and uvicorn's ``options``; yields the port and the ``uvicorn.Server`` (setting
    its ``should_exit`` starts uvicorn's shutdown), and stops it on the way out."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, http=protocol, lifespan="off", log_config=None, access_log=False, **options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        yield port, server
    finally:
        server.should_exit = True
        await task
        sock.close()
