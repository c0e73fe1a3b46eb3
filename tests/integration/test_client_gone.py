"""Clients that go, or stall, before their answer (RELIABILITY P12, P3; "nothing lost").

The app and infercore's HTTP protocol on a real loopback socket (uvicorn, in this process, as
``test_reject_before_body.py`` runs them), a ``fake`` model that runs one call at a time:

- a client that closes its connection while its request waits in the queue cancels it: the
  model never runs it, and it is counted ``cancelled`` under its model, not as a 200;
- a client that sends part of its body and stops is answered 408 when the deadline passes,
  not held for ever;
- a request's own timeout (Triton's ``parameters.timeout``, or ``X-Infercore-Timeout-Ms``)
  shortens the deadline, never extends it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from test_reject_before_body import ROW, listening

from infercore.testing import fake_model_config, metric_value, runtime_from_dict


def slow_config(**server: Any) -> dict[str, Any]:
    """Model ``m``: one call at a time, each 0.5 s, a few requests may queue."""
    return fake_model_config(
        server={"max_body_bytes": 4096, **server},
        batching={"kind": "none", "max_concurrency": 1, "max_queue_size": 4},
        versions={"1": {"loader": {"kind": "fake", "latency_s": 0.5}, "warmup": False}},
    )


def _request(body: bytes, path: bytes = b"/v2/models/m/infer", **headers: str) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n" % path
    for name, value in headers.items():
        head += b"%s: %s\r\n" % (name.replace("_", "-").encode(), value.encode())
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def test_a_client_that_goes_while_queued_cancels_its_request() -> None:
    runtime = runtime_from_dict(slow_config())
    model = runtime.models["m"].versions["1"].model

    async def scenario() -> str:
        async with listening(runtime) as client:
            port = client.base_url.port
            running = asyncio.create_task(client.post("/v2/models/m/infer", json=ROW))
            await asyncio.sleep(0.1)  # its call has started (it takes 0.5 s)
            # Two more: both wait behind the running call; their clients then go.
            writers = []
            for _ in range(2):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_request(json.dumps(ROW).encode()))
                await writer.drain()
                writers.append(writer)
            await asyncio.sleep(0.1)  # read and queued
            for writer in writers:
                writer.close()
                await writer.wait_closed()
            assert (await running).status_code == 200
            await asyncio.sleep(1.2)  # what a queued request would have taken to run
            return (await client.get("/metrics")).text

    text = asyncio.run(scenario())
    assert model.calls == 1  # only the request whose client stayed
    assert metric_value(text, "infercore_requests_total", code="200") == 1
    gone = metric_value(
        text, "infercore_request_failures_total", model="m", version="1", reason="cancelled"
    )
    assert gone == 2, text


def test_a_client_gone_mid_body_is_counted_under_the_model_its_url_names() -> None:
    runtime = runtime_from_dict(slow_config())

    async def scenario() -> str:
        async with listening(runtime) as client:
            _, writer = await asyncio.open_connection("127.0.0.1", client.base_url.port)
            request = _request(json.dumps(ROW).encode(), b"/v2/models/m/versions/1/infer")
            writer.write(request[:-20])  # all but the body's last 20 bytes; then it goes
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await writer.wait_closed()
            async with asyncio.timeout(5):
                while True:
                    text = (await client.get("/metrics")).text
                    if 'reason="cancelled"' in text:
                        return text
                    await asyncio.sleep(0.02)

    text = asyncio.run(scenario())
    assert (
        metric_value(
            text, "infercore_request_failures_total", model="m", version="1", reason="cancelled"
        )
        == 1
    ), text


def test_a_body_that_stops_coming_is_answered_408_at_the_deadline() -> None:
    runtime = runtime_from_dict(slow_config(request_timeout_ms=300))

    async def scenario() -> tuple[bytes, str]:
        async with listening(runtime) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.base_url.port)
            body = json.dumps(ROW).encode()
            writer.write(_request(body)[: -len(body) + 10])  # 10 bytes of the body, no more
            await writer.drain()
            async with asyncio.timeout(5):  # the deadline is 0.3 s
                answer = await reader.read()  # until the server closes the connection
            writer.close()
            return answer, (await client.get("/metrics")).text

    answer, text = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["reason"] == "request_timeout"
    assert metric_value(text, "infercore_request_failures_total", reason="request_timeout") == 1
    assert runtime.models["m"].versions["1"].model.calls == 0


def test_a_request_s_own_timeout_shortens_the_deadline_never_extends_it() -> None:
    runtime = runtime_from_dict(slow_config(request_timeout_ms=2000))

    async def scenario() -> list[httpx.Response]:
        async with listening(runtime) as client:
            short = {**ROW, "parameters": {"timeout": 100_000}}  # µs, as tritonclient sends it
            long = {**ROW, "parameters": {"timeout": 60_000_000}}
            return [
                await client.post("/v2/models/m/infer", json=short),
                await client.post(
                    "/v2/models/m/infer", json=ROW, headers={"X-Infercore-Timeout-Ms": "100"}
                ),
                await client.post("/v2/models/m/infer", json=long),
                await client.post("/v2/models/m/infer", json={**ROW, "parameters": {"timeout": 0}}),
                await client.post(
                    "/v2/models/m/infer", json={**ROW, "parameters": {"timeout": "50ms"}}
                ),
                await client.post(
                    "/v2/models/m/infer", json=ROW, headers={"X-Infercore-Timeout-Ms": "-1"}
                ),
            ]

    short, header, long, zero, bad, bad_header = asyncio.run(scenario())
    for timed_out in (short, header):  # the model takes 0.5 s
        assert timed_out.status_code == 504, timed_out.text
        assert "within 100 ms" in timed_out.json()["error"]
        assert "the request's own timeout" in timed_out.json()["error"]
    assert long.status_code == 200  # 60 s asked, 2 s allowed: the call's 0.5 s fits either way
    assert zero.status_code == 200  # 0: no timeout of the client's own (Triton's meaning)
    assert bad.status_code == 400 and "parameters.timeout" in bad.json()["error"]
    assert bad_header.status_code == 400 and "X-Infercore-Timeout-Ms" in bad_header.json()["error"]
