"""The admin and inference apps of one runtime, in process, for the admin API's tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from infercore.server import create_app
from infercore.server.admin import create_admin_app

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: ``scenario(admin client, inference client)``.
Scenario = Callable[[httpx.AsyncClient, httpx.AsyncClient], Any]


@asynccontextmanager
async def admin_and_inference(
    runtime: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Start ``runtime``; yield a client of its admin app (with the token) and one of its
    inference app; stop it after."""
    await runtime.start()
    try:
        admin = httpx.ASGITransport(app=create_admin_app(runtime, TOKEN))
        inference = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))  # type: ignore[arg-type]
        async with (
            httpx.AsyncClient(transport=admin, base_url="http://admin", headers=AUTH) as a,
            httpx.AsyncClient(transport=inference, base_url="http://infer") as i,
        ):
            yield a, i
    finally:
        await runtime.stop()


def run(runtime: Any, scenario: Scenario) -> Any:
    """``scenario(admin, inference)`` against ``runtime``, started and stopped around it."""

    async def main() -> Any:
        async with admin_and_inference(runtime) as (a, i):
            return await scenario(a, i)

    return asyncio.run(main())


def art_repository_config(**v1: Any) -> dict[str, Any]:
    """Model ``iris``: recipe version 1 at ``art/v1/model.onnx`` (``v1``: more loader
    options), and a repository folder ``art`` of ``v<version>/model.onnx`` folders."""
    return {
        "batching": {"kind": "none"},
        "models": {
            "iris": {
                "primary": "1",
                "versions": {"1": {"loader": {"kind": "onnx", "path": "art/v1/model.onnx", **v1}}},
                "routing": {"kind": "weighted"},
                "repository": {
                    "folder": "art",
                    "version_folder": "v{version}",
                    "loader": {"kind": "onnx", "path": "model.onnx"},
                },
            }
        },
    }
