"""Load test of ``infercore serve +recipe=iris``: a realistic mix of V2 and V1 requests.

Each simulated user sends, back to back (no think time; closed loop):

- V2 JSON (``POST /v2/models/iris/infer``), mostly one row, sometimes a small batch;
- V2 with the binary tensor extension, as ``tritonclient[http]`` sends it by default;
- V1 ``instances`` as arrays and as named-field objects (``sepal_length`` ...), which the
  recipe's feature source assembles into the model's ``input``.

Rows are iris-like: drawn per species from a normal distribution around that species' means.
Every answer is checked (status, one label per row); anything else counts as a failure.

    uv run locust -f benchmarks/locustfile_iris.py --host http://127.0.0.1:8080

``benchmarks/run_iris_load.sh`` starts a server and runs this headless in one command. With
``INFERCORE_LOAD_SUMMARY=path.json`` set, the final figures (locust's own, taken at exit) are
written there (benchmarks/locust_summary.py).
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import locust_summary  # noqa: F401  (writes the JSON summary at quit)
from locust import FastHttpUser, task

FIELDS = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# Per-species means and standard deviations of the four measurements (cm), from the data set.
SPECIES = (
    ((5.01, 3.43, 1.46, 0.25), (0.35, 0.38, 0.17, 0.11)),  # setosa
    ((5.94, 2.77, 4.26, 1.33), (0.52, 0.31, 0.47, 0.20)),  # versicolor
    ((6.59, 2.97, 5.55, 2.03), (0.64, 0.32, 0.55, 0.27)),  # virginica
)
# Rows per request: mostly single flowers, like an online caller; now and then a small batch.
ROW_COUNTS = (1, 1, 1, 1, 1, 1, 2, 4, 8)
JSON_HEADERS = {"content-type": "application/json"}


def iris_row(rng: random.Random) -> list[float]:
    means, stds = rng.choice(SPECIES)
    return [round(max(0.1, rng.gauss(m, s)), 1) for m, s in zip(means, stds, strict=True)]


def v2_binary_body(rows: list[list[float]]) -> tuple[bytes, int]:
    """A V2 request with the binary tensor extension, laid out as tritonclient does it."""
    blob = struct.pack(f"<{4 * len(rows)}f", *(v for row in rows for v in row))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [len(rows), 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + blob, len(header)


class IrisUser(FastHttpUser):
    """One client calling the iris model as fast as answers come back."""

    def on_start(self) -> None:
        self.rng = random.Random()

    def rows(self) -> list[list[float]]:
        return [iris_row(self.rng) for _ in range(self.rng.choice(ROW_COUNTS))]

    @task(5)
    def v2_json(self) -> None:
        rows = self.rows()
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [len(rows), 4],
                    "datatype": "FP32",
                    "data": [v for row in rows for v in row],
                }
            ]
        }
        with self.client.post(
            "/v2/models/iris/infer", json=body, name="v2 json", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            outputs = {o["name"]: o for o in r.json()["outputs"]}
            if outputs["label"]["shape"] != [len(rows)]:
                r.failure(f"expected {len(rows)} labels, got {outputs['label']['shape']}")

    @task(2)
    def v2_binary(self) -> None:
        rows = self.rows()
        body, header_length = v2_binary_body(rows)
        headers = {
            "Inference-Header-Content-Length": str(header_length),
            "content-type": "application/octet-stream",
        }
        with self.client.post(
            "/v2/models/iris/infer",
            data=body,
            headers=headers,
            name="v2 binary",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            length = int(r.headers["inference-header-content-length"])
            head = json.loads(r.content[:length])
            label = next(o for o in head["outputs"] if o["name"] == "label")
            if label["parameters"]["binary_data_size"] != 8 * len(rows):
                r.failure("the binary label tensor has the wrong size")

    @task(2)
    def v1_arrays(self) -> None:
        rows = self.rows()
        with self.client.post(
            "/v1/models/iris:predict",
            json={"instances": rows},
            name="v1 arrays",
            catch_response=True,
        ) as r:
            self._check_v1(r, len(rows))

    @task(3)
    def v1_objects(self) -> None:
        rows = self.rows()
        instances = [dict(zip(FIELDS, row, strict=True)) for row in rows]
        with self.client.post(
            "/v1/models/iris:predict",
            json={"instances": instances},
            name="v1 objects",
            catch_response=True,
        ) as r:
            self._check_v1(r, len(rows))

    @staticmethod
    def _check_v1(r: Any, count: int) -> None:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            return
        predictions = r.json()["predictions"]
        if len(predictions) != count or any(p["label"] not in (0, 1, 2) for p in predictions):
            r.failure(f"bad predictions for {count} rows: {predictions!r:.200}")
