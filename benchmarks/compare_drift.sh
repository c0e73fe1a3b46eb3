#!/usr/bin/env bash
# Serving throughput of the fraud recipe with drift monitoring off and on, side by side: the
# server on core 0, wrk on core 1, a fresh Feast store per run. Needs wrk (apt-get install wrk).
# Usage: benchmarks/compare_drift.sh [seconds] [sample_rate ...]   (default: 10 s; 1.0 and 0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
shift || true
RATES=("${@:-1.0 0.1}")
read -r -a RATES <<<"${RATES[*]}"
PORT=${PORT:-18500}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
bench() {
    local name=$1; shift
    rm -rf "$TMP/store"
    taskset -c 0 .venv/bin/infercore serve +recipe=fraud "server.port=$PORT" \
        "++features.sqlite_path=$TMP/store/online.db" "++features.registry_path=$TMP/store/registry.db" \
        "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do
        sleep 0.5
        curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
    done
    printf '%-16s ' "$name"
    taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -s benchmarks/wrk/fraud_v1.lua --latency \
        "http://127.0.0.1:$PORT" | awk '/Requests\/sec/ {r=$2} / 50%/ {p50=$2} / 99%/ {p99=$2}
        /Non-2xx/ {n=$NF} END {print r " req/s, p50 " p50 ", p99 " p99 ", non-2xx " (n==""?0:n)}'
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
uv sync -q
for rate in "${RATES[@]}"; do
    bench "drift off" models.fraud.drift=null
    bench "drift on ($rate)" "models.fraud.drift.sample_rate=$rate"
done
