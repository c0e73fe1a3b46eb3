"""A model load failure whose exception quotes credentials (an object store URL with its keys,
a database password) reaches the admin API, the error body of a run-time load and the logs
with them masked, as ``infercore config show`` masks them (RELIABILITY S6):
``Runtime.scrub`` strips the model root and redacts credentials."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from admin_support import run

from infercore.components import Model, Tensors
from infercore.hookspecs import hookimpl
from infercore.testing import runtime_from_dict

#: What the loader's exception says: an S3 URL with its access key and secret, libpq's
#: environment variable and a password holding a comma.
SECRETS = ("wJalrXUtnFEMI0K7MDENGbPxRfiCY", "hunter2", "again")
LEAK = (
    "cannot fetch s3://minio:wJalrXUtnFEMI0K7MDENGbPxRfiCY@minio.internal:9000/models/m/2/"
    "model.onnx (feature store: PGPASSWORD=hunter2 password=hunter2,again)"
)
MASKED = (
    "cannot fetch s3://***@minio.internal:9000/models/m/2/model.onnx "
    "(feature store: PGPASSWORD=*** password=***)"
)


class _LeakyModel(Model):
    """Fails to load with an error that quotes the credentials it used."""

    kind = "leaky"

    async def start(self) -> None:
        raise OSError(LEAK)

    async def predict(self, inputs: Tensors) -> Tensors:  # pragma: no cover - never loads
        raise AssertionError("never loaded")


class _LeakyPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [_LeakyModel]


def leaky_runtime() -> Any:
    cfg = {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": {"kind": "fake"}},
                    "2": {"loader": {"kind": "leaky"}},
                },
            }
        },
    }
    return runtime_from_dict(cfg, extra_plugins=[("leaky", _LeakyPlugin())])


def assert_masked(text: str) -> None:
    assert MASKED in text, text
    for secret in SECRETS:
        assert secret not in text, (secret, text)


def test_scrub_masks_credentials_and_the_model_root() -> None:
    rt = leaky_runtime()
    root = str(rt.composed.model_root)
    assert rt.scrub(f"{LEAK} in {root}/m/2") == f"{MASKED} in <model_root>/m/2"


def test_a_load_failure_quoting_credentials_is_shown_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = leaky_runtime()

    async def scenario(a: httpx.AsyncClient, i: httpx.AsyncClient) -> None:
        # At start: version 2 failed, version 1 serves; the admin API shows why, masked.
        doc = (await a.get("/admin/models/m")).json()
        (v2,) = [v for v in doc["versions"] if v["version"] == "2"]
        assert v2["state"] == "failed"
        assert_masked(v2["error"])
        # At run time: the error body of the load, and the event the audit log records.
        events: list[dict[str, Any]] = []
        rt.listeners.append(events.append)
        r = await a.post("/v2/repository/models/m/load", json={"parameters": {"version": "2"}})
        assert r.status_code == 422, r.text
        assert r.json()["reason"] == "model_load_failed"
        assert_masked(r.text)
        (failed,) = [e for e in events if e["event"] == "load_failed"]
        assert_masked(failed["reason"])
        doc = (await a.get("/admin/models/m")).json()
        (v2,) = [v for v in doc["versions"] if v["version"] == "2"]
        assert_masked(v2["error"])

    with caplog.at_level(logging.DEBUG, logger="infercore"):
        run(rt, scenario)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "failed to load" in logged
    assert_masked(logged)
