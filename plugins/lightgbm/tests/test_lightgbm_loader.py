"""``kind: lightgbm``: signatures per objective, predictions, digest pinning, refusals, HTTP.

The boosters are trained at fixture time on a few hundred synthetic rows (no downloads) and
saved in LightGBM's text format, the only format the loader reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pytest

import infercore_lightgbm
from infercore.components import Tensors
from infercore.errors import BackendError, ConfigError, ModelLoadError, ModelNotReady
from infercore.testing import ClientFactory, PluginManagerFactory, PluginSet
from infercore_lightgbm import LightGBMModel
from infercore_lightgbm.text_format import MalformedModelText, check_model_text

PATH = "models.m.versions.1.loader"
ROWS = 300
WIDTH = 4


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, WIDTH))
    return x, x[:, 0] + 0.5 * x[:, 1]


def _train(objective: Any, y: np.ndarray, rounds: int = 8, **params: Any) -> lightgbm.Booster:
    x, _ = _data()
    base = {"objective": objective, "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1}
    base.update(deterministic=True, num_threads=1, seed=0, **params)
    return lightgbm.train(base, lightgbm.Dataset(x, y), num_boost_round=rounds)


@pytest.fixture(scope="module")
def boosters() -> dict[str, lightgbm.Booster]:
    _, score = _data()
    return {
        "binary": _train("binary", (score > 0).astype(int)),
        "multiclass": _train("multiclass", np.digitize(score, [-0.5, 0.5]), num_class=3),
        "multiclassova": _train("multiclassova", np.digitize(score, [-0.5, 0.5]), num_class=3),
        "regression": _train("regression", score),
        "poisson": _train("poisson", np.abs(score)),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, boosters: dict[str, lightgbm.Booster]) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for name, booster in boosters.items():
        booster.save_model(str(folder / f"{name}.txt"))
    return folder


@pytest.fixture
def plugins(infercore_plugin_manager: PluginManagerFactory) -> PluginSet:
    return infercore_plugin_manager(infercore_lightgbm)


def _build(plugins: PluginSet, root: Path, **options: Any) -> LightGBMModel:
    model = plugins.build("model_loader", {"kind": "lightgbm", **options}, model_root=root)
    assert isinstance(model, LightGBMModel)
    return model


def _started(plugins: PluginSet, root: Path, **options: Any) -> LightGBMModel:
    model = _build(plugins, root, **options)
    asyncio.run(model.start())
    return model


def _predict(model: LightGBMModel, x: np.ndarray) -> Tensors:
    return asyncio.run(model.predict({"input": x}))


def _x(n: int = 5, dtype: Any = np.float32) -> np.ndarray:
    return _data()[0][:n].astype(dtype)


# --- registration -------------------------------------------------------------------------


def test_the_plugin_registers_the_lightgbm_kind(plugins: PluginSet) -> None:
    assert plugins.kinds("model_loader")["lightgbm"] is LightGBMModel
    assert plugins.plugin_of("model_loader", "lightgbm") == "infercore_lightgbm"


def test_the_installed_entry_point_is_found(
    infercore_plugin_manager: PluginManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "lightgbm")
    installed = infercore_plugin_manager(entry_points=True)
    assert installed.plugin_of("model_loader", "lightgbm") == "lightgbm"
    info = installed.infos["lightgbm"]
    assert (info.distribution, info.license, info.builtin) == (
        "infercore-lightgbm",
        "Apache-2.0",
        False,
    )


def test_importing_the_plugin_does_not_import_lightgbm() -> None:
    code = "import sys, infercore_lightgbm; print('lightgbm' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


# --- signatures and predictions -----------------------------------------------------------


def test_binary_gives_two_probabilities_and_a_label(
    plugins: PluginSet, root: Path, boosters: dict[str, lightgbm.Booster]
) -> None:
    model = _started(plugins, root, path="binary.txt")
    assert [s.to_metadata() for s in model.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, WIDTH]}
    ]
    assert [s.to_metadata() for s in model.outputs] == [
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert model.batchable
    x = _x()
    out = _predict(model, x)
    expected = boosters["binary"].predict(x)
    np.testing.assert_allclose(out["probabilities"][:, 1], expected)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0)
    np.testing.assert_array_equal(out["label"], (expected >= 0.5).astype(np.int64))
    assert out["label"].dtype == np.int64


def test_binary_threshold_moves_the_label(plugins: PluginSet, root: Path) -> None:
    x = _x(50)
    low = _predict(_started(plugins, root, path="binary.txt", binary_threshold=0.01), x)
    high = _predict(_started(plugins, root, path="binary.txt", binary_threshold=0.99), x)
    p = low["probabilities"][:, 1]
    np.testing.assert_array_equal(low["label"], (p >= 0.01).astype(np.int64))
    np.testing.assert_array_equal(high["label"], (p >= 0.99).astype(np.int64))
    assert low["label"].sum() > high["label"].sum()


@pytest.mark.parametrize("objective", ["multiclass", "multiclassova"])
def test_multiclass_gives_k_probabilities_and_the_argmax(
    plugins: PluginSet, root: Path, boosters: dict[str, lightgbm.Booster], objective: str
) -> None:
    model = _started(plugins, root, path=f"{objective}.txt")
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [
        ("probabilities", "FP64", (-1, 3)),
        ("label", "INT64", (-1,)),
    ]
    x = _x(20)
    out = _predict(model, x)
    np.testing.assert_allclose(out["probabilities"], boosters[objective].predict(x))
    np.testing.assert_array_equal(out["label"], np.argmax(out["probabilities"], axis=1))
    assert len(set(out["label"].tolist())) > 1


@pytest.mark.parametrize("objective", ["regression", "poisson"])
def test_other_objectives_give_a_prediction(
    plugins: PluginSet, root: Path, boosters: dict[str, lightgbm.Booster], objective: str
) -> None:
    model = _started(plugins, root, path=f"{objective}.txt")
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("prediction", "FP64", (-1,))]
    x = _x()
    np.testing.assert_allclose(_predict(model, x)["prediction"], boosters[objective].predict(x))


def test_a_custom_objective_model_gives_its_raw_prediction(
    plugins: PluginSet, tmp_path: Path
) -> None:
    def squared(preds: np.ndarray, data: lightgbm.Dataset) -> tuple[np.ndarray, np.ndarray]:
        return preds - data.get_label(), np.ones_like(preds)

    booster = _train(squared, _data()[1], rounds=3)
    (tmp_path / "custom.txt").write_text(booster.model_to_string())
    model = _started(plugins, tmp_path, path="custom.txt")
    assert [s.name for s in model.outputs] == ["prediction"]
    x = _x()
    np.testing.assert_allclose(_predict(model, x)["prediction"], booster.predict(x))


def test_outputs_choose_and_order_the_classifier_outputs(plugins: PluginSet, root: Path) -> None:
    model = _started(plugins, root, path="multiclass.txt", outputs=["label"])
    assert [s.name for s in model.outputs] == ["label"]
    assert set(_predict(model, _x())) == {"label"}
    both = _started(plugins, root, path="binary.txt", outputs=["label", "probabilities"])
    assert [s.name for s in both.outputs] == ["label", "probabilities"]


def test_outputs_for_a_regressor_is_a_config_error(plugins: PluginSet, root: Path) -> None:
    model = _build(plugins, root, path="regression.txt", outputs=["label"])
    with pytest.raises(ConfigError, match=rf"{PATH}\.outputs: only classifiers"):
        asyncio.run(model.start())


def test_an_output_named_twice_is_a_config_error(plugins: PluginSet, root: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{PATH}\.outputs: .* names an output twice"):
        _build(plugins, root, path="binary.txt", outputs=["label", "label"])


def test_num_iteration_uses_the_first_rounds(
    plugins: PluginSet, root: Path, boosters: dict[str, lightgbm.Booster]
) -> None:
    x = _x()
    model = _started(plugins, root, path="regression.txt", num_iteration=2)
    expected = boosters["regression"].predict(x, num_iteration=2)
    np.testing.assert_allclose(_predict(model, x)["prediction"], expected)
    assert not np.allclose(expected, boosters["regression"].predict(x))


def test_num_iteration_beyond_the_model_is_a_config_error(plugins: PluginSet, root: Path) -> None:
    model = _build(plugins, root, path="regression.txt", num_iteration=99)
    with pytest.raises(ConfigError, match=rf"{PATH}\.num_iteration: 99 is more than .* 8 "):
        asyncio.run(model.start())


def test_fp64_inputs(plugins: PluginSet, root: Path, boosters: dict[str, lightgbm.Booster]) -> None:
    model = _started(plugins, root, path="regression.txt", input_dtype="FP64")
    assert model.inputs[0].datatype == "FP64"
    x = _x(dtype=np.float64)
    np.testing.assert_allclose(_predict(model, x)["prediction"], boosters["regression"].predict(x))


def test_predict_runs_in_a_worker_thread(plugins: PluginSet, root: Path) -> None:
    model = _started(plugins, root, path="regression.txt")
    seen: list[int] = []
    real = model._booster.predict

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    model._booster.predict = spy
    _predict(model, _x())
    assert seen and seen[0] != threading.get_ident()


def test_predict_before_start_is_not_ready(plugins: PluginSet, root: Path) -> None:
    with pytest.raises(ModelNotReady):
        _predict(_build(plugins, root, path="binary.txt"), _x())


def test_a_lightgbm_failure_is_a_backend_error_without_detail(
    plugins: PluginSet, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _started(plugins, root, path="binary.txt")
    with pytest.raises(BackendError) as info:
        _predict(model, np.zeros((1, WIDTH + 1), np.float32))  # the runtime checks widths first
    assert str(info.value) == "the lightgbm model failed on this request"
    assert "number of features" in caplog.text


def test_stop_drops_the_booster(plugins: PluginSet, root: Path) -> None:
    model = _started(plugins, root, path="binary.txt")
    asyncio.run(model.stop())
    with pytest.raises(ModelNotReady):
        _predict(model, _x())


# --- artifacts: digests, paths, formats ---------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pinned_digest_that_matches_loads(plugins: PluginSet, root: Path) -> None:
    digest = _digest(root / "binary.txt").upper()  # any case
    model = _started(plugins, root, path="binary.txt", sha256=digest)
    assert model.outputs


def test_a_digest_mismatch_fails_before_lightgbm_reads_the_file(
    plugins: PluginSet, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("LightGBM parsed an artifact whose digest did not match")

    monkeypatch.setattr(lightgbm, "Booster", never)
    model = _build(plugins, root, path="binary.txt", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=rf"{PATH}\.sha256: mismatch"):
        asyncio.run(model.start())


def test_a_malformed_digest_is_a_config_error(plugins: PluginSet, root: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{PATH}\.sha256"):
        _build(plugins, root, path="binary.txt", sha256="abc")


def test_a_path_outside_the_model_root_is_refused(plugins: PluginSet, root: Path) -> None:
    model = _build(plugins, root, path="../elsewhere/model.txt")
    with pytest.raises(ConfigError, match=rf"{PATH}\.path: .* outside the model root"):
        asyncio.run(model.start())


def test_a_missing_file_fails_the_load(plugins: PluginSet, root: Path) -> None:
    model = _build(plugins, root, path="nope.txt")
    with pytest.raises(ModelLoadError, match="not found"):
        asyncio.run(model.start())


class _Marker:
    """Unpickling this creates a directory: proof that the bytes were deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_a_pickle_is_refused_and_never_unpickled(plugins: PluginSet, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    model = _build(plugins, tmp_path, path="model.pkl")
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(model.start())
    assert "is a Python pickle" in str(info.value)
    assert "save_model" in str(info.value)
    assert not marker.exists()


def test_a_binary_file_is_not_a_text_model(plugins: PluginSet, tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(ModelLoadError, match="not text"):
        asyncio.run(_build(plugins, tmp_path, path="model.bin").start())


@pytest.mark.parametrize("body", ["", "tree\nversion=v4\n", "not a model at all"])
def test_a_corrupt_text_model_fails_in_one_line_without_paths(
    plugins: PluginSet, tmp_path: Path, body: str
) -> None:
    (tmp_path / "model.txt").write_text(body)
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(_build(plugins, tmp_path, path="model.txt").start())
    text = str(info.value)
    assert text.startswith(f"{PATH}: cannot load 'model.txt' as a LightGBM text model")
    assert "\n" not in text
    assert str(tmp_path) not in text


# --- truncated and corrupted text: refused before LightGBM's parser, which aborts on it -------


def _special_boosters() -> dict[str, lightgbm.Booster]:
    x, score = _data()
    categorical = x.copy()
    categorical[:, 3] = np.arange(ROWS) % 5
    return {
        "linear": _train("regression", score, rounds=2, linear_tree=True),
        "categorical": lightgbm.train(
            {"objective": "regression", "num_leaves": 6, "verbose": -1, "min_data_per_group": 5,
             "cat_smooth": 1, "num_threads": 1},
            lightgbm.Dataset(categorical, score + categorical[:, 3] % 2, categorical_feature=[3]),
            num_boost_round=3,
        ),
        "dart": _train("binary", (score > 0).astype(int), boosting="dart"),
        "rf": _train("regression", score, boosting="rf", bagging_freq=1, bagging_fraction=0.8),
    }  # fmt: skip


def test_every_model_lightgbm_writes_passes_the_text_check(
    boosters: dict[str, lightgbm.Booster],
) -> None:
    for name, booster in {**boosters, **_special_boosters()}.items():
        text = booster.model_to_string()
        check_model_text(text.encode())
        # Files without tree_sizes= (written before LightGBM v3) are found by their Tree= lines.
        old = "".join(line for line in text.splitlines(True) if not line.startswith("tree_sizes="))
        check_model_text(old.encode())
        assert name  # every kind of booster above was checked


def _cut_points(text: str) -> dict[str, int]:
    return {
        "in the first line": 2,
        "in the header": text.index("max_feature_idx=") + 5,
        "in tree_sizes": text.index("tree_sizes=") + 13,
        "after the header": text.index("Tree=0"),
        "in the first tree": text.index("Tree=0") + 60,
        "in a value of the last tree": text.index("shrinkage=", text.index("Tree=7")) + 10,
        "before end of trees": text.index("end of trees") - 2,
        "in the parameters": text.index("parameters:") + 40,
    }


@pytest.mark.parametrize(
    "where",
    [
        "in the first line",
        "in the header",
        "in tree_sizes",
        "after the header",
        "in the first tree",
        "in a value of the last tree",
        "before end of trees",
        "in the parameters",
    ],
)
def test_a_truncated_text_model_fails_the_load_before_lightgbm_reads_it(
    plugins: PluginSet, tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    text = (root / "binary.txt").read_text()
    cut = text[: _cut_points(text)[where]]
    with pytest.raises(MalformedModelText):
        check_model_text(cut.encode())

    def never(*args: Any, **kwargs: Any) -> Any:  # LightGBM would abort the process here
        raise AssertionError("LightGBM was handed a truncated model")

    monkeypatch.setattr(lightgbm, "Booster", never)
    (tmp_path / "cut.txt").write_text(cut)
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(_build(plugins, tmp_path, path="cut.txt").start())
    message = str(info.value)
    assert message.startswith(
        f"{PATH}: cannot load 'cut.txt' as a LightGBM text model: it is truncated or corrupted ("
    )
    assert "\n" not in message
    assert str(tmp_path) not in message
    assert "truncated" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\n", "\r\n"),  # line endings converted: tree_sizes no longer match
        ("num_leaves=4", "num_leaves=5"),  # arrays shorter than num_leaves
        ("left_child=", "left_child=0 "),  # a child index that breaks the tree
        ("split_feature=", "split_feature=9"),  # a feature beyond max_feature_idx
        ("num_tree_per_iteration=1", "num_tree_per_iteration=0"),  # a division by zero
        ("[boosting: gbdt]", "[boosting gbdt]"),  # a parameter line LightGBM splits unchecked
    ],
)
def test_a_corrupted_text_model_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str
) -> None:
    text = (root / "binary.txt").read_text()
    assert old in text
    with pytest.raises(MalformedModelText):
        check_model_text(text.replace(old, new, 1 if old != "\n" else -1).encode())


