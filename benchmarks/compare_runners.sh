#!/usr/bin/env bash
# Side-by-side: the iris app under uvicorn (uvloop + httptools) and granian, same machine, same
# wrk load (server on core 0, wrk on core 1). Needs wrk (apt-get install wrk); granian is pulled
# into a throwaway environment by `uv run --with granian`. Usage: benchmarks/compare_runners.sh [secs]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
PORT=${PORT:-18200}
LUA=$(mktemp --suffix=.lua)
trap 'rm -f "$LUA"' EXIT
cat > "$LUA" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
wrk.headers["Content-Type"] = "application/json"
LUA
export PYTHONPATH="$PWD/benchmarks"
bench() {
    local name=$1; shift
    taskset -c 0 "$@" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 1 60); do
        sleep 0.5
        curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
    done
    printf '%-10s ' "$name"
    taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -s "$LUA" "http://127.0.0.1:$PORT/v2/models/iris/infer" \
        | awk '/Requests\/sec/ {rps=$2} /Latency/ {lat=$2} END {print rps " req/s, mean latency " lat}'
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
bench uvicorn uv run python -m uvicorn asgi_iris:app --port "$PORT" --loop uvloop --http httptools \
    --no-access-log --log-level warning
bench granian uv run --with granian granian --interface asgi --port "$PORT" --workers 1 \
    --loop uvloop --no-ws --log-level warning asgi_iris:app
bench uvicorn uv run python -m uvicorn asgi_iris:app --port "$PORT" --loop uvloop --http httptools \
    --no-access-log --log-level warning
