"""infercore's HTTP protocol in front of a bare ASGI app, on a real uvicorn server.

What the protocol promises without help from infercore's app: a request that comes once the
server is stopping closes its connection (the app's ShutdownMiddleware says
``Connection: close`` too, a bare app does not), and a request body the HTTP parser refuses is
answered and counted by the protocol, whatever state the app is in, unless the app began its
answer already (that answer then ends where it is, and the connection closes after it).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from uvicorn_support import app_on_loopback

from infercore.server import shutdown
from infercore.server.shutdown import http_protocol


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 ``{"got": n}`` after reading the body; ``/slow`` answers 0.2 s later without
    reading it. No ``Connection`` header, ever."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.2)
        body = b"{}"
    else:
        size = 0
        more = True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b'{"got":%d}' % size
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


EARLY_BODY = b'{"error":"full","reason":"queue_full"}'


class Early:
    """An answer as the app's ``reject_before_body`` makes it; records what became of it."""

    status = 503
    body = EARLY_BODY
    headers = [(b"content-type", b"application/json"), (b"content-length", b"38")]

    def __init__(self, fates: list[str]) -> None:
        self.fates = fates

    def sent(self) -> None:
        self.fates.append("sent")

    def abandoned(self) -> None:
        self.fates.append("abandoned")


class Served:
    """The server: its port, its connections' protocols, what it counted, what became of the
    answers made from heads (``/full``)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: Any = None
        self.protocols: list[Any] = []
        self.counted: list[tuple[int | None, str]] = []
        self.fates: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []

    def reject(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Early | None:
        return Early(self.fates) if target == b"/full" else None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer


@asynccontextmanager
async def serving(linger_s: float = 0.1, app: Any = bare_app) -> AsyncIterator[Served]:
    served = Served()
    base = http_protocol(
        linger_s,
        served.reject,
        count_refused=lambda status, reason: served.counted.append((status, reason)),
    )

    class Recording(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            self.lost = asyncio.Event()  # set once the server saw the connection go
            served.protocols.append(self)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.lost.set()

    # The idle keep-alive timeout far above every wait here: a connection left open shows.
    async with app_on_loopback(app, Recording, timeout_keep_alive=60) as (port, server):
        served.port, served.server = port, server
        try:
            yield served
        finally:
            for writer in served.writers:  # uvicorn's shutdown waits for its connections
                writer.close()


async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response's head and body (every body here has a Content-Length)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return head, await reader.readexactly(length)


async def lost(protocol: Any) -> None:
    """Wait (at most 5 s) until the server saw the connection of ``protocol`` go."""
    async with asyncio.timeout(5):
        await protocol.lost.wait()


async def apps_done(srv: Served) -> None:
    """Wait (at most 5 s) until every request the app was running has returned."""
    tasks = set(srv.server.server_state.tasks)
    if tasks:
        _, running = await asyncio.wait(tasks, timeout=5)
        assert not running, running


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection with nothing more written (within 5 s: the
    idle keep-alive timeout is 60 s)."""
    try:
        async with asyncio.timeout(5):
            return await reader.read() == b""
    except TimeoutError:
        return False


GET = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


def chunked(path: bytes, *extra: bytes) -> bytes:
    """A chunked POST's head and a first chunk, then a chunk-size line that is not hex."""
    head = [b"POST " + path + b" HTTP/1.1", b"host: t", b"transfer-encoding: chunked", *extra]
    return b"\r\n".join([*head, b"", b""]) + b"2\r\n{}\r\nzz\r\n"


def refused_body(head: bytes, body: bytes) -> None:
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
    assert b"content-type: application/json\r\n" in head and b"connection: close\r\n" in head
    doc = json.loads(body)
    assert doc["reason"] == "invalid_input", doc
    assert doc["error"].startswith("malformed HTTP request body: "), doc


# --- stopping -------------------------------------------------------------------------------


def test_a_request_on_a_kept_alive_connection_once_stopping_closes_it() -> None:
    """uvicorn's shutdown leaves an idle keep-alive connection open (its linger); a request on
    it is answered, saying ``Connection: close``, and the connection closes, though the app
    said nothing of it (it stayed open for the idle timeout: 60 s here)."""

    async def scenario() -> None:
        async with serving(linger_s=5.0) as srv:
            reader, writer = await srv.connect()
            writer.write(GET)
            head, _ = await response(reader)
            assert b"connection:" not in head.lower(), head  # kept alive
            srv.server.should_exit = True
            (connection,) = srv.protocols
            async with asyncio.timeout(5):
                while not connection.stopping:  # uvicorn's shutdown reached it
                    await asyncio.sleep(0.01)
            writer.write(GET)
            head, body = await response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b'{"got":0}', head
            assert b"connection: close\r\n" in head, head
            assert await closed(reader)
            writer.close()

    asyncio.run(scenario())


# --- malformed bodies -----------------------------------------------------------------------


