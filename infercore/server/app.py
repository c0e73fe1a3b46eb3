"""``create_app(runtime)``: the Litestar app of the inference listener.

Handlers are closures over the runtime (no per-request lookups of config or plugins); bodies
are decoded with msgspec straight from bytes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import (
    HTTPException,
    ImproperlyConfiguredException,
    MethodNotAllowedException,
    NotFoundException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST

from infercore.components.features import begin_request
from infercore.errors import (
    BodyTooLarge,
    DeadlineExceeded,
    InfercoreError,
    InvalidInput,
    ModelNotFound,
    PluginError,
    QueueFull,
    RequestTimeout,
    ShuttingDown,
    UnsupportedMediaType,
)
from infercore.metrics import ResponseCounters, VersionMetrics
from infercore.protocol import v1, v2
from infercore.protocol.responses import (
    LARGE_RESPONSE_BYTES,
    PART_VALUES,
    check_output_bytes,
    encode_in_parts,
)
from infercore.runtime import Runtime, ServedModel, ServedVersion
from infercore.runtime.errors import VersionNotReady, quoted
from infercore.server.errors import EXCEPTION_HANDLERS, error_body
from infercore.server.logs import FailureLog
from infercore.server.loopwatch import plugin_modules, watch_loop
from infercore.server.openapi import (
    LiveOperation,
    MetricsOperation,
    ModelMetadataOperation,
    ModelReadyOperation,
    ServerReadyOperation,
    V1PredictOperation,
    V1StatusOperation,
    V2InferOperation,
)
from infercore.server.shutdown import BODY_REFUSED, CLIENT_GONE, REQUEST_TASK

if TYPE_CHECKING:
    from infercore.config.schema import ServerConfig
    from infercore.server.shutdown import ShutdownState

log = logging.getLogger("infercore.server")

JSON = "application/json"
_ALLOWED_TYPES = ("application/json", "application/octet-stream")


class _Answer:
    """An inference response as its two ASGI messages, built with nothing in between.

    The same messages Litestar's ``ASGIResponse`` sends (the handler's headers, then
    content-type and content-length), at a tenth of its cost on this path.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, body: bytes | list[bytes], headers: list[tuple[bytes, bytes]], status: int = 200
    ) -> None:
        #: The body, or a large one's parts (protocol.responses: sent as they are, no copy).
        self.body = body
        self.headers = headers
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        body = self.body
        if isinstance(body, bytes):
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        last = len(body) - 1
        for i, part in enumerate(body):
            # The server waits for the client to take each part when its buffer is full.
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


class _EarlyAnswer:
    """An answer made from a request's line and headers, to send once its body has arrived.

    The HTTP protocol calls :meth:`sent` once it wrote it, or :meth:`abandoned` when the
    connection closed first: it is counted as what happened to it.
    """

    __slots__ = ("body", "count", "error", "gone", "headers", "model", "rid", "status", "sv")

    def __init__(
        self,
        answer: _Answer,
        error: InfercoreError,
        model: str,
        sv: ServedVersion,
        rid: str,
        count: Callable[[InfercoreError, str, str | None, str, VersionMetrics | None], None],
        gone: ResponseCounters,
    ) -> None:
        self.body = answer.body
        self.headers = answer.headers
        self.status = answer.status
        self.error = error
        self.model = model
        self.sv = sv
        self.rid = rid
        self.count = count
        self.gone = gone

    def sent(self) -> None:
        sv = self.sv
        sv.route_requests.inc()  # routed (or asked for) and turned away, as on the path
        self.count(self.error, self.model, sv.version, self.rid, sv.metrics)

    def abandoned(self) -> None:
        # The client went before its body came: counted as the request path counts it.
        self.gone.count_failure("cancelled")


class _ClientGone(Exception):
    """The client disconnected before its request body arrived; ``refused``: the body was
    refused by the HTTP protocol instead (answered 400 and counted there)."""

    def __init__(self, refused: bool = False) -> None:
        super().__init__()
        self.refused = refused


class InferenceApp(Litestar):
    """The Litestar app, with inference requests answered before Litestar's routing.

    ``POST`` to the inference routes (V2 ``…/infer``, V1 ``…:predict``) goes straight to the
    request path: the work is the same as in the routes' handlers (which stay, for the
    OpenAPI schema and for anything the fast path declines), without the framework's
    per-request routing, ``Request`` and header objects, which cost about as much CPU as
    infercore's own request path (benchmarks/README.md). Everything else is Litestar's.
    """

    #: ``(scope, receive, send) -> handled``; set by :func:`create_app`.
    inference_fast_path: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None
    #: ``(target, headers) -> answer``: an inference request's 503 ``queue_full`` from its
    #: request target and headers alone, or ``None``; set by :func:`create_app`, called by
    #: the HTTP protocol (:func:`infercore.server.shutdown.http_protocol`).
    reject_before_body: Callable[[bytes, list[tuple[bytes, bytes]]], _EarlyAnswer | None] | None = (
        None
    )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # RFC 9110: what answers GET answers HEAD (uptime checks, load balancers). The app
            # answers the GET; the HTTP server, which reads its own scope, sends no body.
            scope = {**scope, "method": "GET"}
        fast = self.inference_fast_path
        if (
            fast is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and await fast(scope, receive, send)
        ):
            return
        await super().__call__(scope, receive, send)


class _Watch:
    """One request's deadline, watched by :class:`_Deadlines`."""

    __slots__ = ("cancelling", "deadline", "state", "task", "timer")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.cancelling = task.cancelling()
        self.state = _LIVE
        #: Its own timer, when it is not in the shared queue.
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        if self.state == _LIVE:
            self.state = _EXPIRED
            self.task.cancel()


_LIVE, _EXPIRED, _RELEASED = 0, 1, 2


