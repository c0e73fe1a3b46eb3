"""Triton's schedule-policy extension over the real app (V2): ``GET /v2`` lists it, a priority
level's own queue bound (``batching.priority_queue_policy``) answers 503 ``queue_full`` naming
the level, and a bad policy is a config error naming the option."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from infercore.errors import ConfigError
from infercore.testing import app_client, async_app_client, fake_model_config, runtime_from_dict


def body(value: float, priority: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value, 0, 0, 0]}]
    }
    if priority is not None:
        doc["parameters"] = {"priority": priority}
    return doc


def test_server_metadata_lists_the_schedule_policy_extension() -> None:
    with app_client(runtime_from_dict(fake_model_config())) as client:
        doc = client.get("/v2").json()
    assert doc["extensions"] == ["binary_tensor_data", "schedule_policy"]


def test_a_levels_full_queue_is_a_503_queue_full_naming_the_level() -> None:
    runtime = runtime_from_dict(
        fake_model_config(
            batching={
                "kind": "dynamic",
                "max_batch_size": 1,
                "queue_timeout_ms": 10_000,
                "priority_levels": 2,
                "default_priority_level": 2,
                "priority_queue_policy": {2: {"max_queue_size": 1}},
            },
            versions={"1": {"loader": {"kind": "fake"}, "warmup": False}},
        )
    )
    version = runtime.models["m"].versions["1"]
    gate = asyncio.Event()
    model = version.model
    predict = model.predict

    async def gated(inputs: Any) -> Any:
        await gate.wait()  # the model is busy until the test opens it
        return await predict(inputs)

    model.predict = gated

    async def until(condition: Any) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.005)

    async def scenario() -> tuple[list[int], httpx.Response, httpx.Response]:
        async with async_app_client(runtime) as client:

            async def send(doc: dict[str, Any]) -> int:
                response = await client.post("/v2/models/m/infer", json=doc)
                return response.status_code

            tasks = [asyncio.create_task(send(body(0)))]
            await until(lambda: version.batcher._running_rows == 1)  # taken: the rest queue
            tasks.append(asyncio.create_task(send(body(1))))  # level 2, the default
            await until(lambda: version.batcher.queue_depth == 1)
            refused = await client.post("/v2/models/m/infer", json=body(2, priority=2))
            tasks.append(asyncio.create_task(send(body(3, priority=1))))  # level 1: admitted
            await until(lambda: version.batcher.queue_depth == 2)
            ready = await client.get("/v2/models/m/ready")
            gate.set()
            return list(await asyncio.gather(*tasks)), refused, ready

    statuses, refused, ready = asyncio.run(scenario())
    assert statuses == [200, 200, 200]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    doc = refused.json()
    assert doc["reason"] == "queue_full"
    assert doc["error"].startswith("queue of model 'm' is full at priority level 2"), doc
    assert "priority_queue_policy.2.max_queue_size" in doc["error"]
    assert ready.status_code == 200  # a full level is not a version that is not ready


def test_a_policy_for_a_level_the_batcher_lacks_is_a_config_error() -> None:
    config = fake_model_config(
        batching={
            "kind": "dynamic",
            "priority_levels": 2,
            "default_priority_level": 1,
            "priority_queue_policy": {"3": {"max_queue_size": 1}},
        }
    )
    with pytest.raises(ConfigError) as info:
        runtime_from_dict(config)
    assert str(info.value).startswith(
        "batching.priority_queue_policy.3: 3 is not a level of priority_levels (2)"
    )
