"""The fraud recipe's drift -> retrain -> approval loop, end to end against a real server.

    uv run python benchmarks/fraud_drift_loop.py                   # alibi-detect TabularDrift
    uv run python benchmarks/fraud_drift_loop.py --detector stats  # drift-stats ks + chi2

What it does, printing each step with a timestamp:

1. copies ``recipes/fraud.yaml`` and ``recipes/fraud/`` into a temporary folder (nothing in the
   repository changes) and enables the loop the recipe declares (commented there): sampling
   every request, small windows, ``action_order: sequential``, actions ``log``, ``webhook``
   (to a receiver in this script, allow-listed on 127.0.0.1), ``command`` (``retrain.py``)
   and ``register_candidate`` (``after: command``, ``shadow: true``);
2. starts ``infercore serve +recipe=fraud_loop`` with the admin listener, all on 127.0.0.1;
3. (a) sends transactions of the original world's held-out days for ``--windows`` windows and
   counts windows tested and windows flagged: the false-alarm rate. The detectors compare with
   ``reference_served.parquet`` (inputs as served, drawn from a seeded quarter of those days);
   only the other three quarters are replayed (``reference.replay_mask``), so no window holds
   a row of its own reference;
4. (b) sends transactions of the same days with a new fraud tactic (``generate.py --shift``,
   the same replay part) until drift is reported: requests and transactions until detection;
5. (c) the webhook receiver gets the event; (d) the command retrains (exit code, output);
   (e) ``register_candidate`` loads the new version 3 and moves it to shadow (admin API);
6. (f) a person asks to put v3 on canary at ``--canary-weight`` %, which the recipe gates:
   a pending approval; another person approves it: v3 serves that share of traffic.

Exits 1 when a step does not happen within ``--step-timeout`` seconds, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
T0 = time.monotonic()
FIELDS = ("card_id", "amount", "hour", "cross_border", "merchant_category", "channel", "country")


class StepFailed(Exception):
    pass


def say(step: str, text: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {step:<9} {text}", flush=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the webhook receiver ---------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                try:
                    received.append(json.loads(self.rfile.read(min(n, 1 << 20))))
                    self.send_response(204)
                except ValueError:
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the recipe copy ----------------------------------------------------------------------------


def loop_actions(hook_port: int) -> list[dict[str, Any]]:
    """The loop the recipe declares (commented out in recipes/fraud.yaml), with this port."""
    return [
        {"kind": "log"},
        {
            "kind": "webhook",
            "url": f"http://127.0.0.1:{hook_port}/drift",
            "allow_hosts": ["127.0.0.1"],
            "timeout_s": 2,
            "retries": 1,
        },
        {
            "kind": "command",
            "argv": [
                "{python}",
                "fraud/retrain.py",
                "--artifacts",
                "fraud/artifacts",
                "{event_file}",
            ],
            "timeout_s": 300,
        },
        {"kind": "register_candidate", "after": "command", "shadow": True, "timeout_s": 120},
    ]


def detectors(kind: str) -> dict[str, Any]:
    # inputs as served (recipes/fraud/reference.py), as in recipes/fraud.yaml
    ref = "fraud/artifacts/reference_served.parquet"
    numeric = ["amount", "hour", "txn_count_1h", "txn_count_24h", "amount_avg_7d"]
    cats = ["merchant_category", "channel"]
    if kind == "alibi":
        return {
            "inputs_tabular": {
                "kind": "alibi-tabular",
                "reference": ref,
                "features": [*numeric, *cats],
                "p_val": 0.01,
            }
        }
    return {
        "numeric_ks": {"kind": "ks", "reference": ref, "features": numeric, "p_val": 0.01},
        "categories_chi2": {"kind": "chi2", "reference": ref, "features": cats, "p_val": 0.01},
    }


def make_recipes(tmp: Path, args: argparse.Namespace, hook_port: int) -> Path:
    recipes = tmp / "recipes"
    recipes.mkdir()
    shutil.copy(REPO / "recipes" / "fraud.yaml", recipes / "fraud.yaml")
    shutil.copytree(
        REPO / "recipes" / "fraud",
        recipes / "fraud",
        ignore=shutil.ignore_patterns("__pycache__", "*.db", "data_store*", "v3*"),
    )
    doc = yaml.safe_load((REPO / "recipes" / "fraud.yaml").read_text())
    # The recipe's 50 ms feature-read budget answers 503 (fail-closed) when a busy machine
    # stalls the server for a moment; this measures drift, not latency, and a failed request
    # would leave its transactions out of the windows.
    doc["features"]["timeout_ms"] = 2_000
    drift = doc["models"]["fraud"]["drift"]
    drift.update(
        sample_rate=1.0,
        window_size=args.window,
        queue_size=args.window * 4,
        cooldown_s=3600,
        action_order="sequential",
        detectors=detectors(args.detector),
    )
    # fraud_calm: the false-alarm count, actions only logged (a false alarm must not retrain
    # before the shift); fraud_loop: the whole loop.
    for name, actions in (
        ("fraud_calm", [{"kind": "log"}]),
        ("fraud_loop", loop_actions(hook_port)),
    ):
        drift["actions"] = actions
        (recipes / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(doc))
    return recipes


# --- traffic ------------------------------------------------------------------------------------


def transactions(recipes: Path, shift: float, seed: int) -> list[dict[str, Any]]:
    """The held-out days (the last 6 of 30) of the original world, or of the shifted one.

    Only the replay part: the rest of those days is where the served reference comes from.
    """
    sys.path.insert(0, str(recipes / "fraud"))
    import pandas as pd
    from generate import generate
    from reference import held_out, replay_mask

    df = (
        generate(shift=shift)
        if shift > 0
        else pd.read_parquet(recipes / "fraud/data/transactions.parquet")
    )
    df = df[held_out(df) & replay_mask(df)]
    df = df.sample(frac=1.0, random_state=seed)
    df["hour"] = df["hour"].astype(float)
    df["cross_border"] = df["cross_border"].astype(float)
    return [dict(zip(FIELDS, row, strict=True)) for row in df[list(FIELDS)].itertuples(index=False)]


def post(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30) -> Any:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class Admin:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.base + path, headers=self.auth)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        return post(self.base + path, body, self.auth)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except (OSError, urllib.error.URLError):
            got = None
        if got:
            return got
        time.sleep(every)
    raise StepFailed(f"{what}: not within {timeout:g} s")


def stages(admin: Admin) -> str:
    doc = admin.get("/admin/models/fraud")
    parts = []
    for v in doc["versions"]:
        w = f" {v['weight']:g}%" if v["stage"] == "canary" else ""
        parts.append(f"v{v['version']}={v['stage']}{w}({v['state']})")
    return f"primary v{doc['primary']} ({doc['primary_weight']:g}%): " + ", ".join(parts)


def chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


# --- the loop -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> None:
    hook = Receiver()
    recipes = make_recipes(tmp, args, hook.port)
    token = secrets.token_hex(24)
    exe = Path(sys.executable).with_name("infercore")
    program = str(exe) if exe.exists() else "infercore"
    env = {**os.environ, "INFERCORE_RECIPES_DIR": str(recipes), "INFERCORE_ADMIN_TOKEN": token}
    say("setup", f"recipe copy in {tmp}; detector {args.detector}; window {args.window} rows")
    normal = transactions(recipes, 0.0, args.seed)
    shifted = transactions(recipes, args.shift, args.seed)
    servers: list[tuple[subprocess.Popen[bytes], Any]] = []

    def serve(recipe: str) -> tuple[Admin, str]:
        port, admin_port = free_port(), free_port()
        cmd = [
            program,
            "serve",
            f"+recipe={recipe}",
            "server.host=127.0.0.1",
            f"server.port={port}",
            "admin.enabled=true",
            "admin.host=127.0.0.1",
            f"admin.port={admin_port}",
            f"admin.audit_log={tmp / 'audit.jsonl'}",
            f"++features.sqlite_path={tmp / recipe / 'online.db'}",
            f"++features.registry_path={tmp / recipe / 'registry.db'}",
        ]
        log = (tmp / f"{recipe}.log").open("w")
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        servers.append((proc, log))

        def ready() -> bool:
            if proc.poll() is not None:
                raise StepFailed(f"the server exited with {proc.returncode} ({recipe}.log)")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                return r.status == 200

        wait_for(f"{recipe} server ready", ready, args.step_timeout)
        admin = Admin(admin_port, token)
        say(
            "serve",
            f"+recipe={recipe} ready on 127.0.0.1:{port}, admin :{admin_port}: {stages(admin)}",
        )
        return admin, f"http://127.0.0.1:{port}/v1/models/fraud:predict"

    def stop() -> None:
        while servers:
            proc, log = servers.pop()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()

    try:
        admin, infer = serve("fraud_calm")

        def drift() -> dict[str, Any]:
            doc: dict[str, Any] = admin.get("/admin/models/fraud/drift")
            return doc

        # (a) normal traffic: windows tested, windows flagged
        need = args.windows * args.window
        if need > len(normal):
            raise StepFailed(
                f"(a) {args.windows} windows of {args.window} need {need:,} transactions; "
                f"the replay part of the held-out days has {len(normal):,}"
            )
        sent = 0
        for batch in chunks(normal[:need], args.batch):
            post(infer, {"instances": batch})
            sent += len(batch)
        wait_for(
            "normal windows tested",
            lambda: drift()["status"]["windows"] >= args.windows,
            args.step_timeout,
        )
        doc = drift()
        tested = doc["status"]["windows"]
        flagged = len(doc["events"])
        say(
            "(a) calm",
            f"{sent:,} original transactions in {sent // args.batch} requests: {tested} windows "
            f"tested, {flagged} flagged -> false-alarm rate {flagged / tested:.1%} "
            f"({flagged}/{tested})",
        )
        for e in doc["events"]:
            say(
                "(a) calm",
                f"  false alarm: window {e['window']} {e['detector']}: {', '.join(e['features'])}",
            )
        stop()

        # (b) shifted traffic until drift is reported, on a fresh server running the loop
        admin, infer = serve("fraud_loop")
        before = tested = 0
        requests = rows = 0
        deadline = time.monotonic() + args.step_timeout
        event = None
        for batch in chunks(shifted, args.batch):
            post(infer, {"instances": batch})
            requests += 1
            rows += len(batch)
            if rows % args.window == 0:
                wait_for(
                    "window tested", lambda n=tested: drift()["status"]["windows"] > n, 30, 0.1
                )
                doc = drift()
                tested = doc["status"]["windows"]
                if len(doc["events"]) > before:
                    event = doc["events"][before]  # the first: it ran the actions
                    break
            if time.monotonic() > deadline:
                break
        if event is None:
            raise StepFailed(f"(b) no drift reported after {rows:,} shifted transactions")
        say(
            "(b) drift",
            f"reported after {requests} requests ({rows:,} shifted transactions, "
            f"{rows // args.window} windows): event {event['id']} detector {event['detector']} "
            f"features {', '.join(event['features'])}",
        )
        for other in doc["events"][before + 1 :]:
            say(
                "(b) drift",
                f"  and event {other['id']} ({other['detector']}: "
                f"{', '.join(other['features'])}), actions skipped: cooldown",
            )

        # (c) the webhook
        got = wait_for(
            "(c) webhook", lambda: [e for e in hook.events if e["id"] == event["id"]], 30
        )
        body = got[-1]
        p = {k: f"{v:.2g}" for k, v in sorted(body["p_values"].items()) if v is not None}
        say(
            "(c) hook",
            f"POST /drift: id {body['id']} model {body['model']} v{body['version']} "
            f"detector {body['detector']} window {body['window']} samples {body['samples']} "
            f"p-values {p}",
        )

        # (d) the retraining command, (e) register_candidate
        def action(name: str) -> dict[str, Any] | None:
            actions = {e["id"]: e for e in drift()["events"]}[event["id"]]["actions"]
            state: dict[str, Any] = actions[name]
            return state if state["status"] not in ("pending", "running") else None

        cmd_state = wait_for("(d) command", lambda: action("command"), args.step_timeout)
        details = cmd_state.get("details", {})
        tail = [ln for ln in str(details.get("output_tail", "")).splitlines() if ln.strip()]
        say(
            "(d) retrain",
            f"{cmd_state['status']}: exit {details.get('exit_code')} in "
            f"{details.get('duration_s')} s",
        )
        for line in tail[-3:]:
            say("(d) retrain", f"  | {line}")
        if cmd_state["status"] != "ok":
            raise StepFailed(f"(d) the retraining failed: {cmd_state.get('error')}")
        reg = wait_for("(e) register_candidate", lambda: action("register_candidate"), 60)
        say("(e) register", f"{reg['status']}: {reg.get('details') or reg.get('error')}")
        if reg["status"] != "ok":
            raise StepFailed(f"(e) register_candidate failed: {reg.get('error')}")
        version = reg["details"]["version"]
        say("(e) models", stages(admin))
        audit = admin.get("/admin/audit?limit=10")
        for rec in audit:
            if rec.get("version") == version:
                say(
                    "(e) audit", f"{rec['event']} v{version} by {rec['actor']}: {rec.get('reason')}"
                )
        cli = subprocess.run(
            [program, "models", "list"],
            env={**env, "INFERCORE_ADMIN_URL": admin.base},
            capture_output=True,
            text=True,
            timeout=30,
        )
        for line in (cli.stdout or cli.stderr).splitlines():
            say("(e) cli", line)

        # (f) the approval gate
        asked = admin.post(
            f"/admin/models/fraud/versions/{version}/promote",
            {
                "to": "canary",
                "weight": args.canary_weight,
                "by": "alice",
                "reason": "retrained on the new tactic",
            },
        )
        if asked["status"] != "pending":
            raise StepFailed(f"(f) the canary step was not gated: {asked['status']}")
        approval = asked["approval"]
        say(
            "(f) ask",
            f"alice asks v{version} -> canary {args.canary_weight:g}%: approval "
            f"{approval['id']} pending (gates {approval['gates']}); {stages(admin)}",
        )
        done = admin.post(
            f"/admin/approvals/{approval['id']}/approve",
            {"by": "bob", "reason": "metrics.json looks right"},
        )
        say("(f) approve", f"bob approves {approval['id']}: {done['status']}; {stages(admin)}")
        pending = admin.get("/admin/approvals?status=pending")
        say("(f) approvals", f"{len(pending)} pending")
        for batch in chunks(shifted[:2000], args.batch):
            post(infer, {"instances": batch})
        say("done", f"loop complete in {time.monotonic() - T0:.1f} s; logs in {tmp}")
    finally:
        hook.close()
        stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", choices=("alibi", "stats"), default="alibi")
    p.add_argument("--windows", type=int, default=40, help="windows of normal traffic")
    p.add_argument("--window", type=int, default=500, help="rows per drift window")
    p.add_argument("--batch", type=int, default=50, help="transactions per request")
    p.add_argument("--shift", type=float, default=0.15, help="new-tactic rows per legit one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canary-weight", type=float, default=10.0)
    p.add_argument("--step-timeout", type=float, default=120.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = p.parse_args(argv)
    if a.window < 10 or a.window % a.batch or a.windows < 1:
        p.error("--window must be a multiple of --batch (and >= 10); --windows >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="fraud-drift-loop-"))
    try:
        run(a, tmp)
        return 0
    except StepFailed as exc:
        say("FAILED", str(exc))
        return 1
    finally:
        if a.keep:
            say("kept", str(tmp))
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
