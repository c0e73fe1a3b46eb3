"""``python -m infercore_alibi_detect digest FOLDER``: the tree digest to pin as ``sha256``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infercore.errors import InfercoreError
from infercore_alibi_detect.artifact import code_parts, folder_digest, read_tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infercore_alibi_detect")
    sub = parser.add_subparsers(dest="command", required=True)
    digest = sub.add_parser("digest", help="print the tree digest of a saved detector folder")
    digest.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        print(folder_digest(args.folder))
        unsafe = code_parts(read_tree(args.folder, config_path=str(args.folder)))
    except InfercoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if unsafe:
        print(
            "note: parts that run code when loaded (need trusted: true): " + ", ".join(unsafe),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
