#!/usr/bin/env bash
# One-command load test of a recipe against a real server process:
#   starts `infercore serve +recipe=RECIPE` on a free loopback port (pinned to CPU 0 when taskset
#   exists), waits for readiness, runs benchmarks/locustfile_RECIPE.py headless (pinned to CPU 1)
#   for a bounded time, writes benchmarks/results/RECIPE-<date>_stats.csv (and the other locust
#   CSVs), prints a summary, and always stops the server (SIGTERM, then SIGKILL after 15 s).
#   For recipes with a Feast feature source (fraud), the registry and SQLite online store are a
#   fresh pair in benchmarks/results/tmp/ (materialized afresh), removed at exit.
#
# Usage: benchmarks/run_load.sh RECIPE [--users N] [--spawn-rate R] [--run-time 30s]
#                                      [--server-cpu 0] [--locust-cpu 1] [-- OVERRIDE ...]
#   RECIPE: iris or fraud (benchmarks/run_iris_load.sh and run_fraud_load.sh call this).
#   Hydra overrides after `--` go to the server, e.g. `-- features.cache_ttl_s=0`.
#   Environment: INFERCORE_BIN_DIR (where `infercore` and `locust` live; default: the uv env),
#   FRAUD_LOAD_ZIPF / FRAUD_LOAD_UNKNOWN (fraud: card popularity skew, share of unknown cards).

set -euo pipefail

me="run_load.sh"
recipe="${1:-}"
case "$recipe" in
  iris)
    artifacts=(recipes/iris/artifacts/model.onnx)
    build="uv run python recipes/iris/train.py"
    feast=""
    ready_s=60 ;;
  fraud)
    artifacts=(recipes/fraud/artifacts/v1/model.onnx recipes/fraud/data/card_features.parquet
               recipes/fraud/data/transactions.parquet)
    build="uv run python recipes/fraud/build.py"
    feast=1
    ready_s=120 ;;  # the first start imports Feast and materializes
  -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "$me: the first argument is the recipe: iris or fraud (see --help)" >&2; exit 2 ;;
esac
shift

users=32
spawn_rate=""
run_time=30s
server_cpu=0
locust_cpu=1
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --users|-u) users="$2"; shift 2 ;;
    --spawn-rate|-r) spawn_rate="$2"; shift 2 ;;
    --run-time|-t) run_time="$2"; shift 2 ;;
    --server-cpu) server_cpu="$2"; shift 2 ;;
    --locust-cpu) locust_cpu="$2"; shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$me: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
spawn_rate="${spawn_rate:-$users}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin_dir="${INFERCORE_BIN_DIR:-}"
if [[ -z "$bin_dir" ]]; then
  bin_dir="$(uv run --quiet python -c 'import os, sys; print(os.path.dirname(sys.executable))')"
fi
python="$bin_dir/python"
for tool in infercore locust python; do
  [[ -x "$bin_dir/$tool" ]] || { echo "$me: $bin_dir/$tool not found" >&2; exit 2; }
done
for f in "${artifacts[@]}"; do
  if [[ ! -f "$f" ]]; then
    echo "$me: $f is missing; build it with: $build" >&2
    exit 2
  fi
done

pin_server=()
pin_locust=()
if command -v taskset >/dev/null 2>&1; then
  ncpu="$(nproc)"
  if (( server_cpu < ncpu && locust_cpu < ncpu )); then
    pin_server=(taskset -c "$server_cpu")
    pin_locust=(taskset -c "$locust_cpu")
  else
    echo "note: only $ncpu CPU(s); not pinning" >&2
  fi
else
  echo "note: taskset not found; not pinning server and load generator" >&2
fi

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
url="http://127.0.0.1:$port"
stamp="$(date +%Y%m%d-%H%M%S)"
mkdir -p benchmarks/results
prefix="benchmarks/results/$recipe-$stamp"
server_log="$prefix-server.log"
# The Feast registry and SQLite online store: a fresh pair per run, outside the recipe folder
# (benchmarks/results/tmp/ is git-ignored), removed at exit.
server_args=()
feast_dir=""
if [[ -n "$feast" ]]; then
  feast_dir="$repo/benchmarks/results/tmp/$recipe-feast-$stamp-$$"
  mkdir -p "$feast_dir"
  server_args=("++features.registry_path=$feast_dir/registry.db"
               "++features.sqlite_path=$feast_dir/online_store.db")
