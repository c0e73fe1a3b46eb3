"""The V1 (``instances`` -> ``predictions``) codec."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.errors import InvalidInput
from infercore.protocol import v1


def dec(doc: Any, *, default_input: str | None = "x", max_rows: int = 100) -> dict[str, Any]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return v1.decode(raw, default_input=default_input, max_rows=max_rows)


def bad(doc: Any, *needles: str, default_input: str | None = "x", max_rows: int = 100) -> str:
    with pytest.raises(InvalidInput) as info:
        dec(doc, default_input=default_input, max_rows=max_rows)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def strict_json(raw: bytes) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(token)

    return json.loads(raw, parse_constant=refuse)


# ------------------------------------------------------------------------------ decoding


def test_instances_as_lists_for_a_single_input_model() -> None:
    cols = dec({"instances": [[1.5, 2], [3, 4]]})
    assert list(cols) == ["x"]
    assert cols["x"].shape == (2, 2)
    assert cols["x"].tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_instances_as_scalars() -> None:
    cols = dec({"instances": [1, 2, 3]})
    assert cols["x"].tolist() == [1, 2, 3]
    assert cols["x"].dtype.kind == "i"


def test_instances_of_strings_and_booleans() -> None:
    assert dec({"instances": ["a", "bc"]})["x"].tolist() == ["a", "bc"]
    flags = dec({"instances": [True, False]})["x"]
    assert flags.dtype == np.bool_ and flags.tolist() == [True, False]


def test_values_for_a_model_with_several_inputs_are_refused() -> None:
    bad({"instances": [[1, 2]]}, "several inputs", default_input=None)
    bad({"inputs": [[1, 2]]}, "several inputs", default_input=None)


def test_instances_as_objects_become_columns() -> None:
    cols = dec(
        {
            "instances": [
                {"amount": 12.5, "merchant": "m1", "hist": [1, 2]},
                {"merchant": "m2", "amount": 3, "hist": [3, 4]},
            ]
        },
        default_input=None,
    )
    assert set(cols) == {"amount", "merchant", "hist"}
    assert cols["amount"].tolist() == [12.5, 3.0]
    assert cols["merchant"].tolist() == ["m1", "m2"]
    assert cols["hist"].shape == (2, 2) and cols["hist"].tolist() == [[1, 2], [3, 4]]


def test_columnar_inputs() -> None:
    cols = dec({"inputs": {"a": [1, 2], "b": ["u", "v"]}}, default_input=None)
    assert cols["a"].tolist() == [1, 2] and cols["b"].tolist() == ["u", "v"]
    assert dec({"inputs": [[1, 2], [3, 4]]})["x"].shape == (2, 2)
    assert dec({"inputs": 7})["x"].tolist() == [7]
    assert dec({"inputs": {"a": 7}}, default_input=None)["a"].tolist() == [7]


def test_mixed_objects_and_values() -> None:
    bad({"instances": [{"x": 1}, 2]}, "mixes")
    bad({"instances": [2, {"x": 1}]}, "mixes")


def test_empty_instances() -> None:
    bad({"instances": []}, "empty")


@pytest.mark.parametrize("doc", [[1, 2], "x", 3, None, {"instance": [1]}, {}])
def test_body_shape_errors(doc: Any) -> None:
    bad(doc)


@pytest.mark.parametrize("instances", ["abc", {"x": 1}, 5, None])
def test_instances_not_a_list(instances: Any) -> None:
    bad({"instances": instances}, "instances")


@pytest.mark.parametrize("raw", [b"{", b"", b"instances", b'{"instances": [1,]}'])
def test_malformed_json(raw: bytes) -> None:
    bad(raw, "malformed JSON")


def test_too_many_instances() -> None:
    assert dec({"instances": [1] * 5}, max_rows=5)["x"].shape == (5,)
    message = bad({"instances": [1] * 6}, max_rows=5)
    assert "6" in message and "5" in message


def test_objects_with_differing_keys() -> None:
    message = bad({"instances": [{"a": 1, "b": 2}, {"a": 1, "c": 2}]}, "instances[1]")
    assert "b" in message and "c" in message
    bad({"instances": [{"a": 1, "b": 2}, {"a": 1}]}, "instances[1]", "b")
    bad({"instances": [{"a": 1}, {"a": 2}, {"a": 3, "z": 0}]}, "instances[2]", "z")


def test_objects_with_same_keys_in_another_order() -> None:
    cols = dec({"instances": [{"a": 1, "b": 2}, {"b": 4, "a": 3}]}, default_input=None)
    assert cols["a"].tolist() == [1, 3] and cols["b"].tolist() == [2, 4]


@pytest.mark.parametrize(
    "instances",
    [
        [{"a": None}],
        [{"a": 1}, {"a": None}],
        [1, None],
        [None, 1],
        [[1, None]],
    ],
)
def test_null_values(instances: list[Any]) -> None:
    message = bad({"instances": instances})
    assert "null" in message


@pytest.mark.parametrize(
    "values",
    [
        [1, "a"],
        ["a", 1],
        [1, True],
        [True, 1],
        [1.5, False],
        ["a", True],
        [{"k": 1}, 1],
        [[1, 2], 3],
        [1, [2]],
    ],
)
def test_a_field_must_hold_one_kind_of_value(values: list[Any]) -> None:
    bad({"instances": [{"f": v} for v in values]}, "'f'")
    # As plain instances, an object among values is refused by the mixing rule instead.
    bad({"instances": values}, "mixes" if isinstance(values[0], dict) else "'x'")


def test_values_of_different_shapes() -> None:
    bad({"instances": [[1, 2], [3]]}, "'x'", "ragged")
    bad({"instances": [{"f": [1, 2]}, {"f": [1, 2, 3]}]}, "'f'", "ragged")


def test_integers_stay_exact() -> None:
    assert dec({"instances": [0, 2**64 - 1]})["x"].tolist() == [0, 2**64 - 1]
    assert dec({"instances": [1, 2**63 + 1]})["x"].tolist() == [1, 2**63 + 1]
    assert dec({"instances": [-(2**63), 2**63 - 1]})["x"].tolist() == [-(2**63), 2**63 - 1]


@pytest.mark.parametrize("values", [[2**64], [-1, 2**63], [-(2**63) - 1]])
def test_integers_beyond_64_bits_are_refused(values: list[int]) -> None:
    bad({"instances": values}, "'x'", "range")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(-(2**63), 2**63 - 1), min_size=3, max_size=3), min_size=1, max_size=5
    )
)
def test_property_integer_instances_round_trip(rows: list[list[int]]) -> None:
    cols = dec({"instances": rows})
    assert cols["x"].tolist() == rows
    assert strict_json(v1.encode(cols, len(rows))) == {"predictions": rows}


# ------------------------------------------------------------------------------ encoding


def test_predictions_for_one_output_are_a_list() -> None:
    raw = v1.encode({"y": np.array([1.5, 2.5], np.float32)}, 2)
    assert strict_json(raw) == {"predictions": [1.5, 2.5]}
    raw = v1.encode({"y": np.arange(4, dtype=np.int64).reshape(2, 2)}, 2)
    assert strict_json(raw) == {"predictions": [[0, 1], [2, 3]]}


def test_predictions_for_several_outputs_are_objects() -> None:
    outputs = {
        "label": np.array([1, 0], np.int64),
        "proba": np.array([[0.25, 0.75], [0.5, 0.5]], np.float32),
        "ok": np.array([True, False]),
    }
    assert strict_json(v1.encode(outputs, 2)) == {
        "predictions": [
            {"label": 1, "proba": [0.25, 0.75], "ok": True},
            {"label": 0, "proba": [0.5, 0.5], "ok": False},
        ]
    }


def test_bytes_outputs_are_strings() -> None:
    words = np.array([b"cat", "d\u00f6g".encode()], dtype=object)
    assert strict_json(v1.encode({"w": words}, 2)) == {"predictions": ["cat", "d\u00f6g"]}
    both = {"w": words, "n": np.array([1, 2], np.int32)}
    assert strict_json(v1.encode(both, 2)) == {
        "predictions": [{"w": "cat", "n": 1}, {"w": "d\u00f6g", "n": 2}]
    }


def test_nested_bytes_outputs_keep_their_shape() -> None:
    tags = np.empty((2, 2, 2), dtype=object)
    tags[:] = [[[b"a", b"b"], [b"c", b"d"]], [[b"e", b"f"], [b"g", b"h"]]]
    expected = [[["a", "b"], ["c", "d"]], [["e", "f"], ["g", "h"]]]
    assert strict_json(v1.encode({"t": tags}, 2)) == {"predictions": expected}
    raw = v1.encode({"t": tags, "n": np.array([0, 1])}, 2)
    assert strict_json(raw) == {
        "predictions": [{"t": expected[0], "n": 0}, {"t": expected[1], "n": 1}]
    }


def test_nan_and_inf_predictions_are_null() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 0.5], np.float32)
    assert strict_json(v1.encode({"y": y}, 4)) == {"predictions": [None, None, None, 0.5]}
    raw = v1.encode({"y": y, "z": np.array([[np.nan], [1], [2], [3]])}, 4)
    assert strict_json(raw)["predictions"][0] == {"y": None, "z": [None]}


def test_strings_keep_trailing_nul_characters() -> None:
    assert dec({"instances": ["a\x00", "\x00"]})["x"].tolist() == ["a\x00", "\x00"]
    cols = dec({"instances": [{"s": "b\x00"}, {"s": ""}]}, default_input=None)
    assert cols["s"].tolist() == ["b\x00", ""]


def test_ragged_strings() -> None:
    bad({"instances": [["a"], ["b", "c"]]}, "'x'", "ragged")


def test_an_overflowing_number_is_a_400_naming_its_field() -> None:
    from infercore.errors import InvalidInput
    from infercore.protocol import v1, v2

    with pytest.raises(InvalidInput, match=r"instances\[1\]\.amount: number out of range"):
        v1.decode(
            b'{"instances":[{"amount":1.0},{"amount":1e999}]}', default_input=None, max_rows=10
        )
    body = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP64","data":[-1e999]}]}'
    with pytest.raises(InvalidInput, match=r"(?i)out of range.*inputs\[0\]\.data\[0\]"):
        v2.decode(body, None, max_elements=100)
