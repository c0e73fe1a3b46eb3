"""A health probe for containers: ``python -m infercore.deploy.probe [--uds PATH] URL_OR_PATH``.

Exits 0 when the server answers 200, 1 otherwise (no answer, another status, a timeout).
Standard library only: images built ``FROM python:*-slim`` have no curl, and kubelet's
``httpGet`` probes cannot reach a Unix socket (``deploy=sidecar``).

    python -m infercore.deploy.probe http://127.0.0.1:8080/v2/health/live
    python -m infercore.deploy.probe --uds /var/run/infercore/infercore.sock /v2/health/ready
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import urllib.parse
from collections.abc import Sequence


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._uds_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._uds_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def probe(target: str, *, uds: str | None = None, timeout: float = 2.0) -> tuple[bool, str]:
    """GET ``target``; (True, status line) on 200, (False, why) otherwise."""
    conn: http.client.HTTPConnection
    if uds is not None:
        path = target if target.startswith("/") else "/" + target
        conn = _UnixConnection(uds, timeout)
    else:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            return False, f"not an http:// URL: {target}"
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        path = parts.path or "/"
    try:
        conn.request("GET", path, headers={"User-Agent": "infercore-probe"})
        response = conn.getresponse()
        response.read(4096)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return response.status == 200, f"{response.status} {response.reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infercore.deploy.probe")
    parser.add_argument("target", help="a URL, or a path with --uds")
    parser.add_argument("--uds", help="the server's Unix domain socket")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    ok, detail = probe(args.target, uds=args.uds, timeout=args.timeout)
    if not ok:
        print(f"probe failed: {detail}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
