"""``infercore models ...``: the admin API from the command line.

    infercore models list [MODEL]
    infercore models promote fraud 2 --to canary --weight 10 --reason "shadow agrees 99.2 %"
    infercore models approvals
    infercore models approve 3f9a1c2e --reason "looked at the shadow summary"
    infercore models reject 3f9a1c2e --reason "p99 too high"
    infercore models weights fraud 1=75 2=25
    infercore models rollback fraud --reason "complaints"
    infercore models load fraud 3 | unload fraud 3 | shadow fraud | drift fraud | audit
    infercore models whoami
    infercore models token ann
    infercore events [MODEL] [--limit 200]

The admin URL and token come from ``--url``/``--token`` (or ``--token-file``), else from
``INFERCORE_ADMIN_URL`` (default ``http://127.0.0.1:8081``; ``unix:/path/admin.sock`` for a
Unix socket) and ``INFERCORE_ADMIN_TOKEN``. A read waits :data:`READ_TIMEOUT_S` for the server,
a change :data:`CHANGE_TIMEOUT_S` (``--timeout`` or ``INFERCORE_ADMIN_TIMEOUT``: one wait for
both). Only the standard library is used to call the API.

``models token NAME`` calls nothing: it prints a new random token for NAME and the
``NAME:sha256:<digest>`` line that names it in ``admin.tokens_file``, so that the file holds
no token (:func:`infercore.server.admin.load_named_tokens`).

Who decides: ``--by`` when given. Without it, the CLI asks the server (``GET
/admin/whoami``): a named token (``admin.tokens_file``) is its own name, so no ``by`` is sent
and the server records the token's name; with the shared token (or a server without the
route) ``by`` is your user name, as before.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8081"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class AdminError(Exception):
    """The admin API answered with an error (or could not be reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


#: How long a read (``GET``: list, approvals, whoami, audit, events) waits for the server.
READ_TIMEOUT_S = 10.0
#: How long a change waits: a load reads and warms a model, and every change waits up to 10 s
#: for ``admin.state_file`` to be written.
CHANGE_TIMEOUT_S = 60.0


class AdminClient:
    """A minimal client of the admin API (``http://host:port`` or ``unix:/path``).

    Args:
        timeout: Seconds to wait for a connection and for each read of the answer; ``None``:
            :data:`READ_TIMEOUT_S` for ``GET``, :data:`CHANGE_TIMEOUT_S` for the rest.
    """

    def __init__(self, url: str, token: str, *, timeout: float | None = None) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            path = self.url[len("unix:") :]
            if path.startswith("//"):
                path = path[2:]
            return _UnixConnection(path, timeout)
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                parts.hostname or "127.0.0.1", parts.port or 443, timeout=timeout
            )
        if parts.scheme != "http":
            raise AdminError(0, "usage", f"unsupported admin URL {self.url!r} (http:// or unix:)")
        return http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; returns ``(status, decoded JSON)``.

        Raises:
            AdminError: A non-2xx answer (its ``error`` and ``reason``), or no connection.
        """
        given = {k: v for k, v in (query or {}).items() if v is not None}
        if given:
            path += "?" + urllib.parse.urlencode(given)
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        timeout = self.timeout
        if timeout is None:
            timeout = READ_TIMEOUT_S if method == "GET" else CHANGE_TIMEOUT_S
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=data or None, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except TimeoutError:
            raise AdminError(
                0,
                "unreachable",
                f"the admin API at {self.url} did not answer within {timeout:g} s "
                "(--timeout or INFERCORE_ADMIN_TIMEOUT waits longer)",
            ) from None
        except OSError as exc:
            raise AdminError(
                0, "unreachable", f"cannot reach the admin API at {self.url}: {exc}"
            ) from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if status >= 400:
            if isinstance(doc, dict):
                raise AdminError(status, str(doc.get("reason", "")), str(doc.get("error", "")))
            raise AdminError(status, "", raw[:200].decode(errors="replace"))
        if isinstance(doc, dict) and doc.get("state_file") in _UNSAVED:
            # The change is made, but a restart would not restore it (yet): say so, on stderr.
            print(f"infercore: warning: {_UNSAVED[doc['state_file']]}", file=sys.stderr)
        return status, doc


#: What a changing call's ``state_file`` other than ``written`` means for its caller.
_UNSAVED = {
    "failed": "the change is made but admin.state_file could not be written: a restart "
    "would not restore it (the server's log says why)",
    "writing": "the change is made but admin.state_file is still being written (a slow "
    "volume): a restart before the write ends would not restore it",
}


# -- the command line ---------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"admin API URL (env INFERCORE_ADMIN_URL; {DEFAULT_URL})")
    parser.add_argument("--token", help="bearer token (env INFERCORE_ADMIN_TOKEN)")
    parser.add_argument("--token-file", help="read the bearer token from this file")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        help=f"seconds to wait for the server (env INFERCORE_ADMIN_TIMEOUT; default "
        f"{READ_TIMEOUT_S:g} for reads, {CHANGE_TIMEOUT_S:g} for changes)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _events_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="the latest N drift events per model (the server's default: 50; at most the "
        "model's drift.history_size)",
    )


def add_events_parser(sub: Any) -> None:
    """Add ``events``: the drift monitor's event history, through the admin API."""
    events = sub.add_parser(
        "events", help="drift events of every monitored model (the admin API)", allow_abbrev=False
    )
    _connection_options(events)
    events.add_argument("model", nargs="?", help="only this model")
    _events_limit_option(events)