def test_a_malformed_body_the_app_was_waiting_for_is_answered_and_counted() -> None:
    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            writer.write(chunked(b"/x"))
            refused_body(*await response(reader))
            assert await closed(reader)
            writer.close()
            assert srv.counted == [(400, "invalid_input")]

    asyncio.run(scenario())


def test_the_app_s_own_answer_to_a_request_whose_body_was_refused_goes_nowhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app answers later without reading the body: the protocol's 400 is the only answer,
    and the app's send is dropped without an error."""

    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            writer.write(chunked(b"/slow"))
            refused_body(*await response(reader))
            await apps_done(srv)  # the app's answer was made
            assert await closed(reader)
            writer.close()
            assert srv.counted == [(400, "invalid_input")]

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_malformed_body_replaces_the_answer_made_from_its_head() -> None:
    """An answer made from the head waits for the body (``reject_before_body``): a malformed
    body is answered 400 and counted as such, and that answer is neither sent nor counted as
    abandoned (it used to be: one request counted twice, as gone and as refused)."""

    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            writer.write(chunked(b"/full"))
            refused_body(*await response(reader))
            assert await closed(reader)
            writer.close()
            await lost(srv.protocols[0])  # abandoned() would have been called by now
            assert srv.counted == [(400, "invalid_input")]
            assert srv.fates == []

    asyncio.run(scenario())


def test_a_body_refused_after_an_answer_made_before_it_gets_no_second_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request waiting for ``100 Continue`` is answered from its head at once; a malformed
    body in the same read is dropped with the rest, not answered again (a second answer was
    written after the connection was half-closed: an error, and the connection reset)."""

    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            writer.write(chunked(b"/full", b"expect: 100-continue"))
            head, body = await response(reader)
            assert head.startswith(b"HTTP/1.1 503 ") and body == EARLY_BODY, head
            assert await closed(reader)
            writer.close()
            assert srv.fates == ["sent"] and srv.counted == []

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("first_chunk", [b"", b"started"], ids=["head-only", "head-and-chunk"])
def test_a_malformed_body_read_after_the_app_began_its_answer_ends_that_answer(
    first_chunk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The app starts its response, then reads the body: a malformed body ends that response
    where it is (what the app wrote goes, its head too when held for a body; no 400 after it)
    and the connection closes. The app's receive() says the client disconnected; it waited for
    ever, and the connection stayed open, before. Nothing is counted: the app's answer it is."""
    started = asyncio.Event()
    received: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/plain"), (b"transfer-encoding", b"chunked")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if first_chunk:
            await send({"type": "http.response.body", "body": first_chunk, "more_body": True})
        started.set()
        while True:
            message = await receive()
            received.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"done"})  # goes nowhere

    async def scenario() -> None:
        async with serving(app=app) as srv:
            reader, writer = await srv.connect()
            writer.write(b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"2\r\n{}\r\n")
            async with asyncio.timeout(5):
                await started.wait()
            writer.write(b"zz\r\n")
            async with asyncio.timeout(5):
                written = await reader.read()  # to the end: the server half-closed
            head, _, body = written.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), written
            assert b"transfer-encoding: chunked" in head, written
            assert body == (b"7\r\nstarted\r\n" if first_chunk else b""), written
            await apps_done(srv)
            assert received[-1] == "http.disconnect", received
            writer.close()
            await lost(srv.protocols[0])
            assert srv.counted == []

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_body_refused_past_the_read_limit_is_still_read_and_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A malformed chunk in the read that took an unread body past uvicorn's read limit
    (64 KiB) left reading paused: a client still sending its body blocked once the socket
    buffers were full, and was reset when the discard ended. What follows the refusal is read
    and dropped: the client sends all of it (more than any socket buffer here holds), then
    reads the end of the connection."""
    monkeypatch.setattr(shutdown, "DISCARD_S", 60.0)  # the discard does not end this test

    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            head = b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            past_the_limit = b"11000\r\n" + b"a" * 0x11000 + b"\r\n"
            # One write, one read by the server (the app has not run when it is parsed).
            writer.write(head + past_the_limit + b"zz\r\n")
            refused_body(*await response(reader))
            writer.write(b"x" * (64 * 1024 * 1024))
            async with asyncio.timeout(20):
                await writer.drain()
            assert await closed(reader)
            writer.close()
            assert srv.counted == [(400, "invalid_input")]

    asyncio.run(scenario())


def test_a_kept_alive_connection_lets_go_of_the_requests_before_the_current_one() -> None:
    """Once a request was read, the one before it on its connection (its scope, a body the
    app did not read) is let go: it was kept until the next request's head came."""

    async def scenario() -> None:
        async with serving() as srv:
            reader, writer = await srv.connect()
            writer.write(b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello")
            await response(reader)
            (connection,) = srv.protocols
            first = weakref.ref(connection.cycle)
            writer.write(GET)
            await response(reader)
            await apps_done(srv)
            gc.collect()
            assert first() is None  # the first request: nothing holds it now
            assert connection.cycle is not None  # the current request's, uvicorn's to keep
            writer.close()

    asyncio.run(scenario())
