"""Every error that echoes a model name or version a client sent cuts it the same way
(:func:`infercore.runtime.errors.quoted`): a valid name is shown whole, a longer one cut and
marked, so a client cannot make an error body as long as its URL (RELIABILITY S6)."""

from __future__ import annotations

from typing import Any

from infercore.runtime.errors import ECHO_CHARS, quoted
from infercore.testing import app_client, runtime_from_dict

LONG_VERSION = "1" * 8000
LONG_MODEL = "m" * 8000
CUT_VERSION = f"'{'1' * ECHO_CHARS}'… (8000 characters)"
CUT_MODEL = f"'{'m' * ECHO_CHARS}'… (8000 characters)"


def config() -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {"m": {"versions": {"1": {"loader": {"kind": "fake"}}}}},
    }


def body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def test_quoted_keeps_valid_names_whole_and_cuts_longer_ones() -> None:
    assert quoted("m" * 64) == repr("m" * 64)  # the longest valid model name
    assert quoted(LONG_VERSION) == CUT_VERSION
    assert quoted("a\nb") == "'a\\nb'"  # control characters never reach a message raw


def test_every_path_that_echoes_a_long_version_or_model_cuts_it_alike() -> None:
    with app_client(runtime_from_dict(config())) as c:
        versions = [
            c.get(f"/v2/models/m/versions/{LONG_VERSION}"),
            c.get(f"/v2/models/m/versions/{LONG_VERSION}/ready"),
            c.post(f"/v2/models/m/versions/{LONG_VERSION}/infer", json=body()),
            c.post(
                f"/v1/models/m/versions/{LONG_VERSION}:predict", json={"instances": [[1, 2, 3, 4]]}
            ),
        ]
        models = [
            c.get(f"/v2/models/{LONG_MODEL}"),
            c.get(f"/v2/models/{LONG_MODEL}/ready"),
            c.get(f"/v2/models/{LONG_MODEL}/versions/1"),
            c.post(f"/v2/models/{LONG_MODEL}/infer", json=body()),
        ]
        for r in versions:
            assert r.status_code == 404, r.text
            assert r.json() == {
                "error": f"model 'm' has no version {CUT_VERSION} (hint: versions: 1)",
                "reason": "model_not_found",
            }, r.text
            assert len(r.content) < 300
        for r in models:
            assert r.status_code == 404, r.text
            assert r.json()["error"].startswith(f"unknown model {CUT_MODEL} (hint:"), r.text
            assert len(r.content) < 300
        # A name that could be valid is echoed whole.
        r = c.get(f"/v2/models/m/versions/{'9' * 32}")
        assert r.json()["error"].startswith(f"model 'm' has no version '{'9' * 32}' (hint")


def test_a_v1_path_without_its_verb_is_cut_alike() -> None:
    with app_client(runtime_from_dict(config())) as c:
        r = c.post(f"/v1/models/m/versions/{LONG_VERSION}", json={"instances": [[1, 2, 3, 4]]})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("unknown V1 verb in '"), r.text
    assert "… (" in r.json()["error"] and len(r.content) < 300, r.text
