"""Request heads are bounded in size and time (``server.max_header_bytes``,
``server.header_timeout_ms``).

httptools has no limit on a header (it buffers one until its line ends) and uvicorn starts no
clock before a request's headers are complete: a 16 MB header was answered 200, and a client
sending one header line a second held its connection for ever. The app behind uvicorn with
infercore's protocol on a real loopback socket, as ``infercore serve`` runs it, with small
limits so that the tests are quick. A refused head is counted as the app counts a request
that names no model (``model=""``), as ``infercore serve`` wires it; a head refused behind a
pipelined request still answering gets its own answer once that request's has gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from uvicorn_support import on_loopback

from infercore.cli import _refused_heads_counter
from infercore.server.shutdown import http_protocol
from infercore.testing import fake_model_config, metric_value, runtime_from_dict, unrouted_counts

CAP = 8 * 1024
TIMEOUT_S = 0.5
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
_BODY = json.dumps(ROW).encode()
INFER = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)
#: Heads the tests send that are refused: over the limit, a target over it, unfinished.
BIG = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (CAP + 100) + b"\r\n\r\n"
LONG_URL = b"GET /v2/models/" + b"a" * (CAP + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
PARTIAL = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"  # and nothing more
MALFORMED = b"GET /v2/\x01 HTTP/1.1\r\nHost: x\r\n\r\n"  # the parser refuses it
#: An inference request whose chunked body the parser refuses: a chunk-size line not in hex.
BAD_CHUNKED = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nzz\r\n'
)
#: The liveness answer, byte for byte (the date left out: :func:`undated`).
LIVE_200 = (
    b"HTTP/1.1 200 OK\r\ndate: -\r\nserver: uvicorn\r\ncontent-type: application/json\r\n"
    b'content-length: 13\r\n\r\n{"live":true}'
)
_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")


def refusal(status: int, *, timeout_ms: int = int(TIMEOUT_S * 1000)) -> bytes:
    """A refused head's whole answer, byte for byte (the date left out: :func:`undated`)."""
    limit = f"{CAP} bytes (server.max_header_bytes)"
    error, reason = {
        431: (
            f"the request line and headers are longer than {limit} "
            "(hint: send fewer or shorter headers)",
            "headers_too_large",
        ),
        414: (
            f"the request target is longer than {limit} (hint: send a shorter URL "
            "(the limit counts the request line and headers))",
            "headers_too_large",
        ),
        408: (
            f"the request's headers did not arrive within {timeout_ms} ms "
            "(server.header_timeout_ms) (hint: send the request line and headers at once)",
            "request_timeout",
        ),
        400: ("malformed HTTP request: Invalid HTTP request received.", "invalid_input"),
    }[status]
    body = json.dumps({"error": error, "reason": reason}).encode()
    return (
        b"HTTP/1.1 %d %s\r\ndate: -\r\nserver: uvicorn\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (status, HTTPStatus(status).phrase.encode(), len(body), body)
    )


def undated(received: bytes) -> bytes:
    return _DATE.sub(b"\r\ndate: -\r\n", received)


def first_response(received: bytes) -> tuple[int, bytes, bytes]:
    """The status and body of the first response in ``received``, and what follows it."""
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"\r\ncontent-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return int(head.split()[1]), rest[:length], rest[length:]


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