def run_events(args: argparse.Namespace) -> int:
    """``infercore events [MODEL]``; returns the exit code."""
    args.models_command = "events"
    return run_models(args)


def _action_outcome(action: dict[str, Any] | None) -> str:
    """An action's status, with the reason a skipped one gives (``skipped (cooldown)``).

    ``skipped`` alone cannot tell a cooldown, which ends by itself, from an action still busy
    with an earlier event; ``--json`` shows the same ``reason``.
    """
    state = action or {}
    status = str(state.get("status", "?"))
    reason = state.get("reason")
    return f"{status} ({reason})" if reason else status


def _print_events(model: str, doc: dict[str, Any]) -> None:
    if not doc.get("monitored"):
        print(f"{model}: not monitored (no drift node in the recipe)")
        return
    events = doc.get("events") or []
    if not events:
        print(f"{model}: no drift events")
    for e in events:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(e.get("time", 0))))
        actions = ", ".join(
            f"{name}={_action_outcome(a)}" for name, a in (e.get("actions") or {}).items()
        )
        features = ", ".join(e.get("features") or []) or "-"
        print(
            f"{when}  {model}  #{e.get('id')}  {e.get('detector')}  window {e.get('window')}  "
            f"drift on: {features}  actions: {actions or '-'}"
        )


def add_models_parser(sub: Any) -> None:
    """Add ``models`` and its actions to the ``infercore`` subcommands."""
    models = sub.add_parser(
        "models", help="versions, rollouts and approvals (the admin API)", allow_abbrev=False
    )
    _connection_options(models)
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    def decided(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--by",
            help="who decides (default: the token's name with admin.tokens_file, else your "
            "user name); with a named token, only its own name is accepted",
        )
        p.add_argument("--reason", default="", help="why (kept in the audit log)")

    p = msub.add_parser("list", help="models, versions, stages, weights and states")
    p.add_argument("model", nargs="?")
    p = msub.add_parser("promote", help="move a version to a stage (may need an approval)")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument(
        "--to", required=True, choices=["candidate", "shadow", "canary", "primary", "retired"]
    )
    p.add_argument("--weight", type=float, help="a canary's share of traffic, in percent")
    decided(p)
    p = msub.add_parser("weights", help="set the traffic split, e.g. 1=90 2=10")
    p.add_argument("model")
    p.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    decided(p)
    p = msub.add_parser("approvals", help="list approvals")
    p.add_argument(
        "--status",
        default="pending",
        choices=["pending", "approved", "rejected", "superseded", "all"],
    )
    for action in ("approve", "reject"):
        p = msub.add_parser(action, help=f"{action} a pending approval")
        p.add_argument("approval")
        decided(p)
    p = msub.add_parser("rollback", help="back to the last primary; canary weights to 0")
    p.add_argument("model")
    decided(p)
    for action in ("load", "unload"):
        p = msub.add_parser(action, help=f"{action} a version (recipe or repository folder)")
        p.add_argument("model")
        p.add_argument("version")
        decided(p)
    p = msub.add_parser("drift", help="drift monitor: latest result per detector and events")
    p.add_argument("model")
    _events_limit_option(p)
    p = msub.add_parser("shadow", help="shadow copies and their agreement with the primary")
    p.add_argument("model")
    p = msub.add_parser("audit", help="the latest audit records")
    p.add_argument("--limit", type=int, default=20)
    msub.add_parser("whoami", help="the name of your admin token (admin.tokens_file)")
    p = msub.add_parser(
        "token",
        help="print a new token for NAME and its admin.tokens_file line (its digest); "
        "calls no server",
    )
    p.add_argument("name", metavar="NAME", help="who the token is for: what `by` is with it")