fi

server_pid=""
stop_server() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 150); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "the server ignored SIGTERM for 15 s; killing it" >&2
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
cleanup() {
  stop_server
  [[ -z "$feast_dir" ]] || rm -rf "$feast_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "server: infercore serve +recipe=$recipe on $url ${pin_server[*]:+(${pin_server[*]})}"
"${pin_server[@]}" "$bin_dir/infercore" serve "+recipe=$recipe" "server.port=$port" \
  "${server_args[@]}" \
  "${overrides[@]}" >"$server_log" 2>&1 &
server_pid=$!

ready=""
for _ in $(seq $((ready_s * 10))); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "the server exited before it was ready; its log:" >&2
    cat "$server_log" >&2
    exit 1
  fi
  if "$python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$url/v2/health/ready', timeout=1).status != 200)" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.1
done
[[ -n "$ready" ]] || { echo "the server was not ready within $ready_s s; log: $server_log" >&2; exit 1; }

echo "load: locust, $users users (spawn rate $spawn_rate/s), $run_time ${pin_locust[*]:+(${pin_locust[*]})}"
status=0
INFERCORE_LOAD_SUMMARY="$prefix-summary.json" "${pin_locust[@]}" "$bin_dir/locust" \
  -f "benchmarks/locustfile_$recipe.py" --headless \
  --host "$url" --users "$users" --spawn-rate "$spawn_rate" --run-time "$run_time" \
  --csv "$prefix" --only-summary --loglevel WARNING || status=$?

"$python" -c "import urllib.request; print(urllib.request.urlopen('$url/metrics', timeout=5).read().decode())" \
  >"$prefix-metrics.txt" 2>/dev/null || true
stop_server

"$python" - "$prefix" "$recipe" <<'PY'
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

prefix, recipe = sys.argv[1], sys.argv[2]
with open(f"{prefix}-summary.json") as f:
    rows = json.load(f)
print()
print(f"{'name':<14} {'requests':>9} {'failures':>9} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
for row in rows:
    print(f"{row['name']:<14} {row['requests']:>9} {row['failures']:>9} "
          f"{row['requests_per_s']:>9.1f} {row['p50_ms']:>7.0f} {row['p99_ms']:>7.0f}")
try:
    with open(f"{prefix}-metrics.txt") as f:
        text = f.read()
except OSError:
    text = ""
if text.strip():
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == recipe and "le" not in s.labels:
                totals[s.name] = totals.get(s.name, 0.0) + s.value
    calls = totals.get("infercore_batch_size_count", 0)
    if calls:
        print(f"server: {calls:.0f} model calls, "
              f"{totals['infercore_batch_size_sum'] / calls:.2f} rows per call on average")
    reads = totals.get("infercore_feature_fetch_seconds_count", 0)
    hits = totals.get("infercore_feature_cache_hits_total", 0)
    misses = totals.get("infercore_feature_cache_misses_total", 0)
    if reads:
        print(f"feast: {reads:.0f} online reads, "
              f"{totals['infercore_feature_read_entities_sum'] / reads:.2f} cards per read, "
              f"{1000 * totals['infercore_feature_fetch_seconds_sum'] / reads:.2f} ms per read; "
              f"cache hits {hits:.0f} / lookups {hits + misses:.0f} "
              f"({100 * hits / max(1.0, hits + misses):.1f} %); "
              f"fetch failures {totals.get('infercore_feature_fetch_failures_total', 0):.0f}")
print(f"\nfiles: {prefix}_stats.csv (+ _stats_history, _failures, _exceptions: locust's"
      f" periodic CSVs), {prefix}-summary.json (final figures), {prefix}-server.log,"
      f" {prefix}-metrics.txt (the server's /metrics at the end)")
PY
exit "$status"