def keep_alive(protocol: type[Any], seconds: float) -> type[Any]:
    """``protocol`` with uvicorn's idle keep-alive timeout at ``seconds`` (5 s by default)."""

    class KeepAlive(protocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = seconds

    return KeepAlive


def recording(protocol: type[Any], seen: list[Any]) -> type[Any]:
    """``protocol`` whose connections are appended to ``seen``."""

    class Recording(protocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            seen.append(self)

    return Recording


class Server:
    """A server on a loopback port: its port, and its metrics as ``/metrics`` shows them."""

    def __init__(self, port: int, runtime: Any) -> None:
        self.port = port
        self.runtime = runtime

    def counted(self, name: str, **labels: str) -> float:
        text = self.runtime.metrics.exposition().decode()
        return metric_value(text, f"infercore_{name}_total", **labels)

    def refused(self) -> dict[str, float]:
        """What was counted under no model: ``{"431": n, "headers_too_large": n, ...}``, the
        codes from requests_total and the reasons from request_failures_total (zeros left out)."""
        return unrouted_counts(self.runtime.metrics.exposition().decode())


@asynccontextmanager
async def serving(
    *,
    config: dict[str, Any] | None = None,
    wrap: Callable[[type[Any]], type[Any]] = lambda p: p,
    counted: bool = True,
    **limits: Any,
) -> AsyncIterator[Server]:
    """A server on a loopback port with the given head limits, its refusals counted as
    ``infercore serve`` counts them on the inference listener (unless not ``counted``)."""
    runtime = runtime_from_dict(config or fake_model_config())
    options = {"max_header_bytes": CAP, "header_timeout_s": TIMEOUT_S, **limits}
    if counted:
        options["count_refused"] = _refused_heads_counter(runtime.metrics)
    async with on_loopback(runtime, lambda app: wrap(http_protocol(0.1, None, **options))) as port:
        yield Server(port, runtime)


@asynccontextmanager
async def listening(**options: Any) -> AsyncIterator[int]:
    """:func:`serving`, yielding the port only."""
    async with serving(**options) as server:
        yield server.port


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


SLOW = fake_model_config(
    versions={"1": {"loader": {"kind": "fake", "latency_s": 0.6}, "warmup": False}}
)


def pipelined(port: int, data: bytes, *, then: bytes = b"", after_s: float = 0.0) -> bytes:
    """Send ``data`` in one write (``then`` ``after_s`` later) and read until the server
    closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if then:
            time.sleep(after_s)
            s.sendall(then)
        return read_all(s)


REASONS = {
    431: "headers_too_large",
    414: "headers_too_large",
    408: "request_timeout",
    400: "invalid_input",
}


@pytest.mark.parametrize(
    ("head", "status"), [(BIG, 431), (LONG_URL, 414), (PARTIAL, 408), (MALFORMED, 400)]
)
def test_a_refused_pipelined_head_is_answered_after_the_response_before_it(
    head: bytes, status: int
) -> None:
    """A head that arrives in the read that ended the request before it (pipelined) is held to
    the limit and the clock, and gets its own answer once the first response has gone: an
    answer cannot go in the middle of another (the connection used to close without one; a
    malformed head's 400 went at once, and the first response was lost)."""

    async def scenario() -> None:
        async with serving() as server:
            received = await asyncio.to_thread(pipelined, server.port, LIVE + head)
            assert undated(received) == LIVE_200 + refusal(status), received[:400]
            assert server.refused() == {str(status): 1.0, REASONS[status]: 1.0}
            await serves_on(server.port)

    run(scenario)


def test_a_refused_head_waits_for_the_requests_queued_before_it() -> None:
    """Behind a running request and a queued one, both are answered, then the refusal; what
    follows the refused head never reaches the app."""

    async def scenario() -> None:
        async with serving(config=SLOW) as server:
            data = INFER + LIVE + BIG + INFER
            received = await asyncio.to_thread(pipelined, server.port, data)
            status, body, rest = first_response(undated(received))
            assert status == 200 and b'"model_name":"m"' in body, received[:400]
            assert rest == LIVE_200 + refusal(431), received[:400]
            assert server.counted("requests", model="m", code="200") == 1  # not the last one
            assert server.refused() == {"431": 1.0, "headers_too_large": 1.0}

    run(scenario)


def test_a_head_refused_behind_a_stuck_request_is_answered_after_its_deadline() -> None:
    """The request before the refused head runs past ``server.request_timeout_ms``: its 504
    goes at the deadline, then the 431."""
    slow = {**SLOW, "server": {"request_timeout_ms": 200}}

    async def scenario() -> None:
        async with serving(config=slow) as server:
            received = await asyncio.to_thread(pipelined, server.port, INFER + BIG)
            status, body, rest = first_response(undated(received))
            assert status == 504 and b'"reason":"deadline_exceeded"' in body, received[:400]
            assert rest == refusal(431), received[:400]
            assert server.refused() == {"431": 1.0, "headers_too_large": 1.0}

    run(scenario)


@pytest.mark.parametrize(
    ("refused", "reason"), [(BIG, "headers_too_large"), (BAD_CHUNKED, "invalid_input")]
)
def test_a_client_gone_before_a_deferred_answer_leaves_nothing_behind(
    refused: bytes, reason: str
) -> None:
    """The client closes while the request before the refused head (or malformed body) still
    runs: nothing is written, no timer is left, the connection is gone, and the refusal counts
    its reason only (no response code: no response was sent)."""
    seen: list[Any] = []

    def send_and_go(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(INFER + refused)
            time.sleep(0.2)  # the refusal is made, the model (0.6 s) still runs

    async def scenario() -> None:
        async with serving(config=SLOW, wrap=lambda p: recording(p, seen)) as server:
            await asyncio.to_thread(send_and_go, server.port)
            (connection,) = seen
            async with asyncio.timeout(5):
                while connection.parser is not None:  # connection_lost clears it
                    await asyncio.sleep(0.01)
            assert connection.refused is None
            assert connection.head_timer is None and connection.discard_timer is None
            assert connection.timeout_keep_alive_task is None
            assert connection.one_send.transport.is_closing()
            assert connection not in connection.server_state.connections
            assert server.refused() == {reason: 1.0}
            await serves_on(server.port)

    run(scenario)


def test_an_unfinished_head_after_a_response_is_not_closed_by_the_idle_timer() -> None:
    """After the response before it, an unfinished pipelined head is answered 408 on its own
    clock: uvicorn's idle keep-alive timer (5 s by default, below the head's 10 s) used to
    close the connection without a word."""

    async def scenario() -> None:
        async with serving(wrap=lambda p: keep_alive(p, 0.05), header_timeout_s=1.0) as server:
            received = await asyncio.to_thread(pipelined, server.port, LIVE + PARTIAL)
            assert undated(received) == LIVE_200 + refusal(408, timeout_ms=1000), received
            assert server.refused() == {"408": 1.0, "request_timeout": 1.0}

    run(scenario)


def test_a_head_late_behind_a_running_request_is_answered_when_it_completes() -> None:
    """A pipelined head whose clock runs out while the request before it runs is answered 408
    as soon as that request's response has gone (not left to the idle timer)."""

    async def scenario() -> None:
        async with serving(
            config=SLOW, wrap=lambda p: keep_alive(p, 0.05), header_timeout_s=0.25
        ) as server:
            received = await asyncio.to_thread(pipelined, server.port, INFER + PARTIAL)
            status, body, rest = first_response(undated(received))
            assert status == 200 and b'"model_name":"m"' in body, received[:400]
            assert rest == refusal(408, timeout_ms=250), received[:400]
            assert server.refused() == {"408": 1.0, "request_timeout": 1.0}

    run(scenario)


# --- counted --------------------------------------------------------------------------------


def test_refused_heads_are_counted_under_no_model() -> None:
    """431, 414, 408 and a malformed head's 400 count one code and one reason each, labelled
    as the app labels a request that names no model it serves; a connection that sends
    nothing is not a request."""

    def silent(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return read_all(s)

    async def scenario() -> None:
        async with serving() as server:
            for data in (BIG, BIG, LONG_URL, PARTIAL, MALFORMED):
                await asyncio.to_thread(exchange, server.port, data)
            assert await asyncio.to_thread(silent, server.port) == b""
            assert server.refused() == {
                "431": 2.0,
                "414": 1.0,
                "408": 1.0,
                "400": 1.0,
                "headers_too_large": 3.0,
                "request_timeout": 1.0,
                "invalid_input": 1.0,
            }
            # Under the inference metrics' names and labels, beside the app's own counts.
            assert server.counted("requests", model="", version="", code="431") == 2
            assert server.counted("request_failures", model="", reason="request_timeout") == 1
            await serves_on(server.port)
            assert server.counted("requests", model="m", code="200") == 1

    run(scenario)


def test_without_a_counter_refused_heads_are_not_counted() -> None:
    """The admin listener builds its protocol without one: its refusals are not inference
    requests."""

    async def scenario() -> None:
        async with serving(counted=False) as server:
            assert answer(await asyncio.to_thread(exchange, server.port, BIG))[0] == 431
            received = await asyncio.to_thread(exchange, server.port, LIVE + BIG)
            assert undated(received) == LIVE_200 + refusal(431)
            assert server.refused() == {}

    run(scenario)


# --- malformed bodies -----------------------------------------------------------------------

BODY_400_ERROR = (
    "malformed HTTP request body: Invalid HTTP request received. "
    "(hint: send a valid chunked body, or a Content-Length)"
)


def body_refusal() -> bytes:
    """A malformed body's whole answer, byte for byte (the date left out)."""
    body = json.dumps({"error": BODY_400_ERROR, "reason": "invalid_input"}).encode()
    return (
        b"HTTP/1.1 400 Bad Request\r\ndate: -\r\nserver: uvicorn\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (len(body), body)
    )


def test_a_malformed_chunked_body_is_400_counted_under_no_model() -> None:
    """A body the parser refuses gets the JSON 400 a malformed head gets, and is counted as a
    refused head is (it was answered uvicorn's way: not counted, not in the error shape)."""

    async def scenario() -> None:
        async with serving() as server:
            received = await asyncio.to_thread(exchange, server.port, BAD_CHUNKED)
            assert undated(received) == body_refusal(), received[:400]
            status, headers, doc = answer(received)
            assert (status, headers["connection"], doc["reason"]) == (400, "close", "invalid_input")
            assert server.refused() == {"400": 1.0, "invalid_input": 1.0}
            await serves_on(server.port)
            # Counted once, as refused: the disconnect the model's request path read then is
            # not a client that went (it was also counted `cancelled` under the model).
            assert server.counted("request_failures", model="m") == 0

    run(scenario)


def test_a_malformed_body_behind_a_pipelined_request_is_answered_after_it() -> None:
    """Behind a running request and a queued one: both are answered, then the 400; the
    request with the malformed body never reaches the app (uvicorn wrote its 400 at once and
    closed: the responses before it were lost)."""

    async def scenario() -> None:
        async with serving(config=SLOW) as server:
            received = await asyncio.to_thread(pipelined, server.port, INFER + LIVE + BAD_CHUNKED)
            status, body, rest = first_response(undated(received))
            assert status == 200 and b'"model_name":"m"' in body, received[:400]
            assert rest == LIVE_200 + body_refusal(), received[:400]
            assert server.counted("requests", model="m", code="200") == 1
            assert server.counted("request_failures", model="m") == 0  # the app never saw it
            assert server.refused() == {"400": 1.0, "invalid_input": 1.0}

    run(scenario)


def test_a_malformed_body_after_its_request_was_answered_only_closes_the_connection() -> None:
    """The app answered without reading the body (404): a malformed rest of that body ends
    the connection after that answer, with no second answer to the same request."""
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

    def send(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head + b"2\r\n{}\r\n")
            received = b""
            while b"\r\n\r\n" not in received or not received.endswith(b"}"):
                received += s.recv(65536)
            s.sendall(b"zz\r\n")
            return received + read_all(s)

    async def scenario() -> None:
        async with serving() as server:
            received = await asyncio.to_thread(send, server.port)
            status, _, rest = first_response(received)
            assert status == 404 and rest == b"", received[:400]
            refused = server.refused()  # what the app counts for its 404, nothing more
            assert "400" not in refused and "invalid_input" not in refused, refused

    run(scenario)


@pytest.mark.parametrize("limit", [1023, 16 * 1024 * 1024 + 1])
def test_the_header_limit_is_checked_in_the_config(limit: int) -> None:
    from infercore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.max_header_bytes"):
        runtime_from_dict(fake_model_config(server={"max_header_bytes": limit}))
