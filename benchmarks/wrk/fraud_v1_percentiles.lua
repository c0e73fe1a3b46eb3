-- fraud_v1.lua's requests, plus one summary line at the end that the benchmark scripts parse:
--   SUMMARY rps=<req/s> p50_ms=… p99_ms=… p999_ms=… non2xx=… errors=…
-- (wrk's --latency table stops at p99.) Run wrk from the repository root.
dofile("benchmarks/wrk/fraud_v1.lua")

done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  local non2xx = e.status
  local errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "SUMMARY rps=%.0f p50_ms=%.1f p99_ms=%.1f p999_ms=%.1f non2xx=%d errors=%d\n",
    summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, non2xx, errors))
end
