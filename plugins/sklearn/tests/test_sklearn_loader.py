"""The ``sklearn`` model loader: formats, trust rules (RELIABILITY S2, S3), signature, predict."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import operator
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import joblib
import msgspec
import numpy as np
import pytest
import skops.io as sio
from sklearn.cluster import KMeans
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Perceptron
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import infercore_sklearn
from infercore.components import ComponentContext, TensorSpec
from infercore.errors import BackendError, ConfigError, InvalidInput, ModelLoadError, ModelNotReady
from infercore.testing import ClientFactory
from infercore_sklearn import SklearnModel, register_model_loaders

CONFIG_PATH = "models.iris.versions.1.loader"
NAMES = np.array(["setosa", "versicolor", "virginica"])


class MarkerPayload:
    """Unpickling this creates a directory: proof that the bytes were deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_iris(return_X_y=True)
    return x, y


@pytest.fixture(scope="module")
def classifier(iris: tuple[np.ndarray, np.ndarray]) -> LogisticRegression:
    x, y = iris
    return LogisticRegression(max_iter=1000).fit(x, y)


@pytest.fixture(scope="module")
def string_classifier(iris: tuple[np.ndarray, np.ndarray]) -> Any:
    x, y = iris
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(x, NAMES[y])


@pytest.fixture(scope="module")
def regressor(iris: tuple[np.ndarray, np.ndarray]) -> LinearRegression:
    x, _ = iris
    return LinearRegression().fit(x[:, :3], x[:, 3])


def make_model(root: Path, **options: Any) -> SklearnModel:
    """Validate options the way the registry does, then construct the model."""
    config = msgspec.convert(options, SklearnModel.Config, strict=False)
    context = ComponentContext(CONFIG_PATH, root, model_name="iris", version="1")
    return SklearnModel(config, context)


def started(root: Path, **options: Any) -> SklearnModel:
    model = make_model(root, **options)
    asyncio.run(model.start())
    return model


def predict(model: SklearnModel, x: np.ndarray) -> dict[str, np.ndarray]:
    return asyncio.run(model.predict({"input": x}))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump(obj: Any, path: Path) -> Path:
    if path.suffix == ".skops":
        sio.dump(obj, path)
    elif path.suffix == ".joblib":
        joblib.dump(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


# --- plugin registration -------------------------------------------------------------------


def test_hook_registers_the_sklearn_kind() -> None:
    assert register_model_loaders() == [SklearnModel]
    assert SklearnModel.kind == "sklearn"
    assert SklearnModel.platform == "sklearn"


def test_entry_point_is_found_by_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "sklearn")
    pm, infos = make_plugin_manager()
    registry = Registry(pm)
    assert registry.kinds("model_loader")["sklearn"].cls is SklearnModel
    assert infos["sklearn"].license == "Apache-2.0"
    context = ComponentContext(CONFIG_PATH, Path("."))
    with pytest.raises(ConfigError, match="pth"):
        registry.build("model_loader", {"kind": "sklearn", "pth": "m.skops"}, context)
    with pytest.raises(ConfigError, match="sha256"):
        registry.build(
            "model_loader", {"kind": "sklearn", "path": "m.skops", "sha256": "abc"}, context
        )


def test_importing_the_plugin_does_not_import_sklearn_or_skops() -> None:
    code = (
        "import sys, infercore_sklearn; "
        "print(sorted(m for m in ('sklearn', 'skops', 'joblib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- skops -----------------------------------------------------------------------------------


def test_skops_classifier_predicts_like_sklearn(
    tmp_path: Path, classifier: LogisticRegression, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = started(tmp_path, path="model.skops")
    asyncio.run(model.warmup())
    x, _ = iris
    out = predict(model, x)
    assert set(out) == {"label", "probabilities"}
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], classifier.predict(x))
    assert out["probabilities"].dtype == np.float64
    np.testing.assert_allclose(out["probabilities"], classifier.predict_proba(x), rtol=0, atol=0)


def test_classifier_signature(tmp_path: Path, classifier: LogisticRegression) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = started(tmp_path, path="model.skops")
    assert model.inputs == [TensorSpec("input", "FP64", (-1, 4))]
    assert model.outputs == [
        TensorSpec("label", "INT64", (-1,)),
        TensorSpec("probabilities", "FP64", (-1, 3)),
    ]
    assert model.batchable


