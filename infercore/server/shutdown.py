"""Graceful shutdown of the inference listener (RELIABILITY P11).

The sequence, the same in every deploy shape::

    SERVING ──signal──► DRAINING ──server.drain_delay_s──► CLOSING ──► stopped ──► components stop
                        readiness 503 shutting_down        listener closed; in-flight and
                        requests still served, each        queued requests finish within
                        answered with Connection: close     server.graceful_timeout_s; a request
                                                            arriving on a still-open connection
                                                            gets 503 shutting_down + close

* DRAINING gives load balancers and Kubernetes endpoint controllers time to notice (readiness is
  false at once) while the server keeps answering: nothing sent in that window is refused. Every
  response carries ``Connection: close``, so keep-alive clients open new connections, which a
  load balancer sends elsewhere.
* CLOSING closes the listening socket (new connections are refused: nothing was read, so nothing
  is lost). uvicorn lets in-flight responses finish; an idle keep-alive connection is kept open
  for :data:`IDLE_LINGER_S` instead of being closed at once, so a request already on its way on
  it is answered ``503 shutting_down`` rather than reset. A request still running when the
  graceful timeout ends is answered ``503 shutting_down`` if nothing of its response was sent.
* A second signal stops waiting: the server exits without waiting for in-flight requests.
* A listener not served yet (:meth:`GracefulShutdown.hold`: a restarted worker of
  ``server.workers`` that listens only once its models are ready) is closed at the signal, in
  the same callback that answers what is queued on it ``503 shutting_down``: a copy of the shared
  socket left open by a process that never accepts would let connections queue after the
  serving workers closed theirs, to be reset when it finally closes. Once released to uvicorn
  (:meth:`GracefulShutdown.release`), a signal that comes before uvicorn has its listeners up
  (its lifespan's start-up: milliseconds) closes them as soon as they are: closed earlier,
  uvicorn would still open them, and return without ever serving or closing them.

The HTTP server finishes first; the caller stops the runtime's components after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from infercore.server.logs import FailureLog

log = logging.getLogger("infercore.server")
#: Requests cut off at the graceful timeout: one WARNING per 10 s, the rest at DEBUG.
_cut_off_log = FailureLog(log)

SERVING, DRAINING, CLOSING, FORCED = "serving", "draining", "closing", "forced"

#: How long an idle keep-alive connection stays open once the listener has closed. A request
#: that arrives on it meanwhile is answered 503 shutting_down with Connection: close.
IDLE_LINGER_S = 1.0

#: The scope key under which the request path leaves the task answering an inference request:
#: if the client's connection is lost before the response starts, the protocol cancels that
#: task with :data:`CLIENT_GONE` (RELIABILITY P12: its queued work never runs). Only requests
#: that opt in are cancelled: the app's other routes are left to finish as they are.
REQUEST_TASK = "infercore.request_task"
#: The cancellation message of a request whose client went (``CancelledError.args[0]``).
CLIENT_GONE = "infercore: the client disconnected"
#: Set (``True``) in the scope of a request whose body the protocol refused (400, counted
#: there): the disconnect the app then reads is not a client that went, and is not counted again.
BODY_REFUSED = "infercore.body_refused"

#: How long the close waits for uvicorn to open the listeners it was just handed (its start-up
#: is the app's lifespan, milliseconds once the models are loaded); after that it closes anyway.
START_WAIT_S = 5.0
#: How often it looks meanwhile.
START_POLL_S = 0.005

#: How long a connection answered before its body (``Expect: 100-continue``) stays half-open,
#: dropping what the client still sends, before it is closed (sooner when the client closes).
DISCARD_S = 2.0

SHUTTING_DOWN_BODY = b'{"error":"the server is shutting down","reason":"shutting_down"}'
#: The whole answer to a request on a connection adopted from a held listener.
SHUTTING_DOWN_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n\r\n%s" % (len(SHUTTING_DOWN_BODY), SHUTTING_DOWN_BODY)
)
#: Longest request head read from such a connection before answering anyway.
_HEAD_MAX = 65536
#: The "refusal" of a request whose body was refused after the app began its answer: nothing
#: more is written (that answer, cut short, is the request's) and nothing is counted; the
#: connection is half-closed after what the app wrote.
_ANSWERED: tuple[int, str, bytes] = (0, "", b"")

#: The longest request line and headers read (``server.max_header_bytes``): httptools has no
#: limit of its own, and buffers a header until its line ends (a 16 MB header was answered).
MAX_HEADER_BYTES = 64 * 1024
#: From a request's first byte (a connection's first request: from the connection) to the end
#: of its headers (``server.header_timeout_ms``). uvicorn starts no clock before headers end.
HEADER_TIMEOUT_S = 10.0
#: At most one log line per this many seconds about refused request heads (a client sending
#: them in a loop must not flood the log); the others are counted in the next line.
_REFUSAL_LOG_S = 10.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Any ASGI 3 application (Litestar's own signature is narrower than this module needs).
ASGIApp = Callable[..., Awaitable[None]]


class ShutdownState:
    """Where the shutdown sequence is; read by the app (readiness, late arrivals)."""

    __slots__ = ("peers_ready", "phase", "signals")

    def __init__(self) -> None:
        self.phase = SERVING
        self.signals = 0
        #: False while other worker processes of the same server still load their models
        #: (``server.workers`` > 1): readiness waits for the whole server.
        self.peers_ready = True

    @property
    def draining(self) -> bool:
        """A signal arrived: readiness is false (requests may still be served)."""
        return self.phase != SERVING

    @property
    def closing(self) -> bool:
        """The listener is closing or closed: a request arriving now is a late arrival."""
        return self.phase in (CLOSING, FORCED)


class ShutdownMiddleware:
    """ASGI wrapper: ``Connection: close`` once draining; 503 for work cut off at the timeout."""

    def __init__(self, app: ASGIApp, state: ShutdownState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if state.phase != SERVING:
                    headers = [
                        (k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"
                    ]
                    headers.append((b"connection", b"close"))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the graceful timeout ends: answer rather
            # than let the client see a reset (or a bare 500).
            if started or not state.closing:
                raise
            if state.phase == FORCED:
                # A second signal: the CLI's one line says how many were cut short.
                log.debug("request cut short by the forced stop: %s", scope.get("path", ""))
            else:
                _cut_off_log.warning(
                    ("shutdown", "timeout"),
                    "request cut off by the shutdown timeout: %s",
                    scope.get("path", ""),
                    extra={},
                )
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(SHUTTING_DOWN_BODY)).encode()),
                        (b"retry-after", b"1"),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": SHUTTING_DOWN_BODY})


class OneSendTransport:
    """A connection's transport that sends a response's head together with its body.

    uvicorn writes the status line and headers when the app starts its response, and the body
    in a second write: two ``send`` calls and two TCP segments per response on a connection
    with ``TCP_NODELAY``, for a response of a few hundred bytes. This wrapper holds a complete
    response head (a non-1xx status line through the blank line) until the next write, and
    sends both as one; a response that writes no body (``HEAD``) is flushed when it completes
    (:meth:`flush`), and on ``close``. Everything else passes straight through: interim
    ``100 Continue`` answers, uvicorn's own complete error responses, body chunks.
    """

    __slots__ = ("_head", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(head + data)
        elif data[-4:] == b"\r\n\r\n" and data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":
            self._head = bytes(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        """Send a held response head (a response that ended without a body write)."""
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(head)

    def close(self) -> None:
        if self.transport.is_closing():
            self._head = None  # the connection is gone (connection_lost closes it again)
        else:
            self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def http_protocol(
    linger_s: float = IDLE_LINGER_S,
    reject_before_body: Callable[[bytes, list[tuple[bytes, bytes]]], Any] | None = None,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    count_refused: Callable[[int | None, str], None] | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with one send per response and lingering idle connections.

    * Each response leaves in one ``send`` (:class:`OneSendTransport`): uvicorn's protocol
      writes its head and its body separately.
    * uvicorn closes an idle keep-alive connection the moment shutdown starts; a request the
      client sent at that moment is then lost (the client sees a reset). Here the connection
      stays open for ``linger_s`` and a request arriving on it is answered (the app says 503
      shutting_down with ``Connection: close``); an active connection finishes its response
      and then closes, as in uvicorn.
    * With ``reject_before_body`` (the app's, :func:`infercore.server.app.create_app`): when
      it answers a ``POST``'s request target and headers (a full queue), that answer is sent
      once the body has arrived, which is read and dropped, and the answer's ``sent()`` is
      called (``abandoned()`` if the connection closes first); no ASGI request cycle, task or
      app call is made. That is a fraction of the event loop's CPU of a rejection made by the
      app, and under overload the loop shares its core with the model. Only a plain
      HTTP/1.1 request with nothing before it on its connection (no pipelined request still
      answering, no upgrade) is answered so. A request that waits for ``100 Continue`` before
      sending its body is answered at once instead, without it, and its connection closes
      (:meth:`_answer_before_body`).
    * Request heads are bounded in size and time (httptools and uvicorn bound neither). A
      request line and headers longer than ``max_header_bytes`` are answered 431 (414 when
      the request target alone fills it) as soon as the limit is passed: what the parser
      holds of a head never exceeds the limit by more than one read. A head not complete
      ``header_timeout_s`` after its first byte (a connection's first request: after the
      connection opened) is answered 408; a new connection that sends nothing for that long
      is closed (as an idle keep-alive connection is). Both answers
      are JSON with ``Connection: close``; the connection is half-closed after them and
      drops what still arrives, as :meth:`_answer_before_body` does.
    * A head refused while the response to a request before it (pipelined) is still being
      written is answered when that response, and any queued between, have completed: an
      answer cannot go in the middle of another. Nothing after the refused head reaches the
      app. A pipelined head that is late while a response before it is written may still
      finish before that response does (it is then served); otherwise it is answered 408 as
      that response completes, and an unfinished head after a response is left to its own
      clock (never to the shorter idle keep-alive timeout, which would close it silently).
    * A head the HTTP parser cannot read is answered 400 ``invalid_input`` (JSON) the same
      way: after the response before it, then half-closed. So is a body it cannot read (a
      malformed chunked body): the request is taken from the app (queued behind a pipelined
      one, it never reaches it; running, the app reads a disconnect and what it sends goes
      nowhere), and an answer made from its head waits no more. When the app had begun
      answering it already, that answer is the only one and ends there: the app reads a
      disconnect (rather than wait for a body that will not come) and what it still sends
      goes nowhere; what it wrote goes, then the connection is half-closed, and nothing is
      counted here (the app counted its answer).
    * ``count_refused(status, reason)`` (the inference listener's metrics) is called once for
      each refused request (431, 414, 408, and 400 for a malformed head or body): with its
      status once its answer is written, with ``None`` when the connection closed before the
      answer could go (the response before it said ``Connection: close``, or the client
      went).
    * Once the server is stopping (:meth:`shutdown`), a request whose head completes on an
      idle connection still open (lingering) is answered with ``Connection: close`` and its
      connection closes after it, whatever the app's response says (infercore's
      ShutdownMiddleware says so once draining; a bare app may not). Only that first request
      is answered: requests pipelined behind it, as behind a request still answering when
      the server began to stop, are dropped unanswered when the connection closes.
    """
    from uvicorn.protocols.http.flow_control import CLOSE_HEADER
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    refusals = _RefusalLog()
    feed = HttpToolsProtocol.data_received  # the parser's (no super() lookup per read)

    class DrainingHttpToolsProtocol(HttpToolsProtocol):
        #: The answer to send when the current request's body has arrived (rejected early).
        early: Any = None

        #: Set by :meth:`shutdown`: an early answer then closes its connection.
        stopping = False

        #: Set once a request was answered before its body (:meth:`_answer_before_body`):
        #: whatever else arrives on the connection is dropped unread until it closes.
        discarding = False
        discard_timer: asyncio.TimerHandle | None = None

        #: Bytes of the current request's line and headers fed to the parser so far (at most
        #: one read more than counted: what follows a request's end in the read that ended
        #: it); -1 while the parser reads a body.
        head_bytes = 0
        #: Answers 408 when a request head is not complete in time.
        head_timer: asyncio.TimerHandle | None = None
        #: The current head began in the read that ended the request before it (pipelined):
        #: the reads did not count it, so its size is taken from what the parser gave.
        uncounted = False
        #: A refused head's answer ``(status, reason, body)``, waiting for the response in
        #: progress before it to complete (:meth:`on_response_complete`).
        refused: tuple[int, str, bytes] | None = None
        #: The current head's clock ran out while a response before it was being written.
        head_late = False
        #: The request cycle before the current request's (the one it queues behind when
        #: pipelined), while the current request's body is read: where a request whose body
        #: is refused, taken from the queue, leaves :attr:`cycle`.
        ahead: Any = None

        def data_received(self, data: bytes) -> None:
            if self.discarding:
                return
            used = self.head_bytes
            if used < 0:
                feed(self, data)
                return
            if used == 0:
                self.uncounted = False  # this read starts the head: counted read by read
            if used + len(data) > max_header_bytes:
                self._head_overflow(data)
                return
            self.head_bytes = used + len(data)
            feed(self, data)
            if self.head_bytes > 0 and self.head_timer is None:
                # Part of a head came (its first byte, at the latest, in this read): its clock.
                self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _head_overflow(self, data: bytes) -> None:
            """Feed what the limit leaves room for; the rest only if the head ended in it."""
            room = max_header_bytes - self.head_bytes
            self.head_bytes = max_header_bytes
            if room:
                feed(self, data[:room])
            if self.head_bytes <= 0:
                self.data_received(data[room:])  # the head ended (and maybe its request)
            elif not self.transport.is_closing():
                self._refuse_head_too_large()

        def _refuse_head_too_large(self) -> None:
            url = self.url if self.headers is not None else b""
            limit = f"{max_header_bytes} bytes (server.max_header_bytes)"
            if not self.headers and 2 * len(url) > max_header_bytes:
                # Still in the request line: the target is what is too long.
                self._refuse_head(
                    414,
                    "headers_too_large",
                    f"the request target is longer than {limit}",
                    "send a shorter URL (the limit counts the request line and headers)",
                )
            else:
                self._refuse_head(
                    431,
                    "headers_too_large",
                    f"the request line and headers are longer than {limit}",
                    "send fewer or shorter headers",
                )

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.discarding or self.head_bytes < 0 or self.transport.is_closing():
                return
            cycle = self.cycle
            busy = cycle is not None and not cycle.response_complete
            if busy and self.head_bytes and not self.flow.read_paused:
                # Late while the response before it is written (pipelined): a 408 cannot go in
                # the middle of that response. It goes when the response completes
                # (:meth:`_after_response`), unless the head has finished by then.
                self.head_late = True
                return
            if busy or self.flow.read_paused:
                # Behind a request still queued (pipelined): the head may wait in the socket,
                # unread. That request's own deadline bounds this; look again later.
                self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)
                return
            if not self.head_bytes:
                self.transport.close()  # nothing of a request came: closed, as when idle
                return
            self._refuse_late_head()

        def _refuse_late_head(self) -> None:
            self._refuse_head(
                408,
                "request_timeout",
                f"the request's headers did not arrive within {header_timeout_s * 1000:.0f} ms "
                "(server.header_timeout_ms)",
                "send the request line and headers at once",
            )

        def _refuse_head(self, status: int, reason: str, message: str, hint: str) -> None:
            """Answer a request whose head is refused, then half-close and drop the rest."""
            refusals.note(status, message, self.client)
            body = json.dumps({"error": f"{message} (hint: {hint})", "reason": reason}).encode()
            self._refuse(status, reason, body)

        def _refuse(self, status: int, reason: str, body: bytes) -> None:
            """Answer a refused head now, or after the response still being written before it."""
            self.discarding = True
            self._unset_keepalive_if_required()
            timer = self.head_timer
            if timer is not None:
                timer.cancel()
                self.head_timer = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.disconnected:
                # A response is still being written on this connection (pipelined requests;
                # a disconnected one writes nothing more): no answer can go in the middle of
                # it. Sent once it (and any request queued before this head) completes.
                self.refused = (status, reason, body)
                return
            self._send_refusal(status, reason, body)

        def _count_refused(self, status: int | None, reason: str) -> None:
            """Count a refused request (``None``: closed before its answer could go)."""
            if count_refused is not None:
                try:
                    count_refused(status, reason)
                except Exception:  # a metrics bug must not cost the connection its answer
                    log.exception("counting a refused request head failed")

        def _send_refusal(self, status: int, reason: str, body: bytes) -> None:
            """Write a refused request's answer (none for :data:`_ANSWERED`), then half-close
            and drop what still arrives."""
            transport = self.one_send.transport
            if status:  # not _ANSWERED (the app answered that request)
                self._count_refused(status, reason)
                self.server_state.total_requests += 1
                transport.write(self._closing_answer(status, body))
            else:
                self.one_send.flush()  # the app's response head, held for a body that won't come
            # A body past uvicorn's high-water mark paused reading: the rest must be read (and
            # dropped), or a client still sending it blocks, and is reset when the discard ends.
            self.flow.resume_reading()
            try:
                transport.write_eof()
            except (NotImplementedError, RuntimeError, OSError):
                transport.close()
                return
            self.discard_timer = self.loop.call_later(DISCARD_S, transport.close)

        def send_400_response(self, msg: str) -> None:
            # A request the HTTP parser refuses gets the JSON error body every other answer
            # has, not uvicorn's text, and is refused as the limits refuse a head: counted,
            # and after the response to a pipelined request before it (uvicorn wrote it at
            # once, and the close lost that response).
            if self.discarding:
                # Refused already, earlier in the same read (the parser goes on to its end):
                # that answer is the only one.
                return
            if self.head_bytes >= 0:  # a malformed request line or header
                error = f"malformed HTTP request: {msg}"
            elif self._refuse_body():
                error = (
                    f"malformed HTTP request body: {msg} "
                    "(hint: send a valid chunked body, or a Content-Length)"
                )
            else:
                return
            body = json.dumps({"error": error, "reason": "invalid_input"}).encode()
            self._refuse(400, "invalid_input", body)

        def _refuse_body(self) -> bool:
            """Take a request whose body the parser refused (bad chunked framing) from the app;
            whether the protocol answers it (400).

            It does, as for a malformed head, unless the app started answering it already:
            then that answer is the only one, and the connection ends after what the app wrote
            (:data:`_ANSWERED`). A request queued behind a pipelined one never reaches the
            app; one the app runs sees a disconnect (its sends go nowhere).
            """
            if self.early is not None:  # an answer made from the head: the 400 replaces it
                self.early = None
                return True
            cycle = self.cycle
            if cycle is None or cycle is self.ahead:  # no request cycle of its own
                return True
            if cycle.response_started:
                if not cycle.response_complete:
                    # Its answer cannot complete: the app reads a disconnect instead of waiting
                    # for the body, and what it still sends goes nowhere.
                    cycle.disconnected = True
                    cycle.message_event.set()
                self._refuse(*_ANSWERED)
                return False
            pipeline = self.pipeline
            if pipeline and pipeline[0][0] is cycle:
                # Queued behind the response in progress: dropped; the refusal waits for the
                # requests before it, as a refused head's does.
                pipeline.popleft()
                self.cycle = self.ahead
            cycle.scope[BODY_REFUSED] = True  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.response_complete = True  # nothing of it is written any more
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
            return True

        def _closing_answer(self, status: int, body: bytes) -> bytes:
            """A JSON answer, whole, that closes its connection."""
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += (name, b": ", value, b"\r\n")
            head += (
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            )
            return b"".join(head)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.head_bytes == 0:
                # Begun in the read that ended the request before it: a head is on its way
                # (its 408, not a silent close, if it stops), though no read counted it yet.
                self.head_bytes = 1

        def on_headers_complete(self) -> None:
            self.head_bytes = -1  # a body, if any, follows
            self.head_late = False
            timer = self.head_timer
            if timer is not None:
                timer.cancel()
                self.head_timer = None
            if self.discarding:
                return
            if self.uncounted and (
                len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > max_header_bytes
            ):
                self._refuse_head_too_large()
                return
            if reject_before_body is not None and self._may_answer_early():
                try:
                    answer = reject_before_body(self.url, self.headers)
                except Exception:
                    # A bug must not cost the request: the app answers it as usual.
                    log.exception("rejecting a request before its body failed")
                    answer = None
                if answer is not None:
                    if self.expect_100_continue:
                        self._answer_before_body(answer)
                    else:
                        self.early = answer
                    return
            self.ahead = self.cycle
            super().on_headers_complete()
            if self.stopping:
                self._close_after_response()

        def _close_after_response(self) -> None:
            """A request that came once the server is stopping closes its connection."""
            cycle = self.cycle
            if cycle is not None and cycle is not self.ahead:
                # Not left to the app (infercore's says Connection: close once draining, a
                # bare one may not): the response says it too, as for a client that asked.
                cycle.keep_alive = False
                if CLOSE_HEADER not in self.headers:
                    self.headers.append(CLOSE_HEADER)

        def _may_answer_early(self) -> bool:
            cycle = self.cycle
            parser = self.parser
            return (
                (cycle is None or cycle.response_complete)
                and parser.get_method() == b"POST"
                and parser.get_http_version() == "1.1"
                and not parser.should_upgrade()
            )

        def on_body(self, body: bytes) -> None:
            if self.early is None and not self.discarding:
                super().on_body(body)

        def _answer(self, answer: Any, close: bool) -> None:
            """Write an early answer (in one send) and count it as sent."""
            head = [STATUS_LINE[answer.status]]
            for name, value in self.server_state.default_headers:
                head += (name, b": ", value, b"\r\n")
            for name, value in answer.headers:
                head += (name, b": ", value, b"\r\n")
            if close:
                head += (b"connection: close\r\n",)
            head += (b"\r\n", answer.body)
            self.one_send.write(b"".join(head))
            try:
                answer.sent()
            except Exception:
                log.exception("counting a request rejected before its body failed")

        def on_message_complete(self) -> None:
            self.head_bytes = 0  # what comes next is the next request's head
            self.uncounted = True  # unless the next read starts it
            self.ahead = None  # only a refusal of this body reads it: let the request before go
            if self.discarding:
                return
            answer = self.early
            if answer is None:
                super().on_message_complete()
                return
            self.early = None
            self._answer(answer, close=self.stopping)
            if self.stopping:
                self.transport.close()
            self.on_response_complete()

        def _answer_before_body(self, answer: Any) -> None:
            """Answer a request that waits for ``100 Continue`` now, without asking for its body.

            A final status instead of ``100 Continue`` tells the client not to send the body
            (RFC 9110, 10.1.1), but the connection cannot serve on: whether the body will still
            come (from a client that stopped waiting) is unknown, so the next bytes could be
            either. The answer says ``Connection: close``; the connection is half-closed after
            it (the answer, then FIN) and drops what still arrives until the client closes, at
            most :data:`DISCARD_S`: closing outright while a body arrives would reset the
            connection, and a reset can discard the answer before the client read it.
            """
            self.discarding = True
            self._answer(answer, close=True)
            self.server_state.total_requests += 1
            self.flow.resume_reading()  # what still arrives is read and dropped, never left
            transport = self.one_send.transport
            try:
                transport.write_eof()
            except (NotImplementedError, RuntimeError, OSError):
                transport.close()
                return
            self.discard_timer = self.loop.call_later(DISCARD_S, transport.close)

        def connection_lost(self, exc: Exception | None) -> None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                # Nobody will read the answer: stop the work (queued work never runs). uvicorn
                # itself only marks the request disconnected, which the app sees if it reads.
                task: asyncio.Task[Any] | None = cycle.scope.get(REQUEST_TASK)  # type: ignore[assignment]
                if task is not None and not task.done():
                    task.cancel(CLIENT_GONE)
            answer = self.early
            if answer is not None:  # the client went before its body came
                self.early = None
                try:
                    answer.abandoned()
                except Exception:
                    log.exception("counting a request rejected before its body failed")
            if self.discard_timer is not None:
                self.discard_timer.cancel()
                self.discard_timer = None
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            refused = self.refused
            if refused is not None:  # closed before its answer could go: its reason only
                self.refused = None
                if refused[0]:
                    self._count_refused(None, refused[1])
            super().connection_lost(exc)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # A new connection has as long for its first request's head as a head has from
            # its first byte: one that sends nothing is closed (uvicorn would keep it).
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)
            # Flow control (pause/resume writing) keeps the real transport; requests write
            # through the wrapper.
            self.one_send = OneSendTransport(transport)
            self.transport = self.one_send  # type: ignore[assignment]

        def on_response_complete(self) -> None:
            self.one_send.flush()
            super().on_response_complete()
            if self.head_bytes > 0 or self.refused is not None:
                self._after_response()

        def _after_response(self) -> None:
            """A response completed with a head after it (pipelined) refused or unfinished."""
            cycle = self.cycle
            if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
                # Closed (the response said Connection: close: its refused head's reason is
                # counted as the connection goes), or a request queued before the head is
                # now answering: this is looked at again when that one completes.
                return
            # The head's clock or answer decides now, not the idle timer super() armed: at
            # its default (5 s), shorter than the head's, it would close without a word.
            self._unset_keepalive_if_required()
            refused = self.refused
            if refused is not None:
                self.refused = None
                self._send_refusal(*refused)
            elif self.head_late:
                self.head_late = False
                self._refuse_late_head()

        def shutdown(self) -> None:
            self.stopping = True
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                if self.transport.is_closing():
                    return
                # Re-arm the keep-alive timer with the linger: data_received cancels it when
                # a request arrives; otherwise the connection closes when it fires.
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    linger_s, self.timeout_keep_alive_handler
                )
            else:
                cycle.keep_alive = False

    return DrainingHttpToolsProtocol