class _Deadlines:
    """Cancels each request's task at its deadline, as ``asyncio.timeout_at`` would, with one
    timer for all of them.

    ``asyncio.timeout_at`` starts and stops a timer (a libuv handle under uvloop) and builds a
    ``Timeout`` per request: about 6 µs, a sixth of a small request's CPU. Requests are
    watched in arrival order and their deadlines are a fixed time after arrival, so the
    deadlines come in order: a queue in deadline order and one timer, set for the earliest
    live deadline, serve them all. A request whose deadline comes before the last one queued
    or the one the timer is set for (its own, shorter timeout), or that runs on another event
    loop while this one's requests are live, gets a timer of its own. Semantics are
    ``asyncio.Timeout``'s: the task is cancelled at the deadline, and :meth:`release` says
    whether that cancellation is the one the request ended with (no other cancellation came
    meanwhile).
    """

    __slots__ = ("_armed", "_epoch", "_live", "_loop", "_queue", "_timer")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoch = 0  # counts the loops watched, so that a timer knows when it is stale
        self._queue: deque[_Watch] = deque()
        self._live = 0  # queued watches not yet released
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # the deadline the timer is set for

    def watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Watch:
        """Cancel the current task at ``deadline`` (``loop.time()``), unless released first."""
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a request deadline needs a task")
        w = _Watch(task, deadline)
        queue = self._queue
        if loop is not self._loop:
            if self._live:
                w.timer = loop.call_at(deadline, w.expire)
                return w
            # Another loop (a test's new client, say): the old loop's timer is left to fire
            # there, where it finds itself stale.
            self._loop = loop
            self._epoch += 1
            queue.clear()
            self._timer = None
        elif (queue and deadline < queue[-1].deadline) or (
            self._timer is not None and deadline < self._armed
        ):
            # Earlier than one already watched (a request's own, shorter timeout; the timer
            # may still be set for a released one's): a timer of its own.
            w.timer = loop.call_at(deadline, w.expire)
            return w
        queue.append(w)
        self._live += 1
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire, loop, self._epoch, deadline)
            self._armed = deadline
        return w

    def release(self, w: _Watch) -> bool:
        """Stop watching ``w``; ``True`` when its deadline cancelled the task and no other
        cancellation is pending (the request then ends in a timeout, not a cancellation)."""
        if w.timer is not None:
            w.timer.cancel()
        elif w.state == _LIVE:
            w.state = _RELEASED
            self._live -= 1
            queue = self._queue
            while queue and queue[0].state != _LIVE:
                queue.popleft()
            if len(queue) > 2 * self._live + 64:
                # A long request at the head holds released ones behind it: drop them.
                live = [q for q in queue if q.state == _LIVE]
                queue.clear()
                queue.extend(live)
            return False
        if w.state == _EXPIRED:
            w.state = _RELEASED
            return w.task.uncancel() <= w.cancelling
        w.state = _RELEASED
        return False

    def _fire(self, loop: asyncio.AbstractEventLoop, epoch: int, armed: float) -> None:
        if epoch != self._epoch:
            return  # a timer of a loop no longer watched
        self._timer = None
        queue = self._queue
        while queue:
            w = queue[0]
            if w.state == _LIVE:
                # Timers may fire a little early (libuv counts milliseconds): what the timer
                # was set for is due, as asyncio's own timeout would have it.
                if w.deadline > armed:
                    self._timer = loop.call_at(w.deadline, self._fire, loop, epoch, w.deadline)
                    self._armed = w.deadline
                    return
                self._live -= 1
                w.expire()
            queue.popleft()


def _inference_target(path: str) -> tuple[str, str | None, str] | None:
    """``(model, version, protocol)`` of an inference path, or ``None`` (Litestar routes it).

    Only the shapes the inference routes match; anything else (an unknown V1 verb, extra
    segments) is left to the routes' own handling. A V2 path with an empty model or version
    (``/v2/models//infer``, ``/v2/models//versions/1/infer``, ``/v2/models/m/versions//infer``)
    is taken too: it is answered 404 naming the empty name, where Litestar's routing reads it
    without the empty segment as another route (a 405 or a 404, which the routes' error
    handler answers as this path does). Not taken: ``/v2/models/infer`` (the metadata route of
    a model named ``infer``: its ``/infer`` is no segment after a model's) and
    ``/v2/models//versions//infer``, which Litestar reads as the inference route of a model
    named ``versions``: both paths answer them as Litestar's routing does.
    """
    # Longer than the prefix and the suffix together: in "/v2/models/infer" they overlap.
    if len(path) > 16 and path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path[11:-6].split("/")
        if len(parts) == 1:
            return parts[0], None, "v2"
        if len(parts) == 3 and parts[1] == "versions" and (parts[0] or parts[2]):
            return parts[0], parts[2], "v2"
        return None
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        parts = path[11:-8].split("/")
        if len(parts) == 1 and parts[0] and ":" not in parts[0]:
            return parts[0], None, "v1"
        if (
            len(parts) == 3
            and parts[1] == "versions"
            and parts[0]
            and parts[2]
            and ":" not in parts[2]
        ):
            return parts[0], parts[2], "v1"
    return None


_JSON_TYPE = (b"content-type", JSON.encode())
_BINARY_TYPE = (b"content-type", b"application/octet-stream")
#: Prometheus' text format without its charset: Litestar adds one to every text/* type.
_METRICS_TYPE = "; ".join(
    p for p in CONTENT_TYPE_LATEST.split("; ") if not p.startswith("charset=")
)


