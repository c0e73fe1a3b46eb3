"""The ``infercore new-plugin`` subcommand (wired into :mod:`infercore.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from infercore.scaffold.generate import ROLES, ScaffoldError, new_plugin, plugin_names

EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    """Add ``new-plugin`` to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "new-plugin",
        help="generate a plugin distribution (infercore-NAME) ready to edit and install",
        description="Generate infercore-NAME/: a pyproject with the `infercore` entry point, "
        "src/infercore_NAME/ with the hook and a typed component with its Config, a test "
        "using infercore.testing, and a README. See docs/plugins.md.",
    )
    p.add_argument("name", help="the plugin name, e.g. my-format (lower-case, '-' or '_')")
    p.add_argument("--kind", required=True, choices=list(ROLES), help="the component role")
    p.add_argument(
        "--dir",
        default=".",
        help="the folder in which infercore-NAME/ is created (default: the current one)",
    )


def run_new_plugin(args: argparse.Namespace) -> int:
    """Generate the plugin; one line and exit code 2 on a bad name, kind or folder."""
    try:
        written = new_plugin(args.name, args.kind, Path(args.dir))
    except ScaffoldError as exc:
        if args.debug:
            raise
        print(f"infercore: new-plugin: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    names = plugin_names(args.name)
    root = written[0].parent
    shown = os.path.relpath(root) if not Path(args.dir).is_absolute() else str(root)
    print(f"created {shown}/ ({args.kind} kind {names.kind!r}):")
    for path in written:
        print(f"  {path.relative_to(root)}")
    print("next:")
    print(f"  uv pip install -e '{shown}[test]'   # or: pip install -e '{shown}[test]'")
    print("  infercore plugins")
    print(f"  pytest {shown}")
    return 0
