"""``server.max_output_bytes`` through the app (RELIABILITY P14: output limits are checked
before allocating).

The ``fake`` model echoes its input as ``echo``: its output grows with the request, as a
tile or expand model's does. Past the limit the answer is 400 ``output_too_large`` naming the
size, the limit and the option, counted like every rejection; asking only for the small
output is served; a large response under the limit is the same JSON as ever.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from infercore.testing import app_client, fake_model_config, metric_value, runtime_from_dict

ROWS = 1000  # echo: 1000 x 4 FP32 = 16,000 bytes; y: 4,000 bytes


def client_for(**server: Any) -> Any:
    return app_client(runtime_from_dict(fake_model_config(server=server)))


def v2_body(rows: int, **extra: Any) -> dict[str, Any]:
    data = np.arange(rows * 4, dtype=np.float32).tolist()
    return {
        "inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": data}],
        **extra,
    }


def test_a_response_over_the_limit_is_400_output_too_large_and_counted() -> None:
    with client_for(max_output_bytes=10_000) as client:
        r = client.post("/v2/models/m/infer", json=v2_body(ROWS))
        assert r.status_code == 400, r.text
        doc = r.json()
        assert doc["reason"] == "output_too_large"
        assert "would carry 20000 bytes of tensor data; the limit is 10000" in doc["error"]
        assert "server.max_output_bytes" in doc["error"]
        metrics = client.get("/metrics").text
        assert (
            metric_value(
                metrics,
                "infercore_request_failures_total",
                model="m",
                version="1",
                reason="output_too_large",
            )
            == 1
        )
        # The server serves on, and a request within the limit is answered.
        assert client.post("/v2/models/m/infer", json=v2_body(10)).status_code == 200


def test_asking_only_for_the_outputs_needed_fits_the_limit() -> None:
    with client_for(max_output_bytes=10_000) as client:
        r = client.post("/v2/models/m/infer", json=v2_body(ROWS, outputs=[{"name": "y"}]))
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["y"]


def test_v1_has_the_same_limit() -> None:
    with client_for(max_output_bytes=10_000) as client:
        instances = np.ones((ROWS, 4)).tolist()
        r = client.post("/v1/models/m:predict", json={"instances": instances})
        assert r.status_code == 400, r.text
        assert r.json()["reason"] == "output_too_large"


def test_the_default_limit_is_finite() -> None:
    from infercore.config.schema import ServerConfig

    assert ServerConfig().max_output_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("binary", [False, True])
def test_a_large_response_under_the_limit_is_the_usual_answer(binary: bool) -> None:
    rows = 20_000  # echo: 320 KB of tensor data, encoded in parts
    extra = {"parameters": {"binary_data_output": True}} if binary else {}
    with client_for(max_body_bytes=2**24, max_request_rows=rows) as client:
        r = client.post("/v2/models/m/infer", json=v2_body(rows, **extra))
        assert r.status_code == 200, r.text[:300]
        assert int(r.headers["content-length"]) == len(r.content)
        if binary:
            head_len = int(r.headers["inference-header-content-length"])
            head = json.loads(r.content[:head_len])
            echo = head["outputs"][1]
            start = head_len + head["outputs"][0]["parameters"]["binary_data_size"]
            values = np.frombuffer(r.content[start:], dtype="<f4")
            assert echo["parameters"]["binary_data_size"] == values.nbytes
        else:
            echo = r.json()["outputs"][1]
            values = np.array(echo["data"], dtype=np.float32)
        assert echo["shape"] == [rows, 4]
        np.testing.assert_array_equal(values, np.arange(rows * 4, dtype=np.float32))
        v1 = client.post("/v1/models/m:predict", json={"instances": np.ones((rows, 4)).tolist()})
        assert v1.status_code == 200
        predictions = v1.json()["predictions"]
        assert len(predictions) == rows and predictions[-1] == {"y": 4.0, "echo": [1.0] * 4}


@pytest.mark.parametrize("value", [0, -1, 2**34 + 1])
def test_the_limit_is_checked_in_the_config(value: int) -> None:
    from infercore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.max_output_bytes"):
        runtime_from_dict(fake_model_config(server={"max_output_bytes": value}))
