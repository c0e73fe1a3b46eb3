"""The three deploy shapes as composed config, the server settings they add, and the shutdown
sequence's parts in process (the real-process tests are tests/e2e/test_shutdown.py and
test_sidecar.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from infercore.cli import run
from infercore.config.compose import compose
from infercore.errors import ConfigError
from infercore.server import create_app
from infercore.server.logs import configure
from infercore.server.shutdown import (
    CLOSING,
    DRAINING,
    FORCED,
    SERVING,
    GracefulShutdown,
    ShutdownMiddleware,
    ShutdownState,
)
from infercore.testing import fake_model_config, runtime_from_dict

BODY = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]
}


# --- shapes ------------------------------------------------------------------------------------


def test_standalone_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_HOST", raising=False)
    for env in ("dev", "staging", "prod"):
        server = compose(["+recipe=iris", f"env={env}"]).config.server
        assert server.host == "127.0.0.1", env
        assert server.uds is None and server.drain_delay_s == 0
        assert server.log_stream == "stderr"


def test_sidecar_serves_on_a_unix_socket_with_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    composed = compose(["+recipe=iris", "deploy=sidecar"])
    server = composed.config.server
    assert server.uds == "/tmp/infercore/infercore.sock"
    assert server.host == "127.0.0.1" and server.workers == 1
    monkeypatch.setenv("INFERCORE_UDS", "/run/app/ic.sock")
    assert compose(["+recipe=iris", "deploy=sidecar"]).config.server.uds == "/run/app/ic.sock"
    # Loopback instead of a socket: one override.
    assert compose(["+recipe=iris", "deploy=sidecar", "server.uds=null"]).config.server.uds is None


def test_k8s_binds_all_interfaces_and_logs_json_to_stdout() -> None:
    for env in ("dev", "prod"):
        server = compose(["+recipe=iris", f"env={env}", "deploy=k8s"]).config.server
        assert server.host == "0.0.0.0"
        assert (server.log_format, server.log_stream) == ("json", "stdout")
        assert server.drain_delay_s > 0
        assert server.uds is None


def test_shutdown_settings_validate() -> None:
    with pytest.raises(ConfigError, match=r"server\.drain_delay_s"):
        compose(["+recipe=iris", "server.drain_delay_s=-1"])
    with pytest.raises(ConfigError, match=r"server\.graceful_timeout_s"):
        compose(["+recipe=iris", "server.graceful_timeout_s=0"])
    # Every shape sets the new keys, so they override without a `+`.
    for shape in ("standalone", "sidecar", "k8s"):
        compose(
            [
                "+recipe=iris",
                f"deploy={shape}",
                "server.drain_delay_s=2",
                "server.uds=null",
                "server.log_stream=stdout",
            ]
        )


def test_serve_refuses_an_unusable_socket_path(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    long_path = "/tmp/" + "x" * 120 + ".sock"
    assert run(["serve", "+recipe=iris", f"server.uds={long_path}"]) == 2
    assert "the limit is 107" in capsys.readouterr().err
    regular = tmp_path / "file"
    regular.write_text("")
    assert run(["serve", "+recipe=iris", f"server.uds={regular}"]) == 2
    assert "exists and is not a socket" in capsys.readouterr().err


def test_json_logs_go_to_stdout_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure("info", "json", "stdout")
        logging.getLogger("infercore.test").info("hello", extra={"model": "m"})
        out, err = capsys.readouterr()
        assert '"msg": "hello"' in out and '"model": "m"' in out and not err
    finally:
        configure("info", "text", "stderr")


# --- the app during shutdown -------------------------------------------------------------------


@asynccontextmanager
async def served(state: ShutdownState) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    runtime = runtime_from_dict(fake_model_config())
    app = ShutdownMiddleware(create_app(runtime, manage_runtime=False, shutdown=state), state)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, runtime
    finally:
        await runtime.stop()


def test_draining_turns_readiness_false_but_keeps_serving() -> None:
    state = ShutdownState()

    async def scenario() -> None:
        async with served(state) as (c, runtime):
            r = await c.post("/v2/models/m/infer", json=BODY)
            assert r.status_code == 200 and "connection" not in r.headers
            assert (await c.get("/v2/health/ready")).status_code == 200

            state.phase = DRAINING
            ready = await c.get("/v2/health/ready")
            assert ready.status_code == 503
            assert ready.json() == {
                "ready": False,
                "error": "the server is shutting down",
                "reason": "shutting_down",
            }
            assert ready.headers["retry-after"] == "1"
            assert (await c.get("/v2/health/live")).status_code == 200  # liveness unaffected
            r = await c.post("/v2/models/m/infer", json=BODY)
            assert r.status_code == 200  # still serving through the drain delay
            assert r.headers["connection"] == "close"  # ... and asking clients to reconnect
            assert runtime.draining is False

            state.phase = CLOSING
            late = await c.post("/v2/models/m/infer", json=BODY)
            assert late.status_code == 503 and late.json()["reason"] == "shutting_down"
            assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
            metrics = (await c.get("/metrics")).text
            assert 'reason="shutting_down"' in metrics  # counted like every non-2xx

    asyncio.run(scenario())


def test_middleware_answers_work_cancelled_by_the_timeout() -> None:
    state = ShutdownState()
    sent: list[dict[str, Any]] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario(phase: str) -> None:
        state.phase = phase
        task = asyncio.create_task(
            ShutdownMiddleware(slow_app, state)({"type": "http"}, receive, send)
        )
        await asyncio.sleep(0.01)
        task.cancel()
        await task

    asyncio.run(scenario(CLOSING))
    start, body = sent
    assert start["status"] == 503
    assert (b"connection", b"close") in start["headers"]
    assert b'"reason":"shutting_down"' in body["body"]

    sent.clear()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario(SERVING))  # a cancellation outside shutdown is not ours to answer
    assert sent == []


class FakeServer:
    def __init__(self) -> None:
        self.should_exit = False
        self.force_exit = False
        self.servers: list[Any] = []


def test_signal_sequence_drain_close_force() -> None:
    async def scenario() -> None:
        server, state = FakeServer(), ShutdownState()
        seq = GracefulShutdown(server, state, drain_delay_s=0.2, is_ready=lambda: True)
        seq.on_signal(signal.SIGTERM)
        assert state.phase == DRAINING and state.draining and not state.closing
        assert server.should_exit is False  # still accepting during the drain delay
        await asyncio.sleep(0.3)
        assert state.phase == CLOSING and server.should_exit and not server.force_exit
        seq.on_signal(signal.SIGINT)
        assert state.phase == FORCED and server.force_exit and seq.forced

        # A second signal during the drain delay stops at once too; on_force runs once,
        # at that signal (the batchers stop without draining), never at the first.
        server, state = FakeServer(), ShutdownState()
        forced: list[bool] = []
        seq = GracefulShutdown(
            server,
            state,
            drain_delay_s=5,
            is_ready=lambda: True,
            on_force=lambda: forced.append(server.force_exit),
        )
        seq.on_signal(signal.SIGTERM)
        assert forced == []
        seq.on_signal(signal.SIGTERM)
        assert state.phase == FORCED and server.should_exit and server.force_exit
        seq.on_signal(signal.SIGTERM)
        assert forced == [True]
        await asyncio.sleep(0)

        # Never ready (models still loading): nobody to tell, no drain delay.
        server, state = FakeServer(), ShutdownState()
        seq = GracefulShutdown(server, state, drain_delay_s=5, is_ready=lambda: False)
        seq.on_signal(signal.SIGTERM)
        assert state.phase == CLOSING and server.should_exit

    asyncio.run(scenario())


def test_log_line_names_the_drain(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        seq = GracefulShutdown(
            FakeServer(), ShutdownState(), drain_delay_s=2, is_ready=lambda: True
        )
        seq.on_signal(signal.SIGTERM)
        seq.on_signal(signal.SIGTERM)

    logger = logging.getLogger("infercore")
    logger.addHandler(caplog.handler)
    try:
        # Its own level: it once leaned on the INFO another test's configure() left behind.
        with caplog.at_level(logging.INFO, logger="infercore"):
            asyncio.run(scenario())
    finally:
        logger.removeHandler(caplog.handler)
    text = io.StringIO("\n".join(r.getMessage() for r in caplog.records)).getvalue()
    assert "serving on for 2.0s" in text and "again: stopping without waiting" in text


def test_probe_over_tcp() -> None:
    """``python -m infercore.deploy.probe URL`` (the image's HEALTHCHECK): 0 on 200 only."""
    import http.server
    import threading

    from infercore.deploy.probe import main as probe_main

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/live" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            assert probe_main([f"{base}/v2/health/live"]) == 0
            assert probe_main([f"{base}/v2/health/ready"]) == 1
        finally:
            httpd.shutdown()
    assert probe_main([f"{base}/v2/health/live", "--timeout", "0.5"]) == 1  # nobody listens
    assert probe_main(["ftp://example/x"]) == 1
