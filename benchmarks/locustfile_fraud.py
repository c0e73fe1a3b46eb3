"""Load test of ``infercore serve +recipe=fraud``: card transactions scored with Feast features.

Each simulated user is a payments service sending transactions back to back (closed loop):

- mostly V1, one transaction per request (``POST /v1/models/fraud:predict``,
  ``{"instances": [{"card_id": ..., "amount": ..., ...}]}``), as a card network would;
- some V2 (``POST /v2/models/fraud/infer``, one named input per field, shape ``[N]``);
- some batches of 8 transactions (V1 and V2), as a settlement or replay job would.

Transactions look like the recipe's data (``recipes/fraud/data/``):

- cards are the real card ids of ``card_features.parquet`` with a skewed popularity (Zipf,
  exponent ``FRAUD_LOAD_ZIPF``, default 1.0, over a fixed shuffle: a few cards are very busy,
  most are rare, so the feature cache sees hits and misses), plus ~2 % cards Feast does not know
  (``FRAUD_LOAD_UNKNOWN``, default 0.02: new cards, answered with the documented defaults);
- the merchant category, channel, country, cross-border flag and hour come together from a
  random real transaction of ``transactions.parquet`` (so their mix and their combinations are
  the data's: no ATM in a web shop);
- the amount is log-normal with the data's log-mean and log-spread, cash withdrawals in tens.

Every answer is checked: a 200 with one ``fraud_probability`` in [0, 1] and a boolean
``is_fraud`` per transaction and no ``X-Infercore-Degraded`` header; anything else is a failure.

    uv run locust -f benchmarks/locustfile_fraud.py --host http://127.0.0.1:8080

``benchmarks/run_fraud_load.sh`` starts a server and runs this headless in one command. With
``INFERCORE_LOAD_SUMMARY=path.json`` set, the final figures are written there when Locust exits.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import locust_summary  # noqa: F401  (writes the JSON summary at quit)
import pyarrow.compute as pc
import pyarrow.parquet as pq
from locust import FastHttpUser, events, task

DATA = Path(__file__).resolve().parents[1] / "recipes" / "fraud" / "data"
ZIPF = float(os.environ.get("FRAUD_LOAD_ZIPF", "1.0"))
UNKNOWN_SHARE = float(os.environ.get("FRAUD_LOAD_UNKNOWN", "0.02"))
BATCH = 8
JSON_HEADERS = {"content-type": "application/json"}
CONTEXT = ("merchant_category", "channel", "country", "cross_border", "hour")


class World:
    """What the transactions are drawn from, read once per Locust process."""

    def __init__(self, seed: int = 20261128) -> None:
        cards = pq.read_table(DATA / "card_features.parquet", columns=["card_id"])
        ids = sorted(pc.unique(cards.column("card_id")).to_pylist())
        random.Random(seed).shuffle(ids)  # popularity is not tied to the id's number
        self.cards = ids
        weights = [1.0 / (rank + 1) ** ZIPF for rank in range(len(ids))]
        self.cum_weights = list(itertools.accumulate(weights))
        txns = pq.read_table(DATA / "transactions.parquet", columns=[*CONTEXT, "amount"])
        self.context = list(zip(*(txns.column(c).to_pylist() for c in CONTEXT), strict=True))
        logs = pc.ln(txns.column("amount"))
        self.log_mean = pc.mean(logs).as_py()
        self.log_std = pc.stddev(logs).as_py()

    def card(self, rng: random.Random) -> str:
        if rng.random() < UNKNOWN_SHARE:
            return f"c_new_{rng.randrange(10**8):08d}"
        x = rng.random() * self.cum_weights[-1]
        return self.cards[bisect.bisect_left(self.cum_weights, x)]

    def transaction(self, rng: random.Random) -> dict[str, Any]:
        category, channel, country, cross_border, hour = rng.choice(self.context)
        amount = math.exp(rng.gauss(self.log_mean, self.log_std))
        amount = max(10.0, round(amount, -1)) if category == "cash_withdrawal" else amount
        return {
            "card_id": self.card(rng),
            "amount": max(0.01, round(amount, 2)),
            "hour": int(hour),
            "cross_border": int(cross_border),
            "merchant_category": category,
            "channel": channel,
            "country": country,
        }


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


def v2_body(txns: list[dict[str, Any]]) -> dict[str, Any]:
    def column(name: str, datatype: str) -> dict[str, Any]:
        return {
            "name": name,
            "datatype": datatype,
            "shape": [len(txns)],
            "data": [t[name] for t in txns],
        }

    return {
        "inputs": [
            column("card_id", "BYTES"),
            column("amount", "FP32"),
            column("hour", "FP32"),
            column("cross_border", "FP32"),
            column("merchant_category", "BYTES"),
            column("channel", "BYTES"),
            column("country", "BYTES"),
        ]
    }


def _failed(r: Any) -> bool:
    if r.status_code != 200:
        r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
        return True
    if r.headers.get("x-infercore-degraded"):
        r.failure(f"degraded: {r.headers['x-infercore-degraded']}")
        return True
    return False


class FraudUser(FastHttpUser):
    """One payments client scoring transactions as fast as answers come back."""

    def on_start(self) -> None:
        self.rng = random.Random()
        self.world = world()

    def txns(self, n: int) -> list[dict[str, Any]]:
        return [self.world.transaction(self.rng) for _ in range(n)]

    def _v1(self, n: int, name: str) -> None:
        with self.client.post(
            "/v1/models/fraud:predict",
            data=json.dumps({"instances": self.txns(n)}),
            headers=JSON_HEADERS,
            name=name,
            catch_response=True,
        ) as r:
            if _failed(r):
                return
            predictions = r.json()["predictions"]
            ok = len(predictions) == n and all(
                0.0 <= p["fraud_probability"] <= 1.0 and isinstance(p["is_fraud"], bool)
                for p in predictions
            )
            if not ok:
                r.failure(f"bad predictions for {n} transactions: {predictions!r:.200}")

    def _v2(self, n: int, name: str) -> None:
        with self.client.post(
            "/v2/models/fraud/infer",
            data=json.dumps(v2_body(self.txns(n))),
            headers=JSON_HEADERS,
            name=name,
            catch_response=True,
        ) as r:
            if _failed(r):
                return
            out = {o["name"]: o for o in r.json()["outputs"]}
            probs = out.get("fraud_probability", {}).get("data", [])
            flags = out.get("is_fraud", {}).get("data", [])
            if len(probs) != n or len(flags) != n or not all(0.0 <= p <= 1.0 for p in probs):
                r.failure(f"bad outputs for {n} transactions: {list(out)!r}")

    @task(14)
    def v1_single(self) -> None:
        self._v1(1, "v1 single")

    @task(4)
    def v2_single(self) -> None:
        self._v2(1, "v2 single")

    @task(1)
    def v1_batch(self) -> None:
        self._v1(BATCH, f"v1 batch {BATCH}")

    @task(1)
    def v2_batch(self) -> None:
        self._v2(BATCH, f"v2 batch {BATCH}")


@events.init.add_listener
def _load_data_first(**_: Any) -> None:
    world()  # read the data before the users start, not inside the first request
