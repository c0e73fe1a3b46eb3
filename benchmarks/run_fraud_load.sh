#!/usr/bin/env bash
# Load test of the fraud recipe: see benchmarks/run_load.sh (run_load.sh --help).
#   benchmarks/run_fraud_load.sh [--users N] [--spawn-rate R] [--run-time 30s] [-- OVERRIDE ...]
exec "$(dirname "${BASH_SOURCE[0]}")/run_load.sh" fraud "$@"
