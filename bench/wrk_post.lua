-- wrk's side of the ingest scenario (bench/scenarios.py runs it; see BENCHMARKS.md):
--   wrk -t1 -c50 -d10s -s bench/wrk_post.lua http://127.0.0.1:PORT
-- POST /v1/comments with Content-Type: application/json, a message of WRK_MESSAGE_CHARS
-- characters (100), post ids round-robin over WRK_POSTS posts (100), as the harness's own
-- poster does in the same scenario. One request in flight per connection (no pipelining),
-- keep-alive.
local posts = tonumber(os.getenv("WRK_POSTS") or "100")
local message = string.rep("x", tonumber(os.getenv("WRK_MESSAGE_CHARS") or "100"))
local n = 0

wrk.method = "POST"
wrk.path = "/v1/comments"
wrk.headers["Content-Type"] = "application/json"

function request()
  n = n + 1
  local body = string.format('{"post_id":"wrk-%d","uid":"bench","message":"%s"}', n % posts, message)
  return wrk.format(nil, nil, nil, body)
end

-- One machine-readable line for the harness, after wrk's own summary. Latency is wrk's: from
-- writing a request to reading its whole response, in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'wrk-result {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,' ..
    '"p99_9_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
