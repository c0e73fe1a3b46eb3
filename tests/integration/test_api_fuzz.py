"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis; RELIABILITY.md).

Every operation the schema lists is called with cases generated from it: bodies, path
parameters and content types that fit the schema (positive) and that break it (negative), for
any model name and for the served model and version. Whatever comes, the answer is never a
5xx; a case that breaks the schema is always a 4xx; and every inference error is the
documented `{"error", "reason"}` body. The generation is derandomized, so a failure
reproduces; hypothesis prints the failing case.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from infercore.server import create_app
from infercore.testing import app_client, fake_model_config, runtime_from_dict

EXAMPLES = 40


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    config = fake_model_config(batching={"kind": "dynamic", "max_batch_size": 8})
    with app_client(runtime_from_dict(config)) as c:
        yield c


# The schema the app serves at /schema/openapi.json, built without starting anything.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(
        runtime_from_dict(fake_model_config()), manage_runtime=False
    ).openapi_schema.to_schema()
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]

#: Path parameters that reach the served model (``m``, version ``1``) instead of a 404.
SERVED = {"model_name": "m", "version": "1", "target": "m:predict"}


def served_parameters(operation: Any) -> dict[str, str]:
    names = {p.name for p in operation.path_parameters}
    params = {k: v for k, v in SERVED.items() if k in names}
    if operation.path == "/v1/models/{model_name}/versions/{target}":
        params["target"] = "1:predict"
    return params


def send(client: Any, case: Any) -> Any:
    kwargs = case.as_transport_kwargs(base_url="http://testserver.local")
    body = kwargs.pop("data", None)
    if isinstance(body, bytes | str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["data"] = body
    kwargs.pop("cookies", None)
    return client.request(**kwargs)


def own_timeout(case: Any) -> bool:
    """Whether the case sets a timeout of its own (``X-Infercore-Timeout-Ms``, or a V2
    ``parameters.timeout`` over 0): a short one is then rightly answered 504
    ``deadline_exceeded``, as the schema documents, and that is no server fault."""
    if any(name.lower() == "x-infercore-timeout-ms" for name in case.headers or {}):
        return True
    body = case.body
    parameters = body.get("parameters") if isinstance(body, dict) else None
    return isinstance(parameters, dict) and parameters.get("timeout") not in (None, 0)


def breakable(operation: Any) -> bool:
    """Whether a negative case exists: a body (any string is a valid path parameter)."""
    return bool(len(operation.body))


CASES = [
    pytest.param(op, mode, served, id=f"{op.label}-{mode.value}{'-served' if served else ''}")
    for op in OPERATIONS
    for served in ([False, True] if op.path_parameters else [False])
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or breakable(op)
]


@pytest.mark.parametrize(("operation", "mode", "served"), CASES)
def test_no_generated_request_gets_a_5xx(
    client: Any, operation: Any, mode: GenerationMode, served: bool
) -> None:
    fixed = served_parameters(operation) if served else None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)
    seen: list[int] = []

    @settings(settings.get_profile("fuzz"), max_examples=EXAMPLES)
    @given(case=strategy)
    def check(case: Any) -> None:
        response = send(client, case)
        seen.append(response.status_code)
        timed_out = (
            response.status_code == 504
            and own_timeout(case)
            and response.json().get("reason") == "deadline_exceeded"
        )
        assert response.status_code < 500 or timed_out, response.text
        if mode is GenerationMode.NEGATIVE and case.meta and case.meta.generation.mode is mode:
            assert 400 <= response.status_code < 500, response.text
        if response.status_code >= 400 and operation.method.upper() == "POST":
            body = response.json()
            assert isinstance(body.get("error"), str) and isinstance(body.get("reason"), str)

    check()
    assert seen, "no case was sent"


CONFORMANCE = (status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.mark.parametrize(
    ("operation", "served"),
    [
        pytest.param(op, served, id=f"{op.label}{'-served' if served else ''}")
        for op in OPERATIONS
        for served in ([False, True] if op.path_parameters else [False])
    ],
)
def test_every_answer_is_what_the_schema_documents(
    client: Any, operation: Any, served: bool
) -> None:
    """The schema tells the truth: each answer's status code is one it lists for the
    operation, with a documented content type and a body its schema accepts (metadata 404s
    and 503s, readiness, /metrics as text, binary inference answers)."""
    fixed = served_parameters(operation) if served else None
    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=fixed)

    @settings(settings.get_profile("fuzz"), max_examples=15)
    @given(case=strategy)
    def check(case: Any) -> None:
        case.validate_response(send(client, case), checks=CONFORMANCE)

    check()
