"""Reloads through the admin API: the repository manifest pins recipe versions too, and a
reload never changes the signature of a version that is serving (RELIABILITY P6, S3, S4).

Real ONNX models are built here with ``onnx.helper``: the iris-like one the recipe serves,
the same with other weights (a legitimate re-pin), and two with other signatures (a swapped
file). Every scenario runs requests while the admin call happens: none of them may fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from admin_support import art_repository_config as config
from admin_support import run
from onnx import TensorProto, helper, numpy_helper

from infercore.artifacts import sha256_file
from infercore.errors import ConfigError, ModelLoadError
from infercore.testing import metric_value, runtime_from_dict

LOAD = "/v2/repository/models/iris/load"


# -- models and the repository folder -------------------------------------------------------


def linear(
    seed: int, *, inputs: tuple[str, int] = ("input", 4), output: tuple[str, int] = ("probs", 3)
) -> bytes:
    """``output = input @ W + B`` with a variable batch dimension; ``seed`` picks the weights."""
    rng = np.random.default_rng(seed)
    (x, width), (y, classes) = inputs, output
    w = rng.normal(size=(width, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], [y])],
        "linear",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


IRIS = linear(1)
IRIS_RETRAINED = linear(2)  # the same signature, other weights
FRAUD = linear(3, inputs=("amount", 8), output=("score", 2))  # another model's file
WIDER = linear(4, inputs=("input", 5))  # the same names, another shape


def pin(root: Path, *versions: str) -> None:
    """Write the manifest: each version's file as it is now, ``sha256sum`` style."""
    art = root / "art"
    lines = [f"{sha256_file(art / f'v{v}' / 'model.onnx')}  v{v}/model.onnx" for v in versions]
    (art / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def put(root: Path, version: str, data: bytes) -> None:
    folder = root / "art" / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)


def repository(tmp: Path, *, pinned: tuple[str, ...] = ("1", "3")) -> Path:
    """Recipe version 1 and repository version 3 in ``art/v<version>``, as the QA setup."""
    root = tmp / "root"
    for v in ("1", "3"):
        put(root, v, IRIS)
    pin(root, *pinned)
    return root


