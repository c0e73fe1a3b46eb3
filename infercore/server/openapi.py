"""OpenAPI documents of the inference bodies, which the handlers read as raw bytes.

The inference handlers decode their bodies themselves (msgspec, and the binary tensor
extension), so Litestar sees no ``data`` parameter and would document no request body. These
:class:`~litestar.openapi.spec.Operation` subclasses add the request and response schemas of the
Open Inference Protocol (V2) and of V1 ``:predict``, and the error body every non-2xx answer
carries, so the published schema is what a V2 client (or a fuzzer driven by the schema) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.enums import ParamType
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
)

from infercore.components.tensors import V2_TO_NUMPY
from infercore.protocol.v2 import MAX_TIMEOUT_US

_OBJECT = Schema(type=OpenAPIType.OBJECT)
_PARAMETERS = Schema(
    type=OpenAPIType.OBJECT,
    description="Free-form parameters (`binary_data`, `binary_data_size`, ...).",
)

V2_TENSOR = Schema(
    type=OpenAPIType.OBJECT,
    required=["name", "shape", "datatype"],
    properties={
        "name": Schema(type=OpenAPIType.STRING),
        "shape": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.INTEGER, minimum=0)),
        "datatype": Schema(type=OpenAPIType.STRING, enum=list(V2_TO_NUMPY)),
        "parameters": _PARAMETERS,
        "data": Schema(
            description="The tensor's values, flat in row-major order or nested as its shape "
            "(a single value for a one-element tensor; absent when the values travel in the "
            "binary extension).",
        ),
    },
)

#: What the deadline covers and what passing it answers, for both ways of setting a timeout.
_DEADLINE = (
    "It may shorten the server's deadline (`server.request_timeout_ms`), never extend it; the "
    "deadline counts from the request's arrival and covers features, queue, inference and "
    "encoding: past it the answer is 504 `deadline_exceeded` (a request still queued then "
    "never runs)."
)

#: ``parameters.timeout`` (protocol/v2.py ``_timeout``).
V2_TIMEOUT = Schema(
    type=OpenAPIType.INTEGER,
    minimum=0,
    maximum=MAX_TIMEOUT_US,
    description="The request's own timeout in microseconds, as Triton's clients send it "
    "(the schedule-policy extension; tritonclient's `timeout=`): a JSON integer from 0 to "
    f"2**64-1; 0 means none. {_DEADLINE} With `X-Infercore-Timeout-Ms` too, the earlier "
    "deadline wins. Anything else (a fraction such as `1.5` or `1e3`, a string, a negative "
    "number) is a 400 `invalid_input`.",
    examples=[100000],
)

#: ``X-Infercore-Timeout-Ms`` (server/app.py ``_client_timeout``), on every inference call.
TIMEOUT_HEADER = Parameter(
    name="X-Infercore-Timeout-Ms",
    param_in=ParamType.HEADER,
    required=False,
    schema=Schema(
        type=OpenAPIType.NUMBER, exclusive_minimum=0, exclusive_maximum=1e9, examples=[250]
    ),
    description="The request's own timeout in milliseconds: a number over 0 and under 1e9 "
    f"(a fraction such as `12.5` is allowed). {_DEADLINE} It bounds reading the body too: a "
    "body that has not arrived by then is answered 408 `request_timeout`. Any other value "
    "(0, a negative number, text) is a 400 `invalid_input`.",
)

_V2_REQUEST_PARAMETERS = Schema(
    type=OpenAPIType.OBJECT,
    description="Free-form parameters (`binary_data_output`, ...), and the request's own "
    "`timeout`.",
    properties={"timeout": V2_TIMEOUT},
)

V2_REQUEST = Schema(
    type=OpenAPIType.OBJECT,
    title="InferenceRequest",
    required=["inputs"],
    properties={
        "id": Schema(type=OpenAPIType.STRING),
        "parameters": _V2_REQUEST_PARAMETERS,
        "inputs": Schema(type=OpenAPIType.ARRAY, items=V2_TENSOR, min_items=1),
        "outputs": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(
                type=OpenAPIType.OBJECT,
                required=["name"],
                properties={"name": Schema(type=OpenAPIType.STRING), "parameters": _PARAMETERS},
            ),
        ),
    },
)

V2_RESPONSE = Schema(
    type=OpenAPIType.OBJECT,
    title="InferenceResponse",
    required=["model_name", "outputs"],
    properties={
        "model_name": Schema(type=OpenAPIType.STRING),
        "model_version": Schema(type=OpenAPIType.STRING),
        "id": Schema(type=OpenAPIType.STRING),
        "outputs": Schema(type=OpenAPIType.ARRAY, items=V2_TENSOR),
    },
)

V1_REQUEST = Schema(
    type=OpenAPIType.OBJECT,
    title="PredictRequest",
    description="`instances`: one entry per row (values for the model's only input, or objects "
    "of named fields); or `inputs`: one list per named field (columns).",
    properties={
        "instances": Schema(type=OpenAPIType.ARRAY, min_items=1),
        "inputs": Schema(
            description="Columns by field name (an object of lists), or the values of the "
            "model's only input (a list or a single value)."
        ),
    },
)

V1_RESPONSE = Schema(
    type=OpenAPIType.OBJECT,
    title="PredictResponse",
    required=["predictions"],
    properties={"predictions": Schema(type=OpenAPIType.ARRAY)},
)

ERROR = Schema(
    type=OpenAPIType.OBJECT,
    title="Error",
    required=["error", "reason"],
    properties={
        "error": Schema(type=OpenAPIType.STRING, description="What was wrong, and the fix."),
        "reason": Schema(
            type=OpenAPIType.STRING,
            description="Machine-readable: invalid_input, model_not_found, queue_full, ...",
        ),
    },
)

#: The error answers of an inference call (DESIGN.md: Status codes).
_ERRORS = {
    "400": "Invalid input: malformed JSON, a wrong name, shape or datatype, NaN or an infinity "
    "sent binary to a model that does not take them (`invalid_input`); a response over "
    "`server.max_output_bytes` (`output_too_large`).",
    "404": "Unknown model or version (`model_not_found`).",
    "408": "The body did not arrive within the deadline (`request_timeout`; the connection "
    "closes).",
    "413": "Body too large (`body_too_large`).",
    "415": "Unsupported content type (`unsupported_media_type`).",
    "500": "The model failed (`backend_error`, `internal`).",
    "503": "Queue full or timed out, model not ready, draining, feature store unavailable "
    "(with `Retry-After`).",
    "504": "The end-to-end deadline passed (`deadline_exceeded`).",
}


def _json(schema: Schema) -> dict[str, OpenAPIMediaType]:
    return {"application/json": OpenAPIMediaType(schema=schema)}


_BINARY_RESPONSE = OpenAPIMediaType(
    schema=Schema(
        type=OpenAPIType.STRING,
        format="binary",  # type: ignore[arg-type]
        description="With `binary_data_output` (or an output's `binary_data`): a JSON header "
        "of `Inference-Header-Content-Length` bytes, then the outputs' raw bytes.",
    )
)

_TENSOR_METADATA = Schema(
    type=OpenAPIType.OBJECT,
    required=["name", "datatype", "shape"],
    properties={
        "name": Schema(type=OpenAPIType.STRING),
        "datatype": Schema(type=OpenAPIType.STRING, enum=list(V2_TO_NUMPY)),
        "shape": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.INTEGER),
            description="-1 marks a variable dimension.",
        ),
    },
)

MODEL_METADATA = Schema(
    type=OpenAPIType.OBJECT,
    title="ModelMetadata",
    required=["name", "versions", "platform", "inputs", "outputs"],
    properties={
        "name": Schema(type=OpenAPIType.STRING),
        "versions": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING)),
        "platform": Schema(type=OpenAPIType.STRING),
        "inputs": Schema(
            type=OpenAPIType.ARRAY,
            items=_TENSOR_METADATA,
            description="What a request carries (behind a feature store: the fields it takes).",
        ),
        "outputs": Schema(type=OpenAPIType.ARRAY, items=_TENSOR_METADATA),
    },
)

#: A not-ready answer of metadata and readiness: the error body plus what is known.
NOT_READY = Schema(
    type=OpenAPIType.OBJECT,
    title="NotReady",
    required=["error", "reason"],
    properties={
        **(ERROR.properties or {}),
        "name": Schema(type=OpenAPIType.STRING),
        "ready": Schema(type=OpenAPIType.BOOLEAN),
        "state": Schema(type=OpenAPIType.STRING, description="loading, failed, unloaded, ..."),
    },
)

_READY = Schema(
    type=OpenAPIType.OBJECT,
    required=["ready"],
    properties={"name": Schema(type=OpenAPIType.STRING), "ready": Schema(type=OpenAPIType.BOOLEAN)},
)


def _answers(operation: Operation, **responses: OpenAPIResponse) -> None:
    """Replace the operation's documented answers (Litestar's own list a 400 body it never
    sends for these routes) with ``responses``, keyed by status code (``_404`` → 404)."""
    operation.responses = {code.lstrip("_"): r for code, r in responses.items()}


def _error(text: str, schema: Schema = ERROR) -> OpenAPIResponse:
    return OpenAPIResponse(description=text, content=_json(schema))


_NOT_FOUND = _error("Unknown model or version (`model_not_found`).")


@dataclass
class ModelMetadataOperation(Operation):
    """``GET /v2/models/{model}[/versions/{v}]``: V2 model metadata."""

    def __post_init__(self) -> None:
        _answers(
            self,
            _200=OpenAPIResponse(
                description="The model's metadata.", content=_json(MODEL_METADATA)
            ),
            _404=_NOT_FOUND,
            _503=_error("The version is not ready (`model_not_ready`, `Retry-After`).", NOT_READY),
        )


@dataclass
class ModelReadyOperation(Operation):
    """``GET /v2/models/{model}[/versions/{v}]/ready``."""

    def __post_init__(self) -> None:
        _answers(
            self,
            _200=OpenAPIResponse(description="Ready.", content=_json(_READY)),
            _404=_NOT_FOUND,
            _503=_error("Not ready (`model_not_ready`, `Retry-After`).", NOT_READY),
        )


@dataclass
class ServerReadyOperation(Operation):
    """``GET /v2/health/ready``."""

    def __post_init__(self) -> None:
        _answers(
            self,
            _200=OpenAPIResponse(description="Ready.", content=_json(_READY)),
            _503=_error(
                "Not ready: models loading or failed (`model_not_ready`), or draining "
                "(`shutting_down`); with `Retry-After`.",
                NOT_READY,
            ),
        )


@dataclass
class LiveOperation(Operation):
    """``GET /v2/health/live``."""

    def __post_init__(self) -> None:
        live = Schema(
            type=OpenAPIType.OBJECT,
            required=["live"],
            properties={"live": Schema(type=OpenAPIType.BOOLEAN)},
        )
        _answers(self, _200=OpenAPIResponse(description="Alive.", content=_json(live)))


@dataclass
class V1StatusOperation(Operation):
    """``GET /v1/models/{model}``: TensorFlow Serving's model status."""

    def __post_init__(self) -> None:
        responses = dict(self.responses or {})
        responses.pop("400", None)  # Litestar's own: this route never sends it
        responses["404"] = _NOT_FOUND
        self.responses = responses


