"""The ``infercore`` command: subcommands, then Hydra overrides.

    infercore serve +recipe=iris [env=prod] [server.port=9000] [...]
    infercore config show +recipe=iris env=prod
    infercore config validate [--load] +recipe=iris
    infercore plugins
    infercore new-plugin NAME --kind model_loader [--dir PATH]

Config errors print one line and exit 2; a model that fails to load exits 1. ``--debug``
shows tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec

from infercore.errors import ConfigError, InfercoreError

log = logging.getLogger("infercore.cli")

EXIT_CONFIG = 2
EXIT_FAILURE = 1
#: 128 + SIGPIPE, what a shell reports for a Unix tool whose reader went away.
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """A bad command-line value (a path, a URL, a token): one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infercore",
        description="Serve a model from a recipe. Hydra overrides follow the subcommand.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="compose, validate, load and serve until SIGTERM")
    serve.add_argument("overrides", nargs="*", help="e.g. +recipe=iris env=prod server.port=9000")

    config = sub.add_parser("config", help="show or validate a composed config")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the composed, validated config (secrets redacted)")
    show.add_argument("overrides", nargs="*")
    validate = csub.add_parser(
        "validate",
        help="everything short of loading models (--load: load and warm them too)",
        description="Check a composed config as serve would before it listens. With --load, "
        "also start the feature sources and routers and load and warm every version (what "
        "serve does before it reports ready); the rollout state file and the audit log are "
        "neither read nor written. Exit 0 when every version loaded, 1 when one failed, 2 "
        "for a config error.",
    )
    validate.add_argument(
        "--load",
        action="store_true",
        help="load and warm every model version, start features and drift checks, then stop",
    )
    validate.add_argument("overrides", nargs="*")

    sub.add_parser("plugins", help="installed plugins, the kinds each adds, and licences")

    from infercore.scaffold.command import add_parser as add_new_plugin_parser

    add_new_plugin_parser(sub)

    from infercore.admin_client import add_events_parser, add_models_parser

    add_models_parser(sub)
    add_events_parser(sub)

    deploy = sub.add_parser("deploy", help="render deployment manifests")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="TARGET")
    k8s = dsub.add_parser(
        "k8s",
        help="Kubernetes manifests (deploy=k8s: Deployment …; deploy=sidecar: a pod patch)",
        description="Render Kubernetes manifests for a recipe. Options may come before or "
        "after the Hydra overrides; see docs/deploy.md.",
    )
    k8s.add_argument("overrides", nargs="*", help="e.g. +recipe=fraud env=prod")
    _add_k8s_options(k8s)
    return p


def _add_k8s_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default="infercore:latest", help="container image")
    p.add_argument("--out", help="write one file per manifest into this folder (else stdout)")
    p.add_argument("--name", help="resource name (default infercore-RECIPE)")
    p.add_argument("--namespace", help="metadata.namespace of every resource")
    p.add_argument("--replicas", type=int, default=2, help="replicas / HPA minimum (2)")
    p.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="HPA maximum (10, or --replicas when higher; never below --replicas)",
    )
    p.add_argument(
        "--cpu",
        help="CPU request (1 per worker); with server.workers=auto also the limit, which sets "
        "the number of workers",
    )
    p.add_argument("--memory", help="memory request and limit (2Gi per worker)")
    p.add_argument("--cpu-target", type=int, default=70, help="HPA CPU utilization, %% (70)")
    p.add_argument(
        "--inflight-target",
        type=int,
        help="also scale on infercore_inflight_requests per pod (needs a metrics adapter)",
    )
    p.add_argument("--models-claim", help="PVC with the recipe assets (default NAME-models)")
    p.add_argument("--baked-models", action="store_true", help="models are in the image")
    p.add_argument("--prestop-sleep", type=int, default=0, help="preStop sleep, s (0: none)")
    p.add_argument(
        "--startup-timeout",
        type=int,
        default=120,
        help="seconds a pod has to load its models (sidecar: to be ready) before a restart (120)",
    )
    p.add_argument(
        "--track",
        choices=("stable", "canary"),
        default="stable",
        help="canary: only a NAME-canary Deployment that the stable Service also selects",
    )
    p.add_argument("--app", default="my-app", help="deploy=sidecar: the app's Deployment")
    p.add_argument("--app-container", default="app", help="deploy=sidecar: its container")


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `deploy k8s` takes options before and after its Hydra overrides.
        if args.command != "deploy" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides.extend(extra)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, so that a reader gone away is seen below
        return code
    except BrokenPipeError:
        # `infercore config show | head`: the reader left, as Unix tools take it: no traceback,
        # and nothing more written (the interpreter's own flush at exit would fail again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except (UsageError, InfercoreError) as exc:
        if args.debug:
            raise
        return _report(exc)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args.overrides, debug=args.debug)
    if args.command == "config":
        if args.config_command == "show":
            return _config_show(args.overrides)
        return _config_validate(args.overrides, load=args.load)
    if args.command == "plugins":
        return _plugins()
    if args.command == "new-plugin":
        from infercore.scaffold.command import run_new_plugin

        return run_new_plugin(args)
    if args.command == "deploy":
        return _deploy_k8s(args)
    if args.command == "events":
        from infercore.admin_client import run_events

        _check_admin_args(args)
        return run_events(args)
    if args.command == "models":
        from infercore.admin_client import run_models

        if args.models_command != "token":  # makes a token: calls no admin URL
            _check_admin_args(args)
        return run_models(args)
    return EXIT_FAILURE


