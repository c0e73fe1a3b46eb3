"""Rebuild the ``fraud`` recipe's data and models end to end.

generate -> features -> train -> reference (the served-inputs drift reference; it also pins
every artifact in ``artifacts/SHA256SUMS``, so it runs again whenever ``train`` has run).

    uv run python recipes/fraud/build.py            # runs only the steps whose inputs changed
    uv run python recipes/fraud/build.py --force    # runs every step

A step is skipped when the hash of its inputs (its scripts, its arguments and the files it
reads) matches the one recorded in ``data/build_state.json`` and every output it wrote still has
the recorded SHA-256. Each step runs as its own process with this interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _label(path: Path | str) -> str:
    """A path relative to this recipe's folder where it lies inside (stable across clones)."""
    p = Path(path).resolve()
    return p.relative_to(HERE).as_posix() if p.is_relative_to(HERE) else str(p)


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    args: tuple[str, ...]
    sources: tuple[str, ...]  # scripts whose code the step runs
    reads: tuple[Path, ...]
    writes: tuple[Path, ...]

    def input_hash(self) -> str:
        h = hashlib.sha256()
        for s in self.sources:
            h.update(s.encode() + b"\0" + (HERE / s).read_bytes())
        args = [_label(x) if x.startswith("/") else x for x in self.args]
        h.update(json.dumps(args).encode())
        for r in self.reads:
            h.update(_label(r).encode() + b"\0" + _sha(r).encode())
        return h.hexdigest()


def _steps(a: argparse.Namespace) -> list[Step]:
    data, art = a.data.resolve(), a.artifacts.resolve()
    tx, cf = data / "transactions.parquet", data / "card_features.parquet"
    defaults = art / "feature_defaults.json"
    models = tuple(art / v / f for v in ("v1", "v2") for f in ("model.onnx", "metrics.json"))
    reference = art / "reference.parquet"
    return [
        Step(
            "generate",
            "generate.py",
            (
                "--seed",
                str(a.seed),
                "--cards",
                str(a.cards),
                "--days",
                str(a.days),
                "--out",
                str(data),
            ),
            ("generate.py", "features.py"),
            (),
            (tx,),
        ),
        Step(
            "features",
            "features.py",
            ("--data", str(data), "--defaults", str(defaults)),
            ("features.py",),
            (tx,),
            (cf, defaults),
        ),
        Step(
            "train",
            "train.py",
            ("--data", str(data), "--out", str(art)),
            ("train.py", "features.py"),
            (tx, defaults),
            # train.py writes SHA256SUMS too, but the reference step has the last word on it
            (*models, reference),
        ),
        Step(
            "reference",
            "reference.py",
            ("--data", str(data), "--out", str(art)),
            ("reference.py", "train.py", "features.py"),
            # the other files are read for their digests in SHA256SUMS
            (tx, cf, defaults, *models, reference),
            (art / "reference_served.parquet", art / "SHA256SUMS"),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="run every step")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cards", type=int, default=5_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    a = p.parse_args(argv)

    state_path = a.data / "build_state.json"
    state: dict[str, dict[str, object]] = (
        json.loads(state_path.read_text()) if state_path.exists() else {}
    )
    t0 = time.perf_counter()
    for step in _steps(a):
        key = step.input_hash()
        rec = state.get(step.name, {})
        outputs = rec.get("outputs", {})
        fresh = (
            not a.force
            and rec.get("inputs") == key
            and isinstance(outputs, dict)
            and all(w.exists() and outputs.get(_label(w)) == _sha(w) for w in step.writes)
        )
        if fresh:
            print(f"build: {step.name}: up to date, skipped", flush=True)
            continue
        print(f"build: {step.name}: running {step.script} {' '.join(step.args)}", flush=True)
        t1 = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / step.script), *step.args], check=False)
        if done.returncode != 0:
            print(f"build: {step.name} failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        state[step.name] = {
            "inputs": key,
            "outputs": {_label(w): _sha(w) for w in step.writes},
        }
        a.data.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        print(f"build: {step.name}: done ({time.perf_counter() - t1:.1f} s)", flush=True)
    print(f"build: all steps done ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