@dataclass
class MetricsOperation(Operation):
    """``GET /metrics``: the Prometheus text format."""

    def __post_init__(self) -> None:
        text = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
        _answers(
            self,
            _200=OpenAPIResponse(
                description="Prometheus text exposition format 0.0.4 / 1.0.0.",
                content={"text/plain": text},
            ),
        )


def _document(operation: Operation, request: Schema, response: Schema, binary: bool) -> None:
    content = _json(request)
    if binary:
        content["application/octet-stream"] = OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.STRING,
                format="binary",  # type: ignore[arg-type]
                description="The binary tensor extension: a JSON header of "
                "`Inference-Header-Content-Length` bytes, then the tensors' raw bytes.",
            )
        )
    operation.request_body = RequestBody(content=content, required=True)
    parameters = [
        p
        for p in operation.parameters or []
        if not (isinstance(p, Parameter) and p.name == TIMEOUT_HEADER.name)
    ]
    operation.parameters = [*parameters, TIMEOUT_HEADER]
    responses = dict(operation.responses or {})
    ok = _json(response)
    if binary:
        ok["application/octet-stream"] = _BINARY_RESPONSE
    responses["200"] = OpenAPIResponse(description="The model's answer.", content=ok)
    for code, text in _ERRORS.items():
        responses[code] = OpenAPIResponse(description=text, content=_json(ERROR))
    operation.responses = responses


@dataclass
class V2InferOperation(Operation):
    """``POST /v2/models/{model}[/versions/{v}]/infer``: InferenceRequest → InferenceResponse."""

    def __post_init__(self) -> None:
        _document(self, V2_REQUEST, V2_RESPONSE, binary=True)


@dataclass
class V1PredictOperation(Operation):
    """``POST /v1/models/{model}:predict``: instances (or inputs) → predictions."""

    def __post_init__(self) -> None:
        _document(self, V1_REQUEST, V1_RESPONSE, binary=False)