def _client(args: argparse.Namespace) -> AdminClient:
    url = args.url or os.environ.get("INFERCORE_ADMIN_URL") or DEFAULT_URL
    token, source = args.token, "--token"
    if token is None and args.token_file:
        token, source = Path(args.token_file).read_text().strip(), "--token-file"
    if token is None:
        token, source = os.environ.get("INFERCORE_ADMIN_TOKEN", ""), "INFERCORE_ADMIN_TOKEN"
    if not token:
        raise AdminError(0, "usage", "no admin token: pass --token or set INFERCORE_ADMIN_TOKEN")
    # What an HTTP header cannot carry; said without echoing the token.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
        raise AdminError(
            0,
            "usage",
            f"{source}: the admin token contains a control character (a line break?); "
            "it cannot be sent in an HTTP header",
        )
    timeout = args.timeout
    if timeout is None and os.environ.get("INFERCORE_ADMIN_TIMEOUT"):
        try:
            timeout = _positive_seconds(os.environ["INFERCORE_ADMIN_TIMEOUT"])
        except argparse.ArgumentTypeError as exc:
            raise AdminError(0, "usage", f"INFERCORE_ADMIN_TIMEOUT: {exc}") from None
    return AdminClient(url, token, timeout=timeout)


def _whoami(client: AdminClient) -> str | None:
    """The name of the client's token (``admin.tokens_file``); ``None`` for the shared token,
    or a server that predates named tokens (no ``/admin/whoami``: 404)."""
    try:
        _, doc = client.request("GET", "/admin/whoami")
    except AdminError as exc:
        if exc.status == 404:
            return None
        raise
    if isinstance(doc, dict) and doc.get("authenticated") and isinstance(doc.get("name"), str):
        return str(doc["name"])
    return None


def _who(args: argparse.Namespace, client: AdminClient) -> str | None:
    """``by`` for a decision: ``--by``; else ``None`` (not sent) for a named token, whose name
    the server records, or your user name for the shared token."""
    if getattr(args, "by", None):
        return str(args.by)
    if _whoami(client) is not None:
        return None
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "cli"


