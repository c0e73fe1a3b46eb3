"""The closed schema of a composed infercore config.

Component nodes (``loader``, ``batching``, ``routing``, ``features``) are kept as plain
mappings here and validated against their kind's own ``Config`` by the registry.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from infercore.config.rollout import (
    AdminConfig,
    InitialStage,
    Percent,
    RepositoryConfig,
    RolloutConfig,
)

#: Model names and versions: no path separators, no dots at the start, bounded length.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-.]{0,31}$"
NAME_RE = re.compile(NAME_PATTERN)
VERSION_RE = re.compile(VERSION_PATTERN)

Node = dict[str, Any]


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The inference listener and request limits."""

    #: An empty host would make uvicorn listen on every interface (an unset variable in
    #: ``${oc.env:INFERCORE_HOST,…}`` gives one): refused, say ``0.0.0.0`` to mean that.
    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    #: 0: a free port the system picks (tests, one-off runs).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    #: Serve on this Unix domain socket instead of host:port (deploy=sidecar sets one).
    uds: str | None = None
    #: Server processes sharing the listener (``auto``: one per CPU this process may use).
    #: Above 1, a supervisor starts them (``infercore.server.workers``); metrics add up
    #: across them; the admin API needs 1.
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] | Literal["auto"] = 1
    #: Largest request body read, in bytes; larger bodies get 413 before being read whole.
    #: (Every limit here is finite and at least 1: zero would refuse every request.)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1, le=2**31)] = 8 * 1024 * 1024
    #: Most rows (first-dimension entries) one request may carry.
    max_request_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 4096
    #: Most tensor data one response may carry, in bytes: the outputs it returns as the
    #: binary tensor extension sends them (4 per FP32 value; 4 plus its length per BYTES
    #: value), added up before anything is encoded. More is answered 400 output_too_large
    #: (the request asked for it). Its JSON text is several times this (~20 bytes per FP32).
    max_output_bytes: Annotated[int, msgspec.Meta(ge=1, le=2**34)] = 64 * 1024 * 1024
    #: Largest request line and headers, in bytes (uvicorn's h11 default; Node's is 16 KiB,
    #: nginx's 4 x 8 KiB): more is answered 431 (414 when the request target alone is that
    #: long) and the connection closes, before more of it is read or kept.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    #: From a request's first byte (a connection's first request: from the connection) to
    #: the end of its headers, in ms, as nginx's client_header_timeout: later is answered 408
    #: and the connection closes; a new connection that sends nothing is closed.
    header_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 10_000
    #: End-to-end deadline for one request: features, queue, inference and encoding.
    request_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 10_000
    #: After SIGTERM: seconds of serving on with readiness false (so load balancers and
    #: endpoint controllers notice) before the listener closes.
    drain_delay_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0
    #: Seconds given to in-flight and queued requests once the listener has closed.
    graceful_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    #: Where logs go (deploy=k8s: stdout, for the cluster's log collector).
    log_stream: Literal["stderr", "stdout"] = "stderr"
    #: uvicorn's access log; with it on, ``X-Forwarded-For``/``-Proto`` from the addresses in
    #: ``FORWARDED_ALLOW_IPS`` (default 127.0.0.1) set the client address it shows.
    access_log: bool = False
    #: Serve OpenAPI schema and docs under /schema.
    openapi: bool = True
    #: How long a thread may hold the GIL while another waits for it, in ms (Python's
    #: ``sys.setswitchinterval``; Python's default is 5). The event loop shares the GIL with
    #: model, feature-store and drift threads: each time one of them finishes a call that
    #: released the GIL, the loop can wait this long to get it back (benchmarks/README.md).
    gil_switch_interval_ms: Annotated[float, msgspec.Meta(ge=0.05, le=100)] = 0.5
    #: Net allocations of container objects between two young collections of Python's
    #: garbage collector (``gc.set_threshold``; Python's default is 700). A collection walks
    #: every object still alive since the last one: under load, those of the requests in
    #: flight, however much garbage there is. Fewer collections cost the event loop less and
    #: stall it less often (benchmarks/README.md: Overload).
    gc_gen0_threshold: Annotated[int, msgspec.Meta(ge=100, le=1_000_000)] = 10_000
    #: Log a WARNING naming the code when the event loop is blocked for longer than this, in
    #: ms (a plugin's synchronous work in an ``async def``: every request waits meanwhile);
    #: 0: off. A watchdog thread checks a heartbeat the loop runs every 100 ms (at most a
    #: fifth of this; infercore.server.loopwatch). 500: far above what a healthy loop does at
    #: once (a garbage collection, a burst of requests: milliseconds; the heap freeze after
    #: start-up: 160 ms with the fraud recipe), and below a liveness probe's timeout (1 s by
    #: Kubernetes' default, 2 s in infercore's manifests).
    loop_block_warn_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 500
    #: Requests for one version that arrive together share one feature fetch, one input
    #: check, one batcher submission and one outputs pass, when the feature source allows it
    #: (``FeatureSource.groupable``; the Feast and ``request`` sources do). Each request still
    #: gets exactly its own answer (infercore/runtime/grouping.py).
    group_requests: bool = True
    #: While every version that could serve an inference request has a full queue, answer it
    #: 503 ``queue_full`` as soon as its headers are read: the request line and headers are
    #: checked as usual (404, 415, 413 first), the body is read and dropped unchecked. Such a
    #: rejection takes a fraction of the event loop's CPU that decoding the request would, CPU
    #: the model's threads need under overload. ``false``: the body is decoded first, so a
    #: malformed request gets its 400 even then. Off while ``access_log`` is on.
    reject_before_body: bool = True


class VersionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One version of a model: how to load it."""

    loader: Node
    warmup: bool = True
    #: Where a non-primary version starts (``candidate``, ``shadow``, ``canary``, ``retired``).
    stage: InitialStage = "candidate"
    #: A canary's share of routed traffic, in percent (the primary takes the rest).
    weight: Percent = 0.0
    #: This version's own response outputs (e.g. its own threshold); default: the model's.
    outputs: dict[str, OutputMapping] | None = None


class OutputMapping(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One response output derived from a model output.

    ``{source: probabilities, column: 1}`` exposes the second column of ``probabilities``;
    adding ``threshold: 0.5`` exposes ``column >= 0.5`` as BOOL instead.
    """

    source: str
    #: Take this column of a 2-D output ([N, k] -> [N]).
    column: int | None = None
    #: Compare with this value: the output becomes BOOL (value >= threshold).
    threshold: float | None = None


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One served model with its versions and the components in front of it."""

    versions: dict[str, VersionConfig]
    #: The version that serves unversioned requests; default: the only (or highest) version.
    primary: str | None = None
    #: A required model that fails to load stops start-up; an optional one fails alone.
    required: bool = True
    description: str = ""
    #: What responses expose, derived from the model's outputs (default: every model output).
    outputs: dict[str, OutputMapping] | None = None
    #: Override the top-level component nodes for this model.
    batching: Node | None = None
    routing: Node | None = None
    features: Node | None = None
    #: Approvals and the canary guard (``infercore.config.rollout.RolloutConfig``).
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    #: Versions the admin API may load from folders (``RepositoryConfig``); none by default.
    repository: RepositoryConfig | None = None
    #: Drift monitoring of this model's live inputs (``infercore.drift.DriftConfig``: sampling,
    #: windows, detectors, actions); validated when the runtime is built.
    drift: Node | None = None


class FeatureStoreSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where feature stores live in this deployment (set by ``env``; recipes refer to it as
    ``${feature_store.online_store}`` and ``${feature_store.redis_url}``)."""

    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379"


class InfercoreConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The root of a composed config."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    feature_store: FeatureStoreSettings = msgspec.field(default_factory=FeatureStoreSettings)
    #: Folder every model artifact path resolves inside (relative paths: to the recipes folder).
    model_root: str = "."
    description: str = ""
    batching: Node = msgspec.field(default_factory=lambda: {"kind": "none"})
    routing: Node = msgspec.field(default_factory=lambda: {"kind": "single"})
    features: Node = msgspec.field(default_factory=lambda: {"kind": "request"})
    models: dict[str, ModelConfig] = msgspec.field(default_factory=dict)
    #: The admin listener (off by default; ``infercore.config.rollout.AdminConfig``).
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
