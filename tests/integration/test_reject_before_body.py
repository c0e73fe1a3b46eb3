"""``server.reject_before_body``: a full queue answers 503 ``queue_full`` from the headers.

The app and infercore's HTTP protocol on a real loopback socket (uvicorn, in this process), a
``fake`` model that holds its one queue slot for a while: while it is full, a request for it is
answered from its request line and headers, and its body is never decoded; what the headers
alone answer otherwise (404, 413, 415) is still answered so.

The batcher is ``stacking``: ``none`` (one model call per submission) declared batching, so
that requests are grouped and count against ``max_queue_size`` from arrival (``none`` itself
is never grouped).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from uvicorn_support import on_loopback

from infercore.builtins.batchers import NoBatcher
from infercore.components import Batcher, Router, RouteRequest, RoutingTable
from infercore.hookspecs import hookimpl
from infercore.server import create_app
from infercore.server.shutdown import DRAINING, ShutdownState, http_protocol
from infercore.testing import fake_model_config, metric_value, runtime_from_dict

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
MALFORMED = b'{"inputs": [{"name": "x", "shape": [1, 4]'
JSON = {"content-type": "application/json"}


class StackingBatcher(NoBatcher):
    """``none`` declared batching: requests are grouped, each submission is one model call."""

    kind = "stacking"
    batches = True


class StackingPlugin:
    @hookimpl
    def register_batchers(self) -> list[type[Batcher]]:
        return [StackingBatcher]


def build_runtime(config: dict[str, Any], plugins: tuple[tuple[str, object], ...] = ()) -> Any:
    return runtime_from_dict(config, extra_plugins=[("stacking", StackingPlugin()), *plugins])


def full_config(**server: Any) -> dict[str, Any]:
    """Model ``m``: one call at a time, one request queued at most, each call 0.6 s."""
    return fake_model_config(
        server={"max_body_bytes": 4096, **server},
        batching={"kind": "stacking", "max_concurrency": 1, "max_queue_size": 1},
        versions={"1": {"loader": {"kind": "fake", "latency_s": 0.6}, "warmup": False}},
    )


@asynccontextmanager
async def listening(runtime: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app behind uvicorn with infercore's protocol on a loopback port, as ``serve`` runs it."""
    async with (
        on_loopback(runtime, lambda app: http_protocol(0.1, app.reject_before_body)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        yield client


async def hold_the_queue(runtime: Any, client: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    """A request that fills model ``m``'s queue (it runs 0.6 s); returns once it is full."""
    held = asyncio.create_task(client.post("/v2/models/m/infer", json=ROW))
    sv = runtime.models["m"].versions["1"]
    async with asyncio.timeout(5):
        while not sv.full:
            await asyncio.sleep(0.005)
    return held


def assert_queue_full(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "queue of model 'm' is full", "reason": "queue_full"}
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"


def test_a_full_queue_answers_from_the_headers_without_decoding_the_body() -> None:
    runtime = build_runtime(full_config())

    async def scenario() -> None:
        async with listening(runtime) as client:
            # Not full: the body is decoded, and a malformed one is a 400.
            r = await client.post("/v2/models/m/infer", content=MALFORMED, headers=JSON)
            assert r.status_code == 400 and r.json()["reason"] == "invalid_input"
            held = await hold_the_queue(runtime, client)
            headers = {**JSON, "x-request-id": "req-7"}
            for path in ("/v2/models/m/infer", "/v2/models/m/versions/1/infer?x=1"):
                r = await client.post(path, content=MALFORMED, headers=headers)
                assert_queue_full(r)
                assert r.headers["x-request-id"] == "req-7"
            r = await client.post("/v1/models/m:predict", content=b"[[", headers=JSON)
            assert_queue_full(r)
            assert len(r.headers["x-request-id"]) == 32  # one was made up
            assert (await held).status_code == 200
            # Free again: decoded as usual.
            r = await client.post("/v2/models/m/infer", content=MALFORMED, headers=JSON)
            assert r.status_code == 400
            assert (await client.post("/v2/models/m/infer", json=ROW)).status_code == 200
            text = (await client.get("/metrics")).text
        # Counted as the request path counts a queue_full: against the version.
        labels = {"model": "m", "version": "1"}
        assert metric_value(text, "infercore_requests_total", code="503", **labels) == 3
        assert metric_value(text, "infercore_request_failures_total", **labels) == 3
        assert metric_value(text, "infercore_request_failures_total", reason="queue_full") == 3
        # Never ran: the held request and the last one only.
        assert runtime.models["m"].versions["1"].model.calls == 2

    asyncio.run(scenario())


def test_a_client_waiting_for_100_continue_gets_its_503_without_sending_the_body() -> None:
    """curl's way with bodies over 1 MiB: the head, then a wait for ``100 Continue``."""
    runtime = build_runtime(full_config())

    async def scenario() -> None:
        async with listening(runtime) as client:
            held = await hold_the_queue(runtime, client)
            reader, writer = await asyncio.open_connection(
                client.base_url.host, client.base_url.port
            )
            writer.write(
                b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-type: application/json"
                b"\r\nx-request-id: req-9\r\nexpect: 100-continue\r\ncontent-length: 2000\r\n\r\n"
            )
            async with asyncio.timeout(5):  # answered while the held request still runs
                answer = await reader.read()  # the answer, then the server's FIN
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), answer  # no 100 Continue before it
            assert b"\r\nconnection: close" in head.lower() and b"x-request-id: req-9" in head
            assert body == b'{"error":"queue of model \'m\' is full","reason":"queue_full"}'
            assert not held.done()
            assert (await held).status_code == 200
            text = (await client.get("/metrics")).text
        assert metric_value(text, "infercore_request_failures_total", reason="queue_full") == 1
        assert runtime.models["m"].versions["1"].model.calls == 1

    asyncio.run(scenario())


def test_off_a_malformed_request_gets_its_400_even_while_the_queue_is_full() -> None:
    runtime = build_runtime(full_config(reject_before_body=False))

    async def scenario() -> None:
        async with listening(runtime) as client:
            held = await hold_the_queue(runtime, client)
            r = await client.post("/v2/models/m/infer", content=MALFORMED, headers=JSON)
            assert r.status_code == 400 and r.json()["reason"] == "invalid_input"
            # A well-formed one is still turned away, by the request path.
            assert_queue_full(await client.post("/v2/models/m/infer", json=ROW))
            assert (await held).status_code == 200

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("path", "headers", "status", "reason"),
    [
        ("/v2/models/nope/infer", JSON, 404, "model_not_found"),
        ("/v2/models/m/versions/9/infer", JSON, 404, "model_not_found"),
        ("/v2/models/m/infer", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        ("/v2/models/m/infer", {**JSON, "content-encoding": "br"}, 415, "unsupported_media_type"),
        # No Inference-Header-Content-Length: a JSON body (as Triton reads it), so queue full.
        ("/v2/models/m/infer", {"content-type": "application/octet-stream"}, 503, "queue_full"),
        ("/v2/models/m/infer", {**JSON, "inference-header-content-length": "x"}, 400, None),
        # Escaped: left to the request path, which finds the queue full.
        ("/v2/models/%6D/infer", JSON, 503, "queue_full"),
    ],
)
def test_what_the_headers_answer_is_answered_while_the_queue_is_full(
    path: str, headers: dict[str, str], status: int, reason: str | None
) -> None:
    runtime = build_runtime(full_config())

    async def scenario() -> None:
        async with listening(runtime) as client:
            held = await hold_the_queue(runtime, client)
            r = await client.post(path, json=ROW, headers=headers)
            assert r.status_code == status, r.text
            if reason is not None:
                assert r.json()["reason"] == reason
            # Larger than server.max_body_bytes: 413 from its Content-Length.
            r = await client.post("/v2/models/m/infer", content=b" " * 5000, headers=JSON)
            assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
            await held

    asyncio.run(scenario())


def two_versions(routing: dict[str, Any], **second: Any) -> Any:
    """Model ``m``: version 1 (primary) and version 2 (``second``: its stage, weight)."""
    cfg = fake_model_config(
        batching={"kind": "stacking", "max_queue_size": 4},
        versions={
            "1": {"loader": {"kind": "fake"}, "warmup": False},
            "2": {"loader": {"kind": "fake"}, "warmup": False, **second},
        },
    )
    cfg["models"]["m"]["primary"] = "1"
    cfg["routing"] = routing
    return build_runtime(cfg, (("body-router", BodyRouterPlugin()),))


class ByBodyRouter(Router):
    """A plugin router that says nothing of its candidates (it might route by the body)."""

    kind = "by-body"

    def route(self, request: RouteRequest, table: RoutingTable) -> str:
        return table.primary


class BodyRouterPlugin:
    @hookimpl
    def register_routers(self) -> list[type[Router]]:
        return [ByBodyRouter]


VARIANT_2 = {"x-infercore-variant": "2"}


def fill(*versions: Any) -> None:
    for sv in versions:
        sv.groups.waiting = sv.groups.max_waiting  # as if that many requests were inside


@pytest.mark.parametrize(
    ("routing", "second", "primary_full_turns_away"),
    [
        # The fraud recipe's shape: the primary answers, version 2 gets copies.
        (
            {"kind": "header", "inner": {"kind": "shadow", "inner": {"kind": "weighted"}}},
            {"stage": "shadow"},
            True,
        ),
        ({"kind": "weighted"}, {"stage": "canary", "weight": 10.0}, False),  # 10 % go to 2
        ({"kind": "weighted"}, {"stage": "canary", "weight": 0.0}, True),  # none go to 2
        ({"kind": "by-body"}, {"stage": "candidate"}, False),  # 2 is ready: it might
    ],
)
def test_a_routed_request_is_turned_away_early_only_when_every_candidate_is_full(
    routing: dict[str, Any], second: dict[str, Any], primary_full_turns_away: bool
) -> None:
    runtime = two_versions(routing, **second)

    async def scenario() -> None:
        await runtime.start()
        try:
            served = runtime.models["m"]
            one, two = served.versions["1"], served.versions["2"]
            assert served.full_version(None, {}) is None
            fill(one)
            assert one.full and not two.full
            expected = one if primary_full_turns_away else None
            assert served.full_version(None, {}) is expected
            assert served.full_version("1", {}) is one  # asked for in the URL
            assert served.full_version("2", {}) is None
            fill(two)
            assert served.full_version(None, {}) is one  # counted against the primary
            assert served.full_version("2", {}) is two
            assert served.full_version("3", {}) is None  # unknown: the request path's 404
            two.state = "loading"  # not ready: the request path's 503 model_not_ready
            assert served.full_version("2", {}) is None
            two.state = "ready"
            one.groups.waiting = two.groups.waiting = 0
        finally:
            await runtime.stop()

    asyncio.run(scenario())


def test_the_variant_header_names_the_one_candidate() -> None:
    runtime = two_versions(
        {"kind": "header", "inner": {"kind": "shadow", "inner": {"kind": "single"}}},
        stage="shadow",
    )

    async def scenario() -> None:
        await runtime.start()
        try:
            served = runtime.models["m"]
            one, two = served.versions["1"], served.versions["2"]
            fill(two)
            assert served.full_version(None, VARIANT_2) is two
            assert served.full_version(None, {}) is None  # to the primary, which has room
            fill(one)
            two.groups.waiting = 0
            assert served.full_version(None, VARIANT_2) is None
            assert served.full_version(None, {"x-infercore-variant": "9"}) is None  # unknown
            one.groups.waiting = 0
        finally:
            await runtime.stop()

    asyncio.run(scenario())


def test_without_request_groups_the_batcher_says_when_it_is_full() -> None:
    runtime = build_runtime(full_config(group_requests=False))

    async def scenario() -> None:
        async with listening(runtime) as client:
            sv = runtime.models["m"].versions["1"]
            assert sv.groups is None and not sv.full
            first = asyncio.create_task(client.post("/v2/models/m/infer", json=ROW))
            second = asyncio.create_task(client.post("/v2/models/m/infer", json=ROW))
            async with asyncio.timeout(5):
                while not sv.batcher.full:  # one running, one waiting
                    await asyncio.sleep(0.005)
            assert sv.full
            assert_queue_full(await client.post("/v2/models/m/infer", content=MALFORMED))
            assert [(await t).status_code for t in (first, second)] == [200, 200]

    asyncio.run(scenario())


def test_with_request_groups_the_batchers_own_full_counts_too() -> None:
    """A batcher full by the time its work takes (reject_expected_timeouts) turns requests
    away from their headers although the groups have room."""
    config = full_config()
    config["batching"]["max_queue_size"] = 8  # room in the groups: only the batcher is full
    runtime = build_runtime(config)

    async def scenario() -> None:
        async with listening(runtime) as client:
            sv = runtime.models["m"].versions["1"]
            assert sv.groups is not None and not sv.full
            drain = sv.batcher._drain  # as if measured just now: half a request in its horizon
            now = asyncio.get_running_loop().time()
            drain.took(0, now - drain.horizon_s / 0.5, backlog_left=True)
            drain.took(1, now, backlog_left=False)
            assert drain.limit == pytest.approx(0.5)
            held = asyncio.create_task(client.post("/v2/models/m/infer", json=ROW))
            async with asyncio.timeout(5):
                while not sv.batcher.full:  # its one call running, more than 0.5 ahead
                    await asyncio.sleep(0.005)
            assert sv.groups.waiting < sv.groups.max_waiting and sv.full
            r = await client.post("/v2/models/m/infer", content=MALFORMED, headers=JSON)
            assert r.status_code == 503 and r.json()["reason"] == "queue_full"
            assert (await held).status_code == 200

    asyncio.run(scenario())


def test_once_a_shutdown_began_the_request_path_answers_with_connection_close() -> None:
    # While draining, every answer must carry Connection: close (ShutdownMiddleware), which
    # an answer made before the body would not.
    runtime = build_runtime(full_config())
    state = ShutdownState()
    app = create_app(runtime, manage_runtime=False, shutdown=state)
    head = [(b"content-type", b"application/json")]

    async def scenario() -> None:
        await runtime.start()
        try:
            sv = runtime.models["m"].versions["1"]
            assert sv.groups is not None
            sv.groups.waiting = sv.groups.max_waiting
            answer = app.reject_before_body(b"/v2/models/m/infer", head)  # type: ignore[attr-defined]
            assert answer is not None and answer.status == 503
            state.phase = DRAINING
            assert app.reject_before_body(b"/v2/models/m/infer", head) is None  # type: ignore[attr-defined]
            sv.groups.waiting = 0
        finally:
            await runtime.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("server", "on"),
    [({}, True), ({"reject_before_body": False}, False), ({"access_log": True}, False)],
)
def test_the_app_offers_it_unless_turned_off_or_the_access_log_is_on(
    server: dict[str, Any], on: bool
) -> None:
    # The access log is written in the ASGI cycle, which an early answer skips.
    app = create_app(build_runtime(full_config(**server)), manage_runtime=False)
    assert (app.reject_before_body is not None) is on  # type: ignore[attr-defined]


def test_a_client_gone_before_its_body_is_counted_cancelled_not_rejected() -> None:
    runtime = build_runtime(full_config())

    async def scenario() -> None:
        async with listening(runtime) as client:
            held = await hold_the_queue(runtime, client)
            port = client.base_url.port
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\n"
                b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await writer.wait_closed()
            await held
            async with asyncio.timeout(5):
                while True:
                    text = (await client.get("/metrics")).text
                    if metric_value(text, "infercore_request_failures_total", reason="cancelled"):
                        break
                    await asyncio.sleep(0.02)
        assert metric_value(text, "infercore_request_failures_total", reason="cancelled") == 1
        assert metric_value(text, "infercore_request_failures_total", reason="queue_full") == 0
        assert metric_value(text, "infercore_requests_total", code="503") == 0

    asyncio.run(scenario())
