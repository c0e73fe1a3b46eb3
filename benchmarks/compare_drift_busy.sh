#!/usr/bin/env bash
# Serving latency of the fraud recipe with no drift monitor, with the recipe's monitor, and with
# a detector that is (almost) always running, side by side and alternating (off, default, busy …
# off, default, busy …) because a shared machine drifts between runs. The server is pinned to
# core 0 (its detectors share that core), wrk to core 1, a fresh Feast store per run, a fixed
# number of connections. Needs wrk (apt-get install wrk); the busy-mmd mode needs torch
# (.ci/install-torch-cpu) and infercore-alibi-detect. Never runs `uv sync` (it would remove torch).
# Usage: benchmarks/compare_drift_busy.sh [seconds] [rounds] [mode ...]
#   modes: off | default | busy-stats | busy-mmd   (default: all four; 10 s; 2 rounds)
#   CONNS=16 PORT=18510 EXECUTOR=thread|process (the drift.executor of the monitored modes)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-2}
shift 2 || shift $# || true
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(off default busy-stats busy-mmd)
PORT=${PORT:-18510}
CONNS=${CONNS:-16}
EXECUTOR=${EXECUTOR:-}
TMP=$(mktemp -d)
SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then kill -TERM "$SERVER" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
D=models.fraud.drift
NUMERIC='[amount,hour,txn_count_1h,txn_count_24h,amount_avg_7d]'
overrides() {
    local extra=()
    [ -z "$EXECUTOR" ] || extra=("++$D.executor=$EXECUTOR")
    case $1 in
        off) echo "$D=null" ;;
        default) printf '%s\n' "${extra[@]}" ;;
        # drift-stats KS + chi-square on every request, a window every 100 rows
        busy-stats) printf '%s\n' "$D.sample_rate=1.0" "$D.window_size=100" "${extra[@]}" ;;
        # plus alibi-detect MMD (pytorch, CPU, 100 permutations against the 2,000-row reference)
        # on 200-row windows of every request: each test takes longer than a window takes to fill
        busy-mmd) printf '%s\n' "$D.sample_rate=1.0" "$D.window_size=200" \
            "++$D.detectors.mmd={kind:alibi-mmd,reference:fraud/artifacts/reference.parquet,features:$NUMERIC}" \
            "${extra[@]}" ;;
        *) echo "unknown mode $1" >&2; exit 2 ;;
    esac
}
bench() {
    local mode=$1 round=$2
    local -a over
    mapfile -t over < <(overrides "$mode" | grep -v "^$")
    rm -rf "$TMP/store"
    taskset -c 0 .venv/bin/infercore serve +recipe=fraud "server.port=$PORT" \
        "++features.sqlite_path=$TMP/store/online.db" "++features.registry_path=$TMP/store/registry.db" \
        "${over[@]}" >"$TMP/$mode.log" 2>&1 &
    SERVER=$!
    local ready=0
    for _ in $(seq 1 360); do
        sleep 0.5
        if curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null; then ready=1; break; fi
        kill -0 "$SERVER" 2>/dev/null || break
    done
    if [ "$ready" != 1 ]; then
        echo "$mode: the server did not get ready; its log:" >&2; tail -20 "$TMP/$mode.log" >&2
        exit 1
    fi
    # warm-up (and, for the busy modes, a queue that is already full)
    taskset -c 1 wrk -t1 -c"$CONNS" -d2s -s benchmarks/wrk/fraud_v1.lua "http://127.0.0.1:$PORT" >/dev/null
    local line windows
    line=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -s benchmarks/wrk/fraud_v1_percentiles.lua \
        "http://127.0.0.1:$PORT" | grep '^SUMMARY')
    windows=$(curl -sf "http://127.0.0.1:$PORT/metrics" \
        | awk '/^infercore_drift_windows_total/ {s+=$NF} END {print s+0}')
    printf '%-11s round %s  %s drift_windows=%s\n' "$mode" "$round" "${line#SUMMARY }" "$windows"
    kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true
    SERVER=
}
echo "fraud, server on core 0, wrk -c$CONNS on core 1, ${SECS}s per run${EXECUTOR:+, executor $EXECUTOR}"
for round in $(seq 1 "$ROUNDS"); do
    for mode in "${MODES[@]}"; do bench "$mode" "$round"; done
done