def _print_models(docs: list[dict[str, Any]]) -> None:
    rows = [("MODEL", "VERSION", "STAGE", "WEIGHT", "STATE", "NOTE")]
    for doc in docs:
        for v in doc["versions"]:
            weight = ""
            if v["stage"] == "canary":
                weight = f"{v.get('weight', 0):g}%"
                routed = v.get("routed_weight")
                if routed is not None and routed != v.get("weight", 0):
                    weight += f" ({routed:g}% routed)"  # not ready: the primary serves its share
            elif v["stage"] == "primary":
                weight = f"{doc['primary_weight']:g}%"
            note = v.get("last_load_error") or v.get("error") or v.get("note") or ""
            rows.append((doc["name"], v["version"], v["stage"], weight, v["state"], note[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5])
    pending = [a for doc in docs for a in doc.get("pending_approvals", [])]
    if pending:
        print(f"pending approvals: {', '.join(pending)} (infercore models approvals)")


def _print_approvals(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no approvals")
        return
    for a in items:
        weight = f" weight {a['weight']:g}%" if a.get("weight") is not None else ""
        line = (
            f"{a['id']}  {a['status']:<8}  {a['model']} {a['version']} -> {a['to']}{weight}"
            f"  asked by {a['requested_by']} at {a['requested_at']}"
        )
        if a.get("reason"):
            line += f" ({a['reason']})"
        if a["status"] != "pending":
            line += f"; {a['status']} by {a['decided_by']} at {a['decided_at']}"
            if a["status"] == "superseded" and a.get("decision_reason"):
                line += f": {a['decision_reason']}"
        print(line)


def _parse_weights(items: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in items:
        version, sep, value = item.partition("=")
        if not sep:
            raise AdminError(0, "usage", f"expected VERSION=PERCENT, got {item!r}")
        try:
            percent = float(value)
        except ValueError:
            raise AdminError(0, "usage", f"{item!r}: the percent is not a number") from None
        if not math.isfinite(percent):  # JSON has no NaN or Infinity
            raise AdminError(0, "usage", f"{item!r}: the percent must be a finite number")
        if version in weights:
            raise AdminError(0, "usage", f"version {version!r} is given twice")
        weights[version] = percent
    return weights


def _new_token(args: argparse.Namespace) -> int:
    """``infercore models token NAME``: a new token for the person, the digest line for the
    operator's ``admin.tokens_file``; no server, no admin token."""
    # The format is the server's own (one rule for the file and the generator); imported
    # here only, so that the API calls need no more than the standard library.
    from infercore.server.admin import (
        RESERVED_ACTORS,
        TOKEN_NAME_RE,
        TOKEN_NAME_RULE,
        new_named_token,
    )

    name = args.name
    if not TOKEN_NAME_RE.fullmatch(name):
        raise AdminError(
            0, "usage", f"NAME {name[:80]!r}: a token's name is {TOKEN_NAME_RULE}, e.g. ann"
        )
    if name.lower() in RESERVED_ACTORS:
        raise AdminError(
            0,
            "usage",
            f"NAME {name!r} is one the server records its own decisions under "
            f"({', '.join(sorted(RESERVED_ACTORS))}); name the token after its holder, e.g. ann",
        )
    token, line = new_named_token(name)
    if args.json:
        print(json.dumps({"name": name, "token": token, "line": line}))
        return EXIT_OK
    print(f"# the token for {name}: give it to {name} alone; infercore keeps no copy of it")
    print(token)
    print("# the line for admin.tokens_file (the token's SHA-256 digest, not the token):")
    print(line)
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    """Run one ``infercore models`` action; returns the exit code."""
    try:
        if args.models_command == "token":
            return _new_token(args)
        return _run(args)
    except AdminError as exc:
        if exc.status == 0:
            print(f"infercore: error: {exc.message}", file=sys.stderr)
            return EXIT_USAGE if exc.reason == "usage" else EXIT_FAILURE
        print(f"infercore: error: {exc.message} (HTTP {exc.status} {exc.reason})", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"infercore: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    client = _client(args)
    action = args.models_command
    q = urllib.parse.quote

    def decision() -> dict[str, Any]:
        by = _who(args, client)
        return {**({"by": by} if by is not None else {}), "reason": args.reason or None}

    if action == "whoami":
        name = _whoami(client)
        if args.json:
            print(json.dumps({"name": name, "authenticated": name is not None}))
        elif name is not None:
            print(f"{name} (a named token: decisions are recorded as {name})")
        else:
            print(
                "a shared token, with no name: a decision names who decides with --by "
                "(default: your user name)"
            )
        return EXIT_OK
    if action == "list":
        path = f"/admin/models/{q(args.model, safe='')}" if args.model else "/admin/models"
        _, doc = client.request("GET", path)
        docs = [doc] if args.model else doc
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_models(docs)
        return EXIT_OK
    if action == "promote":
        body: dict[str, Any] = {"to": args.to, **decision()}
        if args.weight is not None:
            if not math.isfinite(args.weight):
                raise AdminError(0, "usage", "--weight: the percent must be a finite number")
            body["weight"] = args.weight
        status, doc = client.request(
            "POST",
            f"/admin/models/{q(args.model, safe='')}/versions/{q(args.version, safe='')}/promote",
            body,
        )
        if args.json:
            print(json.dumps(doc, indent=2))
        elif status == 202:
            a = doc["approval"]
            print(
                f"approval {a['id']} pending: {a['model']} {a['version']} -> {a['to']} needs "
                f"a person's approval (infercore models approve {a['id']})"
            )
        else:
            print(f"{args.model} {args.version} is now {args.to}")
            _print_models([doc["model"]])
        return EXIT_OK
    if action == "weights":
        body = {"weights": _parse_weights(args.weights), **decision()}
        _, doc = client.request("PUT", f"/admin/models/{q(args.model, safe='')}/weights", body)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_models([doc["model"]])
        return EXIT_OK
    if action == "approvals":
        status_q = None if args.status == "all" else args.status
        _, doc = client.request("GET", "/admin/approvals", query={"status": status_q})
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_approvals(doc)
        return EXIT_OK
    if action in ("approve", "reject"):
        _, doc = client.request(
            "POST", f"/admin/approvals/{q(args.approval, safe='')}/{action}", decision()
        )
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_approvals([doc["approval"]])
            if "model" in doc:
                _print_models([doc["model"]])
        return EXIT_OK
    if action == "rollback":
        _, doc = client.request(
            "POST", f"/admin/models/{q(args.model, safe='')}/rollback", decision()
        )
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_models([doc["model"]])
        return EXIT_OK
    if action in ("load", "unload"):
        params = {"version": args.version, **{k: v for k, v in decision().items() if v}}
        _, doc = client.request(
            "POST",
            f"/v2/repository/models/{q(args.model, safe='')}/{action}",
            {"parameters": params},
        )
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            v = doc["version"]
            print(f"{args.model} {v['version']}: {v['state']} ({v['stage']})")
        return EXIT_OK
    if action == "events":
        if args.model:
            names = [args.model]
        else:
            _, docs = client.request("GET", "/admin/models")
            names = [d["name"] for d in docs]
        limit = {"limit": args.limit}
        found = {
            name: client.request("GET", f"/admin/models/{q(name, safe='')}/drift", query=limit)[1]
            for name in names
        }
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            for name, doc in found.items():
                _print_events(name, doc)
        return EXIT_OK
    if action == "drift":
        _, doc = client.request(
            "GET", f"/admin/models/{q(args.model, safe='')}/drift", query={"limit": args.limit}
        )
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if action == "shadow":
        _, doc = client.request("GET", f"/admin/models/{q(args.model, safe='')}/shadow")
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if action == "audit":
        _, doc = client.request("GET", "/admin/audit", query={"limit": args.limit})
        for record in doc:
            print(json.dumps(record))
        return EXIT_OK
    raise AdminError(0, "usage", f"unknown action {action!r}")
