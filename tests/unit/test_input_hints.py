"""The hint of a missing or unknown input names what the client may send.

Behind a feature source that builds the model's inputs from request fields (an entity key and a
few values), the model's input names are tensors the client cannot send: the hint names the
source's request fields (``FeatureSource.request_fields``). Without one, the model's inputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.builtins.features import RequestFeatureSource, RequestFeatureSourceConfig
from infercore.components import ComponentContext, FeatureSource, Tensors, TensorSpec
from infercore.components.model import Array
from infercore.errors import InvalidInput
from infercore.protocol import v1
from infercore.runtime.inputs import prepare_inputs

X = TensorSpec("x", "FP32", (-1, 2))
IDS = TensorSpec("ids", "INT64", (-1,))
CONTEXT = ComponentContext("features", Path("."))


def refused(
    tensors: dict[str, Array], request_fields: Any = None, specs: Sequence[TensorSpec] = (X,)
) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        prepare_inputs(
            list(specs), tensors, declared=None, max_rows=16, request_fields=request_fields
        )
    assert info.value.status_code == 400
    return info.value


def x(n: int = 1) -> Array:
    return np.zeros((n, 2), np.float32)


def fields(*names: str) -> Any:
    return lambda model_inputs: list(names)


def test_without_a_feature_source_the_hint_names_the_models_inputs() -> None:
    error = refused({"x": x(), "extra": x()})
    assert "unknown input 'extra'" in str(error)
    assert error.hint == "the model's inputs are: x"
    error = refused({"x": x()}, specs=[X, IDS])
    assert "missing input 'ids'" in str(error)
    assert error.hint == "the model's inputs are: x, ids"


def test_a_source_that_takes_the_models_inputs_keeps_that_hint() -> None:
    error = refused({"x": x(), "extra": x()}, request_fields=lambda names: list(names))
    assert error.hint == "the model's inputs are: x"
    # The same names in another order: still the model's inputs, not a list of "fields".
    error = refused({"x": x()}, specs=[X, IDS], request_fields=fields("ids", "x"))
    assert error.hint == "the model's inputs are: x, ids"


def test_behind_a_source_of_request_fields_the_unknown_inputs_hint_names_the_fields() -> None:
    error = refused({"x": x(), "amout": x()}, request_fields=fields("card_id", "amount"))
    assert "unknown input 'amout'" in str(error)
    assert error.hint == "the request's fields are: card_id, amount"


def test_behind_a_source_of_request_fields_the_missing_inputs_hint_names_the_fields() -> None:
    error = refused({"x": x()}, specs=[X, IDS], request_fields=fields("card_id", "amount"))
    assert "missing input 'ids'" in str(error)
    assert error.hint == "the request's fields are: card_id, amount"


def test_a_source_that_takes_both_forms_names_both() -> None:
    error = refused({"x": x(), "colour": x()}, request_fields=fields("x", "a", "b"))
    assert (
        error.hint
        == "the model's inputs are: x; or the fields the feature source builds them from: a, b"
    )


def test_the_fields_are_asked_for_only_when_a_request_is_refused() -> None:
    asked: list[Sequence[str]] = []

    def request_fields(names: Sequence[str]) -> list[str]:
        asked.append(names)
        return ["card_id"]

    prepare_inputs([X], {"x": x()}, declared=None, max_rows=16, request_fields=request_fields)
    assert asked == []
    refused({"x": x(), "y": x()}, request_fields=request_fields)
    assert asked == [["x"]]


def test_a_source_that_fails_to_list_its_fields_still_gives_a_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(names: Sequence[str]) -> list[str]:
        raise RuntimeError("plugin bug")

    error = refused({"x": x(), "y": x()}, request_fields=broken)
    assert "unknown input 'y'" in str(error)
    assert error.hint == "the model's inputs are: x"
    assert "plugin bug" in caplog.text


# --- what each source says it takes ----------------------------------------------------------


class _KeySource(FeatureSource):
    """A third-party source of the Feast shape: an entity key and one request value."""

    kind = "keyed"

    def request_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("card_id", "BYTES", (-1,)), TensorSpec("amount", "FP32", (-1,))]

    async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
        return dict(fields)


class _PassThrough(FeatureSource):
    kind = "pass"

    async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
        return dict(fields)


def test_the_default_request_fields_are_the_request_inputs_or_the_models_inputs() -> None:
    assert list(_KeySource(None, CONTEXT).request_fields(["x"])) == ["card_id", "amount"]
    assert list(_PassThrough(None, CONTEXT).request_fields(["x", "ids"])) == ["x", "ids"]


def test_the_request_source_names_the_models_inputs_and_the_fields_it_assembles() -> None:
    config = RequestFeatureSourceConfig(assemble={"x": ["a", "b"], "other": ["c"]})
    source = RequestFeatureSource(config, CONTEXT)
    # ``other`` is an input of another version: this one's hint leaves its field out.
    assert source.request_fields(["x", "ids"]) == ["x", "ids", "a", "b"]
    plain = RequestFeatureSource(RequestFeatureSourceConfig(), CONTEXT)
    assert plain.request_fields(["x"]) == ["x"]


def test_the_request_sources_hint_through_prepare_inputs() -> None:
    source = RequestFeatureSource(RequestFeatureSourceConfig(assemble={"x": ["a", "b"]}), CONTEXT)
    sent: dict[str, Array] = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    sent["c"] = np.zeros(1)
    tensors = asyncio.run(source.fetch(sent, deadline=1e9))
    error = refused(tensors, request_fields=source.request_fields)
    assert "unknown input 'c'" in str(error)
    assert (
        error.hint
        == "the model's inputs are: x; or the fields the feature source builds them from: a, b"
    )


# --- V1 values for a model of several inputs ------------------------------------------------


@pytest.mark.parametrize("body", [b'{"instances": [[1, 2]]}', b'{"inputs": [[1, 2]]}'])
def test_v1_values_for_several_inputs_point_at_the_names_a_request_carries(body: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        v1.decode(body, default_input=None, max_rows=16)
    assert "several inputs" in str(info.value)
    # Not "input name": behind a feature source the keys are its fields; the metadata lists them.
    assert "input name" not in str(info.value)
    assert info.value.hint is not None and "GET /v2/models/" in info.value.hint
