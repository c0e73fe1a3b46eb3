"""OpenAPI documents of the inference bodies, which the handlers read as raw bytes.

The inference handlers decode their bodies themselves (msgspec, and the binary tensor
extension), so Litestar sees no ``data`` parameter and would document no request body. These
:class:`~litestar.openapi.spec.Operation` subclasses add the request and response schemas of the
Open Inference Protocol (V2) and of V1 ``:predict``, and the error body every non-2xx answer
carries, so the published schema is what a V2 client (or a fuzzer driven by the schema) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)

from infercore.components.tensors import V2_TO_NUMPY

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
            type=OpenAPIType.ARRAY,
            description="The tensor's values, flat in row-major order or nested as its shape "
            "(absent when the values travel in the binary extension).",
        ),
    },
)

V2_REQUEST = Schema(
    type=OpenAPIType.OBJECT,
    title="InferenceRequest",
    required=["inputs"],
    properties={
        "id": Schema(type=OpenAPIType.STRING),
        "parameters": _PARAMETERS,
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
        "inputs": _OBJECT,
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
    "400": "Invalid input: malformed JSON, a wrong name, shape or datatype (`invalid_input`).",
    "404": "Unknown model or version (`model_not_found`).",
    "413": "Body too large (`body_too_large`).",
    "415": "Unsupported content type (`unsupported_media_type`).",
    "500": "The model failed (`backend_error`, `internal`).",
    "503": "Queue full or timed out, model not ready, draining, feature store unavailable "
    "(with `Retry-After`).",
    "504": "The end-to-end deadline passed (`deadline_exceeded`).",
}


def _json(schema: Schema) -> dict[str, OpenAPIMediaType]:
    return {"application/json": OpenAPIMediaType(schema=schema)}


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
    responses = dict(operation.responses or {})
    responses["200"] = OpenAPIResponse(description="The model's answer.", content=_json(response))
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
