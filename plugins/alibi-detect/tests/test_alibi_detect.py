"""alibi-detect detectors: shifted and unshifted data, saved detectors and their trust rules.

alibi-detect takes several seconds to import; the module imports it once (the first detector
that starts), so the whole file stays well under a minute.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from infercore.components import ComponentContext, DriftDetector
from infercore.drift.columns import Array, to_columns
from infercore.errors import ConfigError, ModelLoadError
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry
from infercore_alibi_detect import AlibiKS, folder_digest, save
from infercore_alibi_detect.__main__ import main as cli_main
from infercore_alibi_detect.detectors import WindowError

REPO = Path(__file__).resolve().parents[3]
ROOT = REPO / "recipes"
REF = "fraud/artifacts/reference.parquet"


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager()
    return Registry(pm)


@pytest.fixture(scope="module")
def fraud() -> pd.DataFrame:
    return pd.read_parquet(ROOT / REF)


def make(
    registry: Registry, root: Path, node: dict[str, Any], *, start: bool = True
) -> DriftDetector:
    det = registry.build(
        "drift_detector",
        node,
        ComponentContext(
            "models.fraud.drift.detectors.d", root, model_name="fraud", extra={"detector_name": "d"}
        ),
    )
    assert isinstance(det, DriftDetector)
    if start:
        asyncio.run(det.start())
    return det


def window(frame: pd.DataFrame) -> dict[str, Array]:
    tensors: dict[str, Array] = {}
    for col in frame.columns:
        values = frame[col].to_numpy()
        if values.dtype == object:
            values = np.array([v.encode() for v in values], dtype=object)
        else:
            values = values.astype(np.float32)
        tensors[col] = values.reshape(-1, 1)
    return to_columns(tensors)


def test_kinds_and_lazy_import(registry: Registry) -> None:
    kinds = registry.kinds("drift_detector")
    for kind in ("alibi-ks", "alibi-cvm", "alibi-chi2", "alibi-tabular", "alibi-mmd", "alibi-lsdd"):
        assert kinds[kind].plugin == "alibi-detect"
    code = (
        "import sys, infercore_alibi_detect\n"
        "from infercore.plugin_manager import make_plugin_manager\n"
        "make_plugin_manager()\n"
        "assert 'alibi_detect' not in sys.modules, 'imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- unshifted and shifted data -------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Continuous and categorical columns from known distributions."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(3)
    np.savez(
        root / "ref.npz",
        x=rng.normal(size=(2000, 4)),
        c=rng.choice(np.array(["a", "b", "c"]), size=2000, p=[0.6, 0.3, 0.1]),
    )
    return root


def synthetic_window(
    rng: np.random.Generator, n: int = 300, shift: float = 0.0
) -> dict[str, Array]:
    return to_columns(
        {
            "x": rng.normal(size=(n, 4)) + shift,
            "c": rng.choice(np.array(["a", "b", "c"]), size=n, p=[0.6, 0.3, 0.1]),
        }
    )


@pytest.mark.parametrize("kind", ["alibi-ks", "alibi-cvm", "alibi-chi2", "alibi-tabular"])
def test_no_alarm_on_unshifted_data_at_the_configured_rate(
    registry: Registry, synthetic: Path, kind: str
) -> None:
    def rate(p_val: float) -> float:
        det = make(registry, synthetic, {"kind": kind, "reference": "ref.npz", "p_val": p_val})
        rng = np.random.default_rng(11)
        return sum(det.detect(synthetic_window(rng)).drift for _ in range(60)) / 60

    assert rate(0.1) <= 2 * 0.1
    # the bound is live: the same windows at p_val 0.99 (0.2 per feature after Bonferroni
    # over up to five features) break it
    assert rate(0.99) > 2 * 0.1


def test_ks_and_cvm_detect_a_mean_shift(registry: Registry, synthetic: Path) -> None:
    rng = np.random.default_rng(12)
    for kind in ("alibi-ks", "alibi-cvm"):
        det = make(registry, synthetic, {"kind": kind, "reference": "ref.npz", "correction": "fdr"})
        shifted = synthetic_window(rng)
        shifted["x[2]"] = shifted["x[2]"] + 0.6
        result = det.detect(shifted)
        assert result.drift, kind
        assert result.feature_drift == {"x[0]": False, "x[1]": False, "x[2]": True, "x[3]": False}
        assert result.p_values["x[2]"] < 1e-6
        assert result.info["correction"] == "fdr" and result.info["alibi_class"] in (
            "KSDrift",
            "CVMDrift",
        )


def test_tabular_on_the_fraud_reference(registry: Registry, fraud: pd.DataFrame) -> None:
    det = make(registry, ROOT, {"kind": "alibi-tabular", "reference": REF})
    assert det.features == list(fraud.columns)  # type: ignore[attr-defined]
    shifted = fraud.sample(300, random_state=1).copy()
    shifted["amount"] = shifted["amount"] * 3 + 50
    online = shifted.index[:120]
    shifted.loc[online, "channel"] = "online"
    result = det.detect(window(shifted))
    assert result.drift
    assert result.feature_drift["amount"] and result.feature_drift["channel"]
    assert not result.feature_drift["night_ratio_7d"]


def test_chi2_on_the_fraud_reference_with_unseen_categories(
    registry: Registry, fraud: pd.DataFrame
) -> None:
    det = make(registry, ROOT, {"kind": "alibi-chi2", "reference": REF})
    assert det.features == ["merchant_category", "country", "channel"]  # type: ignore[attr-defined]
    same = det.detect(window(fraud.sample(300, random_state=2)))
    assert not same.drift
    shifted = fraud.sample(300, random_state=3).copy()
    shifted.loc[shifted.index[:100], "country"] = "ZZ"  # a country the model never saw
    result = det.detect(window(shifted))
    assert result.drift and result.feature_drift["country"]
    assert not result.feature_drift["channel"]


def test_categories_per_feature_marks_numeric_codes(
    registry: Registry, fraud: pd.DataFrame
) -> None:
    det = make(
        registry,
        ROOT,
        {
            "kind": "alibi-chi2",
            "reference": REF,
            "features": ["cross_border", "channel"],
            "categories_per_feature": {"cross_border": 2, "channel": None},
        },
    )
    shifted = fraud.sample(300, random_state=4).copy()
    shifted["cross_border"] = 1.0
    result = det.detect(window(shifted))
    assert result.feature_drift == {"cross_border": True, "channel": False}


def test_window_errors(registry: Registry, synthetic: Path) -> None:
    det = make(registry, synthetic, {"kind": "alibi-tabular", "reference": "ref.npz"})
    with pytest.raises(WindowError, match="no column 'x\\[0\\]'"):
        det.detect(to_columns({"c": np.array(["a", "b"], dtype=object)}))
    w = synthetic_window(np.random.default_rng(0), n=5)
    w["c"] = np.zeros(5)
    with pytest.raises(WindowError, match="holds numbers"):
        det.detect(w)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_mmd_and_lsdd_without_torch(registry: Registry, synthetic: Path) -> None:
    for kind in ("alibi-mmd", "alibi-lsdd"):
        with pytest.raises(ConfigError, match="needs 'torch', which is not installed") as info:
            make(registry, synthetic, {"kind": kind, "reference": "ref.npz"}, start=False)
        assert ".ci/install-torch-cpu" in (info.value.hint or "")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
@pytest.mark.parametrize("kind", ["alibi-mmd", "alibi-lsdd"])
def test_the_tensorflow_backend_is_refused_when_not_installed(
    registry: Registry, synthetic: Path, kind: str
) -> None:
    node = {"kind": kind, "reference": "ref.npz", "backend": "tensorflow"}
    with pytest.raises(
        ConfigError, match=r"backend: alibi-(mmd|lsdd) with backend 'tensorflow' needs"
    ) as info:
        make(registry, synthetic, node, start=False)
    assert "use backend: pytorch" in (info.value.hint or "")
    # a device is for torch and KeOps: refused with TensorFlow, installed or not
    with pytest.raises(ConfigError, match="device: 'cuda' is for the pytorch and keops"):
        make(registry, synthetic, {**node, "device": "cuda"}, start=False)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "set exactly one of `reference` and `load_path`"),
        ({"reference": "ref.npz", "load_path": "saved"}, "set exactly one"),
        (
            {"reference": "ref.npz", "trusted": True, "sha256": "a" * 64},
            "only applies to `load_path`",
        ),
        ({"load_path": "saved", "trusted": True, "features": ["x"]}, "needs a pinned sha256"),
        ({"load_path": "saved"}, "features: required with `load_path`"),
        ({"reference": "ref.npz", "correction": "none"}, "correction"),
        ({"reference": "ref.npz", "p_val": 0}, "p_val"),
        ({"reference": "ref.xls"}, "unknown format"),
        ({"reference": "ref.npz", "categories": {}}, "categories: unknown key"),
    ],
)
def test_config_errors(
    registry: Registry, synthetic: Path, node: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make(registry, synthetic, {"kind": "alibi-ks", **node}, start=False)


def test_start_errors(registry: Registry, synthetic: Path) -> None:
    with pytest.raises(ConfigError, match="a list of categories is for string columns"):
        make(
            registry,
            synthetic,
            {
                "kind": "alibi-tabular",
                "reference": "ref.npz",
                "categories_per_feature": {"x[0]": ["a"]},
            },
        )
    with pytest.raises(ConfigError, match="'c' is categorical in the reference"):
        make(registry, synthetic, {"kind": "alibi-ks", "reference": "ref.npz", "features": ["c"]})
    with pytest.raises(ConfigError, match="'nope' not in the reference"):
        make(
            registry,
            synthetic,
            {
                "kind": "alibi-chi2",
                "reference": "ref.npz",
                "categories_per_feature": {"nope": None},
            },
        )


# --- saved detectors and trust (S2, S8) -----------------------------------------------------


def _double(x: Array) -> Array:
    return x * 1.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain saved KSDrift (config.toml + x_ref.npy) and one with a dill preprocess_fn."""
    from alibi_detect.cd import KSDrift

    root = tmp_path_factory.mktemp("saved")
    x_ref = np.random.default_rng(5).normal(size=(500, 2))
    plain = save(KSDrift(x_ref, p_val=0.05), root / "plain")
    with_dill = save(KSDrift(x_ref, p_val=0.05, preprocess_fn=lambda x: x * 1.0), root / "dill")
    return {"root": root, "plain": plain, "dill": with_dill, "x_ref": x_ref}


