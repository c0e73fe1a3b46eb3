"""The repository manifest pins an ONNX model's external data too (RELIABILITY S2, S3, P6).

``SHA256SUMS`` lists the data files beside the ``.onnx`` file (``v3/model.onnx`` and
``v3/weights.bin``); the runtime hands the ONNX loader the pins of the files in the artifact's
folder (``external_data_sha256``), for admin-loaded repository versions and recipe versions in
the repository folder alike. Swapped weights fail the load and the old version serves on.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from admin_support import art_repository_config as config
from admin_support import run

from infercore.artifacts import sha256_file
from infercore.errors import ConfigError
from infercore.testing import runtime_from_dict

onnx = pytest.importorskip("onnx")
pytest.importorskip("infercore_onnx")

LOAD = "/v2/repository/models/iris/load"
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def write_model(folder: Path, seed: int) -> None:
    """``probs = input @ W`` with ``W`` (4x3, seeded) in ``weights.bin`` beside ``model.onnx``."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["probs"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "weights.bin"):
        (folder / stale).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )


def pin(root: Path, *files: str) -> None:
    art = root / "art"
    (art / "SHA256SUMS").write_text("".join(f"{sha256_file(art / f)}  {f}\n" for f in files))


def setup(tmp: Path) -> Path:
    root = tmp / "root"
    write_model(root / "art" / "v1", seed=1)
    write_model(root / "art" / "v3", seed=3)
    pin(root, "v1/model.onnx", "v1/weights.bin", "v3/model.onnx", "v3/weights.bin")
    return root


async def outputs(i: httpx.AsyncClient, version: str) -> list[float]:
    r = await i.post(f"/v2/models/iris/versions/{version}/infer", json=BODY)
    assert r.status_code == 200, r.text
    return list(r.json()["outputs"][0]["data"])


def test_a_repository_version_with_pinned_external_data_loads_and_swapped_weights_fail(
    tmp_path: Path,
) -> None:
    root = setup(tmp_path)
    rt = runtime_from_dict(config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(LOAD, json={"parameters": {"version": "3"}})
        assert r.status_code == 200, r.text
        served = await outputs(i, "3")
        before = rt.models["iris"].versions["3"]
        # Other weights behind the same .onnx file: only the data file's pin can tell.
        write_model(tmp_path / "other", seed=4)
        (root / "art" / "v3" / "weights.bin").write_bytes(
            (tmp_path / "other" / "weights.bin").read_bytes()
        )
        r = await a.post(LOAD, json={"parameters": {"version": "3"}})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "weights.bin" in error and "sha256" in error, error
        assert str(tmp_path) not in error
        assert rt.models["iris"].versions["3"] is before
        assert await outputs(i, "3") == served

    run(rt, scenario)


def test_a_manifest_that_pins_the_onnx_file_but_not_its_data_refuses_the_load(
    tmp_path: Path,
) -> None:
    root = setup(tmp_path)
    pin(root, "v1/model.onnx", "v1/weights.bin", "v3/model.onnx")
    rt = runtime_from_dict(config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(LOAD, json={"parameters": {"version": "3"}})
        assert r.status_code == 422, r.text
        assert "weights.bin" in r.json()["error"], r.text
        assert "3" not in rt.models["iris"].versions

    run(rt, scenario)


def test_a_recipe_version_in_the_folder_gets_the_data_pins_and_must_agree(tmp_path: Path) -> None:
    root = setup(tmp_path)
    # The manifest's pins reach the recipe version: it starts and serves.
    run(runtime_from_dict(config(), recipes_dir=root), lambda a, i: outputs(i, "1"))
    wrong = {"weights.bin": "0" * 64}
    with pytest.raises(ConfigError) as info:
        run(runtime_from_dict(config(external_data_sha256=wrong), recipes_dir=root), None)
    message = str(info.value)
    assert "external_data_sha256" in message and "weights.bin" in message, message
    assert "SHA256SUMS" in message, message
