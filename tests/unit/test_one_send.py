"""One ``send`` per response: the listener's transport wrapper and the protocol that uses it.

uvicorn's httptools protocol writes a response's head and its body separately; infercore's
protocol (``http_protocol``) sends them together. The protocol tests run the real protocol on
a loopback socket and record what it hands to the transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infercore.server.shutdown import OneSendTransport, http_protocol

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """A transport that records each write (and whether it was closed)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.inner is not None:
            self.inner.write(data)

    def close(self) -> None:
        self.closed = True
        if self.inner is not None:
            self.inner.close()

    def is_closing(self) -> bool:
        return self.closed if self.inner is None else self.inner.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_head_and_its_body_leave_in_one_write() -> None:
    rec = Recorder()
    t = OneSendTransport(rec)
    t.write(HEAD)
    assert rec.writes == []  # held for the body
    t.write(b"{}")
    assert rec.writes == [HEAD + b"{}"]
    t.flush()  # nothing held any more
    assert rec.writes == [HEAD + b"{}"]


def test_chunks_after_the_first_pass_straight_through() -> None:
    rec = Recorder()
    t = OneSendTransport(rec)
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    t.write(head)
    t.write(b"2\r\n{}\r\n")
    t.write(b"0\r\n\r\n")
    assert rec.writes == [head + b"2\r\n{}\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",  # the client waits for it before sending its body
        # complete (uvicorn's own error answers): no body follows
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 7\r\n\r\nInvalid",
        b"{}",
    ],
)
def test_what_is_not_a_response_head_is_written_at_once(data: bytes) -> None:
    rec = Recorder()
    OneSendTransport(rec).write(data)
    assert rec.writes == [data]


def test_a_held_head_is_sent_by_flush_and_by_close() -> None:
    rec = Recorder()
    t = OneSendTransport(rec)
    t.write(HEAD)
    t.flush()
    assert rec.writes == [HEAD]
    t.write(HEAD)
    t.close()
    assert rec.writes == [HEAD, HEAD] and rec.closed


def test_a_head_held_when_the_connection_is_already_gone_is_dropped() -> None:
    rec = Recorder()
    t = OneSendTransport(rec)
    t.write(HEAD)
    rec.closed = True  # the peer went away
    t.close()
    assert rec.writes == []


def test_other_transport_calls_reach_the_transport() -> None:
    class Inner(Recorder):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 1) if name == "peername" else default

    t = OneSendTransport(Inner())
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
    assert t.is_closing() is False


# --- the protocol on a loopback socket ------------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = b'{"got":%d}' % len(body)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer})


async def _exchange(request: bytes, *, then: bytes = b"") -> tuple[bytes, list[bytes]]:
    """Send ``request`` (and ``then`` after the first answer) to the protocol; its writes."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    # Keep-alive outlasts the 10 s limit: a head held back is not sent by the idle close.
    config = Config(_app, lifespan="off", log_config=None, timeout_keep_alive=60)
    config.load()
    state = ServerState()
    recorders: list[Recorder] = []
    base = http_protocol(0.1)

    class Recording(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            recorders.append(Recorder(transport))
            super().connection_made(recorders[-1])  # type: ignore[arg-type]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Recording(config=config, server_state=state, app_state={}, _loop=loop),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        received = b""
        async with asyncio.timeout(10):
            if then:
                received += await reader.readuntil(b"\r\n\r\n")  # the interim 100 Continue
                writer.write(then)
                await writer.drain()
            received += await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 0" not in received.lower() and not request.startswith(b"HEAD"):
                received += await reader.read(100)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return received, recorders[0].writes


def test_the_protocol_sends_each_response_in_one_write() -> None:
    request = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"
    received, writes = asyncio.run(_exchange(request))
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b'{"got":2}')
    assert len(writes) == 1 and writes[0] == received


def test_a_head_request_is_answered_without_waiting_for_a_body() -> None:
    received, writes = asyncio.run(_exchange(b"HEAD /x HTTP/1.1\r\nhost: t\r\n\r\n"))
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n")
    assert writes == [received]  # the head alone, flushed when the response completed


def test_100_continue_is_sent_before_the_body_arrives() -> None:
    request = b"POST /x HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
    received, writes = asyncio.run(_exchange(request, then=b"{}"))
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n" and len(writes) == 2


# --- answers before the body (``reject_before_body``) ---------------------------------------

EARLY_BODY = b'{"error":"full","reason":"queue_full"}'


class Early:
    """An answer as the app's ``reject_before_body`` returns it; records what became of it."""

    status = 503
    body = EARLY_BODY
    headers = [
        (b"retry-after", b"1"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(EARLY_BODY)),
    ]

    def __init__(self, fate: list[str]) -> None:
        self.fate = fate

    def sent(self) -> None:
        self.fate.append("sent")

    def abandoned(self) -> None:
        self.fate.append("abandoned")


