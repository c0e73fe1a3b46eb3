#!/usr/bin/env bash
# The fraud recipe's drift -> retrain -> approval loop against a real server (about 70 s).
# Usage: benchmarks/fraud_drift_loop.sh [--detector alibi|stats] [--windows N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec uv run python benchmarks/fraud_drift_loop.py "$@"
