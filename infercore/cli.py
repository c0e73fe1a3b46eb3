"""The ``infercore`` command: subcommands, then Hydra overrides.

    infercore serve +recipe=iris [env=prod] [server.port=9000] [...]
    infercore config show +recipe=iris env=prod
    infercore config validate +recipe=iris
    infercore plugins

Config errors print one line and exit 2; a model that fails to load exits 1. ``--debug``
shows tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from infercore.errors import ConfigError, InfercoreError

log = logging.getLogger("infercore.cli")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


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
    validate = csub.add_parser("validate", help="everything short of loading models")
    validate.add_argument("overrides", nargs="*")

    sub.add_parser("plugins", help="installed plugins, the kinds each adds, and licences")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.overrides)
        if args.command == "config":
            if args.config_command == "show":
                return _config_show(args.overrides)
            return _config_validate(args.overrides)
        if args.command == "plugins":
            return _plugins()
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"infercore: config error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except InfercoreError as exc:
        if args.debug:
            raise
        print(f"infercore: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    """The error as one line, whatever a plugin's message contained."""
    return " ".join(str(exc).split())


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


def _config_validate(overrides: list[str]) -> int:
    from infercore.artifacts import resolve_artifact
    from infercore.runtime import Runtime

    composed = _compose(overrides)
    runtime = Runtime(composed)
    root = composed.model_root
    n_versions = 0
    for name, mc in composed.config.models.items():
        for version, vc in mc.versions.items():
            n_versions += 1
            path = vc.loader.get("path")
            if isinstance(path, str):
                try:
                    resolve_artifact(
                        root, path, config_path=f"models.{name}.versions.{version}.loader.path"
                    )
                except InfercoreError as exc:
                    raise ConfigError(str(exc)) from None
    label = composed.label or "no recipe"
    print(
        f"ok: {label}, {len(runtime.models)} model(s), {n_versions} version(s), "
        f"env={composed.choices.get('env', '?')}, deploy={composed.choices.get('deploy', '?')}"
    )
    return 0


def _plugins() -> int:
    from infercore.plugin_manager import make_plugin_manager
    from infercore.registry import Registry

    pm, infos = make_plugin_manager()
    registry = Registry(pm)
    kinds = registry.kinds_by_plugin()
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "LICENCE", "KINDS")]
    for name, info in infos.items():
        added = kinds.get(name, {})
        text = "; ".join(f"{role}: {', '.join(sorted(k))}" for role, k in sorted(added.items()))
        rows.append((name, info.distribution, info.version, info.license, text or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def _serve(overrides: list[str]) -> int:
    from infercore.runtime import Runtime
    from infercore.server import create_app
    from infercore.server.logs import configure

    composed = _compose(overrides)
    cfg = composed.config.server
    configure(cfg.log_level, cfg.log_format)
    if cfg.workers != 1:
        raise ConfigError(
            f"server.workers: {cfg.workers} is not supported yet; use 1 and run more "
            "processes behind a load balancer"
        )
    runtime = Runtime(composed)
    app = create_app(runtime, manage_runtime=False)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(_serve_async(app, runtime, composed.label))
    return uvloop.run(_serve_async(app, runtime, composed.label))


async def _serve_async(app: Any, runtime: Any, label: str) -> int:
    import uvicorn

    cfg = runtime.config.server
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=cfg.access_log,
        timeout_graceful_shutdown=int(cfg.graceful_timeout_s),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # infercore owns the signals: uvicorn would re-raise them after exit, skipping our stop.
    server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        runtime.draining = True  # readiness goes false at once
        log.info("received %s, shutting down", signal.Signals(sig).name)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    if cfg.host in ("0.0.0.0", "::"):
        log.warning("listening on all interfaces (%s); is that intended?", cfg.host)
    log.info("starting %s on http://%s:%d", label or "infercore", cfg.host, cfg.port)
    serve_task = asyncio.create_task(server.serve())
    start_task = asyncio.create_task(runtime.start())
    done, _ = await asyncio.wait({serve_task, start_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if start_task in done:
        exc = start_task.exception()
        if exc is not None:
            print(f"infercore: error: {exc}", file=sys.stderr)
            server.should_exit = True
            code = EXIT_FAILURE
        else:
            log.info(
                "ready: %s", ", ".join(f"{m.name}@{m.primary}" for m in runtime.models.values())
            )
    else:
        start_task.cancel()
    try:
        await serve_task
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        code = int(exc.code or EXIT_FAILURE)
    if not serve_task.cancelled() and server.started is False and code == 0:
        code = EXIT_FAILURE
    await runtime.stop()
    return code


if __name__ == "__main__":
    main()
