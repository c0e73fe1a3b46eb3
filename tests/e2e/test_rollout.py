"""The fraud rollout as the README walks through it: a real server, the admin listener, the CLI.

``infercore serve +recipe=fraud admin.enabled=true`` serves champion v1 with challenger v2 in
shadow; the ``infercore models`` commands (real subprocesses) move v2 to canary (an approval),
set weights, promote it to primary (another approval) and roll back, while transactions flow.
The admin routes answer 404 on the inference port, need the token on the admin port, and every
decision lands in the audit log. SIGTERM at the end must exit 0 with no traceback logged.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import e2e_support as e2e
import httpx
import pytest

pytestmark = pytest.mark.e2e

TOKEN = "e2e-rollout-token-0123456789abcdef"
READY_WAIT_S = 90.0
HTTP_TIMEOUT = 10.0
COUNTRIES = ("US", "GB", "DE", "FR", "ES", "CA")
CATEGORIES = ("grocery", "restaurant", "online_retail", "fuel", "electronics", "travel")


@dataclass(frozen=True)
class Rollout:
    server: Any
    admin_url: str
    audit: Path

    def cli(self, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "INFERCORE_ADMIN_URL": self.admin_url}
        env.pop("INFERCORE_ADMIN_TOKEN", None)
        if token is not None:
            env["INFERCORE_ADMIN_TOKEN"] = token
        return subprocess.run(
            [str(e2e.INFERCORE), "models", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    folder = tmp_path_factory.mktemp("rollout")
    admin_port = e2e.free_port()
    audit = folder / "audit.jsonl"
    overrides = [
        "+recipe=fraud",
        f"++features.registry_path={folder / 'registry.db'}",
        f"++features.sqlite_path={folder / 'online_store.db'}",
        "admin.enabled=true",
        f"admin.port={admin_port}",
        f"admin.audit_log={audit}",
    ]
    os.environ["INFERCORE_ADMIN_TOKEN"] = TOKEN  # the server process inherits it
    try:
        server = e2e.start_server(overrides, folder / "server.log")
    finally:
        os.environ.pop("INFERCORE_ADMIN_TOKEN", None)
    try:
        e2e.wait_ready(server, READY_WAIT_S)
        yield Rollout(server, f"http://127.0.0.1:{admin_port}", audit)
    finally:
        code = e2e.stop_server(server)
        log = server.log_text()
        assert code == 0, f"the server exited with {code}:\n{log}"
        assert "Traceback" not in log, log
        assert TOKEN not in log


def transaction(rng: random.Random, card: str) -> dict[str, Any]:
    return {
        "card_id": card,
        "amount": round(rng.uniform(2, 300), 2),
        "hour": rng.randrange(24),
        "cross_border": 0,
        "merchant_category": rng.choice(CATEGORIES),
        "channel": rng.choice(["pos", "online"]),
        "country": rng.choice(COUNTRIES),
    }


V2_FIELDS = (
    ("card_id", "BYTES"),
    ("amount", "FP32"),
    ("hour", "FP32"),
    ("cross_border", "FP32"),
    ("merchant_category", "BYTES"),
    ("channel", "BYTES"),
    ("country", "BYTES"),
)


def v2_body(txn: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "datatype": dt, "shape": [1], "data": [txn[name]]}
            for name, dt in V2_FIELDS
        ]
    }


def served_version(client: httpx.Client, txn: dict[str, Any], **headers: str) -> str:
    r = client.post("/v2/models/fraud/infer", json=v2_body(txn), headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def check(result: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def test_the_rollout_walkthrough(rollout: Rollout) -> None:
    rng = random.Random(4)
    cards = [f"c_{i:06d}" for i in range(600)]
    with httpx.Client(base_url=rollout.server.url, timeout=HTTP_TIMEOUT) as http:
        # Champion v1 answers; challenger v2 only sees copies.
        out = check(rollout.cli("list"))
        assert "fraud  1        primary" in out and "fraud  2        shadow" in out, out
        r = http.post(
            "/v1/models/fraud:predict",
            json={"instances": [transaction(rng, c) for c in cards[:40]]},
        )
        assert r.status_code == 200, r.text
        assert {served_version(http, transaction(rng, c)) for c in cards[:20]} == {"1"}
        shadow: dict[str, Any] = {}
        for _ in range(100):
            shadow = json.loads(check(rollout.cli("shadow", "fraud")))["versions"]["2"]
            if shadow["copies"]["ok"] >= 21:
                break
        assert shadow["copies"]["ok"] >= 21 and shadow["rows_compared"] >= 60
        assert 0.5 <= shadow["agreement"] <= 1.0
        assert shadow["mean_abs_diff"]["fraud_probability"] > 0

        # Testing v2 in production: only a request that asks for it.
        assert (
            served_version(http, transaction(rng, "c_000001"), **{"X-Infercore-Variant": "2"})
            == "2"
        )

        # To canary: the recipe requires an approval.
        out = check(
            rollout.cli(
                "promote",
                "fraud",
                "2",
                "--to",
                "canary",
                "--weight",
                "10",
                "--by",
                "ann",
                "--reason",
                "shadow agrees",
            )
        )
        assert "pending" in out, out
        approval = out.split()[1]
        assert {served_version(http, transaction(rng, c)) for c in cards[:50]} == {"1"}
        assert approval in check(rollout.cli("approvals"))
        refused = rollout.cli("approve", approval, token=None)
        assert refused.returncode == 2 and "no admin token" in refused.stderr
        refused = rollout.cli("approve", approval, token="wrong-token-0123456789")
        assert refused.returncode == 1 and "HTTP 403" in refused.stderr
        out = check(rollout.cli("approve", approval, "--by", "bob", "--reason", "looks good"))
        assert "canary" in out and "10%" in out, out
        again = rollout.cli("approve", approval, "--by", "bob")
        assert again.returncode == 1 and "HTTP 409" in again.stderr

        # A tenth of the cards, each always on the same version.
        first = {c: served_version(http, transaction(rng, c)) for c in cards}
        assert {c: served_version(http, transaction(rng, c)) for c in cards[:100]} == {
            c: first[c] for c in cards[:100]
        }
        share = sum(v == "2" for v in first.values()) / len(cards)
        assert 0.03 < share < 0.2, share

        bad = rollout.cli("weights", "fraud", "1=80", "2=30")
        assert bad.returncode == 1 and "add up to 110" in bad.stderr
        check(rollout.cli("weights", "fraud", "1=50", "2=50", "--by", "ann"))

        # To primary: another approval.
        out = check(rollout.cli("promote", "fraud", "2", "--to", "primary", "--by", "ann"))
        approval = out.split()[1]
        check(rollout.cli("approve", approval, "--by", "bob"))
        assert {served_version(http, transaction(rng, c)) for c in cards[:30]} == {"2"}

        # Rollback: one call, no approval.
        out = check(rollout.cli("rollback", "fraud", "--by", "carol", "--reason", "alerts"))
        assert "fraud  1        primary" in out, out
        assert {served_version(http, transaction(rng, c)) for c in cards[:30]} == {"1"}

        # The admin API is not on the inference port.
        for method, path in (
            ("GET", "/admin/models"),
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/fraud/load"),
        ):
            r = http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 404, (method, path, r.text)
        metrics = http.get("/metrics").text
        assert 'infercore_route_requests_total{model="fraud",role="canary"' in metrics
        assert 'infercore_shadow_requests_total{model="fraud",outcome="ok",version="2"}' in metrics

    events = [json.loads(line) for line in rollout.audit.read_text().splitlines()]
    assert [(e["event"], e["actor"]) for e in events] == [
        ("approval_requested", "ann"),
        ("approved", "bob"),
        ("promoted", "bob"),
        ("weights_set", "ann"),
        ("approval_requested", "ann"),
        ("approved", "bob"),
        ("promoted", "bob"),
        ("rolled_back", "carol"),
    ]
    assert events[0]["reason"] == "shadow agrees" and events[-1]["reason"] == "alerts"
