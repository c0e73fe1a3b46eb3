"""What a GPU machine without a package index lacks to run infercore's GPU checks.

``python benchmarks/gpu/bundle_requirements.py [--python-version 3.12]`` prints one
``name==version`` line per distribution that infercore, infercore-torch and infercore-onnx
(uvicorn with its ``standard`` extra) need, directly or not, that is not on that machine
(``device_packages.txt``), at the version installed in this environment. Requirements are
followed through this environment's metadata; markers are evaluated for the target Python on
x86-64 Linux. ``bundle.sh`` downloads wheels of these.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
#: What the checks run: ``(distribution, extra)``.
ROOTS = (
    ("infercore", ""),
    ("infercore-torch", ""),
    ("infercore-onnx", ""),
    ("uvicorn", "standard"),
)
OURS = ("infercore",)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(path: Path = HERE / "device_packages.txt") -> set[str]:
    names: set[str] = set()
    for line in path.read_text().splitlines():
        names.update(normalize(n) for n in line.split("#", 1)[0].split())
    return names


def environment(python_version: str, extra: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": extra,
    }


def missing(python_version: str, present: set[str]) -> dict[str, str]:
    """``{name: version}`` of what the roots need beyond ``present`` and infercore's own."""
    need: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = list(ROOTS)
    while todo:
        name, extra = todo.pop()
        key = normalize(name)
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"bundle: {name} is not installed here: run 'uv sync' first") from None
        if not key.startswith(OURS):
            need[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(
                environment(python_version, extra)
            ):
                continue
            if normalize(req.name) in present:
                continue
            for sub in sorted(req.extras) or [""]:
                todo.append((req.name, sub))
    return dict(sorted(need.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default="3.12", help="the machine's Python (3.12)")
    args = p.parse_args(argv)
    for name, version in missing(args.python_version, device_packages()).items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
