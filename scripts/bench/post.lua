-- wrk script of scripts/bench/proxy.py: one fixed chat completion POST (built once, so wrk's fast
-- path sends it without calling Lua per request); at the end one line `BENCH {json}` with the counts,
-- the errors and the latency percentiles (microseconds) that proxy.py reads.
--   BENCH_BODY=... BENCH_TOKEN=... wrk -t1 -c64 -d10s --timeout 30s -s post.lua http://host:port/chat/completions
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
