"""Built-in drift actions: ``log``, ``webhook`` and ``command`` (and ``register_candidate``,
:mod:`infercore.builtins.candidate`).

The drift monitor runs an action when a detector reports drift, as its own task, never two
runs of one action at once and not again within the monitor's cooldown (see
:mod:`infercore.drift.monitor`). Each action raises
:class:`~infercore.components.drift.ActionFailed` on failure, with details for the event
history, and returns details on success.

- ``log``: one log line per event on the ``infercore.drift.actions`` logger.
- ``webhook``: POSTs the event as JSON (:func:`infercore.drift.events.event_to_json`) to a URL
  whose host is on the action's ``allow_hosts`` (checked when the config is built); a timeout
  per attempt, retries with exponential backoff on connection errors, timeouts, 429 and 5xx;
  redirects are not followed (a redirect could leave the allow-list).
- ``command``: runs an argv list (never a shell string) with the event in environment
  variables and in a JSON file, output captured into a bounded tail, exit code recorded, a
  timeout after which the whole process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from infercore.artifacts import resolve_artifact
from infercore.components import Action, ComponentContext
from infercore.components.drift import ActionFailed, DriftEvent
from infercore.drift.events import event_to_json
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl

log = logging.getLogger("infercore.drift.actions")


# --- log ------------------------------------------------------------------------------------


class LogActionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Level of the line: ``info``, ``warning`` or ``error``.
    level: Literal["info", "warning", "error"] = "warning"


class LogAction(Action):
    """Logs one line per drift event (model, version, detector, drifted features, window)."""

    kind = "log"
    Config = LogActionConfig
    config: LogActionConfig

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        body = event_to_json(event)
        level = getattr(logging, self.config.level.upper())
        log.log(
            level,
            "drift event %s: model %s version %s detector %s window %s features %s",
            body["id"],
            body["model"],
            body["version"] or "-",
            body["detector"],
            body["window"],
            ", ".join(body["features"]) or "-",
        )
        return None


# --- webhook --------------------------------------------------------------------------------


class WebhookActionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: ``http://`` or ``https://`` URL the event is POSTed to.
    url: str
    #: Host names (or ``host:port``) the URL may point at; anything else is a config error.
    allow_hosts: list[str]
    #: Seconds one attempt may take.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: Attempts after the first one fails (connection error, timeout, 429 or 5xx).
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    #: Seconds before the first retry; doubled for each further retry.
    backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    #: Longest wait between two attempts.
    backoff_max_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: Extra request headers (e.g. ``Authorization: Bearer ${oc.env:HOOK_TOKEN}``); values are
    #: never logged.
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Retryable(Exception):
    pass


class WebhookAction(Action):
    """POSTs each drift event as JSON to an allow-listed URL."""

    kind = "webhook"
    Config = WebhookActionConfig
    config: WebhookActionConfig

    def __init__(self, config: WebhookActionConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        path = context.path
        parsed = urllib.parse.urlsplit(config.url)
        # Neither message shows the URL: a webhook's URL may be its secret (a token in its
        # path or query), and this line reaches the logs (RELIABILITY S6).
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            scheme = f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
            raise ConfigError(
                f"{path}.url: not an http(s) URL with a host ({scheme})",
                hint="e.g. https://hooks.example.com/drift",
            )
        if any(c.isspace() or not c.isprintable() for c in config.url):
            # http.client would refuse it at every event, quoting the path and query.
            raise ConfigError(
                f"{path}.url: whitespace or a control character in the URL",
                hint="percent-encode it (a space is %20)",
            )
        if parsed.username is not None or parsed.password is not None:
            raise ConfigError(
                f"{path}.url: credentials in the URL are refused",
                hint="send them in `headers` (e.g. Authorization) from an environment variable",
            )
        if not config.allow_hosts:
            raise ConfigError(
                f"{path}.allow_hosts: empty; the webhook's host must be allow-listed",
                hint=f"add {parsed.hostname!r} if you trust it",
            )
        host = parsed.hostname.lower()
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        allowed = {h.strip().lower() for h in config.allow_hosts}
        if host not in allowed and f"{host}:{port}" not in allowed:
            raise ConfigError(
                f"{path}.url: host {host!r} is not on allow_hosts ({', '.join(sorted(allowed))})",
                hint="add the host to allow_hosts if you trust it",
            )
        for name, value in config.headers.items():
            if any(c in name + value for c in "\r\n"):
                raise ConfigError(f"{path}.headers.{name}: line breaks are not allowed")
        self._host = host
        self._opener = urllib.request.build_opener(_NoRedirect())

    def _post(self, body: bytes) -> int:
        headers = {"Content-Type": "application/json", "User-Agent": "infercore-drift"}
        headers.update(self.config.headers)
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                response.read(65536)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            code = int(exc.code)
            exc.close()
            if code == 429 or code >= 500:
                raise _Retryable(f"HTTP {code}") from None
            raise ActionFailed(
                f"webhook to {self._host} answered HTTP {code}", details={"status": code}
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        body = json.dumps(event_to_json(event), allow_nan=False).encode()
        cfg = self.config
        attempts = cfg.retries + 1
        delay = cfg.backoff_s
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                status = await asyncio.to_thread(self._post, body)
                return {"status": status, "attempts": attempt}
            except _Retryable as exc:
                last = str(exc)
                log.warning(
                    "webhook to %s failed (attempt %d of %d): %s",
                    self._host,
                    attempt,
                    attempts,
                    last,
                )
            if attempt < attempts:
                await asyncio.sleep(min(delay, cfg.backoff_max_s))
                delay *= 2
        raise ActionFailed(
            f"webhook to {self._host} failed after {attempts} attempts: {last}",
            details={"attempts": attempts},
        )


# --- command --------------------------------------------------------------------------------


class CommandActionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: The program and its arguments, never a shell string. ``{python}`` as an element stands
    #: for the server's Python interpreter; ``{event_file}`` inside any element is replaced by
    #: the path of the event's JSON file (appended as the last argument when no element has it).
    argv: list[str]
    #: Working directory, relative to the model root (default: the model root).
    cwd: str | None = None
    #: Seconds before the command (its whole process group) is killed.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    #: Extra environment variables.
    env: dict[str, str] = msgspec.field(default_factory=dict)
    #: Names of the server's environment variables passed through (besides PATH, HOME, LANG,
    #: LC_ALL, TMPDIR, VIRTUAL_ENV, which always are); the rest of the server's environment
    #: (tokens, keys) is not.
    pass_env: list[str] = msgspec.field(default_factory=list)
    #: Bytes of output (stdout and stderr together) kept: the tail, in the event history.
    output_limit_bytes: Annotated[int, msgspec.Meta(ge=0, le=10 * 1024 * 1024)] = 16384


_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "SYSTEMROOT")


class CommandAction(Action):
    """Runs a command (a retraining job) on a drift event.

    The event is in the environment (``INFERCORE_EVENT_ID``, ``INFERCORE_EVENT_FILE``,
    ``INFERCORE_MODEL``, ``INFERCORE_VERSION``, ``INFERCORE_DETECTOR``,
    ``INFERCORE_DRIFT_FEATURES`` comma-separated) and in a JSON file whose path is an
    argument. A non-zero exit, a timeout or a failure to start raises
    :class:`ActionFailed` with ``exit_code`` and ``output_tail``.
    """

    kind = "command"
    Config = CommandActionConfig
    config: CommandActionConfig

    def __init__(self, config: CommandActionConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        path = context.path
        if not config.argv or not config.argv[0].strip():
            raise ConfigError(
                f"{path}.argv: needs the program as its first element",
                hint='e.g. argv: ["{python}", "fraud/retrain.py", "{event_file}"]',
            )
        if config.cwd is not None:
            cwd = resolve_artifact(context.model_root, config.cwd, config_path=f"{path}.cwd")
            if not cwd.is_dir():
                raise ConfigError(f"{path}.cwd: {config.cwd!r} is not a folder")
            self._cwd = cwd
        else:
            self._cwd = context.model_root.resolve()

    def _argv(self, event_file: str) -> list[str]:
        argv = [sys.executable if a == "{python}" else a for a in self.config.argv]
        if any("{event_file}" in a for a in argv):
            return [a.replace("{event_file}", event_file) for a in argv]
        return [*argv, event_file]

    def _env(self, body: dict[str, Any], event_file: str) -> dict[str, str]:
        env = {k: os.environ[k] for k in (*_BASE_ENV, *self.config.pass_env) if k in os.environ}
        env.update(self.config.env)
        env.update(
            {
                "INFERCORE_EVENT_ID": str(body["id"]),
                "INFERCORE_EVENT_FILE": event_file,
                "INFERCORE_MODEL": body["model"],
                "INFERCORE_VERSION": body["version"] or "",
                "INFERCORE_DETECTOR": body["detector"],
                "INFERCORE_DRIFT_FEATURES": ",".join(body["features"]),
            }
        )
        return env

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        body = event_to_json(event)
        limit = self.config.output_limit_bytes
        with tempfile.TemporaryDirectory(prefix="infercore-event-") as tmp:
            event_file = str(Path(tmp) / "event.json")
            Path(event_file).write_text(json.dumps(body, allow_nan=False, indent=2))
            argv = self._argv(event_file)
            program = Path(argv[0]).name
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=self._cwd,
                    env=self._env(body, event_file),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ActionFailed(
                    f"command {program!r} could not start: {type(exc).__name__}",
                    details={"exit_code": None},
                ) from None
            tail = bytearray()

            async def pump() -> None:
                assert proc.stdout is not None
                while chunk := await proc.stdout.read(65536):
                    tail.extend(chunk)
                    if len(tail) > limit:
                        del tail[: len(tail) - limit]

            async def finish() -> None:
                # One coroutine, not gather(): a gather cancelled with wait_for ends with a
                # CancelledError nobody retrieves, which asyncio logs with a traceback.
                await pump()
                await proc.wait()

            timed_out = False
            try:
                await asyncio.wait_for(finish(), self.config.timeout_s)
            except TimeoutError:
                timed_out = True
                self._kill(proc)
                await proc.wait()
            except asyncio.CancelledError:
                self._kill(proc)
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
                log.warning(
                    "command %s cancelled after %.1f s (the server is stopping); killed",
                    program,
                    time.monotonic() - started,
                )
                raise
            seconds = round(time.monotonic() - started, 3)
        output = tail.decode("utf-8", errors="replace")
        details: dict[str, Any] = {
            "exit_code": proc.returncode,
            "duration_s": seconds,
            "output_tail": output,
        }
        log.debug("command %s output tail:\n%s", program, output)
        if timed_out:
            details["timed_out"] = True
            raise ActionFailed(
                f"command {program!r} timed out after {self.config.timeout_s:g} s (killed)",
                details=details,
            )
        if proc.returncode != 0:
            raise ActionFailed(
                f"command {program!r} exited with {proc.returncode}", details=details
            )
        log.info("command %s finished in %.1f s (exit 0)", program, seconds)
        return details

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@hookimpl
def register_actions() -> list[type[Action]]:
    from infercore.builtins.candidate import RegisterCandidateAction

    return [LogAction, WebhookAction, CommandAction, RegisterCandidateAction]
