"""Triton's ``parameters.priority`` over the real app (V2), with a ``dynamic`` batcher that has
``priority_levels``: a high-priority request overtakes the default-level ones queued before it;
a level the model does not have, or a malformed one, is a 400 naming the parameter; a model
without levels ignores it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from infercore.testing import app_client, async_app_client, fake_model_config, runtime_from_dict


def body(value: float, priority: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value, 0, 0, 0]}]
    }
    if priority is not None:
        doc["parameters"] = {"priority": priority}
    return doc


def leveled(latency_s: float = 0.0) -> dict[str, Any]:
    """Model ``m``: one row per call, two levels, requests without a priority at level 2."""
    return fake_model_config(
        batching={
            "kind": "dynamic",
            "max_batch_size": 1,
            "queue_timeout_ms": 10_000,
            "priority_levels": 2,
            "default_priority_level": 2,
        },
        versions={"1": {"loader": {"kind": "fake", "latency_s": latency_s}, "warmup": False}},
    )


def test_a_high_priority_request_overtakes_the_queued_ones() -> None:
    runtime = runtime_from_dict(leveled(latency_s=0.3))
    version = runtime.models["m"].versions["1"]
    finished: list[str] = []

    async def scenario() -> list[int]:
        async with async_app_client(runtime) as client:

            async def send(name: str, doc: dict[str, Any]) -> int:
                response: httpx.Response = await client.post("/v2/models/m/infer", json=doc)
                finished.append(name)
                return response.status_code

            async def until(condition: Any) -> None:
                async with asyncio.timeout(10):
                    while not condition():
                        await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(send("first", body(0)))]
            await until(lambda: version.model.calls == 1)  # running: the rest must queue
            for i in range(3):
                tasks.append(asyncio.create_task(send(f"default{i}", body(i + 1))))
                await until(lambda i=i: version.batcher.queue_depth == i + 1)
            tasks.append(asyncio.create_task(send("high", body(9, priority=1))))
            await until(lambda: version.batcher.queue_depth == 4)
            return list(await asyncio.gather(*tasks))

    statuses = asyncio.run(scenario())
    assert statuses == [200] * 5
    assert finished == ["first", "high", "default0", "default1", "default2"]


def test_a_priority_outside_the_levels_is_a_400_naming_them() -> None:
    with app_client(runtime_from_dict(leveled())) as client:
        for priority in (1, 2, 0):
            assert client.post("/v2/models/m/infer", json=body(1, priority)).status_code == 200
        response = client.post("/v2/models/m/infer", json=body(1, 3))
        assert response.status_code == 400
        doc = response.json()
        assert doc["reason"] == "invalid_input"
        assert doc["error"].startswith("parameters.priority: 3 is not a priority level"), doc
        assert "1 (the highest) to 2" in doc["error"]
        for bad in (-1, "high", 1.5, True):
            response = client.post("/v2/models/m/infer", json=body(1, bad))
            assert response.status_code == 400, bad
            assert response.json()["error"].startswith("parameters.priority: expected")


def test_a_model_without_levels_ignores_the_priority() -> None:
    config = fake_model_config(batching={"kind": "dynamic"})
    with app_client(runtime_from_dict(config)) as client:
        response = client.post("/v2/models/m/infer", json=body(1, 7))
        assert response.status_code == 200, response.text
        # A malformed one is refused all the same: it is bad input whatever the model.
        assert client.post("/v2/models/m/infer", json=body(1, -7)).status_code == 400