async def _slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/slow":
        await asyncio.sleep(0.2)
    await _app(scope, receive, send)


class EarlyServer:
    """The protocol on a loopback socket, with a ``reject_before_body`` that answers ``/full``."""

    def __init__(self, *, broken: bool = False) -> None:
        self.asked: list[bytes] = []
        self.fates: list[str] = []
        self.broken = broken
        self.protocols: list[Any] = []
        self.writes: list[bytes] = []

    def reject(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Early | None:
        self.asked.append(target)
        if self.broken:
            raise RuntimeError("a bug")
        return Early(self.fates) if target.startswith(b"/full") else None

    async def __aenter__(self) -> EarlyServer:
        from uvicorn.config import Config
        from uvicorn.server import ServerState

        config = Config(_slow_app, lifespan="off", log_config=None, timeout_keep_alive=60)
        config.load()
        state = ServerState()
        base = http_protocol(0.1, self.reject)
        outer = self

        class Recording(base):  # type: ignore[misc, valid-type]
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                outer.protocols.append(self)
                rec = Recorder(transport)
                rec.writes = outer.writes  # every connection's writes, in order
                super().connection_made(rec)  # type: ignore[arg-type]

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Recording(config=config, server_state=state, app_state={}, _loop=loop),
            "127.0.0.1",
            0,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response's head and body (bodies here always carry Content-Length)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return head, await reader.readexactly(length)


def _post(path: bytes, body: bytes = b"{}", *extra: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"host: t", b"content-length: %d" % len(body)]
    return b"\r\n".join([*head, *extra, b"", b""]) + body


def test_an_early_answer_goes_once_the_body_is_in_and_the_connection_serves_on() -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            request = _post(b"/full?x=1", b'{"not": json')
            writer.write(request[:-5])  # the head and part of the body
            await writer.drain()
            await asyncio.sleep(0.1)
            assert srv.asked == [b"/full?x=1"] and srv.writes == []  # decided, not yet sent
            assert srv.fates == []
            writer.write(request[-5:])
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"retry-after: 1\r\n" in head and body == EARLY_BODY
            assert len(srv.writes) == 1  # one send, as every response
            assert srv.fates == ["sent"]
            # Keep-alive: the next request on the connection reaches the app.
            writer.write(_post(b"/x", b"[1]"))
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"got":3}'
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (b"POST /full HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}", "HTTP/1.0"),
        (b"PUT /full HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}", "not a POST"),
    ],
)
def test_what_may_not_be_answered_early_reaches_the_app(request_: bytes, why: str) -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            writer.write(request_)
            if b"100-continue" in request_:
                async with asyncio.timeout(10):
                    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.") and b" 200 OK" in head, why
            assert body == b'{"got":2}'
            assert srv.asked == [], why
            writer.close()

    asyncio.run(scenario())


def _expecting(path: bytes, length: int = 2) -> bytes:
    """A request head that waits for 100 Continue before sending a body of ``length`` bytes."""
    return b"POST %s HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (
        path,
        length,
    )


