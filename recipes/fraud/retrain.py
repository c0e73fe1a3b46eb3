"""Retrain the ``fraud`` model on data that includes a new fraud tactic; write the next version.

The retraining job a drift event starts (the recipe's ``command`` action). It regenerates the
synthetic world with ``generate.py``'s new tactic switched on (``--shift``: a night-time,
domestic, card-not-present wave with large amounts, from the middle of the window on), trains
the champion's pipeline (``train.build_v1``: logistic regression, same ONNX export) on the
first 80 % of the days, and writes the next version folder of the repository::

    <artifacts>/v<N>/model.onnx      N = the highest existing v<k> + 1
    <artifacts>/v<N>/metrics.json    test metrics on the shifted world and on the original one
    <artifacts>/SHA256SUMS           the two files' digests appended (pinned for loading)

and prints ``INFERCORE_NEW_VERSION=<N>`` (``register_candidate`` with ``version: output``
reads it). Same data, same bytes: deterministic like ``train.py``. About 5-10 s on one core.

    uv run python recipes/fraud/retrain.py --artifacts /tmp/copy/fraud/artifacts [event.json]

The drift event's JSON file (the command action passes it as the last argument) is only
reported; the retraining does not depend on it. Never point ``--artifacts`` at the committed
folder from tests: the loop script works on a copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from features import load_defaults, point_in_time_features, split_time  # noqa: E402
from generate import DEFAULT_CARDS, DEFAULT_DAYS, DEFAULT_SEED, generate  # noqa: E402
from train import (  # noqa: E402
    V1_FEATURES,
    _check_exporter,
    build_v1,
    input_spec,
    model_frame,
    onnx_proba,
    scores,
    to_onnx,
)

_VERSION_DIR = re.compile(r"^v(\d{1,6})$")


def next_version(artifacts: Path) -> int:
    found = [int(m.group(1)) for p in artifacts.iterdir() if (m := _VERSION_DIR.match(p.name))]
    return max(found, default=0) + 1


def append_sums(artifacts: Path, names: list[str]) -> None:
    """Pin ``names`` (relative to ``artifacts``) in its SHA256SUMS, replacing older lines."""
    sums = artifacts / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.exists() else []
    lines = [ln for ln in lines if ln.split(None, 1)[-1].strip() not in names]
    for name in names:
        lines.append(f"{hashlib.sha256((artifacts / name).read_bytes()).hexdigest()}  {name}")
    tmp = sums.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(sums)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("event_file", nargs="?", type=Path, help="the drift event (JSON), reported")
    p.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    p.add_argument("--shift", type=float, default=0.15, help="new-tactic rows per legit one")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--cards", type=int, default=DEFAULT_CARDS)
    p.add_argument("--days", type=int, default=DEFAULT_DAYS)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.event_file is not None:
        try:
            ev = json.loads(a.event_file.read_text())
            print(
                f"retrain: drift event {ev.get('id')} of model {ev.get('model')} "
                f"(detector {ev.get('detector')}, features {', '.join(ev.get('features', []))})",
                flush=True,
            )
        except (OSError, ValueError) as exc:
            print(f"retrain: cannot read the event file ({type(exc).__name__})", file=sys.stderr)
            return 2
    if not (a.artifacts / "feature_defaults.json").is_file():
        print(f"retrain: {a.artifacts} has no feature_defaults.json", file=sys.stderr)
        return 2
    _check_exporter()
    defaults = load_defaults(a.artifacts / "feature_defaults.json")

    results: dict[str, dict[str, Any]] = {}
    worlds = {
        "shifted": generate(a.seed, a.cards, a.days, shift=a.shift),
        "original": generate(a.seed, a.cards, a.days),
    }
    frames = {}
    for name, tx in worlds.items():
        pit = point_in_time_features(tx, defaults)
        mask = (pit["event_timestamp"] < split_time(tx)).to_numpy()
        y = pit["is_fraud"].to_numpy().astype(np.int64)
        frames[name] = (model_frame(pit, V1_FEATURES), y, mask)
    x, y, train = frames["shifted"]
    pipe = build_v1().fit(x[train], y[train])
    version = next_version(a.artifacts)
    model = to_onnx(pipe, V1_FEATURES, f"fraud_v{version}")
    for name, (xw, yw, mask) in frames.items():
        results[name] = scores(yw[~mask], onnx_proba(model, xw[~mask]))
    metrics = {
        "model": "fraud",
        "version": f"v{version}",
        "estimator": "LogisticRegression",
        "retrained_on": f"generate.py --seed {a.seed} --cards {a.cards} --days {a.days} "
        f"--shift {a.shift} (new tactic: night-time domestic online electronics/gambling)",
        "inputs": input_spec(V1_FEATURES),
        "test": results["shifted"],
        "test_original_world": results["original"],
        "train_rows": int(train.sum()),
        "model_bytes": len(model),
    }
    out = a.artifacts / f"v{version}"
    out.mkdir()
    (out / "model.onnx").write_bytes(model)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    append_sums(a.artifacts, [f"v{version}/model.onnx", f"v{version}/metrics.json"])
    s, o = results["shifted"], results["original"]
    print(
        f"retrain: v{version} LogisticRegression on {int(train.sum()):,} rows: ROC-AUC "
        f"{s['roc_auc']:.4f} on the shifted test days ({o['roc_auc']:.4f} on the original), "
        f"{len(model) / 1e3:.1f} kB, pinned in SHA256SUMS ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    print(f"INFERCORE_NEW_VERSION={version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