def test_fp32_input_and_label_only(
    tmp_path: Path, classifier: LogisticRegression, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = started(tmp_path, path="model.skops", input_dtype="FP32", outputs=["label"])
    assert model.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert model.outputs == [TensorSpec("label", "INT64", (-1,))]
    x = iris[0].astype(np.float32)
    out = predict(model, x)
    assert list(out) == ["label"]
    np.testing.assert_array_equal(out["label"], classifier.predict(x))


def test_string_classes_are_bytes_of_str(
    tmp_path: Path, string_classifier: Any, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    dump(string_classifier, tmp_path / "names.skops")
    model = started(tmp_path, path="names.skops")
    assert model.outputs[0] == TensorSpec("label", "BYTES", (-1,))
    x = iris[0][::10]
    labels = predict(model, x)["label"]
    assert labels.dtype == object
    assert all(type(v) is str for v in labels)
    assert labels.tolist() == string_classifier.predict(x).tolist()


def test_regressor_has_one_prediction_output(
    tmp_path: Path, regressor: LinearRegression, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    dump(regressor, tmp_path / "reg.skops")
    model = started(tmp_path, path="reg.skops")
    assert model.inputs == [TensorSpec("input", "FP64", (-1, 3))]
    assert model.outputs == [TensorSpec("prediction", "FP64", (-1,))]
    x = iris[0][:, :3]
    np.testing.assert_array_equal(predict(model, x)["prediction"], regressor.predict(x))


def test_multi_output_regressor(tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]) -> None:
    x = iris[0]
    reg = LinearRegression().fit(x[:, :2], x[:, 2:])
    dump(reg, tmp_path / "multi.skops")
    model = started(tmp_path, path="multi.skops")
    assert model.outputs == [TensorSpec("prediction", "FP64", (-1, 2))]
    np.testing.assert_array_equal(predict(model, x[:5, :2])["prediction"], reg.predict(x[:5, :2]))


def test_outputs_that_do_not_fit_the_model_are_config_errors(
    tmp_path: Path, regressor: LinearRegression, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    dump(regressor, tmp_path / "reg.skops")
    with pytest.raises(ConfigError, match=rf"^{CONFIG_PATH}\.outputs: only classifiers"):
        started(tmp_path, path="reg.skops", outputs=["label"])
    dump(Perceptron().fit(*iris), tmp_path / "perceptron.skops")
    with pytest.raises(ConfigError, match="has no predict_proba"):
        started(tmp_path, path="perceptron.skops", outputs=["label", "probabilities"])
    perceptron = started(tmp_path, path="perceptron.skops")
    assert [s.name for s in perceptron.outputs] == ["label"]
    with pytest.raises(ConfigError, match="names an output twice"):
        make_model(tmp_path, path="reg.skops", outputs=["label", "label"])


def test_untrusted_skops_type_is_refused_with_the_types_listed(
    tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    custom = make_pipeline(FunctionTransformer(operator.neg), LogisticRegression(max_iter=1000))
    custom.fit(*iris)
    dump(custom, tmp_path / "custom.skops")
    with pytest.raises(ModelLoadError) as info:
        started(tmp_path, path="custom.skops")
    text = str(info.value)
    assert text.startswith(f"{CONFIG_PATH}.trusted_types: ")
    assert "_operator.neg" in text
    assert "add them to `trusted_types`" in text
    model = started(tmp_path, path="custom.skops", trusted_types=["_operator.neg"])
    np.testing.assert_array_equal(predict(model, iris[0])["label"], custom.predict(iris[0]))


def test_skops_sha256_is_verified_when_given(
    tmp_path: Path, classifier: LogisticRegression
) -> None:
    path = dump(classifier, tmp_path / "model.skops")
    started(tmp_path, path="model.skops", sha256=digest(path))
    with pytest.raises(ModelLoadError, match="sha256: mismatch"):
        started(tmp_path, path="model.skops", sha256="0" * 64)


# --- pickle and joblib: trust rules ----------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pkl", "model.pickle", "model.joblib"])
def test_code_executing_formats_need_trusted(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{CONFIG_PATH}\.trusted: refusing to load"):
        make_model(tmp_path, path=name)


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib"])
def test_code_executing_formats_need_a_pinned_sha256(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{CONFIG_PATH}\.sha256: a trusted"):
        make_model(tmp_path, path=name, trusted=True)


def test_declared_format_overrides_the_suffix_for_trust(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="refusing to load a pickle artifact"):
        make_model(tmp_path, path="model.skops", format="pickle")


@pytest.mark.parametrize("name", ["payload.pkl", "payload.joblib"])
def test_wrong_sha256_refuses_before_deserializing(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    path = dump(MarkerPayload(marker), tmp_path / name)
    with pytest.raises(ModelLoadError, match="was not deserialized"):
        started(tmp_path, path=name, trusted=True, sha256="f" * 64)
    assert not marker.exists()
    # Control: the same file, with its real digest, does run its payload when loaded, so the
    # assertion above would catch a loader that deserialized before checking.
    with pytest.raises(ModelLoadError, match="not an estimator"):
        started(tmp_path, path=name, trusted=True, sha256=digest(path))
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib"])
def test_trusted_pinned_pickle_and_joblib_load(
    tmp_path: Path, name: str, classifier: LogisticRegression, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    path = dump(classifier, tmp_path / name)
    model = started(tmp_path, path=name, trusted=True, sha256=digest(path).upper())
    out = predict(model, iris[0])
    np.testing.assert_array_equal(out["label"], classifier.predict(iris[0]))
    np.testing.assert_array_equal(out["probabilities"], classifier.predict_proba(iris[0]))


# --- paths and broken files ------------------------------------------------------------------


def test_path_traversal_is_refused(tmp_path: Path, classifier: LogisticRegression) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dump(classifier, tmp_path / "outside.skops")
    for path in ("../outside.skops", str(tmp_path / "outside.skops")):
        with pytest.raises(ConfigError, match=rf"^{CONFIG_PATH}\.path: .* outside the model root"):
            started(root, path=path)


def test_symlink_escape_is_refused(tmp_path: Path, classifier: LogisticRegression) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dump(classifier, tmp_path / "outside.skops")
    (root / "model.skops").symlink_to(tmp_path / "outside.skops")
    with pytest.raises(ConfigError, match="outside the model root"):
        started(root, path="model.skops")


def test_unknown_suffix_is_a_config_error(tmp_path: Path, classifier: LogisticRegression) -> None:
    with pytest.raises(ConfigError, match=rf"^{CONFIG_PATH}\.path: cannot tell the format"):
        make_model(tmp_path, path="model.bin")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        make_model(tmp_path, path="model")
    dump(classifier, tmp_path / "model.skops").rename(tmp_path / "model.bin")
    assert started(tmp_path, path="model.bin", format="skops").outputs


@pytest.mark.parametrize(
    ("name", "extra"),
    [("model.skops", {}), ("model.pkl", {"trusted": True}), ("model.joblib", {"trusted": True})],
)
def test_corrupt_file_is_a_load_error_without_paths(
    tmp_path: Path, name: str, extra: dict[str, Any]
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x05 this is not a model " + str(tmp_path).encode())
    if extra:
        extra = {**extra, "sha256": digest(path)}
    with pytest.raises(ModelLoadError) as info:
        started(tmp_path, path=name, **extra)
    text = str(info.value)
    assert text.startswith(f"{CONFIG_PATH}: cannot load {name!r}")
    assert str(tmp_path) not in text
    assert "\n" not in text


def test_os_errors_are_reported_without_the_absolute_path(tmp_path: Path) -> None:
    # Reading a directory raises IsADirectoryError, whose text carries the absolute path.
    (tmp_path / "model.skops").mkdir()
    with pytest.raises(ModelLoadError) as info:
        started(tmp_path, path="model.skops")
    text = str(info.value)
    assert "IsADirectoryError" in text
    assert str(tmp_path) not in text
    assert "<path>" in text


def test_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        started(tmp_path, path="absent.skops")


def test_objects_that_are_not_servable_estimators_are_refused(
    tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    cases = {
        "scaler.skops": StandardScaler().fit(iris[0]),
        "unfitted.skops": LogisticRegression(),
        "kmeans.skops": KMeans(n_clusters=3, n_init=1, random_state=0).fit(iris[0]),
    }
    expected = {
        "scaler.skops": "not an estimator with predict",
        "unfitted.skops": "has no n_features_in_",
        "kmeans.skops": "neither a classifier nor a regressor",
    }
    for name, obj in cases.items():
        dump(obj, tmp_path / name)
        with pytest.raises(ModelLoadError, match=expected[name]):
            started(tmp_path, path=name)


# --- predict ---------------------------------------------------------------------------------


def test_predict_failure_is_a_generic_backend_error(
    tmp_path: Path,
    classifier: LogisticRegression,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = started(tmp_path, path="model.skops")
    with (
        caplog.at_level(logging.ERROR, logger="infercore.sklearn"),
        pytest.raises(BackendError) as info,
    ):
        predict(model, np.zeros((2, 3)))
    assert "features" not in str(info.value)
    assert any("expecting 4 features" in r.getMessage() for r in caplog.records)


def test_predict_before_start_and_after_stop(
    tmp_path: Path, classifier: LogisticRegression
) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = make_model(tmp_path, path="model.skops")
    with pytest.raises(ModelNotReady):
        predict(model, np.zeros((1, 4)))
    asyncio.run(model.start())
    assert predict(model, np.zeros((1, 4)))["label"].shape == (1,)
    asyncio.run(model.stop())
    with pytest.raises(ModelNotReady):
        predict(model, np.zeros((1, 4)))


# --- NaN and infinity (DESIGN: "NaN where not allowed" is a 400, never a 5xx) ---------------


@pytest.mark.parametrize(("value", "what"), [(np.nan, "NaN"), (np.inf, "infinity")])
def test_non_finite_input_to_an_estimator_without_missing_values_is_invalid_input(
    tmp_path: Path, classifier: LogisticRegression, value: float, what: str
) -> None:
    dump(classifier, tmp_path / "model.skops")
    model = started(tmp_path, path="model.skops")
    x = np.ones((3, 4))
    x[1, 2] = value
    with pytest.raises(InvalidInput) as info:
        predict(model, x)
    assert str(info.value).startswith(f"input 'input': row 1 holds {what}, which this model")
    assert info.value.status_code == 400
    assert not model.accepts_non_finite  # the server refuses it before queueing


def test_nan_reaches_estimators_that_accept_missing_values(
    tmp_path: Path, iris: tuple[np.ndarray, np.ndarray], classifier: LogisticRegression
) -> None:
    x, y = iris
    for name, estimator in {
        "hgb.skops": HistGradientBoostingClassifier(max_iter=5).fit(x, y),
        # A pipeline's first step sees the input, so it decides: the imputer takes NaN.
        "imputed.skops": make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)).fit(
            x, y
        ),
    }.items():
        dump(estimator, tmp_path / name)
        trusted = [
            "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
            "numpy.dtype",
        ]
        model = started(tmp_path, path=name, trusted_types=trusted)
        rows = x[:3].copy()
        rows[0, 1] = np.nan
        np.testing.assert_array_equal(predict(model, rows)["label"], estimator.predict(rows))
        # The server lets NaN through to it (else a 400 before queueing: protocol check).
        assert model.accepts_non_finite


def test_values_a_pipeline_turns_into_nan_are_invalid_input_without_warnings(
    tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = iris
    pipeline = make_pipeline(FunctionTransformer(np.sqrt), LogisticRegression(max_iter=1000))
    dump(pipeline.fit(x, y), tmp_path / "sqrt.skops")
    model = started(tmp_path, path="sqrt.skops", trusted_types=["numpy.sqrt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (with a library path) would fail it
        with pytest.raises(InvalidInput, match=r"input 'input': the model turns these values"):
            predict(model, -np.ones((1, 4)))


def test_nan_over_http_is_a_400_and_the_next_request_is_served(
    infercore_client: ClientFactory, tmp_path: Path, classifier: LogisticRegression
) -> None:
    dump(classifier, tmp_path / "model.skops")
    recipe = {
        "batching": {"kind": "dynamic", "max_batch_size": 8},
        "models": {
            "m": {"versions": {"1": {"loader": {"kind": "sklearn", "path": "model.skops"}}}}
        },
    }
    client = infercore_client(recipe, infercore_sklearn, model_root=tmp_path)

    def post(row: list[float]) -> Any:
        # JSON has no NaN: the binary tensor extension carries it, as V2 clients send it.
        raw = np.array([row], dtype=np.float64).tobytes()
        tensor = {"name": "input", "shape": [1, 4], "datatype": "FP64"}
        tensor["parameters"] = {"binary_data_size": len(raw)}
        header = msgspec.json.encode({"inputs": [tensor]})
        return client.post(
            "/v2/models/m/infer",
            content=header + raw,
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(len(header)),
            },
        )

    bad = post([5.1, float("nan"), 1.4, 0.2])
    assert bad.status_code == 400, bad.text
    assert bad.json()["reason"] == "invalid_input"
    assert "NaN" in bad.json()["error"]
    good = post([5.1, 3.5, 1.4, 0.2])
    assert good.status_code == 200, good.text