def test_a_truncated_model_does_not_kill_the_process(root: Path, tmp_path: Path) -> None:
    # Without the check, LightGBM aborts (SIGABRT / SIGSEGV) on this file: a child process
    # keeps such a regression from taking pytest down with it.
    text = (root / "binary.txt").read_text()
    (tmp_path / "cut.txt").write_text(text[: text.index("Tree=1") + 100])
    code = f"""
import asyncio
from pathlib import Path
import msgspec
from infercore.components import ComponentContext
from infercore.errors import ModelLoadError
from infercore_lightgbm import LightGBMModel

config = msgspec.convert({{"path": "cut.txt"}}, LightGBMModel.Config)
model = LightGBMModel(config, ComponentContext(path={PATH!r}, model_root=Path({str(tmp_path)!r})))
try:
    asyncio.run(model.start())
except ModelLoadError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(
        f"{PATH}: cannot load 'cut.txt' as a LightGBM text model: it is truncated or corrupted"
    )


def test_a_typo_in_the_options_names_the_path_and_the_valid_keys(
    plugins: PluginSet, root: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        _build(plugins, root, path="binary.txt", num_thread=2)
    text = str(info.value)
    assert text.startswith(f"{PATH}.num_thread: unknown key")
    assert "num_threads" in text


# --- served over HTTP ---------------------------------------------------------------------


def test_served_over_http(
    infercore_client: ClientFactory, root: Path, boosters: dict[str, lightgbm.Booster]
) -> None:
    recipe = {
        "batching": {"kind": "dynamic", "max_batch_size": 8},
        "models": {
            "m": {"versions": {"1": {"loader": {"kind": "lightgbm", "path": "multiclass.txt"}}}}
        },
    }
    client = infercore_client(recipe, infercore_lightgbm, model_root=root)
    x = _x(3)
    body = {
        "inputs": [
            {"name": "input", "shape": [3, WIDTH], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    response = client.post("/v2/models/m/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 3]
    expected = boosters["multiclass"].predict(x)
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(3, 3), expected, rtol=1e-6
    )
    assert outputs["label"]["data"] == np.argmax(expected, axis=1).tolist()

    metadata = client.get("/v2/models/m").json()
    assert metadata["platform"] == "lightgbm"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, WIDTH]}]

    wrong = dict(body["inputs"][0], shape=[1, 3], data=[1.0, 2.0, 3.0])
    bad = client.post("/v2/models/m/infer", json={"inputs": [wrong]})
    assert bad.status_code == 400
    assert bad.json()["reason"] == "invalid_input"