#: Request body encodings accepted, as Triton accepts them (``tritonclient``'s
#: ``request_compression_algorithm``): gzip, and deflate in its zlib wrapper (HTTP's "deflate").
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _content_type_ok(headers: Mapping[str, str]) -> str | None:
    """Check the content type and encoding; the encoding to undo (``None``: identity).

    ``application/octet-stream`` without ``Inference-Header-Content-Length`` is a JSON body,
    as Triton reads it: ``tritonclient.http.aio`` (aiohttp) sends that type with every
    request, also one whose tensors are all JSON.
    """
    # The encoding is checked whether or not a content type was sent: a compressed body
    # without a Content-Type header is still not JSON.
    encoding = headers.get("content-encoding")
    if encoding is not None:
        encoding = encoding.strip().lower()
        if not encoding or encoding == "identity":  # an empty header: no encoding either
            encoding = None
        elif encoding not in _ENCODINGS:
            raise UnsupportedMediaType(
                f"content encoding {encoding!r} is not accepted",
                hint="send the body uncompressed, gzip or deflate",
            )
    raw = headers.get("content-type")
    if raw is None:
        return encoding
    media = raw.split(";", 1)[0].strip().lower()
    if media not in _ALLOWED_TYPES:
        raise UnsupportedMediaType(
            f"content type {media!r} is not accepted",
            hint="send application/json (or application/octet-stream with "
            "Inference-Header-Content-Length)",
        )
    return encoding


def _binary_without_length(headers: Mapping[str, str], exc: InvalidInput) -> bool:
    """Whether ``exc`` (from decoding a body without Inference-Header-Content-Length) is most
    likely a binary-extension body sent without that header: octet-stream, not JSON."""
    media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    return media == "application/octet-stream" and exc.message.startswith("malformed JSON")


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, decompressed to at most ``limit`` bytes (no zip bombs)."""
    inflater = zlib.decompressobj(_ENCODINGS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidInput(
            f"the body is not valid {encoding} data", hint="compress it whole, or send it plain"
        ) from None
    if len(out) > limit:
        raise BodyTooLarge(
            f"the request body is larger than {limit} bytes once decompressed",
            hint="send less per request (server.max_body_bytes)",
        )
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"the {encoding} body is truncated or has data after its end")
    return out


def _request_id(headers: Mapping[str, str]) -> str:
    rid = headers.get("x-request-id")
    if rid and len(rid) <= 128 and rid.isprintable():
        return rid
    # Unique without a system call: a random per-process prefix and a counter (32 hex digits,
    # like uuid4().hex; a restarted or second worker process draws another prefix).
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count()


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    # parameters.timeout counts microseconds: 1 of them is not "0 ms".
    return f"{ms:.0f}" if ms >= 1 else f"{ms:.3g}"


#: A decimal number as JSON writes one, without a sign: what ``X-Infercore-Timeout-Ms`` takes.
#: Python's ``float`` alone would take ``1_000``, ``+5``, ``inf`` and inner spaces too.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
#: Whitespace HTTP allows around a header's value (RFC 9110 OWS).
_OWS = " \t"


def _client_timeout(headers: Mapping[str, str]) -> float | None:
    """``X-Infercore-Timeout-Ms``: the client's own deadline, in seconds (``None``: none)."""
    raw = headers.get("x-infercore-timeout-ms")
    if raw is None:
        return None
    value = raw.strip(_OWS)
    ms = float(value) if _DECIMAL.fullmatch(value) else -1.0
    if not 0 < ms < 1e9:  # NaN and inf fail too
        # The bound is the OpenAPI schema's (exclusiveMaximum): said, not left to be guessed.
        raise InvalidInput(
            f"X-Infercore-Timeout-Ms: expected milliseconds over 0 and under 1e9, got {raw[:40]!r}",
            hint="the request's own timeout; it may shorten server.request_timeout_ms, "
            "never extend it (leave the header out to keep the server's)",
        )
    return ms / 1000


#: Digits an ``Inference-Header-Content-Length`` may have (``2**63`` has 19; a body holds far
#: fewer bytes).
_MAX_LENGTH_DIGITS = 19


def _header_length(headers: Mapping[str, str]) -> int | None:
    """``Inference-Header-Content-Length``: digits only (``int`` alone would take ``+75``,
    ``1_0`` and inner spaces), and only once (the fast path joins repeated ones with commas,
    as HTTP combines them; Litestar's headers list them)."""
    raw = headers.get("inference-header-content-length")
    if raw is None:
        return None
    getall = getattr(headers, "getall", None)
    if "," in raw or (getall is not None and len(getall("inference-header-content-length")) > 1):
        raise InvalidInput(
            "Inference-Header-Content-Length appears more than once",
            hint="send it once: the byte length of the JSON header that starts the body",
        )
    value = raw.strip(_OWS)
    digits = value[1:] if value[:1] == "-" else value  # a negative one is named as such
    # At most 19 digits: more is past any body limit, and past 4300 ``int`` itself refuses
    # (Python's limit on converting long digit strings, a ValueError).
    if not (digits.isascii() and digits.isdigit() and len(digits) <= _MAX_LENGTH_DIGITS):
        raise InvalidInput(
            "Inference-Header-Content-Length must be a byte count (digits only, at most "
            f"{_MAX_LENGTH_DIGITS}), got {raw[:40]!r}",
            hint="the byte length of the JSON header that starts the body",
        )
    return int(value)


def _unbatched_input(served: ServedModel, name: str) -> bool:
    """Whether a version of ``served`` takes an input (or its feature source a request
    field) named ``name`` whose first dimension is a fixed size, not the batch dimension:
    the row limit does not hold for it (:func:`~infercore.runtime.inputs.prepare_inputs`)."""
    specs = list(served.features.request_inputs() or ())
    for sv in served.versions.values():
        specs.extend(sv.model.inputs)
    return any(spec.name == name and not spec.batched for spec in specs)