def iris_body(width: int = 4) -> dict[str, Any]:
    data = [5.1, 3.5, 1.4, 0.2, 0.3][:width]
    return {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32", "data": data}]}


# -- the app, and traffic while the admin call runs ------------------------------------------


@asynccontextmanager
async def traffic(client: httpx.AsyncClient, url: str) -> AsyncIterator[list[int]]:
    """Requests in a loop from four clients while the block runs; their status codes."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def one_client() -> None:
        while not stop.is_set():
            r = await client.post(url, json=iris_body())
            statuses.append(r.status_code)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(one_client()) for _ in range(4)]
    await asyncio.sleep(0.05)
    try:
        yield statuses
    finally:
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)


def refused(r: httpx.Response, status: int, reason: str) -> str:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["reason"] == reason, doc
    assert "Traceback" not in r.text
    return str(doc["error"])


async def outputs(i: httpx.AsyncClient, version: str = "1") -> list[float]:
    r = await i.post(f"/v2/models/iris/versions/{version}/infer", json=iris_body())
    assert r.status_code == 200, r.text
    return list(r.json()["outputs"][0]["data"])


# -- (a) the manifest pins a recipe version ---------------------------------------------------


def test_a_swapped_file_the_manifest_pins_is_refused_on_reload(tmp_path: Path) -> None:
    """The QA scenario: recipe v1 has no sha256, SHA256SUMS pins it, the file is swapped."""
    root = repository(tmp_path)
    rt = runtime_from_dict(config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        before = rt.models["iris"].versions["1"]
        served = await outputs(i)
        async with traffic(i, "/v2/models/iris/infer") as statuses:
            put(root, "1", FRAUD)
            error = refused(
                await a.post(LOAD, json={"parameters": {"version": "1"}}), 422, "model_load_failed"
            )
        assert statuses and set(statuses) == {200}, statuses
        assert "sha256 mismatch" in error and "nothing changed" in error, error
        assert str(tmp_path) not in error
        assert rt.models["iris"].versions["1"] is before and before.ready
        assert await outputs(i) == served
        doc = (await a.get("/admin/models/iris")).json()
        assert "sha256" in doc["versions"][0]["last_load_error"]
        text = (await i.get("/metrics")).text
        assert metric_value(text, "infercore_model_load_failures_total", version="1") == 1
        audit = (await a.get("/admin/audit")).json()
        assert audit[-1]["event"] == "load_failed" and "sha256" in audit[-1]["error"]

        # The operator vouches for a retrained file of the same signature: the reload serves it.
        put(root, "1", IRIS_RETRAINED)
        pin(root, "1", "3")
        r = await a.post(LOAD, json={"parameters": {"version": "1"}})
        assert r.status_code == 200, r.text
        assert r.json()["version"]["stage"] == "primary"
        assert rt.models["iris"].versions["1"] is not before
        assert await outputs(i) != served

    run(rt, scenario)


def test_start_up_checks_the_manifest_pin_and_the_recipe_pin_must_agree(tmp_path: Path) -> None:
    root = repository(tmp_path)
    manifest = sha256_file(root / "art" / "v1" / "model.onnx")
    other = "ab" * 32

    with pytest.raises(ConfigError) as info:
        runtime_from_dict(config(sha256=other), recipes_dir=root)
    message = str(info.value)
    assert message.startswith("models.iris.versions.1.loader.sha256: the recipe pins"), message
    assert other in message and manifest in message and "'v1/model.onnx'" in message
    assert "SHA256SUMS" in message and str(tmp_path) not in message

    # Agreeing pins (any case) load.
    agreed = runtime_from_dict(config(sha256=manifest.upper()), recipes_dir=root)
    run(agreed, lambda a, i: outputs(i))

    # A file swapped before start-up: the required primary fails its pin (exit 1, not served).
    put(root, "1", IRIS_RETRAINED)
    swapped = runtime_from_dict(config(), recipes_dir=root)

    async def start() -> None:
        try:
            await swapped.start()
        finally:
            await swapped.stop()

    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        asyncio.run(start())


def test_a_manifest_re_pinned_against_the_recipe_pin_fails_the_reload(tmp_path: Path) -> None:
    root = repository(tmp_path)
    recipe_pin = sha256_file(root / "art" / "v1" / "model.onnx")
    rt = runtime_from_dict(config(sha256=recipe_pin), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        before = rt.models["iris"].versions["1"]
        async with traffic(i, "/v2/models/iris/infer") as statuses:
            put(root, "1", IRIS_RETRAINED)
            pin(root, "1", "3")
            error = refused(
                await a.post(LOAD, json={"parameters": {"version": "1"}}), 422, "model_load_failed"
            )
        assert statuses and set(statuses) == {200}
        new_pin = sha256_file(root / "art" / "v1" / "model.onnx")
        assert recipe_pin in error and new_pin in error and "can match only one" in error
        assert "nothing changed" in error
        assert rt.models["iris"].versions["1"] is before and before.ready
        text = (await i.get("/metrics")).text
        assert metric_value(text, "infercore_model_load_failures_total", version="1") == 1

    run(rt, scenario)


def test_an_unpinned_artifact_in_the_repository_folder_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = repository(tmp_path, pinned=("3",))
    with caplog.at_level(logging.WARNING, logger="infercore.runtime"):
        runtime_from_dict(config(), recipes_dir=root)
    lines = [r.getMessage() for r in caplog.records if "repository folder" in r.getMessage()]
    assert lines == [
        "models.iris.versions.1.loader: 'v1/model.onnx' is in the repository folder but "
        "neither SHA256SUMS nor the recipe pins its sha256; a reload reads whatever file is there"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infercore.runtime"):
        runtime_from_dict(config(), recipes_dir=repository(tmp_path / "pinned"))
    assert not [r for r in caplog.records if "repository folder" in r.getMessage()]


# -- (b) a serving version keeps its signature -------------------------------------------------


def test_a_reload_that_changes_a_serving_signature_is_refused(tmp_path: Path) -> None:
    """Even re-pinned (the manifest vouches for the file), another model's file under the
    primary's version is a 409; the same file loads as a new version."""
    root = repository(tmp_path)
    rt = runtime_from_dict(config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        before = rt.models["iris"].versions["1"]
        served = await outputs(i)
        async with traffic(i, "/v2/models/iris/infer") as statuses:
            put(root, "1", FRAUD)
            pin(root, "1", "3")
            error = refused(
                await a.post(LOAD, json={"parameters": {"version": "1"}}), 409, "conflict"
            )
        assert statuses and set(statuses) == {200}, statuses
        for change in (
            "input 'input' removed",
            "output 'probs' removed",
            "input 'amount' added (FP32 [-1, 8])",
            "output 'score' added (FP32 [-1, 2])",
        ):
            assert change in error, error
        assert "the old one keeps serving" in error
        assert "load the new artifact as a new version" in error and "roll it out" in error
        assert rt.models["iris"].versions["1"] is before and before.ready
        assert await outputs(i) == served
        doc = (await a.get("/admin/models/iris")).json()
        assert doc["primary"] == "1"
        assert "input 'amount' added" in doc["versions"][0]["last_load_error"]
        text = (await i.get("/metrics")).text
        assert metric_value(text, "infercore_model_load_failures_total", version="1") == 1
        assert metric_value(text, "infercore_model_ready", version="1") == 1
        audit = (await a.get("/admin/audit")).json()
        assert audit[-1]["event"] == "load_failed" and "signature" in audit[-1]["error"]

        # The fix the hint names: the new file as a new version, a candidate beside the primary.
        put(root, "4", FRAUD)
        pin(root, "1", "3", "4")
        r = await a.post(LOAD, json={"parameters": {"version": "4"}})
        assert r.status_code == 200, r.text
        assert r.json()["version"]["stage"] == "candidate"
        meta = (await i.get("/v2/models/iris/versions/4")).json()
        assert [t["name"] for t in meta["inputs"]] == ["amount"]

    run(rt, scenario)


def test_a_serving_repository_version_keeps_its_shapes_until_it_is_unloaded(
    tmp_path: Path,
) -> None:
    root = repository(tmp_path)
    rt = runtime_from_dict(config(), recipes_dir=root)

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        r = await a.post(LOAD, json={"parameters": {"version": "3"}})
        assert r.status_code == 200, r.text
        three = rt.models["iris"].versions["3"]
        async with traffic(i, "/v2/models/iris/versions/3/infer") as statuses:
            put(root, "3", WIDER)
            pin(root, "1", "3")
            error = refused(
                await a.post(LOAD, json={"parameters": {"version": "3"}}), 409, "conflict"
            )
        assert statuses and set(statuses) == {200}, statuses
        assert "input 'input' shape [-1, 4] -> [-1, 5]" in error, error
        assert "removed" not in error and "added" not in error
        assert rt.models["iris"].versions["3"] is three and three.ready

        # Nobody is served by an unloaded version: loading it again takes the new file.
        r = await a.post("/v2/repository/models/iris/unload", json={"parameters": {"version": "3"}})
        assert r.status_code == 200, r.text
        r = await a.post(LOAD, json={"parameters": {"version": "3"}})
        assert r.status_code == 200, r.text
        meta = (await i.get("/v2/models/iris/versions/3")).json()
        assert meta["inputs"][0]["shape"] == [-1, 5]
        r = await i.post("/v2/models/iris/versions/3/infer", json=iris_body(5))
        assert r.status_code == 200, r.text

    run(rt, scenario)
