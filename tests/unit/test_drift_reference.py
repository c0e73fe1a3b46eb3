"""Tensors -> columns, and reference samples (parquet, npz, csv) under the model root."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infercore.drift.columns import concat_columns, expand_names, to_columns
from infercore.drift.reference import load_reference, select_columns
from infercore.errors import ConfigError, ModelLoadError


def test_to_columns_shapes_and_types() -> None:
    cols = to_columns(
        {
            "amount": np.array([[1.5], [2.5]], dtype=np.float32),
            "input": np.arange(6, dtype=np.int64).reshape(2, 3),
            "cube": np.zeros((2, 2, 2), dtype=np.float16),
            "channel": np.array([[b"pos"], [b"\xff"]], dtype=object),
            "flag": np.array([True, False]),
            "label": np.array(["a", "b"]),
        }
    )
    assert list(cols) == [
        "amount",
        "input[0]",
        "input[1]",
        "input[2]",
        *[f"cube[{i}]" for i in range(4)],
        "channel",
        "flag",
        "label",
    ]
    assert cols["amount"].dtype == np.float64 and cols["amount"].tolist() == [1.5, 2.5]
    assert cols["input[1]"].tolist() == [1.0, 4.0]
    assert cols["channel"].dtype == object and cols["channel"].tolist() == ["pos", "\ufffd"]
    assert cols["flag"].tolist() == [1.0, 0.0]
    assert cols["label"].dtype == object and cols["label"].tolist() == ["a", "b"]
    assert list(to_columns({"a": np.zeros(2), "b": np.zeros(2)}, names={"b"})) == ["b"]


def test_to_columns_refuses_scalars_and_ragged_rows() -> None:
    with pytest.raises(ValueError, match="scalar"):
        to_columns({"x": np.float32(1.0)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="rows"):
        to_columns({"x": np.zeros(2), "y": np.zeros(3)})


def test_concat_keeps_common_columns_and_mixed_types() -> None:
    a = {"x": np.array([1.0]), "c": np.array(["p"], dtype=object), "only_a": np.zeros(1)}
    b = {"x": np.array([2.0]), "c": np.array([3.0])}
    out = concat_columns([a, b])
    assert list(out) == ["x", "c"]
    assert out["x"].tolist() == [1.0, 2.0]
    assert out["c"].tolist() == ["p", "3.0"]
    assert concat_columns([]) == {}


def test_expand_names() -> None:
    available = ["amount", "input[0]", "input[1]", "inputs"]
    assert expand_names(["input", "amount", "nope"], available) == [
        "input[0]",
        "input[1]",
        "amount",
        "nope",
    ]


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "amount": np.array([1.5, 2.5, np.nan], dtype=np.float32),
            "count": pd.array([1, None, 3], dtype="Int64"),
            "flag": [True, False, True],
            "channel": ["pos", "online", None],
            "cat": pd.Categorical(["a", "b", "a"]),
            "when": pd.to_datetime(["2026-01-01"] * 3),
        }
    )


def test_parquet(tmp_path: Path, frame: pd.DataFrame) -> None:
    frame.to_parquet(tmp_path / "ref.parquet")
    cols = load_reference(tmp_path, "ref.parquet", sha256=None, config_path="d.reference")
    assert list(cols) == ["amount", "count", "flag", "channel", "cat"]  # timestamps left out
    assert np.isnan(cols["amount"][2]) and np.isnan(cols["count"][1])
    assert cols["flag"].tolist() == [1.0, 0.0, 1.0]
    assert cols["channel"].tolist() == ["pos", "online", ""]
    assert cols["cat"].tolist() == ["a", "b", "a"]


def test_npz_and_csv(tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", input=np.arange(6.0).reshape(3, 2), c=np.array(["x", "y", "x"]))
    cols = load_reference(tmp_path, "ref.npz", sha256=None, config_path="d.reference")
    assert list(cols) == ["input[0]", "input[1]", "c"]
    assert cols["c"].dtype == object
    (tmp_path / "ref.csv").write_text("a,b,c\n1,x,\n2.5,y,3\n,z,4\n")
    cols = load_reference(tmp_path, "ref.csv", sha256=None, config_path="d.reference")
    assert cols["a"].tolist()[:2] == [1.0, 2.5] and np.isnan(cols["a"][2])
    assert cols["b"].tolist() == ["x", "y", "z"]
    assert np.isnan(cols["c"][0]) and cols["c"].tolist()[1:] == [3.0, 4.0]


def test_digest_path_and_format_checks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ref.csv").write_text("a\n1\n2\n")
    digest = hashlib.sha256(b"a\n1\n2\n").hexdigest()
    assert list(load_reference(root, "ref.csv", sha256=digest, config_path="d.reference")) == ["a"]
    with pytest.raises(ModelLoadError, match=r"d\.reference\.sha256: mismatch"):
        load_reference(root, "ref.csv", sha256="0" * 64, config_path="d.reference")
    (tmp_path / "out.csv").write_text("a\n1\n2\n")
    with pytest.raises(ConfigError, match="outside the model root"):
        load_reference(root, "../out.csv", sha256=None, config_path="d.reference")
    (root / "link.csv").symlink_to(tmp_path / "out.csv")
    with pytest.raises(ConfigError, match="outside the model root"):
        load_reference(root, "link.csv", sha256=None, config_path="d.reference")
    with pytest.raises(ConfigError, match="unknown format"):
        load_reference(root, "ref.pkl", sha256=None, config_path="d.reference")
    (root / "one.csv").write_text("a\n1\n")
    with pytest.raises(ModelLoadError, match="at least 2 rows"):
        load_reference(root, "one.csv", sha256=None, config_path="d.reference")
    (root / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ModelLoadError, match="could not be read as parquet"):
        load_reference(root, "bad.parquet", sha256=None, config_path="d.reference")
    np.savez(root / "obj.npz", x=np.array([object(), None], dtype=object))
    with pytest.raises(ModelLoadError, match="could not be read as npz"):
        load_reference(root, "obj.npz", sha256=None, config_path="d.reference")


def test_select_columns() -> None:
    ref = {
        "a": np.zeros(2),
        "b": np.array(["x", "y"], dtype=object),
        "v[0]": np.zeros(2),
        "v[1]": np.zeros(2),
    }
    assert select_columns(ref, None, config_path="f", numeric=True) == ["a", "v[0]", "v[1]"]
    assert select_columns(ref, None, config_path="f", numeric=False) == ["b"]
    assert select_columns(ref, ["v", "b"], config_path="f") == ["v[0]", "v[1]", "b"]
    with pytest.raises(ConfigError, match="'zz' not in the reference"):
        select_columns(ref, ["zz"], config_path="f")
    with pytest.raises(ConfigError, match="'b' is categorical"):
        select_columns(ref, ["b"], config_path="f", numeric=True)
    with pytest.raises(ConfigError, match="named twice"):
        select_columns(ref, ["a", "a"], config_path="f")
    with pytest.raises(ConfigError, match="no categorical columns"):
        select_columns({"a": np.zeros(2)}, None, config_path="f", numeric=False)