def _report(exc: BaseException) -> int:
    """Print the one line of an error the user can fix; its exit code (2 for config and
    command-line errors, 1 for the rest)."""
    if isinstance(exc, ConfigError):
        print(f"infercore: config error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"infercore: error: {_one_line(exc)}", file=sys.stderr)
    return EXIT_CONFIG if isinstance(exc, UsageError) else EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    """The error as one line, whatever a plugin's message contained, credentials masked (a
    Hydra error quotes the override it could not parse, a password in a URL included)."""
    from infercore.redaction import redact_text

    return redact_text(" ".join(str(exc).split()))


def _check_admin_args(args: argparse.Namespace) -> None:
    """``models``/``events``: the admin URL parses (the client checks the token).

    Checked here, before the client builds its request, so that a typo is one line (exit 2).
    """
    import urllib.parse

    url = args.url or os.environ.get("INFERCORE_ADMIN_URL")
    where = "--url" if args.url else "INFERCORE_ADMIN_URL"
    if url and not url.startswith("unix:"):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
        except ValueError as exc:
            raise UsageError(
                f"{where}: {url[:200]!r} is not a valid URL ({exc}); "
                "expected http://HOST:PORT or unix:/PATH"
            ) from None
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise UsageError(
                f"{where}: {url[:200]!r} names no host; expected http://HOST:PORT or unix:/PATH"
            )


def _compose(overrides: list[str]) -> Any:
    from infercore.config.compose import compose

    return compose(overrides)


def _config_show(overrides: list[str]) -> int:
    from infercore.config.compose import redact, to_yaml
    from infercore.runtime import Runtime

    composed = _compose(overrides)
    runtime = Runtime(composed)  # validates every component node against its kind
    reg, label = runtime.registry, composed.label
    data = msgspec.to_builtins(composed.config)
    for key, role in (
        ("batching", "batcher"),
        ("routing", "router"),
        ("features", "feature_source"),
    ):
        data[key] = reg.normalize(role, data[key], path=key, context=label)
    for name, model in data["models"].items():
        for version, vc in model["versions"].items():
            vc["loader"] = reg.normalize(
                "model_loader",
                vc["loader"],
                path=f"models.{name}.versions.{version}.loader",
                context=label,
            )
        for key, role in (
            ("batching", "batcher"),
            ("routing", "router"),
            ("features", "feature_source"),
        ):
            if model[key] is None:
                del model[key]
            else:
                model[key] = reg.normalize(
                    role, model[key], path=f"models.{name}.{key}", context=label
                )
    header = " ".join(f"{k}={v}" for k, v in sorted(composed.choices.items()))
    print(f"# composed: {header}")
    print(to_yaml(redact(data)), end="")
    return 0


def _config_validate(overrides: list[str], *, load: bool = False) -> int:
    from infercore.artifacts import resolve_artifact
    from infercore.runtime import Runtime
    from infercore.server.workers import worker_count

    composed = _compose(overrides)
    check_before_listen(composed, worker_count(composed.config.server.workers), create=False)
    runtime = Runtime(_check_only(composed) if load else composed)
    root = composed.model_root
    n_versions = 0
    for name, mc in composed.config.models.items():
        for version, vc in mc.versions.items():
            n_versions += 1
            path = vc.loader.get("path")
            if isinstance(path, str):
                where = f"models.{name}.versions.{version}.loader.path"
                try:
                    resolved = resolve_artifact(root, path, config_path=where)
                except InfercoreError as exc:
                    raise ConfigError(str(exc)) from None
                if resolved.exists() and not resolved.is_file():
                    raise ConfigError(
                        f"{where}: {path!r} is not a file",
                        hint="point it at the model file, not its folder",
                    )
    label = composed.label or "no recipe"
    if load:
        from infercore.server.logs import configure

        cfg = composed.config.server
        # Warnings and errors (a version that fails to load says why); not the INFO lines.
        level = cfg.log_level if cfg.log_level in ("warning", "error", "critical") else "warning"
        configure(level, cfg.log_format, cfg.log_stream)
        failed = asyncio.run(_load_all(runtime))
        if failed:
            print(
                f"infercore: error: {len(failed)} version(s) failed to load: "
                f"{', '.join(failed)} (see the errors above)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    print(
        f"ok: {label}, {len(runtime.models)} model(s), {n_versions} version(s)"
        f"{' loaded and warmed' if load else ''}, "
        f"env={composed.choices.get('env', '?')}, deploy={composed.choices.get('deploy', '?')}"
    )
    return 0


def _check_only(composed: Any) -> Any:
    """The config ``config validate --load`` starts: the rollout state file is neither
    restored nor written (a server running from the same recipe holds its lock), and the
    audit log is not appended to."""
    import dataclasses

    cfg = composed.config
    admin = msgspec.structs.replace(cfg.admin, state_file=None, audit_log=None)
    return dataclasses.replace(composed, config=msgspec.structs.replace(cfg, admin=admin))


async def _load_all(runtime: Any) -> list[str]:
    """``config validate --load``: start the runtime as ``serve`` does before it listens,
    then stop it. Returns the versions that failed to load, ``model@version`` (a required
    primary that failed raises, as in ``serve``)."""
    try:
        await runtime.start()
        return [
            f"{served.name}@{sv.version}"
            for served in runtime.models.values()
            for sv in served.versions.values()
            if not sv.ready
        ]
    finally:
        await runtime.stop()


def check_before_listen(
    composed: Any, workers: int, *, local: bool = True, create: bool = True
) -> None:
    """What ``serve`` refuses before anything listens, for ``serve``, ``config validate`` and
    ``deploy k8s`` alike (one list, so that what validates also serves).

    Args:
        composed: The composed, validated config.
        workers: The worker processes it will run (``server.workers``, ``auto`` counted).
        local: Also what depends on this machine: the admin token (``admin.auth_env`` or
            ``admin.auth_file``), the Unix sockets' paths on disk and ``admin.audit_log``.
            ``deploy k8s`` passes ``False``: the pod has its own environment and filesystem.
        create: Make the Unix sockets' folders and the audit log when missing (``serve``);
            ``config validate`` changes nothing, and checks that they could be made.

    Raises:
        ConfigError: The first problem, as one line naming the config path.
    """
    from infercore.server.workers import check_config

    config = composed.config
    cfg = config.server
    if not config.models:
        # A server with nothing to serve would report ready and answer 404 to everything.
        raise ConfigError(
            "models: no model is configured",
            hint="serve a recipe (infercore serve +recipe=NAME), or add models.NAME",
        )
    check_config(config, workers)
    if cfg.uds is not None:
        _check_uds(cfg.uds, on_disk=local, create=create)
    admin = config.admin
    if admin.enabled:
        if admin.uds is not None:
            if cfg.uds is not None and os.path.abspath(admin.uds) == os.path.abspath(cfg.uds):
                raise ConfigError(
                    "admin.uds: it is server.uds too; the two listeners need their own sockets",
                    hint="set admin.uds to another path (e.g. admin.sock beside server.uds)",
                )
            # The rule server.uds follows: a stale socket is replaced, a live one refused.
            _check_uds(admin.uds, key="admin.uds", on_disk=local, create=create)
        if (
            admin.uds is None
            and cfg.uds is None
            and admin.port == cfg.port
            and admin.port != 0
            and _hosts_overlap(admin.host, cfg.host)
        ):
            raise ConfigError(
                f"admin.port: {admin.port} is server.port too; the two listeners need their "
                "own ports",
                hint=f"set admin.port to another port (e.g. {cfg.port + 1})",
            )
        if local:
            from infercore.server.admin import load_token

            load_token(admin)
    # Opened by serve whether or not the admin API is on (the canary guard's decisions).
    if local and admin.audit_log is not None:
        if create:
            from infercore.lifecycle.audit import AuditLog

            AuditLog(admin.audit_log, keep=1)  # makes the folder and the file, as serve does
        else:
            _check_audit_log(admin.audit_log)
    if local and admin.state_file is not None:
        from infercore.lifecycle.state import check_path

        check_path(admin.state_file, audit_log=admin.audit_log, create=create)


def _check_audit_log(path_text: str) -> None:
    """What :class:`infercore.lifecycle.audit.AuditLog` refuses, found without creating anything
    (``config validate``): the same messages."""
    import errno
    from pathlib import Path

    from infercore.lifecycle.audit import check_folder

    path = Path(path_text)
    hint = "point admin.audit_log at a writable file in an existing folder, or unset it"
    if not check_folder("admin.audit_log", path, hint):
        writable = os.access(path.parent.parent, os.W_OK | os.X_OK)
    elif path.is_dir():
        raise ConfigError(
            f"admin.audit_log: cannot write {str(path)!r} ({os.strerror(errno.EISDIR)})",
            hint=hint,
        )
    elif path.exists():
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(
            f"admin.audit_log: cannot write {str(path)!r} ({os.strerror(errno.EACCES)})",
            hint=hint,
        )


_ALL_INTERFACES = ("0.0.0.0", "::", "")


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether binding both ``a`` and ``b`` on one port would collide."""
    return a == b or a in _ALL_INTERFACES or b in _ALL_INTERFACES


def _plugins() -> int:
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    # A plugin that fails to import is listed as such, not in place of the table.
    pm, infos = make_plugin_manager(keep_going=True)
    registry = Registry(pm)
    kinds = registry.kinds_by_plugin()
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "LICENCE", "KINDS")]
    for name, info in infos.items():
        added = kinds.get(name, {})
        text = "; ".join(f"{role}: {', '.join(sorted(k))}" for role, k in sorted(added.items()))
        rows.append((name, info.distribution, info.version, info.license, text or "-"))
    for name in sorted(pm.broken):
        rows.append((name, "?", "?", "?", "failed to import (below)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    notes = [(name, info.note) for name, info in infos.items() if info.note]
    if notes:
        print()
        for name, note in notes:
            print(f"note: {name}: {note}")
    # On stderr: stdout stays the table of what is loaded.
    by_variable: dict[str, list[str]] = {}
    for name, variable in sorted(pm.skipped.items()):
        by_variable.setdefault(variable, []).append(name)
    for variable, names in by_variable.items():
        print(f"note: installed but left out by {variable}: {', '.join(names)}", file=sys.stderr)
    for error in pm.broken.values():
        print(f"infercore: error: {_one_line(error)}", file=sys.stderr)
    return 1 if pm.broken else 0


def _deploy_k8s(args: argparse.Namespace) -> int:
    from pathlib import Path

    from infercore.deploy import k8s

    opts = k8s.Options(
        image=args.image,
        name=args.name,
        namespace=args.namespace,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        cpu=args.cpu,
        memory=args.memory,
        cpu_target_percent=args.cpu_target,
        inflight_target=args.inflight_target,
        models_claim=args.models_claim,
        baked_models=args.baked_models,
        prestop_sleep_s=args.prestop_sleep,
        startup_timeout_s=args.startup_timeout,
        track=args.track,
        app=args.app,
        app_container=args.app_container,
    )
    rendered = k8s.render(args.overrides, opts)
    if args.out:
        for path in k8s.write(rendered, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    else:
        main_docs = [d for n, ds in rendered.files.items() if n != "kustomization.yaml" for d in ds]
        print(k8s.to_yaml(main_docs), end="")
    for note in rendered.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def _serve(overrides: list[str], *, debug: bool = False) -> int:
    from infercore.runtime import Runtime
    from infercore.server import create_app
    from infercore.server.logs import configure
    from infercore.server.shutdown import ShutdownMiddleware, ShutdownState
    from infercore.server.workers import supervise, worker_context, worker_count

    composed = _compose(overrides)
    cfg = composed.config.server
    configure(cfg.log_level, cfg.log_format, cfg.log_stream)
    set_switch_interval(cfg.gil_switch_interval_ms)
    set_gc_threshold(cfg.gc_gen0_threshold)
    worker = worker_context()  # set when a supervisor started this process
    workers = worker_count(cfg.workers)
    # A worker's supervisor checked the Unix socket, and bound it.
    check_before_listen(composed, workers, local=worker is None)
    runtime = Runtime(composed)  # validates every component before anything listens
    if worker is None:
        _warn_all_interfaces(cfg, composed.choices.get("deploy", ""))
    if worker is None and workers > 1:
        del runtime
        return supervise(composed.config, overrides, workers, debug=debug)
    from infercore.server.admin import AdminListener

    admin = AdminListener.from_runtime(runtime)  # None unless admin.enabled; checks the token
    state = ShutdownState()
    inference = create_app(runtime, manage_runtime=False, shutdown=state)
    app = ShutdownMiddleware(inference, state)
    serve = _serve_async(
        app,
        runtime,
        composed.label,
        state,
        admin,
        worker,
        reject_before_body=getattr(inference, "reject_before_body", None),
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(serve)
    return uvloop.run(serve)


#: Longest Unix socket path the kernel accepts (sun_path is 108 bytes on Linux).
_UDS_MAX = 107


def _warn_all_interfaces(cfg: Any, deploy: str) -> None:
    """S9: a bind on every interface is said out loud (a pod's is expected)."""
    if cfg.uds is None and cfg.host in _ALL_INTERFACES and deploy != "k8s":
        log.warning("listening on all interfaces (%s); is that intended?", cfg.host or "''")


#: The socket file each listener's hints suggest.
_UDS_EXAMPLE = {"server.uds": "infercore.sock", "admin.uds": "admin.sock"}


def _check_uds(
    path: str, *, key: str = "server.uds", on_disk: bool = True, create: bool = True
) -> None:
    """The socket's folder exists (created 0700 if missing); nothing but a stale socket there.

    ``key`` is the config path errors name (``server.uds`` or ``admin.uds``).
    ``on_disk=False`` checks only the path's length; ``create=False`` leaves a missing folder,
    and checks that it could be made.
    """
    import errno
    import stat
    from pathlib import Path

    example = _UDS_EXAMPLE.get(key, "infercore.sock")
    if not path.strip():
        raise ConfigError(
            f"{key}: the socket path is empty",
            hint=f"set {key}=/PATH/{example}, or {key}=null to listen on TCP",
        )
    if len(os.fsencode(path)) > _UDS_MAX:
        raise ConfigError(
            f"{key}: the socket path is {len(os.fsencode(path))} bytes; the limit is {_UDS_MAX}",
            hint=f"use a shorter path, e.g. /tmp/infercore/{example}",
        )
    if not on_disk:
        return
    sock = Path(path)
    if sock.exists():
        if not stat.S_ISSOCK(sock.stat().st_mode):
            raise ConfigError(
                f"{key}: the path exists and is not a socket", hint="choose another path"
            )
        from infercore.server.unix_sockets import socket_answers

        # A socket file is left behind by a process that died; one that answers is in use
        # (binding would silently take it over from the running server).
        if socket_answers(path):
            raise ConfigError(
                f"{key}: another server is listening on this socket",
                hint="stop it, or choose another path",
            )
    hint = f"point {key} into a writable folder"
    if create:
        try:
            sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot create the socket's folder ({exc.strerror})", hint=hint
            ) from None
    else:
        # What mkdir would meet: the nearest folder that exists must be one, and writable.
        existing = sock.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing != sock.parent:
            problem = None
            if not existing.is_dir():
                problem = errno.ENOTDIR
            elif not os.access(existing, os.W_OK | os.X_OK):
                problem = errno.EACCES
            if problem is not None:
                raise ConfigError(
                    f"{key}: cannot create the socket's folder ({os.strerror(problem)})",
                    hint=hint,
                )
    if sock.parent.is_dir() and not os.access(sock.parent, os.W_OK | os.X_OK):
        # bind() would fail after the models loaded; a config error before anything loads.
        raise ConfigError(
            f"{key}: cannot create the socket in its folder ({os.strerror(errno.EACCES)})",
            hint=hint,
        )


def _refused_heads_counter(metrics: Any) -> Callable[[int | None, str], None]:
    """Counts the requests the inference listener's HTTP protocol refuses (431/414/408, and
    400 for a malformed head or body): no model is known from a head refused unread (a body
    is refused by the protocol alike), so they are counted as the app counts a request that
    names no model it serves (``model=""``, ``version=""``). The admin listener passes none:
    its refusals are not inference requests."""
    counters = metrics.responses("", "")

    def count_refused(status: int | None, reason: str) -> None:
        if status is not None:  # None: the connection closed before the answer could go
            counters.count_response(status)
        counters.count_failure(reason)

    return count_refused


async def _serve_async(
    app: Any,
    runtime: Any,
    label: str,
    state: Any = None,
    admin: Any = None,
    worker: Any = None,
    reject_before_body: Any = None,
) -> int:
    import math

    import uvicorn

    from infercore.server.logs import flush_held_lines
    from infercore.server.loopwatch import unwatched
    from infercore.server.shutdown import (
        IDLE_LINGER_S,
        GracefulShutdown,
        ShutdownState,
        http_protocol,
    )
    from infercore.server.unix_sockets import SocketFile

    cfg = runtime.config.server
    state = state or ShutdownState()
    linger = min(IDLE_LINGER_S, cfg.graceful_timeout_s / 2)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        uds=cfg.uds,
        http=http_protocol(
            linger,
            reject_before_body,
            max_header_bytes=cfg.max_header_bytes,
            header_timeout_s=cfg.header_timeout_ms / 1000,
            count_refused=_refused_heads_counter(runtime.metrics),
        ),
        lifespan="on",
        log_config=None,
        access_log=cfg.access_log,
        # X-Forwarded-For/-Proto set the client address and scheme, which only the access log
        # shows; parsing the peer's address for the trust check costs ~4 µs per request.
        proxy_headers=cfg.access_log,
        timeout_graceful_shutdown=math.ceil(cfg.graceful_timeout_s),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # infercore owns the signals: uvicorn would re-raise them after exit, skipping our stop.
    server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    forced_stop = _ForcedStop(runtime, server)
    shutdown = GracefulShutdown(
        server,
        state,
        drain_delay_s=cfg.drain_delay_s,
        is_ready=lambda: runtime.ready,
        # Admin writes answer 503 shutting_down from the signal on, not from runtime.stop().
        on_drain=runtime.begin_shutdown,
        # A second signal: the batchers answer what they hold, and nothing more runs.
        on_force=forced_stop.on_force,
    )
    shutdown.install(loop)
    on_signal = shutdown.on_signal

    where = f"unix:{cfg.uds}" if cfg.uds is not None else f"http://{cfg.host}:{cfg.port}"
    # The Unix socket file bound here (one worker): removed at exit only while it is ours.
    socket_file: SocketFile | None = None
    if worker is None:
        from infercore.server.workers import bind

        # Bound here, before any model loads, and handed to uvicorn (which then neither binds
        # nor removes a file): a port in use fails at once, with its cause in the final line
        # (InfercoreError), as with several workers; and the socket file's identity is known
        # from the bind on, so that exit removes this server's file and never a replacement.
        listener, socket_file = bind(cfg)
        listener.set_inheritable(False)
        listener.setblocking(False)
        sockets = [listener]
        if cfg.uds is not None:
            # INFO lines carry no file paths (S6): the config key says which socket it is.
            log.info("starting %s on the Unix socket server.uds", label or "infercore")
            log.debug("server.uds: %s", cfg.uds)
        else:
            log.info("starting %s on %s", label or "infercore", where)
    else:
        # The supervisor's socket (infercore.server.workers); the supervisor removes a Unix
        # socket's file at exit, while it is still the one it bound.
        sockets = [worker.listener()]
        log.info("worker %d (pid %d) starting %s", worker.index, os.getpid(), label or "infercore")
        watch = asyncio.create_task(_watch_supervisor(worker, on_signal))
        state.peers_ready = False
        worker.watch_peers(loop, lambda: setattr(state, "peers_ready", True))
    if admin is not None:
        try:
            await admin.start()  # the admin listener (infercore.server.admin), its own server
        except BaseException:
            if worker is None:
                # Nothing was served: the inference socket bound above goes too (one line,
                # no stale socket file left for the next start to replace).
                for sock in sockets:
                    sock.close()
                if socket_file is not None:
                    socket_file.remove()
            raise
    start_task = asyncio.create_task(runtime.start())
    if worker is not None and worker.defer_listen:
        # A restarted worker beside serving ones: it takes connections once it can answer them.
        # Told to stop before then, it closes its copy of the socket at once (answering what
        # is queued on it 503 shutting_down), never to be the last copy left open unserved.
        shutdown.linger_s = linger
        shutdown.hold(sockets)
        await asyncio.wait({start_task})
        sockets = shutdown.release()
        if start_task.exception() is not None or state.draining:
            sockets = []  # nothing to serve: never accept a connection only to drop it
            await shutdown.answered()
            if state.draining and not shutdown.forced:
                # uvicorn told to exit before it started would skip its lifespan's shutdown
                # (a traceback): it starts, without sockets, and is stopped below.
                server.should_exit = False
    serve_task = asyncio.create_task(_run_uvicorn(server, sockets))
    done, _ = await asyncio.wait({serve_task, start_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if start_task in done:
        exc = start_task.exception()
        if exc is not None:
            # A config error found while loading (a model path outside the model root, an
            # option the file contradicts) exits 2 as the ones found before it does.
            code = _report(exc)
            await _stop_once_started(server, serve_task)
        elif worker is not None and state.draining:
            # Told to stop while loading: it never served, so it never reports ready.
            log.info("worker %d loaded after the stop signal; not serving", worker.index)
            await _stop_once_started(server, serve_task)
        else:
            log.info("ready: %s", _ready_line(runtime))
            unwatched(freeze_heap)  # infercore's own work: no stall (server.loop_block_warn_ms)
            if worker is not None:
                worker.report_ready()
    else:
        start_task.cancel()
    serve_code = await serve_task
    if serve_code:
        code = serve_code
        print(f"infercore: error: could not listen on {where} (see the log above)", file=sys.stderr)
    if not serve_task.cancelled() and server.started is False and code == 0:
        code = EXIT_FAILURE
    if shutdown.forced:
        await forced_stop.finish()
    if admin is not None:
        await admin.stop()
    # Components close after the HTTP server, within what is left of the graceful timeout.
    closing_at = shutdown.closing_at if shutdown.closing_at is not None else loop.time()
    left = (
        FORCED_STOP_S
        if shutdown.forced
        else max(2.0, closing_at + cfg.graceful_timeout_s - loop.time())
    )
    try:
        await asyncio.wait_for(runtime.stop(), timeout=left)
    except TimeoutError:
        if shutdown.forced:
            # Asked to stop at once: what did not close in time is left behind, and that is
            # no failure of the server's (the exit code stays 0).
            log.warning("components did not stop within %.1fs; stopping anyway", left)
        else:
            log.error("components did not stop within %.1fs", left)
            code = code or EXIT_FAILURE
    if socket_file is not None:
        # Bound by this process whether or not uvicorn started: its own file goes either way.
        socket_file.remove()
    if worker is not None:
        watch.cancel()
    # Failures and uvicorn's warnings held back since their last line (a flood's tail) would
    # otherwise go uncounted: nothing more is served that could log the next line.
    flush_held_lines()
    if code == 0 and state.signals:
        log.info("stopped")
    return code


#: After a second signal: how long the components (batchers, models, feature sources) get to
#: close, and how long the requests cut short get to send their 503.
FORCED_STOP_S = 2.0
CUT_SHORT_S = 1.0


class _ForcedStop:
    """What the stop signal that forces the stop (the second) does beyond what
    ``GracefulShutdown.on_signal`` does itself, which only stops uvicorn waiting for the requests in
    progress: without this, their work still ran (the batchers drained their queues through
    the models while the components stopped), and the process exited 1 when that outlasted
    :data:`FORCED_STOP_S`.

    * At the signal, in the same callback, every batcher stops without draining
      (``stop_now``): its queued requests and those whose model call is running are answered
      503 ``shutting_down``, the running calls are cancelled (ONNX Runtime terminates its
      run), and nothing more runs through a model.
    * Once uvicorn has returned, :meth:`finish` cancels the requests it left running (one
      still reading its body, fetching features, or behind a plugin's batcher without
      ``stop_now``): each is answered 503 ``shutting_down`` by ``ShutdownMiddleware`` now,
      not when the event loop closes. Then one line says how many requests were answered 503
      ``shutting_down`` from the signal on.
    """

    def __init__(self, runtime: Any, server: Any) -> None:
        self.runtime = runtime
        self.server = server
        self.answered_before = 0

    def on_force(self) -> None:
        """``GracefulShutdown.on_force``: once, at the signal that forces the stop."""
        self.answered_before = _shutting_down_answers(self.runtime)
        _stop_batchers_now(self.runtime)

    async def finish(self) -> None:
        """Cut short what uvicorn left running, and say how many requests were answered 503."""
        tasks = getattr(getattr(self.server, "server_state", None), "tasks", ())
        running = [t for t in tasks if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CUT_SHORT_S)
        # Every request cut short, by its batcher or by the cancel above, is counted
        # "shutting_down" (the request path counts a cancellation during the stop so).
        answered = _shutting_down_answers(self.runtime) - self.answered_before
        log.warning(
            "stopped at once: %d request(s) in progress answered 503 shutting_down; nothing "
            "more ran through the models",
            answered,
        )


def _stop_batchers_now(runtime: Any) -> None:
    """:meth:`~infercore.components.batching.Batcher.stop_now` on every batcher (the built-in
    ones stop at once; a plugin's batcher that keeps the default is drained by its ``stop``,
    bounded by :data:`FORCED_STOP_S`)."""
    for served in runtime.models.values():
        for sv in served.versions.values():
            try:
                sv.batcher.stop_now()
            except Exception:  # a signal handler must not raise: the stop goes on
                log.exception("stopping %s at once failed", sv.batcher.context.path)


def _shutting_down_answers(runtime: Any) -> int:
    """Requests answered 503 ``shutting_down`` so far by this process (the
    ``infercore_request_failures_total{reason="shutting_down"}`` samples)."""
    failures = getattr(getattr(runtime, "metrics", None), "failures", None)
    if failures is None:
        return 0
    total = 0.0
    for family in failures.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("reason") == "shutting_down":
                total += sample.value
    return int(total)


async def _stop_once_started(server: Any, serve_task: asyncio.Task[int]) -> None:
    """Tell uvicorn to exit once it has finished starting (bounded): told to exit in the
    middle of its start-up it returns without shutting the lifespan down, and the lifespan
    task, cancelled when the loop closes, is logged with a traceback."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while not server.started and not serve_task.done():
                await asyncio.sleep(0.01)
    server.should_exit = True


def _ready_line(runtime: Any) -> str:
    """The versions serving (``fraud@1``), then the optional ones that failed to load."""
    ready: list[str] = []
    failed: list[str] = []
    for served in runtime.models.values():
        for sv in served.versions.values():
            (ready if sv.ready else failed).append(f"{served.name}@{sv.version}")
    line = ", ".join(ready)
    if failed:
        line += f"; not ready: {', '.join(failed)} (see the errors above)"
    return line


def set_switch_interval(ms: float) -> None:
    """``server.gil_switch_interval_ms``: how long the event loop may wait for the GIL.

    A model, feature-store or drift thread that finishes a call which released the GIL takes
    it back while the event loop runs; the loop, in turn, waits for it whenever such a thread
    runs Python. Python's 5 ms switch interval made a 40 µs ONNX call of the fraud recipe
    take 0.3-2 ms of the loop's time (benchmarks/README.md).
    """
    sys.setswitchinterval(ms / 1000)


def set_gc_threshold(gen0: int) -> None:
    """``server.gc_gen0_threshold``: allocations between young garbage collections.

    A young collection walks every tracked object that survived since the previous one; under
    load most of them belong to requests still in flight, so its cost hardly depends on how
    much garbage there is, and fewer collections cost proportionally less. At five times
    capacity (benchmarks/overload.py) Python's 700 spent ~120 ms of every 5 s in collections
    of up to 17-23 ms, which set rejections' p99 (10-16 ms); 10,000 spent 4-16 ms, p99
    4.3-5.4 ms in nine runs of ten.
    The older generations keep Python's thresholds.
    """
    import gc

    gc.set_threshold(gen0, *gc.get_threshold()[1:])


def freeze_heap() -> int:
    """Take what start-up left alive out of the garbage collector's reach; how many objects.

    Imported modules, loaded models, a feature store's registry live as long as the process.
    Left in the collector's generations, every full collection walks them all while every
    request in flight waits: about 80 ms with the iris recipe, once every 200,000 requests or
    so (benchmarks/inprocess.py). Frozen, they are never walked again (``gc.freeze``, as
    large Python servers do after start-up); what requests allocate is collected as before.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _watch_supervisor(worker: Any, on_signal: Any) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) stops as if it got SIGTERM."""
    import signal

    while not worker.orphaned():
        await asyncio.sleep(1.0)
    log.warning("worker %d: the supervisor is gone; stopping", worker.index)
    on_signal(signal.SIGTERM)


async def _run_uvicorn(server: Any, sockets: list[Any] | None = None) -> int:
    """``server.serve()``, with uvicorn's ``sys.exit`` on a failed bind turned into a code.

    A ``SystemExit`` escaping a task would tear through the event loop and skip the shutdown.
    """
    try:
        await server.serve(sockets=sockets)
    except SystemExit as exc:
        return int(exc.code or EXIT_FAILURE)
    lifespan = getattr(server, "lifespan", None)
    if server.force_exit and lifespan is not None and not lifespan.shutdown_event.is_set():
        # A forced stop (a second signal) skips uvicorn's lifespan shutdown; the lifespan
        # task, cancelled when the loop closes, would then be logged as an error with a
        # traceback. The app's lifespan holds nothing slow (components stop after this).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lifespan.shutdown(), timeout=1.0)
    return 0


if __name__ == "__main__":
    main()