class _RefusalLog:
    """WARNING lines about refused request heads, at most one per :data:`_REFUSAL_LOG_S`."""

    __slots__ = ("last", "skipped")

    def __init__(self) -> None:
        self.last = -_REFUSAL_LOG_S
        self.skipped = 0

    def note(self, status: int, message: str, client: Any) -> None:
        now = time.monotonic()
        if now - self.last < _REFUSAL_LOG_S:
            self.skipped += 1
            return
        skipped, self.skipped, self.last = self.skipped, 0, now
        more = f" ({skipped} more since the last such line)" if skipped else ""
        peer = f"{client[0]}:{client[1]}" if isinstance(client, tuple) else "a client"
        log.warning("answered %d to %s: %s%s", status, peer, message, more)


class GracefulShutdown:
    """Turns SIGTERM/SIGINT into the sequence above for one uvicorn server.

    Args:
        server: The ``uvicorn.Server`` (its ``should_exit``/``force_exit`` are set here).
        state: Shared with the app and the middleware.
        drain_delay_s: Seconds of DRAINING before the listener closes.
        is_ready: Whether the server was ready when the signal came; a server that never was
            ready has nobody to tell, so it skips the drain delay.
        on_drain: Called once, when the first signal starts the drain (the runtime refuses
            admin state changes from then on: ``Runtime.begin_shutdown``).
        on_force: Called once, when a second signal forces the stop, after uvicorn was told to
            stop waiting (the batchers answer what they hold and run nothing more).
    """

    def __init__(
        self,
        server: Any,
        state: ShutdownState,
        *,
        drain_delay_s: float,
        is_ready: Callable[[], bool] = lambda: True,
        on_drain: Callable[[], None] | None = None,
        on_force: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.state = state
        self.drain_delay_s = drain_delay_s
        self.is_ready = is_ready
        self.on_drain = on_drain
        self.on_force = on_force
        self.closing_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._held: list[socket.socket] = []
        #: When sockets were released to uvicorn and it has not said it started yet (loop time).
        self._released_at: float | None = None
        self.linger_s = IDLE_LINGER_S

    def hold(self, sockets: list[socket.socket]) -> None:
        """Listening sockets nobody accepts on yet (a restarted worker still loading).

        If the stop signal comes before :meth:`release`, :meth:`close` closes them at once,
        answering the connections queued on them ``503 shutting_down``.
        """
        self._held = list(sockets)

    async def answered(self) -> None:
        """Wait until the connections adopted from held sockets are answered and closed
        (each is bounded: ``linger_s`` for its request, :data:`DISCARD_S` after the answer)."""
        if self._adopting:
            await asyncio.wait(set(self._adopting))

    def release(self) -> list[socket.socket]:
        """The held sockets, to be served now (none once the stop signal closed them).

        Until uvicorn has started on them, a stop signal's close waits for it (bounded by
        :data:`START_WAIT_S`) rather than closing listeners that do not exist yet.
        """
        held, self._held = self._held, []
        if held:
            self._released_at = asyncio.get_running_loop().time()
        return held

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        state = self.state
        state.signals += 1
        name = signal.Signals(sig).name
        if state.phase == SERVING:
            state.phase = DRAINING
            delay = self.drain_delay_s if self.is_ready() else 0.0
            if self.on_drain is not None:
                try:
                    self.on_drain()
                except Exception:  # a signal handler must not raise: the drain goes on
                    log.exception("the drain callback failed")
            if delay > 0:
                log.info(
                    "received %s: readiness is false; serving on for %.1fs, then draining "
                    "(a second signal stops at once)",
                    name,
                    delay,
                )
                self._timer = asyncio.get_running_loop().call_later(delay, self.close)
            else:
                log.info("received %s: draining (a second signal stops at once)", name)
                self.close()
            return
        if state.phase == FORCED:
            return
        log.warning(
            "received %s again: stopping without waiting for %d request(s)",
            name,
            len(getattr(getattr(self.server, "server_state", None), "tasks", ())),
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.closing_at is None:
            self.closing_at = asyncio.get_running_loop().time()
        state.phase = FORCED
        self.server.should_exit = True
        self.server.force_exit = True
        if self.on_force is not None:
            try:
                self.on_force()
            except Exception:  # a signal handler must not raise: the stop goes on
                log.exception("the forced-stop callback failed")

    def close(self) -> None:
        """End DRAINING: close the listener and let in-flight work finish."""
        self._timer = None
        if self.state.phase in (CLOSING, FORCED):
            return
        if self._released_at is not None:
            loop = asyncio.get_running_loop()
            if getattr(self.server, "started", True):
                self._released_at = None
            elif loop.time() - self._released_at < START_WAIT_S:
                # uvicorn is opening its listeners on the released sockets: close them once
                # they are open, so that what queued on them is answered, not left behind.
                self._timer = loop.call_later(START_POLL_S, self.close)
                return
        self.state.phase = CLOSING
        self.closing_at = asyncio.get_running_loop().time()
        # Stop accepting now rather than at uvicorn's next tick (up to 0.1 s later): every
        # connection accepted meanwhile would only get a 503.
        adopted = self._close_listeners() + self._close_held()
        if adopted:
            log.info("adopted %d queued connection(s) before closing the listener", adopted)
        self.server.should_exit = True

    def _close_listeners(self) -> int:
        """Close the listening sockets, first taking what the kernel has queued on them.

        Closing a listener resets the connections in its accept queue: their clients may have
        sent a request already and would see a reset. Accepted here instead (in the same
        callback as the close, so nothing queues in between), each is served like an idle
        keep-alive connection: a request on it is answered 503 shutting_down.
        """
        server = self.server
        loop = asyncio.get_running_loop()
        factory = _protocol_factory(server)
        adopted = 0
        for listener in getattr(server, "servers", ()):
            if factory is not None:
                for tsock in list(listener.sockets or ()):
                    for conn in _accept_queued(tsock):
                        adopted += 1
                        task = loop.create_task(_adopt(loop, factory, conn))
                        self._adopting.add(task)
                        task.add_done_callback(self._adopting.discard)
            listener.close()
        return adopted

    def _close_held(self) -> int:
        """Close the held sockets (see :meth:`hold`), answering what is queued on them."""
        held, self._held = self._held, []
        loop = asyncio.get_running_loop()
        adopted = 0
        for sock in held:
            conns = _accept_queued(sock)
            sock.close()
            for conn in conns:
                adopted += 1
                task = loop.create_task(_answer_shutting_down(loop, conn, self.linger_s))
                self._adopting.add(task)
                task.add_done_callback(self._adopting.discard)
        return adopted

    @property
    def forced(self) -> bool:
        return self.state.phase == FORCED


def _protocol_factory(server: Any) -> Callable[[], asyncio.Protocol] | None:
    """The factory uvicorn's listener uses, rebuilt (None when the server is not uvicorn's)."""
    config = getattr(server, "config", None)
    lifespan = getattr(server, "lifespan", None)
    state = getattr(server, "server_state", None)
    protocol_class = getattr(config, "http_protocol_class", None)
    if config is None or lifespan is None or state is None or protocol_class is None:
        return None

    def factory() -> asyncio.Protocol:
        protocol: asyncio.Protocol = protocol_class(
            config=config, server_state=state, app_state=lifespan.state
        )
        return protocol

    return factory


def _accept_queued(listener: Any) -> list[socket.socket]:
    """Connections waiting in a listening socket's accept queue (never blocks)."""
    try:
        dup = socket.socket(listener.family, listener.type, fileno=os.dup(listener.fileno()))
    except OSError:
        return []
    accepted: list[socket.socket] = []
    with dup:
        dup.setblocking(False)
        while len(accepted) < 1024:
            try:
                conn, _ = dup.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            conn.setblocking(False)
            accepted.append(conn)
    return accepted


async def _adopt(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], conn: socket.socket
) -> None:
    try:
        _, protocol = await loop.connect_accepted_socket(factory, conn)
    except OSError:
        conn.close()
        return
    shutdown = getattr(protocol, "shutdown", None)
    if shutdown is not None:
        shutdown()  # uvicorn's shutdown pass is over or about to run: linger like the others


async def _answer_shutting_down(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, linger_s: float
) -> None:
    """Answer a connection that no HTTP server will serve ``503 shutting_down``, then close it.

    Its request head is awaited for ``linger_s`` (a connection that sends nothing is closed, as
    an idle keep-alive connection is). After the answer the connection is half-closed and what
    still arrives (a request body) is read and dropped until the client closes, at most
    :data:`DISCARD_S`: closing with unread data would reset the connection, and a reset can
    discard the answer before the client read it.
    """
    try:
        head = b""
        end = loop.time() + linger_s
        while b"\r\n\r\n" not in head and len(head) < _HEAD_MAX:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            head += chunk
        if head:
            await loop.sock_sendall(conn, SHUTTING_DOWN_RESPONSE)
        conn.shutdown(socket.SHUT_WR)
        end = loop.time() + DISCARD_S
        while (left := end - loop.time()) > 0:
            try:
                if not await asyncio.wait_for(loop.sock_recv(conn, 65536), left):
                    break
            except TimeoutError:
                break
    except OSError:
        pass
    finally:
        conn.close()
