"""Request heads are bounded in size and time (``server.max_header_bytes``,
``server.header_timeout_ms``).

httptools has no limit on a header (it buffers one until its line ends) and uvicorn starts no
clock before a request's headers are complete: a 16 MB header was answered 200, and a client
sending one header line a second held its connection for ever. The app behind uvicorn with
infercore's protocol on a real loopback socket, as ``infercore serve`` runs it, with small
limits so that the tests are quick.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from uvicorn_support import on_loopback

from infercore.server.shutdown import http_protocol
from infercore.testing import fake_model_config, runtime_from_dict

CAP = 8 * 1024
TIMEOUT_S = 0.5
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


class Fed:
    """What the HTTP parsers of a server's connections were given, in bytes (all of them)."""

    def __init__(self) -> None:
        self.total = 0


def counting(protocol: type[Any], fed: Fed) -> type[Any]:
    """``protocol`` whose parsers count what they are fed (what httptools may buffer)."""

    class Parser:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def feed_data(self, data: bytes) -> None:
            fed.total += len(data)
            self.inner.feed_data(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    class Counting(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.parser = Parser(self.parser)

    return Counting


@asynccontextmanager
async def listening(
    *,
    config: dict[str, Any] | None = None,
    wrap: Callable[[type[Any]], type[Any]] = lambda p: p,
    **limits: Any,
) -> AsyncIterator[int]:
    """A server on a loopback port with the given head limits; yields the port."""
    runtime = runtime_from_dict(config or fake_model_config())
    options = {"max_header_bytes": CAP, "header_timeout_s": TIMEOUT_S, **limits}
    async with on_loopback(runtime, lambda app: wrap(http_protocol(0.1, None, **options))) as port:
        yield port


def exchange(port: int, data: bytes, *, wait_s: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``wait_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except TimeoutError:
        received += b"<still open>"
    except ConnectionResetError:
        received += b"<reset>"
    return received


def answer(received: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


async def serves_on(port: int) -> None:
    """The server answers a plain request on a new connection (after a refusal)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        r = await client.post("/v2/models/m/infer", json=ROW)
        assert r.status_code == 200, r.text


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


# --- size -----------------------------------------------------------------------------------


def test_headers_larger_than_the_limit_are_431_and_the_server_serves_on() -> None:
    async def scenario() -> None:
        async with listening() as port:
            big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * CAP)
            received = await asyncio.to_thread(exchange, port, big + b"\r\n\r\n")
            status, headers, doc = answer(received)
            assert status == 431, received[:300]
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            assert doc["reason"] == "headers_too_large"
            assert f"longer than {CAP} bytes (server.max_header_bytes)" in doc["error"]
            assert "hint: send fewer or shorter headers" in doc["error"]
            # Many headers adding up count too, not just one long one.
            many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(CAP // 100))
            received = await asyncio.to_thread(exchange, port, LIVE[:-2] + many + b"\r\n")
            assert answer(received)[0] == 431
            await serves_on(port)

    run(scenario)


def test_a_head_just_under_the_limit_is_served() -> None:
    async def scenario() -> None:
        async with listening() as port:
            head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: "
            filler = b"a" * (CAP - len(head) - 4)
            received = await asyncio.to_thread(
                exchange, port, head + filler + b"\r\n\r\n", wait_s=1
            )
            assert received.startswith(b"HTTP/1.1 200 "), received[:200]

    run(scenario)


def test_a_request_target_longer_than_the_limit_is_414() -> None:
    async def scenario() -> None:
        async with listening() as port:
            data = b"GET /v2/models/" + b"a" * (2 * CAP) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            status, _, doc = answer(await asyncio.to_thread(exchange, port, data))
            assert status == 414
            assert doc["error"].startswith(f"the request target is longer than {CAP} bytes")
            await serves_on(port)

    run(scenario)


def test_a_huge_header_is_not_read_past_the_limit() -> None:
    """Three 50 MB headers raised the server's memory by 150 MB, for good: now the parser is
    given at most the limit and one more read of each, and the rest is dropped unparsed."""
    fed = Fed()
    sent = 8 * 1024 * 1024

    def stream(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(read_all(s)))
            reader.start()
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * 65536
            try:
                for _ in range(sent // len(chunk)):
                    s.sendall(chunk)
            except OSError:
                pass  # the server closed after its answer
            reader.join(15)
            return received[0]

    async def scenario() -> None:
        async with listening(wrap=lambda p: counting(p, fed)) as port:
            received = await asyncio.to_thread(stream, port)
            assert answer(received)[0] == 431
            await serves_on(port)

    run(scenario)
    # One read is at most 256 KiB (asyncio's and uvloop's buffers); the other connections of
    # serves_on() add a few hundred bytes.
    assert fed.total < CAP + 256 * 1024 + 4096, fed.total


# --- time -----------------------------------------------------------------------------------


def test_a_head_sent_too_slowly_is_408_and_closed() -> None:
    def slowloris(port: int) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            start = time.monotonic()
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(40):  # a line every 0.1 s: never complete within 0.5 s
                    s.sendall(b"X-Line-%d: 1\r\n" % i)
                    time.sleep(0.1)
            except OSError:
                pass
            received = read_all(s)
            return received, time.monotonic() - start

    async def scenario() -> None:
        async with listening() as port:
            received, elapsed = await asyncio.to_thread(slowloris, port)
            status, headers, doc = answer(received)
            assert status == 408, received[:300]
            assert headers["connection"] == "close"
            assert doc["reason"] == "request_timeout"
            assert "did not arrive within 500 ms (server.header_timeout_ms)" in doc["error"]
            assert elapsed < 4.0  # answered and closed, not left open till the client stops
            await serves_on(port)

    run(scenario)


def test_the_next_request_on_a_keep_alive_connection_has_the_same_clock() -> None:
    def two(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(LIVE)
            first = b""
            while b'{"live":true}' not in first:
                first += s.recv(65536)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and nothing more
            return read_all(s)

    async def scenario() -> None:
        async with listening() as port:
            received = await asyncio.to_thread(two, port)
            assert answer(received)[0] == 408, received[:300]
            await serves_on(port)

    run(scenario)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    def silent(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return read_all(s)

    async def scenario() -> None:
        async with listening() as port:
            assert await asyncio.to_thread(silent, port) == b""  # closed: no bytes, no answer
            await serves_on(port)

    run(scenario)


def test_a_head_is_not_answered_408_in_the_middle_of_the_response_before_it() -> None:
    """A pipelined request's head that is late while the request before it still runs is not
    answered then (its 408 would land inside the other response): it is waited for."""
    body = json.dumps(ROW).encode()
    post = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    def pipelined(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(post + b"GET /v2/health/live HTTP/1.1\r\n")
            time.sleep(0.4)  # past the head timeout, while the model (0.6 s) still runs
            s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
            return read_all(s)

    async def scenario() -> None:
        slow = fake_model_config(
            versions={"1": {"loader": {"kind": "fake", "latency_s": 0.6}, "warmup": False}}
        )
        async with listening(config=slow, header_timeout_s=0.2) as port:
            received = await asyncio.to_thread(pipelined, port)
            first, _, second = received.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(
                b"HTTP/1.1 200 OK\r\n"
            )
            assert b'"model_name":"m"' in first and second.endswith(b'{"live":true}'), received

    run(scenario)


def test_a_pipelined_head_is_held_to_the_limit_and_the_clock() -> None:
    """A head that arrives in the read that ended the request before it (pipelined) is
    counted too: one over the limit is never served, and one left unfinished is answered 408,
    not closed without a word."""

    def pipelined(port: int, rest: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(LIVE + rest)
            return read_all(s)

    async def scenario() -> None:
        async with listening() as port:
            big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (CAP + 100)
            received = await asyncio.to_thread(pipelined, port, big + b"\r\n\r\n")
            # The first is answered; the second never is (it is refused, and its answer
            # cannot go in the middle of the first's: the connection closes after it).
            assert received.count(b"HTTP/1.1 200 OK") == 1, received[:300]
            partial = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"  # and nothing more
            received = await asyncio.to_thread(pipelined, port, partial)
            first, _, second = received.partition(b'{"live":true}')
            assert first.startswith(b"HTTP/1.1 200 OK"), received[:300]
            assert answer(second)[0] == 408, received[:300]
            await serves_on(port)

    run(scenario)


@pytest.mark.parametrize("limit", [1023, 16 * 1024 * 1024 + 1])
def test_the_header_limit_is_checked_in_the_config(limit: int) -> None:
    from infercore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.max_header_bytes"):
        runtime_from_dict(fake_model_config(server={"max_header_bytes": limit}))