def _ks(registry: Registry, root: Path, **node: Any) -> DriftDetector:
    return make(registry, root, {"kind": "alibi-ks", "features": ["x[0]", "x[1]"], **node})


def test_a_plain_saved_detector_loads_without_trust(
    registry: Registry, saved: dict[str, Any]
) -> None:
    root = saved["root"]
    assert sorted(p.name for p in (root / "plain").iterdir()) == ["config.toml", "x_ref.npy"]
    det = _ks(registry, root, load_path="plain")
    rng = np.random.default_rng(6)
    assert not det.detect(to_columns({"x": rng.normal(size=(300, 2))})).drift
    shifted = det.detect(to_columns({"x": rng.normal(size=(300, 2)) + np.array([0.0, 1.0])}))
    assert shifted.drift and shifted.feature_drift == {"x[0]": False, "x[1]": True}
    # pinned: checked
    _ks(registry, root, load_path="plain", sha256=saved["plain"])
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        _ks(registry, root, load_path="plain", sha256="0" * 64)
    # the digest is sha256sum's listing, hashed
    assert folder_digest(root / "plain") == saved["plain"]


def test_a_tensor_name_in_features_expands_for_a_saved_detector(
    registry: Registry, saved: dict[str, Any]
) -> None:
    root = saved["root"]
    det = make(registry, root, {"kind": "alibi-ks", "features": ["x"], "load_path": "plain"})
    assert det.features == ["x[0]", "x[1]"]  # as `reference` expands it
    rng = np.random.default_rng(7)
    shifted = det.detect(to_columns({"x": rng.normal(size=(300, 2)) + np.array([0.0, 1.0])}))
    assert shifted.feature_drift == {"x[0]": False, "x[1]": True}
    with pytest.raises(ConfigError, match=r"features: 3 columns, but .* reference has 2") as info:
        make(
            registry, root, {"kind": "alibi-ks", "features": ["x", "y", "z"], "load_path": "plain"}
        )
    assert "name[i] (x[0], x[1])" in (info.value.hint or "")