def test_a_request_waiting_for_100_continue_is_answered_at_once_and_its_connection_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import infercore.server.shutdown as shutdown

    monkeypatch.setattr(shutdown, "DISCARD_S", 60.0)  # the FIN below is not the timer's close

    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            writer.write(_expecting(b"/full"))  # and waits: no body before 100 Continue
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")  # no 100 first
            assert b"connection: close\r\n" in head and b"retry-after: 1\r\n" in head
            assert body == EARLY_BODY and srv.fates == ["sent"] and len(srv.writes) == 1
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # the server's FIN follows the answer
            assert not srv.protocols[0].one_send.transport.is_closing()  # half-closed
            writer.close()
            await writer.wait_closed()
            async with asyncio.timeout(10):  # the client's close ends it, long before 60 s
                while not srv.protocols[0].one_send.transport.is_closing():
                    await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_a_body_sent_anyway_after_an_answer_before_it_is_dropped_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import infercore.server.shutdown as shutdown

    monkeypatch.setattr(shutdown, "DISCARD_S", 1.5)

    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            writer.write(_expecting(b"/full", 9))
            await _response(reader)
            # A client that stopped waiting: the body, then another request and bytes that
            # are no HTTP at all, on the same connection. Nothing is parsed, answered or reset.
            writer.write(b"[1, 2, 3]" + _post(b"/x", b"[1]") + b"\x00 not HTTP\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                assert await reader.read() == b""
            await asyncio.sleep(0.1)  # the server has read them (not yet closed: 1.5 s)
            assert srv.asked == [b"/full"] and srv.fates == ["sent"] and len(srv.writes) == 1
            transport = srv.protocols[0].one_send.transport
            assert not transport.is_closing()  # half-closed: still reading, to drop
            async with asyncio.timeout(10):  # closed once DISCARD_S passed, the client still there
                while not transport.is_closing():
                    await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(scenario())


def test_a_request_waiting_for_100_continue_that_may_be_admitted_gets_100_continue() -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            writer.write(_expecting(b"/x"))
            async with asyncio.timeout(10):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"{}")
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"got":2}'
            assert srv.asked == [b"/x"] and srv.fates == []
            writer.write(_post(b"/x", b"[1]"))  # and the connection serves on
            assert (await _response(reader))[1] == b'{"got":3}'
            writer.close()

    asyncio.run(scenario())


def test_a_pipelined_request_is_not_answered_before_the_one_ahead_of_it() -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            writer.write(_post(b"/slow", b"[1]") + _post(b"/full", b"[22]"))
            first = await _response(reader)
            second = await _response(reader)
            assert first[1] == b'{"got":3}' and second[1] == b'{"got":4}'  # the app, in order
            assert srv.asked == [b"/slow"]  # /full came while /slow was still answering
            writer.close()

    asyncio.run(scenario())


def test_a_failing_reject_before_body_leaves_the_request_to_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with EarlyServer(broken=True) as srv:
            reader, writer = await srv.connect()
            writer.write(_post(b"/full"))
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"got":2}'
            writer.close()

    with caplog.at_level("ERROR", logger="infercore.server"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "rejecting a request before its body failed"
    ]


def test_an_early_answer_after_shutdown_began_closes_its_connection() -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            reader, writer = await srv.connect()
            request = _post(b"/full")
            writer.write(request[:-2])  # decided on the head; the body is late
            await writer.drain()
            await asyncio.sleep(0.1)
            srv.protocols[0].shutdown()
            writer.write(request[-2:])
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 503") and b"connection: close\r\n" in head
            assert body == EARLY_BODY
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # closed by the server
            writer.close()

    asyncio.run(scenario())


def test_a_client_that_leaves_before_its_body_is_not_answered_and_is_counted_so() -> None:
    async def scenario() -> None:
        async with EarlyServer() as srv:
            _, writer = await srv.connect()
            writer.write(_post(b"/full", b"[1, 2, 3]")[:-4])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await writer.wait_closed()
            async with asyncio.timeout(10):
                while not srv.fates:
                    await asyncio.sleep(0.01)
            assert srv.fates == ["abandoned"] and srv.writes == []

    asyncio.run(scenario())