def create_app(
    runtime: Runtime,
    *,
    manage_runtime: bool = True,
    shutdown: ShutdownState | None = None,
    fast_path: bool = True,
) -> Litestar:
    """Build the inference app around a runtime.

    Args:
        runtime: A built (not necessarily started) runtime.
        manage_runtime: Start the runtime's models in the app's lifespan and stop them at
            shutdown. The CLI passes ``False`` because it starts models beside the server so
            that liveness answers while they load.
        shutdown: The CLI's shutdown sequence (:mod:`infercore.server.shutdown`): once a
            signal came readiness is false; once the listener closes, an inference request
            that arrives is answered 503 shutting_down.
        fast_path: Answer inference requests before Litestar's routing (:class:`InferenceApp`);
            ``False`` sends them through the routes' handlers (same answers, more CPU).
    """
    cfg = runtime.config.server
    metrics = runtime.metrics
    timeout_s = cfg.request_timeout_ms / 1000
    max_elements = cfg.max_body_bytes  # no tensor can hold more elements than the body has bytes
    max_rows = cfg.max_request_rows
    max_output = cfg.max_output_bytes
    unrouted: dict[tuple[str, str], ResponseCounters] = {}
    # The decoders' row-limit exemption of each model, built once (not a closure per request);
    # the runtime's models are fixed when it is built (the partial at the call sites is only
    # a fallback, never reached today).
    unbatched_of: dict[str, Callable[[str], bool]] = {
        name: functools.partial(_unbatched_input, served) for name, served in runtime.models.items()
    }
    deadlines = _Deadlines()
    failure_log = FailureLog(log)

    def failure_metrics(model: str, version: str) -> ResponseCounters:
        key = (model, version)
        counters = unrouted.get(key)
        if counters is None:
            counters = unrouted[key] = metrics.responses(model, version)
        return counters

    def counters_for(
        model_name: str, version: str | None, vm: VersionMetrics | None
    ) -> ResponseCounters:
        """Where a failure is counted: its version's, else by the names the URL gave."""
        if vm is not None:
            return vm
        # Label values come from the config, never from the URL: unknown names would
        # otherwise add a series each (unbounded label cardinality).
        served = runtime.models.get(model_name)
        if served is None:
            return failure_metrics("", "")
        return failure_metrics(model_name, version if version in served.versions else "")

    def served_or_404(name: str) -> ServedModel:
        return runtime.model(name)

    def reject(
        exc: InfercoreError,
        model_name: str,
        version: str | None,
        rid: str,
        vm: VersionMetrics | None = None,
    ) -> _Answer:
        """The error response of an inference request, counted once by code and reason."""
        count_rejection(exc, model_name, version, rid, vm)
        return error_answer(exc, rid)

    def count_rejection(
        exc: InfercoreError,
        model_name: str,
        version: str | None,
        rid: str,
        vm: VersionMetrics | None,
    ) -> None:
        if vm is None and isinstance(exc, VersionNotReady):
            # The router chose the version (X-Infercore-Variant): counted under that version's
            # label, as through /versions/{v}. A version the runtime knows, never a header's
            # raw value (label cardinality).
            version = exc.version
        counters = counters_for(model_name, version, vm)
        counters.count_response(exc.status_code)
        counters.count_failure(exc.reason)
        if exc.status_code >= 500 and exc.reason != "internal":  # internal: logged already
            # At most one line per model and reason every few seconds: an overloaded server
            # answers thousands of 503s a second (all counted above).
            failure_log.warning(
                (model_name if model_name in runtime.models else "", exc.reason),
                "request failed: %s",
                exc,
                extra={"request_id": rid, "model": model_name, "reason": exc.reason},
            )

    def error_answer(exc: InfercoreError, rid: str) -> _Answer:
        body = error_body(exc)
        headers = [(b"x-request-id", rid.encode("latin-1"))]
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in exc.headers.items()
        )
        headers.append(_JSON_TYPE)
        headers.append((b"content-length", b"%d" % len(body)))
        return _Answer(body, headers, exc.status_code)

    def too_large() -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body is larger than {cfg.max_body_bytes} bytes",
            hint="send less per request (server.max_body_bytes)",
        )

    async def run_request(
        headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]],
        model_name: str,
        version: str | None,
        protocol: str,
    ) -> _Answer | None:
        """One inference request, answered (``None``: the client went before its body came)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Durations for the metrics: uvloop's clock (loop.time) ticks in whole milliseconds.
        t0 = perf_counter()
        deadline = start + timeout_s
        rid = _request_id(headers)
        vm: VersionMetrics | None = None
        sv: ServedVersion | None = None
        watch: _Watch | None = None
        try:
            if shutdown is not None and shutdown.closing:
                # A late arrival on a connection still open after the listener closed.
                raise ShuttingDown("the server is shutting down")
            served = served_or_404(model_name)
            if version is not None and protocol == "v2":
                # The version before the body (V1's pick_v1 does the same): an unknown one is
                # a 404 and one not ready a 503, whatever the body holds.
                asked = served.version(version)
                if not asked.ready:
                    raise VersionNotReady(
                        f"model {served.name!r} version {version!r} is not ready",
                        version=version,
                    )
            priority = 0  # the version's default level
            header_length = _header_length(headers) if protocol == "v2" else None
            encoding = _content_type_ok(headers)
            client_s = _client_timeout(headers) if "x-infercore-timeout-ms" in headers else None
            if client_s is not None and start + client_s < deadline:
                deadline = start + client_s
            # The deadline covers the body too: a client that stops sending mid-body is
            # answered when it passes (408), not left holding the request.
            watch = deadlines.watch(loop, deadline)
            try:
                body = await read_body()
            except RequestEntityTooLarge:
                # Raised here (not by the framework) so that the rejection is counted.
                raise too_large() from None
            except asyncio.CancelledError:
                expired = deadlines.release(watch)
                watch = None
                if expired:
                    raise RequestTimeout(
                        f"the request body did not arrive within {_ms(deadline - start)} ms",
                        hint="send the whole body at once; the deadline is "
                        "server.request_timeout_ms (or the request's own timeout)",
                    ) from None
                raise
            if encoding is not None:
                body = _inflate(body, encoding, cfg.max_body_bytes)
            if protocol == "v2":
                try:
                    decoded = v2.decode(
                        body,
                        header_length,
                        max_elements=max_elements,
                        max_rows=max_rows,
                        unbatched=unbatched_of.get(served.name)
                        or functools.partial(_unbatched_input, served),
                    )
                except InvalidInput as exc:
                    if header_length is None and _binary_without_length(headers, exc):
                        raise InvalidInput(
                            exc.message,
                            hint="a body of binary tensors needs the "
                            "Inference-Header-Content-Length header (the byte length of its "
                            "JSON header); without it the body is read as JSON",
                        ) from None
                    raise
                if decoded.timeout_s is not None and start + decoded.timeout_s < deadline:
                    # Triton's parameters.timeout: it may shorten the deadline, never extend it.
                    deadline = start + decoded.timeout_s
                    deadlines.release(watch)
                    watch = deadlines.watch(loop, deadline)
                sv = served.pick(version, headers, decoded.id or rid, decoded.tensors)
                vm = sv.metrics
                if decoded.priority:
                    # Triton's parameters.priority, checked against the picked version's levels.
                    priority = v2.priority_level(decoded.priority, sv.batcher)
                if decoded.non_finite is not None and not getattr(
                    sv.model, "accepts_non_finite", False
                ):
                    # As JSON, which cannot carry them (DESIGN: NaN where not allowed is a 400).
                    raise InvalidInput(
                        f"{decoded.non_finite}, which this model does not accept",
                        hint="send finite numbers",
                    )
                fields: dict[str, np.ndarray[Any, Any]] = decoded.tensors
                declared: dict[str, str] | None = decoded.datatypes
                if decoded.outputs is not None:
                    # Checked before the model runs: a bad request never costs a model call.
                    known_outputs = [spec.name for spec in sv.output_specs]
                    for name in decoded.outputs:
                        if name not in known_outputs:
                            raise InvalidInput(
                                f"unknown output {quoted(name)}",
                                hint=f"the model's outputs are: {', '.join(known_outputs)}",
                            )
            else:
                # The version first: a model that is not ready is a 503, whatever the body.
                sv, fields = served.pick_v1(
                    version,
                    headers,
                    rid,
                    lambda sv: v1.decode(
                        body,
                        default_input=sv.default_input,
                        max_rows=max_rows,
                        names=sv.names_hint,
                        unbatched=unbatched_of.get(served.name)
                        or functools.partial(_unbatched_input, served),
                    ),
                )
                vm = sv.metrics
                declared = None
            degraded = begin_request()
            vm.inflight.inc()
            try:
                try:
                    outputs = await runtime.infer(
                        served,
                        sv,
                        fields,
                        declared=declared,
                        deadline=deadline,
                        priority=priority,
                        # The client's own deadline: its passing is not the version's fault.
                        client_deadline=deadline != start + timeout_s,
                        # A request that named its version is no evidence for the canary
                        # guard (asked only while it judges a canary).
                        pinned=served.guarding
                        and (version is not None or served.router.forced(headers)),
                    )
                except BaseException as exc:
                    # Cancelled by its deadline (and by nothing else): a timeout.
                    expired = deadlines.release(watch)
                    watch = None
                    if expired and type(exc) is asyncio.CancelledError:
                        raise TimeoutError from None
                    raise
                deadlines.release(watch)
                watch = None
            except TimeoutError:
                raise DeadlineExceeded(
                    f"request did not finish within {_ms(deadline - start)} ms",
                    hint="raise server.request_timeout_ms or add capacity"
                    if deadline == start + timeout_s
                    else "the request's own timeout passed (parameters.timeout or "
                    "X-Infercore-Timeout-Ms)",
                ) from None
            finally:
                vm.inflight.dec()
            content: bytes | list[bytes]
            if protocol == "v2":
                # Only what the response carries counts (a client may ask for less).
                carried = outputs if decoded.outputs is None else decoded.outputs
                if check_output_bytes(outputs, carried, max_output) > LARGE_RESPONSE_BYTES:
                    content, head_len = await encode_in_parts(
                        v2.encode_parts(
                            model_name=served.name,
                            model_version=sv.version,
                            request_id=decoded.id,
                            outputs=outputs,
                            requested=decoded.outputs,
                            binary_default=decoded.binary_default,
                            part_values=PART_VALUES,
                        ),
                        deadline=deadline,
                    )
                else:
                    content, head_len = v2.encode(
                        model_name=served.name,
                        model_version=sv.version,
                        request_id=decoded.id,
                        outputs=outputs,
                        requested=decoded.outputs,
                        binary_default=decoded.binary_default,
                    )
                resp_headers = [(b"x-request-id", rid.encode("latin-1"))]
                media = _JSON_TYPE
                if head_len is not None:
                    resp_headers.append((b"inference-header-content-length", b"%d" % head_len))
                    media = _BINARY_TYPE
            else:
                batched = [outputs[s.name] for s in sv.output_specs if s.batched]
                rows = batched[0].shape[0] if batched else 1
                if check_output_bytes(outputs, outputs, max_output) > LARGE_RESPONSE_BYTES:
                    content, _ = await encode_in_parts(
                        v1.encode_parts(outputs, rows, PART_VALUES), deadline=deadline
                    )
                else:
                    content = v1.encode(outputs, rows)
                resp_headers = [(b"x-request-id", rid.encode("latin-1"))]
                media = _JSON_TYPE
            if degraded:
                parts = ", ".join(sorted(degraded)).encode("latin-1")
                resp_headers.append((b"x-infercore-degraded", parts))
            resp_headers.append(media)
            length = len(content) if isinstance(content, bytes) else sum(map(len, content))
            resp_headers.append((b"content-length", b"%d" % length))
            vm.count_response(200)
            vm.request_duration.observe(perf_counter() - t0)
            return _Answer(content, resp_headers)
        except InfercoreError as exc:
            return reject(exc, model_name, version, rid, vm)
        except _ClientGone as gone:
            if not gone.refused:
                counters_for(model_name, version, vm).count_failure("cancelled")
            return None
        except asyncio.CancelledError as exc:
            counters = counters_for(model_name, version, vm)
            if shutdown is not None and shutdown.closing and exc.args[:1] != (CLIENT_GONE,):
                # Cut short by the stop (the forced one, or the graceful timeout):
                # ShutdownMiddleware answers it 503 shutting_down, counted as such.
                counters.count_response(503)
                counters.count_failure("shutting_down")
            else:
                # The client went away: counted, never answered (nobody is listening).
                counters.count_failure("cancelled")
            raise
        except HTTPException:
            raise  # the framework's own (e.g. a client that disconnected mid-body)
        except Exception as exc:
            # A bug, not a bad request: still one counted 500 `internal`; details only in the
            # log, at most one ERROR line per model every few seconds (a client that found the
            # bug can send it in a loop), the rest at DEBUG.
            failure_log.log(
                logging.ERROR,
                (model_name if model_name in runtime.models else "", "internal"),
                "request failed unexpectedly: %s: %s",
                type(exc).__name__,
                exc,
                extra={"request_id": rid, "model": model_name},
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return reject(InfercoreError("internal error"), model_name, version, rid, vm)
        finally:
            if watch is not None:  # an error between the body and the model call
                deadlines.release(watch)

    async def via_litestar(
        request: Request[Any, Any, Any], model_name: str, version: str | None, protocol: str
    ) -> ASGIApp:
        answer = await run_request(request.headers, request.body, model_name, version, protocol)
        if answer is None:  # only the fast path's body reader reports a client that went
            raise RuntimeError("no answer")
        return answer

    max_body = cfg.max_body_bytes

    async def answer_fast(scope: Scope, receive: Receive, send: Send) -> bool:
        """The inference routes without Litestar's routing (see :class:`InferenceApp`)."""
        target = _inference_target(scope["path"])
        if target is None or scope.get("root_path"):
            return False
        # ASGI header names are lower-case bytes; the first of repeated headers counts.
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        if "inference-header-content-length" in headers:
            # Repeated, joined with commas as HTTP combines them: _header_length refuses it.
            values = [v for k, v in scope["headers"] if k == b"inference-header-content-length"]
            if len(values) > 1:
                headers["inference-header-content-length"] = ", ".join(
                    v.decode("latin-1") for v in values
                )

        async def read_body() -> bytes:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body:
                raise too_large()
            chunks: list[bytes] = []
            size = 0
            while True:
                message: Any = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone(BODY_REFUSED in scope)
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > max_body:
                    raise too_large()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        # For the HTTP protocol: a client that goes before its answer cancels this task.
        scope[REQUEST_TASK] = asyncio.current_task()  # type: ignore[literal-required]
        try:
            answer = await run_request(headers, read_body, *target)
        except asyncio.CancelledError as exc:
            if exc.args[:1] != (CLIENT_GONE,):
                raise
            # Counted (cancelled) by the request path; nobody is left to answer. Ended here,
            # so that the HTTP server does not report the cancellation as an error.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return True
        if answer is not None:
            await answer(scope, receive, send)
        return True

    unknown = failure_metrics("", "")

    def reject_before_body(target: bytes, raw: list[tuple[bytes, bytes]]) -> _EarlyAnswer | None:
        """503 ``queue_full`` for an inference request whose versions are all full, or ``None``.

        Called with the request line's target and the headers, before the body is read
        (``server.reject_before_body``). Whatever the headers alone would answer otherwise
        (unknown model or version, not ready, content type, body size) is left to the request
        path, as is anything unusual (percent-escapes; repeated headers are taken first-wins
        as there), and every request once a shutdown began (its answers close connections).
        """
        if shutdown is not None and shutdown.draining:
            return None  # answered by the request path, with Connection: close
        path = target.split(b"?", 1)[0]
        if b"%" in path:
            return None
        found = _inference_target(path.decode("latin-1"))
        if found is None:
            return None
        model_name, version, protocol = found
        served = runtime.models.get(model_name)
        if served is None:
            return None
        for candidate in served.versions.values():
            if candidate.full:
                break
        else:
            return None  # the usual case: nothing is full
        headers: dict[str, str] = {}
        for k, v in raw:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        sv = served.full_version(version, headers)
        if sv is None:
            return None
        declared = headers.get("content-length")
        try:
            if protocol == "v2":
                _header_length(headers)  # a malformed one: the request path words it
            _content_type_ok(headers)
            if declared is not None and declared.isdigit() and int(declared) > max_body:
                return None
        except InfercoreError:
            return None
        exc = QueueFull(f"queue of model {model_name!r} is full")
        rid = _request_id(headers)
        answer = error_answer(exc, rid)
        return _EarlyAnswer(answer, exc, model_name, sv, rid, count_rejection, unknown)

    # --- health -------------------------------------------------------------------------
    @get("/v2/health/live", tags=["health"], summary="Liveness", operation_class=LiveOperation)
    async def live() -> Response[bytes]:
        return Response(b'{"live":true}', media_type=JSON)

    @get(
        "/v2/health/ready",
        tags=["health"],
        summary="Readiness",
        operation_class=ServerReadyOperation,
    )
    async def ready() -> Response[bytes]:
        draining = runtime.draining or (shutdown is not None and shutdown.draining)
        peers_ready = shutdown is None or shutdown.peers_ready
        if runtime.ready and not draining and peers_ready:
            return Response(b'{"ready":true}', media_type=JSON)
        # Like every non-2xx body: `error` and `reason` (plus `ready` for probes that read it).
        if draining:
            reason, message = "shutting_down", "the server is shutting down"
        elif not runtime.started or not peers_ready:
            reason, message = "model_not_ready", "the models are still loading"
        else:
            reason, message = "model_not_ready", "a required model is not ready"
        body = v2.encode_json({"ready": False, "error": message, "reason": reason})
        return Response(body, media_type=JSON, status_code=503, headers={"Retry-After": "1"})

    @get("/v2", tags=["v2"], summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        from infercore import __version__

        return {
            "name": "infercore",
            "version": __version__,
            # schedule_policy: Triton's parameters.priority and parameters.timeout are honoured
            # (protocol.v2.decode reads both; priority where the batcher has levels).
            "extensions": list(v2.EXTENSIONS),
        }

    # --- model metadata -----------------------------------------------------------------
    def metadata(served: ServedModel, sv: ServedVersion) -> Response[bytes]:
        doc: dict[str, Any] = {
            "name": served.name,
            "versions": list(served.versions),
            "platform": sv.model.platform or sv.model.kind,
        }
        if not sv.ready:
            # Not 200 with no inputs: a V2 client would take that for a model without any.
            doc["state"] = sv.state
            doc["error"] = f"model {served.name!r} version {sv.version!r} is {sv.state}"
            doc["reason"] = "model_not_ready"
            return Response(
                v2.encode_json(doc),
                media_type=JSON,
                status_code=503,
                headers={"Retry-After": "1"},
            )
        # What a request carries: the feature source's fields where it builds the model's
        # inputs from them (the Feast source: the entity key and the request fields).
        inputs = served.features.request_inputs() or sv.model.inputs
        doc["inputs"] = [s.to_metadata() for s in inputs]
        doc["outputs"] = [s.to_metadata() for s in sv.output_specs]
        return Response(v2.encode_json(doc), media_type=JSON)

    def lookup_version(model_name: str, version: str | None) -> tuple[ServedModel, ServedVersion]:
        served = served_or_404(model_name)
        v = served.primary if version is None else version
        sv = served.versions.get(v)
        if sv is None:
            raise ModelNotFound(
                f"model {quoted(model_name)} has no version {quoted(v)}",
                hint=f"versions: {', '.join(served.versions)}",
            )
        return served, sv

    @get(
        "/v2/models/{model_name:str}",
        tags=["v2"],
        summary="Model metadata",
        operation_class=ModelMetadataOperation,
    )
    async def model_metadata(model_name: FromPath[str]) -> Response[bytes]:
        try:
            return metadata(*lookup_version(model_name, None))
        except ModelNotFound as exc:
            if model_name != "stats":
                raise
            # tritonclient's get_inference_statistics() with no model asks for this.
            raise ModelNotFound(
                exc.message,
                hint="Triton's statistics extension (GET /v2/models/stats) is not served; "
                f"GET /metrics has the Prometheus metrics; {exc.hint}",
            ) from None

    @get(
        "/v2/models/{model_name:str}/versions/{version:str}",
        tags=["v2"],
        summary="Model version metadata",
        operation_class=ModelMetadataOperation,
    )
    async def model_version_metadata(
        model_name: FromPath[str], version: FromPath[str]
    ) -> Response[bytes]:
        return metadata(*lookup_version(model_name, version))

    def readiness(served: ServedModel, sv: ServedVersion) -> Response[bytes]:
        if sv.ready:
            return Response(v2.encode_json({"name": served.name, "ready": True}), media_type=JSON)
        body = v2.encode_json(
            {
                "name": served.name,
                "ready": False,
                "error": f"model {served.name!r} version {sv.version!r} is {sv.state}",
                "reason": "model_not_ready",
            }
        )
        return Response(body, media_type=JSON, status_code=503, headers={"Retry-After": "1"})

    @get(
        "/v2/models/{model_name:str}/ready",
        tags=["v2"],
        summary="Model readiness",
        operation_class=ModelReadyOperation,
    )
    async def model_ready(model_name: FromPath[str]) -> Response[bytes]:
        return readiness(*lookup_version(model_name, None))

    @get(
        "/v2/models/{model_name:str}/versions/{version:str}/ready",
        tags=["v2"],
        summary="Model version readiness",
        operation_class=ModelReadyOperation,
    )
    async def model_version_ready(
        model_name: FromPath[str], version: FromPath[str]
    ) -> Response[bytes]:
        return readiness(*lookup_version(model_name, version))

    # --- inference ----------------------------------------------------------------------
    @post(
        "/v2/models/{model_name:str}/infer",
        tags=["v2"],
        summary="Inference (routed)",
        status_code=200,
        operation_class=V2InferOperation,
    )
    async def infer(request: Request[Any, Any, Any], model_name: FromPath[str]) -> ASGIApp:
        return await via_litestar(request, model_name, None, "v2")

    @post(
        "/v2/models/{model_name:str}/versions/{version:str}/infer",
        tags=["v2"],
        summary="Inference (one version)",
        status_code=200,
        operation_class=V2InferOperation,
    )
    async def infer_version(
        request: Request[Any, Any, Any], model_name: FromPath[str], version: FromPath[str]
    ) -> ASGIApp:
        return await via_litestar(request, model_name, version, "v2")

    @post(
        "/v1/models/{target:str}",
        tags=["v1"],
        summary="V1 predict (`{model}:predict`)",
        status_code=200,
        operation_class=V1PredictOperation,
    )
    async def v1_predict(request: Request[Any, Any, Any], target: FromPath[str]) -> ASGIApp:
        name, sep, verb = target.partition(":")
        if not sep or verb != "predict":
            return reject(
                InvalidInput(
                    f"unknown V1 verb in {quoted(target)}", hint="POST /v1/models/NAME:predict"
                ),
                name,
                None,
                _request_id(request.headers),
            )
        return await via_litestar(request, name, None, "v1")

    @post(
        "/v1/models/{model_name:str}/versions/{target:str}",
        tags=["v1"],
        summary="V1 predict on one version (`{version}:predict`)",
        status_code=200,
        operation_class=V1PredictOperation,
    )
    async def v1_predict_version(
        request: Request[Any, Any, Any], model_name: FromPath[str], target: FromPath[str]
    ) -> ASGIApp:
        version, sep, verb = target.partition(":")
        if not sep or verb != "predict":
            return reject(
                InvalidInput(
                    f"unknown V1 verb in {quoted(target)}",
                    hint="POST /v1/models/NAME/versions/VERSION:predict",
                ),
                model_name,
                version,
                _request_id(request.headers),
            )
        return await via_litestar(request, model_name, version, "v1")

    @get(
        "/v1/models/{model_name:str}",
        tags=["v1"],
        summary="V1 model status",
        operation_class=V1StatusOperation,
    )
    async def v1_status(model_name: FromPath[str]) -> dict[str, Any]:
        if model_name.endswith(":predict"):
            # The predict route, with GET: as V2's infer route and V1's versioned one answer.
            raise MethodNotAllowedException(headers={"Allow": "POST, OPTIONS"})
        served = served_or_404(model_name)
        return {
            "model_version_status": [
                {"version": v, "state": "AVAILABLE" if sv.ready else sv.state.upper()}
                for v, sv in served.versions.items()
            ]
        }

    # --- operations ---------------------------------------------------------------------
    @get("/metrics", tags=["ops"], summary="Prometheus metrics", operation_class=MetricsOperation)
    async def prometheus() -> Response[bytes]:
        for served in runtime.models.values():
            for sv in served.versions.values():
                sv.metrics.set_queue_depth(sv.batcher.queue_depth)
        # Litestar appends "; charset=utf-8" to a text/* type, and CONTENT_TYPE_LATEST has
        # one already: two charset parameters make the header unparseable, and Prometheus 3
        # then fails the scrape (unless its fallback_scrape_protocol is set).
        return Response(metrics.exposition(), media_type=_METRICS_TYPE)

    @get("/-/plugins", tags=["ops"], summary="Installed plugins")
    async def plugins() -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": p.version,
                "license": p.license,
                "builtin": p.builtin,
                "kinds": p.kinds,
                "note": p.note,
            }
            for p in runtime.plugins.values()
        ]

    handlers: list[Any] = [
        live,
        ready,
        server_metadata,
        model_metadata,
        model_version_metadata,
        model_ready,
        model_version_ready,
        infer,
        infer_version,
        v1_predict,
        v1_predict_version,
        v1_status,
        prometheus,
        plugins,
    ]
    handlers.extend(runtime.registry.routes(runtime))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # First in, last out: a plugin's start() or stop() that blocks the loop is named too.
        # Every worker process runs its own (each has its own loop).
        watch = watch_loop(
            cfg.loop_block_warn_ms,
            stalls=metrics.loop_stalls,
            stall_seconds=metrics.loop_stall_seconds,
            plugins=plugin_modules(runtime.registry),
        )
        try:
            if manage_runtime:
                await runtime.start()
            try:
                yield
            finally:
                if manage_runtime:
                    await runtime.stop()
        finally:
            if watch is not None:
                watch.stop()

    # Litestar registers copies of the handlers: their functions identify them.
    inference_handlers = frozenset(
        h.fn for h in (infer, infer_version, v1_predict, v1_predict_version)
    )

    def empty_name(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        """The 404 of a V2 inference path with an empty model or version
        (``/v2/models//infer``, ``/v2/models//versions/1/infer``), which Litestar's routing
        reads without the empty segment as another route and refuses (405, or 404 without
        a route): answered and counted as the fast path answers it."""
        target = _inference_target(request.scope["path"])
        if request.method != "POST" or target is None:
            return None
        model_name, version, _ = target
        try:
            served = served_or_404(model_name)
            if version is None:
                return None  # not an empty name: Litestar's answer stands
            served.version(version)
        except ModelNotFound as exc:
            rid = _request_id(request.headers)
            count_rejection(exc, model_name, version, rid, None)
            return Response(
                error_body(exc),
                status_code=exc.status_code,
                media_type=JSON,
                headers={"x-request-id": rid},
            )
        return None

    def counted(handle: Callable[..., Response[bytes]]) -> Callable[..., Response[bytes]]:
        """An exception handler that counts its answer when it answers an inference request
        (a V2 infer or V1 predict route), as inference rejections are counted: the request
        counters count inference requests only, every answer of them by code and every
        failure by reason. Metadata and readiness 404s, unknown routes and 405s are answered
        with their reason but not counted: a scanner or a client probing versions would
        otherwise raise the inference error rate of a model."""

        def handle_counted(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
            if isinstance(exc, MethodNotAllowedException | NotFoundException):
                answered = empty_name(request)
                if answered is not None:
                    return answered
            response = handle(request, exc)
            if getattr(request.scope.get("route_handler"), "fn", None) not in inference_handlers:
                return response
            name = (
                request.path_params.get("model_name")
                or request.path_params.get("target", "").partition(":")[0]
            )
            # Label values from the config only: a name from the URL would add a series each.
            counters = failure_metrics(name if name in runtime.models else "", "")
            counters.count_response(response.status_code or 500)
            try:
                reason = msgspec.json.decode(response.content)["reason"]
            except (msgspec.DecodeError, KeyError, TypeError):
                reason = "internal"
            counters.count_failure(reason)
            return response

        return handle_counted

    exception_handlers = {kind: counted(h) for kind, h in EXCEPTION_HANDLERS.items()}
    try:
        app = _new_app(handlers, exception_handlers, cfg, lifespan)
    except ImproperlyConfiguredException as exc:
        # infercore's own routes do not collide: a plugin's (register_routes) took one's path.
        raise PluginError(
            f"a plugin's register_routes(): {exc.detail}",
            hint="give the plugin's routes a path of their own (e.g. under /-/<plugin>/)",
        ) from None
    if fast_path:
        app.inference_fast_path = answer_fast
    if cfg.reject_before_body and not cfg.access_log:
        app.reject_before_body = reject_before_body
    return app


def _new_app(
    handlers: list[Any], exception_handlers: dict[Any, Any], cfg: ServerConfig, lifespan: Any
) -> InferenceApp:
    from infercore import __version__

    return InferenceApp(
        route_handlers=handlers,
        exception_handlers=exception_handlers,
        request_max_body_size=cfg.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="infercore",
            version=__version__,
            description="Open Inference Protocol (V2) and V1 inference API.",
        )
        if cfg.openapi
        else None,
        lifespan=[lifespan],
        debug=False,
        logging_config=None,
    )