def test_a_dill_part_is_refused_unless_trusted_and_pinned(
    registry: Registry, saved: dict[str, Any]
) -> None:
    root = saved["root"]
    assert (root / "dill" / "preprocess_fn" / "function.dill").is_file()
    with pytest.raises(ModelLoadError, match=r"parts that run code .*function\.dill.*refused"):
        _ks(registry, root, load_path="dill")
    with pytest.raises(ModelLoadError, match=r"parts that run code"):
        _ks(registry, root, load_path="dill", sha256=saved["dill"])  # pinned but not trusted
    with pytest.raises(ConfigError, match="needs a pinned sha256"):
        _ks(registry, root, load_path="dill", trusted=True)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        _ks(registry, root, load_path="dill", trusted=True, sha256="f" * 64)
    det = _ks(registry, root, load_path="dill", trusted=True, sha256=saved["dill"])
    assert not det.detect(to_columns({"x": saved["x_ref"][:300]})).drift


class _Marker:
    """Unpickling this creates a file: proof that the payload ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (self.path,))


def test_a_malicious_pickle_never_runs(
    registry: Registry, saved: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(saved["root"] / "plain", root / "evil")
    marker = tmp_path / "pwned"
    (root / "evil" / "preprocess_fn").mkdir()
    (root / "evil" / "preprocess_fn" / "function.dill").write_bytes(
        pickle.dumps(_Marker(str(marker)))
    )
    with (root / "evil" / "config.toml").open("a") as fh:
        fh.write('\n[preprocess_fn]\nsrc = "preprocess_fn/function.dill"\n')
    with pytest.raises(ModelLoadError, match="parts that run code"):
        _ks(registry, root, load_path="evil")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        _ks(registry, root, load_path="evil", trusted=True, sha256=saved["dill"])
    assert not marker.exists()
    # an object array in .npy needs pickle as well
    shutil.copytree(saved["root"] / "plain", root / "objects")
    np.save(
        root / "objects" / "x_ref.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True
    )
    with pytest.raises(ModelLoadError, match=r"run code when loaded \(x_ref\.npy\)"):
        _ks(registry, root, load_path="objects")


def test_config_paths_must_stay_inside_the_folder(
    registry: Registry, saved: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(saved["root"] / "plain", root / "escape")
    shutil.copy(saved["root"] / "plain" / "x_ref.npy", root / "outside.npy")
    cfg = root / "escape" / "config.toml"
    cfg.write_text(cfg.read_text().replace('x_ref = "x_ref.npy"', 'x_ref = "../outside.npy"'))
    digest = folder_digest(root / "escape")
    with pytest.raises(ModelLoadError, match="refers to a file outside the detector folder"):
        _ks(registry, root, load_path="escape", trusted=True, sha256=digest)
    cfg.write_text(cfg.read_text().replace('"../outside.npy"', '"/etc/x_ref.npy"'))
    with pytest.raises(ModelLoadError, match="outside the detector folder"):
        _ks(registry, root, load_path="escape")


def test_symlinks_and_escaping_load_paths_are_refused(
    registry: Registry, saved: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(saved["root"] / "plain", root / "linked")
    (root / "linked" / "extra.npy").symlink_to(saved["root"] / "plain" / "x_ref.npy")
    with pytest.raises(ModelLoadError, match="symlink"):
        _ks(registry, root, load_path="linked")
    with pytest.raises(ConfigError, match="outside the model root"):
        _ks(registry, root, load_path=str(saved["root"] / "plain"))


def test_a_saved_detector_of_another_kind(registry: Registry, saved: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match="is a KSDrift, not a CVMDrift"):
        make(
            registry,
            saved["root"],
            {"kind": "alibi-cvm", "load_path": "plain", "features": ["x[0]", "x[1]"]},
        )
    with pytest.raises(ConfigError, match="3 columns, but the saved detector's reference has 2"):
        _ks(registry, saved["root"], load_path="plain", features=["a", "b", "c"])


def test_digest_cli(saved: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["digest", str(saved["root"] / "dill")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == saved["dill"]
    assert "preprocess_fn/function.dill" in err


def test_the_class_is_exported() -> None:
    assert AlibiKS.kind == "alibi-ks"
